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
/* Rows of a tile between reloads of its parameters, for normalize (the
 * sums use RB, the fold interval). */
#define CL_ROWS 16

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
/* Sums: moments (d = x - k, d^2) and backward (dy, dy * xhat). */

/* Adds the sums of `rows` (at most RB) rows of the tile at column j, V
 * vectors wide, into the per-position doubles d1, d2. */
static inline __attribute__((always_inline)) void cl_sums_tile(
    int bwd, int V, const float *x, const float *dy, size_t rows, size_t stride,
    size_t L, size_t j, const float *pa, const float *pb, const float *pc,
    double *d1, double *d2) {
  __m512 a[8], b[8], ka[8], kb[8], kc[8];
  __mmask16 m[8];
  for (int v = 0; v < V; v++) {
    size_t c = j + 16 * (size_t)v;
    m[v] = tail_mask(L - c);
    ka[v] = _mm512_loadu_ps(pa + c);
    if (bwd) {
      kb[v] = _mm512_loadu_ps(pb + c);
      kc[v] = _mm512_loadu_ps(pc + c);
    }
    a[v] = b[v] = _mm512_setzero_ps();
  }
  for (size_t r = 0; r < rows; r++) {
    const float *p = x + r * stride + j;
    for (int v = 0; v < V; v++) {
      __m512 xv = load16(m[v], p + 16 * v);
      if (bwd) {
        /* Masked-off lanes load dy = 0, so they add nothing. */
        __m512 gv = load16(m[v], dy + r * stride + j + 16 * v);
        __m512 xh = _mm512_mul_ps(
            _mm512_sub_ps(_mm512_sub_ps(xv, ka[v]), kb[v]), kc[v]);
        a[v] = _mm512_add_ps(a[v], gv);
        b[v] = _mm512_fmadd_ps(gv, xh, b[v]);
      } else {
        __m512 d = _mm512_maskz_sub_ps(m[v], xv, ka[v]);
        a[v] = _mm512_add_ps(a[v], d);
        b[v] = _mm512_fmadd_ps(d, d, b[v]);
      }
    }
  }
  for (int v = 0; v < V; v++) {
    fold_mem(a[v], d1 + j + 16 * v);
    fold_mem(b[v], d2 + j + 16 * v);
  }
}

/* One instance per tile width, so that the tile's arrays are registers. */
#define CL_SUMS_TILE(BWD, V)                                                  \
  static void cl_sums_##BWD##_##V(const float *x, const float *dy,            \
                                  size_t rows, size_t stride, size_t L,       \
                                  size_t j, const float *pa, const float *pb, \
                                  const float *pc, double *d1, double *d2) {  \
    cl_sums_tile(BWD, V, x, dy, rows, stride, L, j, pa, pb, pc, d1, d2);      \
  }
#define CL_SUMS_TILES4(BWD) \
  CL_SUMS_TILE(BWD, 1)      \
  CL_SUMS_TILE(BWD, 2)      \
  CL_SUMS_TILE(BWD, 3)      \
  CL_SUMS_TILE(BWD, 4)
CL_SUMS_TILES4(0)
CL_SUMS_TILES4(1)
CL_SUMS_TILE(0, 5)
CL_SUMS_TILE(0, 6)
CL_SUMS_TILE(0, 7)
CL_SUMS_TILE(0, 8)

typedef void (*cl_sums_fn)(const float *, const float *, size_t, size_t, size_t,
                           size_t, const float *, const float *, const float *,
                           double *, double *);
/* The moments hold 3 registers per vector of the tile (8 vectors: 24 of
 * the 32), backward 5 (4 vectors: 20). */
static const cl_sums_fn cl_sums_fns[2][8] = {
    {cl_sums_0_1, cl_sums_0_2, cl_sums_0_3, cl_sums_0_4, cl_sums_0_5,
     cl_sums_0_6, cl_sums_0_7, cl_sums_0_8},
    {cl_sums_1_1, cl_sums_1_2, cl_sums_1_3, cl_sums_1_4, cl_sums_1_4,
     cl_sums_1_4, cl_sums_1_4, cl_sums_1_4}};

/* Widest tile of each kind, in vectors. */
static size_t cl_tile_max(int bwd) {
  return bwd ? 4 : 8;
}

