/* AVX-512 LayerNorm over several rows: the forward's normalization of a
 * chunk of rows, column block by column block across them (each block of
 * the row-sized weight and bias loaded once for the chunk), and the whole
 * backward, rows two at a time. Compiled with the AVX-512 flags, run only
 * after dispatch.c's CPU check; same contracts as kernels_ref.c (the
 * single-row entries are in kernels_avx512_rows.c). */
#include "kernels/sbn_kernels.h"

#ifdef SBN__HAVE_AVX512
#include "kernels/avx512_inl.h"

/* Columns per forward block: 16 vectors of w and b, which stay in L1
 * while the chunk's rows take them. */
#define LN_B 256
/* Longest rows whose dx pass prefetches the next rows (elements): past
 * this, two pairs of rows' x and dy (8 MiB and more) plus the row-sized w,
 * fw and fb overrun the 32 MiB L3 once the prefetched pair arrives, and
 * evict the pair being applied. Measured (same-run A/B, 4 alternating
 * runs) without the prefetch past 256k elements: floor ratio 1.87 -> 1.71
 * at 400k-element rows, 2.40 -> 2.25 and 2.38 -> 2.01 at 800k; a limit
 * of 100k made 200k-element rows slower (1.62 -> 1.73). */
#define LN_AHEAD_MAX ((size_t)256 << 10)

/* ------------------------------------------------------------------ */
/* How far ahead plain stores of y and dx prefetch their lines for writing
 * (PREFETCHW; this file is compiled with -mprfchw): each line of a plain
 * store is first read for ownership, and perf put most of the backward's
 * samples on the dx stores and the instructions after them. Floor ratios,
 * without and with, alternated runs (rows eight at a time where they
 * go), backward: 8x256x14x14 1.53-1.62 and 1.34-1.57, 8x1024x14x14
 * 1.64-1.77 and 1.53-1.66, 8x128x28x28 1.64-1.76 and 1.54-1.79; forward
 * (here and in kernels_avx512_lnpipe.c): 8x256x14x14 1.31-1.47 and
 * 1.13-1.21, 8x17x64x64 1.58-1.74 and 1.29-1.33, 8x2048x7x7 1.75-1.79
 * and 1.59-1.73, the others within the noise. */
#define LNB_PFW 1024

/* Forward: y = xhat * w + b, xhat = (x - mh[r]) * istd[r] + nl[r] with
 * nl = -ml * istd (x - mh is exact near the mean, so one fma rounds). */

/* One vector (mask m; whole when m is all ones) of a row, w and b taken
 * when `aff` (a constant at each call). */
static inline __attribute__((always_inline)) __m512 lnf16(
    const float *x, const float *w, const float *b, size_t i, __mmask16 m,
    __m512 h, __m512 is, __m512 nl, int aff) {
  __m512 xh = _mm512_fmadd_ps(_mm512_sub_ps(load16(m, x + i), h), is, nl);
  return aff ? _mm512_fmadd_ps(xh, load16(m, w + i), load16(m, b + i)) : xh;
}

/* Columns [lo, hi) of one row, lo aligned for y when nt is set (whole
 * vectors then stream). Whole vectors take a branch-free body; only the
 * row's last vector is masked. */
static inline __attribute__((always_inline)) void lnf_span(
    const float *x, float *y, size_t lo, size_t hi, const float *w,
    const float *b, __m512 h, __m512 is, __m512 nl, int nt, int aff) {
  size_t i = lo;
  if (nt) {
    for (; i + 16 <= hi; i += 16)
      _mm512_stream_ps(y + i, lnf16(x, w, b, i, 0xFFFF, h, is, nl, aff));
  } else {
    for (; i + 16 <= hi; i += 16) {
      __builtin_prefetch((const void *)((uintptr_t)(y + i) + LNB_PFW), 1, 3);
      _mm512_storeu_ps(y + i, lnf16(x, w, b, i, 0xFFFF, h, is, nl, aff));
    }
  }
  if (i < hi) {
    __mmask16 m = tail_mask(hi - i);
    _mm512_mask_storeu_ps(y + i, m, lnf16(x, w, b, i, m, h, is, nl, aff));
  }
}

/* R rows of D: for each block of LN_B columns, the block of every row, so
 * that the block's w and b come from L1 for every row but the first. A
 * streaming row (an output of NT_BYTES or more, which leaves the cache
 * before it is read) writes up to its first line boundary (its head, hd
 * elements) with one masked store and shifts its blocks by hd, so that
 * all its later vectors are aligned and each line is written whole by
 * streaming stores. */
