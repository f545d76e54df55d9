/* The step commands: forward and backward (local, or a syncbatchnorm
 * training step deferred to the agreement), and stats / stats_backward
 * (the reduction of a client's own per-channel statistics). Each deferred
 * one queues a pending entry whose done callback, here, completes it. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "svc_worker_int.h"

/* Directions of this file's cross-rank entries: part of their key. */
enum {
  SVC__DIR_FORWARD = 0,
  SVC__DIR_BACKWARD = 1,
  SVC__DIR_STATS = 2,
  SVC__DIR_STATS_BACKWARD = 3
};

/* Whether a cross-rank request on l may go on: the transport is there and
 * its (layer, step, direction) did not stall before in this rank's group.
 * Fails before anything is allocated. */
static int svc__sync_check(svc_worker_t *w, const svc__layer_t *l,
                           uint64_t step, uint32_t dir, const char *op) {
  uint32_t g = svc__gsize(w, l);
  int why;
  if (!w->sync_on)
    return svc_set_error(SVC_NOT_YET,
                         "%s: syncbatchnorm in training needs the cross-rank "
                         "reduction, which this worker does not serve (eval "
                         "works)",
                         op);
  why = svc__poisoned(w, svc__hash_name(l->name), step, dir,
                      (uint32_t)w->cfg.rank / g);
  if (why == SVC_LAYER_MISMATCH)
    return svc_set_error(SVC_LAYER_MISMATCH,
                         "step: layer '%s' step %llu %s: the ranks registered "
                         "this layer with different parameters (kind, "
                         "channels, eps, momentum, affine or group size)",
                         l->name, (unsigned long long)step, op);
  if (why != 0)
    return svc_set_error(SVC_STALL,
                         "step: layer '%s' step %llu %s stalled earlier and "
                         "is poisoned",
                         l->name, (unsigned long long)step, op);
  return 0;
}

/* Whether a syncbatchnorm layer reduces in training: not with ghost
 * batches, which replace the reduction (sbn_bn_needs_reduce). */
static int svc__reduces(const svc__layer_t *l) {
  return l->params.ghost_batch == 0;
}

/* A layer's cross-rank entry: its channels' records, its fingerprint, its
 * sync group, and `what` naming layer, step and op. A ghost-batch layer's
 * entry has no records: it still goes through the agreement, so that its
 * ranks stay in step and a layer registered with another ghost_batch is
 * LAYER_MISMATCH, but it adds nothing to the allreduce. */
static svc__pend_t *svc__pend_layer(svc_worker_t *w, svc__layer_t *l,
                                    uint64_t step, uint32_t dir, uint32_t tag,
                                    const char *op) {
  svc__pend_t *p =
      svc__pend_alloc(w, svc__hash_name(l->name), step, dir,
                      svc__reduces(l) ? l->params.channels : 0, tag);
  if (p == NULL)
    return NULL;
  p->fp = svc__fingerprint(l);
  p->l = l;
  p->gsize = svc__gsize(w, l);
  p->grp = (uint32_t)w->cfg.rank / p->gsize;
  snprintf(p->what, sizeof p->what, "layer '%s' step %llu %s", l->name,
           (unsigned long long)step, op);
  return p;
}

static int svc__check_wb(const svc__layer_t *l, const svc_tensor_t *t,
                         const char *what) {
  if (!t->present)
    return 0;
  if (l->wb_numel == 0)
    return svc_set_error(SVC_SHAPE, "%s: layer '%s' has no affine parameters",
                         what, l->name);
  /* Only the count matters: the parameters are a flat array in the
   * library, and a client need not know LayerNorm's shape to send them. */
  if (t->numel != l->wb_numel)
    return svc_set_error(SVC_SHAPE,
                         "%s: %zu elements, the layer has %zu parameters", what,
                         t->numel, l->wb_numel);
  return 0;
}

/* ------------------------------------------------------------------ */
/* forward */

