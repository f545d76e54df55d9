/* Unit tests of the worker's get_state, set_state and metrics requests
 * (src/svc_ops.c), without sockets: request frames go through
 * svc_worker_handle() as the server would hand them over, and the replies
 * are read back with msgpack-c. */
#include <float.h>
#include <math.h>
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
/* The metrics test fills the latency ring and the fusion histogram
 * directly: they are only fed by cross-rank allreduces otherwise. */
#include "svc_worker_int.h"

/* ------------------------------------------------------------------ */
/* Building request bodies and reading replies */

/* Runs body and expects the error code want ("" for success); the reply is
 * freed unless kept. */
#define EXPECT(w, b, r, want)                                         \
  do {                                                                \
    const char *got_ = tu_run((w), (b), (r));                         \
    if (strcmp(got_, (want)) != 0)                                    \
      fail_msg("got '%s' (%s), expected '%s'", got_, (r)->msg, want); \
  } while (0)

/* Register options; -1 leaves a flag at the server's default. */
typedef struct reg_s {
  const char *name, *kind;
  uint32_t channels;
  int nshape;
  size_t shape[2];
  int affine, track;
} reg_t;

static void reg(svc_worker_t *w, reg_t o, uint64_t want_id) {
  tu_body_t b;
  tu_reply_t r;
  size_t more =
      (o.channels > 0) + (o.nshape > 0) + (o.affine >= 0) + (o.track >= 0);
  tu_register_head(&b, more, o.name, o.kind);
  if (o.channels > 0) {
    tu_key(&b, "channels");
    msgpack_pack_uint32(&b.pk, o.channels);
  }
  if (o.nshape > 0) {
    tu_key(&b, "normalized_shape");
    msgpack_pack_array(&b.pk, (size_t)o.nshape);
    for (int i = 0; i < o.nshape; i++)
      msgpack_pack_uint64(&b.pk, o.shape[i]);
  }
  if (o.affine >= 0) {
    tu_key(&b, "affine");
    o.affine ? msgpack_pack_true(&b.pk) : msgpack_pack_false(&b.pk);
  }
  if (o.track >= 0) {
    tu_key(&b, "track_running_stats");
    o.track ? msgpack_pack_true(&b.pk) : msgpack_pack_false(&b.pk);
  }
  EXPECT(w, &b, &r, "");
  assert_int_equal(tu_get_u64(&r.o, "layer"), want_id);
  tu_reply_free(&r);
}

static void req_layer(tu_body_t *b, const char *op, uint64_t layer) {
  tu_body_init(b);
  msgpack_pack_map(&b->pk, 3);
  tu_key(b, "op");
  tu_key(b, op);
  tu_key(b, "id");
  msgpack_pack_uint32(&b->pk, 7);
  tu_key(b, "layer");
  msgpack_pack_uint64(&b->pk, layer);
}

static const char *get_state(svc_worker_t *w, uint64_t layer, tu_reply_t *r) {
  tu_body_t b;
  req_layer(&b, "get_state", layer);
  return tu_run(w, &b, r);
}

static void fwd(svc_worker_t *w, uint64_t layer, uint64_t step, int train,
                const sbn_tensor_desc_t *d, const float *x, size_t n,
                float *y) {
  tu_body_t b;
  tu_reply_t r;
  svc_tensor_t t;
  tu_err_t err;
  tu_body_init(&b);
  msgpack_pack_map(&b.pk, 6);
  tu_key(&b, "op");
  tu_key(&b, "forward");
  tu_key(&b, "id");
  msgpack_pack_uint64(&b.pk, step);
  tu_key(&b, "layer");
  msgpack_pack_uint64(&b.pk, layer);
  tu_key(&b, "step");
  msgpack_pack_uint64(&b.pk, step);
  tu_key(&b, "train");
  train ? msgpack_pack_true(&b.pk) : msgpack_pack_false(&b.pk);
  tu_key(&b, "x");
  tu_tensor(&b, "f32", d->ndim, d->dims, NULL, x, n * sizeof(float));
  EXPECT(w, &b, &r, "");
  if (y != NULL) {
    assert_int_equal(
        tu_err(svc_decode_tensor(tu_get(&r.o, "y"), "y", &t), &err), 0);
    assert_int_equal(t.numel, n);
    memcpy(y, t.data, n * sizeof *y);
    svc_tensor_free(&t);
  }
  tu_reply_free(&r);
}

/* One tensor of a set_state request. */
typedef struct st_s {
  const char *key;
  int ndim;
  size_t dims[2];
  const char *layout;
  const float *data;
} st_t;

static size_t st_numel(const st_t *s) {
  size_t n = 1;
  for (int i = 0; i < s->ndim; i++)
    n *= s->dims[i];
  return n;
}

