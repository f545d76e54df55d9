/* AVX-512 LayerNorm rows and dropout, the other half of the AVX-512 set
 * (kernels_avx512.c has the normalization passes and the table; both are
 * compiled with the AVX-512 flags and run only after dispatch.c's CPU
 * check). Same contracts as kernels_ref.c. */
#include "kernels/sbn_kernels.h"

#ifdef SBN__HAVE_AVX512
#include "kernels/kernels_avx512_inl.h"

/* ------------------------------------------------------------------ */
/* LayerNorm rows. */

void sbn__avx512_ln_forward(const float *x, float *y, size_t D, float mh,
                            float ml, float istd, const float *w,
                            const float *b) {
  __m512 h = _mm512_set1_ps(mh), l = _mm512_set1_ps(ml);
  __m512 is = _mm512_set1_ps(istd);
  for (size_t i = 0; i < D; i += 16) {
    __mmask16 m = tail_mask(D - i);
    __m512 xh =
        _mm512_mul_ps(_mm512_sub_ps(_mm512_sub_ps(load16(m, x + i), h), l), is);
    if (w != NULL)
      xh = _mm512_fmadd_ps(xh, load16(m, w + i), load16(m, b + i));
    store16(y + i, xh, m, 0);
  }
}

/* Adds the 16 lanes of v (of mask m) into d[0..16) in double. */
static inline void fold_masked(__m512 v, __mmask16 m, double *d) {
  __mmask8 lo = (__mmask8)m, hi = (__mmask8)(m >> 8);
  __m512d a = _mm512_maskz_loadu_pd(lo, d);
  __m512d b = _mm512_maskz_loadu_pd(hi, d + 8);
  fold16(v, &a, &b);
  _mm512_mask_storeu_pd(d, lo, a);
  _mm512_mask_storeu_pd(d + 8, hi, b);
}

/* One row's backward sums: xhat in float from the split mean, the row
 * sums of g = dy * w and g * xhat in float over chunks folded into
 * double; dy * xhat and dy are added per element into dw and db, in
 * double (fw == NULL) or into the float block sums fw and fb. */
static inline __attribute__((always_inline)) void ln_row_sums(
    const float *x, const float *dy, size_t D, double mean, double istd,
    const float *w, double *dw, double *db, float *fw, float *fb,
    double sums[2]) {
  float fh = (float)mean;
  __m512 h = _mm512_set1_ps(fh), l = _mm512_set1_ps((float)(mean - fh));
  __m512 is = _mm512_set1_ps((float)istd), one = _mm512_set1_ps(1.0f);
  __m512d sgl = _mm512_setzero_pd(), sgh = sgl, sxl = sgl, sxh = sgl;
  for (size_t i0 = 0; i0 < D; i0 += CHUNK / 4) {
    size_t e = D - i0 > CHUNK / 4 ? i0 + CHUNK / 4 : D;
    __m512 sg = _mm512_setzero_ps(), sgx = sg;
    for (size_t i = i0; i < e; i += 16) {
      __mmask16 m = tail_mask(e - i);
      __m512 d = load16(m, dy + i);
      __m512 xh = _mm512_mul_ps(
          _mm512_sub_ps(_mm512_sub_ps(load16(m, x + i), h), l), is);
      __m512 g = _mm512_mul_ps(
          d, w != NULL ? _mm512_mask_loadu_ps(one, m, w + i) : one);
      sg = _mm512_add_ps(sg, g);
      sgx = _mm512_fmadd_ps(g, xh, sgx);
      if (fw != NULL) {
        store16(fw + i, _mm512_fmadd_ps(d, xh, load16(m, fw + i)), m, 0);
        store16(fb + i, _mm512_add_ps(d, load16(m, fb + i)), m, 0);
      } else {
        fold_masked(_mm512_mul_ps(d, xh), m, dw + i);
        fold_masked(d, m, db + i);
      }
    }
    fold16(sg, &sgl, &sgh);
    fold16(sgx, &sxl, &sxh);
  }
  sums[0] += _mm512_reduce_add_pd(_mm512_add_pd(sgl, sgh));
  sums[1] += _mm512_reduce_add_pd(_mm512_add_pd(sxl, sxh));
}

void sbn__avx512_ln_bwd_reduce(const float *x, const float *dy, size_t D,
                               double mean, double istd, const float *w,
                               double *dw, double *db, double sums[2]) {
  /* Few values per row: see avx512_bwd_reduce. */
  if (D < SMALL_STAT) {
    sbn__kernels_ref.ln_bwd_reduce(x, dy, D, mean, istd, w, dw, db, sums);
    return;
  }
  ln_row_sums(x, dy, D, mean, istd, w, dw, db, NULL, NULL, sums);
}

