/* `syncbn bench`: kernel throughput against a memcpy of the same bytes and,
 * under mpirun with --sync, SyncBN's reduction against a bare MPI_Allreduce
 * of the same message. Every number printed is a ratio against a baseline
 * measured in the same run, interleaved with it, so a noisy machine moves
 * both together. */
#include <getopt.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

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
  char *end;
  d->ndim = 0;
  while (*s) {
    if (d->ndim == SBN_MAX_DIMS)
      return -1;
    unsigned long long v = strtoull(s, &end, 10);
    if (end == s || v == 0)
      return -1;
    d->dims[d->ndim++] = (size_t)v;
    s = end;
    if (*s == ',')
      s++;
    else if (*s)
      return -1;
  }
  return d->ndim >= 2 ? 0 : -1;
}

/* Times one op; returns 0 or an SBN_E* code. */
static int bench_op(sbn_op_t op, const sbn_tensor_desc_t *d0, int iters,
                    int rank) {
  sbn_tensor_desc_t d = *d0;
  sbn_layer_params_t p;
  sbn_layer_t *l = NULL;
  float *x = NULL, *y = NULL, *dy = NULL, *dx = NULL, *w = NULL, *b = NULL;
  float *rm = NULL, *rv = NULL, *dw = NULL, *db = NULL;
  void *ws = NULL, *sv = NULL;
  double *tf = NULL, *tb = NULL, *tm = NULL;
  size_t n = 1, wsb, svb, nw;
  int rc = 0;
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
  if ((rc = sbn_layer_create(&p, NULL, &l)) != 0)
    goto fail;
  if ((rc = sbn_layer_sizes(l, &d, &wsb, &svb)) != 0)
    goto fail;
  x = malloc(n * 4);
  y = malloc(n * 4);
  dy = malloc(n * 4);
  dx = malloc(n * 4);
  w = malloc(nw * 4);
  b = malloc(nw * 4);
  dw = malloc(nw * 4);
  db = malloc(nw * 4);
  rm = calloc(nw, 4);
  rv = malloc(nw * 4);
  ws = malloc(wsb + 1);
  sv = malloc(svb + 1);
  tf = malloc(sizeof(double) * (size_t)iters);
  tb = malloc(sizeof(double) * (size_t)iters);
  tm = malloc(sizeof(double) * (size_t)iters);
  if (!x || !y || !dy || !dx || !w || !b || !dw || !db || !rm || !rv || !ws ||
      !sv || !tf || !tb || !tm) {
    rc = SBN_ENOMEM;
    goto fail;
  }
  for (size_t i = 0; i < n; i++) {
    x[i] = (float)((i * 2654435761u) % 1000) * 1e-3f + 5.0f;
    dy[i] = (float)((i * 40503u) % 1000) * 1e-3f - 0.5f;
  }
  for (size_t i = 0; i < nw; i++) {
    w[i] = 1.0f;
    b[i] = 0.0f;
    rv[i] = 1.0f;
  }
  sbn_state_t st = {rm, rv, 0};
  sbn_forward_args_t fa = {
      SBN_MODE_TRAIN, &d, x, y, w, b, &st, 0, ws, wsb, sv, svb};
  sbn_backward_args_t ba = {
      SBN_MODE_TRAIN, &d, x, dy, dx, w, dw, db, 0, ws, wsb, sv, svb};
  /* One warm-up of each so page faults are not timed. */
  memcpy(y, x, n * 4);
  if ((rc = sbn_forward(l, &fa)) != 0)
    goto fail;
  if ((rc = sbn_backward(l, &ba)) != 0)
    goto fail;
  for (int it = 0; it < iters; it++) {
    double t0 = now_s();
    memcpy(y, x, n * 4);
    double t1 = now_s();
    fa.step = ba.step = (uint64_t)it;
    if ((rc = sbn_forward(l, &fa)) != 0)
      goto fail;
    double t2 = now_s();
    if ((rc = sbn_backward(l, &ba)) != 0)
      goto fail;
    double t3 = now_s();
    tm[it] = t1 - t0;
    tf[it] = t2 - t1;
    tb[it] = t3 - t2;
  }
  double mm = median(tm, iters), mf = median(tf, iters), mb = median(tb, iters);
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
  free(x);
  free(y);
  free(dy);
  free(dx);
  free(w);
  free(b);
  free(dw);
  free(db);
  free(rm);
  free(rv);
  free(ws);
  free(sv);
  free(tf);
  free(tb);
  free(tm);
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

int sbn_cli_bench(int argc, char **argv) {
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
  sbn_tensor_desc_t d = {4, {32, 64, 56, 56}, SBN_LAYOUT_NCHW};
  const char *ops = "all", *kern = "auto";
  int iters = 20, sync = 0, group = 0, c, rc = 0, rank = 0;
  optind = 1;
  while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
    char *end;
    switch (c) {
      case 'o':
        ops = optarg;
        break;
      case 's':
        if (parse_dims(optarg, &d) != 0) {
          fprintf(stderr,
                  "syncbn bench: --shape: '%s' is not N,C[,spatial...] "
                  "with positive sizes\n",
                  optarg);
          return 2;
        }
        break;
      case 'l':
        if (strcmp(optarg, "nchw") == 0)
          d.layout = SBN_LAYOUT_NCHW;
        else if (strcmp(optarg, "nhwc") == 0)
          d.layout = SBN_LAYOUT_NHWC;
        else {
          fprintf(stderr, "syncbn bench: --layout: '%s' is not nchw|nhwc\n",
                  optarg);
          return 2;
        }
        break;
      case 'i':
        iters = (int)strtol(optarg, &end, 10);
        if (*end || iters < 1 || iters > 100000) {
          fprintf(stderr, "syncbn bench: --iters: '%s' is not in [1, 1e5]\n",
                  optarg);
          return 2;
        }
        break;
      case 'k':
        kern = optarg;
        break;
      case 'y':
        sync = 1;
        break;
      case 'g':
        group = (int)strtol(optarg, &end, 10);
        if (*end || group < 1) {
          fprintf(stderr,
                  "syncbn bench: --group-size: '%s' is not a "
                  "positive integer\n",
                  optarg);
          return 2;
        }
        break;
      case 'h':
        bench_usage(stdout);
        return 0;
      default:
        bench_usage(stderr);
        return 2;
    }
  }
  if (optind < argc) {
    fprintf(stderr, "syncbn bench: unexpected argument '%s'\n", argv[optind]);
    return 2;
  }
  if (strcmp(kern, "auto") != 0 && (rc = sbn_kernel_select(kern)) != 0) {
    fprintf(stderr, "syncbn bench: --kernels: %s\n", sbn_last_error());
    return 2;
  }
  sbn_op_t one = SBN_OP_BATCHNORM;
  if (strcmp(ops, "all") != 0 && sbn_op_parse(ops, &one) != 0) {
    fprintf(stderr, "syncbn bench: --op: unknown op '%s'\n", ops);
    return 2;
  }
  if (sync) {
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  }
  if (rank == 0)
    printf("kernels %s, shape", sbn_kernel_name());
  for (int i = 0; rank == 0 && i < d.ndim; i++)
    printf("%s%zu", i ? "x" : " ", d.dims[i]);
  if (rank == 0)
    printf(", %d iterations, medians\n", iters);
  for (int op = 0; op <= SBN_OP_DROPOUT && rc == 0; op++) {
    if (strcmp(ops, "all") != 0 && op != (int)one)
      continue;
    if (d.layout == SBN_LAYOUT_NHWC &&
        (op == SBN_OP_LAYERNORM || op == SBN_OP_DROPOUT))
      continue;
    rc = bench_op((sbn_op_t)op, &d, iters, rank);
  }
  if (sync) {
    if (rc == 0)
      rc = bench_sync(d.dims[1], iters * 10, group);
    MPI_Finalize();
  }
  return rc == 0 ? 0 : 1;
}
