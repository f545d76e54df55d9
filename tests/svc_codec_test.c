/* Unit tests of the syncbnd codec (src/svc_codec.c) and of the worker's
 * request path (src/svc_worker.c), without sockets: valid frames, every
 * malformed case and limit, replies, and the worker's layer registry and
 * step bookkeeping against the in-process library. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <msgpack.h>

#include "svc_codec.h"
#include "svc_worker.h"
#include "svc_testutil.h"

/* ------------------------------------------------------------------ */
/* Building request bodies */

static svc_limits_t lim(void) {
  svc_limits_t l;
  svc_limits_default(&l);
  return l;
}

/* Decodes b's bytes and returns the result code (SVC_OK on success). */
static svc_code_t decode_raw(const void *p, size_t n, svc_request_t *req,
                             tu_err_t *err) {
  svc_limits_t l = lim();
  memset(err, 0, sizeof *err);
  if (tu_err(svc_decode_request(p, n, &l, req), err) == 0)
    return SVC_OK;
  assert_int_not_equal(err->code, SVC_OK);
  assert_true(err->msg[0] != '\0');
  return err->code;
}

static svc_code_t decode(tu_body_t *b, svc_request_t *req, tu_err_t *err) {
  return decode_raw(b->sb.data, b->sb.size, req, err);
}

#define ASSERT_CODE(got, want)                                \
  do {                                                        \
    svc_code_t g_ = (got);                                    \
    if (g_ != (want))                                         \
      fail_msg("got %s, expected %s (%s)", svc_code_name(g_), \
               svc_code_name(want), err.msg);                 \
  } while (0)

/* ------------------------------------------------------------------ */
/* Frames */

static void test_frame_len(void **st) {
  svc_limits_t l = lim();
  tu_err_t err;
  uint32_t n = 0;
  const uint8_t ok[4] = {0, 0, 1, 2};
  const uint8_t four_gib[4] = {0xff, 0xff, 0xff, 0xff};
  const uint8_t zero[4] = {0, 0, 0, 0};
  uint8_t at[4];
  (void)st;
  assert_int_equal(tu_err(svc_frame_len(ok, &l, &n), &err), 0);
  assert_int_equal(n, 258);
  assert_int_equal(tu_err(svc_frame_len(four_gib, &l, &n), &err), -1);
  assert_int_equal(err.code, SVC_FRAME_TOO_LARGE);
  assert_int_equal(tu_err(svc_frame_len(zero, &l, &n), &err), -1);
  assert_int_equal(err.code, SVC_BAD_FRAME);
  /* Exactly max_frame is accepted, one more is not. */
  l.max_frame = 1000;
  at[0] = 0, at[1] = 0, at[2] = 1000 >> 8, at[3] = 1000 & 0xff;
  assert_int_equal(tu_err(svc_frame_len(at, &l, &n), &err), 0);
  at[3]++;
  assert_int_equal(tu_err(svc_frame_len(at, &l, &n), &err), -1);
  assert_int_equal(err.code, SVC_FRAME_TOO_LARGE);
  /* A zero byte followed by junk as a header: "\0jun" is 6.9 MB. */
  memcpy(at, "\0jun", 4);
  assert_int_equal(tu_err(svc_frame_len(at, &l, &n), &err), -1);
  assert_int_equal(err.code, SVC_FRAME_TOO_LARGE);
  assert_true(svc_code_fatal(SVC_FRAME_TOO_LARGE));
  assert_false(svc_code_fatal(SVC_SHAPE));
  assert_string_equal(svc_code_name(SVC_NOT_YET), "NOT_YET");
}

/* ------------------------------------------------------------------ */
/* Valid requests */

static void test_hello(void **st) {
  tu_body_t b;
  svc_request_t q;
  tu_err_t err;
  (void)st;
  tu_body_init(&b);
  msgpack_pack_map(&b.pk, 4);
  tu_key(&b, "op");
  tu_key(&b, "hello");
  tu_key(&b, "id");
  msgpack_pack_int64(&b.pk, -7);
  tu_key(&b, "version");
  msgpack_pack_uint32(&b.pk, 1);
  tu_key(&b, "future_key"); /* unknown keys are ignored */
  msgpack_pack_array(&b.pk, 2);
  msgpack_pack_nil(&b.pk);
  msgpack_pack_true(&b.pk);
  ASSERT_CODE(decode(&b, &q, &err), SVC_OK);
  assert_int_equal(q.op, SVC_OP_HELLO);
  assert_true(q.id.present && q.id.negative);
  assert_int_equal(q.id.i, -7);
  assert_int_equal(q.version, 1);
  svc_request_free(&q);
  msgpack_sbuffer_destroy(&b.sb);
}

static void test_register(void **st) {
  tu_body_t b;
  svc_request_t q;
  tu_err_t err;
  (void)st;
  tu_body_init(&b);
  msgpack_pack_map(&b.pk, 8);
  tu_key(&b, "op");
  tu_key(&b, "register");
  tu_key(&b, "id");
  msgpack_pack_uint64(&b.pk, UINT64_MAX);
  tu_key(&b, "name");
  tu_key(&b, "net.ln");
  tu_key(&b, "kind");
  tu_key(&b, "layernorm");
  tu_key(&b, "normalized_shape");
  msgpack_pack_array(&b.pk, 2);
  msgpack_pack_uint32(&b.pk, 4);
  msgpack_pack_uint32(&b.pk, 5);
  tu_key(&b, "eps");
  msgpack_pack_float(&b.pk, 0.25f);
  tu_key(&b, "affine");
  msgpack_pack_false(&b.pk);
  tu_key(&b, "momentum");
  msgpack_pack_nil(&b.pk);
  ASSERT_CODE(decode(&b, &q, &err), SVC_OK);
  assert_int_equal(q.op, SVC_OP_REGISTER);
  assert_true(q.id.present && !q.id.negative && q.id.u == UINT64_MAX);
  assert_string_equal(q.reg.name, "net.ln");
  assert_int_equal(q.reg.kind, SVC_KIND_LAYERNORM);
  assert_int_equal(q.reg.params.op, SBN_OP_LAYERNORM);
  assert_int_equal(q.reg.params.norm_ndim, 2);
  assert_int_equal(q.reg.params.norm_shape[1], 5);
  assert_true(q.reg.params.eps == 0.25);
  assert_int_equal(q.reg.params.affine, 0);
  assert_int_equal(q.reg.params.cumulative, 1);
  svc_request_free(&q);
  msgpack_sbuffer_destroy(&b.sb);
}