/* What a forward may be refused for before anything is allocated. */
static int svc__forward_check(svc_worker_t *w, const svc__layer_t *l,
                              const svc_request_t *q, int sync) {
  int rc;
  if (sync &&
      (rc = svc__sync_check(w, l, q->step, SVC__DIR_FORWARD, "forward")) != 0)
    return rc;
  if (q->train) {
    if (l->have_step && svc__step_stale(w, q->step, l->max_step))
      return svc_set_error(
          SVC_STALE_STEP,
          "step: %llu is more than keep_steps=%u behind step %llu",
          (unsigned long long)q->step, w->cfg.keep_steps,
          (unsigned long long)l->max_step);
    if (svc__find_step((svc__layer_t *)l, q->step) != NULL)
      return svc_set_error(SVC_DUPLICATE_STEP,
                           "step: layer %llu step %llu was already submitted",
                           (unsigned long long)q->layer,
                           (unsigned long long)q->step);
  }
  if ((rc = svc__check_wb(l, &q->weight, "weight")) != 0)
    return rc;
  return svc__check_wb(l, &q->bias, "bias");
}

/* A training forward's kept step, its whole size counted against the
 * budget before anything is allocated for it. */
static int svc__step_new(svc_worker_t *w, const svc__layer_t *l,
                         const svc_request_t *q, size_t sv_bytes,
                         svc__step_t **out) {
  uint64_t bytes =
      (uint64_t)sv_bytes + 2 * (uint64_t)l->wb_numel * sizeof(float);
  svc__step_t *s;
  int rc;
  *out = NULL;
  if (l->params.op != SBN_OP_DROPOUT)
    bytes += (uint64_t)q->x.numel * sizeof(float);
  if ((rc = svc__budget_take(w, bytes)) != 0)
    return rc;
  if ((s = calloc(1, sizeof *s)) == NULL) {
    w->saved_bytes -= bytes;
    return svc_set_error(SVC_RESOURCE, "forward: out of memory");
  }
  s->bytes = bytes;
  *out = s;
  if (sv_bytes > 0 && (s->saved = malloc(sv_bytes)) == NULL)
    return svc_set_error(SVC_RESOURCE, "forward: out of memory");
  s->saved_bytes = sv_bytes;
  return 0;
}

/* The step takes over the request's input and this step's weight (the
 * request's tensors are already aligned private copies: no second copy),
 * or copies the layer's weight. */
static int svc__step_take(const svc_worker_t *w, const svc__layer_t *l,
                          svc__step_t *s, svc_request_t *q) {
  s->step = q->step;
  s->desc = q->x.desc;
  s->numel = q->x.numel;
  if (l->params.op != SBN_OP_DROPOUT) {
    if (q->x.borrowed) /* x_stays: x is read in place in its region */
      svc__shm_keep(w, s, q);
    s->x = q->x.data;
    q->x.data = NULL;
    q->x.borrowed = 0;
  }
  if (l->wb_numel == 0)
    return 0;
  if (q->weight.present) {
    s->w = q->weight.data;
    q->weight.data = NULL;
  } else if ((s->w = svc__floats(l->wb_numel)) != NULL) {
    memcpy(s->w, l->weight, l->wb_numel * sizeof(float));
  }
  if (s->w == NULL)
    return svc_set_error(SVC_RESOURCE, "forward: out of memory");
  return 0;
}

static void svc__fargs(const svc__layer_t *l, svc__step_t *s,
                       const svc__pend_t *p, sbn_forward_args_t *a) {
  memset(a, 0, sizeof *a);
  a->mode = SBN_MODE_TRAIN;
  a->x_desc = &s->desc;
  a->x = s->x;
  a->y = p->y;
  a->weight = s->w != NULL ? s->w : l->weight;
  a->bias = p->q.bias.present ? p->q.bias.data : l->bias;
  a->state = l->tracking ? (sbn_state_t *)&l->state : NULL;
  a->step = s->step;
  a->workspace = p->ws;
  a->workspace_bytes = p->ws_bytes;
  a->saved = s->saved;
  a->saved_bytes = s->saved_bytes;
}

/* Completes a syncbatchnorm forward from the job's records; without them
 * the step never ran here, so its kept state goes, but it stays marked as
 * used, as on the ranks where it stalled: a resend is DUPLICATE_STEP and
 * the layer goes on at the next step everywhere alike. */
