/* The AVX-512 set's channels-last training backward of one sample of
 * GroupNorm or InstanceNorm (the table's gn_bwd_nhwc): the sample's two
 * sums per channel, its dx coefficients and its dx in one call, so that
 * dx is formed while the sample's x and dy are in cache and the
 * per-channel work is vector code.
 *
 * The op's path took three steps per sample: the sums of bwd_reduce_ld
 * (rows wider than a register tile go to kernels_avx512.c's general
 * position view, several loads and stores of small per-position arrays
 * per vector of data), per-channel coefficients in scalar double code,
 * and bwd_apply_ld (its tiles start every other row of C = 1000 inside a
 * line). Here the sums walk the sample's rows front to back into float
 * sums per channel in L1, the coefficients are formed eight channels at a
 * time, and dx is one flat stream over the sample (as the forward's
 * normalize, kernels_avx512_nhwc.c's sbn__avx512_cl_flat_normalize), last
 * vector first, so that a sample larger than the L2 finds the lines the
 * sums read last still there; dx streams after a masked tail and before
 * a masked head, so that every line of dx is written whole.
 *
 * Accuracy is the other float paths' (kernels_avx512_gn.c's NCHW
 * backward): sum dy and sum dy * (x - h), h the float part of the mean,
 * as float partial sums of at most 16 values per lane folded into double,
 * then sum dy * xhat = istd * (sum dy (x - h) - l sum dy) in double with
 * l the low part of the mean; dx = k * dy + q * (x - h) + r in float
 * (avx512_inl.h's dx_params_f). Statistics of fewer than SMALL_STAT
 * values are declined (the op's path keeps dx in double there).
 * Compiled with the AVX-512 flags; run only after dispatch.c's CPU check. */
#include "kernels/sbn_kernels.h"

#ifdef SBN__HAVE_AVX512
#include <string.h>

#include "kernels/avx512_inl.h"

#include "kernels/kernels_avx512_nhwc.h"

/* dx streams when the whole dx is a quarter of the L2 or more, as the
 * forward's y (kernels_avx512_clfwd.c's FWD_NT_BYTES): the samples after
 * this one push its dx out before anything reads it. */
#define BWD_NT_BYTES ((size_t)256 << 10)

/* Samples of at most half the L2 per tensor prefetch the next sample's x
 * and dy into L2 while writing dx, so that the next sums read L2 and
 * memory serves reads and writes at once. Two samples' x and dy may then
 * fill twice the L2: the prefetches evict lines of this sample that dx
 * has yet to read, and dx reads those from the L3 (which on the AMD EPYC
 * holds what the L2 evicts). A quarter of the L2 (two samples in it) was
 * the limit before; on the EPYC (1 MiB L2, 32 MiB L3) half of it took
 * InstanceNorm NHWC backward 8x128x28x28 (a 392 KiB sample) from a
 * median floor ratio of 1.59 to 1.31, 8x512x14x14 1.67 to 1.46, GroupNorm
 * 1.63 to 1.35 and 1.66 to 1.31 (five alternated runs; samples of a
 * quarter, prefetched either way, within 0.12). */
#define BWD_PF_DIV 2

/* Samples of more than 9/32 of the L2 per tensor (288 KiB of a 1 MiB
 * L2) are declined unless they are at most a 64th of the L3 per tensor.
 * On a 1 MiB L2 with a 32 MiB L3 those of 392 KiB to 3.2 MB took 1.0 to
 * 1.6 times the op's path (`syncbn bench kernels`, NHWC, one alternation;
 * not analysed). On a 2 MiB L2 with a 260 MiB L3 those of 0.4 to 3.2 MB
 * in rows of 256 to 2048 channels took 0.6 to 0.9 of it (GroupNorm(32)
 * and InstanceNorm, three alternations): the second pass over x
 * and dy finds them in the L3 there. A 64th keeps the rule of the 32 MiB
 * L3 at 512 KiB. Blocks of channels whose x and dy fit in L2 (rows of 16
 * to 256 channels of 256 to 1024, dx formed per block, the next block
 * prefetched) took 1.0 to 2 times the op's path on the 2 MiB L2 and are
 * not used. */