/* A set_state of layer with ns tensors and, when nbt >= 0, a
 * num_batches_tracked. */
static const char *set_state(svc_worker_t *w, uint64_t layer, const st_t *s,
                             int ns, int64_t nbt, tu_reply_t *r) {
  tu_body_t b;
  tu_body_init(&b);
  msgpack_pack_map(&b.pk, 3 + (uint32_t)ns + (nbt >= 0));
  tu_key(&b, "op");
  tu_key(&b, "set_state");
  tu_key(&b, "id");
  msgpack_pack_uint32(&b.pk, 8);
  tu_key(&b, "layer");
  msgpack_pack_uint64(&b.pk, layer);
  for (int i = 0; i < ns; i++) {
    tu_key(&b, s[i].key);
    tu_tensor(&b, "f32", s[i].ndim, s[i].dims, s[i].layout, s[i].data,
              st_numel(&s[i]) * sizeof(float));
  }
  if (nbt >= 0) {
    tu_key(&b, "num_batches_tracked");
    msgpack_pack_int64(&b.pk, nbt);
  }
  return tu_run(w, &b, r);
}

/* Decodes key k of a get_state reply into out (n floats) and checks its
 * shape. */
static void state_tensor(const tu_reply_t *r, const char *k, int ndim,
                         const size_t *dims, float *out, size_t n) {
  svc_tensor_t t;
  tu_err_t err;
  const msgpack_object *o = tu_get(&r->o, k);
  if (o == NULL)
    fail_msg("get_state reply without %s", k);
  assert_int_equal(tu_err(svc_decode_tensor(o, k, &t), &err), 0);
  assert_int_equal(t.desc.ndim, ndim);
  for (int i = 0; i < ndim; i++)
    assert_int_equal(t.desc.dims[i], dims[i]);
  assert_int_equal(t.desc.layout, SBN_LAYOUT_NCHW);
  assert_int_equal(t.numel, n);
  if (n > 0)
    memcpy(out, t.data, n * sizeof *out);
  svc_tensor_free(&t);
}

static void assert_kind(const tu_reply_t *r, const char *kind) {
  const msgpack_object *o = tu_get(&r->o, "kind");
  assert_non_null(o);
  assert_int_equal(o->type, MSGPACK_OBJECT_STR);
  assert_int_equal(o->via.str.size, strlen(kind));
  assert_memory_equal(o->via.str.ptr, kind, strlen(kind));
}

static svc_worker_t *worker(void) {
  svc_worker_config_t cfg;
  svc_worker_t *w = NULL;
  svc_worker_config_default(&cfg);
  assert_int_equal(svc_worker_create(&cfg, &w), 0);
  return w;
}

/* ------------------------------------------------------------------ */
/* get_state */

/* Every kind answers; keys appear exactly for the state the layer keeps,
 * with the defaults of registration. */
