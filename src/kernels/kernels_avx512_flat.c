/* NCHW elementwise passes of the AVX-512 set over short runs (16 <= S <
 * FLAT_MAX_S: 7x7, 14x14 and 28x28 planes), each row of an (A, C, S) view
 * taken as one flat stream of C * S elements rather than C runs of S.
 *
 * Why: a run of 196 values (14x14) starts and ends inside cache lines, so
 * run by run a streaming pass wrote every boundary line partly with a
 * masked plain store and partly with streaming stores, and a line written
 * both ways leaves the write-combining buffer half full: the BatchNorm
 * forward of 8x1024x14x14 took 1.9 times a memcpy, 1.4 with the same runs
 * stored normally. A flat stream aligns its vectors to y's cache lines
 * once per row, so every line is written whole by streaming stores, and
 * it pays no per-run head and tail (a 49-value run was three vectors and a
 * one-lane masked vector). A vector that straddles two channels (S >= 16:
 * never more than two) takes each lane's parameters by a mask blend.
 * Included only in builds with the AVX-512 flags. */
#include "kernels/sbn_kernels.h"

#ifdef SBN__HAVE_AVX512
#include "kernels/avx512_inl.h"

#include "kernels/kernels_avx512_flat.h"

/* ------------------------------------------------------------------ */
/* Normalize: y = ((x - h) - l) * sc + sh, the parameters of a channel
 * broadcast to every lane. */

typedef struct norm_par_s {
  __m512 h, l, s, b;
} norm_par_t;

static inline norm_par_t norm_par(size_t c, const float *mh, const float *ml,
                                  const float *scale, const float *shift) {
  norm_par_t p = {_mm512_set1_ps(mh[c]), _mm512_set1_ps(ml[c]),
                  _mm512_set1_ps(scale[c]), _mm512_set1_ps(shift[c])};
  return p;
}

/* Lanes of m from a, the others from b. */
static inline norm_par_t norm_blend(__mmask16 m, norm_par_t a, norm_par_t b) {
  norm_par_t p = {
      _mm512_mask_blend_ps(m, b.h, a.h), _mm512_mask_blend_ps(m, b.l, a.l),
      _mm512_mask_blend_ps(m, b.s, a.s), _mm512_mask_blend_ps(m, b.b, a.b)};
  return p;
}

static inline __m512 norm_vec(norm_par_t p, __m512 x) {
  return _mm512_fmadd_ps(_mm512_sub_ps(_mm512_sub_ps(x, p.h), p.l), p.s, p.b);
}

/* One row: channels [0, C) of S values each, back to back. */
static void flat_norm_row(const float *x, float *y, size_t C, size_t S,
                          const float *mh, const float *ml, const float *scale,
                          const float *shift, int nt) {
  size_t n = C * S, i = head_elems(y, n, nt), c = 0, end = S;
  norm_par_t cur = norm_par(0, mh, ml, scale, shift);
  norm_par_t nxt = C > 1 ? norm_par(1, mh, ml, scale, shift) : cur;
  /* The head is shorter than a vector, so it lies in channel 0 (S >= 16). */
  if (i > 0)
    store16(y, norm_vec(cur, load16(tail_mask(i), x)), tail_mask(i), 0);
  for (; i < n; i += 16) {
    __mmask16 m = tail_mask(n - i);
    __m512 v = load16(m, x + i);
    norm_par_t use = cur;
    if (i + 16 >= end) {
      /* The vector reaches the end of channel c: lanes past it belong to
       * channel c + 1, and the next vector starts in c + 1. */
      if (i + 16 > end)
        use = norm_blend(tail_mask(end - i), cur, nxt);
      c++;
      end += S;
      cur = nxt;
      if (c + 1 < C)
        nxt = norm_par(c + 1, mh, ml, scale, shift);
    }
    store16(y + i, norm_vec(use, v), m, nt);
  }
}

