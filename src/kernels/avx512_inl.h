/* Helpers shared by the AVX-512 kernel files (kernels_avx512.c: the
 * normalization passes and the table; kernels_avx512_rows.c: LayerNorm
 * rows and dropout). Included only by files compiled with the AVX-512
 * flags, after <immintrin.h>. */
#ifndef SBN_KERNELS_AVX512_INL_H
#define SBN_KERNELS_AVX512_INL_H

#include <immintrin.h>
#include <stdint.h>

#include "kernels/sbn_kernels.h"

/* Rows added in float before a fold into double. */
#define RB 16
/* Elements of a run added in float before a fold (16 per lane with four
 * accumulators of 16 lanes). */
#define CHUNK 1024
/* Outputs of at least this many bytes (four times the core's L2 here) are
 * written with streaming stores: an output that large leaves the L2
 * before anything reads it, and a streaming store skips reading each line
 * before writing it (the floor's memcpy does the same for large copies),
 * so the pass moves 8 bytes per element instead of 12. The price is that
 * a consumer finds the output in memory rather than in L3. Per-sample
 * calls (GroupNorm, InstanceNorm) see one sample's size. */
#define NT_BYTES ((size_t)4 << 20)
/* Prefetches the line at a for writing (PREFETCHW) where sbn__pfw_on
 * says it pays (sbn_kernels.h): plain stores then find their lines owned
 * instead of each waiting for its read for ownership. */
#define SBN__PFW(a)                                      \
  do {                                                   \
    if (__atomic_load_n(&sbn__pfw_on, __ATOMIC_RELAXED)) \
      __builtin_prefetch((a), 1, 3);                     \
  } while (0)
/* Values per channel below which backward's sums are formed in double. */
#define SMALL_STAT 32

static inline __mmask16 tail_mask(size_t n) {
  return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1u);
}

/* Eight groups' statistics from their shifted sums a = sum (x - k) and b =
 * sum (x - k)^2 over n values each, given im = 1 / n: *q = a / n (the
 * mean less the shift), *d2 = b - a q held at 0 or above (a NaN stays
 * NaN: max returns its second operand then) and *is = 1 / sqrt(d2 / n +
 * eps). Both divisions by n are products with im, and 1 / sqrt comes
 * from the 14-bit estimate refined by two Newton steps (good to a few
 * units of double's last place, far below the float outputs' rounding):
 * a division and a square root of eight doubles cost 40 to 70 cycles
 * against ten for the steps, and InstanceNorm forms a set per 8 channels
 * of every sample (perf: the divisions and square roots were about a
 * twelfth of the forward of 8x2048x7x7 channels-last, 49 positions per
 * channel). Lanes whose variance is not a normal number or is infinite
 * (eps is at least FLT_MIN, so that takes a NaN or an overflow) take the
 * exact quotient, as the reference gives it. */
static inline void stats8(__m512d a, __m512d b, __m512d im, __m512d eps,
                          __m512d *q, __m512d *d2, __m512d *is) {
  const __m512d half = _mm512_set1_pd(0.5), three = _mm512_set1_pd(1.5);
  *q = _mm512_mul_pd(a, im);
  *d2 = _mm512_max_pd(_mm512_setzero_pd(), _mm512_fnmadd_pd(a, *q, b));
  __m512d v = _mm512_fmadd_pd(*d2, im, eps), hv = _mm512_mul_pd(v, half);
  __m512d r = _mm512_rsqrt14_pd(v);
  r = _mm512_mul_pd(r, _mm512_fnmadd_pd(hv, _mm512_mul_pd(r, r), three));
  r = _mm512_mul_pd(r, _mm512_fnmadd_pd(hv, _mm512_mul_pd(r, r), three));
  /* Not (v >= DBL_MIN) catches zero, subnormals and NaN; NaN lanes are
   * NaN either way. */
  __mmask8 odd =
      _mm512_cmp_pd_mask(v, _mm512_set1_pd(0x1p-1022), _CMP_NGE_UQ) |
      _mm512_cmp_pd_mask(v, _mm512_set1_pd(__builtin_inf()), _CMP_EQ_OQ);
  if (odd)
    r = _mm512_mask_div_pd(r, odd, _mm512_set1_pd(1.0), _mm512_sqrt_pd(v));
  *is = r;
}

