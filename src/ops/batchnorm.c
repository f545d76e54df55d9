/* BatchNorm: per-channel statistics over (N, spatial), reduced through the
 * layer's communicator, so the same code is local BN and SyncBN.
 *
 * Forward in training is three steps with a seam between them (local
 * moments -> reduce -> normalize) and so is backward (local sums -> reduce
 * -> dx). Eval mode never reduces: it uses the running statistics, or the
 * local batch statistics when none are tracked (as PyTorch does). Ghost
 * batches (batchnorm_ghost.c) replace the reduction wherever batch
 * statistics are used. The per-channel finishing steps that this file and
 * the chunked SyncBN (batchnorm_overlap.c) share live below both, in
 * batchnorm_chan.c, so that calls go one way: this file calls the chunked
 * passes, and both call the finishing steps. */
#include <string.h>

#include "ops/sbn_ops.h"

/* The (A, C, S) view of a BN input: NCHW is (N, C, spatial) and NHWC is
 * (N * spatial, C, 1). */
static void bn_view(const sbn__shape_t *sh, size_t *A, size_t *S) {
  if (sh->layout == SBN_LAYOUT_NCHW) {
    *A = sh->N;
    *S = sh->S;
  } else {
    *A = sh->N * sh->S;
    *S = 1;
  }
}

static void bn_defaults(sbn_layer_params_t *p) {
  p->track_running_stats = 1;
}

static int bn_validate(const sbn_layer_params_t *p) {
  return sbn__check_running_norm(p, 1);
}

static int bn_sizes(const sbn_layer_params_t *p, const sbn__shape_t *sh,
                    size_t *ws, size_t *saved) {
  *ws = sbn__chan_bytes(sh->C);
  if (p->ghost_batch > 0)
    return sbn__bn_ghost_sizes(p, sh, saved);
  return sbn__saved_size(sh->C, saved);
}

/* Whether a call in this mode normalizes with ghost-batch statistics:
 * wherever batch statistics are used (training, and eval without running
 * statistics). */
static int bn_ghost(const sbn_layer_params_t *p, sbn_mode_t mode) {
  return p->ghost_batch > 0 && sbn__bn_batch_stats(p, mode);
}

/* The seam's *_local calls have nothing to reduce for a ghost layer. */
static int bn_ghost_local(const sbn_layer_t *l, const char *finish) {
  return sbn_set_error(SBN_EINVAL,
                       "layer: ghost_batch %zu: a ghost-batch layer has no "
                       "records to reduce (sbn_bn_needs_reduce is 0); call "
                       "%s alone",
                       l->p.ghost_batch, finish);
}

int sbn_bn_needs_reduce(const sbn_layer_t *l, sbn_mode_t mode) {
  return l != NULL && l->p.op == SBN_OP_BATCHNORM && mode == SBN_MODE_TRAIN &&
         l->p.ghost_batch == 0;
}

/* The seam's own front door: the checks sbn_forward/sbn_backward make,
 * for a BatchNorm layer, through the same op row, so the seam asks for the
 * same buffers as the one-call path. */
static int bn_check(const sbn_layer_t *l, const void *a, sbn__shape_t *sh,
                    const sbn_tensor_desc_t *d, sbn__need_t *need) {
  if (l == NULL || a == NULL)
    return sbn_set_error(SBN_EINVAL, "%s: NULL", l == NULL ? "layer" : "args");
  if (l->p.op != SBN_OP_BATCHNORM)
    return sbn_set_error(SBN_EINVAL, "layer: not a BatchNorm layer");
  return sbn__op_need(l, d, sh, need);
}

static int bn_check_fwd(const sbn_layer_t *l, const sbn_forward_args_t *a,
                        sbn__shape_t *sh) {
  sbn__need_t need;
  int rc = bn_check(l, a, sh, a != NULL ? a->x_desc : NULL, &need);
  return rc != 0 ? rc : sbn__check_fwd_args(&l->p, a, sh, &need);
}

static int bn_check_bwd(const sbn_layer_t *l, const sbn_backward_args_t *a,
                        sbn__shape_t *sh) {
  sbn__need_t need;
  int rc = bn_check(l, a, sh, a != NULL ? a->x_desc : NULL, &need);
  return rc != 0 ? rc : sbn__check_bwd_args(&l->p, a, sh, &need);
}

/* Local moments of this process's batch into recs[0..C). */
static void bn_local_moments(const sbn_forward_args_t *a,
                             const sbn__shape_t *sh, sbn__chan_t *ch,
                             sbn_rec_t *recs) {
  size_t A, S;
  bn_view(sh, &A, &S);
  sbn__view_moments(a->x, A, sh->C, S, ch, recs);
}

