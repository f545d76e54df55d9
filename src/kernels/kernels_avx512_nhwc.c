/* AVX-512 channels-last passes over the position view (kernels_geo_inl.h:
 * rows of L positions whose channels repeat) with the per-position
 * parameters and float sums of a tile of a row (up to 4 or 8 vectors) in
 * registers. A row of one tile (NHWC C up to 64 or 128, or any C whose
 * period lcm(C, 16) is that short) streams straight through; the tiles of
 * a wider row pass down a block of rows one after another, so each loads
 * its registers once per block (moments and normalize; see cl_takes for
 * where that order pays). kernels_avx512.c's general position view keeps
 * these in small arrays in L1 and pays four to seven loads and stores per
 * vector of data; here a vector of data costs one load (two backward) and
 * its arithmetic. Where cl_takes declines, kernels_avx512.c runs its own
 * view.
 *
 * Accuracy is that of kernels_avx512.c: float partial sums of at most 16
 * values per lane (a block of RB rows) folded into double per position,
 * and dx in float from x - h (avx512_inl.h's dx_params_f). Compiled with the
 * AVX-512 flags; run only after dispatch.c's CPU check. */
#include "kernels/sbn_kernels.h"

#ifdef SBN__HAVE_AVX512
#include <string.h>

#include "kernels/avx512_inl.h"

#include "kernels/kernels_avx512_nhwc.h"
#include "kernels/kernels_geo_inl.h"

/* Positions per row of a piece: ResNet-50's widest C is one row. Wider
 * rows are split into pieces of this many positions. */
#define CL_PMAX 2048
/* Per-position arrays: a row plus the whole vectors a tile may read past
 * its last position (masked off). */
#define CL_LEN (CL_PMAX + 16)
/* Rows of a block, over which a tile of a wide row keeps its registers
 * (the sums fold every RB rows, which is the same number). */
#define CL_BLOCK 16
/* The loops over a tile's vectors are unrolled in full, so that its
 * arrays of vectors become registers (GCC otherwise keeps them on the
 * stack and loads and stores them for every vector of data). */
#define CL_UNROLL _Pragma("GCC unroll 8")
/* Prefetch distance of a row of one tile, in floats (2 KiB), measured
 * best of 256..2048; a wide row prefetches CL_PF_ROWS rows ahead: a
 * quarter of a block of RB rows took 0.89-0.94 of the time of a whole
 * block for the moments of BatchNorm NHWC 8x512x7x7, 8x1024x7x7 and
 * 8x2048x7x7 (throwaway harness, same-run A/B, Intel, 2 MiB L2), half
 * a block in between. */
#define CL_PF 512
#define CL_PF_ROWS 4
/* The same for moments read from memory (sbn__avx512_cl_moments_cold):
 * 8 KiB ahead took 0.94-0.96 of the time at 2 KiB for InstanceNorm
 * samples of C = 64 and 128 (same-run A/B, cold copies). */
#define CL_PF_COLD 2048
/* The distance behind which dx (read last row first) prefetches x and dy,
 * in floats (8 KiB): the dx of BatchNorm NHWC 32x64x32x32, reading from
 * L3 what the sums left there, took 0.48-0.53 ms at 2 KiB and 0.37-0.41
 * at 8 KiB (4 KiB no better, 32 KiB worse). */
#define CL_PF_DX 2048

/* Outputs of a quarter of the core's L2 or more stream. A channels-last
 * call is most often one sample of InstanceNorm or GroupNorm (the whole
 * sample is one block there, ops/groupnorm.c), and a sample's y leaves the
 * L2 before anything reads it when the next sample passes through, so a
 * streaming store saves the read of each line before its write (12 bytes
 * per element down to 8; perf: the normalize of an L2-resident sample
 * took as long as the memcpy floor with plain stores, half as long
 * streamed), as for kernels_avx512.c's larger outputs (NT_BYTES). */
#define CL_NT_BYTES ((size_t)256 << 10)

static int cl_want_nt(size_t A, size_t C, size_t S, size_t lda) {
  size_t span = A > 0 ? (A - 1) * lda + C * S : 0;
  return span >= CL_NT_BYTES / sizeof(float);
}

/* Piece i of the view for tiles of `tile` positions and its offset; 0
 * when there is none. A short period (lcm(C*S, 16), repeated up to one
 * tile) fills every lane even for C = 1 or 3, and a longer one of at most
 * CL_PMAX still beats rows with a mostly empty last vector (C = 17: 272
 * positions, where rows of 17 would waste 15 lanes in 32). A row of at
 * least 128 positions or of whole vectors is a piece by itself: its last
 * vector wastes little, and its parameters are laid out once per call for
 * one row instead of a period of several (a sample of InstanceNorm with
 * C = 1000 laid out 2000 positions for 49 rows). Rows over CL_PMAX are
 * split into pieces of CL_PMAX positions. */
