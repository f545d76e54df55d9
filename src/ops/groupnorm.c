/* GroupNorm(G, C): statistics per (sample, group of C/G channels) over the
 * group's channels and spatial dims, per-channel affine. The group
 * statistics are spread to per-channel parameters so the same elementwise
 * kernels as BatchNorm apply. It never communicates.
 *
 * InstanceNorm is GroupNorm with groups of one channel (G = C), so the
 * per-sample passes here serve both (ops/instancenorm.c). What only
 * InstanceNorm has, running statistics, is switched on by the grouping's
 * `instance` flag and kept apart in small helpers. */
#include <math.h>
#include <string.h>

#include "ops/sbn_ops.h"

/* The views of one sample: per group for the statistics, per channel for
 * the elementwise passes. NCHW groups are contiguous runs of (C/G)*S
 * elements; NHWC groups are runs of C/G within each spatial position. For
 * G = C both views are InstanceNorm's (1, C, S) and (S, C, 1). */
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

int sbn__grouped_sizes(const sbn__shape_t *sh, size_t G, const char *what,
                       size_t *ws, size_t *saved) {
  size_t items;
  *ws = sbn__chan_bytes(sh->C);
  /* An NHWC sample's fused passes (gn_fwd_nhwc, gn_bwd_nhwc) take their
   * parameter arrays from past the per-channel ones. */
  if (sh->layout == SBN_LAYOUT_NHWC)
    *ws += sbn__align64(SBN__GN_FWD_PAR(sh->C) * sizeof(float));
  if (sbn__mul_size(sh->N, G, &items) != 0)
    return sbn_set_error(SBN_EOVERFLOW, "x_desc.dims: %s overflows", what);
  return sbn__saved_size(items, saved);
}

/* Whether the layer keeps running statistics (only InstanceNorm does). */
static int gn_running(const sbn_layer_t *l, const sbn__grouping_t *gp) {
  return gp->instance && l->p.track_running_stats;
}

/* Folds the batch means of the per-instance means (ch->d3) and unbiased
 * variances (ch->d4) of a training forward into the running statistics,
 * as PyTorch's InstanceNorm does. */
static void gn_update_running(const sbn_layer_t *l, const sbn_forward_args_t *a,
                              const sbn__shape_t *sh, const sbn__chan_t *ch) {
  double m = l->p.momentum;
  size_t N = sh->N;
  float *rm = a->state->running_mean, *rv = a->state->running_var;
  for (size_t c = 0; c < sh->C; c++) {
    rm[c] = (float)((1 - m) * rm[c] + m * ch->d3[c] / (double)N);
    rv[c] = (float)((1 - m) * rv[c] + m * ch->d4[c] / (double)N);
  }
}

/* Sets channels [c0, c0 + cpg) to normalize with (mean, istd). */
static void gn_spread(const sbn_layer_t *l, const sbn_forward_args_t *a,
                      sbn__chan_t *ch, size_t c0, size_t cpg, double mean,
                      double istd) {
  const sbn_layer_params_t *p = &l->p;
  float mh, ml;
  sbn__split_mean(mean, &mh, &ml);
  for (size_t c = c0; c < c0 + cpg; c++) {
    ch->mh[c] = mh;
    ch->ml[c] = ml;
    ch->k1[c] = (float)((p->affine ? a->weight[c] : 1.0) * istd);
    ch->k2[c] = p->affine ? a->bias[c] : 0.0f;
  }
}

/* Groups per block of one NCHW sample: as many whole groups as fit a
 * quarter of the core's L2 (1 MiB here), at least one. A block's
 * statistics are taken and the block normalized right after, while it is
 * still in the cache, so a pass reads x from memory once (8 bytes per
 * element forward, 12 backward) instead of twice. An NHWC sample stays one
 * block: a block there would be a channel range of every position (the
 * kernels' strided view), and ranges that fit the budget are a line or
 * two per position, which measured 3-6 times slower than two passes. */
