/* The statistics of normalization sets (`syncbn study`, sweep 1): the
 * moments of each channel of a batch, and how far the moments of a set of
 * samples fall from the population's. Records are the library's
 * (count, mean, M2) moments, so a set's moments are the Chan merge of its
 * samples' records, exactly as SyncBN merges its ranks'. */
#include <math.h>
#include <string.h>

#include "nn/sbn_nn.h"

void sbn_nn_channel_moments(const float *x, size_t n, size_t c, size_t s,
                            int nhwc, sbn_rec_t *recs) {
  /* Element j of channel ch of sample i sits at i c s + off(ch, j). */
  size_t cstride = nhwc ? 1 : s, jstride = nhwc ? c : 1;
  for (size_t ch = 0; ch < c; ch++) {
    double sum = 0, m2 = 0;
    for (size_t i = 0; i < n; i++)
      for (size_t j = 0; j < s; j++)
        sum += x[i * c * s + ch * cstride + j * jstride];
    double mean = n * s > 0 ? sum / (double)(n * s) : 0;
    for (size_t i = 0; i < n; i++)
      for (size_t j = 0; j < s; j++) {
        double d = x[i * c * s + ch * cstride + j * jstride] - mean;
        m2 += d * d;
      }
    recs[ch] = (sbn_rec_t){SBN_REC_MOMENTS, {(double)(n * s), mean, m2}};
  }
}

/* One chunk's records from n x c floats: two passes in double. */
static void float_chunk(const float *x, size_t c, const uint32_t *idx,
                        size_t count, sbn_rec_t *chunk) {
  for (size_t ch = 0; ch < c; ch++) {
    double sum = 0, m2 = 0;
    for (size_t i = 0; i < count; i++)
      sum += x[(size_t)idx[i] * c + ch];
    double mean = sum / (double)count;
    for (size_t i = 0; i < count; i++) {
      double d = x[(size_t)idx[i] * c + ch] - mean;
      m2 += d * d;
    }
    chunk[ch] = (sbn_rec_t){SBN_REC_MOMENTS, {(double)count, mean, m2}};
  }
}

void sbn_nn_chunk_moments(const sbn_nn_set_error_args_t *a, const uint32_t *idx,
                          size_t count, sbn_rec_t *chunk) {
  if (a->x != NULL) {
    float_chunk(a->x, a->c, idx, count, chunk);
    return;
  }
  memset(chunk, 0, a->c * sizeof *chunk);
  for (size_t i = 0; i < count; i++)
    sbn_rec_combine(a->samples + (size_t)idx[i] * a->c, chunk, a->c);
}

/* The records of one set: `ranks` chunks of `per_rank` samples, each
 * chunk's moments on its own and the chunks merged after, as SyncBN over
 * that many ranks merges them. */
static void set_moments(const sbn_nn_set_error_args_t *a) {
  memset(a->set, 0, a->c * sizeof *a->set);
  for (size_t r = 0; r < a->ranks; r++) {
    sbn_nn_chunk_moments(a, a->perm + r * a->per_rank, a->per_rank, a->chunk);
    sbn_rec_combine(a->chunk, a->set, a->c);
  }
}

int sbn_nn_set_error(const sbn_nn_set_error_args_t *a,
                     sbn_nn_set_error_t *out) {
  size_t set = a->per_rank * a->ranks;
  if (a->per_rank == 0 || a->ranks == 0 || set > a->n)
    return sbn_set_error(SBN_EINVAL,
                         "per_rank: %zu x %zu ranks is not in 1..%zu samples",
                         a->per_rank, a->ranks, a->n);
  if (a->trials == 0)
    return sbn_set_error(SBN_EINVAL, "trials: 0");
  double se_mean = 0, se_var = 0;
  size_t used = 0;
  for (size_t ch = 0; ch < a->c; ch++)
    used += a->pop[ch].v[2] / a->pop[ch].v[0] > a->min_var;
  if (used == 0)
    return sbn_set_error(SBN_EINVAL,
                         "min_var: no channel has a variance "
                         "above %g",
                         a->min_var);
  for (size_t t = 0; t < a->trials; t++) {
    /* A fresh draw of the pool per trial: sets of different trials
     * overlap as independent batches of a long training run do. */
    sbn_nn_permutation(a->perm, a->n, a->seed, t);
    set_moments(a);
    for (size_t ch = 0; ch < a->c; ch++) {
      double pvar = a->pop[ch].v[2] / a->pop[ch].v[0];
      if (!(pvar > a->min_var))
        continue;
      /* BatchNorm normalizes by the biased variance of the set. */
      double dm = a->set[ch].v[1] - a->pop[ch].v[1];
      double dv = a->set[ch].v[2] / a->set[ch].v[0] - pvar;
      se_mean += dm * dm / pvar;
      se_var += dv * dv / (pvar * pvar);
    }
  }
  double cells = (double)used * (double)a->trials;
  out->mean_err = sqrt(se_mean / cells);
  out->var_err = sqrt(se_var / cells);
  out->channels = used;
  out->set_values = (double)set * (a->x ? 1.0 : a->samples[0].v[0]);
  return 0;
}