static void svc__forward_done(svc_worker_t *w, svc__pend_t *p,
                              const sbn_rec_t *recs) {
  svc__layer_t *l = p->l;
  svc__step_t *s = p->s;
  sbn_forward_args_t a;
  svc_frame_t f;
  int rc;
  s->busy = 0;
  if (recs == NULL || s->x_lost) {
    s->done = 1;
    svc__step_release(w, s);
    return;
  }
  svc__fargs(l, s, p, &a);
  if (p->token != NULL) /* the connection, and so its mapping, is there */
    a.y = svc__out_ptr(&p->q.out, a.y);
  rc = sbn_bn_forward_finish(l->layer, &a, recs);
  memset(&f, 0, sizeof f);
  if (rc == 0)
    rc = svc__encode_y(w, &p->q.id, p->token != NULL ? &p->q.out : NULL,
                       &s->desc, a.y, &p->y, s->numel, &f);
  else
    svc_encode_error(&p->q.id, svc__lib_code(rc), sbn_last_error(), &f.buf,
                     &f.len);
  if (rc != 0) {
    /* A forward that failed has no backward: its step is used up. */
    s->done = 1;
    svc__step_release(w, s);
  }
  svc__pend_deliver_frame(w, p, &f);
  svc__prune(w, l);
}

/* A syncbatchnorm training forward: the local records now, the rest once
 * every rank has sent its own. The step is kept (busy) from here so that
 * repeats are refused. On success the entry owns y and ws. */
static int svc__forward_sync(svc__call_t *call, svc__layer_t *l, svc__step_t *s,
                             const sbn_forward_args_t *a) {
  svc_worker_t *w = call->w;
  svc_request_t *q = call->q;
  svc__pend_t *p = svc__pend_layer(w, l, q->step, SVC__DIR_FORWARD,
                                   SBN_REC_MOMENTS, "forward");
  int rc;
  if (p == NULL)
    return svc_set_error(SVC_RESOURCE, "forward: out of memory");
  /* A ghost layer has no records; its forward_finish does the whole work
   * once the ranks agree. */
  if (svc__reduces(l) &&
      (rc = sbn_bn_forward_local(l->layer, a, p->recs)) != 0) {
    svc__pend_free(p);
    return svc__lib_error(rc);
  }
  if ((rc = svc__step_take(w, l, s, q)) != 0) {
    svc__pend_free(p);
    return rc;
  }
  p->q.id = q->id;
  p->q.out = q->out; /* written at delivery while the connection lives */
  p->q.bias = q->bias;
  q->bias.data = NULL; /* the entry owns it now */
  p->y = a->y;
  p->ws = a->workspace;
  p->ws_bytes = a->workspace_bytes;
  p->s = s;
  p->done = svc__forward_done;
  s->busy = 1;
  svc__step_keep(w, l, s);
  svc__pend_queue(call, p);
  return 0;
}