/* Runs BODY over the tiles of a piece (one tile where cl_fits holds; a
 * tile swept down a block of wide rows measured slower than their linear
 * stream), a block of at most `blk` rows at a time. */
#define CL_FOR_TILES(g, blk, vmax, BODY)                         \
  for (size_t r0 = 0; r0 < (g)->rows; r0 += (blk)) {             \
    size_t nr = (g)->rows - r0 < (blk) ? (g)->rows - r0 : (blk); \
    for (size_t j = 0; j < (g)->L; j += 16 * (vmax)) {           \
      size_t nv = ((g)->L - j + 15) / 16;                        \
      nv = nv < (vmax) ? nv : (vmax);                            \
      BODY;                                                      \
    }                                                            \
  }

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
  size_t vmax = cl_tile_max(bwd), maxL = 16 * vmax, off;
  geo_t g[1];
  if (!cl_fits(A, C, S, lda, maxL))
    return 0;
  for (size_t i = 0; geo_piece_p(A, C, S, lda, i, maxL, maxL, g, &off); i++) {
    size_t L = g->L;
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
    const float *xp = x + off, *dp = bwd ? dy + off : NULL;
    CL_FOR_TILES(g, (size_t)RB, vmax,
                 cl_sums_fns[bwd][nv - 1](xp + r0 * g->stride,
                                          bwd ? dp + r0 * g->stride : NULL, nr,
                                          g->stride, L, j, pa, pb, pc, d1, d2));
    for (size_t j = 0; j < L; j++) {
      s1[ch[j]] += d1[j];
      s2[ch[j]] += d2[j];
    }
  }
  return 1;
}

/* ------------------------------------------------------------------ */
/* Normalize: y = ((x - h) - l) * sc + sh. */

static inline __attribute__((always_inline)) void cl_norm_tile(
    int V, const float *x, float *y, size_t rows, size_t stride, size_t L,
    size_t j, const float *ph, const float *pl, const float *ps,
    const float *pb, int nt) {
  __m512 h[4], l[4], s[4], b[4];
  __mmask16 m[4];
  for (int v = 0; v < V; v++) {
    size_t c = j + 16 * (size_t)v;
    m[v] = tail_mask(L - c);
    h[v] = _mm512_loadu_ps(ph + c);
    l[v] = _mm512_loadu_ps(pl + c);
    s[v] = _mm512_loadu_ps(ps + c);
    b[v] = _mm512_loadu_ps(pb + c);
  }
  for (size_t r = 0; r < rows; r++) {
    const float *p = x + r * stride + j;
    float *q = y + r * stride + j;
    for (int v = 0; v < V; v++) {
      __m512 d =
          _mm512_sub_ps(_mm512_sub_ps(load16(m[v], p + 16 * v), h[v]), l[v]);
      store16(q + 16 * v, _mm512_fmadd_ps(d, s[v], b[v]), m[v], nt);
    }
  }
}

#define CL_NORM_TILE(V)                                                       \
  static void cl_norm_##V(const float *x, float *y, size_t rows,              \
                          size_t stride, size_t L, size_t j, const float *ph, \
                          const float *pl, const float *ps, const float *pb,  \
                          int nt) {                                           \
    cl_norm_tile(V, x, y, rows, stride, L, j, ph, pl, ps, pb, nt);            \
  }
CL_NORM_TILE(1)
CL_NORM_TILE(2)
CL_NORM_TILE(3)
CL_NORM_TILE(4)

typedef void (*cl_norm_fn)(const float *, float *, size_t, size_t, size_t,
                           size_t, const float *, const float *, const float *,
                           const float *, int);
static const cl_norm_fn cl_norm_fns[4] = {cl_norm_1, cl_norm_2, cl_norm_3,
                                          cl_norm_4};

/* Normalizes the rows of g (all but the last `L` wide; the last `Llast`)
 * with parameters at position 0 of the row's first element. */