static inline __attribute__((always_inline)) void lnf_rows(
    const float *x, float *y, size_t R, size_t D, int nt, const float *mh,
    const float *ml, const float *istd, const float *w, const float *b,
    int aff) {
  for (size_t j0 = 0; j0 < D; j0 += LN_B) {
    for (size_t r = 0; r < R; r++) {
      const float *xr = x + r * D;
      float *yr = y + r * D;
      __m512 h = _mm512_set1_ps(mh[r]), is = _mm512_set1_ps(istd[r]);
      __m512 nl = _mm512_set1_ps(-ml[r] * istd[r]);
      size_t hd = head_elems(yr, D, nt);
      size_t hi = D - j0 > LN_B + hd ? j0 + LN_B + hd : D;
      if (j0 == 0 && hd > 0)
        lnf_span(xr, yr, 0, hd, w, b, h, is, nl, 0, aff);
      lnf_span(xr, yr, j0 + hd, hi, w, b, h, is, nl, nt && hd < hi, aff);
    }
  }
}

void sbn__avx512_ln_forward_rows(const float *x, float *y, size_t R, size_t D,
                                 size_t total, const float *mh, const float *ml,
                                 const float *istd, const float *w,
                                 const float *b) {
  /* An output not 4-byte aligned never streams (head_elems). */
  int nt = total >= NT_BYTES / sizeof(float) && ((uintptr_t)y & 3) == 0;
  if (w != NULL)
    lnf_rows(x, y, R, D, nt, mh, ml, istd, w, b, 1);
  else
    lnf_rows(x, y, R, D, nt, mh, ml, istd, NULL, NULL, 0);
  if (nt)
    _mm_sfence();
}

/* ------------------------------------------------------------------ */
/* Backward: rows one or two at a time, their sums then their dx while
 * they are in cache (prefetching the next rows meanwhile), dweight and
 * dbias summed in float over blocks of RB rows and folded into double
 * once per block. The loops below are what this pass costs: run on data
 * already in L2, the previous form took nearly as long as on data from
 * memory (masks on every vector, the row pointers reloaded through memory
 * because the stores might alias them, dx converted to double and back),
 * so its instructions bounded it more than the memory did; here whole
 * vectors take a branch-free body with the row pointers in locals, and
 * only the last vector of a row is masked. */

/* Rows a sweep takes at most. */
#define LNB_NR 8

/* Rows four at a time up to this length, when the row stride is not a
 * multiple of 64 KiB: the four rows' x and dy (up to 1 MiB) then stay in
 * L2 for the dx pass, and w, fw and fb move once per four rows rather
 * than two. Measured in one process against the pairs (scripts/ln_ab.c,
 * 100 reps, two runs each; the pairs' time over the quads'): 1.06-1.12
 * at 12000, 20000 and 25088 elements, 1.00-1.07 at 40000, 0.80-0.85 at
 * 50176 (where four rows overrun L2), and 0.83-0.92 at 16384 and 32768
 * against 1.02-1.05 and 0.95-1.01 at 16400 and 32784: with a stride of
 * 64 or 128 KiB the four rows' lines fall in the same L2 sets (its 8
 * ways repeat every 128 KiB). */
#define LNB_QUAD_MAX ((size_t)32 << 10)

/* Rows eight at a time from this length on: one sweep takes the sums of
 * eight rows, w loaded and fw, fb written once for all of them (the
 * block's first sweep stores them, so with 8 rows they are never read
 * back), then the eight rows' dx. With fewer rows per sweep those
 * row-sized arrays cost as much traffic as the rows themselves. Floor
 * ratios, 8 rows, the previous forms (pairs, or the pipeline past
 * LNQ_MIN) then eights, alternated runs: 100352 elements (8x128x28x28)
 * 1.80-2.64 and 1.56-1.94, 8x2048x7x7 1.90-2.65 and 1.58-1.97, 200704
 * (8x1024x14x14) 1.78-2.10 and 1.67-1.92, 8x64x56x56 2.00-2.18 and
 * 1.67-1.86, 802816 (8x256x56x56) 1.58-1.68 and 1.47-1.52; at 50176 and
 * 25088 they were no faster, nor at 32 rows of 65536, where single rows
 * (lnb_single) took 1.05-1.26 and eights 1.23-1.28. The next rows are
 * not prefetched during an eight's dx (eight rows' x and dy fill the
 * L2). Those runs were on the Xeon (2 MiB L2, 260 MiB L3). On the AMD
 * EPYC (1 MiB L2, 32 MiB L3) the eights cost. Two runs of four and six
 * rounds alternated in both orders, medians of the floor ratio without
 * them against with: 8x64x56x56 1.16 and 1.13 against 1.39 and 1.52,
 * 8x1024x14x14 1.25 and 1.35 against 1.77 and 1.73, 8x1000x14x14 1.19
 * and 1.11 against 1.37 and 1.64, 32x64x32x32 1.33 and 1.28 against 1.54
 * and 1.48. Of the 10 shapes of 64k elements or more, 8 and 9 were faster
 * without, the rest within 0.03; the two under 64k, where nothing
 * changed, moved 0.03-0.35. So they are taken only where sbn__wide_l2
 * (sbn_kernels.h). */
