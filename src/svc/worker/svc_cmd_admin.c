/* The connection and registry commands: hello, register, bye. */
#include <stdlib.h>
#include <string.h>

#include "svc_obs.h"
#include "svc_worker_int.h"

int svc__cmd_hello(svc__call_t *call) {
  const svc_worker_config_t *cfg = &call->w->cfg;
  const svc_request_t *q = call->q;
  svc_hello_reply_t h;
  /* Version 2 only adds to version 1, so a version 1 client is served. */
  if (q->version < 1 || q->version > SVC_PROTOCOL_VERSION)
    return svc_set_error(SVC_UNSUPPORTED_VERSION,
                         "version: %llu requested, this worker speaks 1 to %d",
                         (unsigned long long)q->version, SVC_PROTOCOL_VERSION);
  memset(&h, 0, sizeof h);
  h.rank = cfg->rank;
  h.size = cfg->size;
  h.max_frame = cfg->limits.max_frame;
  h.max_depth = cfg->limits.max_depth;
  h.max_objects = cfg->limits.max_objects;
  h.max_clients = cfg->max_clients;
  h.max_output = cfg->max_output;
  h.idle_timeout = cfg->idle_timeout;
  h.frame_timeout = cfg->frame_timeout;
  h.keep_steps = cfg->keep_steps;
  if (svc_encode_hello(&q->id, &h, &call->out.buf, &call->out.len) != 0)
    return svc_set_error(SVC_RESOURCE, "reply: out of memory");
  return 0;
}

int svc__cmd_bye(svc__call_t *call) {
  call->close_after = 1;
  svc_log(SVC_LOG_INFO, NULL, -1, "client left (bye)");
  if (svc_encode_bye(&call->q->id, &call->out.buf, &call->out.len) != 0)
    return svc_set_error(SVC_RESOURCE, "reply: out of memory");
  return 0;
}

static int svc__params_equal(const svc__layer_t *l, const svc_register_t *r) {
  return l->kind == r->kind && l->group_size == r->group_size &&
         l->params.ghost_batch == r->params.ghost_batch &&
         svc__lib_params_equal(&l->params, &r->params);
}

/* n floats set to v, for a new layer's parameters and statistics. */
static float *svc__filled(size_t n, float v) {
  float *f = svc__floats(n);
  for (size_t i = 0; f != NULL && i < n; i++)
    f[i] = v;
  return f;
}

/* A new layer's affine parameters and running statistics. Affine
 * parameters start as PyTorch's (ones and zeros); a forward may pass its
 * own. Running statistics start at mean 0, variance 1. Registration needs
 * no frame-sized payload, so a huge shape is refused here rather than
 * allocated. */
static int svc__layer_init(const svc_worker_t *w, svc__layer_t *l) {
  size_t C = 0, cap = w->cfg.limits.max_frame / sizeof(float);
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
  /* The argument that sized the parameters is the one to name: the
   * normalized shape of a layernorm, the channels of every other kind. */
  if (l->wb_numel > cap)
    return svc_set_error(
        SVC_BAD_PARAMS, "%s: %zu parameters exceed what a frame holds",
        l->params.op == SBN_OP_LAYERNORM ? "normalized_shape" : "channels",
        l->wb_numel);
  if (l->wb_numel > 0 && ((l->weight = svc__filled(l->wb_numel, 1)) == NULL ||
                          (l->bias = svc__filled(l->wb_numel, 0)) == NULL))
    return svc_set_error(SVC_RESOURCE, "register: out of memory");
  l->tracking = (l->params.op == SBN_OP_BATCHNORM ||
                 l->params.op == SBN_OP_INSTANCENORM) &&
                l->params.track_running_stats;
  if (!l->tracking)
    return 0;
  if (C > cap)
    return svc_set_error(SVC_BAD_PARAMS,
                         "channels: %zu exceed what a frame holds", C);
  if ((l->running_mean = svc__filled(C, 0)) == NULL ||
      (l->running_var = svc__filled(C, 1)) == NULL)
    return svc_set_error(SVC_RESOURCE, "register: out of memory");
  l->state.running_mean = l->running_mean;
  l->state.running_var = l->running_var;
  return 0;
}

int svc__cmd_register(svc__call_t *call) {
  svc_worker_t *w = call->w;
  const svc_request_t *q = call->q;
  const svc_register_t *r = &q->reg;
  svc__layer_t *l = NULL;
  int rc;
  for (uint32_t i = 0; i < w->nlayers; i++) {
    if (strcmp(w->layers[i]->name, r->name) != 0)
      continue;
    if (!svc__params_equal(w->layers[i], r)) {
      svc_log(SVC_LOG_WARN, r->name, -1,
              "LAYER_MISMATCH: registered again with different parameters");
      return svc_set_error(SVC_LAYER_MISMATCH,
                           "name: layer '%s' is registered with different "
                           "parameters",
                           r->name);
    }
    if (svc_encode_register(&q->id, i, 0, &call->out.buf, &call->out.len) != 0)
      return svc_set_error(SVC_RESOURCE, "reply: out of memory");
    return 0;
  }
  if (r->kind == SVC_KIND_SYNCBATCHNORM &&
      r->group_size > (uint64_t)w->cfg.size)
    return svc_set_error(SVC_BAD_PARAMS,
                         "group_size: %llu exceeds the job's %d ranks",
                         (unsigned long long)r->group_size, w->cfg.size);
  if (w->nlayers >= w->cfg.max_layers)
    return svc_set_error(SVC_RESOURCE, "register: the worker holds %u layers",
                         w->cfg.max_layers);
  if ((l = calloc(1, sizeof *l)) == NULL)
    return svc_set_error(SVC_RESOURCE, "register: out of memory");
  memcpy(l->name, r->name, sizeof l->name);
  l->kind = r->kind;
  l->group_size = r->group_size;
  l->params = r->params;
  l->params.layer_id = w->nlayers;
  if ((rc = sbn_layer_create(&l->params, &w->comm, &l->layer)) != 0) {
    rc = svc_set_error(rc == SBN_ENOMEM ? SVC_RESOURCE : SVC_BAD_PARAMS, "%s",
                       sbn_last_error());
    goto fail;
  }
  if ((rc = svc__layer_init(w, l)) != 0)
    goto fail;
  if (svc_encode_register(&q->id, w->nlayers, 1, &call->out.buf,
                          &call->out.len) != 0) {
    rc = svc_set_error(SVC_RESOURCE, "register: out of memory");
    goto fail;
  }
  svc__layer_append(w, l);
  svc_log(SVC_LOG_DEBUG, l->name, -1, "registered");
  return 0;
fail:
  svc__layer_free(w, l);
  return rc;
}
