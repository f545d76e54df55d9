/* Ghost batches of BatchNorm: the process's N samples are cut into
 * consecutive sub-batches of g samples and each is normalized with its own
 * statistics, as N/g data-parallel processes of g samples each would do
 * without synchronized BatchNorm. A sample is C * S contiguous elements in
 * both layouts, so a sub-batch is a contiguous slice of x and the kernels
 * run on it through the usual (A, C, S) view; the per-channel arrays of
 * the workspace are reused from one sub-batch to the next, so the
 * workspace does not grow with N/g and nothing is allocated. The saved
 * state holds every sub-batch's (mean, istd), sub-batch j at [j*C, j*C+C).
 *
 * Ghost batches replace the reduction: nothing here calls the
 * communicator. */
#include <math.h>

#include "ops/sbn_ops.h"

size_t sbn__ghost_count(size_t N, size_t g) {
  return N == 0 ? 0 : (N - 1) / g + 1;
}

int sbn__bn_ghost_sizes(const sbn_layer_params_t *p, const sbn__shape_t *sh,
                        size_t *saved) {
  size_t nsub = sbn__ghost_count(sh->N, p->ghost_batch), items;
  /* At least one set of C pairs, which eval with running statistics (and
   * an empty batch) uses. */
  if (nsub == 0)
    nsub = 1;
  if (sbn__mul_size(sh->C, nsub, &items) != 0)
    return sbn_set_error(SBN_EOVERFLOW,
                         "x_desc.dims: C * ceil(N/ghost_batch) overflows "
                         "size_t");
  return sbn__saved_size(items, saved);
}

/* Sub-batch j of the shape: its element offset, its number of samples,
 * and its (A, S) view with the shape's C. */
typedef struct sbn__ghost_view_s {
  size_t off, n, A, S;
  double count; /* values per channel */
} sbn__ghost_view_t;

static void ghost_view(const sbn__shape_t *sh, size_t g, size_t j,
                       sbn__ghost_view_t *v) {
  size_t first = j * g;
  v->n = sh->N - first < g ? sh->N - first : g;
  v->off = first * sh->C * sh->S;
  if (sh->layout == SBN_LAYOUT_NCHW) {
    v->A = v->n;
    v->S = sh->S;
  } else {
    v->A = v->n * sh->S;
    v->S = 1;
  }
  v->count = (double)v->n * (double)sh->S;
}

/* Every sub-batch but the last has g samples, so the only ones that can
 * hold a single value per channel are all of them (g = 1) or the last;
 * checking up front means a refused call writes nothing. */
static int ghost_check_small(const sbn__shape_t *sh, size_t g, size_t nsub) {
  if (sh->S != 1 || nsub == 0)
    return 0;
  size_t last = sh->N - (nsub - 1) * g;
  if (g == 1 || last == 1)
    return sbn_set_error(SBN_ESMALLBATCH,
                         "x: expected more than 1 value per channel when "
                         "training (ghost_batch %zu leaves sub-batch %zu of "
                         "N=%zu with 1 sample)",
                         g, g == 1 ? (size_t)0 : nsub - 1, sh->N);
  return 0;
}

/* The running statistics rule: one update per step from the means over
 * the sub-batches (d3: sum of means, d4: sum of unbiased variances). The
 * update is affine in the batch statistics, so this equals the average of
 * nsub processes' running statistics that each updated from one
 * sub-batch. */
static void ghost_running(const sbn_layer_params_t *p,
                          const sbn_forward_args_t *a, const sbn__chan_t *ch,
                          size_t C, size_t nsub) {
  float *rm = a->state->running_mean, *rv = a->state->running_var;
  double f = p->momentum;
  if (p->cumulative)
    f = 1.0 / ((double)a->state->num_batches_tracked + 1.0);
  for (size_t c = 0; c < C; c++) {
    rm[c] = (float)((1 - f) * rm[c] + f * (ch->d3[c] / (double)nsub));
    rv[c] = (float)((1 - f) * rv[c] + f * (ch->d4[c] / (double)nsub));
  }
  a->state->num_batches_tracked++;
}