#define LNB_EIGHT_MIN ((size_t)64 << 10)

/* Rows longer than LNB_QUAD_MAX go one at a time where a single row's
 * working set fits in the L2 and a pair's does not: x and dy of the row
 * and of the next (prefetched while the row's dx is written) and the
 * row-sized w, fw and fb are 7 arrays of D floats, a pair's 11. A pair
 * saves one sweep over w, fw and fb for every two rows, but where its
 * rows then leave the L2 before their dx pass reads them again, that
 * second read costs as much as the first. Measured with a 2 MiB L2 (one
 * process, single rows and pairs alternating): 8 rows of 50176 took
 * 0.89-0.98 of the pairs' time, 32 rows of 65536 0.91; at 100352 (7
 * arrays over the L2) single rows took 0.94-1.12 of it. Against the
 * previous build (3 alternated runs of the bench) the floor ratio went
 * from 1.85 to 1.64 at 8 x 50176 and from 1.56 to 1.27 at 32 x 65536. With a 1
 * MiB L2 this takes only rows of 32769-37449 elements. */
static int lnb_single(size_t D) {
  size_t row = D * sizeof(float), l2 = sbn__l2_bytes();
  return D > LNB_QUAD_MAX && 7 * row <= l2 && 11 * row > l2;
}

/* A row of the backward: its data, statistics and sums. */
typedef struct lnb_row_s {
  const float *x, *dy;
  float *dx;
  double mean, istd, sums[2];
} lnb_row_t;

/* A row's float constants: h the float part of the mean, l the rest;
 * xhat = (x - h) * is + nl with nl = -l * is, so x - h (exact near the
 * mean) carries the row's magnitude and one fma rounds. */
typedef struct lnb_k_s {
  __m512 h, is, nl;
} lnb_k_t;

static inline lnb_k_t lnb_k(const lnb_row_t *r) {
  float h = (float)r->mean, l = (float)(r->mean - (double)h);
  float is = (float)r->istd;
  return (lnb_k_t){_mm512_set1_ps(h), _mm512_set1_ps(is),
                   _mm512_set1_ps(-l * is)};
}

/* Sums of one vector (mask m; whole when m is all ones) of nr rows: the
 * rows' float sums of g = dy * w and g * xhat, and the block sums fw, fb
 * of dy * xhat and dy (from zero when `first`). */
static inline __attribute__((always_inline)) void lnb_sums16(
    const float *const *x, const float *const *dy, const lnb_k_t *k, int nr,
    size_t i, __mmask16 m, const float *w, float *fw, float *fb, int first,
    __m512 *sg, __m512 *sgx) {
  __m512 pw = first ? _mm512_setzero_ps() : load16(m, fw + i);
  __m512 pb = first ? _mm512_setzero_ps() : load16(m, fb + i);
  __m512 wv = w != NULL ? load16(m, w + i) : _mm512_setzero_ps();
#pragma GCC unroll 8
  for (int r = 0; r < nr; r++) {
    __m512 d = load16(m, dy[r] + i);
    __m512 xh = _mm512_fmadd_ps(_mm512_sub_ps(load16(m, x[r] + i), k[r].h),
                                k[r].is, k[r].nl);
    __m512 g = w != NULL ? _mm512_mul_ps(d, wv) : d;
    sg[r] = _mm512_add_ps(sg[r], g);
    sgx[r] = _mm512_fmadd_ps(g, xh, sgx[r]);
    pw = _mm512_fmadd_ps(d, xh, pw);
    pb = _mm512_add_ps(d, pb);
  }
  store16(fw + i, pw, m, 0);
  store16(fb + i, pb, m, 0);
}

