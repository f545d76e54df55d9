/* oneDNN's BatchNorm, timed like `syncbn bench kernels` times syncbn's:
 * training forward (scale and shift, batch statistics) and backward (dx,
 * dscale, dshift) in NCHW or NHWC, fp32, median over reps after warm-up.
 * As in the bench (mpi/cli/cli_bench_kernels.c), every rep runs on the next
 * of `copies` copies of src, dst, diff_dst and diff_src, with the floor
 * kernel (a memcpy for the forward, dx = x + dy for the backward) run on
 * the copy between, so that the copies together pass 64 MiB, more than the
 * 32 MiB L3, and each rep starts from memory, not from cache.
 * Built and run by scripts/compare_peers.py only when oneDNN is there
 * (Debian: libdnnl-dev), with OMP_NUM_THREADS=1. Not part of the build.
 *
 *   dnnl_bn REPS [--warm] [--rotate-mib M] N,C,H,W,LAYOUT [...]
 * (--warm: one copy, the same tensors every rep, warm in cache below
 * 32 MB; compare_peers.py --warm. --rotate-mib: the copies add up to M
 * MiB instead of 64, as the bench's option)
 * prints one JSON object per shape and pass:
 *   {"op": "batchnorm", "pass": "train_fwd", "layout": "nchw",
 *    "shape": [N, C, H, W], "median_us": ...} */
