/* `syncbn bench MODE`: what SyncBN costs, measured several ways (see
 * cli_bench.h for the rooms). This file parses the options, initializes MPI
 * for the modes that need it, runs the mode and hands its records to the
 * writers. Every derived number is a ratio or a difference against a
 * baseline measured in the same run, because this machine's timings move
 * between runs far more than within one. */
#include <getopt.h>
#include <limits.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli.h"
#include "cli_args.h"
#include "cli_bench.h"

typedef struct mode_s {
  const char *name;
  int (*run)(const sbn_bench_opts_t *o, sbn_bench_out_t *out);
  int mpi; /* needs MPI_Init */
} mode_t_;

static const mode_t_ modes[] = {
    {"layer", sbn__bench_layer, 1},     {"kernels", sbn__bench_kernels, 0},
    {"network", sbn__bench_network, 1}, {"sizes", sbn__bench_sizes, 1},
    {"service", sbn__bench_service, 1},
};
#define NMODES (sizeof modes / sizeof *modes)

static void bench_usage(FILE *f) {
  fprintf(
      f,
      "usage: syncbn bench [MODE] [options]     (all modes but kernels under "
      "mpirun)\n"
      "\n"
      "modes:\n"
      "  layer    (default) per ResNet-50 BatchNorm shape, per-rank N and "
      "layout:\n"
      "           local BN vs SyncBN (passes fwd, bwd, fwd+bwd) vs a bare\n"
      "           MPI_Allreduce of one pass's records; overhead_us,\n"
      "           overhead_pct, overhead_per_allreduce (overhead over one\n"
      "           bare allreduce per pass)\n"
      "  kernels  every op and pass against a same-run floor kernel moving "
      "the\n"
      "           same compulsory bytes (memcpy, or a two-read-one-write "
      "stream):\n"
      "           floor_ratio and GB/s\n"
      "  network  ResNet-50's 53 BatchNorm layers, forward then backward: "
      "unfused\n"
      "           SyncBN, fused SyncBN, local BN, GroupNorm(32)\n"
      "  sizes    OSU-style latency of the record allreduce vs MPI_SUM of "
      "the\n"
      "           same bytes vs MPI_SUM of 2C+1 floats, C = 1 .. 65536\n"
      "  service  the layer measurement through syncbnd (full tensors and "
      "stats\n"
      "           only) against the same work in process\n"
      "\n"
      "options:\n"
      "  --shape N,C[,S...]  a shape to measure instead of the defaults\n"
      "                      (repeatable; N is the per-rank batch)\n"
      "  --batch N[,N...]    per-rank batch sizes of the default shapes\n"
      "                      (layer: 2,8,32; service: 2,8; network: 8)\n"
      "  --layout L          nchw, nhwc or both (default: both; service "
      "nchw)\n"
      "  --op OP             kernels: one op (batchnorm, layernorm,\n"
      "                      instancenorm, groupnorm, dropout)\n"
      "  --kernels K         kernel set (auto, ref, avx2, ...)\n"
      "  --reps K            timed repetitions per configuration\n"
      "  --warmup K          untimed repetitions before them (default 3)\n"
      "  --group-size k      SyncBN sync groups of k ranks (default all)\n"
      "  --chunk auto|off|N  layer: SyncBN's reduction chunks (params.\n"
      "                      reduce_chunk: auto from the cache, off = one\n"
      "                      blocking allreduce, N channels per chunk)\n"
      "  --vs-unchunked      layer: also time SyncBN with --chunk off in\n"
      "                      the same reps (variant sync_unchunked)\n"
      "  --threads N         OpenMP threads per kernel call (default 1;\n"
      "                      needs a build with -DSBN_OPENMP=ON)\n"
      "  --quick             a subset that finishes in under a minute at np "
      "2\n"
      "  --json FILE|-       the records as JSON (- : stdout; the table "
      "then\n"
      "                      goes to stderr)\n"
      "  --csv FILE|-        the records as CSV, the same columns\n"
      "  --socket-dir DIR    service: use the running syncbnd job there\n"
      "                      instead of starting one\n"
      "  --rotate-mib M      the copies each configuration rotates through\n"
      "                      add up to M MiB (default 64; set it above\n"
      "                      the last-level cache to start every rep from\n"
      "                      memory)\n"
      "  --gap-us US         service: each rank computes (spins) US\n"
      "                      microseconds before every timed call, as a\n"
      "                      trainer does between layers (default 0)\n"
      "\n"
      "A rep's time is the maximum over ranks; the tables give the median "
      "and\n"
      "p90 over reps, in microseconds.\n");
}

