/* AVX2 + FMA kernels. Same contracts as kernels_ref.c; two shapes matter:
 * long contiguous runs (NCHW, S >= 8) vectorize along s with statistics in
 * double (4 lanes), and channels-last (S < 8) goes through the position
 * view with float block sums, as in the AVX-512 set. */
#include "kernels/sbn_kernels.h"

#ifdef SBN__HAVE_AVX2
#include <immintrin.h>

#include "kernels/kernels_geo_inl.h"

#define SBN__AVX2 __attribute__((target("avx2,fma")))

SBN__AVX2 static inline double hsum4(__m256d v) {
  __m128d lo = _mm256_castpd256_pd128(v), hi = _mm256_extractf128_pd(v, 1);
  lo = _mm_add_pd(lo, hi);
  return _mm_cvtsd_f64(_mm_add_sd(lo, _mm_unpackhi_pd(lo, lo)));
}

/* ------------------------------------------------------------------ */
/* Channels-last (S < 8) through the position view (kernels_geo_inl.h), as
 * in the AVX-512 set: float sums over RB rows folded into double, whole
 * vectors with per-position parameters, scalar tails. Calls with fewer
 * than SMALL_STAT values per channel keep the reference's double sums (see
 * sbn_kernels.h). */
#define RB 16
#define SMALL_STAT 32

/* Adds the 8 float lanes of v into d[0..8) in double. */
SBN__AVX2 static inline void fold8(__m256 v, double *d) {
  _mm256_storeu_pd(d,
                   _mm256_add_pd(_mm256_loadu_pd(d),
                                 _mm256_cvtps_pd(_mm256_castps256_ps128(v))));
  _mm256_storeu_pd(d + 4,
                   _mm256_add_pd(_mm256_loadu_pd(d + 4),
                                 _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1))));
}

/* One row of a piece's sums into f1, f2 (positions [0, L)). */
SBN__AVX2 static inline void row_sums(int bwd, const float *p, const float *q,
                                      size_t L, const float *pa,
                                      const float *pb, const float *pc,
                                      float *f1, float *f2) {
  size_t j = 0;
  for (; j + 8 <= L; j += 8) {
    __m256 v = _mm256_loadu_ps(p + j), a = _mm256_load_ps(f1 + j);
    __m256 b = _mm256_load_ps(f2 + j);
    if (bwd) {
      __m256 g = _mm256_loadu_ps(q + j);
      __m256 xh =
          _mm256_mul_ps(_mm256_sub_ps(_mm256_sub_ps(v, _mm256_load_ps(pa + j)),
                                      _mm256_load_ps(pb + j)),
                        _mm256_load_ps(pc + j));
      a = _mm256_add_ps(a, g);
      b = _mm256_fmadd_ps(g, xh, b);
    } else {
      __m256 d = _mm256_sub_ps(v, _mm256_load_ps(pa + j));
      a = _mm256_add_ps(a, d);
      b = _mm256_fmadd_ps(d, d, b);
    }
    _mm256_store_ps(f1 + j, a);
    _mm256_store_ps(f2 + j, b);
  }
  for (; j < L; j++) {
    if (bwd) {
      float xh = ((p[j] - pa[j]) - pb[j]) * pc[j];
      f1[j] += q[j];
      f2[j] += q[j] * xh;
    } else {
      float d = p[j] - pa[j];
      f1[j] += d;
      f2[j] += d * d;
    }
  }
}

