/* AVX-512 channels-last passes where a row of the position view
 * (kernels_geo_inl.h: rows of L positions whose channels repeat) is a few
 * vectors: C up to 64 or 128 in NHWC, and any C whose period lcm(C, 16)
 * is that short. The whole row's per-position parameters and float sums
 * are then held in registers for a block of rows, where the general
 * position view of kernels_avx512.c keeps them in small arrays in L1 and
 * pays four to seven loads and stores per vector of data; here a vector
 * of data costs one load (two backward) and its arithmetic. Rows of more
 * vectors stay with kernels_avx512.c: measured, a tile of a few vectors
 * swept down a block of wide rows ran slower than its linear stream with
 * parameters from L1.
 *
 * Accuracy is that of kernels_avx512.c: float partial sums of at most 16
 * values per lane (a block of RB rows) folded into double per position.
 * Compiled with the AVX-512 flags; run only after dispatch.c's CPU check.
 */
#include "kernels/sbn_kernels.h"

#ifdef SBN__HAVE_AVX512
#include "kernels/kernels_avx512_inl.h"

#include "kernels/kernels_avx512_nhwc.h"
#include "kernels/kernels_geo_inl.h"

/* The longest row these passes take (in positions): 8 vectors, whose
 * moments hold 24 of the 32 vector registers (shift and two sums per
 * vector); backward holds 5 per vector and takes 4, normalize 4 per
 * vector and takes 4. */
#define CL_MAXL 128
/* Per-position arrays: a row plus the whole vectors a tile may read past
 * its last position (masked off). */
#define CL_LEN (CL_MAXL + 16)
/* The loops over a tile's vectors are unrolled in full, so that its
 * arrays of vectors become registers (GCC otherwise keeps them on the
 * stack and loads and stores them for every vector of data). */
#define CL_UNROLL _Pragma("GCC unroll 8")
/* Prefetch distance, in floats (2 KiB), measured best of 256..2048. */
#ifndef CL_PF
#define CL_PF 512
#endif

/* Outputs of a quarter of the core's L2 or more stream. A channels-last
 * call is most often one sample of InstanceNorm or GroupNorm (the whole
 * sample is one block there, ops/groupnorm.c), and a sample's y leaves the
 * L2 before anything reads it when the next sample passes through, so a
 * streaming store saves the read of each line before its write (12 bytes
 * per element down to 8) as it does for kernels_avx512.c's larger
 * outputs (NT_BYTES). */
#define CL_NT_BYTES ((size_t)256 << 10)

static int cl_want_nt(size_t A, size_t C, size_t S, size_t lda) {
  size_t span = A > 0 ? (A - 1) * lda + C * S : 0;
  return span >= CL_NT_BYTES / sizeof(float);
}

/* Whether every piece of the position view of (A, C, S) with rows of at
 * most maxL positions is one row of at most maxL (periods are repeated up
 * to maxL, so that short rows still give each register several vectors
 * per block). */
static int cl_fits(size_t A, size_t C, size_t S, size_t lda, size_t maxL) {
  geo_t g[1];
  size_t off;
  for (size_t i = 0; geo_piece_p(A, C, S, lda, i, maxL, maxL, g, &off); i++)
    if (g->L > maxL)
      return 0;
  return 1;
}

/* The parameters of one piece of normalize, laid out per position. */
typedef struct cl_norm_par_s {
  float h[CL_LEN] __attribute__((aligned(64)));
  float l[CL_LEN] __attribute__((aligned(64)));
  float s[CL_LEN] __attribute__((aligned(64)));
  float b[CL_LEN] __attribute__((aligned(64)));
} cl_norm_par_t;

/* The channel of each position j < CL_LEN of a piece, the positions
 * rotated by rot (see sbn__avx512_cl_normalize) and those past L given
 * position 0's. Counted rather than divided: a sample of InstanceNorm or
 * GroupNorm lays out its parameters once per call, and CL_LEN divisions
 * each time cost as much as streaming a small sample. */
