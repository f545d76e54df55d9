/* The AVX-512 set's fused BatchNorm NCHW passes with nothing to reduce
 * over other processes (the table's bn_bwd_nchw and bn_fwd_nchw), in
 * groups of channels whose inputs fit a share of the core's L2: each
 * group's sums, then its dx (forward: its y) while the group is still in
 * L2, so that the inputs are read from beyond the L2 once instead of
 * twice. The unfused backward (sums over the whole tensor, then dx) read
 * x and dy twice: with 14x14 planes its dx reread them from L3 and the
 * pass took 1.5-1.7 times the two-read-one-write floor, where PyTorch's
 * channel-by-channel backward, whose channel stays in cache between its
 * two halves, took 1.07 (Xeon with 2 MiB L2 and a large L3). The forward
 * is the same with one input.
 *
 * The outputs prefetch their own lines for writing (PFW): with plain
 * stores each line of dx is first read for ownership, and those reads,
 * one after another, were most of dx's time. The table's normalize_ld
 * stores its y the same way (sbn__avx512_norm_rows) where it does not
 * stream it: eval forward floor ratios, alternated runs, 8x256x14x14
 * 1.34-1.53 before and 0.89-1.01 with, 8x128x28x28 1.08-1.20 and
 * 0.96-1.01, 8x2048x7x7 1.25-1.57 and 1.13-1.23.
 *
 * The sums and outputs are those of the table's strided entries (the
 * sums are their call on the group; dx the short runs' float form, y
 * normalize's), so the results have the same precision as the unfused
 * passes. Included only in builds with the AVX-512 flags. */
#include "kernels/sbn_kernels.h"

#ifdef SBN__HAVE_AVX512
#include "kernels/avx512_inl.h"
#include "kernels/kernels_avx512_short.h"

/* The most channels of a group: the dx parameters live on the stack. */
#define GMAX 16

/* How far ahead, in floats (1 KiB), y's stores prefetch their lines for
 * writing, as dx's do in dx_run_f (avx512_inl.h) (PREFETCHW; this file is
 * compiled with -mprfchw, and every CPU with AVX-512 has it). dx's plain
 * stores wait for each line to
 * be read for ownership from L3, one line after another as the store
 * buffer drains: that wait was most of dx's time (perf: the store and the
 * instruction after it), and with these prefetches the read-for-
 * ownership of the next 16 lines is in flight at once. Backward floor
 * ratios, two alternated runs: 8x256x14x14 1.31-1.33 without it,
 * 1.08-1.18 with it; 8x1024x14x14 1.24-1.40 and 1.21-1.33. Prefetching
 * the next group's x and dy into L2 during dx, one line of each per
 * vector, measured no gain, alone or beside this one (1.12-1.28 and
 * 1.32-1.41), and was left out. Those runs were on the Xeon (2 MiB L2);
 * on the AMD EPYC the prefetches cost more than they save, and
 * sbn__pfw_on (sbn_kernels.h) turns them off there. */
#define PFW 256

/* The share of the L2 that one group's x and dy fill: dx's lines, the
 * next group's first lines and whatever else the core holds take the
 * rest. At 1 MiB (the AMD EPYC the set was tuned on) a group is 128 KiB:
 * 10 channels of 8 14x14 planes. */
#define GROUP_L2_SHARE 8

/* The same share for the forward's x alone. */
#define FWD_L2_SHARE 8

/* The largest forward output the fused pass writes: above it the set
 * declines and the unfused pass (moments over the whole tensor, then a
 * normalize whose output streams past the caches) runs instead. Below it
 * the fused pass with plain stores and PFW was faster than both the
 * unfused pass and a fused one that streams each group's y; above it
 * streaming won, and streaming a group at a time lost to streaming the
 * whole output in one pass. Floor ratios, alternated runs on a Xeon with
 * 2 MiB of L2 per core: 8x1024x14x14 (6.1 MiB) unfused 1.40-1.52, fused
 * with y streamed 1.54-1.78, fused with plain stores 1.24-1.33;
 * 32x64x32x32 (8 MiB) unfused 0.77-0.87, fused with plain stores
 * 1.08-1.13; 8x256x56x56 (24.5 MiB) 0.70-0.72 and 1.10-1.21. */
#define FWD_FUSE_BYTES ((size_t)7 << 20)

/* The most of the L2, in fifths, that one channel's inputs may fill in
 * a group of their own. A channel larger than a group's share still
 * gains from staying in L2 between its sums and its output, with the
 * rest of the L2 holding the output's lines. Backward floor ratios,
 * three alternated runs on a Xeon with 2 MiB of L2 per core, unfused
 * against a channel alone (with a limit of 0.8 of the L2): 8x64x112x112
 * (784 KiB of x and dy per channel) 1.39-1.54 and 1.29-1.35, 16x64x56x56
 * 1.42-1.54 and 1.22-1.27, 12x64x112x112 (1.2 MiB) 1.54-1.72 and
 * 1.30-1.42, 16x64x112x112 (1.53 MiB, 0.77 of the L2) 1.86-1.89 and
 * 1.49-1.59 (with the unfused dx in float too: 1.47-1.67 and
 * 1.40-1.42). */
#define ONE_CHAN_FIFTHS 4

/* Channels per group, at most `most`, whose `tensors` inputs of A * S
 * floats each fill 1/share of the L2, or one channel alone up to
 * ONE_CHAN_FIFTHS of it; 0 where one channel is larger (it has no
 * group to keep in L2) or its statistic has fewer than SMALL_STAT
 * values (the reference's double then serves, as in bwd_reduce_ld), or
 * its runs are shorter than a vector (the position views serve). */
