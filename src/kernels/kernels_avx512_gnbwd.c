/* GroupNorm and InstanceNorm NCHW backward on short planes (16 <= S <=
 * 256 values, 7x7 and 14x14), 16 channels at a time: the part of the
 * table's gn_bwd_nchw (kernels_avx512_gn.c) that takes groups of 1, 2, 4
 * or 8 channels (tiles of whole groups) and groups of a multiple of 16
 * channels (16-channel chunks of one group). Compiled with the AVX-512
 * flags like kernels_avx512.c.
 *
 * A tile's sums are the 16-channel transposing tree's (tile16), its dx
 * one flat stream over 16 * S values whose lanes take their channel's
 * parameters by a permute. Three things cost more than the data at 7x7:
 * every vector permuted all four dx parameters, though in a group of 16
 * or more channels only k = istd * w[c] differs between lanes (with no
 * weights none does); the stream tested a mask, the load's form and
 * whether to stream on every vector; and each unit's dx prefetched only
 * the next 3 KiB tile, so that memory sat idle while a tile's sums were
 * formed from the cache. Here only the parameters that differ are
 * permuted, the loop runs over whole vectors with the stores' kind fixed,
 * and tiles go in blocks of up to GN_SHORT_BLOCK bytes of x: the block's
 * sums first, then its dx, which prefetches the next block. Groups of 2,
 * 4 and 8 channels (GroupNorm(32) from 64, 128 and 256 channels) take
 * the same tiles, their group sums formed within the lanes (group_sum);
 * at 14x14 they went run by run before. */
#include "kernels/sbn_kernels.h"

#ifdef SBN__HAVE_AVX512
#include "kernels/avx512_inl.h"

/* The longest plane taken here (the tiles' sums add at most 16 values
 * per lane in float). */
#define GN_SHORT_L 256u

/* Tiles go in blocks of up to this many bytes of x (at least one tile,
 * at most GN_SHORT_TILES; whole groups): x and dy of a block and of the
 * next one, prefetched while its dx is written, stay in the L1 and L2.
 * In a standalone loop over the kernel (cold, against a streaming
 * two-read-one-write floor, medians of three alternated runs), blocks of
 * one tile took 1.82 (GroupNorm 8x512x7x7), 2.03 (InstanceNorm
 * 8x512x7x7) and 2.00 (InstanceNorm 8x2048x7x7) of the floor, blocks of
 * 16 KiB 1.47, 1.77 and 1.76; 14x14 (one 12.5 KiB tile per block either
 * way) did not change. */
#define GN_SHORT_BLOCK 16384u
#define GN_SHORT_TILES 16u

/* The parameters of each lane of a vector whose lanes lie in channels
 * idx (vary = 2: all four differ between channels; 1: only k; 0: none). */
static inline __attribute__((always_inline)) gn_vpar_t lane_par(int vary,
                                                                __m512i idx,
                                                                gn_vpar_t p) {
  gn_vpar_t v = p;
  if (vary != 0)
    v.k = _mm512_permutexvar_ps(idx, p.k);
  if (vary == 2) {
    v.q = _mm512_permutexvar_ps(idx, p.q);
    v.h = _mm512_permutexvar_ps(idx, p.h);
    v.r = _mm512_permutexvar_ps(idx, p.r);
  }
  return v;
}

/* dx = k * dy + (q * (x - h) + r) over a tile's flat stream of n values
 * of channels of S (lane j of p holds channel j's parameters): a masked
 * head of h0 values (channel 0's, h0 < 16 <= S), then whole vectors,
 * stored by streaming when nt (then o + h0 is on a line boundary), then
 * a masked plain store of the rest, so that a line shared with the next
 * tile is written only by plain stores. Prefetches x and dy pf floats
 * ahead (pf = 0 on the last tile: the lines being read, which costs
 * nothing). The lanes' channels move on by flat_step's chain of four
 * dependent operations per vector: channel indices from a table built
 * once per call, or formed without a chain, made the loop faster from
 * the cache but slower from memory at 14x14 (GroupNorm 8x1024x14x14
 * 1.6-1.75 of the floor against 1.35-1.5), and no faster at 7x7: the
 * chain paces the loop's prefetches. */
