/* The layers of `syncbn train` that the normalization library does not
 * have. Matrix products go through the BLAS (cblas_sgemm); the rest are
 * plain loops, which the compiler vectorizes. */
#include <cblas.h>
#include <float.h>
#include <math.h>
#include <string.h>

#include "nn/sbn_nn.h"

void sbn_nn_set_threads(int threads) {
  openblas_set_num_threads(threads);
}

void sbn_nn_linear_forward(size_t n, size_t in, size_t out, const float *x,
                           const float *w, const float *b, float *y) {
  if (n == 0)
    return;
  /* The bias goes in first so that one SGEMM with beta 1 adds x w^T. */
  for (size_t i = 0; i < n; i++)
    memcpy(y + i * out, b, out * sizeof *y);
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)n, (int)out,
              (int)in, 1.0f, x, (int)in, w, (int)in, 1.0f, y, (int)out);
}

void sbn_nn_linear_backward(size_t n, size_t in, size_t out, const float *x,
                            const float *w, const float *dy, float *dx,
                            float *dw, float *db) {
  if (n == 0) {
    /* An empty shard still contributes (zero) gradients to the sum. */
    memset(dw, 0, out * in * sizeof *dw);
    memset(db, 0, out * sizeof *db);
    return;
  }
  cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)out, (int)in,
              (int)n, 1.0f, dy, (int)out, x, (int)in, 0.0f, dw, (int)in);
  for (size_t o = 0; o < out; o++)
    db[o] = 0;
  for (size_t i = 0; i < n; i++)
    for (size_t o = 0; o < out; o++)
      db[o] += dy[i * out + o];
  if (dx != NULL)
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)n, (int)in,
                (int)out, 1.0f, dy, (int)out, w, (int)in, 0.0f, dx, (int)in);
}

size_t sbn_nn_conv_col_floats(const sbn_nn_conv_t *g) {
  return g->cin * g->k * g->k * sbn_nn_conv_oh(g) * sbn_nn_conv_ow(g);
}

int sbn_nn_conv_check(const sbn_nn_conv_t *g) {
  if (g->cin == 0 || g->cout == 0 || g->h == 0 || g->w == 0 || g->k == 0)
    return sbn_set_error(SBN_EINVAL, "conv: sizes must be positive");
  if (g->k > g->h + 2 * g->pad || g->k > g->w + 2 * g->pad)
    return sbn_set_error(SBN_ESHAPE,
                         "conv: kernel %zu is larger than the padded "
                         "%zu x %zu input",
                         g->k, g->h + 2 * g->pad, g->w + 2 * g->pad);
  return 0;
}

/* The output columns ox whose input column ox + kx - pad lies inside the
 * image: [*lo, *hi). Inside that range a row of im2col is a plain copy. */
static void valid_cols(const sbn_nn_conv_t *g, size_t kx, size_t ow, size_t *lo,
                       size_t *hi) {
  long a = (long)g->pad - (long)kx;              /* first ox inside */
  long b = (long)g->w + (long)g->pad - (long)kx; /* one past the last */
  a = a < 0 ? 0 : a;
  b = b > (long)ow ? (long)ow : b;
  *lo = (size_t)a;
  *hi = b > a ? (size_t)b : (size_t)a;
}

/* col row (ci, ky, kx), column (oy, ox) = x[ci, oy + ky - pad, ox + kx -
 * pad], zero outside the image. */
static void im2col(const sbn_nn_conv_t *g, const float *x, float *col) {
  size_t oh = sbn_nn_conv_oh(g), ow = sbn_nn_conv_ow(g);
  for (size_t ci = 0; ci < g->cin; ci++)
    for (size_t ky = 0; ky < g->k; ky++)
      for (size_t kx = 0; kx < g->k; kx++) {
        float *row = col + ((ci * g->k + ky) * g->k + kx) * oh * ow;
        const float *plane = x + ci * g->h * g->w;
        size_t lo, hi;
        valid_cols(g, kx, ow, &lo, &hi);
        for (size_t oy = 0; oy < oh; oy++) {
          long iy = (long)(oy + ky) - (long)g->pad;
          float *r = row + oy * ow;
          if (iy < 0 || iy >= (long)g->h || lo == hi) {
            memset(r, 0, ow * sizeof *r);
            continue;
          }
          memset(r, 0, lo * sizeof *r);
          memcpy(r + lo, plane + (size_t)iy * g->w + lo + kx - g->pad,
                 (hi - lo) * sizeof *r);
          memset(r + hi, 0, (ow - hi) * sizeof *r);
        }
      }
}