/* dx of one row; with `ahead` set, also prefetches the row after it
 * (x and dy, `D` floats on), one line of each per vector: this pass reads
 * its own row from the cache, and without that the memory would idle
 * until the next row's sums ask for it. */
static inline __attribute__((always_inline)) void ln_apply_row(
    const float *x, const float *dy, float *dx, size_t D, double mean,
    double istd, const float *w, double c2, double c3, int ahead) {
  double q = c2 * istd;
  __m512d is = _mm512_set1_pd(istd), vq = _mm512_set1_pd(q);
  __m512d vr = _mm512_set1_pd(c3 - q * mean);
  for (size_t i = 0; i < D; i += 16) {
    __mmask16 m = tail_mask(D - i);
    __m512d gl = is, gh = is;
    if (ahead) {
      _mm_prefetch((const char *)(x + D + i), _MM_HINT_T0);
      _mm_prefetch((const char *)(dy + D + i), _MM_HINT_T0);
    }
    if (w != NULL) {
      __m512 wv = load16(m, w + i);
      gl = _mm512_mul_pd(is, _mm512_cvtps_pd(_mm512_castps512_ps256(wv)));
      gh = _mm512_mul_pd(is, _mm512_cvtps_pd(_mm512_extractf32x8_ps(wv, 1)));
    }
    __m512 v =
        dx16(load16(m, x + i), load16(m, dy + i), gl, gh, vq, vq, vr, vr);
    store16(dx + i, v, m, 0);
  }
}

void sbn__avx512_ln_bwd_apply(const float *x, const float *dy, float *dx,
                              size_t D, double mean, double istd,
                              const float *w, double c2, double c3) {
  ln_apply_row(x, dy, dx, D, mean, istd, w, c2, c3, 0);
}

/* LayerNorm backward by blocks of RB rows: each row's sums, then its dx
 * while it is in L1/L2; dweight and dbias summed in float over the block
 * (fw, fb) and folded into double once per block, instead of a double
 * read-modify-write of both per element and row. */
void sbn__avx512_ln_bwd_rows(const float *x, const float *dy, float *dx,
                             size_t R, size_t D, const double *mean,
                             const double *istd, const float *w, double count,
                             double *dw, double *db, float *fw, float *fb) {
  for (size_t r0 = 0; r0 < R; r0 += RB) {
    size_t r1 = R - r0 < RB ? R : r0 + RB;
    for (size_t i = 0; i < D; i += 16) {
      __mmask16 m = tail_mask(D - i);
      store16(fw + i, _mm512_setzero_ps(), m, 0);
      store16(fb + i, _mm512_setzero_ps(), m, 0);
    }
    for (size_t r = r0; r < r1; r++) {
      const float *xr = x + r * D, *dyr = dy + r * D;
      double sums[2] = {0, 0};
      if (D < SMALL_STAT)
        sbn__kernels_ref.ln_bwd_reduce(xr, dyr, D, mean[r], istd[r], w, dw, db,
                                       sums);
      else
        ln_row_sums(xr, dyr, D, mean[r], istd[r], w, NULL, NULL, fw, fb, sums);
      double c2 = -istd[r] * sums[1] / count, c3 = -istd[r] * sums[0] / count;
      ln_apply_row(xr, dyr, dx + r * D, D, mean[r], istd[r], w, c2, c3,
                   r + 1 < R);
    }
    for (size_t i = 0; i < D; i += 16) {
      __mmask16 m = tail_mask(D - i);
      fold_masked(load16(m, fw + i), m, dw + i);
      fold_masked(load16(m, fb + i), m, db + i);
    }
  }
}

/* ------------------------------------------------------------------ */
/* Dropout: Philox4x32-10 on 16 lanes, two independent groups at a time
 * (128 elements) so the multiplies of one hide the latency of the other;
 * an unsigned compare against the threshold makes the keep mask. */

/* The high and low halves of a * m in every 32-bit lane. */
static inline void mulhilo16(__m512i a, __m512i m, __m512i *hi, __m512i *lo) {
  __m512i pe = _mm512_mul_epu32(a, m);
  __m512i po = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  *lo = _mm512_mask_blend_epi32(0xAAAA, pe, _mm512_slli_epi64(po, 32));
  *hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(pe, 32), po);
}

/* The words of 16 blocks (lanes) transposed to memory order: w[q] holds
 * the four words of blocks 4q .. 4q + 3. */