static inline __attribute__((always_inline)) void flat_dx(
    int vary, int nt, const float *x, const float *dy, float *o, size_t n,
    size_t S, size_t h0, gn_vpar_t p, size_t pf) {
  __m512i r =
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512i idx = _mm512_setzero_si512(), vs = _mm512_set1_epi32((int)S);
  if (h0 > 0) {
    __mmask16 m = tail_mask(h0);
    _mm512_mask_storeu_ps(o, m, dx16f(x, dy, m, lane_par(vary, idx, p)));
    flat_step(&r, &idx, (int)h0, vs);
  }
  size_t i = h0;
  for (; i + 16 <= n; i += 16) {
    _mm_prefetch((const char *)(x + i + pf), _MM_HINT_T0);
    _mm_prefetch((const char *)(dy + i + pf), _MM_HINT_T0);
    __m512 d = dx16f(x + i, dy + i, 0xFFFF, lane_par(vary, idx, p));
    if (nt) {
      _mm512_stream_ps(o + i, d);
    } else {
      /* dx's lines are prefetched for writing 1 KiB ahead, as
       * kernels_avx512_gn.c's unit_run does (see GN_PFW there); past the
       * tile's end it reaches the next tile's dx, or lines past the
       * tensor (computed as an integer), which is harmless. */
      __builtin_prefetch((const void *)((uintptr_t)(o + i) + 1024), 1, 3);
      _mm512_storeu_ps(o + i, d);
    }
    if (vary != 0)
      flat_step(&r, &idx, 16, vs);
  }
  if (i < n) {
    __mmask16 m = tail_mask(n - i);
    _mm512_mask_storeu_ps(o + i, m,
                          dx16f(x + i, dy + i, m, lane_par(vary, idx, p)));
  }
}

/* flat_dx with vary and nt as constants. */
static void tile_dx(int vary, int nt, const float *x, const float *dy, float *o,
                    size_t n, size_t S, size_t h0, gn_vpar_t p, size_t pf) {
  if (vary == 2)
    nt ? flat_dx(2, 1, x, dy, o, n, S, h0, p, pf)
       : flat_dx(2, 0, x, dy, o, n, S, h0, p, pf);
  else if (vary == 1)
    nt ? flat_dx(1, 1, x, dy, o, n, S, h0, p, pf)
       : flat_dx(1, 0, x, dy, o, n, S, h0, p, pf);
  else
    nt ? flat_dx(0, 1, x, dy, o, n, S, h0, p, pf)
       : flat_dx(0, 0, x, dy, o, n, S, h0, p, pf);
}

/* Adds each lane of v to the other lanes of its group of cpg (1, 2, 4 or
 * 8) lanes, so that every lane holds its group's sum. */
static inline __m512d group_sum(__m512d v, size_t cpg) {
  if (cpg >= 2)
    v = _mm512_add_pd(v, _mm512_permute_pd(v, 0x55));
  if (cpg >= 4)
    v = _mm512_add_pd(v, _mm512_shuffle_f64x2(v, v, 0xB1));
  if (cpg >= 8)
    v = _mm512_add_pd(v, _mm512_shuffle_f64x2(v, v, 0x4E));
  return v;
}

static inline __m512 join8(__m256 lo, __m256 hi) {
  return _mm512_insertf32x8(_mm512_castps256_ps512(lo), hi, 1);
}

/* The backward of a tile of nc <= 16 channels, whole groups of cpg = 1,
 * 2, 4 or 8 (mean and istd from the tile's first group on): the
 * 16-channel tile sums; every channel's dx parameters in one pass of
 * double vectors (group_par's for the group sums that group_sum forms
 * within the lanes), with dweight and dbias added; then dx as one flat
 * stream. */
