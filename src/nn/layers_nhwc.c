/* The channels-last (NHWC) variants of the layers whose memory order
 * matters: Conv2d, MaxPool2 and the global average pool. ReLU, Linear and
 * the loss do not care about the layout. */
#include <cblas.h>
#include <string.h>

#include "nn/sbn_nn.h"

/* col row (oy, ox), column (ci, ky, kx) = x[oy + ky - pad, ox + kx - pad,
 * ci], zero outside the image. The column order is the weights' (cin, k,
 * k), so w (cout x cin k k) multiplies col without reordering. */
static void im2col_nhwc(const sbn_nn_conv_t *g, const float *x, float *col) {
  size_t oh = sbn_nn_conv_oh(g), ow = sbn_nn_conv_ow(g);
  size_t k = g->k, kk = g->cin * k * k;
  for (size_t oy = 0; oy < oh; oy++)
    for (size_t ox = 0; ox < ow; ox++) {
      float *row = col + (oy * ow + ox) * kk;
      for (size_t ky = 0; ky < k; ky++)
        for (size_t kx = 0; kx < k; kx++) {
          long iy = (long)(oy + ky) - (long)g->pad;
          long ix = (long)(ox + kx) - (long)g->pad;
          int inside = iy >= 0 && iy < (long)g->h && ix >= 0 && ix < (long)g->w;
          const float *px = x + ((size_t)iy * g->w + (size_t)ix) * g->cin;
          for (size_t ci = 0; ci < g->cin; ci++)
            row[(ci * k + ky) * k + kx] = inside ? px[ci] : 0.0f;
        }
    }
}

/* The adjoint of im2col_nhwc: dx (zeroed here) accumulates every column
 * entry that it read from dx's place. */
static void col2im_nhwc(const sbn_nn_conv_t *g, const float *col, float *dx) {
  size_t oh = sbn_nn_conv_oh(g), ow = sbn_nn_conv_ow(g);
  size_t k = g->k, kk = g->cin * k * k;
  memset(dx, 0, g->h * g->w * g->cin * sizeof *dx);
  for (size_t oy = 0; oy < oh; oy++)
    for (size_t ox = 0; ox < ow; ox++) {
      const float *row = col + (oy * ow + ox) * kk;
      for (size_t ky = 0; ky < k; ky++)
        for (size_t kx = 0; kx < k; kx++) {
          long iy = (long)(oy + ky) - (long)g->pad;
          long ix = (long)(ox + kx) - (long)g->pad;
          if (iy < 0 || iy >= (long)g->h || ix < 0 || ix >= (long)g->w)
            continue;
          float *px = dx + ((size_t)iy * g->w + (size_t)ix) * g->cin;
          for (size_t ci = 0; ci < g->cin; ci++)
            px[ci] += row[(ci * k + ky) * k + kx];
        }
    }
}

void sbn_nn_conv_forward_nhwc(const sbn_nn_conv_t *g, size_t n, const float *x,
                              const float *w, const float *b, float *y,
                              float *col) {
  size_t s = sbn_nn_conv_oh(g) * sbn_nn_conv_ow(g);
  size_t kk = g->cin * g->k * g->k;
  for (size_t i = 0; i < n; i++) {
    float *yi = y + i * s * g->cout;
    im2col_nhwc(g, x + i * g->h * g->w * g->cin, col);
    for (size_t j = 0; j < s; j++)
      memcpy(yi + j * g->cout, b, g->cout * sizeof *yi);
    /* y (s x cout) = col (s x kk) w^T. */
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)s, (int)g->cout,
                (int)kk, 1.0f, col, (int)kk, w, (int)kk, 1.0f, yi,
                (int)g->cout);
  }
}