static int bn_finish(sbn_layer_t *l, const sbn_forward_args_t *a,
                     const sbn__shape_t *sh, const sbn_rec_t *recs) {
  size_t C = sh->C, A, S;
  sbn__chan_t ch;
  sbn__bn_fin_t fin;
  int rc;
  sbn__chan_carve(a->workspace, C, &ch);
  /* Eval without running statistics normalizes with the local batch's. */
  if (a->mode == SBN_MODE_EVAL && !l->p.track_running_stats) {
    bn_local_moments(a, sh, &ch, ch.rec);
    recs = ch.rec;
  }
  if ((rc = sbn__bn_fin_init(l, a, sh, recs, &fin)) != 0)
    return rc;
  sbn__bn_fin_chan(l, a, &fin, recs, 0, C, &ch);
  sbn__bn_fin_done(a, &fin);
  bn_view(sh, &A, &S);
  if (sh->numel > 0)
    sbn__kt()->normalize(a->x, a->y, A, C, S, ch.mh, ch.ml, ch.k1, ch.k2);
  return 0;
}

/* Whether a pass of l on sh may take the set's fused NCHW entries
 * (bn_fwd_nchw, bn_bwd_nchw): NCHW, nothing to reduce over other
 * processes (a layer without a communicator of more than one process),
 * single-threaded (the set's call is one thread), on a core where they
 * pay (sbn__bn_fused_nchw), and unless SBN_BN_SINGLE_PASS asks for the
 * blocked or unblocked passes, for comparison. */
static int bn_fusable(const sbn_layer_t *l, const sbn__shape_t *sh) {
  return sh->layout == SBN_LAYOUT_NCHW && sh->numel > 0 && sbn_threads() <= 1 &&
         (l->comm == NULL || l->comm->size <= 1) && sbn__bn_single_pass() < 0 &&
         sbn__bn_fused_nchw();
}

/* The fused local forward (bn_fwd_fused): what its finishing step needs. */
typedef struct bn_fuse_s {
  sbn_layer_t *l;
  const sbn_forward_args_t *a;
  sbn__bn_fin_t fin;
  sbn__chan_t ch;
  double n;
} bn_fuse_t;

/* Channels [c0, c1) of the fused forward, between their sums and their
 * normalization: their records, then what bn_finish makes of records
 * (the normalization parameters, the saved state and the running
 * statistics). */
static void bn_fuse_fin(void *arg, size_t c0, size_t c1) {
  bn_fuse_t *f = arg;
  sbn__chan_t *ch = &f->ch;
  for (size_t c = c0; c < c1; c++)
    sbn__moments_finish(f->n, ch->k[c], ch->d1[c], ch->d2[c], &ch->rec[c]);
  sbn__bn_fin_chan(f->l, f->a, &f->fin, ch->rec, c0, c1, ch);
}

/* The whole local training forward in one call of the set's bn_fwd_nchw,
 * where bn_fusable allows: each group of channels is
 * normalized right after its moments, while it is in cache
 * (sbn_kernels.h). Returns 1 having done it or failed (*rc), 0 where the
 * set declines or has no such entry. */
static int bn_fwd_fused(sbn_layer_t *l, const sbn_forward_args_t *a,
                        const sbn__shape_t *sh, int *rc) {
  const sbn__kernels_t *t = sbn__kt();
  if (t->bn_fwd_nchw == NULL || !bn_fusable(l, sh))
    return 0;
  bn_fuse_t f = {.l = l, .a = a, .n = (double)sh->N * (double)sh->S};
  sbn__chan_carve(a->workspace, sh->C, &f.ch);
  /* sbn__bn_fin_init reads only the count of the records, which every
   * record of this process's batch will hold. */
  sbn_rec_t count = {SBN_REC_MOMENTS, {f.n, 0, 0}};
  if ((*rc = sbn__bn_fin_init(l, a, sh, &count, &f.fin)) != 0)
    return 1;
  if (!t->bn_fwd_nchw(a->x, a->y, sh->N, sh->C, sh->S, f.ch.k, f.ch.d1, f.ch.d2,
                      bn_fuse_fin, &f, f.ch.mh, f.ch.ml, f.ch.k1, f.ch.k2))
    return 0;
  l->bn_last_count = f.n;
  sbn__bn_fin_done(a, &f.fin);
  return 1;
}

