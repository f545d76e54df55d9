/* Reference kernels: portable C, the definition every optimized set is
 * tested against. Statistics accumulate in double; elementwise outputs are
 * formed in float from per-channel parameters prepared in double. */
#include "kernels/sbn_kernels.h"

static void ref_moments_ld(const float *x, size_t A, size_t C, size_t S,
                           size_t lda, const float *k, double *s1, double *s2) {
  for (size_t a = 0; a < A; a++) {
    for (size_t c = 0; c < C; c++) {
      const float *p = x + a * lda + c * S;
      double kk = k[c], t1 = 0, t2 = 0;
      for (size_t s = 0; s < S; s++) {
        double d = (double)p[s] - kk;
        t1 += d;
        t2 += d * d;
      }
      s1[c] += t1;
      s2[c] += t2;
    }
  }
}

static void ref_normalize_ld(const float *x, float *y, size_t A, size_t C,
                             size_t S, size_t lda, const float *mh,
                             const float *ml, const float *scale,
                             const float *shift) {
  for (size_t a = 0; a < A; a++) {
    for (size_t c = 0; c < C; c++) {
      size_t off = a * lda + c * S;
      float h = mh[c], l = ml[c], sc = scale[c], sh = shift[c];
      for (size_t s = 0; s < S; s++)
        y[off + s] = ((x[off + s] - h) - l) * sc + sh;
    }
  }
}

static void ref_bwd_reduce_ld(const float *x, const float *dy, size_t A,
                              size_t C, size_t S, size_t lda,
                              const double *mean, const double *istd,
                              double *sdy, double *sdyx) {
  for (size_t a = 0; a < A; a++) {
    for (size_t c = 0; c < C; c++) {
      size_t off = a * lda + c * S;
      double m = mean[c], is = istd[c], t1 = 0, t2 = 0;
      for (size_t s = 0; s < S; s++) {
        double xh = ((double)x[off + s] - m) * is;
        t1 += dy[off + s];
        t2 += dy[off + s] * xh;
      }
      sdy[c] += t1;
      sdyx[c] += t2;
    }
  }
}

static void ref_bwd_apply_ld(const float *x, const float *dy, float *dx,
                             size_t A, size_t C, size_t S, size_t lda,
                             const double *mean, const double *istd,
                             const double *k1, const double *k2,
                             const double *k3) {
  for (size_t a = 0; a < A; a++) {
    for (size_t c = 0; c < C; c++) {
      size_t off = a * lda + c * S;
      double m = mean[c], is = istd[c], a1 = k1[c], a2 = k2[c], a3 = k3[c];
      for (size_t s = 0; s < S; s++) {
        double xh = ((double)x[off + s] - m) * is;
        dx[off + s] = (float)(a1 * dy[off + s] + (a2 * xh + a3));
      }
    }
  }
}

/* The dense view is the strided one with rows C * S apart. */
static void ref_moments(const float *x, size_t A, size_t C, size_t S,
                        const float *k, double *s1, double *s2) {
  ref_moments_ld(x, A, C, S, C * S, k, s1, s2);
}

static void ref_normalize(const float *x, float *y, size_t A, size_t C,
                          size_t S, const float *mh, const float *ml,
                          const float *scale, const float *shift) {
  ref_normalize_ld(x, y, A, C, S, C * S, mh, ml, scale, shift);
}

static void ref_bwd_reduce(const float *x, const float *dy, size_t A, size_t C,
                           size_t S, const double *mean, const double *istd,
                           double *sdy, double *sdyx) {
  ref_bwd_reduce_ld(x, dy, A, C, S, C * S, mean, istd, sdy, sdyx);
}

static void ref_bwd_apply(const float *x, const float *dy, float *dx, size_t A,
                          size_t C, size_t S, const double *mean,
                          const double *istd, const double *k1,
                          const double *k2, const double *k3) {
  ref_bwd_apply_ld(x, dy, dx, A, C, S, C * S, mean, istd, k1, k2, k3);
}

static void ref_ln_forward(const float *x, float *y, size_t D, size_t total,
                           float mh, float ml, float istd, const float *w,
                           const float *b) {
  (void)total;
  if (w != NULL) {
    for (size_t i = 0; i < D; i++)
      y[i] = (((x[i] - mh) - ml) * istd) * w[i] + b[i];
  } else {
    for (size_t i = 0; i < D; i++)
      y[i] = ((x[i] - mh) - ml) * istd;
  }
}

static void ref_ln_bwd_reduce(const float *x, const float *dy, size_t D,
                              double mean, double istd, const float *w,
                              double *dw, double *db, double sums[2]) {
  double sg = 0, sgx = 0;
  for (size_t i = 0; i < D; i++) {
    double xh = ((double)x[i] - mean) * istd;
    double g = w != NULL ? (double)dy[i] * w[i] : dy[i];
    sg += g;
    sgx += g * xh;
    dw[i] += dy[i] * xh;
    db[i] += dy[i];
  }
  sums[0] += sg;
  sums[1] += sgx;
}

static void ref_ln_bwd_apply(const float *x, const float *dy, float *dx,
                             size_t D, double mean, double istd, const float *w,
                             double c2, double c3) {
  for (size_t i = 0; i < D; i++) {
    double xh = ((double)x[i] - mean) * istd;
    double g = w != NULL ? istd * w[i] : istd;
    dx[i] = (float)(g * dy[i] + (c2 * xh + c3));
  }
}

const sbn__kernels_t sbn__kernels_ref = {
    .name = "ref",
    .moments = ref_moments,
    .normalize = ref_normalize,
    .bwd_reduce = ref_bwd_reduce,
    .bwd_apply = ref_bwd_apply,
    .moments_ld = ref_moments_ld,
    .normalize_ld = ref_normalize_ld,
    .bwd_reduce_ld = ref_bwd_reduce_ld,
    .bwd_apply_ld = ref_bwd_apply_ld,
    .ln_forward = ref_ln_forward,
    .ln_bwd_reduce = ref_ln_bwd_reduce,
    .ln_bwd_apply = ref_ln_bwd_apply,
    .dropout = sbn__dropout_ref,
};
