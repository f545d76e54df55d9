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
 *    tiles of each row of C*S elements.
 *
 * Statistics accumulate in float over short blocks (at most 16 values per
 * lane) that are folded into double, so no element is converted to double
 * and the sums keep about double's accuracy: the shifted values the
 * moments add are small (the caller shifts by a value of the data), and a
 * sum of 16 floats loses only a few float ulps of itself. dx is formed in
 * double as dx = k1*dy + (q*x + r), q = k2*istd and r = k3 - q*mean, which
 * equals the reference's k1*dy + (k2*xhat + k3) to double rounding. */
#include "kernels/sbn_kernels.h"

#ifdef SBN__HAVE_AVX512
#include <immintrin.h>
#include <stdint.h>

/* Positions per row of the position view: bounds the per-position
 * parameter arrays on the stack (a few KiB each, in L1). */
#define PMAX 1024
/* Rows added in float before a fold into double. */
#define RB 16
/* Elements of a run added in float before a fold (16 per lane with four
 * accumulators of 16 lanes). */
#define CHUNK 1024
/* Outputs of at least this many bytes (twice the core's L2 here) are
 * written with streaming stores: an output that large leaves the L2
 * before anything reads it, and a streaming store skips reading each line
 * before writing it (the floor's memcpy does the same for large copies),
 * so the pass moves 8 bytes per element instead of 12. The price is that
 * a consumer finds the output in memory rather than in L3. Per-sample
 * calls (GroupNorm, InstanceNorm) see one sample's size. */
#define NT_BYTES ((size_t)4 << 20)
/* Values per channel below which backward's sums are formed in double. */
#define SMALL_STAT 32

/* ------------------------------------------------------------------ */
/* Helpers. */

static inline __mmask16 tail_mask(size_t n) {
  return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1u);
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