/* A usage error: one line naming the flag, exit status 2. */
static int usage_error(const char *fmt, const char *arg) {
  fprintf(stderr, "syncbn bench: ");
  fprintf(stderr, fmt, arg);
  fprintf(stderr, "\n");
  return 2;
}

static int parse_dims(const char *s, sbn_tensor_desc_t *d) {
  uint64_t *v = NULL;
  size_t n = 0;
  int rc = sbn__cli_parse_list(s, (uint64_t)1 << 32, &v, &n);
  if (rc == 0 && (n < 2 || n > SBN_MAX_DIMS))
    rc = -1;
  for (size_t i = 0; rc == 0 && i < n; i++) {
    if (v[i] == 0)
      rc = -1;
    d->dims[i] = (size_t)v[i];
  }
  if (rc == 0)
    d->ndim = (int)n;
  d->layout = SBN_LAYOUT_NCHW;
  free(v);
  return rc;
}

static int parse_batches(const char *s, sbn_bench_opts_t *o) {
  uint64_t *v = NULL;
  size_t n = 0;
  int rc = sbn__cli_parse_list(s, 4096, &v, &n);
  if (rc == 0 && (n < 1 || n > 16))
    rc = -1;
  for (size_t i = 0; rc == 0 && i < n; i++) {
    if (v[i] == 0)
      rc = -1;
    o->batches[i] = (size_t)v[i];
  }
  o->nbatches = rc == 0 ? (int)n : 0;
  free(v);
  return rc;
}

static int parse_count(const char *flag, const char *arg, uint64_t lo,
                       uint64_t hi, int *out) {
  uint64_t u;
  if (sbn__cli_parse_u64(arg, hi, &u) != 0 || u < lo) {
    fprintf(stderr, "syncbn bench: %s: '%s' is not in [%llu, %llu]\n", flag,
            arg, (unsigned long long)lo, (unsigned long long)hi);
    return 2;
  }
  *out = (int)u;
  return 0;
}

/* --chunk: auto (0), off (SBN_CHUNK_OFF) or a channel count. */
static int parse_chunk(const char *arg, sbn_bench_opts_t *o) {
  uint64_t u;
  if (strcmp(arg, "auto") == 0) {
    o->chunk = 0;
  } else if (strcmp(arg, "off") == 0) {
    o->chunk = SBN_CHUNK_OFF;
  } else if (sbn__cli_parse_u64(arg, 1u << 30, &u) == 0 && u > 0) {
    o->chunk = (size_t)u;
  } else {
    return usage_error(
        "--chunk: '%s' is not auto, off or a channel count "
        "in [1, 2^30]",
        arg);
  }
  return 0;
}