/* The statistics of G groups of m values each from their shifts k and
 * shifted sums s1, s2, as sbn__moments_finish and the ops form them,
 * eight at a time (stats8): mean = k + s1/m, m2 = s2 - s1 (s1/m) held at
 * 0 or above, istd = 1/sqrt(m2/m + eps). */
static inline void stats_groups(size_t G, double m, double eps, const float *k,
                                const double *s1, const double *s2,
                                double *mean, double *m2, double *istd) {
  __m512d im = _mm512_set1_pd(1.0 / m), ve = _mm512_set1_pd(eps);
  for (size_t g = 0; g < G; g += 8) {
    __mmask8 mk = (__mmask8)(G - g >= 8 ? 0xFF : (1u << (G - g)) - 1u);
    __m512d q, d2, is;
    stats8(_mm512_maskz_loadu_pd(mk, s1 + g), _mm512_maskz_loadu_pd(mk, s2 + g),
           im, ve, &q, &d2, &is);
    __m512d kk = _mm512_cvtps_pd(_mm256_maskz_loadu_ps(mk, k + g));
    _mm512_mask_storeu_pd(mean + g, mk, _mm512_add_pd(kk, q));
    _mm512_mask_storeu_pd(m2 + g, mk, d2);
    _mm512_mask_storeu_pd(istd + g, mk, is);
  }
}

/* Adds the 16 float lanes of v into the 8 + 8 double lanes (lo, hi). */
static inline void fold16(__m512 v, __m512d *lo, __m512d *hi) {
  *lo = _mm512_add_pd(*lo, _mm512_cvtps_pd(_mm512_castps512_ps256(v)));
  *hi = _mm512_add_pd(*hi, _mm512_cvtps_pd(_mm512_extractf32x8_ps(v, 1)));
}

/* Folds 16 float lanes into 16 doubles in memory. */
static inline void fold_mem(__m512 v, double *d) {
  __m512d lo = _mm512_loadu_pd(d), hi = _mm512_loadu_pd(d + 8);
  fold16(v, &lo, &hi);
  _mm512_storeu_pd(d, lo);
  _mm512_storeu_pd(d + 8, hi);
}

/* Adds the float lanes of v into the n < 16 doubles at d (masked, so an
 * array of exactly n more doubles is not overrun). */
static inline void fold_part(__m512 v, double *d, size_t n) {
  __mmask8 ml = (__mmask8)(n >= 8 ? 0xFF : (1u << n) - 1u);
  __mmask8 mh = (__mmask8)(n > 8 ? (1u << (n - 8)) - 1u : 0);
  __m512d lo = _mm512_maskz_loadu_pd(ml, d);
  __m512d hi = _mm512_maskz_loadu_pd(mh, d + 8);
  fold16(v, &lo, &hi);
  _mm512_mask_storeu_pd(d, ml, lo);
  _mm512_mask_storeu_pd(d + 8, mh, hi);
}

/* Folds the float sums of L positions into the doubles d (L of them):
 * kernels_avx512_nhwc.c's swept moments. */
static inline void fold_row(const float *a, double *d, size_t L) {
  for (size_t j = 0; j < L; j += 16) {
    if (L - j >= 16)
      fold_mem(_mm512_load_ps(a + j), d + j);
    else
      fold_part(_mm512_load_ps(a + j), d + j, L - j);
  }
}

/* Stores the lanes of m; a whole, aligned vector streams when nt is set.
 * A streaming pass first writes up to the output's first line boundary
 * with a masked store (head_elems), so its whole vectors are aligned and
 * every line is written either whole by streaming stores or not by them
 * at all (a line written both ways is flushed from the write-combining
 * buffer half full). */
static inline void store16(float *p, __m512 v, __mmask16 m, int nt) {
  if (m != 0xFFFF)
    _mm512_mask_storeu_ps(p, m, v);
  else if (nt && ((uintptr_t)p & 63) == 0)
    _mm512_stream_ps(p, v);
  else
    _mm512_storeu_ps(p, v);
}

/* Loads the lanes of m (zero elsewhere). Whole vectors take a plain load
 * and store16 a plain store: the masked forms cost more on this CPU even
 * with every lane set, and all but the last vector of a row are whole. */
static inline __m512 load16(__mmask16 m, const float *p) {
  return m == 0xFFFF ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(m, p);
}

