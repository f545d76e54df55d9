/* Unit tests of the syncbnd requests of protocol version 2 that need no
 * cross-rank transport: batch, stats, stats_backward, checkpoint_save,
 * checkpoint_load and the hello token (src/svc_codec.c, src/svc_worker.c,
 * src/svc_ckpt.c). No sockets and no MPI: request frames go through
 * svc_decode_request() or svc_worker_handle() as the server would hand them
 * over, and replies are read back with msgpack-c. */
#include <dirent.h>
#include <float.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>
#include <msgpack.h>

#include "svc_codec.h"
#include "svc_worker.h"
#include "svc_worker_int.h"
#include "svc_testutil.h"

/* ------------------------------------------------------------------ */
/* Building request bodies */

static size_t numel(const sbn_tensor_desc_t *d) {
  size_t n = 1;
  for (int i = 0; i < d->ndim; i++)
    n *= d->dims[i];
  return n;
}

static void f32(tu_body_t *b, const sbn_tensor_desc_t *d, const float *x) {
  tu_tensor(b, "f32", d->ndim, d->dims, NULL, x, numel(d) * sizeof *x);
}

static void vec64(tu_body_t *b, const double *v, size_t n) {
  tu_tensor(b, "f64", 1, &n, NULL, v, n * sizeof *v);
}

/* Request maps, packed into b as they are (alone or inside a batch). */
static void p_fwd(tu_body_t *b, uint64_t id, uint64_t layer, uint64_t step,
                  int train, const sbn_tensor_desc_t *d, const float *x) {
  msgpack_pack_map(&b->pk, 6);
  tu_key(b, "op");
  tu_key(b, "forward");
  tu_key(b, "id");
  msgpack_pack_uint64(&b->pk, id);
  tu_key(b, "layer");
  msgpack_pack_uint64(&b->pk, layer);
  tu_key(b, "step");
  msgpack_pack_uint64(&b->pk, step);
  tu_key(b, "train");
  tu_boolean(b, train);
  tu_key(b, "x");
  f32(b, d, x);
}

static void p_bwd(tu_body_t *b, uint64_t id, uint64_t layer, uint64_t step,
                  const sbn_tensor_desc_t *d, const float *dy) {
  msgpack_pack_map(&b->pk, 5);
  tu_key(b, "op");
  tu_key(b, "backward");
  tu_key(b, "id");
  msgpack_pack_uint64(&b->pk, id);
  tu_key(b, "layer");
  msgpack_pack_uint64(&b->pk, layer);
  tu_key(b, "step");
  msgpack_pack_uint64(&b->pk, step);
  tu_key(b, "dy");
  f32(b, d, dy);
}

/* stats with per-channel counts cnt (or, when cnt is NULL, the integer
 * count cnt_all), mean and m2 as f64 vectors of n values. */
static void p_stats_keys(tu_body_t *b, uint32_t keys, uint64_t id,
                         uint64_t layer, uint64_t step, size_t n,
                         const double *cnt, uint64_t cnt_all,
                         const double *mean, const double *m2) {
  msgpack_pack_map(&b->pk, keys);
  tu_key(b, "op");
  tu_key(b, "stats");
  tu_key(b, "id");
  msgpack_pack_uint64(&b->pk, id);
  tu_key(b, "layer");
  msgpack_pack_uint64(&b->pk, layer);
  tu_key(b, "step");
  msgpack_pack_uint64(&b->pk, step);
  tu_key(b, "count");
  if (cnt != NULL)
    vec64(b, cnt, n);
  else
    msgpack_pack_uint64(&b->pk, cnt_all);
  tu_key(b, "mean");
  vec64(b, mean, n);
  tu_key(b, "m2");
  vec64(b, m2, n);
}

static void p_stats(tu_body_t *b, uint64_t id, uint64_t layer, uint64_t step,
                    size_t n, const double *cnt, uint64_t cnt_all,
                    const double *mean, const double *m2) {
  p_stats_keys(b, 7, id, layer, step, n, cnt, cnt_all, mean, m2);
}

/* p_stats with a `want` key, whose value the caller packs next. */
static void p_stats_want(tu_body_t *b, uint64_t id, uint64_t layer,
                         uint64_t step, size_t n, const double *cnt,
                         uint64_t cnt_all, const double *mean,
                         const double *m2) {
  p_stats_keys(b, 8, id, layer, step, n, cnt, cnt_all, mean, m2);
  tu_key(b, "want");
}

/* A `want` array of the names of the set bits of mask (SVC_STATS_*). */
static void want_of(tu_body_t *b, unsigned mask) {
  uint32_t n = 0;
  for (int i = 0; i < SVC_STATS_OUTS; i++)
    n += (mask >> i) & 1u;
  msgpack_pack_array(&b->pk, n);
  for (int i = 0; i < SVC_STATS_OUTS; i++)
    if (mask & (1u << i))
      tu_key(b, svc_stats_out_name(i));
}

static void p_stats_bwd(tu_body_t *b, uint64_t id, uint64_t layer,
                        uint64_t step, size_t n, const double *sdy,
                        const double *sdyx) {
  msgpack_pack_map(&b->pk, 6);
  tu_key(b, "op");
  tu_key(b, "stats_backward");
  tu_key(b, "id");
  msgpack_pack_uint64(&b->pk, id);
  tu_key(b, "layer");
  msgpack_pack_uint64(&b->pk, layer);
  tu_key(b, "step");
  msgpack_pack_uint64(&b->pk, step);
  tu_key(b, "sum_dy");
  vec64(b, sdy, n);
  tu_key(b, "sum_dy_xhat");
  vec64(b, sdyx, n);
}

/* {op: "batch", id, requests: [n maps follow]} */
static void p_batch(tu_body_t *b, uint64_t id, uint32_t n) {
  msgpack_pack_map(&b->pk, 3);
  tu_key(b, "op");
  tu_key(b, "batch");
  tu_key(b, "id");
  msgpack_pack_uint64(&b->pk, id);
  tu_key(b, "requests");
  msgpack_pack_array(&b->pk, n);
}

/* {op, id} only: enough to reach the batch's op check. */
static void p_bare(tu_body_t *b, const char *op, uint64_t id) {
  msgpack_pack_map(&b->pk, 2);
  tu_key(b, "op");
  tu_key(b, op);
  tu_key(b, "id");
  msgpack_pack_uint64(&b->pk, id);
}

/* ------------------------------------------------------------------ */
/* Decoding */

static svc_limits_t limits(uint32_t max_objects) {
  svc_limits_t l;
  svc_limits_default(&l);
  if (max_objects > 0)
    l.max_objects = max_objects;
  return l;
}

/* Decodes b with l and frees b; on failure asserts a message. */
static svc_code_t dec_lim(tu_body_t *b, const svc_limits_t *l, svc_request_t *q,
                          tu_err_t *err) {
  int rc;
  memset(err, 0, sizeof *err);
  rc = tu_err(svc_decode_request((const uint8_t *)b->sb.data, b->sb.size, l, q),
              err);
  msgpack_sbuffer_destroy(&b->sb);
  if (rc == 0)
    return SVC_OK;
  assert_int_not_equal(err->code, SVC_OK);
  assert_true(err->msg[0] != '\0');
  /* A failed decode owns nothing. */
  assert_null(q->sub);
  assert_int_equal(q->nsub, 0);
  assert_null(q->x.data);
  assert_null(q->count.v);
  assert_null(q->mean.v);
  assert_null(q->m2.v);
  return err->code;
}

static svc_code_t dec(tu_body_t *b, svc_request_t *q, tu_err_t *err) {
  svc_limits_t l = limits(0);
  return dec_lim(b, &l, q, err);
}

/* The decode of b fails with code want and a message that starts with
 * prefix. */
#define EXPECT_DEC(b, q, want, prefix)                                     \
  do {                                                                     \
    tu_err_t err_;                                                         \
    svc_code_t got_ = dec((b), (q), &err_);                                \
    if (got_ != (want))                                                    \
      fail_msg("line %d: got %s (%s), expected %s", __LINE__,              \
               svc_code_name(got_), err_.msg, svc_code_name(want));        \
    if (strncmp(err_.msg, (prefix), strlen(prefix)) != 0)                  \
      fail_msg("line %d: message '%s' does not start with '%s'", __LINE__, \
               err_.msg, (prefix));                                        \
  } while (0)

/* ------------------------------------------------------------------ */
/* Replies */

static int known_code(const msgpack_object *c) {
  for (int i = 1; i < SVC_CODE_COUNT; i++) {
    const char *n = svc_code_name((svc_code_t)i);
    if (c->via.str.size == strlen(n) &&
        memcmp(c->via.str.ptr, n, strlen(n)) == 0)
      return 1;
  }
  return 0;
}

/* Checks that m is a reply map: an id (integer or nil) and, for an error,
 * {code: a known code, message: str}. Fills code/msg ("" on success). */
static void check_map(const msgpack_object *m, char *code, size_t clen,
                      char *msg, size_t mlen) {
  const msgpack_object *id, *e, *c, *s;
  assert_int_equal(m->type, MSGPACK_OBJECT_MAP);
  id = tu_get(m, "id");
  if (id == NULL)
    fail_msg("reply map without id");
  assert_true(id->type == MSGPACK_OBJECT_POSITIVE_INTEGER ||
              id->type == MSGPACK_OBJECT_NEGATIVE_INTEGER ||
              id->type == MSGPACK_OBJECT_NIL);
  code[0] = '\0';
  msg[0] = '\0';
  e = tu_get(m, "error");
  if (e == NULL)
    return;
  assert_int_equal(m->via.map.size, 2);
  assert_int_equal(e->type, MSGPACK_OBJECT_MAP);
  c = tu_get(e, "code");
  s = tu_get(e, "message");
  assert_non_null(c);
  assert_non_null(s);
  assert_int_equal(c->type, MSGPACK_OBJECT_STR);
  assert_int_equal(s->type, MSGPACK_OBJECT_STR);
  assert_true(known_code(c));
  snprintf(code, clen, "%.*s", (int)c->via.str.size, c->via.str.ptr);
  snprintf(msg, mlen, "%.*s", (int)s->via.str.size, s->via.str.ptr);
}

/* Checks a reply frame (header length, one msgpack map, its id and error
 * shape; for a batch reply every element too) and unpacks it into r. */
static void parse(tu_reply_t *r) {
  size_t off = 0;
  const msgpack_object *rs;
  assert_non_null(r->buf);
  assert_true(r->len > SVC_HEADER_BYTES);
  assert_int_equal(((size_t)r->buf[0] << 24) | ((size_t)r->buf[1] << 16) |
                       ((size_t)r->buf[2] << 8) | (size_t)r->buf[3],
                   r->len - SVC_HEADER_BYTES);
  msgpack_zone_init(&r->z, 1024);
  assert_int_equal(
      msgpack_unpack((const char *)r->buf + SVC_HEADER_BYTES,
                     r->len - SVC_HEADER_BYTES, &off, &r->z, &r->o),
      MSGPACK_UNPACK_SUCCESS);
  assert_int_equal(off, r->len - SVC_HEADER_BYTES);
  check_map(&r->o, r->code, sizeof r->code, r->msg, sizeof r->msg);
  if (r->code[0] == '\0' && (rs = tu_get(&r->o, "replies")) != NULL) {
    char c[64], m[256];
    assert_int_equal(rs->type, MSGPACK_OBJECT_ARRAY);
    for (uint32_t i = 0; i < rs->via.array.size; i++)
      check_map(&rs->via.array.ptr[i], c, sizeof c, m, sizeof m);
  }
}

/* Runs b (freed here) through the worker; returns the error code, "" on
 * success. */
static const char *run(svc_worker_t *w, tu_body_t *b, tu_reply_t *r) {
  memset(r, 0, sizeof *r);
  assert_int_equal(svc_worker_handle(w, (const uint8_t *)b->sb.data, b->sb.size,
                                     &r->buf, &r->len, &r->close_after),
                   0);
  msgpack_sbuffer_destroy(&b->sb);
  parse(r);
  return r->code;
}

#define EXPECT(w, b, r, want)                                           \
  do {                                                                  \
    const char *got_ = run((w), (b), (r));                              \
    if (strcmp(got_, (want)) != 0)                                      \
      fail_msg("line %d: got '%s' (%s), expected '%s'", __LINE__, got_, \
               (r)->msg, want);                                         \
  } while (0)

static uint64_t id_of(const msgpack_object *m) {
  const msgpack_object *id = tu_get(m, "id");
  assert_non_null(id);
  assert_int_equal(id->type, MSGPACK_OBJECT_POSITIVE_INTEGER);
  return id->via.u64;
}

/* The error code of a reply map ("" when it is no error). */
static const char *code_of(const msgpack_object *m, char *msg, size_t mlen) {
  static char code[64];
  check_map(m, code, sizeof code, msg, mlen);
  return code;
}

/* Reads the f32 tensor at key k of map m into out (n values). */
static void tensor_of(const msgpack_object *m, const char *k, float *out,
                      size_t n) {
  svc_tensor_t t;
  tu_err_t err;
  const msgpack_object *o = tu_get(m, k);
  if (o == NULL)
    fail_msg("reply without '%s'", k);
  assert_int_equal(tu_err(svc_decode_tensor(o, k, &t), &err), 0);
  assert_int_equal(t.numel, n);
  memcpy(out, t.data, n * sizeof *out);
  svc_tensor_free(&t);
}

/* ------------------------------------------------------------------ */
/* Workers and layers */

static svc_worker_t *worker_cfg(int size, uint32_t max_depth) {
  svc_worker_config_t cfg;
  svc_worker_t *w = NULL;
  svc_worker_config_default(&cfg);
  cfg.size = size;
  if (max_depth > 0)
    cfg.limits.max_depth = max_depth;
  assert_int_equal(svc_worker_create(&cfg, &w), 0);
  return w;
}

static svc_worker_t *worker(void) {
  return worker_cfg(1, 0);
}

/* Registers a layer; channels 0 and lnshape 0 leave them out. */
static void reg(svc_worker_t *w, const char *name, const char *kind,
                uint32_t channels, size_t lnshape, uint64_t want_layer) {
  tu_body_t b;
  tu_reply_t r;
  tu_register_head(&b, (channels > 0) + (lnshape > 0), name, kind);
  if (channels > 0) {
    tu_key(&b, "channels");
    msgpack_pack_uint32(&b.pk, channels);
  }
  if (lnshape > 0) {
    tu_key(&b, "normalized_shape");
    msgpack_pack_array(&b.pk, 1);
    msgpack_pack_uint64(&b.pk, lnshape);
  }
  EXPECT(w, &b, &r, "");
  assert_int_equal(tu_get(&r.o, "layer")->via.u64, want_layer);
  tu_reply_free(&r);
}

/* Deterministic test data. */
static void fill(float *v, size_t n, uint32_t seed) {
  uint32_t s = seed * 2654435761u + 1;
  for (size_t i = 0; i < n; i++) {
    s ^= s << 13, s ^= s >> 17, s ^= s << 5;
    v[i] = (float)(s % 2001) / 250.0f - 4.0f;
  }
}

/* ------------------------------------------------------------------ */
/* Decoding: batch */

