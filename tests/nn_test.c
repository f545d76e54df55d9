/* The trainer's layers (src/nn) against float64 references written
 * directly from their definitions, and their gradients against central
 * finite differences of the float forward. Each test takes the scalar
 * loss L = sum(r * y) for a fixed random r, so dL/dy = r. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "nn/sbn_nn.h"
#include "testutil.h"

/* Float kernels against float64 references: BLAS sums in another order. */
#define TOL 1e-5
/* Finite differences of float forwards: step and relative tolerance. */
#define FD_H 1e-2
#define FD_TOL 2e-3

static double dot(const float *a, const double *r, size_t n) {
  double s = 0;
  for (size_t i = 0; i < n; i++)
    s += (double)a[i] * r[i];
  return s;
}

/* The forward under test: writes y from the (perturbed) input. */
typedef void (*fwd_t)(void *ctx, const float *x, float *y);

/* Checks grad (dL/dx) at a few entries of x by central differences of
 * L = sum(r * forward(x)). */
static void fd_check(fwd_t f, void *ctx, float *x, size_t nx, size_t ny,
                     const double *r, const float *grad) {
  float *y = tu_floats(ny);
  size_t stride = nx > 16 ? nx / 16 : 1;
  for (size_t i = 0; i < nx; i += stride) {
    float keep = x[i];
    x[i] = keep + (float)FD_H;
    f(ctx, x, y);
    double lp = dot(y, r, ny);
    x[i] = keep - (float)FD_H;
    f(ctx, x, y);
    double lm = dot(y, r, ny);
    x[i] = keep;
    double fd = (lp - lm) / (2 * FD_H);
    assert_true(fabs(fd - grad[i]) <= FD_TOL * (1 + fabs(fd)));
  }
  free(y);
}

/* ---- Linear ---- */

typedef struct {
  size_t n, in, out;
  float *x, *w, *b;
  int wrt; /* 0: x, 1: w */
} lin_t;

static void lin_fwd(void *ctx, const float *v, float *y) {
  lin_t *l = ctx;
  sbn_nn_linear_forward(l->n, l->in, l->out, l->wrt ? l->x : v,
                        l->wrt ? v : l->w, l->b, y);
}

static void test_linear(void **state) {
  (void)state;
  tu_rng_t g;
  tu_rng_seed(&g, 1);
  lin_t l = {5, 7, 3, tu_floats(35), tu_floats(21), tu_floats(3), 0};
  tu_fill_normal(&g, l.x, 35, 0, 1);
  tu_fill_normal(&g, l.w, 21, 0, 1);
  tu_fill_normal(&g, l.b, 3, 0, 1);
  float *y = tu_floats(15), *dy = tu_floats(15), *dx = tu_floats(35);
  float *dw = tu_floats(21), *db = tu_floats(3);
  double *r = tu_doubles(15), ref[35], rdw[21], rdb[3];
  tu_fill_normal(&g, dy, 15, 0, 1);
  for (int i = 0; i < 15; i++)
    r[i] = dy[i];
  sbn_nn_linear_forward(5, 7, 3, l.x, l.w, l.b, y);
  for (size_t i = 0; i < 5; i++)
    for (size_t o = 0; o < 3; o++) {
      double s = l.b[o];
      for (size_t k = 0; k < 7; k++)
        s += (double)l.x[i * 7 + k] * l.w[o * 7 + k];
      ref[i * 3 + o] = s;
    }
  assert_true(tu_rel_l2(y, ref, 15) < TOL);
  sbn_nn_linear_backward(5, 7, 3, l.x, l.w, dy, dx, dw, db);
  memset(rdw, 0, sizeof rdw);
  memset(rdb, 0, sizeof rdb);
  for (size_t i = 0; i < 5; i++)
    for (size_t k = 0; k < 7; k++) {
      double s = 0;
      for (size_t o = 0; o < 3; o++) {
        s += r[i * 3 + o] * l.w[o * 7 + k];
        rdw[o * 7 + k] += r[i * 3 + o] * l.x[i * 7 + k];
      }
      ref[i * 7 + k] = s;
    }
  for (size_t i = 0; i < 5; i++)
    for (size_t o = 0; o < 3; o++)
      rdb[o] += r[i * 3 + o];
  assert_true(tu_rel_l2(dx, ref, 35) < TOL);
  assert_true(tu_rel_l2(dw, rdw, 21) < TOL);
  assert_true(tu_rel_l2(db, rdb, 3) < TOL);
  fd_check(lin_fwd, &l, l.x, 35, 15, r, dx);
  l.wrt = 1;
  fd_check(lin_fwd, &l, l.w, 21, 15, r, dw);
  /* An empty batch writes zero weight gradients. */
  sbn_nn_linear_backward(0, 7, 3, l.x, l.w, dy, dx, dw, db);
  for (int i = 0; i < 21; i++)
    assert_true(dw[i] == 0);
  free(l.x), free(l.w), free(l.b), free(y), free(dy), free(dx), free(dw);
  free(db), free(r);
}

