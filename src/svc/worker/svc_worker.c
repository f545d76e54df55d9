/* The syncbnd worker: layer registry, running state and the local ops
 * (see svc_worker.h). */
#include "svc_worker.h"

#include "svc_worker_int.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Monotonic seconds, for the allreduce latencies of the metrics. */
static double svc__clock(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

void svc_worker_config_default(svc_worker_config_t *cfg) {
  memset(cfg, 0, sizeof *cfg);
  cfg->rank = 0;
  cfg->size = 1;
  cfg->keep_steps = 2;
  cfg->max_layers = 1024;
  cfg->max_saved = (uint64_t)4 << 30;
  svc_limits_default(&cfg->limits);
  cfg->max_clients = 64;
  cfg->max_output = (uint64_t)512 << 20;
  cfg->idle_timeout = 300;
  cfg->frame_timeout = 60;
}

int svc_worker_create(const svc_worker_config_t *cfg, svc_worker_t **out) {
  svc_worker_t *w = NULL;
  *out = NULL;
  if (cfg->max_layers == 0 || cfg->rank < 0)
    return -1;
  w = calloc(1, sizeof *w);
  if (w == NULL)
    goto fail;
  w->cfg = *cfg;
  w->comm.base.vt = &svc__comm_vt;
  w->comm.base.rank = 0;
  w->comm.base.size = 1;
  w->comm.base.world_rank = cfg->rank;
  w->layers = calloc(cfg->max_layers, sizeof *w->layers);
  if (w->layers == NULL)
    goto fail;
  *out = w;
  return 0;
fail:
  if (w != NULL)
    free(w->layers);
  free(w);
  return -1;
}

static void svc__step_release(svc_worker_t *w, svc__step_t *s) {
  free(s->x);
  free(s->w);
  free(s->b);
  free(s->saved);
  s->x = s->w = s->b = NULL;
  s->saved = NULL;
  w->saved_bytes -= s->bytes;
  s->bytes = 0;
}

static void svc__layer_free(svc_worker_t *w, svc__layer_t *l) {
  svc__step_t *s, *next;
  if (l == NULL)
    return;
  for (s = l->steps; s != NULL; s = next) {
    next = s->next;
    svc__step_release(w, s);
    free(s);
  }
  sbn_layer_destroy(l->layer);
  free(l->weight);
  free(l->bias);
  free(l->running_mean);
  free(l->running_var);
  free(l);
}

void svc_worker_destroy(svc_worker_t *w) {
  if (w == NULL)
    return;
  while (w->pend != NULL) {
    svc__pend_t *p = w->pend;
    w->pend = p->next;
    if (p->batch != NULL)
      p->batch->token = NULL;
    svc__pend_deliver(w, p, NULL, 0);
    svc__pend_free(p);
  }
  free(w->grecv);
  free(w->rlist);
  free(w->roff);
  free(w->rbuf);
  for (uint32_t i = 0; i < w->nlayers; i++)
    svc__layer_free(w, w->layers[i]);
  free(w->layers);
  free(w);
}

uint64_t svc_worker_saved_bytes(const svc_worker_t *w) {
  return w->saved_bytes;
}

/* Library failures as protocol codes: anything about the data's shape is
 * the client's; memory is a resource; the rest is ours. */
svc_code_t svc__lib_code(int rc) {
  switch (rc) {
    case SBN_ESHAPE:
    case SBN_EINVAL:
    case SBN_EOVERFLOW:
      return SVC_SHAPE;
    case SBN_ESMALLBATCH:
      return SVC_SMALL_BATCH;
    case SBN_ENOMEM:
      return SVC_RESOURCE;
    default:
      return SVC_INTERNAL;
  }
}

float *svc__floats(size_t n) {
  size_t bytes = n * sizeof(float);
  if (n == 0)
    return NULL;
  return aligned_alloc(64, (bytes + 63) & ~(size_t)63);
}

int svc__lib_params_equal(const sbn_layer_params_t *a,
                          const sbn_layer_params_t *b) {
  if (a->op != b->op || a->channels != b->channels || a->groups != b->groups ||
      a->norm_ndim != b->norm_ndim || a->eps != b->eps ||
      a->momentum != b->momentum || a->cumulative != b->cumulative ||
      a->affine != b->affine ||
      a->track_running_stats != b->track_running_stats || a->p != b->p ||
      a->seed != b->seed)
    return 0;
  for (int i = 0; i < a->norm_ndim; i++)
    if (a->norm_shape[i] != b->norm_shape[i])
      return 0;
  return 1;
}

static int svc__params_equal(const svc__layer_t *l, const svc_register_t *r) {
  return l->kind == r->kind && l->group_size == r->group_size &&
         svc__lib_params_equal(&l->params, &r->params);
}

/* ------------------------------------------------------------------ */
/* Ops. Each returns 0 with *reply set, or -1 with err set. */

static int svc__hello(svc_worker_t *w, const svc_request_t *q, uint8_t **reply,
                      size_t *reply_len, svc_err_t *err) {
  svc_hello_reply_t h;
  /* Version 2 only adds to version 1, so a version 1 client is served. */
  if (q->version < 1 || q->version > SVC_PROTOCOL_VERSION)
    return svc_fail(err, SVC_UNSUPPORTED_VERSION,
                    "version: %llu requested, this worker speaks 1 to %d",
                    (unsigned long long)q->version, SVC_PROTOCOL_VERSION);
  memset(&h, 0, sizeof h);
  h.rank = w->cfg.rank;
  h.size = w->cfg.size;
  h.max_frame = w->cfg.limits.max_frame;
  h.max_depth = w->cfg.limits.max_depth;
  h.max_objects = w->cfg.limits.max_objects;
  h.max_clients = w->cfg.max_clients;
  h.max_output = w->cfg.max_output;
  h.idle_timeout = w->cfg.idle_timeout;
  h.frame_timeout = w->cfg.frame_timeout;
  h.keep_steps = w->cfg.keep_steps;
  if (svc_encode_hello(&q->id, &h, reply, reply_len) != 0)
    return svc_fail(err, SVC_RESOURCE, "reply: out of memory");
  return 0;
}

static int svc__register(svc_worker_t *w, const svc_request_t *q,
                         uint8_t **reply, size_t *reply_len, svc_err_t *err) {
  const svc_register_t *r = &q->reg;
  svc__layer_t *l = NULL;
  size_t C = 0;
  int rc;
  for (uint32_t i = 0; i < w->nlayers; i++) {
    if (strcmp(w->layers[i]->name, r->name) != 0)
      continue;
    if (!svc__params_equal(w->layers[i], r))
      return svc_fail(err, SVC_LAYER_MISMATCH,
                      "name: layer '%s' is registered with different "
                      "parameters",
                      r->name);
    if (svc_encode_register(&q->id, i, 0, reply, reply_len) != 0)
      return svc_fail(err, SVC_RESOURCE, "reply: out of memory");
    return 0;
  }
  if (r->kind == SVC_KIND_SYNCBATCHNORM &&
      r->group_size > (uint64_t)w->cfg.size)
    return svc_fail(err, SVC_BAD_PARAMS,
                    "group_size: %llu exceeds the job's %d ranks",
                    (unsigned long long)r->group_size, w->cfg.size);
  if (w->nlayers >= w->cfg.max_layers)
    return svc_fail(err, SVC_RESOURCE, "register: the worker holds %u layers",
                    w->cfg.max_layers);
  l = calloc(1, sizeof *l);
  if (l == NULL)
    goto oom;
  memcpy(l->name, r->name, sizeof l->name);
  l->kind = r->kind;
  l->group_size = r->group_size;
  l->params = r->params;
  l->params.layer_id = w->nlayers;
  if ((rc = sbn_layer_create(&l->params, &w->comm.base, &l->layer)) != 0) {
    svc_fail(err, rc == SBN_ENOMEM ? SVC_RESOURCE : SVC_BAD_PARAMS, "%s",
             sbn_last_error());
    goto fail;
  }
  /* Affine parameters start as PyTorch's (ones and zeros); a forward may
   * pass its own. Running statistics start at mean 0, variance 1. */
  if (l->params.op == SBN_OP_LAYERNORM) {
    l->wb_desc.ndim = l->params.norm_ndim;
    l->wb_numel = 1;
    for (int i = 0; i < l->params.norm_ndim; i++) {
      l->wb_desc.dims[i] = l->params.norm_shape[i];
      l->wb_numel *= l->params.norm_shape[i];
    }
  } else if (l->params.op != SBN_OP_DROPOUT) {
    C = l->params.channels;
    l->wb_desc.ndim = 1;
    l->wb_desc.dims[0] = C;
    l->wb_numel = C;
  }
  if (l->params.op == SBN_OP_DROPOUT || !l->params.affine)
    l->wb_numel = 0;
  if (l->wb_numel > 0) {
    /* Registration needs no frame-sized payload, so a huge normalized
     * shape is refused here rather than allocated. */
    if (l->wb_numel > w->cfg.limits.max_frame / sizeof(float)) {
      svc_fail(err, SVC_BAD_PARAMS,
               "normalized_shape: %zu parameters exceed what a frame holds",
               l->wb_numel);
      goto fail;
    }
    l->weight = svc__floats(l->wb_numel);
    l->bias = svc__floats(l->wb_numel);
    if (l->weight == NULL || l->bias == NULL)
      goto oom;
    for (size_t i = 0; i < l->wb_numel; i++) {
      l->weight[i] = 1.0f;
      l->bias[i] = 0.0f;
    }
  }
  l->tracking = (l->params.op == SBN_OP_BATCHNORM ||
                 l->params.op == SBN_OP_INSTANCENORM) &&
                l->params.track_running_stats;
  if (l->tracking) {
    if (C > w->cfg.limits.max_frame / sizeof(float)) {
      svc_fail(err, SVC_BAD_PARAMS, "channels: %zu exceed what a frame holds",
               C);
      goto fail;
    }
    l->running_mean = svc__floats(C);
    l->running_var = svc__floats(C);
    if (l->running_mean == NULL || l->running_var == NULL)
      goto oom;
    for (size_t i = 0; i < C; i++) {
      l->running_mean[i] = 0.0f;
      l->running_var[i] = 1.0f;
    }
    l->state.running_mean = l->running_mean;
    l->state.running_var = l->running_var;
  }
  if (svc_encode_register(&q->id, w->nlayers, 1, reply, reply_len) != 0)
    goto oom;
  w->layers[w->nlayers++] = l;
  return 0;
oom:
  svc_fail(err, SVC_RESOURCE, "register: out of memory");
fail:
  svc__layer_free(w, l);
  return -1;
}

svc__layer_t *svc__layer(svc_worker_t *w, uint64_t id, svc_err_t *err) {
  if (id >= w->nlayers) {
    svc_fail(err, SVC_UNKNOWN_LAYER, "layer: no layer %llu",
             (unsigned long long)id);
    return NULL;
  }
  return w->layers[id];
}

/* Drops the forward state of steps that fell out of the window. */
static void svc__prune(svc_worker_t *w, svc__layer_t *l) {
  svc__step_t **pp = &l->steps;
  while (*pp != NULL) {
    svc__step_t *s = *pp;
    if (s->step + w->cfg.keep_steps < l->max_step && !s->busy) {
      *pp = s->next;
      svc__step_release(w, s);
      free(s);
    } else {
      pp = &s->next;
    }
  }
}

static svc__step_t *svc__find_step(svc__layer_t *l, uint64_t step) {
  for (svc__step_t *s = l->steps; s != NULL; s = s->next)
    if (s->step == step)
      return s;
  return NULL;
}

static int svc__check_wb(const svc__layer_t *l, const svc_tensor_t *t,
                         const char *what, svc_err_t *err) {
  if (!t->present)
    return 0;
  if (l->wb_numel == 0)
    return svc_fail(err, SVC_SHAPE, "%s: layer '%s' has no affine parameters",
                    what, l->name);
  /* Only the count matters: the parameters are a flat array in the
   * library, and a client need not know LayerNorm's shape to send them. */
  if (t->numel != l->wb_numel)
    return svc_fail(err, SVC_SHAPE,
                    "%s: %zu elements, the layer has %zu parameters", what,
                    t->numel, l->wb_numel);
  return 0;
}

/* ------------------------------------------------------------------ */
/* syncbatchnorm: keys, poison, pending entries. */

uint64_t svc__hash_name(const char *name) {
  uint64_t h = 1469598103934665603ull;
  for (const unsigned char *c = (const unsigned char *)name; *c; c++) {
    h ^= *c;
    h *= 1099511628211ull;
  }
  return h;
}

static uint64_t svc__mix(uint64_t h, uint64_t v) {
  for (int i = 0; i < 8; i++) {
    h ^= (v >> (8 * i)) & 0xff;
    h *= 1099511628211ull;
  }
  return h;
}

/* Everything that must agree between ranks for a layer to be reduced
 * together: kind, channels, eps, momentum, affine, group size. */
static uint64_t svc__fingerprint(const svc__layer_t *l) {
  uint64_t h = 1469598103934665603ull, b;
  double d;
  h = svc__mix(h, (uint64_t)l->kind);
  h = svc__mix(h, (uint64_t)l->params.channels);
  d = l->params.eps;
  memcpy(&b, &d, sizeof b);
  h = svc__mix(h, b);
  d = l->params.momentum;
  memcpy(&b, &d, sizeof b);
  h = svc__mix(h, b);
  h = svc__mix(h, (uint64_t)l->params.cumulative);
  h = svc__mix(h, (uint64_t)l->params.affine);
  h = svc__mix(h, (uint64_t)l->params.track_running_stats);
  h = svc__mix(h, l->group_size);
  return h;
}

/* Ranks per sync group of a layer (group_size 0 means the whole job). */
static uint32_t svc__gsize(const svc_worker_t *w, const svc__layer_t *l) {
  if (l->group_size == 0 || l->group_size >= (uint64_t)w->cfg.size)
    return (uint32_t)w->cfg.size;
  return (uint32_t)l->group_size;
}

static int svc__poisoned(const svc_worker_t *w, uint64_t name, uint64_t step,
                         uint32_t dir, uint32_t grp) {
  size_t n = w->npoison < SVC__POISON ? w->npoison : SVC__POISON;
  for (size_t i = 0; i < n; i++)
    if (w->poison[i].name == name && w->poison[i].step == step &&
        w->poison[i].dir == dir && w->poison[i].grp == grp)
      return 1;
  return 0;
}

static void svc__poison(svc_worker_t *w, uint64_t name, uint64_t step,
                        uint32_t dir, uint32_t grp) {
  if (svc__poisoned(w, name, step, dir, grp))
    return;
  w->poison[w->poison_next].name = name;
  w->poison[w->poison_next].step = step;
  w->poison[w->poison_next].dir = dir;
  w->poison[w->poison_next].grp = grp;
  w->poison_next = (w->poison_next + 1) % SVC__POISON;
  w->npoison++;
}

void svc__pend_free(svc__pend_t *p) {
  if (p == NULL)
    return;
  svc_request_free(&p->q);
  free(p->y);
  free(p->dx);
  free(p->dw);
  free(p->db);
  free(p->ws);
  free(p->recs);
  free(p->ctx);
  free(p);
}

/* Unlinks p from the pending list. */
static void svc__pend_unlink(svc_worker_t *w, svc__pend_t *p) {
  for (svc__pend_t **pp = &w->pend; *pp != NULL; pp = &(*pp)->next)
    if (*pp == p) {
      *pp = p->next;
      return;
    }
}

/* An entry that will not complete: a forward's kept state is released
 * (it never ran here) but its step stays marked as used, as on the ranks
 * where it stalled, so a resend is DUPLICATE_STEP and the layer goes on at
 * the next step everywhere alike; a backward's forward state stays for
 * another try. */
static void svc__pend_abandon(svc_worker_t *w, svc__pend_t *p) {
  if (p->s == NULL)
    return;
  p->s->busy = 0;
  if (p->dir == SVC__DIR_FORWARD) {
    p->s->done = 1;
    svc__step_release(w, p->s);
  }
}

static void svc__batch_free(svc__batch_t *b) {
  for (size_t i = 0; i < b->n; i++)
    free(b->reply[i]);
  free(b->reply);
  free(b->len);
  free(b);
}

/* Fills slot i of a batch; the last one sends the batch's reply (or, when
 * the connection is gone, just frees it). */
static void svc__batch_fill(svc_worker_t *w, svc__batch_t *b, size_t i,
                            uint8_t *buf, size_t len) {
  uint8_t *out = NULL;
  size_t out_len = 0;
  b->reply[i] = buf;
  b->len[i] = len;
  if (--b->left > 0)
    return;
  if (b->token != NULL && w->deliver != NULL) {
    /* A sub-reply lost to memory becomes an error element, so the batch
     * reply still has one element per request. */
    for (size_t k = 0; k < b->n; k++)
      if (b->reply[k] == NULL)
        svc_encode_error(NULL, SVC_RESOURCE, "reply: out of memory",
                         &b->reply[k], &b->len[k]);
    if (svc_encode_batch(&b->id, b->reply, b->len, b->n, &out, &out_len) != 0)
      svc_encode_error(&b->id, SVC_RESOURCE, "batch: out of memory", &out,
                       &out_len);
    if (out != NULL)
      w->deliver(w->deliver_ctx, b->token, out, out_len);
  }
  svc__batch_free(b);
}

void svc__pend_deliver(svc_worker_t *w, svc__pend_t *p, uint8_t *buf,
                       size_t len) {
  if (p->batch != NULL) {
    svc__batch_t *b = p->batch;
    p->batch = NULL;
    svc__batch_fill(w, b, p->slot, buf, len);
    return;
  }
  if (buf == NULL)
    return;
  if (p->token != NULL && w->deliver != NULL)
    w->deliver(w->deliver_ctx, p->token, buf, len);
  else
    free(buf);
}

void svc__pend_reply_error(svc_worker_t *w, svc__pend_t *p, svc_code_t code,
                           const char *msg) {
  uint8_t *buf = NULL;
  size_t len = 0;
  w->m.errors[code]++;
  svc_encode_error(&p->q.id, code, msg, &buf, &len);
  svc__pend_deliver(w, p, buf, len);
}

void svc__pend_add(svc_worker_t *w, svc__pend_t *p) {
  svc__pend_t **pp = &w->pend;
  while (*pp != NULL)
    pp = &(*pp)->next;
  p->next = NULL;
  p->batch = w->cur_batch;
  p->slot = w->cur_slot;
  *pp = p;
  w->last_added = p;
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

static void svc__bargs(svc__step_t *s, const svc__pend_t *p,
                       sbn_backward_args_t *a) {
  memset(a, 0, sizeof *a);
  a->mode = SBN_MODE_TRAIN;
  a->x_desc = &s->desc;
  a->x = s->x;
  a->dy = p->q.x.data;
  a->dx = p->dx;
  a->weight = s->w;
  a->dweight = p->dw;
  a->dbias = p->db;
  a->step = s->step;
  a->workspace = p->ws;
  a->workspace_bytes = p->ws_bytes;
  a->saved = s->saved;
  a->saved_bytes = s->saved_bytes;
}

static const char *svc__dir_name(uint32_t dir) {
  switch (dir) {
    case SVC__DIR_FORWARD:
      return "forward";
    case SVC__DIR_BACKWARD:
      return "backward";
    case SVC__DIR_STATS:
      return "stats";
    case SVC__DIR_STATS_BACKWARD:
      return "stats_backward";
    default:
      return "checkpoint";
  }
}

/* Whether a cross-rank request on l may go on: the transport is there and
 * its (layer, step, direction) did not stall before in this rank's group.
 * Fails before anything is allocated. */
static int svc__sync_check(svc_worker_t *w, const svc__layer_t *l,
                           uint64_t step, uint32_t dir, svc_err_t *err) {
  uint32_t g = svc__gsize(w, l);
  if (!w->sync_on)
    return svc_fail(err, SVC_NOT_YET,
                    "%s: syncbatchnorm in training needs the cross-rank "
                    "reduction, which this worker does not serve (eval "
                    "works)",
                    svc__dir_name(dir));
  if (svc__poisoned(w, svc__hash_name(l->name), step, dir,
                    (uint32_t)w->cfg.rank / g))
    return svc_fail(err, SVC_STALL,
                    "step: layer '%s' step %llu %s stalled earlier and is "
                    "poisoned",
                    l->name, (unsigned long long)step, svc__dir_name(dir));
  return 0;
}

svc__pend_t *svc__pend_alloc(svc_worker_t *w, uint64_t name, uint64_t step,
                             uint32_t dir, size_t nrec, void *token) {
  svc__pend_t *p = calloc(1, sizeof *p);
  if (p == NULL)
    return NULL;
  p->recs = calloc(nrec > 0 ? nrec : 1, sizeof *p->recs);
  if (p->recs == NULL) {
    free(p);
    return NULL;
  }
  p->name = name;
  p->step = step;
  p->dir = dir;
  p->nrec = nrec;
  p->gsize = (uint32_t)w->cfg.size;
  p->grp = 0;
  p->token = token;
  p->t0 = w->now;
  return p;
}

static svc__pend_t *svc__pend_new(svc_worker_t *w, svc__layer_t *l,
                                  uint64_t step, uint32_t dir, void *token) {
  svc__pend_t *p = svc__pend_alloc(w, svc__hash_name(l->name), step, dir,
                                   l->params.channels, token);
  if (p == NULL)
    return NULL;
  p->fp = svc__fingerprint(l);
  p->l = l;
  p->gsize = svc__gsize(w, l);
  p->grp = (uint32_t)w->cfg.rank / p->gsize;
  return p;
}

/* Whether this rank already has an entry queued under this key (a second
 * one would be counted as another rank's). */
static int svc__pend_queued(const svc_worker_t *w, uint64_t name, uint64_t step,
                            uint32_t dir) {
  for (const svc__pend_t *p = w->pend; p != NULL; p = p->next)
    if (p->name == name && p->step == step && p->dir == dir)
      return 1;
  return 0;
}

static int svc__forward(svc_worker_t *w, svc_request_t *q, void *token,
                        int *deferred, uint8_t **reply, size_t *reply_len,
                        svc_err_t *err) {
  svc__layer_t *l = svc__layer(w, q->layer, err);
  svc__step_t *s = NULL;
  sbn_forward_args_t a;
  size_t ws_bytes = 0, sv_bytes = 0;
  void *ws = NULL;
  float *y = NULL;
  int train = q->train, rc;
  uint64_t bytes;
  svc__pend_t *p = NULL;
  int sync;
  if (l == NULL)
    return -1;
  sync = train && l->kind == SVC_KIND_SYNCBATCHNORM;
  if (sync && svc__sync_check(w, l, q->step, 0, err) != 0)
    return -1;
  if (train) {
    if (l->have_step && q->step + w->cfg.keep_steps < l->max_step)
      return svc_fail(err, SVC_STALE_STEP,
                      "step: %llu is more than keep_steps=%u behind step %llu",
                      (unsigned long long)q->step, w->cfg.keep_steps,
                      (unsigned long long)l->max_step);
    if (svc__find_step(l, q->step) != NULL)
      return svc_fail(err, SVC_DUPLICATE_STEP,
                      "step: layer %llu step %llu was already submitted",
                      (unsigned long long)q->layer,
                      (unsigned long long)q->step);
  }
  if (svc__check_wb(l, &q->weight, "weight", err) != 0 ||
      svc__check_wb(l, &q->bias, "bias", err) != 0)
    return -1;
  if ((rc = sbn_layer_sizes(l->layer, &q->x.desc, &ws_bytes, &sv_bytes)) != 0)
    return svc_fail(err, svc__lib_code(rc), "%s", sbn_last_error());
  if (train) {
    /* The whole kept state of this step is counted before anything is
     * allocated for it. */
    bytes = (uint64_t)sv_bytes + 2 * (uint64_t)l->wb_numel * sizeof(float);
    if (l->params.op != SBN_OP_DROPOUT)
      bytes += (uint64_t)q->x.numel * sizeof(float);
    if (bytes > w->cfg.max_saved - w->saved_bytes ||
        w->saved_bytes > w->cfg.max_saved)
      return svc_fail(err, SVC_RESOURCE,
                      "forward: keeping %llu more bytes of forward state "
                      "exceeds max_saved (%llu kept)",
                      (unsigned long long)bytes,
                      (unsigned long long)w->saved_bytes);
    s = calloc(1, sizeof *s);
    if (s == NULL)
      goto oom;
    s->bytes = bytes;
    w->saved_bytes += bytes;
    if (sv_bytes > 0 && (s->saved = malloc(sv_bytes)) == NULL)
      goto oom;
    s->saved_bytes = sv_bytes;
  }
  if (ws_bytes > 0 && (ws = malloc(ws_bytes)) == NULL)
    goto oom;
  if (q->x.numel > 0 && (y = svc__floats(q->x.numel)) == NULL)
    goto oom;
  memset(&a, 0, sizeof a);
  a.mode = train ? SBN_MODE_TRAIN : SBN_MODE_EVAL;
  a.x_desc = &q->x.desc;
  a.x = q->x.data;
  a.y = y;
  a.weight = q->weight.present ? q->weight.data : l->weight;
  a.bias = q->bias.present ? q->bias.data : l->bias;
  a.state = l->tracking ? &l->state : NULL;
  a.step = q->step;
  a.workspace = ws;
  a.workspace_bytes = ws_bytes;
  a.saved = s != NULL ? s->saved : NULL;
  a.saved_bytes = s != NULL ? s->saved_bytes : 0;
  if (sync) {
    /* The local records now; the rest once every rank has sent its own.
     * The step is kept (busy) from here so that repeats are refused. */
    if ((p = svc__pend_new(w, l, q->step, 0, token)) == NULL)
      goto oom;
    if ((rc = sbn_bn_forward_local(l->layer, &a, p->recs)) != 0) {
      svc_fail(err, svc__lib_code(rc), "%s", sbn_last_error());
      goto fail;
    }
    s->step = q->step;
    s->desc = q->x.desc;
    s->numel = q->x.numel;
    s->x = q->x.data;
    q->x.data = NULL;
    if (l->wb_numel > 0) {
      if (q->weight.present) {
        s->w = q->weight.data;
        q->weight.data = NULL;
      } else if ((s->w = svc__floats(l->wb_numel)) != NULL) {
        memcpy(s->w, l->weight, l->wb_numel * sizeof(float));
      }
      if (s->w == NULL)
        goto oom;
    }
    p->q = *q;
    q->bias.data = NULL; /* the pending entry owns it now */
    p->y = y;
    p->ws = ws;
    p->ws_bytes = ws_bytes;
    p->s = s;
    s->busy = 1;
    s->next = l->steps;
    l->steps = s;
    if (!l->have_step || q->step > l->max_step)
      l->max_step = q->step;
    l->have_step = 1;
    svc__prune(w, l);
    svc__pend_add(w, p);
    *deferred = 1;
    return 0;
  }
  if ((rc = sbn_forward(l->layer, &a)) != 0) {
    svc_fail(err, svc__lib_code(rc), "%s", sbn_last_error());
    goto fail;
  }
  if (svc_encode_forward(&q->id, &q->x.desc, y, q->x.numel, reply, reply_len) !=
      0)
    goto oom;
  if (s != NULL) {
    /* The request's tensors are already aligned private copies: the step
     * takes them over instead of copying again. */
    s->step = q->step;
    s->desc = q->x.desc;
    s->numel = q->x.numel;
    if (l->params.op != SBN_OP_DROPOUT) {
      s->x = q->x.data;
      q->x.data = NULL;
    }
    if (l->wb_numel > 0) {
      if (q->weight.present) {
        s->w = q->weight.data;
        q->weight.data = NULL;
      } else if ((s->w = svc__floats(l->wb_numel)) != NULL) {
        memcpy(s->w, l->weight, l->wb_numel * sizeof(float));
      }
      if (s->w == NULL) {
        /* The reply is built but backward could not run: refuse the step
         * rather than answer a forward whose backward must fail. */
        free(*reply);
        *reply = NULL;
        goto oom;
      }
    }
    s->next = l->steps;
    l->steps = s;
    if (!l->have_step || q->step > l->max_step)
      l->max_step = q->step;
    l->have_step = 1;
    svc__prune(w, l);
  }
  free(ws);
  free(y);
  return 0;
oom:
  svc_fail(err, SVC_RESOURCE, "forward: out of memory");
fail:
  svc__pend_free(p);
  if (s != NULL) {
    svc__step_release(w, s);
    free(s);
  }
  free(ws);
  free(y);
  return -1;
}

static int svc__backward(svc_worker_t *w, svc_request_t *q, void *token,
                         int *deferred, uint8_t **reply, size_t *reply_len,
                         svc_err_t *err) {
  svc__layer_t *l = svc__layer(w, q->layer, err);
  svc__step_t *s;
  sbn_backward_args_t a;
  size_t ws_bytes = 0;
  void *ws = NULL;
  float *dx = NULL, *dw = NULL, *db = NULL;
  svc__pend_t *p = NULL;
  int rc;
  if (l == NULL)
    return -1;
  if (l->kind == SVC_KIND_SYNCBATCHNORM &&
      svc__sync_check(w, l, q->step, 1, err) != 0)
    return -1;
  s = svc__find_step(l, q->step);
  if (s == NULL || s->done || s->busy)
    return svc_fail(err, SVC_NO_FORWARD, "step: layer %llu step %llu %s",
                    (unsigned long long)q->layer, (unsigned long long)q->step,
                    s == NULL ? "has no kept training forward"
                    : s->busy ? "is still waiting for the other ranks (its "
                                "forward or backward has not been answered)"
                              : "had its backward already");
  if (q->x.desc.ndim != s->desc.ndim || q->x.desc.layout != s->desc.layout ||
      memcmp(q->x.desc.dims, s->desc.dims,
             (size_t)s->desc.ndim * sizeof *s->desc.dims) != 0)
    return svc_fail(err, SVC_SHAPE,
                    "dy: shape or layout differs from the forward's x");
  if ((rc = sbn_layer_sizes(l->layer, &s->desc, &ws_bytes, NULL)) != 0)
    return svc_fail(err, svc__lib_code(rc), "%s", sbn_last_error());
  if (ws_bytes > 0 && (ws = malloc(ws_bytes)) == NULL)
    goto oom;
  if (s->numel > 0 && (dx = svc__floats(s->numel)) == NULL)
    goto oom;
  if (l->wb_numel > 0 && ((dw = svc__floats(l->wb_numel)) == NULL ||
                          (db = svc__floats(l->wb_numel)) == NULL))
    goto oom;
  memset(&a, 0, sizeof a);
  a.mode = SBN_MODE_TRAIN;
  a.x_desc = &s->desc;
  a.x = s->x;
  a.dy = q->x.data;
  a.dx = dx;
  a.weight = s->w;
  a.dweight = dw;
  a.dbias = db;
  a.step = s->step;
  a.workspace = ws;
  a.workspace_bytes = ws_bytes;
  a.saved = s->saved;
  a.saved_bytes = s->saved_bytes;
  if (l->kind == SVC_KIND_SYNCBATCHNORM) {
    if ((p = svc__pend_new(w, l, q->step, 1, token)) == NULL)
      goto oom;
    if ((rc = sbn_bn_backward_local(l->layer, &a, p->recs)) != 0) {
      svc_fail(err, svc__lib_code(rc), "%s", sbn_last_error());
      svc__pend_free(p);
      goto fail;
    }
    p->q = *q;
    q->x.data = NULL; /* dy belongs to the pending entry now */
    p->dx = dx;
    p->dw = dw;
    p->db = db;
    p->ws = ws;
    p->ws_bytes = ws_bytes;
    p->s = s;
    s->busy = 1;
    svc__pend_add(w, p);
    *deferred = 1;
    return 0;
  }
  if ((rc = sbn_backward(l->layer, &a)) != 0) {
    svc_fail(err, svc__lib_code(rc), "%s", sbn_last_error());
    goto fail;
  }
  if (svc_encode_backward(&q->id, &s->desc, dx, s->numel, dw, db, &l->wb_desc,
                          l->wb_numel, reply, reply_len) != 0)
    goto oom;
  s->done = 1;
  svc__step_release(w, s);
  free(ws);
  free(dx);
  free(dw);
  free(db);
  return 0;
oom:
  svc_fail(err, SVC_RESOURCE, "backward: out of memory");
fail:
  free(ws);
  free(dx);
  free(dw);
  free(db);
  return -1;
}

/* stats and stats_backward: the reduction of a client's own per-channel
 * statistics (a client that computes its batch locally, e.g. on a GPU).
 * stats carries (count, mean, M2) per channel, reduced with the same
 * merge as a forward's records; stats_backward carries (sum dy,
 * sum dy * xhat), summed as a backward's. */
static int svc__stats(svc_worker_t *w, svc_request_t *q, void *token,
                      int *deferred, uint8_t **reply, size_t *reply_len,
                      svc_err_t *err) {
  svc__layer_t *l = svc__layer(w, q->layer, err);
  int fwd = q->op == SVC_OP_STATS;
  uint32_t dir = fwd ? SVC__DIR_STATS : SVC__DIR_STATS_BACKWARD;
  const char *op = fwd ? "stats" : "stats_backward";
  svc__pend_t *p;
  size_t C;
  (void)reply;
  (void)reply_len;
  if (l == NULL)
    return -1;
  if (l->kind != SVC_KIND_SYNCBATCHNORM)
    return svc_fail(err, SVC_SHAPE,
                    "layer: %s needs a syncbatchnorm layer, '%s' is %s", op,
                    l->name, svc_kind_name(l->kind));
  C = l->params.channels;
  if (fwd && !(q->count.scalar || q->count.n == C))
    return svc_fail(err, SVC_SHAPE, "count: %zu values for %zu channels",
                    q->count.n, C);
  if (q->mean.n != C || q->m2.n != C)
    return svc_fail(err, SVC_SHAPE, "%s: %zu values for %zu channels",
                    q->mean.n != C ? (fwd ? "mean" : "sum_dy")
                                   : (fwd ? "m2" : "sum_dy_xhat"),
                    q->mean.n != C ? q->mean.n : q->m2.n, C);
  for (size_t c = 0; c < C; c++) {
    double n = fwd ? q->count.v[q->count.scalar ? 0 : c] : 0;
    if (!isfinite(q->mean.v[c]) || !isfinite(q->m2.v[c]) || !isfinite(n) ||
        n < 0 || (fwd && q->m2.v[c] < 0) ||
        (fwd && n == 0 && (q->mean.v[c] != 0 || q->m2.v[c] != 0)))
      return svc_fail(err, SVC_BAD_PARAMS,
                      "%s: channel %zu is not finite, negative, or nonzero "
                      "with a zero count",
                      fwd ? "count/mean/m2" : "sum_dy/sum_dy_xhat", c);
  }
  if (svc__sync_check(w, l, q->step, dir, err) != 0)
    return -1;
  if (svc__pend_queued(w, svc__hash_name(l->name), q->step, dir))
    return svc_fail(err, SVC_DUPLICATE_STEP,
                    "step: layer '%s' step %llu %s is already waiting", l->name,
                    (unsigned long long)q->step, op);
  if ((p = svc__pend_new(w, l, q->step, dir, token)) == NULL)
    return svc_fail(err, SVC_RESOURCE, "%s: out of memory", op);
  for (size_t c = 0; c < C; c++) {
    p->recs[c].tag = fwd ? SBN_REC_MOMENTS : SBN_REC_SUM;
    p->recs[c].v[0] = fwd ? q->count.v[q->count.scalar ? 0 : c] : q->mean.v[c];
    p->recs[c].v[1] = fwd ? q->mean.v[c] : q->m2.v[c];
    p->recs[c].v[2] = fwd ? q->m2.v[c] : 0;
  }
  p->q.id = q->id;
  svc__pend_add(w, p);
  *deferred = 1;
  return 0;
}

/* Completes a stats entry from the reduced records: the global count,
 * mean and variances, and the running statistics moved exactly as a
 * training forward moves them (PyTorch's update, unbiased variance). */
static void svc__stats_done(svc_worker_t *w, svc__pend_t *p,
                            const sbn_rec_t *recs) {
  svc__layer_t *l = p->l;
  size_t C = l->params.channels;
  double *out = malloc((5 * C + 1) * sizeof *out);
  double *n = out, *mean = out + C, *var = out + 2 * C, *uvar = out + 3 * C,
         *istd = out + 4 * C;
  uint8_t *buf = NULL;
  size_t len = 0;
  svc_reply_t r;
  int small = 0, any = 0;
  if (out == NULL) {
    svc__pend_reply_error(w, p, SVC_RESOURCE, "stats: out of memory");
    return;
  }
  for (size_t c = 0; c < C; c++) {
    n[c] = recs[c].v[0];
    mean[c] = recs[c].v[1];
    var[c] = n[c] > 0 ? recs[c].v[2] / n[c] : 0;
    uvar[c] = n[c] > 1 ? recs[c].v[2] / (n[c] - 1) : 0;
    istd[c] = 1.0 / sqrt(var[c] + l->params.eps);
    small |= n[c] == 1;
    any |= n[c] > 0;
  }
  if (small) {
    /* Every rank of the group reduced the same counts, so they all refuse
     * together, as a forward would. */
    svc__pend_reply_error(w, p, SVC_SMALL_BATCH,
                          "count: expected more than 1 value per channel in "
                          "the global batch (a channel has 1)");
    free(out);
    return;
  }
  if (l->tracking && any) {
    double f = l->params.momentum;
    if (l->params.cumulative)
      f = 1.0 / ((double)l->state.num_batches_tracked + 1.0);
    for (size_t c = 0; c < C; c++) {
      if (n[c] == 0)
        continue;
      l->running_mean[c] = (float)((1 - f) * l->running_mean[c] + f * mean[c]);
      l->running_var[c] = (float)((1 - f) * l->running_var[c] + f * uvar[c]);
    }
    l->state.num_batches_tracked++;
  }
  svc_reply_begin(&r, &p->q.id, 5, 5 * C * sizeof(double));
  svc_reply_key(&r, "count");
  r.rc |= svc_pack_vec64(r.pk, n, C);
  svc_reply_key(&r, "mean");
  r.rc |= svc_pack_vec64(r.pk, mean, C);
  svc_reply_key(&r, "var");
  r.rc |= svc_pack_vec64(r.pk, var, C);
  svc_reply_key(&r, "var_unbiased");
  r.rc |= svc_pack_vec64(r.pk, uvar, C);
  svc_reply_key(&r, "invstd");
  r.rc |= svc_pack_vec64(r.pk, istd, C);
  free(out);
  if (svc_reply_end(&r, &buf, &len) != 0) {
    svc__pend_reply_error(w, p, SVC_RESOURCE, "stats: out of memory");
    return;
  }
  svc__pend_deliver(w, p, buf, len);
}

static void svc__stats_backward_done(svc_worker_t *w, svc__pend_t *p,
                                     const sbn_rec_t *recs) {
  size_t C = p->l->params.channels;
  double *out = malloc((2 * C + 1) * sizeof *out);
  uint8_t *buf = NULL;
  size_t len = 0;
  svc_reply_t r;
  if (out == NULL) {
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

static int svc__run(svc_worker_t *w, svc_request_t *q, void *token,
                    svc__batch_t *b, size_t slot, int *deferred,
                    uint8_t **reply, size_t *reply_len, int *close_after,
                    svc_err_t *err);

/* A batch: its sub-requests run one after another, exactly as if each had
 * come in its own frame, but every cross-rank entry among them is queued
 * before the next agreement round, so they are negotiated together and,
 * being ready on every rank at once, reduced in one fused allreduce in
 * key order: the fusion does not depend on timing. The reply lists the
 * sub-replies in request order, errors included. */
static int svc__batch(svc_worker_t *w, svc_request_t *q, void *token,
                      int *deferred, uint8_t **reply, size_t *reply_len,
                      svc_err_t *err) {
  svc__batch_t *b = calloc(1, sizeof *b);
  if (b == NULL || (b->reply = calloc(q->nsub, sizeof *b->reply)) == NULL ||
      (b->len = calloc(q->nsub, sizeof *b->len)) == NULL) {
    if (b != NULL)
      svc__batch_free(b);
    return svc_fail(err, SVC_RESOURCE, "batch: out of memory");
  }
  b->id = q->id;
  b->token = token;
  b->n = q->nsub;
  /* One extra count keeps the batch alive while its sub-requests run,
   * even when a deferred one completes before the loop ends. */
  b->left = q->nsub + 1;
  for (size_t i = 0; i < q->nsub; i++) {
    uint8_t *sub = NULL;
    size_t sub_len = 0;
    int sub_deferred = 0, sub_close = 0;
    svc_err_t sub_err;
    memset(&sub_err, 0, sizeof sub_err);
    if (svc__run(w, &q->sub[i], token, b, i, &sub_deferred, &sub, &sub_len,
                 &sub_close, &sub_err) != 0) {
      w->m.errors[sub_err.code]++;
      svc_encode_error(&q->sub[i].id, sub_err.code, sub_err.msg, &sub,
                       &sub_len);
    }
    if (!sub_deferred)
      svc__batch_fill(w, b, i, sub, sub_len);
  }
  if (b->left > 1) {
    /* The last deferred sub-reply sends the batch through deliver. */
    b->left--;
    *deferred = 1;
    return 0;
  }
  /* Everything was answered at once: the reply goes back directly. */
  b->left = 1;
  b->token = NULL;
  {
    int rc = svc_encode_batch(&b->id, b->reply, b->len, b->n, reply, reply_len);
    b->left = 0;
    svc__batch_free(b);
    if (rc != 0)
      return svc_fail(err, SVC_RESOURCE, "batch: out of memory");
  }
  return 0;
}

/* Runs one decoded request. A batch's sub-requests come through here too
 * (with b set), so that each behaves exactly as it would on its own. */
static int svc__run(svc_worker_t *w, svc_request_t *q, void *token,
                    svc__batch_t *b, size_t slot, int *deferred,
                    uint8_t **reply, size_t *reply_len, int *close_after,
                    svc_err_t *err) {
  int rc = -1;
  w->cur_batch = b;
  w->cur_slot = slot;
  if (q->op <= SVC_OP_METRICS)
    w->m.requests[q->op]++;
  switch (q->op) {
    case SVC_OP_HELLO:
      rc = svc__hello(w, q, reply, reply_len, err);
      break;
    case SVC_OP_REGISTER:
      rc = svc__register(w, q, reply, reply_len, err);
      break;
    case SVC_OP_FORWARD:
      rc = svc__forward(w, q, token, deferred, reply, reply_len, err);
      break;
    case SVC_OP_BACKWARD:
      rc = svc__backward(w, q, token, deferred, reply, reply_len, err);
      break;
    case SVC_OP_STATS:
    case SVC_OP_STATS_BACKWARD:
      rc = svc__stats(w, q, token, deferred, reply, reply_len, err);
      break;
    case SVC_OP_BATCH:
      rc = svc__batch(w, q, token, deferred, reply, reply_len, err);
      break;
    case SVC_OP_GET_STATE:
      rc = svc__get_state(w, q, reply, reply_len, err);
      break;
    case SVC_OP_SET_STATE:
      rc = svc__set_state(w, q, reply, reply_len, err);
      break;
    case SVC_OP_METRICS:
      rc = svc__metrics(w, q, reply, reply_len, err);
      break;
    case SVC_OP_CHECKPOINT_SAVE:
    case SVC_OP_CHECKPOINT_LOAD:
      rc = svc__checkpoint(w, q, token, deferred, reply, reply_len, err);
      break;
    case SVC_OP_BYE:
      rc = svc_encode_bye(&q->id, reply, reply_len);
      if (rc != 0)
        svc_fail(err, SVC_RESOURCE, "reply: out of memory");
      *close_after = 1;
      break;
  }
  w->cur_batch = NULL;
  return rc;
}

int svc_worker_handle_async(svc_worker_t *w, const uint8_t *body, size_t len,
                            void *token, uint8_t **reply, size_t *reply_len,
                            int *close_after, int *deferred) {
  svc_request_t q;
  svc_err_t err;
  int rc = -1;
  *reply = NULL;
  *reply_len = 0;
  *close_after = 0;
  *deferred = 0;
  memset(&err, 0, sizeof err);
  if (svc_decode_request(body, len, &w->cfg.limits, &q, &err) == 0) {
    rc = svc__run(w, &q, token, NULL, 0, deferred, reply, reply_len,
                  close_after, &err);
    svc_request_free(&q);
  }
  if (rc == 0)
    return 0;
  w->m.errors[err.code < SVC_CODE_COUNT ? err.code : SVC_INTERNAL]++;
  if (svc_code_fatal(err.code))
    *close_after = 1;
  return svc_encode_error(&q.id, err.code, err.msg, reply, reply_len);
}

int svc_worker_handle(svc_worker_t *w, const uint8_t *body, size_t len,
                      uint8_t **reply, size_t *reply_len, int *close_after) {
  int deferred = 0;
  return svc_worker_handle_async(w, body, len, NULL, reply, reply_len,
                                 close_after, &deferred);
}

/* ------------------------------------------------------------------ */
/* syncbatchnorm coordination */

void svc_worker_set_sync(svc_worker_t *w, const svc_sync_ops_t *ops,
                         double stall_timeout, svc_deliver_fn deliver,
                         void *deliver_ctx) {
  w->ops = *ops;
  w->sync_on = 1;
  w->stall_timeout = stall_timeout;
  w->deliver = deliver;
  w->deliver_ctx = deliver_ctx;
}

void svc_worker_sync_counters(const svc_worker_t *w, uint64_t *allreduces,
                              uint64_t *entries) {
  *allreduces = w->m.allreduces;
  *entries = w->m.entries_fused;
}

void svc_worker_note_io(svc_worker_t *w, uint64_t frames_in, uint64_t bytes_in,
                        uint64_t frames_out, uint64_t bytes_out) {
  w->m.frames_in += frames_in;
  w->m.bytes_in += bytes_in;
  w->m.frames_out += frames_out;
  w->m.bytes_out += bytes_out;
}

void svc_worker_note_refusal(svc_worker_t *w, svc_code_t code) {
  if (code > SVC_OK && code < SVC_CODE_COUNT)
    w->m.errors[code]++;
  if (code == SVC_UNAUTHORIZED)
    w->m.auth_failures++;
}

void svc_worker_note_connection(svc_worker_t *w) {
  w->m.connections++;
}

int svc_worker_set_state_dir(svc_worker_t *w, const char *dir) {
  size_t n = strlen(dir);
  while (n > 1 && dir[n - 1] == '/')
    n--;
  if (n == 0 || n >= sizeof w->state_dir)
    return -1;
  memcpy(w->state_dir, dir, n);
  w->state_dir[n] = '\0';
  return 0;
}

void svc_worker_cancel(svc_worker_t *w, void *token) {
  svc__pend_t *p, *next;
  if (token == NULL)
    return;
  for (p = w->pend; p != NULL; p = next) {
    next = p->next;
    if (p->token != token)
      continue;
    p->token = NULL;
    if (p->batch != NULL)
      p->batch->token = NULL;
    /* An entry already in the fused allreduce still completes (its records
     * are in flight and the running statistics must move on every rank);
     * one not yet negotiated is withdrawn, so this rank contributes
     * nothing and the others see a stall. */
    if (!p->sent && !p->listed) {
      svc__pend_unlink(w, p);
      svc__pend_abandon(w, p);
      svc__pend_deliver(w, p, NULL, 0);
      svc__pend_free(p);
    }
  }
}

static int svc__key_cmp(const void *a, const void *b) {
  const svc__gent_t *x = a, *y = b;
  if (x->name != y->name)
    return x->name < y->name ? -1 : 1;
  if (x->step != y->step)
    return x->step < y->step ? -1 : 1;
  if (x->dir != y->dir)
    return x->dir < y->dir ? -1 : 1;
  return 0;
}

/* Key order, then the sync group. */
static int svc__gkey_cmp(const void *a, const void *b) {
  const svc__gent_t *x = a, *y = b;
  int c = svc__key_cmp(a, b);
  if (c != 0)
    return c;
  if (x->grp != y->grp)
    return x->grp < y->grp ? -1 : 1;
  return 0;
}

static int svc__pend_key_cmp(const void *a, const void *b) {
  const svc__pend_t *x = *(const svc__pend_t *const *)a;
  const svc__pend_t *y = *(const svc__pend_t *const *)b;
  if (x->name != y->name)
    return x->name < y->name ? -1 : 1;
  if (x->step != y->step)
    return x->step < y->step ? -1 : 1;
  if (x->dir != y->dir)
    return x->dir < y->dir ? -1 : 1;
  return 0;
}

static int svc__gather_begin(svc_worker_t *w) {
  uint32_t n = 0;
  size_t total = 0, k = 0;
  svc__pend_t **sel = NULL;
  memset(&w->gsend, 0, sizeof w->gsend);
  for (svc__pend_t *p = w->pend; p != NULL; p = p->next)
    total++;
  if (total > SVC__MAXE) {
    /* More entries wait than one round lists. Every rank lists its
     * smallest keys, not its oldest: ranks that queued the same entries in
     * different orders then list the same ones and make progress, instead
     * of listing disjoint sets until they stall. */
    if ((sel = malloc(total * sizeof *sel)) == NULL)
      return -1;
    for (svc__pend_t *p = w->pend; p != NULL; p = p->next)
      sel[k++] = p;
    qsort(sel, total, sizeof *sel, svc__pend_key_cmp);
  }
  k = 0;
  for (svc__pend_t *p = w->pend; n < SVC__MAXE && p != NULL; n++) {
    svc__gent_t *e = &w->gsend.e[n];
    svc__pend_t *q = sel != NULL ? sel[k++] : p;
    e->name = q->name;
    e->step = q->step;
    e->dir = q->dir;
    e->C = (uint32_t)q->nrec;
    e->fp = q->fp;
    e->gsize = q->gsize;
    e->grp = q->grp;
    e->age = w->now - q->t0;
    q->listed = 1;
    p = p->next;
  }
  free(sel);
  w->gsend.n = n;
  if (w->ops.gather_begin(w->ops.ctx, &w->gsend, w->grecv, sizeof w->gsend) !=
      0)
    return -1;
  w->m.gathers++;
  w->phase = 1;
  return 0;
}

static svc__pend_t *svc__pend_find(svc_worker_t *w, const svc__gent_t *k) {
  for (svc__pend_t *p = w->pend; p != NULL; p = p->next)
    if (!p->sent && p->name == k->name && p->step == k->step &&
        p->dir == k->dir)
      return p;
  return NULL;
}

/* Fails this rank's entry under key k, if it belongs to group k->grp (or
 * to any group with any_grp), and poisons the key for that group. */
static void svc__fail_key(svc_worker_t *w, const svc__gent_t *k, int any_grp,
                          svc_code_t code, const char *what) {
  svc__pend_t *p;
  if (!any_grp)
    svc__poison(w, k->name, k->step, k->dir, k->grp);
  while ((p = svc__pend_find(w, k)) != NULL && (any_grp || p->grp == k->grp)) {
    char msg[512];
    if (any_grp)
      svc__poison(w, k->name, k->step, k->dir, p->grp);
    if (p->l != NULL)
      snprintf(msg, sizeof msg, "layer '%s' step %llu %s: %s", p->l->name,
               (unsigned long long)k->step, svc__dir_name(k->dir), what);
    else
      snprintf(msg, sizeof msg, "%s: %s", svc__dir_name(k->dir), what);
    svc__pend_unlink(w, p);
    svc__pend_reply_error(w, p, code, msg);
    svc__pend_abandon(w, p);
    svc__pend_free(p);
  }
}

/* Every rank runs this on the same gathered bytes, so every rank reaches
 * the same decisions: which (key, group) pairs are ready, which stalled,
 * which disagree, and where each ready pair's records sit in the fused
 * allreduce. A pair's slot holds the records of its group's ranks; every
 * other rank contributes identity records there (a count of 0, or zero
 * sums), so one allreduce over the job serves every group at once. */
static int svc__gather_done(svc_worker_t *w) {
  int size = w->cfg.size;
  size_t cap = (size_t)size * SVC__MAXE, nu = 0, nrec = 0, nready = 0;
  svc__gent_t *u = malloc((cap > 0 ? cap : 1) * sizeof *u);
  svc__gent_t *rd = NULL; /* the ready (key, group) pairs in order */
  int rc = 0;
  if (u == NULL)
    return -1;
  for (int r = 0; r < size; r++) {
    const svc__gmsg_t *m = &w->grecv[r];
    for (uint32_t i = 0; i < m->n && i < SVC__MAXE; i++)
      u[nu++] = m->e[i];
  }
  qsort(u, nu, sizeof *u, svc__gkey_cmp);
  w->rlist_n = 0;
  if ((rd = malloc((nu > 0 ? nu : 1) * sizeof *rd)) == NULL) {
    free(u);
    return -1;
  }
  for (size_t i = 0; i < nu;) {
    size_t j = i, g0;
    int agree = 1;
    /* The run of one key over all groups must agree everywhere. */
    while (j < nu && svc__key_cmp(&u[i], &u[j]) == 0) {
      if (u[j].fp != u[i].fp || u[j].C != u[i].C || u[j].gsize != u[i].gsize)
        agree = 0;
      j++;
    }
    if (!agree) {
      w->m.mismatches++;
      svc__fail_key(w, &u[i], 1, SVC_LAYER_MISMATCH,
                    "the ranks registered this layer with different "
                    "parameters (kind, channels, eps, momentum, affine or "
                    "group size), or hold different layers");
      i = j;
      continue;
    }
    for (g0 = i; g0 < j;) {
      size_t g1 = g0;
      uint32_t gs = u[g0].gsize, grp = u[g0].grp;
      int lo = (int)(grp * gs);
      int need = size - lo < (int)gs ? size - lo : (int)gs;
      double age = 0;
      while (g1 < j && u[g1].grp == grp) {
        if (u[g1].age > age)
          age = u[g1].age;
        g1++;
      }
      if ((int)(g1 - g0) == need) {
        rd[nready] = u[g0];
        if ((uint32_t)w->cfg.rank / gs == grp) {
          svc__pend_t *p = svc__pend_find(w, &u[g0]);
          if (p == NULL) {
            rc = -1; /* every rank of the group listed it */
          } else {
            p->sent = 1;
            w->roff[w->rlist_n] = nrec;
            w->rlist[w->rlist_n++] = p;
          }
        }
        nrec += u[g0].C;
        nready++;
      } else if (age > w->stall_timeout) {
        /* Name the ranks of the group that did not list the key. */
        char missing[160];
        size_t ml = (size_t)snprintf(missing, sizeof missing, "ranks");
        for (int r = lo; r < lo + need && ml < sizeof missing - 16; r++) {
          const svc__gmsg_t *m = &w->grecv[r];
          int has = 0;
          for (uint32_t e = 0; e < m->n && e < SVC__MAXE; e++)
            if (svc__key_cmp(&m->e[e], &u[g0]) == 0)
              has = 1;
          if (!has)
            ml += (size_t)snprintf(missing + ml, sizeof missing - ml, " %d", r);
        }
        snprintf(missing + ml, sizeof missing - ml,
                 " did not submit it within %g s", w->stall_timeout);
        w->m.stalls++;
        svc__fail_key(w, &u[g0], 0, SVC_STALL, missing);
      }
      g0 = g1;
    }
    i = j;
  }
  /* Entries whose connection went while they were listed are withdrawn
   * now, unless they are being reduced. */
  for (svc__pend_t *p = w->pend, *next; p != NULL; p = next) {
    next = p->next;
    p->listed = 0;
    if (p->token == NULL && !p->sent) {
      svc__pend_unlink(w, p);
      svc__pend_abandon(w, p);
      svc__pend_deliver(w, p, NULL, 0);
      svc__pend_free(p);
    }
  }
  /* Local entries that arrived after the gather started but whose key was
   * just poisoned fail too. */
  for (svc__pend_t *p = w->pend, *next; p != NULL; p = next) {
    next = p->next;
    if (!p->sent && svc__poisoned(w, p->name, p->step, p->dir, p->grp)) {
      svc__gent_t k;
      memset(&k, 0, sizeof k);
      k.name = p->name;
      k.step = p->step;
      k.dir = p->dir;
      k.grp = p->grp;
      svc__fail_key(w, &k, 0, SVC_STALL, "stalled on another rank");
    }
  }
  if (rc != 0 || nready == 0) {
    free(u);
    free(rd);
    w->phase = 0;
    return rc;
  }
  free(w->rbuf);
  w->rbuf = calloc(nrec > 0 ? nrec : 1, sizeof *w->rbuf);
  free(u);
  if (w->rbuf == NULL) {
    free(rd);
    return -1;
  }
  /* Identity records everywhere, with the tag of each slot's kind. */
  nrec = 0;
  for (size_t i = 0; i < nready; i++) {
    double tag = (rd[i].dir == SVC__DIR_FORWARD || rd[i].dir == SVC__DIR_STATS)
                     ? SBN_REC_MOMENTS
                     : SBN_REC_SUM;
    for (uint32_t c = 0; c < rd[i].C; c++)
      w->rbuf[nrec + c].tag = tag;
    nrec += rd[i].C;
  }
  free(rd);
  for (size_t i = 0; i < w->rlist_n; i++)
    memcpy(w->rbuf + w->roff[i], w->rlist[i]->recs,
           w->rlist[i]->nrec * sizeof *w->rbuf);
  if (w->ops.reduce_begin(w->ops.ctx, w->rbuf, nrec) != 0)
    return -1;
  {
    int b = 0;
    while (b < SVC__FUSE_BUCKETS - 1 && ((size_t)1 << b) < nready)
      b++;
    w->m.fuse_hist[b]++;
  }
  w->m.allreduces++;
  w->m.entries_fused += nready;
  w->m.reduce_t0 = svc__clock();
  w->phase = 2;
  return 0;
}

static void svc__complete(svc_worker_t *w, svc__pend_t *p,
                          const sbn_rec_t *recs) {
  svc__layer_t *l = p->l;
  svc__step_t *s = p->s;
  uint8_t *buf = NULL;
  size_t len = 0;
  int rc;
  if (p->done != NULL) {
    p->done(w, p, recs);
    return;
  }
  if (p->dir == SVC__DIR_STATS) {
    svc__stats_done(w, p, recs);
    return;
  }
  if (p->dir == SVC__DIR_STATS_BACKWARD) {
    svc__stats_backward_done(w, p, recs);
    return;
  }
  s->busy = 0;
  if (p->dir == SVC__DIR_FORWARD) {
    sbn_forward_args_t a;
    svc__fargs(l, s, p, &a);
    rc = sbn_bn_forward_finish(l->layer, &a, recs);
    if (rc == 0)
      rc = svc_encode_forward(&p->q.id, &s->desc, p->y, s->numel, &buf, &len);
    else
      svc_encode_error(&p->q.id, svc__lib_code(rc), sbn_last_error(), &buf,
                       &len);
    if (rc != 0) {
      s->done = 1;
      svc__step_release(w, s);
    }
  } else {
    sbn_backward_args_t a;
    svc__bargs(s, p, &a);
    rc = sbn_bn_backward_finish(l->layer, &a, recs);
    if (rc == 0)
      rc = svc_encode_backward(&p->q.id, &s->desc, p->dx, s->numel, p->dw,
                               p->db, &l->wb_desc, l->wb_numel, &buf, &len);
    else
      svc_encode_error(&p->q.id, svc__lib_code(rc), sbn_last_error(), &buf,
                       &len);
    if (rc == 0) {
      s->done = 1;
      svc__step_release(w, s);
    }
  }
  svc__pend_deliver(w, p, buf, len);
  svc__prune(w, l);
}

static void svc__reduce_done(svc_worker_t *w) {
  w->m.lat[w->m.nlat % SVC__LAT_RING] = svc__clock() - w->m.reduce_t0;
  w->m.nlat++;
  for (size_t i = 0; i < w->rlist_n; i++) {
    svc__pend_t *p = w->rlist[i];
    svc__pend_unlink(w, p);
    svc__complete(w, p, w->rbuf + w->roff[i]);
    svc__pend_free(p);
  }
  w->rlist_n = 0;
  w->phase = 0;
}

int svc_worker_poll(svc_worker_t *w, double now) {
  int done = 0;
  w->now = now;
  if (!w->sync_on)
    return 0;
  if (w->grecv == NULL) {
    w->grecv = calloc((size_t)w->cfg.size, sizeof *w->grecv);
    w->rlist = calloc((size_t)w->cfg.size * SVC__MAXE, sizeof *w->rlist);
    w->roff = calloc((size_t)w->cfg.size * SVC__MAXE, sizeof *w->roff);
    if (w->grecv == NULL || w->rlist == NULL || w->roff == NULL)
      return -1;
  }
  if (w->phase == 1) {
    if (w->ops.test(w->ops.ctx, &done) != 0)
      return -1;
    if (!done)
      return 0;
    if (svc__gather_done(w) != 0)
      return -1;
  }
  if (w->phase == 2) {
    if (w->ops.test(w->ops.ctx, &done) != 0)
      return -1;
    if (!done)
      return 0;
    svc__reduce_done(w);
  }
  if (w->phase == 0 && svc__gather_begin(w) != 0)
    return -1;
  return 0;
}