static void test_batch_decode(void **st) {
  tu_body_t b;
  svc_request_t q;
  tu_err_t err;
  svc_limits_t big = limits(1u << 20);
  const sbn_tensor_desc_t d = {2, {2, 3}, SBN_LAYOUT_NCHW};
  float x[6] = {1, 2, 3, 4, 5, 6};
  double v3[3] = {1, 2, 3};
  static const char *const refused[] = {
      "hello",           "register",        "batch",
      "checkpoint_save", "checkpoint_load", "get_state",
      "set_state",       "metrics",         "bye"};
  (void)st;

  /* No requests, and one more than SVC_BATCH_MAX. */
  tu_body_init(&b);
  p_batch(&b, 9, 0);
  EXPECT_DEC(&b, &q, SVC_BAD_REQUEST, "requests:");
  assert_true(q.id.present && q.id.u == 9);
  tu_body_init(&b);
  p_batch(&b, 9, SVC_BATCH_MAX + 1);
  for (int i = 0; i < SVC_BATCH_MAX + 1; i++)
    p_bwd(&b, 1000 + (uint64_t)i, 0, 1, &d, x);
  assert_int_equal(dec_lim(&b, &big, &q, &err), SVC_BAD_REQUEST);
  assert_memory_equal(err.msg, "requests:", 9);

  /* Exactly SVC_BATCH_MAX decode, in order, each with its own id. */
  tu_body_init(&b);
  p_batch(&b, 9, SVC_BATCH_MAX);
  for (int i = 0; i < SVC_BATCH_MAX; i++)
    p_bwd(&b, 1000 + (uint64_t)i, (uint64_t)i % 7, (uint64_t)i, &d, x);
  assert_int_equal(dec_lim(&b, &big, &q, &err), SVC_OK);
  assert_int_equal(q.op, SVC_OP_BATCH);
  assert_int_equal(q.nsub, SVC_BATCH_MAX);
  for (int i = 0; i < SVC_BATCH_MAX; i++) {
    assert_int_equal(q.sub[i].op, SVC_OP_BACKWARD);
    assert_true(q.sub[i].id.present && q.sub[i].id.u == 1000 + (uint64_t)i);
    assert_int_equal(q.sub[i].layer, (uint64_t)i % 7);
    assert_int_equal(q.sub[i].step, (uint64_t)i);
    assert_int_equal(q.sub[i].x.numel, 6);
    assert_memory_equal(q.sub[i].x.data, x, sizeof x);
  }
  svc_request_free(&q);

  /* requests missing, or not an array. */
  tu_body_init(&b);
  p_bare(&b, "batch", 9);
  EXPECT_DEC(&b, &q, SVC_BAD_REQUEST, "batch: missing 'requests'");
  tu_body_init(&b);
  msgpack_pack_map(&b.pk, 3);
  tu_key(&b, "op");
  tu_key(&b, "batch");
  tu_key(&b, "id");
  msgpack_pack_uint32(&b.pk, 9);
  tu_key(&b, "requests");
  p_bare(&b, "forward", 1);
  EXPECT_DEC(&b, &q, SVC_BAD_REQUEST, "requests:");

  /* A sub-request that is not a map. */
  tu_body_init(&b);
  p_batch(&b, 9, 2);
  p_fwd(&b, 1, 0, 1, 1, &d, x);
  msgpack_pack_uint32(&b.pk, 5);
  EXPECT_DEC(&b, &q, SVC_BAD_REQUEST, "requests[1]: expected a map");

  /* Ops a batch does not carry, at index 1 after a valid forward. */
  for (size_t i = 0; i < sizeof refused / sizeof *refused; i++) {
    tu_body_init(&b);
    p_batch(&b, 77, 2);
    p_fwd(&b, 1, 0, 1, 1, &d, x);
    p_bare(&b, refused[i], 2);
    EXPECT_DEC(&b, &q, SVC_BAD_REQUEST, "requests[1].op:");
    assert_true(q.id.present && q.id.u == 77);
  }
  /* The message names the refused op. */
  tu_body_init(&b);
  p_batch(&b, 77, 1);
  p_bare(&b, "checkpoint_save", 2);
  assert_int_equal(dec(&b, &q, &err), SVC_BAD_REQUEST);
  assert_non_null(strstr(err.msg, "'checkpoint_save'"));

  /* An unknown op inside. */
  tu_body_init(&b);
  p_batch(&b, 77, 3);
  p_fwd(&b, 1, 0, 1, 1, &d, x);
  p_fwd(&b, 2, 0, 2, 1, &d, x);
  p_bare(&b, "frobnicate", 3);
  EXPECT_DEC(&b, &q, SVC_UNKNOWN_OP, "requests[2].op:");

  /* A sub-request without an id, or with one that is not an integer. */
  tu_body_init(&b);
  p_batch(&b, 77, 1);
  msgpack_pack_map(&b.pk, 1);
  tu_key(&b, "op");
  tu_key(&b, "forward");
  EXPECT_DEC(&b, &q, SVC_BAD_REQUEST, "requests[0].id:");
  assert_true(q.id.present && q.id.u == 77);
  tu_body_init(&b);
  p_batch(&b, 77, 1);
  msgpack_pack_map(&b.pk, 2);
  tu_key(&b, "op");
  tu_key(&b, "backward");
  tu_key(&b, "id");
  tu_key(&b, "five");
  EXPECT_DEC(&b, &q, SVC_BAD_REQUEST, "requests[0].id:");

  /* Errors inside a sub-request name the key under requests[i], and the
   * request keeps the outer id (negative here), never the sub-request's. */
  tu_body_init(&b);
  msgpack_pack_map(&b.pk, 3);
  tu_key(&b, "op");
  tu_key(&b, "batch");
  tu_key(&b, "id");
  msgpack_pack_int64(&b.pk, -5);
  tu_key(&b, "requests");
  msgpack_pack_array(&b.pk, 2);
  p_fwd(&b, 1, 0, 1, 1, &d, x);
  /* A forward whose x decodes (and is allocated) before its weight fails:
   * nothing may leak. */
  msgpack_pack_map(&b.pk, 7);
  tu_key(&b, "op");
  tu_key(&b, "forward");
  tu_key(&b, "id");
  msgpack_pack_uint32(&b.pk, 555);
  tu_key(&b, "layer");
  msgpack_pack_uint32(&b.pk, 0);
  tu_key(&b, "step");
  msgpack_pack_uint32(&b.pk, 2);
  tu_key(&b, "train");
  tu_boolean(&b, 1);
  tu_key(&b, "x");
  f32(&b, &d, x);
  tu_key(&b, "weight");
  vec64(&b, v3, 3);
  EXPECT_DEC(&b, &q, SVC_BAD_TENSOR, "requests[1].weight.dtype:");
  assert_true(q.id.present && q.id.negative && q.id.i == -5);

  tu_body_init(&b);
  p_batch(&b, 31, 1);
  msgpack_pack_map(&b.pk, 4);
  tu_key(&b, "op");
  tu_key(&b, "forward");
  tu_key(&b, "id");
  msgpack_pack_uint32(&b.pk, 1);
  tu_key(&b, "layer");
  msgpack_pack_uint32(&b.pk, 0);
  tu_key(&b, "step");
  msgpack_pack_uint32(&b.pk, 0);
  EXPECT_DEC(&b, &q, SVC_BAD_REQUEST, "requests[0].forward: missing 'train'");
  assert_true(q.id.present && q.id.u == 31);

  /* All four ops a batch carries, decoded in order. */
  tu_body_init(&b);
  p_batch(&b, 40, 4);
  p_fwd(&b, 41, 2, 5, 1, &d, x);
  p_bwd(&b, 42, 3, 6, &d, x);
  p_stats(&b, 43, 4, 7, 3, NULL, 12, v3, v3);
  p_stats_bwd(&b, 44, 5, 8, 3, v3, v3);
  assert_int_equal(dec(&b, &q, &err), SVC_OK);
  assert_int_equal(q.nsub, 4);
  assert_int_equal(q.sub[0].op, SVC_OP_FORWARD);
  assert_int_equal(q.sub[1].op, SVC_OP_BACKWARD);
  assert_int_equal(q.sub[2].op, SVC_OP_STATS);
  assert_int_equal(q.sub[3].op, SVC_OP_STATS_BACKWARD);
  for (int i = 0; i < 4; i++) {
    assert_int_equal(q.sub[i].id.u, 41 + (uint64_t)i);
    assert_int_equal(q.sub[i].layer, 2 + (uint64_t)i);
    assert_int_equal(q.sub[i].step, 5 + (uint64_t)i);
    assert_int_equal(q.sub[i].nsub, 0);
  }
  assert_true(q.sub[0].train);
  assert_true(q.sub[2].count.scalar && q.sub[2].count.v[0] == 12.0);
  assert_int_equal(q.sub[3].mean.n, 3);
  svc_request_free(&q);
}

/* ------------------------------------------------------------------ */
/* Decoding: stats and stats_backward */

static void test_stats_decode(void **st) {
  tu_body_t b;
  svc_request_t q;
  tu_err_t err;
  /* Values whose bits must survive: a tiny subnormal, the largest double,
   * a negative zero, a third, and a NaN with a payload. */
  double mean[5], m2[5] = {0.25, 1e-300, 3, 4, 5}, cnt[5] = {1, 2, 3, 4, 5};
  const uint64_t nan_bits = 0x7ff8000000012345ull;
  float cnt32[5] = {1.5f, 2, 3, 4, 16777217.0f};
  const size_t d2[2] = {1, 5}, d5[1] = {5};
  (void)st;
  mean[0] = 4.9406564584124654e-324;
  mean[1] = DBL_MAX;
  mean[2] = -0.0;
  mean[3] = 1.0 / 3.0;
  memcpy(&mean[4], &nan_bits, sizeof mean[4]);

  /* f64 vectors round trip bit for bit; an integer count is a scalar. */
  tu_body_init(&b);
  p_stats(&b, 1, 3, 4, 5, NULL, 7, mean, m2);
  assert_int_equal(dec(&b, &q, &err), SVC_OK);
  assert_int_equal(q.op, SVC_OP_STATS);
  assert_int_equal(q.layer, 3);
  assert_int_equal(q.step, 4);
  assert_true(q.count.present && q.count.scalar);
  assert_int_equal(q.count.n, 1);
  assert_true(q.count.v[0] == 7.0);
  assert_true(q.mean.present && !q.mean.scalar);
  assert_int_equal(q.mean.n, 5);
  assert_memory_equal(q.mean.v, mean, sizeof mean);
  assert_int_equal(q.m2.n, 5);
  assert_memory_equal(q.m2.v, m2, sizeof m2);
  svc_request_free(&q);

  /* A per-channel f64 count; an f32 count is widened exactly. */
  tu_body_init(&b);
  p_stats(&b, 1, 3, 4, 5, cnt, 0, mean, m2);
  assert_int_equal(dec(&b, &q, &err), SVC_OK);
  assert_false(q.count.scalar);
  assert_int_equal(q.count.n, 5);
  assert_memory_equal(q.count.v, cnt, sizeof cnt);
  svc_request_free(&q);
  tu_body_init(&b);
  msgpack_pack_map(&b.pk, 7);
  tu_key(&b, "op");
  tu_key(&b, "stats");
  tu_key(&b, "id");
  msgpack_pack_uint32(&b.pk, 1);
  tu_key(&b, "layer");
  msgpack_pack_uint32(&b.pk, 0);
  tu_key(&b, "step");
  msgpack_pack_uint32(&b.pk, 0);
  tu_key(&b, "count");
  tu_tensor(&b, "f32", 1, d5, NULL, cnt32, sizeof cnt32);
  tu_key(&b, "mean");
  vec64(&b, mean, 5);
  tu_key(&b, "m2");
  tu_tensor(&b, "f32", 1, d5, NULL, cnt32, sizeof cnt32);
  assert_int_equal(dec(&b, &q, &err), SVC_OK);
  for (int i = 0; i < 5; i++) {
    assert_true(q.count.v[i] == (double)cnt32[i]);
    assert_true(q.m2.v[i] == (double)cnt32[i]);
  }
  svc_request_free(&q);

  /* count: negative, a float, a 2-D tensor, an f64 payload of the wrong
   * size, an unknown dtype. */
  {
    enum { NEG, FLT, TWO_D, SHORT, LONG, F16, NCASES };
    for (int c = 0; c < NCASES; c++) {
      svc_code_t want = SVC_BAD_TENSOR;
      const char *prefix = "count";
      tu_body_init(&b);
      msgpack_pack_map(&b.pk, 7);
      tu_key(&b, "op");
      tu_key(&b, "stats");
      tu_key(&b, "id");
      msgpack_pack_uint32(&b.pk, 1);
      tu_key(&b, "layer");
      msgpack_pack_uint32(&b.pk, 0);
      tu_key(&b, "step");
      msgpack_pack_uint32(&b.pk, 0);
      tu_key(&b, "mean");
      vec64(&b, m2, 5);
      tu_key(&b, "m2");
      vec64(&b, m2, 5);
      tu_key(&b, "count");
      switch (c) {
        case NEG:
          msgpack_pack_int64(&b.pk, -3);
          break;
        case FLT:
          msgpack_pack_double(&b.pk, 3.0);
          break;
        case TWO_D:
          tu_tensor(&b, "f64", 2, d2, NULL, cnt, sizeof cnt);
          prefix = "count: expected a 1-D tensor";
          break;
        case SHORT:
          tu_tensor(&b, "f64", 1, d5, NULL, cnt, sizeof cnt - 1);
          prefix = "count.data:";
          break;
        case LONG:
          /* Five f64 values are the bytes of ten f32 ones, not of five. */
          tu_tensor(&b, "f32", 1, d5, NULL, cnt, sizeof cnt);
          prefix = "count.data:";
          break;
        case F16:
          tu_tensor(&b, "f16", 1, d5, NULL, cnt, 10);
          prefix = "count.dtype:";
          break;
      }
      EXPECT_DEC(&b, &q, want, prefix);
      assert_true(q.id.present && q.id.u == 1);
    }
  }

  /* Missing keys are named. */
  tu_body_init(&b);
  msgpack_pack_map(&b.pk, 6);
  tu_key(&b, "op");
  tu_key(&b, "stats");
  tu_key(&b, "id");
  msgpack_pack_uint32(&b.pk, 1);
  tu_key(&b, "layer");
  msgpack_pack_uint32(&b.pk, 0);
  tu_key(&b, "step");
  msgpack_pack_uint32(&b.pk, 0);
  tu_key(&b, "count");
  msgpack_pack_uint32(&b.pk, 4);
  tu_key(&b, "m2");
  vec64(&b, m2, 5);
  EXPECT_DEC(&b, &q, SVC_BAD_REQUEST, "stats: missing 'mean'");
  tu_body_init(&b);
  msgpack_pack_map(&b.pk, 5);
  tu_key(&b, "op");
  tu_key(&b, "stats_backward");
  tu_key(&b, "id");
  msgpack_pack_uint32(&b.pk, 1);
  tu_key(&b, "layer");
  msgpack_pack_uint32(&b.pk, 0);
  tu_key(&b, "step");
  msgpack_pack_uint32(&b.pk, 0);
  tu_key(&b, "sum_dy");
  vec64(&b, m2, 5);
  EXPECT_DEC(&b, &q, SVC_BAD_REQUEST, "stats_backward: missing 'sum_dy_xhat'");

  /* stats_backward: the sums land in mean and m2, bit for bit; an integer
   * is no vector there. */
  tu_body_init(&b);
  p_stats_bwd(&b, 2, 1, 9, 5, mean, m2);
  assert_int_equal(dec(&b, &q, &err), SVC_OK);
  assert_int_equal(q.op, SVC_OP_STATS_BACKWARD);
  assert_memory_equal(q.mean.v, mean, sizeof mean);
  assert_memory_equal(q.m2.v, m2, sizeof m2);
  assert_false(q.count.present);
  svc_request_free(&q);
  tu_body_init(&b);
  msgpack_pack_map(&b.pk, 6);
  tu_key(&b, "op");
  tu_key(&b, "stats_backward");
  tu_key(&b, "id");
  msgpack_pack_uint32(&b.pk, 1);
  tu_key(&b, "layer");
  msgpack_pack_uint32(&b.pk, 0);
  tu_key(&b, "step");
  msgpack_pack_uint32(&b.pk, 0);
  tu_key(&b, "sum_dy");
  msgpack_pack_uint32(&b.pk, 4);
  tu_key(&b, "sum_dy_xhat");
  vec64(&b, m2, 5);
  EXPECT_DEC(&b, &q, SVC_BAD_TENSOR, "sum_dy:");

  /* mean decodes (allocated) before m2 fails: nothing leaks. */
  tu_body_init(&b);
  msgpack_pack_map(&b.pk, 7);
  tu_key(&b, "op");
  tu_key(&b, "stats");
  tu_key(&b, "id");
  msgpack_pack_uint32(&b.pk, 1);
  tu_key(&b, "layer");
  msgpack_pack_uint32(&b.pk, 0);
  tu_key(&b, "step");
  msgpack_pack_uint32(&b.pk, 0);
  tu_key(&b, "count");
  vec64(&b, cnt, 5);
  tu_key(&b, "mean");
  vec64(&b, mean, 5);
  tu_key(&b, "m2");
  tu_tensor(&b, "f64", 2, d2, NULL, cnt, sizeof cnt);
  EXPECT_DEC(&b, &q, SVC_BAD_TENSOR, "m2: expected a 1-D tensor");
}

