/* InstanceNorm: statistics per (sample, channel) over the spatial dims.
 * Running statistics, when tracked, follow PyTorch's InstanceNorm: the
 * batch mean of the per-instance means and of the per-instance unbiased
 * variances. It never communicates. */
#include <math.h>

#include "internal.h"

/* One sample's (A, C, S) view: NCHW (1, C, spatial), NHWC (spatial, C, 1). */
static void in_view(const sbn__shape_t *sh, size_t *A, size_t *S) {
  if (sh->layout == SBN_LAYOUT_NCHW) {
    *A = 1;
    *S = sh->S;
  } else {
    *A = sh->S;
    *S = 1;
  }
}

int sbn__in_sizes(const sbn_layer_t *l, const sbn__shape_t *sh, size_t *ws,
                  size_t *saved) {
  size_t items;
  (void)l;
  *ws = sbn__chan_bytes(sh->C);
  if (sbn__mul_size(sh->N, sh->C, &items) != 0)
    return sbn_set_error(SBN_EOVERFLOW, "x_desc.dims: N*C overflows");
  return sbn__saved_size(items, saved);
}

int sbn__in_forward(sbn_layer_t *l, const sbn_forward_args_t *a,
                    const sbn__shape_t *sh) {
  const sbn_layer_params_t *p = &l->p;
  size_t N = sh->N, C = sh->C, S = sh->S, A, Sv, plane = C * S;
  sbn__chan_t ch;
  double *smean = NULL, *sistd = NULL;
  int batch = a->mode == SBN_MODE_TRAIN || !p->track_running_stats;
  if (batch && S == 1)
    return sbn_set_error(SBN_ESMALLBATCH,
                         "x: expected more than 1 spatial element when "
                         "training");
  in_view(sh, &A, &Sv);
  sbn__chan_carve(a->workspace, C, &ch);
  if (a->saved != NULL)
    sbn__saved_init(a->saved, l, a->mode, (double)S, N * C, &smean, &sistd);
  for (size_t c = 0; c < C; c++) {
    ch.d3[c] = 0;
    ch.d4[c] = 0;
  }
  for (size_t n = 0; n < N; n++) {
    const float *xs = a->x + n * plane;
    if (batch)
      sbn__view_moments(xs, A, C, Sv, &ch, ch.rec);
    for (size_t c = 0; c < C; c++) {
      double mean, var;
      if (batch) {
        mean = ch.rec[c].v[1];
        var = S > 0 ? ch.rec[c].v[2] / (double)S : 0;
        ch.d3[c] += mean;
        ch.d4[c] += S > 1 ? ch.rec[c].v[2] / (double)(S - 1) : 0;
      } else {
        mean = a->state->running_mean[c];
        var = a->state->running_var[c];
      }
      double istd = 1.0 / sqrt(var + p->eps);
      sbn__split_mean(mean, &ch.mh[c], &ch.ml[c]);
      ch.k1[c] = (float)((p->affine ? a->weight[c] : 1.0) * istd);
      ch.k2[c] = p->affine ? a->bias[c] : 0.0f;
      if (smean != NULL) {
        smean[n * C + c] = mean;
        sistd[n * C + c] = istd;
      }
    }
    if (plane > 0)
      sbn__kernels()->normalize(xs, a->y + n * plane, A, C, Sv, ch.mh, ch.ml,
                                ch.k1, ch.k2);
  }
  if (a->mode == SBN_MODE_TRAIN && p->track_running_stats && N > 0) {
    double m = p->momentum;
    for (size_t c = 0; c < C; c++) {
      float *rm = a->state->running_mean, *rv = a->state->running_var;
      rm[c] = (float)((1 - m) * rm[c] + m * ch.d3[c] / (double)N);
      rv[c] = (float)((1 - m) * rv[c] + m * ch.d4[c] / (double)N);
    }
  }
  return 0;
}

int sbn__in_backward(sbn_layer_t *l, const sbn_backward_args_t *a,
                     const sbn__shape_t *sh) {
  const sbn_layer_params_t *p = &l->p;
  size_t N = sh->N, C = sh->C, A, Sv, plane = C * sh->S;
  const double *mean, *istd;
  double count;
  sbn__chan_t ch;
  int rc = sbn__saved_get(a->saved, a->saved_bytes, l, a->mode, N * C, &count,
                          &mean, &istd);
  if (rc != 0)
    return rc;
  int batch = a->mode == SBN_MODE_TRAIN || !p->track_running_stats;
  in_view(sh, &A, &Sv);
  sbn__chan_carve(a->workspace, C, &ch);
  for (size_t c = 0; c < C; c++) {
    ch.d3[c] = 0;
    ch.d4[c] = 0;
  }
  for (size_t n = 0; n < N && plane > 0; n++) {
    const float *xs = a->x + n * plane, *dys = a->dy + n * plane;
    for (size_t c = 0; c < C; c++) {
      ch.dmean[c] = mean[n * C + c];
      ch.distd[c] = istd[n * C + c];
      ch.d1[c] = 0;
      ch.d2[c] = 0;
    }
    sbn__kernels()->bwd_reduce(xs, dys, A, C, Sv, ch.dmean, ch.distd, ch.d1,
                               ch.d2);
    for (size_t c = 0; c < C; c++) {
      double g = (p->affine ? a->weight[c] : 1.0) * istd[n * C + c];
      ch.d3[c] += ch.d2[c];
      ch.d4[c] += ch.d1[c];
      ch.dmean[c] = mean[n * C + c];
      ch.distd[c] = istd[n * C + c];
      ch.dk1[c] = g;
      ch.dk2[c] = batch ? -g * ch.d2[c] / count : 0.0;
      ch.dk3[c] = batch ? -g * ch.d1[c] / count : 0.0;
    }
    sbn__kernels()->bwd_apply(xs, dys, a->dx + n * plane, A, C, Sv, ch.dmean,
                              ch.distd, ch.dk1, ch.dk2, ch.dk3);
  }
  for (size_t c = 0; c < C; c++) {
    if (a->dweight != NULL)
      a->dweight[c] = (float)ch.d3[c];
    if (a->dbias != NULL)
      a->dbias[c] = (float)ch.d4[c];
  }
  return 0;
}
