/* `syncbn bench`: kernel throughput against a memcpy of the same bytes and,
 * under mpirun with --sync, SyncBN's reduction against a bare MPI_Allreduce
 * of the same message. Every number printed is a ratio against a baseline
 * measured in the same run, interleaved with it, so a noisy machine moves
 * both together. */
#include <getopt.h>
#include <limits.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli_args.h"
#include "syncbn.h"
#include "syncbn_mpi.h"

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

static double median(double *v, int n) {
  qsort(v, (size_t)n, sizeof *v, cmp_double);
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

static void bench_usage(FILE *f) {
  fprintf(f,
          "usage: syncbn bench [--op OP|all] [--shape N,C,H,W] "
          "[--layout nchw|nhwc]\n"
          "                    [--iters K] [--kernels auto|ref|avx2] "
          "[--sync [--group-size k]]\n"
          "\n"
          "Times forward and backward (training) of each op and prints the\n"
          "median time as a ratio to a memcpy of the same tensor (read x,\n"
          "write y) measured in the same run, and the effective bandwidth.\n"
          "With --sync (under mpirun) it also times BatchNorm's statistic\n"
          "reduction (one fused allreduce of C records with the Chan-merge\n"
          "MPI_Op) against a bare MPI_Allreduce(MPI_SUM) of the same bytes.\n"
          "\n"
          "  --op OP        batchnorm, layernorm, instancenorm, groupnorm,\n"
          "                 dropout, or all (default all)\n"
          "  --shape DIMS   logical N,C,spatial... (default 32,64,56,56)\n"
          "  --layout L     nchw (default) or nhwc (BN, IN, GN only)\n"
          "  --iters K      timed repetitions (default 20)\n"
          "  --kernels K    kernel set to use (default auto)\n"
          "  --sync         run the MPI comparison (needs mpirun)\n"
          "  --group-size k sync group size for --sync (default all ranks)\n");
}

static int parse_dims(const char *s, sbn_tensor_desc_t *d) {
  uint64_t *v = NULL;
  size_t n = 0;
  int rc = sbn__cli_parse_list(s, SIZE_MAX, &v, &n);
  if (rc == 0 && (n < 2 || n > SBN_MAX_DIMS))
    rc = -1;
  for (size_t i = 0; rc == 0 && i < n; i++) {
    if (v[i] == 0)
      rc = -1;
    d->dims[i] = (size_t)v[i];
  }
  if (rc == 0)
    d->ndim = (int)n;
  free(v);
  return rc;
}

/* The buffers of one op's timing; one allocation each, freed together. */
typedef struct bench_bufs_s {
  float *x, *y, *dy, *dx, *w, *b, *rm, *rv, *dw, *db;
  void *ws, *sv;
  double *tf, *tb, *tm; /* forward, backward and memcpy times */
} bench_bufs_t;

static void bufs_free(bench_bufs_t *u) {
  free(u->x);
  free(u->y);
  free(u->dy);
  free(u->dx);
  free(u->w);
  free(u->b);
  free(u->rm);
  free(u->rv);
  free(u->dw);
  free(u->db);
  free(u->ws);
  free(u->sv);
  free(u->tf);
  free(u->tb);
  free(u->tm);
}

/* n values of x, nw of the parameters, wsb and svb bytes of workspace and
 * saved state, iters times. Filled with fixed values so that every run
 * times the same work. */
static int bufs_alloc(bench_bufs_t *u, size_t n, size_t nw, size_t wsb,
                      size_t svb, int iters) {
  memset(u, 0, sizeof *u);
  u->x = malloc(n * 4);
  u->y = malloc(n * 4);
  u->dy = malloc(n * 4);
  u->dx = malloc(n * 4);
  u->w = malloc(nw * 4);
  u->b = malloc(nw * 4);
  u->dw = malloc(nw * 4);
  u->db = malloc(nw * 4);
  u->rm = calloc(nw, 4);
  u->rv = malloc(nw * 4);
  u->ws = malloc(wsb + 1);
  u->sv = malloc(svb + 1);
  u->tf = malloc(sizeof(double) * (size_t)iters);
  u->tb = malloc(sizeof(double) * (size_t)iters);
  u->tm = malloc(sizeof(double) * (size_t)iters);
  if (!u->x || !u->y || !u->dy || !u->dx || !u->w || !u->b || !u->dw ||
      !u->db || !u->rm || !u->rv || !u->ws || !u->sv || !u->tf || !u->tb ||
      !u->tm)
    return sbn_set_error(SBN_ENOMEM, "bench: out of memory for %zu values", n);
  for (size_t i = 0; i < n; i++) {
    u->x[i] = (float)((i * 2654435761u) % 1000) * 1e-3f + 5.0f;
    u->dy[i] = (float)((i * 40503u) % 1000) * 1e-3f - 0.5f;
  }
  for (size_t i = 0; i < nw; i++) {
    u->w[i] = 1.0f;
    u->b[i] = 0.0f;
    u->rv[i] = 1.0f;
  }
  return 0;
}

/* Times memcpy, forward and backward, interleaved, iters times after one
 * warm-up of each (so that page faults are not timed). */
static int time_op(sbn_layer_t *l, const sbn_tensor_desc_t *d, size_t n,
                   size_t wsb, size_t svb, int iters, bench_bufs_t *u) {
  sbn_state_t st = {u->rm, u->rv, 0};
  sbn_forward_args_t fa = {SBN_MODE_TRAIN, d,   u->x,  u->y, u->w, u->b, &st, 0,
                           u->ws,          wsb, u->sv, svb};
  sbn_backward_args_t ba = {SBN_MODE_TRAIN, d, u->x,  u->dy, u->dx, u->w, u->dw,
                            u->db,          0, u->ws, wsb,   u->sv, svb};
  int rc;
  memcpy(u->y, u->x, n * 4);
  if ((rc = sbn_forward(l, &fa)) != 0 || (rc = sbn_backward(l, &ba)) != 0)
    return rc;
  for (int it = 0; it < iters; it++) {
    double t0 = now_s();
    memcpy(u->y, u->x, n * 4);
    double t1 = now_s();
    fa.step = ba.step = (uint64_t)it;
    if ((rc = sbn_forward(l, &fa)) != 0)
      return rc;
    double t2 = now_s();
    if ((rc = sbn_backward(l, &ba)) != 0)
      return rc;
    double t3 = now_s();
    u->tm[it] = t1 - t0;
    u->tf[it] = t2 - t1;
    u->tb[it] = t3 - t2;
  }
  return 0;
}

/* Times one op; returns 0 or an SBN_E* code. */
static int bench_op(sbn_op_t op, const sbn_tensor_desc_t *d0, int iters,
                    int rank) {
  sbn_tensor_desc_t d = *d0;
  sbn_layer_params_t p;
  sbn_layer_t *l = NULL;
  bench_bufs_t u;
  size_t n = 1, wsb, svb, nw;
  int rc = 0;
  memset(&u, 0, sizeof u);
  if (op == SBN_OP_LAYERNORM || op == SBN_OP_DROPOUT)
    d.layout = SBN_LAYOUT_NCHW;
  for (int i = 0; i < d.ndim; i++)
    n *= d.dims[i];
  sbn_layer_params_default(&p, op);
  p.channels = d.dims[1];
  p.groups = d.dims[1] % 8 == 0 ? 8 : 1;
  p.norm_ndim = d.ndim - 1;
  for (int i = 1; i < d.ndim; i++)
    p.norm_shape[i - 1] = d.dims[i];
  p.p = 0.1;
  nw = op == SBN_OP_LAYERNORM ? n / d.dims[0] : d.dims[1];
  if ((rc = sbn_layer_create(&p, NULL, &l)) != 0 ||
      (rc = sbn_layer_sizes(l, &d, &wsb, &svb)) != 0 ||
      (rc = bufs_alloc(&u, n, nw, wsb, svb, iters)) != 0 ||
      (rc = time_op(l, &d, n, wsb, svb, iters, &u)) != 0)
    goto fail;
  double mm = median(u.tm, iters), mf = median(u.tf, iters),
         mb = median(u.tb, iters);
  if (rank == 0)
    printf(
        "%-12s %-4s fwd %8.3f ms (%5.2fx memcpy, %6.2f GB/s in+out)  "
        "bwd %8.3f ms (%5.2fx memcpy)  memcpy %7.3f ms\n",
        sbn_op_name(op), d.layout == SBN_LAYOUT_NHWC ? "nhwc" : "nchw",
        mf * 1e3, mf / mm, 2.0 * (double)n * 4 / mf / 1e9, mb * 1e3, mb / mm,
        mm * 1e3);
fail:
  if (rc != 0 && rank == 0)
    fprintf(stderr, "syncbn bench: %s: %s: %s\n", sbn_op_name(op),
            sbn_err_name(rc), sbn_last_error());
  sbn_layer_destroy(l);
  bufs_free(&u);
  return rc;
}

/* Compares the Chan-merge allreduce of C records with a bare MPI_SUM
 * allreduce of the same number of doubles, on the same communicator. */
static int bench_sync(size_t C, int iters, int group_size) {
  sbn_layer_params_t p;
  sbn_comm_t *comm = NULL;
  sbn_rec_t *recs = NULL;
  double *buf = NULL, *tc = NULL, *tr = NULL;
  int rc, rank;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  sbn_layer_params_default(&p, SBN_OP_BATCHNORM);
  p.channels = C;
  if ((rc = sbn_mpi_comm_create(MPI_COMM_WORLD, group_size, &p, &comm)) != 0)
    goto fail;
  recs = calloc(C, sizeof *recs);
  buf = calloc(C * 4, sizeof *buf);
  tc = malloc(sizeof(double) * (size_t)iters);
  tr = malloc(sizeof(double) * (size_t)iters);
  if (!recs || !buf || !tc || !tr) {
    rc = SBN_ENOMEM;
    goto fail;
  }
  MPI_Comm gc = sbn_mpi_comm_handle(comm);
  for (int it = -1; it < iters; it++) {
    for (size_t c = 0; c < C; c++) {
      recs[c].tag = SBN_REC_MOMENTS;
      recs[c].v[0] = 10;
      recs[c].v[1] = (double)c;
      recs[c].v[2] = 3;
    }
    MPI_Barrier(gc);
    double t0 = now_s();
    MPI_Allreduce(MPI_IN_PLACE, buf, (int)(C * 4), MPI_DOUBLE, MPI_SUM, gc);
    double t1 = now_s();
    MPI_Barrier(gc);
    double t2 = now_s();
    if ((rc = sbn_comm_allreduce(comm, recs, C)) != 0)
      goto fail;
    double t3 = now_s();
    if (it >= 0) {
      tr[it] = t1 - t0;
      tc[it] = t3 - t2;
    }
  }
  double mr = median(tr, iters), mc = median(tc, iters);
  if (rank == 0)
    printf(
        "allreduce    C=%zu (%zu bytes) group %d: syncbn %.1f us, bare "
        "MPI_Allreduce %.1f us, ratio %.2fx\n",
        C, C * sizeof(sbn_rec_t), comm->size, mc * 1e6, mr * 1e6, mc / mr);
fail:
  if (rc != 0)
    fprintf(stderr, "syncbn bench: rank %d: %s: %s\n", rank, sbn_err_name(rc),
            sbn_last_error());
  sbn_comm_destroy(comm);
  free(recs);
  free(buf);
  free(tc);
  free(tr);
  return rc;
}

typedef struct bench_opts_s {
  sbn_tensor_desc_t d;
  const char *ops, *kern;
  int iters, sync, group;
  sbn_op_t one; /* --op, unless ops is "all" */
} bench_opts_t;

/* A usage error: one line naming the flag, exit status 2. */
static int usage_error(const char *fmt, const char *arg) {
  fprintf(stderr, "syncbn bench: ");
  fprintf(stderr, fmt, arg);
  fprintf(stderr, "\n");
  return 2;
}

/* Sets the value of option c; 0 or 2 after printing why. */
static int set_option(bench_opts_t *o, int c, const char *arg) {
  uint64_t u;
  switch (c) {
    case 'o':
      o->ops = arg;
      return 0;
    case 's':
      if (parse_dims(arg, &o->d) != 0)
        return usage_error(
            "--shape: '%s' is not N,C[,spatial...] with positive sizes", arg);
      return 0;
    case 'l':
      if (sbn__cli_parse_layout(arg, &o->d.layout) != 0)
        return usage_error("--layout: '%s' is not nchw|nhwc", arg);
      return 0;
    case 'i':
      if (sbn__cli_parse_u64(arg, 100000, &u) != 0 || u < 1)
        return usage_error("--iters: '%s' is not in [1, 1e5]", arg);
      o->iters = (int)u;
      return 0;
    case 'k':
      o->kern = arg;
      return 0;
    case 'y':
      o->sync = 1;
      return 0;
    case 'g':
      if (sbn__cli_parse_u64(arg, INT_MAX, &u) != 0 || u < 1)
        return usage_error("--group-size: '%s' is not a positive integer", arg);
      o->group = (int)u;
      return 0;
    default:
      bench_usage(stderr);
      return 2;
  }
}

/* Parses argv into o: 0 to go on, -1 after printing --help, 2 for a usage
 * error (printed). */
static int bench_parse(int argc, char **argv, bench_opts_t *o) {
  static const struct option opts[] = {
      {"op", required_argument, 0, 'o'},
      {"shape", required_argument, 0, 's'},
      {"layout", required_argument, 0, 'l'},
      {"iters", required_argument, 0, 'i'},
      {"kernels", required_argument, 0, 'k'},
      {"sync", no_argument, 0, 'y'},
      {"group-size", required_argument, 0, 'g'},
      {"help", no_argument, 0, 'h'},
      {0, 0, 0, 0}};
  int c, st;
  *o = (bench_opts_t){{4, {32, 64, 56, 56}, SBN_LAYOUT_NCHW},
                      "all",
                      "auto",
                      20,
                      0,
                      0,
                      SBN_OP_BATCHNORM};
  optind = 1;
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
  if (strcmp(o->ops, "all") != 0 && sbn_op_parse(o->ops, &o->one) != 0)
    return usage_error("--op: unknown op '%s'", o->ops);
  return 0;
}

int sbn_cli_bench(int argc, char **argv) {
  bench_opts_t o;
  const sbn_tensor_desc_t *d = &o.d;
  int rc = 0, rank = 0, st = bench_parse(argc, argv, &o);
  if (st != 0)
    return st > 0 ? st : 0;
  if (o.sync) {
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  }
  if (rank == 0) {
    printf("kernels %s, shape", sbn_kernel_name());
    for (int i = 0; i < d->ndim; i++)
      printf("%s%zu", i ? "x" : " ", d->dims[i]);
    printf(", %d iterations, medians\n", o.iters);
  }
  for (int op = 0; op <= SBN_OP_DROPOUT && rc == 0; op++) {
    if (strcmp(o.ops, "all") != 0 && op != (int)o.one)
      continue;
    if (d->layout == SBN_LAYOUT_NHWC &&
        (op == SBN_OP_LAYERNORM || op == SBN_OP_DROPOUT))
      continue;
    rc = bench_op((sbn_op_t)op, d, o.iters, rank);
  }
  if (o.sync) {
    if (rc == 0)
      rc = bench_sync(d->dims[1], o.iters * 10, o.group);
    MPI_Finalize();
  }
  return rc == 0 ? 0 : 1;
}