/* ---- Conv2d ---- */

typedef struct {
  sbn_nn_conv_t g;
  size_t n;
  float *x, *w, *b, *col;
  int wrt;
} conv_t;

static void conv_fwd(void *ctx, const float *v, float *y) {
  conv_t *c = ctx;
  sbn_nn_conv_forward(&c->g, c->n, c->wrt ? c->x : v, c->wrt ? v : c->w, c->b,
                      y, c->col);
}

static void conv_case(size_t pad) {
  tu_rng_t g;
  tu_rng_seed(&g, 2 + pad);
  conv_t c = {
      {2, 3, 5, 4, 3, pad, SBN_LAYOUT_NCHW}, 2, NULL, NULL, NULL, NULL, 0};
  assert_int_equal(sbn_nn_conv_check(&c.g), 0);
  size_t oh = sbn_nn_conv_oh(&c.g), ow = sbn_nn_conv_ow(&c.g);
  size_t nx = 2 * 2 * 5 * 4, nw = 3 * 2 * 9, ny = 2 * 3 * oh * ow;
  c.x = tu_floats(nx), c.w = tu_floats(nw), c.b = tu_floats(3);
  c.col = tu_floats(sbn_nn_conv_col_floats(&c.g));
  tu_fill_normal(&g, c.x, nx, 0, 1);
  tu_fill_normal(&g, c.w, nw, 0, 1);
  tu_fill_normal(&g, c.b, 3, 0, 1);
  float *y = tu_floats(ny), *dy = tu_floats(ny), *dx = tu_floats(nx);
  float *dw = tu_floats(nw), *db = tu_floats(3);
  double *r = tu_doubles(ny), *ry = tu_doubles(ny), *rdx = tu_doubles(nx);
  double *rdw = tu_doubles(nw), rdb[3] = {0, 0, 0};
  tu_fill_normal(&g, dy, ny, 0, 1);
  for (size_t i = 0; i < ny; i++)
    r[i] = dy[i];
  memset(rdx, 0, nx * sizeof *rdx);
  memset(rdw, 0, nw * sizeof *rdw);
  /* The direct definition, accumulating the adjoints in the same loop. */
  for (size_t i = 0; i < 2; i++)
    for (size_t co = 0; co < 3; co++)
      for (size_t oy = 0; oy < oh; oy++)
        for (size_t ox = 0; ox < ow; ox++) {
          size_t yi = ((i * 3 + co) * oh + oy) * ow + ox;
          double s = c.b[co];
          rdb[co] += r[yi];
          for (size_t ci = 0; ci < 2; ci++)
            for (size_t ky = 0; ky < 3; ky++)
              for (size_t kx = 0; kx < 3; kx++) {
                long iy = (long)(oy + ky) - (long)pad;
                long ix = (long)(ox + kx) - (long)pad;
                if (iy < 0 || iy >= 5 || ix < 0 || ix >= 4)
                  continue;
                size_t xi = ((i * 2 + ci) * 5 + (size_t)iy) * 4 + (size_t)ix;
                size_t wi = ((co * 2 + ci) * 3 + ky) * 3 + kx;
                s += (double)c.x[xi] * c.w[wi];
                rdx[xi] += r[yi] * c.w[wi];
                rdw[wi] += r[yi] * c.x[xi];
              }
          ry[yi] = s;
        }
  sbn_nn_conv_forward(&c.g, 2, c.x, c.w, c.b, y, c.col);
  assert_true(tu_rel_l2(y, ry, ny) < TOL);
  sbn_nn_conv_backward(&c.g, 2, c.x, c.w, dy, dx, dw, db, c.col);
  assert_true(tu_rel_l2(dx, rdx, nx) < TOL);
  assert_true(tu_rel_l2(dw, rdw, nw) < TOL);
  assert_true(tu_rel_l2(db, rdb, 3) < TOL);
  fd_check(conv_fwd, &c, c.x, nx, ny, r, dx);
  c.wrt = 1;
  fd_check(conv_fwd, &c, c.w, nw, ny, r, dw);
  free(c.x), free(c.w), free(c.b), free(c.col), free(y), free(dy);
  free(dx), free(dw), free(db), free(r), free(ry), free(rdx), free(rdw);
}