static size_t group_chans(size_t A, size_t S, int tensors, int share,
                          size_t most) {
  double chan = (double)A * (double)S * tensors * sizeof(float);
  double l2 = (double)sbn__l2_bytes(), room = l2 / share;
  if (S < 16 || A == 0 || A * S < SMALL_STAT)
    return 0;
  if (chan > room)
    return chan <= l2 * ONE_CHAN_FIFTHS / 5 ? 1 : 0;
  size_t G = (size_t)(room / chan);
  /* The short runs' sums take 16 channels at a time, and a group of 167
   * (8 7x7 planes in 256 KiB) would end in a block of 7 that costs as
   * much as 16. */
  if (G > 16)
    G &= ~(size_t)15;
  return G < 1 ? 1 : (G > most ? most : G);
}

int sbn__avx512_bn_bwd_nchw(const float *x, const float *dy, float *dx,
                            size_t A, size_t C, size_t S, const double *mean,
                            const double *istd, const float *w, int stats,
                            double count, double *sdy, double *sdyx) {
  size_t G = group_chans(A, S, 2, GROUP_L2_SHARE, GMAX), lda = C * S;
  if (G == 0)
    return 0;
  for (size_t c0 = 0; c0 < C; c0 += G) {
    size_t nc = C - c0 < G ? C - c0 : G, c1 = c0 + nc;
    for (size_t c = c0; c < c1; c++)
      sdy[c] = sdyx[c] = 0;
    sbn__kernels_avx512.bwd_reduce_ld(x + c0 * S, dy + c0 * S, A, nc, S, lda,
                                      mean + c0, istd + c0, sdy + c0,
                                      sdyx + c0);
    /* The finishing step of ops/batchnorm_chan.c (sbn__bn_bwd_chan). */
    double k1[GMAX], k2[GMAX], k3[GMAX];
    float pk[GMAX], pq[GMAX], ph[GMAX], pr[GMAX];
    for (size_t j = 0; j < nc; j++) {
      size_t c = c0 + j;
      double g = (w != NULL ? (double)w[c] : 1.0) * istd[c];
      k1[j] = g;
      k2[j] = stats ? -g * sdyx[c] / count : 0.0;
      k3[j] = stats ? -g * sdy[c] / count : 0.0;
      /* dx_params_f reads channel c of its arrays. */
      dx_params_f(j, j, mean + c0, istd + c0, k1, k2, k3, pk, pq, ph, pr);
    }
    for (size_t a = 0; a < A; a++)
      for (size_t j = 0; j < nc; j++) {
        size_t o = a * lda + (c0 + j) * S;
        dx_run_f(x + o, dy + o, dx + o, S, pk[j], pq[j], ph[j], pr[j]);
      }
  }
  _mm256_zeroupper();
  return 1;
}

/* y of channels [0, nc) of one row (runs of S back to back), as
 * normalize forms it, prefetching y's lines 4 PFW floats ahead for
 * writing where sbn__pfw_on says so (sbn_kernels.h: on the Xeon). */
static void group_y_row(const float *x, float *y, size_t nc, size_t S,
                        const float *mh, const float *ml, const float *sc,
                        const float *sh) {
  size_t full = S & ~(size_t)15;
  __mmask16 tm = tail_mask(S - full);
  for (size_t j = 0; j < nc; j++) {
    __m512 vh = _mm512_set1_ps(mh[j]), vl = _mm512_set1_ps(ml[j]);
    __m512 vs = _mm512_set1_ps(sc[j]), vb = _mm512_set1_ps(sh[j]);
    const float *p = x + j * S;
    float *q = y + j * S;
    size_t s = 0;
    for (; s < full; s += 16) {
      SBN__PFW((const void *)((uintptr_t)(q + s) + 4 * PFW));
      __m512 v = _mm512_sub_ps(_mm512_sub_ps(_mm512_loadu_ps(p + s), vh), vl);
      _mm512_storeu_ps(q + s, _mm512_fmadd_ps(v, vs, vb));
    }
    if (tm != 0) {
      __m512 v = _mm512_sub_ps(
          _mm512_sub_ps(_mm512_maskz_loadu_ps(tm, p + s), vh), vl);
      _mm512_mask_storeu_ps(q + s, tm, _mm512_fmadd_ps(v, vs, vb));
    }
  }
}

void sbn__avx512_norm_rows(const float *x, float *y, size_t A, size_t C,
                           size_t S, size_t lda, const float *mh,
                           const float *ml, const float *scale,
                           const float *shift) {
  for (size_t a = 0; a < A; a++)
    group_y_row(x + a * lda, y + a * lda, C, S, mh, ml, scale, shift);
}

int sbn__avx512_bn_fwd_nchw(const float *x, float *y, size_t A, size_t C,
                            size_t S, float *k, double *s1, double *s2,
                            void (*fin)(void *arg, size_t c0, size_t c1),
                            void *arg, const float *mh, const float *ml,
                            const float *scale, const float *shift) {
  size_t G = group_chans(A, S, 1, FWD_L2_SHARE, C), lda = C * S;
  if (G == 0 || (double)A * (double)lda * sizeof(float) > FWD_FUSE_BYTES)
    return 0;
  for (size_t c0 = 0; c0 < C; c0 += G) {
    size_t nc = C - c0 < G ? C - c0 : G;
    for (size_t c = c0; c < c0 + nc; c++)
      s1[c] = s2[c] = 0;
    sbn__kernels_avx512.moments_pick(x + c0 * S, A, nc, S, lda, k + c0, s1 + c0,
                                     s2 + c0);
    fin(arg, c0, c0 + nc);
    sbn__avx512_norm_rows(x + c0 * S, y + c0 * S, A, nc, S, lda, mh + c0,
                          ml + c0, scale + c0, shift + c0);
  }
  _mm256_zeroupper();
  return 1;
}

#endif /* SBN__HAVE_AVX512 */