/* The adjoint of im2col: dx (zeroed here) accumulates every column entry
 * that im2col read from it, in the same order as before this was
 * vectorized (each dx element sums over (ci, ky, kx, oy) in turn). */
static void col2im(const sbn_nn_conv_t *g, const float *col, float *dx) {
  size_t oh = sbn_nn_conv_oh(g), ow = sbn_nn_conv_ow(g);
  memset(dx, 0, g->cin * g->h * g->w * sizeof *dx);
  for (size_t ci = 0; ci < g->cin; ci++)
    for (size_t ky = 0; ky < g->k; ky++)
      for (size_t kx = 0; kx < g->k; kx++) {
        const float *row = col + ((ci * g->k + ky) * g->k + kx) * oh * ow;
        float *plane = dx + ci * g->h * g->w;
        size_t lo, hi;
        valid_cols(g, kx, ow, &lo, &hi);
        for (size_t oy = 0; oy < oh; oy++) {
          long iy = (long)(oy + ky) - (long)g->pad;
          if (iy < 0 || iy >= (long)g->h)
            continue;
          /* ox >= lo keeps ox + kx - pad from wrapping around. */
          float *d = plane + (size_t)iy * g->w;
          const float *r = row + oy * ow;
          for (size_t ox = lo; ox < hi; ox++)
            d[ox + kx - g->pad] += r[ox];
        }
      }
}

void sbn_nn_conv_forward(const sbn_nn_conv_t *g, size_t n, const float *x,
                         const float *w, const float *b, float *y, float *col) {
  if (g->layout == SBN_LAYOUT_NHWC) {
    sbn_nn_conv_forward_nhwc(g, n, x, w, b, y, col);
    return;
  }
  size_t s = sbn_nn_conv_oh(g) * sbn_nn_conv_ow(g);
  size_t kk = g->cin * g->k * g->k;
  for (size_t i = 0; i < n; i++) {
    const float *xi = x + i * g->cin * g->h * g->w;
    float *yi = y + i * g->cout * s;
    im2col(g, xi, col);
    for (size_t co = 0; co < g->cout; co++)
      for (size_t j = 0; j < s; j++)
        yi[co * s + j] = b[co];
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)g->cout, (int)s,
                (int)kk, 1.0f, w, (int)kk, col, (int)s, 1.0f, yi, (int)s);
  }
}

void sbn_nn_conv_backward(const sbn_nn_conv_t *g, size_t n, const float *x,
                          const float *w, const float *dy, float *dx, float *dw,
                          float *db, float *col) {
  if (g->layout == SBN_LAYOUT_NHWC) {
    sbn_nn_conv_backward_nhwc(g, n, x, w, dy, dx, dw, db, col);
    return;
  }
  size_t s = sbn_nn_conv_oh(g) * sbn_nn_conv_ow(g);
  size_t kk = g->cin * g->k * g->k;
  memset(dw, 0, g->cout * kk * sizeof *dw);
  memset(db, 0, g->cout * sizeof *db);
  for (size_t i = 0; i < n; i++) {
    const float *dyi = dy + i * g->cout * s;
    for (size_t co = 0; co < g->cout; co++) {
      float acc = 0;
      for (size_t j = 0; j < s; j++)
        acc += dyi[co * s + j];
      db[co] += acc;
    }
    /* One buffer serves both products: first the image's columns for dw,
     * then the columns' gradient for dx. */
    im2col(g, x + i * g->cin * g->h * g->w, col);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)g->cout, (int)kk,
                (int)s, 1.0f, dyi, (int)s, col, (int)s, 1.0f, dw, (int)kk);
    if (dx == NULL)
      continue;
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)kk, (int)s,
                (int)g->cout, 1.0f, w, (int)kk, dyi, (int)s, 0.0f, col, (int)s);
    col2im(g, col, dx + i * g->cin * g->h * g->w);
  }
}

