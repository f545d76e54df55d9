/* The AVX-512 set's channels-last training forward of one sample of
 * GroupNorm or InstanceNorm (the table's gn_fwd_nhwc): the sample's
 * moments, its statistics and per-channel parameters, and its normalize
 * in one call, so that the normalize finds the sample in cache and the
 * per-channel work is vector code.
 *
 * Where the time went before, per sample of C = 256 .. 2048 channels and
 * 49 .. 3136 positions (perf, `syncbn bench kernels`, cold copies): the
 * moments of rows wider than a register tile walked tile by tile down
 * blocks of rows (reading 512 bytes of each of 16 rows at a time, 8-10
 * GB/s from memory) because the sample was smaller than the sweep's
 * threshold; y was stored normally when the sample was under 256 KiB, so
 * each of its lines was read from memory before being written; the
 * normalize's tiles wrote rows that start off a cache line (C = 1000),
 * mixing streaming and plain stores on one line; and the per-channel
 * double math (a division, a square root and the split of the mean per
 * channel, in scalar code) took a tenth of a 2048-channel sample of 49
 * positions. Here the moments sweep (sbn__avx512_cl_moments_cold), the
 * statistics and parameters are formed eight channels at a time, and the
 * normalize is one flat stream over the sample with y's lines written
 * whole, its parameters loaded at the running channel offset from arrays
 * padded by 16 so that a vector wrapping from channel C - 1 to 0 reads on.
 *
 * Accuracy is the other paths': float partial sums folded into double
 * (the moments), statistics in double with the same formulas as
 * ops/chan.c's sbn__moments_finish, and y = (x - h) * scale + t with h
 * the float part of the mean (see fwd_par8). Compiled with the AVX-512
 * flags; run only after dispatch.c's CPU check. */
#include <string.h>

#include "kernels/sbn_kernels.h"

#ifdef SBN__HAVE_AVX512
#include "kernels/avx512_inl.h"

#include "kernels/kernels_avx512_nhwc.h"

/* Outputs of a quarter of the core's L2 or more stream, as the
 * channels-last passes' (kernels_avx512_nhwc.c's CL_NT_BYTES), but judged
 * by the whole output: the samples after this one push its y out of L2
 * before anything reads it, and a 100 KiB sample stored normally read
 * every line of y from memory first (12 bytes per element instead of 8). */
#define FWD_NT_BYTES ((size_t)256 << 10)

/* While it normalizes a sample from cache, the pass prefetches the next
 * sample into L2, line for line with the lines of y it writes, so that
 * the next sample's moments read from L2 and memory serves reads and
 * writes at once instead of the moments' reads alone and then the
 * normalize's writes alone. Only for samples of at most half the L2, so
 * that two fit it (kernels_avx512_clflat.c's prefetch goes to L2, not
 * L1, which the parameters of wide rows fill). Measured (same-run A/B,
 * cold copies, InstanceNorm NHWC, AMD EPYC with 1 MiB L2, prefetching
 * into L1): 0.7-0.9 of the time without for samples of 200 to 400 KiB of
 * 17 to 256 channels, but C = 2048 (401 KiB, rows of 8 KiB) took 1.1
 * times as long, and samples of 784 KiB and more 1.1 to 1.3; so those
 * were left out. Prefetched into L2 instead, with no limit on C, on the
 * Intel virtual machine (2 MiB L2; forward floor_ratio, lowest/highest of
 * six alternations): 8x2048x7x7 1.73-1.92 -> 1.64-1.81, 8x64x56x56
 * (784 KiB samples) 1.32-1.45 -> 1.24-1.41, 8x128x28x28 1.30-1.44 ->
 * 1.22-1.37; in an earlier run of three, prefetching into L1 as before
 * took 8x1024x14x14 to 1.47-1.60 and into L2 to 1.43-1.48 (1.55-1.74
 * without). A prefetched sample's moments take the register tiles where
 * its rows are at most FWD_WARM_C wide: from L2 those beat the sweeps, which
 * pay only from memory (kernels_avx512_nhwc.c's CL_COLD_BYTES); at 2048 the
 * sweep still won. */
#define FWD_WARM_C 512

/* The stride of par's three parameter arrays (h, scale, t), each of C +
 * 15 or more floats (see SBN__GN_FWD_PAR). */
static size_t par_ld(size_t C) {
  return SBN__GN_FWD_PAR(C) / 4;
}

/* The normalize parameters of the mk lanes of channels c .. c + 7 from
 * their means and istd: h = (float)mean, scale = (float)(w * istd) as
 * ops/groupnorm.c's gn_spread forms them (w NULL: 1), and the shift
 * t = b - (mean - h) * scale in double, rounded once (b NULL: 0), so that
 * y = (x - h) * scale + t takes one subtraction and one fma: x - h is
 * exact near the mean, and the low part of the mean, which the two-part
 * form subtracts from it, moves into t, whose rounding is one of y's own
 * magnitude. Three parameter loads per vector instead of four. */
static inline void fwd_par8(size_t c, __mmask8 mk, __m512d mean, __m512d is,
                            const float *w, const float *b, float *par,
                            size_t ld) {
  __m256 h = _mm512_cvtpd_ps(mean);
  __m512d lo = _mm512_sub_pd(mean, _mm512_cvtps_pd(h));
  __m512d wd = w != NULL ? _mm512_cvtps_pd(_mm256_maskz_loadu_ps(mk, w + c))
                         : _mm512_set1_pd(1.0);
  __m256 s = _mm512_cvtpd_ps(_mm512_mul_pd(wd, is));
  __m512d bd = b != NULL ? _mm512_cvtps_pd(_mm256_maskz_loadu_ps(mk, b + c))
                         : _mm512_setzero_pd();
  __m256 t =
      _mm512_cvtpd_ps(_mm512_sub_pd(bd, _mm512_mul_pd(lo, _mm512_cvtps_pd(s))));
  _mm256_mask_storeu_ps(par + c, mk, h);
  _mm256_mask_storeu_ps(par + ld + c, mk, s);
  _mm256_mask_storeu_ps(par + 2 * ld + c, mk, t);
}

