/* Two builds of libsyncbn timed in one process: LayerNorm forward or
 * backward of R rows of D, the two builds and a floor (memcpy, or dx = x +
 * dy) alternating call by call on rotating copies over 64 MiB, so that a
 * loaded machine slows both alike. Buffers as `syncbn bench kernels` has
 * them (malloc, weight 1, bias from calloc). Not built by CMake; a
 * measurement tool (README, "LayerNorm: pipelined sweeps"):
 *
 *   gcc -O2 -march=native -o /tmp/ln_ab scripts/ln_ab.c -Isrc -ldl
 *   /tmp/ln_ab fwd 8 200704 /tmp/lnbase/build/lib/libsyncbn.so \
 *     build/lib/libsyncbn.so
 *
 * prints each build's median time over the floor's and A's time over
 * B's (REPS=n sets the repetitions, 40 by default). */
#include <string.h>

#include "ab_lib.h"

__attribute__((noinline)) static void add2(const float *a, const float *b,
                                           float *c, size_t n) {
  for (size_t i = 0; i < n; i++)
    c[i] = a[i] + b[i];
}
int main(int argc, char **argv) {
  int bwd = !strcmp(argv[1], "bwd");
  size_t N = atol(argv[2]), D = atol(argv[3]);
  int reps = getenv("REPS") ? atoi(getenv("REPS")) : 40;
  lib_t L[2];
  sbn_tensor_desc_t d = {2, {N, D}, SBN_LAYOUT_NCHW};
  for (int k = 0; k < 2; k++) {
    if (ab_lib_open(argv[4 + k], &L[k]) != 0)
      return 1;
    sbn_layer_params_t p;
    L[k].pd(&p, SBN_OP_LAYERNORM);
    p.norm_ndim = 1;
    p.norm_shape[0] = D;
    if (L[k].cr(&p, NULL, &L[k].l))
      return 2;
    L[k].sz(L[k].l, &d, &L[k].wsb, &L[k].svb);
    L[k].ws = aligned_alloc(64, (L[k].wsb + 63) / 64 * 64 + 64);
    L[k].sv = aligned_alloc(64, (L[k].svb + 63) / 64 * 64 + 64);
  }
  if (L[0].fw == L[1].fw) {
    puts("same lib!");
    return 3;
  }
  size_t n = N * D;
  int NC = (int)(64e6 / (n * 16)) + 3;
  if (NC > 40)
    NC = 40;
  float *x = malloc(n * 4 * NC + 64), *y = malloc(n * 4 * NC + 64),
        *dy = malloc(n * 4 * NC + 64);
  float *w = malloc(D * 4), *b = calloc(D, 4), *dw = malloc(D * 4),
        *db = malloc(D * 4);
  srand(1);
  for (size_t i = 0; i < n * NC; i++) {
    x[i] = (float)rand() / RAND_MAX * 2 - 1 + 3.f;
    dy[i] = (float)rand() / RAND_MAX - 0.5f;
    y[i] = 0;
  }
  for (size_t i = 0; i < D; i++)
    w[i] = 1;
  double *t = calloc(3 * (size_t)reps, 8);
  int c = 0;
  for (int k = 0; k < 2; k++) {
    sbn_forward_args_t fa = {
        SBN_MODE_TRAIN, &d, x,       y,        w,       b,
        NULL,           0,  L[k].ws, L[k].wsb, L[k].sv, L[k].svb};
    L[k].fw(L[k].l, &fa);
  }
  for (int it = -3; it < reps; it++)
    for (int v = 0; v < 3; v++) {
      int vv = (it & 1) ? 2 - v : v;
      size_t at = (size_t)c * n;
      c = (c + 1) % NC;
      double t0 = ab_now();
      if (vv == 2) {
        if (bwd)
          add2(x + at, dy + at, y + at, n);
        else
          memcpy(y + at, x + at, n * 4);
      } else {
        lib_t *q = &L[vv];
        sbn_forward_args_t fa = {
            SBN_MODE_TRAIN, &d, x + at, y + at, w,     b,
            NULL,           0,  q->ws,  q->wsb, q->sv, q->svb};
        sbn_backward_args_t ba = {
            SBN_MODE_TRAIN, &d,     x + at, dy + at, y + at, w, dw, db, 0,
            q->ws,          q->wsb, q->sv,  q->svb};
        if (bwd)
          q->bw(q->l, &ba);
        else
          q->fw(q->l, &fa);
      }
      double t1 = ab_now();
      if (it >= 0)
        t[(size_t)vv * reps + it] = t1 - t0;
    }
  double f = ab_med(t + 2 * (size_t)reps, reps), a = ab_med(t, reps),
         bb = ab_med(t + (size_t)reps, reps);
  printf("%s %zux%zu floor %.1f us: A %.3f B %.3f  A/B time %.3f\n",
         bwd ? "bwd" : "fwd", N, D, f, a / f, bb / f, a / bb);
  return 0;
}