static void test_get_state_defaults(void **st) {
  svc_worker_t *w = worker();
  tu_reply_t r;
  float v[6];
  const size_t c3[1] = {3}, ln[2] = {2, 3}, c4[1] = {4};
  (void)st;
  reg(w, (reg_t){"bn", "batchnorm", 3, 0, {0}, -1, -1}, 0);
  reg(w, (reg_t){"ln", "layernorm", 0, 2, {2, 3}, -1, -1}, 1);
  reg(w, (reg_t){"drop", "dropout", 0, 0, {0}, -1, -1}, 2);
  reg(w, (reg_t){"in", "instancenorm", 4, 0, {0}, -1, -1}, 3);
  reg(w, (reg_t){"in_t", "instancenorm", 4, 0, {0}, 0, 1}, 4);
  reg(w, (reg_t){"bn_na", "batchnorm", 3, 0, {0}, 0, -1}, 5);
  reg(w, (reg_t){"sbn", "syncbatchnorm", 3, 0, {0}, -1, 0}, 6);
  reg(w, (reg_t){"gn", "groupnorm", 4, 0, {0}, -1, -1}, 7);

  /* batchnorm: everything. */
  assert_string_equal(get_state(w, 0, &r), "");
  assert_int_equal(tu_get_u64(&r.o, "id"), 7);
  assert_int_equal(r.o.via.map.size, 7);
  assert_kind(&r, "batchnorm");
  state_tensor(&r, "running_mean", 1, c3, v, 3);
  for (int i = 0; i < 3; i++)
    assert_true(v[i] == 0.0f);
  state_tensor(&r, "running_var", 1, c3, v, 3);
  for (int i = 0; i < 3; i++)
    assert_true(v[i] == 1.0f);
  assert_int_equal(tu_get_u64(&r.o, "num_batches_tracked"), 0);
  state_tensor(&r, "weight", 1, c3, v, 3);
  for (int i = 0; i < 3; i++)
    assert_true(v[i] == 1.0f);
  state_tensor(&r, "bias", 1, c3, v, 3);
  for (int i = 0; i < 3; i++)
    assert_true(v[i] == 0.0f);
  tu_reply_free(&r);

  /* layernorm: parameters of the normalized shape, no statistics. */
  assert_string_equal(get_state(w, 1, &r), "");
  assert_int_equal(r.o.via.map.size, 4);
  assert_kind(&r, "layernorm");
  assert_null(tu_get(&r.o, "running_mean"));
  assert_null(tu_get(&r.o, "num_batches_tracked"));
  state_tensor(&r, "weight", 2, ln, v, 6);
  for (int i = 0; i < 6; i++)
    assert_true(v[i] == 1.0f);
  state_tensor(&r, "bias", 2, ln, v, 6);
  for (int i = 0; i < 6; i++)
    assert_true(v[i] == 0.0f);
  tu_reply_free(&r);

  /* dropout: only its kind. */
  assert_string_equal(get_state(w, 2, &r), "");
  assert_int_equal(r.o.via.map.size, 2);
  assert_kind(&r, "dropout");
  tu_reply_free(&r);

  /* instancenorm tracks nothing by default; with tracking and without
   * affine it has statistics only. */
  assert_string_equal(get_state(w, 3, &r), "");
  assert_int_equal(r.o.via.map.size, 4);
  assert_null(tu_get(&r.o, "running_var"));
  state_tensor(&r, "weight", 1, c4, v, 4);
  tu_reply_free(&r);
  assert_string_equal(get_state(w, 4, &r), "");
  assert_int_equal(r.o.via.map.size, 5);
  assert_kind(&r, "instancenorm");
  assert_null(tu_get(&r.o, "weight"));
  assert_null(tu_get(&r.o, "bias"));
  state_tensor(&r, "running_var", 1, c4, v, 4);
  for (int i = 0; i < 4; i++)
    assert_true(v[i] == 1.0f);
  assert_int_equal(tu_get_u64(&r.o, "num_batches_tracked"), 0);
  tu_reply_free(&r);

  /* batchnorm without affine; syncbatchnorm without tracking; groupnorm. */
  assert_string_equal(get_state(w, 5, &r), "");
  assert_int_equal(r.o.via.map.size, 5);
  assert_null(tu_get(&r.o, "weight"));
  state_tensor(&r, "running_mean", 1, c3, v, 3);
  tu_reply_free(&r);
  assert_string_equal(get_state(w, 6, &r), "");
  assert_int_equal(r.o.via.map.size, 4);
  assert_kind(&r, "syncbatchnorm");
  assert_null(tu_get(&r.o, "running_mean"));
  state_tensor(&r, "bias", 1, c3, v, 3);
  tu_reply_free(&r);
  assert_string_equal(get_state(w, 7, &r), "");
  assert_int_equal(r.o.via.map.size, 4);
  assert_kind(&r, "groupnorm");
  tu_reply_free(&r);

  /* An unknown layer. */
  assert_string_equal(get_state(w, 8, &r), "UNKNOWN_LAYER");
  assert_false(r.close_after);
  tu_reply_free(&r);
  svc_worker_destroy(w);
}

/* Training forwards of batchnorm move the running statistics as PyTorch
 * does (momentum 0.1, unbiased variance), checked against a float64
 * reference; an eval forward leaves them alone. */
static void test_running_stats_after_forward(void **st) {
  enum { NB = 4, C = 3, HW = 5, N = NB * C * HW };
  svc_worker_t *w = worker();
  sbn_tensor_desc_t d = {3, {NB, C, HW}, SBN_LAYOUT_NCHW};
  const size_t c3[1] = {C};
  double rm[C] = {0, 0, 0}, rv[C] = {1, 1, 1};
  float x[N], got[C];
  tu_reply_t r;
  (void)st;
  reg(w, (reg_t){"bn", "batchnorm", C, 0, {0}, -1, -1}, 0);
  for (uint64_t step = 1; step <= 3; step++) {
    for (int i = 0; i < N; i++)
      x[i] = (float)(((unsigned)i * 37u + (unsigned)step * 11u) % 29u) * 0.37f -
             3.0f + (float)step;
    fwd(w, 0, step, 1, &d, x, N, NULL);
    for (int c = 0; c < C; c++) {
      double s = 0, ss = 0, mean, var;
      const int n = NB * HW;
      for (int b = 0; b < NB; b++)
        for (int k = 0; k < HW; k++)
          s += x[(b * C + c) * HW + k];
      mean = s / n;
      for (int b = 0; b < NB; b++)
        for (int k = 0; k < HW; k++) {
          double e = x[(b * C + c) * HW + k] - mean;
          ss += e * e;
        }
      var = ss / (n - 1);
      rm[c] = 0.9 * rm[c] + 0.1 * mean;
      rv[c] = 0.9 * rv[c] + 0.1 * var;
    }
  }
  /* An eval forward does not move them. */
  fwd(w, 0, 3, 0, &d, x, N, NULL);
  assert_string_equal(get_state(w, 0, &r), "");
  state_tensor(&r, "running_mean", 1, c3, got, C);
  for (int c = 0; c < C; c++)
    if (fabs(got[c] - rm[c]) > 1e-6 * (1 + fabs(rm[c])))
      fail_msg("running_mean[%d] %.9g, reference %.9g", c, got[c], rm[c]);
  state_tensor(&r, "running_var", 1, c3, got, C);
  for (int c = 0; c < C; c++)
    if (fabs(got[c] - rv[c]) > 1e-6 * (1 + fabs(rv[c])))
      fail_msg("running_var[%d] %.9g, reference %.9g", c, got[c], rv[c]);
  assert_int_equal(tu_get_u64(&r.o, "num_batches_tracked"), 3);
  tu_reply_free(&r);
  svc_worker_destroy(w);
}

