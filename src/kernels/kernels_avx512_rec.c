/* The record merge of the AVX-512 set: eight records at a time, each
 * field in a vector of its own (the records are four doubles: tag, count,
 * mean, M2). Each lane runs the reference's operations in its order with
 * no fused multiply-add, and the lanes the reference leaves early (a zero
 * count on either side) or sums (a sum record) are blended in from the
 * same values, so the bits are the reference's: the division and the
 * other operations are IEEE-rounded the same in a vector lane. At C =
 * 2048 records the scalar merge took 14-18 us in syncbnd's rounds, most
 * of it waiting on the division of every record one by one. */
#include <immintrin.h>

#include "kernels/avx512_inl.h"

/* Four vectors through two rounds of two-source permutes: with the
 * indices (RL, RH, FL, FH) four vectors of two records each become four
 * vectors of one field each (tag, count, mean, M2 of eight records), and
 * with (FL, FH, RL, RH) back. */
#define RL _mm512_set_epi64(13, 9, 5, 1, 12, 8, 4, 0)
#define RH _mm512_set_epi64(15, 11, 7, 3, 14, 10, 6, 2)
#define FL _mm512_set_epi64(11, 10, 9, 8, 3, 2, 1, 0)
#define FH _mm512_set_epi64(15, 14, 13, 12, 7, 6, 5, 4)
static inline void rec_shuffle(__m512d r[4], __m512i i0, __m512i i1, __m512i j0,
                               __m512i j1) {
  __m512d a = _mm512_permutex2var_pd(r[0], i0, r[1]);
  __m512d b = _mm512_permutex2var_pd(r[0], i1, r[1]);
  __m512d c = _mm512_permutex2var_pd(r[2], i0, r[3]);
  __m512d d = _mm512_permutex2var_pd(r[2], i1, r[3]);
  r[0] = _mm512_permutex2var_pd(a, j0, c);
  r[1] = _mm512_permutex2var_pd(a, j1, c);
  r[2] = _mm512_permutex2var_pd(b, j0, d);
  r[3] = _mm512_permutex2var_pd(b, j1, d);
}

static inline void rec_load(const sbn_rec_t *p, __m512d f[4]) {
  const double *d = (const double *)p;
  f[0] = _mm512_loadu_pd(d);
  f[1] = _mm512_loadu_pd(d + 8);
  f[2] = _mm512_loadu_pd(d + 16);
  f[3] = _mm512_loadu_pd(d + 24);
  rec_shuffle(f, RL, RH, FL, FH);
}

/* The inverse of rec_load: eight records from one vector per field (f is
 * consumed). */
static inline void rec_store(sbn_rec_t *p, __m512d f[4]) {
  double *d = (double *)p;
  rec_shuffle(f, FL, FH, RL, RH);
  _mm512_storeu_pd(d, f[0]);
  _mm512_storeu_pd(d + 8, f[1]);
  _mm512_storeu_pd(d + 16, f[2]);
  _mm512_storeu_pd(d + 24, f[3]);
}

void sbn__avx512_rec_combine(const sbn_rec_t *in, sbn_rec_t *inout, size_t n) {
  const __m512d zero = _mm512_setzero_pd();
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m512d a[4], b[4];
    rec_load(in + i, a);
    rec_load(inout + i, b);
    /* Sum records add field by field; so does a merge's count. */
    __m512d sn = _mm512_add_pd(a[1], b[1]);
    __m512d sm = _mm512_add_pd(a[2], b[2]);
    __m512d sq = _mm512_add_pd(a[3], b[3]);
    __mmask8 mom = _mm512_cmp_pd_mask(a[0], zero, _CMP_EQ_OQ);
    __mmask8 az = mom & _mm512_cmp_pd_mask(a[1], zero, _CMP_EQ_OQ);
    __mmask8 bz = mom & ~az & _mm512_cmp_pd_mask(b[1], zero, _CMP_EQ_OQ);
    __m512d delta = _mm512_sub_pd(b[2], a[2]);
    __m512d mean = _mm512_div_pd(
        _mm512_add_pd(_mm512_mul_pd(a[1], a[2]), _mm512_mul_pd(b[1], b[2])),
        sn);
    __m512d m2 = _mm512_add_pd(
        sq, _mm512_mul_pd(_mm512_mul_pd(delta, delta),
                          _mm512_div_pd(_mm512_mul_pd(a[1], b[1]), sn)));
    __m512d on = _mm512_mask_mov_pd(sn, az, b[1]);
    __m512d om = _mm512_mask_mov_pd(sm, mom, mean);
    __m512d oq = _mm512_mask_mov_pd(sq, mom, m2);
    on = _mm512_mask_mov_pd(on, bz, a[1]);
    om = _mm512_mask_mov_pd(_mm512_mask_mov_pd(om, az, b[2]), bz, a[2]);
    oq = _mm512_mask_mov_pd(_mm512_mask_mov_pd(oq, az, b[3]), bz, a[3]);
    /* The tags stay inout's, as the reference leaves them. */
    __m512d o[4] = {b[0], on, om, oq};
    rec_store(inout + i, o);
  }
  sbn__rec_combine_ref(in + i, inout + i, n - i);
}