static void pack_forward(tu_body_t *b, int ndim, const size_t *dims,
                         const char *layout, const float *x, size_t bytes) {
  tu_body_init(b);
  msgpack_pack_map(&b->pk, 6);
  tu_key(b, "op");
  tu_key(b, "forward");
  tu_key(b, "id");
  msgpack_pack_uint32(&b->pk, 3);
  tu_key(b, "layer");
  msgpack_pack_uint32(&b->pk, 0);
  tu_key(b, "step");
  msgpack_pack_uint64(&b->pk, 42);
  tu_key(b, "train");
  msgpack_pack_true(&b->pk);
  tu_key(b, "x");
  tu_tensor(b, "f32", ndim, dims, layout, x, bytes);
}

static void test_forward_tensor(void **st) {
  tu_body_t b;
  svc_request_t q;
  tu_err_t err;
  const size_t dims[4] = {2, 3, 1, 2};
  float x[12];
  (void)st;
  for (int i = 0; i < 12; i++)
    x[i] = (float)i - 5.5f;
  pack_forward(&b, 4, dims, "nhwc", x, sizeof x);
  ASSERT_CODE(decode(&b, &q, &err), SVC_OK);
  assert_int_equal(q.op, SVC_OP_FORWARD);
  assert_int_equal(q.step, 42);
  assert_int_equal(q.train, 1);
  assert_int_equal(q.x.desc.ndim, 4);
  assert_int_equal(q.x.desc.layout, SBN_LAYOUT_NHWC);
  assert_int_equal(q.x.numel, 12);
  assert_int_equal((uintptr_t)q.x.data % 64, 0);
  assert_memory_equal(q.x.data, x, sizeof x);
  svc_request_free(&q);
  msgpack_sbuffer_destroy(&b.sb);
}

/* Protocol 6: a forward whose x is {dtype, shape, region[, offset][,
 * data]} and whose y goes to region 3 at 4096 (y_at); stays 1 adds
 * `x_stays: true`, 2 `x_stays: 1` (not a boolean). */
static void pack_shm_forward(tu_body_t *b, int with_data, int with_offset,
                             uint64_t offset, int stays) {
  const size_t dims[2] = {2, 3};
  float x[6] = {0};
  tu_body_init(b);
  msgpack_pack_map(&b->pk, 7 + (stays != 0 ? 1 : 0));
  if (stays != 0) {
    tu_key(b, "x_stays");
    if (stays == 1)
      tu_boolean(b, 1);
    else
      msgpack_pack_uint64(&b->pk, 1);
  }
  tu_key(b, "op");
  tu_key(b, "forward");
  tu_key(b, "id");
  msgpack_pack_uint64(&b->pk, 9);
  tu_key(b, "layer");
  msgpack_pack_uint64(&b->pk, 0);
  tu_key(b, "step");
  msgpack_pack_uint64(&b->pk, 1);
  tu_key(b, "train");
  tu_boolean(b, 1);
  tu_key(b, "x");
  msgpack_pack_map(&b->pk, 3 + (with_data ? 1 : 0) + (with_offset ? 1 : 0));
  tu_key(b, "dtype");
  tu_key(b, "f32");
  tu_key(b, "shape");
  msgpack_pack_array(&b->pk, 2);
  msgpack_pack_uint64(&b->pk, dims[0]);
  msgpack_pack_uint64(&b->pk, dims[1]);
  tu_key(b, "region");
  msgpack_pack_uint64(&b->pk, 3);
  if (with_offset) {
    tu_key(b, "offset");
    msgpack_pack_uint64(&b->pk, offset);
  }
  if (with_data) {
    tu_key(b, "data");
    msgpack_pack_bin(&b->pk, sizeof x);
    msgpack_pack_bin_body(&b->pk, x, sizeof x);
  }
  tu_key(b, "y_at");
  msgpack_pack_map(&b->pk, 2);
  tu_key(b, "region");
  msgpack_pack_uint64(&b->pk, 3);
  tu_key(b, "offset");
  msgpack_pack_uint64(&b->pk, 4096);
}

static void test_shm_tensor(void **st) {
  tu_body_t b;
  svc_request_t q;
  tu_err_t err;
  (void)st;
  pack_shm_forward(&b, 0, 1, UINT64_MAX, 0);
  ASSERT_CODE(decode(&b, &q, &err), SVC_OK);
  assert_int_equal(q.x.shm, 1);
  assert_int_equal(q.x.shm_region, 3);
  assert_true(q.x.shm_offset == UINT64_MAX);
  assert_int_equal(q.x.numel, 6);
  assert_null(q.x.data);
  assert_int_equal(q.out.present, 1);
  assert_int_equal(q.out.region, 3);
  assert_int_equal(q.out.offset, 4096);
  assert_null(q.out.dst);
  assert_int_equal(q.x.stays, 0);
  svc_request_free(&q);
  msgpack_sbuffer_destroy(&b.sb);
  /* data and region together, or region without offset: BAD_TENSOR. */
  pack_shm_forward(&b, 1, 1, 0, 0);
  ASSERT_CODE(decode(&b, &q, &err), SVC_BAD_TENSOR);
  assert_non_null(strstr(err.msg, "no 'data'"));
  msgpack_sbuffer_destroy(&b.sb);
  pack_shm_forward(&b, 0, 0, 0, 0);
  ASSERT_CODE(decode(&b, &q, &err), SVC_BAD_TENSOR);
  msgpack_sbuffer_destroy(&b.sb);
  /* x_stays: absent is 0 (above), true is 1, a non-boolean BAD_REQUEST. */
  pack_shm_forward(&b, 0, 1, 64, 1);
  ASSERT_CODE(decode(&b, &q, &err), SVC_OK);
  assert_int_equal(q.x.stays, 1);
  assert_int_equal(q.x.shm, 1);
  svc_request_free(&q);
  msgpack_sbuffer_destroy(&b.sb);
  pack_shm_forward(&b, 0, 1, 64, 2);
  ASSERT_CODE(decode(&b, &q, &err), SVC_BAD_REQUEST);
  assert_non_null(strstr(err.msg, "x_stays"));
  msgpack_sbuffer_destroy(&b.sb);
}