static int cl_piece(size_t A, size_t C, size_t S, size_t lda, size_t i,
                    size_t tile, geo_t *g, size_t *off) {
  size_t cs = C * S, P = cs / gcd(cs, 16) * 16, j0 = i * CL_PMAX;
  if (lda == cs && P <= tile)
    return geo_piece_p(A, C, S, lda, i, tile, tile, g, off);
  if (lda == cs && cs < 128 && cs % 16 != 0 && P <= CL_PMAX)
    return geo_piece_p(A, C, S, lda, i, P, P, g, off);
  if (A * cs == 0 || j0 >= cs)
    return 0;
  *g = (geo_t){A, lda, cs - j0 < CL_PMAX ? cs - j0 : CL_PMAX, j0};
  *off = j0;
  return 1;
}

/* Whether the passes here take the view: every piece's row is one tile
 * of at most `tile` positions, or `wide` is set. Measured from memory
 * (rotating copies, against kernels_avx512.c's general position view,
 * BatchNorm-sized views of C = 17, 64, 256, 1000, 2048): the tile order of
 * wide rows took 0.5 to 0.9 of the general view's time for the moments and
 * normalize, but the backward sums, whose tiles hold 20 registers of
 * parameters, were slower for C = 17 and 256 (1.3 to 1.6 times), and dx
 * (24 registers) tiled down blocks of rows took 1.2 to 2.3 times as long;
 * backward takes rows of one tile only. */
static int cl_takes(size_t A, size_t C, size_t S, size_t lda, size_t tile,
                    int wide) {
  geo_t g[1];
  size_t off;
  if (wide)
    return 1;
  for (size_t i = 0; cl_piece(A, C, S, lda, i, tile, g, &off); i++)
    if (g->L > tile)
      return 0;
  return 1;
}

/* Positions of a piece padded to whole vectors. */
static size_t cl_pad(size_t L) {
  return (L + 15) & ~(size_t)15;
}

/* The channel of each position j < cl_pad(L) of a piece, the positions
 * rotated by rot (see sbn__avx512_cl_normalize) and those past L given
 * position 0's. Counted rather than divided: a sample of InstanceNorm or
 * GroupNorm lays out its parameters once per call, and a division per
 * position cost as much as streaming a small sample. */
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
  for (size_t j = 0, p = rot % L; j < cl_pad(L);
       j++, p = p + 1 == L ? 0 : p + 1)
    ch[j] = j < L ? at[p] : at[0];
}

/* The parameters of one piece of normalize, laid out per position. */
typedef struct cl_norm_par_s {
  float h[CL_LEN] __attribute__((aligned(64)));
  float l[CL_LEN] __attribute__((aligned(64)));
  float s[CL_LEN] __attribute__((aligned(64)));
  float b[CL_LEN] __attribute__((aligned(64)));
} cl_norm_par_t;

/* All four normalize parameters of a piece, zero past its L positions. */
static void cl_layout_norm(const geo_t *g, size_t C, size_t S, size_t rot,
                           const float *mh, const float *ml, const float *scale,
                           const float *shift, cl_norm_par_t *pp) {
  unsigned ch[CL_LEN];
  cl_chans(g, C, S, rot, ch);
  for (size_t j = 0; j < cl_pad(g->L); j++) {
    int in = j < g->L;
    pp->h[j] = in ? mh[ch[j]] : 0.0f;
    pp->l[j] = in ? ml[ch[j]] : 0.0f;
    pp->s[j] = in ? scale[ch[j]] : 0.0f;
    pp->b[j] = in ? shift[ch[j]] : 0.0f;
  }
}

/* ------------------------------------------------------------------ */
/* The tile functions: one instance per tile width V (vectors) and tail
 * (the last vector partial), so that the tile's arrays of vectors are
 * registers and only a partial last vector is masked. Each runs `rows`
 * rows of a tile L <= 16 V positions wide, prefetching pf floats ahead. */

/* Vector v of a tile: whole, or the masked last one of a tail tile. */
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

/* The mask of a tile's last vector. */
static inline __mmask16 cl_last(size_t L) {
  return tail_mask(L - 16 * ((L - 1) / 16));
}

/* Instances of a tile function F(V, TAIL) for V = 1..4 or 1..8, and their
 * table T[tail][V - 1]. */
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

/* Adds the float sums of `rows` (at most RB) rows of a tile into the
 * per-position doubles d1, d2. */