static int bn_forward(sbn_layer_t *l, const sbn_forward_args_t *a,
                      const sbn__shape_t *sh) {
  int rc;
  if (bn_ghost(&l->p, a->mode))
    return sbn__bn_ghost_forward(&l->p, a, sh);
  if (a->mode == SBN_MODE_EVAL)
    return bn_finish(l, a, sh, NULL);
  if (bn_fwd_fused(l, a, sh, &rc))
    return rc;
  size_t cc = sbn__bn_chunk(l, sh->C, l->bn_last_count);
  if (cc == 0)
    cc = sbn__bn_block(l, sh, 1);
  if (cc > 0)
    return sbn__bn_overlap_forward(l, a, sh, cc);
  sbn__chan_t ch;
  sbn__chan_carve(a->workspace, sh->C, &ch);
  bn_local_moments(a, sh, &ch, ch.rec);
  if ((rc = sbn_comm_allreduce(l->comm, ch.rec, sh->C)) != 0)
    return rc;
  /* Recorded only here and in the chunked forward, where the layer's own
   * communicator reduced the count, never from records a caller of the
   * seam passed in (those need not be the same on every process). */
  l->bn_last_count = ch.rec[0].v[0];
  return bn_finish(l, a, sh, ch.rec);
}

int sbn_bn_forward_local(sbn_layer_t *l, const sbn_forward_args_t *a,
                         sbn_rec_t *recs) {
  sbn__shape_t sh;
  sbn__chan_t ch;
  int rc;
  if ((rc = bn_check_fwd(l, a, &sh)) != 0)
    return rc;
  if (bn_ghost(&l->p, a->mode))
    return bn_ghost_local(l, "sbn_bn_forward_finish");
  if (recs == NULL)
    return sbn_set_error(SBN_EINVAL, "recs: NULL");
  sbn__chan_carve(a->workspace, sh.C, &ch);
  bn_local_moments(a, &sh, &ch, recs);
  return 0;
}

int sbn_bn_forward_finish(sbn_layer_t *l, const sbn_forward_args_t *a,
                          const sbn_rec_t *recs) {
  sbn__shape_t sh;
  int rc;
  if ((rc = bn_check_fwd(l, a, &sh)) != 0)
    return rc;
  /* A ghost layer does the whole (local) work here and ignores recs. */
  if (bn_ghost(&l->p, a->mode))
    return sbn__bn_ghost_forward(&l->p, a, &sh);
  if (a->mode == SBN_MODE_TRAIN && recs == NULL)
    return sbn_set_error(SBN_EINVAL, "recs: NULL in training");
  return bn_finish(l, a, &sh, recs);
}

/* Prepares per-channel (mh, ml, istd) from the saved state and computes the
 * local sums of dy and dy * xhat into recs; writes the local dweight and
 * dbias (a data-parallel trainer reduces those itself). */
static int bn_bwd_local(sbn_layer_t *l, const sbn_backward_args_t *a,
                        const sbn__shape_t *sh, sbn__chan_t *ch, double *count,
                        sbn_rec_t *recs) {
  const double *mean, *istd;
  size_t C = sh->C, A, S;
  int rc = sbn__saved_get(a->saved, a->saved_bytes, l->p.op, a->mode, C, count,
                          &mean, &istd);
  if (rc != 0)
    return rc;
  sbn__chan_carve(a->workspace, C, ch);
  for (size_t c = 0; c < C; c++) {
    ch->dmean[c] = mean[c];
    ch->distd[c] = istd[c];
    ch->d1[c] = 0;
    ch->d2[c] = 0;
  }
  bn_view(sh, &A, &S);
  if (sh->numel > 0)
    sbn__kt()->bwd_reduce(a->x, a->dy, A, C, S, ch->dmean, ch->distd, ch->d1,
                          ch->d2);
  for (size_t c = 0; c < C; c++) {
    recs[c].tag = SBN_REC_SUM;
    recs[c].v[0] = ch->d1[c];
    recs[c].v[1] = ch->d2[c];
    recs[c].v[2] = 0;
  }
  sbn__put_dwb(a, 0, C, ch->d1, ch->d2);
  return 0;
}

/* dx from the (global) sums. The carve in bn_bwd_local already holds mh,
 * ml and istd; they are rebuilt here from the saved state so that the
 * staged API does not depend on workspace contents between calls. */
static int bn_bwd_finish(sbn_layer_t *l, const sbn_backward_args_t *a,
                         const sbn__shape_t *sh, const sbn_rec_t *recs) {
  const double *mean, *istd;
  double count;
  size_t C = sh->C, A, S;
  sbn__chan_t ch;
  int rc = sbn__saved_get(a->saved, a->saved_bytes, l->p.op, a->mode, C, &count,
                          &mean, &istd);
  if (rc != 0)
    return rc;
  sbn__chan_carve(a->workspace, C, &ch);
  sbn__bn_bwd_chan(l, a, mean, istd, count, recs, 0, C, &ch);
  bn_view(sh, &A, &S);
  if (sh->numel > 0)
    sbn__kt()->bwd_apply(a->x, a->dy, a->dx, A, C, S, ch.dmean, ch.distd,
                         ch.dk1, ch.dk2, ch.dk3);
  return 0;
}

