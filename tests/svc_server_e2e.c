/* End-to-end test of syncbnd under `mpirun -np 2`: the test starts the job,
 * waits for both ready lines, and then, through the client library and raw
 * sockets:
 * - checks the socket directory and socket modes, and that bad socket
 *   directories are refused;
 * - runs several concurrent clients per rank, each doing every local kind's
 *   training forward/backward and an eval forward, compared bit for bit
 *   with the in-process library;
 * - sends hostile frames (oversized, a 4 GiB length, a zero byte then junk,
 *   a count bomb, too deep), kills a client mid-frame, lets a partial frame
 *   time out, floods replies to a client that never reads, exceeds
 *   max_clients, and connects as another uid; after each, the worker still
 *   serves others;
 * - stops the job with SIGTERM and checks the sockets are gone.
 * Every blocking step has a timeout; alarm() is the backstop. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <linux/securebits.h>

#include "client.h"
#include "svc_codec.h"
#include "syncbn.h"

#define NP 2
#define THREADS 3
#define MAX_FRAME (1u << 20)
#define MAX_CLIENTS 12
#define MAX_OUTPUT (2u << 20)
#define FRAME_TIMEOUT "2"

static pid_t g_mpirun = -1;
static char g_root[64]; /* the test's private directory */
static char g_dir[128]; /* the socket directory syncbnd creates */
static char g_path[NP][256];

#define CHECK(cond, ...)                                                     \
  do {                                                                       \
    if (!(cond)) {                                                           \
      fprintf(stderr, "svc_server_e2e: %s:%d: check failed: %s: ", __FILE__, \
              __LINE__, #cond);                                              \
      fprintf(stderr, __VA_ARGS__);                                          \
      fprintf(stderr, "\n");                                                 \
      exit(1);                                                               \
    }                                                                        \
  } while (0)

static void stop_job(void) {
  if (g_mpirun > 0) {
    kill(g_mpirun, SIGTERM);
    for (int i = 0; i < 100; i++) {
      if (waitpid(g_mpirun, NULL, WNOHANG) == g_mpirun) {
        g_mpirun = -1;
        return;
      }
      usleep(100000);
    }
    kill(g_mpirun, SIGKILL);
    waitpid(g_mpirun, NULL, 0);
    g_mpirun = -1;
  }
}

static void cleanup(void) {
  char cmd[256];
  stop_job();
  if (g_root[0] != '\0') {
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_root);
    if (system(cmd) != 0)
      fprintf(stderr, "svc_server_e2e: could not remove %s\n", g_root);
  }
}

/* Starts `mpirun -np np syncbnd --socket-dir dir extra...` with stdout on a
 * pipe; returns the read end. */
static int start_job(int np, const char *dir, pid_t *pid,
                     const char *const *extra) {
  int fds[2];
  char npbuf[8];
  const char *argv[40];
  int n = 0;
  snprintf(npbuf, sizeof npbuf, "%d", np);
  argv[n++] = SBN_MPIEXEC;
  argv[n++] = "--oversubscribe";
  argv[n++] = "--bind-to";
  argv[n++] = "none";
  argv[n++] = "--timeout";
  argv[n++] = "150";
  argv[n++] = "--mca";
  argv[n++] = "pml";
  argv[n++] = "ob1";
  argv[n++] = "--mca";
  argv[n++] = "btl";
  argv[n++] = "self,vader,tcp";
  argv[n++] = "-np";
  argv[n++] = npbuf;
  argv[n++] = SBN_SYNCBND;
  argv[n++] = "--socket-dir";
  argv[n++] = dir;
  for (int i = 0; extra != NULL && extra[i] != NULL; i++)
    argv[n++] = extra[i];
  argv[n] = NULL;
  CHECK(pipe(fds) == 0, "pipe: %s", strerror(errno));
  *pid = fork();
  CHECK(*pid >= 0, "fork: %s", strerror(errno));
  if (*pid == 0) {
    dup2(fds[1], 1);
    close(fds[0]);
    close(fds[1]);
    /* Its own process group, so a stray mpirun dies with the test. */
    execv(SBN_MPIEXEC, (char *const *)argv);
    _exit(127);
  }
  close(fds[1]);
  return fds[0];
}

/* Reads lines until `count` ready lines arrived (filling g_path) or the
 * job ended; returns the number of ready lines. */
