/* Pieces shared by the normalization ops: mean splitting, finishing shifted
 * sums, and per-channel arrays carved out of the caller's workspace. */
#include <math.h>

#include "ops/sbn_ops.h"

void sbn__split_mean(double mean, float *hi, float *lo) {
  /* hi is the nearest float; lo carries the rest, so (x - hi) - lo equals
   * x - mean to about 2^-48 relative to |mean|: with x near mean, x - hi is
   * exact (Sterbenz) and only the final subtraction rounds. */
  float h = (float)mean;
  *hi = h;
  *lo = (float)(mean - (double)h);
}

void sbn__moments_finish(double n, double k, double s1, double s2,
                         sbn_rec_t *rec) {
  rec->tag = SBN_REC_MOMENTS;
  rec->v[0] = n;
  if (n > 0) {
    double m2 = s2 - s1 * (s1 / n);
    /* Written as a comparison that is false for NaN, so a NaN input stays
     * visible instead of being clamped to a harmless zero. */
    if (m2 < 0)
      m2 = 0;
    rec->v[1] = k + s1 / n;
    rec->v[2] = m2;
  } else {
    rec->v[1] = 0;
    rec->v[2] = 0;
  }
}

size_t sbn__chan_bytes(size_t C) {
  /* Five float arrays, nine double arrays and one record array. Callers
   * have bounded C by the tensor's element count, so this cannot overflow
   * for any tensor that fits in memory; sbn__shape_channels verifies it. */
  return 5 * sbn__align64(C * sizeof(float)) +
         9 * sbn__align64(C * sizeof(double)) +
         sbn__align64(C * sizeof(sbn_rec_t));
}

void sbn__chan_carve(void *ws, size_t C, sbn__chan_t *ch) {
  char *p = ws;
  size_t fb = sbn__align64(C * sizeof(float));
  size_t db = sbn__align64(C * sizeof(double));
  float **f[5] = {&ch->mh, &ch->ml, &ch->k1, &ch->k2, &ch->k};
  for (int i = 0; i < 5; i++, p += fb)
    *f[i] = (float *)(void *)p;
  double **d[9] = {&ch->d1,    &ch->d2,  &ch->d3,  &ch->d4, &ch->dmean,
                   &ch->distd, &ch->dk1, &ch->dk2, &ch->dk3};
  for (int i = 0; i < 9; i++, p += db)
    *d[i] = (double *)(void *)p;
  ch->rec = (sbn_rec_t *)(void *)p;
}

void sbn__view_moments(const float *x, size_t A, size_t C, size_t S,
                       sbn__chan_t *ch, sbn_rec_t *recs) {
  sbn__view_moments_ld(x, A, C, S, C * S, ch, recs);
}

void sbn__view_moments_ld(const float *x, size_t A, size_t C, size_t S,
                          size_t lda, sbn__chan_t *ch, sbn_rec_t *recs) {
  double n = (double)A * (double)S;
  /* One channel of A adjacent runs is one run of A * S: a GroupNorm of one
   * group over channels-last data comes here as (positions, 1, C), and
   * summed as runs of C (17, say) it cost runs' tails and reductions, 5-9
   * times the memcpy, instead of one stream. */
  if (C == 1 && lda == S) {
    S *= A;
    lda = S;
    A = 1;
  }
  const sbn__kernels_t *t = sbn__kernels();
  int threaded = lda == C * S && sbn_threads() > 1;
  int pick = A > 0 && S > 0 && !threaded && t->moments_pick != NULL;
  for (size_t c = 0; c < C; c++) {
    /* Shifting by a value of the data itself keeps the squared sums small
     * for any |mean|/std, so double accumulation loses nothing. The same
     * first element when the set picks it (moments_pick). */
    if (!pick)
      ch->k[c] = (A > 0 && S > 0) ? x[c * S] : 0.0f;
    ch->d1[c] = 0;
    ch->d2[c] = 0;
  }
  /* A threaded build splits dense calls (ops/par.c); one thread takes
   * the strided entry, dense or not, as the kernels room intends. */
  if (pick)
    t->moments_pick(x, A, C, S, lda, ch->k, ch->d1, ch->d2);
  else if (A > 0 && S > 0 && threaded)
    sbn__kt()->moments(x, A, C, S, ch->k, ch->d1, ch->d2);
  else if (A > 0 && S > 0)
    sbn__k_moments_ld(x, A, C, S, lda, ch->k, ch->d1, ch->d2);
  for (size_t c = 0; c < C; c++)
    sbn__moments_finish(n, ch->k[c], ch->d1[c], ch->d2[c], &recs[c]);
}

void sbn__put_dwb(const sbn_backward_args_t *a, size_t c0, size_t c1,
                  const double *db, const double *dw) {
  for (size_t c = c0; c < c1 && a->dbias != NULL; c++)
    a->dbias[c] = (float)db[c];
  for (size_t c = c0; c < c1 && a->dweight != NULL; c++)
    a->dweight[c] = (float)dw[c];
}
