/* The kernels room of the kernel library: the kernel table, its sets and
 * their run-time choice. Kernels compute on arrays they are given and never
 * allocate or validate; they use only the base room. Not installed. */
#ifndef SBN_KERNELS_H
#define SBN_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#include "base/sbn_base.h"

/* The kernel table.
 *
 * Every op is written in terms of a few loops over a three-level view
 * (A, C, S) of a contiguous array: element (a, c, s) sits at
 * (a * C + c) * S + s, and per-"channel" c parameters apply. This one view
 * covers every op and layout:
 *   BN  NCHW: (N, C, spatial)        BN NHWC: (N * spatial, C, 1)
 *   IN  NCHW, one sample: (1, C, spatial)      NHWC: (spatial, C, 1)
 *   GN  NCHW, one sample: (1, C, spatial) with per-channel group params
 *   GN  NHWC, one sample: (spatial, C, 1)
 * The reference kernels are portable C; optimized sets override entries.
 */
typedef struct sbn__kernels_s {
  const char *name;
  /* Shifted sums over (a, s) per channel c, added into s1[c] and s2[c]:
   * s1 += sum(x - k[c]), s2 += sum((x - k[c])^2). The reference adds in
   * double; a set may add float partial sums of at most 16 values per
   * lane into double, but not for calls with fewer than 32 values per
   * channel (A * S), where a statistic may have as few as two values and
   * dx then depends on the variance far below fp32. */
  void (*moments)(const float *x, size_t A, size_t C, size_t S, const float *k,
                  double *s1, double *s2);
  /* y = ((x - mh[c]) - ml[c]) * scale[c] + shift[c]. */
  void (*normalize)(const float *x, float *y, size_t A, size_t C, size_t S,
                    const float *mh, const float *ml, const float *scale,
                    const float *shift);
  /* xhat = (x - mean[c]) * istd[c]; adds sum(dy) into sdy[c] and
   * sum(dy * xhat) into sdyx[c]. The reference works in double; a set may
   * form xhat in float from the split mean and add float partial sums as
   * in moments, with the same exception for fewer than 32 values per
   * channel: dx depends on these sums to far below fp32 precision when a
   * statistic has two values (see bwd_apply). */
  void (*bwd_reduce)(const float *x, const float *dy, size_t A, size_t C,
                     size_t S, const double *mean, const double *istd,
                     double *sdy, double *sdyx);
  /* dx = k1[c] * dy + k2[c] * xhat + k3[c] with xhat = (x - mean[c]) *
   * istd[c], all in double and rounded once. The three terms nearly cancel
   * when eps is small against the variance of a small set (two values per
   * statistic: dx is about eps/var times dy), so fp32 here would lose
   * every digit of dx. */
  void (*bwd_apply)(const float *x, const float *dy, float *dx, size_t A,
                    size_t C, size_t S, const double *mean, const double *istd,
                    const double *k1, const double *k2, const double *k3);
  /* The four entries above on a strided view: element (a, c, s) at
   * a * lda + c * S + s, with lda >= C * S (y, dy and dx alike). Channels
   * [c0, c1) of an (A, C, S) array are the view (A, c1 - c0, S) at
   * x + c0 * S with lda = C * S, in one call. A set may leave these NULL;
   * the sbn__k_*_ld functions below then call the dense entry once per a
   * (A = 1), which computes the same. */
  void (*moments_ld)(const float *x, size_t A, size_t C, size_t S, size_t lda,
                     const float *k, double *s1, double *s2);
  /* moments_ld shifted by the first element of each channel, k[c] =
   * x[c * S], which the set writes to k; or NULL (then the caller sets k
   * and calls moments_ld). A set can take the shift from its first load
   * of each run instead of the caller's touching one line per channel
   * beforehand: with 7x7 planes that separate touch took half as long as
   * the moments themselves. */
  void (*moments_pick)(const float *x, size_t A, size_t C, size_t S, size_t lda,
                       float *k, double *s1, double *s2);
  void (*normalize_ld)(const float *x, float *y, size_t A, size_t C, size_t S,
                       size_t lda, const float *mh, const float *ml,
                       const float *scale, const float *shift);
  void (*bwd_reduce_ld)(const float *x, const float *dy, size_t A, size_t C,
                        size_t S, size_t lda, const double *mean,
                        const double *istd, double *sdy, double *sdyx);
  void (*bwd_apply_ld)(const float *x, const float *dy, float *dx, size_t A,
                       size_t C, size_t S, size_t lda, const double *mean,
                       const double *istd, const double *k1, const double *k2,
                       const double *k3);
  /* normalize on the dense view (1, C, S) of a block that is part of an
   * output of `total` elements, or NULL (then normalize_ld computes it).
   * A set may stream y when the whole output is large: the blocks that
   * GroupNorm and InstanceNorm normalize while they are in cache are
   * small slices of such an output, and their lines are not reread before
   * the pass has moved on. */
  void (*normalize_part)(const float *x, float *y, size_t C, size_t S,
                         size_t total, const float *mh, const float *ml,
                         const float *scale, const float *shift);
  /* GroupNorm (and InstanceNorm: cpg = 1) training forward of one NCHW
   * sample of G groups of cpg channels of S values, group by group while
   * each is in cache, or NULL. Per group g of m = cpg * S values: mean[g],
   * m2[g] = sum (x - mean)^2 and istd[g] = 1 / sqrt(m2[g] / m + eps), from
   * sums shifted by the group's first value (float partial sums as the
   * moments entry allows); then per channel c of g, y = (x - mean[g]) *
   * istd[g] * w[c] + b[c] (w, b NULL: 1 and 0). mean, istd and m2 hold G
   * doubles each. `total` is the whole y's element count, by which a set
   * may stream y. Returns 1 having done so, or 0 having written nothing
   * where the set declines (then the op takes the moments and normalize
   * entries). */
  int (*gn_fwd_nchw)(const float *x, float *y, size_t G, size_t cpg, size_t S,
                     const float *w, const float *b, double eps, double *mean,
                     double *istd, double *m2, size_t total);
  /* GroupNorm (and InstanceNorm: cpg = 1) backward of one NCHW sample of
   * G groups of cpg channels of S values, group by group while each is in
   * cache, or NULL. Per channel c of group g (m = cpg * S values, w[c] or
   * 1 when w is NULL): sdy[c] = sum dy and sdyx[c] = sum dy * xhat with
   * xhat = (x - mean[g]) * istd[g] (scratch of G * cpg doubles, any
   * contents on entry), added into db[c] and dw[c]; then
   * dx = istd[g] * w[c] * dy + k2 * xhat + k3 with k2 = -istd[g] *
   * sum_c w[c] sdyx[c] / m and k3 = -istd[g] * sum_c w[c] sdy[c] / m, or
   * k2 = k3 = 0 when stats is 0 (fixed running statistics). `total` is
   * the whole dx's element count, by which a set may stream dx. Returns
   * 1 having done so, or 0 having written nothing where the set declines
   * (then the op computes the same with bwd_reduce_ld and bwd_apply_ld). */
  int (*gn_bwd_nchw)(const float *x, const float *dy, float *dx, size_t G,
                     size_t cpg, size_t S, const double *mean,
                     const double *istd, const float *w, int stats, double *sdy,
                     double *sdyx, double *dw, double *db, size_t total);
  /* BatchNorm backward of a whole NCHW view (A samples of C channels of
   * S values, rows C * S apart) with nothing to reduce over other
   * processes, or NULL: writes sdy[c] = sum dy and sdyx[c] = sum dy * xhat
   * (C doubles each, the precision bwd_reduce allows), and dx as
   * bwd_apply with k1 = istd[c] * w[c] (w NULL: 1), k2 = -k1 * sdyx[c] /
   * count and k3 = -k1 * sdy[c] / count, or k2 = k3 = 0 when stats is 0
   * (fixed running statistics); a set may form dx in float from x - h (h
   * the float part of the mean) where each statistic has SMALL_STAT = 32
   * values or more. A set may take the channels in groups, each group's
   * dx right after its sums while the group is in cache. Returns 1 having
   * done so, or 0 having written nothing where the set declines (then the
   * op takes bwd_reduce and bwd_apply). */
  int (*bn_bwd_nchw)(const float *x, const float *dy, float *dx, size_t A,
                     size_t C, size_t S, const double *mean, const double *istd,
                     const float *w, int stats, double count, double *sdy,
                     double *sdyx);
  /* BatchNorm training forward of a whole NCHW view (A samples of C
   * channels of S values, rows C * S apart) with nothing to reduce over
   * other processes, or NULL. The set takes the channels in groups
   * [c0, c1), in order, each group once: the group's shifted sums as
   * moments_pick gives them (k[c], s1[c], s2[c]: C floats and C doubles
   * each, written by the set), then fin(arg, c0, c1), which turns them
   * into the group's mh, ml, scale and shift (C floats each, which the
   * set reads only after that call), then the group's y as normalize
   * gives it, while the group is still in cache. Returns 1 having done
   * so, or 0 having written nothing and called nothing where the set
   * declines (then the op takes moments_pick and normalize over the whole
   * view). */
  int (*bn_fwd_nchw)(const float *x, float *y, size_t A, size_t C, size_t S,
                     float *k, double *s1, double *s2,
                     void (*fin)(void *arg, size_t c0, size_t c1), void *arg,
                     const float *mh, const float *ml, const float *scale,
                     const float *shift);
  /* GroupNorm (and InstanceNorm: cpg = 1) training forward of sample i
   * of `count` consecutive NHWC samples of P positions of C = G * cpg
   * channels (x and y point at sample i; sample i + 1 follows at x + P * C,
   * which a set may prefetch), while the sample is in cache, or NULL. Per
   * group g of m = P * cpg values, shifted by k[g] = x[g * cpg] (written to
   * k): mean[g] and m2[g] (the sum of squared deviations) as
   * sbn__moments_finish forms them from the shifted sums (s1, s2: scratch
   * of G doubles), istd[g] = 1 / sqrt(m2[g] / m + eps); then y = xhat *
   * (float)(w[c] * istd[g]) + b[c] (w, b NULL: 1 and 0) to within the
   * rounding of normalize with GroupNorm's per-channel parameters. par is
   * scratch of SBN__GN_FWD_PAR(C) floats. A set may stream y by the whole
   * output's size (count * P * C). Returns 1 having done so, or 0 having
   * written nothing where the set declines (then the op computes the same
   * with moments_ld and normalize_ld). */
  int (*gn_fwd_nhwc)(const float *x, float *y, size_t P, size_t G, size_t cpg,
                     const float *w, const float *b, double eps, size_t i,
                     size_t count, float *par, float *k, double *s1, double *s2,
                     double *mean, double *m2, double *istd);
  /* GroupNorm (and InstanceNorm: cpg = 1) backward of sample i of
   * `count` consecutive NHWC samples of P positions of C = G * cpg
   * channels (x, dy and dx point at sample i; sample i + 1 follows at
   * P * C on, which a set may prefetch), while the sample is in cache, or
   * NULL. Computes what gn_bwd_nchw does for an NCHW sample: per channel
   * sdy[c] = sum dy and sdyx[c] = sum dy * xhat (scratch of C doubles
   * each, any contents on entry; the sums' precision as bwd_reduce
   * allows), added into db[c] and dw[c], and dx with the same k1, k2, k3
   * (k2 = k3 = 0 when stats is 0), which a set may form in float from
   * x - h (h the float part of the mean) where each statistic has
   * SMALL_STAT = 32 values or more. par is scratch of SBN__GN_FWD_PAR(C)
   * floats. A set may stream dx by the whole dx's size (count * P * C).
   * Returns 1 having done so, or 0 having written nothing where the set
   * declines (then the op computes the same with bwd_reduce_ld and
   * bwd_apply_ld). */
  int (*gn_bwd_nhwc)(const float *x, const float *dy, float *dx, size_t P,
                     size_t G, size_t cpg, const double *mean,
                     const double *istd, const float *w, int stats, size_t i,
                     size_t count, float *par, double *sdy, double *sdyx,
                     double *dw, double *db);
  /* LayerNorm rows (D contiguous elements with per-element affine; w and
   * b are NULL without affine): y = xhat * w + b. `total` is the whole
   * output's element count, by which a set may choose streaming stores
   * (an output that large leaves the cache before it is read). */
  void (*ln_forward)(const float *x, float *y, size_t D, size_t total, float mh,
                     float ml, float istd, const float *w, const float *b);
  /* Adds sum(g) and sum(g * xhat) with g = dy * w into sums[0], sums[1],
   * and dy * xhat, dy into dw[i], db[i]; xhat and the sums in double. */
  void (*ln_bwd_reduce)(const float *x, const float *dy, size_t D, double mean,
                        double istd, const float *w, double *dw, double *db,
                        double sums[2]);
  /* dx = istd * w * dy + (c2 * xhat + c3), in double like bwd_apply. */
  void (*ln_bwd_apply)(const float *x, const float *dy, float *dx, size_t D,
                       double mean, double istd, const float *w, double c2,
                       double c3);
  /* LayerNorm backward of R rows of D, or NULL (then the op calls
   * ln_bwd_reduce and ln_bwd_apply row by row, which is what this computes):
   * per row r the sums of ln_bwd_reduce, then dx as ln_bwd_apply with
   * c2 = -istd[r] * sum(g * xhat) / count and c3 = -istd[r] * sum(g) /
   * count, while the row is in cache (for rows of 32 or more elements a
   * set may form dx in float from x - h, h the float part of the mean,
   * as the channels-last passes do: every term is then of dx's size, and
   * rows that long have none of the cancellation ln_bwd_apply's double
   * guards against); writes the sums over rows of
   * dy * xhat and dy, formed in double and rounded once, to odw and odb
   * (either may be NULL). dw and db are the caller's scratch of D doubles
   * each, fw and fb of D floats each (any contents on entry), where a set
   * may sum a block of rows in float before adding into double. */
  void (*ln_bwd_rows)(const float *x, const float *dy, float *dx, size_t R,
                      size_t D, const double *mean, const double *istd,
                      const float *w, double count, double *dw, double *db,
                      float *fw, float *fb, float *odw, float *odb);
  /* ln_forward of R rows of D with row r's split mean mh[r] + ml[r] and
   * istd[r], or NULL (then the op calls ln_forward row by row, which is
   * what this computes). A set may walk the rows column block by column
   * block, so that each block of w and b is loaded once for all R rows. */
  void (*ln_forward_rows)(const float *x, float *y, size_t R, size_t D,
                          size_t total, const float *mh, const float *ml,
                          const float *istd, const float *w, const float *b);
  /* LayerNorm forward of R rows of D with their statistics, or NULL:
   * per row r the shifted sums of moments (shift x[r * D], the row's first
   * element), mean[r] and istd[r] = 1 / sqrt(m2 / D + eps) as
   * sbn__moments_finish forms them (written to the caller's arrays of R
   * doubles), and y as ln_forward with that mean split into float parts
   * (`total` as there). Returns 1 having done so, or 0 having written
   * nothing where the set declines rows of this length (then the op sums
   * each chunk of rows with moments and normalizes it with
   * ln_forward_rows). A set may normalize row r while it sums row r + 1,
   * so y must not overlap x unless it equals x. */
  int (*ln_forward_pipe)(const float *x, float *y, size_t R, size_t D,
                         size_t total, double eps, const float *w,
                         const float *b, double *mean, double *istd);
  /* Dropout of n elements starting at element index `first` (a multiple
   * of 4): out = word < thr ? 0 : in * scale, with the Philox words of
   * sbn_philox4x32_10 for counter (block, step, layer) and key. thr < 2^32
   * (p = 1 is handled by the caller). */
  void (*dropout)(const float *in, float *out, size_t n, uint64_t first,
                  const uint32_t key[2], uint32_t step, uint32_t layer,
                  uint32_t thr, float scale);
  /* sbn_rec_combine (syncbn.h) of n records, or NULL (the reference
   * merge). A set must give the reference's bits: the same IEEE
   * operations in the same order per record, so that processes running
   * different sets still agree and the merge stays commutative. */
  void (*rec_combine)(const sbn_rec_t *in, sbn_rec_t *inout, size_t n);
  /* sbn_rec_stat and sbn_rec_track (syncbn.h), or NULL (the reference's).
   * A set gives the reference's bits (the same IEEE operations in the
   * same order, no fused multiply-add), so that the service's ranks, which
   * may run different sets, reply and track alike. */
  void (*rec_stat)(const sbn_rec_t *recs, size_t n, sbn_stat_t which,
                   double eps, double *out);
  void (*rec_track)(const sbn_rec_t *recs, size_t n, double f, float *rm,
                    float *rv);
  /* sbn_rec_fill (syncbn.h), or NULL: the same records and the same first
   * invalid channel as the reference. */
  size_t (*rec_fill)(sbn_rec_t *recs, size_t n, const double *counts,
                     size_t cstep, const double *a, const double *b);
} sbn__kernels_t;