int svc__cmd_forward(svc__call_t *call) {
  svc_worker_t *w = call->w;
  svc_request_t *q = call->q;
  svc__step_t *s = NULL;
  sbn_forward_args_t a;
  size_t ws_bytes = 0, sv_bytes = 0;
  void *ws = NULL;
  float *y = NULL;
  int rc, sync, in_place;
  svc__layer_t *l = svc__layer(w, q->layer, &rc);
  if (l == NULL)
    return rc;
  sync = q->train && l->kind == SVC_KIND_SYNCBATCHNORM;
  /* y goes into x's own buffer when nothing needs x afterwards (no kept
   * training step takes it: eval, or dropout, whose backward needs only
   * its mask) and y is not written straight into a region. */
  in_place = !sync && q->x.data != NULL && !q->x.borrowed &&
             (!q->train || l->params.op == SBN_OP_DROPOUT) &&
             svc__out_ptr(&q->out, NULL) == NULL;
  if ((rc = svc__forward_check(w, l, q, sync)) != 0)
    return rc;
  if ((rc = sbn_layer_sizes(l->layer, &q->x.desc, &ws_bytes, &sv_bytes)) != 0)
    return svc__lib_error(rc);
  if (q->train && (rc = svc__step_new(w, l, q, sv_bytes, &s)) != 0)
    goto fail;
  if (in_place) {
    y = q->x.data; /* y owns x's buffer now */
    q->x.data = NULL;
    w->m.in_place++;
  }
  if ((ws_bytes > 0 && (ws = malloc(ws_bytes)) == NULL) ||
      (!in_place && q->x.numel > 0 && (y = svc__floats(q->x.numel)) == NULL)) {
    rc = svc_set_error(SVC_RESOURCE, "forward: out of memory");
    goto fail;
  }
  memset(&a, 0, sizeof a);
  a.mode = q->train ? SBN_MODE_TRAIN : SBN_MODE_EVAL;
  a.x_desc = &q->x.desc;
  a.x = in_place ? y : q->x.data;
  a.y = sync ? y : svc__out_ptr(&q->out, y);
  a.weight = q->weight.present ? q->weight.data : l->weight;
  a.bias = q->bias.present ? q->bias.data : l->bias;
  a.state = l->tracking ? &l->state : NULL;
  a.step = q->step;
  a.workspace = ws;
  a.workspace_bytes = ws_bytes;
  a.saved = s != NULL ? s->saved : NULL;
  a.saved_bytes = s != NULL ? s->saved_bytes : 0;
  if (sync) {
    if ((rc = svc__forward_sync(call, l, s, &a)) != 0)
      goto fail;
    return 0;
  }
  if ((rc = sbn_forward(l->layer, &a)) != 0) {
    rc = svc__lib_error(rc);
    goto fail;
  }
  if (svc__encode_y(w, &q->id, &q->out, &q->x.desc, a.y, &y, q->x.numel,
                    &call->out) != 0) {
    rc = svc_set_error(SVC_RESOURCE, "forward: out of memory");
    goto fail;
  }
  if (s != NULL) {
    if ((rc = svc__step_take(w, l, s, q)) != 0) {
      /* The reply is built but backward could not run: refuse the step
       * rather than answer a forward whose backward must fail. */
      svc_frame_free(&call->out);
      goto fail;
    }
    svc__step_keep(w, l, s);
  }
  free(ws);
  free(y);
  return 0;
fail:
  if (s != NULL) {
    svc__step_release(w, s);
    free(s);
  }
  free(ws);
  free(y);
  return rc;
}

/* ------------------------------------------------------------------ */
/* backward */

static void svc__bargs(svc__step_t *s, const svc__pend_t *p,
                       sbn_backward_args_t *a) {
  memset(a, 0, sizeof *a);
  a->mode = SBN_MODE_TRAIN;
  a->x_desc = &s->desc;
  a->x = s->x;
  a->dy = p->q.x.data;
  /* Without a buffer of its own, dx goes into dy's (the kernels allow
   * dx == dy). */
  a->dx = p->dx != NULL ? p->dx : p->q.x.data;
  a->weight = s->w;
  a->dweight = p->dw;
  a->dbias = p->db;
  a->step = s->step;
  a->workspace = p->ws;
  a->workspace_bytes = p->ws_bytes;
  a->saved = s->saved;
  a->saved_bytes = s->saved_bytes;
}

/* The variable that owns dx's buffer: its own, or dy's. */
static float **svc__dx_owner(svc__pend_t *p) {
  return p->dx != NULL ? &p->dx : &p->q.x.data;
}

/* Completes a syncbatchnorm backward from the job's records; without
 * them the forward state stays for another try. */
static void svc__backward_done(svc_worker_t *w, svc__pend_t *p,
                               const sbn_rec_t *recs) {
  svc__layer_t *l = p->l;
  svc__step_t *s = p->s;
  sbn_backward_args_t a;
  svc_frame_t f;
  int rc;
  s->busy = 0;
  /* A dy read in place is gone with its connection's mapping. */
  if (recs == NULL || (p->q.x.borrowed && p->token == NULL))
    return;
  svc__bargs(s, p, &a);
  if (p->token != NULL)
    a.dx = svc__out_ptr(&p->q.out, a.dx);
  memset(&f, 0, sizeof f);
  if (s->x_lost) {
    /* A kept x (x_stays) whose region closed and could not be copied. */
    svc__shm_kept_check(w, s, &p->q);
    svc_encode_error(&p->q.id, SVC_NO_FORWARD, svc_last_error(), &f.buf,
                     &f.len);
    svc__pend_deliver_frame(w, p, &f);
    return;
  }
  rc = sbn_bn_backward_finish(l->layer, &a, recs);
  if (rc == 0)
    rc = svc__encode_dx(w, &p->q.id, p->token != NULL ? &p->q.out : NULL,
                        &s->desc, a.dx, svc__dx_owner(p), s->numel, p->dw,
                        p->db, &l->wb_desc, l->wb_numel, &f);
  else
    svc_encode_error(&p->q.id, svc__lib_code(rc), sbn_last_error(), &f.buf,
                     &f.len);
  if (rc == 0) {
    s->done = 1;
    svc__step_release(w, s);
  }
  svc__pend_deliver_frame(w, p, &f);
  svc__prune(w, l);
}

