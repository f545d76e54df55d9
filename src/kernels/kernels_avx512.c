/* AVX-512 kernels (F, BW, DQ, VL; this file alone is compiled with those
 * flags, and dispatch.c picks the set only after checking the CPU). Same
 * contracts as kernels_ref.c, with two ways through an (A, C, S) view:
 *
 *  - Runs (S >= 16: NCHW, LayerNorm rows): each (a, c) run is contiguous
 *    and its per-channel parameters are broadcast. Four independent
 *    accumulators per sum.
 *  - Rows of positions (S < 16: channels-last, and GroupNorm's NHWC groups
 *    of a few channels): the tensor is seen as rows of L positions whose
 *    channels repeat, with the per-position parameters laid out once in
 *    small arrays, so every pass is a plain stream of whole vectors (and a
 *    masked tail). When lcm(C*S, 16) is small the rows are periods of the
 *    flat array, so even C = 1 or 3 fills every lane; otherwise they are
 *    tiles of each row of C*S elements. kernels_avx512_nhwc.c takes these
 *    views first (sbn__avx512_cl_*), holding a tile of a row's parameters
 *    and sums in registers; the loops here run where it declines.
 *
 * Statistics accumulate in float over short blocks (at most 16 values per
 * lane) that are folded into double, so no element is converted to double
 * and the sums keep about double's accuracy: the shifted values the
 * moments add are small (the caller shifts by a value of the data), and a
 * sum of 16 floats loses only a few float ulps of itself. Over runs, dx is
 * formed in double as dx = k1*dy + (q*x + r), q = k2*istd and
 * r = k3 - q*mean, which equals the reference's k1*dy + (k2*xhat + k3) to
 * double rounding; the position views form it in float from x - h (h the
 * float part of the mean, dx_params_f), whose terms are all of dx's size. */
#include "kernels/sbn_kernels.h"

#ifdef SBN__HAVE_AVX512
#include "kernels/avx512_inl.h"

#include "kernels/kernels_avx512_short.h"
#include "kernels/kernels_avx512_nhwc.h"
#include "kernels/kernels_geo_inl.h"

/* Float sums over the rows of one piece into per-position doubles d1, d2
 * (each holding round16(L) zeros on entry). Moments add d = x - pa and d^2;
 * backward adds dy and dy * (x - pa), pa the float part h of the mean, and
 * pos_sums forms sum dy * xhat = istd * (sum dy (x - h) - l * sum dy) per
 * channel in double (l = mean - h): one parameter per vector instead of
 * three, which keeps a wide row's arrays (a 1024-position piece: 12 KiB of
 * parameters and partial sums instead of 20) in L1 beside the streams. */
/* Positions per piece of the position view's backward (sums and dx):
 * rows of up to 2048 channels are one piece, not two of PMAX that each
 * read half of every row (C = 2048: 4 KiB of each 8 KiB row per pass,
 * where the hardware prefetcher also fetched the half it skipped). With
 * one float parameter for the sums and four for dx, a row's arrays still
 * fit in L1 beside the streams. Rows up to PMAX keep PMAX's pieces (a
 * longer period of C = 1000 would double its arrays). */
#define BMAX 2048
#define BWRAP (BMAX + 16)

static int bwd_piece(size_t A, size_t C, size_t S, size_t lda, size_t i,
                     geo_t *g, size_t *off) {
  size_t maxP = C * S <= PMAX ? PMAX : BMAX;
  return geo_piece_p(A, C, S, lda, i, 128, maxP, g, off);
}

/* The channel of positions j < n of piece g, position j taken as j % L
 * (a parameter row wraps around for dx's periodic stream). Counted rather
 * than divided: geo_chan's two divisions per position cost as much as
 * the data of a 49-row InstanceNorm or GroupNorm sample of 2048 channels,
 * whose parameters are laid out once per sample. */
static void pos_chans(const geo_t *g, size_t C, size_t S, size_t n,
                      unsigned *ch) {
  size_t s0 = g->j0 % S, c0 = (g->j0 / S) % C, s = s0, c = c0;
  for (size_t j = 0, p = 0; j < n; j++) {
    ch[j] = (unsigned)c;
    if (++p == g->L) {
      p = 0, s = s0, c = c0;
    } else if (++s == S) {
      s = 0;
      c = c + 1 == C ? 0 : c + 1;
    }
  }
}

/* The distance in floats (8 KiB) at which the backward's sums of rows up
 * to PMAX prefetch x and dy ahead, and its streamed dx (read last element
 * first) behind: without it the sums of BatchNorm NHWC 8x256x56x56 and
 * 8x512x28x28, from memory, ran at about 24 GB/s against 36 for a plain
 * sum of the same buffers (the hardware prefetcher alone keeps too few
 * lines in flight), and dx as long as the two-read-one-write floor. The
 * sums prefetch at every size: on the AMD EPYC views under want_nt's 4 MiB
 * measured no gain, and on an Intel core of 2 MiB L2 the sums of 8x256x14x14,
 * 8x512x7x7, 8x1024x7x7 and 8x128x28x28 (1.6 to 3.2 MB per tensor, read
 * from L3) took 0.7 to 0.85 of their time without it (throwaway harness,
 * same-run A/B). A dx stored normally keeps none (dx of 8x128x28x28 with
 * plain stores, 3.2 MB: 1.2-1.3 times slower with it). */
