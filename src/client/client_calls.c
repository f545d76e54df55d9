/* syncbn client: the single request calls (client.h). */
#include <stdlib.h>
#include <string.h>

#include "client_internal.h"

/* ------------------------------------------------------------------ */
/* register */

typedef enum {
  SBN__K_BN,   /* batchnorm, instancenorm */
  SBN__K_SYNC, /* syncbatchnorm */
  SBN__K_GN,
  SBN__K_LN,
  SBN__K_DROPOUT
} sbn__kind_t;

static int sbn__kind_parse(const char *kind, sbn__kind_t *k) {
  static const struct {
    const char *name;
    sbn__kind_t k;
  } kinds[] = {{"batchnorm", SBN__K_BN},       {"instancenorm", SBN__K_BN},
               {"syncbatchnorm", SBN__K_SYNC}, {"groupnorm", SBN__K_GN},
               {"layernorm", SBN__K_LN},       {"dropout", SBN__K_DROPOUT}};
  for (size_t i = 0; i < sizeof kinds / sizeof *kinds; i++)
    if (strcmp(kind, kinds[i].name) == 0) {
      *k = kinds[i].k;
      return 0;
    }
  return -1;
}

/* Packs the kind's parameters: the entries of register's map besides op,
 * id, name and kind (nparams in sbn_client_register counts them). */
static int sbn__pack_params(msgpack_packer *pk, sbn__kind_t k,
                            const sbn_layer_params_t *prm,
                            uint32_t group_size) {
  int rc = 0, bn = k == SBN__K_BN || k == SBN__K_SYNC;
  if (k == SBN__K_DROPOUT) {
    rc |= sbn__key(pk, "p");
    rc |= msgpack_pack_double(pk, prm->p);
    rc |= sbn__key(pk, "seed");
    return rc | msgpack_pack_uint32(pk, prm->seed);
  }
  if (k == SBN__K_LN) {
    rc |= sbn__key(pk, "normalized_shape");
    rc |= msgpack_pack_array(pk, (size_t)prm->norm_ndim);
    for (int i = 0; i < prm->norm_ndim; i++)
      rc |= msgpack_pack_uint64(pk, prm->norm_shape[i]);
  } else {
    rc |= sbn__key(pk, "channels");
    rc |= msgpack_pack_uint64(pk, prm->channels);
  }
  if (k == SBN__K_GN) {
    rc |= sbn__key(pk, "groups");
    rc |= msgpack_pack_uint64(pk, prm->groups);
  }
  rc |= sbn__key(pk, "eps");
  rc |= msgpack_pack_double(pk, prm->eps);
  rc |= sbn__key(pk, "affine");
  rc |= prm->affine ? msgpack_pack_true(pk) : msgpack_pack_false(pk);
  if (bn) {
    rc |= sbn__key(pk, "momentum");
    rc |= prm->cumulative ? msgpack_pack_nil(pk)
                          : msgpack_pack_double(pk, prm->momentum);
    rc |= sbn__key(pk, "track_running_stats");
    rc |= prm->track_running_stats ? msgpack_pack_true(pk)
                                   : msgpack_pack_false(pk);
  }
  if (k == SBN__K_SYNC) {
    rc |= sbn__key(pk, "group_size");
    rc |= msgpack_pack_uint32(pk, group_size);
  }
  /* Sent only when on, so that a request without ghost batches stays a
   * version 3 request. */
  if (bn && prm->ghost_batch > 0) {
    rc |= sbn__key(pk, "ghost_batch");
    rc |= msgpack_pack_uint64(pk, prm->ghost_batch);
  }
  return rc;
}