SBN__AVX2 static void avx2_pos_sums(int bwd, const float *x, const float *dy,
                                    size_t A, size_t C, size_t S,
                                    const float *k, const double *mean,
                                    const double *istd, double *s1,
                                    double *s2) {
  float pa[PMAX] __attribute__((aligned(32)));
  float pb[PMAX] __attribute__((aligned(32)));
  float pc[PMAX] __attribute__((aligned(32)));
  float f1[PMAX] __attribute__((aligned(32)));
  float f2[PMAX] __attribute__((aligned(32)));
  double d1[PMAX], d2[PMAX];
  geo_t g[1];
  size_t off;
  for (size_t i = 0; geo_piece(A, C, S, C * S, i, g, &off); i++) {
    size_t L = g->L;
    for (size_t j = 0; j < L; j++) {
      size_t c = geo_chan(g, j, C, S);
      d1[j] = d2[j] = 0;
      if (bwd) {
        float h = (float)mean[c];
        pa[j] = h, pb[j] = (float)(mean[c] - (double)h);
        pc[j] = (float)istd[c];
      } else {
        pa[j] = k[c];
      }
    }
    for (size_t r0 = 0; r0 < g->rows; r0 += RB) {
      size_t r1 = g->rows - r0 < RB ? g->rows : r0 + RB;
      for (size_t j = 0; j < L; j++)
        f1[j] = f2[j] = 0;
      for (size_t r = r0; r < r1; r++)
        row_sums(bwd, x + off + r * g->stride,
                 bwd ? dy + off + r * g->stride : NULL, L, pa, pb, pc, f1, f2);
      size_t j = 0;
      for (; j + 8 <= L; j += 8) {
        fold8(_mm256_load_ps(f1 + j), d1 + j);
        fold8(_mm256_load_ps(f2 + j), d2 + j);
      }
      for (; j < L; j++)
        d1[j] += f1[j], d2[j] += f2[j];
    }
    for (size_t j = 0; j < L; j++) {
      size_t c = geo_chan(g, j, C, S);
      s1[c] += d1[j];
      s2[c] += d2[j];
    }
  }
}

SBN__AVX2 static void avx2_pos_normalize(const float *x, float *y, size_t A,
                                         size_t C, size_t S, const float *mh,
                                         const float *ml, const float *scale,
                                         const float *shift) {
  float ph[PMAX], pl[PMAX], ps[PMAX], pb[PMAX];
  geo_t g[1];
  size_t off;
  for (size_t i = 0; geo_piece(A, C, S, C * S, i, g, &off); i++) {
    size_t L = g->L;
    for (size_t j = 0; j < L; j++) {
      size_t c = geo_chan(g, j, C, S);
      ph[j] = mh[c], pl[j] = ml[c], ps[j] = scale[c], pb[j] = shift[c];
    }
    for (size_t r = 0; r < g->rows; r++) {
      const float *p = x + off + r * g->stride;
      float *q = y + off + r * g->stride;
      size_t j = 0;
      for (; j + 8 <= L; j += 8) {
        __m256 v = _mm256_sub_ps(
            _mm256_sub_ps(_mm256_loadu_ps(p + j), _mm256_loadu_ps(ph + j)),
            _mm256_loadu_ps(pl + j));
        _mm256_storeu_ps(q + j, _mm256_fmadd_ps(v, _mm256_loadu_ps(ps + j),
                                                _mm256_loadu_ps(pb + j)));
      }
      for (; j < L; j++)
        q[j] = ((p[j] - ph[j]) - pl[j]) * ps[j] + pb[j];
    }
  }
}

/* dx = k1*dy + (q*x + r) in double per position (the AVX-512 set's form). */
SBN__AVX2 static void avx2_pos_apply(const float *x, const float *dy, float *dx,
                                     size_t A, size_t C, size_t S,
                                     const double *mean, const double *istd,
                                     const double *k1, const double *k2,
                                     const double *k3) {
  double pk[PMAX], pq[PMAX], pr[PMAX];
  geo_t g[1];
  size_t off;
  for (size_t i = 0; geo_piece(A, C, S, C * S, i, g, &off); i++) {
    size_t L = g->L;
    for (size_t j = 0; j < L; j++) {
      size_t c = geo_chan(g, j, C, S);
      double q = k2[c] * istd[c];
      pk[j] = k1[c], pq[j] = q, pr[j] = k3[c] - q * mean[c];
    }
    for (size_t r = 0; r < g->rows; r++) {
      size_t o = off + r * g->stride, j = 0;
      for (; j + 4 <= L; j += 4) {
        __m256d xd = _mm256_cvtps_pd(_mm_loadu_ps(x + o + j));
        __m256d gd = _mm256_cvtps_pd(_mm_loadu_ps(dy + o + j));
        __m256d v = _mm256_fmadd_pd(_mm256_loadu_pd(pk + j), gd,
                                    _mm256_fmadd_pd(_mm256_loadu_pd(pq + j), xd,
                                                    _mm256_loadu_pd(pr + j)));
        _mm_storeu_ps(dx + o + j, _mm256_cvtpd_ps(v));
      }
      for (; j < L; j++)
        dx[o + j] = (float)(pk[j] * dy[o + j] + (pq[j] * x[o + j] + pr[j]));
    }
  }
}

