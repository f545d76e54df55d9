/* The syncbnd codec's decoding: typed reads of msgpack objects, tensors,
 * and requests (see svc_codec.h). */
#include <msgpack.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "svc_codec.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the codec copies f32 payloads as is: a little-endian host is needed"
#endif

/* ------------------------------------------------------------------ */
/* Typed reads of msgpack objects */

static int svc__str_eq(const msgpack_object *o, const char *s) {
  size_t n = o->via.str.size;
  return o->type == MSGPACK_OBJECT_STR && n > 0 && o->via.str.ptr[0] == s[0] &&
         strlen(s) == n && memcmp(o->via.str.ptr, s, n) == 0;
}

static int svc__get_uint(const msgpack_object *o, const char *key, uint64_t max,
                         uint64_t *out) {
  if (o->type != MSGPACK_OBJECT_POSITIVE_INTEGER)
    return svc_set_error(SVC_BAD_REQUEST, "%s: expected a non-negative integer",
                         key);
  if (o->via.u64 > max)
    return svc_set_error(SVC_BAD_REQUEST, "%s: %llu exceeds %llu", key,
                         (unsigned long long)o->via.u64,
                         (unsigned long long)max);
  *out = o->via.u64;
  return 0;
}

static int svc__get_num(const msgpack_object *o, const char *key, double *out) {
  switch (o->type) {
    case MSGPACK_OBJECT_FLOAT32:
    case MSGPACK_OBJECT_FLOAT64:
      *out = o->via.f64;
      return 0;
    case MSGPACK_OBJECT_POSITIVE_INTEGER:
      *out = (double)o->via.u64;
      return 0;
    case MSGPACK_OBJECT_NEGATIVE_INTEGER:
      *out = (double)o->via.i64;
      return 0;
    default:
      return svc_set_error(SVC_BAD_REQUEST, "%s: expected a number", key);
  }
}

static int svc__get_bool(const msgpack_object *o, const char *key, int *out) {
  if (o->type != MSGPACK_OBJECT_BOOLEAN)
    return svc_set_error(SVC_BAD_REQUEST, "%s: expected a boolean", key);
  *out = o->via.boolean ? 1 : 0;
  return 0;
}

/* Protocol 6: a tensor whose bytes are in a shared-memory region
 * (`region` and `offset` in place of `data`); only the worker's copy-in
 * (svc_shm_req.c) accepts one, where flags has bit 2. */
static int svc__tensor_ref(const msgpack_object *region,
                           const msgpack_object *offset,
                           const msgpack_object *data, const char *what,
                           int flags, svc_tensor_t *t) {
  if (!(flags & 2))
    return svc_set_error(SVC_BAD_TENSOR,
                         "%s: 'region' and 'offset' are accepted for a "
                         "forward's x and a backward's dy only",
                         what);
  if (data != NULL || region == NULL || offset == NULL)
    return svc_set_error(SVC_BAD_TENSOR,
                         "%s: a shared-memory tensor has 'region' and "
                         "'offset' and no 'data'",
                         what);
  if (region->type != MSGPACK_OBJECT_POSITIVE_INTEGER ||
      offset->type != MSGPACK_OBJECT_POSITIVE_INTEGER)
    return svc_set_error(SVC_BAD_TENSOR,
                         "%s: 'region' and 'offset' must be non-negative "
                         "integers",
                         what);
  t->shm = 1;
  t->shm_region = region->via.u64;
  t->shm_offset = offset->via.u64;
  return 0;
}

/* Validates a tensor map: keys, dtype (f32, or f64 where allow_f64 has
 * bit 1; bit 2 admits a shared-memory tensor, protocol 6),
 * shape (overflow-checked) and payload size. Fills t->desc and t->numel
 * and points *payload at the data bytes inside the frame; copies nothing. */
