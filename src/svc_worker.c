/* The syncbnd worker: layer registry, running state and the local ops
 * (see svc_worker.h). */
#include "svc_worker.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Forward state kept for one (layer, step) of a training forward. After
 * its backward the buffers go but the entry stays (done = 1) until the
 * step window passes it, so a repeated step is still recognized. */
typedef struct svc__step_s {
  uint64_t step;
  int done;
  int busy; /* a syncbatchnorm forward or backward of it waits for ranks */
  sbn_tensor_desc_t desc;
  size_t numel;
  float *x;     /* the forward input (NULL for dropout) */
  float *w, *b; /* the affine parameters the forward used */
  void *saved;
  size_t saved_bytes;
  uint64_t bytes; /* counted against max_saved */
  struct svc__step_s *next;
} svc__step_t;

typedef struct svc__layer_s {
  char name[SVC_NAME_MAX + 1];
  svc_kind_t kind;
  uint64_t group_size;
  sbn_layer_params_t params; /* as registered (layer_id = the layer id) */
  sbn_layer_t *layer;
  sbn_tensor_desc_t wb_desc; /* shape of weight and bias */
  size_t wb_numel;           /* 0 when not affine */
  float *weight, *bias;
  float *running_mean, *running_var;
  sbn_state_t state;
  int tracking;
  int have_step;
  uint64_t max_step;
  svc__step_t *steps;
} svc__layer_t;

/* A communicator of one process that carries the worker's rank, so that
 * dropout keys differ between ranks exactly as they do under SyncBN's MPI
 * communicator. */
typedef struct svc__comm_s {
  sbn_comm_t base;
} svc__comm_t;

static int svc__comm_allreduce(sbn_comm_t *c, sbn_rec_t *r, size_t n) {
  (void)c;
  (void)r;
  (void)n;
  return 0;
}
static void svc__comm_destroy(sbn_comm_t *c) {
  (void)c;
}
static const sbn_comm_vtable_t svc__comm_vt = {svc__comm_allreduce, NULL, NULL,
                                               NULL, svc__comm_destroy};

/* One syncbatchnorm forward or backward waiting for the other ranks. */
typedef struct svc__pend_s {
  uint64_t name, step; /* the key: layer name hash, step, direction */
  uint32_t dir;        /* 0 forward, 1 backward */
  uint64_t fp;         /* the layer's parameter fingerprint */
  svc__layer_t *l;
  svc__step_t *s;
  void *token; /* NULL once the connection is gone */
  int sent;    /* part of the fused allreduce in flight */
  int listed;  /* in the ready list of the allgather in flight */
  double t0;
  svc_request_t q; /* id; forward: weight, bias; backward: dy */
  float *y, *dx, *dw, *db;
  void *ws;
  size_t ws_bytes;
  sbn_rec_t *recs; /* channels records */
  struct svc__pend_s *next;
} svc__pend_t;

#define SVC__MAXE 64
#define SVC__POISON 1024

typedef struct svc__gent_s {
  uint64_t name, step, fp;
  uint32_t dir, C;
  double age;
} svc__gent_t;

typedef struct svc__gmsg_s {
  uint32_t n, pad;
  svc__gent_t e[SVC__MAXE];
} svc__gmsg_t;

typedef struct svc__key_s {
  uint64_t name, step;
  uint32_t dir;
} svc__key_t;

struct svc_worker_s {
  svc_worker_config_t cfg;
  svc__comm_t comm;
  svc__layer_t **layers;
  uint32_t nlayers;
  uint64_t saved_bytes;
  /* syncbatchnorm coordination */
  int sync_on;
  svc_sync_ops_t ops;
  double stall_timeout;
  svc_deliver_fn deliver;
  void *deliver_ctx;
  double now;
  svc__pend_t *pend; /* oldest first */
  int phase;         /* 0 idle, 1 gathering, 2 reducing */
  svc__gmsg_t gsend;
  svc__gmsg_t *grecv;
  sbn_rec_t *rbuf;
  svc__pend_t **rlist;
  size_t rlist_n;
  svc__key_t poison[SVC__POISON];
  size_t npoison, poison_next;
  uint64_t n_allreduces, n_fused;
};

