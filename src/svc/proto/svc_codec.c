/* The syncbnd wire codec (see svc_codec.h and mpi/service/PROTOCOL.md). */
#include "svc_codec.h"

#include <msgpack.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the codec copies f32 payloads as is: a little-endian host is needed"
#endif

static const char *const svc__code_names[] = {"OK",
#define SVC__CODE_NAME(name, fatal, msg) #name,
                                              SVC_CODE_MAP(SVC__CODE_NAME)
#undef SVC__CODE_NAME
};

static const unsigned char svc__code_fatal[] = {0,
#define SVC__CODE_FATAL(name, fatal, msg) fatal,
                                                SVC_CODE_MAP(SVC__CODE_FATAL)
#undef SVC__CODE_FATAL
};

const char *svc_code_name(svc_code_t code) {
  if ((unsigned)code >= SVC_CODE_COUNT)
    return "INTERNAL";
  return svc__code_names[code];
}

int svc_code_fatal(svc_code_t code) {
  if ((unsigned)code >= SVC_CODE_COUNT)
    return 1;
  return svc__code_fatal[code];
}

void svc_limits_default(svc_limits_t *lim) {
  lim->max_frame = 256u << 20;
  lim->max_depth = 8;
  lim->max_objects = 4096;
}

static const char *const svc__kind_names[] = {"batchnorm", "syncbatchnorm",
                                              "layernorm", "instancenorm",
                                              "groupnorm", "dropout"};

const char *svc_kind_name(svc_kind_t kind) {
  if ((unsigned)kind >= sizeof svc__kind_names / sizeof *svc__kind_names)
    return NULL;
  return svc__kind_names[kind];
}

/* ------------------------------------------------------------------ */
/* Frames and the pre-scan */

int svc_frame_len(const uint8_t hdr[SVC_HEADER_BYTES], const svc_limits_t *lim,
                  uint32_t *len) {
  uint32_t n = ((uint32_t)hdr[0] << 24) | ((uint32_t)hdr[1] << 16) |
               ((uint32_t)hdr[2] << 8) | (uint32_t)hdr[3];
  if (n == 0)
    return svc_set_error(SVC_BAD_FRAME, "frame: zero length");
  if (n > lim->max_frame)
    return svc_set_error(SVC_FRAME_TOO_LARGE,
                         "frame: length %u exceeds max_frame %u", n,
                         lim->max_frame);
  *len = n;
  return 0;
}

static uint64_t svc__be(const uint8_t *p, int bytes) {
  uint64_t v = 0;
  for (int i = 0; i < bytes; i++)
    v = (v << 8) | p[i];
  return v;
}

/* msgpack-c's own stack is 32 deep; the scan refuses anything deeper than
 * this, whatever the limits say. */
#define SVC__SCAN_DEPTH_MAX 32