#define SBN__GN_BLOCK_BYTES (256u * 1024u)

static size_t gn_block_groups(const sbn__shape_t *sh, size_t G) {
  size_t cpg = sh->C / G, bytes = cpg * sh->S * sizeof(float);
  if (sh->layout != SBN_LAYOUT_NCHW || bytes == 0)
    return G;
  size_t gb = SBN__GN_BLOCK_BYTES / bytes;
  return gb < 1 ? 1 : (gb > G ? G : gb);
}

/* The forward's per-sample state shared by its blocks. */
typedef struct gn_fwd_s {
  sbn_layer_t *l;
  const sbn_forward_args_t *a;
  const sbn__grouping_t *gp;
  sbn__chan_t ch;
  size_t cpg; /* channels per group */
  double m, *smean, *sistd;
  int running, batch;
} gn_fwd_t;

/* Statistics of groups [g0, g1) of sample n (their records are in
 * f->ch.rec[g] when batch statistics are used), spread to their
 * channels. */
static void gn_fwd_groups(gn_fwd_t *f, size_t n, size_t g0, size_t g1,
                          size_t S) {
  size_t G = f->gp->groups, cpg = f->cpg;
  for (size_t g = g0; g < g1; g++) {
    double mean, var;
    if (f->batch) {
      mean = f->ch.rec[g].v[1];
      var = f->m > 0 ? f->ch.rec[g].v[2] / f->m : 0;
      if (f->running) {
        /* G = C here, so group g is channel g. */
        f->ch.d3[g] += mean;
        f->ch.d4[g] += S > 1 ? f->ch.rec[g].v[2] / (double)(S - 1) : 0;
      }
    } else {
      mean = f->a->state->running_mean[g];
      var = f->a->state->running_var[g];
    }
    double istd = 1.0 / sqrt(var + f->l->p.eps);
    gn_spread(f->l, f->a, &f->ch, g * cpg, cpg, mean, istd);
    if (f->smean != NULL) {
      f->smean[n * G + g] = mean;
      f->sistd[n * G + g] = istd;
    }
  }
}

/* Sample n of a training forward through the set's fused pass for its
 * layout (gn_fwd_nhwc, or gn_fwd_nchw), which writes the statistics
 * straight to the saved state (or to scratch); then the running
 * statistics' sums (G = C when they are kept: InstanceNorm), as in
 * gn_fwd_groups. Returns 0 where the set has none or declines. */
static int gn_fwd_fused(gn_fwd_t *f, const sbn__shape_t *sh, size_t n,
                        const float *xs, float *ys) {
  const sbn__kernels_t *kt = sbn__kt();
  const sbn_layer_params_t *p = &f->l->p;
  size_t G = f->gp->groups, C = sh->C, S = sh->S;
  const float *w = p->affine ? f->a->weight : NULL;
  const float *b = p->affine ? f->a->bias : NULL;
  double *mean = f->smean != NULL ? f->smean + n * G : f->ch.dmean;
  double *istd = f->sistd != NULL ? f->sistd + n * G : f->ch.distd;
  double *m2;
  int done;
  if (sh->layout == SBN_LAYOUT_NHWC) {
    float *par =
        (float *)(void *)((char *)f->a->workspace + sbn__chan_bytes(C));
    m2 = f->ch.dk1;
    done = kt->gn_fwd_nhwc != NULL &&
           kt->gn_fwd_nhwc(xs, ys, S, G, f->cpg, w, b, p->eps, n, sh->N, par,
                           f->ch.k, f->ch.d1, f->ch.d2, mean, m2, istd);
  } else {
    m2 = f->ch.d1;
    done = kt->gn_fwd_nchw != NULL &&
           kt->gn_fwd_nchw(xs, ys, G, f->cpg, S, w, b, p->eps, mean, istd, m2,
                           sh->N * C * S);
  }
  if (!done)
    return 0;
  for (size_t g = 0; f->running && g < G; g++) {
    f->ch.d3[g] += mean[g];
    f->ch.d4[g] += S > 1 ? m2[g] / (double)(S - 1) : 0;
  }
  return 1;
}

