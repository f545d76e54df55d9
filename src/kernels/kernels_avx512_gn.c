/* GroupNorm and InstanceNorm over NCHW samples, backward (the table's
 * gn_bwd_nchw) and training forward (gn_fwd_nchw, at the end of the
 * file); compiled with the AVX-512 flags like kernels_avx512.c.
 *
 * In NCHW a group of a sample is one contiguous block of cpg * S floats,
 * so the whole backward can run group by group: the per-channel sums of
 * dy and dy * xhat, the group's dx coefficients, then dx, while the
 * group's x and dy are still in L1 or L2. The general path (the op's
 * bwd_reduce_ld, bookkeeping, bwd_apply_ld over blocks of groups) writes
 * nine per-channel arrays between its passes and forms dx in double; with
 * 7x7 planes that per-channel work cost as much as the data. Here the
 * coefficients stay in registers and dx is formed in float from x - h (h
 * the float part of the mean), like the position views' dx_params_f,
 * whose terms are all of dx's own magnitude.
 *
 * Groups of fewer than 16 channels (InstanceNorm's single channels) are
 * taken 16 channels or more at a time, a unit of whole groups, so that
 * the short-run sums can reduce 16 channels with one transposing tree.
 * While a unit's dx is written, the next unit's x and dy are prefetched,
 * so memory is read while the cached unit is computed, instead of the
 * loads of each unit's sums starting from memory after its dx. Planes
 * of 16 to 256 values in groups of 1, 2, 4, 8 or a multiple of 16
 * channels go to kernels_avx512_gnbwd.c's tiles. */
#include "kernels/sbn_kernels.h"

#ifdef SBN__HAVE_AVX512
#include "kernels/avx512_inl.h"

/* Runs up to this long are summed 16 channels at a time (at most 12
 * values per lane, and 4 tree levels: 16 float additions deep, as the
 * long runs' chunks). */
#define GN_SHORT_S 192
/* The most values per group taken here: a group's x and dy (512 KiB)
 * then stay in the 1 MiB L2 from the sums to dx, beside the next
 * group's prefetched lines. Larger groups decline, and the op's blocked
 * path reads them twice. */
#define GN_MAX_GROUP (64u * 1024u)

/* The most values per group of a sample of G groups: one group alone
 * (GroupNorm(1), such as C = 17 here) has no next group prefetched beside
 * it, so it may take half as much again (768 KiB of x and dy): 8x17x64x64
 * (69632 values) then runs here. */
static inline size_t gn_max_group(size_t G) {
  return G == 1 ? GN_MAX_GROUP + GN_MAX_GROUP / 2 : GN_MAX_GROUP;
}
/* Units closer than this (bytes of x) are prefetched further ahead: the
 * hardware prefetcher already runs that far ahead of a stream. */
#define GN_PF_MIN 4096u
/* A pass streams its output when the bytes it moves (x and y forward; x,
 * dy and dx backward) exceed this, the core's L2: the output has then
 * left the L2 by the end of the pass whatever reads it next, and stored
 * normally each of its lines is first read from memory. This is below
 * NT_BYTES, which other passes keep; the price is that a consumer finds
 * the output in memory rather than in L3. Measured against the same
 * run's floor (InstanceNorm, ratio streamed against stored normally):
 * forward 8x2048x7x7 1.21-1.29 against 1.52-1.57, 8x256x14x14 1.06-1.20
 * against 1.32-1.56; backward 8x2048x7x7 1.31-1.41 against 1.69-1.85,
 * 8x128x28x28 1.16-1.21 against 1.42-1.46. */
#define GN_NT_BYTES ((size_t)1 << 20)

/* Whether a pass moving `tensors` tensors of `total` floats streams. */
static inline int gn_nt(size_t total, size_t tensors) {
  return total >= GN_NT_BYTES / (tensors * sizeof(float));
}
/* Forward groups of up to this many values are summed 16 groups at a
 * time (short_run's tiles: at most 16 values per lane). */
#define GN_TILE_L 256u
/* Longer forward groups are taken as many at a time as fit this many
 * bytes (at most 16): one 28x28 or 32x32 plane at a time paid a unit's
 * fixed costs (the first load's miss, the statistics' division and
 * square root) per 3-4 KiB, 1.2-1.35 of the memcpy against 0.9-1.1
 * with 16 KiB units (bench kernels, InstanceNorm 32x64x32x32 and
 * 8x512x28x28, five alternated runs). */