#define POS_PF 2048

static inline __attribute__((always_inline)) void piece_sums(
    int bwd, const float *x, const float *dy, const geo_t *g, const float *pa,
    double *d1, double *d2, size_t pf) {
  float f1[BMAX] __attribute__((aligned(64)));
  float f2[BMAX] __attribute__((aligned(64)));
  size_t L = g->L;
  for (size_t r0 = 0; r0 < g->rows; r0 += RB) {
    size_t r1 = g->rows - r0 < RB ? g->rows : r0 + RB;
    for (size_t j = 0; j < L; j += 16) {
      _mm512_store_ps(f1 + j, _mm512_setzero_ps());
      _mm512_store_ps(f2 + j, _mm512_setzero_ps());
    }
    for (size_t r = r0; r < r1; r++) {
      const float *p = x + r * g->stride, *q = dy + r * g->stride;
      for (size_t j = 0; j < L; j += 16) {
        __mmask16 m = tail_mask(L - j);
        if (bwd && pf > 0) {
          /* Computed as integers: the lines may lie past the end. */
          _mm_prefetch((const char *)((uintptr_t)(p + j) + 4 * pf),
                       _MM_HINT_T0);
          _mm_prefetch((const char *)((uintptr_t)(q + j) + 4 * pf),
                       _MM_HINT_T0);
        }
        __m512 v = load16(m, p + j);
        __m512 a = _mm512_load_ps(f1 + j), b = _mm512_load_ps(f2 + j);
        if (bwd) {
          /* dy * (x - h) only: pos_sums applies the low part of the
           * mean and istd per channel. */
          __m512 gv = load16(m, q + j);
          __m512 xs = _mm512_sub_ps(v, _mm512_load_ps(pa + j));
          a = _mm512_add_ps(a, gv);
          b = _mm512_fmadd_ps(gv, xs, b);
        } else {
          __m512 d = _mm512_maskz_sub_ps(m, v, _mm512_load_ps(pa + j));
          a = _mm512_add_ps(a, d);
          b = _mm512_fmadd_ps(d, d, b);
        }
        _mm512_store_ps(f1 + j, a);
        _mm512_store_ps(f2 + j, b);
      }
    }
    for (size_t j = 0; j < L; j += 16) {
      fold_mem(_mm512_load_ps(f1 + j), d1 + j);
      fold_mem(_mm512_load_ps(f2 + j), d2 + j);
    }
  }
}

/* Rows of a block that the backward sums of a wide piece take together:
 * each vector of a column is loaded once for BR rows instead of once per
 * row, and its float partial sums stay in registers across them. Each
 * load prefetches the same line BR rows on (dx: BR rows back), addresses
 * computed as integers since they may lie past the tensor: the hardware
 * prefetcher kept too few of the 2 BR streams' lines in flight, and
 * BatchNorm NHWC 8x2048x7x7 and 4x2048x14x14 backward took 0.81 and 0.78
 * of their time without it (medians of six alternations in `syncbn bench
 * kernels`; 8 rows ahead was no better). */
#define BR 4

/* The backward's piece_sums (dy and dy * (x - h)), BR rows at a time: a
 * row of 2048 positions has 16 KiB of float partial sums and 8 KiB of
 * parameters, which with the streams overflow the 32 KiB L1, so that
 * piece_sums' load and store of both partial sums per vector of data went
 * to L2 (perf: its sums of a 7x7 sample of 2048 channels took longer
 * than a two-read-one-write stream of the same bytes). */
static void piece_bwd_sums(const float *x, const float *dy, const geo_t *g,
                           const float *pa, double *d1, double *d2) {
  float f1[BMAX] __attribute__((aligned(64)));
  float f2[BMAX] __attribute__((aligned(64)));
  size_t L = g->L, st = g->stride;
  for (size_t r0 = 0; r0 < g->rows; r0 += RB) {
    size_t r1 = g->rows - r0 < RB ? g->rows : r0 + RB;
    for (size_t j = 0; j < L; j += 16) {
      _mm512_store_ps(f1 + j, _mm512_setzero_ps());
      _mm512_store_ps(f2 + j, _mm512_setzero_ps());
    }
    for (size_t r = r0; r < r1; r += BR) {
      size_t nr = r1 - r < BR ? r1 - r : BR;
      const float *p = x + r * st, *q = dy + r * st;
      for (size_t j = 0; j < L; j += 16) {
        __mmask16 m = tail_mask(L - j);
        __m512 h = _mm512_load_ps(pa + j);
        __m512 a = _mm512_load_ps(f1 + j), b = _mm512_load_ps(f2 + j);
        for (size_t i = 0; i < nr; i++) {
          /* The same lines of the next block's rows (see BR). */
          _mm_prefetch((const char *)((uintptr_t)(p + (i + BR) * st + j)),
                       _MM_HINT_T0);
          _mm_prefetch((const char *)((uintptr_t)(q + (i + BR) * st + j)),
                       _MM_HINT_T0);
          /* Masked-off lanes load dy = 0 and add nothing. */
          __m512 gv = load16(m, q + i * st + j);
          a = _mm512_add_ps(a, gv);
          b = _mm512_fmadd_ps(gv, _mm512_sub_ps(load16(m, p + i * st + j), h),
                              b);
        }
        _mm512_store_ps(f1 + j, a);
        _mm512_store_ps(f2 + j, b);
      }
    }
    for (size_t j = 0; j < L; j += 16) {
      fold_mem(_mm512_load_ps(f1 + j), d1 + j);
      fold_mem(_mm512_load_ps(f2 + j), d2 + j);
    }
  }
}