static void cl_chans(const geo_t *g, size_t C, size_t S, size_t rot,
                     unsigned *ch) {
  unsigned at[CL_LEN];
  size_t L = g->L, s = g->j0 % S, c = (g->j0 / S) % C;
  for (size_t p = 0; p < L; p++) {
    at[p] = (unsigned)c;
    if (++s == S) {
      s = 0;
      c = c + 1 == C ? 0 : c + 1;
    }
  }
  for (size_t j = 0, p = rot; j < CL_LEN; j++, p = p + 1 == L ? 0 : p + 1)
    ch[j] = j < L ? at[p] : at[0];
}

/* Lays out per-position floats p[j] = v[ch[j]] for a piece, padded with
 * zeros past its L positions. */
static void cl_layout_f(const geo_t *g, const unsigned *ch, const float *v,
                        float *p) {
  for (size_t j = 0; j < CL_LEN; j++)
    p[j] = j < g->L ? v[ch[j]] : 0.0f;
}

/* All four normalize parameters of a piece. */
static void cl_layout_norm(const geo_t *g, size_t C, size_t S, size_t rot,
                           const float *mh, const float *ml, const float *scale,
                           const float *shift, cl_norm_par_t *pp) {
  unsigned ch[CL_LEN];
  cl_chans(g, C, S, rot, ch);
  cl_layout_f(g, ch, mh, pp->h);
  cl_layout_f(g, ch, ml, pp->l);
  cl_layout_f(g, ch, scale, pp->s);
  cl_layout_f(g, ch, shift, pp->b);
}

/* ------------------------------------------------------------------ */
/* The row functions: one instance per row width V (vectors) and tail (the
 * last vector partial), so that the row's arrays of vectors are registers
 * and only a partial last vector is masked. */

/* Vector v of a row: whole, or the masked last one of a tail row. */
static inline __attribute__((always_inline)) __m512 cl_ld(int tail, int v,
                                                          int V, __mmask16 m,
                                                          const float *p) {
  return tail && v == V - 1 ? _mm512_maskz_loadu_ps(m, p) : _mm512_loadu_ps(p);
}

static inline __attribute__((always_inline)) void cl_st(int tail, int v, int V,
                                                        __mmask16 m, float *p,
                                                        __m512 y, int nt) {
  if (tail && v == V - 1)
    _mm512_mask_storeu_ps(p, m, y);
  else
    store16(p, y, 0xFFFF, nt);
}

/* The mask of a row's last vector. */
static inline __mmask16 cl_last(size_t L) {
  return tail_mask(L - 16 * ((L - 1) / 16));
}

/* Instances of a row function F(V, TAIL) for V = 1..N, and their table
 * T[tail][V - 1]. */
#define CL_ROWS4(F) \
  F(1, 0) F(2, 0) F(3, 0) F(4, 0) F(1, 1) F(2, 1) F(3, 1) F(4, 1)
#define CL_ROWS8(F) \
  CL_ROWS4(F) F(5, 0) F(6, 0) F(7, 0) F(8, 0) F(5, 1) F(6, 1) F(7, 1) F(8, 1)
#define CL_TAB4(P)                      \
  {                                     \
    {P##1_0, P##2_0, P##3_0, P##4_0}, { \
      P##1_1, P##2_1, P##3_1, P##4_1    \
    }                                   \
  }
#define CL_TAB8(P)                                                      \
  {                                                                     \
    {P##1_0, P##2_0, P##3_0, P##4_0, P##5_0, P##6_0, P##7_0, P##8_0}, { \
      P##1_1, P##2_1, P##3_1, P##4_1, P##5_1, P##6_1, P##7_1, P##8_1    \
    }                                                                   \
  }

/* ------------------------------------------------------------------ */
/* Sums: moments (d = x - k, d^2) and backward (dy, dy * xhat). */

/* Adds the sums of the rows of one piece into the per-position doubles d1,
 * d2: float over blocks of RB rows, folded into double after each. */