static int svc__tensor_parse(const msgpack_object *o, const char *what,
                             int allow_f64, svc_tensor_t *t, size_t *elsz,
                             const char **payload) {
  const msgpack_object *dtype = NULL, *shape = NULL, *data = NULL,
                       *layout = NULL, *region = NULL, *offset = NULL;
  size_t numel = 1;
  int rc;
  memset(t, 0, sizeof *t);
  if (o->type != MSGPACK_OBJECT_MAP)
    return svc_set_error(SVC_BAD_TENSOR, "%s: expected a tensor map", what);
  for (uint32_t i = 0; i < o->via.map.size; i++) {
    const msgpack_object *k = &o->via.map.ptr[i].key;
    const msgpack_object *v = &o->via.map.ptr[i].val;
    const msgpack_object **slot = NULL;
    if (svc__str_eq(k, "dtype"))
      slot = &dtype;
    else if (svc__str_eq(k, "shape"))
      slot = &shape;
    else if (svc__str_eq(k, "data"))
      slot = &data;
    else if (svc__str_eq(k, "layout"))
      slot = &layout;
    else if (svc__str_eq(k, "region"))
      slot = &region;
    else if (svc__str_eq(k, "offset"))
      slot = &offset;
    else if (k->type != MSGPACK_OBJECT_STR)
      return svc_set_error(SVC_BAD_TENSOR, "%s: keys must be strings", what);
    if (slot == NULL)
      continue;
    if (*slot != NULL)
      return svc_set_error(SVC_BAD_TENSOR, "%s: repeated key '%.*s'", what,
                           (int)k->via.str.size, k->via.str.ptr);
    *slot = v;
  }
  if ((region != NULL || offset != NULL) &&
      (rc = svc__tensor_ref(region, offset, data, what, allow_f64, t)) != 0)
    return rc;
  if (t->shm)
    data = region; /* stands in below for the presence check */
  if (dtype == NULL || shape == NULL || data == NULL)
    return svc_set_error(SVC_BAD_TENSOR, "%s: missing '%s'", what,
                         dtype == NULL   ? "dtype"
                         : shape == NULL ? "shape"
                                         : "data");
  if (svc__str_eq(dtype, "f32"))
    *elsz = sizeof(float);
  else if ((allow_f64 & 1) && svc__str_eq(dtype, "f64"))
    *elsz = sizeof(double);
  else
    return svc_set_error(
        SVC_BAD_TENSOR, "%s.dtype: only %s supported", what,
        (allow_f64 & 1) ? "\"f32\" and \"f64\" are" : "\"f32\" is");
  if (shape->type != MSGPACK_OBJECT_ARRAY || shape->via.array.size < 1 ||
      shape->via.array.size > SBN_MAX_DIMS)
    return svc_set_error(SVC_BAD_TENSOR,
                         "%s.shape: expected an array of 1 to %d sizes", what,
                         SBN_MAX_DIMS);
  t->desc.ndim = (int)shape->via.array.size;
  t->desc.layout = SBN_LAYOUT_NCHW;
  for (uint32_t i = 0; i < shape->via.array.size; i++) {
    const msgpack_object *d = &shape->via.array.ptr[i];
    if (d->type != MSGPACK_OBJECT_POSITIVE_INTEGER || d->via.u64 > SIZE_MAX)
      return svc_set_error(SVC_BAD_TENSOR,
                           "%s.shape[%u]: expected a non-negative integer",
                           what, i);
    t->desc.dims[i] = (size_t)d->via.u64;
    /* A product that overflows cannot match any payload; say so rather
     * than wrap around to a small number that might. */
    if (t->desc.dims[i] != 0 && numel > SIZE_MAX / t->desc.dims[i])
      return svc_set_error(SVC_BAD_TENSOR, "%s.shape: the product overflows",
                           what);
    numel *= t->desc.dims[i];
  }
  if (layout != NULL) {
    if (svc__str_eq(layout, "nchw"))
      t->desc.layout = SBN_LAYOUT_NCHW;
    else if (svc__str_eq(layout, "nhwc"))
      t->desc.layout = SBN_LAYOUT_NHWC;
    else
      return svc_set_error(SVC_BAD_TENSOR,
                           "%s.layout: expected \"nchw\" or \"nhwc\"", what);
  }
  if (t->shm && numel > SIZE_MAX / *elsz)
    return svc_set_error(SVC_BAD_TENSOR, "%s.shape: the product overflows",
                         what);
  t->numel = numel;
  if (t->shm)
    return 0;
  if (data->type != MSGPACK_OBJECT_BIN)
    return svc_set_error(SVC_BAD_TENSOR, "%s.data: expected bin", what);
  if (numel > SIZE_MAX / *elsz || numel * *elsz != data->via.bin.size)
    return svc_set_error(
        SVC_BAD_TENSOR,
        "%s.data: %u bytes, shape needs %zu elements of %zu bytes", what,
        data->via.bin.size, numel, *elsz);
  t->numel = numel;
  *payload = data->via.bin.ptr;
  return 0;
}

/* A tensor that may be named in a shared-memory region (allow_shm) or
 * carries its bytes, which are copied. */