int sbn_client_register(sbn_client_t *c, const char *name, const char *kind,
                        const sbn_layer_params_t *prm, uint32_t group_size,
                        uint64_t *layer, int *created) {
  /* Entries besides op, id, name and kind, by sbn__kind_t: channels eps
   * momentum affine track (+ group_size); channels groups eps affine;
   * normalized_shape eps affine; p seed. BatchNorm kinds add ghost_batch
   * when it is on. */
  static const size_t nparams[] = {5, 6, 4, 3, 2};
  sbn__req_t r;
  sbn__reply_t p;
  sbn__kind_t k;
  uint64_t id;
  int rc = sbn__begin(c, "register"), cr;
  if (rc != 0)
    return rc;
  if (name == NULL || kind == NULL || prm == NULL || layer == NULL)
    return sbn__fail(c, SBN_EINVAL, "%s: NULL",
                     name == NULL   ? "name"
                     : kind == NULL ? "kind"
                     : prm == NULL  ? "params"
                                    : "layer");
  if (sbn__kind_parse(kind, &k) != 0)
    return sbn__fail(c, SBN_EINVAL, "kind: unknown layer kind '%s'", kind);
  sbn__req_start(
      c, &r, "register",
      4 + nparams[k] +
          ((k == SBN__K_BN || k == SBN__K_SYNC) && prm->ghost_batch > 0));
  r.bad |= sbn__key(&r.pk, "name");
  r.bad |= sbn__key(&r.pk, name);
  r.bad |= sbn__key(&r.pk, "kind");
  r.bad |= sbn__key(&r.pk, kind);
  r.bad |= sbn__pack_params(&r.pk, k, prm, group_size);
  if ((rc = sbn__call(c, &r, &p)) != 0)
    return rc;
  if (sbn__uint_field(&p.root, "layer", &id) != 0 ||
      sbn__bool_field(&p.root, "created", &cr) != 0) {
    sbn__reply_free(&p);
    return sbn__fail(c, SBN_EFORMAT, "reply lacks 'layer' or 'created'");
  }
  *layer = id;
  if (created != NULL)
    *created = cr;
  sbn__reply_free(&p);
  return 0;
}

/* ------------------------------------------------------------------ */
/* forward, backward */

/* The element count of desc, or the failure naming it. */
static int sbn__numel(sbn_client_t *c, const sbn_tensor_desc_t *desc,
                      size_t *numel) {
  int rc = sbn_desc_numel(desc, numel);
  return rc != 0 ? sbn__fail(c, rc, "desc: %s", sbn_last_error()) : 0;
}

int sbn_client_forward(sbn_client_t *c, uint64_t layer, uint64_t step,
                       int train, const sbn_tensor_desc_t *desc, const float *x,
                       const float *weight, const float *bias, size_t wb_numel,
                       float *y) {
  sbn__req_t r;
  sbn__reply_t p;
  size_t numel;
  int rc = sbn__begin(c, "forward");
  if (rc != 0 || (rc = sbn__numel(c, desc, &numel)) != 0)
    return rc;
  sbn__req_init(c, &r);
  if (x == NULL && numel > 0)
    return sbn__fail(c, SBN_EINVAL, "x: NULL for %zu floats", numel);
  /* x goes out from the caller's buffer, after the rest of the frame. */
  r.bad |= sbn__pack_forward(&r.pk, r.id, layer, step, train, desc, NULL, numel,
                             weight, bias, wb_numel);
  if ((rc = sbn__call_tail(c, &r, x, numel * sizeof(float), &p)) != 0)
    return rc;
  rc = sbn__take_tensor(c, &p.root, "y", desc, y);
  sbn__reply_free(&p);
  return rc;
}

/* Backward's dweight and dbias, when the reply has them: wb_numel floats
 * each. The parameter shape is the layer's (C, or LayerNorm's normalized
 * shape); only its size is checked here. */
int sbn__take_dparams(sbn_client_t *c, const msgpack_object *root,
                      float *dweight, float *dbias, size_t wb_numel) {
  svc_tensor_t t;
  sbn_tensor_desc_t wd;
  int rc;
  if (sbn__get(root, "dweight") == NULL || (dweight == NULL && dbias == NULL))
    return 0;
  if ((rc = sbn__decode_f32(c, root, "dweight", NULL, &t)) != 0)
    return rc;
  wd = t.desc;
  rc = t.numel == wb_numel
           ? 0
           : sbn__fail(c, SBN_EFORMAT, "reply: dweight is not %zu floats",
                       wb_numel);
  if (rc == 0 && dweight != NULL)
    memcpy(dweight, t.data, t.numel * sizeof(float));
  svc_tensor_free(&t);
  if (rc == 0 && dbias != NULL)
    rc = sbn__take_tensor(c, root, "dbias", &wd, dbias);
  return rc;
}