static gn_vpar_t tile_par(const float *x, const float *dy, size_t nc,
                          size_t cpg, size_t S, const double *mean,
                          const double *istd, const float *w, int stats,
                          double *dw, double *db) {
  double pm[16], pi[16];
  float hs[16];
  for (size_t j = 0, g = 0, k = 0; j < 16; j++) {
    pm[j] = j < nc ? mean[g] : 0.0;
    pi[j] = j < nc ? istd[g] : 0.0;
    hs[j] = (float)pm[j];
    if (++k == cpg)
      k = 0, g++;
  }
  __m512 ta, tb;
  tile16(1, x, dy, nc, S, hs, &ta, &tb);
  __mmask16 m = tail_mask(nc);
  __m256 pk[2], pq[2], ph[2], pr[2];
  __m512d vm = _mm512_set1_pd((double)cpg * (double)S);
  __m512d zero = _mm512_setzero_pd();
  for (int half = 0; half < 2; half++) {
    __mmask8 mk = (__mmask8)(m >> (8 * half));
    size_t o = 8 * (size_t)half;
    __m512d md = _mm512_loadu_pd(pm + o), is = _mm512_loadu_pd(pi + o);
    ph[half] = _mm512_cvtpd_ps(md);
    __m512d l = _mm512_sub_pd(md, _mm512_cvtps_pd(ph[half]));
    __m512d sdy = _mm512_cvtps_pd(half ? _mm512_extractf32x8_ps(ta, 1)
                                       : _mm512_castps512_ps256(ta));
    __m512d sb = _mm512_cvtps_pd(half ? _mm512_extractf32x8_ps(tb, 1)
                                      : _mm512_castps512_ps256(tb));
    /* sum dy * xhat = istd * (sum dy (x - h) - l sum dy), as unit_sums. */
    __m512d sdyx = _mm512_mul_pd(is, _mm512_sub_pd(sb, _mm512_mul_pd(l, sdy)));
    _mm512_mask_storeu_pd(
        db + o, mk, _mm512_add_pd(_mm512_maskz_loadu_pd(mk, db + o), sdy));
    _mm512_mask_storeu_pd(
        dw + o, mk, _mm512_add_pd(_mm512_maskz_loadu_pd(mk, dw + o), sdyx));
    __m512d k1 = is, sg = sdy, sgx = sdyx;
    if (w != NULL) {
      __m512d wd = _mm512_cvtps_pd(_mm256_maskz_loadu_ps(mk, w + o));
      k1 = _mm512_mul_pd(is, wd);
      sg = _mm512_mul_pd(wd, sdy);
      sgx = _mm512_mul_pd(wd, sdyx);
    }
    /* group_par's q = -istd^2 sum(w dy xhat) / m and k3 = -istd
     * sum(w dy) / m over the lane's group, with r = k3 - q * l. */
    __m512d q = zero, k3 = zero;
    if (stats) {
      __m512d nis = _mm512_sub_pd(zero, is);
      q = _mm512_div_pd(
          _mm512_mul_pd(_mm512_mul_pd(nis, is), group_sum(sgx, cpg)), vm);
      k3 = _mm512_div_pd(_mm512_mul_pd(nis, group_sum(sg, cpg)), vm);
    }
    pk[half] = _mm512_cvtpd_ps(k1);
    pq[half] = _mm512_cvtpd_ps(q);
    pr[half] = _mm512_cvtpd_ps(_mm512_fnmadd_pd(q, l, k3));
  }
  gn_vpar_t p = {join8(pk[0], pk[1]), join8(pq[0], pq[1]), join8(ph[0], ph[1]),
                 join8(pr[0], pr[1])};
  return p;
}

/* The backward of one group of cpg channels, a multiple of 16 (7x7 and
 * 14x14 planes of GroupNorm(32) from 512 channels): tile_bwd's sums 16
 * channels at a time, the group's sums of w * dy and w * dy * xhat
 * gathered across its chunks before any dx, whose q, h and r are then
 * the same for every lane (and k too without weights). */
static gn_vpar_t group16_par(const float *x, const float *dy, size_t cpg,
                             size_t S, double mu, double is, const float *w,
                             int stats, double *dw, double *db) {
  float hf = (float)mu, hs[16];
  double l = mu - (double)hf;
  for (size_t j = 0; j < 16; j++)
    hs[j] = hf;
  __m512d vl = _mm512_set1_pd(l), vis = _mm512_set1_pd(is);
  __m512d sg = _mm512_setzero_pd(), sgx = sg;
  for (size_t c = 0; c < cpg; c += 16) {
    __m512 ta, tb;
    tile16(1, x + c * S, dy + c * S, 16, S, hs, &ta, &tb);
    for (int half = 0; half < 2; half++) {
      size_t o = c + 8 * (size_t)half;
      __m512d sdy = _mm512_cvtps_pd(half ? _mm512_extractf32x8_ps(ta, 1)
                                         : _mm512_castps512_ps256(ta));
      __m512d sb = _mm512_cvtps_pd(half ? _mm512_extractf32x8_ps(tb, 1)
                                        : _mm512_castps512_ps256(tb));
      __m512d sdyx =
          _mm512_mul_pd(vis, _mm512_sub_pd(sb, _mm512_mul_pd(vl, sdy)));
      _mm512_storeu_pd(db + o, _mm512_add_pd(_mm512_loadu_pd(db + o), sdy));
      _mm512_storeu_pd(dw + o, _mm512_add_pd(_mm512_loadu_pd(dw + o), sdyx));
      if (w != NULL) {
        __m512d wd = _mm512_cvtps_pd(_mm256_loadu_ps(w + o));
        sdy = _mm512_mul_pd(wd, sdy);
        sdyx = _mm512_mul_pd(wd, sdyx);
      }
      sg = _mm512_add_pd(sg, sdy);
      sgx = _mm512_add_pd(sgx, sdyx);
    }
  }
  /* group_par's coefficients. */
  double m = (double)cpg * (double)S;
  double q = stats ? -is * is * _mm512_reduce_add_pd(sgx) / m : 0;
  double k3 = stats ? -is * _mm512_reduce_add_pd(sg) / m : 0;
  gn_vpar_t p = {_mm512_set1_ps((float)is), _mm512_set1_ps((float)q),
                 _mm512_set1_ps(hf), _mm512_set1_ps((float)(k3 - q * l))};
  return p;
}