static int svc__decode_tensor_in(const msgpack_object *o, const char *what,
                                 int allow_shm, svc_tensor_t *t) {
  int rc;
  const char *payload = NULL;
  size_t elsz = 0, bytes;
  if ((rc = svc__tensor_parse(o, what, allow_shm ? 2 : 0, t, &elsz,
                              &payload)) != 0)
    return rc;
  if (t->shm) {
    t->present = 1;
    return 0;
  }
  bytes = t->numel * sizeof(float);
  if (bytes > 0) {
    /* The payload sits at any offset in the frame; kernels want aligned
     * floats, so the tensor gets its own copy. */
    size_t padded = (bytes + 63) & ~(size_t)63;
    t->data = aligned_alloc(64, padded);
    if (t->data == NULL)
      return svc_set_error(SVC_RESOURCE, "%s: out of memory (%zu bytes)", what,
                           bytes);
    memcpy(t->data, payload, bytes);
  }
  t->present = 1;
  return 0;
}

int svc_decode_tensor(const msgpack_object *o, const char *what,
                      svc_tensor_t *t) {
  return svc__decode_tensor_in(o, what, 0, t);
}

int svc_decode_tensor_view(const msgpack_object *o, const char *what,
                           svc_tensor_t *t, const uint8_t **payload) {
  size_t elsz = 0;
  int rc = svc__tensor_parse(o, what, 0, t, &elsz, (const char **)payload);
  t->present = rc == 0;
  return rc;
}

/* A per-channel vector: a 1-D tensor of f32 or f64, widened to double;
 * with allow_scalar, a non-negative integer stands for "this value in
 * every channel". */
static int svc__decode_vec(const msgpack_object *o, const char *what,
                           int allow_scalar, svc_vec_t *v) {
  int rc;
  svc_tensor_t t;
  const char *payload = NULL;
  size_t elsz = 0;
  memset(v, 0, sizeof *v);
  if (allow_scalar && o->type == MSGPACK_OBJECT_POSITIVE_INTEGER) {
    if ((v->v = malloc(sizeof *v->v)) == NULL)
      return svc_set_error(SVC_RESOURCE, "%s: out of memory", what);
    v->v[0] = (double)o->via.u64;
    v->n = 1;
    v->scalar = 1;
    v->present = 1;
    return 0;
  }
  if (allow_scalar && o->type != MSGPACK_OBJECT_MAP)
    return svc_set_error(
        SVC_BAD_TENSOR,
        "%s: expected a non-negative integer or a 1-D tensor map", what);
  if ((rc = svc__tensor_parse(o, what, 1, &t, &elsz, &payload)) != 0)
    return rc;
  if (t.desc.ndim != 1)
    return svc_set_error(SVC_BAD_TENSOR, "%s: expected a 1-D tensor", what);
  if ((v->v = malloc((t.numel > 0 ? t.numel : 1) * sizeof *v->v)) == NULL)
    return svc_set_error(SVC_RESOURCE, "%s: out of memory", what);
  /* f64 payloads are copied whole; f32 ones are widened one by one. */
  if (elsz == sizeof(double) && t.numel > 0)
    memcpy(v->v, payload, t.numel * sizeof(double));
  for (size_t i = 0; elsz == sizeof(float) && i < t.numel; i++) {
    float f;
    memcpy(&f, payload + i * sizeof f, sizeof f);
    v->v[i] = f;
  }
  v->n = t.numel;
  v->present = 1;
  return 0;
}

/* ------------------------------------------------------------------ */
/* Requests */

void svc_request_free(svc_request_t *req) {
  svc_tensor_free(&req->x);
  svc_tensor_free(&req->weight);
  svc_tensor_free(&req->bias);
  svc_tensor_free(&req->running_mean);
  svc_tensor_free(&req->running_var);
  free(req->count.v);
  free(req->mean.v);
  free(req->m2.v);
  for (size_t i = 0; i < req->nsub; i++)
    svc_request_free(&req->sub[i]);
  free(req->sub);
  req->count.v = req->mean.v = req->m2.v = NULL;
  req->sub = NULL;
  req->nsub = 0;
}

/* The keys a request may carry; a request's map is sorted into this
 * table first, so that each op then reads its keys by index. */
