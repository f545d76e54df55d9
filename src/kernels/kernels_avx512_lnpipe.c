/* AVX-512 LayerNorm forward with its statistics, pipelined: the sums of
 * one group of rows and the output of the group before it in one sweep
 * (see sbn__avx512_ln_forward_pipe). Compiled with the AVX-512 flags, run
 * only after dispatch.c's CPU check; the contract is ln_forward_pipe's in
 * sbn_kernels.h. */
#include "kernels/sbn_kernels.h"

#ifdef SBN__HAVE_AVX512
#include <math.h>

#include "kernels/avx512_inl.h"

/* Forward with statistics, pipelined: group t of rows is normalized in
 * the same sweep that sums group t + 1, so that the memory reads group
 * t + 1 while the writes of y stream out (as a memcpy keeps both busy),
 * instead of a pass that only reads followed by one that mostly writes.
 * Group t comes back from the cache (L2, or L3 for larger groups), where
 * the previous sweep's sums left it. */

/* One vector of a row being normalized, w and b loaded by the caller
 * (once for the group's rows): y = ((x - h) * is + nl) * w + b as
 * lnf16 in kernels_avx512_ln.c, streamed when nt (the output is then
 * line aligned). */
static inline __attribute__((always_inline)) void lnp_put(
    const float *x, float *y, __m512 wv, __m512 bv, size_t i, __mmask16 m,
    __m512 h, __m512 is, __m512 nl, int nt, int aff) {
  __m512 v = _mm512_fmadd_ps(_mm512_sub_ps(load16(m, x + i), h), is, nl);
  if (aff)
    v = _mm512_fmadd_ps(v, wv, bv);
  if (m != 0xFFFF) {
    _mm512_mask_storeu_ps(y + i, m, v);
  } else if (nt) {
    _mm512_stream_ps(y + i, v);
  } else {
    /* y's line 1 KiB on, prefetched for writing (PREFETCHW: this file is
     * compiled with -mprfchw), so that plain stores do not wait for
     * their lines' reads one after another. */
    __builtin_prefetch((const void *)((uintptr_t)(y + i) + 1024), 1, 3);
    _mm512_storeu_ps(y + i, v);
  }
}

/* Adds x - k (lanes of m, zero elsewhere) and its square into a and q. */
static inline __attribute__((always_inline)) void lnp_add(const float *p,
                                                          __mmask16 m, __m512 k,
                                                          __m512 *a,
                                                          __m512 *q) {
  __m512 d = _mm512_maskz_sub_ps(m, load16(m, p), k);
  *a = _mm512_add_ps(*a, d);
  *q = _mm512_fmadd_ps(d, d, *q);
}

/* Rows per group of the pipelined forward at most. */
#define LNP_G 4

/* Columns [lo, hi) of the G rows at xn (rows D apart) normalized: whole
 * vectors, then the masked rest. Each vector of w and b is loaded once
 * for the G rows; y + lo is line aligned when nt. */
static inline __attribute__((always_inline)) void lnp_norm(
    const float *xn, float *yn, size_t D, size_t lo, size_t hi, const __m512 *h,
    const __m512 *is, const __m512 *nl, const float *w, const float *b, int G,
    int nt, int aff) {
  size_t i = lo;
  for (; i + 16 <= hi; i += 16) {
    __m512 wv = aff ? _mm512_loadu_ps(w + i) : _mm512_setzero_ps();
    __m512 bv = aff ? _mm512_loadu_ps(b + i) : _mm512_setzero_ps();
#pragma GCC unroll 4
    for (int g = 0; g < G; g++)
      lnp_put(xn + g * D, yn + g * D, wv, bv, i, 0xFFFF, h[g], is[g], nl[g], nt,
              aff);
  }
  if (i < hi) {
    __mmask16 m = tail_mask(hi - i);
    __m512 wv = aff ? load16(m, w + i) : _mm512_setzero_ps();
    __m512 bv = aff ? load16(m, b + i) : _mm512_setzero_ps();
#pragma GCC unroll 4
    for (int g = 0; g < G; g++)
      lnp_put(xn + g * D, yn + g * D, wv, bv, i, m, h[g], is[g], nl[g], nt,
              aff);
  }
}

/* One sweep over D columns of a group of G rows (1, 2 or 4): the sums of
 * the G rows at xs (when `st`) and the output of the G rows at xn (when
 * `nm`), rows D apart, a chunk of columns of each in turn; G, st, nm, nt
 * and aff are constants at each call. A row's sums are shifted by its
 * first element and kept in float over 16 values per lane (U = 4 / G
 * accumulators of each kind per row, over a chunk of 256 * U columns, as
 * run_sums' four over CHUNK), then folded into double and written to
 * sum[2 g] and sum[2 g + 1]; the accumulators are locals so that they stay
 * in registers. The output of a chunk is shifted by hd columns (the
 * head of each output row up to its first line boundary, written first,
 * the same for every row when streaming), so that streamed vectors are
 * aligned. */