/* Sets the value of option c; 0 or 2 after printing why. */
static int set_option(sbn_bench_opts_t *o, int c, const char *arg) {
  switch (c) {
    case 's':
      if (o->nshapes == SBN_BENCH_MAX_SHAPES)
        return usage_error("--shape: more than 64 shapes ('%s')", arg);
      if (parse_dims(arg, &o->shapes[o->nshapes]) != 0)
        return usage_error(
            "--shape: '%s' is not N,C[,spatial...] with positive sizes", arg);
      o->nshapes++;
      return 0;
    case 'b':
      if (parse_batches(arg, o) != 0)
        return usage_error(
            "--batch: '%s' is not 1 to 16 sizes in [1, 4096], comma-separated",
            arg);
      return 0;
    case 'l':
      if (strcmp(arg, "both") == 0) {
        o->layouts = 3;
      } else {
        sbn_layout_t l;
        if (sbn__cli_parse_layout(arg, &l) != 0)
          return usage_error("--layout: '%s' is not nchw|nhwc|both", arg);
        o->layouts = l == SBN_LAYOUT_NHWC ? 2 : 1;
      }
      return 0;
    case 'o': {
      sbn_op_t op;
      if (sbn_op_parse(arg, &op) != 0)
        return usage_error("--op: unknown op '%s'", arg);
      o->op = arg;
      return 0;
    }
    case 'k':
      o->kern = arg;
      return 0;
    case 'r':
      return parse_count("--reps", arg, 1, 100000, &o->reps);
    case 'w':
      return parse_count("--warmup", arg, 0, 1000, &o->warmup);
    case 'g':
      return parse_count("--group-size", arg, 1, INT_MAX, &o->group_size);
    case 'q':
      o->quick = 1;
      return 0;
    case 'C':
      return parse_chunk(arg, o);
    case 'U':
      o->vs_unchunked = 1;
      return 0;
    case 't':
      if (parse_count("--threads", arg, 1, 1024, &o->threads) != 0)
        return 2;
      if (sbn_set_threads(o->threads) != 0)
        return usage_error("--threads: %s", sbn_last_error());
      return 0;
    case 'j':
      o->json = arg;
      return 0;
    case 'c':
      o->csv = arg;
      return 0;
    case 'd':
      o->socket_dir = arg;
      return 0;
    case 'G':
      return parse_count("--gap-us", arg, 0, 1000000, &o->gap_us);
    case 'R':
      return parse_count("--rotate-mib", arg, 1, 65536, &o->rotate_mib);
    default:
      bench_usage(stderr);
      return 2;
  }
}

/* Whether copies of mib MiB would take more than half the physical
 * memory: each rank allocates them, and an allocation that large may
 * succeed and then be killed when its pages are touched. Unknown memory
 * refuses nothing. */
static int rotate_too_big(int mib) {
  long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  if (pages <= 0 || page <= 0)
    return 0;
  return ((double)mib * 1048576.0) > 0.5 * (double)pages * (double)page;
}

static const mode_t_ *find_mode(const char *name) {
  for (size_t i = 0; i < NMODES; i++)
    if (strcmp(modes[i].name, name) == 0)
      return &modes[i];
  return NULL;
}

/* Parses argv into o: 0 to go on, -1 after printing --help, 2 for a usage
 * error (printed). */
