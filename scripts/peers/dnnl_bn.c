/* oneDNN's BatchNorm, timed like `syncbn bench kernels` times syncbn's:
 * training forward (scale and shift, batch statistics) and backward (dx,
 * dscale, dshift) in NCHW or NHWC, fp32, median over reps after warm-up.
 * Built and run by scripts/compare_peers.py only when oneDNN is there
 * (Debian: libdnnl-dev), with OMP_NUM_THREADS=1. Not part of the build.
 *
 *   dnnl_bn REPS N,C,H,W,LAYOUT [...]
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

/* Median seconds of reps executions after warm-up (at least 3 and
 * 50 ms, as syncbn's bench warms up). */
static double time_prim(dnnl_primitive_t p, dnnl_stream_t st, int nargs,
                        const dnnl_exec_arg_t *args, int reps) {
  double *t = calloc((size_t)reps, sizeof *t), t0 = now(), med;
  for (int w = 0; w < 3 || now() - t0 < 0.05; w++) {
    CHECK(dnnl_primitive_execute(p, st, nargs, args));
    CHECK(dnnl_stream_wait(st));
  }
  for (int i = 0; i < reps; i++) {
    double s = now();
    CHECK(dnnl_primitive_execute(p, st, nargs, args));
    CHECK(dnnl_stream_wait(st));
    t[i] = now() - s;
  }
  qsort(t, (size_t)reps, sizeof *t, cmp);
  med = t[reps / 2];
  free(t);
  return med;
}

static void one(dnnl_engine_t eng, dnnl_stream_t st, const long d[4], int nhwc,
                int reps) {
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
  dnnl_memory_t src = mem(&md, eng, 1.0f), dst = mem(&md, eng, 0.0f);
  dnnl_memory_t ddst = mem(&md, eng, 0.5f), dsrc = mem(&md, eng, 0.0f);
  dnnl_memory_t mean = mem(&cmd, eng, 0.0f), var = mem(&cmd, eng, 1.0f);
  dnnl_memory_t sc = mem(&cmd, eng, 1.0f), sh = mem(&cmd, eng, 0.0f);
  dnnl_memory_t dsc = mem(&cmd, eng, 0.0f), dsh = mem(&cmd, eng, 0.0f);
  dnnl_exec_arg_t fa[] = {{DNNL_ARG_SRC, src},   {DNNL_ARG_DST, dst},
                          {DNNL_ARG_MEAN, mean}, {DNNL_ARG_VARIANCE, var},
                          {DNNL_ARG_SCALE, sc},  {DNNL_ARG_SHIFT, sh}};
  dnnl_exec_arg_t ba[] = {{DNNL_ARG_SRC, src},       {DNNL_ARG_MEAN, mean},
                          {DNNL_ARG_VARIANCE, var},  {DNNL_ARG_DIFF_DST, ddst},
                          {DNNL_ARG_SCALE, sc},      {DNNL_ARG_SHIFT, sh},
                          {DNNL_ARG_DIFF_SRC, dsrc}, {DNNL_ARG_DIFF_SCALE, dsc},
                          {DNNL_ARG_DIFF_SHIFT, dsh}};
  double tf = time_prim(fwd, st, 6, fa, reps);
  double tb = time_prim(bwd, st, 9, ba, reps);
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
  dnnl_memory_t all[] = {src, dst, ddst, dsrc, mean, var, sc, sh, dsc, dsh};
  for (size_t i = 0; i < sizeof all / sizeof *all; i++)
    dnnl_memory_destroy(all[i]);
  dnnl_primitive_destroy(fwd);
  dnnl_primitive_destroy(bwd);
  dnnl_primitive_desc_destroy(fpd);
  dnnl_primitive_desc_destroy(bpd);
}

int main(int argc, char **argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: dnnl_bn REPS N,C,H,W,nchw|nhwc ...\n");
    return 2;
  }
  int reps = atoi(argv[1]);
  if (reps < 1)
    reps = 1;
  dnnl_engine_t eng;
  dnnl_stream_t st;
  CHECK(dnnl_engine_create(&eng, dnnl_cpu, 0));
  CHECK(dnnl_stream_create(&st, eng, dnnl_stream_default_flags));
  for (int i = 2; i < argc; i++) {
    long d[4];
    char lay[8] = "";
    if (sscanf(argv[i], "%ld,%ld,%ld,%ld,%7s", &d[0], &d[1], &d[2], &d[3],
               lay) != 5) {
      fprintf(stderr, "dnnl_bn: bad shape '%s'\n", argv[i]);
      return 2;
    }
    one(eng, st, d, strcmp(lay, "nhwc") == 0, reps);
  }
  dnnl_stream_destroy(st);
  dnnl_engine_destroy(eng);
  return 0;
}