/* The whole local backward in one call of the set's bn_bwd_nchw, where
 * bn_fusable allows: each group of channels' dx follows its sums while
 * the group is in cache (sbn_kernels.h).
 * Returns 1 having done it or failed (*rc: 0, or the saved state's
 * error, as bn_bwd_local would give it), 0 where the set declines or has
 * no such entry. */
static int bn_bwd_fused(sbn_layer_t *l, const sbn_backward_args_t *a,
                        const sbn__shape_t *sh, int *rc) {
  const sbn__kernels_t *t = sbn__kt();
  if (t->bn_bwd_nchw == NULL || !bn_fusable(l, sh))
    return 0;
  const double *mean, *istd;
  double count;
  size_t C = sh->C;
  *rc = sbn__saved_get(a->saved, a->saved_bytes, l->p.op, a->mode, C, &count,
                       &mean, &istd);
  if (*rc != 0)
    return 1;
  sbn__chan_t ch;
  sbn__chan_carve(a->workspace, C, &ch);
  int stats = sbn__bn_batch_stats(&l->p, a->mode) && count > 0;
  if (!t->bn_bwd_nchw(a->x, a->dy, a->dx, sh->N, C, sh->S, mean, istd,
                      l->p.affine ? a->weight : NULL, stats, count, ch.d1,
                      ch.d2))
    return 0;
  sbn__put_dwb(a, 0, C, ch.d1, ch.d2);
  return 1;
}

static int bn_backward(sbn_layer_t *l, const sbn_backward_args_t *a,
                       const sbn__shape_t *sh) {
  sbn__chan_t ch;
  double count;
  int rc;
  if (bn_ghost(&l->p, a->mode))
    return sbn__bn_ghost_backward(&l->p, a, sh);
  if (bn_bwd_fused(l, a, sh, &rc))
    return rc;
  /* The chunk plan comes from the saved global count; a saved state that
   * does not check out fails below with its own message. */
  const double *mean, *istd;
  if (a->mode == SBN_MODE_TRAIN &&
      sbn__saved_get(a->saved, a->saved_bytes, l->p.op, a->mode, sh->C, &count,
                     &mean, &istd) == 0) {
    size_t cc = sbn__bn_chunk(l, sh->C, count);
    if (cc == 0)
      cc = sbn__bn_block(l, sh, 2);
    if (cc > 0)
      return sbn__bn_overlap_backward(l, a, sh, cc);
  }
  /* The records live in the workspace's record array; bn_bwd_finish only
   * reuses the float arrays, which it rebuilds. */
  sbn__chan_carve(a->workspace, sh->C, &ch);
  sbn_rec_t *recs = ch.rec;
  if ((rc = bn_bwd_local(l, a, sh, &ch, &count, recs)) != 0)
    return rc;
  if (a->mode == SBN_MODE_TRAIN &&
      (rc = sbn_comm_allreduce(l->comm, recs, sh->C)) != 0)
    return rc;
  return bn_bwd_finish(l, a, sh, recs);
}

int sbn_bn_backward_local(sbn_layer_t *l, const sbn_backward_args_t *a,
                          sbn_rec_t *recs) {
  sbn__shape_t sh;
  sbn__chan_t ch;
  double count;
  int rc;
  if ((rc = bn_check_bwd(l, a, &sh)) != 0)
    return rc;
  if (bn_ghost(&l->p, a->mode))
    return bn_ghost_local(l, "sbn_bn_backward_finish");
  if (recs == NULL)
    return sbn_set_error(SBN_EINVAL, "recs: NULL");
  return bn_bwd_local(l, a, &sh, &ch, &count, recs);
}

int sbn_bn_backward_finish(sbn_layer_t *l, const sbn_backward_args_t *a,
                           const sbn_rec_t *recs) {
  sbn__shape_t sh;
  int rc;
  if ((rc = bn_check_bwd(l, a, &sh)) != 0)
    return rc;
  /* Eval never reduces, nor does a ghost layer: the whole backward is
   * local. */
  if (a->mode == SBN_MODE_EVAL || bn_ghost(&l->p, a->mode))
    return bn_backward(l, a, &sh);
  if (recs == NULL)
    return sbn_set_error(SBN_EINVAL, "recs: NULL");
  return bn_bwd_finish(l, a, &sh, recs);
}

const sbn__op_t sbn__op_batchnorm = {
    .name = "batchnorm",
    .flags =
        SBN__NEED_AFFINE | SBN__NEED_RUNNING | SBN__NEED_BWD_X | SBN__CAN_GHOST,
    .defaults = bn_defaults,
    .validate = bn_validate,
    .shape = sbn__op_shape_channels,
    .sizes = bn_sizes,
    .forward = bn_forward,
    .backward = bn_backward,
};
