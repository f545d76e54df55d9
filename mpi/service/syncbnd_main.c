/* syncbnd: one normalization worker per MPI rank, serving local clients
 * over a Unix socket and, with --tcp, token-authenticated clients over TCP
 * (protocol: mpi/service/PROTOCOL.md).
 *
 * main() only parses flags and wires the pieces: MPI start-up (rank, size,
 * an agreed default socket directory), the worker (src/svc/worker/), the
 * libuv server (src/svc/server/) and the job's communicator from the MPI
 * library, whose non-blocking collectives the worker polls from the
 * server's timer: the loop never blocks inside MPI. */
#define _GNU_SOURCE /* explicit_bzero */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <malloc.h>
#include <mpi.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "svc_server.h"
#include "svc_worker.h"
#include "syncbn_mpi.h"
#include "syncbnd_launch.h"
#include "syncbnd_obs.h"

/* What the sync timer needs: the worker it polls, and the launched
 * command's watcher (NULL without -- COMMAND). */
typedef struct sync_tick_s {
  svc_worker_t *worker;
  sbnd_launch_t *launch;
  int failed;
} sync_tick_t;

static void sync_tick(void *arg) {
  sync_tick_t *m = arg;
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  if (m->failed)
    return;
  if (svc_worker_poll(m->worker, (double)ts.tv_sec + ts.tv_nsec * 1e-9) != 0) {
    /* The ranks no longer agree on the collectives: the job cannot serve
     * syncbatchnorm any more, and the others would hang. */
    fprintf(stderr, "syncbnd: cross-rank agreement failed (%s); aborting\n",
            svc_last_error());
    m->failed = 1;
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  sbnd_launch_poll(m->launch);
}

/* The help text, one option a line: honestly linear, so it stays one
 * function that reads like the page it prints. */
static void usage(FILE *f) {
  fprintf(f,
          "Usage: mpirun -np P syncbnd [options] [-- COMMAND ARGS...]\n"
          "\n");
  sbnd_launch_usage(f);
  fprintf(f,
          "Runs one syncbn worker per MPI rank. Each listens on the Unix "
          "socket\n"
          "DIR/rank-<r>.sock and serves the clients of its own user (the "
          "protocol\n"
          "is in mpi/service/PROTOCOL.md). Each rank prints one line when "
          "ready:\n"
          "  syncbnd: rank R ready on PATH\n"
          "SIGINT or SIGTERM makes a worker close its connections, remove its "
          "socket\n"
          "and exit; mpirun then ends the whole job.\n"
          "\n"
          "Options:\n"
          "  --keep               keep the socket and state directories the "
          "job created\n"
          "  --log-level L        error|warn|info|debug: stderr lines with "
          "rank, layer\n"
          "                       and step (stalls, mismatches, refused and "
          "leaving\n"
          "                       clients at warn/info; default error)\n"
          "  --timeline FILE      Chrome trace-event JSON of each rank in "
          "FILE with\n"
          "                       .json replaced by .rank-R.json "
          "(negotiation,\n"
          "                       allreduce, per-layer compute)\n"
          "  --version            print the version and exit\n"
          "  --socket-dir DIR     directory of the sockets; created with mode "
          "0700 if\n"
          "                       missing, refused if it is a symlink, owned "
          "by another\n"
          "                       user or open to group/others (default:\n"
          "                       $XDG_RUNTIME_DIR/syncbnd-<job>, else\n"
          "                       /tmp/syncbnd-<uid>-<job>, <job> agreed by "
          "the ranks)\n"
          "  --max-frame BYTES    largest request frame body (default "
          "268435456)\n"
          "  --max-clients N      clients served at once per rank (default "
          "64)\n"
          "  --max-output BYTES   replies queued for one client before it is "
          "dropped\n"
          "                       as not reading (default 536870912)\n"
          "  --idle-timeout S     close a connection without a request for S "
          "seconds;\n"
          "                       0 = never (default 300)\n"
          "  --frame-timeout S    close a connection whose started frame is "
          "not complete\n"
          "                       after S seconds; 0 = never (default 60)\n"
          "  --keep-steps K       keep a layer's forward state for backward "
          "until its\n"
          "                       step is more than K behind the newest "
          "(default 2)\n"
          "  --max-layers N       layers a worker holds (default 1024)\n"
          "  --cache-slots N      slots of the agreement's response cache, "
          "1 to 65536;\n"
          "                       the same on every rank (default 512)\n"
          "  --no-speculate       negotiate every agreement round, also one "
          "whose\n"
          "                       cached entries the rounds before predict "
          "(the same\n"
          "                       on every rank)\n"
          "  --max-saved BYTES    forward state kept for backward, all "
          "layers (default\n"
          "                       4294967296)\n"
          "  --max-depth N        msgpack nesting depth of a request, at most "
          "32\n"
          "                       (default 8)\n"
          "  --max-objects N      msgpack objects in a request (default "
          "4096)\n"
          "  --cycle-us US        period at which an idle worker checks its\n"
          "                       doorbell and stall timers (default 1000;\n"
          "                       rounds start at once on new entries)\n"
          "  --state-dir DIR      directory of checkpoint files "
          "(checkpoint_save/load);\n"
          "                       created with mode 0700 if missing, checked "
          "like\n"
          "                       --socket-dir (default: the socket "
          "directory + \"-state\")\n"
          "  --stall-timeout S    fail a syncbatchnorm entry that not every "
          "rank\n"
          "                       submitted within S seconds (default 60)\n"
          "  --tcp HOST:PORT      also listen on TCP: rank r on port PORT+r "
          "(PORT 0:\n"
          "                       any free port) of HOST, an IPv4 or IPv6 "
          "literal\n"
          "                       ([::1]:PORT) or a name; each rank then "
          "prints\n"
          "                       'syncbnd: rank R listening on tcp "
          "HOST:PORT'.\n"
          "                       The first request on a TCP connection must "
          "be a\n"
          "                       hello with the token. Traffic is not "
          "encrypted: bind\n"
          "                       a loopback address (and tunnel) unless the "
          "network\n"
          "                       is trusted\n"
          "  --token-file FILE    the TCP token (required with --tcp): a "
          "regular file\n"
          "                       of 1 to 1024 bytes (one trailing newline "
          "is\n"
          "                       dropped) that group and others cannot "
          "access\n"
          "                       (chmod 600); read once at start-up\n"
          "%s"
          "  --help               this text\n",
          svc_server_options_help());
}

/* The helpers below follow the service's convention: 0, or a negative
 * service code with the message in svc_last_error(), which the caller
 * prints once. */

/* rc's message behind what failed (the message is copied first: it is
 * the buffer the setter writes). */
static int prefix_error(int rc, const char *what) {
  char m[1024];
  snprintf(m, sizeof m, "%s", svc_last_error());
  return svc_set_error(svc_code_of(rc), "%s: %s", what, m);
}

static int parse_u64(const char *flag, const char *s, uint64_t max,
                     uint64_t *out) {
  char *end;
  unsigned long long v;
  errno = 0;
  if (s == NULL || *s == '\0' || *s == '-')
    goto bad;
  v = strtoull(s, &end, 10);
  if (errno != 0 || *end != '\0' || v > max)
    goto bad;
  *out = v;
  return 0;
bad:
  return svc_set_error(SVC_BAD_PARAMS,
                       "%s: expected an integer in [0, %llu], got '%s'", flag,
                       (unsigned long long)max, s != NULL ? s : "");
}

static int parse_seconds(const char *flag, const char *s, double *out) {
  char *end;
  double v;
  if (s == NULL || *s == '\0')
    goto bad;
  errno = 0;
  v = strtod(s, &end);
  if (errno != 0 || *end != '\0' || !(v >= 0 && v <= 1e7))
    goto bad;
  *out = v;
  return 0;
bad:
  return svc_set_error(SVC_BAD_PARAMS,
                       "%s: expected seconds in [0, 1e7], got '%s'", flag,
                       s != NULL ? s : "");
}

/* Splits HOST:PORT (or [HOST]:PORT for an IPv6 literal; a bare IPv6
 * literal splits at its last colon). */
static int parse_hostport(const char *s, char *host, size_t hostlen,
                          uint64_t *port) {
  const char *colon, *h = s;
  size_t n;
  if (s[0] == '[') {
    const char *close = strchr(s, ']');
    if (close == NULL || close[1] != ':')
      goto bad;
    h = s + 1;
    n = (size_t)(close - h);
    colon = close + 1;
  } else {
    colon = strrchr(s, ':');
    if (colon == NULL)
      goto bad;
    n = (size_t)(colon - s);
  }
  if (n == 0 || n >= hostlen)
    goto bad;
  memcpy(host, h, n);
  host[n] = '\0';
  return parse_u64("--tcp port", colon + 1, 65535, port);
bad:
  return svc_set_error(SVC_BAD_PARAMS,
                       "--tcp: expected HOST:PORT or [IPV6]:PORT, got '%s'", s);
}

/* Reads the TCP token once. The file must be a regular file closed to
 * group and others (anyone who can read it can use the workers), of 1 to
 * SVC_TOKEN_MAX bytes after one trailing newline is dropped. The message
 * of a failure names the file. */
static int read_token(const char *path, uint8_t *tok, size_t *len) {
  struct stat st;
  uint8_t buf[SVC_TOKEN_MAX + 2];
  size_t have = 0;
  int rc, fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
  if (fd < 0)
    return svc_set_error(SVC_BAD_PARAMS, "token file %s: %s", path,
                         strerror(errno));
  /* The checks are made on the open file, so the file cannot be swapped
   * between them and the read. */
  if (fstat(fd, &st) != 0) {
    rc = svc_set_error(SVC_BAD_PARAMS, "token file %s: %s", path,
                       strerror(errno));
    goto fail;
  }
  if (!S_ISREG(st.st_mode)) {
    rc = svc_set_error(SVC_BAD_PARAMS, "token file %s: not a regular file",
                       path);
    goto fail;
  }
  if ((st.st_mode & 077) != 0) {
    rc = svc_set_error(SVC_BAD_PARAMS,
                       "token file %s: mode %03o lets group or others access "
                       "it; refusing it (chmod 600)",
                       path, (unsigned)(st.st_mode & 0777));
    goto fail;
  }
  while (have < sizeof buf) {
    ssize_t r = read(fd, buf + have, sizeof buf - have);
    if (r < 0 && errno == EINTR)
      continue;
    if (r < 0) {
      rc = svc_set_error(SVC_BAD_PARAMS, "token file %s: %s", path,
                         strerror(errno));
      goto fail;
    }
    if (r == 0)
      break;
    have += (size_t)r;
  }
  if (have > 0 && buf[have - 1] == '\n')
    have--;
  if (have == 0) {
    rc = svc_set_error(SVC_BAD_PARAMS, "token file %s: empty", path);
    goto fail;
  }
  if (have > SVC_TOKEN_MAX) {
    rc = svc_set_error(SVC_BAD_PARAMS, "token file %s: longer than %d bytes",
                       path, SVC_TOKEN_MAX);
    goto fail;
  }
  memcpy(tok, buf, have);
  *len = have;
  rc = 0;
fail:
  explicit_bzero(buf, sizeof buf);
  close(fd);
  return rc;
}

typedef struct opts_s {
  const char *socket_dir;
  const char *state_dir;  /* --state-dir; default: the socket dir + "-state" */
  const char *tcp;        /* --tcp as given */
  const char *token_file; /* --token-file */
  char tcp_host[256];     /* --tcp split, brackets removed */
  uint64_t tcp_port;
  uint64_t cycle_us;
  double stall_timeout;
  svc_worker_config_t wc;
  svc_server_config_t srv; /* the server's own options (svc_admit.c) */
  char **command; /* after --, NULL-terminated (argv's tail); NULL if none */
  svc_log_level_t log_level; /* --log-level (default error) */
  const char *timeline;      /* --timeline FILE */
  int keep;                  /* --keep */
} opts_t;

/* One option a with its value v into o. A flat list of flags, so it
 * stays linear. */
static int parse_option(const char *a, const char *v, opts_t *o) {
  uint64_t u;
  int rc;
  if (strcmp(a, "--socket-dir") == 0) {
    o->socket_dir = v;
  } else if (strcmp(a, "--max-frame") == 0) {
    if ((rc = parse_u64(a, v, UINT32_MAX, &u)) != 0)
      return rc;
    if (u == 0)
      return svc_set_error(SVC_BAD_PARAMS, "%s: must be at least 1", a);
    o->wc.limits.max_frame = (uint32_t)u;
  } else if (strcmp(a, "--max-clients") == 0) {
    if ((rc = parse_u64(a, v, 100000, &u)) != 0)
      return rc;
    if (u == 0)
      return svc_set_error(SVC_BAD_PARAMS, "%s: must be at least 1", a);
    o->wc.max_clients = (uint32_t)u;
  } else if (strcmp(a, "--max-output") == 0) {
    if ((rc = parse_u64(a, v, UINT64_MAX, &u)) != 0)
      return rc;
    o->wc.max_output = u;
  } else if (strcmp(a, "--idle-timeout") == 0) {
    if ((rc = parse_seconds(a, v, &o->wc.idle_timeout)) != 0)
      return rc;
  } else if (strcmp(a, "--frame-timeout") == 0) {
    if ((rc = parse_seconds(a, v, &o->wc.frame_timeout)) != 0)
      return rc;
  } else if (strcmp(a, "--keep-steps") == 0) {
    if ((rc = parse_u64(a, v, UINT32_MAX, &u)) != 0)
      return rc;
    o->wc.keep_steps = (uint32_t)u;
  } else if (strcmp(a, "--max-layers") == 0) {
    if ((rc = parse_u64(a, v, 1u << 20, &u)) != 0)
      return rc;
    if (u == 0)
      return svc_set_error(SVC_BAD_PARAMS, "%s: must be at least 1", a);
    o->wc.max_layers = (uint32_t)u;
  } else if (strcmp(a, "--cache-slots") == 0) {
    if ((rc = parse_u64(a, v, SVC_CACHE_SLOTS_MAX, &u)) != 0)
      return rc;
    if (u == 0)
      return svc_set_error(SVC_BAD_PARAMS, "%s: must be at least 1", a);
    o->wc.cache_slots = (uint32_t)u;
  } else if (strcmp(a, "--max-saved") == 0) {
    if ((rc = parse_u64(a, v, UINT64_MAX, &u)) != 0)
      return rc;
    o->wc.max_saved = u;
  } else if (strcmp(a, "--cycle-us") == 0) {
    if ((rc = parse_u64(a, v, 10000000, &u)) != 0)
      return rc;
    if (u == 0)
      return svc_set_error(SVC_BAD_PARAMS, "%s: must be at least 1", a);
    o->cycle_us = u;
  } else if (strcmp(a, "--tcp") == 0) {
    o->tcp = v;
    if ((rc = parse_hostport(v, o->tcp_host, sizeof o->tcp_host,
                             &o->tcp_port)) != 0)
      return rc;
  } else if (strcmp(a, "--token-file") == 0) {
    o->token_file = v;
  } else if (strcmp(a, "--log-level") == 0) {
    if (svc_log_level_parse(v, &o->log_level) != 0)
      return svc_set_error(SVC_BAD_PARAMS,
                           "%s: expected error, warn, info or debug, got '%s'",
                           a, v);
  } else if (strcmp(a, "--timeline") == 0) {
    o->timeline = v;
  } else if (strcmp(a, "--state-dir") == 0) {
    o->state_dir = v;
  } else if (strcmp(a, "--stall-timeout") == 0) {
    if ((rc = parse_seconds(a, v, &o->stall_timeout)) != 0)
      return rc;
  } else if (strcmp(a, "--max-depth") == 0) {
    if ((rc = parse_u64(a, v, 32, &u)) != 0)
      return rc;
    if (u < 3)
      return svc_set_error(SVC_BAD_PARAMS, "%s: must be at least 3", a);
    o->wc.limits.max_depth = (uint32_t)u;
  } else if (strcmp(a, "--max-objects") == 0) {
    if ((rc = parse_u64(a, v, 1u << 24, &u)) != 0)
      return rc;
    if (u < 64)
      return svc_set_error(SVC_BAD_PARAMS, "%s: must be at least 64", a);
    o->wc.limits.max_objects = (uint32_t)u;
  } else if ((rc = svc_server_parse_option(a, v, &o->srv)) != 1) {
    return rc;
  } else {
    return svc_set_error(SVC_BAD_PARAMS, "%s: unknown option (see --help)", a);
  }
  return 0;
}

/* Returns 0 to run, 1 after --help, 2 on a usage error. */
static int parse_args(int argc, char **argv, opts_t *o) {
  memset(o, 0, sizeof *o);
  svc_worker_config_default(&o->wc);
  o->cycle_us = 1000;
  o->stall_timeout = 60;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    const char *v = i + 1 < argc ? argv[i + 1] : NULL;
    if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
      usage(stdout);
      return 1;
    }
    if (strcmp(a, "--version") == 0) {
      printf("syncbnd %d.%d.%d (protocol %d)\n", SBN_VERSION_MAJOR,
             SBN_VERSION_MINOR, SBN_VERSION_PATCH, SVC_PROTOCOL_VERSION);
      return 1;
    }
    if (strcmp(a, "--keep") == 0) {
      o->keep = 1;
      continue;
    }
    if (strcmp(a, "--no-speculate") == 0) {
      o->wc.speculate = 0;
      continue;
    }
    if (strcmp(a, "--") == 0) {
      if (v == NULL) {
        fprintf(stderr, "syncbnd: --: expected a COMMAND after it\n");
        return 2;
      }
      o->command = argv + i + 1;
      break;
    }
    if (v == NULL) {
      fprintf(stderr, "syncbnd: %s: unknown option or missing value\n", a);
      return 2;
    }
    i++;
    if (parse_option(a, v, o) != 0) {
      fprintf(stderr, "syncbnd: %s\n", svc_last_error());
      return 2;
    }
  }
  if (o->tcp != NULL && o->token_file == NULL) {
    fprintf(stderr,
            "syncbnd: --tcp requires --token-file (TCP clients must "
            "authenticate with a token)\n");
    return 2;
  }
  if (o->tcp == NULL && o->token_file != NULL) {
    fprintf(stderr, "syncbnd: --token-file is only used with --tcp\n");
    return 2;
  }
  return 0;
}