SBN__AVX2 static void avx2_moments(const float *x, size_t A, size_t C, size_t S,
                                   const float *k, double *s1, double *s2) {
  if (A * S < SMALL_STAT) {
    sbn__kernels_ref.moments(x, A, C, S, k, s1, s2);
    return;
  }
  if (S < 8) {
    avx2_pos_sums(0, x, NULL, A, C, S, k, NULL, NULL, s1, s2);
    return;
  }
  for (size_t a = 0; a < A; a++) {
    for (size_t c = 0; c < C; c++) {
      const float *p = x + (a * C + c) * S;
      __m256d kk = _mm256_set1_pd(k[c]);
      __m256d a1 = _mm256_setzero_pd(), b1 = _mm256_setzero_pd();
      __m256d a2 = _mm256_setzero_pd(), b2 = _mm256_setzero_pd();
      size_t s = 0;
      for (; s + 8 <= S; s += 8) {
        __m256 v = _mm256_loadu_ps(p + s);
        __m256d d0 =
            _mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)), kk);
        __m256d d1 =
            _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)), kk);
        a1 = _mm256_add_pd(a1, d0);
        b1 = _mm256_add_pd(b1, d1);
        a2 = _mm256_fmadd_pd(d0, d0, a2);
        b2 = _mm256_fmadd_pd(d1, d1, b2);
      }
      double t1 = hsum4(_mm256_add_pd(a1, b1));
      double t2 = hsum4(_mm256_add_pd(a2, b2));
      for (; s < S; s++) {
        double d = (double)p[s] - k[c];
        t1 += d;
        t2 += d * d;
      }
      s1[c] += t1;
      s2[c] += t2;
    }
  }
}

SBN__AVX2 static void avx2_normalize(const float *x, float *y, size_t A,
                                     size_t C, size_t S, const float *mh,
                                     const float *ml, const float *scale,
                                     const float *shift) {
  if (S < 8) {
    avx2_pos_normalize(x, y, A, C, S, mh, ml, scale, shift);
    return;
  }
  for (size_t a = 0; a < A; a++) {
    for (size_t c = 0; c < C; c++) {
      size_t off = (a * C + c) * S, s = 0;
      __m256 h = _mm256_set1_ps(mh[c]), l = _mm256_set1_ps(ml[c]);
      __m256 sc = _mm256_set1_ps(scale[c]), sh = _mm256_set1_ps(shift[c]);
      for (; s + 8 <= S; s += 8) {
        __m256 v =
            _mm256_sub_ps(_mm256_sub_ps(_mm256_loadu_ps(x + off + s), h), l);
        _mm256_storeu_ps(y + off + s, _mm256_fmadd_ps(v, sc, sh));
      }
      for (; s < S; s++)
        y[off + s] = ((x[off + s] - mh[c]) - ml[c]) * scale[c] + shift[c];
    }
  }
}