int sbn__grouped_forward(sbn_layer_t *l, const sbn_forward_args_t *a,
                         const sbn__shape_t *sh, const sbn__grouping_t *gp) {
  size_t N = sh->N, C = sh->C, S = sh->S, G = gp->groups, cpg = C / G;
  size_t plane = C * S;
  gn_fwd_t f = {.l = l, .a = a, .gp = gp, .cpg = cpg};
  gn_views_t v;
  f.m = (double)cpg * (double)S;
  f.running = gn_running(l, gp);
  f.batch = a->mode == SBN_MODE_TRAIN || !f.running;
  if (gp->instance && f.batch && S == 1)
    return sbn_set_error(SBN_ESMALLBATCH,
                         "x: expected more than 1 spatial element when "
                         "training");
  gn_views(sh, G, &v);
  sbn__chan_carve(a->workspace, C, &f.ch);
  if (a->saved != NULL)
    sbn__saved_init(a->saved, l->p.op, a->mode, f.m, N * G, &f.smean, &f.sistd);
  for (size_t c = 0; c < C; c++) {
    f.ch.d3[c] = 0;
    f.ch.d4[c] = 0;
  }
  size_t gb = f.batch ? gn_block_groups(sh, G) : G;
  /* The fused passes are one thread's; threads split the moments and
   * normalize calls below (ops/par.c). */
  int one_thread = sbn_threads() <= 1;
  for (size_t n = 0; n < N; n++) {
    /* An empty sample (S = 0) still gets statistics for its saved
     * values; the running statistics skip such a batch below. */
    const float *xs = plane > 0 ? a->x + n * plane : a->x;
    float *ys = plane > 0 ? a->y + n * plane : a->y;
    if (f.batch && plane > 0 && one_thread &&
        (sh->layout == SBN_LAYOUT_NHWC || v.cA == 1) &&
        gn_fwd_fused(&f, sh, n, xs, ys))
      continue;
    for (size_t g0 = 0; g0 < G; g0 += gb) {
      size_t g1 = G - g0 < gb ? G : g0 + gb, c0 = g0 * cpg, o = c0 * v.cS;
      if (f.batch)
        sbn__view_moments_ld(xs + o, v.gA, g1 - g0, v.gS, G * v.gS, &f.ch,
                             f.ch.rec + g0);
      gn_fwd_groups(&f, n, g0, g1, S);
      /* An NCHW block is dense, a slice of the N * plane output. */
      if (plane > 0 && v.cA == 1)
        sbn__k_normalize_part(xs + o, ys + o, (g1 - g0) * cpg, v.cS, N * plane,
                              f.ch.mh + c0, f.ch.ml + c0, f.ch.k1 + c0,
                              f.ch.k2 + c0);
      else if (plane > 0)
        sbn__k_normalize_ld(xs + o, ys + o, v.cA, (g1 - g0) * cpg, v.cS,
                            C * v.cS, f.ch.mh + c0, f.ch.ml + c0, f.ch.k1 + c0,
                            f.ch.k2 + c0);
    }
  }
  /* PyTorch leaves the running statistics alone when there is nothing to
   * take statistics of: no samples, or samples with no spatial values. */
  if (f.running && a->mode == SBN_MODE_TRAIN && N > 0 && S > 0)
    gn_update_running(l, a, sh, &f.ch);
  return 0;
}

/* The dx coefficients of group g of sample n from the per-channel sums of
 * dy (ch->d1) and dy * xhat (ch->d2), whose mean and istd (ch->dmean,
 * ch->distd) the caller has set; also adds those sums into the dbias
 * (ch->d4) and dweight (ch->d3) accumulators. The affine choice and a
 * GroupNorm's k2, k3 (one value per group) are taken once per group:
 * with 7x7 planes the per-channel work here is a fair part of the pass. */