/* The kept forward a backward needs, or why there is none. */
static int svc__backward_step(svc__layer_t *l, const svc_request_t *q,
                              svc__step_t **out) {
  svc__step_t *s = svc__find_step(l, q->step);
  *out = s;
  if (s == NULL || s->done || s->busy)
    return svc_set_error(SVC_NO_FORWARD, "step: layer %llu step %llu %s",
                         (unsigned long long)q->layer,
                         (unsigned long long)q->step,
                         s == NULL ? "has no kept training forward"
                         : s->busy ? "is still waiting for the other ranks "
                                     "(its forward or backward has not been "
                                     "answered)"
                                   : "had its backward already");
  if (q->x.desc.ndim != s->desc.ndim || q->x.desc.layout != s->desc.layout ||
      memcmp(q->x.desc.dims, s->desc.dims,
             (size_t)s->desc.ndim * sizeof *s->desc.dims) != 0)
    return svc_set_error(SVC_SHAPE,
                         "dy: shape or layout differs from the forward's x");
  return 0;
}

int svc__cmd_backward(svc__call_t *call) {
  svc_worker_t *w = call->w;
  svc_request_t *q = call->q;
  svc__step_t *s;
  svc__pend_t *p = NULL;
  sbn_backward_args_t a;
  int rc, sync;
  svc__layer_t *l = svc__layer(w, q->layer, &rc);
  if (l == NULL)
    return rc;
  sync = l->kind == SVC_KIND_SYNCBATCHNORM;
  if (sync &&
      (rc = svc__sync_check(w, l, q->step, SVC__DIR_BACKWARD, "backward")) != 0)
    return rc;
  if ((rc = svc__backward_step(l, q, &s)) != 0 ||
      (rc = svc__shm_kept_check(w, s, q)) != 0)
    return rc;
  /* The buffers live in a pending entry either way: a deferred backward
   * keeps it, a local one frees it after its reply. */
  p = svc__pend_layer(w, l, q->step, SVC__DIR_BACKWARD, SBN_REC_SUM,
                      "backward");
  if (p == NULL)
    return svc_set_error(SVC_RESOURCE, "backward: out of memory");
  if ((rc = sbn_layer_sizes(l->layer, &s->desc, &p->ws_bytes, NULL)) != 0) {
    rc = svc__lib_error(rc);
    goto fail;
  }
  /* dx is written into dy's buffer (p->dx stays NULL, see svc__bargs):
   * the request owns it and nothing reads dy after the kernel; not into
   * the client's dy in its region, though (borrowed). */
  if ((p->ws_bytes > 0 && (p->ws = malloc(p->ws_bytes)) == NULL) ||
      (q->x.borrowed && (p->dx = svc__floats(s->numel)) == NULL) ||
      (l->wb_numel > 0 && ((p->dw = svc__floats(l->wb_numel)) == NULL ||
                           (p->db = svc__floats(l->wb_numel)) == NULL))) {
    rc = svc_set_error(SVC_RESOURCE, "backward: out of memory");
    goto fail;
  }
  p->q.id = q->id;
  p->q.out = q->out;
  p->q.x = q->x;
  q->x.data = NULL; /* dy belongs to the entry now */
  p->s = s;
  svc__bargs(s, p, &a);
  if (s->numel > 0 && !q->x.borrowed && svc__out_ptr(&q->out, NULL) == NULL)
    w->m.in_place++;
  if (sync) {
    if (svc__reduces(l) &&
        (rc = sbn_bn_backward_local(l->layer, &a, p->recs)) != 0) {
      rc = svc__lib_error(rc);
      goto fail;
    }
    p->done = svc__backward_done;
    s->busy = 1;
    svc__pend_queue(call, p);
    return 0;
  }
  a.dx = svc__out_ptr(&q->out, a.dx);
  if ((rc = sbn_backward(l->layer, &a)) != 0) {
    rc = svc__lib_error(rc);
    goto fail;
  }
  if (svc__encode_dx(w, &q->id, &q->out, &s->desc, a.dx, svc__dx_owner(p),
                     s->numel, p->dw, p->db, &l->wb_desc, l->wb_numel,
                     &call->out) != 0) {
    rc = svc_set_error(SVC_RESOURCE, "backward: out of memory");
    goto fail;
  }
  s->done = 1;
  svc__step_release(w, s);
  svc__pend_free(p);
  return 0;
fail:
  svc__pend_free(p);
  return rc;
}

