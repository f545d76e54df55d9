/* The record combination of the public API (syncbn.h): every reduction
 * of SyncBN's records runs it (MPI's user-defined op, the two-process
 * exchange, the service's rounds), so it goes through the kernel set in
 * use like the ops' passes do. */
#include <math.h>

#include "kernels/sbn_kernels.h"

/* Chan's parallel merge of two (n, mean, M2) triples. Every operation is
 * written symmetrically in a and b (sums and products commute bitwise in
 * IEEE arithmetic, and delta is only used squared), so combine(a, b) and
 * combine(b, a) give the same bits: ranks of a reduction tree that combine
 * the same two partials agree exactly. The weighted mean (na*ma + nb*mb)/n
 * loses nothing that matters here: its error is relative to |mean|, and the
 * variance is built from M2 and delta, not from the mean's square. */
static void sbn__merge_moments(const double *a, double *b) {
  double na = a[0], nb = b[0];
  if (na == 0)
    return;
  if (nb == 0) {
    b[0] = a[0];
    b[1] = a[1];
    b[2] = a[2];
    return;
  }
  double n = na + nb;
  double delta = b[1] - a[1];
  double mean = (na * a[1] + nb * b[1]) / n;
  double m2 = (a[2] + b[2]) + delta * delta * (na * nb / n);
  b[0] = n;
  b[1] = mean;
  b[2] = m2;
}

void sbn__rec_combine_ref(const sbn_rec_t *in, sbn_rec_t *inout, size_t n) {
  for (size_t i = 0; i < n; i++) {
    if (in[i].tag == SBN_REC_MOMENTS) {
      sbn__merge_moments(in[i].v, inout[i].v);
    } else {
      inout[i].v[0] += in[i].v[0];
      inout[i].v[1] += in[i].v[1];
      inout[i].v[2] += in[i].v[2];
    }
  }
}

void sbn_rec_combine(const sbn_rec_t *in, sbn_rec_t *inout, size_t n) {
  const sbn__kernels_t *k = sbn__kernels();
  if (k->rec_combine != NULL)
    k->rec_combine(in, inout, n);
  else
    sbn__rec_combine_ref(in, inout, n);
}

/* One value of a reduced moments record (sbn_rec_stat). */
static double sbn__rec_stat_one(const sbn_rec_t *r, sbn_stat_t which,
                                double eps) {
  double n = r->v[0], m2 = r->v[2];
  switch (which) {
    case SBN_STAT_COUNT:
      return n;
    case SBN_STAT_MEAN:
      return r->v[1];
    case SBN_STAT_VAR:
      return n > 0 ? m2 / n : 0;
    case SBN_STAT_VAR_UNBIASED:
      return n > 1 ? m2 / (n - 1) : 0;
    default:
      return 1.0 / sqrt((n > 0 ? m2 / n : 0) + eps);
  }
}

void sbn__rec_stat_ref(const sbn_rec_t *recs, size_t n, sbn_stat_t which,
                       double eps, double *out) {
  for (size_t i = 0; i < n; i++)
    out[i] = sbn__rec_stat_one(&recs[i], which, eps);
}

void sbn__rec_track_ref(const sbn_rec_t *recs, size_t n, double f, float *rm,
                        float *rv) {
  for (size_t i = 0; i < n; i++) {
    double cnt = recs[i].v[0];
    double uvar = cnt > 1 ? recs[i].v[2] / (cnt - 1) : 0;
    if (cnt == 0)
      continue;
    rm[i] = (float)((1 - f) * rm[i] + f * recs[i].v[1]);
    rv[i] = (float)((1 - f) * rv[i] + f * uvar);
  }
}

void sbn_rec_stat(const sbn_rec_t *recs, size_t n, sbn_stat_t which, double eps,
                  double *out) {
  const sbn__kernels_t *k = sbn__kernels();
  if (k->rec_stat != NULL)
    k->rec_stat(recs, n, which, eps, out);
  else
    sbn__rec_stat_ref(recs, n, which, eps, out);
}

void sbn_rec_track(const sbn_rec_t *recs, size_t n, double f,
                   float *running_mean, float *running_var) {
  const sbn__kernels_t *k = sbn__kernels();
  if (k->rec_track != NULL)
    k->rec_track(recs, n, f, running_mean, running_var);
  else
    sbn__rec_track_ref(recs, n, f, running_mean, running_var);
}

/* Whether a channel's (count, a, b) is refused by sbn_rec_fill: a value
 * that is not finite, or for moments a negative count or M2, or a mean or
 * M2 beside a zero count. */
static int sbn__rec_bad(int mom, double n, double a, double b) {
  return !isfinite(a) | !isfinite(b) | !isfinite(n) | (n < 0) |
         (mom & (b < 0)) | (mom & (n == 0) & ((a != 0) | (b != 0)));
}

size_t sbn__rec_fill_ref(sbn_rec_t *recs, size_t n, const double *counts,
                         size_t cstep, const double *a, const double *b) {
  int mom = counts != NULL;
  for (size_t i = 0; i < n; i++) {
    double c = mom ? counts[i * cstep] : 0;
    if (sbn__rec_bad(mom, c, a[i], b[i]))
      return i;
    if (mom)
      recs[i] = (sbn_rec_t){SBN_REC_MOMENTS, {c, a[i], b[i]}};
    else
      recs[i] = (sbn_rec_t){SBN_REC_SUM, {a[i], b[i], 0}};
  }
  return n;
}

size_t sbn_rec_fill(sbn_rec_t *recs, size_t n, const double *counts,
                    size_t cstep, const double *a, const double *b) {
  const sbn__kernels_t *k = sbn__kernels();
  if (k->rec_fill != NULL)
    return k->rec_fill(recs, n, counts, cstep, a, b);
  return sbn__rec_fill_ref(recs, n, counts, cstep, a, b);
}