static inline __attribute__((always_inline)) void lnp_sweep(
    const float *xs, double *sum, const float *xn, float *yn, size_t D,
    size_t hd, const __m512 *h, const __m512 *is, const __m512 *nl,
    const float *w, const float *b, int G, int st, int nm, int nt, int aff) {
  const int U = 4 / G;
  const size_t step = 16 * (size_t)U, chunk = 256 * (size_t)U;
  __m512 k[LNP_G];
  __m512d s1l[LNP_G], s1h[LNP_G], s2l[LNP_G], s2h[LNP_G];
#pragma GCC unroll 4
  for (int g = 0; g < G; g++) {
    k[g] = st ? _mm512_set1_ps(xs[g * D]) : _mm512_setzero_ps();
    s1l[g] = s1h[g] = s2l[g] = s2h[g] = _mm512_setzero_pd();
  }
  if (nm && hd > 0)
    lnp_norm(xn, yn, D, 0, hd, h, is, nl, w, b, G, 0, aff);
  for (size_t i0 = 0; i0 < D; i0 += chunk) {
    size_t e = D - i0 > chunk ? i0 + chunk : D, i = i0;
    __m512 a[4], q[4];
#pragma GCC unroll 4
    for (int j = 0; j < 4; j++)
      a[j] = q[j] = _mm512_setzero_ps();
    for (; st && i + step <= e; i += step) {
#pragma GCC unroll 4
      for (int u = 0; u < U; u++) {
#pragma GCC unroll 4
        for (int g = 0; g < G; g++)
          lnp_add(xs + g * D + i + 16 * (size_t)u, 0xFFFF, k[g], &a[g * U + u],
                  &q[g * U + u]);
      }
    }
    for (; st && i < e; i += 16) {
#pragma GCC unroll 4
      for (int g = 0; g < G; g++)
        lnp_add(xs + g * D + i, tail_mask(e - i), k[g], &a[g * U], &q[g * U]);
    }
    for (int g = 0; g < G && st; g++) {
      __m512 sa = a[g * U], sq = q[g * U];
#pragma GCC unroll 4
      for (int u = 1; u < U; u++)
        sa = _mm512_add_ps(sa, a[g * U + u]),
        sq = _mm512_add_ps(sq, q[g * U + u]);
      fold16(sa, &s1l[g], &s1h[g]);
      fold16(sq, &s2l[g], &s2h[g]);
    }
    if (nm && i0 + hd < D)
      lnp_norm(xn, yn, D, i0 + hd, e + hd < D ? e + hd : D, h, is, nl, w, b, G,
               nt, aff);
  }
  for (int g = 0; g < G && st; g++) {
    sum[2 * g] = _mm512_reduce_add_pd(_mm512_add_pd(s1l[g], s1h[g]));
    sum[2 * g + 1] = _mm512_reduce_add_pd(_mm512_add_pd(s2l[g], s2h[g]));
  }
}

/* A row's statistics from its sums, as the op forms them elsewhere
 * (sbn__moments_finish with count D, then istd = 1 / sqrt(m2 / D + eps)):
 * the double mean and istd, and the float constants of lnp_put. */
static void lnp_stats(const double sum[2], float k, size_t D, double eps,
                      double *mean, double *istd, __m512 *h, __m512 *is,
                      __m512 *nl) {
  double n = (double)D, s1 = sum[0];
  double m2 = sum[1] - s1 * (s1 / n);
  /* False for NaN, which then stays visible (as in the op). */
  if (m2 < 0)
    m2 = 0;
  double mu = (double)k + s1 / n, sd = 1.0 / sqrt(m2 / n + eps);
  float fh = (float)mu, fl = (float)(mu - (double)fh), fi = (float)sd;
  *mean = mu, *istd = sd;
  *h = _mm512_set1_ps(fh), *is = _mm512_set1_ps(fi);
  *nl = _mm512_set1_ps(-fl * fi);
}

/* Rows [0, R) of a pipeline of groups of G rows (R a multiple of G):
 * group t's sums with group t - 1's output. */