/* The backward's piece_sums, prefetching POS_PF ahead. */
static void piece_sums_b(const float *x, const float *dy, const geo_t *g,
                         const float *pa, double *d1, double *d2) {
  piece_sums(1, x, dy, g, pa, d1, d2, POS_PF);
}

/* The backward sums of a flat piece (rows of L <= PMAX back to back, ch
 * its channels laid out over L16 + 16 positions) read from x's first
 * line boundary on, h elements in: its parameters and sums rotated by h
 * (position j of a row holds the channel of (j + h) mod L), the rows from
 * x + h, the short last row, and the h elements before in double. Offset
 * from a line (malloc's 16 bytes), every vector load of x and dy took two
 * lines. Returns the rotated channel map. */
static const unsigned *pos_bwd_flat(const float *x, const float *dy,
                                    const geo_t *g, size_t h,
                                    const unsigned *ch, const double *mean,
                                    const double *istd, float *pa, float *pb,
                                    float *pc, double *d1, double *d2) {
  size_t L = g->L, L16 = (L + 15) & ~(size_t)15, rows = g->rows - 1;
  const unsigned *cr = ch + h;
  for (size_t j = 0; j < L16; j++)
    lane_params(1, j, cr[j], NULL, mean, istd, pa, pb, pc, d1, d2);
  geo_t body = {rows, L, L, 0}, last = {1, L, L - h, 0};
  piece_sums_b(x + h, dy + h, &body, pa, d1, d2);
  piece_sums_b(x + h + rows * L, dy + h + rows * L, &last, pa, d1, d2);
  for (size_t i = 0; i < h; i++) {
    size_t j = L - h + i;
    d1[j] += dy[i];
    d2[j] += (double)dy[i] * (double)(x[i] - pa[j]);
  }
  return cr;
}

/* The sums of the position view: lays out the per-position parameters of
 * each piece, sums it, and adds the per-position results to their
 * channels. k (moments) or mean and istd (backward) are per channel. */
static inline __attribute__((always_inline)) void pos_sums(
    int bwd, const float *x, const float *dy, size_t A, size_t C, size_t S,
    size_t lda, const float *k, const double *mean, const double *istd,
    double *s1, double *s2) {
  float pa[BMAX] __attribute__((aligned(64)));
  float pb[BMAX] __attribute__((aligned(64)));
  float pc[BMAX] __attribute__((aligned(64)));
  double d1[BMAX] __attribute__((aligned(64)));
  double d2[BMAX] __attribute__((aligned(64)));
  unsigned ch[BMAX];
  geo_t g[1];
  size_t off;
  for (size_t i = 0; bwd_piece(A, C, S, lda, i, g, &off); i++) {
    size_t L = g->L, L16 = (L + 15) & ~(size_t)15, n = g->rows * L;
    const unsigned *cr = ch;
    size_t h = bwd && L <= PMAX && L >= 16 && g->stride == L && g->rows >= 16
                   ? head_elems(x + off, n, 1)
                   : 0;
    /* Lanes past L take any channel's parameters: they add zeros. */
    pos_chans(g, C, S, L16 + (h > 0 ? 16 : 0), ch);
    if (h > 0) {
      cr = pos_bwd_flat(x + off, dy + off, g, h, ch, mean, istd, pa, pb, pc, d1,
                        d2);
    } else {
      for (size_t j = 0; j < L16; j++)
        lane_params(bwd, j, ch[j], k, mean, istd, pa, pb, pc, d1, d2);
      if (bwd && L > PMAX)
        piece_bwd_sums(x + off, dy + off, g, pa, d1, d2);
      else if (bwd)
        piece_sums_b(x + off, dy + off, g, pa, d1, d2);
      else
        piece_sums(0, x + off, NULL, g, pa, d1, d2, 0);
    }
    for (size_t j = 0; j < L; j++) {
      size_t c = cr[j];
      s1[c] += d1[j];
      if (bwd)
        s2[c] += istd[c] * (d2[j] - (mean[c] - (double)(float)mean[c]) * d1[j]);
      else
        s2[c] += d2[j];
    }
  }
}