static int bench_parse(int argc, char **argv, sbn_bench_opts_t *o,
                       const mode_t_ **mode) {
  static const struct option opts[] = {
      {"shape", required_argument, 0, 's'},
      {"batch", required_argument, 0, 'b'},
      {"layout", required_argument, 0, 'l'},
      {"op", required_argument, 0, 'o'},
      {"kernels", required_argument, 0, 'k'},
      {"reps", required_argument, 0, 'r'},
      {"warmup", required_argument, 0, 'w'},
      {"group-size", required_argument, 0, 'g'},
      {"quick", no_argument, 0, 'q'},
      {"chunk", required_argument, 0, 'C'},
      {"vs-unchunked", no_argument, 0, 'U'},
      {"threads", required_argument, 0, 't'},
      {"json", required_argument, 0, 'j'},
      {"csv", required_argument, 0, 'c'},
      {"socket-dir", required_argument, 0, 'd'},
      {"gap-us", required_argument, 0, 'G'},
      {"rotate-mib", required_argument, 0, 'R'},
      {"help", no_argument, 0, 'h'},
      {0, 0, 0, 0}};
  int c, st, first = 1;
  memset(o, 0, sizeof *o);
  o->kern = "auto";
  o->warmup = -1;
  o->size = 1;
  *mode = &modes[0];
  /* The mode is the first argument when it is not an option. */
  if (argc > 1 && argv[1][0] != '-') {
    if ((*mode = find_mode(argv[1])) == NULL)
      return usage_error(
          "unknown mode '%s' (layer, kernels, network, sizes, service)",
          argv[1]);
    first = 2;
  }
  o->mode = (*mode)->name;
  optind = first;
  while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
    if (c == 'h') {
      bench_usage(stdout);
      return -1;
    }
    if ((st = set_option(o, c, optarg)) != 0)
      return st;
  }
  if (optind < argc)
    return usage_error("unexpected argument '%s'", argv[optind]);
  if (strcmp(o->kern, "auto") != 0 && sbn_kernel_select(o->kern) != 0)
    return usage_error("--kernels: %s", sbn_last_error());
  if (o->op != NULL && strcmp(o->mode, "kernels") != 0)
    return usage_error("--op: only the kernels mode takes it (mode %s)",
                       o->mode);
  if ((o->chunk != 0 || o->vs_unchunked) && strcmp(o->mode, "layer") != 0)
    return usage_error(
        "--chunk, --vs-unchunked: only the layer mode takes "
        "them (mode %s)",
        o->mode);
  if (o->socket_dir != NULL && strcmp(o->mode, "service") != 0)
    return usage_error("--socket-dir: only the service mode takes it (mode %s)",
                       o->mode);
  if (o->gap_us != 0 && strcmp(o->mode, "service") != 0)
    return usage_error("--gap-us: only the service mode takes it (mode %s)",
                       o->mode);
  if (o->json != NULL && o->csv != NULL && strcmp(o->json, "-") == 0 &&
      strcmp(o->csv, "-") == 0)
    return usage_error("--csv: '%s' and --json - cannot both be stdout", "-");
  if (o->rotate_mib > 0 && rotate_too_big(o->rotate_mib)) {
    fprintf(stderr,
            "syncbn bench: --rotate-mib: %d MiB is more than half of this "
            "machine's memory\n",
            o->rotate_mib);
    return 2;
  }
  if (o->warmup < 0)
    o->warmup = 3;
  return 0;
}

int sbn_cli_bench(int argc, char **argv) {
  sbn_bench_opts_t o;
  sbn_bench_out_t out = {NULL, 0, 0};
  const mode_t_ *mode;
  int rc = 0, st = bench_parse(argc, argv, &o, &mode);
  if (st != 0)
    return st > 0 ? st : 0;
  o.self_exe = argv[0];
  o.progress = isatty(2);
  if (mode->mpi) {
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &o.rank);
    MPI_Comm_size(MPI_COMM_WORLD, &o.size);
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    if (o.group_size > o.size)
      o.group_size = o.size;
    if (o.size == 1)
      fprintf(stderr,
              "syncbn bench %s: warning: one MPI rank: the reductions have "
              "no peer, so this measures one process (run it under mpirun "
              "-np P)\n",
              o.mode);
  }
  rc = mode->run(&o, &out);
  if (rc != 0)
    fprintf(stderr, "syncbn bench %s: rank %d: %s: %s\n", o.mode, o.rank,
            sbn_err_name(rc), sbn_last_error());
  int to_stdout = (o.json != NULL && strcmp(o.json, "-") == 0) ||
                  (o.csv != NULL && strcmp(o.csv, "-") == 0);
  if (rc == 0 && o.rank == 0) {
    rc = sbn__bench_write(&o, &out, to_stdout ? stderr : stdout);
    if (rc != 0)
      fprintf(stderr, "syncbn bench: %s\n", sbn_last_error());
  }
  free(out.recs);
  if (mode->mpi) {
    /* One failed rank must not leave the others in MPI_Finalize's barrier
     * waiting for it: agree on the outcome first. */
    int any = rc != 0, all = 0;
    MPI_Allreduce(&any, &all, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    MPI_Finalize();
    return all ? 1 : 0;
  }
  return rc == 0 ? 0 : 1;
}