/* A strided call's output is measured by its span, A rows of lda: a
 * block of channels written by the local BatchNorm's single pass
 * (ops/batchnorm_overlap.c) is a slice of a tensor that large, and its
 * lines are not reread before the pass has moved on (stored normally, the
 * single pass measured 1.5-2 times slower than the unblocked one). */
static inline int want_nt(size_t A, size_t C, size_t S, size_t lda) {
  size_t span = A > 0 ? (A - 1) * lda + C * S : 0;
  return span >= NT_BYTES / sizeof(float);
}

/* Elements before q + n's first cache line boundary, which a streaming
 * pass writes with one masked store so that the rest starts aligned (0
 * without streaming; an output not even 4-byte aligned never streams). */
static inline size_t head_elems(const float *q, size_t n, int nt) {
  uintptr_t a = (uintptr_t)q;
  if (!nt || (a & 3) != 0)
    return 0;
  size_t h = ((64 - (a & 63)) & 63) / sizeof(float);
  return h < n ? h : n;
}

static inline __m512 pack_pd(__m512d lo, __m512d hi) {
  return _mm512_insertf32x8(_mm512_castps256_ps512(_mm512_cvtpd_ps(lo)),
                            _mm512_cvtpd_ps(hi), 1);
}

/* dx for 16 elements in double: k1*dy + (q*x + r). */
static inline __m512 dx16(__m512 x, __m512 g, __m512d k1l, __m512d k1h,
                          __m512d ql, __m512d qh, __m512d rl, __m512d rh) {
  __m512d xl = _mm512_cvtps_pd(_mm512_castps512_ps256(x));
  __m512d xh = _mm512_cvtps_pd(_mm512_extractf32x8_ps(x, 1));
  __m512d gl = _mm512_cvtps_pd(_mm512_castps512_ps256(g));
  __m512d gh = _mm512_cvtps_pd(_mm512_extractf32x8_ps(g, 1));
  return pack_pd(_mm512_fmadd_pd(k1l, gl, _mm512_fmadd_pd(ql, xl, rl)),
                 _mm512_fmadd_pd(k1h, gh, _mm512_fmadd_pd(qh, xh, rh)));
}

/* Position j of channel c of a float dx = k1*dy + (q*(x - h) + r), h the
 * float part of the mean, q = k2*istd and r = k3 - q*(mean - h): x - h is
 * exact near the mean, so every term is of dx's own magnitude. Shared by
 * the position views' dx (kernels_avx512.c, kernels_avx512_nhwc.c). */
static inline void dx_params_f(size_t j, size_t c, const double *mean,
                               const double *istd, const double *k1,
                               const double *k2, const double *k3, float *pk,
                               float *pq, float *ph, float *pr) {
  double q = k2[c] * istd[c];
  float h = (float)mean[c];
  pk[j] = (float)k1[c], pq[j] = (float)q, ph[j] = h;
  pr[j] = (float)(k3[c] - q * (mean[c] - (double)h));
}

/* dx of one run of S values from its float parameters (dx_params_f):
 * dx = k * dy + (q * (x - h) + r), whole vectors then the masked tail.
 * Each whole vector's store prefetches dx's line 1 KiB on for writing
 * where sbn__pfw_on says so (PREFETCHW, in the files compiled with
 * -mprfchw: see kernels_avx512_bnfuse.c); past the run's end that is the
 * next run's dx,
 * or lines past the tensor (computed as an integer), which is harmless.
 * Shared by the unfused short runs (kernels_avx512_short.c) and the fused
 * backward's groups (kernels_avx512_bnfuse.c). */
static inline __attribute__((always_inline)) void dx_run_f(const float *x,
                                                           const float *dy,
                                                           float *dx, size_t S,
                                                           float pk, float pq,
                                                           float ph, float pr) {
  __m512 vk = _mm512_set1_ps(pk), vq = _mm512_set1_ps(pq);
  __m512 vh = _mm512_set1_ps(ph), vr = _mm512_set1_ps(pr);
  size_t full = S & ~(size_t)15, s = 0;
  for (; s < full; s += 16) {
    SBN__PFW((const void *)((uintptr_t)(dx + s) + 1024));
    __m512 t =
        _mm512_fmadd_ps(vq, _mm512_sub_ps(_mm512_loadu_ps(x + s), vh), vr);
    _mm512_storeu_ps(dx + s, _mm512_fmadd_ps(vk, _mm512_loadu_ps(dy + s), t));
  }
  if (s < S) {
    __mmask16 tm = tail_mask(S - s);
    __m512 t = _mm512_fmadd_ps(
        vq, _mm512_sub_ps(_mm512_maskz_loadu_ps(tm, x + s), vh), vr);
    _mm512_mask_storeu_ps(
        dx + s, tm, _mm512_fmadd_ps(vk, _mm512_maskz_loadu_ps(tm, dy + s), t));
  }
}