void sbn_nn_conv_backward_nhwc(const sbn_nn_conv_t *g, size_t n, const float *x,
                               const float *w, const float *dy, float *dx,
                               float *dw, float *db, float *col) {
  size_t s = sbn_nn_conv_oh(g) * sbn_nn_conv_ow(g);
  size_t kk = g->cin * g->k * g->k;
  memset(dw, 0, g->cout * kk * sizeof *dw);
  memset(db, 0, g->cout * sizeof *db);
  for (size_t i = 0; i < n; i++) {
    const float *dyi = dy + i * s * g->cout;
    for (size_t j = 0; j < s; j++)
      for (size_t co = 0; co < g->cout; co++)
        db[co] += dyi[j * g->cout + co];
    im2col_nhwc(g, x + i * g->h * g->w * g->cin, col);
    /* dw (cout x kk) += dy^T (cout x s) col (s x kk). */
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)g->cout, (int)kk,
                (int)s, 1.0f, dyi, (int)g->cout, col, (int)kk, 1.0f, dw,
                (int)kk);
    if (dx == NULL)
      continue;
    /* dcol (s x kk) = dy (s x cout) w (cout x kk). */
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)s, (int)kk,
                (int)g->cout, 1.0f, dyi, (int)g->cout, w, (int)kk, 0.0f, col,
                (int)kk);
    col2im_nhwc(g, col, dx + i * g->h * g->w * g->cin);
  }
}

/* Offset in a channels-last tensor of (image i, row y, column x). */
static size_t at(size_t i, size_t h, size_t w, size_t c, size_t y, size_t x) {
  return ((i * h + y) * w + x) * c;
}

/* The offset of the first maximum of a window, scanned as the NCHW pool
 * scans it. */
static size_t window_argmax(const float *x, size_t i, size_t h, size_t w,
                            size_t c, size_t oy, size_t ox, size_t ch) {
  size_t best = at(i, h, w, c, 2 * oy, 2 * ox) + ch;
  for (size_t dy = 0; dy < 2; dy++)
    for (size_t dx = 0; dx < 2; dx++) {
      size_t o = at(i, h, w, c, 2 * oy + dy, 2 * ox + dx) + ch;
      if (x[o] > x[best])
        best = o;
    }
  return best;
}

void sbn_nn_maxpool2_forward_nhwc(size_t n, size_t h, size_t w, size_t c,
                                  const float *x, float *y) {
  size_t oh = h / 2, ow = w / 2;
  for (size_t i = 0; i < n; i++)
    for (size_t oy = 0; oy < oh; oy++)
      for (size_t ox = 0; ox < ow; ox++)
        for (size_t ch = 0; ch < c; ch++)
          y[at(i, oh, ow, c, oy, ox) + ch] =
              x[window_argmax(x, i, h, w, c, oy, ox, ch)];
}

void sbn_nn_maxpool2_backward_nhwc(size_t n, size_t h, size_t w, size_t c,
                                   const float *x, const float *dy, float *dx) {
  size_t oh = h / 2, ow = w / 2;
  memset(dx, 0, n * h * w * c * sizeof *dx);
  for (size_t i = 0; i < n; i++)
    for (size_t oy = 0; oy < oh; oy++)
      for (size_t ox = 0; ox < ow; ox++)
        for (size_t ch = 0; ch < c; ch++)
          dx[window_argmax(x, i, h, w, c, oy, ox, ch)] +=
              dy[at(i, oh, ow, c, oy, ox) + ch];
}

void sbn_nn_gap_forward_nhwc(size_t n, size_t s, size_t c, const float *x,
                             float *y) {
  for (size_t i = 0; i < n; i++) {
    float *yi = y + i * c;
    /* y accumulates each channel over s in the NCHW loop's order. */
    memset(yi, 0, c * sizeof *yi);
    for (size_t j = 0; j < s; j++)
      for (size_t ch = 0; ch < c; ch++)
        yi[ch] += x[(i * s + j) * c + ch];
    for (size_t ch = 0; ch < c; ch++)
      yi[ch] /= (float)s;
  }
}

void sbn_nn_gap_backward_nhwc(size_t n, size_t s, size_t c, const float *dy,
                              float *dx) {
  for (size_t i = 0; i < n; i++)
    for (size_t j = 0; j < s; j++)
      for (size_t ch = 0; ch < c; ch++)
        dx[(i * s + j) * c + ch] = dy[i * c + ch] / (float)s;
}
