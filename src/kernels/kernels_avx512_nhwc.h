/* The channels-last passes of the AVX-512 set (kernels_avx512_nhwc.c),
 * which kernels_avx512.c's table entries call for the position view
 * (kernels_geo_inl.h). Same arguments and contracts as the table's
 * strided entries (sbn_kernels.h); included only by files compiled with
 * the AVX-512 flags. */
#ifndef SBN_KERNELS_AVX512_NHWC_H
#define SBN_KERNELS_AVX512_NHWC_H

#include <stddef.h>

/* Each returns 1 having done the pass, or 0 having done nothing where its
 * tile order measured slower (backward over rows wider than one tile): the
 * caller then runs kernels_avx512.c's general position view. */

/* moments_ld (bwd = 0: k used, mean and istd NULL, dy NULL) or
 * bwd_reduce_ld (bwd = 1: k NULL), adding into s1 and s2. */
int sbn__avx512_cl_sums(int bwd, const float *x, const float *dy, size_t A,
                        size_t C, size_t S, size_t lda, const float *k,
                        const double *mean, const double *istd, double *s1,
                        double *s2);
/* The moments of sbn__avx512_cl_sums for a view read from memory: rows
 * wider than a register tile are swept row by row (which pays from memory
 * and loses on a view already in cache; see kernels_avx512_nhwc.c's
 * CL_COLD_BYTES) whatever the call's size. The channels-last forward of a
 * sample (kernels_avx512_clfwd.c) reads its x first from memory. */
int sbn__avx512_cl_moments_cold(const float *x, size_t A, size_t C, size_t S,
                                size_t lda, const float *k, double *s1,
                                double *s2);
int sbn__avx512_cl_normalize(const float *x, float *y, size_t A, size_t C,
                             size_t S, size_t lda, const float *mh,
                             const float *ml, const float *scale,
                             const float *shift);
int sbn__avx512_cl_apply(const float *x, const float *dy, float *dx, size_t A,
                         size_t C, size_t S, size_t lda, const double *mean,
                         const double *istd, const double *k1, const double *k2,
                         const double *k3);

/* The flat normalize of channels-last rows (kernels_avx512_clflat.c, shared
 * by kernels_avx512_clfwd.c's samples and kernels_avx512_nhwc.c's dense
 * rows): y = (x - h) * s + t over
 * n elements of rows of C channels, with h, s and t per channel at par,
 * par + ld and par + 2 ld (ld >= C + 15), their entries C .. C + 14 those
 * of channels (C + j) mod C (sbn__avx512_cl_flat_pad writes them), y
 * streamed when nt is set, and the pn elements after x prefetched. */
void sbn__avx512_cl_flat_pad(float *par, size_t ld, size_t C);
void sbn__avx512_cl_flat_normalize(const float *x, float *y, size_t n, size_t C,
                                   const float *par, size_t ld, int nt,
                                   size_t pn);
/* Sums of P rows of w channels at stride ld per run of cpg channels
 * (cpg divides w) into the w / cpg doubles d1 and d2 (set here): with dy,
 * sums of dy and dy * (x - h); with dy NULL, the moments' sums of x - h
 * and its square. h per channel at ph; float sums of at most RB values
 * per lane in a1 and a2 (w + 15 floats each, like ph), folded into
 * double (kernels_avx512_clbwd.c). */
void sbn__avx512_cl_row_sums(const float *x, const float *dy, size_t P,
                             size_t w, size_t ld, size_t cpg, const float *ph,
                             float *a1, float *a2, double *d1, double *d2);
/* The table's gn_fwd_nhwc (kernels_avx512_clfwd.c). */
int sbn__avx512_gn_fwd_nhwc(const float *x, float *y, size_t P, size_t G,
                            size_t cpg, const float *w, const float *b,
                            double eps, size_t i, size_t count, float *par,
                            float *k, double *s1, double *s2, double *mean,
                            double *m2, double *istd);
/* The table's gn_bwd_nhwc (kernels_avx512_clbwd.c). */
int sbn__avx512_gn_bwd_nhwc(const float *x, const float *dy, float *dx,
                            size_t P, size_t G, size_t cpg, const double *mean,
                            const double *istd, const float *w, int stats,
                            size_t i, size_t count, float *par, double *sdy,
                            double *sdyx, double *dw, double *db);

#endif /* SBN_KERNELS_AVX512_NHWC_H */