int sbn_client_backward(sbn_client_t *c, uint64_t layer, uint64_t step,
                        const sbn_tensor_desc_t *desc, const float *dy,
                        float *dx, float *dweight, float *dbias,
                        size_t wb_numel) {
  sbn__req_t r;
  sbn__reply_t p;
  size_t numel;
  int rc = sbn__begin(c, "backward");
  if (rc != 0 || (rc = sbn__numel(c, desc, &numel)) != 0)
    return rc;
  sbn__req_init(c, &r);
  if (dy == NULL && numel > 0)
    return sbn__fail(c, SBN_EINVAL, "dy: NULL for %zu floats", numel);
  r.bad |= sbn__pack_backward(&r.pk, r.id, layer, step, desc, NULL, numel);
  if ((rc = sbn__call_tail(c, &r, dy, numel * sizeof(float), &p)) != 0)
    return rc;
  rc = sbn__take_tensor(c, &p.root, "dx", desc, dx);
  if (rc == 0)
    rc = sbn__take_dparams(c, &p.root, dweight, dbias, wb_numel);
  sbn__reply_free(&p);
  return rc;
}

/* ------------------------------------------------------------------ */
/* stats, stats_backward */

int sbn_client_stats(sbn_client_t *c, uint64_t layer, uint64_t step,
                     size_t channels, uint64_t count, const double *counts,
                     const double *mean, const double *m2,
                     sbn_client_stats_t *out) {
  sbn__req_t r;
  sbn__reply_t p;
  double *outs[SVC_STATS_OUTS] = {NULL, NULL, NULL, NULL, NULL};
  unsigned want = 0;
  int rc = sbn__begin(c, "stats");
  if (rc != 0 ||
      (rc = sbn__check_vecs("stats", channels, mean, "mean", m2, "m2")) != 0)
    return rc;
  if (out != NULL) {
    outs[0] = out->count, outs[1] = out->mean, outs[2] = out->var;
    outs[3] = out->var_unbiased, outs[4] = out->invstd;
  }
  /* Only the vectors the caller takes travel back (`want`); a worker that
   * predates the key ignores it and sends all five, of which the same
   * ones are read. */
  for (int i = 0; i < SVC_STATS_OUTS; i++)
    want |= outs[i] != NULL ? 1u << i : 0;
  sbn__req_init(c, &r);
  r.bad |= sbn__pack_stats(&r.pk, &r, r.id, layer, step, channels, count,
                           counts, mean, m2, want);
  if ((rc = sbn__call(c, &r, &p)) != 0)
    return rc;
  rc = sbn__take_stats(c, &p.root, channels, outs[0], outs[1], outs[2], outs[3],
                       outs[4]);
  sbn__reply_free(&p);
  return rc;
}

int sbn_client_stats_backward(sbn_client_t *c, uint64_t layer, uint64_t step,
                              size_t channels, const double *sum_dy,
                              const double *sum_dy_xhat, double *group_sum_dy,
                              double *group_sum_dy_xhat) {
  sbn__req_t r;
  sbn__reply_t p;
  int rc = sbn__begin(c, "stats_backward");
  if (rc != 0 ||
      (rc = sbn__check_vecs("stats_backward", channels, sum_dy, "sum_dy",
                            sum_dy_xhat, "sum_dy_xhat")) != 0)
    return rc;
  sbn__req_init(c, &r);
  r.bad |= sbn__pack_stats_backward(&r.pk, &r, r.id, layer, step, channels,
                                    sum_dy, sum_dy_xhat);
  if ((rc = sbn__call(c, &r, &p)) != 0)
    return rc;
  if ((rc = sbn__take_vec64(c, &p.root, "sum_dy", channels, group_sum_dy)) == 0)
    rc =
        sbn__take_vec64(c, &p.root, "sum_dy_xhat", channels, group_sum_dy_xhat);
  sbn__reply_free(&p);
  return rc;
}

/* ------------------------------------------------------------------ */
/* get_state, set_state */

void sbn_client_state_free(sbn_client_state_t *s) {
  if (s == NULL)
    return;
  free(s->running_mean);
  free(s->running_var);
  free(s->weight);
  free(s->bias);
  memset(s, 0, sizeof *s);
}