/* ------------------------------------------------------------------ */
/* Malformed msgpack and the bombs */

static void test_bombs(void **st) {
  svc_request_t q;
  tu_err_t err;
  (void)st;
  /* {"x": array32 of 2^32-1 elements}: msgpack-c would allocate ~96 GB. */
  const uint8_t arr32[] = {0x81, 0xa1, 'x', 0xdd, 0xff, 0xff, 0xff, 0xff};
  ASSERT_CODE(decode_raw(arr32, sizeof arr32, &q, &err), SVC_LIMIT);
  /* A root map32 of 2^32-1 pairs. */
  const uint8_t map32[] = {0xdf, 0xff, 0xff, 0xff, 0xff, 0xc0, 0xc0};
  ASSERT_CODE(decode_raw(map32, sizeof map32, &q, &err), SVC_LIMIT);
  /* A count that fits the byte budget only if elements took 0 bytes. */
  const uint8_t arr16[] = {0x81, 0xa1, 'x', 0xdc, 0x00, 0x05, 0xc0, 0xc0};
  ASSERT_CODE(decode_raw(arr16, sizeof arr16, &q, &err), SVC_LIMIT);
  /* str32 and bin32 lengths beyond the frame. */
  const uint8_t str32[] = {0x81, 0xa1, 'x', 0xdb, 0x7f, 0xff, 0xff, 0xff, 'a'};
  ASSERT_CODE(decode_raw(str32, sizeof str32, &q, &err), SVC_MALFORMED);
  const uint8_t bin32[] = {0x81, 0xa1, 'x', 0xc6, 0xff, 0xff, 0xff, 0xf0, 0};
  ASSERT_CODE(decode_raw(bin32, sizeof bin32, &q, &err), SVC_MALFORMED);
  const uint8_t ext32[] = {0x81, 0xa1, 'x', 0xc9, 0xff, 0xff, 0xff, 0xff, 1};
  ASSERT_CODE(decode_raw(ext32, sizeof ext32, &q, &err), SVC_MALFORMED);
}

static void test_nesting(void **st) {
  svc_request_t q;
  tu_err_t err;
  uint8_t deep[64];
  size_t n = 0;
  (void)st;
  /* {"x": [[[[...nil...]]]]} 40 deep: msgpack-c would report its 32-deep
   * stack as out-of-memory; the scan refuses it as a limit. */
  deep[n++] = 0x81;
  deep[n++] = 0xa1;
  deep[n++] = 'x';
  for (int i = 0; i < 40; i++)
    deep[n++] = 0x91;
  deep[n++] = 0xc0;
  ASSERT_CODE(decode_raw(deep, n, &q, &err), SVC_LIMIT);
  /* Depth 8 (root map + 7 arrays) is within the default limit of 8; one
   * more array is not. The op key makes the first a valid-but-bad request. */
  {
    uint8_t b[32];
    size_t m = 0;
    b[m++] = 0x81;
    b[m++] = 0xa1;
    b[m++] = 'y';
    for (int i = 0; i < 7; i++)
      b[m++] = 0x91;
    b[m++] = 0xc0;
    ASSERT_CODE(decode_raw(b, m, &q, &err), SVC_BAD_REQUEST);
    m = 3;
    for (int i = 0; i < 8; i++)
      b[m++] = 0x91;
    b[m++] = 0xc0;
    ASSERT_CODE(decode_raw(b, m, &q, &err), SVC_LIMIT);
  }
}

static void test_object_cap(void **st) {
  tu_body_t b;
  svc_request_t q;
  tu_err_t err;
  (void)st;
  tu_body_init(&b);
  msgpack_pack_map(&b.pk, 1);
  tu_key(&b, "junk");
  msgpack_pack_array(&b.pk, 5000);
  for (int i = 0; i < 5000; i++)
    msgpack_pack_nil(&b.pk);
  ASSERT_CODE(decode(&b, &q, &err), SVC_LIMIT);
  msgpack_sbuffer_destroy(&b.sb);
}

static void test_malformed(void **st) {
  svc_request_t q;
  tu_err_t err;
  (void)st;
  /* A zero byte then junk: the root is not a map. */
  const uint8_t zj[] = {0x00, 'j', 'u', 'n', 'k'};
  ASSERT_CODE(decode_raw(zj, sizeof zj, &q, &err), SVC_MALFORMED);
  /* An empty body, a bare array root, the never-used tag 0xc1. */
  ASSERT_CODE(decode_raw(zj, 0, &q, &err), SVC_MALFORMED);
  const uint8_t arr[] = {0x90};
  ASSERT_CODE(decode_raw(arr, sizeof arr, &q, &err), SVC_MALFORMED);
  const uint8_t c1[] = {0x81, 0xa1, 'x', 0xc1};
  ASSERT_CODE(decode_raw(c1, sizeof c1, &q, &err), SVC_MALFORMED);
  /* Truncated: a map promising two pairs holding one. */
  const uint8_t trunc[] = {0x82, 0xa1, 'x', 0xc0};
  ASSERT_CODE(decode_raw(trunc, sizeof trunc, &q, &err), SVC_LIMIT);
  const uint8_t trunc2[] = {0x82, 0xa1, 'x', 0xc0, 0xa1};
  ASSERT_CODE(decode_raw(trunc2, sizeof trunc2, &q, &err), SVC_MALFORMED);
  /* Trailing bytes after the map, and two maps in one frame. */
  const uint8_t trail[] = {0x80, 0x00};
  ASSERT_CODE(decode_raw(trail, sizeof trail, &q, &err), SVC_MALFORMED);
  const uint8_t two[] = {0x80, 0x80};
  ASSERT_CODE(decode_raw(two, sizeof two, &q, &err), SVC_MALFORMED);
  /* A truncated uint64 and a truncated str8 header. */
  const uint8_t u64[] = {0x81, 0xa1, 'x', 0xcf, 0, 0, 0};
  ASSERT_CODE(decode_raw(u64, sizeof u64, &q, &err), SVC_MALFORMED);
  const uint8_t s8[] = {0x81, 0xa1, 'x', 0xd9};
  ASSERT_CODE(decode_raw(s8, sizeof s8, &q, &err), SVC_MALFORMED);
}

/* ------------------------------------------------------------------ */
/* Wrong types and bad values */