/* set_state then get_state returns the same bits (signed zero, a
 * subnormal, large values included), and later forwards use what was
 * set: eval normalizes with the new statistics and parameters, training
 * counts on from the new num_batches_tracked. */
static void test_set_state_round_trip(void **st) {
  enum { NB = 2, C = 3, HW = 4, N = NB * C * HW };
  svc_worker_t *w = worker();
  const size_t c3[1] = {C}, ln[2] = {2, 3};
  const float mean[C] = {-0.0f, 1.5f, -2.25f};
  const float var[C] = {0.0f, 1e-40f, 3.0e7f};
  const float wt[C] = {0.5f, -1.75f, 3.0f};
  const float bs[C] = {0.125f, -0.0f, -4.0f};
  const float lw[6] = {1, 2, 3, 4, 5, 6.5f}, lb[6] = {-1, -2, -3, 0, 1e-3f, 7};
  const float vis[C] = {0.25f, 2.0f, 9.0f};
  const st_t all[4] = {{"running_mean", 1, {C}, NULL, mean},
                       {"running_var", 1, {C}, NULL, var},
                       {"weight", 1, {C}, NULL, wt},
                       {"bias", 1, {C}, "nchw", bs}};
  const st_t lnwb[2] = {{"weight", 2, {2, 3}, NULL, lw},
                        {"bias", 2, {2, 3}, "nchw", lb}};
  sbn_tensor_desc_t d = {3, {NB, C, HW}, SBN_LAYOUT_NCHW};
  float got[6], x[N], y[N];
  tu_reply_t r;
  (void)st;
  reg(w, (reg_t){"bn", "batchnorm", C, 0, {0}, -1, -1}, 0);
  reg(w, (reg_t){"ln", "layernorm", 0, 2, {2, 3}, -1, -1}, 1);

  assert_string_equal(set_state(w, 0, all, 4, 41, &r), "");
  assert_int_equal(tu_get_u64(&r.o, "id"), 8);
  assert_int_equal(r.o.via.map.size, 1);
  tu_reply_free(&r);
  assert_string_equal(get_state(w, 0, &r), "");
  state_tensor(&r, "running_mean", 1, c3, got, C);
  assert_memory_equal(got, mean, sizeof mean);
  state_tensor(&r, "running_var", 1, c3, got, C);
  assert_memory_equal(got, var, sizeof var);
  state_tensor(&r, "weight", 1, c3, got, C);
  assert_memory_equal(got, wt, sizeof wt);
  state_tensor(&r, "bias", 1, c3, got, C);
  assert_memory_equal(got, bs, sizeof bs);
  assert_int_equal(tu_get_u64(&r.o, "num_batches_tracked"), 41);
  tu_reply_free(&r);

  assert_string_equal(set_state(w, 1, lnwb, 2, -1, &r), "");
  tu_reply_free(&r);
  assert_string_equal(get_state(w, 1, &r), "");
  state_tensor(&r, "weight", 2, ln, got, 6);
  assert_memory_equal(got, lw, sizeof lw);
  state_tensor(&r, "bias", 2, ln, got, 6);
  assert_memory_equal(got, lb, sizeof lb);
  tu_reply_free(&r);

  /* Eval with statistics of moderate size: y = (x - mean) / sqrt(var +
   * eps) * weight + bias, within a few float roundings of the terms. */
  {
    const st_t s[1] = {{"running_var", 1, {C}, NULL, vis}};
    assert_string_equal(set_state(w, 0, s, 1, -1, &r), "");
    tu_reply_free(&r);
  }
  for (int i = 0; i < N; i++)
    x[i] = (float)((i * 7) % 11) * 0.5f - 2.0f;
  fwd(w, 0, 1, 0, &d, x, N, y);
  for (int b = 0; b < NB; b++)
    for (int c = 0; c < C; c++)
      for (int k = 0; k < HW; k++) {
        int i = (b * C + c) * HW + k;
        double scale = (double)wt[c] / sqrt((double)vis[c] + 1e-5);
        double ref = ((double)x[i] - mean[c]) * scale + bs[c];
        double tol = 8 * FLT_EPSILON *
                     (fabs(x[i] * scale) + fabs(mean[c] * scale) +
                      fabs((double)bs[c]) + 1);
        if (fabs(y[i] - ref) > tol)
          fail_msg("y[%d] %.9g, reference %.9g", i, y[i], ref);
      }
  fwd(w, 0, 1, 1, &d, x, N, NULL);
  assert_string_equal(get_state(w, 0, &r), "");
  assert_int_equal(tu_get_u64(&r.o, "num_batches_tracked"), 42);
  tu_reply_free(&r);
  svc_worker_destroy(w);
}