static inline void philox_order(__m512i c0, __m512i c1, __m512i c2, __m512i c3,
                                __m512i w[4]) {
  __m512i t0 = _mm512_unpacklo_epi32(c0, c1),
          t1 = _mm512_unpacklo_epi32(c2, c3);
  __m512i t2 = _mm512_unpackhi_epi32(c0, c1),
          t3 = _mm512_unpackhi_epi32(c2, c3);
  /* In each 128-bit lane L: u0 is block 4L's words, u1 4L+1's, ... */
  __m512i u0 = _mm512_unpacklo_epi64(t0, t1),
          u1 = _mm512_unpackhi_epi64(t0, t1);
  __m512i u2 = _mm512_unpacklo_epi64(t2, t3),
          u3 = _mm512_unpackhi_epi64(t2, t3);
  __m512i a = _mm512_shuffle_i32x4(u0, u1, 0x44);
  __m512i b = _mm512_shuffle_i32x4(u2, u3, 0x44);
  __m512i c = _mm512_shuffle_i32x4(u0, u1, 0xEE);
  __m512i d = _mm512_shuffle_i32x4(u2, u3, 0xEE);
  w[0] = _mm512_shuffle_i32x4(a, b, 0x88);
  w[1] = _mm512_shuffle_i32x4(a, b, 0xDD);
  w[2] = _mm512_shuffle_i32x4(c, d, 0x88);
  w[3] = _mm512_shuffle_i32x4(c, d, 0xDD);
}

/* Philox state of 16 blocks, one per lane. */
typedef struct px_s {
  __m512i c0, c1, c2, c3;
} px_t;

static inline __attribute__((always_inline)) void px_round(px_t *s, __m512i m0,
                                                           __m512i m1,
                                                           __m512i k0,
                                                           __m512i k1) {
  __m512i h0, l0, h1, l1;
  mulhilo16(s->c0, m0, &h0, &l0);
  mulhilo16(s->c2, m1, &h1, &l1);
  s->c0 = _mm512_ternarylogic_epi32(h1, s->c1, k0, 0x96);
  s->c1 = l1;
  s->c2 = _mm512_ternarylogic_epi32(h0, s->c3, k1, 0x96);
  s->c3 = l0;
}

/* The 64 outputs of state s at out[0..64) from in[0..64). */
static inline __attribute__((always_inline)) void px_apply(
    const px_t *s, const float *in, float *out, __m512i thr, __m512 vs) {
  __m512i w[4];
  philox_order(s->c0, s->c1, s->c2, s->c3, w);
  for (int q = 0; q < 4; q++) {
    __mmask16 keep = _mm512_cmpge_epu32_mask(w[q], thr);
    _mm512_storeu_ps(out + 16 * q, _mm512_maskz_mul_ps(
                                       keep, _mm512_loadu_ps(in + 16 * q), vs));
  }
}

void sbn__avx512_dropout(const float *in, float *out, size_t n, uint64_t first,
                         const uint32_t key[2], uint32_t step, uint32_t layer,
                         uint32_t thr, float scale) {
  const __m512i m0 = _mm512_set1_epi32((int)0xD2511F53u);
  const __m512i m1 = _mm512_set1_epi32((int)0xCD9E8D57u);
  const __m512i vthr = _mm512_set1_epi32((int)thr);
  const __m512 vs = _mm512_set1_ps(scale);
  const __m512i lane =
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  size_t i = 0;
  /* Two independent states (a, b) in named variables, so that they stay
   * in registers (as arrays GCC kept them on the stack). */
  for (; i + 128 <= n; i += 128) {
    uint64_t block = (first + i) / 4;
    /* The high counter word is the same in every lane unless the low word
     * wraps inside this step; the reference takes that rare case. */
    if ((uint32_t)block > 0xFFFFFFFFu - 31u)
      break;
    __m512i hi = _mm512_set1_epi32((int)(uint32_t)(block >> 32));
    __m512i c2 = _mm512_set1_epi32((int)step),
            c3 = _mm512_set1_epi32((int)layer);
    __m512i lo =
        _mm512_add_epi32(_mm512_set1_epi32((int)(uint32_t)block), lane);
    px_t a = {lo, hi, c2, c3};
    px_t b = {_mm512_add_epi32(lo, _mm512_set1_epi32(16)), hi, c2, c3};
    uint32_t k0 = key[0], k1 = key[1];
#pragma GCC unroll 10
    for (int r = 0; r < 10; r++) {
      __m512i vk0 = _mm512_set1_epi32((int)k0);
      __m512i vk1 = _mm512_set1_epi32((int)k1);
      px_round(&a, m0, m1, vk0, vk1);
      px_round(&b, m0, m1, vk0, vk1);
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    px_apply(&a, in + i, out + i, vthr, vs);
    px_apply(&b, in + i + 64, out + i + 64, vthr, vs);
  }
  if (i < n)
    sbn__dropout_ref(in + i, out + i, n - i, first + i, key, step, layer, thr,
                     scale);
}
#endif /* SBN__HAVE_AVX512 */