/* {op: <op>, id: 1, <k>: <v>} with v packed by the callback. */
typedef void (*packv_t)(tu_body_t *);
static svc_code_t one_key(const char *op, const char *k, packv_t v,
                          tu_err_t *err) {
  tu_body_t b;
  svc_request_t q;
  svc_code_t c;
  tu_body_init(&b);
  msgpack_pack_map(&b.pk, k != NULL ? 3 : 2);
  tu_key(&b, "op");
  tu_key(&b, op);
  tu_key(&b, "id");
  msgpack_pack_uint32(&b.pk, 1);
  if (k != NULL) {
    tu_key(&b, k);
    v(&b);
  }
  c = decode(&b, &q, err);
  if (c == SVC_OK)
    svc_request_free(&q);
  msgpack_sbuffer_destroy(&b.sb);
  return c;
}

static void v_str(tu_body_t *b) {
  tu_key(b, "1");
}
static void v_float(tu_body_t *b) {
  msgpack_pack_double(&b->pk, 1.0);
}
static void v_neg(tu_body_t *b) {
  msgpack_pack_int32(&b->pk, -1);
}

static void test_wrong_types(void **st) {
  tu_body_t b;
  svc_request_t q;
  tu_err_t err;
  (void)st;
  ASSERT_CODE(one_key("hello", "version", v_str, &err), SVC_BAD_REQUEST);
  ASSERT_CODE(one_key("hello", "version", v_float, &err), SVC_BAD_REQUEST);
  ASSERT_CODE(one_key("hello", NULL, NULL, &err), SVC_BAD_REQUEST);
  ASSERT_CODE(one_key("frobnicate", NULL, NULL, &err), SVC_UNKNOWN_OP);
  ASSERT_CODE(one_key("bye", NULL, NULL, &err), SVC_OK);
  /* Missing id, id of the wrong type, op of the wrong type. */
  tu_body_init(&b);
  msgpack_pack_map(&b.pk, 2);
  tu_key(&b, "op");
  tu_key(&b, "bye");
  tu_key(&b, "id");
  tu_key(&b, "7");
  ASSERT_CODE(decode(&b, &q, &err), SVC_BAD_REQUEST);
  assert_false(q.id.present);
  msgpack_sbuffer_destroy(&b.sb);
  tu_body_init(&b);
  msgpack_pack_map(&b.pk, 2);
  tu_key(&b, "op");
  msgpack_pack_uint32(&b.pk, 5);
  tu_key(&b, "id");
  msgpack_pack_uint32(&b.pk, 9);
  ASSERT_CODE(decode(&b, &q, &err), SVC_BAD_REQUEST);
  /* The id is still echoed when the op is bad. */
  assert_true(q.id.present && q.id.u == 9);
  msgpack_sbuffer_destroy(&b.sb);
  /* A repeated key and a non-string key. */
  tu_body_init(&b);
  msgpack_pack_map(&b.pk, 3);
  tu_key(&b, "op");
  tu_key(&b, "bye");
  tu_key(&b, "id");
  msgpack_pack_uint32(&b.pk, 1);
  tu_key(&b, "id");
  msgpack_pack_uint32(&b.pk, 2);
  ASSERT_CODE(decode(&b, &q, &err), SVC_BAD_REQUEST);
  msgpack_sbuffer_destroy(&b.sb);
  tu_body_init(&b);
  msgpack_pack_map(&b.pk, 1);
  msgpack_pack_uint32(&b.pk, 1);
  msgpack_pack_uint32(&b.pk, 2);
  ASSERT_CODE(decode(&b, &q, &err), SVC_BAD_REQUEST);
  msgpack_sbuffer_destroy(&b.sb);
  /* Register: bad kind, negative channels, string eps, name too long. */
  tu_register_head(&b, 1, "a", "batchnorm");
  tu_key(&b, "channels");
  msgpack_pack_int32(&b.pk, -3);
  ASSERT_CODE(decode(&b, &q, &err), SVC_BAD_REQUEST);
  assert_non_null(strstr(err.msg, "channels"));
  msgpack_sbuffer_destroy(&b.sb);
  {
    char longname[300];
    memset(longname, 'n', sizeof longname - 1);
    longname[sizeof longname - 1] = '\0';
    tu_register_head(&b, 0, longname, "batchnorm");
    ASSERT_CODE(decode(&b, &q, &err), SVC_BAD_REQUEST);
    msgpack_sbuffer_destroy(&b.sb);
  }
  tu_register_head(&b, 0, "a", "superbatchnorm");
  ASSERT_CODE(decode(&b, &q, &err), SVC_BAD_REQUEST);
  msgpack_sbuffer_destroy(&b.sb);
  /* Forward: step negative, train an integer. */
  {
    const size_t dims[2] = {1, 1};
    float x = 1;
    pack_forward(&b, 2, dims, NULL, &x, 4);
    /* Patch nothing: valid; then build variants by hand. */
    ASSERT_CODE(decode(&b, &q, &err), SVC_OK);
    svc_request_free(&q);
    msgpack_sbuffer_destroy(&b.sb);
    tu_body_init(&b);
    msgpack_pack_map(&b.pk, 6);
    tu_key(&b, "op");
    tu_key(&b, "forward");
    tu_key(&b, "id");
    msgpack_pack_uint32(&b.pk, 3);
    tu_key(&b, "layer");
    msgpack_pack_uint32(&b.pk, 0);
    tu_key(&b, "step");
    v_neg(&b);
    tu_key(&b, "train");
    msgpack_pack_true(&b.pk);
    tu_key(&b, "x");
    tu_tensor(&b, "f32", 2, dims, NULL, &x, 4);
    ASSERT_CODE(decode(&b, &q, &err), SVC_BAD_REQUEST);
    assert_non_null(strstr(err.msg, "step"));
    msgpack_sbuffer_destroy(&b.sb);
    tu_body_init(&b);
    msgpack_pack_map(&b.pk, 6);
    tu_key(&b, "op");
    tu_key(&b, "forward");
    tu_key(&b, "id");
    msgpack_pack_uint32(&b.pk, 3);
    tu_key(&b, "layer");
    msgpack_pack_uint32(&b.pk, 0);
    tu_key(&b, "step");
    msgpack_pack_uint32(&b.pk, 0);
    tu_key(&b, "train");
    msgpack_pack_uint32(&b.pk, 1);
    tu_key(&b, "x");
    tu_tensor(&b, "f32", 2, dims, NULL, &x, 4);
    ASSERT_CODE(decode(&b, &q, &err), SVC_BAD_REQUEST);
    assert_non_null(strstr(err.msg, "train"));
    msgpack_sbuffer_destroy(&b.sb);
  }
}