/* The variance of eight records: M2 over the count, or over the count less
 * one (unbiased); 0 (+0, as the reference's) in the lanes whose count is
 * not above 0, or 1 for the unbiased one. */
static inline __m512d rec_var(const __m512d f[4], int unbiased) {
  const __m512d one = _mm512_set1_pd(1.0);
  __m512d d = unbiased ? _mm512_sub_pd(f[1], one) : f[1];
  __mmask8 ok = _mm512_cmp_pd_mask(f[1], unbiased ? one : _mm512_setzero_pd(),
                                   _CMP_GT_OQ);
  return _mm512_maskz_div_pd(ok, f[3], d);
}

void sbn__avx512_rec_stat(const sbn_rec_t *recs, size_t n, sbn_stat_t which,
                          double eps, double *out) {
  const __m512d e = _mm512_set1_pd(eps), one = _mm512_set1_pd(1.0);
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m512d f[4], o;
    rec_load(recs + i, f);
    if (which == SBN_STAT_COUNT)
      o = f[1];
    else if (which == SBN_STAT_MEAN)
      o = f[2];
    else if (which == SBN_STAT_INVSTD)
      o = _mm512_div_pd(one, _mm512_sqrt_pd(_mm512_add_pd(rec_var(f, 0), e)));
    else
      o = rec_var(f, which == SBN_STAT_VAR_UNBIASED);
    _mm512_storeu_pd(out + i, o);
  }
  sbn__rec_stat_ref(recs + i, n - i, which, eps, out + i);
}

void sbn__avx512_rec_track(const sbn_rec_t *recs, size_t n, double f, float *rm,
                           float *rv) {
  const __m512d keep = _mm512_set1_pd(1 - f), take = _mm512_set1_pd(f);
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m512d r[4];
    rec_load(recs + i, r);
    /* Records with no values leave their channel's statistics alone. */
    __mmask8 some = _mm512_cmp_pd_mask(r[1], _mm512_setzero_pd(), _CMP_NEQ_UQ);
    __m512d m = _mm512_cvtps_pd(_mm256_loadu_ps(rm + i));
    __m512d v = _mm512_cvtps_pd(_mm256_loadu_ps(rv + i));
    m = _mm512_add_pd(_mm512_mul_pd(keep, m), _mm512_mul_pd(take, r[2]));
    v = _mm512_add_pd(_mm512_mul_pd(keep, v),
                      _mm512_mul_pd(take, rec_var(r, 1)));
    _mm256_mask_storeu_ps(rm + i, some, _mm512_cvtpd_ps(m));
    _mm256_mask_storeu_ps(rv + i, some, _mm512_cvtpd_ps(v));
  }
  sbn__rec_track_ref(recs + i, n - i, f, rm + i, rv + i);
}

/* Eight channels at a time: the reference's checks as masks (x - x is 0
 * exactly for a finite x, NaN otherwise), the first refused lane found in
 * the first block that has one (so the same channel as the reference's
 * scan), and the records written through the merge's transpose back.
 * Counts with a stride other than 0 or 1 take the reference. */
size_t sbn__avx512_rec_fill(sbn_rec_t *recs, size_t n, const double *counts,
                            size_t cstep, const double *a, const double *b) {
  const __m512d z = _mm512_setzero_pd();
  int mom = counts != NULL;
  const __m512d tag = _mm512_set1_pd(mom ? SBN_REC_MOMENTS : SBN_REC_SUM);
  size_t i = 0;
  if (mom && cstep > 1)
    return sbn__rec_fill_ref(recs, n, counts, cstep, a, b);
  for (; i + 8 <= n; i += 8) {
    __m512d x = _mm512_loadu_pd(a + i), y = _mm512_loadu_pd(b + i), c = z;
    __mmask8 ok = _mm512_cmp_pd_mask(_mm512_sub_pd(x, x), z, _CMP_EQ_OQ) &
                  _mm512_cmp_pd_mask(_mm512_sub_pd(y, y), z, _CMP_EQ_OQ);
    if (mom) {
      c = cstep == 0 ? _mm512_set1_pd(counts[0]) : _mm512_loadu_pd(counts + i);
      __mmask8 zero = _mm512_cmp_pd_mask(c, z, _CMP_EQ_OQ);
      __mmask8 some = _mm512_cmp_pd_mask(x, z, _CMP_NEQ_UQ) |
                      _mm512_cmp_pd_mask(y, z, _CMP_NEQ_UQ);
      ok &= _mm512_cmp_pd_mask(_mm512_sub_pd(c, c), z, _CMP_EQ_OQ) &
            _mm512_cmp_pd_mask(c, z, _CMP_GE_OQ) &
            _mm512_cmp_pd_mask(y, z, _CMP_GE_OQ) & (__mmask8) ~(zero & some);
    }
    if (ok != 0xff)
      return i + (size_t)__builtin_ctz(~(unsigned)ok & 0xffu);
    __m512d o[4] = {tag, mom ? c : x, mom ? x : y, mom ? y : z};
    rec_store(recs + i, o);
  }
  return i + sbn__rec_fill_ref(recs + i, n - i, mom ? counts + i * cstep : NULL,
                               cstep, a + i, b + i);
}