#define BWD_MAX_MUL 9
#define BWD_MAX_DIV 32
#define BWD_L3_DIV 64

/* Rows of 64 channels over 3136 and 12544 positions (0.8 and 3.2 MB)
 * took 1.05 to 1.1 times the op's register tiles in the flat pass on the
 * 260 MiB L3, those of 128 channels 0.65 to 1.0: the L3 rule starts at
 * 128. */
#define BWD_L3_C 128

/* Prefetch distance of the sums, in floats (4 KiB ahead). */
#define BWD_PF 1024

/* The stride of par's four arrays (see SBN__GN_FWD_PAR): float sums of
 * dy and dy * (x - h) at 0 and ld while summing, then dx's k, q at 0 and
 * ld; h at 2 ld and r at 3 ld. Each holds C + 16 floats. */
static size_t par_ld(size_t C) {
  return SBN__GN_FWD_PAR(C) / 4;
}

static inline __mmask8 mask8(size_t n) {
  return (__mmask8)(n >= 8 ? 0xFF : (1u << n) - 1u);
}

/* Entries C .. C + 15 of array a as those of channels (C + j) mod C, so
 * that 16 lanes read from any channel c < C hold channels c .. c + 15 of
 * the repeating row. */
static void pad_arr(float *a, size_t C) {
  for (size_t j = 0; j < 16; j++)
    a[C + j] = a[(C + j) % C];
}

/* Adds R rows (of stride ld) of w channels into the float sums a1 and a2
 * of those channels: with dy, sums of dy and dy * (x - h) (the
 * backward's); without (mom), sums of d = x - h and d * d (the forward's
 * moments, h then the group's shift). The last vector of a row is masked
 * to the row: its masked-off lanes add nothing (d is zeroed, and so is dy).
 * Each vector prefetches the line pf floats ahead, a few rows down the
 * same channels where a row is narrower than BWD_PF (see row_pf). */
static inline __attribute__((always_inline)) void row_sums(
    int R, int mom, const float *x, const float *dy, size_t w, size_t ld,
    size_t pf, const float *ph, float *a1, float *a2) {
  for (size_t j = 0; j < w; j += 16) {
    __mmask16 m = tail_mask(w - j);
    __m512 h = _mm512_loadu_ps(ph + j);
    __m512 s1 = _mm512_loadu_ps(a1 + j), s2 = _mm512_loadu_ps(a2 + j);
    for (int r = 0; r < R; r++) {
      const float *p = x + r * ld + j;
      _mm_prefetch((const char *)(p + pf), _MM_HINT_T0);
      __m512 d = _mm512_maskz_sub_ps(m, load16(m, p), h), g = d;
      if (!mom) {
        const float *q = dy + r * ld + j;
        _mm_prefetch((const char *)(q + pf), _MM_HINT_T0);
        g = load16(m, q);
      }
      s1 = _mm512_add_ps(s1, g);
      s2 = _mm512_fmadd_ps(g, d, s2);
    }
    _mm512_storeu_ps(a1 + j, s1);
    _mm512_storeu_ps(a2 + j, s2);
  }
}

#define ROW_SUMS(name, R, mom)                                           \
  static void name(const float *x, const float *dy, size_t w, size_t ld, \
                   size_t pf, const float *ph, float *a1, float *a2) {   \
    row_sums(R, mom, x, dy, w, ld, pf, ph, a1, a2);                      \
  }
ROW_SUMS(bwd_rows2, 2, 0)
ROW_SUMS(bwd_rows1, 1, 0)
ROW_SUMS(mom_rows2, 2, 1)
ROW_SUMS(mom_rows1, 1, 1)

/* Adds the n float sums at a into the doubles d, each run of cpg of them
 * into one (cpg = 1: one each). */