/* A forward request whose x map is written by the callback. */
static svc_code_t forward_with_x(void (*px)(tu_body_t *), tu_err_t *err) {
  tu_body_t b;
  svc_request_t q;
  svc_code_t c;
  tu_body_init(&b);
  msgpack_pack_map(&b.pk, 6);
  tu_key(&b, "op");
  tu_key(&b, "forward");
  tu_key(&b, "id");
  msgpack_pack_uint32(&b.pk, 3);
  tu_key(&b, "layer");
  msgpack_pack_uint32(&b.pk, 0);
  tu_key(&b, "step");
  msgpack_pack_uint32(&b.pk, 0);
  tu_key(&b, "train");
  msgpack_pack_false(&b.pk);
  tu_key(&b, "x");
  px(&b);
  c = decode(&b, &q, err);
  if (c == SVC_OK)
    svc_request_free(&q);
  msgpack_sbuffer_destroy(&b.sb);
  return c;
}

static const float some[16] = {1, 2,  3,  4,  5,  6,  7,  8,
                               9, 10, 11, 12, 13, 14, 15, 16};
static void x_short(tu_body_t *b) {
  const size_t d[2] = {2, 4};
  tu_tensor(b, "f32", 2, d, NULL, some, 28); /* 7 floats for 8 */
}
static void x_odd(tu_body_t *b) {
  const size_t d[2] = {2, 4};
  tu_tensor(b, "f32", 2, d, NULL, some, 33);
}
static void x_overflow(tu_body_t *b) {
  /* 2^32 * 2^32 * 2 wraps to 0 in 64 bits: an empty payload must not
   * pass as a tensor of 0 elements. */
  const size_t d[3] = {(size_t)1 << 32, (size_t)1 << 32, 2};
  tu_tensor(b, "f32", 3, d, NULL, some, 0);
}
static void x_overflow_bytes(tu_body_t *b) {
  /* 2^62 elements: the element count fits, the byte count does not. */
  const size_t d[2] = {(size_t)1 << 31, (size_t)1 << 31};
  tu_tensor(b, "f32", 2, d, NULL, some, 0);
}
static void x_ninedims(tu_body_t *b) {
  const size_t d[9] = {1, 1, 1, 1, 1, 1, 1, 1, 1};
  tu_tensor(b, "f32", 9, d, NULL, some, 4);
}
static void x_layout(tu_body_t *b) {
  const size_t d[2] = {2, 4};
  tu_tensor(b, "f32", 2, d, "chwn", some, 32);
}
static void x_f64(tu_body_t *b) {
  msgpack_pack_map(&b->pk, 3);
  tu_key(b, "dtype");
  tu_key(b, "f64");
  tu_key(b, "shape");
  msgpack_pack_array(&b->pk, 1);
  msgpack_pack_uint32(&b->pk, 1);
  tu_key(b, "data");
  msgpack_pack_bin(&b->pk, 8);
  msgpack_pack_bin_body(&b->pk, some, 8);
}
static void x_strdata(tu_body_t *b) {
  msgpack_pack_map(&b->pk, 3);
  tu_key(b, "dtype");
  tu_key(b, "f32");
  tu_key(b, "shape");
  msgpack_pack_array(&b->pk, 1);
  msgpack_pack_uint32(&b->pk, 1);
  tu_key(b, "data");
  msgpack_pack_str_with_body(&b->pk, "abcd", 4);
}
static void x_noshape(tu_body_t *b) {
  msgpack_pack_map(&b->pk, 2);
  tu_key(b, "dtype");
  tu_key(b, "f32");
  tu_key(b, "data");
  msgpack_pack_bin(&b->pk, 4);
  msgpack_pack_bin_body(&b->pk, some, 4);
}
static void x_array(tu_body_t *b) {
  msgpack_pack_array(&b->pk, 1);
  msgpack_pack_float(&b->pk, 1.0f);
}
static void x_negdim(tu_body_t *b) {
  msgpack_pack_map(&b->pk, 3);
  tu_key(b, "dtype");
  tu_key(b, "f32");
  tu_key(b, "shape");
  msgpack_pack_array(&b->pk, 2);
  msgpack_pack_int32(&b->pk, -1);
  msgpack_pack_int32(&b->pk, -4);
  tu_key(b, "data");
  msgpack_pack_bin(&b->pk, 16);
  msgpack_pack_bin_body(&b->pk, some, 16);
}
static void x_empty(tu_body_t *b) {
  const size_t d[2] = {0, 4};
  tu_tensor(b, "f32", 2, d, NULL, some, 0);
}

static void test_tensors(void **st) {
  tu_err_t err;
  (void)st;
  ASSERT_CODE(forward_with_x(x_short, &err), SVC_BAD_TENSOR);
  ASSERT_CODE(forward_with_x(x_odd, &err), SVC_BAD_TENSOR);
  ASSERT_CODE(forward_with_x(x_overflow, &err), SVC_BAD_TENSOR);
  assert_non_null(strstr(err.msg, "overflow"));
  ASSERT_CODE(forward_with_x(x_overflow_bytes, &err), SVC_BAD_TENSOR);
  ASSERT_CODE(forward_with_x(x_ninedims, &err), SVC_BAD_TENSOR);
  ASSERT_CODE(forward_with_x(x_layout, &err), SVC_BAD_TENSOR);
  ASSERT_CODE(forward_with_x(x_f64, &err), SVC_BAD_TENSOR);
  ASSERT_CODE(forward_with_x(x_strdata, &err), SVC_BAD_TENSOR);
  ASSERT_CODE(forward_with_x(x_noshape, &err), SVC_BAD_TENSOR);
  ASSERT_CODE(forward_with_x(x_array, &err), SVC_BAD_TENSOR);
  ASSERT_CODE(forward_with_x(x_negdim, &err), SVC_BAD_TENSOR);
  ASSERT_CODE(forward_with_x(x_empty, &err), SVC_OK);
}

/* Truncations and byte flips of a valid frame never crash or leak (the
 * sanitizer build checks that) and never pass as a different request. */