/* The sums of nr rows (1, 2 or 4) in one sweep: w is loaded, and fw and
 * fb are read and written, once for all of them. Each row's float sums cover
 * CHUNK / 4 elements (16 per lane) before a fold into double. */
static inline __attribute__((always_inline)) void lnb_sums(lnb_row_t *rw,
                                                           int nr, size_t D,
                                                           const float *w,
                                                           float *fw, float *fb,
                                                           int first) {
  const float *x[LNB_NR], *dy[LNB_NR];
  lnb_k_t k[LNB_NR];
  __m512d sgl[LNB_NR], sgh[LNB_NR], sxl[LNB_NR], sxh[LNB_NR];
  for (int r = 0; r < nr; r++) {
    x[r] = rw[r].x, dy[r] = rw[r].dy, k[r] = lnb_k(&rw[r]);
    sgl[r] = sgh[r] = sxl[r] = sxh[r] = _mm512_setzero_pd();
  }
  for (size_t i0 = 0; i0 < D; i0 += CHUNK / 4) {
    size_t e = D - i0 > CHUNK / 4 ? i0 + CHUNK / 4 : D, i = i0;
    __m512 sg[LNB_NR], sgx[LNB_NR];
    for (int r = 0; r < nr; r++)
      sg[r] = sgx[r] = _mm512_setzero_ps();
    for (; i + 16 <= e; i += 16)
      lnb_sums16(x, dy, k, nr, i, 0xFFFF, w, fw, fb, first, sg, sgx);
    if (i < e)
      lnb_sums16(x, dy, k, nr, i, tail_mask(e - i), w, fw, fb, first, sg, sgx);
    for (int r = 0; r < nr; r++) {
      fold16(sg[r], &sgl[r], &sgh[r]);
      fold16(sgx[r], &sxl[r], &sxh[r]);
    }
  }
  for (int r = 0; r < nr; r++) {
    rw[r].sums[0] += _mm512_reduce_add_pd(_mm512_add_pd(sgl[r], sgh[r]));
    rw[r].sums[1] += _mm512_reduce_add_pd(_mm512_add_pd(sxl[r], sxh[r]));
  }
}

/* A row's dx constants: dx = (is * w) * dy + (q * (x - h) + rr), with
 * q = c2 * istd and rr = c3 - q * (mean - h), formed in double and
 * rounded once each. Every term is of dx's size (x - h is exact near the
 * mean), so float loses only a few ulps of dx; rows this long (SMALL_STAT
 * or more) have none of the two-value cancellation bwd_apply guards
 * against. */
typedef struct lnb_c_s {
  __m512 is, q, h, rr;
} lnb_c_t;

static inline lnb_c_t lnb_c(const lnb_row_t *r, double count) {
  double c2 = -r->istd * r->sums[1] / count, c3 = -r->istd * r->sums[0] / count;
  double q = c2 * r->istd;
  float h = (float)r->mean;
  return (lnb_c_t){_mm512_set1_ps((float)r->istd), _mm512_set1_ps((float)q),
                   _mm512_set1_ps(h),
                   _mm512_set1_ps((float)(c3 - q * (r->mean - (double)h)))};
}

/* dx of one vector of nr rows, prefetching the first `ahead` rows' x and
 * dy nr rows on (the rows this call's caller takes next): this pass reads
 * its own rows from the cache, and without that the memory would idle
 * until the next rows' sums ask for it. */
static inline __attribute__((always_inline)) void lnb_apply16(
    const float *const *x, const float *const *dy, float *const *dx,
    const lnb_c_t *c, int nr, int ahead, size_t step, size_t i, __mmask16 m,
    const float *w, int nt) {
  __m512 wv = w != NULL ? load16(m, w + i) : _mm512_setzero_ps();
#pragma GCC unroll 8
  for (int r = 0; r < nr; r++) {
    if (r < ahead) {
      _mm_prefetch((const char *)(x[r] + step + i), _MM_HINT_T0);
      _mm_prefetch((const char *)(dy[r] + step + i), _MM_HINT_T0);
    }
    __m512 xc = _mm512_sub_ps(load16(m, x[r] + i), c[r].h);
    __m512 g = w != NULL ? _mm512_mul_ps(c[r].is, wv) : c[r].is;
    __m512 v = _mm512_fmadd_ps(g, load16(m, dy[r] + i),
                               _mm512_fmadd_ps(c[r].q, xc, c[r].rr));
    /* Stored normally, dx's lines are prefetched for writing LNB_PFW
     * bytes ahead (past the row's end: lines of the next row or past the
     * output, computed as an integer, which is harmless). */
    if (!nt)
      __builtin_prefetch((const void *)((uintptr_t)(dx[r] + i) + LNB_PFW), 1,
                         3);
    store16(dx[r] + i, v, m, nt);
  }
}