#define GN_FWD_UNIT 16384u

/* The backward's sums for nc <= 16 runs of 16 <= S <= GN_SHORT_S values,
 * channel j shifted by ph[j], added into t1 and t2. */
static void tile_sums(const float *x, const float *dy, size_t nc, size_t S,
                      const float *ph, double *t1, double *t2) {
  __m512 ta, tb;
  tile16(1, x, dy, nc, S, ph, &ta, &tb);
  fold_first(ta, nc, t1);
  fold_first(tb, nc, t2);
}

/* Per-channel sums of groups [g0, g1) into sdy and sdyx (channels from
 * g0 * cpg on): float sums of dy and dy * (x - h), h the float part of the
 * group's mean, then sum dy * xhat = istd * (sum dy (x - h) - l sum dy)
 * in double (l = mean - h), one parameter per run instead of three. */
static void unit_sums(const float *x, const float *dy, size_t g0, size_t g1,
                      size_t cpg, size_t S, const double *mean,
                      const double *istd, double *sdy, double *sdyx) {
  size_t c0 = g0 * cpg, c1 = g1 * cpg;
  for (size_t c = c0; c < c1; c++)
    sdy[c] = sdyx[c] = 0;
  size_t g = g0, k = 0;
  for (size_t c = c0; c < c1; c += 16) {
    size_t nc = c1 - c < 16 ? c1 - c : 16;
    float ph[16];
    for (size_t j = 0; j < nc; j++) {
      ph[j] = (float)mean[g];
      if (++k == cpg)
        k = 0, g++;
    }
    if (S <= GN_SHORT_S) {
      tile_sums(x + c * S, dy + c * S, nc, S, ph, sdy + c, sdyx + c);
      continue;
    }
    for (size_t j = 0; j < nc; j++)
      run_sums(1, 0, x + (c + j) * S, dy + (c + j) * S, S, ph[j], &sdy[c + j],
               &sdyx[c + j]);
  }
  for (g = g0; g < g1; g++) {
    double l = mean[g] - (double)(float)mean[g], is = istd[g];
    for (size_t c = g * cpg; c < (g + 1) * cpg; c++)
      sdyx[c] = is * (sdyx[c] - l * sdy[c]);
  }
}

/* A group's float q, h, r and istd. */
typedef struct {
  float q, h, r;
  double is;
} gn_gpar_t;

static inline gn_vpar_t vpar(const gn_gpar_t *gp, const float *w, size_t c) {
  gn_vpar_t v;
  v.k = _mm512_set1_ps((float)(w != NULL ? gp->is * w[c] : gp->is));
  v.q = _mm512_set1_ps(gp->q);
  v.h = _mm512_set1_ps(gp->h);
  v.r = _mm512_set1_ps(gp->r);
  return v;
}

/* Lanes of m take b's parameters, the others a's. */
static inline gn_vpar_t vblend(gn_vpar_t a, gn_vpar_t b, __mmask16 m) {
  gn_vpar_t v;
  v.k = _mm512_mask_mov_ps(a.k, m, b.k);
  v.q = _mm512_mask_mov_ps(a.q, m, b.q);
  v.h = _mm512_mask_mov_ps(a.h, m, b.h);
  v.r = _mm512_mask_mov_ps(a.r, m, b.r);
  return v;
}

/* How far ahead, in bytes (1 KiB), dx's plain stores prefetch their lines
 * for writing (PREFETCHW, as kernels_avx512_bnfuse.c's PFW; this file and
 * kernels_avx512_gnbwd.c are compiled with -mprfchw). Without it each
 * line of dx is read for ownership one after another as the store buffer
 * drains. Outputs under GN_NT_BYTES take these stores. Floor ratios of
 * the backward, medians of three alternated runs on a Xeon with 2 MiB of
 * L2 per core, without and with it: GroupNorm 1x256x14x14 1.30 and 1.09,
 * 2x64x16x16 1.28 and 1.10, 2x32x28x28 1.35 and 1.21, 1x32x40x40 1.44
 * and 1.26, 1x512x7x7 1.49 and 1.39; InstanceNorm 1x512x7x7 1.50 and
 * 1.39, 1x32x40x40 1.34 and 1.24. Above GN_NT_BYTES the streaming stores
 * stay faster than plain stores with the prefetch (8x256x14x14 0.72
 * against 1.09, 4x64x32x32 0.85 against 1.25, 8x128x28x28 1.24 and
 * 1.25). */