/* Lane j of a row of positions holds channel c: its shift for the
 * forward's sums (k[c]), or for the backward's the split mean and istd;
 * its double sums start at zero. Shared by the position view
 * (kernels_avx512.c) and the channels-last tiles (kernels_avx512_nhwc.c). */
static inline void lane_params(int bwd, size_t j, size_t c, const float *k,
                               const double *mean, const double *istd,
                               float *pa, float *pb, float *pc, double *d1,
                               double *d2) {
  d1[j] = d2[j] = 0;
  if (bwd) {
    float h = (float)mean[c];
    pa[j] = h;
    pb[j] = (float)(mean[c] - (double)h);
    pc[j] = (float)istd[c];
  } else {
    pa[j] = k[c];
  }
}

/* The transposing tree of the short-run sums: 16 vectors of per-channel
 * partial sums reduced to one vector of 16 channel sums (kernels_avx512.c's
 * short runs, kernels_avx512_gn.c's NCHW group backward). */
/* Adds two vectors' 256-bit halves: lanes 0-7 of the result are a's
 * halves summed, lanes 8-15 b's. */
static inline __m512 tree1(__m512 a, __m512 b) {
  return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44),
                       _mm512_shuffle_f32x4(a, b, 0xEE));
}

/* Then their 128-bit lanes: lane q of the result is the 4-lane partial
 * sum of input q of (u0 = (a, b), u1 = (c, d)). */
static inline __m512 tree2(__m512 u0, __m512 u1) {
  return _mm512_add_ps(_mm512_shuffle_f32x4(u0, u1, 0x88),
                       _mm512_shuffle_f32x4(u0, u1, 0xDD));
}

/* tree16 from its first level, u[i] = tree1(v[2i], v[2i + 1]). */
static inline __m512 tree16_u(const __m512 u[8]) {
  __m512 w[4];
  for (int i = 0; i < 4; i++)
    w[i] = tree2(u[2 * i], u[2 * i + 1]);
  /* w[i] lane q holds channel 4i + q's four partials. */
  __m512 x01 = _mm512_add_ps(_mm512_unpacklo_ps(w[0], w[1]),
                             _mm512_unpackhi_ps(w[0], w[1]));
  __m512 x23 = _mm512_add_ps(_mm512_unpacklo_ps(w[2], w[3]),
                             _mm512_unpackhi_ps(w[2], w[3]));
  __m512d p = _mm512_castps_pd(x01), q = _mm512_castps_pd(x23);
  __m512 r = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(p, q)),
                           _mm512_castpd_ps(_mm512_unpackhi_pd(p, q)));
  /* Element 4q + m of r is channel q + 4m. */
  const __m512i order =
      _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, r);
}

/* The 16 lane sums of v[0..16), in channel order. */
static inline __m512 tree16(const __m512 v[16]) {
  __m512 u[8];
  for (int i = 0; i < 8; i++)
    u[i] = tree1(v[2 * i], v[2 * i + 1]);
  return tree16_u(u);
}

/* Adds the first n lanes of v into d[0..n) in double. */
static inline void fold_first(__m512 v, size_t n, double *d) {
  __mmask16 m = tail_mask(n);
  __mmask8 lo = (__mmask8)m, hi = (__mmask8)(m >> 8);
  __m512d a = _mm512_maskz_loadu_pd(lo, d),
          b = _mm512_maskz_loadu_pd(hi, d + 8);
  fold16(v, &a, &b);
  _mm512_mask_storeu_pd(d, lo, a);
  _mm512_mask_storeu_pd(d + 8, hi, b);
}

/* The two float sum vectors of one run of S >= 16 values shifted by h
 * (full = S rounded down to whole vectors, tm = the mask of the rest, 0
 * when there is none): moments (bwd = 0) add x - h and its square,
 * backward adds dy and dy * (x - h). The tail's lanes past S give x - h =
 * 0 and dy = 0, so they add nothing. One run of the 16 that the short-run
 * tiles reduce together (kernels_avx512_short.c, kernels_avx512_gn.c). */