/* ------------------------------------------------------------------ */
/* Runs (S >= 16). */

static void run_normalize(const float *p, float *q, size_t n, float h, float l,
                          float sc, float sh, int nt) {
  __m512 vh = _mm512_set1_ps(h), vl = _mm512_set1_ps(l);
  __m512 vs = _mm512_set1_ps(sc), vb = _mm512_set1_ps(sh);
  size_t s = head_elems(q, n, nt);
  if (s > 0) {
    __mmask16 m = tail_mask(s);
    __m512 v = _mm512_sub_ps(_mm512_sub_ps(load16(m, p), vh), vl);
    store16(q, _mm512_fmadd_ps(v, vs, vb), m, 0);
  }
  for (; s + 32 <= n; s += 32) {
    __m512 v0 = _mm512_sub_ps(_mm512_sub_ps(_mm512_loadu_ps(p + s), vh), vl);
    __m512 v1 =
        _mm512_sub_ps(_mm512_sub_ps(_mm512_loadu_ps(p + s + 16), vh), vl);
    store16(q + s, _mm512_fmadd_ps(v0, vs, vb), 0xFFFF, nt);
    store16(q + s + 16, _mm512_fmadd_ps(v1, vs, vb), 0xFFFF, nt);
  }
  for (; s < n; s += 16) {
    __mmask16 m = tail_mask(n - s);
    __m512 v = _mm512_sub_ps(_mm512_sub_ps(load16(m, p + s), vh), vl);
    store16(q + s, _mm512_fmadd_ps(v, vs, vb), m, nt);
  }
}

/* dx over one run with broadcast double parameters (see dx16). */
static void run_apply(const float *p, const float *g, float *q, size_t n,
                      double k1, double qq, double r) {
  __m512d a = _mm512_set1_pd(k1), b = _mm512_set1_pd(qq);
  __m512d c = _mm512_set1_pd(r);
  for (size_t s = 0; s < n; s += 16) {
    __mmask16 m = tail_mask(n - s);
    __m512 v = dx16(load16(m, p + s), load16(m, g + s), a, a, b, b, c, c);
    store16(q + s, v, m, 0);
  }
}

/* ------------------------------------------------------------------ */
/* Elementwise passes over the position view. */

/* y = ((x - h) - l) * sc + sh with per-position parameters. */
/* Per-position parameters of a piece, with the first 16 positions
 * repeated after the last, so that a vector starting at any position
 * p < L of a contiguous piece reads its parameters at [p, p + 16). */
#define PWRAP (PMAX + 16)

/* One vector of normalize at positions [j, j + 16) of the parameters. */
static inline __m512 norm16(__m512 x, const float *ph, const float *pl,
                            const float *ps, const float *pb, size_t j) {
  __m512 v = _mm512_sub_ps(_mm512_sub_ps(x, _mm512_loadu_ps(ph + j)),
                           _mm512_loadu_ps(pl + j));
  return _mm512_fmadd_ps(v, _mm512_loadu_ps(ps + j), _mm512_loadu_ps(pb + j));
}

/* y = ((x - h) - l) * sc + sh with per-position parameters. A contiguous
 * piece (rows of L positions back to back) is one flat stream whose
 * vectors may start at any position, so that a streaming pass can align
 * its stores to cache lines whatever y's alignment (head_elems). */
static void pos_normalize(const float *x, float *y, size_t A, size_t C,
                          size_t S, size_t lda, const float *mh,
                          const float *ml, const float *scale,
                          const float *shift) {
  float ph[PWRAP], pl[PWRAP], ps[PWRAP], pb[PWRAP];
  int nt = want_nt(A, C, S, lda);
  geo_t g[1];
  size_t off;
  for (size_t i = 0; geo_piece(A, C, S, lda, i, g, &off); i++) {
    size_t L = g->L;
    for (size_t j = 0; j < L + 16; j++) {
      size_t c = geo_chan(g, j % L, C, S);
      ph[j] = mh[c], pl[j] = ml[c], ps[j] = scale[c], pb[j] = shift[c];
    }
    const float *p = x + off;
    float *q = y + off;
    if (g->stride == L && L >= 16) {
      size_t n = g->rows * L, s = head_elems(q, n, nt), j = s;
      if (s > 0)
        store16(q, norm16(load16(tail_mask(s), p), ph, pl, ps, pb, 0),
                tail_mask(s), 0);
      for (; s < n; s += 16, j = j + 16 >= L ? j + 16 - L : j + 16) {
        __mmask16 m = tail_mask(n - s);
        store16(q + s, norm16(load16(m, p + s), ph, pl, ps, pb, j), m, nt);
      }
      continue;
    }
    for (size_t r = 0; r < g->rows; r++, p += g->stride, q += g->stride)
      for (size_t j = 0; j < L; j += 16) {
        __mmask16 m = tail_mask(L - j);
        store16(q + j, norm16(load16(m, p + j), ph, pl, ps, pb, j), m, 0);
      }
  }
  _mm_sfence();
  _mm256_zeroupper(); /* as in pos_apply */
}