#define GN_PFW 1024u

/* dx over a unit of nch channels (whole groups of cpg, parameters gp[]),
 * S values each, as one flat stream (S >= 16, so a vector meets at most
 * one channel boundary, where its upper lanes take the next channel's
 * parameters): whole vectors inside a channel run without a test, then
 * the one that straddles its end. One stream per unit rather than per
 * group keeps InstanceNorm's 14x14 channels from each starting and ending
 * on a part line, which a streaming pass writes with plain stores. With
 * nt the stores stream after a masked head up to dx's first line
 * boundary (within channel 0: it is under 16 values).
 * Prefetches the lines pf floats ahead of x and dy (pf = 0: none): the
 * caller prefetches the next unit only when units are small (see
 * GN_PF_UNIT).
 * w is the unit's first channel's weight, or NULL. */
static void unit_run(const float *p, const float *d, float *o, size_t nch,
                     size_t cpg, size_t S, const gn_gpar_t *gp, const float *w,
                     int nt, size_t pf) {
  size_t n = nch * S, s = head_elems(o, n, nt), gi = 0, kk = 0;
  gn_vpar_t cur = vpar(gp, w, 0);
  if (s > 0)
    _mm512_mask_storeu_ps(o, tail_mask(s), dx16f(p, d, tail_mask(s), cur));
  /* An output that is not even 4-byte aligned has no head and never
   * streams (a streaming store needs an aligned line). */
  if (((uintptr_t)(o + s) & 63) != 0)
    nt = 0;
  for (size_t c = 0, end = S; c < nch; c++, end += S) {
    for (; s + 16 <= end; s += 16) {
      if (pf != 0) {
        _mm_prefetch((const char *)(p + s + pf), _MM_HINT_T0);
        _mm_prefetch((const char *)(d + s + pf), _MM_HINT_T0);
      }
      __m512 v = dx16f(p + s, d + s, 0xFFFF, cur);
      if (nt) {
        _mm512_stream_ps(o + s, v);
      } else {
        /* See GN_PFW. Past the unit's end it prefetches the next unit's
         * dx, or lines past the tensor (computed as an integer), which is
         * harmless. */
        __builtin_prefetch((const void *)((uintptr_t)(o + s) + GN_PFW), 1, 3);
        _mm512_storeu_ps(o + s, v);
      }
    }
    if (++kk == cpg)
      kk = 0, gi++;
    gn_vpar_t nxt = c + 1 < nch ? vpar(gp + gi, w, c + 1) : cur;
    if (s < end) {
      /* The last channel's straddling vector is a tail. */
      size_t len = n - s < 16 ? n - s : 16;
      __mmask16 m = tail_mask(len);
      gn_vpar_t v = vblend(cur, nxt, (__mmask16)~tail_mask(end - s));
      store16(o + s, dx16f(p + s, d + s, m, v), m, nt);
      s += len;
    }
    cur = nxt;
  }
}

/* Group g's dx parameters from its channels' sums (which are added into
 * dw and db). */
static gn_gpar_t group_par(size_t g, size_t cpg, size_t S, const double *mean,
                           const double *istd, const float *w, int stats,
                           const double *sdy, const double *sdyx, double *dw,
                           double *db) {
  size_t c0 = g * cpg, c1 = c0 + cpg;
  double is = istd[g], mu = mean[g], sg = 0, sgx = 0;
  for (size_t c = c0; c < c1; c++) {
    double wc = w != NULL ? w[c] : 1.0;
    sg += wc * sdy[c];
    sgx += wc * sdyx[c];
    db[c] += sdy[c];
    dw[c] += sdyx[c];
  }
  double m = (double)cpg * (double)S;
  double q = stats ? -is * is * sgx / m : 0, k3 = stats ? -is * sg / m : 0;
  float h = (float)mu;
  gn_gpar_t gp = {(float)q, h, (float)(k3 - q * (mu - (double)h)), is};
  return gp;
}