static void gn_bwd_group(const sbn_layer_t *l, const sbn_backward_args_t *a,
                         const sbn__grouping_t *gp, int batch, double m,
                         double im, sbn__chan_t *ch, size_t c0, size_t cpg,
                         double is) {
  const float *w = l->p.affine ? a->weight : NULL;
  size_t c1 = c0 + cpg;
  /* Sums of dxhat = dy * weight and dxhat * xhat over the group (not
   * used by InstanceNorm's one-channel groups). */
  double sg = 0, sgx = 0;
  for (size_t c = c0; c < c1 && !gp->instance; c++) {
    double wc = w != NULL ? w[c] : 1.0;
    sg += wc * ch->d1[c];
    sgx += wc * ch->d2[c];
  }
  double k2 = -is * sgx / m, k3 = -is * sg / m;
  for (size_t c = c0; c < c1; c++) {
    double k1 = is * (w != NULL ? w[c] : 1.0);
    ch->dk1[c] = k1;
    if (gp->instance) {
      /* The same value for one channel, in InstanceNorm's own order
       * (weight * istd first), times 1/m rather than divided by m: two
       * divisions per channel were a tenth of a 49-position sample. With
       * running statistics in eval the mean and variance are constants
       * and dx is dy scaled. */
      ch->dk2[c] = batch ? -k1 * ch->d2[c] * im : 0.0;
      ch->dk3[c] = batch ? -k1 * ch->d1[c] * im : 0.0;
    } else {
      ch->dk2[c] = k2;
      ch->dk3[c] = k3;
    }
    ch->d3[c] += ch->d2[c];
    ch->d4[c] += ch->d1[c];
  }
}