static void test_conv(void **state) {
  (void)state;
  conv_case(1);
  conv_case(0);
  sbn_nn_conv_t bad = {1, 1, 2, 2, 5, 1, SBN_LAYOUT_NCHW};
  assert_int_equal(sbn_nn_conv_check(&bad), SBN_ESHAPE);
}

/* ---- ReLU, MaxPool2, global average pool ---- */

typedef struct {
  int kind; /* 0 relu, 1 pool, 2 gap */
  size_t planes, h, w;
} pw_t;

static void pw_fwd(void *ctx, const float *x, float *y) {
  pw_t *p = ctx;
  if (p->kind == 0)
    sbn_nn_relu_forward(p->planes * p->h * p->w, x, y);
  else if (p->kind == 1)
    sbn_nn_maxpool2_forward(p->planes, p->h, p->w, x, y);
  else
    sbn_nn_gap_forward(p->planes, p->h * p->w, x, y);
}

static void pw_case(int kind) {
  tu_rng_t g;
  tu_rng_seed(&g, 10 + (uint64_t)kind);
  /* Odd sizes check that pooling drops the last row and column. */
  pw_t p = {kind, 3, 5, 7};
  size_t nx = 3 * 5 * 7;
  size_t ny = kind == 0 ? nx : kind == 1 ? 3 * 2 * 3 : 3;
  float *x = tu_floats(nx), *y = tu_floats(ny), *dy = tu_floats(ny);
  float *dx = tu_floats(nx);
  double *r = tu_doubles(ny), *ry = tu_doubles(ny), *rdx = tu_doubles(nx);
  /* Values on a grid of spacing 0.1 away from zero keep the finite
   * differences off ReLU's kink and the pools' ties. */
  for (size_t i = 0; i < nx; i++) {
    double v = (double)(tu_rng_u64(&g) % 1000) / 10.0 - 49.95;
    x[i] = (float)v;
  }
  tu_fill_normal(&g, dy, ny, 0, 1);
  for (size_t i = 0; i < ny; i++)
    r[i] = dy[i];
  memset(rdx, 0, nx * sizeof *rdx);
  if (kind == 0)
    for (size_t i = 0; i < nx; i++) {
      ry[i] = x[i] > 0 ? x[i] : 0;
      rdx[i] = x[i] > 0 ? r[i] : 0;
    }
  for (size_t q = 0; kind == 1 && q < 3; q++)
    for (size_t oy = 0; oy < 2; oy++)
      for (size_t ox = 0; ox < 3; ox++) {
        size_t best = (q * 5 + 2 * oy) * 7 + 2 * ox;
        for (size_t a = 0; a < 2; a++)
          for (size_t b = 0; b < 2; b++) {
            size_t at = (q * 5 + 2 * oy + a) * 7 + 2 * ox + b;
            if (x[at] > x[best])
              best = at;
          }
        ry[(q * 2 + oy) * 3 + ox] = x[best];
        rdx[best] += r[(q * 2 + oy) * 3 + ox];
      }
  for (size_t q = 0; kind == 2 && q < 3; q++) {
    double s = 0;
    for (size_t j = 0; j < 35; j++) {
      s += x[q * 35 + j];
      rdx[q * 35 + j] = r[q] / 35.0;
    }
    ry[q] = s / 35.0;
  }
  pw_fwd(&p, x, y);
  assert_true(tu_rel_l2(y, ry, ny) < TOL);
  if (kind == 0)
    sbn_nn_relu_backward(nx, y, dy, dx);
  else if (kind == 1)
    sbn_nn_maxpool2_backward(3, 5, 7, x, dy, dx);
  else
    sbn_nn_gap_backward(3, 35, dy, dx);
  assert_true(tu_rel_l2(dx, rdx, nx) < TOL);
  fd_check(pw_fwd, &p, x, nx, ny, r, dx);
  free(x), free(y), free(dy), free(dx), free(r), free(ry), free(rdx);
}

