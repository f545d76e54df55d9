/* The strided view (a channel range of a tensor) through the set in use:
 * its own strided entry when it has one; else its dense entry, in one call
 * when the view is dense (lda = C * S) and once per a otherwise, which is
 * the same computation in smaller calls (slow where a set lays out
 * per-call parameters, as the position view does: give such a set its
 * strided entries). */
#include "kernels/sbn_kernels.h"

void sbn__k_moments_ld(const float *x, size_t A, size_t C, size_t S, size_t lda,
                       const float *k, double *s1, double *s2) {
  const sbn__kernels_t *t = sbn__kernels();
  if (t->moments_ld != NULL) {
    t->moments_ld(x, A, C, S, lda, k, s1, s2);
    return;
  }
  if (lda == C * S) {
    t->moments(x, A, C, S, k, s1, s2);
    return;
  }
  for (size_t a = 0; a < A; a++)
    t->moments(x + a * lda, 1, C, S, k, s1, s2);
}

void sbn__k_normalize_ld(const float *x, float *y, size_t A, size_t C, size_t S,
                         size_t lda, const float *mh, const float *ml,
                         const float *scale, const float *shift) {
  const sbn__kernels_t *t = sbn__kernels();
  if (t->normalize_ld != NULL) {
    t->normalize_ld(x, y, A, C, S, lda, mh, ml, scale, shift);
    return;
  }
  if (lda == C * S) {
    t->normalize(x, y, A, C, S, mh, ml, scale, shift);
    return;
  }
  for (size_t a = 0; a < A; a++)
    t->normalize(x + a * lda, y + a * lda, 1, C, S, mh, ml, scale, shift);
}

void sbn__k_normalize_part(const float *x, float *y, size_t C, size_t S,
                           size_t total, const float *mh, const float *ml,
                           const float *scale, const float *shift) {
  const sbn__kernels_t *t = sbn__kernels();
  if (t->normalize_part != NULL)
    t->normalize_part(x, y, C, S, total, mh, ml, scale, shift);
  else
    sbn__k_normalize_ld(x, y, 1, C, S, C * S, mh, ml, scale, shift);
}

void sbn__k_bwd_reduce_ld(const float *x, const float *dy, size_t A, size_t C,
                          size_t S, size_t lda, const double *mean,
                          const double *istd, double *sdy, double *sdyx) {
  const sbn__kernels_t *t = sbn__kernels();
  if (t->bwd_reduce_ld != NULL) {
    t->bwd_reduce_ld(x, dy, A, C, S, lda, mean, istd, sdy, sdyx);
    return;
  }
  if (lda == C * S) {
    t->bwd_reduce(x, dy, A, C, S, mean, istd, sdy, sdyx);
    return;
  }
  for (size_t a = 0; a < A; a++)
    t->bwd_reduce(x + a * lda, dy + a * lda, 1, C, S, mean, istd, sdy, sdyx);
}

void sbn__k_bwd_apply_ld(const float *x, const float *dy, float *dx, size_t A,
                         size_t C, size_t S, size_t lda, const double *mean,
                         const double *istd, const double *k1, const double *k2,
                         const double *k3) {
  const sbn__kernels_t *t = sbn__kernels();
  if (t->bwd_apply_ld != NULL) {
    t->bwd_apply_ld(x, dy, dx, A, C, S, lda, mean, istd, k1, k2, k3);
    return;
  }
  if (lda == C * S) {
    t->bwd_apply(x, dy, dx, A, C, S, mean, istd, k1, k2, k3);
    return;
  }
  for (size_t a = 0; a < A; a++)
    t->bwd_apply(x + a * lda, dy + a * lda, dx + a * lda, 1, C, S, mean, istd,
                 k1, k2, k3);
}
