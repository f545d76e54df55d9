/* NCHW passes of the AVX-512 set over short runs (7x7, 14x14 planes and
 * other S of 16 or more that is not a multiple of 16), where per-run
 * loops paid a head and tail per run:
 *
 *  - A streamed normalize along flat rows: each row of an (A, C, S) view
 *    is one stream of C * S elements rather than C runs of S. A run of 196
 *    values starts and ends inside cache lines, so run by run every
 *    boundary line was written partly by a masked plain store and partly
 *    by streaming stores, and a line written both ways leaves the
 *    write-combining buffer half full (the BatchNorm forward of
 *    8x1024x14x14 took 1.9 times a memcpy, 1.4 with the runs stored
 *    normally). A flat row aligns its vectors to the output's lines once,
 *    so every line is written whole one way. A vector that straddles two
 *    channels (S >= 16: never more than two) takes each lane's parameters
 *    by a mask blend.
 *  - dx in float, run by run, for runs of any length from 16 (the
 *    unfused backward's dx, kernels_avx512.c).
 *  - The 16-channel sums (moments and backward's sums for S <= SHORT_S),
 *    reduced by one transposing tree (see short_block).
 *
 * Included only in builds with the AVX-512 flags. */
#include "kernels/sbn_kernels.h"

#ifdef SBN__HAVE_AVX512
#include "kernels/avx512_inl.h"

#include "kernels/kernels_avx512_short.h"

/* The short runs' sums prefetch x (and dy) into L1, one prefetch per
 * line of each run: SHORT_PF bytes ahead for the moments of runs of at
 * most PF_S values (7x7 and 8x8 planes), RUN_PF (2 KiB, avx512_inl.h)
 * for longer runs and for the backward. A group of the fused pass reads
 * its rows' runs from L3 in pieces of 20-30 KB (160 channels of 196
 * bytes, or 32 of 784), 400 KB apart, and there the hardware's streams,
 * which stop at each 4 KiB page, left the sums waiting on their loads
 * (perf: most of their samples on the instructions after the loads).
 * Training forward floor ratios, five alternated runs without and with
 * (4, 6 and 8 KiB measured alike at 7x7, 2 KiB less): 8x2048x7x7
 * 1.72-2.11 and 1.63-1.73, 8x512x7x7 1.57-1.69 and 1.35-1.43,
 * 8x1000x7x7 1.47-1.56 and 1.19-1.32, 32x512x7x7 1.68-2.01 and
 * 1.53-1.69. At 14x14 4 KiB measured no gain and 2 KiB some (four
 * runs): 8x1024x14x14 1.41-1.51 and 1.26-1.34, 8x256x14x14 1.22-1.34
 * and 1.06-1.19, 32x256x14x14 1.31-1.75 and 1.31-1.41. The backward's
 * sums of x and dy, four runs: 8x2048x7x7 1.45-1.67 and 1.37-1.41,
 * 8x256x14x14 1.10-1.24 and 1.02-1.10, 8x1024x14x14 1.22-1.39 and
 * 1.20-1.29 (4 KiB: no gain). */
#define SHORT_PF 6144
#define PF_S 64

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
 * 7x7 dx compute-bound (warm 8x512x7x7 backward: 66 us against 105 in
 * double). Calls with fewer than SMALL_STAT values per channel, where the
 * terms cancel below fp32, do not come here. */

/* dx of one row, run by run: every run has the same trip counts, which
 * the loops predict (along flat rows, the vector that holds a channel's
 * end changes from run to run and was mispredicted: warm 8x64x14x14
 * backward 29 us against 24 run by run). dx_run_f prefetches dx's lines
 * for writing: this unfused backward (SyncBN's, or SBN_BN_SINGLE_PASS=0),
 * floor ratios without and with, alternated runs: 8x256x14x14 1.66-1.71
 * and 1.45-1.57, 8x512x7x7 1.35-1.50 and 1.21-1.27, 32x64x15x15
 * 1.72-1.78 and 1.57-1.70. */
static void run_apply_f(const float *x, const float *dy, float *dx, size_t C,
                        size_t S, const double *mean, const double *istd,
                        const double *k1, const double *k2, const double *k3) {
  for (size_t c = 0; c < C; c++) {
    float pk, pq, ph, pr;
    dx_params_f(0, c, mean, istd, k1, k2, k3, &pk, &pq, &ph, &pr);
    dx_run_f(x + c * S, dy + c * S, dx + c * S, S, pk, pq, ph, pr);
  }
}

void sbn__avx512_runs_apply(const float *x, const float *dy, float *dx,
                            size_t A, size_t C, size_t S, size_t lda,
                            const double *mean, const double *istd,
                            const double *k1, const double *k2,
                            const double *k3) {
  for (size_t a = 0; a < A; a++) {
    size_t o = a * lda;
    run_apply_f(x + o, dy + o, dx + o, C, S, mean, istd, k1, k2, k3);
  }
}