enum {
  K_OP,
  K_ID,
  K_VERSION,
  K_NAME,
  K_KIND,
  K_CHANNELS,
  K_GROUPS,
  K_NORMALIZED_SHAPE,
  K_EPS,
  K_MOMENTUM,
  K_AFFINE,
  K_TRACK,
  K_GROUP_SIZE,
  K_P,
  K_SEED,
  K_LAYER,
  K_STEP,
  K_TRAIN,
  K_X,
  K_DY,
  K_WEIGHT,
  K_BIAS,
  K_TOKEN,
  K_REQUESTS,
  K_CNT,
  K_MEAN,
  K_M2,
  K_SUM_DY,
  K_SUM_DY_XHAT,
  K_RUNNING_MEAN,
  K_RUNNING_VAR,
  K_NBT,
  K_GHOST_BATCH,
  K_SIZE,
  K_Y_AT,
  K_DX_AT,
  K_X_STAYS,
  K_WANT,
  K_COUNT
};
static const char *const svc__keys[K_COUNT] = {
    "op",          "id",
    "version",     "name",
    "kind",        "channels",
    "groups",      "normalized_shape",
    "eps",         "momentum",
    "affine",      "track_running_stats",
    "group_size",  "p",
    "seed",        "layer",
    "step",        "train",
    "x",           "dy",
    "weight",      "bias",
    "token",       "requests",
    "count",       "mean",
    "m2",          "sum_dy",
    "sum_dy_xhat", "running_mean",
    "running_var", "num_batches_tracked",
    "ghost_batch", "size",
    "y_at",        "dx_at",
    "x_stays",     "want"};

/* The optional parameters of a register request, over the kind's
 * defaults: a flat list of keys, each read and stored. */
static int svc__decode_layer_params(const msgpack_object *const *k,
                                    svc_register_t *r) {
  int rc;
  sbn_layer_params_t *p = &r->params;
  uint64_t u = 0;
  double d;
  int b = 0;
  /* Channel counts and group counts above 2^32 cannot come with any
   * frame-sized tensor; the cap keeps later arithmetic far from overflow. */
  if (k[K_CHANNELS] != NULL) {
    if ((rc = svc__get_uint(k[K_CHANNELS], "channels", UINT32_MAX, &u)) != 0)
      return rc;
    p->channels = (size_t)u;
  }
  if (k[K_GROUPS] != NULL) {
    if ((rc = svc__get_uint(k[K_GROUPS], "groups", UINT32_MAX, &u)) != 0)
      return rc;
    p->groups = (size_t)u;
  }
  if (k[K_NORMALIZED_SHAPE] != NULL) {
    const msgpack_object *s = k[K_NORMALIZED_SHAPE];
    if (s->type != MSGPACK_OBJECT_ARRAY || s->via.array.size < 1 ||
        s->via.array.size > SBN_MAX_DIMS)
      return svc_set_error(
          SVC_BAD_REQUEST,
          "normalized_shape: expected an array of 1 to %d sizes", SBN_MAX_DIMS);
    p->norm_ndim = (int)s->via.array.size;
    for (uint32_t i = 0; i < s->via.array.size; i++) {
      char key[32];
      snprintf(key, sizeof key, "normalized_shape[%u]", i);
      if ((rc = svc__get_uint(&s->via.array.ptr[i], key, UINT32_MAX, &u)) != 0)
        return rc;
      p->norm_shape[i] = (size_t)u;
    }
  }
  if (k[K_EPS] != NULL && (rc = svc__get_num(k[K_EPS], "eps", &p->eps)) != 0)
    return rc;
  if (k[K_MOMENTUM] != NULL) {
    /* nil is PyTorch's momentum=None: a cumulative average. */
    if (k[K_MOMENTUM]->type == MSGPACK_OBJECT_NIL) {
      p->cumulative = 1;
    } else if ((rc = svc__get_num(k[K_MOMENTUM], "momentum", &p->momentum)) !=
               0) {
      return rc;
    }
  }
  if (k[K_AFFINE] != NULL) {
    if ((rc = svc__get_bool(k[K_AFFINE], "affine", &b)) != 0)
      return rc;
    p->affine = b;
  }
  if (k[K_TRACK] != NULL) {
    if ((rc = svc__get_bool(k[K_TRACK], "track_running_stats", &b)) != 0)
      return rc;
    p->track_running_stats = b;
  }
  if (k[K_GROUP_SIZE] != NULL &&
      (rc = svc__get_uint(k[K_GROUP_SIZE], "group_size", UINT32_MAX,
                          &r->group_size)) != 0)
    return rc;
  if (k[K_P] != NULL) {
    if ((rc = svc__get_num(k[K_P], "p", &d)) != 0)
      return rc;
    p->p = d;
  }
  if (k[K_SEED] != NULL) {
    if ((rc = svc__get_uint(k[K_SEED], "seed", UINT32_MAX, &u)) != 0)
      return rc;
    p->seed = (uint32_t)u;
  }
  /* Like channels, a sub-batch size beyond 2^32 samples cannot come with
   * any frame; the library refuses it for kinds other than BatchNorm. */
  if (k[K_GHOST_BATCH] != NULL) {
    if ((rc = svc__get_uint(k[K_GHOST_BATCH], "ghost_batch", UINT32_MAX, &u)) !=
        0)
      return rc;
    p->ghost_batch = (size_t)u;
  }
  return 0;
}

