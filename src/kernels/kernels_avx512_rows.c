/* AVX-512 LayerNorm single rows and dropout, part of the AVX-512 set
 * (kernels_avx512.c has the normalization passes and the table,
 * kernels_avx512_ln.c LayerNorm over several rows; all are compiled with
 * the AVX-512 flags and run only after dispatch.c's CPU check). Same
 * contracts as kernels_ref.c. */
#include "kernels/sbn_kernels.h"

#ifdef SBN__HAVE_AVX512
#include "kernels/avx512_inl.h"

/* ------------------------------------------------------------------ */
/* LayerNorm rows. */

/* One vector of a LayerNorm row. */
static inline __m512 ln16(const float *x, const float *w, const float *b,
                          __mmask16 m, __m512 h, __m512 l, __m512 is) {
  __m512 xh =
      _mm512_mul_ps(_mm512_sub_ps(_mm512_sub_ps(load16(m, x), h), l), is);
  if (w != NULL)
    xh = _mm512_fmadd_ps(xh, load16(m, w), load16(m, b));
  return xh;
}

/* A row is normalized right after its statistics, from L2 (ops/
 * layernorm.c); an output of NT_BYTES or more is streamed like
 * normalize's, so that y neither evicts the row nor reads its lines
 * before writing them: 8 bytes per element instead of 12. */
