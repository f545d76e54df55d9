/* BatchNorm's per-channel finishing steps, shared by the one-reduction
 * passes (batchnorm.c) and the chunked SyncBN (batchnorm_overlap.c), which
 * applies them one channel range at a time: from the reduced records (or
 * the running statistics) to the normalization parameters, the saved
 * state and the running statistics in forward, and to dx's parameters in
 * backward. Nothing here calls either of those files. */
#include <math.h>
#include <string.h>

#include "ops/sbn_ops.h"

int sbn__bn_fin_init(const sbn_layer_t *l, const sbn_forward_args_t *a,
                     const sbn__shape_t *sh, const sbn_rec_t *recs,
                     sbn__bn_fin_t *fin) {
  const sbn_layer_params_t *p = &l->p;
  memset(fin, 0, sizeof *fin);
  fin->batch = sbn__bn_batch_stats(p, a->mode);
  if (fin->batch) {
    fin->count = recs[0].v[0];
    /* Every process sees the same reduced count, so this error is returned
     * consistently everywhere and no process waits in a later collective. */
    if (fin->count == 1)
      return sbn_set_error(SBN_ESMALLBATCH,
                           "x: expected more than 1 value per channel when "
                           "training (the batch has 1)");
  } else {
    fin->count = (double)sh->N * (double)sh->S;
  }
  if (a->saved != NULL)
    sbn__saved_init(a->saved, p->op, a->mode, fin->count, sh->C, &fin->smean,
                    &fin->sistd);
  fin->rm = p->track_running_stats ? a->state->running_mean : NULL;
  fin->rv = p->track_running_stats ? a->state->running_var : NULL;
  fin->update = a->mode == SBN_MODE_TRAIN && fin->rm != NULL && fin->count > 0;
  fin->f = p->momentum;
  if (fin->update && p->cumulative)
    fin->f = 1.0 / ((double)a->state->num_batches_tracked + 1.0);
  return 0;
}

void sbn__bn_fin_chan(const sbn_layer_t *l, const sbn_forward_args_t *a,
                      const sbn__bn_fin_t *fin, const sbn_rec_t *recs,
                      size_t c0, size_t c1, sbn__chan_t *ch) {
  const sbn_layer_params_t *p = &l->p;
  double count = fin->count, f = fin->f;
  for (size_t c = c0; c < c1; c++) {
    double mean, var;
    if (fin->batch) {
      mean = recs[c].v[1];
      var = count > 0 ? recs[c].v[2] / count : 0;
    } else {
      mean = fin->rm[c];
      var = fin->rv[c];
    }
    double istd = 1.0 / sqrt(var + p->eps);
    sbn__split_mean(mean, &ch->mh[c], &ch->ml[c]);
    double w = p->affine ? a->weight[c] : 1.0;
    ch->k1[c] = (float)(w * istd);
    ch->k2[c] = p->affine ? a->bias[c] : 0.0f;
    if (fin->smean != NULL) {
      fin->smean[c] = mean;
      fin->sistd[c] = istd;
    }
    if (fin->update) {
      double unbiased = recs[c].v[2] / (count - 1);
      fin->rm[c] = (float)((1 - f) * fin->rm[c] + f * mean);
      fin->rv[c] = (float)((1 - f) * fin->rv[c] + f * unbiased);
    }
  }
}

void sbn__bn_fin_done(const sbn_forward_args_t *a, const sbn__bn_fin_t *fin) {
  if (fin->update)
    a->state->num_batches_tracked++;
}

void sbn__bn_bwd_chan(const sbn_layer_t *l, const sbn_backward_args_t *a,
                      const double *mean, const double *istd, double count,
                      const sbn_rec_t *recs, size_t c0, size_t c1,
                      sbn__chan_t *ch) {
  const sbn_layer_params_t *p = &l->p;
  int batch = sbn__bn_batch_stats(p, a->mode);
  for (size_t c = c0; c < c1; c++) {
    double w = p->affine ? a->weight[c] : 1.0;
    double g = w * istd[c];
    ch->dmean[c] = mean[c];
    ch->distd[c] = istd[c];
    ch->dk1[c] = g;
    if (batch && count > 0) {
      ch->dk2[c] = -g * recs[c].v[1] / count;
      ch->dk3[c] = -g * recs[c].v[0] / count;
    } else {
      /* With running statistics the mean and variance are constants, so
       * dx is dy scaled: dx = dy * weight / sqrt(running_var + eps). */
      ch->dk2[c] = 0;
      ch->dk3[c] = 0;
    }
  }
}