static inline __attribute__((always_inline)) void cl_sums_tile(
    int bwd, int V, int tail, const float *x, const float *dy, size_t rows,
    size_t stride, size_t L, const float *pa, const float *pb, const float *pc,
    double *d1, double *d2, size_t pf) {
  __m512 ka[8], kb[8], kc[8], a[8], b[8];
  __mmask16 m = cl_last(L);
  CL_UNROLL
  for (int v = 0; v < V; v++) {
    ka[v] = _mm512_load_ps(pa + 16 * v);
    if (bwd) {
      kb[v] = _mm512_load_ps(pb + 16 * v);
      kc[v] = _mm512_load_ps(pc + 16 * v);
    }
    a[v] = b[v] = _mm512_setzero_ps();
  }
  for (size_t r = 0; r < rows; r++) {
    const float *p = x + r * stride, *q = bwd ? dy + r * stride : NULL;
    CL_UNROLL
    for (int v = 0; v < V; v++) {
      /* The hardware prefetcher alone left these passes short of the
       * memory's bandwidth. */
      _mm_prefetch((const char *)(p + 16 * v + pf), _MM_HINT_T0);
      if (bwd)
        _mm_prefetch((const char *)(q + 16 * v + pf), _MM_HINT_T0);
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

typedef void (*cl_sums_fn)(const float *, const float *, size_t, size_t, size_t,
                           const float *, const float *, const float *,
                           double *, double *, size_t);
#define CL_SUMS(B, V, T)                                                     \
  static void cl_sums##B##_##V##_##T(                                        \
      const float *x, const float *dy, size_t rows, size_t stride, size_t L, \
      const float *pa, const float *pb, const float *pc, double *d1,         \
      double *d2, size_t pf) {                                               \
    cl_sums_tile(B, V, T, x, dy, rows, stride, L, pa, pb, pc, d1, d2, pf);   \
  }
#define CL_MOM(V, T) CL_SUMS(0, V, T)
#define CL_BWD(V, T) CL_SUMS(1, V, T)
CL_ROWS8(CL_MOM)
CL_ROWS4(CL_BWD)
/* The moments hold 3 registers per vector of a tile (8 vectors: 24 of the
 * 32), backward 5 (4 vectors: 20). */
static const cl_sums_fn cl_mom_fns[2][8] = CL_TAB8(cl_sums0_);
static const cl_sums_fn cl_bwd_fns[2][4] = CL_TAB4(cl_sums1_);

/* Lays out the sums' parameters of a piece and zeroes its doubles. */
static void cl_layout_sums(int bwd, const geo_t *g, const unsigned *ch,
                           const float *k, const double *mean,
                           const double *istd, float *pa, float *pb, float *pc,
                           double *d1, double *d2) {
  for (size_t j = 0; j < cl_pad(g->L); j++)
    lane_params(bwd, j, ch[j], k, mean, istd, pa, pb, pc, d1, d2);
}

/* ------------------------------------------------------------------ */
/* Moments of wide rows in memory order. A row of several tiles walked
 * tile by tile down a block of rows reads RB rows at once, 512 bytes of
 * each (lines a row's stride apart), and measured 8-10 GB/s from memory
 * for C = 256 .. 2048 against 17-25 for a plain sequential sum of the same
 * buffers. Here a block's rows are read front to back, one or CL_SWEEP at a
 * time, into float sums per position kept in L1; the float sums still fold
 * into double every RB rows. Measured (same-run A/B, rotating cold copies,
 * BatchNorm NHWC views): one row at a time took 0.53-0.64 of the tiles'
 * time for C = 256 and 512 but 0.9 for 2048, whose sums and shifts (24
 * KiB) crowd the L1; eight rows a sweep took 0.4-0.7 for C = 1000 .. 2048
 * but only 0.8-0.94 for 256 and 512 (two and four rows a sweep were
 * slower still there). */

/* Rows one sweep adds for rows wider than CL_SWEEP_L positions. */
#define CL_SWEEP 8
#define CL_SWEEP_L 512
/* Calls spanning at least this much take the sweeps; smaller ones the
 * tiles. The sweeps pay only from memory: on a cache-resident view (the
 * same buffer again, as the bench does, and as a layer's input that its
 * producer has just written often is) one row at a time took 1.8 times
 * the tiles' time for C = 256 and 512, and eight rows a sweep 1.2 times
 * for C = 1000 and 1024 (same-run A/B). A BatchNorm forward over 8 MiB
 * or more moves 16 MiB or more of x and y through the 32 MiB L3 each
 * step, so its x comes from memory; in `syncbn bench kernels` sweeping
 * everything lost at 8x1024x14x14 (6.4 MB) and gained at 8x512x28x28
 * (12.8 MB) and 8x256x56x56 (25.7 MB). */
#define CL_COLD_BYTES ((size_t)8 << 20)
/* Rows ahead that a BatchNorm sweep (a call spanning CL_COLD_BYTES or
 * more) prefetches the lines it reads: the hardware prefetcher alone left
 * the moments of a BatchNorm forward from memory short, and 8 rows ahead
 * took the forward (moments, then the normalize) from 1.88 to 1.75 of the
 * memcpy at 8x256x56x56, 1.87 to 1.77 at 16x512x28x28 and 1.40 to 1.32 at
 * 8x1000x14x14 (medians of six same-run alternations; 4 and 16 rows ahead
 * were no better). The cold entry (InstanceNorm and GroupNorm samples,
 * kernels_avx512_clfwd.c) was not measured with it and keeps none. */
#define CL_SWEEP_PF 8

/* Adds R rows (stride apart) of L positions, shifted by pk, into the
 * float sums a and b (aligned, cl_pad(L) long); lanes past L add zero,
 * and pk and x are read only up to L. */
static inline __attribute__((always_inline)) void cl_mom_sweep(
    int R, const float *x, size_t stride, size_t L, const float *pk, float *a,
    float *b, size_t pfr) {
  for (size_t j = 0; j < L; j += 16) {
    __mmask16 m = tail_mask(L - j);
    __m512 k = load16(m, pk + j);
    __m512 sa = _mm512_load_ps(a + j), sb = _mm512_load_ps(b + j);
    for (int i = 0; i < R; i++) {
      /* Computed as an integer: the line may lie past x's end, where a
       * prefetch is harmless but a pointer would not be valid. */
      if (pfr > 0)
        _mm_prefetch((const char *)((uintptr_t)(x + i * stride + j) +
                                    pfr * stride * sizeof *x),
                     _MM_HINT_T0);
      __m512 xv = load16(m, x + i * stride + j);
      __m512 d =
          m == 0xFFFF ? _mm512_sub_ps(xv, k) : _mm512_maskz_sub_ps(m, xv, k);
      sa = _mm512_add_ps(sa, d);
      sb = _mm512_fmadd_ps(d, d, sb);
    }
    _mm512_store_ps(a + j, sa);
    _mm512_store_ps(b + j, sb);
  }
}

static void cl_mom_sweep_n(const float *x, size_t stride, size_t L,
                           const float *pk, float *a, float *b, size_t pfr) {
  cl_mom_sweep(CL_SWEEP, x, stride, L, pk, a, b, pfr);
}

static void cl_mom_sweep_1(const float *x, size_t stride, size_t L,
                           const float *pk, float *a, float *b, size_t pfr) {
  cl_mom_sweep(1, x, stride, L, pk, a, b, pfr);
}

/* Adds the moments of `rows` rows of L positions (stride apart), shifted
 * by pk, into the doubles d1 and d2 (L of each), prefetching pfr rows
 * ahead (0: none; CL_SWEEP_PF). The float sums are placed
 * 2 KiB off x modulo 4 KiB: a load whose address matches a pending store's
 * in the low 12 bits waits for it (4K aliasing), and at a smaller distance
 * one row at a time ran at 8-12 GB/s instead of 12-18, depending on where
 * the stack happened to lie. */
static void cl_mom_wide(const float *x, size_t rows, size_t stride, size_t L,
                        const float *pk, double *d1, double *d2, size_t pfr) {
  float acc[2 * CL_LEN + 1024] __attribute__((aligned(64)));
  size_t o = (((uintptr_t)x + 2048 - (uintptr_t)acc) & 4095) & ~(size_t)63;
  float *a = acc + o / sizeof *acc, *b = a + CL_LEN;
  size_t R = L > CL_SWEEP_L ? CL_SWEEP : 1;
  for (size_t r0 = 0; r0 < rows; r0 += RB) {
    size_t nr = rows - r0 < RB ? rows - r0 : RB, r = 0;
    const float *p = x + r0 * stride;
    memset(a, 0, cl_pad(L) * sizeof *a);
    memset(b, 0, cl_pad(L) * sizeof *b);
    for (; R > 1 && r + R <= nr; r += R)
      cl_mom_sweep_n(p + r * stride, stride, L, pk, a, b, pfr);
    for (; r < nr; r++)
      cl_mom_sweep_1(p + r * stride, stride, L, pk, a, b, pfr);
    fold_row(a, d1, L);
    fold_row(b, d2, L);
  }
}

/* Adds the sums of n elements of a dense view of period P (one tile) seen
 * from position rot < P of its period into s1 and s2: rows of P, the
 * parameters rotated by rot, then a short last row. */
static void cl_sums_flat(int bwd, const float *x, const float *dy, size_t n,
                         size_t C, size_t S, size_t P, size_t rot, size_t pf,
                         const float *k, const double *mean, const double *istd,
                         double *s1, double *s2) {
  float pa[CL_LEN] __attribute__((aligned(64)));
  float pb[CL_LEN] __attribute__((aligned(64)));
  float pc[CL_LEN] __attribute__((aligned(64)));
  double d1[CL_LEN] __attribute__((aligned(64)));
  double d2[CL_LEN] __attribute__((aligned(64)));
  unsigned ch[CL_LEN];
  geo_t g[1] = {{n / P, P, P, 0}};
  size_t rows = n / P, rem = n - rows * P;
  cl_chans(g, C, S, rot, ch);
  cl_layout_sums(bwd, g, ch, k, mean, istd, pa, pb, pc, d1, d2);
  const cl_sums_fn *t = bwd ? cl_bwd_fns[P % 16 != 0] : cl_mom_fns[P % 16 != 0];
  for (size_t r0 = 0; r0 < rows; r0 += RB) {
    size_t nr = rows - r0 < RB ? rows - r0 : RB;
    t[(P + 15) / 16 - 1](x + r0 * P, bwd ? dy + r0 * P : NULL, nr, P, P, pa, pb,
                         pc, d1, d2, pf);
  }
  if (rem > 0) {
    t = bwd ? cl_bwd_fns[rem % 16 != 0] : cl_mom_fns[rem % 16 != 0];
    t[(rem + 15) / 16 - 1](x + rows * P, bwd ? dy + rows * P : NULL, 1, P, rem,
                           pa, pb, pc, d1, d2, pf);
  }
  for (size_t j = 0; j < P; j++) {
    s1[ch[j]] += d1[j];
    s2[ch[j]] += d2[j];
  }
}

/* sbn__avx512_cl_sums, with the moments of wide rows swept (cl_mom_wide)
 * whatever the call's span when `cold` is set. */
static int cl_sums(int bwd, int cold, const float *x, const float *dy, size_t A,
                   size_t C, size_t S, size_t lda, const float *k,
                   const double *mean, const double *istd, double *s1,
                   double *s2) {
  float pa[CL_LEN] __attribute__((aligned(64)));
  float pb[CL_LEN] __attribute__((aligned(64)));
  float pc[CL_LEN] __attribute__((aligned(64)));
  double d1[CL_LEN] __attribute__((aligned(64)));
  double d2[CL_LEN] __attribute__((aligned(64)));
  unsigned ch[CL_LEN];
  size_t vmax = bwd ? 4 : 8, off;
  size_t span = A > 0 ? (A - 1) * lda + C * S : 0;
  geo_t g[1];
  if (!cl_takes(A, C, S, lda, 16 * vmax, !bwd))
    return 0;
  if (lda == C * S && C * S / gcd(C * S, 16) * 16 <= 16 * vmax &&
      cl_piece(A, C, S, lda, 0, 16 * vmax, g, &off)) {
    /* A dense view of one tile's period is one stream, read from x's
     * first line boundary on (the h elements before apart): offset from a
     * line (malloc's 16 bytes), every load took two lines, and the sums of
     * BatchNorm NHWC 32x64x32x32 took 0.53-0.60 ms against 0.38-0.43. */
    size_t n = A * C * S, P = g->stride, pf = cold ? CL_PF_COLD : CL_PF;
    size_t h = n >= 16 * P ? head_elems(x, n, 1) : 0;
    if (h > 0)
      cl_sums_flat(bwd, x, dy, h, C, S, P, 0, pf, k, mean, istd, s1, s2);
    cl_sums_flat(bwd, x + h, bwd ? dy + h : NULL, n - h, C, S, P, h, pf, k,
                 mean, istd, s1, s2);
    return 1;
  }
  for (size_t i = 0; cl_piece(A, C, S, lda, i, 16 * vmax, g, &off); i++) {
    size_t L = g->L, st = g->stride, c0 = g->j0 % C;
    size_t pf = L > 16 * vmax ? CL_PF_ROWS * st
                : cold        ? CL_PF_COLD
                              : (size_t)CL_PF;
    const float *xp = x + off, *dp = bwd ? dy + off : NULL;
    int sweep =
        !bwd && L > 16 * vmax && (cold || span >= CL_COLD_BYTES / sizeof *x);
    size_t spf = cold ? 0 : (size_t)CL_SWEEP_PF;
    /* A swept piece of one position per channel (S = 1: BatchNorm and
     * InstanceNorm) is channels c0 .. c0 + L - 1 in order, so k, s1 and
     * s2 serve as its per-position arrays and nothing is laid out. */
    if (sweep && S == 1 && c0 + L <= C) {
      cl_mom_wide(xp, g->rows, st, L, k + c0, s1 + c0, s2 + c0, spf);
      continue;
    }
    cl_chans(g, C, S, 0, ch);
    cl_layout_sums(bwd, g, ch, k, mean, istd, pa, pb, pc, d1, d2);
    if (sweep)
      cl_mom_wide(xp, g->rows, st, L, pa, d1, d2, spf);
    for (size_t r0 = 0; !sweep && r0 < g->rows; r0 += RB) {
      size_t nr = g->rows - r0 < RB ? g->rows - r0 : RB;
      for (size_t j = 0; j < L; j += 16 * vmax) {
        size_t w = L - j < 16 * vmax ? L - j : 16 * vmax;
        const cl_sums_fn *t =
            bwd ? cl_bwd_fns[w % 16 != 0] : cl_mom_fns[w % 16 != 0];
        t[(w + 15) / 16 - 1](xp + r0 * st + j, bwd ? dp + r0 * st + j : NULL,
                             nr, st, w, pa + j, pb + j, pc + j, d1 + j, d2 + j,
                             pf);
      }
    }
    for (size_t j = 0; j < L; j++) {
      s1[ch[j]] += d1[j];
      s2[ch[j]] += d2[j];
    }
  }
  return 1;
}

int sbn__avx512_cl_sums(int bwd, const float *x, const float *dy, size_t A,
                        size_t C, size_t S, size_t lda, const float *k,
                        const double *mean, const double *istd, double *s1,
                        double *s2) {
  return cl_sums(bwd, 0, x, dy, A, C, S, lda, k, mean, istd, s1, s2);
}

int sbn__avx512_cl_moments_cold(const float *x, size_t A, size_t C, size_t S,
                                size_t lda, const float *k, double *s1,
                                double *s2) {
  return cl_sums(0, 1, x, NULL, A, C, S, lda, k, NULL, NULL, s1, s2);
}

/* ------------------------------------------------------------------ */
/* Normalize: y = ((x - h) - l) * sc + sh. */

static inline __attribute__((always_inline)) void cl_norm_tile(
    int V, int tail, const float *x, float *y, size_t rows, size_t stride,
    size_t L, const float *ph, const float *pl, const float *ps,
    const float *pb, int nt, size_t pf) {
  __m512 h[4], l[4], s[4], b[4];
  __mmask16 m = cl_last(L);
  CL_UNROLL
  for (int v = 0; v < V; v++) {
    h[v] = _mm512_load_ps(ph + 16 * v);
    l[v] = _mm512_load_ps(pl + 16 * v);
    s[v] = _mm512_load_ps(ps + 16 * v);
    b[v] = _mm512_load_ps(pb + 16 * v);
  }
  for (size_t r = 0; r < rows; r++) {
    const float *p = x + r * stride;
    float *q = y + r * stride;
    CL_UNROLL
    for (int v = 0; v < V; v++) {
      _mm_prefetch((const char *)(p + 16 * v + pf), _MM_HINT_T0);
      __m512 d = _mm512_sub_ps(
          _mm512_sub_ps(cl_ld(tail, v, V, m, p + 16 * v), h[v]), l[v]);
      cl_st(tail, v, V, m, q + 16 * v, _mm512_fmadd_ps(d, s[v], b[v]), nt);
    }
  }
}

typedef void (*cl_norm_fn)(const float *, float *, size_t, size_t, size_t,
                           const float *, const float *, const float *,
                           const float *, int, size_t);
#define CL_NORM(V, T)                                                     \
  static void cl_norm_##V##_##T(const float *x, float *y, size_t rows,    \
                                size_t stride, size_t L, const float *ph, \
                                const float *pl, const float *ps,         \
                                const float *pb, int nt, size_t pf) {     \
    cl_norm_tile(V, T, x, y, rows, stride, L, ph, pl, ps, pb, nt, pf);    \
  }
CL_ROWS4(CL_NORM)
static const cl_norm_fn cl_norm_fns[2][4] = CL_TAB4(cl_norm_);

/* Normalizes nr rows of wl positions, tile by tile. */
static void cl_norm_block(const float *x, float *y, size_t nr, size_t stride,
                          size_t wl, const cl_norm_par_t *pp, int nt,
                          size_t pf) {
  for (size_t j = 0; j < wl; j += 64) {
    size_t w = wl - j < 64 ? wl - j : 64;
    cl_norm_fns[w % 16 != 0][(w + 15) / 16 - 1](x + j, y + j, nr, stride, w,
                                                pp->h + j, pp->l + j, pp->s + j,
                                                pp->b + j, nt, pf);
  }
}

/* Normalizes n elements of a piece's rows (L wide, stride apart; the last
 * row may be short) with parameters at position 0 of the first: a row of
 * one tile straight through, wider rows in blocks of CL_BLOCK rows. */
static void cl_norm_rows(const float *x, float *y, size_t n, size_t stride,
                         size_t L, const cl_norm_par_t *pp, int nt) {
  size_t rows = n / L, rem = n - rows * L, one = L <= 64;
  size_t blk = one && rows > 0 ? rows : CL_BLOCK;
  size_t pf = one ? (size_t)CL_PF : blk * stride;
  for (size_t r0 = 0; r0 < rows; r0 += blk) {
    size_t nr = rows - r0 < blk ? rows - r0 : blk;
    cl_norm_block(x + r0 * stride, y + r0 * stride, nr, stride, L, pp, nt, pf);
  }
  if (rem > 0)
    cl_norm_block(x + rows * stride, y + rows * stride, 1, stride, rem, pp, nt,
                  pf);
}

/* Dense rows of one position per channel (S = 1: BatchNorm, and
 * InstanceNorm's samples in eval) wider than a tile, at most CL_PMAX and
 * not a whole number of vectors: one flat stream (sbn__avx512_cl_flat_*)
 * with y = (x - h) * s + t, t = shift - l * s in double, rounded once.
 * The tiles there start every other row of C = 1000 half a line off, so a
 * streamed output had lines written both by streaming and by plain
 * stores, which leaves write-combining buffers half full: BatchNorm NHWC
 * 8x1000x14x14 forward took 2.07-2.31 of the memcpy in `syncbn bench
 * kernels` against 1.26-1.33 flat (three alternations). Rows of whole
 * vectors from 4 MiB go flat too: their tiles walk 16 rows a power of two
 * bytes apart, in the same L1 sets; flat took 0.72-0.93 of the tiles' time
 * (BatchNorm NHWC train_fwd 8x512x28x28 .. 8x256x56x56, same-run A/B). */
#define CL_FLAT_ELEMS (((size_t)4 << 20) / sizeof(float))
static void cl_norm_flat(const float *x, float *y, size_t A, size_t C,
                         const float *mh, const float *ml, const float *scale,
                         const float *shift, int nt) {
  float par[3 * CL_LEN] __attribute__((aligned(64)));
  for (size_t c = 0; c < C; c++) {
    par[c] = mh[c];
    par[CL_LEN + c] = scale[c];
    par[2 * CL_LEN + c] =
        (float)((double)shift[c] - (double)ml[c] * (double)scale[c]);
  }
  sbn__avx512_cl_flat_pad(par, CL_LEN, C);
  sbn__avx512_cl_flat_normalize(x, y, A * C, C, par, CL_LEN, nt, 0);
}

int sbn__avx512_cl_normalize(const float *x, float *y, size_t A, size_t C,
                             size_t S, size_t lda, const float *mh,
                             const float *ml, const float *scale,
                             const float *shift) {
  cl_norm_par_t pp;
  int nt = cl_want_nt(A, C, S, lda);
  geo_t g[1];
  size_t off;
  if (!cl_takes(A, C, S, lda, 64, 1))
    return 0;
  if (S == 1 && lda == C && C > 64 && C <= CL_PMAX && A > 0 &&
      (C % 16 != 0 || A * C >= CL_FLAT_ELEMS)) {
    cl_norm_flat(x, y, A, C, mh, ml, scale, shift, nt);
    _mm_sfence();
    _mm256_zeroupper();
    return 1;
  }
  for (size_t i = 0; cl_piece(A, C, S, lda, i, 64, g, &off); i++) {
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
/* dx = k1*dy + (q*(x - h) + r) in float (avx512_inl.h's dx_params_f):
 * four float vectors of parameters per vector of a tile, so tiles of up
 * to 4 vectors keep 16 registers of them (double, as before, took 24 and
 * four conversions and a pack per vector). */

typedef struct cl_dx_par_s {
  float k[CL_LEN] __attribute__((aligned(64)));
  float q[CL_LEN] __attribute__((aligned(64)));
  float h[CL_LEN] __attribute__((aligned(64)));
  float r[CL_LEN] __attribute__((aligned(64)));
} cl_dx_par_t;

static inline __attribute__((always_inline)) void cl_apply_tile(
    int V, int tail, const float *x, const float *dy, float *dx, size_t rows,
    size_t stride, size_t L, const cl_dx_par_t *pp, int nt, size_t pf) {
  __m512 k[4], q[4], h[4], r[4];
  __mmask16 m = cl_last(L);
  CL_UNROLL
  for (int v = 0; v < V; v++) {
    k[v] = _mm512_load_ps(pp->k + 16 * v);
    q[v] = _mm512_load_ps(pp->q + 16 * v);
    h[v] = _mm512_load_ps(pp->h + 16 * v);
    r[v] = _mm512_load_ps(pp->r + 16 * v);
  }
  /* Last row first, prefetching pf floats behind: see
   * sbn__avx512_cl_apply. */
  for (size_t i = rows; i-- > 0;) {
    size_t o = i * stride;
    CL_UNROLL
    for (int v = 0; v < V; v++) {
      _mm_prefetch((const char *)((uintptr_t)(x + o + 16 * v) - 4 * pf),
                   _MM_HINT_T0);
      _mm_prefetch((const char *)((uintptr_t)(dy + o + 16 * v) - 4 * pf),
                   _MM_HINT_T0);
      __m512 d = _mm512_sub_ps(cl_ld(tail, v, V, m, x + o + 16 * v), h[v]);
      __m512 out = _mm512_fmadd_ps(k[v], cl_ld(tail, v, V, m, dy + o + 16 * v),
                                   _mm512_fmadd_ps(q[v], d, r[v]));
      cl_st(tail, v, V, m, dx + o + 16 * v, out, nt);
    }
  }
}

typedef void (*cl_apply_fn)(const float *, const float *, float *, size_t,
                            size_t, size_t, const cl_dx_par_t *, int, size_t);
#define CL_APPLY(V, T)                                                       \
  static void cl_apply_##V##_##T(const float *x, const float *dy, float *dx, \
                                 size_t rows, size_t stride, size_t L,       \
                                 const cl_dx_par_t *pp, int nt, size_t pf) { \
    cl_apply_tile(V, T, x, dy, dx, rows, stride, L, pp, nt, pf);             \
  }
CL_ROWS4(CL_APPLY)
static const cl_apply_fn cl_apply_fns[2][4] = CL_TAB4(cl_apply_);

/* The dx parameters of a piece, its positions rotated by rot. */
static void cl_layout_dx(const geo_t *g, size_t C, size_t S, size_t rot,
                         const double *mean, const double *istd,
                         const double *k1, const double *k2, const double *k3,
                         cl_dx_par_t *pp) {
  unsigned ch[CL_LEN];
  cl_chans(g, C, S, rot, ch);
  for (size_t j = 0; j < cl_pad(g->L); j++)
    dx_params_f(j, ch[j], mean, istd, k1, k2, k3, pp->k, pp->q, pp->h, pp->r);
}

/* dx of n elements of rows of L <= 64 positions, stride apart, with
 * parameters at position 0 of the first: the short last row first, then
 * the whole rows last to first (see sbn__avx512_cl_apply). */
static void cl_apply_rows(const float *x, const float *dy, float *dx, size_t n,
                          size_t stride, size_t L, const cl_dx_par_t *pp,
                          int nt) {
  size_t rows = n / L, rem = n - rows * L, o = rows * stride;
  if (rem > 0)
    cl_apply_fns[rem % 16 != 0][(rem + 15) / 16 - 1](
        x + o, dy + o, dx + o, 1, stride, rem, pp, nt, CL_PF_DX);
  if (rows > 0)
    cl_apply_fns[L % 16 != 0][(L + 15) / 16 - 1](x, dy, dx, rows, stride, L, pp,
                                                 nt, CL_PF_DX);
}

int sbn__avx512_cl_apply(const float *x, const float *dy, float *dx, size_t A,
                         size_t C, size_t S, size_t lda, const double *mean,
                         const double *istd, const double *k1, const double *k2,
                         const double *k3) {
  cl_dx_par_t pp;
  geo_t g[1];
  size_t off;
  if (!cl_takes(A, C, S, lda, 64, 0))
    return 0;
  /* cl_apply streams dx where the forward streams y (cl_want_nt): dx is
   * written once and not read again by the pass. Stored normally, each line
   * of dx is first read from memory, and in a sample of InstanceNorm or
   * GroupNorm it evicts from L2 the x and dy that the pass reads next.
   * Measured in one run against plain stores (syncbn bench kernels, NHWC,
   * medians of five alternations):
   * BatchNorm 32x64x32x32 backward 1.78 -> 1.55 of its floor, InstanceNorm
   * 1.79 -> 1.38 (a 256 KiB sample) and 8x64x56x56 1.72 -> 1.34. */
  int nt = cl_want_nt(A, C, S, lda);
  size_t np = 0;
  while (cl_piece(A, C, S, lda, np, 64, g, &off))
    np++;
  /* Last piece and row first: the sums just read x and dy front to back,
   * so their last lines are the ones still in L2, and a pass whose x and
   * dy exceed the L2 finds the most recent megabyte there before it goes
   * to L3 (kernels_avx512.c's pos_apply does the same). */
  for (size_t i = np; i-- > 0;) {
    cl_piece(A, C, S, lda, i, 64, g, &off);
    size_t L = g->L, o = off;
    /* A flat piece that streams starts its whole vectors at dx's first
     * line boundary, as sbn__avx512_cl_normalize's y: the rest of the
     * stream seen from position h, its parameters rotated by h, and the
     * first h elements last with plain stores. */
    if (nt && g->stride == L && L >= 16) {
      size_t n = g->rows * L, h = head_elems(dx + o, n, nt);
      cl_layout_dx(g, C, S, h, mean, istd, k1, k2, k3, &pp);
      cl_apply_rows(x + o + h, dy + o + h, dx + o + h, n - h, L, L, &pp, nt);
      if (h > 0) {
        cl_layout_dx(g, C, S, 0, mean, istd, k1, k2, k3, &pp);
        cl_apply_rows(x + o, dy + o, dx + o, h, L, L, &pp, 0);
      }
      continue;
    }
    cl_layout_dx(g, C, S, 0, mean, istd, k1, k2, k3, &pp);
    cl_apply_rows(x + o, dy + o, dx + o, g->rows * L, g->stride, L, &pp, 0);
  }
  _mm_sfence();
  _mm256_zeroupper(); /* see kernels_avx512.c's pos_apply */
  return 1;
}
#endif /* SBN__HAVE_AVX512 */