void sbn__avx512_ln_forward(const float *x, float *y, size_t D, size_t total,
                            float mh, float ml, float istd, const float *w,
                            const float *b) {
  __m512 h = _mm512_set1_ps(mh), l = _mm512_set1_ps(ml);
  __m512 is = _mm512_set1_ps(istd);
  int nt = total >= NT_BYTES / sizeof(float);
  size_t i = head_elems(y, D, nt);
  if (i > 0)
    store16(y, ln16(x, w, b, tail_mask(i), h, l, is), tail_mask(i), 0);
  for (; i < D; i += 16) {
    __mmask16 m = tail_mask(D - i);
    store16(y + i,
            ln16(x + i, w != NULL ? w + i : NULL, b != NULL ? b + i : NULL, m,
                 h, l, is),
            m, nt);
  }
  if (nt)
    _mm_sfence();
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
 * double; dy * xhat and dy are added per element into dw and db in
 * double (the rows of sbn__avx512_ln_bwd_rows, kernels_avx512_ln.c, use
 * block sums). */
static inline __attribute__((always_inline)) void ln_row_sums(
    const float *x, const float *dy, size_t D, double mean, double istd,
    const float *w, double *dw, double *db, double sums[2]) {
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
      fold_masked(_mm512_mul_ps(d, xh), m, dw + i);
      fold_masked(d, m, db + i);
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
  ln_row_sums(x, dy, D, mean, istd, w, dw, db, sums);
}

void sbn__avx512_ln_bwd_apply(const float *x, const float *dy, float *dx,
                              size_t D, double mean, double istd,
                              const float *w, double c2, double c3) {
  double q = c2 * istd;
  __m512d is = _mm512_set1_pd(istd), vq = _mm512_set1_pd(q);
  __m512d vr = _mm512_set1_pd(c3 - q * mean);
  for (size_t i = 0; i < D; i += 16) {
    __mmask16 m = tail_mask(D - i);
    __m512d gl = is, gh = is;
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

/* ------------------------------------------------------------------ */
/* Dropout: Philox4x32-10 with one block per 64-bit lane, its word in the
 * low half. A 32 x 32 multiply (vpmuludq) then yields the whole product
 * in the lane, low word below and high word above, so a round is two
 * multiplies, two shifts and two three-way XORs per 8 blocks, with no
 * splitting of even and odd lanes or blending back (what a round costs
 * with 16 blocks in 32-bit lanes: 16 instructions per 16 blocks against
 * 12 here). The high halves carry garbage that nothing reads: vpmuludq
 * takes only the low word, and the outputs take only the low words.
 * Dropout is bound by these instructions, not by memory (1.4-1.6 times a
 * memcpy with the 32-bit layout), so they are what sets its speed. */

#define PX_M0 0xD2511F53u
#define PX_M1 0xCD9E8D57u
#define PX_W0 0x9E3779B9u
#define PX_W1 0xBB67AE85u
/* Outputs of at least this many bytes are streamed: more than the L3
 * (32 MiB here), so the lines would leave it before the next layer read
 * them, and a streaming store saves reading each line before writing it.
 * A smaller output is stored normally and stays in L3 for its reader. */
#define DROPOUT_NT_BYTES ((size_t)32 << 20)

/* Philox state of 8 blocks, one per 64-bit lane. */
typedef struct px_s {
  __m512i c0, c1, c2, c3;
} px_t;

static inline __attribute__((always_inline)) void px_round(px_t *s, __m512i m0,
                                                           __m512i m1,
                                                           __m512i k0,
                                                           __m512i k1) {
  __m512i p0 = _mm512_mul_epu32(s->c0, m0), p1 = _mm512_mul_epu32(s->c2, m1);
  s->c0 = _mm512_ternarylogic_epi32(_mm512_srli_epi64(p1, 32), s->c1, k0, 0x96);
  s->c1 = p1;
  s->c2 = _mm512_ternarylogic_epi32(_mm512_srli_epi64(p0, 32), s->c3, k1, 0x96);
  s->c3 = p0;
}

/* The first two rounds, where the counter's words 1-3 are the same in
 * every lane (the high block word, step and layer): the products of
 * lane-uniform words are scalars, so these rounds take one vector
 * multiply each instead of two. Exactly the reference's rounds. */
static inline __attribute__((always_inline)) void px_first2(
    px_t *s, __m512i lo, uint32_t hi, uint32_t step, uint32_t layer,
    uint32_t k0, uint32_t k1, __m512i m0, __m512i m1) {
  /* Round 1: c0 varies, c1 = hi, c2 = step, c3 = layer. */
  uint64_t q1 = (uint64_t)PX_M1 * step;
  uint32_t u0 = (uint32_t)(q1 >> 32) ^ hi ^ k0, u1 = (uint32_t)q1;
  __m512i p0 = _mm512_mul_epu32(lo, m0);
  __m512i v2 = _mm512_xor_si512(_mm512_srli_epi64(p0, 32),
                                _mm512_set1_epi32((int)(layer ^ k1)));
  /* Round 2: c0 = u0 and c1 = u1 are uniform, c2 = v2 and c3 = p0 vary. */
  k0 += PX_W0;
  k1 += PX_W1;
  uint64_t q0 = (uint64_t)PX_M0 * u0;
  __m512i p1 = _mm512_mul_epu32(v2, m1);
  s->c0 = _mm512_xor_si512(_mm512_srli_epi64(p1, 32),
                           _mm512_set1_epi32((int)(u1 ^ k0)));
  s->c1 = p1;
  s->c2 =
      _mm512_xor_si512(_mm512_set1_epi32((int)((uint32_t)(q0 >> 32) ^ k1)), p0);
  s->c3 = _mm512_set1_epi32((int)(uint32_t)q0);
}

/* The 32 outputs of state s at out[0..32) from in[0..32). Lane 2L holds
 * block L and lane 2L+1 block 4+L (see sbn__avx512_dropout), so pairing
 * the words (w0 w1) and (w2 w3) of each lane and then the even and the
 * odd lanes gives blocks 0-3 and 4-7 in memory order. */
static inline __attribute__((always_inline)) void px_apply(const px_t *s,
                                                           const float *in,
                                                           float *out,
                                                           __m512i thr,
                                                           __m512 vs, int nt) {
  const __m512i pair = _mm512_setr_epi32(0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10,
                                         26, 12, 28, 14, 30);
  __m512i p01 = _mm512_permutex2var_epi32(s->c0, pair, s->c1);
  __m512i p23 = _mm512_permutex2var_epi32(s->c2, pair, s->c3);
  __m512i w0 = _mm512_unpacklo_epi64(p01, p23);
  __m512i w1 = _mm512_unpackhi_epi64(p01, p23);
  __m512 y0 = _mm512_maskz_mul_ps(_mm512_cmpge_epu32_mask(w0, thr),
                                  _mm512_loadu_ps(in), vs);
  __m512 y1 = _mm512_maskz_mul_ps(_mm512_cmpge_epu32_mask(w1, thr),
                                  _mm512_loadu_ps(in + 16), vs);
  if (nt) {
    _mm512_stream_ps(out, y0);
    _mm512_stream_ps(out + 16, y1);
  } else {
    _mm512_storeu_ps(out, y0);
    _mm512_storeu_ps(out + 16, y1);
  }
}

/* Elements the reference takes before a streaming pass's first aligned
 * line: 0 without streaming, and streaming only where that head is whole
 * Philox blocks (out 16-byte aligned). */
static size_t dropout_head(const float *out, size_t n, int *nt) {
  uintptr_t a = (uintptr_t)out;
  if (!*nt || (a & 15) != 0) {
    *nt = 0;
    return 0;
  }
  size_t h = ((64 - (a & 63)) & 63) / sizeof(float);
  return h < n ? h : n;
}

void sbn__avx512_dropout(const float *in, float *out, size_t n, uint64_t first,
                         const uint32_t key[2], uint32_t step, uint32_t layer,
                         uint32_t thr, float scale) {
  const __m512i m0 = _mm512_set1_epi32((int)PX_M0);
  const __m512i m1 = _mm512_set1_epi32((int)PX_M1);
  const __m512i vthr = _mm512_set1_epi32((int)thr);
  const __m512 vs = _mm512_set1_ps(scale);
  /* Block offsets of the 64-bit lanes (see px_apply). */
  const __m512i lane = _mm512_setr_epi64(0, 4, 1, 5, 2, 6, 3, 7);
  int nt = n >= DROPOUT_NT_BYTES / sizeof(float);
  size_t i = dropout_head(out, n, &nt);
  if (i > 0)
    sbn__dropout_ref(in, out, i, first, key, step, layer, thr, scale);
  /* Four independent states (a-d, 128 elements) in named variables, so
   * that they stay in registers and the multiplies of one hide the
   * latency of the others. */
  for (; i + 128 <= n; i += 128) {
    uint64_t block = (first + i) / 4;
    /* The high counter word is the same in every lane unless the low word
     * wraps inside this step; the reference takes that rare case. */
    if ((uint32_t)block > 0xFFFFFFFFu - 31u)
      break;
    uint32_t hi = (uint32_t)(block >> 32);
    __m512i lo =
        _mm512_add_epi64(_mm512_set1_epi64((long long)(uint32_t)block), lane);
    const __m512i eight = _mm512_set1_epi64(8);
    /* The input two steps ahead: the loads come after some 200
     * instructions of rounds, too late for the hardware prefetcher to keep
     * the memory busy through them. */
    for (int q = 0; q < 8; q++)
      _mm_prefetch((const char *)(in + i + 256 + 16 * q), _MM_HINT_T0);
    px_t a, b, c, d;
    uint32_t k0 = key[0], k1 = key[1];
    px_first2(&a, lo, hi, step, layer, k0, k1, m0, m1);
    lo = _mm512_add_epi64(lo, eight);
    px_first2(&b, lo, hi, step, layer, k0, k1, m0, m1);
    lo = _mm512_add_epi64(lo, eight);
    px_first2(&c, lo, hi, step, layer, k0, k1, m0, m1);
    lo = _mm512_add_epi64(lo, eight);
    px_first2(&d, lo, hi, step, layer, k0, k1, m0, m1);
    k0 += 2 * PX_W0;
    k1 += 2 * PX_W1;
#pragma GCC unroll 8
    for (int r = 2; r < 10; r++) {
      __m512i vk0 = _mm512_set1_epi32((int)k0);
      __m512i vk1 = _mm512_set1_epi32((int)k1);
      px_round(&a, m0, m1, vk0, vk1);
      px_round(&b, m0, m1, vk0, vk1);
      px_round(&c, m0, m1, vk0, vk1);
      px_round(&d, m0, m1, vk0, vk1);
      k0 += PX_W0;
      k1 += PX_W1;
    }
    px_apply(&a, in + i, out + i, vthr, vs, nt);
    px_apply(&b, in + i + 32, out + i + 32, vthr, vs, nt);
    px_apply(&c, in + i + 64, out + i + 64, vthr, vs, nt);
    px_apply(&d, in + i + 96, out + i + 96, vthr, vs, nt);
  }
  if (nt)
    _mm_sfence();
  if (i < n)
    sbn__dropout_ref(in + i, out + i, n - i, first + i, key, step, layer, thr,
                     scale);
}
#endif /* SBN__HAVE_AVX512 */