/* ------------------------------------------------------------------ */
/* The forward's flat stream over nc <= 16 channels of S >= 16 values:
 * each lane carries its channel (idx) and its position in it (r),
 * advanced by 16 per vector with at most one step to the next channel
 * (flat_step), and takes its parameters from the 16-channel vectors h, s
 * and b by a permute, writing y = (x - h) * s + b. No branch depends on
 * where a channel ends: run by run, the 49-value runs' tails were
 * mispredicted, and so were the flat loop's blends (unit_run). With nt
 * the whole vectors stream after a masked head up to the output's first
 * line boundary (within channel 0) and the last partial vector is a
 * plain masked store, so that a line shared with the next chunk is
 * written only by plain stores. Prefetches x pf floats ahead (0: none).
 * The backward's twin is kernels_avx512_gnbwd.c's flat_dx. */
static inline __attribute__((always_inline)) __m512 flat_vec(__m512 xv,
                                                             __m512i idx,
                                                             __m512 h, __m512 s,
                                                             __m512 b) {
  return _mm512_fmadd_ps(_mm512_sub_ps(xv, _mm512_permutexvar_ps(idx, h)),
                         _mm512_permutexvar_ps(idx, s),
                         _mm512_permutexvar_ps(idx, b));
}

static inline __attribute__((always_inline)) void flat_chunk(
    const float *x, float *o, size_t nc, size_t S, __m512 h, __m512 s, __m512 b,
    int nt, size_t pf) {
  size_t n = nc * S, i = head_elems(o, n, nt);
  __m512i r =
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512i idx = _mm512_setzero_si512(), vs = _mm512_set1_epi32((int)S);
  if (i > 0) {
    __mmask16 m = tail_mask(i);
    _mm512_mask_storeu_ps(o, m, flat_vec(load16(m, x), idx, h, s, b));
    flat_step(&r, &idx, (int)i, vs);
  }
  for (; i < n; i += 16) {
    __mmask16 m = tail_mask(n - i);
    if (pf != 0)
      _mm_prefetch((const char *)(x + i + pf), _MM_HINT_T0);
    store16(o + i, flat_vec(load16(m, x + i), idx, h, s, b), m, nt);
    flat_step(&r, &idx, 16, vs);
  }
}

/* Long runs' units of whole groups hold at most this many values (128
 * KiB of x, and as much dy, in the 1 MiB L2). Units of 16 channels, as
 * the short runs' tiles need, held 8 groups of 2 channels of 112x112
 * (800 KiB of x alone), so that dx reread x and dy from L3: GroupNorm
 * 8x64x112x112 took 1.39-1.64 of the streaming floor, against 1.18 with
 * one group per unit. */
#define GN_BWD_UNIT (32u * 1024u)

/* On a core with less than GN_PF_ALL_L2 of L2 the general path
 * prefetches the next unit while dx streams (one unit ahead, prefetcht0)
 * only for units of up to this many bytes of x, as
 * the short planes' tiles (kernels_avx512_gnbwd.c: blocks of 16 KiB)
 * do. Over larger units the hardware prefetcher, left to itself, runs
 * ahead of the sums' loads, and the software prefetches issued while dx
 * streamed made the pass slower: from 1.75 to 1.35 of the streaming
 * floor at GroupNorm 8x128x28x28 (50 KiB units) and from 1.83 to 1.41 at
 * InstanceNorm 8x128x28x28 (a standalone loop over the kernel against
 * dx = x + dy stored by streaming, alternated in one process). At
 * GroupNorm 8x256x14x14 (12.5 KiB units) the standalone loop measured
 * no prefetch faster, `bench kernels` slower (1.15 against 1.30 of its
 * floor), so those keep it. */
#define GN_PF_UNIT 16384u

/* With at least this much L2 per core, every unit but the last prefetches
 * the next one: the measurements above were on a 1 MiB L2, and on a Xeon
 * with 2 MiB per core (units of up to 256 KiB of x, and as much dy, with
 * the next unit's beside them) the prefetch made the larger units faster,
 * not slower. Floor ratios, medians of three alternated runs, units over
 * 16 KiB not prefetched and prefetched: GroupNorm 8x64x56x56 1.24 and
 * 1.09, 8x128x28x28 1.23 and 1.13, 8x512x28x28 0.84 and 0.70,
 * 32x64x32x32 0.82 and 0.71, 2x128x56x56 1.25 and 1.08, 4x64x64x64 0.79
 * and 0.54, 2x64x128x256 0.83 and 0.67; InstanceNorm 8x64x56x56 1.28 and
 * 1.11, 8x64x112x112 0.99 and 0.84, 32x64x32x32 0.88 and 0.71,
 * 1x32x40x40 1.29 and 1.16. Doubling GN_BWD_UNIT, GN_PF_UNIT or
 * kernels_avx512_gnbwd.c's GN_SHORT_BLOCK with the larger L2 measured no
 * gain there (GroupNorm 8x2048x7x7 1.12 with 16 KiB blocks, 1.34 with 32
 * KiB), and they stay as they are. */