/* Decodes the f32 tensor key (of shape want, if not NULL) and moves its
 * data into *dst (freed with free()); desc (may be NULL) gets its shape
 * and numel (may be NULL) its size. */
static int sbn__take_owned(sbn_client_t *c, const msgpack_object *root,
                           const char *key, const sbn_tensor_desc_t *want,
                           float **dst, sbn_tensor_desc_t *desc,
                           size_t *numel) {
  svc_tensor_t t;
  int rc = sbn__decode_f32(c, root, key, want, &t);
  if (rc != 0)
    return rc;
  if (desc != NULL)
    *desc = t.desc;
  if (numel != NULL)
    *numel = t.numel;
  *dst = t.data;
  t.data = NULL;
  svc_tensor_free(&t);
  return 0;
}

/* get_state's running statistics, if the layer tracks them. */
static int sbn__take_running(sbn_client_t *c, const msgpack_object *root,
                             sbn_client_state_t *out) {
  sbn_tensor_desc_t cd;
  uint64_t nbt;
  int rc;
  if (sbn__get(root, "running_mean") == NULL)
    return 0;
  if ((rc = sbn__take_owned(c, root, "running_mean", NULL, &out->running_mean,
                            &cd, &out->channels)) != 0)
    return rc;
  if (cd.ndim != 1)
    return sbn__fail(c, SBN_EFORMAT, "reply: running_mean is not 1-D");
  if ((rc = sbn__take_owned(c, root, "running_var", &cd, &out->running_var,
                            NULL, NULL)) != 0)
    return rc;
  if (sbn__uint_field(root, "num_batches_tracked", &nbt) != 0 ||
      nbt > INT64_MAX)
    return sbn__fail(c, SBN_EFORMAT, "reply lacks 'num_batches_tracked'");
  out->num_batches_tracked = (int64_t)nbt;
  out->has_running_stats = 1;
  out->has_num_batches_tracked = 1;
  return 0;
}

/* get_state's affine parameters, if the layer has them. */
static int sbn__take_affine(sbn_client_t *c, const msgpack_object *root,
                            sbn_client_state_t *out) {
  int rc;
  if (sbn__get(root, "weight") == NULL)
    return 0;
  if ((rc = sbn__take_owned(c, root, "weight", NULL, &out->weight,
                            &out->param_desc, NULL)) != 0 ||
      (rc = sbn__take_owned(c, root, "bias", &out->param_desc, &out->bias, NULL,
                            NULL)) != 0)
    return rc;
  out->has_affine = 1;
  return 0;
}

int sbn_client_get_state(sbn_client_t *c, uint64_t layer,
                         sbn_client_state_t *out) {
  sbn__req_t r;
  sbn__reply_t p;
  const msgpack_object *kind;
  int rc = sbn__begin(c, "get_state");
  if (rc != 0)
    return rc;
  if (out == NULL)
    return sbn__fail(c, SBN_EINVAL, "out: NULL");
  memset(out, 0, sizeof *out);
  sbn__req_start(c, &r, "get_state", 3);
  r.bad |= sbn__key(&r.pk, "layer");
  r.bad |= msgpack_pack_uint64(&r.pk, layer);
  if ((rc = sbn__call(c, &r, &p)) != 0)
    return rc;
  kind = sbn__get(&p.root, "kind");
  if (kind == NULL || kind->type != MSGPACK_OBJECT_STR ||
      kind->via.str.size >= sizeof out->kind) {
    rc = sbn__fail(c, SBN_EFORMAT, "reply lacks 'kind'");
    goto fail;
  }
  memcpy(out->kind, kind->via.str.ptr, kind->via.str.size);
  if ((rc = sbn__take_running(c, &p.root, out)) != 0 ||
      (rc = sbn__take_affine(c, &p.root, out)) != 0)
    goto fail;
  sbn__reply_free(&p);
  return 0;
fail:
  sbn__reply_free(&p);
  sbn_client_state_free(out);
  return rc;
}