int svc_scan(const uint8_t *p, size_t n, const svc_limits_t *lim) {
  /* left[d]: objects still expected by the container at depth d. */
  uint64_t left[SVC__SCAN_DEPTH_MAX + 1];
  uint32_t max_depth = lim->max_depth;
  uint64_t objects = 0;
  size_t pos = 0;
  int depth = 0;
  if (max_depth > SVC__SCAN_DEPTH_MAX)
    max_depth = SVC__SCAN_DEPTH_MAX;
  if (n == 0)
    return svc_set_error(SVC_MALFORMED, "frame: empty body");
  if (!(p[0] >= 0x80 && p[0] <= 0x8f) && p[0] != 0xde && p[0] != 0xdf)
    return svc_set_error(SVC_MALFORMED,
                         "frame: the root object is not a map (tag 0x%02x)",
                         p[0]);
  left[0] = 1;
  for (;;) {
    size_t at = pos;
    uint8_t t;
    int hdr = 0;        /* bytes of length/count after the tag */
    uint64_t skip = 0;  /* payload bytes */
    uint64_t count = 0; /* child objects of a container */
    int container = 0;
    if (pos >= n)
      return svc_set_error(SVC_MALFORMED,
                           "frame: truncated msgpack at byte %zu", pos);
    t = p[pos++];
    if (t <= 0x7f || t >= 0xe0 || t == 0xc0 || t == 0xc2 || t == 0xc3) {
      /* fixint, nil, bool: the tag is the whole object. */
    } else if (t >= 0x80 && t <= 0x8f) {
      container = 1;
      count = 2u * (uint64_t)(t & 0x0f);
    } else if (t >= 0x90 && t <= 0x9f) {
      container = 1;
      count = t & 0x0f;
    } else if (t >= 0xa0 && t <= 0xbf) {
      skip = t & 0x1f;
    } else {
      switch (t) {
        case 0xc4:
        case 0xd9:
          hdr = 1;
          break; /* bin8, str8 */
        case 0xc5:
        case 0xda:
          hdr = 2;
          break; /* bin16, str16 */
        case 0xc6:
        case 0xdb:
          hdr = 4;
          break; /* bin32, str32 */
        case 0xc7:
          hdr = 1;
          skip = 1;
          break; /* ext8: + type byte */
        case 0xc8:
          hdr = 2;
          skip = 1;
          break;
        case 0xc9:
          hdr = 4;
          skip = 1;
          break;
        case 0xca:
          skip = 4;
          break; /* float32 */
        case 0xcb:
          skip = 8;
          break; /* float64 */
        case 0xcc:
        case 0xd0:
          skip = 1;
          break;
        case 0xcd:
        case 0xd1:
          skip = 2;
          break;
        case 0xce:
        case 0xd2:
          skip = 4;
          break;
        case 0xcf:
        case 0xd3:
          skip = 8;
          break;
        case 0xd4:
          skip = 2;
          break; /* fixext: type + data */
        case 0xd5:
          skip = 3;
          break;
        case 0xd6:
          skip = 5;
          break;
        case 0xd7:
          skip = 9;
          break;
        case 0xd8:
          skip = 17;
          break;
        case 0xdc:
          hdr = 2;
          container = 1;
          break; /* array16 */
        case 0xdd:
          hdr = 4;
          container = 1;
          break; /* array32 */
        case 0xde:
          hdr = 2;
          container = 2;
          break; /* map16 */
        case 0xdf:
          hdr = 4;
          container = 2;
          break; /* map32 */
        default:
          return svc_set_error(SVC_MALFORMED,
                               "frame: invalid msgpack tag 0x%02x at byte %zu",
                               t, at);
      }
    }
    if (hdr > 0) {
      uint64_t v;
      if ((size_t)hdr > n - pos)
        return svc_set_error(SVC_MALFORMED,
                             "frame: truncated msgpack header at byte %zu", at);
      v = svc__be(p + pos, hdr);
      pos += (size_t)hdr;
      if (container == 1)
        count = v;
      else if (container == 2)
        count = 2 * v;
      else
        skip += v;
    }
    if (skip > n - pos)
      return svc_set_error(
          SVC_MALFORMED,
          "frame: msgpack object at byte %zu declares %llu bytes, "
          "%zu remain",
          at, (unsigned long long)skip, n - pos);
    pos += (size_t)skip;
    if (++objects > lim->max_objects)
      return svc_set_error(SVC_LIMIT, "frame: more than %u msgpack objects",
                           lim->max_objects);
    /* One object consumed from the enclosing container. */
    left[depth]--;
    if (container && count > 0) {
      /* Every child takes at least one byte, so a count beyond the
       * remaining bytes is a lie; refuse it before anyone allocates. */
      if (count > n - pos)
        return svc_set_error(
            SVC_LIMIT,
            "frame: container at byte %zu declares %llu elements, "
            "%zu bytes remain",
            at, (unsigned long long)count, n - pos);
      if (count > (uint64_t)lim->max_objects)
        return svc_set_error(
            SVC_LIMIT,
            "frame: container at byte %zu declares %llu elements, "
            "more than %u",
            at, (unsigned long long)count, lim->max_objects);
      if ((uint32_t)depth + 1 >= max_depth + 1u)
        return svc_set_error(SVC_LIMIT,
                             "frame: nesting deeper than %u at byte %zu",
                             max_depth, at);
      left[++depth] = count;
      continue;
    }
    while (depth > 0 && left[depth] == 0)
      depth--;
    if (depth == 0 && left[0] == 0)
      break;
  }
  if (pos != n)
    return svc_set_error(SVC_MALFORMED,
                         "frame: %zu bytes after the msgpack map", n - pos);
  return 0;
}