static inline __attribute__((always_inline)) void cl_sums_row(
    int bwd, int V, int tail, const float *x, const float *dy, size_t rows,
    size_t stride, size_t L, const float *pa, const float *pb, const float *pc,
    double *d1, double *d2) {
  __m512 ka[8], kb[8], kc[8];
  __mmask16 m = cl_last(L);
  CL_UNROLL
  for (int v = 0; v < V; v++) {
    ka[v] = _mm512_load_ps(pa + 16 * v);
    if (bwd) {
      kb[v] = _mm512_load_ps(pb + 16 * v);
      kc[v] = _mm512_load_ps(pc + 16 * v);
    }
  }
  for (size_t r0 = 0; r0 < rows; r0 += RB) {
    size_t r1 = rows - r0 < RB ? rows : r0 + RB;
    __m512 a[8], b[8];
    CL_UNROLL
    for (int v = 0; v < V; v++)
      a[v] = b[v] = _mm512_setzero_ps();
    for (size_t r = r0; r < r1; r++) {
      const float *p = x + r * stride, *q = bwd ? dy + r * stride : NULL;
      CL_UNROLL
      for (int v = 0; v < V; v++) {
        /* A line ahead of the stream: the hardware prefetcher alone left
         * these passes short of the memory's bandwidth. */
        _mm_prefetch((const char *)(p + 16 * v + CL_PF), _MM_HINT_T0);
        if (bwd)
          _mm_prefetch((const char *)(q + 16 * v + CL_PF), _MM_HINT_T0);
        __m512 xv = cl_ld(tail, v, V, m, p + 16 * v);
        if (bwd) {
          /* Masked-off lanes load dy = 0, so they add nothing. */
          __m512 gv = cl_ld(tail, v, V, m, q + 16 * v);
          __m512 xh = _mm512_mul_ps(
              _mm512_sub_ps(_mm512_sub_ps(xv, ka[v]), kb[v]), kc[v]);
          a[v] = _mm512_add_ps(a[v], gv);
          b[v] = _mm512_fmadd_ps(gv, xh, b[v]);
        } else {
          __m512 d = tail && v == V - 1 ? _mm512_maskz_sub_ps(m, xv, ka[v])
                                        : _mm512_sub_ps(xv, ka[v]);
          a[v] = _mm512_add_ps(a[v], d);
          b[v] = _mm512_fmadd_ps(d, d, b[v]);
        }
      }
    }
    CL_UNROLL
    for (int v = 0; v < V; v++) {
      fold_mem(a[v], d1 + 16 * v);
      fold_mem(b[v], d2 + 16 * v);
    }
  }
}

typedef void (*cl_sums_fn)(const float *, const float *, size_t, size_t, size_t,
                           const float *, const float *, const float *,
                           double *, double *);
#define CL_SUMS(B, V, T)                                                     \
  static void cl_sums##B##_##V##_##T(                                        \
      const float *x, const float *dy, size_t rows, size_t stride, size_t L, \
      const float *pa, const float *pb, const float *pc, double *d1,         \
      double *d2) {                                                          \
    cl_sums_row(B, V, T, x, dy, rows, stride, L, pa, pb, pc, d1, d2);        \
  }
#define CL_MOM(V, T) CL_SUMS(0, V, T)
#define CL_BWD(V, T) CL_SUMS(1, V, T)
CL_ROWS8(CL_MOM)
CL_ROWS4(CL_BWD)
/* The moments hold 3 registers per vector of a row (8 vectors: 24 of the
 * 32), backward 5 (4 vectors: 20). */
static const cl_sums_fn cl_mom_fns[2][8] = CL_TAB8(cl_sums0_);
static const cl_sums_fn cl_bwd_fns[2][4] = CL_TAB4(cl_sums1_);