/* One vector of dx at positions [j, j + 16) of the float parameters:
 * k1*dy + (q*(x - h) + r) with h the float part of the mean and
 * r = k3 - q*(mean - h). x - h is exact for x within a factor of two of h
 * and small otherwise, so every term is of dx's own magnitude and float
 * keeps dx to a few float ulps of it, as dx16's double does, with four
 * float parameter loads and three operations per vector instead of six
 * double loads, four conversions and a pack (perf: the double form's
 * parameters of a 1024-position row, 24 KiB, and its arithmetic made the
 * wide channels-last dx 1.5 times the two-pass floor). */
static inline __m512 apply16f(__m512 x, __m512 g, const float *pk,
                              const float *pq, const float *ph, const float *pr,
                              size_t j) {
  __m512 d = _mm512_sub_ps(x, _mm512_loadu_ps(ph + j));
  __m512 t =
      _mm512_fmadd_ps(_mm512_loadu_ps(pq + j), d, _mm512_loadu_ps(pr + j));
  return _mm512_fmadd_ps(_mm512_loadu_ps(pk + j), g, t);
}

/* Whether pos_apply streams dx: whenever x, dy and dx together fill more
 * than half of the core's L2. Stored normally, each line of dx is first
 * read (from L3 or memory) and allocated in L2, where it evicts the x and
 * dy that the pass is about to read (least recently used first: the very
 * lines it reads next). A call is one InstanceNorm or GroupNorm sample, or
 * a BatchNorm tensor. Streaming only pays where the caches would not keep
 * dx for its reader anyway, which `syncbn bench kernels` cannot show (it
 * never rereads dx): there, streamed dx was faster at every size down to
 * 100 KB. Half the L2 leaves room for what the next call reads. History:
 * dx streamed from want_nt's 4 MiB on, and where x and dy fit half of a
 * 1 MiB L2 but x, dy and dx did not; on the AMD EPYC of 1 MiB L2 streaming
 * every view of 256 KiB or more measured no change beyond the scatter at C
 * = 512-2048 (README, "streamed tile dx"), and on an Intel core of 2 MiB L2
 * the dx of BatchNorm NHWC 8x256x14x14, 8x512x7x7, 8x128x28x28 and
 * 8x2048x7x7 (1.6 to 3.2 MB per tensor) took 0.5 to 0.75 of its time
 * stored normally (throwaway harness, same-run A/B, rotating copies). With
 * dx's prefetch (POS_PF) the dx of 8x256x56x56 took 0.8 of its time
 * stored normally. */
static int pos_apply_nt(size_t A, size_t C, size_t S, size_t lda) {
  size_t span = (A > 0 ? (A - 1) * lda + C * S : 0) * sizeof(float);
  return 2 * 3 * span > sbn__l2_bytes() || want_nt(A, C, S, lda);
}

/* dx of the rows of a piece wider than PMAX, BR rows at a time, last to
 * first (see pos_apply): its four float parameters (32 KiB for 2048
 * positions) overflow the L1 beside the streams, so each vector of them
 * is loaded once for BR rows instead of once per row, as the sums do
 * (piece_bwd_sums). Streams only when every vector starts a line. */
static void pos_apply_wide(const float *p, const float *d, float *q,
                           const geo_t *g, const float *pk, const float *pq,
                           const float *ph, const float *pr, int nt) {
  size_t L = g->L, st = g->stride, nb = (g->rows + BR - 1) / BR;
  nt = nt && L % 16 == 0 && st % 16 == 0 && ((uintptr_t)q & 63) == 0;
  for (size_t b = nb; b-- > 0;) {
    size_t r0 = b * BR, nr = g->rows - r0 < BR ? g->rows - r0 : BR;
    for (size_t j = (L - 1) / 16 * 16 + 16; j > 0;) {
      j -= 16;
      __mmask16 m = tail_mask(L - j);
      __m512 vk = _mm512_loadu_ps(pk + j), vq = _mm512_loadu_ps(pq + j);
      __m512 vh = _mm512_loadu_ps(ph + j), vr = _mm512_loadu_ps(pr + j);
      for (size_t i = nr; i-- > 0;) {
        size_t o = (r0 + i) * st + j;
        /* The same lines of the block before (see piece_bwd_sums). */
        _mm_prefetch((const char *)((uintptr_t)(p + o) - 4 * BR * st),
                     _MM_HINT_T0);
        _mm_prefetch((const char *)((uintptr_t)(d + o) - 4 * BR * st),
                     _MM_HINT_T0);

        __m512 t = _mm512_fmadd_ps(vq, _mm512_sub_ps(load16(m, p + o), vh), vr);
        store16(q + o, _mm512_fmadd_ps(vk, load16(m, d + o), t), m, nt);
      }
    }
  }
}

/* dx of a flat piece of n elements (rows of L back to back) as one
 * stream from dx's first line boundary (h elements in, streamed when nt
 * is set), the last vector first, then the h elements before; prefetching
 * x and dy pf floats behind (0: none). */