static inline __attribute__((always_inline)) void lnp_groups(
    const float *x, float *y, size_t R, size_t D, int nt, double eps,
    const float *w, const float *b, double *mean, double *istd, int G,
    int aff) {
  double s[2 * LNP_G];
  __m512 h[LNP_G], is[LNP_G], nl[LNP_G];
  for (int g = 0; g < LNP_G; g++)
    h[g] = is[g] = nl[g] = _mm512_setzero_ps();
  size_t gd = (size_t)G * D, hd = head_elems(y, D, nt);
  for (size_t r = 0; r <= R; r += (size_t)G) {
    const float *xs = x + r * D, *xn = r > 0 ? xs - gd : x;
    float *yn = r > 0 ? y + r * D - gd : y;
    if (r == 0)
      lnp_sweep(xs, s, NULL, NULL, D, 0, h, is, nl, w, b, G, 1, 0, 0, aff);
    else if (r == R && nt)
      lnp_sweep(NULL, s, xn, yn, D, hd, h, is, nl, w, b, G, 0, 1, 1, aff);
    else if (r == R)
      lnp_sweep(NULL, s, xn, yn, D, hd, h, is, nl, w, b, G, 0, 1, 0, aff);
    else if (nt)
      lnp_sweep(xs, s, xn, yn, D, hd, h, is, nl, w, b, G, 1, 1, 1, aff);
    else
      lnp_sweep(xs, s, xn, yn, D, hd, h, is, nl, w, b, G, 1, 1, 0, aff);
    for (int g = 0; g < G && r < R; g++)
      lnp_stats(s + 2 * g, xs[g * D], D, eps, &mean[r + g], &istd[r + g], &h[g],
                &is[g], &nl[g]);
  }
}

static void lnp_rows(const float *x, float *y, size_t R, size_t D, int nt,
                     double eps, const float *w, const float *b, double *mean,
                     double *istd, int G, int aff) {
  if (G == 4 && aff)
    lnp_groups(x, y, R, D, nt, eps, w, b, mean, istd, 4, 1);
  else if (G == 4)
    lnp_groups(x, y, R, D, nt, eps, w, b, mean, istd, 4, 0);
  else if (G == 2 && aff)
    lnp_groups(x, y, R, D, nt, eps, w, b, mean, istd, 2, 1);
  else if (G == 2)
    lnp_groups(x, y, R, D, nt, eps, w, b, mean, istd, 2, 0);
  else if (aff)
    lnp_groups(x, y, R, D, nt, eps, w, b, mean, istd, 1, 1);
  else
    lnp_groups(x, y, R, D, nt, eps, w, b, mean, istd, 1, 0);
}

/* Groups of 4 rows up to rows of half the core's L2 (128k elements, 512
 * KB, where the L2 is 1 MiB), of 2 up to LNP_G2_MAX, single rows past
 * that. A group shares each vector of w and b between its rows, where
 * single rows read the row-sized w and b once per row (from L2 or L3);
 * but the first group's sums and the last group's output have no
 * partner, so larger groups leave more of the pass unpipelined, and two
 * groups in flight must stay in the L3. Measured (same-run A/B against a
 * memcpy, 8 rows; affine) with a 1 MiB L2: at 64k-100k elements per row
 * groups of 4 took 0.97-1.0 of the memcpy against 0.99-1.05 with 2 and
 * 1.18-1.25 with single rows; at 200k-800k groups of 2 took 0.98-1.13
 * against 1.08-1.23 with 4 and 1.10-1.28 with 1. With a 2 MiB L2, 8 rows
 * of 200704 (784 KB, under half of it) took 0.92-0.99 of the time with
 * groups of 4 that they took with groups of 2 (one process, the two
 * alternating, three runs); the bench's floor ratio went from 1.75 to
 * 1.51 at 8 x 200704 (3 runs alternated with the previous build), so the
 * limit follows the L2. */
static size_t lnp_g4_max(void) {
  return sbn__l2_bytes() / 2 / sizeof(float);
}
#define LNP_G2_MAX ((size_t)1 << 20)
/* Shorter rows are declined (the op's two passes over chunks of rows with
 * ln_forward_rows serve them): measured against the same run's memcpy,
 * the pipeline took 1.89 of it at 256 elements per row against 1.14, 1.12
 * against 0.89 at 1024, and the same at 4096 (1.01 against 1.00); at
 * 16384 0.98 against 1.04. */
#define LNP_MIN 4096

int sbn__avx512_ln_forward_pipe(const float *x, float *y, size_t R, size_t D,
                                size_t total, double eps, const float *w,
                                const float *b, double *mean, double *istd) {
  if (D < LNP_MIN)
    return 0;
  /* Streaming needs every row's output at the same place in its first
   * line (rows of whole lines) and 4-byte alignment (head_elems). */
  int nt = total >= NT_BYTES / sizeof(float) && D % 16 == 0;
  int aff = w != NULL;
  int G = D <= lnp_g4_max() ? 4 : (D <= LNP_G2_MAX ? 2 : 1);
  size_t r = 0;
  /* Whole groups first, then the rows left over (fewer than G) as
   * smaller groups. */
  for (; G >= 1; G /= 2) {
    size_t n = (R - r) / (size_t)G * (size_t)G;
    if (n > 0)
      lnp_rows(x + r * D, y + r * D, n, D, nt, eps, w, b, mean + r, istd + r, G,
               aff);
    r += n;
  }
  if (nt)
    _mm_sfence();
  return 1;
}

#endif /* SBN__HAVE_AVX512 */