int sbn__avx512_cl_sums(int bwd, const float *x, const float *dy, size_t A,
                        size_t C, size_t S, size_t lda, const float *k,
                        const double *mean, const double *istd, double *s1,
                        double *s2) {
  float pa[CL_LEN] __attribute__((aligned(64)));
  float pb[CL_LEN] __attribute__((aligned(64)));
  float pc[CL_LEN] __attribute__((aligned(64)));
  double d1[CL_LEN] __attribute__((aligned(64)));
  double d2[CL_LEN] __attribute__((aligned(64)));
  unsigned ch[CL_LEN];
  size_t maxL = bwd ? 64 : 128, off;
  geo_t g[1];
  if (!cl_fits(A, C, S, lda, maxL))
    return 0;
  for (size_t i = 0; geo_piece_p(A, C, S, lda, i, maxL, maxL, g, &off); i++) {
    size_t L = g->L, V = (L + 15) / 16, tail = L % 16 != 0;
    cl_chans(g, C, S, 0, ch);
    for (size_t j = 0; j < CL_LEN; j++) {
      size_t c = ch[j];
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
    if (bwd)
      cl_bwd_fns[tail][V - 1](x + off, dy + off, g->rows, g->stride, L, pa, pb,
                              pc, d1, d2);
    else
      cl_mom_fns[tail][V - 1](x + off, NULL, g->rows, g->stride, L, pa, pb, pc,
                              d1, d2);
    for (size_t j = 0; j < L; j++) {
      s1[ch[j]] += d1[j];
      s2[ch[j]] += d2[j];
    }
  }
  return 1;
}

/* ------------------------------------------------------------------ */
/* Normalize: y = ((x - h) - l) * sc + sh. */

static inline __attribute__((always_inline)) void cl_norm_row(
    int V, int tail, const float *x, float *y, size_t rows, size_t stride,
    size_t L, const cl_norm_par_t *pp, int nt) {
  __m512 h[4], l[4], s[4], b[4];
  __mmask16 m = cl_last(L);
  CL_UNROLL
  for (int v = 0; v < V; v++) {
    h[v] = _mm512_load_ps(pp->h + 16 * v);
    l[v] = _mm512_load_ps(pp->l + 16 * v);
    s[v] = _mm512_load_ps(pp->s + 16 * v);
    b[v] = _mm512_load_ps(pp->b + 16 * v);
  }
  for (size_t r = 0; r < rows; r++) {
    const float *p = x + r * stride;
    float *q = y + r * stride;
    CL_UNROLL
    for (int v = 0; v < V; v++) {
      _mm_prefetch((const char *)(p + 16 * v + CL_PF), _MM_HINT_T0);
      __m512 d = _mm512_sub_ps(
          _mm512_sub_ps(cl_ld(tail, v, V, m, p + 16 * v), h[v]), l[v]);
      cl_st(tail, v, V, m, q + 16 * v, _mm512_fmadd_ps(d, s[v], b[v]), nt);
    }
  }
}

typedef void (*cl_norm_fn)(const float *, float *, size_t, size_t, size_t,
                           const cl_norm_par_t *, int);
#define CL_NORM(V, T)                                                  \
  static void cl_norm_##V##_##T(const float *x, float *y, size_t rows, \
                                size_t stride, size_t L,               \
                                const cl_norm_par_t *pp, int nt) {     \
    cl_norm_row(V, T, x, y, rows, stride, L, pp, nt);                  \
  }
CL_ROWS4(CL_NORM)
static const cl_norm_fn cl_norm_fns[2][4] = CL_TAB4(cl_norm_);

/* Normalizes n elements of a piece's rows (L wide, stride apart; the last
 * row may be short) with parameters at position 0 of the first. */
static void cl_norm_rows(const float *x, float *y, size_t n, size_t stride,
                         size_t L, const cl_norm_par_t *pp, int nt) {
  size_t rows = n / L, rem = n - rows * L, V = (L + 15) / 16;
  if (rows > 0)
    cl_norm_fns[L % 16 != 0][V - 1](x, y, rows, stride, L, pp, nt);
  if (rem > 0)
    cl_norm_fns[rem % 16 != 0][(rem + 15) / 16 - 1](
        x + rows * stride, y + rows * stride, 1, stride, rem, pp, nt);
}

int sbn__avx512_cl_normalize(const float *x, float *y, size_t A, size_t C,
                             size_t S, size_t lda, const float *mh,
                             const float *ml, const float *scale,
                             const float *shift) {
  cl_norm_par_t pp;
  int nt = cl_want_nt(A, C, S, lda);
  geo_t g[1];
  size_t off, maxL = 64;
  if (!cl_fits(A, C, S, lda, maxL))
    return 0;
  for (size_t i = 0; geo_piece_p(A, C, S, lda, i, maxL, maxL, g, &off); i++) {
    const float *p = x + off;
    float *q = y + off;
    size_t L = g->L;
    /* A flat piece that streams starts its whole vectors at y's first
     * line boundary: the first h elements take one masked vector, and the
     * rest is the same periodic stream seen from position h, rows of L
     * with the parameters rotated by h. */
    if (g->stride == L && L >= 16) {
      size_t n = g->rows * L, h = head_elems(q, n, nt);
      if (h > 0) {
        cl_layout_norm(g, C, S, 0, mh, ml, scale, shift, &pp);
        cl_norm_rows(p, q, h, L, L, &pp, 0);
      }
      cl_layout_norm(g, C, S, h, mh, ml, scale, shift, &pp);
      cl_norm_rows(p + h, q + h, n - h, L, L, &pp, nt);
      continue;
    }
    cl_layout_norm(g, C, S, 0, mh, ml, scale, shift, &pp);
    cl_norm_rows(p, q, g->rows * L, g->stride, L, &pp, 0);
  }
  _mm_sfence();
  _mm256_zeroupper(); /* see kernels_avx512.c's pos_apply */
  return 1;
}