/* A set_state of the weight alone leaves every other piece of state as it
 * was, bit for bit (after a forward, so none of it is a default). */
static void test_set_state_partial(void **st) {
  enum { NB = 2, C = 3, HW = 4, N = NB * C * HW };
  svc_worker_t *w = worker();
  const size_t c3[1] = {C};
  const float wt[C] = {2, 3, 4};
  const st_t s[1] = {{"weight", 1, {C}, NULL, wt}};
  sbn_tensor_desc_t d = {3, {NB, C, HW}, SBN_LAYOUT_NCHW};
  float x[N], m0[C], v0[C], b0[C], got[C];
  tu_reply_t r;
  (void)st;
  for (int i = 0; i < N; i++)
    x[i] = (float)((i * 5) % 9) - 3.5f;
  reg(w, (reg_t){"bn", "batchnorm", C, 0, {0}, -1, -1}, 0);
  fwd(w, 0, 1, 1, &d, x, N, NULL);
  assert_string_equal(get_state(w, 0, &r), "");
  state_tensor(&r, "running_mean", 1, c3, m0, C);
  state_tensor(&r, "running_var", 1, c3, v0, C);
  state_tensor(&r, "bias", 1, c3, b0, C);
  tu_reply_free(&r);
  assert_true(m0[0] != 0.0f || m0[1] != 0.0f || m0[2] != 0.0f);

  assert_string_equal(set_state(w, 0, s, 1, -1, &r), "");
  tu_reply_free(&r);
  assert_string_equal(get_state(w, 0, &r), "");
  state_tensor(&r, "weight", 1, c3, got, C);
  assert_memory_equal(got, wt, sizeof wt);
  state_tensor(&r, "running_mean", 1, c3, got, C);
  assert_memory_equal(got, m0, sizeof m0);
  state_tensor(&r, "running_var", 1, c3, got, C);
  assert_memory_equal(got, v0, sizeof v0);
  state_tensor(&r, "bias", 1, c3, got, C);
  assert_memory_equal(got, b0, sizeof b0);
  assert_int_equal(tu_get_u64(&r.o, "num_batches_tracked"), 1);
  tu_reply_free(&r);

  /* An empty set_state changes nothing and succeeds. */
  assert_string_equal(set_state(w, 0, s, 0, -1, &r), "");
  tu_reply_free(&r);
  svc_worker_destroy(w);
}

/* The whole get_state reply of a layer, to compare before and after a
 * refused request (same id, so equal bytes mean equal state). */
typedef struct snap_s {
  uint8_t *buf;
  size_t len;
} snap_t;

static snap_t snap(svc_worker_t *w, uint64_t layer) {
  tu_reply_t r;
  snap_t s;
  assert_string_equal(get_state(w, layer, &r), "");
  s.buf = r.buf;
  s.len = r.len;
  msgpack_zone_destroy(&r.z);
  return s;
}

static void assert_unchanged(svc_worker_t *w, uint64_t layer, snap_t *before) {
  snap_t now = snap(w, layer);
  assert_int_equal(now.len, before->len);
  assert_memory_equal(now.buf, before->buf, now.len);
  free(now.buf);
}

/* One refused set_state: its code, a message naming what, and no change
 * to the layer. */
static void refuse(svc_worker_t *w, uint64_t layer, const st_t *s, int ns,
                   int64_t nbt, const char *code, const char *what) {
  tu_reply_t r;
  snap_t before = {NULL, 0};
  int known = layer < 3;
  if (known)
    before = snap(w, layer);
  if (strcmp(set_state(w, layer, s, ns, nbt, &r), code) != 0)
    fail_msg("got '%s' (%s), expected %s", r.code, r.msg, code);
  if (strstr(r.msg, what) == NULL)
    fail_msg("message '%s' does not name '%s'", r.msg, what);
  assert_false(r.close_after);
  tu_reply_free(&r);
  if (known) {
    assert_unchanged(w, layer, &before);
    free(before.buf);
  }
}

