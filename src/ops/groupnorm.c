/* GroupNorm(G, C): statistics per (sample, group of C/G channels) over the
 * group's channels and spatial dims, per-channel affine. The group
 * statistics are spread to per-channel parameters so the same elementwise
 * kernels as BatchNorm apply. It never communicates. */
#include <math.h>

#include "internal.h"

int sbn__gn_sizes(const sbn_layer_t *l, const sbn__shape_t *sh, size_t *ws,
                  size_t *saved) {
  size_t items;
  *ws = sbn__chan_bytes(sh->C);
  if (sbn__mul_size(sh->N, l->p.groups, &items) != 0)
    return sbn_set_error(SBN_EOVERFLOW, "x_desc.dims: N*G overflows");
  return sbn__saved_size(items, saved);
}

/* The views of one sample: per group for the statistics, per channel for
 * the elementwise passes. NCHW groups are contiguous runs of (C/G)*S
 * elements; NHWC groups are runs of C/G within each spatial position. */
typedef struct gn_views_s {
  size_t gA, gS; /* group view (gA, G, gS) */
  size_t cA, cS; /* channel view (cA, C, cS) */
} gn_views_t;

static void gn_views(const sbn__shape_t *sh, size_t G, gn_views_t *v) {
  size_t cpg = sh->C / G;
  if (sh->layout == SBN_LAYOUT_NCHW) {
    v->gA = 1;
    v->gS = cpg * sh->S;
    v->cA = 1;
    v->cS = sh->S;
  } else {
    v->gA = sh->S;
    v->gS = cpg;
    v->cA = sh->S;
    v->cS = 1;
  }
}

int sbn__gn_forward(sbn_layer_t *l, const sbn_forward_args_t *a,
                    const sbn__shape_t *sh) {
  const sbn_layer_params_t *p = &l->p;
  size_t N = sh->N, C = sh->C, G = p->groups, cpg = C / G, plane = C * sh->S;
  double m = (double)cpg * (double)sh->S;
  double *smean = NULL, *sistd = NULL;
  gn_views_t v;
  sbn__chan_t ch;
  gn_views(sh, G, &v);
  sbn__chan_carve(a->workspace, C, &ch);
  if (a->saved != NULL)
    sbn__saved_init(a->saved, l, a->mode, m, N * G, &smean, &sistd);
  for (size_t n = 0; n < N && plane > 0; n++) {
    const float *xs = a->x + n * plane;
    sbn__view_moments(xs, v.gA, G, v.gS, &ch, ch.rec);
    for (size_t g = 0; g < G; g++) {
      double mean = ch.rec[g].v[1];
      double istd = 1.0 / sqrt(ch.rec[g].v[2] / m + p->eps);
      float mh, ml;
      sbn__split_mean(mean, &mh, &ml);
      for (size_t c = g * cpg; c < (g + 1) * cpg; c++) {
        ch.mh[c] = mh;
        ch.ml[c] = ml;
        ch.k1[c] = (float)((p->affine ? a->weight[c] : 1.0) * istd);
        ch.k2[c] = p->affine ? a->bias[c] : 0.0f;
      }
      if (smean != NULL) {
        smean[n * G + g] = mean;
        sistd[n * G + g] = istd;
      }
    }
    sbn__kernels()->normalize(xs, a->y + n * plane, v.cA, C, v.cS, ch.mh, ch.ml,
                              ch.k1, ch.k2);
  }
  return 0;
}

int sbn__gn_backward(sbn_layer_t *l, const sbn_backward_args_t *a,
                     const sbn__shape_t *sh) {
  const sbn_layer_params_t *p = &l->p;
  size_t N = sh->N, C = sh->C, G = p->groups, cpg = C / G, plane = C * sh->S;
  const double *mean, *istd;
  double m;
  gn_views_t v;
  sbn__chan_t ch;
  int rc = sbn__saved_get(a->saved, a->saved_bytes, l, a->mode, N * G, &m,
                          &mean, &istd);
  if (rc != 0)
    return rc;
  gn_views(sh, G, &v);
  sbn__chan_carve(a->workspace, C, &ch);
  for (size_t c = 0; c < C; c++) {
    ch.d3[c] = 0;
    ch.d4[c] = 0;
  }
  for (size_t n = 0; n < N && plane > 0; n++) {
    const float *xs = a->x + n * plane, *dys = a->dy + n * plane;
    for (size_t c = 0; c < C; c++) {
      size_t g = n * G + c / cpg;
      ch.dmean[c] = mean[g];
      ch.distd[c] = istd[g];
      ch.d1[c] = 0;
      ch.d2[c] = 0;
    }
    sbn__kernels()->bwd_reduce(xs, dys, v.cA, C, v.cS, ch.dmean, ch.distd,
                               ch.d1, ch.d2);
    for (size_t g = 0; g < G; g++) {
      /* Sums of dxhat = dy * weight and dxhat * xhat over the group. */
      double sg = 0, sgx = 0;
      for (size_t c = g * cpg; c < (g + 1) * cpg; c++) {
        double w = p->affine ? a->weight[c] : 1.0;
        sg += w * ch.d1[c];
        sgx += w * ch.d2[c];
      }
      double is = istd[n * G + g];
      for (size_t c = g * cpg; c < (g + 1) * cpg; c++) {
        ch.dmean[c] = mean[n * G + g];
        ch.distd[c] = is;
        ch.dk1[c] = is * (p->affine ? a->weight[c] : 1.0);
        ch.dk2[c] = -is * sgx / m;
        ch.dk3[c] = -is * sg / m;
        ch.d3[c] += ch.d2[c];
        ch.d4[c] += ch.d1[c];
      }
    }
    sbn__kernels()->bwd_apply(xs, dys, a->dx + n * plane, v.cA, C, v.cS,
                              ch.dmean, ch.distd, ch.dk1, ch.dk2, ch.dk3);
  }
  for (size_t c = 0; c < C; c++) {
    if (a->dweight != NULL)
      a->dweight[c] = (float)ch.d3[c];
    if (a->dbias != NULL)
      a->dbias[c] = (float)ch.d4[c];
  }
  return 0;
}