static inline int want_nt(size_t A, size_t C, size_t S) {
  return A * C * S >= NT_BYTES / sizeof(float);
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

/* ------------------------------------------------------------------ */
/* The position view: rows of L positions, `stride` floats apart, position
 * j of every row in channel ((j0 + j) / S) % C. */

typedef struct geo_s {
  size_t rows, stride, L, j0;
} geo_t;

static inline size_t geo_chan(const geo_t *g, size_t j, size_t C, size_t S) {
  return ((g->j0 + j) / S) % C;
}

static size_t gcd(size_t a, size_t b) {
  while (b != 0) {
    size_t t = a % b;
    a = b;
    b = t;
  }
  return a;
}

/* Piece i of the position view of (A, C, S) with rows lda floats apart
 * and its offset into the array; 0 when there is no piece i. Periodic: whole
 * periods of lcm(C*S, 16) positions, repeated to at least 8 vectors so that
 * each position's accumulator is touched only every 8 vectors, then the rest
 * (whole rows of C*S) as a last short row; only for lda = C*S, when the
 * rows are one flat array. Tiled: PMAX positions of every row at a
 * time. */
static int geo_piece(size_t A, size_t C, size_t S, size_t lda, size_t i,
                     geo_t *g, size_t *off) {
  size_t cs = C * S, n = A * cs;
  if (n == 0)
    return 0;
  size_t P = cs / gcd(cs, 16) * 16;
  if (P <= PMAX && lda == cs) {
    while (P < 128 && 2 * P <= PMAX)
      P *= 2;
    size_t rows = n / P;
    if (i == 0 && rows > 0) {
      *g = (geo_t){rows, P, P, 0};
      *off = 0;
      return 1;
    }
    if (i == (rows > 0 ? 1u : 0u) && n > rows * P) {
      *g = (geo_t){1, P, n - rows * P, 0};
      *off = rows * P;
      return 1;
    }
    return 0;
  }
  size_t j0 = i * PMAX;
  if (j0 >= cs)
    return 0;
  *g = (geo_t){A, lda, cs - j0 < PMAX ? cs - j0 : PMAX, j0};
  *off = j0;
  return 1;
}

/* Float sums over the rows of one piece into per-position doubles d1, d2
 * (each holding round16(L) zeros on entry). Moments add d = x - pa and d^2;
 * backward adds dy and dy * xhat with xhat = ((x - pa) - pb) * pc. */
static inline __attribute__((always_inline)) void piece_sums(
    int bwd, const float *x, const float *dy, const geo_t *g, const float *pa,
    const float *pb, const float *pc, double *d1, double *d2) {
  float f1[PMAX] __attribute__((aligned(64)));
  float f2[PMAX] __attribute__((aligned(64)));
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
        __m512 v = load16(m, p + j);
        __m512 a = _mm512_load_ps(f1 + j), b = _mm512_load_ps(f2 + j);
        if (bwd) {
          __m512 gv = load16(m, q + j);
          __m512 xh = _mm512_mul_ps(
              _mm512_sub_ps(_mm512_sub_ps(v, _mm512_load_ps(pa + j)),
                            _mm512_load_ps(pb + j)),
              _mm512_load_ps(pc + j));
          a = _mm512_add_ps(a, gv);
          b = _mm512_fmadd_ps(gv, xh, b);
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

/* The sums of the position view: lays out the per-position parameters of
 * each piece, sums it, and adds the per-position results to their
 * channels. k (moments) or mean and istd (backward) are per channel. */
static inline __attribute__((always_inline)) void pos_sums(
    int bwd, const float *x, const float *dy, size_t A, size_t C, size_t S,
    size_t lda, const float *k, const double *mean, const double *istd,
    double *s1, double *s2) {
  float pa[PMAX] __attribute__((aligned(64)));
  float pb[PMAX] __attribute__((aligned(64)));
  float pc[PMAX] __attribute__((aligned(64)));
  double d1[PMAX] __attribute__((aligned(64)));
  double d2[PMAX] __attribute__((aligned(64)));
  geo_t g[1];
  size_t off;
  for (size_t i = 0; geo_piece(A, C, S, lda, i, g, &off); i++) {
    size_t L = g->L, L16 = (L + 15) & ~(size_t)15;
    for (size_t j = 0; j < L16; j++) {
      size_t c = geo_chan(g, j < L ? j : 0, C, S);
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
    piece_sums(bwd, x + off, bwd ? dy + off : NULL, g, pa, pb, pc, d1, d2);
    for (size_t j = 0; j < L; j++) {
      size_t c = geo_chan(g, j, C, S);
      s1[c] += d1[j];
      s2[c] += d2[j];
    }
  }
}

/* ------------------------------------------------------------------ */
/* Runs (S >= 16). */

/* Moments of one run, shifted by k: float over chunks, folded into
 * double. */
static void run_moments(const float *p, size_t n, float k, double *t1,
                        double *t2) {
  __m512 kk = _mm512_set1_ps(k);
  __m512d s1l = _mm512_setzero_pd(), s1h = s1l, s2l = s1l, s2h = s1l;
  for (size_t s = 0; s < n;) {
    size_t e = n - s > CHUNK ? s + CHUNK : n;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    __m512 b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    for (; s + 64 <= e; s += 64) {
      __m512 d0 = _mm512_sub_ps(_mm512_loadu_ps(p + s), kk);
      __m512 d1 = _mm512_sub_ps(_mm512_loadu_ps(p + s + 16), kk);
      __m512 d2 = _mm512_sub_ps(_mm512_loadu_ps(p + s + 32), kk);
      __m512 d3 = _mm512_sub_ps(_mm512_loadu_ps(p + s + 48), kk);
      a0 = _mm512_add_ps(a0, d0);
      a1 = _mm512_add_ps(a1, d1);
      a2 = _mm512_add_ps(a2, d2);
      a3 = _mm512_add_ps(a3, d3);
      b0 = _mm512_fmadd_ps(d0, d0, b0);
      b1 = _mm512_fmadd_ps(d1, d1, b1);
      b2 = _mm512_fmadd_ps(d2, d2, b2);
      b3 = _mm512_fmadd_ps(d3, d3, b3);
    }
    for (; s < e; s += 16) {
      __mmask16 m = tail_mask(e - s);
      __m512 d = _mm512_maskz_sub_ps(m, load16(m, p + s), kk);
      a0 = _mm512_add_ps(a0, d);
      b0 = _mm512_fmadd_ps(d, d, b0);
    }
    s = e;
    fold16(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)), &s1l,
           &s1h);
    fold16(_mm512_add_ps(_mm512_add_ps(b0, b1), _mm512_add_ps(b2, b3)), &s2l,
           &s2h);
  }
  *t1 += _mm512_reduce_add_pd(_mm512_add_pd(s1l, s1h));
  *t2 += _mm512_reduce_add_pd(_mm512_add_pd(s2l, s2h));
}

/* Sums of dy and dy * xhat over one run, xhat = ((x - h) - l) * is in
 * float (h + l is the mean), folded into double like run_moments. */
static void run_bwd_reduce(const float *p, const float *q, size_t n, float h,
                           float l, float is, double *t1, double *t2) {
  __m512 vh = _mm512_set1_ps(h), vl = _mm512_set1_ps(l);
  __m512 vi = _mm512_set1_ps(is);
  __m512d s1l = _mm512_setzero_pd(), s1h = s1l, s2l = s1l, s2h = s1l;
  for (size_t s = 0; s < n;) {
    size_t e = n - s > CHUNK ? s + CHUNK : n;
    __m512 a[4], b[4];
    for (int u = 0; u < 4; u++)
      a[u] = b[u] = _mm512_setzero_ps();
    for (; s + 64 <= e; s += 64) {
      for (int u = 0; u < 4; u++) {
        __m512 g = _mm512_loadu_ps(q + s + 16 * u);
        __m512 xh = _mm512_mul_ps(
            _mm512_sub_ps(_mm512_sub_ps(_mm512_loadu_ps(p + s + 16 * u), vh),
                          vl),
            vi);
        a[u] = _mm512_add_ps(a[u], g);
        b[u] = _mm512_fmadd_ps(g, xh, b[u]);
      }
    }
    for (; s < e; s += 16) {
      __mmask16 m = tail_mask(e - s);
      __m512 g = load16(m, q + s);
      __m512 xh = _mm512_mul_ps(
          _mm512_sub_ps(_mm512_sub_ps(load16(m, p + s), vh), vl), vi);
      a[0] = _mm512_add_ps(a[0], g);
      b[0] = _mm512_mask3_fmadd_ps(g, xh, b[0], m);
    }
    s = e;
    fold16(_mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3])),
           &s1l, &s1h);
    fold16(_mm512_add_ps(_mm512_add_ps(b[0], b[1]), _mm512_add_ps(b[2], b[3])),
           &s2l, &s2h);
  }
  *t1 += _mm512_reduce_add_pd(_mm512_add_pd(s1l, s1h));
  *t2 += _mm512_reduce_add_pd(_mm512_add_pd(s2l, s2h));
}

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
                      double k1, double qq, double r, int nt) {
  __m512d a = _mm512_set1_pd(k1), b = _mm512_set1_pd(qq);
  __m512d c = _mm512_set1_pd(r);
  size_t h = head_elems(q, n, nt);
  if (h > 0) {
    __mmask16 m = tail_mask(h);
    store16(q, dx16(load16(m, p), load16(m, g), a, a, b, b, c, c), m, 0);
  }
  for (size_t s = h; s < n; s += 16) {
    __mmask16 m = tail_mask(n - s);
    __m512 v = dx16(load16(m, p + s), load16(m, g + s), a, a, b, b, c, c);
    store16(q + s, v, m, nt);
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
  int nt = want_nt(A, C, S);
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

/* dx with per-position double parameters k1, q, r (see dx16). */
/* One vector of dx at positions [j, j + 16) of the parameters. */
static inline __m512 apply16(__m512 x, __m512 g, const double *pk,
                             const double *pq, const double *pr, size_t j) {
  return dx16(x, g, _mm512_loadu_pd(pk + j), _mm512_loadu_pd(pk + j + 8),
              _mm512_loadu_pd(pq + j), _mm512_loadu_pd(pq + j + 8),
              _mm512_loadu_pd(pr + j), _mm512_loadu_pd(pr + j + 8));
}

/* dx with per-position double parameters k1, q, r (see dx16), laid out
 * and streamed like pos_normalize. */
static void pos_apply(const float *x, const float *dy, float *dx, size_t A,
                      size_t C, size_t S, size_t lda, const double *mean,
                      const double *istd, const double *k1, const double *k2,
                      const double *k3) {
  double pk[PWRAP], pq[PWRAP], pr[PWRAP];
  int nt = want_nt(A, C, S);
  geo_t g[1];
  size_t off;
  for (size_t i = 0; geo_piece(A, C, S, lda, i, g, &off); i++) {
    size_t L = g->L;
    for (size_t j = 0; j < L + 16; j++) {
      size_t c = geo_chan(g, j % L, C, S);
      double q = k2[c] * istd[c];
      pk[j] = k1[c], pq[j] = q, pr[j] = k3[c] - q * mean[c];
    }
    const float *p = x + off, *d = dy + off;
    float *q = dx + off;
    if (g->stride == L && L >= 16) {
      size_t n = g->rows * L, s = head_elems(q, n, nt), j = s;
      if (s > 0) {
        __mmask16 m = tail_mask(s);
        store16(q, apply16(load16(m, p), load16(m, d), pk, pq, pr, 0), m, 0);
      }
      for (; s < n; s += 16, j = j + 16 >= L ? j + 16 - L : j + 16) {
        __mmask16 m = tail_mask(n - s);
        store16(q + s,
                apply16(load16(m, p + s), load16(m, d + s), pk, pq, pr, j), m,
                nt);
      }
      continue;
    }
    for (size_t r = 0; r < g->rows;
         r++, p += g->stride, d += g->stride, q += g->stride)
      for (size_t j = 0; j < L; j += 16) {
        __mmask16 m = tail_mask(L - j);
        store16(q + j,
                apply16(load16(m, p + j), load16(m, d + j), pk, pq, pr, j), m,
                0);
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
    pos_sums(0, x, NULL, A, C, S, lda, k, NULL, NULL, s1, s2);
    return;
  }
  for (size_t a = 0; a < A; a++)
    for (size_t c = 0; c < C; c++)
      run_moments(x + a * lda + c * S, S, k[c], &s1[c], &s2[c]);
}

static void avx512_normalize_ld(const float *x, float *y, size_t A, size_t C,
                                size_t S, size_t lda, const float *mh,
                                const float *ml, const float *scale,
                                const float *shift) {
  if (S < 16) {
    pos_normalize(x, y, A, C, S, lda, mh, ml, scale, shift);
    return;
  }
  int nt = want_nt(A, C, S);
  for (size_t a = 0; a < A; a++)
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
    pos_sums(1, x, dy, A, C, S, lda, NULL, mean, istd, sdy, sdyx);
    return;
  }
  for (size_t a = 0; a < A; a++)
    for (size_t c = 0; c < C; c++) {
      size_t o = a * lda + c * S;
      float h = (float)mean[c];
      run_bwd_reduce(x + o, dy + o, S, h, (float)(mean[c] - (double)h),
                     (float)istd[c], &sdy[c], &sdyx[c]);
    }
}

static void avx512_bwd_apply_ld(const float *x, const float *dy, float *dx,
                                size_t A, size_t C, size_t S, size_t lda,
                                const double *mean, const double *istd,
                                const double *k1, const double *k2,
                                const double *k3) {
  if (S < 16) {
    pos_apply(x, dy, dx, A, C, S, lda, mean, istd, k1, k2, k3);
    return;
  }
  int nt = want_nt(A, C, S);
  for (size_t a = 0; a < A; a++)
    for (size_t c = 0; c < C; c++) {
      size_t o = a * lda + c * S;
      double q = k2[c] * istd[c];
      run_apply(x + o, dy + o, dx + o, S, k1[c], q, k3[c] - q * mean[c], nt);
    }
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

/* ------------------------------------------------------------------ */
/* LayerNorm rows. */

static void avx512_ln_forward(const float *x, float *y, size_t D, float mh,
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

static void avx512_ln_bwd_reduce(const float *x, const float *dy, size_t D,
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

static void avx512_ln_bwd_apply(const float *x, const float *dy, float *dx,
                                size_t D, double mean, double istd,
                                const float *w, double c2, double c3) {
  ln_apply_row(x, dy, dx, D, mean, istd, w, c2, c3, 0);
}

/* LayerNorm backward by blocks of RB rows: each row's sums, then its dx
 * while it is in L1/L2; dweight and dbias summed in float over the block
 * (fw, fb) and folded into double once per block, instead of a double
 * read-modify-write of both per element and row. */
static void avx512_ln_bwd_rows(const float *x, const float *dy, float *dx,
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

#define DROP_G 2

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

static void avx512_dropout(const float *in, float *out, size_t n,
                           uint64_t first, const uint32_t key[2], uint32_t step,
                           uint32_t layer, uint32_t thr, float scale) {
  const __m512i m0 = _mm512_set1_epi32((int)0xD2511F53u);
  const __m512i m1 = _mm512_set1_epi32((int)0xCD9E8D57u);
  const __m512i vthr = _mm512_set1_epi32((int)thr);
  const __m512 vs = _mm512_set1_ps(scale);
  const __m512i lane =
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  size_t i = 0;
  for (; i + 64 * DROP_G <= n; i += 64 * DROP_G) {
    uint64_t block = (first + i) / 4;
    /* The high counter word is the same in every lane unless the low word
     * wraps inside this step; the reference takes that rare case. */
    if ((uint32_t)block > 0xFFFFFFFFu - (16u * DROP_G - 1u))
      break;
    __m512i c0[DROP_G], c1[DROP_G], c2[DROP_G], c3[DROP_G];
    for (int u = 0; u < DROP_G; u++) {
      c0[u] = _mm512_add_epi32(
          _mm512_set1_epi32((int)((uint32_t)block + 16u * (uint32_t)u)), lane);
      c1[u] = _mm512_set1_epi32((int)(uint32_t)(block >> 32));
      c2[u] = _mm512_set1_epi32((int)step);
      c3[u] = _mm512_set1_epi32((int)layer);
    }
    uint32_t k0 = key[0], k1 = key[1];
    for (int r = 0; r < 10; r++) {
      __m512i vk0 = _mm512_set1_epi32((int)k0),
              vk1 = _mm512_set1_epi32((int)k1);
      for (int u = 0; u < DROP_G; u++) {
        __m512i h0, l0, h1, l1;
        mulhilo16(c0[u], m0, &h0, &l0);
        mulhilo16(c2[u], m1, &h1, &l1);
        c0[u] = _mm512_ternarylogic_epi32(h1, c1[u], vk0, 0x96);
        c1[u] = l1;
        c2[u] = _mm512_ternarylogic_epi32(h0, c3[u], vk1, 0x96);
        c3[u] = l0;
      }
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    for (int u = 0; u < DROP_G; u++) {
      __m512i w[4];
      philox_order(c0[u], c1[u], c2[u], c3[u], w);
      for (int q = 0; q < 4; q++) {
        size_t o = i + 64 * (size_t)u + 16 * (size_t)q;
        __mmask16 keep = _mm512_cmpge_epu32_mask(w[q], vthr);
        _mm512_storeu_ps(
            out + o, _mm512_maskz_mul_ps(keep, _mm512_loadu_ps(in + o), vs));
      }
    }
  }
  if (i < n)
    sbn__dropout_ref(in + i, out + i, n - i, first + i, key, step, layer, thr,
                     scale);
}

const sbn__kernels_t sbn__kernels_avx512 = {
    .name = "avx512",
    .moments = avx512_moments,
    .normalize = avx512_normalize,
    .bwd_reduce = avx512_bwd_reduce,
    .bwd_apply = avx512_bwd_apply,
    .moments_ld = avx512_moments_ld,
    .normalize_ld = avx512_normalize_ld,
    .bwd_reduce_ld = avx512_bwd_reduce_ld,
    .bwd_apply_ld = avx512_bwd_apply_ld,
    .ln_forward = avx512_ln_forward,
    .ln_bwd_reduce = avx512_ln_bwd_reduce,
    .ln_bwd_apply = avx512_ln_bwd_apply,
    .ln_bwd_rows = avx512_ln_bwd_rows,
    .dropout = avx512_dropout,
};
#endif /* SBN__HAVE_AVX512 */