/* ------------------------------------------------------------------ */
/* Decoding: hello token and checkpoint names */

static void hello(tu_body_t *b, int bin, const uint8_t *tok, size_t n) {
  tu_body_init(b);
  msgpack_pack_map(&b->pk, 4);
  tu_key(b, "op");
  tu_key(b, "hello");
  tu_key(b, "id");
  msgpack_pack_uint32(&b->pk, 3);
  tu_key(b, "version");
  msgpack_pack_uint32(&b->pk, 2);
  tu_key(b, "token");
  if (bin) {
    msgpack_pack_bin(&b->pk, n);
    msgpack_pack_bin_body(&b->pk, tok, n);
  } else {
    msgpack_pack_str(&b->pk, n);
    msgpack_pack_str_body(&b->pk, tok, n);
  }
}

/* Decoding a stats request's `want` (the compact reply): the names it
 * lists become the vectors kept, in any order; no key keeps all five;
 * anything that is not an array of distinct known names is refused,
 * naming the element. */
static void test_stats_want_decode(void **st) {
  tu_body_t b;
  svc_request_t q;
  tu_err_t err;
  double v[3] = {1, 2, 3};
  (void)st;
  tu_body_init(&b);
  p_stats(&b, 1, 0, 1, 3, NULL, 4, v, v);
  assert_int_equal(dec(&b, &q, &err), SVC_OK);
  assert_int_equal(q.skip, 0);
  svc_request_free(&q);
  for (unsigned mask = 0; mask <= SVC_STATS_ALL; mask++) {
    tu_body_init(&b);
    p_stats_want(&b, 1, 0, 1, 3, NULL, 4, v, v);
    want_of(&b, mask);
    assert_int_equal(dec(&b, &q, &err), SVC_OK);
    assert_int_equal(q.skip, SVC_STATS_ALL & ~mask);
    svc_request_free(&q);
  }
  /* The order of the list does not matter. */
  tu_body_init(&b);
  p_stats_want(&b, 1, 0, 1, 3, NULL, 4, v, v);
  msgpack_pack_array(&b.pk, 2);
  tu_key(&b, "invstd");
  tu_key(&b, "count");
  assert_int_equal(dec(&b, &q, &err), SVC_OK);
  assert_int_equal(q.skip,
                   SVC_STATS_MEAN | SVC_STATS_VAR | SVC_STATS_VAR_UNBIASED);
  svc_request_free(&q);
  {
    enum { STR, MAP, NIL, INT_ELEM, UNKNOWN, PREFIX, REPEAT, SIX, NCASES };
    static const char *const prefix[NCASES] = {
        "want: expected an array",  "want: expected an array",
        "want: expected an array",  "want[0]: expected one of",
        "want[1]: expected one of", "want[0]: expected one of",
        "want[1]: 'mean' repeated", "want[5]: 'count' repeated"};
    for (int c = 0; c < NCASES; c++) {
      tu_body_init(&b);
      p_stats_want(&b, 7, 0, 1, 3, NULL, 4, v, v);
      switch (c) {
        case STR:
          tu_key(&b, "mean");
          break;
        case MAP:
          msgpack_pack_map(&b.pk, 0);
          break;
        case NIL:
          msgpack_pack_nil(&b.pk);
          break;
        case INT_ELEM:
          msgpack_pack_array(&b.pk, 1);
          msgpack_pack_uint32(&b.pk, 1);
          break;
        case UNKNOWN:
          msgpack_pack_array(&b.pk, 2);
          tu_key(&b, "mean");
          tu_key(&b, "std");
          break;
        case PREFIX: /* a name's prefix is no name */
          msgpack_pack_array(&b.pk, 1);
          tu_key(&b, "var_");
          break;
        case REPEAT:
          msgpack_pack_array(&b.pk, 2);
          tu_key(&b, "mean");
          tu_key(&b, "mean");
          break;
        case SIX:
          msgpack_pack_array(&b.pk, 6);
          for (int i = 0; i < SVC_STATS_OUTS; i++)
            tu_key(&b, svc_stats_out_name(i));
          tu_key(&b, "count");
          break;
      }
      EXPECT_DEC(&b, &q, SVC_BAD_REQUEST, prefix[c]);
      assert_true(q.id.present && q.id.u == 7);
    }
  }
}

static void test_hello_token(void **st) {
  tu_body_t b;
  svc_request_t q;
  tu_err_t err;
  uint8_t tok[SVC_TOKEN_MAX + 1];
  svc_worker_t *w = worker();
  tu_reply_t r;
  (void)st;
  for (size_t i = 0; i < sizeof tok; i++)
    tok[i] = (uint8_t)(i * 7 + 1);
  tok[3] = 0; /* a bin token may hold any byte */
  for (int bin = 0; bin < 2; bin++) {
    const size_t lens[] = {0, 1, 32, SVC_TOKEN_MAX};
    for (size_t k = 0; k < sizeof lens / sizeof *lens; k++) {
      hello(&b, bin, tok, lens[k]);
      assert_int_equal(dec(&b, &q, &err), SVC_OK);
      assert_int_equal(q.op, SVC_OP_HELLO);
      assert_int_equal(q.version, 2);
      assert_true(q.has_token);
      assert_int_equal(q.token_len, lens[k]);
      if (lens[k] > 0)
        assert_memory_equal(q.token, tok, lens[k]);
      svc_request_free(&q);
    }
    hello(&b, bin, tok, SVC_TOKEN_MAX + 1);
    EXPECT_DEC(&b, &q, SVC_BAD_REQUEST, "token:");
    assert_true(q.id.present && q.id.u == 3);
    assert_false(q.has_token);
    /* The worker answers a hello with a token (the server checks it). */
    hello(&b, bin, tok, 16);
    EXPECT(w, &b, &r, "");
    assert_int_equal(id_of(&r.o), 3);
    assert_int_equal(tu_get(&r.o, "protocol")->via.u64, SVC_PROTOCOL_VERSION);
    tu_reply_free(&r);
    hello(&b, bin, tok, SVC_TOKEN_MAX + 1);
    EXPECT(w, &b, &r, "BAD_REQUEST");
    assert_false(r.close_after);
    assert_int_equal(id_of(&r.o), 3);
    tu_reply_free(&r);
  }
  /* Without a token; with one of another type. */
  tu_body_init(&b);
  msgpack_pack_map(&b.pk, 3);
  tu_key(&b, "op");
  tu_key(&b, "hello");
  tu_key(&b, "id");
  msgpack_pack_uint32(&b.pk, 3);
  tu_key(&b, "version");
  msgpack_pack_uint32(&b.pk, 2);
  assert_int_equal(dec(&b, &q, &err), SVC_OK);
  assert_false(q.has_token);
  svc_request_free(&q);
  tu_body_init(&b);
  msgpack_pack_map(&b.pk, 4);
  tu_key(&b, "op");
  tu_key(&b, "hello");
  tu_key(&b, "id");
  msgpack_pack_uint32(&b.pk, 3);
  tu_key(&b, "version");
  msgpack_pack_uint32(&b.pk, 2);
  tu_key(&b, "token");
  msgpack_pack_uint32(&b.pk, 1234);
  EXPECT_DEC(&b, &q, SVC_BAD_REQUEST, "token:");
  svc_worker_destroy(w);
}

static void ckpt_body(tu_body_t *b, const char *op, int kind, const char *name,
                      size_t n) {
  tu_body_init(b);
  msgpack_pack_map(&b->pk, kind < 0 ? 2 : 3);
  tu_key(b, "op");
  tu_key(b, op);
  tu_key(b, "id");
  msgpack_pack_uint32(&b->pk, 21);
  if (kind < 0)
    return;
  tu_key(b, "name");
  if (kind == 0) {
    msgpack_pack_str(&b->pk, n);
    msgpack_pack_str_body(&b->pk, name, n);
  } else if (kind == 1) {
    msgpack_pack_bin(&b->pk, n);
    msgpack_pack_bin_body(&b->pk, name, n);
  } else {
    msgpack_pack_uint32(&b->pk, 7);
  }
}

static void test_checkpoint_decode(void **st) {
  static const char *const ops[] = {"checkpoint_save", "checkpoint_load"};
  char longname[SVC_NAME_MAX + 2], want[64];
  tu_body_t b;
  svc_request_t q;
  tu_err_t err;
  (void)st;
  memset(longname, 'n', sizeof longname);
  for (int i = 0; i < 2; i++) {
    ckpt_body(&b, ops[i], 0, "ckpt-1", 6);
    assert_int_equal(dec(&b, &q, &err), SVC_OK);
    assert_int_equal(q.op,
                     i == 0 ? SVC_OP_CHECKPOINT_SAVE : SVC_OP_CHECKPOINT_LOAD);
    assert_string_equal(q.reg.name, "ckpt-1");
    svc_request_free(&q);
    snprintf(want, sizeof want, "%s: missing 'name'", ops[i]);
    ckpt_body(&b, ops[i], -1, NULL, 0);
    EXPECT_DEC(&b, &q, SVC_BAD_REQUEST, want);
    ckpt_body(&b, ops[i], 2, NULL, 0);
    EXPECT_DEC(&b, &q, SVC_BAD_REQUEST, "name:");
    ckpt_body(&b, ops[i], 1, "abc", 3);
    EXPECT_DEC(&b, &q, SVC_BAD_REQUEST, "name:");
    ckpt_body(&b, ops[i], 0, "a\0b", 3);
    EXPECT_DEC(&b, &q, SVC_BAD_REQUEST, "name: contains a zero byte");
    ckpt_body(&b, ops[i], 0, "\0", 1);
    EXPECT_DEC(&b, &q, SVC_BAD_REQUEST, "name: contains a zero byte");
    ckpt_body(&b, ops[i], 0, longname, SVC_NAME_MAX + 1);
    EXPECT_DEC(&b, &q, SVC_BAD_REQUEST, "name:");
    assert_true(q.id.present && q.id.u == 21);
    /* The empty name and a path decode: the worker refuses them. */
    ckpt_body(&b, ops[i], 0, "", 0);
    assert_int_equal(dec(&b, &q, &err), SVC_OK);
    assert_string_equal(q.reg.name, "");
    svc_request_free(&q);
  }
}

/* ------------------------------------------------------------------ */
/* Hostile frames */

/* A batch whose sub-request's tensor nests past max_depth; and a limit so
 * low that a tensor, fine in a request of its own, is too deep in a batch. */
static void test_batch_depth(void **st) {
  const sbn_tensor_desc_t d = {2, {2, 3}, SBN_LAYOUT_NCHW};
  float x[6] = {1, 2, 3, 4, 5, 6};
  svc_worker_t *w = worker();
  tu_body_t b;
  tu_reply_t r;
  (void)st;
  reg(w, "bn", "batchnorm", 3, 0, 0);
  /* root map 1, requests 2, sub map 3, x 4, shape 5, then arrays to 8
   * (allowed) and to 9 (refused). */
  for (int extra = 3; extra <= 4; extra++) {
    tu_body_init(&b);
    p_batch(&b, 5, 1);
    msgpack_pack_map(&b.pk, 6);
    tu_key(&b, "op");
    tu_key(&b, "forward");
    tu_key(&b, "id");
    msgpack_pack_uint32(&b.pk, 6);
    tu_key(&b, "layer");
    msgpack_pack_uint32(&b.pk, 0);
    tu_key(&b, "step");
    msgpack_pack_uint32(&b.pk, 0);
    tu_key(&b, "train");
    tu_boolean(&b, 0);
    tu_key(&b, "x");
    msgpack_pack_map(&b.pk, 3);
    tu_key(&b, "dtype");
    tu_key(&b, "f32");
    tu_key(&b, "shape");
    msgpack_pack_array(&b.pk, 1);
    for (int i = 0; i < extra; i++)
      msgpack_pack_array(&b.pk, 1);
    msgpack_pack_uint32(&b.pk, 6);
    tu_key(&b, "data");
    msgpack_pack_bin(&b.pk, sizeof x);
    msgpack_pack_bin_body(&b.pk, x, sizeof x);
    if (extra == 3) {
      /* Within the limits: the batch is decoded, and a sub-request that
       * does not decode fails the batch as a whole, with the batch's id and
       * a message that names the element and the key. */
      EXPECT(w, &b, &r, "BAD_TENSOR");
      assert_int_equal(id_of(&r.o), 5);
      assert_int_equal(strncmp(r.msg, "requests[0].x.shape[0]:", 23), 0);
      assert_false(r.close_after);
    } else {
      EXPECT(w, &b, &r, "LIMIT");
      assert_true(r.close_after);
      assert_int_equal(tu_get(&r.o, "id")->type, MSGPACK_OBJECT_NIL);
    }
    tu_reply_free(&r);
  }
  svc_worker_destroy(w);

  w = worker_cfg(1, 4);
  reg(w, "bn", "batchnorm", 3, 0, 0);
  tu_body_init(&b);
  p_fwd(&b, 1, 0, 0, 0, &d, x);
  EXPECT(w, &b, &r, "");
  tu_reply_free(&r);
  tu_body_init(&b);
  p_batch(&b, 2, 1);
  p_fwd(&b, 1, 0, 0, 0, &d, x);
  EXPECT(w, &b, &r, "LIMIT");
  assert_true(r.close_after);
  tu_reply_free(&r);
  svc_worker_destroy(w);
}

static uint64_t rng(uint64_t *s) {
  *s ^= *s << 13;
  *s ^= *s >> 7;
  *s ^= *s << 17;
  return *s;
}

/* Feeds truncations and random byte mutations of body through w: every
 * reply must be a well-formed reply map (parse() checks it), and the
 * sanitizer build checks that nothing crashes or leaks. */