/* One rank's pieces, built by start_rank and torn down by main. */
typedef struct rank_s {
  int rank, size;
  char dir[PATH_MAX], path[PATH_MAX], state[PATH_MAX];
  int made_dir, made_state; /* this job created them (removed on exit) */
  svc_worker_t *worker;
  svc_server_t *server;
  sbn_comm_t *comm; /* the world, for the worker's collectives */
  sync_tick_t tick;
} rank_t;

/* The socket directory and this rank's socket in it. The ranks agree on
 * one job name (rank 0's pid) so that the default directory is shared by
 * the job and distinct between jobs. */
static int socket_paths(const opts_t *o, rank_t *k) {
  long job = (long)getpid();
  int rc;
  MPI_Bcast(&job, 1, MPI_LONG, 0, MPI_COMM_WORLD);
  if (o->socket_dir != NULL) {
    rc = snprintf(k->dir, sizeof k->dir, "%s", o->socket_dir);
  } else {
    const char *xdg = getenv("XDG_RUNTIME_DIR");
    if (xdg != NULL && xdg[0] == '/')
      rc = snprintf(k->dir, sizeof k->dir, "%s/syncbnd-%ld", xdg, job);
    else
      rc = snprintf(k->dir, sizeof k->dir, "/tmp/syncbnd-%u-%ld",
                    (unsigned)geteuid(), job);
  }
  if (rc < 0 || (size_t)rc >= sizeof k->dir ||
      snprintf(k->path, sizeof k->path, "%s/rank-%d.sock", k->dir, k->rank) >=
          (int)sizeof k->path)
    return svc_set_error(SVC_BAD_PARAMS, "socket path too long");
  return 0;
}