static void test_mutations(void **st) {
  tu_body_t b;
  const size_t dims[4] = {2, 3, 1, 2};
  float x[12] = {0};
  uint8_t *buf;
  uint64_t s = 0x9e3779b97f4a7c15ull;
  (void)st;
  pack_forward(&b, 4, dims, "nchw", x, sizeof x);
  buf = malloc(b.sb.size);
  for (size_t cut = 0; cut < b.sb.size; cut++) {
    svc_request_t q;
    tu_err_t err;
    assert_int_not_equal(decode_raw(b.sb.data, cut, &q, &err), SVC_OK);
  }
  for (int it = 0; it < 20000; it++) {
    svc_request_t q;
    tu_err_t err;
    memcpy(buf, b.sb.data, b.sb.size);
    for (int k = 0; k < 3; k++) {
      s ^= s << 13, s ^= s >> 7, s ^= s << 17;
      buf[(s >> 8) % b.sb.size] = (uint8_t)s;
    }
    if (decode_raw(buf, b.sb.size, &q, &err) == SVC_OK)
      svc_request_free(&q);
  }
  free(buf);
  msgpack_sbuffer_destroy(&b.sb);
}

/* ------------------------------------------------------------------ */
/* Replies */

static void test_replies(void **st) {
  svc_limits_t l = lim();
  tu_err_t err;
  svc_id_t id = {1, 0, 77, 0};
  sbn_tensor_desc_t d = {3, {2, 2, 3}, SBN_LAYOUT_NHWC};
  float y[12];
  uint8_t *out;
  size_t n, off = 0;
  uint32_t flen;
  msgpack_zone z;
  msgpack_object o;
  svc_tensor_t t;
  (void)st;
  for (int i = 0; i < 12; i++)
    y[i] = (float)i * 0.5f;
  assert_int_equal(svc_encode_forward(&id, &d, y, 12, &out, &n), 0);
  assert_int_equal(tu_err(svc_frame_len(out, &l, &flen), &err), 0);
  assert_int_equal(flen + 4, n);
  assert_int_equal(tu_err(svc_scan(out + 4, flen, &l), &err), 0);
  msgpack_zone_init(&z, 1024);
  assert_int_equal(msgpack_unpack((const char *)out + 4, flen, &off, &z, &o),
                   MSGPACK_UNPACK_SUCCESS);
  assert_int_equal(o.type, MSGPACK_OBJECT_MAP);
  assert_int_equal(o.via.map.size, 2);
  assert_int_equal(o.via.map.ptr[0].val.via.u64, 77);
  assert_int_equal(
      tu_err(svc_decode_tensor(&o.via.map.ptr[1].val, "y", &t), &err), 0);
  assert_int_equal(t.desc.layout, SBN_LAYOUT_NHWC);
  assert_int_equal(t.numel, 12);
  assert_memory_equal(t.data, y, sizeof y);
  svc_tensor_free(&t);
  msgpack_zone_destroy(&z);
  free(out);
  /* An error reply with a nil id. */
  assert_int_equal(svc_encode_error(NULL, SVC_LIMIT, "too deep", &out, &n), 0);
  assert_int_equal(tu_err(svc_scan(out + 4, n - 4, &l), &err), 0);
  off = 0;
  msgpack_zone_init(&z, 1024);
  assert_int_equal(msgpack_unpack((const char *)out + 4, n - 4, &off, &z, &o),
                   MSGPACK_UNPACK_SUCCESS);
  assert_int_equal(o.via.map.ptr[0].val.type, MSGPACK_OBJECT_NIL);
  assert_int_equal(o.via.map.ptr[1].val.via.map.ptr[0].val.via.str.size, 5);
  assert_memory_equal(o.via.map.ptr[1].val.via.map.ptr[0].val.via.str.ptr,
                      "LIMIT", 5);
  msgpack_zone_destroy(&z);
  free(out);
}

/* ------------------------------------------------------------------ */
/* The worker's request path */

static void reg_bn(tu_body_t *b, const char *name, const char *kind,
                   uint32_t channels, double eps) {
  tu_register_head(b, 2, name, kind);
  tu_key(b, "channels");
  msgpack_pack_uint32(&b->pk, channels);
  tu_key(b, "eps");
  msgpack_pack_double(&b->pk, eps);
}

static void fwd(tu_body_t *b, uint32_t layer, uint64_t step, int train,
                const sbn_tensor_desc_t *d, const float *x, size_t n) {
  tu_body_init(b);
  msgpack_pack_map(&b->pk, 6);
  tu_key(b, "op");
  tu_key(b, "forward");
  tu_key(b, "id");
  msgpack_pack_uint64(&b->pk, step);
  tu_key(b, "layer");
  msgpack_pack_uint32(&b->pk, layer);
  tu_key(b, "step");
  msgpack_pack_uint64(&b->pk, step);
  tu_key(b, "train");
  train ? msgpack_pack_true(&b->pk) : msgpack_pack_false(&b->pk);
  tu_key(b, "x");
  tu_tensor(b, "f32", d->ndim, d->dims, NULL, x, n * 4);
}

static void bwd(tu_body_t *b, uint32_t layer, uint64_t step,
                const sbn_tensor_desc_t *d, const float *dy, size_t n) {
  tu_body_init(b);
  msgpack_pack_map(&b->pk, 5);
  tu_key(b, "op");
  tu_key(b, "backward");
  tu_key(b, "id");
  msgpack_pack_uint64(&b->pk, step);
  tu_key(b, "layer");
  msgpack_pack_uint32(&b->pk, layer);
  tu_key(b, "step");
  msgpack_pack_uint64(&b->pk, step);
  tu_key(b, "dy");
  tu_tensor(b, "f32", d->ndim, d->dims, NULL, dy, n * 4);
}