static int svc__decode_register(const msgpack_object *const *k,
                                svc_register_t *r) {
  sbn_layer_params_t *p = &r->params;
  if (k[K_NAME] == NULL || k[K_KIND] == NULL)
    return svc_set_error(SVC_BAD_REQUEST, "register: missing '%s'",
                         k[K_NAME] == NULL ? "name" : "kind");
  if (k[K_NAME]->type != MSGPACK_OBJECT_STR || k[K_NAME]->via.str.size < 1 ||
      k[K_NAME]->via.str.size > SVC_NAME_MAX)
    return svc_set_error(SVC_BAD_REQUEST,
                         "name: expected a string of 1 to %d bytes",
                         SVC_NAME_MAX);
  memcpy(r->name, k[K_NAME]->via.str.ptr, k[K_NAME]->via.str.size);
  r->name[k[K_NAME]->via.str.size] = '\0';
  if (memchr(r->name, '\0', k[K_NAME]->via.str.size) != NULL)
    return svc_set_error(SVC_BAD_REQUEST, "name: contains a zero byte");
  for (r->kind = 0;; r->kind++) {
    const char *kn = svc_kind_name(r->kind);
    if (kn == NULL)
      return svc_set_error(SVC_BAD_REQUEST, "kind: unknown layer kind");
    if (svc__str_eq(k[K_KIND], kn))
      break;
  }
  switch (r->kind) {
    case SVC_KIND_BATCHNORM:
    case SVC_KIND_SYNCBATCHNORM:
      sbn_layer_params_default(p, SBN_OP_BATCHNORM);
      break;
    case SVC_KIND_LAYERNORM:
      sbn_layer_params_default(p, SBN_OP_LAYERNORM);
      break;
    case SVC_KIND_INSTANCENORM:
      sbn_layer_params_default(p, SBN_OP_INSTANCENORM);
      break;
    case SVC_KIND_GROUPNORM:
      sbn_layer_params_default(p, SBN_OP_GROUPNORM);
      break;
    case SVC_KIND_DROPOUT:
      sbn_layer_params_default(p, SBN_OP_DROPOUT);
      break;
  }
  return svc__decode_layer_params(k, r);
}

/* Fails with BAD_REQUEST naming the first key of idx (a list ended by -1)
 * that the request lacks. */
static int svc__need(const msgpack_object *const *k, const char *op,
                     const int *idx) {
  for (; *idx >= 0; idx++)
    if (k[*idx] == NULL)
      return svc_set_error(SVC_BAD_REQUEST, "%s: missing '%s'", op,
                           svc__keys[*idx]);
  return 0;
}

static int svc__decode_map(const msgpack_object *root, int in_batch,
                           svc_request_t *req);

/* Decodes the tensor under an optional key; absent is fine. */
static int svc__opt_tensor(const msgpack_object *const *k, int key,
                           svc_tensor_t *t) {
  return k[key] == NULL ? 0 : svc_decode_tensor(k[key], svc__keys[key], t);
}

/* The sub-requests of a batch: each is a request map of its own whose op
 * is one of those that a batch may carry. */
static int svc__decode_batch(const msgpack_object *a, svc_request_t *req) {
  if (a->type != MSGPACK_OBJECT_ARRAY || a->via.array.size < 1 ||
      a->via.array.size > SVC_BATCH_MAX)
    return svc_set_error(SVC_BAD_REQUEST,
                         "requests: expected an array of 1 to %d request maps",
                         SVC_BATCH_MAX);
  req->sub = calloc(a->via.array.size, sizeof *req->sub);
  if (req->sub == NULL)
    return svc_set_error(SVC_RESOURCE, "requests: out of memory");
  for (uint32_t i = 0; i < a->via.array.size; i++) {
    char msg[768];
    int rc;
    req->nsub = i + 1;
    if (a->via.array.ptr[i].type != MSGPACK_OBJECT_MAP)
      return svc_set_error(SVC_BAD_REQUEST, "requests[%u]: expected a map", i);
    if ((rc = svc__decode_map(&a->via.array.ptr[i], 1, &req->sub[i])) != 0) {
      /* The message is rewritten from a copy: the setter's buffer is the
       * one it reads. */
      snprintf(msg, sizeof msg, "%s", svc_last_error());
      return svc_set_error(svc_code_of(rc), "requests[%u].%s", i, msg);
    }
  }
  return 0;
}