static void fold_arr(const float *a, double *d, size_t n, size_t cpg) {
  if (cpg == 1) {
    for (size_t j = 0; j < n; j += 8) {
      __mmask8 m = mask8(n - j);
      __m512d s = _mm512_cvtps_pd(_mm256_maskz_loadu_ps(m, a + j));
      _mm512_mask_storeu_pd(d + j, m,
                            _mm512_add_pd(_mm512_maskz_loadu_pd(m, d + j), s));
    }
    return;
  }
  for (size_t g = 0; g < n / cpg; g++) {
    __m512d s = _mm512_setzero_pd();
    for (size_t j = 0; j < cpg; j += 8)
      s = _mm512_add_pd(s, _mm512_cvtps_pd(_mm256_maskz_loadu_ps(
                               mask8(cpg - j), a + g * cpg + j)));
    d[g] += _mm512_reduce_add_pd(s);
  }
}

/* The prefetch distance of rows of w channels at stride ld: BWD_PF floats
 * along a dense sample, whole rows down a block of channels, so that the
 * lines prefetched are the block's own. */
static size_t row_pf(size_t w, size_t ld) {
  return w == ld ? BWD_PF : ld * ((BWD_PF + w - 1) / w);
}

void sbn__avx512_cl_row_sums(const float *x, const float *dy, size_t P,
                             size_t w, size_t ld, size_t cpg, const float *ph,
                             float *a1, float *a2, double *d1, double *d2) {
  size_t pf = row_pf(w, ld);
  memset(d1, 0, w / cpg * sizeof *d1);
  memset(d2, 0, w / cpg * sizeof *d2);
  for (size_t r0 = 0; r0 < P; r0 += RB) {
    size_t nr = P - r0 < RB ? P - r0 : RB, r = 0;
    const float *p = x + r0 * ld, *q = dy != NULL ? dy + r0 * ld : NULL;
    memset(a1, 0, w * sizeof *a1);
    memset(a2, 0, w * sizeof *a2);
    if (q != NULL) {
      for (; r + 2 <= nr; r += 2)
        bwd_rows2(p + r * ld, q + r * ld, w, ld, pf, ph, a1, a2);
      for (; r < nr; r++)
        bwd_rows1(p + r * ld, q + r * ld, w, ld, pf, ph, a1, a2);
    } else {
      for (; r + 2 <= nr; r += 2)
        mom_rows2(p + r * ld, NULL, w, ld, pf, ph, a1, a2);
      for (; r < nr; r++)
        mom_rows1(p + r * ld, NULL, w, ld, pf, ph, a1, a2);
    }
    fold_arr(a1, d1, w, cpg);
    fold_arr(a2, d2, w, cpg);
  }
}

/* InstanceNorm's dx parameters of the mk lanes of channels c .. c + 7
 * from their low mean parts lo, istd and sums g = sum dy, gx = sum dy *
 * xhat: k = is w, q = k2 is and r = k3 - q lo with k2 = -k gx / m and
 * k3 = -k g / m (ops/groupnorm.c's gn_bwd_group; 0 without stats). */
static inline void in_par8(size_t c, __mmask8 mk, __m512d lo, __m512d is,
                           __m512d g, __m512d gx, const float *w, double im,
                           float *par, size_t ld) {
  __m512d wd = w != NULL ? _mm512_cvtps_pd(_mm256_maskz_loadu_ps(mk, w + c))
                         : _mm512_set1_pd(1.0);
  __m512d k = _mm512_mul_pd(is, wd);
  __m512d nk = _mm512_mul_pd(_mm512_set1_pd(-im), k);
  __m512d q = _mm512_mul_pd(_mm512_mul_pd(nk, gx), is);
  __m512d r = _mm512_sub_pd(_mm512_mul_pd(nk, g), _mm512_mul_pd(q, lo));
  _mm256_mask_storeu_ps(par + c, mk, _mm512_cvtpd_ps(k));
  _mm256_mask_storeu_ps(par + ld + c, mk, _mm512_cvtpd_ps(q));
  _mm256_mask_storeu_ps(par + 3 * ld + c, mk, _mm512_cvtpd_ps(r));
}

/* One group of cpg > 1 channels from c0: sdyx per channel, the group's
 * k2 = -is sum w sdyx / m and k3 = -is sum w sdy / m (0 without stats),
 * then each channel's k, q, r. sdyx overwrites sb; dw and db take the
 * sums. */
