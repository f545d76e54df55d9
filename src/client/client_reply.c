/* syncbn client: receiving replies and reading their fields. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "client_internal.h"

/* Replies are trusted more than requests, but are still scanned before
 * msgpack-c sees them: a broken worker must not make the client allocate
 * from a garbage count. A batch reply of 256 backwards holds about 50
 * objects per sub-reply, so the object cap is well above a request's; it
 * still bounds what msgpack-c allocates to a few MiB. */
static const svc_limits_t sbn__reply_limits = {UINT32_MAX, 8, 1u << 16};

void sbn__reply_free(sbn__reply_t *p) {
  if (p->zone_ok)
    msgpack_zone_destroy(&p->zone);
  if (p->kept != NULL)
    p->kept->keep_busy = 0;
  else
    free(p->body);
  memset(p, 0, sizeof *p);
}

const msgpack_object *sbn__get(const msgpack_object *map, const char *key) {
  size_t l = strlen(key);
  if (map == NULL || map->type != MSGPACK_OBJECT_MAP)
    return NULL;
  for (uint32_t i = 0; i < map->via.map.size; i++) {
    const msgpack_object *k = &map->via.map.ptr[i].key;
    if (k->type == MSGPACK_OBJECT_STR && k->via.str.size == l &&
        memcmp(k->via.str.ptr, key, l) == 0)
      return &map->via.map.ptr[i].val;
  }
  return NULL;
}

int sbn__uint_field(const msgpack_object *m, const char *key, uint64_t *out) {
  const msgpack_object *o = sbn__get(m, key);
  if (o == NULL || o->type != MSGPACK_OBJECT_POSITIVE_INTEGER)
    return -1;
  *out = o->via.u64;
  return 0;
}

int sbn__num_field(const msgpack_object *m, const char *key, double *out) {
  const msgpack_object *o = sbn__get(m, key);
  if (o == NULL)
    return -1;
  switch (o->type) {
    case MSGPACK_OBJECT_FLOAT32:
    case MSGPACK_OBJECT_FLOAT64:
      *out = o->via.f64;
      return 0;
    case MSGPACK_OBJECT_POSITIVE_INTEGER:
      *out = (double)o->via.u64;
      return 0;
    default:
      return -1;
  }
}

int sbn__bool_field(const msgpack_object *m, const char *key, int *out) {
  const msgpack_object *o = sbn__get(m, key);
  if (o == NULL || o->type != MSGPACK_OBJECT_BOOLEAN)
    return -1;
  *out = o->via.boolean;
  return 0;
}

int sbn__server_rc(const char *code) {
  static const struct {
    const char *code;
    int rc;
  } map[] = {{"SHAPE", SBN_ESHAPE},
             {"BAD_TENSOR", SBN_ESHAPE},
             {"NOT_YET", SBN_ENOTSUP},
             {"LAYER_MISMATCH", SBN_EMISMATCH},
             {"DUPLICATE_STEP", SBN_ESTATE},
             {"STALE_STEP", SBN_ESTATE},
             {"NO_FORWARD", SBN_ESTATE},
             {"SMALL_BATCH", SBN_ESMALLBATCH},
             {"TIMEOUT", SBN_CLIENT_ETIMEDOUT},
             {"SHUTDOWN", SBN_CLIENT_ECLOSED},
             {"FRAME_TOO_LARGE", SBN_ELIMIT},
             {"LIMIT", SBN_ELIMIT},
             {"RESOURCE", SBN_ELIMIT},
             {"TOO_MANY_CLIENTS", SBN_ELIMIT}};
  for (size_t i = 0; i < sizeof map / sizeof *map; i++)
    if (strcmp(code, map[i].code) == 0)
      return map[i].rc;
  return SBN_EINVAL;
}

int sbn__error_of(const msgpack_object *m, char *code, size_t ncode, char *msg,
                  size_t nmsg) {
  const msgpack_object *e = sbn__get(m, "error"), *k, *t;
  if (e == NULL)
    return 0;
  k = sbn__get(e, "code");
  t = sbn__get(e, "message");
  if (k == NULL || k->type != MSGPACK_OBJECT_STR)
    return -1;
  snprintf(code, ncode, "%.*s", (int)k->via.str.size, k->via.str.ptr);
  if (t != NULL && t->type == MSGPACK_OBJECT_STR)
    snprintf(msg, nmsg, "%.*s", (int)t->via.str.size, t->via.str.ptr);
  else
    snprintf(msg, nmsg, "%s", "");
  return 1;
}

int sbn__reply_read(sbn_client_t *c, sbn__reply_t *p) {
  size_t len, off = 0;
  int rc, kept = 0;
  memset(p, 0, sizeof *p);
  if ((rc = sbn__recv_frame_kept(c, &p->body, &len, &kept)) != 0)
    return rc;
  if (kept)
    p->kept = c;
  if (svc_scan(p->body, len, &sbn__reply_limits) != 0) {
    rc = sbn__fail(c, SBN_EFORMAT, "reply: %s", svc_last_error());
    goto fail;
  }
  if (!msgpack_zone_init(&p->zone, 1024)) {
    rc = sbn__fail(c, SBN_ENOMEM, "reply: out of memory");
    goto fail;
  }
  p->zone_ok = 1;
  if (msgpack_unpack((const char *)p->body, len, &off, &p->zone, &p->root) !=
      MSGPACK_UNPACK_SUCCESS) {
    rc = sbn__fail(c, SBN_EFORMAT, "reply: not a msgpack map");
    goto fail;
  }
  return 0;
fail:
  sbn__reply_free(p);
  return rc;
}