SBN__AVX2 static void avx2_bwd_reduce(const float *x, const float *dy, size_t A,
                                      size_t C, size_t S, const double *mean,
                                      const double *istd, double *sdy,
                                      double *sdyx) {
  if (A * S < SMALL_STAT) {
    sbn__kernels_ref.bwd_reduce(x, dy, A, C, S, mean, istd, sdy, sdyx);
    return;
  }
  if (S < 8) {
    avx2_pos_sums(1, x, dy, A, C, S, NULL, mean, istd, sdy, sdyx);
    return;
  }
  for (size_t a = 0; a < A; a++) {
    for (size_t c = 0; c < C; c++) {
      size_t off = (a * C + c) * S, s = 0;
      __m256d m = _mm256_set1_pd(mean[c]), is = _mm256_set1_pd(istd[c]);
      __m256d a1 = _mm256_setzero_pd(), b1 = _mm256_setzero_pd();
      __m256d a2 = _mm256_setzero_pd(), b2 = _mm256_setzero_pd();
      for (; s + 8 <= S; s += 8) {
        __m256 v = _mm256_loadu_ps(x + off + s);
        __m256 g = _mm256_loadu_ps(dy + off + s);
        __m256d x0 = _mm256_mul_pd(
            _mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)), m), is);
        __m256d x1 = _mm256_mul_pd(
            _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)), m), is);
        __m256d g0 = _mm256_cvtps_pd(_mm256_castps256_ps128(g));
        __m256d g1 = _mm256_cvtps_pd(_mm256_extractf128_ps(g, 1));
        a1 = _mm256_add_pd(a1, g0);
        b1 = _mm256_add_pd(b1, g1);
        a2 = _mm256_fmadd_pd(g0, x0, a2);
        b2 = _mm256_fmadd_pd(g1, x1, b2);
      }
      double t[2] = {hsum4(_mm256_add_pd(a1, b1)),
                     hsum4(_mm256_add_pd(a2, b2))};
      sdy[c] += t[0];
      sdyx[c] += t[1];
      if (s < S)
        sbn__kernels_ref.bwd_reduce(x + off + s, dy + off + s, 1, 1, S - s,
                                    mean + c, istd + c, sdy + c, sdyx + c);
    }
  }
}

/* dx in double, four lanes at a time (see the kernel table). */
SBN__AVX2 static inline __m256d dx4(__m128 x, __m128 dy, __m256d m, __m256d is,
                                    __m256d a1, __m256d a2, __m256d a3) {
  __m256d xh = _mm256_mul_pd(_mm256_sub_pd(_mm256_cvtps_pd(x), m), is);
  return _mm256_fmadd_pd(a1, _mm256_cvtps_pd(dy), _mm256_fmadd_pd(a2, xh, a3));
}

SBN__AVX2 static void avx2_bwd_apply(const float *x, const float *dy, float *dx,
                                     size_t A, size_t C, size_t S,
                                     const double *mean, const double *istd,
                                     const double *k1, const double *k2,
                                     const double *k3) {
  if (S < 8) {
    avx2_pos_apply(x, dy, dx, A, C, S, mean, istd, k1, k2, k3);
    return;
  }
  for (size_t a = 0; a < A; a++) {
    for (size_t c = 0; c < C; c++) {
      size_t off = (a * C + c) * S, s = 0;
      __m256d m = _mm256_set1_pd(mean[c]), is = _mm256_set1_pd(istd[c]);
      __m256d a1 = _mm256_set1_pd(k1[c]), a2 = _mm256_set1_pd(k2[c]);
      __m256d a3 = _mm256_set1_pd(k3[c]);
      for (; s + 8 <= S; s += 8) {
        __m256 v = _mm256_loadu_ps(x + off + s);
        __m256 g = _mm256_loadu_ps(dy + off + s);
        __m256d r0 = dx4(_mm256_castps256_ps128(v), _mm256_castps256_ps128(g),
                         m, is, a1, a2, a3);
        __m256d r1 = dx4(_mm256_extractf128_ps(v, 1),
                         _mm256_extractf128_ps(g, 1), m, is, a1, a2, a3);
        _mm256_storeu_ps(dx + off + s, _mm256_set_m128(_mm256_cvtpd_ps(r1),
                                                       _mm256_cvtpd_ps(r0)));
      }
      if (s < S)
        sbn__kernels_ref.bwd_apply(x + off + s, dy + off + s, dx + off + s, 1,
                                   1, S - s, mean + c, istd + c, k1 + c, k2 + c,
                                   k3 + c);
    }
  }
}