static inline __attribute__((always_inline)) void pos_apply_flat(
    const float *p, const float *d, float *q, size_t n, size_t L,
    const float *pk, const float *pq, const float *ph, const float *pr, int nt,
    size_t pf) {
  size_t h = head_elems(q, n, nt);
  /* Vectors from position h on, the last one first (j: its start modulo
   * L, stepped down by 16 with a wrap). */
  for (size_t s = n > h ? h + (n - h - 1) / 16 * 16 : h, j = s % L; s < n;
       j = j >= 16 ? j - 16 : j + L - 16) {
    __mmask16 m = tail_mask(n - s);
    if (pf > 0) {
      /* Computed as integers: the lines may lie before the start. */
      _mm_prefetch((const char *)((uintptr_t)(p + s) - 4 * pf), _MM_HINT_T0);
      _mm_prefetch((const char *)((uintptr_t)(d + s) - 4 * pf), _MM_HINT_T0);
    }
    store16(q + s,
            apply16f(load16(m, p + s), load16(m, d + s), pk, pq, ph, pr, j), m,
            nt);
    if (s == h)
      break;
    s -= 16;
  }
  if (h > 0) {
    __mmask16 m = tail_mask(h);
    store16(q, apply16f(load16(m, p), load16(m, d), pk, pq, ph, pr, 0), m, 0);
  }
}

/* dx with per-position float parameters (see apply16f), laid out and
 * streamed like pos_normalize. */
static void pos_apply(const float *x, const float *dy, float *dx, size_t A,
                      size_t C, size_t S, size_t lda, const double *mean,
                      const double *istd, const double *k1, const double *k2,
                      const double *k3) {
  float pk[BWRAP], pq[BWRAP], ph[BWRAP], pr[BWRAP];
  unsigned ch[BWRAP];
  int nt = pos_apply_nt(A, C, S, lda);
  geo_t g[1];
  size_t off;
  size_t np = 0;
  while (bwd_piece(A, C, S, lda, np, g, &off))
    np++;
  /* Last element first: the sums just read x and dy front to back, so
   * their last lines are the ones still in L2 (and the first the ones
   * evicted); read backwards, a pass whose x and dy exceed the L2 finds
   * the most recent megabyte there before it goes to L3. */
  for (size_t i = np; i-- > 0;) {
    bwd_piece(A, C, S, lda, i, g, &off);
    size_t L = g->L;
    pos_chans(g, C, S, L + 16, ch);
    for (size_t j = 0; j < L + 16; j++)
      dx_params_f(j, ch[j], mean, istd, k1, k2, k3, pk, pq, ph, pr);
    const float *p = x + off, *d = dy + off;
    float *q = dx + off;
    if (L > PMAX) {
      pos_apply_wide(p, d, q, g, pk, pq, ph, pr, nt);
      continue;
    }
    if (g->stride == L && L >= 16) {
      size_t n = g->rows * L;
      /* One instance per prefetch distance, so that the loop has no test. */
      if (nt)
        pos_apply_flat(p, d, q, n, L, pk, pq, ph, pr, 1, POS_PF);
      else
        pos_apply_flat(p, d, q, n, L, pk, pq, ph, pr, 0, 0);
      continue;
    }
    for (size_t r = g->rows; r-- > 0;) {
      size_t o = r * g->stride;
      for (size_t j = (L - 1) / 16 * 16 + 16; j > 0;) {
        j -= 16;
        __mmask16 m = tail_mask(L - j);
        store16(q + o + j,
                apply16f(load16(m, p + o + j), load16(m, d + o + j), pk, pq, ph,
                         pr, j),
                m, 0);
      }
    }
  }
  _mm_sfence();
  /* GCC leaves this function (a tail call of avx512_bwd_apply) without
   * clearing the upper vector state, which then slows the caller's SSE
   * code (the bench's floor ran at half speed after it). */
  _mm256_zeroupper();
}

/* ------------------------------------------------------------------ */
/* The table's entries: runs when S >= 16, the position view otherwise. */

static void avx512_moments_ld(const float *x, size_t A, size_t C, size_t S,
                              size_t lda, const float *k, double *s1,
                              double *s2) {
  /* With very few values per statistic, dx depends on the variance to far
   * below fp32 (two values: a relative error d of var moves dx by about
   * d * var/eps), so such small calls keep the reference's double sums. */
  if (A * S < SMALL_STAT) {
    sbn__kernels_ref.moments_ld(x, A, C, S, lda, k, s1, s2);
    return;
  }
  if (S < 16) {
    if (sbn__avx512_cl_sums(0, x, NULL, A, C, S, lda, k, NULL, NULL, s1, s2))
      return;
    pos_sums(0, x, NULL, A, C, S, lda, k, NULL, NULL, s1, s2);
    return;
  }
  if (S <= SHORT_S) {
    sbn__avx512_short_sums(0, x, NULL, A, C, S, lda, k, NULL, NULL, NULL, s1,
                           s2);
    return;
  }
  for (size_t a = 0; a < A; a++)
    for (size_t c = 0; c < C; c++)
      run_sums(0, RUN_PF, x + a * lda + c * S, NULL, S, k[c], &s1[c], &s2[c]);
}