static void fuzz(svc_worker_t *w, const tu_body_t *b, int iters,
                 uint64_t seed) {
  uint8_t *buf = malloc(b->sb.size);
  uint64_t s = seed;
  size_t n = b->sb.size;
  assert_non_null(buf);
  for (size_t cut = 1; cut < n; cut++) {
    tu_reply_t r;
    memset(&r, 0, sizeof r);
    assert_int_equal(svc_worker_handle(w, (const uint8_t *)b->sb.data, cut,
                                       &r.buf, &r.len, &r.close_after),
                     0);
    parse(&r);
    assert_true(r.code[0] != '\0');
    tu_reply_free(&r);
  }
  for (int it = 0; it < iters; it++) {
    tu_reply_t r;
    int k = 1 + (int)(rng(&s) % 4);
    memcpy(buf, b->sb.data, n);
    for (int j = 0; j < k; j++) {
      uint64_t v = rng(&s);
      size_t at = (size_t)(v >> 16) % n;
      switch (v % 4) {
        case 0:
          buf[at] = (uint8_t)(v >> 8);
          break;
        case 1:
          buf[at] ^= (uint8_t)(1u << ((v >> 8) % 8));
          break;
        case 2:
          /* msgpack tags and lengths that matter */
          buf[at] = (uint8_t[]){
              0x00, 0x7f, 0x80, 0x90, 0xc0, 0xcc, 0xcf, 0xd3,
              0xdc, 0xdd, 0xde, 0xdf, 0xff, 0xc4, 0xc6}[(v >> 8) % 15];
          break;
        default:
          buf[at] = (uint8_t)(buf[at] + 1);
          break;
      }
    }
    memset(&r, 0, sizeof r);
    assert_int_equal(
        svc_worker_handle(w, buf, n, &r.buf, &r.len, &r.close_after), 0);
    parse(&r);
    tu_reply_free(&r);
  }
  free(buf);
}

static void test_fuzz(void **st) {
  const sbn_tensor_desc_t d = {3, {2, 3, 2}, SBN_LAYOUT_NCHW};
  const sbn_tensor_desc_t dl = {2, {3, 4}, SBN_LAYOUT_NCHW};
  float x[12], xl[12], dy[12];
  double cnt[3] = {4, 4, 4}, mean[3] = {0.5, -1, 2}, m2[3] = {1, 2, 3};
  svc_worker_t *w = worker();
  tu_body_t b;
  tu_reply_t r;
  (void)st;
  fill(x, 12, 1);
  fill(xl, 12, 2);
  fill(dy, 12, 3);
  reg(w, "bn", "batchnorm", 3, 0, 0);
  reg(w, "sbn", "syncbatchnorm", 3, 0, 1);
  reg(w, "ln", "layernorm", 0, 4, 2);
  reg(w, "drop", "dropout", 0, 0, 3);

  /* The valid batch first: it must run as expected before it is mutated. */
  tu_body_init(&b);
  p_batch(&b, 100, 6);
  p_fwd(&b, 101, 0, 1, 1, &d, x);
  p_fwd(&b, 102, 2, 1, 1, &dl, xl);
  p_bwd(&b, 103, 0, 1, &d, dy);
  p_stats(&b, 104, 1, 1, 3, cnt, 0, mean, m2);
  p_stats_bwd(&b, 105, 1, 1, 3, mean, m2);
  p_fwd(&b, 106, 3, 1, 1, &d, x);
  {
    const msgpack_object *rs;
    char msg[256];
    static const char *const want[6] = {"", "", "", "NOT_YET", "NOT_YET", ""};
    assert_int_equal(svc_worker_handle(w, (const uint8_t *)b.sb.data, b.sb.size,
                                       &r.buf, &r.len, &r.close_after),
                     0);
    parse(&r);
    assert_string_equal(r.code, "");
    rs = tu_get(&r.o, "replies");
    assert_int_equal(rs->via.array.size, 6);
    for (int i = 0; i < 6; i++) {
      assert_string_equal(code_of(&rs->via.array.ptr[i], msg, sizeof msg),
                          want[i]);
      assert_int_equal(id_of(&rs->via.array.ptr[i]), 101 + (uint64_t)i);
    }
    tu_reply_free(&r);
  }
  fuzz(w, &b, 3000, 0x9e3779b97f4a7c15ull);
  msgpack_sbuffer_destroy(&b.sb);

  tu_body_init(&b);
  p_stats(&b, 200, 1, 7, 3, cnt, 0, mean, m2);
  EXPECT(w, &b, &r, "NOT_YET");
  tu_reply_free(&r);
  tu_body_init(&b);
  p_stats(&b, 200, 1, 7, 3, cnt, 0, mean, m2);
  fuzz(w, &b, 3000, 0x2545f4914f6cdd1dull);
  msgpack_sbuffer_destroy(&b.sb);
  tu_body_init(&b);
  p_stats_bwd(&b, 201, 1, 7, 3, mean, m2);
  fuzz(w, &b, 1000, 0x5851f42d4c957f2dull);
  msgpack_sbuffer_destroy(&b.sb);
  svc_worker_destroy(w);
}

/* ------------------------------------------------------------------ */
/* The worker without the sync transport */

/* A batch of [batchnorm training forward, layernorm forward, the
 * batchnorm's backward, a forward on an unknown layer] answers in order;
 * each element is exactly what the request alone gives on a twin layer. */
static void test_worker_batch(void **st) {
  enum { N = 4 * 3 * 5, NL = 3 * 6 };
  const sbn_tensor_desc_t d = {3, {4, 3, 5}, SBN_LAYOUT_NCHW};
  const sbn_tensor_desc_t dl = {2, {3, 6}, SBN_LAYOUT_NCHW};
  float x[N], dy[N], xl[NL], a[N], t[N], a3[3], t3[3], al[NL], tl[NL];
  svc_worker_t *w = worker();
  tu_body_t b;
  tu_reply_t r, r1, r2, r3;
  const msgpack_object *rs;
  char msg[256];
  (void)st;
  fill(x, N, 11);
  fill(dy, N, 12);
  fill(xl, NL, 13);
  reg(w, "bn", "batchnorm", 3, 0, 0);
  reg(w, "ln", "layernorm", 0, 6, 1);
  reg(w, "bn_twin", "batchnorm", 3, 0, 2);
  reg(w, "ln_twin", "layernorm", 0, 6, 3);
  reg(w, "sbn", "syncbatchnorm", 3, 0, 4);

  tu_body_init(&b);
  p_batch(&b, 500, 4);
  p_fwd(&b, 501, 0, 1, 1, &d, x);
  p_fwd(&b, 502, 1, 1, 1, &dl, xl);
  p_bwd(&b, 503, 0, 1, &d, dy);
  p_fwd(&b, 504, 99, 1, 1, &d, x);
  EXPECT(w, &b, &r, "");
  assert_int_equal(id_of(&r.o), 500);
  assert_int_equal(r.o.via.map.size, 2);
  assert_false(r.close_after);
  rs = tu_get(&r.o, "replies");
  assert_non_null(rs);
  assert_int_equal(rs->type, MSGPACK_OBJECT_ARRAY);
  assert_int_equal(rs->via.array.size, 4);
  for (int i = 0; i < 4; i++)
    assert_int_equal(id_of(&rs->via.array.ptr[i]), 501 + (uint64_t)i);
  for (int i = 0; i < 3; i++)
    assert_string_equal(code_of(&rs->via.array.ptr[i], msg, sizeof msg), "");
  assert_string_equal(code_of(&rs->via.array.ptr[3], msg, sizeof msg),
                      "UNKNOWN_LAYER");
  assert_non_null(strstr(msg, "99"));

  /* The same requests one by one on the twins. */
  tu_body_init(&b);
  p_fwd(&b, 1, 2, 1, 1, &d, x);
  EXPECT(w, &b, &r1, "");
  tu_body_init(&b);
  p_fwd(&b, 2, 3, 1, 1, &dl, xl);
  EXPECT(w, &b, &r2, "");
  tu_body_init(&b);
  p_bwd(&b, 3, 2, 1, &d, dy);
  EXPECT(w, &b, &r3, "");
  tensor_of(&rs->via.array.ptr[0], "y", a, N);
  tensor_of(&r1.o, "y", t, N);
  assert_memory_equal(a, t, sizeof a);
  tensor_of(&rs->via.array.ptr[1], "y", al, NL);
  tensor_of(&r2.o, "y", tl, NL);
  assert_memory_equal(al, tl, sizeof al);
  assert_int_equal(rs->via.array.ptr[2].via.map.size, 4);
  tensor_of(&rs->via.array.ptr[2], "dx", a, N);
  tensor_of(&r3.o, "dx", t, N);
  assert_memory_equal(a, t, sizeof a);
  tensor_of(&rs->via.array.ptr[2], "dweight", a3, 3);
  tensor_of(&r3.o, "dweight", t3, 3);
  assert_memory_equal(a3, t3, sizeof a3);
  tensor_of(&rs->via.array.ptr[2], "dbias", a3, 3);
  tensor_of(&r3.o, "dbias", t3, 3);
  assert_memory_equal(a3, t3, sizeof a3);
  tu_reply_free(&r);
  tu_reply_free(&r1);
  tu_reply_free(&r2);
  tu_reply_free(&r3);

  /* Elements fail on their own: a repeated step inside one batch, a
   * backward whose forward is gone, a syncbatchnorm training forward
   * (NOT_YET without the transport; its eval forward works). Nothing is
   * kept for the refused ones. */
  {
    uint64_t kept = svc_worker_saved_bytes(w);
    static const char *const want[5] = {"", "DUPLICATE_STEP", "NO_FORWARD",
                                        "NOT_YET", ""};
    tu_body_init(&b);
    p_batch(&b, 600, 5);
    p_fwd(&b, 601, 0, 2, 1, &d, x);
    p_fwd(&b, 602, 0, 2, 1, &d, x);
    p_bwd(&b, 603, 0, 1, &d, dy);
    p_fwd(&b, 604, 4, 1, 1, &d, x);
    p_fwd(&b, 605, 4, 1, 0, &d, x);
    EXPECT(w, &b, &r, "");
    rs = tu_get(&r.o, "replies");
    assert_int_equal(rs->via.array.size, 5);
    for (int i = 0; i < 5; i++) {
      const char *c = code_of(&rs->via.array.ptr[i], msg, sizeof msg);
      if (strcmp(c, want[i]) != 0)
        fail_msg("element %d: got '%s' (%s), expected '%s'", i, c, msg,
                 want[i]);
      assert_int_equal(id_of(&rs->via.array.ptr[i]), 601 + (uint64_t)i);
    }
    tu_reply_free(&r);
    /* Only the first forward of step 2 is kept. */
    assert_true(svc_worker_saved_bytes(w) > kept);
    tu_body_init(&b);
    p_bwd(&b, 7, 0, 2, &d, dy);
    EXPECT(w, &b, &r, "");
    tu_reply_free(&r);
    tu_body_init(&b);
    p_bwd(&b, 7, 4, 1, &d, dy);
    EXPECT(w, &b, &r, "NOT_YET");
    tu_reply_free(&r);
  }

  /* A batch that fails as a whole (decode) answers one error with the
   * batch's id. */
  tu_body_init(&b);
  p_batch(&b, 700, 2);
  p_fwd(&b, 701, 0, 3, 1, &d, x);
  p_bare(&b, "register", 702);
  EXPECT(w, &b, &r, "BAD_REQUEST");
  assert_int_equal(id_of(&r.o), 700);
  assert_non_null(strstr(r.msg, "requests[1]"));
  assert_false(r.close_after);
  tu_reply_free(&r);
  /* Nothing of it ran: step 3 is still free. */
  tu_body_init(&b);
  p_fwd(&b, 8, 0, 3, 1, &d, x);
  EXPECT(w, &b, &r, "");
  tu_reply_free(&r);
  svc_worker_destroy(w);
}

/* stats and stats_backward without the transport: checks of the layer and
 * of the values come first, then NOT_YET; in a batch the same. */
/* The value checks of stats and stats_backward, channel by channel: each
 * kind of bad value at each position of an odd C (both lanes of the
 * paired test and its scalar tail) is BAD_PARAMS naming that channel;
 * negative zeros, zero counts with zero values, and stats_backward's
 * negative sums pass (NOT_YET: the worker has no transport). */
static void test_stats_check_channels(void **st) {
  enum { NC = 5, KINDS = 8 };
  svc_worker_t *w = worker();
  tu_body_t b;
  tu_reply_t r;
  (void)st;
  reg(w, "sbn", "syncbatchnorm", NC, 0, 0);
  for (int kind = 0; kind < KINDS; kind++)
    for (int at = 0; at < NC; at++) {
      double cnt[NC], mean[NC], m2[NC], want_msg = 1;
      char name[32];
      for (int c = 0; c < NC; c++)
        cnt[c] = 4, mean[c] = c - 2.0, m2[c] = c == 2 ? -0.0 : 1.0 + c;
      switch (kind) {
        case 0:
          mean[at] = NAN;
          break;
        case 1:
          m2[at] = INFINITY;
          break;
        case 2:
          cnt[at] = -1;
          break;
        case 3:
          m2[at] = -1e-300;
          break;
        case 4:
          cnt[at] = 0, mean[at] = 0.5, m2[at] = 0;
          break;
        case 5:
          cnt[at] = 0, mean[at] = 0, m2[at] = 1e-300;
          break;
        case 6:
          cnt[at] = -INFINITY;
          break;
        case 7:
          cnt[at] = 0, mean[at] = -0.0, m2[at] = -0.0, want_msg = 0;
      }
      tu_body_init(&b);
      p_stats(&b, 1, 0, 1, NC, cnt, 0, mean, m2);
      EXPECT(w, &b, &r, want_msg ? "BAD_PARAMS" : "NOT_YET");
      snprintf(name, sizeof name, "channel %d ", at);
      if (want_msg && strstr(r.msg, name) == NULL)
        fail_msg("kind %d at %d: '%s'", kind, at, r.msg);
      tu_reply_free(&r);
    }
  /* stats_backward: any finite sums, a NaN or an infinity anywhere. */
  for (int at = 0; at < NC; at++) {
    double sdy[NC] = {-1, -2, -0.0, 3, -4}, sdyx[NC] = {-5, 6, -7, 8, -9};
    char name[32];
    tu_body_init(&b);
    p_stats_bwd(&b, 1, 0, 1, NC, sdy, sdyx);
    EXPECT(w, &b, &r, "NOT_YET");
    tu_reply_free(&r);
    (at % 2 ? sdy : sdyx)[at] = at % 2 ? -INFINITY : NAN;
    tu_body_init(&b);
    p_stats_bwd(&b, 1, 0, 1, NC, sdy, sdyx);
    EXPECT(w, &b, &r, "BAD_PARAMS");
    snprintf(name, sizeof name, "channel %d ", at);
    assert_non_null(strstr(r.msg, name));
    tu_reply_free(&r);
  }
  svc_worker_destroy(w);
}