#define GN_PF_ALL_L2 ((size_t)2 << 20)

/* Groups per unit of the general path: whole groups of at least 16
 * channels for the short runs' tiles, and for long runs as many as fit
 * GN_BWD_UNIT (at least one, at most 16 channels' worth). */
static size_t bwd_unit_groups(size_t cpg, size_t S) {
  size_t gpu = cpg >= 16 ? 1 : (16 + cpg - 1) / cpg;
  if (S > GN_SHORT_S) {
    size_t fit = GN_BWD_UNIT / (cpg * S);
    gpu = fit < 1 ? 1 : (fit < gpu ? fit : gpu);
  }
  return gpu;
}

/* The table's gn_bwd_nchw. */

int sbn__avx512_gn_bwd_nchw(const float *x, const float *dy, float *dx,
                            size_t G, size_t cpg, size_t S, const double *mean,
                            const double *istd, const float *w, int stats,
                            double *sdy, double *sdyx, double *dw, double *db,
                            size_t total) {
  /* Short runs go to the position view; statistics of few values keep
   * the reference's double dx (see SMALL_STAT). */
  if (S < 16 || cpg * S < SMALL_STAT || cpg * S > gn_max_group(G))
    return 0;
  size_t gpu = bwd_unit_groups(cpg, S);
  /* dx streams when the pass moves more than the L2 (see GN_NT_BYTES;
   * it was NT_BYTES of dx alone before): written with plain stores, each line
   * of dx is first read from memory, and the pass moves 16 bytes per element
   * instead of 12. Unlike BatchNorm's unfused dx (bwd_apply_ld), this measured
   * faster streamed: 0.89-1.36 of the two-read-one-write floor
   * against 1.25-1.58 with plain stores (bench kernels, GroupNorm NCHW
   * backward, the seven default shapes of 4 MiB and more, two runs each). */
  int nt = gn_nt(total, 3);
  /* Planes of up to 256 values in groups of 1, 2, 4, 8 or a multiple of
   * 16 channels: 16 channels at a time (kernels_avx512_gnbwd.c). */
  if (sbn__avx512_gn_bwd_short(x, dy, dx, G, cpg, S, mean, istd, w, stats, dw,
                               db, nt))
    return 1;
  size_t pf_unit = sbn__l2_bytes() >= GN_PF_ALL_L2 ? (size_t)-1 : GN_PF_UNIT;
  for (size_t g0 = 0; g0 < G; g0 += gpu) {
    size_t g1 = G - g0 < gpu ? G : g0 + gpu, ue = (g1 - g0) * cpg * S;
    /* Units of up to pf_unit bytes of x prefetch the next one (at least
     * GN_PF_MIN bytes on), except the last unit. */
    size_t pf = g1 < G && ue * sizeof(float) <= pf_unit
                    ? (ue * 4 < GN_PF_MIN ? GN_PF_MIN / 4 : ue)
                    : 0;
    unit_sums(x, dy, g0, g1, cpg, S, mean, istd, sdy, sdyx);
    gn_gpar_t gp[16];
    for (size_t g = g0; g < g1; g++)
      gp[g - g0] =
          group_par(g, cpg, S, mean, istd, w, stats, sdy, sdyx, dw, db);
    size_t o = g0 * cpg * S;
    unit_run(x + o, dy + o, dx + o, (g1 - g0) * cpg, cpg, S, gp,
             w != NULL ? w + g0 * cpg : NULL, nt, pf);
  }
  _mm256_zeroupper();
  return 1;
}
/* ------------------------------------------------------------------ */
/* Forward (the table's gn_fwd_nchw): group by group, or 16 short groups
 * at a time, the statistics and then y while the unit is in L1 or L2,
 * with the next unit's x prefetched meanwhile. The general path (the
 * op's moments over blocks of groups, per-channel records, scalar sqrt
 * and division per channel, four per-channel parameter arrays, then a
 * normalize call per run) spent as long on that bookkeeping as on the
 * data with 7x7 planes: InstanceNorm forward of 8x2048x7x7 took 2.2
 * times a memcpy. Here 16 statistics are finished in one vector pass and
 * 16 channels' parameters are three vectors that every y vector selects
 * its lanes from. */