int sbn__bn_ghost_forward(const sbn_layer_params_t *p,
                          const sbn_forward_args_t *a, const sbn__shape_t *sh) {
  size_t C = sh->C, g = p->ghost_batch;
  size_t nsub = sbn__ghost_count(sh->N, g);
  double *smean = NULL, *sistd = NULL;
  sbn__chan_t ch;
  int rc;
  if ((rc = ghost_check_small(sh, g, nsub)) != 0)
    return rc;
  sbn__chan_carve(a->workspace, C, &ch);
  if (a->saved != NULL)
    sbn__saved_init(a->saved, p->op, a->mode, (double)sh->N * (double)sh->S,
                    C * nsub, &smean, &sistd);
  for (size_t c = 0; c < C; c++)
    ch.d3[c] = ch.d4[c] = 0;
  for (size_t j = 0; j < nsub; j++) {
    sbn__ghost_view_t v;
    ghost_view(sh, g, j, &v);
    const float *x = a->x + v.off;
    sbn__view_moments(x, v.A, C, v.S, &ch, ch.rec);
    for (size_t c = 0; c < C; c++) {
      double mean = ch.rec[c].v[1], m2 = ch.rec[c].v[2];
      double var = v.count > 0 ? m2 / v.count : 0;
      double istd = 1.0 / sqrt(var + p->eps);
      sbn__split_mean(mean, &ch.mh[c], &ch.ml[c]);
      double w = p->affine ? a->weight[c] : 1.0;
      ch.k1[c] = (float)(w * istd);
      ch.k2[c] = p->affine ? a->bias[c] : 0.0f;
      if (smean != NULL) {
        smean[j * C + c] = mean;
        sistd[j * C + c] = istd;
      }
      ch.d3[c] += mean;
      ch.d4[c] += v.count > 1 ? m2 / (v.count - 1) : 0;
    }
    /* The slice is read whole by the moments before it is written, so y
     * may equal x. */
    if (v.A > 0 && v.S > 0)
      sbn__kt()->normalize(x, a->y + v.off, v.A, C, v.S, ch.mh, ch.ml, ch.k1,
                           ch.k2);
  }
  if (a->mode == SBN_MODE_TRAIN && p->track_running_stats && nsub > 0 &&
      sh->S > 0)
    ghost_running(p, a, &ch, C, nsub);
  return 0;
}

int sbn__bn_ghost_backward(const sbn_layer_params_t *p,
                           const sbn_backward_args_t *a,
                           const sbn__shape_t *sh) {
  size_t C = sh->C, g = p->ghost_batch;
  size_t nsub = sbn__ghost_count(sh->N, g);
  const double *mean, *istd;
  double count;
  sbn__chan_t ch;
  int rc = sbn__saved_get(a->saved, a->saved_bytes, p->op, a->mode, C * nsub,
                          &count, &mean, &istd);
  if (rc != 0)
    return rc;
  sbn__chan_carve(a->workspace, C, &ch);
  for (size_t c = 0; c < C; c++)
    ch.d3[c] = ch.d4[c] = 0;
  for (size_t j = 0; j < nsub; j++) {
    sbn__ghost_view_t v;
    ghost_view(sh, g, j, &v);
    for (size_t c = 0; c < C; c++) {
      ch.dmean[c] = mean[j * C + c];
      ch.distd[c] = istd[j * C + c];
      ch.d1[c] = ch.d2[c] = 0;
    }
    if (v.A == 0 || v.S == 0)
      continue;
    sbn__kt()->bwd_reduce(a->x + v.off, a->dy + v.off, v.A, C, v.S, ch.dmean,
                          ch.distd, ch.d1, ch.d2);
    /* Each sub-batch's own BatchNorm backward: dx = k1*dy + k2*xhat + k3
     * with its own sums and count. */
    for (size_t c = 0; c < C; c++) {
      double w = p->affine ? a->weight[c] : 1.0;
      double gw = w * ch.distd[c];
      ch.dk1[c] = gw;
      ch.dk2[c] = -gw * ch.d2[c] / v.count;
      ch.dk3[c] = -gw * ch.d1[c] / v.count;
      ch.d3[c] += ch.d1[c];
      ch.d4[c] += ch.d2[c];
    }
    sbn__kt()->bwd_apply(a->x + v.off, a->dy + v.off, a->dx + v.off, v.A, C,
                         v.S, ch.dmean, ch.distd, ch.dk1, ch.dk2, ch.dk3);
  }
  sbn__put_dwb(a, 0, C, ch.d3, ch.d4);
  return 0;
}