static void test_worker(void **st) {
  svc_worker_config_t cfg;
  svc_worker_t *w;
  tu_body_t b;
  tu_reply_t r;
  enum { N = 4 * 3 * 5 };
  sbn_tensor_desc_t d = {3, {4, 3, 5}, SBN_LAYOUT_NCHW};
  float x[N], dy[N], y[N], dx[N], dw[3], db[3], wt[3] = {1, 1, 1},
                                                bs[3] = {0, 0, 0};
  float rm[3] = {0, 0, 0}, rv[3] = {1, 1, 1};
  sbn_state_t state = {rm, rv, 0};
  sbn_layer_params_t p;
  sbn_layer_t *ref;
  const msgpack_object *o;
  svc_tensor_t t;
  tu_err_t err;
  (void)st;
  for (int i = 0; i < N; i++) {
    x[i] = (float)((i * 29) % 31) * 0.3f - 4.0f;
    dy[i] = (float)((i * 17) % 13) * 0.1f - 0.6f;
  }
  svc_worker_config_default(&cfg);
  cfg.keep_steps = 2;
  assert_int_equal(svc_worker_create(&cfg, &w), 0);

  /* Registration: same name and params give the same id; different params
   * are refused. */
  reg_bn(&b, "bn", "batchnorm", 3, 1e-5);
  assert_string_equal(tu_run(w, &b, &r), "");
  assert_int_equal(tu_get(&r.o, "layer")->via.u64, 0);
  assert_true(tu_get(&r.o, "created")->via.boolean);
  tu_reply_free(&r);
  reg_bn(&b, "bn", "batchnorm", 3, 1e-5);
  assert_string_equal(tu_run(w, &b, &r), "");
  assert_int_equal(tu_get(&r.o, "layer")->via.u64, 0);
  assert_false(tu_get(&r.o, "created")->via.boolean);
  tu_reply_free(&r);
  reg_bn(&b, "bn", "batchnorm", 3, 1e-3);
  assert_string_equal(tu_run(w, &b, &r), "LAYER_MISMATCH");
  assert_false(r.close_after);
  tu_reply_free(&r);
  reg_bn(&b, "bad", "groupnorm", 0, 1e-5);
  assert_string_equal(tu_run(w, &b, &r), "BAD_PARAMS");
  tu_reply_free(&r);
  reg_bn(&b, "sync", "syncbatchnorm", 3, 1e-5);
  assert_string_equal(tu_run(w, &b, &r), "");
  assert_int_equal(tu_get(&r.o, "layer")->via.u64, 1);
  tu_reply_free(&r);

  /* Forward and backward equal the in-process library bit for bit. */
  sbn_layer_params_default(&p, SBN_OP_BATCHNORM);
  p.channels = 3;
  assert_int_equal(sbn_layer_create(&p, NULL, &ref), 0);
  {
    size_t ws_b, sv_b;
    void *ws, *sv;
    sbn_forward_args_t fa;
    sbn_backward_args_t ba;
    assert_int_equal(sbn_layer_sizes(ref, &d, &ws_b, &sv_b), 0);
    ws = malloc(ws_b);
    sv = malloc(sv_b);
    memset(&fa, 0, sizeof fa);
    fa.mode = SBN_MODE_TRAIN;
    fa.x_desc = &d;
    fa.x = x;
    fa.y = y;
    fa.weight = wt;
    fa.bias = bs;
    fa.state = &state;
    fa.workspace = ws;
    fa.workspace_bytes = ws_b;
    fa.saved = sv;
    fa.saved_bytes = sv_b;
    assert_int_equal(sbn_forward(ref, &fa), 0);
    memset(&ba, 0, sizeof ba);
    ba.mode = SBN_MODE_TRAIN;
    ba.x_desc = &d;
    ba.x = x;
    ba.dy = dy;
    ba.dx = dx;
    ba.weight = wt;
    ba.dweight = dw;
    ba.dbias = db;
    ba.workspace = ws;
    ba.workspace_bytes = ws_b;
    ba.saved = sv;
    ba.saved_bytes = sv_b;
    assert_int_equal(sbn_backward(ref, &ba), 0);
    free(ws);
    free(sv);
  }
  fwd(&b, 0, 10, 1, &d, x, N);
  assert_string_equal(tu_run(w, &b, &r), "");
  assert_int_equal(tu_err(svc_decode_tensor(tu_get(&r.o, "y"), "y", &t), &err),
                   0);
  assert_memory_equal(t.data, y, sizeof y);
  svc_tensor_free(&t);
  tu_reply_free(&r);
  assert_true(svc_worker_saved_bytes(w) > 0);
  /* The same (layer, step) again is a duplicate. */
  fwd(&b, 0, 10, 1, &d, x, N);
  assert_string_equal(tu_run(w, &b, &r), "DUPLICATE_STEP");
  tu_reply_free(&r);
  /* A dy of another shape is refused, and the state stays for the right
   * one. */
  {
    sbn_tensor_desc_t d2 = {3, {4, 3, 4}, SBN_LAYOUT_NCHW};
    bwd(&b, 0, 10, &d2, dy, 48);
    assert_string_equal(tu_run(w, &b, &r), "SHAPE");
    tu_reply_free(&r);
  }
  bwd(&b, 0, 10, &d, dy, N);
  assert_string_equal(tu_run(w, &b, &r), "");
  assert_int_equal(
      tu_err(svc_decode_tensor(tu_get(&r.o, "dx"), "dx", &t), &err), 0);
  assert_memory_equal(t.data, dx, sizeof dx);
  svc_tensor_free(&t);
  assert_int_equal(
      tu_err(svc_decode_tensor(tu_get(&r.o, "dweight"), "dw", &t), &err), 0);
  assert_memory_equal(t.data, dw, sizeof dw);
  svc_tensor_free(&t);
  assert_int_equal(
      tu_err(svc_decode_tensor(tu_get(&r.o, "dbias"), "db", &t), &err), 0);
  assert_memory_equal(t.data, db, sizeof db);
  svc_tensor_free(&t);
  tu_reply_free(&r);
  assert_int_equal(svc_worker_saved_bytes(w), 0);
  /* A second backward, a backward without forward, a forward still
   * counted as done. */
  bwd(&b, 0, 10, &d, dy, N);
  assert_string_equal(tu_run(w, &b, &r), "NO_FORWARD");
  tu_reply_free(&r);
  bwd(&b, 0, 11, &d, dy, N);
  assert_string_equal(tu_run(w, &b, &r), "NO_FORWARD");
  tu_reply_free(&r);
  fwd(&b, 0, 10, 1, &d, x, N);
  assert_string_equal(tu_run(w, &b, &r), "DUPLICATE_STEP");
  tu_reply_free(&r);
  /* Eval is served from the running statistics the training forward
   * updated, equal to the library's eval with the same state. */
  fwd(&b, 0, 10, 0, &d, x, N);
  assert_string_equal(tu_run(w, &b, &r), "");
  {
    sbn_forward_args_t fa;
    size_t ws_b;
    void *ws;
    assert_int_equal(sbn_layer_sizes(ref, &d, &ws_b, NULL), 0);
    ws = malloc(ws_b);
    memset(&fa, 0, sizeof fa);
    fa.mode = SBN_MODE_EVAL;
    fa.x_desc = &d;
    fa.x = x;
    fa.y = y;
    fa.weight = wt;
    fa.bias = bs;
    fa.state = &state;
    fa.workspace = ws;
    fa.workspace_bytes = ws_b;
    assert_int_equal(sbn_forward(ref, &fa), 0);
    free(ws);
  }
  assert_int_equal(tu_err(svc_decode_tensor(tu_get(&r.o, "y"), "y", &t), &err),
                   0);
  assert_memory_equal(t.data, y, sizeof y);
  svc_tensor_free(&t);
  tu_reply_free(&r);
  sbn_layer_destroy(ref);

  /* Steps 11 and 12 are kept; step 13 moves the window past 10, step 14
   * past 11: its state is dropped and it cannot be submitted again. */
  for (uint64_t s = 11; s <= 14; s++) {
    fwd(&b, 0, s, 1, &d, x, N);
    assert_string_equal(tu_run(w, &b, &r), "");
    tu_reply_free(&r);
  }
  bwd(&b, 0, 11, &d, dy, N);
  assert_string_equal(tu_run(w, &b, &r), "NO_FORWARD");
  tu_reply_free(&r);
  fwd(&b, 0, 11, 1, &d, x, N);
  assert_string_equal(tu_run(w, &b, &r), "STALE_STEP");
  tu_reply_free(&r);
  bwd(&b, 0, 12, &d, dy, N);
  assert_string_equal(tu_run(w, &b, &r), "");
  tu_reply_free(&r);

  /* Unknown layer; x of the wrong channel count; syncbatchnorm. */
  fwd(&b, 9, 1, 1, &d, x, N);
  assert_string_equal(tu_run(w, &b, &r), "UNKNOWN_LAYER");
  tu_reply_free(&r);
  {
    sbn_tensor_desc_t d2 = {3, {5, 4, 3}, SBN_LAYOUT_NCHW};
    fwd(&b, 0, 20, 1, &d2, x, N);
    assert_string_equal(tu_run(w, &b, &r), "SHAPE");
    tu_reply_free(&r);
  }
  fwd(&b, 1, 1, 1, &d, x, N);
  assert_string_equal(tu_run(w, &b, &r), "NOT_YET");
  assert_false(r.close_after);
  tu_reply_free(&r);
  fwd(&b, 1, 1, 0, &d, x, N);
  assert_string_equal(tu_run(w, &b, &r), "");
  tu_reply_free(&r);

  /* A fatal codec error asks the server to close; a bye too. */
  {
    const uint8_t arr32[] = {0x81, 0xa1, 'x', 0xdd, 0xff, 0xff, 0xff, 0xff};
    tu_body_init(&b);
    msgpack_sbuffer_write(&b.sb, (const char *)arr32, sizeof arr32);
    assert_string_equal(tu_run(w, &b, &r), "LIMIT");
    assert_true(r.close_after);
    assert_int_equal(tu_get(&r.o, "id")->type, MSGPACK_OBJECT_NIL);
    tu_reply_free(&r);
  }
  tu_body_init(&b);
  msgpack_pack_map(&b.pk, 2);
  tu_key(&b, "op");
  tu_key(&b, "bye");
  tu_key(&b, "id");
  msgpack_pack_uint32(&b.pk, 5);
  assert_string_equal(tu_run(w, &b, &r), "");
  assert_true(r.close_after);
  o = tu_get(&r.o, "id");
  assert_int_equal(o->via.u64, 5);
  tu_reply_free(&r);
  /* Hello reports the limits; another version is refused. */
  tu_body_init(&b);
  msgpack_pack_map(&b.pk, 3);
  tu_key(&b, "op");
  tu_key(&b, "hello");
  tu_key(&b, "id");
  msgpack_pack_uint32(&b.pk, 5);
  tu_key(&b, "version");
  msgpack_pack_uint32(&b.pk, 99);
  assert_string_equal(tu_run(w, &b, &r), "UNSUPPORTED_VERSION");
  tu_reply_free(&r);
  svc_worker_destroy(w);
}