/* Short runs take their shift from their first load; other views set it
 * first and take moments_ld. */
static void avx512_moments_pick(const float *x, size_t A, size_t C, size_t S,
                                size_t lda, float *k, double *s1, double *s2) {
  if (A * S >= SMALL_STAT && S >= 16 && S <= SHORT_S && A > 0) {
    sbn__avx512_short_sums(0, x, NULL, A, C, S, lda, NULL, k, NULL, NULL, s1,
                           s2);
    return;
  }
  for (size_t c = 0; c < C; c++)
    k[c] = A > 0 && S > 0 ? x[c * S] : 0.0f;
  avx512_moments_ld(x, A, C, S, lda, k, s1, s2);
}

static void avx512_normalize_ld(const float *x, float *y, size_t A, size_t C,
                                size_t S, size_t lda, const float *mh,
                                const float *ml, const float *scale,
                                const float *shift) {
  if (S < 16) {
    if (sbn__avx512_cl_normalize(x, y, A, C, S, lda, mh, ml, scale, shift))
      return;
    pos_normalize(x, y, A, C, S, lda, mh, ml, scale, shift);
    return;
  }
  int nt = want_nt(A, C, S, lda);
  if (flat_norm(S, nt)) {
    sbn__avx512_flat_normalize(x, y, A, C, S, lda, mh, ml, scale, shift, nt);
    return;
  }
  if (!nt) /* y's lines prefetched for writing (kernels_avx512_bnfuse.c) */
    sbn__avx512_norm_rows(x, y, A, C, S, lda, mh, ml, scale, shift);
  for (size_t a = 0; nt && a < A; a++)
    for (size_t c = 0; c < C; c++) {
      size_t o = a * lda + c * S;
      run_normalize(x + o, y + o, S, mh[c], ml[c], scale[c], shift[c], nt);
    }
  _mm_sfence();
}

static void avx512_bwd_reduce_ld(const float *x, const float *dy, size_t A,
                                 size_t C, size_t S, size_t lda,
                                 const double *mean, const double *istd,
                                 double *sdy, double *sdyx) {
  /* A statistic has at least A * S values. With very few (two: dx is
   * about eps/var times dy) dx cancels far below fp32, and only sums of
   * xhat in double keep it; such calls are small, so they take the
   * reference's double loops. */
  if (A * S < SMALL_STAT) {
    sbn__kernels_ref.bwd_reduce_ld(x, dy, A, C, S, lda, mean, istd, sdy, sdyx);
    return;
  }
  if (S < 16) {
    if (sbn__avx512_cl_sums(1, x, dy, A, C, S, lda, NULL, mean, istd, sdy,
                            sdyx))
      return;
    pos_sums(1, x, dy, A, C, S, lda, NULL, mean, istd, sdy, sdyx);
    return;
  }
  if (S <= SHORT_S) {
    sbn__avx512_short_sums(1, x, dy, A, C, S, lda, NULL, NULL, mean, istd, sdy,
                           sdyx);
    return;
  }
  for (size_t a = 0; a < A; a++)
    for (size_t c = 0; c < C; c++) {
      /* The sums of dy and dy * (x - h), h the float part of the mean,
       * and from them the sum of dy * xhat in double, as the short runs'
       * fold_xhat forms it: three operations per vector instead of five
       * for xhat per element. */
      size_t o = a * lda + c * S;
      float h = (float)mean[c];
      double t1 = 0, t2 = 0;
      run_sums(1, RUN_PF, x + o, dy + o, S, h, &t1, &t2);
      sdy[c] += t1;
      sdyx[c] += istd[c] * (t2 - (mean[c] - (double)h) * t1);
    }
}

static void avx512_bwd_apply_ld(const float *x, const float *dy, float *dx,
                                size_t A, size_t C, size_t S, size_t lda,
                                const double *mean, const double *istd,
                                const double *k1, const double *k2,
                                const double *k3) {
  /* The position views form dx in float, whose terms cancel where a
   * statistic has very few values (two: dx is about eps/var times dy), as
   * in bwd_reduce_ld; such calls are small and take the reference's
   * double. */
  if (S < 16 && A * S < SMALL_STAT) {
    sbn__kernels_ref.bwd_apply_ld(x, dy, dx, A, C, S, lda, mean, istd, k1, k2,
                                  k3);
    return;
  }
  if (S < 16) {
    if (sbn__avx512_cl_apply(x, dy, dx, A, C, S, lda, mean, istd, k1, k2, k3))
      return;
    pos_apply(x, dy, dx, A, C, S, lda, mean, istd, k1, k2, k3);
    return;
  }
  /* Runs of 16 or more take float dx run by run, dx's lines prefetched
   * for writing (kernels_avx512_short.c), as the fused pass forms it. The
   * double form ran long runs at 1.41-1.47 of the floor against 1.28-1.33
   * (8x256x56x56, SBN_BN_SINGLE_PASS=0, alternated runs, Xeon with 2 MiB
   * of L2), 8x512x28x28 1.41-1.52 and 1.25-1.34. dx is not streamed: at
   * 8 and 25 MB (NHWC) it took 1.32 of the floor streamed, 1.13 stored. */
  if (A * S >= SMALL_STAT) {
    sbn__avx512_runs_apply(x, dy, dx, A, C, S, lda, mean, istd, k1, k2, k3);
    return;
  }
  for (size_t a = 0; a < A; a++)
    for (size_t c = 0; c < C; c++) {
      size_t o = a * lda + c * S;
      double q = k2[c] * istd[c];
      run_apply(x + o, dy + o, dx + o, S, k1[c], q, k3[c] - q * mean[c]);
    }
}