static void test_set_state_refusals(void **st) {
  svc_worker_t *w = worker();
  const float ok3[3] = {0.5f, 0.25f, 2}, four[4] = {1, 2, 3, 4};
  const float nan3[3] = {1, 2, NAN}, inf3[3] = {INFINITY, 1, 1};
  const float neg3[3] = {1, -1e-30f, 2}, ninf3[3] = {1, 1, -INFINITY};
  const float six[6] = {1, 2, 3, 4, 5, 6};
  (void)st;
  /* 0: batchnorm C=3; 1: layernorm [2, 3]; 2: batchnorm without affine. */
  reg(w, (reg_t){"bn", "batchnorm", 3, 0, {0}, -1, -1}, 0);
  reg(w, (reg_t){"ln", "layernorm", 0, 2, {2, 3}, -1, -1}, 1);
  reg(w, (reg_t){"bn_na", "batchnorm", 3, 0, {0}, 0, -1}, 2);
  {
    /* Wrong element count, and the right count in the wrong shape. */
    const st_t a[1] = {{"running_mean", 1, {4}, NULL, four}};
    const st_t b[1] = {{"running_var", 2, {3, 1}, NULL, ok3}};
    const st_t c[1] = {{"weight", 1, {6}, NULL, six}};
    const st_t e[1] = {{"bias", 2, {3, 2}, NULL, six}};
    const st_t f[1] = {{"weight", 2, {2, 3}, "nhwc", six}};
    const st_t g[1] = {{"bias", 1, {4}, NULL, four}};
    refuse(w, 0, a, 1, -1, "SHAPE", "running_mean");
    refuse(w, 0, b, 1, -1, "SHAPE", "running_var");
    refuse(w, 1, c, 1, -1, "SHAPE", "weight");
    refuse(w, 1, e, 1, -1, "SHAPE", "bias");
    refuse(w, 1, f, 1, -1, "SHAPE", "weight");
    refuse(w, 0, g, 1, -1, "SHAPE", "bias");
  }
  {
    /* State the kind does not have. */
    const st_t a[1] = {{"running_mean", 1, {3}, NULL, ok3}};
    const st_t b[1] = {{"running_var", 1, {3}, NULL, ok3}};
    const st_t c[1] = {{"weight", 1, {3}, NULL, ok3}};
    const st_t e[1] = {{"bias", 1, {3}, NULL, ok3}};
    refuse(w, 1, a, 1, -1, "SHAPE", "running_mean");
    refuse(w, 1, b, 1, -1, "SHAPE", "running_var");
    refuse(w, 1, NULL, 0, 5, "SHAPE", "num_batches_tracked");
    refuse(w, 2, c, 1, -1, "SHAPE", "weight");
    refuse(w, 2, e, 1, -1, "SHAPE", "bias");
  }
  {
    /* Values: NaN, infinities, a negative variance, each with the index
     * of the first bad element. */
    const st_t a[1] = {{"running_mean", 1, {3}, NULL, nan3}};
    const st_t b[1] = {{"weight", 1, {3}, NULL, inf3}};
    const st_t c[1] = {{"running_var", 1, {3}, NULL, neg3}};
    const st_t e[1] = {{"bias", 1, {3}, NULL, ninf3}};
    const st_t f[1] = {{"running_var", 1, {3}, NULL, nan3}};
    refuse(w, 0, a, 1, -1, "BAD_PARAMS", "running_mean[2]");
    refuse(w, 0, b, 1, -1, "BAD_PARAMS", "weight[0]");
    refuse(w, 0, c, 1, -1, "BAD_PARAMS", "running_var[1]");
    refuse(w, 0, e, 1, -1, "BAD_PARAMS", "bias[2]");
    refuse(w, 0, f, 1, -1, "BAD_PARAMS", "running_var[2]");
  }
  {
    /* All or nothing: valid pieces next to a bad one are not applied,
     * whichever comes first in the request. */
    const st_t a[3] = {{"weight", 1, {3}, NULL, ok3},
                       {"running_mean", 1, {3}, NULL, ok3},
                       {"running_var", 1, {3}, NULL, neg3}};
    const st_t b[2] = {{"bias", 1, {3}, NULL, nan3},
                       {"weight", 1, {3}, NULL, ok3}};
    const st_t c[2] = {{"running_mean", 1, {3}, NULL, ok3},
                       {"bias", 1, {4}, NULL, four}};
    refuse(w, 0, a, 3, 9, "BAD_PARAMS", "running_var[1]");
    refuse(w, 0, b, 2, 9, "BAD_PARAMS", "bias[2]");
    refuse(w, 0, c, 2, 9, "SHAPE", "bias");
    refuse(w, 2, a, 2, 9, "SHAPE", "weight");
  }
  /* An unknown layer. */
  refuse(w, 3, NULL, 0, 1, "UNKNOWN_LAYER", "layer");
  svc_worker_destroy(w);
}