/* Floats of gn_fwd_nhwc's and gn_bwd_nhwc's par for C channels: four arrays of
 * C + 16 rounded up to whole vectors (a set may use fewer). */
#define SBN__GN_FWD_PAR(C) (4 * (((C) + 31) & ~(size_t)15))

extern const sbn__kernels_t sbn__kernels_ref;
/* The reference dropout kernel (kernels/philox.c); optimized sets finish
 * their tails with it. */
void sbn__dropout_ref(const float *in, float *out, size_t n, uint64_t first,
                      const uint32_t key[2], uint32_t step, uint32_t layer,
                      uint32_t thr, float scale);
/* The reference record merge (kernels/records.c); a set's rec_combine
 * finishes its tail with it. */
void sbn__rec_combine_ref(const sbn_rec_t *in, sbn_rec_t *inout, size_t n);
/* The reference sbn_rec_stat and sbn_rec_track; a set's versions finish
 * their tails with them. */
void sbn__rec_stat_ref(const sbn_rec_t *recs, size_t n, sbn_stat_t which,
                       double eps, double *out);
void sbn__rec_track_ref(const sbn_rec_t *recs, size_t n, double f, float *rm,
                        float *rv);
size_t sbn__rec_fill_ref(sbn_rec_t *recs, size_t n, const double *counts,
                         size_t cstep, const double *a, const double *b);