static void svc__pend_free(svc__pend_t *p);

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
    svc__pend_free(p);
  }
  free(w->grecv);
  free(w->rlist);
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
static svc_code_t svc__lib_code(int rc) {
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

static float *svc__floats(size_t n) {
  size_t bytes = n * sizeof(float);
  if (n == 0)
    return NULL;
  return aligned_alloc(64, (bytes + 63) & ~(size_t)63);
}

static int svc__params_equal(const svc__layer_t *l, const svc_register_t *r) {
  const sbn_layer_params_t *a = &l->params, *b = &r->params;
  if (l->kind != r->kind || l->group_size != r->group_size || a->op != b->op ||
      a->channels != b->channels || a->groups != b->groups ||
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

static svc__layer_t *svc__layer(svc_worker_t *w, uint64_t id, svc_err_t *err) {
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

static uint64_t svc__hash_name(const char *name) {
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

static int svc__poisoned(const svc_worker_t *w, uint64_t name, uint64_t step,
                         uint32_t dir) {
  size_t n = w->npoison < SVC__POISON ? w->npoison : SVC__POISON;
  for (size_t i = 0; i < n; i++)
    if (w->poison[i].name == name && w->poison[i].step == step &&
        w->poison[i].dir == dir)
      return 1;
  return 0;
}

static void svc__poison(svc_worker_t *w, uint64_t name, uint64_t step,
                        uint32_t dir) {
  if (svc__poisoned(w, name, step, dir))
    return;
  w->poison[w->poison_next].name = name;
  w->poison[w->poison_next].step = step;
  w->poison[w->poison_next].dir = dir;
  w->poison_next = (w->poison_next + 1) % SVC__POISON;
  w->npoison++;
}

static void svc__pend_free(svc__pend_t *p) {
  if (p == NULL)
    return;
  svc_request_free(&p->q);
  free(p->y);
  free(p->dx);
  free(p->dw);
  free(p->db);
  free(p->ws);
  free(p->recs);
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

/* An entry that will not complete: a forward's step is dropped (it never
 * ran here), a backward's forward state stays for another try. */
static void svc__pend_abandon(svc_worker_t *w, svc__pend_t *p) {
  p->s->busy = 0;
  if (p->dir == 0) {
    p->s->done = 1;
    svc__step_release(w, p->s);
  }
}

static void svc__pend_reply_error(svc_worker_t *w, svc__pend_t *p,
                                  svc_code_t code, const char *msg) {
  uint8_t *buf = NULL;
  size_t len = 0;
  if (p->token == NULL || w->deliver == NULL)
    return;
  if (svc_encode_error(&p->q.id, code, msg, &buf, &len) != 0)
    return;
  w->deliver(w->deliver_ctx, p->token, buf, len);
}

static void svc__pend_add(svc_worker_t *w, svc__pend_t *p) {
  svc__pend_t **pp = &w->pend;
  while (*pp != NULL)
    pp = &(*pp)->next;
  p->next = NULL;
  *pp = p;
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

/* Whether a training request on l goes through the cross-rank path, or
 * fails (NOT_YET, STALL) before anything is allocated. */
static int svc__sync_check(svc_worker_t *w, const svc__layer_t *l,
                           uint64_t step, uint32_t dir, svc_err_t *err) {
  if (!w->sync_on)
    return svc_fail(err, SVC_NOT_YET,
                    "%s: syncbatchnorm in training needs the cross-rank "
                    "reduction, which this worker does not serve (eval "
                    "works)",
                    dir == 0 ? "forward" : "backward");
  if (l->group_size != 0 && l->group_size != (uint64_t)w->cfg.size)
    return svc_fail(err, SVC_NOT_YET,
                    "group_size: sync groups smaller than the job (%llu of "
                    "%d ranks) are not served yet",
                    (unsigned long long)l->group_size, w->cfg.size);
  if (svc__poisoned(w, svc__hash_name(l->name), step, dir))
    return svc_fail(err, SVC_STALL,
                    "step: layer '%s' step %llu %s stalled earlier and is "
                    "poisoned",
                    l->name, (unsigned long long)step,
                    dir == 0 ? "forward" : "backward");
  return 0;
}

static svc__pend_t *svc__pend_new(svc_worker_t *w, svc__layer_t *l,
                                  uint64_t step, uint32_t dir, void *token) {
  svc__pend_t *p = calloc(1, sizeof *p);
  if (p == NULL)
    return NULL;
  p->recs =
      calloc(l->params.channels > 0 ? l->params.channels : 1, sizeof *p->recs);
  if (p->recs == NULL) {
    free(p);
    return NULL;
  }
  p->name = svc__hash_name(l->name);
  p->step = step;
  p->dir = dir;
  p->fp = svc__fingerprint(l);
  p->l = l;
  p->token = token;
  p->t0 = w->now;
  return p;
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
    return svc_fail(
        err, SVC_NO_FORWARD, "step: layer %llu step %llu has %s",
        (unsigned long long)q->layer, (unsigned long long)q->step,
        s != NULL ? "had its backward already" : "no kept training forward");
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
    switch (q.op) {
      case SVC_OP_HELLO:
        rc = svc__hello(w, &q, reply, reply_len, &err);
        break;
      case SVC_OP_REGISTER:
        rc = svc__register(w, &q, reply, reply_len, &err);
        break;
      case SVC_OP_FORWARD:
        rc = svc__forward(w, &q, token, deferred, reply, reply_len, &err);
        break;
      case SVC_OP_BACKWARD:
        rc = svc__backward(w, &q, token, deferred, reply, reply_len, &err);
        break;
      case SVC_OP_BYE:
        rc = svc_encode_bye(&q.id, reply, reply_len);
        if (rc != 0)
          svc_fail(&err, SVC_RESOURCE, "reply: out of memory");
        *close_after = 1;
        break;
    }
    svc_request_free(&q);
  }
  if (rc == 0)
    return 0;
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
  *allreduces = w->n_allreduces;
  *entries = w->n_fused;
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
    /* An entry already in the fused allreduce still completes (its records
     * are in flight and the running statistics must move on every rank);
     * one not yet negotiated is withdrawn, so this rank contributes
     * nothing and the others see a stall. */
    if (!p->sent && !p->listed) {
      svc__pend_unlink(w, p);
      svc__pend_abandon(w, p);
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

static int svc__gather_begin(svc_worker_t *w) {
  uint32_t n = 0;
  memset(&w->gsend, 0, sizeof w->gsend);
  for (svc__pend_t *p = w->pend; p != NULL && n < SVC__MAXE; p = p->next) {
    svc__gent_t *e = &w->gsend.e[n++];
    e->name = p->name;
    e->step = p->step;
    e->dir = p->dir;
    e->C = (uint32_t)p->l->params.channels;
    e->fp = p->fp;
    e->age = w->now - p->t0;
    p->listed = 1;
  }
  w->gsend.n = n;
  if (w->ops.gather_begin(w->ops.ctx, &w->gsend, w->grecv, sizeof w->gsend) !=
      0)
    return -1;
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

/* Fails a local entry (and the key on this rank) with code and message. */
static void svc__fail_key(svc_worker_t *w, const svc__gent_t *k,
                          svc_code_t code, const char *fmt_missing) {
  svc__pend_t *p;
  svc__poison(w, k->name, k->step, k->dir);
  while ((p = svc__pend_find(w, k)) != NULL) {
    char msg[512];
    snprintf(msg, sizeof msg, "layer '%s' step %llu %s: %s", p->l->name,
             (unsigned long long)k->step, k->dir == 0 ? "forward" : "backward",
             fmt_missing);
    svc__pend_unlink(w, p);
    svc__pend_reply_error(w, p, code, msg);
    svc__pend_abandon(w, p);
    svc__pend_free(p);
  }
}

/* Every rank runs this on the same gathered bytes, so every rank reaches
 * the same decisions: which keys are ready (fused in key order), which
 * stalled, which disagree. */
static int svc__gather_done(svc_worker_t *w) {
  int size = w->cfg.size;
  size_t cap = (size_t)size * SVC__MAXE, nu = 0, nrec = 0, nready = 0;
  svc__gent_t *u = malloc((cap > 0 ? cap : 1) * sizeof *u);
  int rc = 0;
  if (u == NULL)
    return -1;
  for (int r = 0; r < size; r++) {
    const svc__gmsg_t *m = &w->grecv[r];
    for (uint32_t i = 0; i < m->n && i < SVC__MAXE; i++)
      u[nu++] = m->e[i];
  }
  qsort(u, nu, sizeof *u, svc__key_cmp);
  w->rlist_n = 0;
  for (size_t i = 0; i < nu;) {
    size_t j = i;
    int present = 0, agree = 1;
    double age = 0;
    char missing[120];
    size_t ml = 0;
    while (j < nu && svc__key_cmp(&u[i], &u[j]) == 0) {
      if (u[j].fp != u[i].fp || u[j].C != u[i].C)
        agree = 0;
      if (u[j].age > age)
        age = u[j].age;
      present++;
      j++;
    }
    if (!agree) {
      svc__fail_key(w, &u[i], SVC_LAYER_MISMATCH,
                    "the ranks registered this layer with different "
                    "parameters (kind, channels, eps, momentum, affine or "
                    "group size)");
    } else if (present == size) {
      svc__pend_t *p = svc__pend_find(w, &u[i]);
      if (p != NULL) {
        p->sent = 1;
        w->rlist[w->rlist_n++] = p;
        nrec += u[i].C;
        nready++;
      } else {
        rc = -1; /* every rank listed it, so this one must hold it */
      }
    } else if (age > w->stall_timeout) {
      /* Name the ranks that did not list the key. */
      ml = (size_t)snprintf(missing, sizeof missing, "ranks");
      for (int r = 0; r < size && ml < sizeof missing - 16; r++) {
        const svc__gmsg_t *m = &w->grecv[r];
        int has = 0;
        for (uint32_t e = 0; e < m->n && e < SVC__MAXE; e++)
          if (svc__key_cmp(&m->e[e], &u[i]) == 0)
            has = 1;
        if (!has)
          ml += (size_t)snprintf(missing + ml, sizeof missing - ml, " %d", r);
      }
      snprintf(missing + ml, sizeof missing - ml,
               " did not submit it within %g s", w->stall_timeout);
      svc__fail_key(w, &u[i], SVC_STALL, missing);
    }
    i = j;
  }
  free(u);
  /* Entries whose connection went while they were listed are withdrawn
   * now, unless they are being reduced. */
  for (svc__pend_t *p = w->pend, *next; p != NULL; p = next) {
    next = p->next;
    p->listed = 0;
    if (p->token == NULL && !p->sent) {
      svc__pend_unlink(w, p);
      svc__pend_abandon(w, p);
      svc__pend_free(p);
    }
  }
  /* Local entries that arrived after the gather started but whose key was
   * just poisoned fail too. */
  for (svc__pend_t *p = w->pend, *next; p != NULL; p = next) {
    next = p->next;
    if (!p->sent && svc__poisoned(w, p->name, p->step, p->dir)) {
      svc__gent_t k;
      k.name = p->name;
      k.step = p->step;
      k.dir = p->dir;
      svc__fail_key(w, &k, SVC_STALL, "stalled on another rank");
    }
  }
  if (rc != 0 || nready == 0) {
    w->phase = 0;
    return rc;
  }
  free(w->rbuf);
  w->rbuf = malloc(nrec * sizeof *w->rbuf);
  if (w->rbuf == NULL)
    return -1;
  nrec = 0;
  for (size_t i = 0; i < w->rlist_n; i++) {
    size_t C = w->rlist[i]->l->params.channels;
    memcpy(w->rbuf + nrec, w->rlist[i]->recs, C * sizeof *w->rbuf);
    nrec += C;
  }
  if (w->ops.reduce_begin(w->ops.ctx, w->rbuf, nrec) != 0)
    return -1;
  w->n_allreduces++;
  w->n_fused += nready;
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
  s->busy = 0;
  if (p->dir == 0) {
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
  if (buf != NULL) {
    if (p->token != NULL && w->deliver != NULL)
      w->deliver(w->deliver_ctx, p->token, buf, len);
    else
      free(buf);
  }
  svc__prune(w, l);
}

static void svc__reduce_done(svc_worker_t *w) {
  size_t off = 0;
  for (size_t i = 0; i < w->rlist_n; i++) {
    svc__pend_t *p = w->rlist[i];
    svc__complete(w, p, w->rbuf + off);
    off += p->l->params.channels;
    svc__pend_unlink(w, p);
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
    if (w->grecv == NULL || w->rlist == NULL)
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
