/* The record combination of the public API (syncbn.h): every reduction
 * of SyncBN's records runs it (MPI's user-defined op, the two-process
 * exchange, the service's rounds), so it goes through the kernel set in
 * use like the ops' passes do. */
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