/* The keys each op needs (lists ended by -1). */
static const int need_fwd[] = {K_LAYER, K_STEP, K_TRAIN, K_X, -1};
static const int need_bwd[] = {K_LAYER, K_STEP, K_DY, -1};
static const int need_stats[] = {K_LAYER, K_STEP, K_CNT, K_MEAN, K_M2, -1};
static const int need_sbwd[] = {K_LAYER, K_STEP, K_SUM_DY, K_SUM_DY_XHAT, -1};
static const int need_layer[] = {K_LAYER, -1};
static const int need_name[] = {K_NAME, -1};

/* hello: the version, and the token a TCP connection authenticates
 * with. */
static int svc__decode_hello(const msgpack_object *const *k,
                             svc_request_t *req) {
  int rc;
  if (k[K_VERSION] == NULL)
    return svc_set_error(SVC_BAD_REQUEST, "hello: missing 'version'");
  if ((rc = svc__get_uint(k[K_VERSION], "version", UINT64_MAX,
                          &req->version)) != 0)
    return rc;
  if (k[K_TOKEN] != NULL) {
    const msgpack_object *t = k[K_TOKEN];
    const char *ptr;
    size_t n;
    if (t->type == MSGPACK_OBJECT_STR) {
      ptr = t->via.str.ptr;
      n = t->via.str.size;
    } else if (t->type == MSGPACK_OBJECT_BIN) {
      ptr = t->via.bin.ptr;
      n = t->via.bin.size;
    } else {
      return svc_set_error(SVC_BAD_REQUEST, "token: expected a string or bin");
    }
    if (n > SVC_TOKEN_MAX)
      return svc_set_error(SVC_BAD_REQUEST, "token: longer than %d bytes",
                           SVC_TOKEN_MAX);
    memcpy(req->token, ptr, n);
    req->token_len = n;
    req->has_token = 1;
  }
  return 0;
}

/* set_state: any of the layer's state tensors and its batch counter. */
static int svc__decode_set_state(const msgpack_object *const *k,
                                 svc_request_t *req) {
  int rc;
  if ((rc = svc__need(k, "set_state", need_layer)) != 0)
    return rc;
  if ((rc = svc__opt_tensor(k, K_RUNNING_MEAN, &req->running_mean)) != 0 ||
      (rc = svc__opt_tensor(k, K_RUNNING_VAR, &req->running_var)) != 0 ||
      (rc = svc__opt_tensor(k, K_WEIGHT, &req->weight)) != 0 ||
      (rc = svc__opt_tensor(k, K_BIAS, &req->bias)) != 0)
    return rc;
  if (k[K_NBT] != NULL) {
    if ((rc = svc__get_uint(k[K_NBT], "num_batches_tracked", INT64_MAX,
                            &req->num_batches_tracked)) != 0)
      return rc;
    req->has_nbt = 1;
  }
  return 0;
}

/* checkpoint_save / checkpoint_load: the file's name (checked as a name by
 * the worker). */
static int svc__decode_ckpt_name(const msgpack_object *const *k,
                                 svc_request_t *req) {
  int rc;
  if ((rc = svc__need(k, svc_op_name(req->op), need_name)) != 0)
    return rc;
  if (k[K_NAME]->type != MSGPACK_OBJECT_STR ||
      k[K_NAME]->via.str.size > SVC_NAME_MAX)
    return svc_set_error(SVC_BAD_REQUEST,
                         "name: expected a string of at most %d bytes",
                         SVC_NAME_MAX);
  memcpy(req->reg.name, k[K_NAME]->via.str.ptr, k[K_NAME]->via.str.size);
  req->reg.name[k[K_NAME]->via.str.size] = '\0';
  if (strlen(req->reg.name) != k[K_NAME]->via.str.size)
    return svc_set_error(SVC_BAD_REQUEST, "name: contains a zero byte");
  return 0;
}

/* Protocol 6: y_at / dx_at, a map {region: uint, offset: uint} naming
 * where the output goes (absent: the reply carries the bytes). */