/* ------------------------------------------------------------------ */
/* dx = k1*dy + (q*x + r) in double, q = k2*istd, r = k3 - q*mean (dx16):
 * six double vectors of parameters per vector of a row, so rows of up to
 * 4 vectors keep 24 registers of them. */

static inline __attribute__((always_inline)) void cl_apply_row(
    int V, int tail, const float *x, const float *dy, float *dx, size_t rows,
    size_t stride, size_t L, const double *pk, const double *pq,
    const double *pr) {
  __m512d k[8], q[8], r[8];
  __mmask16 m = cl_last(L);
  CL_UNROLL
  for (int v = 0; v < 2 * V; v++) {
    k[v] = _mm512_load_pd(pk + 8 * v);
    q[v] = _mm512_load_pd(pq + 8 * v);
    r[v] = _mm512_load_pd(pr + 8 * v);
  }
  for (size_t i = 0; i < rows; i++) {
    size_t o = i * stride;
    CL_UNROLL
    for (int v = 0; v < V; v++) {
      _mm_prefetch((const char *)(x + o + 16 * v + CL_PF), _MM_HINT_T0);
      _mm_prefetch((const char *)(dy + o + 16 * v + CL_PF), _MM_HINT_T0);
      __m512 out =
          dx16(cl_ld(tail, v, V, m, x + o + 16 * v),
               cl_ld(tail, v, V, m, dy + o + 16 * v), k[2 * v], k[2 * v + 1],
               q[2 * v], q[2 * v + 1], r[2 * v], r[2 * v + 1]);
      cl_st(tail, v, V, m, dx + o + 16 * v, out, 0);
    }
  }
}

typedef void (*cl_apply_fn)(const float *, const float *, float *, size_t,
                            size_t, size_t, const double *, const double *,
                            const double *);
#define CL_APPLY(V, T)                                                        \
  static void cl_apply_##V##_##T(                                             \
      const float *x, const float *dy, float *dx, size_t rows, size_t stride, \
      size_t L, const double *pk, const double *pq, const double *pr) {       \
    cl_apply_row(V, T, x, dy, dx, rows, stride, L, pk, pq, pr);               \
  }
CL_ROWS4(CL_APPLY)
static const cl_apply_fn cl_apply_fns[2][4] = CL_TAB4(cl_apply_);

int sbn__avx512_cl_apply(const float *x, const float *dy, float *dx, size_t A,
                         size_t C, size_t S, size_t lda, const double *mean,
                         const double *istd, const double *k1, const double *k2,
                         const double *k3) {
  double pk[CL_LEN] __attribute__((aligned(64)));
  double pq[CL_LEN] __attribute__((aligned(64)));
  double pr[CL_LEN] __attribute__((aligned(64)));
  unsigned ch[CL_LEN];
  size_t maxL = 64, off;
  geo_t g[1];
  if (!cl_fits(A, C, S, lda, maxL))
    return 0;
  for (size_t i = 0; geo_piece_p(A, C, S, lda, i, maxL, maxL, g, &off); i++) {
    size_t L = g->L;
    cl_chans(g, C, S, 0, ch);
    for (size_t j = 0; j < CL_LEN; j++) {
      size_t c = ch[j];
      double q = k2[c] * istd[c];
      pk[j] = k1[c], pq[j] = q, pr[j] = k3[c] - q * mean[c];
    }
    cl_apply_fns[L % 16 != 0][(L + 15) / 16 - 1](
        x + off, dy + off, dx + off, g->rows, g->stride, L, pk, pq, pr);
  }
  _mm256_zeroupper(); /* see kernels_avx512.c's pos_apply */
  return 1;
}
#endif /* SBN__HAVE_AVX512 */