void sbn_nn_relu_forward(size_t len, const float *x, float *y) {
  for (size_t i = 0; i < len; i++)
    y[i] = x[i] > 0 ? x[i] : 0.0f;
}

void sbn_nn_relu_backward(size_t len, const float *y, const float *dy,
                          float *dx) {
  for (size_t i = 0; i < len; i++)
    dx[i] = y[i] > 0 ? dy[i] : 0.0f;
}

/* Index within the plane of the first maximum of the window at (oy, ox),
 * scanning (0, 0), (0, 1), (1, 0), (1, 1) and keeping the first of ties. */
static inline size_t pool_argmax(const float *plane, size_t w, size_t oy,
                                 size_t ox) {
  size_t a = 2 * oy * w + 2 * ox, best = a;
  if (plane[a + 1] > plane[best])
    best = a + 1;
  if (plane[a + w] > plane[best])
    best = a + w;
  if (plane[a + w + 1] > plane[best])
    best = a + w + 1;
  return best;
}

void sbn_nn_maxpool2_forward(size_t planes, size_t h, size_t w, const float *x,
                             float *y) {
  size_t oh = h / 2, ow = w / 2;
  for (size_t p = 0; p < planes; p++) {
    const float *plane = x + p * h * w;
    for (size_t oy = 0; oy < oh; oy++)
      for (size_t ox = 0; ox < ow; ox++)
        y[(p * oh + oy) * ow + ox] = plane[pool_argmax(plane, w, oy, ox)];
  }
}

void sbn_nn_maxpool2_backward(size_t planes, size_t h, size_t w, const float *x,
                              const float *dy, float *dx) {
  size_t oh = h / 2, ow = w / 2;
  memset(dx, 0, planes * h * w * sizeof *dx);
  for (size_t p = 0; p < planes; p++) {
    const float *plane = x + p * h * w;
    for (size_t oy = 0; oy < oh; oy++)
      for (size_t ox = 0; ox < ow; ox++)
        dx[p * h * w + pool_argmax(plane, w, oy, ox)] +=
            dy[(p * oh + oy) * ow + ox];
  }
}

void sbn_nn_gap_forward(size_t planes, size_t s, const float *x, float *y) {
  for (size_t p = 0; p < planes; p++) {
    float acc = 0;
    for (size_t j = 0; j < s; j++)
      acc += x[p * s + j];
    y[p] = acc / (float)s;
  }
}

void sbn_nn_gap_backward(size_t planes, size_t s, const float *dy, float *dx) {
  for (size_t p = 0; p < planes; p++) {
    float g = dy[p] / (float)s;
    for (size_t j = 0; j < s; j++)
      dx[p * s + j] = g;
  }
}

int sbn_nn_xent(size_t n, size_t k, const float *logits, const uint8_t *labels,
                float scale, float *dlogits, double *loss_sum,
                uint64_t *correct) {
  for (size_t i = 0; i < n; i++)
    if (labels[i] >= k)
      return sbn_set_error(SBN_EINVAL, "labels[%zu]: %u is not below %zu", i,
                           (unsigned)labels[i], k);
  double loss = 0;
  uint64_t hits = 0;
  for (size_t i = 0; i < n; i++) {
    const float *z = logits + i * k;
    size_t best = 0;
    for (size_t j = 1; j < k; j++)
      if (z[j] > z[best])
        best = j;
    hits += best == labels[i];
    /* Shifting by the maximum keeps exp() finite; the sum is in double so
     * that the loss is accurate whatever the logits' spread. */
    double zmax = z[best], sum = 0;
    for (size_t j = 0; j < k; j++)
      sum += exp((double)z[j] - zmax);
    double lse = zmax + log(sum);
    loss += lse - (double)z[labels[i]];
    if (dlogits != NULL)
      for (size_t j = 0; j < k; j++) {
        double pj = exp((double)z[j] - lse);
        dlogits[i * k + j] =
            (float)(scale * (pj - (j == labels[i] ? 1.0 : 0.0)));
      }
  }
  *loss_sum += loss;
  *correct += hits;
  return 0;
}