int sbn__grouped_backward(sbn_layer_t *l, const sbn_backward_args_t *a,
                          const sbn__shape_t *sh, const sbn__grouping_t *gp) {
  const sbn_layer_params_t *p = &l->p;
  size_t N = sh->N, C = sh->C, G = gp->groups, cpg = C / G, plane = C * sh->S;
  const double *mean, *istd;
  double m;
  gn_views_t v;
  sbn__chan_t ch;
  int rc = sbn__saved_get(a->saved, a->saved_bytes, p->op, a->mode, N * G, &m,
                          &mean, &istd);
  if (rc != 0)
    return rc;
  int batch = a->mode == SBN_MODE_TRAIN || !gn_running(l, gp);
  double im = m > 0 ? 1.0 / m : 0;
  gn_views(sh, G, &v);
  sbn__chan_carve(a->workspace, C, &ch);
  for (size_t c = 0; c < C; c++) {
    ch.d3[c] = 0;
    ch.d4[c] = 0;
  }
  size_t gb = gn_block_groups(sh, G);
  /* NCHW groups are contiguous: the set's fused kernel, when it has one,
   * takes a sample group by group (see gn_bwd_nchw). */
  __typeof__(sbn__kt()->gn_bwd_nchw) fused =
      v.cA == 1 ? sbn__kt()->gn_bwd_nchw : NULL;
  const float *w = p->affine ? a->weight : NULL;
  /* An NHWC sample takes the set's fused pass (gn_bwd_nhwc) in a build
   * of one thread, as the forward's (threads split the calls below), with
   * its parameter arrays from past the per-channel ones. */
  __typeof__(sbn__kt()->gn_bwd_nhwc) fused_cl =
      v.cA != 1 && sbn_threads() <= 1 ? sbn__kt()->gn_bwd_nhwc : NULL;
  float *par = (float *)(void *)((char *)a->workspace + sbn__chan_bytes(C));
  for (size_t n = 0; n < N && plane > 0; n++) {
    const float *xs = a->x + n * plane, *dys = a->dy + n * plane;
    float *dxs = a->dx + n * plane;
    if (fused != NULL &&
        fused(xs, dys, dxs, G, cpg, sh->S, mean + n * G, istd + n * G, w, batch,
              ch.d1, ch.d2, ch.d3, ch.d4, N * plane))
      continue;
    if (fused_cl != NULL &&
        fused_cl(xs, dys, dxs, sh->S, G, cpg, mean + n * G, istd + n * G, w,
                 batch, n, N, par, ch.d1, ch.d2, ch.d3, ch.d4))
      continue;
    /* Block by block (see gn_block_groups): dx of a block is formed while
     * its x and dy are still in the cache from its sums. */
    for (size_t g0 = 0; g0 < G; g0 += gb) {
      size_t g1 = G - g0 < gb ? G : g0 + gb, c0 = g0 * cpg, c1 = g1 * cpg;
      size_t o = c0 * v.cS, lda = C * v.cS;
      /* By group, not c / cpg per channel: with 7x7 planes the per
       * channel work here is a fair part of the pass. InstanceNorm's
       * groups are its channels, whose saved statistics the kernels read
       * in place. */
      const double *bm = mean + n * G, *bi = istd + n * G;
      if (cpg > 1) {
        for (size_t g = g0; g < g1; g++)
          for (size_t c = g * cpg; c < (g + 1) * cpg; c++) {
            ch.dmean[c] = bm[g];
            ch.distd[c] = bi[g];
          }
        bm = ch.dmean, bi = ch.distd;
      }
      memset(ch.d1 + c0, 0, (c1 - c0) * sizeof(double));
      memset(ch.d2 + c0, 0, (c1 - c0) * sizeof(double));
      sbn__k_bwd_reduce_ld(xs + o, dys + o, v.cA, c1 - c0, v.cS, lda, bm + c0,
                           bi + c0, ch.d1 + c0, ch.d2 + c0);
      for (size_t g = g0; g < g1; g++)
        gn_bwd_group(l, a, gp, batch, m, im, &ch, g * cpg, cpg,
                     istd[n * G + g]);
      sbn__k_bwd_apply_ld(xs + o, dys + o, dxs + o, v.cA, c1 - c0, v.cS, lda,
                          bm + c0, bi + c0, ch.dk1 + c0, ch.dk2 + c0,
                          ch.dk3 + c0);
    }
  }
  sbn__put_dwb(a, 0, C, ch.d4, ch.d3);
  return 0;
}

/* The GroupNorm row. */

static int gn_validate(const sbn_layer_params_t *p) {
  int rc;
  if ((rc = sbn__check_eps(p)) != 0 || (rc = sbn__check_channels(p)) != 0)
    return rc;
  if (p->groups == 0)
    return sbn_set_error(SBN_EINVAL, "groups: must be positive");
  if (p->channels % p->groups != 0)
    return sbn_set_error(SBN_EINVAL, "groups: %zu does not divide %zu channels",
                         p->groups, p->channels);
  return 0;
}

static int gn_sizes(const sbn_layer_params_t *p, const sbn__shape_t *sh,
                    size_t *ws, size_t *saved) {
  return sbn__grouped_sizes(sh, p->groups, "N*G", ws, saved);
}

static int gn_forward(sbn_layer_t *l, const sbn_forward_args_t *a,
                      const sbn__shape_t *sh) {
  sbn__grouping_t gp = {l->p.groups, 0};
  return sbn__grouped_forward(l, a, sh, &gp);
}

static int gn_backward(sbn_layer_t *l, const sbn_backward_args_t *a,
                       const sbn__shape_t *sh) {
  sbn__grouping_t gp = {l->p.groups, 0};
  return sbn__grouped_backward(l, a, sh, &gp);
}

const sbn__op_t sbn__op_groupnorm = {
    .name = "groupnorm",
    .flags = SBN__NEED_AFFINE | SBN__NEED_BWD_X,
    .validate = gn_validate,
    .shape = sbn__op_shape_channels,
    .sizes = gn_sizes,
    .forward = gn_forward,
    .backward = gn_backward,
};