int sbn__avx512_gn_bwd_short(const float *x, const float *dy, float *dx,
                             size_t G, size_t cpg, size_t S, const double *mean,
                             const double *istd, const float *w, int stats,
                             double *dw, double *db, int nt) {
  int wide = cpg % 16 == 0;
  if (S < 16 || S > GN_SHORT_L || (!wide && (cpg > 16 || 16 % cpg != 0)))
    return 0;
  /* Every tile starts at dx's offset in its line (16 * S floats are S
   * whole lines): one head length serves them all. An output that is not
   * even 4-byte aligned has no head and never streams. */
  size_t h0 = head_elems(dx, 16 * S, nt);
  if (((uintptr_t)(dx + h0) & 63) != 0)
    nt = 0;
  size_t C = G * cpg, cs = 16 * S, bc = GN_SHORT_BLOCK / (cs * sizeof(float));
  bc = bc < 1 ? 1 : (bc > GN_SHORT_TILES ? GN_SHORT_TILES : bc);
  gn_vpar_t par[GN_SHORT_TILES];
  if (wide) {
    size_t L = cpg * S, gpb = bc * 16 / cpg;
    gpb = gpb < 1 ? 1 : gpb;
    for (size_t g0 = 0; g0 < G; g0 += gpb) {
      size_t g1 = G - g0 < gpb ? G : g0 + gpb;
      size_t pf = g1 < G ? (g1 - g0) * L : 0;
      for (size_t g = g0; g < g1; g++)
        par[g - g0] = group16_par(x + g * L, dy + g * L, cpg, S, mean[g],
                                  istd[g], w != NULL ? w + g * cpg : NULL,
                                  stats, dw + g * cpg, db + g * cpg);
      for (size_t c = g0 * cpg; c < g1 * cpg; c += 16) {
        gn_vpar_t p = par[c / cpg - g0];
        if (w != NULL) {
          __m512d vis = _mm512_set1_pd(istd[c / cpg]);
          p.k = pack_pd(
              _mm512_mul_pd(vis, _mm512_cvtps_pd(_mm256_loadu_ps(w + c))),
              _mm512_mul_pd(vis, _mm512_cvtps_pd(_mm256_loadu_ps(w + c + 8))));
        }
        size_t e = c * S;
        tile_dx(w != NULL, nt, x + e, dy + e, dx + e, cs, S, h0, p, pf);
      }
    }
  } else {
    for (size_t c0 = 0; c0 < C; c0 += 16 * bc) {
      size_t c1 = C - c0 < 16 * bc ? C : c0 + 16 * bc;
      size_t pf = c1 < C ? (c1 - c0) * S : 0;
      for (size_t c = c0; c < c1; c += 16) {
        size_t nc = c1 - c < 16 ? c1 - c : 16;
        par[(c - c0) / 16] = tile_par(
            x + c * S, dy + c * S, nc, cpg, S, mean + c / cpg, istd + c / cpg,
            w != NULL ? w + c : NULL, stats, dw + c, db + c);
      }
      for (size_t c = c0; c < c1; c += 16) {
        size_t nc = c1 - c < 16 ? c1 - c : 16, e = c * S;
        tile_dx(2, nt, x + e, dy + e, dx + e, nc * S, S, h0, par[(c - c0) / 16],
                pf);
      }
    }
  }
  if (nt)
    _mm_sfence();
  _mm256_zeroupper();
  return 1;
}
#endif /* SBN__HAVE_AVX512 */
