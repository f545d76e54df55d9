/* The NCHW short-run passes of the AVX-512 set (kernels_avx512_short.c),
 * which kernels_avx512.c's table entries call. Same arguments as the
 * table's strided entries (sbn_kernels.h), with the caller's choice of
 * streaming stores (nt); each needs S >= 16. Included only by files
 * compiled with the AVX-512 flags. */
#ifndef SBN_KERNELS_AVX512_SHORT_H
#define SBN_KERNELS_AVX512_SHORT_H

#include <stddef.h>

/* Whether normalize takes the flat rows: when it streams y and a run's
 * ends fall inside cache lines (S not a multiple of 16), where run by run
 * every boundary line would be written both ways. Stored normally, the
 * per-run loops are faster (warm 8x64x14x14: 19 us against 24 us flat:
 * their trip counts are the same for every run, while the flat loop's
 * channel ends fall on a different vector each time and are
 * mispredicted). */
static inline int flat_norm(size_t S, int nt) {
  return S >= 16 && S % 16 != 0 && nt;
}

void sbn__avx512_flat_normalize(const float *x, float *y, size_t A, size_t C,
                                size_t S, size_t lda, const float *mh,
                                const float *ml, const float *scale,
                                const float *shift, int nt);
void sbn__avx512_runs_apply(const float *x, const float *dy, float *dx,
                            size_t A, size_t C, size_t S, size_t lda,
                            const double *mean, const double *istd,
                            const double *k1, const double *k2,
                            const double *k3);

/* Runs up to this long (7x7, 14x14 and 15x15 planes) take the 16-channel
 * sums; see kernels_avx512_short.c. */
#define SHORT_S 256

/* moments_ld (bwd = 0: shifted by k[c], or with pick by each channel's
 * first value in row 0, which it writes to pick) or bwd_reduce_ld (bwd =
 * 1), adding into s1 and s2; 16 <= S <= SHORT_S. */
void sbn__avx512_short_sums(int bwd, const float *x, const float *dy, size_t A,
                            size_t C, size_t S, size_t lda, const float *k,
                            float *pick, const double *mean, const double *istd,
                            double *s1, double *s2);

#endif /* SBN_KERNELS_AVX512_SHORT_H */