int sbn__reply(sbn_client_t *c, uint64_t id, sbn__reply_t *p) {
  char msg[256];
  uint64_t got;
  int rc, e;
  if ((rc = sbn__reply_read(c, p)) != 0)
    return rc;
  e = sbn__error_of(&p->root, c->code, sizeof c->code, msg, sizeof msg);
  if (e < 0) {
    rc = sbn__fail(c, SBN_EFORMAT, "reply: error without a code");
    goto fail;
  }
  if (e > 0) {
    rc = sbn__fail(c, sbn__server_rc(c->code), "server replied %s%s%s", c->code,
                   msg[0] != '\0' ? ": " : "", msg);
    goto fail;
  }
  if (sbn__uint_field(&p->root, "id", &got) != 0 || got != id) {
    rc = sbn__fail(c, SBN_EFORMAT, "reply: id does not match request %llu",
                   (unsigned long long)id);
    goto fail;
  }
  return 0;
fail:
  sbn__reply_free(p);
  return rc;
}

int sbn__decode_f32(sbn_client_t *c, const msgpack_object *root,
                    const char *key, const sbn_tensor_desc_t *want,
                    svc_tensor_t *t) {
  const msgpack_object *o = sbn__get(root, key);
  memset(t, 0, sizeof *t);
  if (o == NULL)
    return sbn__fail(c, SBN_EFORMAT, "reply: no '%s'", key);
  if (svc_decode_tensor(o, key, t) != 0) {
    svc_tensor_free(t);
    return sbn__fail(c, SBN_EFORMAT, "reply: %s", svc_last_error());
  }
  if (want != NULL && (t->desc.ndim != want->ndim ||
                       memcmp(t->desc.dims, want->dims,
                              (size_t)want->ndim * sizeof *want->dims) != 0)) {
    svc_tensor_free(t);
    return sbn__fail(c, SBN_EFORMAT, "reply: '%s' has the wrong shape", key);
  }
  return 0;
}

int sbn__take_tensor(sbn_client_t *c, const msgpack_object *root,
                     const char *key, const sbn_tensor_desc_t *want,
                     float *out) {
  const msgpack_object *o = sbn__get(root, key);
  const uint8_t *payload = NULL;
  svc_tensor_t t;
  if (o == NULL)
    return sbn__fail(c, SBN_EFORMAT, "reply: no '%s'", key);
  /* The bytes go from the reply frame straight into the caller's
   * buffer: one copy, no aligned intermediate. */
  if (svc_decode_tensor_view(o, key, &t, &payload) != 0)
    return sbn__fail(c, SBN_EFORMAT, "reply: %s", svc_last_error());
  if (want != NULL && (t.desc.ndim != want->ndim ||
                       memcmp(t.desc.dims, want->dims,
                              (size_t)want->ndim * sizeof *want->dims) != 0))
    return sbn__fail(c, SBN_EFORMAT, "reply: '%s' has the wrong shape", key);
  if (t.numel > 0 && out != NULL)
    memcpy(out, payload, t.numel * sizeof(float));
  return 0;
}

static int sbn__str_is(const msgpack_object *o, const char *s) {
  size_t l = strlen(s);
  return o != NULL && o->type == MSGPACK_OBJECT_STR && o->via.str.size == l &&
         memcmp(o->via.str.ptr, s, l) == 0;
}

int sbn__take_vec64(sbn_client_t *c, const msgpack_object *root,
                    const char *key, size_t n, double *out) {
  const msgpack_object *o = sbn__get(root, key), *shape, *data;
  if (o == NULL || o->type != MSGPACK_OBJECT_MAP)
    return sbn__fail(c, SBN_EFORMAT, "reply: no tensor '%s'", key);
  shape = sbn__get(o, "shape");
  data = sbn__get(o, "data");
  if (!sbn__str_is(sbn__get(o, "dtype"), "f64") || shape == NULL ||
      shape->type != MSGPACK_OBJECT_ARRAY || shape->via.array.size != 1 ||
      shape->via.array.ptr[0].type != MSGPACK_OBJECT_POSITIVE_INTEGER ||
      shape->via.array.ptr[0].via.u64 != n || data == NULL ||
      data->type != MSGPACK_OBJECT_BIN || data->via.bin.size / 8 != n ||
      data->via.bin.size % 8 != 0)
    return sbn__fail(c, SBN_EFORMAT, "reply: '%s' is not f64 [%zu]", key, n);
  /* The bytes are little-endian, as the host is (the codec refuses to
   * build elsewhere): one copy. */
  if (out != NULL && n > 0)
    memcpy(out, data->via.bin.ptr, n * sizeof(double));
  return 0;
}

int sbn__take_stats(sbn_client_t *c, const msgpack_object *root,
                    size_t channels, double *count, double *mean, double *var,
                    double *var_unbiased, double *invstd) {
  double *outs[SVC_STATS_OUTS] = {count, mean, var, var_unbiased, invstd};
  int rc;
  for (int i = 0; i < SVC_STATS_OUTS; i++)
    if (outs[i] != NULL && (rc = sbn__take_vec64(c, root, svc_stats_out_name(i),
                                                 channels, outs[i])) != 0)
      return rc;
  return 0;
}