static void test_pointwise(void **state) {
  (void)state;
  pw_case(0);
  pw_case(1);
  pw_case(2);
}

/* ---- NHWC against NCHW ---- */

/* (n, c, s) -> (n, s, c). */
static void to_nhwc(const float *x, float *y, size_t n, size_t c, size_t s) {
  for (size_t i = 0; i < n; i++)
    for (size_t ch = 0; ch < c; ch++)
      for (size_t j = 0; j < s; j++)
        y[(i * s + j) * c + ch] = x[(i * c + ch) * s + j];
}

static double *as_double(const float *x, size_t len) {
  double *d = tu_doubles(len);
  for (size_t i = 0; i < len; i++)
    d[i] = x[i];
  return d;
}

/* Channels-last layers are the NCHW ones on transposed tensors: the
 * convolution to rounding (other products), pooling bit for bit. */
static void test_nhwc(void **state) {
  (void)state;
  tu_rng_t g;
  tu_rng_seed(&g, 40);
  enum { N = 2, CI = 3, CO = 4, H = 6, W = 5 };
  sbn_nn_conv_t a = {CI, CO, H, W, 3, 1, SBN_LAYOUT_NCHW}, b = a;
  b.layout = SBN_LAYOUT_NHWC;
  size_t nx = N * CI * H * W, ny = N * CO * H * W, nw = CO * CI * 9;
  float *x = tu_floats(nx), *xt = tu_floats(nx), *w = tu_floats(nw);
  float *bias = tu_floats(CO), *col = tu_floats(sbn_nn_conv_col_floats(&a));
  float *y = tu_floats(ny), *yt = tu_floats(ny), *y2 = tu_floats(ny);
  float *dy = tu_floats(ny), *dyt = tu_floats(ny), *dx = tu_floats(nx);
  float *dxt = tu_floats(nx), *dx2 = tu_floats(nx), *dw = tu_floats(nw);
  float *dw2 = tu_floats(nw), db[CO], db2[CO];
  tu_fill_normal(&g, x, nx, 0, 1);
  tu_fill_normal(&g, w, nw, 0, 1);
  tu_fill_normal(&g, bias, CO, 0, 1);
  tu_fill_normal(&g, dy, ny, 0, 1);
  to_nhwc(x, xt, N, CI, H * W);
  to_nhwc(dy, dyt, N, CO, H * W);
  sbn_nn_conv_forward(&a, N, x, w, bias, y, col);
  sbn_nn_conv_forward(&b, N, xt, w, bias, y2, col);
  to_nhwc(y, yt, N, CO, H * W);
  double *ref = as_double(yt, ny);
  assert_true(tu_rel_l2(y2, ref, ny) < TOL);
  free(ref);
  sbn_nn_conv_backward(&a, N, x, w, dy, dx, dw, db, col);
  sbn_nn_conv_backward(&b, N, xt, w, dyt, dx2, dw2, db2, col);
  to_nhwc(dx, dxt, N, CI, H * W);
  ref = as_double(dxt, nx);
  assert_true(tu_rel_l2(dx2, ref, nx) < TOL);
  free(ref);
  ref = as_double(dw, nw);
  assert_true(tu_rel_l2(dw2, ref, nw) < TOL);
  free(ref);
  ref = as_double(db, CO);
  assert_true(tu_rel_l2(db2, ref, CO) < TOL);
  free(ref);
  /* Pooling on x (CI channels, odd W): forward and backward. */
  size_t np = N * CI * (H / 2) * (W / 2);
  float *p = tu_floats(np), *pt = tu_floats(np), *p2 = tu_floats(np);
  sbn_nn_maxpool2_forward(N * CI, H, W, x, p);
  sbn_nn_maxpool2_forward_nhwc(N, H, W, CI, xt, p2);
  to_nhwc(p, pt, N, CI, (H / 2) * (W / 2));
  assert_memory_equal(pt, p2, np * sizeof *p);
  to_nhwc(p, pt, N, CI, (H / 2) * (W / 2)); /* p as the gradient of y */
  sbn_nn_maxpool2_backward(N * CI, H, W, x, p, dx);
  sbn_nn_maxpool2_backward_nhwc(N, H, W, CI, xt, pt, dx2);
  to_nhwc(dx, dxt, N, CI, H * W);
  assert_memory_equal(dxt, dx2, nx * sizeof *dx);
  float gp[N * CI], gp2[N * CI];
  sbn_nn_gap_forward(N * CI, H * W, x, gp);
  sbn_nn_gap_forward_nhwc(N, H * W, CI, xt, gp2);
  assert_memory_equal(gp, gp2, sizeof gp);
  sbn_nn_gap_backward(N * CI, H * W, gp, dx);
  sbn_nn_gap_backward_nhwc(N, H * W, CI, gp, dx2);
  to_nhwc(dx, dxt, N, CI, H * W);
  assert_memory_equal(dxt, dx2, nx * sizeof *dx);
  free(x), free(xt), free(w), free(bias), free(col), free(y), free(yt);
  free(y2), free(dy), free(dyt), free(dx), free(dxt), free(dx2), free(dw);
  free(dw2), free(p), free(pt), free(p2);
}