static inline __attribute__((always_inline)) void short_run(
    int bwd, const float *p, const float *q, size_t full, __mmask16 tm,
    __m512 h, __m512 *pa, __m512 *pb) {
  __m512 a = _mm512_setzero_ps(), b = a;
  /* The whole vectors without a mask, then the tail: one loop over both
   * tested a mask and a load's form per vector. */
  for (size_t s = 0; s < full; s += 16) {
    __m512 v = _mm512_sub_ps(_mm512_loadu_ps(p + s), h);
    __m512 g = bwd ? _mm512_loadu_ps(q + s) : v;
    a = _mm512_add_ps(a, g);
    b = _mm512_fmadd_ps(g, v, b);
  }
  if (tm != 0) {
    __m512 v = _mm512_maskz_sub_ps(tm, _mm512_maskz_loadu_ps(tm, p + full), h);
    __m512 g = bwd ? _mm512_maskz_loadu_ps(tm, q + full) : v;
    a = _mm512_add_ps(a, g);
    b = _mm512_fmadd_ps(g, v, b);
  }
  *pa = a;
  *pb = b;
}

/* The float sums of nc <= 16 runs of up to 256 values (L apart,
 * run j shifted by ph[j]) reduced together by the transposing tree: lane
 * j of *ta and *tb holds run j's sum of dy and dy * (x - h) (bwd), or of
 * x - h and its square. */
static inline __attribute__((always_inline)) void tile16(
    int bwd, const float *x, const float *dy, size_t nc, size_t L,
    const float *ph, __m512 *ta, __m512 *tb) {
  /* Two runs at a time, each pair reduced by the tree's first level at
   * once: 16 partial vectors wait for the tree instead of 32, which did
   * not fit the registers (the GroupNorm backward of one 1024x14x14
   * sample from the cache, in a standalone loop: 41 us, now 36). */
  __m512 ua[8], ub[8];
  size_t full = L & ~(size_t)15;
  __mmask16 tm = tail_mask(L - full);
  for (size_t j = 0; j < 16; j += 2) {
    __m512 a0 = _mm512_setzero_ps(), b0 = a0, a1 = a0, b1 = a0;
    if (j < nc)
      short_run(bwd, x + j * L, bwd ? dy + j * L : NULL, full, tm,
                _mm512_set1_ps(ph[j]), &a0, &b0);
    if (j + 1 < nc)
      short_run(bwd, x + (j + 1) * L, bwd ? dy + (j + 1) * L : NULL, full, tm,
                _mm512_set1_ps(ph[j + 1]), &a1, &b1);
    ua[j / 2] = tree1(a0, a1);
    ub[j / 2] = tree1(b0, b1);
  }
  *ta = tree16_u(ua);
  *tb = tree16_u(ub);
}

/* Moves the lanes' positions on by k <= 16 values (at most one channel
 * end, S >= 16): the flat streams over short channels of
 * kernels_avx512_gn.c and kernels_avx512_gnbwd.c. */
static inline void flat_step(__m512i *r, __m512i *idx, int k, __m512i vs) {
  *r = _mm512_add_epi32(*r, _mm512_set1_epi32(k));
  __mmask16 wrap = _mm512_cmpge_epi32_mask(*r, vs);
  *r = _mm512_mask_sub_epi32(*r, wrap, *r, vs);
  *idx = _mm512_mask_add_epi32(*idx, wrap, *idx, _mm512_set1_epi32(1));
}

/* The dx parameters of one channel as vectors: k1 = istd * w[c], and its
 * group's q, h and r (dx = k1 * dy + (q * (x - h) + r)). */
typedef struct {
  __m512 k, q, h, r;
} gn_vpar_t;

/* dx of 16 values (the lanes of m). */
static inline __m512 dx16f(const float *p, const float *d, __mmask16 m,
                           gn_vpar_t v) {
  __m512 t = _mm512_fmadd_ps(v.q, _mm512_sub_ps(load16(m, p), v.h), v.r);
  return _mm512_fmadd_ps(v.k, load16(m, d), t);
}

