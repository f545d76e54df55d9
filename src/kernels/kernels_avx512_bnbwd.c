/* The AVX-512 set's BatchNorm NCHW backward with nothing to reduce over
 * other processes (the table's bn_bwd_nchw), in groups of channels whose
 * x and dy fit a share of the core's L2: each group's sums, then its dx
 * while the group is still in L2, so that x and dy are read from beyond
 * the L2 once instead of twice. The unfused backward (sums over the whole
 * tensor, then dx) read them twice: with 14x14 planes its dx reread
 * x and dy from L3 and the pass took 1.5-1.7 times the two-read-one-write
 * floor, where PyTorch's channel-by-channel backward, whose channel stays
 * in cache between its two halves, took 1.07 (Xeon with 2 MiB L2 and a
 * large L3).
 *
 * dx prefetches its own lines for writing (PFW): with plain stores each
 * line of dx is first read for ownership, and those reads, one after
 * another, were most of dx's time.
 *
 * The sums and dx are those of the table's strided entries (the sums are
 * their call on the group; dx the short runs' float form), so the results
 * have the same precision as the unfused pass. Included only in builds
 * with the AVX-512 flags. */
#include "kernels/sbn_kernels.h"

#ifdef SBN__HAVE_AVX512
#include "kernels/avx512_inl.h"

/* The most channels of a group: the dx parameters live on the stack. */
#define GMAX 16

/* How far ahead, in floats (1 KiB), dx's stores prefetch their lines for
 * writing (PREFETCHW; this file alone is compiled with -mprfchw, and
 * every CPU with AVX-512 has it). dx's plain stores wait for each line to
 * be read for ownership from L3, one line after another as the store
 * buffer drains: that wait was most of dx's time (perf: the store and the
 * instruction after it), and with these prefetches the read-for-
 * ownership of the next 16 lines is in flight at once. Backward floor
 * ratios, two alternated runs: 8x256x14x14 1.31-1.33 without it,
 * 1.08-1.18 with it; 8x1024x14x14 1.24-1.40 and 1.21-1.33. Prefetching
 * the next group's x and dy into L2 during dx, one line of each per
 * vector, measured no gain, alone or beside this one (1.12-1.28 and
 * 1.32-1.41), and was left out. */
#define PFW 256

/* The share of the L2 that one group's x and dy fill: dx's lines, the
 * next group's first lines and whatever else the core holds take the
 * rest. At 1 MiB (the AMD EPYC the set was tuned on) a group is 128 KiB:
 * 10 channels of 8 14x14 planes. */
#define GROUP_L2_SHARE 8

/* dx of channels [0, nc) of one row (runs of S back to back), in float
 * (dx_params_f), prefetching dx's lines PFW floats ahead for writing. */
static void group_dx_row(const float *x, const float *dy, float *dx, size_t nc,
                         size_t S, const float *pk, const float *pq,
                         const float *ph, const float *pr) {
  size_t full = S & ~(size_t)15;
  __mmask16 tm = tail_mask(S - full);
  for (size_t j = 0; j < nc; j++) {
    __m512 vk = _mm512_set1_ps(pk[j]), vq = _mm512_set1_ps(pq[j]);
    __m512 vh = _mm512_set1_ps(ph[j]), vr = _mm512_set1_ps(pr[j]);
    const float *p = x + j * S, *g = dy + j * S;
    float *q = dx + j * S;
    size_t s = 0;
    for (; s < full; s += 16) {
      /* Past the row's end it prefetches the next channels' dx, or lines
       * past the tensor (computed as an integer), which is harmless. */
      __builtin_prefetch((const void *)((uintptr_t)(q + s) + 4 * PFW), 1, 3);
      __m512 t =
          _mm512_fmadd_ps(vq, _mm512_sub_ps(_mm512_loadu_ps(p + s), vh), vr);
      _mm512_storeu_ps(q + s, _mm512_fmadd_ps(vk, _mm512_loadu_ps(g + s), t));
    }
    if (tm != 0) {
      __m512 t = _mm512_fmadd_ps(
          vq, _mm512_sub_ps(_mm512_maskz_loadu_ps(tm, p + s), vh), vr);
      _mm512_mask_storeu_ps(
          q + s, tm, _mm512_fmadd_ps(vk, _mm512_maskz_loadu_ps(tm, g + s), t));
    }
  }
}

int sbn__avx512_bn_bwd_nchw(const float *x, const float *dy, float *dx,
                            size_t A, size_t C, size_t S, const double *mean,
                            const double *istd, const float *w, int stats,
                            double count, double *sdy, double *sdyx) {
  double chan = (double)A * (double)S * 2.0 * sizeof(float);
  double share = (double)sbn__l2_bytes() / GROUP_L2_SHARE;
  /* Runs shorter than a vector take the position views, and statistics
   * of fewer than SMALL_STAT values the reference's double (as in
   * bwd_reduce_ld); a channel larger than the share has no group to keep
   * in L2. */
  if (S < 16 || A == 0 || A * S < SMALL_STAT || chan > share)
    return 0;
  size_t G = (size_t)(share / chan), lda = C * S;
  G = G < 1 ? 1 : (G > GMAX ? GMAX : G);
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
    for (size_t a = 0; a < A; a++) {
      size_t o = a * lda + c0 * S;
      group_dx_row(x + o, dy + o, dx + o, nc, S, pk, pq, ph, pr);
    }
  }
  _mm256_zeroupper();
  return 1;
}

#endif /* SBN__HAVE_AVX512 */