static void test_worker_stats(void **st) {
  double cnt[3] = {4, 4, 4}, mean[3] = {0.5, -1, 2}, m2[3] = {1, 2, 3};
  double neg[3] = {1, -2, 3}, zmean[3] = {0, 1, 0}, nanv[3] = {1, NAN, 3};
  svc_worker_t *w = worker();
  tu_body_t b;
  tu_reply_t r;
  const msgpack_object *rs;
  char msg[256];
  (void)st;
  reg(w, "bn", "batchnorm", 3, 0, 0);
  reg(w, "sbn", "syncbatchnorm", 3, 0, 1);
  reg(w, "ln", "layernorm", 0, 3, 2);

  tu_body_init(&b);
  p_stats(&b, 1, 0, 1, 3, cnt, 0, mean, m2);
  EXPECT(w, &b, &r, "SHAPE");
  assert_int_equal(id_of(&r.o), 1);
  assert_non_null(strstr(r.msg, "syncbatchnorm"));
  assert_non_null(strstr(r.msg, "'bn'"));
  tu_reply_free(&r);
  tu_body_init(&b);
  p_stats(&b, 1, 2, 1, 3, NULL, 4, mean, m2);
  EXPECT(w, &b, &r, "SHAPE");
  tu_reply_free(&r);
  tu_body_init(&b);
  p_stats_bwd(&b, 1, 0, 1, 3, mean, m2);
  EXPECT(w, &b, &r, "SHAPE");
  tu_reply_free(&r);
  tu_body_init(&b);
  p_stats(&b, 1, 9, 1, 3, cnt, 0, mean, m2);
  EXPECT(w, &b, &r, "UNKNOWN_LAYER");
  tu_reply_free(&r);

  /* On the syncbatchnorm layer: wrong counts of values, bad values. */
  tu_body_init(&b);
  p_stats(&b, 1, 1, 1, 2, cnt, 0, mean, m2);
  EXPECT(w, &b, &r, "SHAPE");
  assert_non_null(strstr(r.msg, "count"));
  tu_reply_free(&r);
  tu_body_init(&b);
  p_stats_bwd(&b, 1, 1, 1, 2, mean, m2);
  EXPECT(w, &b, &r, "SHAPE");
  assert_non_null(strstr(r.msg, "sum_dy"));
  tu_reply_free(&r);
  tu_body_init(&b);
  p_stats(&b, 1, 1, 1, 3, cnt, 0, mean, neg);
  EXPECT(w, &b, &r, "BAD_PARAMS");
  assert_non_null(strstr(r.msg, "channel 1"));
  tu_reply_free(&r);
  tu_body_init(&b);
  p_stats(&b, 1, 1, 1, 3, NULL, 0, zmean, m2);
  EXPECT(w, &b, &r, "BAD_PARAMS");
  assert_non_null(strstr(r.msg, "channel 0"));
  tu_reply_free(&r);
  tu_body_init(&b);
  p_stats_bwd(&b, 1, 1, 1, 3, nanv, m2);
  EXPECT(w, &b, &r, "BAD_PARAMS");
  assert_non_null(strstr(r.msg, "channel 1"));
  tu_reply_free(&r);
  tu_body_init(&b);
  p_stats(&b, 1, 1, 1, 3, neg, 0, mean, m2);
  EXPECT(w, &b, &r, "BAD_PARAMS");
  tu_reply_free(&r);

  /* Valid ones: NOT_YET, naming what is missing. */
  tu_body_init(&b);
  p_stats(&b, 1, 1, 1, 3, cnt, 0, mean, m2);
  EXPECT(w, &b, &r, "NOT_YET");
  assert_non_null(strstr(r.msg, "stats"));
  tu_reply_free(&r);
  tu_body_init(&b);
  p_stats(&b, 1, 1, 1, 3, NULL, 8, mean, m2);
  EXPECT(w, &b, &r, "NOT_YET");
  tu_reply_free(&r);
  tu_body_init(&b);
  p_stats_bwd(&b, 1, 1, 1, 3, mean, neg);
  EXPECT(w, &b, &r, "NOT_YET");
  assert_non_null(strstr(r.msg, "stats_backward"));
  tu_reply_free(&r);

  /* In a batch, each element answers for itself. */
  tu_body_init(&b);
  p_batch(&b, 50, 3);
  p_stats(&b, 51, 0, 1, 3, cnt, 0, mean, m2);
  p_stats(&b, 52, 1, 1, 3, cnt, 0, mean, m2);
  p_stats_bwd(&b, 53, 1, 1, 3, mean, m2);
  EXPECT(w, &b, &r, "");
  rs = tu_get(&r.o, "replies");
  assert_int_equal(rs->via.array.size, 3);
  assert_string_equal(code_of(&rs->via.array.ptr[0], msg, sizeof msg), "SHAPE");
  assert_string_equal(code_of(&rs->via.array.ptr[1], msg, sizeof msg),
                      "NOT_YET");
  assert_string_equal(code_of(&rs->via.array.ptr[2], msg, sizeof msg),
                      "NOT_YET");
  for (int i = 0; i < 3; i++)
    assert_int_equal(id_of(&rs->via.array.ptr[i]), 51 + (uint64_t)i);
  tu_reply_free(&r);
  svc_worker_destroy(w);
}

/* ------------------------------------------------------------------ */
/* Checkpoints on a worker of size 1 */

static char g_dir[64];

static int setup_dir(void **st) {
  (void)st;
  snprintf(g_dir, sizeof g_dir, "/tmp/svc_worker_test.XXXXXX");
  return mkdtemp(g_dir) == NULL ? -1 : 0;
}

static int teardown_dir(void **st) {
  DIR *d = opendir(g_dir);
  struct dirent *e;
  (void)st;
  if (d != NULL) {
    while ((e = readdir(d)) != NULL) {
      char p[512];
      if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
        continue;
      snprintf(p, sizeof p, "%s/%s", g_dir, e->d_name);
      unlink(p);
    }
    closedir(d);
  }
  rmdir(g_dir);
  return 0;
}

/* The names in the state directory, sorted and joined with ','. */
static void dir_list(char *out, size_t len) {
  DIR *d = opendir(g_dir);
  struct dirent *e;
  char names[32][256];
  int n = 0;
  assert_non_null(d);
  while ((e = readdir(d)) != NULL && n < 32) {
    if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
      continue;
    snprintf(names[n++], sizeof names[0], "%s", e->d_name);
  }
  closedir(d);
  for (int i = 1; i < n; i++)
    for (int j = i; j > 0 && strcmp(names[j - 1], names[j]) > 0; j--) {
      char t[256];
      memcpy(t, names[j], sizeof t);
      memcpy(names[j], names[j - 1], sizeof t);
      memcpy(names[j - 1], t, sizeof t);
    }
  out[0] = '\0';
  for (int i = 0; i < n; i++) {
    size_t l = strlen(out);
    snprintf(out + l, len - l, "%s%s", i > 0 ? "," : "", names[i]);
  }
}

static void path_of(char *p, size_t len, const char *name) {
  snprintf(p, len, "%s/%s", g_dir, name);
}

static const char *ckpt(svc_worker_t *w, int load, const char *name,
                        tu_reply_t *r) {
  tu_body_t b;
  ckpt_body(&b, load ? "checkpoint_load" : "checkpoint_save", 0, name,
            strlen(name));
  return run(w, &b, r);
}

/* get_state replies of every layer, as bytes: equal bytes are equal
 * state, bit for bit. */
typedef struct snap_s {
  int n;
  uint8_t *buf[8];
  size_t len[8];
} snap_t;

static void snap(svc_worker_t *w, int nlayers, snap_t *s) {
  s->n = nlayers;
  for (int i = 0; i < nlayers; i++) {
    tu_body_t b;
    tu_reply_t r;
    tu_body_init(&b);
    msgpack_pack_map(&b.pk, 3);
    tu_key(&b, "op");
    tu_key(&b, "get_state");
    tu_key(&b, "id");
    msgpack_pack_uint32(&b.pk, 1);
    tu_key(&b, "layer");
    msgpack_pack_uint32(&b.pk, (uint32_t)i);
    EXPECT(w, &b, &r, "");
    msgpack_zone_destroy(&r.z);
    s->buf[i] = r.buf;
    s->len[i] = r.len;
  }
}

static int snap_equal(const snap_t *a, const snap_t *b) {
  if (a->n != b->n)
    return 0;
  for (int i = 0; i < a->n; i++)
    if (a->len[i] != b->len[i] || memcmp(a->buf[i], b->buf[i], a->len[i]) != 0)
      return 0;
  return 1;
}

static void snap_free(snap_t *s) {
  for (int i = 0; i < s->n; i++)
    free(s->buf[i]);
  s->n = 0;
}

/* set_state of layer with weight/bias of n values from seed and, for
 * batchnorm, statistics of c values and a batch counter. */
static void perturb(svc_worker_t *w, uint32_t layer, size_t n, size_t c,
                    uint32_t seed) {
  tu_body_t b;
  tu_reply_t r;
  float v[64], s[64];
  const size_t dn[1] = {n}, dc[1] = {c};
  fill(v, 64, seed);
  fill(s, 64, seed + 1);
  for (size_t i = 0; i < c; i++)
    s[i] = fabsf(s[i]) + 0.5f;
  tu_body_init(&b);
  msgpack_pack_map(&b.pk, 5 + (c > 0 ? 3 : 0));
  tu_key(&b, "op");
  tu_key(&b, "set_state");
  tu_key(&b, "id");
  msgpack_pack_uint32(&b.pk, 2);
  tu_key(&b, "layer");
  msgpack_pack_uint32(&b.pk, layer);
  tu_key(&b, "weight");
  tu_tensor(&b, "f32", 1, dn, NULL, v, n * sizeof(float));
  tu_key(&b, "bias");
  tu_tensor(&b, "f32", 1, dn, NULL, v + 1, n * sizeof(float));
  if (c > 0) {
    tu_key(&b, "running_mean");
    tu_tensor(&b, "f32", 1, dc, NULL, v, c * sizeof(float));
    tu_key(&b, "running_var");
    tu_tensor(&b, "f32", 1, dc, NULL, s, c * sizeof(float));
    tu_key(&b, "num_batches_tracked");
    msgpack_pack_uint32(&b.pk, seed);
  }
  EXPECT(w, &b, &r, "");
  tu_reply_free(&r);
}

/* The three layers of the checkpoint tests: batchnorm(3), layernorm(4),
 * dropout; and optionally one more. */
static svc_worker_t *ckpt_worker(int extra, int with_dir) {
  svc_worker_t *w = worker();
  if (with_dir)
    assert_int_equal(svc_worker_set_state_dir(w, g_dir), 0);
  reg(w, "bn", "batchnorm", 3, 0, 0);
  reg(w, "ln", "layernorm", 0, 4, 1);
  reg(w, "drop", "dropout", 0, 0, 2);
  if (extra)
    reg(w, "bn2", "batchnorm", 3, 0, 3);
  return w;
}

/* Training forwards of steps from..to on the three layers. */
static void train(svc_worker_t *w, uint64_t from, uint64_t to) {
  const sbn_tensor_desc_t d = {3, {2, 3, 4}, SBN_LAYOUT_NCHW};
  const sbn_tensor_desc_t dl = {2, {3, 4}, SBN_LAYOUT_NCHW};
  float x[24];
  for (uint64_t s = from; s <= to; s++) {
    tu_body_t b;
    tu_reply_t r;
    fill(x, 24, (uint32_t)s);
    tu_body_init(&b);
    p_fwd(&b, s, 0, s, 1, &d, x);
    EXPECT(w, &b, &r, "");
    tu_reply_free(&r);
    tu_body_init(&b);
    p_fwd(&b, s, 1, s, 1, &dl, x);
    EXPECT(w, &b, &r, "");
    tu_reply_free(&r);
    tu_body_init(&b);
    p_fwd(&b, s, 2, s, 1, &d, x);
    EXPECT(w, &b, &r, "");
    tu_reply_free(&r);
  }
}

static void copy_file(const char *from, const char *to, long cut,
                      long flip_at) {
  char pf[512], pt[512];
  FILE *f, *t;
  uint8_t buf[1 << 14];
  size_t n;
  path_of(pf, sizeof pf, from);
  path_of(pt, sizeof pt, to);
  f = fopen(pf, "rb");
  assert_non_null(f);
  n = fread(buf, 1, sizeof buf, f);
  fclose(f);
  assert_true(n > 0 && n < sizeof buf);
  if (cut > 0)
    n -= (size_t)cut;
  if (flip_at >= 0)
    buf[(size_t)flip_at % n] ^= 0x10;
  t = fopen(pt, "wb");
  assert_non_null(t);
  assert_int_equal(fwrite(buf, 1, n, t), n);
  fclose(t);
}

static size_t file_size(const char *name) {
  char p[512];
  struct stat sb;
  path_of(p, sizeof p, name);
  assert_int_equal(stat(p, &sb), 0);
  return (size_t)sb.st_size;
}

static void test_checkpoint_roundtrip(void **st) {
  svc_worker_t *w = ckpt_worker(0, 1), *w2;
  tu_reply_t r;
  snap_t saved, changed, now;
  char p[512], list[512];
  struct stat sb;
  const msgpack_object *o;
  (void)st;
  train(w, 1, 3);
  perturb(w, 1, 4, 0, 40);
  snap(w, 3, &saved);

  assert_string_equal(ckpt(w, 0, "a", &r), "");
  assert_int_equal(id_of(&r.o), 21);
  assert_int_equal(r.o.via.map.size, 4);
  o = tu_get(&r.o, "saved");
  assert_non_null(o);
  assert_true(o->type == MSGPACK_OBJECT_BOOLEAN && o->via.boolean);
  assert_int_equal(tu_get(&r.o, "layers")->via.u64, 3);
  o = tu_get(&r.o, "name");
  assert_int_equal(o->via.str.size, 1);
  assert_memory_equal(o->via.str.ptr, "a", 1);
  assert_false(r.close_after);
  tu_reply_free(&r);
  path_of(p, sizeof p, "a");
  assert_int_equal(stat(p, &sb), 0);
  assert_true(S_ISREG(sb.st_mode));
  assert_int_equal(sb.st_mode & 07777, 0600);
  /* No temporary file stays behind. */
  dir_list(list, sizeof list);
  assert_string_equal(list, "a");

  /* Saving changes nothing. */
  snap(w, 3, &now);
  assert_true(snap_equal(&saved, &now));
  snap_free(&now);

  /* Change every layer's state, then load. */
  perturb(w, 0, 3, 3, 7);
  perturb(w, 1, 4, 0, 8);
  train(w, 4, 5);
  snap(w, 3, &changed);
  assert_false(snap_equal(&saved, &changed));
  assert_string_equal(ckpt(w, 1, "a", &r), "");
  assert_int_equal(id_of(&r.o), 21);
  o = tu_get(&r.o, "loaded");
  assert_non_null(o);
  assert_true(o->type == MSGPACK_OBJECT_BOOLEAN && o->via.boolean);
  assert_null(tu_get(&r.o, "saved"));
  assert_int_equal(tu_get(&r.o, "layers")->via.u64, 3);
  tu_reply_free(&r);
  snap(w, 3, &now);
  assert_true(snap_equal(&saved, &now));
  snap_free(&now);

  /* A fresh worker with the same layers loads the same state. */
  w2 = ckpt_worker(0, 1);
  assert_string_equal(ckpt(w2, 1, "a", &r), "");
  tu_reply_free(&r);
  snap(w2, 3, &now);
  assert_true(snap_equal(&saved, &now));
  snap_free(&now);
  svc_worker_destroy(w2);

  /* Saving again over "a" replaces it. */
  perturb(w, 0, 3, 3, 9);
  snap_free(&changed);
  snap(w, 3, &changed);
  assert_string_equal(ckpt(w, 0, "a", &r), "");
  tu_reply_free(&r);
  perturb(w, 0, 3, 3, 10);
  assert_string_equal(ckpt(w, 1, "a", &r), "");
  tu_reply_free(&r);
  snap(w, 3, &now);
  assert_true(snap_equal(&changed, &now));
  snap_free(&now);
  dir_list(list, sizeof list);
  assert_string_equal(list, "a");
  unlink(p);

  snap_free(&saved);
  snap_free(&changed);
  svc_worker_destroy(w);
}