/* The table's gn_bwd_nchw (kernels_avx512_gn.c). */
int sbn__avx512_gn_bwd_nchw(const float *x, const float *dy, float *dx,
                            size_t G, size_t cpg, size_t S, const double *mean,
                            const double *istd, const float *w, int stats,
                            double *sdy, double *sdyx, double *dw, double *db,
                            size_t total);

/* The table's bn_bwd_nchw and bn_fwd_nchw (kernels_avx512_bnfuse.c). */
int sbn__avx512_bn_bwd_nchw(const float *x, const float *dy, float *dx,
                            size_t A, size_t C, size_t S, const double *mean,
                            const double *istd, const float *w, int stats,
                            double count, double *sdy, double *sdyx);
int sbn__avx512_bn_fwd_nchw(const float *x, float *y, size_t A, size_t C,
                            size_t S, float *k, double *s1, double *s2,
                            void (*fin)(void *arg, size_t c0, size_t c1),
                            void *arg, const float *mh, const float *ml,
                            const float *scale, const float *shift);
/* normalize_ld's y stored normally, run by run, its lines prefetched for
 * writing (kernels_avx512_bnfuse.c): A rows of lda floats, channels
 * [0, C) of S >= 16 values each. */
void sbn__avx512_norm_rows(const float *x, float *y, size_t A, size_t C,
                           size_t S, size_t lda, const float *mh,
                           const float *ml, const float *scale,
                           const float *shift);

/* Its short planes' part (kernels_avx512_gnbwd.c): 1 when it took the
 * sample, 0 when the shape is not one it takes. */
int sbn__avx512_gn_bwd_short(const float *x, const float *dy, float *dx,
                             size_t G, size_t cpg, size_t S, const double *mean,
                             const double *istd, const float *w, int stats,
                             double *dw, double *db, int nt);

/* The table's gn_fwd_nchw (kernels_avx512_gn.c). */
int sbn__avx512_gn_fwd_nchw(const float *x, float *y, size_t G, size_t cpg,
                            size_t S, const float *w, const float *b,
                            double eps, double *mean, double *istd, double *m2,
                            size_t total);

/* LayerNorm rows and dropout (kernels_avx512_rows.c); LayerNorm tiles of
 * rows (kernels_avx512_ln.c). */
void sbn__avx512_ln_forward(const float *x, float *y, size_t D, size_t total,
                            float mh, float ml, float istd, const float *w,
                            const float *b);
void sbn__avx512_ln_bwd_reduce(const float *x, const float *dy, size_t D,
                               double mean, double istd, const float *w,
                               double *dw, double *db, double sums[2]);
void sbn__avx512_ln_bwd_apply(const float *x, const float *dy, float *dx,
                              size_t D, double mean, double istd,
                              const float *w, double c2, double c3);
void sbn__avx512_ln_forward_rows(const float *x, float *y, size_t R, size_t D,
                                 size_t total, const float *mh, const float *ml,
                                 const float *istd, const float *w,
                                 const float *b);
int sbn__avx512_ln_forward_pipe(const float *x, float *y, size_t R, size_t D,
                                size_t total, double eps, const float *w,
                                const float *b, double *mean, double *istd);
void sbn__avx512_ln_bwd_rows(const float *x, const float *dy, float *dx,
                             size_t R, size_t D, const double *mean,
                             const double *istd, const float *w, double count,
                             double *dw, double *db, float *fw, float *fb,
                             float *odw, float *odb);
void sbn__avx512_dropout(const float *in, float *out, size_t n, uint64_t first,
                         const uint32_t key[2], uint32_t step, uint32_t layer,
                         uint32_t thr, float scale);
void sbn__avx512_rec_combine(const sbn_rec_t *in, sbn_rec_t *inout, size_t n);
void sbn__avx512_rec_stat(const sbn_rec_t *recs, size_t n, sbn_stat_t which,
                          double eps, double *out);
void sbn__avx512_rec_track(const sbn_rec_t *recs, size_t n, double f, float *rm,
                           float *rv);
size_t sbn__avx512_rec_fill(sbn_rec_t *recs, size_t n, const double *counts,
                            size_t cstep, const double *a, const double *b);