/* Whether this job creates the socket and state directories (then they
 * are removed on exit). Every rank looks before any rank creates them:
 * the allreduce is the fence. Only a default state directory is
 * temporary: one named by the user, or next to a --socket-dir, is where a
 * restarted job looks for its checkpoints. */
static void made_dirs(const opts_t *o, rank_t *k) {
  char state[PATH_MAX];
  int made[2];
  int n = snprintf(state, sizeof state, "%s-state", k->dir);
  made[0] = access(k->dir, F_OK) != 0;
  made[1] = o->state_dir == NULL && o->socket_dir == NULL && n > 0 &&
            (size_t)n < sizeof state && access(state, F_OK) != 0;
  MPI_Allreduce(MPI_IN_PLACE, made, 2, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  k->made_dir = made[0];
  k->made_state = made[1];
}

/* The worker and its private directories. Checkpoints live in their own
 * directory, by default next to the sockets, so that a restarted job
 * given the same --socket-dir finds them again. */
static int start_worker(opts_t *o, rank_t *k) {
  int rc;
  made_dirs(o, k);
  if ((rc = svc_socket_dir_prepare(k->dir)) != 0)
    return rc;
  o->wc.rank = k->rank;
  o->wc.size = k->size;
  if ((rc = svc_worker_create(&o->wc, &k->worker)) != 0)
    return prefix_error(rc, "cannot create the worker");
  if (o->state_dir != NULL)
    rc = snprintf(k->state, sizeof k->state, "%s", o->state_dir);
  else
    rc = snprintf(k->state, sizeof k->state, "%s-state", k->dir);
  if (rc < 0 || (size_t)rc >= sizeof k->state ||
      svc_worker_set_state_dir(k->worker, k->state) != 0)
    return svc_set_error(SVC_BAD_PARAMS, "state directory path too long");
  if ((rc = svc_socket_dir_prepare(k->state)) != 0)
    return prefix_error(rc, "--state-dir");
  return 0;
}

/* The server: the Unix socket, and with --tcp rank r on PORT + r, so
 * that the ranks of one host do not collide (PORT 0 lets each rank take
 * any free port). The token is wiped here: the server keeps its own
 * copy. */
static int start_server(const opts_t *o, rank_t *k, uint8_t *token,
                        size_t token_len) {
  svc_server_config_t sc;
  int rc;
  memset(&sc, 0, sizeof sc);
  svc_server_copy_options(&sc, &o->srv);
  sc.socket_path = k->path;
  sc.max_clients = o->wc.max_clients;
  sc.max_output = o->wc.max_output;
  sc.idle_timeout = o->wc.idle_timeout;
  sc.frame_timeout = o->wc.frame_timeout;
  sc.limits = o->wc.limits;
  if (o->tcp != NULL) {
    if (o->tcp_port != 0 && o->tcp_port + (uint64_t)k->rank > 65535) {
      explicit_bzero(token, SVC_TOKEN_MAX);
      return svc_set_error(SVC_BAD_PARAMS,
                           "--tcp %s: port %llu + rank %d is above 65535; "
                           "choose a lower PORT",
                           o->tcp, (unsigned long long)o->tcp_port, k->rank);
    }
    sc.tcp_host = o->tcp_host;
    sc.tcp_port =
        (uint16_t)(o->tcp_port != 0 ? o->tcp_port + (uint64_t)k->rank : 0);
    sc.token = token;
    sc.token_len = token_len;
  }
  rc = svc_server_create(&sc, k->worker, &k->server);
  explicit_bzero(token, SVC_TOKEN_MAX);
  return rc;
}

/* The cross-rank transport: the world's communicator from the MPI
 * library, polled by the worker from the server's timer (Open MPI here
 * has no progress thread, so the polling is what moves it). */
static int start_sync(const opts_t *o, rank_t *k) {
  sbn_layer_params_t params;
  int rc, slots[4] = {(int)o->wc.cache_slots, -(int)o->wc.cache_slots,
                      o->wc.speculate, -o->wc.speculate};
  /* The ranks evict cache slots alike only if they have as many, and run
   * the same collectives only if they all speculate or none does. */
  MPI_Allreduce(MPI_IN_PLACE, slots, 4, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (slots[0] != -slots[1])
    return svc_set_error(SVC_BAD_PARAMS,
                         "--cache-slots differs between the ranks (%d to %d); "
                         "every rank must use the same",
                         -slots[1], slots[0]);
  if (slots[2] != -slots[3])
    return svc_set_error(SVC_BAD_PARAMS,
                         "--no-speculate is given to some ranks only; "
                         "every rank must use the same");
  sbn_layer_params_default(&params, SBN_OP_BATCHNORM);
  if (sbn_mpi_comm_create(MPI_COMM_WORLD, 0, &params, &k->comm) != 0)
    return svc_set_error(SVC_INTERNAL, "%s", sbn_last_error());
  if ((rc = svc_worker_set_sync(k->worker, k->comm, o->stall_timeout,
                                svc_server_deliver, k->server)) != 0)
    return rc;
  k->tick.worker = k->worker;
  if ((rc = svc_server_set_tick(k->server, o->cycle_us, sync_tick, &k->tick)) !=
      0)
    return prefix_error(rc, "cannot start the sync timer");
  return 0;
}

/* Whether every rank reaches this point within grace seconds: a
 * non-blocking barrier, polled, so that a rank stopped alone does not wait
 * for ranks that go on serving. */
static int all_ranks_stopping(double grace) {
  MPI_Request r;
  int done = 0;
  double t0 = MPI_Wtime();
  if (MPI_Ibarrier(MPI_COMM_WORLD, &r) != MPI_SUCCESS)
    return 0;
  while (!done && MPI_Wtime() - t0 < grace) {
    if (MPI_Test(&r, &done, MPI_STATUS_IGNORE) != MPI_SUCCESS)
      return 0;
    if (!done)
      usleep(1000);
  }
  return done;
}

/* The directories this job created, once every rank's socket is gone
 * (the barrier; a signalled rank does not wait for the others, and the
 * last rank out removes them). */
static void remove_dirs(const rank_t *k, int together) {
  if (together)
    MPI_Barrier(MPI_COMM_WORLD);
  if (together && k->rank != 0)
    return;
  if (k->made_dir)
    sbnd_remove_dir(k->dir, 0);
  if (k->made_state)
    sbnd_remove_dir(k->state, 1);
}

/* This rank's TCP address as HOST:PORT ([HOST]:PORT for IPv6), with the
 * port the listener got (PORT 0 asks the system for one). Returns 1 when
 * the rank listens on TCP, 0 otherwise; *loopback says whether it is a
 * loopback address. */
static int tcp_address(const opts_t *o, const rank_t *k, char *buf, size_t n,
                       int *loopback) {
  int port;
  if (svc_server_tcp_info(k->server, &port, loopback) != 0)
    return 0;
  const char *l = strchr(o->tcp_host, ':') != NULL ? "[" : "";
  const char *r = l[0] != '\0' ? "]" : "";
  snprintf(buf, n, "%s%s%s:%d", l, o->tcp_host, r, port);
  return 1;
}

/* The lines that tell the launcher (and the user) the rank is ready; with
 * TCP, SYNCBN_TCP is set to the rank's address for a command started after
 * `--`. */
static void print_ready(const opts_t *o, const rank_t *k) {
  char addr[300];
  int loopback;
  /* On stderr: launchers read the ready line as the first of stdout. */
  if (k->rank == 0)
    fprintf(
        stderr, "syncbnd: socket directory %s%s\n", k->dir,
        k->made_dir && !o->keep ? " (removed on exit; --keep keeps it)" : "");
  printf("syncbnd: rank %d ready on %s\n", k->rank, k->path);
  if (tcp_address(o, k, addr, sizeof addr, &loopback)) {
    printf("syncbnd: rank %d listening on tcp %s\n", k->rank, addr);
    setenv("SYNCBN_TCP", addr, 1);
    if (!loopback)
      fprintf(stderr,
              "syncbnd: rank %d: WARNING: tcp %s is not a loopback "
              "address. Tensors and the token travel unencrypted, and "
              "anyone who can reach this port can try tokens; bind "
              "127.0.0.1 and tunnel (ssh -L) unless the network is "
              "trusted.\n",
              k->rank, addr);
  }
  fflush(stdout);
}

/* Every full-tensor request allocates and frees buffers of megabytes
 * (the frame, x's aligned copy, y). glibc would give each back to the
 * kernel (munmap, or a trim of the heap's top) and fault it in again page
 * by page on the next request, which measured as costly as the data's
 * copies (`syncbn bench service`, a 6.4 MB forward + backward: 20 ms,
 * 14.6 ms with glibc told by its environment to keep freed memory in the
 * worker and the client). The worker keeps it instead: blocks up to glibc's
 * largest threshold (32 MiB) come from the heap, and the heap's top is
 * trimmed only past 512 MiB. Best effort: mallopt may refuse. */
static void keep_freed_memory(void) {
  mallopt(M_MMAP_THRESHOLD, 32 << 20);
  mallopt(M_TRIM_THRESHOLD, 512 << 20);
  mallopt(M_TOP_PAD, 64 << 20);
}

int main(int argc, char **argv) {
  opts_t o;
  rank_t k;
  int rc, failed = 1, status = 0, sig = 0, finalize;
  uint8_t token[SVC_TOKEN_MAX];
  size_t token_len = 0;

  rc = parse_args(argc, argv, &o);
  if (rc != 0)
    return rc == 1 ? 0 : 2;
  /* Before MPI starts, so that a bad token file ends the job with a usage
   * error rather than an abort. */
  if (o.token_file != NULL &&
      read_token(o.token_file, token, &token_len) != 0) {
    fprintf(stderr, "syncbnd: %s\n", svc_last_error());
    return 2;
  }
  /* Sockets and the directory must never be reachable by others,
   * whatever umask the job was started with. A client that vanishes
   * mid-write must not kill the worker. */
  umask(077);
  signal(SIGPIPE, SIG_IGN);
  keep_freed_memory();

  memset(&k, 0, sizeof k);
  MPI_Init(&argc, &argv);
  MPI_Comm_rank(MPI_COMM_WORLD, &k.rank);
  MPI_Comm_size(MPI_COMM_WORLD, &k.size);
  if (sbnd_obs_start(o.log_level, o.timeline, k.rank) != 0)
    goto done;
  if (socket_paths(&o, &k) != 0 || start_worker(&o, &k) != 0 ||
      start_server(&o, &k, token, token_len) != 0 || start_sync(&o, &k) != 0) {
    fprintf(stderr, "syncbnd: rank %d: %s\n", k.rank, svc_last_error());
    goto done;
  }
  print_ready(&o, &k);
  if (sbnd_launch_start(o.command, k.path, k.rank, k.size, k.server, k.worker,
                        &k.tick.launch) != 0)
    goto done;
  failed = 0;
  sig = svc_server_run(k.server);
  if (sig != 0)
    fprintf(stderr, "syncbnd: rank %d: signal %d, shutting down\n", k.rank,
            sig);
  if (k.tick.launch != NULL) {
    status = sbnd_launch_finish(k.tick.launch);
    k.tick.launch = NULL;
    /* A launch stopped by a signal fails, whatever its child said. */
    if (sig != 0 && status == 0)
      status = 128 + sig;
  }
done:
  explicit_bzero(token, sizeof token);
  svc_server_destroy(k.server);
  /* When every rank was signalled (SIGTERM to each worker, or mpirun
   * forwarding one), they finalize together and the job ends with status
   * 0 (or the launched command's). A rank signalled on its own leaves
   * without MPI_Finalize (which would wait for the others), and mpirun
   * then ends the whole job. The worker outlives MPI: a collective still
   * in flight writes into its buffers while the barrier or MPI_Finalize
   * makes progress. */
  finalize = !failed && (sig == 0 || all_ranks_stopping(2.0));
  /* Freeing the communicator is local (a collective in flight is
   * abandoned with it), so a rank signalled on its own frees it too. */
  sbn_comm_destroy(k.comm);
  sbnd_obs_stop();
  if (!failed && !o.keep)
    remove_dirs(&k, finalize);
  if (failed) {
    /* One rank cannot serve: the job as a whole cannot either. */
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  if (finalize)
    MPI_Finalize();
  svc_worker_destroy(k.worker);
  return status;
}