static void bwd_group(size_t c0, size_t cpg, double mean, double is,
                      const float *w, double m, int stats, const double *sdy,
                      double *sb, double *dw, double *db, float *par,
                      size_t ld) {
  double l = mean - (double)(float)mean;
  __m512d vis = _mm512_set1_pd(is), vl = _mm512_set1_pd(l);
  __m512d sg = _mm512_setzero_pd(), sgx = _mm512_setzero_pd();
  for (size_t c = c0; c < c0 + cpg; c += 8) {
    __mmask8 mk = mask8(c0 + cpg - c);
    __m512d g = _mm512_maskz_loadu_pd(mk, sdy + c);
    __m512d gx = _mm512_mul_pd(
        vis,
        _mm512_sub_pd(_mm512_maskz_loadu_pd(mk, sb + c), _mm512_mul_pd(vl, g)));
    _mm512_mask_storeu_pd(db + c, mk,
                          _mm512_add_pd(_mm512_maskz_loadu_pd(mk, db + c), g));
    _mm512_mask_storeu_pd(dw + c, mk,
                          _mm512_add_pd(_mm512_maskz_loadu_pd(mk, dw + c), gx));
    __m512d wd = w != NULL ? _mm512_cvtps_pd(_mm256_maskz_loadu_ps(mk, w + c))
                           : _mm512_set1_pd(1.0);
    sg = _mm512_add_pd(sg, _mm512_mul_pd(wd, g));
    sgx = _mm512_add_pd(sgx, _mm512_mul_pd(wd, gx));
  }
  double k2 = stats ? -is * _mm512_reduce_add_pd(sgx) / m : 0;
  double k3 = stats ? -is * _mm512_reduce_add_pd(sg) / m : 0;
  double q = k2 * is;
  float r = (float)(k3 - q * l);
  for (size_t c = c0; c < c0 + cpg; c++) {
    par[c] = (float)(is * (w != NULL ? w[c] : 1.0));
    par[ld + c] = (float)q;
    par[3 * ld + c] = r;
  }
}

/* h per channel (the float part of its group's mean) at par + 2 ld. */
static void bwd_h(size_t G, size_t cpg, const double *mean, float *ph) {
  for (size_t g = 0; g < G; g++) {
    float h = (float)mean[g];
    for (size_t c = g * cpg; c < (g + 1) * cpg; c++)
      ph[c] = h;
  }
  pad_arr(ph, G * cpg);
}

/* The dx parameters of groups [g0, g1) from their channels' sums, and
 * their dw, db. */
static void bwd_params(size_t g0, size_t g1, size_t cpg, double m,
                       const double *mean, const double *istd, const float *w,
                       int stats, const double *sdy, double *sb, double *dw,
                       double *db, float *par, size_t ld) {
  if (cpg == 1) {
    for (size_t c = g0; c < g1; c += 8) {
      __mmask8 mk = mask8(g1 - c);
      __m512d mv = _mm512_maskz_loadu_pd(mk, mean + c);
      __m512d iv = _mm512_maskz_loadu_pd(mk, istd + c);
      __m512d lo = _mm512_sub_pd(
          mv, _mm512_cvtps_pd(_mm256_maskz_loadu_ps(mk, par + 2 * ld + c)));
      __m512d g = _mm512_maskz_loadu_pd(mk, sdy + c);
      __m512d gx =
          _mm512_mul_pd(iv, _mm512_sub_pd(_mm512_maskz_loadu_pd(mk, sb + c),
                                          _mm512_mul_pd(lo, g)));
      _mm512_mask_storeu_pd(
          db + c, mk, _mm512_add_pd(_mm512_maskz_loadu_pd(mk, db + c), g));
      _mm512_mask_storeu_pd(
          dw + c, mk, _mm512_add_pd(_mm512_maskz_loadu_pd(mk, dw + c), gx));
      in_par8(c, mk, lo, iv, g, gx, w, stats ? 1.0 / m : 0.0, par, ld);
    }
  } else {
    for (size_t g = g0; g < g1; g++)
      bwd_group(g * cpg, cpg, mean[g], istd[g], w, m, stats, sdy, sb, dw, db,
                par, ld);
  }
}

