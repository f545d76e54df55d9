/* Two builds of libsyncbn timed in one process as a network uses a
 * BatchNorm layer: a producer writes the layer's input (x, and dy for the
 * backward) as the previous layer would, the layer runs, and a consumer
 * reads its output (y or dx) right after, as the next layer would. The
 * two builds alternate call by call on rotating copies over 64 MiB, so
 * that a loaded machine slows both alike. `syncbn bench kernels` times
 * the layer alone on cold tensors, where an output streamed past the
 * caches costs nothing later; here the consumer pays for it. Not built
 * by CMake; a measurement tool (README, "On the Intel virtual machine
 * (2026-12-03)"):
 *
 *   gcc -O2 -mavx512f -o /tmp/bn_consume_ab scripts/bn_consume_ab.c -Isrc -ldl
 *   /tmp/bn_consume_ab fwd 8 256 14 14 A/build/lib/libsyncbn.so \
 *     B/build/lib/libsyncbn.so
 *
 * prints, per build, the median µs of the layer, of the consumer's read
 * and of both, and A's total over B's (REPS=n sets the repetitions, 60
 * by default). */
#include <immintrin.h>
#include <string.h>

#include "ab_lib.h"

/* The next layer's read of the output: every line once. */
__attribute__((noinline, target("avx512f"))) static float consume(
    const float *y, size_t n) {
  __m512 s = _mm512_setzero_ps();
  size_t i = 0;
  for (; i + 16 <= n; i += 16)
    s = _mm512_add_ps(s, _mm512_loadu_ps(y + i));
  float t = _mm512_reduce_add_ps(s);
  for (; i < n; i++)
    t += y[i];
  return t;
}

/* The previous layer's write of the input. */
__attribute__((noinline)) static void produce(float *x, size_t n, float v) {
  for (size_t i = 0; i < n; i++)
    x[i] = v + (float)(i & 255) * 0.01f;
}

int main(int argc, char **argv) {
  if (argc != 8 || (strcmp(argv[1], "fwd") != 0 && strcmp(argv[1], "bwd"))) {
    fprintf(stderr, "usage: %s fwd|bwd N C H W libA.so libB.so\n", argv[0]);
    return 1;
  }
  int bwd = strcmp(argv[1], "bwd") == 0;
  size_t N = strtoul(argv[2], NULL, 10), C = strtoul(argv[3], NULL, 10);
  size_t H = strtoul(argv[4], NULL, 10), W = strtoul(argv[5], NULL, 10);
  int reps = getenv("REPS") ? atoi(getenv("REPS")) : 60;
  if (N == 0 || C == 0 || H == 0 || W == 0 || reps < 1) {
    fprintf(stderr, "bn_consume_ab: N, C, H, W and REPS must be positive\n");
    return 1;
  }
  sbn_tensor_desc_t d = {4, {N, C, H, W}, SBN_LAYOUT_NCHW};
  lib_t L[2];
  for (int k = 0; k < 2; k++) {
    if (ab_lib_open(argv[6 + k], &L[k]) != 0)
      return 1;
    sbn_layer_params_t p;
    L[k].pd(&p, SBN_OP_BATCHNORM);
    p.channels = C;
    if (L[k].cr(&p, NULL, &L[k].l) != 0 ||
        L[k].sz(L[k].l, &d, &L[k].wsb, &L[k].svb) != 0) {
      fprintf(stderr, "bn_consume_ab: %s\n", L[k].err());
      return 1;
    }
    L[k].ws = aligned_alloc(64, (L[k].wsb + 63) / 64 * 64 + 64);
    L[k].sv = aligned_alloc(64, (L[k].svb + 63) / 64 * 64 + 64);
  }
  if (L[0].fw == L[1].fw) {
    fprintf(stderr, "bn_consume_ab: A and B are the same library\n");
    return 1;
  }
  size_t n = N * C * H * W, bytes = n * sizeof(float);
  int NC = (int)(64e6 / (double)(bytes * 3)) + 3;
  if (NC > 40)
    NC = 40;
  float *x = aligned_alloc(64, bytes * NC), *y = aligned_alloc(64, bytes * NC);
  float *dy = aligned_alloc(64, bytes * NC);
  float *w = malloc(C * 4), *b = calloc(C, 4), *dw = malloc(C * 4);
  float *db = malloc(C * 4), *rm = calloc(C, 4), *rv = malloc(C * 4);
  double *t = calloc(4 * (size_t)reps, sizeof *t);
  if (!x || !y || !dy || !w || !b || !dw || !db || !rm || !rv || !t) {
    fprintf(stderr, "bn_consume_ab: out of memory\n");
    return 1;
  }
  for (size_t i = 0; i < C; i++)
    w[i] = 1, rv[i] = 1;
  memset(y, 0, bytes * NC);
  produce(x, n * NC, 1.0f);
  produce(dy, n * NC, -0.5f);
  sbn_state_t st = {rm, rv, 0};
  /* Each build's saved state, for its backward. */
  for (int k = 0; k < 2; k++) {
    sbn_forward_args_t fa = {
        SBN_MODE_TRAIN, &d,       x,       y,       w, b, &st, 0,
        L[k].ws,        L[k].wsb, L[k].sv, L[k].svb};
    if (L[k].fw(L[k].l, &fa) != 0) {
      fprintf(stderr, "bn_consume_ab: %s\n", L[k].err());
      return 1;
    }
  }
  int c = 0;
  float sink = 0;
  for (int it = -3; it < reps; it++)
    for (int v = 0; v < 2; v++) {
      int k = (it & 1) ? 1 - v : v;
      size_t at = (size_t)c * n;
      c = (c + 1) % NC;
      produce(x + at, n, (float)(it & 7));
      if (bwd)
        produce(dy + at, n, -0.5f);
      lib_t *q = &L[k];
      int rc;
      double t0 = ab_now();
      if (bwd) {
        sbn_backward_args_t ba = {
            SBN_MODE_TRAIN, &d,     x + at, dy + at, y + at, w, dw, db, 0,
            q->ws,          q->wsb, q->sv,  q->svb};
        rc = q->bw(q->l, &ba);
      } else {
        sbn_forward_args_t fa = {
            SBN_MODE_TRAIN, &d,     x + at, y + at, w, b, &st, 0,
            q->ws,          q->wsb, q->sv,  q->svb};
        rc = q->fw(q->l, &fa);
      }
      double t1 = ab_now();
      sink += consume(y + at, n);
      double t2 = ab_now();
      if (rc != 0) {
        fprintf(stderr, "bn_consume_ab: %s\n", q->err());
        return 1;
      }
      if (it >= 0) {
        t[(size_t)(2 * k) * reps + it] = t1 - t0;
        t[(size_t)(2 * k + 1) * reps + it] = t2 - t1;
      }
    }
  double m[4];
  for (int i = 0; i < 4; i++)
    m[i] = ab_med(t + (size_t)i * reps, reps);
  printf(
      "%s %zux%zux%zux%zu  A: layer %.1f read %.1f total %.1f us  "
      "B: layer %.1f read %.1f total %.1f us  A/B total %.3f%s\n",
      bwd ? "bwd" : "fwd", N, C, H, W, m[0], m[1], m[0] + m[1], m[2], m[3],
      m[2] + m[3], (m[0] + m[1]) / (m[2] + m[3]), sink == 1e30f ? " " : "");
  return 0;
}