/* dx of nr rows, streamed when nt (the rows are then whole lines: every
 * row's head up to its first line boundary is written first with a masked
 * store, and its last vector, which shares a line with the next row's
 * head, is masked as well). */
static inline __attribute__((always_inline)) void lnb_apply(const lnb_row_t *rw,
                                                            int nr, size_t D,
                                                            const float *w,
                                                            double count,
                                                            int ahead, int nt) {
  const float *x[LNB_NR], *dy[LNB_NR];
  float *dx[LNB_NR];
  lnb_c_t c[LNB_NR];
  for (int r = 0; r < nr; r++)
    x[r] = rw[r].x, dy[r] = rw[r].dy, dx[r] = rw[r].dx,
    c[r] = lnb_c(&rw[r], count);
  size_t i = head_elems(dx[0], D, nt), step = (size_t)nr * D;
  if (i > 0)
    lnb_apply16(x, dy, dx, c, nr, ahead, step, 0, tail_mask(i), w, 0);
  if (nt) {
    for (; i + 16 <= D; i += 16)
      lnb_apply16(x, dy, dx, c, nr, ahead, step, i, 0xFFFF, w, 1);
  } else {
    for (; i + 16 <= D; i += 16)
      lnb_apply16(x, dy, dx, c, nr, ahead, step, i, 0xFFFF, w, 0);
  }
  if (i < D)
    lnb_apply16(x, dy, dx, c, nr, ahead, step, i, tail_mask(D - i), w, 0);
}

/* The rows [r, r + nr) of a block of RB rows starting at r0, nr a
 * constant 1, 2 or 4 (so that the loops above unroll over it): sums, then
 * dx (streamed when nt). */
static inline __attribute__((always_inline)) void lnb_rows(
    const float *x, const float *dy, float *dx, size_t r, int nr, size_t r0,
    size_t R, size_t D, const double *mean, const double *istd, const float *w,
    double count, float *fw, float *fb, int nt) {
  lnb_row_t rw[LNB_NR];
  for (int k = 0; k < nr; k++)
    rw[k] = (lnb_row_t){x + (r + k) * D, dy + (r + k) * D, dx + (r + k) * D,
                        mean[r + k],     istd[r + k],      {0, 0}};
  if (r == r0)
    lnb_sums(rw, nr, D, w, fw, fb, 1);
  else
    lnb_sums(rw, nr, D, w, fw, fb, 0);
  size_t left = R - r - (size_t)nr;
  int ah = left < (size_t)nr ? (int)left : nr;
  if (D > LN_AHEAD_MAX || nr == 8)
    ah = 0;
  lnb_apply(rw, nr, D, w, count, ah, nt);
}

/* ------------------------------------------------------------------ */
/* Backward pipelined by groups of G rows (1 or 2): one sweep takes the
 * sums of group t and the dx of group t - 1 (whose sums the previous
 * sweep finished), a chunk of columns of each in turn, so that the memory
 * reads group t while group t - 1 comes back from the cache and its dx is
 * written (as the floor's stream keeps reads and writes going together),
 * and each vector of w, fw and fb serves the G rows. */

/* What every sweep of one call shares. dx streams (nt) when the output
 * is large and its rows are whole lines; then each row's first hd columns
 * (up to its first line boundary) are written first and every chunk's dx
 * is shifted by hd columns, so that the streamed vectors are aligned. */
typedef struct lnq_s {
  size_t D, hd;
  const float *w;
  float *fw, *fb;
  double count;
  int nt;
} lnq_t;

/* The rows of one side of a sweep, in locals so that the stores cannot
 * alias them. */
typedef struct lnq_side_s {
  const float *x[LNB_NR], *dy[LNB_NR];
  float *dx[LNB_NR];
} lnq_side_t;

