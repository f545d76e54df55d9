/* The reply path without tensor copies (src/svc/worker/svc_shm_req.c,
 * svc_cmd_step.c, src/svc/proto/svc_encode.c), without sockets: a
 * full-tensor forward or backward answered through
 * svc_worker_handle_frame() carries y or dx as the frame's tail, left in
 * the buffer the kernel wrote, and the frame's bytes, put together, equal
 * what the copying encoder makes of the same result computed in process;
 * eval forwards and backwards are computed in their input's buffer; and
 * metrics counts one tensor copy per request (x or dy out of the frame)
 * where the copying reply path counts two. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <msgpack.h>

#include "svc_codec.h"
#include "svc_testutil.h"
#include "svc_worker.h"
#include "syncbn.h"

enum { NB = 2, C = 3, HW = 5, N = NB * C * HW };

static svc_worker_t *worker(void) {
  svc_worker_config_t cfg;
  svc_worker_t *w = NULL;
  svc_worker_config_default(&cfg);
  assert_int_equal(svc_worker_create(&cfg, &w), 0);
  return w;
}

/* Runs b through the frame entry point and returns the reply frame. */
static svc_frame_t run_frame(svc_worker_t *w, tu_body_t *b) {
  svc_frame_t f;
  int close_after = 0, deferred = 0;
  assert_int_equal(
      svc_worker_handle_frame(w, (const uint8_t *)b->sb.data, b->sb.size, NULL,
                              &f, &close_after, &deferred),
      0);
  msgpack_sbuffer_destroy(&b->sb);
  assert_false(deferred);
  assert_false(close_after);
  return f;
}

static void reg_bn(svc_worker_t *w) {
  tu_body_t b;
  tu_reply_t r;
  tu_register_head(&b, 1, "bn", "batchnorm");
  tu_key(&b, "channels");
  msgpack_pack_uint32(&b.pk, C);
  assert_string_equal(tu_run(w, &b, &r), "");
  tu_reply_free(&r);
}

/* A forward (train or eval) or backward request of layer 0, step 1, id 7,
 * carrying t (x or dy). */
static void step_body(tu_body_t *b, const char *op, int train,
                      const sbn_tensor_desc_t *d, const float *t) {
  int fwd = strcmp(op, "forward") == 0;
  tu_body_init(b);
  msgpack_pack_map(&b->pk, fwd ? 6 : 5);
  tu_key(b, "op");
  tu_key(b, op);
  tu_key(b, "id");
  msgpack_pack_uint32(&b->pk, 7);
  tu_key(b, "layer");
  msgpack_pack_uint32(&b->pk, 0);
  tu_key(b, "step");
  msgpack_pack_uint32(&b->pk, 1);
  if (fwd) {
    tu_key(b, "train");
    tu_boolean(b, train);
  }
  tu_key(b, fwd ? "x" : "dy");
  tu_tensor(b, "f32", d->ndim, d->dims, NULL, t, N * sizeof(float));
}

/* The worker's copy and zero-copy counters. */
static void counters(svc_worker_t *w, uint64_t *copies, uint64_t *in_place,
                     uint64_t *zero_copy) {
  tu_body_t b;
  tu_reply_t r;
  tu_body_init(&b);
  msgpack_pack_map(&b.pk, 2);
  tu_key(&b, "op");
  tu_key(&b, "metrics");
  tu_key(&b, "id");
  msgpack_pack_uint32(&b.pk, 2);
  assert_string_equal(tu_run(w, &b, &r), "");
  *copies = tu_get_u64(&r.o, "tensor_copies");
  *in_place = tu_get_u64(&r.o, "in_place");
  *zero_copy = tu_get_u64(&r.o, "zero_copy_replies");
  tu_reply_free(&r);
}

/* f is in pieces, its tail numel floats, and put together it is exactly
 * want[0..want_len). */
static void expect_frame(svc_frame_t *f, const uint8_t *want, size_t want_len) {
  assert_non_null(f->tail);
  assert_int_equal(f->tail_len, N * sizeof(float));
  assert_true(f->at <= f->len);
  assert_int_equal(svc_frame_bytes(f), want_len);
  assert_int_equal(svc_frame_flatten(f), 0);
  assert_null(f->tail);
  assert_int_equal(f->len, want_len);
  assert_memory_equal(f->buf, want, want_len);
  svc_frame_free(f);
}

/* The same three steps in process: eval forward, train forward, backward
 * of a BatchNorm with PyTorch's initial state. The replies are encoded by
 * the copying encoders into want_*. */
typedef struct ref_s {
  uint8_t *eval, *train, *bwd;
  size_t eval_len, train_len, bwd_len;
} ref_t;