/* Packs key and an f32 tensor when data is not NULL; 1 entry or none. */
static int sbn__pack_opt_tensor(msgpack_packer *pk, const char *key,
                                const sbn_tensor_desc_t *desc,
                                const float *data, size_t numel) {
  if (data == NULL)
    return 0;
  return sbn__key(pk, key) | svc_pack_tensor(pk, desc, data, numel);
}

int sbn_client_set_state(sbn_client_t *c, uint64_t layer,
                         const sbn_client_state_t *s) {
  sbn__req_t r;
  sbn__reply_t p;
  sbn_tensor_desc_t cd, pd;
  size_t n = 3, pn = 0;
  int rc = sbn__begin(c, "set_state");
  if (rc != 0)
    return rc;
  if (s == NULL)
    return sbn__fail(c, SBN_EINVAL, "state: NULL");
  memset(&cd, 0, sizeof cd);
  cd.ndim = 1;
  cd.dims[0] = s->channels;
  pd = s->param_desc;
  /* A 1-D parameter shape may be left out: it is [channels]. */
  if (pd.ndim == 0)
    pd = cd;
  if ((s->weight != NULL || s->bias != NULL) &&
      (rc = sbn_desc_numel(&pd, &pn)) != 0)
    return sbn__fail(c, rc, "param_desc: %s", sbn_last_error());
  if (s->has_num_batches_tracked && s->num_batches_tracked < 0)
    return sbn__fail(c, SBN_EINVAL, "num_batches_tracked: %lld is negative",
                     (long long)s->num_batches_tracked);
  n += (s->running_mean != NULL) + (s->running_var != NULL) +
       (s->weight != NULL) + (s->bias != NULL) +
       (s->has_num_batches_tracked != 0);
  sbn__req_start(c, &r, "set_state", n);
  r.bad |= sbn__key(&r.pk, "layer");
  r.bad |= msgpack_pack_uint64(&r.pk, layer);
  r.bad |= sbn__pack_opt_tensor(&r.pk, "running_mean", &cd, s->running_mean,
                                s->channels);
  r.bad |= sbn__pack_opt_tensor(&r.pk, "running_var", &cd, s->running_var,
                                s->channels);
  if (s->has_num_batches_tracked) {
    r.bad |= sbn__key(&r.pk, "num_batches_tracked");
    r.bad |= msgpack_pack_uint64(&r.pk, (uint64_t)s->num_batches_tracked);
  }
  r.bad |= sbn__pack_opt_tensor(&r.pk, "weight", &pd, s->weight, pn);
  r.bad |= sbn__pack_opt_tensor(&r.pk, "bias", &pd, s->bias, pn);
  if ((rc = sbn__call(c, &r, &p)) != 0)
    return rc;
  sbn__reply_free(&p);
  return 0;
}

/* ------------------------------------------------------------------ */
/* checkpoint_save, checkpoint_load */

static int sbn__checkpoint(sbn_client_t *c, const char *op, const char *done,
                           const char *name, uint64_t *layers) {
  sbn__req_t r;
  sbn__reply_t p;
  uint64_t nl = 0;
  int rc = sbn__begin(c, op), ok = 0;
  if (rc != 0)
    return rc;
  if (name == NULL)
    return sbn__fail(c, SBN_EINVAL, "name: NULL");
  sbn__req_start(c, &r, op, 3);
  r.bad |= sbn__key(&r.pk, "name");
  r.bad |= sbn__key(&r.pk, name);
  if ((rc = sbn__call(c, &r, &p)) != 0)
    return rc;
  if (sbn__uint_field(&p.root, "layers", &nl) != 0 ||
      sbn__bool_field(&p.root, done, &ok) != 0 || !ok) {
    sbn__reply_free(&p);
    return sbn__fail(c, SBN_EFORMAT, "reply lacks '%s'", done);
  }
  if (layers != NULL)
    *layers = nl;
  sbn__reply_free(&p);
  return 0;
}

int sbn_client_checkpoint_save(sbn_client_t *c, const char *name,
                               uint64_t *layers) {
  return sbn__checkpoint(c, "checkpoint_save", "saved", name, layers);
}

int sbn_client_checkpoint_load(sbn_client_t *c, const char *name,
                               uint64_t *layers) {
  return sbn__checkpoint(c, "checkpoint_load", "loaded", name, layers);
}