/* dx of columns [lo, hi) of the na rows of a. */
static inline __attribute__((always_inline)) void lnq_apply(const lnq_t *q,
                                                            const lnq_side_t *a,
                                                            const lnb_c_t *c,
                                                            int na, size_t lo,
                                                            size_t hi, int nt) {
  size_t i = lo;
  for (; i + 16 <= hi; i += 16)
    lnb_apply16(a->x, a->dy, a->dx, c, na, 0, 0, i, 0xFFFF, q->w, nt);
  if (i < hi)
    lnb_apply16(a->x, a->dy, a->dx, c, na, 0, 0, i, tail_mask(hi - i), q->w,
                nt);
}

/* One sweep: the sums of the ns rows rs (added to their sums) and the dx
 * of the na rows ra, ns and na 0 or G and `first` (the sums' block starts
 * here) constants at each call. By chunks of CHUNK / 4 columns: each
 * row's float sums cover 16 values per lane before a fold into double,
 * as in the row-by-row form. */
static inline __attribute__((always_inline)) void lnq_sweep(const lnq_t *q,
                                                            lnb_row_t *rs,
                                                            int ns,
                                                            const lnb_row_t *ra,
                                                            int na, int first) {
  lnq_side_t s, a;
  lnb_k_t k[LNB_NR];
  lnb_c_t c[LNB_NR];
  __m512d sgl[LNB_NR], sgh[LNB_NR], sxl[LNB_NR], sxh[LNB_NR];
  size_t D = q->D, hd = q->hd;
#pragma GCC unroll 2
  for (int r = 0; r < ns; r++) {
    s.x[r] = rs[r].x, s.dy[r] = rs[r].dy, k[r] = lnb_k(&rs[r]);
    sgl[r] = sgh[r] = sxl[r] = sxh[r] = _mm512_setzero_pd();
  }
#pragma GCC unroll 2
  for (int r = 0; r < na; r++)
    a.x[r] = ra[r].x, a.dy[r] = ra[r].dy, a.dx[r] = ra[r].dx,
    c[r] = lnb_c(&ra[r], q->count);
  if (na > 0 && hd > 0)
    lnq_apply(q, &a, c, na, 0, hd, 0);
  for (size_t i0 = 0; i0 < D; i0 += CHUNK / 4) {
    size_t e = D - i0 > CHUNK / 4 ? i0 + CHUNK / 4 : D, i = i0;
    if (ns > 0) {
      __m512 sg[LNB_NR], sgx[LNB_NR];
#pragma GCC unroll 2
      for (int r = 0; r < ns; r++)
        sg[r] = sgx[r] = _mm512_setzero_ps();
      for (; i + 16 <= e; i += 16)
        lnb_sums16(s.x, s.dy, k, ns, i, 0xFFFF, q->w, q->fw, q->fb, first, sg,
                   sgx);
      if (i < e)
        lnb_sums16(s.x, s.dy, k, ns, i, tail_mask(e - i), q->w, q->fw, q->fb,
                   first, sg, sgx);
#pragma GCC unroll 2
      for (int r = 0; r < ns; r++) {
        fold16(sg[r], &sgl[r], &sgh[r]);
        fold16(sgx[r], &sxl[r], &sxh[r]);
      }
    }
    if (na > 0 && i0 + hd < D)
      lnq_apply(q, &a, c, na, i0 + hd, e + hd < D ? e + hd : D, q->nt);
  }
#pragma GCC unroll 2
  for (int r = 0; r < ns; r++) {
    rs[r].sums[0] += _mm512_reduce_add_pd(_mm512_add_pd(sgl[r], sgh[r]));
    rs[r].sums[1] += _mm512_reduce_add_pd(_mm512_add_pd(sxl[r], sxh[r]));
  }
}

/* The sweep for (ns, na, first), each made a constant. */
static inline __attribute__((always_inline)) void lnq_step(
    const lnq_t *q, lnb_row_t *rs, int ns, const lnb_row_t *ra, int na,
    int first, int G) {
  if (ns == 0)
    lnq_sweep(q, rs, 0, ra, G, 0);
  else if (na == 0 && first)
    lnq_sweep(q, rs, G, ra, 0, 1);
  else if (na == 0)
    lnq_sweep(q, rs, G, ra, 0, 0);
  else if (first)
    lnq_sweep(q, rs, G, ra, G, 1);
  else
    lnq_sweep(q, rs, G, ra, G, 0);
}

static void lnb_fold(const float *f, double *d, float *out, size_t D, int first,
                     int last);