#include <dnnl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define CHECK(call)                                                 \
  do {                                                              \
    dnnl_status_t s_ = (call);                                      \
    if (s_ != dnnl_success) {                                       \
      fprintf(stderr, "dnnl_bn: %s failed (%d)\n", #call, (int)s_); \
      exit(1);                                                      \
    }                                                               \
  } while (0)

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static int cmp(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

static dnnl_memory_t mem(const dnnl_memory_desc_t *md, dnnl_engine_t eng,
                         float fill) {
  dnnl_memory_t m;
  CHECK(dnnl_memory_create(&m, md, eng, DNNL_MEMORY_ALLOCATE));
  void *p = NULL;
  CHECK(dnnl_memory_get_data_handle(m, &p));
  size_t n = dnnl_memory_desc_get_size(md) / sizeof(float);
  for (size_t i = 0; i < n; i++)
    ((float *)p)[i] = fill + (float)(i % 97) * 0.01f;
  return m;
}

/* The copies `syncbn bench kernels` rotates through for a tensor of n
 * floats (sbn__bench_copies of its four buffers): together rotate_mib
 * MiB. */
static int copies_of(size_t n, int rotate_mib) {
  const size_t target = (size_t)rotate_mib << 20, bytes = n * 16;
  size_t k = (target + bytes - 1) / bytes;
  return k < 1 ? 1 : (k > 4096 ? 4096 : (int)k);
}

static float *data(dnnl_memory_t m) {
  void *p = NULL;
  CHECK(dnnl_memory_get_data_handle(m, &p));
  return p;
}

/* One copy's tensors and the execution arguments that name them. */
typedef struct copy_s {
  dnnl_memory_t src, dst, ddst, dsrc;
  dnnl_exec_arg_t fa[6], ba[9];
} copy_t;

/* The floor the bench times beside the pass: a memcpy of x for the
 * forward, dx = x + dy for the backward. */
static void floor_op(copy_t *c, size_t n, int backward) {
  float *x = data(c->src);
  if (!backward) {
    memcpy(data(c->dst), x, n * sizeof(float));
    return;
  }
  float *dy = data(c->ddst), *dx = data(c->dsrc);
  for (size_t i = 0; i < n; i++)
    dx[i] = x[i] + dy[i];
}

/* Median seconds of reps executions after warm-up (at least 3 and 50 ms),
 * each on the next copy with the floor on the copy before it, as the
 * bench alternates them. */
static double time_prim(dnnl_primitive_t p, dnnl_stream_t st, copy_t *cs,
                        int copies, size_t n, int backward, int reps) {
  double *t = calloc((size_t)reps, sizeof *t), t0 = now(), med;
  int c = 0;
  for (int i = -1; i < reps; i++) {
    for (int w = 0; i < 0 && (w < 3 || now() - t0 < 0.05); w++) {
      floor_op(&cs[c], n, backward);
      c = (c + 1) % copies;
      CHECK(dnnl_primitive_execute(p, st, backward ? 9 : 6,
                                   backward ? cs[c].ba : cs[c].fa));
      CHECK(dnnl_stream_wait(st));
      c = (c + 1) % copies;
    }
    if (i < 0)
      continue;
    floor_op(&cs[c], n, backward);
    c = (c + 1) % copies;
    double s = now();
    CHECK(dnnl_primitive_execute(p, st, backward ? 9 : 6,
                                 backward ? cs[c].ba : cs[c].fa));
    CHECK(dnnl_stream_wait(st));
    t[i] = now() - s;
    c = (c + 1) % copies;
  }
  qsort(t, (size_t)reps, sizeof *t, cmp);
  med = t[reps / 2];
  free(t);
  return med;
}

static void one(dnnl_engine_t eng, dnnl_stream_t st, const long d[4], int nhwc,
                int reps, int warm, int rotate_mib) {
  dnnl_dims_t dims = {d[0], d[1], d[2], d[3]}, cdims = {d[1]};
  dnnl_memory_desc_t md, cmd;
  unsigned flags = dnnl_use_scale | dnnl_use_shift;
  CHECK(dnnl_memory_desc_init_by_tag(&md, 4, dims, dnnl_f32,
                                     nhwc ? dnnl_nhwc : dnnl_nchw));
  CHECK(dnnl_memory_desc_init_by_tag(&cmd, 1, cdims, dnnl_f32, dnnl_a));
  dnnl_batch_normalization_desc_t fd, bd;
  CHECK(dnnl_batch_normalization_forward_desc_init(&fd, dnnl_forward_training,
                                                   &md, 1e-5f, flags));
  CHECK(dnnl_batch_normalization_backward_desc_init(&bd, dnnl_backward, &md,
                                                    &md, 1e-5f, flags));
  dnnl_primitive_desc_t fpd, bpd;
  CHECK(dnnl_primitive_desc_create(&fpd, &fd, NULL, eng, NULL));
  CHECK(dnnl_primitive_desc_create(&bpd, &bd, NULL, eng, fpd));
  dnnl_primitive_t fwd, bwd;
  CHECK(dnnl_primitive_create(&fwd, fpd));
  CHECK(dnnl_primitive_create(&bwd, bpd));
  size_t n = (size_t)(d[0] * d[1] * d[2] * d[3]);
  int copies = warm ? 1 : copies_of(n, rotate_mib);
  copy_t *cs = calloc((size_t)copies, sizeof *cs);
  if (cs == NULL) {
    fprintf(stderr, "dnnl_bn: out of memory for %d copies\n", copies);
    exit(1);
  }
  dnnl_memory_t mean = mem(&cmd, eng, 0.0f), var = mem(&cmd, eng, 1.0f);
  dnnl_memory_t sc = mem(&cmd, eng, 1.0f), sh = mem(&cmd, eng, 0.0f);
  dnnl_memory_t dsc = mem(&cmd, eng, 0.0f), dsh = mem(&cmd, eng, 0.0f);
  for (int k = 0; k < copies; k++) {
    copy_t *c = &cs[k];
    c->src = mem(&md, eng, 1.0f);
    c->dst = mem(&md, eng, 0.0f);
    c->ddst = mem(&md, eng, 0.5f);
    c->dsrc = mem(&md, eng, 0.0f);
    dnnl_exec_arg_t fa[] = {{DNNL_ARG_SRC, c->src}, {DNNL_ARG_DST, c->dst},
                            {DNNL_ARG_MEAN, mean},  {DNNL_ARG_VARIANCE, var},
                            {DNNL_ARG_SCALE, sc},   {DNNL_ARG_SHIFT, sh}};
    dnnl_exec_arg_t ba[] = {
        {DNNL_ARG_SRC, c->src},       {DNNL_ARG_MEAN, mean},
        {DNNL_ARG_VARIANCE, var},     {DNNL_ARG_DIFF_DST, c->ddst},
        {DNNL_ARG_SCALE, sc},         {DNNL_ARG_SHIFT, sh},
        {DNNL_ARG_DIFF_SRC, c->dsrc}, {DNNL_ARG_DIFF_SCALE, dsc},
        {DNNL_ARG_DIFF_SHIFT, dsh}};
    memcpy(c->fa, fa, sizeof fa);
    memcpy(c->ba, ba, sizeof ba);
  }
  /* The backward's statistics: one forward, as the bench's warm-up gives
   * syncbn's backward its saved state. */
  CHECK(dnnl_primitive_execute(fwd, st, 6, cs[0].fa));
  CHECK(dnnl_stream_wait(st));
  double tf = time_prim(fwd, st, cs, copies, n, 0, reps);
  double tb = time_prim(bwd, st, cs, copies, n, 1, reps);
  const char *lay = nhwc ? "nhwc" : "nchw";
  printf(
      "{\"op\": \"batchnorm\", \"pass\": \"train_fwd\", \"layout\": \"%s\", "
      "\"shape\": [%ld, %ld, %ld, %ld], \"median_us\": %.3f}\n",
      lay, d[0], d[1], d[2], d[3], tf * 1e6);
  printf(
      "{\"op\": \"batchnorm\", \"pass\": \"train_bwd\", \"layout\": \"%s\", "
      "\"shape\": [%ld, %ld, %ld, %ld], \"median_us\": %.3f}\n",
      lay, d[0], d[1], d[2], d[3], tb * 1e6);
  fflush(stdout);
  for (int k = 0; k < copies; k++) {
    dnnl_memory_destroy(cs[k].src);
    dnnl_memory_destroy(cs[k].dst);
    dnnl_memory_destroy(cs[k].ddst);
    dnnl_memory_destroy(cs[k].dsrc);
  }
  free(cs);
  dnnl_memory_t all[] = {mean, var, sc, sh, dsc, dsh};
  for (size_t i = 0; i < sizeof all / sizeof *all; i++)
    dnnl_memory_destroy(all[i]);
  dnnl_primitive_destroy(fwd);
  dnnl_primitive_destroy(bwd);
  dnnl_primitive_desc_destroy(fpd);
  dnnl_primitive_desc_destroy(bpd);
}

int main(int argc, char **argv) {
  if (argc < 3) {
    fprintf(stderr,
            "usage: dnnl_bn REPS [--warm] [--rotate-mib M] "
            "N,C,H,W,nchw|nhwc ...\n");
    return 2;
  }
  int reps = atoi(argv[1]);
  if (reps < 1)
    reps = 1;
  dnnl_engine_t eng;
  dnnl_stream_t st;
  CHECK(dnnl_engine_create(&eng, dnnl_cpu, 0));
  CHECK(dnnl_stream_create(&st, eng, dnnl_stream_default_flags));
  int warm = 0, rotate_mib = 64;
  for (int i = 2; i < argc; i++) {
    if (strcmp(argv[i], "--warm") == 0) {
      warm = 1;
      continue;
    }
    if (strcmp(argv[i], "--rotate-mib") == 0) {
      rotate_mib = i + 1 < argc ? atoi(argv[++i]) : 0;
      if (rotate_mib < 1 || rotate_mib > 65536) {
        fprintf(stderr, "dnnl_bn: --rotate-mib: expected 1 .. 65536\n");
        return 2;
      }
      continue;
    }
    long d[4];
    char lay[8] = "";
    if (sscanf(argv[i], "%ld,%ld,%ld,%ld,%7s", &d[0], &d[1], &d[2], &d[3],
               lay) != 5) {
      fprintf(stderr, "dnnl_bn: bad shape '%s'\n", argv[i]);
      return 2;
    }
    one(eng, st, d, strcmp(lay, "nhwc") == 0, reps, warm, rotate_mib);
  }
  dnnl_stream_destroy(st);
  dnnl_engine_destroy(eng);
  return 0;
}