static void test_checkpoint_names(void **st) {
  static const char *const bad[] = {"../a", "a/b",  ".a",     "",
                                    "/a",   "a..b", "x\x01y", ".."};
  char longname[200], list[512];
  svc_worker_t *w = ckpt_worker(0, 1);
  tu_reply_t r;
  /* "../a" would land in the parent of the state directory. */
  int parent_had = access("/tmp/a", F_OK) == 0;
  (void)st;
  for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
    for (int load = 0; load < 2; load++) {
      const char *c = ckpt(w, load, bad[i], &r);
      if (strcmp(c, "BAD_PARAMS") != 0)
        fail_msg("name '%s': got '%s' (%s)", bad[i], c, r.msg);
      assert_int_equal(strncmp(r.msg, "name:", 5), 0);
      assert_int_equal(id_of(&r.o), 21);
      assert_false(r.close_after);
      tu_reply_free(&r);
    }
  memset(longname, 'n', sizeof longname);
  longname[129] = '\0';
  assert_string_equal(ckpt(w, 0, longname, &r), "BAD_PARAMS");
  tu_reply_free(&r);
  longname[128] = '\0';
  assert_string_equal(ckpt(w, 0, longname, &r), "");
  tu_reply_free(&r);
  dir_list(list, sizeof list);
  assert_string_equal(list, longname);
  {
    char p[512];
    path_of(p, sizeof p, longname);
    unlink(p);
  }
  /* Nothing was created by the refused names, here or above. */
  dir_list(list, sizeof list);
  assert_string_equal(list, "");
  assert_int_equal(access("/tmp/a", F_OK) == 0, parent_had);
  svc_worker_destroy(w);
}

static void test_checkpoint_corrupt(void **st) {
  svc_worker_t *w = ckpt_worker(0, 1);
  tu_reply_t r;
  snap_t before, after;
  size_t size;
  static const char *const bad[] = {"missing",  "trunc",    "flip_head",
                                    "flip_mid", "flip_crc", "empty",
                                    "longer"};
  (void)st;
  train(w, 1, 2);
  assert_string_equal(ckpt(w, 0, "good", &r), "");
  tu_reply_free(&r);
  size = file_size("good");
  copy_file("good", "trunc", 1, -1);
  copy_file("good", "flip_head", 0, 9);
  copy_file("good", "flip_mid", 0, (long)size / 2);
  copy_file("good", "flip_crc", 0, (long)size - 1);
  copy_file("good", "empty", (long)size, -1);
  {
    /* A byte more than file_len says. */
    char p[512];
    FILE *f;
    copy_file("good", "longer", 0, -1);
    path_of(p, sizeof p, "longer");
    f = fopen(p, "ab");
    assert_non_null(f);
    fputc(0, f);
    fclose(f);
  }
  /* A state that a wrongful load would change. */
  perturb(w, 0, 3, 3, 31);
  perturb(w, 1, 4, 0, 32);
  snap(w, 3, &before);
  for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
    const char *c = ckpt(w, 1, bad[i], &r);
    if (strcmp(c, "CHECKPOINT") != 0)
      fail_msg("load of '%s': got '%s' (%s)", bad[i], c, r.msg);
    assert_int_equal(id_of(&r.o), 21);
    assert_true(r.msg[0] != '\0');
    assert_false(r.close_after);
    tu_reply_free(&r);
    snap(w, 3, &after);
    if (!snap_equal(&before, &after))
      fail_msg("load of '%s' changed the state", bad[i]);
    snap_free(&after);
  }
  /* The good one still loads. */
  assert_string_equal(ckpt(w, 1, "good", &r), "");
  tu_reply_free(&r);
  snap(w, 3, &after);
  assert_false(snap_equal(&before, &after));
  snap_free(&after);
  snap_free(&before);
  teardown_dir(NULL);
  assert_int_equal(mkdir(g_dir, 0700), 0);
  svc_worker_destroy(w);
}

static void test_checkpoint_refusals(void **st) {
  svc_worker_t *w = ckpt_worker(0, 0), *w2, *w3;
  tu_reply_t r;
  snap_t before, after;
  char list[512];
  (void)st;
  /* No state directory. */
  assert_string_equal(ckpt(w, 0, "a", &r), "BAD_PARAMS");
  assert_non_null(strstr(r.msg, "state directory"));
  tu_reply_free(&r);
  assert_string_equal(ckpt(w, 1, "a", &r), "BAD_PARAMS");
  tu_reply_free(&r);
  svc_worker_destroy(w);
  dir_list(list, sizeof list);
  assert_string_equal(list, "");

  /* A job of two ranks without the transport. */
  w = worker_cfg(2, 0);
  assert_int_equal(svc_worker_set_state_dir(w, g_dir), 0);
  assert_string_equal(ckpt(w, 0, "a", &r), "NOT_YET");
  tu_reply_free(&r);
  svc_worker_destroy(w);

  /* A state directory that does not exist: the save fails as a whole. */
  w = ckpt_worker(0, 0);
  {
    char p[512];
    path_of(p, sizeof p, "nodir/");
    assert_int_equal(svc_worker_set_state_dir(w, p), 0);
  }
  assert_string_equal(ckpt(w, 0, "a", &r), "CHECKPOINT");
  tu_reply_free(&r);
  svc_worker_destroy(w);

  /* A checkpoint of a worker with an extra layer does not load into one
   * without it, nor the other way round, nor into one whose layer has
   * other parameters or another name. */
  w = ckpt_worker(0, 1);
  w2 = ckpt_worker(1, 1);
  train(w, 1, 2);
  train(w2, 1, 1);
  assert_string_equal(ckpt(w2, 0, "four", &r), "");
  assert_int_equal(tu_get(&r.o, "layers")->via.u64, 4);
  tu_reply_free(&r);
  assert_string_equal(ckpt(w, 0, "three", &r), "");
  tu_reply_free(&r);
  snap(w, 3, &before);
  assert_string_equal(ckpt(w, 1, "four", &r), "CHECKPOINT");
  tu_reply_free(&r);
  snap(w, 3, &after);
  assert_true(snap_equal(&before, &after));
  snap_free(&after);
  snap_free(&before);
  snap(w2, 4, &before);
  assert_string_equal(ckpt(w2, 1, "three", &r), "CHECKPOINT");
  tu_reply_free(&r);
  snap(w2, 4, &after);
  assert_true(snap_equal(&before, &after));
  snap_free(&after);
  snap_free(&before);
  svc_worker_destroy(w2);

  w3 = worker();
  assert_int_equal(svc_worker_set_state_dir(w3, g_dir), 0);
  reg(w3, "bn", "batchnorm", 4, 0, 0);
  reg(w3, "ln", "layernorm", 0, 4, 1);
  reg(w3, "drop", "dropout", 0, 0, 2);
  snap(w3, 3, &before);
  assert_string_equal(ckpt(w3, 1, "three", &r), "CHECKPOINT");
  assert_non_null(strstr(r.msg, "'bn'"));
  tu_reply_free(&r);
  snap(w3, 3, &after);
  assert_true(snap_equal(&before, &after));
  snap_free(&after);
  snap_free(&before);
  svc_worker_destroy(w3);

  w3 = worker();
  assert_int_equal(svc_worker_set_state_dir(w3, g_dir), 0);
  reg(w3, "bn", "batchnorm", 3, 0, 0);
  reg(w3, "ln", "layernorm", 0, 4, 1);
  reg(w3, "dropX", "dropout", 0, 0, 2);
  assert_string_equal(ckpt(w3, 1, "three", &r), "CHECKPOINT");
  assert_non_null(strstr(r.msg, "'dropX'"));
  tu_reply_free(&r);
  svc_worker_destroy(w3);
  svc_worker_destroy(w);
  dir_list(list, sizeof list);
  assert_string_equal(list, "four,three");
}

/* ------------------------------------------------------------------ */
/* A worker of one rank with a loopback transport: the deferred paths
 * (syncbatchnorm, stats, batches that wait, checkpoints through the
 * agreement) complete on poll, and a job of one must give exactly what the
 * local ops give. */

typedef struct lb_s {
  sbn_comm_t base; /* first: the fake communicator of one process */
  int gathers, reduces;
  int ndel;
  void *tok[16];
  uint8_t *buf[16];
  size_t len[16];
} lb_t;

/* Every collective of one process completes at once; the request is the
 * communicator itself (nothing to free). */
static int lb_gather(sbn_comm_t *c, const void *send, void *recv, size_t bytes,
                     void **req) {
  ((lb_t *)c)->gathers++;
  memcpy(recv, send, bytes);
  *req = c;
  return 0;
}

static int lb_reduce(sbn_comm_t *c, sbn_rec_t *recs, size_t n, void **req) {
  (void)recs;
  (void)n;
  ((lb_t *)c)->reduces++;
  *req = c;
  return 0;
}

static int lb_allreduce(sbn_comm_t *c, sbn_rec_t *recs, size_t n) {
  (void)c;
  (void)recs;
  (void)n;
  return 0;
}

static int lb_bor(sbn_comm_t *c, uint64_t *words, size_t n, void **req) {
  (void)words;
  (void)n;
  *req = c;
  return 0;
}

static int lb_test(sbn_comm_t *c, void *req, int *done) {
  assert_ptr_equal(req, c);
  *done = 1;
  return 0;
}

static int lb_end(sbn_comm_t *c, void *req) {
  assert_ptr_equal(req, c);
  return 0;
}

static void lb_destroy(sbn_comm_t *c) {
  (void)c;
}

static const sbn_comm_vtable_t lb_vt = {
    .allreduce = lb_allreduce,
    .iallreduce_begin = lb_reduce,
    .iallreduce_test = lb_test,
    .iallreduce_end = lb_end,
    .destroy = lb_destroy,
    .iallgather_begin = lb_gather,
    .iallreduce_bor_begin = lb_bor,
};

static void lb_deliver(void *ctx, void *token, svc_frame_t *reply) {
  lb_t *lb = ctx;
  assert_true(lb->ndel < 16);
  assert_int_equal(svc_frame_flatten(reply), 0);
  lb->tok[lb->ndel] = token;
  lb->buf[lb->ndel] = reply->buf;
  lb->len[lb->ndel] = reply->len;
  lb->ndel++;
}

static svc_worker_t *lb_worker(lb_t *lb) {
  svc_worker_t *w = worker();
  memset(lb, 0, sizeof *lb);
  lb->base.vt = &lb_vt;
  lb->base.size = 1;
  assert_int_equal(svc_worker_set_sync(w, &lb->base, 30.0, lb_deliver, lb), 0);
  return w;
}

/* The transport must offer the non-blocking collectives and span the
 * job: anything else is refused before syncbatchnorm is enabled. */
static void test_sync_refusals(void **st) {
  static const sbn_comm_vtable_t no_gather = {
      .allreduce = lb_allreduce,
      .iallreduce_begin = lb_reduce,
      .iallreduce_test = lb_test,
      .iallreduce_end = lb_end,
      .destroy = lb_destroy,
  };
  svc_worker_t *w = worker_cfg(2, 0);
  lb_t lb;
  (void)st;
  memset(&lb, 0, sizeof lb);
  lb.base.vt = &no_gather;
  lb.base.size = 2;
  assert_int_equal(svc_worker_set_sync(w, &lb.base, 1.0, lb_deliver, &lb),
                   -SVC_BAD_PARAMS);
  assert_non_null(strstr(svc_last_error(), "comm:"));
  lb.base.vt = &lb_vt;
  lb.base.size = 1;
  assert_int_equal(svc_worker_set_sync(w, &lb.base, 1.0, lb_deliver, &lb),
                   -SVC_BAD_PARAMS);
  assert_non_null(strstr(svc_last_error(), "2 ranks"));
  assert_int_equal(svc_worker_set_sync(w, NULL, 1.0, lb_deliver, &lb),
                   -SVC_BAD_PARAMS);
  /* Still without a transport: polling does nothing. */
  assert_int_equal(svc_worker_poll(w, 1.0), 0);
  assert_int_equal(lb.gathers, 0);
  svc_worker_destroy(w);
}

/* Sends b (freed here) with token tok; expects it to be deferred. */
static void lb_send(svc_worker_t *w, tu_body_t *b, void *tok) {
  uint8_t *reply = NULL;
  size_t len = 0;
  int close_after = 0, deferred = 0;
  assert_int_equal(
      svc_worker_handle_async(w, (const uint8_t *)b->sb.data, b->sb.size, tok,
                              &reply, &len, &close_after, &deferred),
      0);
  msgpack_sbuffer_destroy(&b->sb);
  if (!deferred) {
    tu_reply_t r;
    memset(&r, 0, sizeof r);
    r.buf = reply;
    r.len = len;
    parse(&r);
    fail_msg("not deferred: '%s' (%s)", r.code, r.msg);
  }
  assert_null(reply);
}

/* Polls until n replies were delivered (a few rounds at most); moves the
 * i-th into r[i]. */
static void lb_wait(svc_worker_t *w, lb_t *lb, int n, tu_reply_t *r) {
  for (int round = 0; round < 8 && lb->ndel < n; round++)
    assert_int_equal(svc_worker_poll(w, (double)round), 0);
  assert_int_equal(lb->ndel, n);
  for (int i = 0; i < n; i++) {
    memset(&r[i], 0, sizeof r[i]);
    r[i].buf = lb->buf[i];
    r[i].len = lb->len[i];
    parse(&r[i]);
  }
  lb->ndel = 0;
}

static void vec_of(const msgpack_object *m, const char *k, double *out,
                   size_t n) {
  const msgpack_object *o = tu_get(m, k), *dt, *data;
  if (o == NULL)
    fail_msg("reply without '%s'", k);
  dt = tu_get(o, "dtype");
  data = tu_get(o, "data");
  assert_int_equal(dt->via.str.size, 3);
  assert_memory_equal(dt->via.str.ptr, "f64", 3);
  assert_int_equal(data->via.bin.size, n * sizeof(double));
  memcpy(out, data->via.bin.ptr, n * sizeof(double));
}