/* The shifted sums of ng <= 16 groups of L contiguous values, each
 * shifted by its first value (written to k): s1 = sum(x - k), s2 =
 * sum((x - k)^2), set, not added. Groups of up to SHORT_S values are
 * summed 16 at a time and reduced by the transposing tree (at most 16
 * values per lane, 4 tree levels), longer ones one run at a time. */
static void fwd_sums(const float *x, size_t ng, size_t L, float *k, double *s1,
                     double *s2) {
  for (size_t j = 0; j < 16; j++) {
    k[j] = j < ng ? x[j * L] : 0.0f;
    s1[j] = s2[j] = 0;
  }
  if (L > GN_TILE_L) {
    for (size_t j = 0; j < ng; j++)
      run_sums(0, 0, x + j * L, NULL, L, k[j], &s1[j], &s2[j]);
    return;
  }
  __m512 ta, tb;
  tile16(0, x, NULL, ng, L, k, &ta, &tb);
  fold_first(ta, ng, s1);
  fold_first(tb, ng, s2);
}

/* y = (x - h) * s + b for 16 channels: h the float part of the mean, s =
 * istd * w, b = bias - l * s with l = mean - h (formed in double): x - h
 * is exact near the mean, so y is rounded about as often as the op's
 * ((x - h) - l) * k1 + k2, with one parameter and one operation less. */
typedef struct {
  __m512 h, s, b;
} gn_fpar_t;

/* The parameters of channels [0, nc) from their mean and istd (pm, pi:
 * 16 values each) and weight and bias (NULL: 1 and 0). */
static gn_fpar_t fwd_par(const double *pm, const double *pi, const float *w,
                         const float *b, size_t nc) {
  __mmask16 m = tail_mask(nc);
  __m256 h[2], sc[2], sh[2];
  for (int half = 0; half < 2; half++) {
    __mmask8 mk = (__mmask8)(m >> (8 * half));
    size_t o = 8 * (size_t)half;
    __m512d md = _mm512_loadu_pd(pm + o);
    h[half] = _mm512_cvtpd_ps(md);
    __m512d l = _mm512_sub_pd(md, _mm512_cvtps_pd(h[half]));
    __m512d k1 = _mm512_loadu_pd(pi + o);
    if (w != NULL)
      k1 = _mm512_mul_pd(k1, _mm512_cvtps_pd(_mm256_maskz_loadu_ps(mk, w + o)));
    __m512d bd = b != NULL ? _mm512_cvtps_pd(_mm256_maskz_loadu_ps(mk, b + o))
                           : _mm512_setzero_pd();
    sc[half] = _mm512_cvtpd_ps(k1);
    sh[half] = _mm512_cvtpd_ps(_mm512_fnmadd_pd(l, k1, bd));
  }
  gn_fpar_t p;
  p.h = _mm512_insertf32x8(_mm512_castps256_ps512(h[0]), h[1], 1);
  p.s = _mm512_insertf32x8(_mm512_castps256_ps512(sc[0]), sc[1], 1);
  p.b = _mm512_insertf32x8(_mm512_castps256_ps512(sh[0]), sh[1], 1);
  return p;
}

/* y over nc <= 16 channels of S values, S a multiple of 16, run by run
 * with each channel's parameters broadcast from its lane: every vector
 * but a streaming run's head and tail lies in one channel, and the loop
 * does half the work per vector of the flat stream below. With nt each
 * run streams after a masked head up to its first line boundary, and its
 * last partial vector is a masked plain store (all runs are alike: S * 4
 * bytes is a whole number of lines), so a line shared by two runs is
 * written only by plain stores. */