static int svc__decode_at(const msgpack_object *o, const char *what,
                          svc_shm_at_t *at) {
  const msgpack_object *region = NULL, *offset = NULL;
  if (o == NULL)
    return 0;
  if (o->type != MSGPACK_OBJECT_MAP)
    return svc_set_error(SVC_BAD_REQUEST, "%s: expected a map {region, offset}",
                         what);
  for (uint32_t i = 0; i < o->via.map.size; i++) {
    const msgpack_object *k = &o->via.map.ptr[i].key;
    const msgpack_object *v = &o->via.map.ptr[i].val;
    if (svc__str_eq(k, "region"))
      region = v;
    else if (svc__str_eq(k, "offset"))
      offset = v;
  }
  if (region == NULL || offset == NULL ||
      region->type != MSGPACK_OBJECT_POSITIVE_INTEGER ||
      offset->type != MSGPACK_OBJECT_POSITIVE_INTEGER)
    return svc_set_error(SVC_BAD_REQUEST,
                         "%s: 'region' and 'offset' must be non-negative "
                         "integers",
                         what);
  at->present = 1;
  at->region = region->via.u64;
  at->offset = offset->via.u64;
  return 0;
}

/* The keys of one op, once its name is known. */
static int svc__decode_op(const msgpack_object *const *k, svc_request_t *req) {
  int rc;
  switch (req->op) {
    case SVC_OP_HELLO:
      return svc__decode_hello(k, req);
    case SVC_OP_REGISTER:
      return svc__decode_register(k, &req->reg);
    case SVC_OP_FORWARD:
      if ((rc = svc__need(k, "forward", need_fwd)) != 0 ||
          (rc = svc__get_bool(k[K_TRAIN], "train", &req->train)) != 0 ||
          (rc = svc__decode_tensor_in(k[K_X], "x", 1, &req->x)) != 0 ||
          (rc = svc__decode_at(k[K_Y_AT], "y_at", &req->out)) != 0 ||
          (k[K_X_STAYS] != NULL &&
           (rc = svc__get_bool(k[K_X_STAYS], "x_stays", &req->x.stays)) != 0))
        return rc;
      if ((rc = svc__opt_tensor(k, K_WEIGHT, &req->weight)) != 0)
        return rc;
      return svc__opt_tensor(k, K_BIAS, &req->bias);
    case SVC_OP_BACKWARD:
      if ((rc = svc__need(k, "backward", need_bwd)) != 0 ||
          (rc = svc__decode_at(k[K_DX_AT], "dx_at", &req->out)) != 0)
        return rc;
      return svc__decode_tensor_in(k[K_DY], "dy", 1, &req->x);
    case SVC_OP_SHM_ATTACH:
      if (k[K_SIZE] == NULL)
        return svc_set_error(SVC_BAD_REQUEST, "shm_attach: missing 'size'");
      return svc__get_uint(k[K_SIZE], "size", UINT64_MAX, &req->size);
    case SVC_OP_STATS:
      if ((rc = svc__need(k, "stats", need_stats)) != 0 ||
          (rc = svc__decode_vec(k[K_CNT], "count", 1, &req->count)) != 0 ||
          (rc = svc__decode_vec(k[K_MEAN], "mean", 0, &req->mean)) != 0 ||
          (rc = svc__decode_vec(k[K_M2], "m2", 0, &req->m2)) != 0)
        return rc;
      rc = svc_decode_want(k[K_WANT], &req->skip);
      req->skip ^= SVC_STATS_ALL;
      return rc;
    case SVC_OP_STATS_BACKWARD:
      if ((rc = svc__need(k, "stats_backward", need_sbwd)) != 0 ||
          (rc = svc__decode_vec(k[K_SUM_DY], "sum_dy", 0, &req->mean)) != 0)
        return rc;
      return svc__decode_vec(k[K_SUM_DY_XHAT], "sum_dy_xhat", 0, &req->m2);
    case SVC_OP_GET_STATE:
      return svc__need(k, "get_state", need_layer);
    case SVC_OP_SET_STATE:
      return svc__decode_set_state(k, req);
    case SVC_OP_CHECKPOINT_SAVE:
    case SVC_OP_CHECKPOINT_LOAD:
      return svc__decode_ckpt_name(k, req);
    case SVC_OP_BATCH:
      if (k[K_REQUESTS] == NULL)
        return svc_set_error(SVC_BAD_REQUEST, "batch: missing 'requests'");
      return svc__decode_batch(k[K_REQUESTS], req);
    case SVC_OP_BYE:
    case SVC_OP_METRICS:
      return 0;
    case SVC_OP_COUNT:
      break;
  }
  return svc_set_error(SVC_INTERNAL, "op: not decoded");
}