/* ---- Softmax cross-entropy ---- */

static void test_xent(void **state) {
  (void)state;
  tu_rng_t g;
  tu_rng_seed(&g, 20);
  enum { N = 6, K = 10 };
  float z[N * K], dz[N * K];
  uint8_t lab[N];
  tu_fill_normal(&g, z, N * K, 0, 3);
  for (int i = 0; i < N; i++)
    lab[i] = (uint8_t)(tu_rng_u64(&g) % K);
  double loss = 0, ref = 0;
  uint64_t hits = 0, rhits = 0;
  const float scale = 0.25f;
  assert_int_equal(sbn_nn_xent(N, K, z, lab, scale, dz, &loss, &hits), 0);
  for (int i = 0; i < N; i++) {
    double m = -INFINITY, s = 0;
    int best = 0;
    for (int j = 0; j < K; j++) {
      m = fmax(m, z[i * K + j]);
      if (z[i * K + j] > z[i * K + best])
        best = j;
    }
    for (int j = 0; j < K; j++)
      s += exp(z[i * K + j] - m);
    ref += m + log(s) - z[i * K + lab[i]];
    rhits += best == lab[i];
    for (int j = 0; j < K; j++) {
      double p = exp(z[i * K + j] - m) / s;
      double want = scale * (p - (j == lab[i]));
      assert_true(fabs(dz[i * K + j] - want) < 1e-6);
    }
  }
  assert_true(fabs(loss - ref) < 1e-9 * (1 + ref));
  assert_int_equal(hits, rhits);
  /* dL/dz of scale * sum of losses, by central differences. */
  for (int i = 0; i < N * K; i += 7) {
    float keep = z[i];
    double lp = 0, lm = 0;
    uint64_t h = 0;
    z[i] = keep + 1e-2f;
    sbn_nn_xent(N, K, z, lab, 0, NULL, &lp, &h);
    z[i] = keep - 1e-2f;
    sbn_nn_xent(N, K, z, lab, 0, NULL, &lm, &h);
    z[i] = keep;
    double fd = scale * (lp - lm) / 2e-2;
    assert_true(fabs(fd - dz[i]) < FD_TOL * (1 + fabs(fd)));
  }
  lab[0] = K;
  assert_int_equal(sbn_nn_xent(N, K, z, lab, 1, dz, &loss, &hits), SBN_EINVAL);
}

/* ---- Schedule, optimizer, permutation ---- */