void sbn__avx512_flat_normalize(const float *x, float *y, size_t A, size_t C,
                                size_t S, size_t lda, const float *mh,
                                const float *ml, const float *scale,
                                const float *shift, int nt) {
  if (C == 0 || S == 0)
    return;
  for (size_t a = 0; a < A; a++)
    flat_norm_row(x + a * lda, y + a * lda, C, S, mh, ml, scale, shift, nt);
  _mm_sfence();
}

/* ------------------------------------------------------------------ */
/* dx = k1*dy + (q*(x - h) + r) in float (dx_params_f: h the float part of
 * the mean, so x - h is exact near it and every term is of dx's size), as
 * the position views form it: three operations per vector instead of the
 * double form's conversions, four multiply-adds and pack, which made the
 * 7x7 dx compute-bound (warm 8x512x7x7: 35 % of the backward). Calls with
 * fewer than SMALL_STAT values per channel, where the terms cancel below
 * fp32, do not come here. */

typedef struct apply_par_s {
  __m512 k, q, h, r;
} apply_par_t;

static inline apply_par_t apply_par(size_t c, const double *mean,
                                    const double *istd, const double *k1,
                                    const double *k2, const double *k3) {
  float pk, pq, ph, pr;
  dx_params_f(0, c, mean, istd, k1, k2, k3, &pk, &pq, &ph, &pr);
  apply_par_t p = {_mm512_set1_ps(pk), _mm512_set1_ps(pq), _mm512_set1_ps(ph),
                   _mm512_set1_ps(pr)};
  return p;
}

static inline apply_par_t apply_blend(__mmask16 m, apply_par_t a,
                                      apply_par_t b) {
  apply_par_t p = {
      _mm512_mask_blend_ps(m, b.k, a.k), _mm512_mask_blend_ps(m, b.q, a.q),
      _mm512_mask_blend_ps(m, b.h, a.h), _mm512_mask_blend_ps(m, b.r, a.r)};
  return p;
}

static inline __m512 apply_vec(apply_par_t p, __m512 x, __m512 g) {
  __m512 t = _mm512_fmadd_ps(p.q, _mm512_sub_ps(x, p.h), p.r);
  return _mm512_fmadd_ps(p.k, g, t);
}

static void flat_apply_row(const float *x, const float *dy, float *dx,
                           size_t C, size_t S, const double *mean,
                           const double *istd, const double *k1,
                           const double *k2, const double *k3, int nt) {
  size_t n = C * S, i = head_elems(dx, n, nt), c = 0, end = S;
  apply_par_t cur = apply_par(0, mean, istd, k1, k2, k3);
  apply_par_t nxt = C > 1 ? apply_par(1, mean, istd, k1, k2, k3) : cur;
  if (i > 0) {
    __mmask16 m = tail_mask(i);
    store16(dx, apply_vec(cur, load16(m, x), load16(m, dy)), m, 0);
  }
  for (; i < n; i += 16) {
    __mmask16 m = tail_mask(n - i);
    __m512 v = load16(m, x + i), g = load16(m, dy + i);
    apply_par_t use = cur;
    if (i + 16 >= end) {
      if (i + 16 > end)
        use = apply_blend(tail_mask(end - i), cur, nxt);
      c++;
      end += S;
      cur = nxt;
      if (c + 1 < C)
        nxt = apply_par(c + 1, mean, istd, k1, k2, k3);
    }
    store16(dx + i, apply_vec(use, v, g), m, nt);
  }
}

void sbn__avx512_flat_apply(const float *x, const float *dy, float *dx,
                            size_t A, size_t C, size_t S, size_t lda,
                            const double *mean, const double *istd,
                            const double *k1, const double *k2,
                            const double *k3, int nt) {
  if (C == 0 || S == 0)
    return;
  for (size_t a = 0; a < A; a++) {
    size_t o = a * lda;
    flat_apply_row(x + o, dy + o, dx + o, C, S, mean, istd, k1, k2, k3, nt);
  }
  _mm_sfence();
}

#endif /* SBN__HAVE_AVX512 */
