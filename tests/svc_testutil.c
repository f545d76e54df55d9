/* Helpers shared by the syncbnd unit tests; see svc_testutil.h. */
#include "svc_testutil.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

void tu_body_init(tu_body_t *b) {
  msgpack_sbuffer_init(&b->sb);
  msgpack_packer_init(&b->pk, &b->sb, msgpack_sbuffer_write);
}

void tu_key(tu_body_t *b, const char *k) {
  msgpack_pack_str_with_body(&b->pk, k, strlen(k));
}

void tu_boolean(tu_body_t *b, int v) {
  v ? msgpack_pack_true(&b->pk) : msgpack_pack_false(&b->pk);
}

void tu_register_head(tu_body_t *b, size_t more, const char *name,
                      const char *kind) {
  tu_body_init(b);
  msgpack_pack_map(&b->pk, 4 + more);
  tu_key(b, "op");
  tu_key(b, "register");
  tu_key(b, "id");
  msgpack_pack_uint32(&b->pk, 1);
  tu_key(b, "name");
  tu_key(b, name);
  tu_key(b, "kind");
  tu_key(b, kind);
}

void tu_tensor(tu_body_t *b, const char *dtype, int ndim, const size_t *dims,
               const char *layout, const void *data, size_t bytes) {
  msgpack_pack_map(&b->pk, layout != NULL ? 4 : 3);
  tu_key(b, "dtype");
  tu_key(b, dtype);
  tu_key(b, "shape");
  msgpack_pack_array(&b->pk, (size_t)ndim);
  for (int i = 0; i < ndim; i++)
    msgpack_pack_uint64(&b->pk, dims[i]);
  if (layout != NULL) {
    tu_key(b, "layout");
    tu_key(b, layout);
  }
  tu_key(b, "data");
  msgpack_pack_bin(&b->pk, bytes);
  /* An empty payload adds no bytes; data may then be NULL. */
  if (bytes > 0)
    msgpack_pack_bin_body(&b->pk, data, bytes);
}

const msgpack_object *tu_get(const msgpack_object *m, const char *k) {
  assert_int_equal(m->type, MSGPACK_OBJECT_MAP);
  for (uint32_t i = 0; i < m->via.map.size; i++) {
    const msgpack_object *kk = &m->via.map.ptr[i].key;
    if (kk->type == MSGPACK_OBJECT_STR && kk->via.str.size == strlen(k) &&
        memcmp(kk->via.str.ptr, k, kk->via.str.size) == 0)
      return &m->via.map.ptr[i].val;
  }
  return NULL;
}

uint64_t tu_get_u64(const msgpack_object *m, const char *k) {
  const msgpack_object *v = tu_get(m, k);
  if (v == NULL)
    fail_msg("key %s missing", k);
  assert_int_equal(v->type, MSGPACK_OBJECT_POSITIVE_INTEGER);
  return v->via.u64;
}

double tu_get_f64(const msgpack_object *m, const char *k) {
  const msgpack_object *v = tu_get(m, k);
  if (v == NULL)
    fail_msg("key %s missing", k);
  assert_true(v->type == MSGPACK_OBJECT_FLOAT64 ||
              v->type == MSGPACK_OBJECT_FLOAT32);
  return v->via.f64;
}

const char *tu_run(svc_worker_t *w, tu_body_t *b, tu_reply_t *r) {
  size_t off = 0;
  const msgpack_object *e, *c, *m;
  r->code[0] = '\0';
  r->msg[0] = '\0';
  assert_int_equal(svc_worker_handle(w, (const uint8_t *)b->sb.data, b->sb.size,
                                     &r->buf, &r->len, &r->close_after),
                   0);
  msgpack_sbuffer_destroy(&b->sb);
  msgpack_zone_init(&r->z, 1024);
  assert_int_equal(
      msgpack_unpack((const char *)r->buf + 4, r->len - 4, &off, &r->z, &r->o),
      MSGPACK_UNPACK_SUCCESS);
  assert_int_equal(off, r->len - 4);
  e = tu_get(&r->o, "error");
  if (e == NULL)
    return r->code;
  c = tu_get(e, "code");
  m = tu_get(e, "message");
  snprintf(r->code, sizeof r->code, "%.*s", (int)c->via.str.size,
           c->via.str.ptr);
  snprintf(r->msg, sizeof r->msg, "%.*s", (int)m->via.str.size, m->via.str.ptr);
  return r->code;
}

void tu_reply_free(tu_reply_t *r) {
  msgpack_zone_destroy(&r->z);
  free(r->buf);
  r->buf = NULL;
}

int tu_err(int rc, tu_err_t *e) {
  if (rc == 0) {
    e->code = SVC_OK;
    e->msg[0] = '\0';
    return 0;
  }
  e->code = svc_code_of(rc);
  snprintf(e->msg, sizeof e->msg, "%s", svc_last_error());
  return -1;
}
