/* The AVX-512 set's channels-last flat normalize (kernels_avx512_nhwc.h),
 * which the dense rows of kernels_avx512_nhwc.c and the GroupNorm and
 * InstanceNorm samples of kernels_avx512_clfwd.c share: y = (x - h) *
 * scale + t over rows of C channels as one flat stream, the parameters
 * read at the running channel offset from arrays padded by 16 (so that a
 * vector wrapping from channel C - 1 to 0 reads on). A file of its own so
 * that the two users each depend on it and not on each other. Compiled
 * with the AVX-512 flags; run only after dispatch.c's CPU check. */
#include "kernels/sbn_kernels.h"

#ifdef SBN__HAVE_AVX512
#include "kernels/avx512_inl.h"

#include "kernels/kernels_avx512_nhwc.h"

void sbn__avx512_cl_flat_pad(float *par, size_t ld, size_t C) {
  for (int a = 0; a < 3; a++)
    for (size_t j = 0; j < 16; j++)
      par[a * ld + C + j] = par[a * ld + (C + j) % C];
}

/* y of n elements of rows of C as one flat stream: vector i starts at
 * channel c (i's offset mod C), kept by adding 16 mod C. A streaming pass
 * first writes up to y's first line boundary with one masked store
 * (head_elems), so that every later whole vector fills one line of y. */
static inline __m512 fwd_y(__m512 x, const float *ph, const float *ps,
                           const float *pt) {
  return _mm512_fmadd_ps(_mm512_sub_ps(x, _mm512_loadu_ps(ph)),
                         _mm512_loadu_ps(ps), _mm512_loadu_ps(pt));
}

/* Prefetches the line of the next sample (x + n + i) that matches vector
 * i of this one, for i < pn, into L2: into L1 as well, it evicted the
 * parameters of wide rows (kernels_avx512_clfwd.c's samples). */
static inline void fwd_pf_next(const float *x, size_t n, size_t i, size_t pn) {
  if (i < pn)
    _mm_prefetch((const char *)(x + n + i), _MM_HINT_T1);
}

void sbn__avx512_cl_flat_normalize(const float *x, float *y, size_t n, size_t C,
                                   const float *par, size_t ld, int nt,
                                   size_t pn) {
  size_t step = 16 % C, h = head_elems(y, n, nt), c = 0, i = h;
  const float *ph = par, *ps = par + ld, *pt = par + 2 * ld;
  if (h > 0) {
    __mmask16 m = tail_mask(h);
    _mm512_mask_storeu_ps(y, m, fwd_y(_mm512_maskz_loadu_ps(m, x), ph, ps, pt));
    c = h % C;
  }
  for (; i + 16 <= n; i += 16) {
    fwd_pf_next(x, n, i, pn);
    store16(y + i, fwd_y(_mm512_loadu_ps(x + i), ph + c, ps + c, pt + c),
            0xFFFF, nt);
    c += step;
    if (c >= C)
      c -= C;
  }
  if (i < n) {
    __mmask16 m = tail_mask(n - i);
    _mm512_mask_storeu_ps(
        y + i, m,
        fwd_y(_mm512_maskz_loadu_ps(m, x + i), ph + c, ps + c, pt + c));
  }
}

#endif