/* ------------------------------------------------------------------ */
/* Typed reads of msgpack objects */

static int svc__str_eq(const msgpack_object *o, const char *s) {
  size_t l = strlen(s);
  return o->type == MSGPACK_OBJECT_STR && o->via.str.size == l &&
         memcmp(o->via.str.ptr, s, l) == 0;
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

void svc_tensor_free(svc_tensor_t *t) {
  free(t->data);
  memset(t, 0, sizeof *t);
}

/* Validates a tensor map: keys, dtype (f32, or f64 where allow_f64),
 * shape (overflow-checked) and payload size. Fills t->desc and t->numel
 * and points *payload at the data bytes inside the frame; copies nothing. */
static int svc__tensor_parse(const msgpack_object *o, const char *what,
                             int allow_f64, svc_tensor_t *t, size_t *elsz,
                             const char **payload) {
  const msgpack_object *dtype = NULL, *shape = NULL, *data = NULL,
                       *layout = NULL;
  size_t numel = 1;
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
    else if (k->type != MSGPACK_OBJECT_STR)
      return svc_set_error(SVC_BAD_TENSOR, "%s: keys must be strings", what);
    if (slot == NULL)
      continue;
    if (*slot != NULL)
      return svc_set_error(SVC_BAD_TENSOR, "%s: repeated key '%.*s'", what,
                           (int)k->via.str.size, k->via.str.ptr);
    *slot = v;
  }
  if (dtype == NULL || shape == NULL || data == NULL)
    return svc_set_error(SVC_BAD_TENSOR, "%s: missing '%s'", what,
                         dtype == NULL   ? "dtype"
                         : shape == NULL ? "shape"
                                         : "data");
  if (svc__str_eq(dtype, "f32"))
    *elsz = sizeof(float);
  else if (allow_f64 && svc__str_eq(dtype, "f64"))
    *elsz = sizeof(double);
  else
    return svc_set_error(SVC_BAD_TENSOR, "%s.dtype: only %s supported", what,
                         allow_f64 ? "\"f32\" and \"f64\" are" : "\"f32\" is");
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

int svc_decode_tensor(const msgpack_object *o, const char *what,
                      svc_tensor_t *t) {
  int rc;
  const char *payload = NULL;
  size_t elsz = 0, bytes;
  if ((rc = svc__tensor_parse(o, what, 0, t, &elsz, &payload)) != 0)
    return rc;
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
  for (size_t i = 0; i < t.numel; i++) {
    if (elsz == sizeof(float)) {
      float f;
      memcpy(&f, payload + i * elsz, sizeof f);
      v->v[i] = f;
    } else {
      memcpy(&v->v[i], payload + i * elsz, sizeof(double));
    }
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

static const char *const svc__op_names[] = {
    "hello",     "register",  "forward",         "backward",
    "bye",       "batch",     "stats",           "stats_backward",
    "get_state", "set_state", "checkpoint_save", "checkpoint_load",
    "metrics"};

const char *svc_op_name(svc_op_t op) {
  if ((size_t)op >= sizeof svc__op_names / sizeof *svc__op_names)
    return NULL;
  return svc__op_names[op];
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
    "running_var", "num_batches_tracked"};

static int svc__decode_register(const msgpack_object *const *k,
                                svc_register_t *r) {
  int rc;
  sbn_layer_params_t *p = &r->params;
  uint64_t u = 0;
  double d;
  int b = 0;
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
  return 0;
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

static int svc__decode_map(const msgpack_object *root, int in_batch,
                           svc_request_t *req) {
  int rc;
  const msgpack_object *k[K_COUNT] = {0};
  const msgpack_object *op;
  static const int need_fwd[] = {K_LAYER, K_STEP, K_TRAIN, K_X, -1};
  static const int need_bwd[] = {K_LAYER, K_STEP, K_DY, -1};
  static const int need_stats[] = {K_LAYER, K_STEP, K_CNT, K_MEAN, K_M2, -1};
  static const int need_sbwd[] = {K_LAYER, K_STEP, K_SUM_DY, K_SUM_DY_XHAT, -1};
  static const int need_layer[] = {K_LAYER, -1};
  static const int need_name[] = {K_NAME, -1};
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
  if (k[K_STEP] != NULL &&
      (rc = svc__get_uint(k[K_STEP], "step", UINT64_MAX, &req->step)) != 0)
    return rc;
  switch (req->op) {
    case SVC_OP_HELLO:
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
          return svc_set_error(SVC_BAD_REQUEST,
                               "token: expected a string or bin");
        }
        if (n > SVC_TOKEN_MAX)
          return svc_set_error(SVC_BAD_REQUEST, "token: longer than %d bytes",
                               SVC_TOKEN_MAX);
        memcpy(req->token, ptr, n);
        req->token_len = n;
        req->has_token = 1;
      }
      return 0;
    case SVC_OP_REGISTER:
      return svc__decode_register(k, &req->reg);
    case SVC_OP_FORWARD:
      if ((rc = svc__need(k, "forward", need_fwd)) != 0 ||
          (rc = svc__get_bool(k[K_TRAIN], "train", &req->train)) != 0 ||
          (rc = svc_decode_tensor(k[K_X], "x", &req->x)) != 0)
        return rc;
      if ((rc = svc__opt_tensor(k, K_WEIGHT, &req->weight)) != 0 ||
          (rc = svc__opt_tensor(k, K_BIAS, &req->bias)) != 0)
        return rc;
      return 0;
    case SVC_OP_BACKWARD:
      if ((rc = svc__need(k, "backward", need_bwd)) != 0)
        return rc;
      return svc_decode_tensor(k[K_DY], "dy", &req->x);
    case SVC_OP_STATS:
      if ((rc = svc__need(k, "stats", need_stats)) != 0 ||
          (rc = svc__decode_vec(k[K_CNT], "count", 1, &req->count)) != 0 ||
          (rc = svc__decode_vec(k[K_MEAN], "mean", 0, &req->mean)) != 0 ||
          (rc = svc__decode_vec(k[K_M2], "m2", 0, &req->m2)) != 0)
        return rc;
      return 0;
    case SVC_OP_STATS_BACKWARD:
      if ((rc = svc__need(k, "stats_backward", need_sbwd)) != 0 ||
          (rc = svc__decode_vec(k[K_SUM_DY], "sum_dy", 0, &req->mean)) != 0 ||
          (rc = svc__decode_vec(k[K_SUM_DY_XHAT], "sum_dy_xhat", 0,
                                &req->m2)) != 0)
        return rc;
      return 0;
    case SVC_OP_GET_STATE:
      return svc__need(k, "get_state", need_layer);
    case SVC_OP_SET_STATE:
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
    case SVC_OP_CHECKPOINT_SAVE:
    case SVC_OP_CHECKPOINT_LOAD:
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

/* ------------------------------------------------------------------ */
/* Replies */

static void svc__pack_key(msgpack_packer *pk, const char *k) {
  msgpack_pack_str_with_body(pk, k, strlen(k));
}

static void svc__pack_id(msgpack_packer *pk, const svc_id_t *id) {
  svc__pack_key(pk, "id");
  if (id == NULL || !id->present)
    msgpack_pack_nil(pk);
  else if (id->negative)
    msgpack_pack_int64(pk, id->i);
  else
    msgpack_pack_uint64(pk, id->u);
}

int svc_pack_tensor(msgpack_packer *pk, const sbn_tensor_desc_t *desc,
                    const float *data, size_t numel) {
  int rc = 0;
  rc |= msgpack_pack_map(pk, 4);
  svc__pack_key(pk, "dtype");
  rc |= msgpack_pack_str_with_body(pk, "f32", 3);
  svc__pack_key(pk, "shape");
  rc |= msgpack_pack_array(pk, (size_t)desc->ndim);
  for (int i = 0; i < desc->ndim; i++)
    rc |= msgpack_pack_uint64(pk, desc->dims[i]);
  svc__pack_key(pk, "layout");
  rc |= msgpack_pack_str_with_body(
      pk, desc->layout == SBN_LAYOUT_NHWC ? "nhwc" : "nchw", 4);
  svc__pack_key(pk, "data");
  rc |= msgpack_pack_bin(pk, numel * sizeof(float));
  if (numel > 0)
    rc |= msgpack_pack_bin_body(pk, data, numel * sizeof(float));
  return rc != 0 ? svc_set_error(SVC_RESOURCE, "reply: out of memory") : 0;
}

/* msgpack-c's packers ignore a failed write of one piece and go on with the
 * next; this writer makes every failure sticky, so an out-of-memory reply
 * is never sent half written. */
typedef struct svc__out_s {
  msgpack_sbuffer sb;
  int failed;
} svc__out_t;

static int svc__write(void *data, const char *buf, size_t len) {
  svc__out_t *o = data;
  if (o->failed || msgpack_sbuffer_write(&o->sb, buf, len) != 0) {
    o->failed = 1;
    return -1;
  }
  return 0;
}

/* Starts a reply frame: 4 header bytes patched by svc__finish. */
static int svc__start(svc__out_t *o, msgpack_packer *pk, size_t hint) {
  msgpack_sbuffer *sb = &o->sb;
  msgpack_sbuffer_init(sb);
  o->failed = 0;
  msgpack_packer_init(pk, o, svc__write);
  if (hint > 0 && hint < SIZE_MAX - 256) {
    /* One allocation for a tensor reply instead of repeated doubling. */
    sb->data = malloc(hint + 256);
    if (sb->data == NULL)
      return -1;
    sb->alloc = hint + 256;
  }
  return msgpack_sbuffer_write(sb, "\0\0\0\0", 4);
}

/* Ends a reply frame; rc is the OR of msgpack-c's own returns while it
 * was packed (0 or -1), which is its convention, not the service's. */
static int svc__finish(svc__out_t *o, int rc, uint8_t **out, size_t *out_len) {
  msgpack_sbuffer *sb = &o->sb;
  size_t body;
  if (rc != 0 || o->failed || sb->size < 4 || sb->size - 4 > UINT32_MAX) {
    msgpack_sbuffer_destroy(sb);
    *out = NULL;
    *out_len = 0;
    return svc_set_error(SVC_RESOURCE, "reply: out of memory");
  }
  body = sb->size - 4;
  sb->data[0] = (char)(body >> 24);
  sb->data[1] = (char)(body >> 16);
  sb->data[2] = (char)(body >> 8);
  sb->data[3] = (char)body;
  *out_len = sb->size;
  *out = (uint8_t *)msgpack_sbuffer_release(sb);
  return 0;
}

int svc_encode_error(const svc_id_t *id, svc_code_t code, const char *message,
                     uint8_t **out, size_t *out_len) {
  svc__out_t sb;
  msgpack_packer pk;
  int rc = svc__start(&sb, &pk, 0);
  rc |= msgpack_pack_map(&pk, 2);
  svc__pack_id(&pk, id);
  svc__pack_key(&pk, "error");
  rc |= msgpack_pack_map(&pk, 2);
  svc__pack_key(&pk, "code");
  svc__pack_key(&pk, svc_code_name(code));
  svc__pack_key(&pk, "message");
  svc__pack_key(&pk, message != NULL ? message : "");
  return svc__finish(&sb, rc, out, out_len);
}

int svc_encode_hello(const svc_id_t *id, const svc_hello_reply_t *h,
                     uint8_t **out, size_t *out_len) {
  svc__out_t sb;
  msgpack_packer pk;
  int rc = svc__start(&sb, &pk, 0);
  rc |= msgpack_pack_map(&pk, 6);
  svc__pack_id(&pk, id);
  svc__pack_key(&pk, "protocol");
  rc |= msgpack_pack_uint32(&pk, SVC_PROTOCOL_VERSION);
  svc__pack_key(&pk, "server");
  svc__pack_key(&pk, "syncbnd");
  svc__pack_key(&pk, "rank");
  rc |= msgpack_pack_int(&pk, h->rank);
  svc__pack_key(&pk, "size");
  rc |= msgpack_pack_int(&pk, h->size);
  svc__pack_key(&pk, "limits");
  rc |= msgpack_pack_map(&pk, 8);
  svc__pack_key(&pk, "max_frame");
  rc |= msgpack_pack_uint32(&pk, h->max_frame);
  svc__pack_key(&pk, "max_depth");
  rc |= msgpack_pack_uint32(&pk, h->max_depth);
  svc__pack_key(&pk, "max_objects");
  rc |= msgpack_pack_uint32(&pk, h->max_objects);
  svc__pack_key(&pk, "max_clients");
  rc |= msgpack_pack_uint32(&pk, h->max_clients);
  svc__pack_key(&pk, "max_output");
  rc |= msgpack_pack_uint64(&pk, h->max_output);
  svc__pack_key(&pk, "idle_timeout");
  rc |= msgpack_pack_double(&pk, h->idle_timeout);
  svc__pack_key(&pk, "frame_timeout");
  rc |= msgpack_pack_double(&pk, h->frame_timeout);
  svc__pack_key(&pk, "keep_steps");
  rc |= msgpack_pack_uint32(&pk, h->keep_steps);
  return svc__finish(&sb, rc, out, out_len);
}

int svc_encode_register(const svc_id_t *id, uint64_t layer, int created,
                        uint8_t **out, size_t *out_len) {
  svc__out_t sb;
  msgpack_packer pk;
  int rc = svc__start(&sb, &pk, 0);
  rc |= msgpack_pack_map(&pk, 3);
  svc__pack_id(&pk, id);
  svc__pack_key(&pk, "layer");
  rc |= msgpack_pack_uint64(&pk, layer);
  svc__pack_key(&pk, "created");
  rc |= created ? msgpack_pack_true(&pk) : msgpack_pack_false(&pk);
  return svc__finish(&sb, rc, out, out_len);
}

int svc_encode_forward(const svc_id_t *id, const sbn_tensor_desc_t *desc,
                       const float *y, size_t numel, uint8_t **out,
                       size_t *out_len) {
  svc__out_t sb;
  msgpack_packer pk;
  int rc = svc__start(&sb, &pk, numel * sizeof(float));
  rc |= msgpack_pack_map(&pk, 2);
  svc__pack_id(&pk, id);
  svc__pack_key(&pk, "y");
  rc |= svc_pack_tensor(&pk, desc, y, numel);
  return svc__finish(&sb, rc, out, out_len);
}

int svc_encode_backward(const svc_id_t *id, const sbn_tensor_desc_t *desc,
                        const float *dx, size_t numel, const float *dw,
                        const float *db, const sbn_tensor_desc_t *wb_desc,
                        size_t wb_numel, uint8_t **out, size_t *out_len) {
  svc__out_t sb;
  msgpack_packer pk;
  int wb = dw != NULL && db != NULL;
  int rc = svc__start(&sb, &pk, (numel + 2 * wb_numel) * sizeof(float));
  rc |= msgpack_pack_map(&pk, wb ? 4 : 2);
  svc__pack_id(&pk, id);
  svc__pack_key(&pk, "dx");
  rc |= svc_pack_tensor(&pk, desc, dx, numel);
  if (wb) {
    svc__pack_key(&pk, "dweight");
    rc |= svc_pack_tensor(&pk, wb_desc, dw, wb_numel);
    svc__pack_key(&pk, "dbias");
    rc |= svc_pack_tensor(&pk, wb_desc, db, wb_numel);
  }
  return svc__finish(&sb, rc, out, out_len);
}

int svc_encode_bye(const svc_id_t *id, uint8_t **out, size_t *out_len) {
  svc__out_t sb;
  msgpack_packer pk;
  int rc = svc__start(&sb, &pk, 0);
  rc |= msgpack_pack_map(&pk, 1);
  svc__pack_id(&pk, id);
  return svc__finish(&sb, rc, out, out_len);
}

int svc_encode_batch(const svc_id_t *id, uint8_t *const *subs,
                     const size_t *sub_lens, size_t n, uint8_t **out,
                     size_t *out_len) {
  svc__out_t sb;
  msgpack_packer pk;
  size_t hint = 0;
  int rc;
  for (size_t i = 0; i < n; i++)
    hint += sub_lens[i];
  rc = svc__start(&sb, &pk, hint);
  rc |= msgpack_pack_map(&pk, 2);
  svc__pack_id(&pk, id);
  svc__pack_key(&pk, "replies");
  rc |= msgpack_pack_array(&pk, n);
  /* Each sub-reply is already one encoded map: its body is copied as is. */
  for (size_t i = 0; i < n; i++) {
    if (sub_lens[i] < SVC_HEADER_BYTES) {
      rc = -1;
      break;
    }
    rc |= svc__write(&sb, (const char *)subs[i] + SVC_HEADER_BYTES,
                     sub_lens[i] - SVC_HEADER_BYTES);
  }
  return svc__finish(&sb, rc, out, out_len);
}

int svc_pack_vec64(msgpack_packer *pk, const double *v, size_t n) {
  int rc = 0;
  rc |= msgpack_pack_map(pk, 4);
  svc__pack_key(pk, "dtype");
  rc |= msgpack_pack_str_with_body(pk, "f64", 3);
  svc__pack_key(pk, "shape");
  rc |= msgpack_pack_array(pk, 1);
  rc |= msgpack_pack_uint64(pk, n);
  svc__pack_key(pk, "layout");
  rc |= msgpack_pack_str_with_body(pk, "nchw", 4);
  svc__pack_key(pk, "data");
  rc |= msgpack_pack_bin(pk, n * sizeof(double));
  if (n > 0)
    rc |= msgpack_pack_bin_body(pk, v, n * sizeof(double));
  return rc != 0 ? svc_set_error(SVC_RESOURCE, "reply: out of memory") : 0;
}

struct svc__reply_impl_s {
  svc__out_t sb;
  msgpack_packer pk;
};

int svc_reply_begin(svc_reply_t *r, const svc_id_t *id, uint32_t nkeys,
                    size_t hint) {
  r->impl = malloc(sizeof *r->impl);
  r->pk = NULL;
  r->rc = -1;
  if (r->impl == NULL)
    return svc_set_error(SVC_RESOURCE, "reply: out of memory");
  r->pk = &r->impl->pk;
  r->rc = svc__start(&r->impl->sb, &r->impl->pk, hint);
  r->rc |= msgpack_pack_map(r->pk, nkeys + 1);
  svc__pack_id(r->pk, id);
  if (r->rc != 0)
    return svc_set_error(SVC_RESOURCE, "reply: out of memory");
  return 0;
}

void svc_reply_key(svc_reply_t *r, const char *key) {
  if (r->impl != NULL)
    svc__pack_key(r->pk, key);
}

int svc_reply_end(svc_reply_t *r, uint8_t **out, size_t *out_len) {
  int rc;
  *out = NULL;
  *out_len = 0;
  if (r->impl == NULL)
    return svc_set_error(SVC_RESOURCE, "reply: out of memory");
  rc = svc__finish(&r->impl->sb, r->rc, out, out_len);
  free(r->impl);
  r->impl = NULL;
  return rc;
}