/* dx of the vector of lanes m at element e (channel c). */
static inline void bwd_dx16(const float *x, const float *dy, float *dx,
                            size_t e, size_t c, __mmask16 m, const float *par,
                            size_t ld, int nt) {
  __m512 d = _mm512_sub_ps(load16(m, x + e), _mm512_loadu_ps(par + 2 * ld + c));
  __m512 v =
      _mm512_fmadd_ps(_mm512_loadu_ps(par + c), load16(m, dy + e),
                      _mm512_fmadd_ps(_mm512_loadu_ps(par + ld + c), d,
                                      _mm512_loadu_ps(par + 3 * ld + c)));
  store16(dx + e, v, m, nt);
}

/* dx of n elements of rows of C as one flat stream, last vector first:
 * the masked tail, the whole vectors from dx's first line boundary
 * (streamed when nt is set), then the masked head; the pn elements after
 * x and dy are prefetched, line for line with dx's vectors. */
static void bwd_dx(const float *x, const float *dy, float *dx, size_t n,
                   size_t C, const float *par, size_t ld, int nt, size_t pn) {
  size_t h = head_elems(dx, n, nt), nv = (n - h) / 16, step = 16 % C;
  size_t t = h + 16 * nv;
  if (t < n)
    bwd_dx16(x, dy, dx, t, t % C, tail_mask(n - t), par, ld, 0);
  size_t c = nv > 0 ? (t - 16) % C : 0;
  for (size_t v = nv; v-- > 0;) {
    size_t e = h + 16 * v;
    if (e < pn) {
      _mm_prefetch((const char *)(x + n + e), _MM_HINT_T0);
      _mm_prefetch((const char *)(dy + n + e), _MM_HINT_T0);
    }
    bwd_dx16(x, dy, dx, e, c, 0xFFFF, par, ld, nt);
    c = c >= step ? c - step : c + C - step;
  }
  if (h > 0)
    bwd_dx16(x, dy, dx, 0, 0, tail_mask(h), par, ld, 0);
}

/* Whether a sample of n elements of rows of C per tensor takes the flat
 * pass: up to 9/32 of the L2 (288 KiB of a 1 MiB L2), or, in rows of
 * BWD_L3_C channels or more, up to a 64th of the L3 (see BWD_L3_DIV). */
static int bwd_flat(size_t n, size_t C) {
  size_t bytes = n * sizeof(float);
  return bytes <= sbn__l2_bytes() / BWD_MAX_DIV * BWD_MAX_MUL ||
         (C >= BWD_L3_C && bytes <= sbn__l3_bytes() / BWD_L3_DIV);
}

int sbn__avx512_gn_bwd_nhwc(const float *x, const float *dy, float *dx,
                            size_t P, size_t G, size_t cpg, const double *mean,
                            const double *istd, const float *w, int stats,
                            size_t i, size_t count, float *par, double *sdy,
                            double *sdyx, double *dw, double *db) {
  size_t C = G * cpg, n = P * C, ld = par_ld(C);
  /* Rows narrower than a vector overlap the float sums of one vector
   * with the next one's (a stalled store forward per vector); the op's
   * register tiles take them. Statistics of few values keep dx in
   * double (see SMALL_STAT). */
  if (n == 0 || C < 16 || P * cpg < SMALL_STAT)
    return 0;
  if (!bwd_flat(n, C))
    return 0;
  size_t pn = n * sizeof(float) <= sbn__l2_bytes() / BWD_PF_DIV && i + 1 < count
                  ? n
                  : 0;
  float *ph = par + 2 * ld;
  bwd_h(G, cpg, mean, ph);
  sbn__avx512_cl_row_sums(x, dy, P, C, C, 1, ph, par, par + ld, sdy, sdyx);
  bwd_params(0, G, cpg, (double)P * (double)cpg, mean, istd, w, stats, sdy,
             sdyx, dw, db, par, ld);
  pad_arr(par, C);
  pad_arr(par + ld, C);
  pad_arr(par + 3 * ld, C);
  bwd_dx(x, dy, dx, n, C, par, ld, count * n >= BWD_NT_BYTES / sizeof(float),
         pn);
  _mm_sfence();
  _mm256_zeroupper(); /* see kernels_avx512.c's pos_apply */
  return 1;
}
#endif /* SBN__HAVE_AVX512 */