SBN__AVX2 static void avx2_ln_forward(const float *x, float *y, size_t D,
                                      size_t total, float mh, float ml,
                                      float istd, const float *w,
                                      const float *b) {
  __m256 h = _mm256_set1_ps(mh), l = _mm256_set1_ps(ml);
  __m256 is = _mm256_set1_ps(istd);
  size_t i = 0;
  for (; i + 8 <= D; i += 8) {
    __m256 xh = _mm256_mul_ps(
        _mm256_sub_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), h), l), is);
    if (w != NULL)
      xh = _mm256_fmadd_ps(xh, _mm256_loadu_ps(w + i), _mm256_loadu_ps(b + i));
    _mm256_storeu_ps(y + i, xh);
  }
  sbn__kernels_ref.ln_forward(x + i, y + i, D - i, total, mh, ml, istd,
                              w != NULL ? w + i : NULL,
                              w != NULL ? b + i : NULL);
}

SBN__AVX2 static void avx2_ln_bwd_reduce(const float *x, const float *dy,
                                         size_t D, double mean, double istd,
                                         const float *w, double *dw, double *db,
                                         double sums[2]) {
  __m256d m = _mm256_set1_pd(mean), is = _mm256_set1_pd(istd);
  __m256d sg = _mm256_setzero_pd(), sgx = _mm256_setzero_pd();
  size_t i = 0;
  for (; i + 4 <= D; i += 4) {
    __m256d xh = _mm256_mul_pd(
        _mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(x + i)), m), is);
    __m256d dd = _mm256_cvtps_pd(_mm_loadu_ps(dy + i));
    __m256d gd = w != NULL
                     ? _mm256_mul_pd(dd, _mm256_cvtps_pd(_mm_loadu_ps(w + i)))
                     : dd;
    sg = _mm256_add_pd(sg, gd);
    sgx = _mm256_fmadd_pd(gd, xh, sgx);
    _mm256_storeu_pd(dw + i, _mm256_fmadd_pd(dd, xh, _mm256_loadu_pd(dw + i)));
    _mm256_storeu_pd(db + i, _mm256_add_pd(_mm256_loadu_pd(db + i), dd));
  }
  sums[0] += hsum4(sg);
  sums[1] += hsum4(sgx);
  sbn__kernels_ref.ln_bwd_reduce(x + i, dy + i, D - i, mean, istd,
                                 w != NULL ? w + i : NULL, dw + i, db + i,
                                 sums);
}

SBN__AVX2 static void avx2_ln_bwd_apply(const float *x, const float *dy,
                                        float *dx, size_t D, double mean,
                                        double istd, const float *w, double c2,
                                        double c3) {
  __m256d m = _mm256_set1_pd(mean), is = _mm256_set1_pd(istd);
  __m256d a2 = _mm256_set1_pd(c2), a3 = _mm256_set1_pd(c3);
  size_t i = 0;
  for (; i + 4 <= D; i += 4) {
    __m256d g = w != NULL
                    ? _mm256_mul_pd(is, _mm256_cvtps_pd(_mm_loadu_ps(w + i)))
                    : is;
    __m256d r =
        dx4(_mm_loadu_ps(x + i), _mm_loadu_ps(dy + i), m, is, g, a2, a3);
    _mm_storeu_ps(dx + i, _mm256_cvtpd_ps(r));
  }
  sbn__kernels_ref.ln_bwd_apply(x + i, dy + i, dx + i, D - i, mean, istd,
                                w != NULL ? w + i : NULL, c2, c3);
}

/* 32-bit lanes: lo and hi halves of a * m for all eight lanes. */
SBN__AVX2 static inline void mulhilo8(__m256i a, __m256i m, __m256i *hi,
                                      __m256i *lo) {
  __m256i pe = _mm256_mul_epu32(a, m);
  __m256i po = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  *lo = _mm256_blend_epi32(pe, _mm256_slli_epi64(po, 32), 0xAA);
  *hi = _mm256_blend_epi32(_mm256_srli_epi64(pe, 32), po, 0xAA);
}

/* Eight Philox4x32-10 blocks at once (lane j = block first/4 + j); the
 * four output words are then transposed to memory order, 32 elements. */