/* max_saved bounds the kept forward state. */
static void test_worker_saved_cap(void **st) {
  svc_worker_config_t cfg;
  svc_worker_t *w;
  tu_body_t b;
  tu_reply_t r;
  enum { N = 2 * 3 * 100 };
  sbn_tensor_desc_t d = {3, {2, 3, 100}, SBN_LAYOUT_NCHW};
  static float x[N];
  (void)st;
  for (int i = 0; i < N; i++)
    x[i] = (float)(i % 7);
  svc_worker_config_default(&cfg);
  cfg.max_saved = 4000; /* one step of 2400 bytes of x fits, two do not */
  cfg.keep_steps = 100;
  assert_int_equal(svc_worker_create(&cfg, &w), 0);
  reg_bn(&b, "bn", "batchnorm", 3, 1e-5);
  assert_string_equal(tu_run(w, &b, &r), "");
  tu_reply_free(&r);
  fwd(&b, 0, 1, 1, &d, x, N);
  assert_string_equal(tu_run(w, &b, &r), "");
  tu_reply_free(&r);
  fwd(&b, 0, 2, 1, &d, x, N);
  assert_string_equal(tu_run(w, &b, &r), "RESOURCE");
  tu_reply_free(&r);
  /* Eval keeps nothing and is still served. */
  fwd(&b, 0, 2, 0, &d, x, N);
  assert_string_equal(tu_run(w, &b, &r), "");
  tu_reply_free(&r);
  svc_worker_destroy(w);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_frame_len),
      cmocka_unit_test(test_hello),
      cmocka_unit_test(test_register),
      cmocka_unit_test(test_forward_tensor),
      cmocka_unit_test(test_bombs),
      cmocka_unit_test(test_nesting),
      cmocka_unit_test(test_object_cap),
      cmocka_unit_test(test_malformed),
      cmocka_unit_test(test_wrong_types),
      cmocka_unit_test(test_tensors),
      cmocka_unit_test(test_shm_tensor),
      cmocka_unit_test(test_mutations),
      cmocka_unit_test(test_replies),
      cmocka_unit_test(test_worker),
      cmocka_unit_test(test_worker_saved_cap),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