static void test_schedule(void **state) {
  (void)state;
  /* Values of torch.optim.lr_scheduler.OneCycleLR(max_lr=0.1,
   * total_steps=100) at steps 0, 29, 50 and 99. */
  sbn_onecycle_t s = {0.1, 0.3, 25, 1e4, 100};
  assert_true(fabs(sbn_onecycle_lr(&s, 0) - 0.004) < 1e-12);
  assert_true(fabs(sbn_onecycle_lr(&s, 29) - 0.1) < 1e-12);
  assert_true(fabs(sbn_onecycle_lr(&s, 99) - 4e-7) < 1e-15);
  double mid = 4e-7 + (0.1 - 4e-7) / 2 * (cos(M_PI * 21.0 / 70.0) + 1);
  assert_true(fabs(sbn_onecycle_lr(&s, 50) - mid) < 1e-12);
  float p[2] = {1, -2}, buf[2] = {0, 0}, gr[2] = {0.5f, 0.25f};
  sbn_nn_sgd(2, p, buf, gr, 0.1f, 0.9f, 0.01f);
  assert_true(fabs(buf[0] - 0.51) < 1e-6 && fabs(p[0] - 0.949) < 1e-6);
  sbn_nn_sgd(2, p, buf, gr, 0.1f, 0.9f, 0.01f);
  assert_true(fabs(buf[1] - (0.9 * 0.23 + 0.25 - 0.01 * 2.023)) < 1e-6);
  uint32_t a[100], b[100];
  int seen[100] = {0};
  sbn_nn_permutation(a, 100, 7, 3);
  sbn_nn_permutation(b, 100, 7, 3);
  assert_memory_equal(a, b, sizeof a);
  for (int i = 0; i < 100; i++)
    seen[a[i]]++;
  for (int i = 0; i < 100; i++)
    assert_int_equal(seen[i], 1);
  sbn_nn_permutation(b, 100, 7, 4);
  assert_true(memcmp(a, b, sizeof a) != 0);
}

/* ---- Precise BatchNorm ---- */

/* The first BatchNorm's input does not depend on how the samples are cut
 * into chunks, so its precise statistics must equal the float64 moments
 * of Linear(784, 256) over all samples, for one chunk or three. */
static void test_precise_bn(void **state) {
  (void)state;
  enum { N = 40, IN = 784, C = 256 };
  sbn_nn_config_t cfg = {0};
  cfg.arch = SBN_NN_MLP;
  cfg.norm = SBN_NN_NORM_BN;
  cfg.eps = 1e-5;
  cfg.momentum = 0.1;
  cfg.seed = 3;
  cfg.max_batch = N;
  sbn_nn_model_t *m;
  assert_int_equal(sbn_nn_model_create(&cfg, &m), 0);
  assert_int_equal(sbn_nn_precise_count(m), 2 * C);
  tu_rng_t g;
  tu_rng_seed(&g, 30);
  float *x = tu_floats(N * IN);
  tu_fill_normal(&g, x, N * IN, 0.5, 1);
  const float *w = sbn_nn_params(m), *b = w + C * IN;
  double mean[C], var[C];
  for (size_t c = 0; c < C; c++) {
    double s = 0, s2 = 0;
    for (size_t i = 0; i < N; i++) {
      double y = b[c];
      for (size_t k = 0; k < IN; k++)
        y += (double)x[i * IN + k] * w[c * IN + k];
      s += y;
      s2 += y * y;
    }
    mean[c] = s / N;
    var[c] = (s2 - N * mean[c] * mean[c]) / (N - 1);
  }
  const size_t cuts[2][3] = {{N, 0, 0}, {15, 2, 23}};
  for (int t = 0; t < 2; t++) {
    sbn_nn_precise_begin(m);
    for (size_t j = 0, at = 0; j < 3 && cuts[t][j]; at += cuts[t][j++])
      assert_int_equal(sbn_nn_forward_precise(m, cuts[t][j], x + at * IN), 0);
    sbn_nn_precise_finish(m);
    const float *st = sbn_nn_stats(m);
    assert_true(tu_rel_l2(st, mean, C) < 1e-5);
    assert_true(tu_rel_l2(st + C, var, C) < 1e-4);
  }
  assert_int_equal(sbn_nn_forward_precise(m, 1, x), SBN_ESMALLBATCH);
  sbn_nn_model_destroy(m);
  free(x);
}

int main(void) {
  sbn_nn_set_threads(1);
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_linear),    cmocka_unit_test(test_conv),
      cmocka_unit_test(test_pointwise), cmocka_unit_test(test_xent),
      cmocka_unit_test(test_schedule),  cmocka_unit_test(test_precise_bn),
      cmocka_unit_test(test_nhwc),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