static int wait_ready(int fd, int count, double seconds) {
  char buf[4096];
  size_t have = 0;
  int ready = 0;
  struct timespec t0, t;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  while (ready < count) {
    struct pollfd p = {fd, POLLIN, 0};
    ssize_t r;
    char *nl;
    clock_gettime(CLOCK_MONOTONIC, &t);
    double left = seconds - ((double)(t.tv_sec - t0.tv_sec) +
                             (double)(t.tv_nsec - t0.tv_nsec) * 1e-9);
    if (left <= 0 || poll(&p, 1, (int)(left * 1000) + 1) <= 0)
      break;
    r = read(fd, buf + have, sizeof buf - 1 - have);
    if (r <= 0)
      break;
    have += (size_t)r;
    buf[have] = '\0';
    while ((nl = strchr(buf, '\n')) != NULL) {
      int rank;
      char path[256];
      *nl = '\0';
      if (sscanf(buf, "syncbnd: rank %d ready on %255s", &rank, path) == 2 &&
          rank >= 0 && rank < NP) {
        snprintf(g_path[rank], sizeof g_path[rank], "%s", path);
        ready++;
      }
      have -= (size_t)(nl + 1 - buf);
      memmove(buf, nl + 1, have + 1);
    }
  }
  return ready;
}

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static void set_timeouts(int fd, int seconds) {
  struct timeval tv = {seconds, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

static sbn_client_t *connect_rank(int rank) {
  sbn_client_t *c = NULL;
  int rc = sbn_client_connect(g_path[rank], &c);
  CHECK(rc == 0, "connect %s: %s", g_path[rank], sbn_client_strerror(rc));
  set_timeouts(sbn_client_fd(c), 20);
  return c;
}

static void hello_ok(int rank) {
  sbn_client_t *c = connect_rank(rank);
  sbn_client_hello_t h;
  int rc = sbn_client_hello(c, &h);
  CHECK(rc == 0, "hello rank %d: %s %s", rank, sbn_client_server_code(c),
        sbn_last_error());
  CHECK(h.rank == rank && h.size == NP && h.protocol == SVC_PROTOCOL_VERSION,
        "hello: rank %d size %d protocol %d", h.rank, h.size, h.protocol);
  CHECK(h.max_frame == MAX_FRAME, "hello: max_frame %u", h.max_frame);
  sbn_client_close(c);
}

/* ------------------------------------------------------------------ */
/* The in-process reference */

typedef struct ref_comm_s {
  sbn_comm_t base;
} ref_comm_t;
static int ref_allreduce(sbn_comm_t *c, sbn_rec_t *r, size_t n) {
  (void)c, (void)r, (void)n;
  return 0;
}
static void ref_destroy(sbn_comm_t *c) {
  (void)c;
}
static const sbn_comm_vtable_t ref_vt = {.allreduce = ref_allreduce,
                                         .destroy = ref_destroy};

typedef struct kcase_s {
  const char *kind;
  sbn_op_t op;
  sbn_tensor_desc_t d;
  size_t channels, groups;
  int norm_ndim;
  size_t norm_shape[2];
  int affine, track, cumulative, pass_wb;
  double p;
} kcase_t;

static const kcase_t g_cases[] = {
    {"batchnorm",
     SBN_OP_BATCHNORM,
     {4, {6, 4, 3, 3}, SBN_LAYOUT_NCHW},
     4,
     1,
     0,
     {0},
     1,
     1,
     0,
     0,
     0},
    {"batchnorm",
     SBN_OP_BATCHNORM,
     {4, {5, 4, 2, 3}, SBN_LAYOUT_NHWC},
     4,
     1,
     0,
     {0},
     1,
     1,
     1,
     1,
     0},
    {"batchnorm",
     SBN_OP_BATCHNORM,
     {3, {7, 3, 5}, SBN_LAYOUT_NCHW},
     3,
     1,
     0,
     {0},
     0,
     0,
     0,
     0,
     0},
    {"instancenorm",
     SBN_OP_INSTANCENORM,
     {3, {3, 4, 5}, SBN_LAYOUT_NCHW},
     4,
     1,
     0,
     {0},
     1,
     1,
     0,
     0,
     0},
    {"groupnorm",
     SBN_OP_GROUPNORM,
     {3, {2, 6, 4}, SBN_LAYOUT_NHWC},
     6,
     3,
     0,
     {0},
     1,
     0,
     0,
     1,
     0},
    {"layernorm",
     SBN_OP_LAYERNORM,
     {3, {4, 3, 5}, SBN_LAYOUT_NCHW},
     0,
     1,
     2,
     {3, 5},
     1,
     0,
     0,
     1,
     0},
    {"dropout",
     SBN_OP_DROPOUT,
     {2, {7, 33}, SBN_LAYOUT_NCHW},
     0,
     1,
     0,
     {0},
     0,
     0,
     0,
     0,
     0.3},
};
#define NCASES (sizeof g_cases / sizeof *g_cases)

static uint64_t rng_next(uint64_t *s) {
  uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
static void fill(float *a, size_t n, uint64_t seed, float scale, float off) {
  for (size_t i = 0; i < n; i++)
    a[i] = (float)((double)(rng_next(&seed) >> 11) * 0x1p-53) * scale + off;
}

static size_t numel(const sbn_tensor_desc_t *d) {
  size_t n = 1;
  for (int i = 0; i < d->ndim; i++)
    n *= d->dims[i];
  return n;
}

typedef struct targ_s {
  int rank, tid;
  uint64_t shared_id;
} targ_t;

static void *client_thread(void *arg) {
  targ_t *ta = arg;
  sbn_client_t *c = connect_rank(ta->rank);
  sbn_client_hello_t h;
  ref_comm_t comm = {{&ref_vt, 0, 1, ta->rank}};
  sbn_layer_params_t sp;
  int created, rc;
  CHECK(sbn_client_hello(c, &h) == 0, "hello: %s", sbn_last_error());
  /* A layer registered by every client: one id for all. */
  sbn_layer_params_default(&sp, SBN_OP_BATCHNORM);
  sp.channels = 8;
  rc = sbn_client_register(c, "shared.bn", "batchnorm", &sp, 0, &ta->shared_id,
                           &created);
  CHECK(rc == 0, "register shared: %s", sbn_last_error());
  for (size_t k = 0; k < NCASES; k++) {
    const kcase_t *kc = &g_cases[k];
    sbn_layer_params_t p;
    sbn_layer_t *ref;
    char name[64];
    uint64_t id;
    size_t n = numel(&kc->d), wn = 0, ws_b, sv_b;
    float *x, *y, *dy, *dx, *ry, *rdx, *w, *b, *dw, *db, *rdw, *rdb;
    float rm[8] = {0}, rv[8] = {1, 1, 1, 1, 1, 1, 1, 1};
    sbn_state_t st = {rm, rv, 0};
    void *ws, *sv;
    sbn_layer_params_default(&p, kc->op);
    p.channels = kc->channels;
    p.groups = kc->groups;
    p.norm_ndim = kc->norm_ndim;
    p.norm_shape[0] = kc->norm_shape[0];
    p.norm_shape[1] = kc->norm_shape[1];
    if (kc->op != SBN_OP_DROPOUT) {
      p.affine = kc->affine;
      p.track_running_stats = kc->track;
      p.cumulative = kc->cumulative;
      p.eps = 1e-3;
      p.momentum = 0.25;
    } else {
      p.p = kc->p;
      p.seed = 1234u + (uint32_t)ta->tid;
    }
    snprintf(name, sizeof name, "t%d.case%zu", ta->tid, k);
    rc = sbn_client_register(c, name, kc->kind, &p, 0, &id, &created);
    CHECK(rc == 0 && created, "register %s: %s %s", name,
          sbn_client_server_code(c), sbn_last_error());
    p.layer_id = (uint32_t)id;
    CHECK(sbn_layer_create(&p, &comm.base, &ref) == 0, "ref layer: %s",
          sbn_last_error());
    if (kc->affine)
      wn = kc->op == SBN_OP_LAYERNORM ? kc->norm_shape[0] * kc->norm_shape[1]
                                      : kc->channels;
    x = calloc(n, 4), y = calloc(n, 4), dy = calloc(n, 4), dx = calloc(n, 4);
    ry = calloc(n, 4), rdx = calloc(n, 4);
    w = calloc(wn + 1, 4), b = calloc(wn + 1, 4), dw = calloc(wn + 1, 4);
    db = calloc(wn + 1, 4), rdw = calloc(wn + 1, 4), rdb = calloc(wn + 1, 4);
    for (size_t i = 0; i < wn; i++)
      w[i] = 1.0f, b[i] = 0.0f;
    CHECK(sbn_layer_sizes(ref, &kc->d, &ws_b, &sv_b) == 0, "sizes: %s",
          sbn_last_error());
    ws = malloc(ws_b + 1);
    sv = malloc(sv_b + 1);
    for (uint64_t step = 1; step <= 4; step++) {
      int train = step <= 3;
      uint64_t seed = ((uint64_t)ta->rank << 40) ^ ((uint64_t)ta->tid << 32) ^
                      (k << 16) ^ step;
      sbn_forward_args_t fa;
      sbn_backward_args_t ba;
      fill(x, n, seed, 6.0f, -2.0f);
      fill(dy, n, seed * 7 + 1, 2.0f, -1.0f);
      if (kc->pass_wb) {
        fill(w, wn, seed * 3, 1.0f, 0.5f);
        fill(b, wn, seed * 5, 1.0f, -0.5f);
      }
      rc = sbn_client_forward(c, id, step, train, &kc->d, x,
                              kc->pass_wb ? w : NULL, kc->pass_wb ? b : NULL,
                              wn, y);
      CHECK(rc == 0, "%s forward step %llu: %s %s", name,
            (unsigned long long)step, sbn_client_server_code(c),
            sbn_last_error());
      memset(&fa, 0, sizeof fa);
      fa.mode = train ? SBN_MODE_TRAIN : SBN_MODE_EVAL;
      fa.x_desc = &kc->d;
      fa.x = x;
      fa.y = ry;
      fa.weight = wn > 0 ? w : NULL;
      fa.bias = wn > 0 ? b : NULL;
      fa.state = kc->track ? &st : NULL;
      fa.step = step;
      fa.workspace = ws;
      fa.workspace_bytes = ws_b;
      fa.saved = sv;
      fa.saved_bytes = sv_b;
      CHECK(sbn_forward(ref, &fa) == 0, "ref forward: %s", sbn_last_error());
      CHECK(memcmp(y, ry, n * 4) == 0,
            "%s (%s) step %llu: y differs from "
            "the library",
            name, kc->kind, (unsigned long long)step);
      if (!train)
        break;
      rc = sbn_client_backward(c, id, step, &kc->d, dy, dx, dw, db, wn);
      CHECK(rc == 0, "%s backward: %s %s", name, sbn_client_server_code(c),
            sbn_last_error());
      memset(&ba, 0, sizeof ba);
      ba.mode = SBN_MODE_TRAIN;
      ba.x_desc = &kc->d;
      ba.x = x;
      ba.dy = dy;
      ba.dx = rdx;
      ba.weight = wn > 0 ? w : NULL;
      ba.dweight = wn > 0 ? rdw : NULL;
      ba.dbias = wn > 0 ? rdb : NULL;
      ba.step = step;
      ba.workspace = ws;
      ba.workspace_bytes = ws_b;
      ba.saved = sv;
      ba.saved_bytes = sv_b;
      CHECK(sbn_backward(ref, &ba) == 0, "ref backward: %s", sbn_last_error());
      CHECK(memcmp(dx, rdx, n * 4) == 0, "%s (%s): dx differs", name, kc->kind);
      CHECK(wn == 0 ||
                (memcmp(dw, rdw, wn * 4) == 0 && memcmp(db, rdb, wn * 4) == 0),
            "%s (%s): dweight/dbias differ", name, kc->kind);
    }
    /* A second backward of the same step is refused; the connection stays
     * usable. */
    rc = sbn_client_backward(c, id, 3, &kc->d, dy, dx, dw, db, wn);
    CHECK(rc == SBN_ESTATE &&
              strcmp(sbn_client_server_code(c), "NO_FORWARD") == 0,
          "repeated backward: %d %s", rc, sbn_client_server_code(c));
    sbn_layer_destroy(ref);
    free(x), free(y), free(dy), free(dx), free(ry), free(rdx);
    free(w), free(b), free(dw), free(db), free(rdw), free(rdb);
    free(ws), free(sv);
  }
  CHECK(sbn_client_bye(c) == 0, "bye: %s", sbn_last_error());
  sbn_client_close(c);
  return NULL;
}

static void test_concurrent_clients(void) {
  pthread_t th[NP][THREADS];
  targ_t ta[NP][THREADS];
  for (int r = 0; r < NP; r++)
    for (int t = 0; t < THREADS; t++) {
      ta[r][t].rank = r;
      ta[r][t].tid = t;
      CHECK(pthread_create(&th[r][t], NULL, client_thread, &ta[r][t]) == 0,
            "pthread_create");
    }
  for (int r = 0; r < NP; r++)
    for (int t = 0; t < THREADS; t++)
      pthread_join(th[r][t], NULL);
  for (int r = 0; r < NP; r++)
    for (int t = 1; t < THREADS; t++)
      CHECK(ta[r][t].shared_id == ta[r][0].shared_id,
            "shared layer ids differ on rank %d", r);
  printf(
      "svc_server_e2e: %d concurrent clients x %d ranks: every kind equals the "
      "library bit for bit\n",
      THREADS, NP);
}

/* ------------------------------------------------------------------ */
/* Hostile input */

/* Sends raw bytes on a new connection and expects an error reply with
 * `code`, then the worker closing the connection. */
static void expect_fatal(int rank, const void *buf, size_t len,
                         const char *code, const char *what) {
  sbn_client_t *c = connect_rank(rank);
  char got[64];
  uint8_t *body;
  size_t blen;
  int rc;
  CHECK(sbn_client_send_raw(c, buf, len) == 0, "%s: send", what);
  rc = sbn_client_recv_error(c, got, sizeof got);
  CHECK(rc == 0 && strcmp(got, code) == 0, "%s: expected %s, got rc %d '%s'",
        what, code, rc, got);
  rc = sbn_client_recv_frame(c, &body, &blen);
  CHECK(rc == SBN_CLIENT_ECLOSED &&
            strncmp(sbn_last_error(), "recv_frame: ", 12) == 0,
        "%s: the connection stayed open (rc %d: %s)", what, rc,
        sbn_last_error());
  sbn_client_close(c);
  hello_ok(rank);
  printf(
      "svc_server_e2e: rank %d: %s refused with %s, connection closed, worker "
      "serving\n",
      rank, what, code);
}

static void test_hostile(int rank) {
  const uint8_t big[4] = {(MAX_FRAME + 1) >> 24, ((MAX_FRAME + 1) >> 16) & 255,
                          ((MAX_FRAME + 1) >> 8) & 255, (MAX_FRAME + 1) & 255};
  const uint8_t four_gib[4] = {0xff, 0xff, 0xff, 0xff};
  const uint8_t zero_junk[] = {0x00, 'j', 'u', 'n', 'k', '!', '!'};
  const uint8_t junk_body[] = {0, 0, 0, 5, 0x00, 'j', 'u', 'n', 'k'};
  const uint8_t bomb[] = {0,   0,    0,    8,    0x81, 0xa1,
                          'x', 0xdd, 0xff, 0xff, 0xff, 0xff};
  uint8_t deep[64];
  size_t n = 0;
  expect_fatal(rank, big, 4, "FRAME_TOO_LARGE", "an oversized frame");
  expect_fatal(rank, four_gib, 4, "FRAME_TOO_LARGE", "a 4 GiB length prefix");
  expect_fatal(rank, zero_junk, sizeof zero_junk, "FRAME_TOO_LARGE",
               "a zero byte then junk");
  expect_fatal(rank, junk_body, sizeof junk_body, "MALFORMED",
               "a body of a zero byte then junk");
  expect_fatal(rank, bomb, sizeof bomb, "LIMIT", "an array32 count bomb");
  deep[n++] = 0, deep[n++] = 0, deep[n++] = 0, deep[n++] = 0;
  deep[n++] = 0x81, deep[n++] = 0xa1, deep[n++] = 'x';
  for (int i = 0; i < 40; i++)
    deep[n++] = 0x91;
  deep[n++] = 0xc0;
  deep[3] = (uint8_t)(n - 4);
  expect_fatal(rank, deep, n, "LIMIT", "40-deep nesting");
  {
    const uint8_t empty[4] = {0, 0, 0, 0};
    expect_fatal(rank, empty, 4, "BAD_FRAME", "a zero-length frame");
  }
}

/* A client killed in the middle of a frame. */
static void test_killed_mid_frame(int rank) {
  pid_t pid = fork();
  int status;
  CHECK(pid >= 0, "fork");
  if (pid == 0) {
    sbn_client_t *c = NULL;
    const uint8_t part[] = {0, 0, 0x10, 0, 0x86, 0xa2, 'o', 'p'};
    if (sbn_client_connect(g_path[rank], &c) != 0)
      _exit(3);
    if (sbn_client_send_raw(c, part, sizeof part) != 0)
      _exit(4);
    /* Dies with the frame unfinished and the socket open. */
    raise(SIGKILL);
    _exit(5);
  }
  CHECK(waitpid(pid, &status, 0) == pid && WIFSIGNALED(status) &&
            WTERMSIG(status) == SIGKILL,
        "the mid-frame child did not die as planned (status %d)", status);
  hello_ok(rank);
  printf("svc_server_e2e: rank %d: a client killed mid-frame; worker serving\n",
         rank);
}

/* A partial frame that never completes times out. */
static void test_frame_timeout(int rank) {
  sbn_client_t *c = connect_rank(rank);
  const uint8_t part[] = {0, 0, 0, 64, 0x82};
  char got[64];
  double t0 = now();
  CHECK(sbn_client_send_raw(c, part, sizeof part) == 0, "send");
  CHECK(sbn_client_recv_error(c, got, sizeof got) == 0 &&
            strcmp(got, "TIMEOUT") == 0,
        "partial frame: expected TIMEOUT, got '%s'", got);
  CHECK(now() - t0 > 1.5, "TIMEOUT came after %.2f s, before the 2 s limit",
        now() - t0);
  sbn_client_close(c);
  hello_ok(rank);
  printf("svc_server_e2e: rank %d: a partial frame timed out after %.1f s\n",
         rank, now() - t0);
}

/* A client that sends requests but never reads is dropped once its
 * unread replies pass max_output; another client is served meanwhile. */
static void test_never_reads(int rank) {
  sbn_client_t *c = connect_rank(rank), *other = connect_rank(rank);
  sbn_layer_params_t p;
  uint64_t id;
  enum { N = 64 * 1024 }; /* 256 KiB tensors: replies of 256 KiB */
  /* 128 MiB of replies: well past what the two sockets' buffers (up to
   * 8 MiB each way with 4 MiB asked and doubled by the kernel, plus one
   * skb of overshoot) and max_output (2 MiB) can hold, whatever the
   * machine's net.core.wmem_max. */
  enum { FLOOD = 512 };
  static float x[N];
  size_t sent = 0, got = 0;
  char buf[65536];
  int i, rc = 0;
  sbn_layer_params_default(&p, SBN_OP_DROPOUT);
  p.p = 0.5;
  CHECK(sbn_client_register(other, "flood.dropout", "dropout", &p, 0, &id,
                            NULL) == 0,
        "register: %s", sbn_last_error());
  /* Eval forwards: no state is kept, so the flood costs the worker only the
   * queued replies. Each request is built by hand (the client would wait
   * for every reply). */
  for (i = 0; i < FLOOD; i++) {
    /* One forward = header + map; reuse the client's packer through a
     * second client that shares the fd is not possible, so frames are
     * written by msgpack in a tiny inline encoder. */
    uint8_t hdr[128];
    size_t h = 4;
    const char *op = "forward";
    hdr[h++] = 0x86;
    hdr[h++] = 0xa2, memcpy(hdr + h, "op", 2), h += 2;
    hdr[h++] = 0xa7, memcpy(hdr + h, op, 7), h += 7;
    hdr[h++] = 0xa2, memcpy(hdr + h, "id", 2), h += 2;
    hdr[h++] = 0xcd, hdr[h++] = (uint8_t)(i >> 8), hdr[h++] = (uint8_t)i;
    hdr[h++] = 0xa5, memcpy(hdr + h, "layer", 5), h += 5;
    hdr[h++] = (uint8_t)id;
    hdr[h++] = 0xa4, memcpy(hdr + h, "step", 4), h += 4;
    hdr[h++] = 0xcd, hdr[h++] = (uint8_t)(i >> 8), hdr[h++] = (uint8_t)i;
    hdr[h++] = 0xa5, memcpy(hdr + h, "train", 5), h += 5;
    hdr[h++] = 0xc2;
    hdr[h++] = 0xa1, hdr[h++] = 'x';
    hdr[h++] = 0x83;
    hdr[h++] = 0xa5, memcpy(hdr + h, "dtype", 5), h += 5;
    hdr[h++] = 0xa3, memcpy(hdr + h, "f32", 3), h += 3;
    hdr[h++] = 0xa5, memcpy(hdr + h, "shape", 5), h += 5;
    hdr[h++] = 0x92, hdr[h++] = 0x01, hdr[h++] = 0xce;
    hdr[h++] = 0, hdr[h++] = (uint8_t)(N >> 16), hdr[h++] = (uint8_t)(N >> 8),
    hdr[h++] = (uint8_t)N;
    hdr[h++] = 0xa4, memcpy(hdr + h, "data", 4), h += 4;
    hdr[h++] = 0xc6;
    hdr[h++] = (uint8_t)((N * 4) >> 24), hdr[h++] = (uint8_t)((N * 4) >> 16);
    hdr[h++] = (uint8_t)((N * 4) >> 8), hdr[h++] = (uint8_t)(N * 4);
    size_t body = h - 4 + (size_t)N * 4;
    hdr[0] = (uint8_t)(body >> 24), hdr[1] = (uint8_t)(body >> 16);
    hdr[2] = (uint8_t)(body >> 8), hdr[3] = (uint8_t)body;
    if ((rc = sbn_client_send_raw(c, hdr, h)) != 0 ||
        (rc = sbn_client_send_raw(c, x, sizeof x)) != 0)
      break;
    sent++;
    if (i == 8)
      hello_ok(rank); /* others are served while the flood goes on */
  }
  CHECK(rc != 0 || sent == FLOOD, "send loop");
  /* Replies beyond what the socket buffers plus max_output hold were
   * never queued: the worker closed the connection. */
  for (;;) {
    ssize_t r = recv(sbn_client_fd(c), buf, sizeof buf, 0);
    if (r <= 0) {
      CHECK(r == 0 || errno == ECONNRESET,
            "never-reading client: expected EOF, got %s after %zu bytes of "
            "the replies to %zu requests",
            strerror(errno), got, sent);
      break;
    }
    got += (size_t)r;
  }
  CHECK(got < sent * ((size_t)N * 4 + 40),
        "never-reading client got all %zu replies (%zu bytes)", sent, got);
  sbn_client_close(c);
  sbn_client_close(other);
  hello_ok(rank);
  printf(
      "svc_server_e2e: rank %d: a client that never reads was dropped after "
      "%zu of %zu requests' replies (%zu bytes); worker serving\n",
      rank, got / ((size_t)N * 4 + 40), sent, got);
}

static void test_max_clients(int rank) {
  sbn_client_t *c[MAX_CLIENTS + 1];
  char got[64];
  /* Connections the earlier tests closed may still be counted until the
   * worker's next loop turns see their EOF. */
  usleep(300000);
  for (int i = 0; i < MAX_CLIENTS; i++) {
    sbn_client_hello_t h;
    c[i] = connect_rank(rank);
    /* A round trip makes sure the worker has accepted it. */
    CHECK(sbn_client_hello(c[i], &h) == 0, "hello %d", i);
  }
  c[MAX_CLIENTS] = connect_rank(rank);
  CHECK(sbn_client_recv_error(c[MAX_CLIENTS], got, sizeof got) == 0 &&
            strcmp(got, "TOO_MANY_CLIENTS") == 0,
        "client %d: expected TOO_MANY_CLIENTS, got '%s'", MAX_CLIENTS + 1, got);
  for (int i = 0; i <= MAX_CLIENTS; i++)
    sbn_client_close(c[i]);
  /* The worker notices the closes on its next loop turns. */
  usleep(200000);
  hello_ok(rank);
  printf("svc_server_e2e: rank %d: client %d refused with TOO_MANY_CLIENTS\n",
         rank, MAX_CLIENTS + 1);
}

/* Another uid: a child keeps CAP_DAC_OVERRIDE across setresuid (with
 * SECBIT_NO_SETUID_FIXUP) so that it can reach the socket despite the
 * 0700 directory, and the worker must refuse it by SO_PEERCRED alone. A
 * second child without the capability cannot even reach the socket. The
 * uid is one with no passwd entry, so no user is created or left behind. */
static void test_other_uid(int rank) {
  uid_t uid = 0;
  int status, pfd[2];
  pid_t pid;
  char code[64] = "";
  if (geteuid() != 0) {
    printf(
        "svc_server_e2e: SKIP another-uid test: needs root to switch uids\n");
    return;
  }
  for (uid_t u = 61000; u < 61100; u++) {
    char cmd[64];
    snprintf(cmd, sizeof cmd, "getent passwd %u >/dev/null", (unsigned)u);
    if (system(cmd) != 0) {
      uid = u;
      break;
    }
  }
  CHECK(uid != 0, "no free uid in 61000..61099");
  CHECK(pipe(pfd) == 0, "pipe");
  pid = fork();
  CHECK(pid >= 0, "fork");
  if (pid == 0) {
    sbn_client_t *c = NULL;
    char got[64] = "";
    int rc;
    close(pfd[0]);
    if (prctl(PR_SET_SECUREBITS, SECBIT_NO_SETUID_FIXUP, 0, 0, 0) != 0) {
      rc = write(pfd[1], "SKIP", 5);
      _exit(77);
    }
    if (setresgid(uid, uid, uid) != 0 || setresuid(uid, uid, uid) != 0)
      _exit(3);
    if (sbn_client_connect(g_path[rank], &c) != 0) {
      rc = write(pfd[1], "NOCONNECT", 10);
      _exit(4);
    }
    set_timeouts(sbn_client_fd(c), 10);
    rc = sbn_client_recv_error(c, got, sizeof got);
    if (rc != 0)
      snprintf(got, sizeof got, "rc%d", rc);
    rc = write(pfd[1], got, strlen(got) + 1);
    (void)rc;
    _exit(0);
  }
  close(pfd[1]);
  {
    ssize_t r = read(pfd[0], code, sizeof code - 1);
    code[r > 0 ? r : 0] = '\0';
  }
  close(pfd[0]);
  waitpid(pid, &status, 0);
  if (strcmp(code, "SKIP") == 0) {
    printf(
        "svc_server_e2e: SKIP another-uid SO_PEERCRED test: securebits not "
        "settable here\n");
  } else {
    CHECK(strcmp(code, "FORBIDDEN") == 0,
          "uid %u: expected FORBIDDEN, got '%s'", (unsigned)uid, code);
    printf(
        "svc_server_e2e: rank %d: uid %u refused with FORBIDDEN "
        "(SO_PEERCRED)\n",
        rank, (unsigned)uid);
  }
  /* Without capabilities the directory alone keeps that uid out. */
  pid = fork();
  CHECK(pid >= 0, "fork");
  if (pid == 0) {
    sbn_client_t *c = NULL;
    if (setresgid(uid, uid, uid) != 0 || setresuid(uid, uid, uid) != 0)
      _exit(3);
    _exit(sbn_client_connect(g_path[rank], &c) == 0 ? 1 : 0);
  }
  CHECK(waitpid(pid, &status, 0) == pid && WIFEXITED(status) &&
            WEXITSTATUS(status) == 0,
        "uid %u without capabilities could connect (status %d)", (unsigned)uid,
        status);
  hello_ok(rank);
}

static void test_modes(void) {
  struct stat st;
  CHECK(lstat(g_dir, &st) == 0 && S_ISDIR(st.st_mode), "socket dir");
  CHECK((st.st_mode & 0777) == 0700, "socket dir mode %03o",
        (unsigned)(st.st_mode & 0777));
  CHECK(st.st_uid == geteuid(), "socket dir owner");
  for (int r = 0; r < NP; r++) {
    char want[256];
    snprintf(want, sizeof want, "%s/rank-%d.sock", g_dir, r);
    CHECK(strcmp(want, g_path[r]) == 0, "rank %d path %s", r, g_path[r]);
    CHECK(lstat(g_path[r], &st) == 0 && S_ISSOCK(st.st_mode), "socket %d", r);
    CHECK((st.st_mode & 077) == 0, "socket %d mode %03o", r,
          (unsigned)(st.st_mode & 0777));
  }
  printf(
      "svc_server_e2e: socket dir mode 0700, sockets closed to group/others\n");
}

/* syncbnd refuses socket directories that others could tamper with. */
static void test_bad_dirs(void) {
  const char *cases[3][2] = {
      {"open", "mode 0755"}, {"link", "a symlink"}, {"file", "a regular file"}};
  char path[128], target[128];
  snprintf(target, sizeof target, "%s/target", g_root);
  CHECK(mkdir(target, 0700) == 0, "mkdir target");
  for (int i = 0; i < 3; i++) {
    pid_t pid;
    int fd, status, ready;
    snprintf(path, sizeof path, "%s/%s", g_root, cases[i][0]);
    if (i == 0) {
      CHECK(mkdir(path, 0700) == 0 && chmod(path, 0755) == 0, "mkdir");
    } else if (i == 1) {
      CHECK(symlink(target, path) == 0, "symlink");
    } else {
      fd = open(path, O_CREAT | O_WRONLY, 0600);
      CHECK(fd >= 0, "create file");
      close(fd);
    }
    fd = start_job(1, path, &pid, NULL);
    ready = wait_ready(fd, 1, 60);
    close(fd);
    if (ready != 0) {
      g_mpirun = pid;
      CHECK(0, "syncbnd accepted a socket dir that is %s", cases[i][1]);
    }
    CHECK(waitpid(pid, &status, 0) == pid &&
              !(WIFEXITED(status) && WEXITSTATUS(status) == 0),
          "syncbnd exited 0 with a socket dir that is %s", cases[i][1]);
    printf("svc_server_e2e: a socket dir that is %s is refused\n", cases[i][1]);
  }
}

int main(void) {
  const char *extra[] = {"--max-frame",
                         "1048576",
                         "--max-clients",
                         "12",
                         "--max-output",
                         "2097152",
                         "--frame-timeout",
                         FRAME_TIMEOUT,
                         "--idle-timeout",
                         "60",
                         NULL};
  int fd, status;
  struct stat st;
  alarm(170);
  signal(SIGPIPE, SIG_IGN);
  snprintf(g_root, sizeof g_root, "/tmp/sbn-e2e-XXXXXX");
  CHECK(mkdtemp(g_root) != NULL, "mkdtemp: %s", strerror(errno));
  atexit(cleanup);
  chmod(g_root, 0711); /* the other uid may traverse, not list */
  snprintf(g_dir, sizeof g_dir, "%s/socks", g_root);

  test_bad_dirs();

  fd = start_job(NP, g_dir, &g_mpirun, extra);
  CHECK(wait_ready(fd, NP, 60) == NP, "the workers did not get ready");
  test_modes();
  for (int r = 0; r < NP; r++)
    hello_ok(r);
  test_concurrent_clients();
  for (int r = 0; r < NP; r++) {
    test_hostile(r);
    test_killed_mid_frame(r);
    test_never_reads(r);
    test_max_clients(r);
  }
  test_frame_timeout(0);
  test_other_uid(0);

  /* SIGTERM to mpirun reaches both workers: they close and remove their
   * sockets. */
  kill(g_mpirun, SIGTERM);
  {
    double t0 = now();
    pid_t w = 0;
    while (now() - t0 < 30 && (w = waitpid(g_mpirun, &status, WNOHANG)) == 0)
      usleep(50000);
    CHECK(w == g_mpirun, "mpirun did not end within 30 s of SIGTERM");
    g_mpirun = -1;
  }
  close(fd);
  for (int r = 0; r < NP; r++)
    CHECK(lstat(g_path[r], &st) != 0 && errno == ENOENT,
          "socket %s left behind", g_path[r]);
  printf("svc_server_e2e: SIGTERM: job ended, sockets removed\n");
  printf("svc_server_e2e: all passed\n");
  return 0;
}
