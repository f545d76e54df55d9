/* `syncbn bench`: clocks, quantiles, the maximum over ranks of each rep,
 * and the fixed data and shapes every mode shares. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cli_bench.h"

/* ResNet-50's BatchNorm shapes (C, H, W), one per distinct layer shape of
 * the list. */
const size_t sbn__bench_resnet_shapes[9][3] = {
    {64, 112, 112}, {64, 56, 56},   {256, 56, 56}, {128, 28, 28}, {512, 28, 28},
    {256, 14, 14},  {1024, 14, 14}, {512, 7, 7},   {2048, 7, 7}};

/* The 53 BatchNorm layers of torchvision's ResNet-50 (v1.5: the stride is
 * in each first block's 3x3 convolution, so its first BatchNorm still sees
 * the previous stage's resolution), in forward order: the stem, then per
 * bottleneck bn1, bn2, bn3 and, in each stage's first block, the
 * downsample's BatchNorm. */
const size_t sbn__bench_resnet_layers[53][3] = {{64, 112, 112},
                                                /* layer1: 3 blocks at 56x56 */
                                                {64, 56, 56},
                                                {64, 56, 56},
                                                {256, 56, 56},
                                                {256, 56, 56},
                                                {64, 56, 56},
                                                {64, 56, 56},
                                                {256, 56, 56},
                                                {64, 56, 56},
                                                {64, 56, 56},
                                                {256, 56, 56},
                                                /* layer2: 4 blocks, 56 -> 28 */
                                                {128, 56, 56},
                                                {128, 28, 28},
                                                {512, 28, 28},
                                                {512, 28, 28},
                                                {128, 28, 28},
                                                {128, 28, 28},
                                                {512, 28, 28},
                                                {128, 28, 28},
                                                {128, 28, 28},
                                                {512, 28, 28},
                                                {128, 28, 28},
                                                {128, 28, 28},
                                                {512, 28, 28},
                                                /* layer3: 6 blocks, 28 -> 14 */
                                                {256, 28, 28},
                                                {256, 14, 14},
                                                {1024, 14, 14},
                                                {1024, 14, 14},
                                                {256, 14, 14},
                                                {256, 14, 14},
                                                {1024, 14, 14},
                                                {256, 14, 14},
                                                {256, 14, 14},
                                                {1024, 14, 14},
                                                {256, 14, 14},
                                                {256, 14, 14},
                                                {1024, 14, 14},
                                                {256, 14, 14},
                                                {256, 14, 14},
                                                {1024, 14, 14},
                                                {256, 14, 14},
                                                {256, 14, 14},
                                                {1024, 14, 14},
                                                /* layer4: 3 blocks, 14 -> 7 */
                                                {512, 14, 14},
                                                {512, 7, 7},
                                                {2048, 7, 7},
                                                {2048, 7, 7},
                                                {512, 7, 7},
                                                {512, 7, 7},
                                                {2048, 7, 7},
                                                {512, 7, 7},
                                                {512, 7, 7},
                                                {2048, 7, 7}};