/* ------------------------------------------------------------------ */
/* stats and stats_backward: the reduction of a client's own per-channel
 * statistics (a client that computes its batch locally, e.g. on a GPU).
 * stats carries (count, mean, M2) per channel, reduced with the same
 * merge as a forward's records; stats_backward carries (sum dy,
 * sum dy * xhat), summed as a backward's. */

/* The request's vectors: one value per channel (their values are checked
 * as they fill the entry's records, sbn_rec_fill). */
static int svc__stats_shape(const svc__layer_t *l, const svc_request_t *q,
                            int fwd) {
  size_t C = l->params.channels;
  if (fwd && !(q->count.scalar || q->count.n == C))
    return svc_set_error(SVC_SHAPE, "count: %zu values for %zu channels",
                         q->count.n, C);
  if (q->mean.n != C || q->m2.n != C)
    return svc_set_error(SVC_SHAPE, "%s: %zu values for %zu channels",
                         q->mean.n != C ? (fwd ? "mean" : "sum_dy")
                                        : (fwd ? "m2" : "sum_dy_xhat"),
                         q->mean.n != C ? q->mean.n : q->m2.n, C);
  return 0;
}

/* Completes a stats entry from the reduced records: the reply carries the
 * vectors the request did not leave out (all five unless it sent `want`),
 * computed only for it, and the running statistics move. */
static void svc__stats_done(svc_worker_t *w, svc__pend_t *p,
                            const sbn_rec_t *recs) {
  svc__layer_t *l = p->l;
  size_t C = l->params.channels;
  unsigned want = SVC_STATS_ALL & ~p->q.skip;
  uint32_t nv = 0;
  double *out = NULL;
  uint8_t *buf = NULL;
  size_t len = 0;
  svc_reply_t r;
  int small = 0, any = 0;
  if (recs == NULL)
    return;
  for (size_t c = 0; c < C; c++) {
    small |= recs[c].v[0] == 1;
    any |= recs[c].v[0] > 0;
  }
  if (small) {
    /* Every rank of the group reduced the same counts, so they all refuse
     * together, as a forward would. */
    svc__pend_reply_error(w, p, SVC_SMALL_BATCH,
                          "count: expected more than 1 value per channel in "
                          "the global batch (a channel has 1)");
    return;
  }
  if ((out = malloc((C > 0 ? C : 1) * sizeof *out)) == NULL) {
    svc__pend_reply_error(w, p, SVC_RESOURCE, "stats: out of memory");
    return;
  }
  for (int i = 0; i < SVC_STATS_OUTS; i++)
    nv += (want >> i) & 1u;
  svc_reply_begin(&r, &p->q.id, nv, nv * C * sizeof(double));
  for (int i = 0; i < SVC_STATS_OUTS; i++) {
    if (!(want & (1u << i)))
      continue;
    /* The reply's vectors are in sbn_stat_t's order (svc_stats_out_name). */
    sbn_rec_stat(recs, C, (sbn_stat_t)i, l->params.eps, out);
    svc_reply_key(&r, svc_stats_out_name(i));
    r.rc |= svc_pack_vec64(r.pk, out, C);
  }
  free(out);
  if (svc_reply_end(&r, &buf, &len) != 0)
    svc__pend_reply_error(w, p, SVC_RESOURCE, "stats: out of memory");
  else
    svc__pend_deliver(w, p, buf, len);
  /* The running statistics move after the reply is on its way (the
   * client waits for it, not for them); the next request of any client
   * runs after this and sees them moved. */
  if (l->tracking && any) {
    double f = l->params.momentum;
    if (l->params.cumulative)
      f = 1.0 / ((double)l->state.num_batches_tracked + 1.0);
    sbn_rec_track(recs, C, f, l->running_mean, l->running_var);
    l->state.num_batches_tracked++;
  }
}