/* ------------------------------------------------------------------ */
/* metrics */

static const char *metrics(svc_worker_t *w, tu_reply_t *r) {
  tu_body_t b;
  tu_body_init(&b);
  msgpack_pack_map(&b.pk, 2);
  tu_key(&b, "op");
  tu_key(&b, "metrics");
  tu_key(&b, "id");
  msgpack_pack_uint32(&b.pk, 9);
  return tu_run(w, &b, r);
}

static void test_metrics(void **st) {
  enum { NB = 2, C = 3, HW = 4, N = NB * C * HW };
  static const char *const fuse[8] = {"1",    "2",     "3-4",   "5-8",
                                      "9-16", "17-32", "33-64", "65+"};
  svc_worker_t *w = worker();
  sbn_tensor_desc_t d = {3, {NB, C, HW}, SBN_LAYOUT_NCHW};
  const msgpack_object *q, *e, *f, *lat;
  float x[N];
  tu_reply_t r;
  tu_body_t b;
  (void)st;
  for (int i = 0; i < N; i++)
    x[i] = (float)(i % 5);

  /* A fresh worker: every op listed (this metrics request counted), no
   * errors, no latency samples. */
  assert_string_equal(metrics(w, &r), "");
  assert_int_equal(tu_get_u64(&r.o, "id"), 9);
  q = tu_get(&r.o, "requests");
  assert_non_null(q);
  assert_int_equal(q->via.map.size, SVC_OP_COUNT);
  for (int op = 0; op < SVC_OP_COUNT; op++)
    assert_int_equal(tu_get_u64(q, svc_op_name((svc_op_t)op)),
                     op == SVC_OP_METRICS ? 1 : 0);
  e = tu_get(&r.o, "errors");
  assert_non_null(e);
  assert_int_equal(e->type, MSGPACK_OBJECT_MAP);
  assert_int_equal(e->via.map.size, 0);
  f = tu_get(&r.o, "fused_per_allreduce");
  assert_non_null(f);
  assert_int_equal(f->via.map.size, 8);
  for (int i = 0; i < 8; i++)
    assert_int_equal(tu_get_u64(f, fuse[i]), 0);
  lat = tu_get(&r.o, "allreduce_latency");
  assert_non_null(lat);
  assert_int_equal(lat->via.map.size, 5);
  assert_int_equal(tu_get_u64(lat, "count"), 0);
  assert_true(tu_get_f64(lat, "p50") == 0.0);
  assert_true(tu_get_f64(lat, "p99") == 0.0);
  assert_true(tu_get_f64(lat, "max") == 0.0);
  assert_int_equal(tu_get_u64(&r.o, "layers"), 0);
  assert_int_equal(tu_get_u64(&r.o, "saved_bytes"), 0);
  assert_int_equal(tu_get_u64(&r.o, "bytes_in"), 0);
  assert_int_equal(tu_get_u64(&r.o, "allreduces"), 0);
  assert_int_equal(tu_get_u64(&r.o, "stalls"), 0);
  tu_reply_free(&r);

  /* Three training forwards, a request without op (BAD_REQUEST), two
   * get_state of an unknown layer, server-side events. */
  reg(w, (reg_t){"bn", "batchnorm", C, 0, {0}, -1, -1}, 0);
  for (uint64_t s = 1; s <= 3; s++)
    fwd(w, 0, s, 1, &d, x, N, NULL);
  tu_body_init(&b);
  msgpack_pack_map(&b.pk, 1);
  tu_key(&b, "id");
  msgpack_pack_uint32(&b.pk, 3);
  EXPECT(w, &b, &r, "BAD_REQUEST");
  tu_reply_free(&r);
  for (int i = 0; i < 2; i++) {
    assert_string_equal(get_state(w, 5, &r), "UNKNOWN_LAYER");
    tu_reply_free(&r);
  }
  svc_worker_note_io(w, 4, 1000, 5, 2000);
  svc_worker_note_io(w, 1, 24, 0, 0);
  svc_worker_note_connection(w);
  svc_worker_note_connection(w);
  svc_worker_note_refusal(w, SVC_TIMEOUT);
  svc_worker_note_refusal(w, SVC_UNAUTHORIZED);

  assert_string_equal(metrics(w, &r), "");
  q = tu_get(&r.o, "requests");
  assert_int_equal(tu_get_u64(q, "forward"), 3);
  assert_int_equal(tu_get_u64(q, "register"), 1);
  assert_int_equal(tu_get_u64(q, "get_state"), 2);
  assert_int_equal(tu_get_u64(q, "metrics"), 2);
  assert_int_equal(tu_get_u64(q, "backward"), 0);
  e = tu_get(&r.o, "errors");
  assert_int_equal(e->via.map.size, 4);
  assert_int_equal(tu_get_u64(e, "BAD_REQUEST"), 1);
  assert_int_equal(tu_get_u64(e, "UNKNOWN_LAYER"), 2);
  assert_int_equal(tu_get_u64(e, "TIMEOUT"), 1);
  assert_int_equal(tu_get_u64(e, "UNAUTHORIZED"), 1);
  assert_int_equal(tu_get_u64(&r.o, "auth_failures"), 1);
  assert_null(tu_get(e, "SHAPE"));
  assert_int_equal(tu_get_u64(&r.o, "frames_in"), 5);
  assert_int_equal(tu_get_u64(&r.o, "bytes_in"), 1024);
  assert_int_equal(tu_get_u64(&r.o, "frames_out"), 5);
  assert_int_equal(tu_get_u64(&r.o, "bytes_out"), 2000);
  assert_int_equal(tu_get_u64(&r.o, "connections"), 2);
  assert_int_equal(tu_get_u64(&r.o, "layers"), 1);
  assert_true(tu_get_u64(&r.o, "saved_bytes") > 0);
  assert_int_equal(tu_get_u64(&r.o, "saved_bytes"), svc_worker_saved_bytes(w));
  tu_reply_free(&r);

  /* Percentiles by nearest rank over the ring: five samples, then more
   * samples than the ring holds (only the last SVC__LAT_RING count). */
  {
    const double five[5] = {0.5, 0.1, 0.4, 0.2, 0.3};
    memcpy(w->m.lat, five, sizeof five);
    w->m.nlat = 5;
    w->m.fuse_hist[0] = 3;
    w->m.fuse_hist[7] = 2;
    w->m.allreduces = 5;
    w->m.entries_fused = 137;
    w->m.gathers = 11;
    w->m.stalls = 4;
    w->m.mismatches = 6;
  }
  assert_string_equal(metrics(w, &r), "");
  lat = tu_get(&r.o, "allreduce_latency");
  assert_int_equal(tu_get_u64(lat, "count"), 5);
  assert_true(tu_get_f64(lat, "p50") == 0.3);
  assert_true(tu_get_f64(lat, "p90") == 0.5);
  assert_true(tu_get_f64(lat, "p99") == 0.5);
  assert_true(tu_get_f64(lat, "max") == 0.5);
  f = tu_get(&r.o, "fused_per_allreduce");
  assert_int_equal(tu_get_u64(f, "1"), 3);
  assert_int_equal(tu_get_u64(f, "2"), 0);
  assert_int_equal(tu_get_u64(f, "65+"), 2);
  assert_int_equal(tu_get_u64(&r.o, "allreduces"), 5);
  assert_int_equal(tu_get_u64(&r.o, "entries_fused"), 137);
  assert_int_equal(tu_get_u64(&r.o, "gathers"), 11);
  assert_int_equal(tu_get_u64(&r.o, "stalls"), 4);
  assert_int_equal(tu_get_u64(&r.o, "mismatches"), 6);
  tu_reply_free(&r);
  for (int i = 0; i < SVC__LAT_RING; i++)
    w->m.lat[i] = (double)((i * 389) % SVC__LAT_RING + 1) * 1e-3;
  w->m.nlat = 3 * SVC__LAT_RING + 17;
  assert_string_equal(metrics(w, &r), "");
  lat = tu_get(&r.o, "allreduce_latency");
  assert_int_equal(tu_get_u64(lat, "count"), 3 * SVC__LAT_RING + 17);
  /* The ring holds 1..1024 ms once each: rank ceil(p * 1024). */
  assert_true(tu_get_f64(lat, "p50") == 512 * 1e-3);
  assert_true(tu_get_f64(lat, "p90") == 922 * 1e-3);
  assert_true(tu_get_f64(lat, "p99") == 1014 * 1e-3);
  assert_true(tu_get_f64(lat, "max") == 1024 * 1e-3);
  tu_reply_free(&r);
  svc_worker_destroy(w);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_get_state_defaults),
      cmocka_unit_test(test_running_stats_after_forward),
      cmocka_unit_test(test_set_state_round_trip),
      cmocka_unit_test(test_set_state_partial),
      cmocka_unit_test(test_set_state_refusals),
      cmocka_unit_test(test_metrics),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