#if defined(__x86_64__) && defined(__GNUC__) && !defined(SBN_NO_AVX2)
#define SBN__HAVE_AVX2 1
extern const sbn__kernels_t sbn__kernels_avx2;
#endif
/* The build defines SBN__HAVE_AVX512 when it compiles kernels_avx512.c
 * with the AVX-512 flags (x86-64 with GCC or Clang). */
#ifdef SBN__HAVE_AVX512
extern const sbn__kernels_t sbn__kernels_avx512;
#endif

/* The kernel set in use, chosen on first use: the one named by the
 * environment variable SBN_KERNELS when it is set to a set this CPU can
 * run, else the best set for the CPU's features. */
const sbn__kernels_t *sbn__kernels(void);

/* The L2 cache of one core in bytes (1 MiB when the system does not say),
 * for the size thresholds of the optimized sets. */
size_t sbn__l2_bytes(void);

/* The L3 (last-level) cache in bytes as the system reports it, 0 when it
 * does not say. */
size_t sbn__l3_bytes(void);

/* Whether the core's L2 is 2 MiB or more. Three choices went opposite
 * ways on the two machines the optimized sets were measured on, a Xeon
 * with 2 MiB of L2 per core and a 260 MiB L3 and an AMD EPYC with 1 MiB
 * and 32 MiB: BatchNorm's fused NCHW passes (ops/batchnorm_overlap.c's
 * sbn__bn_fused_nchw), prefetching BatchNorm's plain stores' lines for
 * writing (sbn__pfw_on) and the LayerNorm backward's rows eight at a
 * time (kernels_avx512_ln.c's LNB_EIGHT_MIN) paid on the Xeon and cost
 * on the EPYC. The L2's size is the property of the two that the library
 * reads; it stands for those two machines, not for a mechanism.
 * SBN_WIDE_L2=1 or 0 answers for any core (the more specific SBN_BN_FUSED
 * and SBN_PFW still win). */