static void svc__stats_backward_done(svc_worker_t *w, svc__pend_t *p,
                                     const sbn_rec_t *recs) {
  size_t C = p->l->params.channels;
  double *out;
  uint8_t *buf = NULL;
  size_t len = 0;
  svc_reply_t r;
  if (recs == NULL)
    return;
  if ((out = malloc((2 * C + 1) * sizeof *out)) == NULL) {
    svc__pend_reply_error(w, p, SVC_RESOURCE, "stats_backward: out of memory");
    return;
  }
  for (size_t c = 0; c < C; c++) {
    out[c] = recs[c].v[0];
    out[C + c] = recs[c].v[1];
  }
  svc_reply_begin(&r, &p->q.id, 2, 2 * C * sizeof(double));
  svc_reply_key(&r, "sum_dy");
  r.rc |= svc_pack_vec64(r.pk, out, C);
  svc_reply_key(&r, "sum_dy_xhat");
  r.rc |= svc_pack_vec64(r.pk, out + C, C);
  free(out);
  if (svc_reply_end(&r, &buf, &len) != 0) {
    svc__pend_reply_error(w, p, SVC_RESOURCE, "stats_backward: out of memory");
    return;
  }
  svc__pend_deliver(w, p, buf, len);
}

int svc__cmd_stats(svc__call_t *call) {
  svc_worker_t *w = call->w;
  const svc_request_t *q = call->q;
  int fwd = q->op == SVC_OP_STATS, rc;
  uint32_t dir = fwd ? SVC__DIR_STATS : SVC__DIR_STATS_BACKWARD;
  const char *op = fwd ? "stats" : "stats_backward";
  svc__layer_t *l = svc__layer(w, q->layer, &rc);
  svc__pend_t *p;
  size_t C, first;
  if (l == NULL)
    return rc;
  C = l->params.channels;
  if (l->kind != SVC_KIND_SYNCBATCHNORM)
    return svc_set_error(SVC_SHAPE,
                         "layer: %s needs a syncbatchnorm layer, '%s' is %s",
                         op, l->name, svc_kind_name(l->kind));
  if (!svc__reduces(l))
    return svc_set_error(SVC_BAD_PARAMS,
                         "layer: '%s' has ghost_batch %zu: its statistics "
                         "are per sub-batch and never reduced, so %s does "
                         "not apply",
                         l->name, l->params.ghost_batch, op);
  if ((rc = svc__stats_shape(l, q, fwd)) != 0)
    return rc;
  p = svc__pend_layer(w, l, q->step, dir, fwd ? SBN_REC_MOMENTS : SBN_REC_SUM,
                      op);
  if (p == NULL)
    return svc_set_error(SVC_RESOURCE, "%s: out of memory", op);
  /* The records are filled and checked in one pass; a refused value is
   * reported before the cross-rank checks, as when it was checked first. */
  first = sbn_rec_fill(p->recs, C, fwd ? q->count.v : NULL,
                       q->count.scalar ? 0 : 1, q->mean.v, q->m2.v);
  if (first < C)
    rc = svc_set_error(SVC_BAD_PARAMS,
                       "%s: channel %zu is not finite, negative, or "
                       "nonzero with a zero count",
                       fwd ? "count/mean/m2" : "sum_dy/sum_dy_xhat", first);
  else if ((rc = svc__sync_check(w, l, q->step, dir, op)) == 0 &&
           svc__pend_queued(w, p->name, q->step, dir))
    rc = svc_set_error(SVC_DUPLICATE_STEP,
                       "step: layer '%s' step %llu %s is already waiting",
                       l->name, (unsigned long long)q->step, op);
  if (rc != 0) {
    svc__pend_free(p);
    return rc;
  }
  p->q.id = q->id;
  p->q.skip = q->skip;
  p->done = fwd ? svc__stats_done : svc__stats_backward_done;
  svc__pend_queue(call, p);
  return 0;
}