/* How far ahead, in bytes, BatchNorm's run_sums prefetch x and dy (bwd)
 * into L1, one prefetch per line of each (run_sums' pf). The fused
 * backward reads its group's runs from L3 in pieces of a few KB to a few
 * hundred (the group's channels of one sample), each a new stream that
 * the hardware prefetchers take some lines to find and that they drop at
 * every 4 KiB page. Backward floor ratios, four alternated runs without and
 * with 2 KiB (1 KiB measured alike, 4 KiB less): 8x128x28x28 1.33-1.51 and
 * 1.18-1.39, 8x512x28x28 1.23-1.34 and 1.08-1.18, 8x64x112x112
 * 1.26-1.38 and 1.10-1.14, 8x256x56x56 1.19-1.39 and 1.03-1.15. The
 * forward's moments gain too where the pass is fused (five runs:
 * 8x128x28x28 1.39-1.52 and 1.23-1.38, 8x64x56x56 1.27-1.38 and
 * 1.19-1.23, 8x17x64x64 1.22-1.43 and 0.99-1.23), and lose nothing on
 * whole tensors read from memory (8x256x56x56 0.74-0.84 and 0.73-0.84).
 * GroupNorm's and InstanceNorm's NCHW backward (kernels_avx512_gn.c),
 * whose groups and instances lie back to back as one stream, measured
 * no gain and pass 0. */
#define RUN_PF 2048

/* One step of run_sums: adds dy and dy * (x - h) of 16 values (bwd), or
 * x - h and its square. */
#define RUN_ACC(a, b, off)                                         \
  do {                                                             \
    __m512 v_ = _mm512_sub_ps(_mm512_loadu_ps(p + s + (off)), vh); \
    __m512 g_ = bwd ? _mm512_loadu_ps(q + s + (off)) : v_;         \
    a = _mm512_add_ps(a, g_);                                      \
    b = _mm512_fmadd_ps(g_, v_, b);                                \
  } while (0)

/* Sums of dy and of dy * (x - h) over one run of n values (bwd), or of
 * x - h and its square (the forward's moments, q unused), prefetching pf
 * bytes ahead (0: none): float over CHUNKs, folded into double
 * (kernels_avx512.c's bwd_reduce_ld takes the backward's form, its
 * moments_ld the forward's, kernels_avx512_gn.c both). The four
 * accumulator pairs are named variables: as arrays indexed in a loop, GCC
 * kept them in memory (a store and a reload per vector). */
static inline __attribute__((always_inline)) void run_sums(
    int bwd, size_t pf, const float *p, const float *q, size_t n, float h,
    double *t1, double *t2) {
  __m512 vh = _mm512_set1_ps(h);
  __m512d s1l = _mm512_setzero_pd(), s1h = s1l, s2l = s1l, s2h = s1l;
  for (size_t s = 0; s < n;) {
    size_t e = n - s > CHUNK ? s + CHUNK : n;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    __m512 b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    for (; s + 64 <= e; s += 64) {
      /* Computed as integers: the lines may lie past the run's end,
       * where a prefetch is harmless but a pointer would not be valid. */
      for (int u = 0; pf > 0 && u < 4; u++) {
        _mm_prefetch((const char *)((uintptr_t)(p + s + 16 * u) + pf),
                     _MM_HINT_T0);
        if (bwd)
          _mm_prefetch((const char *)((uintptr_t)(q + s + 16 * u) + pf),
                       _MM_HINT_T0);
      }
      RUN_ACC(a0, b0, 0);
      RUN_ACC(a1, b1, 16);
      RUN_ACC(a2, b2, 32);
      RUN_ACC(a3, b3, 48);
    }
    /* Masked lanes load dy = 0, or give x - h = 0, and add nothing. */
    for (; s < e; s += 16) {
      __mmask16 m = tail_mask(e - s);
      __m512 v = _mm512_maskz_sub_ps(m, load16(m, p + s), vh);
      __m512 g = bwd ? load16(m, q + s) : v;
      a0 = _mm512_add_ps(a0, g);
      b0 = _mm512_fmadd_ps(g, v, b0);
    }
    fold16(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)), &s1l,
           &s1h);
    fold16(_mm512_add_ps(_mm512_add_ps(b0, b1), _mm512_add_ps(b2, b3)), &s2l,
           &s2h);
  }
  *t1 += _mm512_reduce_add_pd(_mm512_add_pd(s1l, s1h));
  *t2 += _mm512_reduce_add_pd(_mm512_add_pd(s2l, s2h));
}

#endif /* SBN_KERNELS_AVX512_INL_H */