SBN__AVX2 static void avx2_dropout(const float *in, float *out, size_t n,
                                   uint64_t first, const uint32_t key[2],
                                   uint32_t step, uint32_t layer, uint32_t thr,
                                   float scale) {
  const __m256i m0 = _mm256_set1_epi32((int)0xD2511F53u);
  const __m256i m1 = _mm256_set1_epi32((int)0xCD9E8D57u);
  const __m256i bias = _mm256_set1_epi32((int)0x80000000u);
  const __m256i vthr = _mm256_xor_si256(_mm256_set1_epi32((int)thr), bias);
  const __m256 vs = _mm256_set1_ps(scale);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    uint64_t block = (first + i) / 4;
    /* Lanes hold block + j; the high word only changes every 2^32 blocks,
     * so it is the same for all lanes unless the low word wraps here. */
    if ((uint32_t)block > 0xFFFFFFFFu - 7u)
      break;
    __m256i c0 =
        _mm256_add_epi32(_mm256_set1_epi32((int)(uint32_t)block), lane);
    __m256i c1 = _mm256_set1_epi32((int)(uint32_t)(block >> 32));
    __m256i c2 = _mm256_set1_epi32((int)step);
    __m256i c3 = _mm256_set1_epi32((int)layer);
    uint32_t k0 = key[0], k1 = key[1];
    for (int r = 0; r < 10; r++) {
      __m256i h0, l0, h1, l1;
      mulhilo8(c0, m0, &h0, &l0);
      mulhilo8(c2, m1, &h1, &l1);
      c0 = _mm256_xor_si256(_mm256_xor_si256(h1, c1),
                            _mm256_set1_epi32((int)k0));
      c1 = l1;
      c2 = _mm256_xor_si256(_mm256_xor_si256(h0, c3),
                            _mm256_set1_epi32((int)k1));
      c3 = l0;
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    __m256i t0 = _mm256_unpacklo_epi32(c0, c1);
    __m256i t1 = _mm256_unpacklo_epi32(c2, c3);
    __m256i t2 = _mm256_unpackhi_epi32(c0, c1);
    __m256i t3 = _mm256_unpackhi_epi32(c2, c3);
    __m256i u0 = _mm256_unpacklo_epi64(t0, t1); /* blocks 0 and 4 */
    __m256i u1 = _mm256_unpackhi_epi64(t0, t1); /* blocks 1 and 5 */
    __m256i u2 = _mm256_unpacklo_epi64(t2, t3); /* blocks 2 and 6 */
    __m256i u3 = _mm256_unpackhi_epi64(t2, t3); /* blocks 3 and 7 */
    __m256i w[4] = {_mm256_permute2x128_si256(u0, u1, 0x20),
                    _mm256_permute2x128_si256(u2, u3, 0x20),
                    _mm256_permute2x128_si256(u0, u1, 0x31),
                    _mm256_permute2x128_si256(u2, u3, 0x31)};
    for (int q = 0; q < 4; q++) {
      /* Unsigned word < thr, as a signed compare after flipping the sign
       * bit of both sides. */
      __m256i drop = _mm256_cmpgt_epi32(vthr, _mm256_xor_si256(w[q], bias));
      __m256 v = _mm256_mul_ps(_mm256_loadu_ps(in + i + 8 * q), vs);
      _mm256_storeu_ps(out + i + 8 * q,
                       _mm256_andnot_ps(_mm256_castsi256_ps(drop), v));
    }
  }
  if (i < n)
    sbn__dropout_ref(in + i, out + i, n - i, first + i, key, step, layer, thr,
                     scale);
}

const sbn__kernels_t sbn__kernels_avx2 = {
    .name = "avx2",
    .moments = avx2_moments,
    .normalize = avx2_normalize,
    .bwd_reduce = avx2_bwd_reduce,
    .bwd_apply = avx2_bwd_apply,
    .ln_forward = avx2_ln_forward,
    .ln_bwd_reduce = avx2_ln_bwd_reduce,
    .ln_bwd_apply = avx2_ln_bwd_apply,
    .dropout = avx2_dropout,
};
#endif /* SBN__HAVE_AVX2 */