static void fwd_runs(const float *x, float *y, size_t nc, size_t S, gn_fpar_t p,
                     int nt, size_t pf) {
  size_t h = head_elems(y, S, nt);
  for (size_t j = 0; j < nc; j++) {
    __m512i lane = _mm512_set1_epi32((int)j);
    __m512 vh = _mm512_permutexvar_ps(lane, p.h);
    __m512 sc = _mm512_permutexvar_ps(lane, p.s);
    __m512 sh = _mm512_permutexvar_ps(lane, p.b);
    const float *xp = x + j * S;
    float *yp = y + j * S;
    if (h > 0) {
      __mmask16 m = tail_mask(h);
      _mm512_mask_storeu_ps(
          yp, m, _mm512_fmadd_ps(_mm512_sub_ps(load16(m, xp), vh), sc, sh));
    }
    size_t i = h;
    for (; i + 16 <= S; i += 16) {
      if (pf != 0)
        _mm_prefetch((const char *)(xp + i + pf), _MM_HINT_T0);
      __m512 v =
          _mm512_fmadd_ps(_mm512_sub_ps(_mm512_loadu_ps(xp + i), vh), sc, sh);
      store16(yp + i, v, 0xFFFF, nt);
    }
    if (i < S) {
      __mmask16 m = tail_mask(S - i);
      _mm512_mask_storeu_ps(
          yp + i, m,
          _mm512_fmadd_ps(_mm512_sub_ps(load16(m, xp + i), vh), sc, sh));
    }
  }
}

/* y over nc <= 16 channels of S >= 16 values: runs of whole vectors
 * (fwd_runs), or the flat stream. */
static void fwd_chunk(const float *x, float *y, size_t nc, size_t S,
                      gn_fpar_t p, int nt, size_t pf) {
  if (S % 16 == 0)
    fwd_runs(x, y, nc, S, p, nt, pf);
  else
    flat_chunk(x, y, nc, S, p.h, p.s, p.b, nt, pf);
}

/* y of the unit's channels [c0, c1) (whole groups from g0 on, cpg
 * channels each, their statistics in mean and istd) 16 at a time. */
static void fwd_unit_y(const float *x, float *y, size_t g0, size_t c0,
                       size_t c1, size_t cpg, size_t S, const double *mean,
                       const double *istd, const float *w, const float *b,
                       int nt, size_t pf) {
  size_t g = g0, kk = 0;
  for (size_t c = c0; c < c1; c += 16) {
    size_t nc = c1 - c < 16 ? c1 - c : 16, o = c * S;
    double pm[16], pi[16];
    for (size_t j = 0; j < 16; j++) {
      pm[j] = j < nc ? mean[g] : 0.0;
      pi[j] = j < nc ? istd[g] : 0.0;
      if (j < nc && ++kk == cpg)
        kk = 0, g++;
    }
    gn_fpar_t p =
        fwd_par(pm, pi, w != NULL ? w + c : NULL, b != NULL ? b + c : NULL, nc);
    fwd_chunk(x + o, y + o, nc, S, p, nt, pf);
  }
}

/* The table's gn_fwd_nchw. */
int sbn__avx512_gn_fwd_nchw(const float *x, float *y, size_t G, size_t cpg,
                            size_t S, const float *w, const float *b,
                            double eps, double *mean, double *istd, double *m2,
                            size_t total) {
  size_t L = cpg * S;
  /* Float partial sums need SMALL_STAT values per statistic (see the
   * table's moments); runs under 16 go to the position views. */
  if (S < 16 || L < SMALL_STAT || L > gn_max_group(G))
    return 0;
  size_t gpu = L <= GN_TILE_L ? 16 : GN_FWD_UNIT / (L * sizeof(float));
  gpu = gpu < 1 ? 1 : (gpu > 16 ? 16 : gpu);
  int nt = gn_nt(total, 2);
  for (size_t g0 = 0; g0 < G; g0 += gpu) {
    size_t g1 = G - g0 < gpu ? G : g0 + gpu, ng = g1 - g0, ue = ng * L;
    float k[16];
    double s1[16], s2[16];
    fwd_sums(x + g0 * L, ng, L, k, s1, s2);
    stats_groups(ng, (double)L, eps, k, s1, s2, mean + g0, m2 + g0, istd + g0);
    /* The next unit is prefetched while this one's y is formed from the
     * cache, as in the backward. Larger blocks (up to 256 KiB, the op's
     * budget) measured slower, by up to a fifth of the floor. */
    size_t pf = g1 < G ? (ue * 4 < GN_PF_MIN ? GN_PF_MIN / 4 : ue) : 0;
    fwd_unit_y(x, y, g0, g0 * cpg, g1 * cpg, cpg, S, mean, istd, w, b, nt, pf);
  }
  if (nt)
    _mm_sfence();
  _mm256_zeroupper();
  return 1;
}
#endif /* SBN__HAVE_AVX512 */