/* The outputs of a backward call, and its rows. */
typedef struct lnq_io_s {
  const float *x, *dy;
  float *dx;
  size_t R;
  const double *mean, *istd;
  double *dw, *db;
  float *odw, *odb;
} lnq_io_t;

/* Rows [r0, r0 + n) (n a multiple of G) of the pipeline. Blocks of RB
 * rows (a multiple of G) run from row 0 of the call: the sums of a
 * block's first group store into fw and fb rather than add, and fw and fb
 * are folded into dw and db after the sums of its last group (into the
 * outputs after the call's last row). */
static inline __attribute__((always_inline)) void lnq_rows(const lnq_t *q,
                                                           const lnq_io_t *io,
                                                           size_t r0, size_t n,
                                                           int G) {
  lnb_row_t grp[2][LNB_NR];
  size_t D = q->D, g = (size_t)G;
  int cur = 0;
  for (size_t t = 0; t <= n; t += g, cur ^= 1) {
    size_t r = r0 + t;
    lnb_row_t *rs = grp[cur], *ra = grp[cur ^ 1];
    int ns = t < n ? G : 0, na = t > 0 ? G : 0;
    for (int j = 0; j < ns; j++) {
      size_t o = (r + (size_t)j) * D;
      rs[j] = (lnb_row_t){io->x + o,
                          io->dy + o,
                          io->dx + o,
                          io->mean[r + (size_t)j],
                          io->istd[r + (size_t)j],
                          {0, 0}};
    }
    lnq_step(q, rs, ns, ra, na, r % RB == 0, G);
    if (ns > 0 && ((r + g) % RB == 0 || r + g == io->R)) {
      int first = r + g <= RB, last = r + g == io->R;
      lnb_fold(q->fw, io->dw, io->odw, D, first, last);
      lnb_fold(q->fb, io->db, io->odb, D, first, last);
    }
  }
}

/* Groups of 2 rows (and a row left over alone). Measured (same-run A/B
 * against the two-read-one-write floor, 8 rows, dx streamed): groups of
 * 2 took 1.13-1.34 of the floor at 50k-800k elements per row against
 * 1.24-1.40 with single rows and 1.29-1.57 with groups of 4. */
#define LNQ_G 2
/* Shorter rows take the form below (rows two at a time, their sums then
 * their dx, the next pair prefetched meanwhile). Measured in one process
 * alternating the two forms rep by rep (8 rows, three runs; the previous
 * form's time over the pipeline's): 1.06-1.36 at 196k-800k elements, but
 * 0.95-0.99 at 25k, 0.91-1.03 at 70k and 0.90-1.03 at 100k. */
#define LNQ_MIN ((size_t)128 << 10)

static void lnq_pipe(const lnq_t *q, const lnq_io_t *io) {
  size_t n = io->R / LNQ_G * LNQ_G;
  if (n > 0)
    lnq_rows(q, io, 0, n, LNQ_G);
  if (n < io->R)
    lnq_rows(q, io, n, io->R - n, 1);
}

/* Adds the block sums f into the double sums d (or sets d when `first`);
 * on the last block writes (float)(d + f) to out instead (nothing when
 * out is NULL), so the double sums are never zeroed or read back. */
static void lnb_fold(const float *f, double *d, float *out, size_t D, int first,
                     int last) {
  if (last && out == NULL)
    return;
  for (size_t i = 0; i < D; i += 16) {
    __mmask16 m = tail_mask(D - i);
    __mmask8 ml = (__mmask8)m, mh = (__mmask8)(m >> 8);
    __m512d lo = _mm512_setzero_pd(), hi = lo;
    if (!first) {
      lo = _mm512_maskz_loadu_pd(ml, d + i);
      hi = _mm512_maskz_loadu_pd(mh, d + i + 8);
    }
    fold16(load16(m, f + i), &lo, &hi);
    if (last) {
      store16(out + i, pack_pd(lo, hi), m, 0);
    } else {
      _mm512_mask_storeu_pd(d + i, ml, lo);
      _mm512_mask_storeu_pd(d + i + 8, mh, hi);
    }
  }
}

/* Rows shorter than SMALL_STAT: the reference's double sums straight into
 * dw and db, each row then applied in double. */