static inline __mmask8 mask8(size_t n) {
  return (__mmask8)(n >= 8 ? 0xFF : (1u << n) - 1u);
}

/* Every channel's parameters, then channels C .. C + 15 as channels
 * (C + j) mod C, so that 16 lanes read from any channel c < C hold
 * channels c .. c + 15 of the repeating row. */
static void fwd_params(size_t G, size_t cpg, const double *mean,
                       const double *istd, const float *w, const float *b,
                       float *par) {
  size_t C = G * cpg, ld = par_ld(C);
  if (cpg == 1) {
    for (size_t c = 0; c < C; c += 8) {
      __mmask8 mk = mask8(C - c);
      fwd_par8(c, mk, _mm512_maskz_loadu_pd(mk, mean + c),
               _mm512_maskz_loadu_pd(mk, istd + c), w, b, par, ld);
    }
  } else {
    for (size_t g = 0; g < G; g++) {
      __m512d mv = _mm512_set1_pd(mean[g]), iv = _mm512_set1_pd(istd[g]);
      for (size_t c = g * cpg; c < (g + 1) * cpg; c += 8)
        fwd_par8(c, mask8((g + 1) * cpg - c), mv, iv, w, b, par, ld);
    }
  }
  sbn__avx512_cl_flat_pad(par, ld, C);
}

/* The moments of groups of cpg channels as per-channel float sums down
 * the rows (sbn__avx512_cl_row_sums, the backward's), each channel
 * shifted by its group's k, folded into the groups' doubles; h at par's
 * fourth array, the float sums in its first two. */
static void fwd_row_moments(const float *x, size_t P, size_t G, size_t cpg,
                            const float *k, float *par, double *s1,
                            double *s2) {
  size_t C = G * cpg, ld = par_ld(C);
  float *ph = par + 3 * ld;
  for (size_t g = 0; g < G; g++)
    for (size_t c = g * cpg; c < (g + 1) * cpg; c++)
      ph[c] = k[g];
  for (size_t j = 0; j < 16; j++)
    ph[C + j] = 0;
  sbn__avx512_cl_row_sums(x, NULL, P, C, C, cpg, ph, par, par + ld, s1, s2);
}

int sbn__avx512_gn_fwd_nhwc(const float *x, float *y, size_t P, size_t G,
                            size_t cpg, const float *w, const float *b,
                            double eps, size_t i, size_t count, float *par,
                            float *k, double *s1, double *s2, double *mean,
                            double *m2, double *istd) {
  size_t C = G * cpg, n = P * C;
  int pf = n * sizeof(float) <= sbn__l2_bytes() / 2;
  size_t pn = pf && i + 1 < count ? n : 0;
  /* Statistics of fewer than SMALL_STAT values keep the reference's
   * double sums (see kernels_avx512.c's moments_ld): the op's own path. */
  if (n == 0 || P * cpg < SMALL_STAT)
    return 0;
  /* One group is one run of the whole sample, which the op's own path
   * sums as one stream (ops/chan.c) and normalizes in register tiles:
   * measured in `syncbn bench kernels` (GroupNorm 8x17x64x64, three
   * alternations) that took 0.9-1.05 of the memcpy, this pass 1.13-1.22. */
  if (G == 1)
    return 0;
  /* Each group's first value, all in the first row, is its shift. With
   * one channel per group (InstanceNorm) that is the first row itself:
   * copied in vectors, because a scalar loop over 2048 channels, whose
   * loads are the sample's first misses, took about a tenth of the
   * forward of 8x2048x7x7 (perf). */
  if (cpg == 1) {
    memcpy(k, x, G * sizeof *k);
  } else {
    for (size_t g = 0; g < G; g++)
      k[g] = x[g * cpg];
  }
  memset(s1, 0, G * sizeof *s1);
  memset(s2, 0, G * sizeof *s2);
  /* Groups of 16 channels or more sum per channel down the rows: as short
   * runs of each position (kernels_avx512_short.c's transposing tree and a
   * fold into double per group and position) they took 1.2-1.3 times as
   * long at C = 512 over 784 positions and 1.05-1.15 at 1024 and 2048
   * over 196 and 49 (`syncbn bench kernels`, GroupNorm(32), three
   * alternations, 2 MiB L2). The table's moments_ld takes a prefetched
   * sample's narrower groups. */
  if (cpg >= 16)
    fwd_row_moments(x, P, G, cpg, k, par, s1, s2);
  else if (pf && i > 0 && C <= FWD_WARM_C)
    sbn__kernels_avx512.moments_ld(x, P, G, cpg, C, k, s1, s2);
  else if (!sbn__avx512_cl_moments_cold(x, P, G, cpg, C, k, s1, s2))
    sbn__kernels_avx512.moments_ld(x, P, G, cpg, C, k, s1, s2);
  stats_groups(G, (double)P * (double)cpg, eps, k, s1, s2, mean, m2, istd);
  fwd_params(G, cpg, mean, istd, w, b, par);
  sbn__avx512_cl_flat_normalize(x, y, n, C, par, par_ld(C),
                                count * n >= FWD_NT_BYTES / sizeof(float), pn);
  _mm_sfence();
  _mm256_zeroupper(); /* see kernels_avx512.c's pos_apply */
  return 1;
}
#endif /* SBN__HAVE_AVX512 */