double sbn__bench_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int sbn__bench_warm_done(double t0, int w, int warmup) {
  int init = 0;
  double el = sbn__bench_now() - t0;
  if (w < warmup)
    return 0;
  MPI_Initialized(&init);
  if (init)
    MPI_Allreduce(MPI_IN_PLACE, &el, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return el >= SBN__BENCH_MIN_WARM_S;
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

/* The p-quantile of sorted v by linear interpolation between closest
 * ranks (numpy's default), so that the plot script and a reader agree. */
static double quantile(const double *v, int n, double p) {
  double pos = p * (double)(n - 1);
  int lo = (int)floor(pos);
  int hi = lo + 1 < n ? lo + 1 : lo;
  return v[lo] + (pos - (double)lo) * (v[hi] - v[lo]);
}

void sbn__bench_quantiles(double *v, int n, double *median, double *p90) {
  if (n <= 0) {
    *median = *p90 = NAN;
    return;
  }
  qsort(v, (size_t)n, sizeof *v, cmp_double);
  *median = quantile(v, n, 0.5);
  *p90 = quantile(v, n, 0.9);
}

int sbn__bench_max_over_ranks(MPI_Comm comm, double *v, int n) {
  if (comm == MPI_COMM_NULL)
    return 0;
  int err = MPI_Allreduce(MPI_IN_PLACE, v, n, MPI_DOUBLE, MPI_MAX, comm);
  if (err != MPI_SUCCESS)
    return sbn_set_error(SBN_ECOMM, "bench: MPI_Allreduce(MAX) of %d reps", n);
  return 0;
}

int sbn__bench_quiet_barrier(void) {
  MPI_Request req;
  int done = 0;
  if (MPI_Ibarrier(MPI_COMM_WORLD, &req) != MPI_SUCCESS)
    return sbn_set_error(SBN_ECOMM, "bench: MPI_Ibarrier");
  while (!done) {
    if (MPI_Test(&req, &done, MPI_STATUS_IGNORE) != MPI_SUCCESS)
      return sbn_set_error(SBN_ECOMM, "bench: MPI_Test of a barrier");
    if (!done) {
      struct timespec ts = {0, 50000};
      nanosleep(&ts, NULL);
    }
  }
  /* The sleeping barrier releases the ranks up to a sleep apart (50 us
   * and the timer's slack), and a timed call that starts skewed charges
   * the skew to whichever rank waits for the other: a bare allreduce of a
   * few records then reads ~100 us instead of ~2. A spinning barrier
   * from there aligns the ranks to its own release latency; it spins at
   * most that skew, while every worker is idle. */
  if (MPI_Barrier(MPI_COMM_WORLD) != MPI_SUCCESS)
    return sbn_set_error(SBN_ECOMM, "bench: MPI_Barrier");
  return 0;
}

void sbn__bench_set_times(sbn_bench_rec_t *r, double *t, int n) {
  double m, p;
  sbn__bench_quantiles(t, n, &m, &p);
  r->median_us = m * 1e6;
  r->p90_us = p * 1e6;
  r->best_us = n > 0 ? t[0] * 1e6 : NAN; /* t is sorted now */
}

void sbn__bench_shape_str(const sbn_tensor_desc_t *d, char *buf, size_t n) {
  size_t at = 0;
  buf[0] = '\0';
  for (int i = 0; i < d->ndim && at < n; i++)
    at += (size_t)snprintf(buf + at, n - at, "%s%zu", i ? "x" : "", d->dims[i]);
}

void sbn__bench_progress(const sbn_bench_opts_t *o, const char *what,
                         const sbn_bench_rec_t *r) {
  char s[64];
  if (!o->progress || o->rank != 0)
    return;
  sbn__bench_shape_str(&r->shape, s, sizeof s);
  fprintf(stderr, "\r\033[Kbench %s: %s %s %s %s %s", r->mode, what, r->op,
          r->pass, r->layout, s);
  fflush(stderr);
}

size_t sbn__bench_numel(const sbn_tensor_desc_t *d) {
  size_t n = 1;
  for (int i = 0; i < d->ndim; i++)
    n *= d->dims[i];
  return n;
}

void sbn__bench_fill(float *v, size_t n, unsigned salt) {
  for (size_t i = 0; i < n; i++)
    v[i] = (float)(((i + salt) * 2654435761u) % 1000) * 1e-3f - 0.5f +
           (float)(salt % 7);
}

int sbn__bench_copies(size_t bytes, int rotate_mib) {
  /* 64 MiB is above the last-level cache of the AMD EPYC this was made on
   * (32 MiB per CCD); a tensor that large is its own rotation. A larger
   * L3 keeps 64 MiB of copies (the Intel virtual machine's 260 MiB:
   * a memcpy of 6 MB ran twice as fast as from memory), so there
   * --rotate-mib measures from memory. */
  const size_t target =
      (size_t)(rotate_mib > 0 ? rotate_mib : SBN_BENCH_ROTATE_MIB) << 20;
  size_t k = bytes == 0 ? 1 : (target + bytes - 1) / bytes;
  return k < 1 ? 1 : (k > 4096 ? 4096 : (int)k);
}

/* n floats at a 64-byte boundary (freed with free). */
static float *bench_lines(size_t n) {
  return aligned_alloc(64, ((n > 0 ? n : 1) * 4 + 63) & ~(size_t)63);
}

int sbn__bench_bufs_alloc(sbn_bench_bufs_t *u, const sbn_bench_opts_t *o,
                          const sbn_tensor_desc_t *d,
                          const sbn_layer_t *layer) {
  memset(u, 0, sizeof *u);
  u->n = sbn__bench_numel(d);
  u->c = d->dims[1];
  u->stride = (u->n + 15) & ~(size_t)15;
  u->copies = sbn__bench_copies(u->n * 4 * 4, o->rotate_mib);
  size_t all = u->stride * (size_t)u->copies;
  u->x = bench_lines(all);
  u->y = bench_lines(all);
  u->dy = bench_lines(all);
  u->dx = bench_lines(all);
  u->w = malloc(u->c * 4);
  u->b = calloc(u->c, 4);
  u->dw = malloc(u->c * 4);
  u->db = malloc(u->c * 4);
  u->rm = calloc(u->c, 4);
  u->rv = malloc(u->c * 4);
  if (!u->x || !u->y || !u->dy || !u->dx || !u->w || !u->b || !u->dw ||
      !u->db || !u->rm || !u->rv)
    return sbn_set_error(SBN_ENOMEM, "bench: out of memory for 4 x %zu bytes",
                         all * 4);
  sbn__bench_fill(u->x, all, 1);
  sbn__bench_fill(u->dy, all, 2);
  /* Touch the outputs once so that page faults are not timed. */
  memset(u->y, 0, all * 4);
  memset(u->dx, 0, all * 4);
  for (size_t i = 0; i < u->c; i++)
    u->w[i] = u->rv[i] = 1.0f;
  return layer == NULL ? 0 : sbn__bench_bufs_fit(u, d, layer);
}

int sbn__bench_bufs_fit(sbn_bench_bufs_t *u, const sbn_tensor_desc_t *d,
                        const sbn_layer_t *layer) {
  size_t wsb = 0, svb = 0;
  int rc = sbn_layer_sizes(layer, d, &wsb, &svb);
  if (rc != 0)
    return rc;
  if (wsb > u->ws_bytes) {
    free(u->ws);
    if ((u->ws = malloc(wsb)) == NULL)
      return sbn_set_error(SBN_ENOMEM, "bench: out of memory for workspace");
    memset(u->ws, 0, wsb);
    u->ws_bytes = wsb;
  }
  if (svb > u->saved_bytes) {
    free(u->saved);
    if ((u->saved = malloc(svb)) == NULL)
      return sbn_set_error(SBN_ENOMEM, "bench: out of memory for saved state");
    memset(u->saved, 0, svb);
    u->saved_bytes = svb;
  }
  return 0;
}

void sbn__bench_bufs_free(sbn_bench_bufs_t *u) {
  free(u->x);
  free(u->y);
  free(u->dy);
  free(u->dx);
  free(u->w);
  free(u->b);
  free(u->dw);
  free(u->db);
  free(u->rm);
  free(u->rv);
  free(u->ws);
  free(u->saved);
  memset(u, 0, sizeof *u);
}

int sbn__bench_fwd(sbn_layer_t *layer, const sbn_tensor_desc_t *d,
                   sbn_bench_bufs_t *u, int k, uint64_t step) {
  size_t at = (size_t)k * u->stride;
  sbn_state_t st = {u->rm, u->rv, 0};
  sbn_forward_args_t fa = {
      SBN_MODE_TRAIN, d,     u->x + at,   u->y + at, u->w,          u->b, &st,
      step,           u->ws, u->ws_bytes, u->saved,  u->saved_bytes};
  return sbn_forward(layer, &fa);
}

int sbn__bench_bwd(sbn_layer_t *layer, const sbn_tensor_desc_t *d,
                   sbn_bench_bufs_t *u, int k, uint64_t step) {
  size_t at = (size_t)k * u->stride;
  sbn_backward_args_t ba = {SBN_MODE_TRAIN, d,     u->x + at,   u->dy + at,
                            u->dx + at,     u->w,  u->dw,       u->db,
                            step,           u->ws, u->ws_bytes, u->saved,
                            u->saved_bytes};
  return sbn_backward(layer, &ba);
}

int sbn__bench_fwd_bwd(sbn_layer_t *layer, const sbn_tensor_desc_t *d,
                       sbn_bench_bufs_t *u, int k, uint64_t step) {
  int rc = sbn__bench_fwd(layer, d, u, k, step);
  return rc != 0 ? rc : sbn__bench_bwd(layer, d, u, k, step);
}