static void lnb_small(const float *x, const float *dy, float *dx, size_t R,
                      size_t D, const double *mean, const double *istd,
                      const float *w, double count, double *dw, double *db,
                      float *odw, float *odb) {
  for (size_t i = 0; i < D; i++)
    dw[i] = db[i] = 0;
  for (size_t r = 0; r < R; r++) {
    const float *xr = x + r * D, *dyr = dy + r * D;
    double sums[2] = {0, 0};
    sbn__kernels_ref.ln_bwd_reduce(xr, dyr, D, mean[r], istd[r], w, dw, db,
                                   sums);
    double c2 = -istd[r] * sums[1] / count, c3 = -istd[r] * sums[0] / count;
    sbn__avx512_ln_bwd_apply(xr, dyr, dx + r * D, D, mean[r], istd[r], w, c2,
                             c3);
  }
  for (size_t i = 0; i < D; i++) {
    if (odw != NULL)
      odw[i] = (float)dw[i];
    if (odb != NULL)
      odb[i] = (float)db[i];
  }
}

/* LayerNorm backward by blocks of RB rows, two rows at a time (see
 * lnb_sums): their sums, then their dx while they are in cache; dweight
 * and dbias summed in float over the block (fw, fb; the block's first
 * rows store rather than add, so they need no zeroing pass) and folded
 * into double once per block, the last fold writing the float outputs.
 * With few rows (ResNet-sized LayerNorm has 8 rows of 25k-800k elements)
 * passes over these row-sized arrays cost as much as the rows themselves,
 * so there are no others. */
void sbn__avx512_ln_bwd_rows(const float *x, const float *dy, float *dx,
                             size_t R, size_t D, const double *mean,
                             const double *istd, const float *w, double count,
                             double *dw, double *db, float *fw, float *fb,
                             float *odw, float *odb) {
  if (D < SMALL_STAT) {
    lnb_small(x, dy, dx, R, D, mean, istd, w, count, dw, db, odw, odb);
    return;
  }
  if (R == 0) {
    for (size_t i = 0; i < D; i++) {
      if (odw != NULL)
        odw[i] = 0;
      if (odb != NULL)
        odb[i] = 0;
    }
    return;
  }
  /* dx streams when the output is large (NT_BYTES) and rows are whole
   * lines, in both forms below. Measured for the rows-at-a-time form (in
   * one process against main's build, scripts/ln_ab.c, two runs): 1.11
   * and 1.18 times faster at 32 rows of 65536. */
  int nt = R * D >= NT_BYTES / sizeof(float) && D % 16 == 0;
  int eights = sbn__wide_l2() && D >= LNB_EIGHT_MIN && R >= 8 && !lnb_single(D);
  if (D >= LNQ_MIN && !eights) {
    lnq_t q = {D, head_elems(dx, D, nt), w, fw, fb, count, nt};
    lnq_io_t io = {x, dy, dx, R, mean, istd, dw, db, odw, odb};
    lnq_pipe(&q, &io);
    if (nt)
      _mm_sfence();
    return;
  }
  /* Rows two at a time at every length but lnb_single's: with the loops
   * above, pairs of rows of 200k-800k elements were also faster than
   * single rows (the previous form gained nothing from pairs past 128k):
   * a sweep over two rows reads w and updates fw, fb once for both, and
   * those row-sized arrays come from L3 at these lengths. */
  int pairs = !lnb_single(D);
  for (size_t r0 = 0; r0 < R; r0 += RB) {
    size_t r1 = R - r0 < RB ? R : r0 + RB;
    size_t r = r0;
    for (; eights && r + 8 <= r1; r += 8)
      lnb_rows(x, dy, dx, r, 8, r0, R, D, mean, istd, w, count, fw, fb, nt);
    if (D <= LNB_QUAD_MAX && D % (16 << 10) != 0)
      for (; r + 4 <= r1; r += 4)
        lnb_rows(x, dy, dx, r, 4, r0, R, D, mean, istd, w, count, fw, fb, nt);
    for (; pairs && r + 2 <= r1; r += 2)
      lnb_rows(x, dy, dx, r, 2, r0, R, D, mean, istd, w, count, fw, fb, nt);
    for (; r < r1; r++)
      lnb_rows(x, dy, dx, r, 1, r0, R, D, mean, istd, w, count, fw, fb, nt);
    lnb_fold(fw, dw, odw, D, r0 == 0, r1 == R);
    lnb_fold(fb, db, odb, D, r0 == 0, r1 == R);
  }
  if (nt)
    _mm_sfence();
}
#endif /* SBN__HAVE_AVX512 */