static void test_loopback_sync(void **st) {
  enum { N = 4 * 3 * 5 };
  const sbn_tensor_desc_t d = {3, {4, 3, 5}, SBN_LAYOUT_NCHW};
  float x[N], dy[N], a[N], t[N], a3[3], t3[3];
  lb_t lb;
  svc_worker_t *w = lb_worker(&lb);
  int tok = 0;
  tu_body_t b;
  tu_reply_t r[4], s;
  snap_t sb, bb;
  (void)st;
  fill(x, N, 21);
  fill(dy, N, 22);
  reg(w, "sbn", "syncbatchnorm", 3, 0, 0);
  reg(w, "bn", "batchnorm", 3, 0, 1);

  /* A training forward and backward of syncbatchnorm on one rank equal
   * batchnorm's, bit for bit, and move the same running statistics. */
  tu_body_init(&b);
  p_fwd(&b, 11, 0, 1, 1, &d, x);
  lb_send(w, &b, &tok);
  lb_wait(w, &lb, 1, r);
  assert_ptr_equal(lb.tok[0], &tok);
  assert_string_equal(r[0].code, "");
  assert_int_equal(id_of(&r[0].o), 11);
  tu_body_init(&b);
  p_fwd(&b, 12, 1, 1, 1, &d, x);
  EXPECT(w, &b, &s, "");
  tensor_of(&r[0].o, "y", a, N);
  tensor_of(&s.o, "y", t, N);
  assert_memory_equal(a, t, sizeof a);
  tu_reply_free(&r[0]);
  tu_reply_free(&s);
  tu_body_init(&b);
  p_bwd(&b, 13, 0, 1, &d, dy);
  lb_send(w, &b, &tok);
  lb_wait(w, &lb, 1, r);
  assert_string_equal(r[0].code, "");
  tu_body_init(&b);
  p_bwd(&b, 14, 1, 1, &d, dy);
  EXPECT(w, &b, &s, "");
  tensor_of(&r[0].o, "dx", a, N);
  tensor_of(&s.o, "dx", t, N);
  assert_memory_equal(a, t, sizeof a);
  tensor_of(&r[0].o, "dweight", a3, 3);
  tensor_of(&s.o, "dweight", t3, 3);
  assert_memory_equal(a3, t3, sizeof a3);
  tu_reply_free(&r[0]);
  tu_reply_free(&s);
  {
    /* get_state differs only in the kind string and the id: compare the
     * statistics. */
    tu_reply_t g0, g1;
    float m0[3], m1[3];
    tu_body_init(&b);
    msgpack_pack_map(&b.pk, 3);
    tu_key(&b, "op");
    tu_key(&b, "get_state");
    tu_key(&b, "id");
    msgpack_pack_uint32(&b.pk, 1);
    tu_key(&b, "layer");
    msgpack_pack_uint32(&b.pk, 0);
    EXPECT(w, &b, &g0, "");
    tu_body_init(&b);
    msgpack_pack_map(&b.pk, 3);
    tu_key(&b, "op");
    tu_key(&b, "get_state");
    tu_key(&b, "id");
    msgpack_pack_uint32(&b.pk, 1);
    tu_key(&b, "layer");
    msgpack_pack_uint32(&b.pk, 1);
    EXPECT(w, &b, &g1, "");
    tensor_of(&g0.o, "running_mean", m0, 3);
    tensor_of(&g1.o, "running_mean", m1, 3);
    assert_memory_equal(m0, m1, sizeof m0);
    tensor_of(&g0.o, "running_var", m0, 3);
    tensor_of(&g1.o, "running_var", m1, 3);
    assert_memory_equal(m0, m1, sizeof m0);
    assert_int_equal(tu_get(&g0.o, "num_batches_tracked")->via.u64, 1);
    tu_reply_free(&g0);
    tu_reply_free(&g1);
  }

  /* A batch that waits: one reply, through deliver, in order. */
  {
    double cnt[3] = {4, 5, 6}, mean[3] = {0.5, -1, 2}, m2[3] = {3, 8, 15};
    double sdy[3] = {1, 2, 3}, sdyx[3] = {-1, 0.5, 4}, v[3];
    const msgpack_object *rs;
    char msg[256];
    snap(w, 1, &sb);
    tu_body_init(&b);
    p_batch(&b, 30, 4);
    p_fwd(&b, 31, 0, 2, 1, &d, x);
    p_fwd(&b, 32, 1, 2, 1, &d, x);
    p_stats(&b, 33, 0, 7, 3, cnt, 0, mean, m2);
    p_stats_bwd(&b, 34, 0, 7, 3, sdy, sdyx);
    lb_send(w, &b, &tok);
    lb_wait(w, &lb, 1, r);
    assert_string_equal(r[0].code, "");
    assert_int_equal(id_of(&r[0].o), 30);
    rs = tu_get(&r[0].o, "replies");
    assert_int_equal(rs->via.array.size, 4);
    for (int i = 0; i < 4; i++) {
      const char *c = code_of(&rs->via.array.ptr[i], msg, sizeof msg);
      if (c[0] != '\0')
        fail_msg("element %d: %s (%s)", i, c, msg);
      assert_int_equal(id_of(&rs->via.array.ptr[i]), 31 + (uint64_t)i);
    }
    tensor_of(&rs->via.array.ptr[0], "y", a, N);
    tensor_of(&rs->via.array.ptr[1], "y", t, N);
    assert_memory_equal(a, t, sizeof a);
    /* stats of one rank: its own numbers back. */
    vec_of(&rs->via.array.ptr[2], "count", v, 3);
    assert_memory_equal(v, cnt, sizeof v);
    vec_of(&rs->via.array.ptr[2], "mean", v, 3);
    assert_memory_equal(v, mean, sizeof v);
    vec_of(&rs->via.array.ptr[2], "var", v, 3);
    for (int c = 0; c < 3; c++)
      assert_true(v[c] == m2[c] / cnt[c]);
    vec_of(&rs->via.array.ptr[2], "var_unbiased", v, 3);
    for (int c = 0; c < 3; c++)
      assert_true(v[c] == m2[c] / (cnt[c] - 1));
    vec_of(&rs->via.array.ptr[2], "invstd", v, 3);
    for (int c = 0; c < 3; c++)
      assert_true(v[c] == 1.0 / sqrt(m2[c] / cnt[c] + 1e-5));
    vec_of(&rs->via.array.ptr[3], "sum_dy", v, 3);
    assert_memory_equal(v, sdy, sizeof v);
    vec_of(&rs->via.array.ptr[3], "sum_dy_xhat", v, 3);
    assert_memory_equal(v, sdyx, sizeof v);
    tu_reply_free(&r[0]);
    snap(w, 1, &bb);
    assert_false(snap_equal(&sb, &bb));
    snap_free(&sb);
    snap_free(&bb);
    /* The same stats again: the step was answered, a new one is fine. */
    tu_body_init(&b);
    p_stats(&b, 35, 0, 8, 3, NULL, 1, mean, m2);
    lb_send(w, &b, &tok);
    lb_wait(w, &lb, 1, r);
    assert_string_equal(r[0].code, "SMALL_BATCH");
    assert_int_equal(id_of(&r[0].o), 35);
    tu_reply_free(&r[0]);
  }

  /* Checkpoints through the agreement: save, change, load. */
  assert_int_equal(svc_worker_set_state_dir(w, g_dir), 0);
  snap(w, 2, &sb);
  tu_body_init(&b);
  ckpt_body(&b, "checkpoint_save", 0, "lb", 2);
  lb_send(w, &b, &tok);
  lb_wait(w, &lb, 1, r);
  assert_string_equal(r[0].code, "");
  assert_true(tu_get(&r[0].o, "saved")->via.boolean);
  assert_int_equal(tu_get(&r[0].o, "layers")->via.u64, 2);
  tu_reply_free(&r[0]);
  perturb(w, 0, 3, 3, 5);
  perturb(w, 1, 3, 3, 6);
  tu_body_init(&b);
  ckpt_body(&b, "checkpoint_load", 0, "lb", 2);
  lb_send(w, &b, &tok);
  lb_wait(w, &lb, 1, r);
  assert_string_equal(r[0].code, "");
  assert_true(tu_get(&r[0].o, "loaded")->via.boolean);
  tu_reply_free(&r[0]);
  snap(w, 2, &bb);
  assert_true(snap_equal(&sb, &bb));
  snap_free(&bb);
  tu_body_init(&b);
  ckpt_body(&b, "checkpoint_load", 0, "nope", 4);
  lb_send(w, &b, &tok);
  lb_wait(w, &lb, 1, r);
  assert_string_equal(r[0].code, "CHECKPOINT");
  tu_reply_free(&r[0]);
  snap(w, 2, &bb);
  assert_true(snap_equal(&sb, &bb));
  snap_free(&bb);
  snap_free(&sb);
  {
    char p[512];
    path_of(p, sizeof p, "lb");
    assert_int_equal(unlink(p), 0);
  }

  /* A connection that goes away: its waiting requests are withdrawn, their
   * kept forward state goes, and later steps run as usual. */
  {
    uint64_t kept;
    /* Step 8 first, so that steps 9 and 10 prune nothing older. */
    tu_body_init(&b);
    p_fwd(&b, 39, 0, 8, 1, &d, x);
    lb_send(w, &b, &tok);
    lb_wait(w, &lb, 1, r);
    assert_string_equal(r[0].code, "");
    tu_reply_free(&r[0]);
    kept = svc_worker_saved_bytes(w);
    tu_body_init(&b);
    p_fwd(&b, 40, 0, 9, 1, &d, x);
    lb_send(w, &b, &tok);
    tu_body_init(&b);
    p_batch(&b, 41, 2);
    p_fwd(&b, 42, 0, 10, 1, &d, x);
    p_stats(&b, 43, 0, 10, 3, NULL, 4, (double[]){0, 0, 0},
            (double[]){1, 1, 1});
    lb_send(w, &b, &tok);
    assert_true(svc_worker_saved_bytes(w) > kept);
    svc_worker_cancel(w, &tok);
    for (int round = 0; round < 4; round++)
      assert_int_equal(svc_worker_poll(w, (double)round), 0);
    assert_int_equal(lb.ndel, 0);
    assert_int_equal(svc_worker_saved_bytes(w), kept);
    tu_body_init(&b);
    p_fwd(&b, 44, 0, 11, 1, &d, x);
    lb_send(w, &b, &tok);
    lb_wait(w, &lb, 1, r);
    assert_string_equal(r[0].code, "");
    tu_reply_free(&r[0]);
  }
  svc_worker_destroy(w);
}

/* Registers a layer with explicit affine/track flags (and groups for
 * groupnorm); channels 0 makes a layernorm of shape [2, 3]. */
static void reg_flags(svc_worker_t *w, const char *name, const char *kind,
                      uint32_t channels, int affine, int track, uint32_t groups,
                      uint64_t want_layer) {
  tu_body_t b;
  tu_reply_t r;
  tu_register_head(&b, 3 + (groups > 0), name, kind);
  if (channels > 0) {
    tu_key(&b, "channels");
    msgpack_pack_uint32(&b.pk, channels);
  } else {
    tu_key(&b, "normalized_shape");
    msgpack_pack_array(&b.pk, 2);
    msgpack_pack_uint32(&b.pk, 2);
    msgpack_pack_uint32(&b.pk, 3);
  }
  tu_key(&b, "affine");
  tu_boolean(&b, affine);
  tu_key(&b, "track_running_stats");
  tu_boolean(&b, track);
  if (groups > 0) {
    tu_key(&b, "groups");
    msgpack_pack_uint32(&b.pk, groups);
  }
  EXPECT(w, &b, &r, "");
  assert_int_equal(tu_get(&r.o, "layer")->via.u64, want_layer);
  tu_reply_free(&r);
}

enum { NKINDS = 7 };
static const uint32_t kinds_c[NKINDS] = {3, 4, 2, 4, 5, 3, 2};

static svc_worker_t *kinds_worker(void) {
  svc_worker_t *w = worker();
  assert_int_equal(svc_worker_set_state_dir(w, g_dir), 0);
  reg_flags(w, "bn_na", "batchnorm", 3, 0, 1, 0, 0);
  reg_flags(w, "in_t", "instancenorm", 4, 0, 1, 0, 1);
  reg_flags(w, "in_at", "instancenorm", 2, 1, 1, 0, 2);
  reg_flags(w, "gn", "groupnorm", 4, 1, 0, 2, 3);
  reg_flags(w, "sbn", "syncbatchnorm", 5, 1, 1, 0, 4);
  reg_flags(w, "bn_nt", "batchnorm", 3, 1, 0, 0, 5);
  reg_flags(w, "ln", "layernorm", 0, 1, 0, 0, 6);
  return w;
}

/* Every kind and flag combination round trips through a checkpoint into
 * another worker: statistics without affine parameters, affine parameters
 * without statistics, a multi-dimensional layernorm, syncbatchnorm. */
/* The compact stats reply through the agreement: layer 0 gets the full
 * reply, layer 1 the same records with every subset of the five vectors
 * as `want`, step by step. Each compact reply carries exactly the wanted
 * keys, in the reply's order, with the full reply's bits; the full reply
 * equals the float64 formulas of one rank; and both layers' running
 * statistics move the same, bit for bit. */
static void test_loopback_stats_want(void **st) {
  enum { NC = 7 };
  double cnt[NC], mean[NC], m2[NC], full[SVC_STATS_OUTS][NC], v[NC];
  lb_t lb;
  svc_worker_t *w = lb_worker(&lb);
  int tok = 0;
  tu_body_t b;
  tu_reply_t r[2];
  snap_t s;
  (void)st;
  /* Odd C (the two-channel loops' tail), an empty channel (count 0), a
   * count of 2 (n - 1 = 1), a constant channel (m2 0). */
  for (int c = 0; c < NC; c++) {
    cnt[c] = c == 1 ? 0 : c == 4 ? 2 : 12 + c;
    mean[c] = c == 1 ? 0 : 0.1 * c - 0.3;
    m2[c] = c == 1 || c == 3 ? 0 : 1.0 / (c + 1);
  }
  reg(w, "full", "syncbatchnorm", NC, 0, 0);
  reg(w, "part", "syncbatchnorm", NC, 0, 1);
  for (unsigned mask = 0; mask <= SVC_STATS_ALL; mask++) {
    uint64_t step = mask + 1;
    const msgpack_object *o;
    uint32_t at = 0;
    tu_body_init(&b);
    p_stats(&b, 100 + step, 0, step, NC, cnt, 0, mean, m2);
    lb_send(w, &b, &tok);
    tu_body_init(&b);
    p_stats_want(&b, 200 + step, 1, step, NC, cnt, 0, mean, m2);
    want_of(&b, mask);
    lb_send(w, &b, &tok);
    lb_wait(w, &lb, 2, r);
    if (id_of(&r[0].o) != 100 + step) {
      tu_reply_t t = r[0];
      r[0] = r[1];
      r[1] = t;
    }
    assert_string_equal(r[0].code, "");
    assert_string_equal(r[1].code, "");
    for (int i = 0; i < SVC_STATS_OUTS; i++)
      vec_of(&r[0].o, svc_stats_out_name(i), full[i], NC);
    for (int c = 0; c < NC; c++) {
      double n = cnt[c], var = n > 0 ? m2[c] / n : 0;
      double uvar = n > 1 ? m2[c] / (n - 1) : 0;
      assert_memory_equal(&full[0][c], &n, sizeof n);
      assert_memory_equal(&full[1][c], &mean[c], sizeof n);
      assert_memory_equal(&full[2][c], &var, sizeof n);
      assert_memory_equal(&full[3][c], &uvar, sizeof n);
      var = 1.0 / sqrt(var + 1e-5);
      assert_memory_equal(&full[4][c], &var, sizeof n);
    }
    /* id first, then the wanted vectors in the reply's order. */
    o = &r[1].o;
    assert_int_equal(id_of(o), 200 + step);
    for (int i = 0; i < SVC_STATS_OUTS; i++) {
      const msgpack_object *k;
      if (!(mask & (1u << i))) {
        assert_null(tu_get(o, svc_stats_out_name(i)));
        continue;
      }
      k = &o->via.map.ptr[1 + at++].key;
      assert_int_equal(k->via.str.size, strlen(svc_stats_out_name(i)));
      assert_memory_equal(k->via.str.ptr, svc_stats_out_name(i),
                          k->via.str.size);
      vec_of(o, svc_stats_out_name(i), v, NC);
      assert_memory_equal(v, full[i], sizeof v);
    }
    assert_int_equal(o->via.map.size, 1 + at);
    tu_reply_free(&r[0]);
    tu_reply_free(&r[1]);
  }
  /* get_state of the two layers: the same bytes (kind, statistics,
   * num_batches_tracked = 32). */
  snap(w, 2, &s);
  assert_int_equal(s.len[0], s.len[1]);
  assert_memory_equal(s.buf[0], s.buf[1], s.len[0]);
  snap_free(&s);
  svc_worker_destroy(w);
}

static void test_checkpoint_kinds(void **st) {
  svc_worker_t *w = kinds_worker(), *w2 = kinds_worker();
  tu_reply_t r;
  snap_t a, fresh, b2;
  char p[512];
  (void)st;
  snap(w2, NKINDS, &fresh);
  for (int l = 0; l < NKINDS; l++)
    for (uint64_t step = 1; step <= 2; step++) {
      sbn_tensor_desc_t d = {3, {2, kinds_c[l], 3}, SBN_LAYOUT_NCHW};
      float x[64];
      tu_body_t b;
      fill(x, 64, (uint32_t)l * 10 + (uint32_t)step);
      tu_body_init(&b);
      /* syncbatchnorm trains only with the transport: eval here. */
      p_fwd(&b, 1, (uint64_t)l, step, l != 4, &d, x);
      EXPECT(w, &b, &r, "");
      tu_reply_free(&r);
    }
  perturb(w, 3, 4, 0, 77);
  snap(w, NKINDS, &a);
  assert_false(snap_equal(&a, &fresh));
  assert_string_equal(ckpt(w, 0, "kinds", &r), "");
  assert_int_equal(tu_get(&r.o, "layers")->via.u64, NKINDS);
  tu_reply_free(&r);
  assert_string_equal(ckpt(w2, 1, "kinds", &r), "");
  tu_reply_free(&r);
  snap(w2, NKINDS, &b2);
  assert_true(snap_equal(&a, &b2));
  snap_free(&a);
  snap_free(&b2);
  snap_free(&fresh);
  path_of(p, sizeof p, "kinds");
  assert_int_equal(unlink(p), 0);
  svc_worker_destroy(w);
  svc_worker_destroy(w2);
}