/* ------------------------------------------------------------------ */
/* Short runs (16 <= S <= SHORT_S: NCHW with 7x7 or 14x14 planes), 16
 * channels at a time. A run of 49 values is three vectors and a lane, and
 * reducing each run's two sums across lanes and into double cost more than
 * summing it (the 2048 x 7 x 7 moments ran at twice a memcpy). Here every
 * channel's lanes are summed as in run_sums, and the 16 channels' sum
 * vectors are then reduced together by a transposing tree, about 3
 * instructions per channel and sum instead of some 12, and folded into
 * double as one vector. A lane adds at most SHORT_S / 16 = 16 values and
 * the tree 4 more levels, so each sum is at most 20 float additions deep
 * (the long runs: 16 per lane and 2 levels over the four accumulators).
 * SHORT_S was 192, which left 14x14 planes (196) to the per-run loops;
 * at 256 their backward took 28 us instead of 35-43 (warm 8x64x14x14). */

/* Adds istd * (B - l * A) into s2[0..n) in double, A and B the first n
 * lanes of two float sum vectors and l = mean - h the low part of each
 * channel's split mean: backward's sum of dy * xhat from the sums of dy
 * and dy * (x - h), as pos_sums (kernels_avx512.c) forms it. */
static inline void fold_xhat(__m512 a, __m512 b, size_t n, const double *mean,
                             const double *istd, double *s2) {
  __mmask16 m = tail_mask(n);
  __mmask8 mk[2] = {(__mmask8)m, (__mmask8)(m >> 8)};
  for (int half = 0; half < 2; half++) {
    __mmask8 k = mk[half];
    const double *mp = mean + 8 * half, *ip = istd + 8 * half;
    double *sp = s2 + 8 * half;
    __m512d md = _mm512_maskz_loadu_pd(k, mp);
    __m512d l = _mm512_sub_pd(md, _mm512_cvtps_pd(_mm512_cvtpd_ps(md)));
    __m512d ad = _mm512_cvtps_pd(half ? _mm512_extractf32x8_ps(a, 1)
                                      : _mm512_castps512_ps256(a));
    __m512d bd = _mm512_cvtps_pd(half ? _mm512_extractf32x8_ps(b, 1)
                                      : _mm512_castps512_ps256(b));
    __m512d r = _mm512_mul_pd(_mm512_maskz_loadu_pd(k, ip),
                              _mm512_fnmadd_pd(l, ad, bd));
    _mm512_mask_storeu_pd(sp, k,
                          _mm512_add_pd(_mm512_maskz_loadu_pd(k, sp), r));
  }
}

/* Moments or backward sums of channels [c0, c0 + nc) (nc <= 16) of one
 * row a, added into s1 and s2 from c0 on. Moments add x - k and its
 * square; backward adds dy and dy * (x - h), h the float part of the
 * channel's mean, and fold_xhat turns the second into the sum of
 * dy * xhat: per vector three operations and one parameter instead of
 * five and three (xhat = ((x - h) - l) * istd formed per element). */
static inline __attribute__((always_inline)) void short_block(
    int bwd, const float *x, const float *dy, size_t nc, size_t S,
    const float *k, float *pick, const double *mean, const double *istd,
    double *s1, double *s2) {
  __m512 va[16], vb[16];
  size_t full = S & ~(size_t)15;
  __mmask16 tm = tail_mask(S - full);
  size_t pf = bwd || S > PF_S ? RUN_PF : SHORT_PF;
  for (size_t j = 0; j < 16; j++) {
    __m512 a = _mm512_setzero_ps(), b = a;
    if (j < nc) {
      const float *p = x + j * S, *q = bwd ? dy + j * S : NULL;
      /* As integers: the lines may lie past the tensor's end. */
      for (size_t o = 0; o < S; o += 16) {
        _mm_prefetch((const char *)((uintptr_t)(p + o) + pf), _MM_HINT_T0);
        if (bwd)
          _mm_prefetch((const char *)((uintptr_t)(q + o) + pf), _MM_HINT_T0);
      }
      __m512 h;
      if (bwd) {
        h = _mm512_set1_ps((float)mean[j]);
      } else if (pick != NULL) {
        /* The run's first element (S >= 16: a whole first vector). */
        pick[j] = p[0];
        h = _mm512_set1_ps(pick[j]);
      } else {
        h = _mm512_set1_ps(k[j]);
      }
      short_run(bwd, p, q, full, tm, h, &a, &b);
    }
    va[j] = a;
    vb[j] = b;
  }
  __m512 ta = tree16(va), tb = tree16(vb);
  fold_first(ta, nc, s1);
  if (bwd)
    fold_xhat(ta, tb, nc, mean, istd, s2);
  else
    fold_first(tb, nc, s2);
}

void sbn__avx512_short_sums(int bwd, const float *x, const float *dy, size_t A,
                            size_t C, size_t S, size_t lda, const float *k,
                            float *pick, const double *mean, const double *istd,
                            double *s1, double *s2) {
  for (size_t a = 0; a < A; a++)
    for (size_t c = 0; c < C; c += 16) {
      size_t nc = C - c < 16 ? C - c : 16, o = a * lda + c * S;
      if (bwd)
        short_block(1, x + o, dy + o, nc, S, NULL, NULL, mean + c, istd + c,
                    s1 + c, s2 + c);
      else if (pick != NULL && a == 0)
        short_block(0, x + o, NULL, nc, S, NULL, pick + c, NULL, NULL, s1 + c,
                    s2 + c);
      else
        short_block(0, x + o, NULL, nc, S, pick != NULL ? pick + c : k + c,
                    NULL, NULL, NULL, s1 + c, s2 + c);
    }
}

#endif /* SBN__HAVE_AVX512 */