static int svc__decode_map(const msgpack_object *root, int in_batch,
                           svc_request_t *req) {
  int rc;
  const msgpack_object *k[K_COUNT] = {0};
  const msgpack_object *op;
  for (uint32_t i = 0; i < root->via.map.size; i++) {
    const msgpack_object *key = &root->via.map.ptr[i].key;
    if (key->type != MSGPACK_OBJECT_STR)
      return svc_set_error(SVC_BAD_REQUEST, "request: keys must be strings");
    for (int j = 0; j < K_COUNT; j++) {
      if (!svc__str_eq(key, svc__keys[j]))
        continue;
      if (k[j] != NULL)
        return svc_set_error(SVC_BAD_REQUEST, "%s: repeated key", svc__keys[j]);
      k[j] = &root->via.map.ptr[i].val;
      break;
    }
  }
  /* The id first, so that every later error can echo it. */
  if (k[K_ID] != NULL) {
    if (k[K_ID]->type == MSGPACK_OBJECT_POSITIVE_INTEGER) {
      req->id.present = 1;
      req->id.u = k[K_ID]->via.u64;
    } else if (k[K_ID]->type == MSGPACK_OBJECT_NEGATIVE_INTEGER) {
      req->id.present = 1;
      req->id.negative = 1;
      req->id.i = k[K_ID]->via.i64;
    }
  }
  op = k[K_OP];
  if (op == NULL || op->type != MSGPACK_OBJECT_STR)
    return svc_set_error(SVC_BAD_REQUEST, "op: missing or not a string");
  if (!req->id.present)
    return svc_set_error(SVC_BAD_REQUEST, "id: missing or not an integer");
  for (req->op = 0;; req->op++) {
    const char *name = svc_op_name(req->op);
    if (name == NULL)
      return svc_set_error(SVC_UNKNOWN_OP, "op: unknown op '%.*s'",
                           (int)(op->via.str.size > 64 ? 64 : op->via.str.size),
                           op->via.str.ptr);
    if (svc__str_eq(op, name))
      break;
  }
  if (in_batch && req->op != SVC_OP_FORWARD && req->op != SVC_OP_BACKWARD &&
      req->op != SVC_OP_STATS && req->op != SVC_OP_STATS_BACKWARD)
    return svc_set_error(SVC_BAD_REQUEST,
                         "op: a batch carries forward, backward, stats and "
                         "stats_backward only, not '%s'",
                         svc_op_name(req->op));
  /* Keys shared by several ops. */
  if (k[K_LAYER] != NULL &&
      (rc = svc__get_uint(k[K_LAYER], "layer", UINT32_MAX, &req->layer)) != 0)
    return rc;
  /* Steps stop at 2^63 - 1, the largest a client's int64 counter holds:
   * a window of kept steps can be ordered below that without wrapping, and
   * one wild step near 2^64 cannot push a layer's newest step out of reach
   * of every later one. */
  if (k[K_STEP] != NULL &&
      (rc = svc__get_uint(k[K_STEP], "step", SVC_STEP_MAX, &req->step)) != 0)
    return rc;
  return svc__decode_op(k, req);
}

int svc_decode_request(const uint8_t *body, size_t len, const svc_limits_t *lim,
                       svc_request_t *req) {
  msgpack_zone zone;
  msgpack_object root;
  size_t off = 0;
  int rc;
  memset(req, 0, sizeof *req);
  if ((rc = svc_scan(body, len, lim)) != 0)
    return rc;
  if (!msgpack_zone_init(&zone, 2048))
    return svc_set_error(SVC_RESOURCE, "frame: out of memory");
  /* The scan proved the bytes are one well-formed object within limits, so
   * msgpack-c allocates at most a small multiple of max_objects. */
  if (msgpack_unpack((const char *)body, len, &off, &zone, &root) !=
          MSGPACK_UNPACK_SUCCESS ||
      off != len || root.type != MSGPACK_OBJECT_MAP) {
    rc = svc_set_error(SVC_MALFORMED, "frame: msgpack-c refused the map");
    goto fail;
  }
  rc = svc__decode_map(&root, 0, req);
fail:
  if (rc != 0) {
    svc_id_t id = req->id;
    svc_request_free(req);
    req->id = id;
  }
  msgpack_zone_destroy(&zone);
  return rc;
}