/* A block of a large output streams when the output is NT_BYTES or more
 * (see normalize_part) and its runs are long: a run's first and last
 * lines are shared with its neighbours and written with plain stores, and
 * a line written both ways leaves the write-combining buffer half full
 * (14x14 planes streamed ran 1.8 times slower than stored). The position
 * view (S < 16) keeps its own choice. */
#define NT_MIN_RUN 512
static void avx512_normalize_part(const float *x, float *y, size_t C, size_t S,
                                  size_t total, const float *mh,
                                  const float *ml, const float *scale,
                                  const float *shift) {
  if (S < 16) {
    pos_normalize(x, y, 1, C, S, C * S, mh, ml, scale, shift);
    return;
  }
  int nt = total >= NT_BYTES / sizeof(float) && S >= NT_MIN_RUN;
  for (size_t c = 0; c < C; c++)
    run_normalize(x + c * S, y + c * S, S, mh[c], ml[c], scale[c], shift[c],
                  nt);
  _mm_sfence();
}

/* The dense view is the strided one with rows C * S apart. */
static void avx512_moments(const float *x, size_t A, size_t C, size_t S,
                           const float *k, double *s1, double *s2) {
  avx512_moments_ld(x, A, C, S, C * S, k, s1, s2);
}

static void avx512_normalize(const float *x, float *y, size_t A, size_t C,
                             size_t S, const float *mh, const float *ml,
                             const float *scale, const float *shift) {
  avx512_normalize_ld(x, y, A, C, S, C * S, mh, ml, scale, shift);
}

static void avx512_bwd_reduce(const float *x, const float *dy, size_t A,
                              size_t C, size_t S, const double *mean,
                              const double *istd, double *sdy, double *sdyx) {
  avx512_bwd_reduce_ld(x, dy, A, C, S, C * S, mean, istd, sdy, sdyx);
}

static void avx512_bwd_apply(const float *x, const float *dy, float *dx,
                             size_t A, size_t C, size_t S, const double *mean,
                             const double *istd, const double *k1,
                             const double *k2, const double *k3) {
  avx512_bwd_apply_ld(x, dy, dx, A, C, S, C * S, mean, istd, k1, k2, k3);
}

const sbn__kernels_t sbn__kernels_avx512 = {
    .name = "avx512",
    .moments = avx512_moments,
    .normalize = avx512_normalize,
    .bwd_reduce = avx512_bwd_reduce,
    .bwd_apply = avx512_bwd_apply,
    .moments_ld = avx512_moments_ld,
    .moments_pick = avx512_moments_pick,
    .normalize_ld = avx512_normalize_ld,
    .bwd_reduce_ld = avx512_bwd_reduce_ld,
    .bwd_apply_ld = avx512_bwd_apply_ld,
    .normalize_part = avx512_normalize_part,
    .gn_fwd_nchw = sbn__avx512_gn_fwd_nchw,
    .gn_bwd_nchw = sbn__avx512_gn_bwd_nchw,
    .bn_bwd_nchw = sbn__avx512_bn_bwd_nchw,
    .bn_fwd_nchw = sbn__avx512_bn_fwd_nchw,
    .gn_fwd_nhwc = sbn__avx512_gn_fwd_nhwc,
    .gn_bwd_nhwc = sbn__avx512_gn_bwd_nhwc,
    .ln_forward = sbn__avx512_ln_forward,
    .ln_bwd_reduce = sbn__avx512_ln_bwd_reduce,
    .ln_bwd_apply = sbn__avx512_ln_bwd_apply,
    .ln_bwd_rows = sbn__avx512_ln_bwd_rows,
    .ln_forward_rows = sbn__avx512_ln_forward_rows,
    .ln_forward_pipe = sbn__avx512_ln_forward_pipe,
    .dropout = sbn__avx512_dropout,
    .rec_combine = sbn__avx512_rec_combine,
    .rec_stat = sbn__avx512_rec_stat,
    .rec_track = sbn__avx512_rec_track,
    .rec_fill = sbn__avx512_rec_fill,
};
#endif /* SBN__HAVE_AVX512 */