int sbn__wide_l2(void);

/* Whether the AVX-512 set's BatchNorm NCHW outputs stored normally (the
 * dx of avx512_inl.h's dx_run_f, the y of kernels_avx512_bnfuse.c's
 * sbn__avx512_norm_rows) prefetch their lines for writing (PREFETCHW,
 * avx512_inl.h's SBN__PFW): SBN_PFW=1 or 0 when set to one of them when
 * the kernel set is chosen, otherwise sbn__wide_l2(). Set with the kernel
 * set (sbn__kernels, sbn_kernel_select) and read, relaxed, in the loops.
 * On the EPYC, plain stores of 64 KiB to 2 MiB of cold output with
 * PREFETCHW 1 KiB ahead took 1.02-1.35 times as long as without
 * (scripts/store_ab.c, medians of 41), and BatchNorm NCHW floor ratios without
 * it, against SBN_PFW=1 (medians of six runs, alternated in both orders):
 * eval forward 8x256x14x14 0.86 against 1.10, 8x2048x7x7 0.98 against
 * 1.25; backward 8x2048x7x7 1.39 against 1.69, 8x17x64x64 1.16 against
 * 1.44; better on 9 of 12 shapes each way, worse at 8x1000x14x14 eval
 * (0.97 against 0.77). The LayerNorm, GroupNorm and InstanceNorm stores
 * keep theirs: measured the same way with a build that switched them too,
 * the LayerNorm forward took 1.66 without at 8x512x28x28 against 1.22
 * with, and the other two moved within the noise. */
extern int sbn__pfw_on;

/* The strided entries of the set in use (kernels/strided.c), or their
 * fallback through the dense entry, one a at a time. */
void sbn__k_moments_ld(const float *x, size_t A, size_t C, size_t S, size_t lda,
                       const float *k, double *s1, double *s2);
void sbn__k_normalize_ld(const float *x, float *y, size_t A, size_t C, size_t S,
                         size_t lda, const float *mh, const float *ml,
                         const float *scale, const float *shift);
void sbn__k_bwd_reduce_ld(const float *x, const float *dy, size_t A, size_t C,
                          size_t S, size_t lda, const double *mean,
                          const double *istd, double *sdy, double *sdyx);
/* normalize_part of the set in use, or normalize_ld where it has none. */
void sbn__k_normalize_part(const float *x, float *y, size_t C, size_t S,
                           size_t total, const float *mh, const float *ml,
                           const float *scale, const float *shift);
void sbn__k_bwd_apply_ld(const float *x, const float *dy, float *dx, size_t A,
                         size_t C, size_t S, size_t lda, const double *mean,
                         const double *istd, const double *k1, const double *k2,
                         const double *k3);

#endif /* SBN_KERNELS_H */