static void reference(const sbn_tensor_desc_t *d, const float *x,
                      const float *dy, ref_t *out) {
  sbn_layer_params_t p;
  sbn_layer_t *l = NULL;
  float y[N], dx[N], wgt[C], bias[C], rm[C], rv[C], dw[C], db[C];
  sbn_state_t st = {rm, rv, 0};
  sbn_tensor_desc_t wbd = {1, {C}, SBN_LAYOUT_NCHW};
  sbn_forward_args_t fa;
  sbn_backward_args_t ba;
  size_t ws_bytes = 0, sv_bytes = 0;
  void *ws, *sv;
  svc_id_t id = {1, 0, 7, 0};
  for (int c = 0; c < C; c++)
    wgt[c] = 1, bias[c] = 0, rm[c] = 0, rv[c] = 1;
  sbn_layer_params_default(&p, SBN_OP_BATCHNORM);
  p.channels = C;
  assert_int_equal(sbn_layer_create(&p, NULL, &l), 0);
  assert_int_equal(sbn_layer_sizes(l, d, &ws_bytes, &sv_bytes), 0);
  ws = malloc(ws_bytes + 1);
  sv = malloc(sv_bytes + 1);
  memset(&fa, 0, sizeof fa);
  fa.mode = SBN_MODE_EVAL;
  fa.x_desc = d;
  fa.x = x;
  fa.y = y;
  fa.weight = wgt;
  fa.bias = bias;
  fa.state = &st;
  fa.workspace = ws;
  fa.workspace_bytes = ws_bytes;
  assert_int_equal(sbn_forward(l, &fa), 0);
  assert_int_equal(svc_encode_forward(&id, d, y, N, &out->eval, &out->eval_len),
                   0);
  fa.mode = SBN_MODE_TRAIN;
  fa.step = 1;
  fa.saved = sv;
  fa.saved_bytes = sv_bytes;
  assert_int_equal(sbn_forward(l, &fa), 0);
  assert_int_equal(
      svc_encode_forward(&id, d, y, N, &out->train, &out->train_len), 0);
  memset(&ba, 0, sizeof ba);
  ba.mode = SBN_MODE_TRAIN;
  ba.x_desc = d;
  ba.x = x;
  ba.dy = dy;
  ba.dx = dx;
  ba.weight = wgt;
  ba.dweight = dw;
  ba.dbias = db;
  ba.step = 1;
  ba.workspace = ws;
  ba.workspace_bytes = ws_bytes;
  ba.saved = sv;
  ba.saved_bytes = sv_bytes;
  assert_int_equal(sbn_backward(l, &ba), 0);
  assert_int_equal(svc_encode_backward(&id, d, dx, N, dw, db, &wbd, C,
                                       &out->bwd, &out->bwd_len),
                   0);
  free(ws);
  free(sv);
  sbn_layer_destroy(l);
}

static void test_replies_without_copies(void **st) {
  sbn_tensor_desc_t d = {3, {NB, C, HW}, SBN_LAYOUT_NCHW};
  float x[N], dy[N];
  svc_worker_t *w = worker();
  uint64_t copies, in_place, zero;
  ref_t ref;
  tu_body_t b;
  svc_frame_t f;
  (void)st;
  for (int i = 0; i < N; i++) {
    x[i] = (float)((i * 7) % 11) - 4.5f;
    dy[i] = (float)((i * 5) % 9) * 0.25f - 1.0f;
  }
  reference(&d, x, dy, &ref);
  reg_bn(w);

  /* Eval forward: y in x's buffer, the reply from it. One copy: x out of
   * the frame. */
  step_body(&b, "forward", 0, &d, x);
  f = run_frame(w, &b);
  expect_frame(&f, ref.eval, ref.eval_len);
  counters(w, &copies, &in_place, &zero);
  assert_int_equal(copies, 1);
  assert_int_equal(in_place, 1);
  assert_int_equal(zero, 1);

  /* Training forward: x is kept for backward, so y has its own buffer;
   * still no copy on the way out. */
  step_body(&b, "forward", 1, &d, x);
  f = run_frame(w, &b);
  expect_frame(&f, ref.train, ref.train_len);
  counters(w, &copies, &in_place, &zero);
  assert_int_equal(copies, 2);
  assert_int_equal(in_place, 1);
  assert_int_equal(zero, 2);

  /* Backward: dx in dy's buffer. */
  step_body(&b, "backward", 0, &d, dy);
  f = run_frame(w, &b);
  expect_frame(&f, ref.bwd, ref.bwd_len);
  counters(w, &copies, &in_place, &zero);
  assert_int_equal(copies, 3);
  assert_int_equal(in_place, 2);
  assert_int_equal(zero, 3);

  /* The copying entry point (one buffer) pays the second copy, and its
   * bytes equal the frame's (the running statistics moved with the
   * training forward: ref.eval no longer applies). */
  step_body(&b, "forward", 0, &d, x);
  {
    uint8_t *buf = NULL;
    size_t len = 0;
    int close_after = 0;
    assert_int_equal(svc_worker_handle(w, (const uint8_t *)b.sb.data, b.sb.size,
                                       &buf, &len, &close_after),
                     0);
    msgpack_sbuffer_destroy(&b.sb);
    counters(w, &copies, &in_place, &zero);
    assert_int_equal(copies, 5);
    step_body(&b, "forward", 0, &d, x);
    f = run_frame(w, &b);
    expect_frame(&f, buf, len);
    free(buf);
  }
  counters(w, &copies, &in_place, &zero);
  assert_int_equal(copies, 6);
  assert_int_equal(in_place, 4);
  assert_int_equal(zero, 5);
  free(ref.eval);
  free(ref.train);
  free(ref.bwd);
  svc_worker_destroy(w);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_replies_without_copies),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