static void cl_norm_rows(const float *x, float *y, const geo_t *g, size_t Llast,
                         const cl_norm_par_t *pp, int nt) {
  geo_t full = *g;
  full.rows = Llast < g->L ? g->rows - 1 : g->rows;
  CL_FOR_TILES(
      &full, (size_t)CL_ROWS, (size_t)4,
      cl_norm_fns[nv - 1](x + r0 * g->stride, y + r0 * g->stride, nr, g->stride,
                          g->L, j, pp->h, pp->l, pp->s, pp->b, nt));
  if (full.rows < g->rows) {
    size_t o = full.rows * g->stride;
    geo_t last = {1, g->stride, Llast, 0};
    CL_FOR_TILES(&last, (size_t)1, (size_t)4,
                 cl_norm_fns[nv - 1](x + o, y + o, nr, g->stride, Llast, j,
                                     pp->h, pp->l, pp->s, pp->b, nt));
  }
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
    size_t L = g->L, rot = 0;
    /* A flat piece that streams starts its whole vectors at y's first
     * line boundary: the first h elements take one masked vector, and the
     * rest is the same periodic stream seen from position h, rows of L
     * with the parameters rotated by h. */
    if (g->stride == L && L >= 16) {
      size_t n = g->rows * L;
      rot = head_elems(q, n, nt);
      if (rot > 0) {
        geo_t head = {1, L, rot, 0};
        cl_layout_norm(g, C, S, 0, mh, ml, scale, shift, &pp);
        cl_norm_rows(p, q, &head, rot, &pp, 0);
        p += rot, q += rot;
        n -= rot;
      }
      geo_t rest = {(n + L - 1) / L, L, L, 0};
      cl_layout_norm(g, C, S, rot, mh, ml, scale, shift, &pp);
      if (n > 0)
        cl_norm_rows(p, q, &rest, n - (rest.rows - 1) * L, &pp, nt);
      continue;
    }
    cl_layout_norm(g, C, S, 0, mh, ml, scale, shift, &pp);
    cl_norm_rows(p, q, g, L, &pp, 0);
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
    int V, const float *x, const float *dy, float *dx, size_t rows,
    size_t stride, size_t L, const double *pk, const double *pq,
    const double *pr) {
  __m512d k[8], q[8], r[8];
  __mmask16 m[4];
  for (int v = 0; v < 2 * V; v++) {
    k[v] = _mm512_loadu_pd(pk + 8 * v);
    q[v] = _mm512_loadu_pd(pq + 8 * v);
    r[v] = _mm512_loadu_pd(pr + 8 * v);
  }
  for (int v = 0; v < V; v++)
    m[v] = tail_mask(L - 16 * (size_t)v);
  for (size_t i = 0; i < rows; i++) {
    size_t o = i * stride;
    for (int v = 0; v < V; v++) {
      __m512 out = dx16(load16(m[v], x + o + 16 * v),
                        load16(m[v], dy + o + 16 * v), k[2 * v], k[2 * v + 1],
                        q[2 * v], q[2 * v + 1], r[2 * v], r[2 * v + 1]);
      store16(dx + o + 16 * v, out, m[v], 0);
    }
  }
}

#define CL_APPLY_ROW(V)                                                       \
  static void cl_apply_##V(                                                   \
      const float *x, const float *dy, float *dx, size_t rows, size_t stride, \
      size_t L, const double *pk, const double *pq, const double *pr) {       \
    cl_apply_row(V, x, dy, dx, rows, stride, L, pk, pq, pr);                  \
  }
CL_APPLY_ROW(1)
CL_APPLY_ROW(2)
CL_APPLY_ROW(3)
CL_APPLY_ROW(4)

typedef void (*cl_apply_fn)(const float *, const float *, float *, size_t,
                            size_t, size_t, const double *, const double *,
                            const double *);
static const cl_apply_fn cl_apply_fns[4] = {cl_apply_1, cl_apply_2, cl_apply_3,
                                            cl_apply_4};

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
    cl_chans(g, C, S, 0, ch);
    for (size_t j = 0; j < CL_LEN; j++) {
      size_t c = ch[j];
      double q = k2[c] * istd[c];
      pk[j] = k1[c], pq[j] = q, pr[j] = k3[c] - q * mean[c];
    }
    cl_apply_fns[(g->L + 15) / 16 - 1](x + off, dy + off, dx + off, g->rows,
                                       g->stride, g->L, pk, pq, pr);
  }
  _mm256_zeroupper(); /* see kernels_avx512.c's pos_apply */
  return 1;
}
#endif /* SBN__HAVE_AVX512 */