/* A layer registered while a checkpoint waits for the agreement is not
 * part of it: the checkpoint either covers the layers it was requested
 * with or fails, and the late layer's state stays as registered. (The
 * records are sized at the request; planning at completion from the
 * layers then registered once read past them.) */
static void test_checkpoint_register_race(void **st) {
  (void)st;
  for (int load = 0; load < 2; load++) {
    lb_t lb;
    svc_worker_t *w = lb_worker(&lb), *w0;
    int tok = 0;
    tu_body_t b;
    tu_reply_t r[1], q;
    snap_t late0, late1;
    char p[512];
    assert_int_equal(svc_worker_set_state_dir(w, g_dir), 0);
    reg(w, "bn", "batchnorm", 3, 0, 0);
    if (load) {
      /* A checkpoint of "bn" alone, with a state unlike w's. */
      w0 = worker();
      assert_int_equal(svc_worker_set_state_dir(w0, g_dir), 0);
      reg(w0, "bn", "batchnorm", 3, 0, 0);
      perturb(w0, 0, 3, 3, 12);
      assert_string_equal(ckpt(w0, 0, "race", &q), "");
      tu_reply_free(&q);
      svc_worker_destroy(w0);
    }
    tu_body_init(&b);
    ckpt_body(&b, load ? "checkpoint_load" : "checkpoint_save", 0, "race", 4);
    lb_send(w, &b, &tok);
    reg(w, "late", "batchnorm", 500, 0, 1);
    {
      /* The late layer's state, from a twin worker (get_state of layer 1
       * of a worker registered the same way). */
      svc_worker_t *t = worker();
      reg(t, "bn", "batchnorm", 3, 0, 0);
      reg(t, "late", "batchnorm", 500, 0, 1);
      snap(t, 2, &late0);
      svc_worker_destroy(t);
    }
    lb_wait(w, &lb, 1, r);
    if (r[0].code[0] == '\0') {
      assert_int_equal(tu_get(&r[0].o, "layers")->via.u64, 1);
    } else {
      assert_string_equal(r[0].code, "CHECKPOINT");
    }
    tu_reply_free(&r[0]);
    snap(w, 2, &late1);
    assert_int_equal(late0.len[1], late1.len[1]);
    assert_memory_equal(late0.buf[1], late1.buf[1], late0.len[1]);
    snap_free(&late0);
    snap_free(&late1);
    svc_worker_destroy(w);
    path_of(p, sizeof p, "race");
    unlink(p);
  }
}

/* ------------------------------------------------------------------ */
/* The command table and its dispatch */

/* Every op has a row named as on the wire, and exactly the ops a batch
 * may carry (as the codec decodes them) are allowed in one. */
static void test_command_table(void **st) {
  (void)st;
  assert_null(svc_op_name(SVC_OP_COUNT));
  for (int op = 0; op < SVC_OP_COUNT; op++) {
    int in_batch = op == SVC_OP_FORWARD || op == SVC_OP_BACKWARD ||
                   op == SVC_OP_STATS || op == SVC_OP_STATS_BACKWARD;
    assert_non_null(svc__cmds[op].fn);
    assert_non_null(svc__cmds[op].name);
    assert_string_equal(svc__cmds[op].name, svc_op_name((svc_op_t)op));
    assert_int_equal(!!(svc__cmds[op].flags & SVC__CMD_IN_BATCH), in_batch);
  }
}

/* An op past the table, or one a batch may not carry inside a batch, is
 * refused with BAD_REQUEST before any handler runs or anything counts. */
static void test_dispatch_refusals(void **st) {
  svc_worker_t *w = worker();
  svc_request_t q;
  svc__call_t call;
  svc__batch_t fake;
  uint64_t before[SVC_OP_COUNT];
  (void)st;
  memcpy(before, w->m.requests, sizeof before);
  memset(&q, 0, sizeof q);
  memset(&call, 0, sizeof call);
  call.w = w;
  call.q = &q;
  q.op = SVC_OP_COUNT;
  assert_int_equal(svc__dispatch(&call), -SVC_BAD_REQUEST);
  assert_non_null(strstr(svc_last_error(), "op:"));
  q.op = (svc_op_t)1000;
  assert_int_equal(svc__dispatch(&call), -SVC_BAD_REQUEST);
  memset(&fake, 0, sizeof fake);
  call.batch = &fake;
  q.op = SVC_OP_HELLO;
  q.version = 1;
  assert_int_equal(svc__dispatch(&call), -SVC_BAD_REQUEST);
  assert_non_null(strstr(svc_last_error(), "hello"));
  assert_null(call.out.buf);
  assert_memory_equal(before, w->m.requests, sizeof before);
  svc_worker_destroy(w);
}

/* Every row of the table is counted by the metrics, under its name, and
 * the metrics reply lists every op. */
static void test_dispatch_counts(void **st) {
  svc_worker_t *w = worker();
  tu_body_t b;
  tu_reply_t r;
  const msgpack_object *req;
  (void)st;
  for (int op = 0; op < SVC_OP_COUNT; op++) {
    svc_request_t q;
    svc__call_t call;
    memset(&q, 0, sizeof q);
    memset(&call, 0, sizeof call);
    call.w = w;
    call.q = &q;
    q.op = (svc_op_t)op;
    /* A zeroed request: most handlers refuse it, some answer; either way
     * it was dispatched once. */
    svc__dispatch(&call);
    svc_frame_free(&call.out);
    assert_false(call.deferred);
    assert_int_equal(w->m.requests[op], 1);
  }
  tu_body_init(&b);
  msgpack_pack_map(&b.pk, 2);
  tu_key(&b, "op");
  tu_key(&b, "metrics");
  tu_key(&b, "id");
  msgpack_pack_uint32(&b.pk, 1);
  assert_string_equal(tu_run(w, &b, &r), "");
  req = tu_get(&r.o, "requests");
  assert_int_equal(req->via.map.size, SVC_OP_COUNT);
  for (int op = 0; op < SVC_OP_COUNT; op++)
    assert_int_equal(tu_get_u64(req, svc_op_name((svc_op_t)op)),
                     op == SVC_OP_METRICS ? 2 : 1);
  tu_reply_free(&r);
  svc_worker_destroy(w);
}

/* Registers a BatchNorm kind with ghost batches of g; returns the code. */
static const char *reg_ghost(svc_worker_t *w, const char *name,
                             const char *kind, uint32_t channels, uint32_t g,
                             tu_reply_t *r) {
  tu_body_t b;
  tu_register_head(&b, 2, name, kind);
  tu_key(&b, "channels");
  msgpack_pack_uint32(&b.pk, channels);
  tu_key(&b, "ghost_batch");
  msgpack_pack_uint32(&b.pk, g);
  return run(w, &b, r);
}

/* Ghost batches through the worker: register takes ghost_batch (and a
 * different one under the same name is LAYER_MISMATCH, a non-BatchNorm
 * kind BAD_PARAMS); a ghost syncbatchnorm step goes through the agreement
 * without records, and its forward and backward, like a ghost batchnorm's,
 * equal the in-process library's bit for bit; stats do not apply. */
static void test_ghost_layers(void **st) {
  enum { N = 7 * 3 * 4 };
  const sbn_tensor_desc_t d = {3, {7, 3, 4}, SBN_LAYOUT_NCHW};
  float x[N], dy[N], y[N], dx[N], w3[3] = {1, 1, 1}, b3[3] = {0, 0, 0};
  float dw[3], db[3], rm[3] = {0, 0, 0}, rv[3] = {1, 1, 1}, got[N], got3[3];
  lb_t lb;
  svc_worker_t *w = lb_worker(&lb);
  int tok = 0;
  tu_body_t b;
  tu_reply_t r[1], s;
  (void)st;
  fill(x, N, 31);
  fill(dy, N, 32);
  assert_string_equal(reg_ghost(w, "gs", "syncbatchnorm", 3, 3, &s), "");
  tu_reply_free(&s);
  assert_string_equal(reg_ghost(w, "gb", "batchnorm", 3, 3, &s), "");
  tu_reply_free(&s);
  assert_string_equal(reg_ghost(w, "gb", "batchnorm", 3, 3, &s), "");
  tu_reply_free(&s);
  assert_string_equal(reg_ghost(w, "gb", "batchnorm", 3, 2, &s),
                      "LAYER_MISMATCH");
  tu_reply_free(&s);
  assert_string_equal(reg_ghost(w, "ln", "instancenorm", 3, 2, &s),
                      "BAD_PARAMS");
  assert_non_null(strstr(s.msg, "ghost_batch"));
  tu_reply_free(&s);

  /* The in-process library with the same parameters. */
  sbn_layer_params_t p;
  sbn_layer_t *l = NULL;
  sbn_layer_params_default(&p, SBN_OP_BATCHNORM);
  p.channels = 3;
  p.ghost_batch = 3;
  assert_int_equal(sbn_layer_create(&p, NULL, &l), 0);
  size_t ws_bytes, sv_bytes;
  assert_int_equal(sbn_layer_sizes(l, &d, &ws_bytes, &sv_bytes), 0);
  void *ws = malloc(ws_bytes), *sv = malloc(sv_bytes);
  sbn_state_t state = {rm, rv, 0};
  sbn_forward_args_t fa = {SBN_MODE_TRAIN, &d, x,  y,        w3, b3,
                           &state,         1,  ws, ws_bytes, sv, sv_bytes};
  assert_int_equal(sbn_forward(l, &fa), 0);
  sbn_backward_args_t ba = {
      SBN_MODE_TRAIN, &d, x, dy, dx, w3, dw, db, 1, ws, ws_bytes, sv, sv_bytes};
  assert_int_equal(sbn_backward(l, &ba), 0);

  for (uint64_t layer = 0; layer < 2; layer++) {
    tu_body_init(&b);
    p_fwd(&b, 40 + layer, layer, 1, 1, &d, x);
    if (layer == 0) {
      lb_send(w, &b, &tok);
      lb_wait(w, &lb, 1, r);
    } else {
      EXPECT(w, &b, &r[0], "");
    }
    assert_string_equal(r[0].code, "");
    tensor_of(&r[0].o, "y", got, N);
    assert_memory_equal(got, y, sizeof got);
    tu_reply_free(&r[0]);
    tu_body_init(&b);
    p_bwd(&b, 50 + layer, layer, 1, &d, dy);
    if (layer == 0) {
      lb_send(w, &b, &tok);
      lb_wait(w, &lb, 1, r);
    } else {
      EXPECT(w, &b, &r[0], "");
    }
    assert_string_equal(r[0].code, "");
    tensor_of(&r[0].o, "dx", got, N);
    assert_memory_equal(got, dx, sizeof got);
    tensor_of(&r[0].o, "dweight", got3, 3);
    assert_memory_equal(got3, dw, sizeof got3);
    tensor_of(&r[0].o, "dbias", got3, 3);
    assert_memory_equal(got3, db, sizeof got3);
    tu_reply_free(&r[0]);
  }
  /* Both moved their running statistics as the library did. */
  for (uint32_t layer = 0; layer < 2; layer++) {
    tu_body_init(&b);
    msgpack_pack_map(&b.pk, 3);
    tu_key(&b, "op");
    tu_key(&b, "get_state");
    tu_key(&b, "id");
    msgpack_pack_uint32(&b.pk, 1);
    tu_key(&b, "layer");
    msgpack_pack_uint32(&b.pk, layer);
    EXPECT(w, &b, &s, "");
    tensor_of(&s.o, "running_mean", got3, 3);
    assert_memory_equal(got3, rm, sizeof got3);
    tensor_of(&s.o, "running_var", got3, 3);
    assert_memory_equal(got3, rv, sizeof got3);
    tu_reply_free(&s);
  }
  {
    double cnt[3] = {4, 5, 6}, mean[3] = {0.5, -1, 2}, m2[3] = {3, 8, 15};
    tu_body_init(&b);
    p_stats(&b, 60, 0, 7, 3, cnt, 0, mean, m2);
    EXPECT(w, &b, &s, "BAD_PARAMS");
    assert_non_null(strstr(s.msg, "ghost_batch"));
    tu_reply_free(&s);
  }
  free(ws);
  free(sv);
  sbn_layer_destroy(l);
  svc_worker_destroy(w);

  /* Checkpoints do not store ghost_batch: a ghost layer's running
   * statistics load into a layer of the same name with another g. */
  {
    svc_worker_t *w1 = worker(), *w2 = worker();
    snap_t a1, a2;
    char path[512];
    assert_int_equal(svc_worker_set_state_dir(w1, g_dir), 0);
    assert_int_equal(svc_worker_set_state_dir(w2, g_dir), 0);
    assert_string_equal(reg_ghost(w1, "gb", "batchnorm", 3, 3, &s), "");
    tu_reply_free(&s);
    assert_string_equal(reg_ghost(w2, "gb", "batchnorm", 3, 2, &s), "");
    tu_reply_free(&s);
    tu_body_init(&b);
    p_fwd(&b, 70, 0, 1, 1, &d, x);
    EXPECT(w1, &b, &s, "");
    tu_reply_free(&s);
    assert_string_equal(ckpt(w1, 0, "ghost", &s), "");
    tu_reply_free(&s);
    assert_string_equal(ckpt(w2, 1, "ghost", &s), "");
    tu_reply_free(&s);
    snap(w1, 1, &a1);
    snap(w2, 1, &a2);
    assert_true(snap_equal(&a1, &a2));
    snap_free(&a1);
    snap_free(&a2);
    path_of(path, sizeof path, "ghost");
    assert_int_equal(unlink(path), 0);
    svc_worker_destroy(w1);
    svc_worker_destroy(w2);
  }
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_command_table),
      cmocka_unit_test(test_dispatch_refusals),
      cmocka_unit_test(test_dispatch_counts),
      cmocka_unit_test(test_batch_decode),
      cmocka_unit_test(test_stats_decode),
      cmocka_unit_test(test_stats_want_decode),
      cmocka_unit_test(test_hello_token),
      cmocka_unit_test(test_checkpoint_decode),
      cmocka_unit_test(test_batch_depth),
      cmocka_unit_test(test_fuzz),
      cmocka_unit_test(test_worker_batch),
      cmocka_unit_test(test_worker_stats),
      cmocka_unit_test(test_stats_check_channels),
      cmocka_unit_test(test_checkpoint_roundtrip),
      cmocka_unit_test(test_checkpoint_names),
      cmocka_unit_test(test_checkpoint_corrupt),
      cmocka_unit_test(test_checkpoint_refusals),
      cmocka_unit_test(test_loopback_sync),
      cmocka_unit_test(test_loopback_stats_want),
      cmocka_unit_test(test_sync_refusals),
      cmocka_unit_test(test_checkpoint_kinds),
      cmocka_unit_test(test_checkpoint_register_race),
      cmocka_unit_test(test_ghost_layers),
  };
  return cmocka_run_group_tests(tests, setup_dir, teardown_dir);
}
