/* Every error path of the public API returns its exact code and leaves a
 * message in sbn_last_error() that names the offending argument. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "testutil.h"

/* Asserts the code and that the message mentions `token`. The message is
 * cleared first by a call that fails with a different, known message, so a
 * stale message from an earlier failure cannot satisfy the check. */
static void clear_error(void) {
  sbn_op_t op;
  (void)sbn_op_parse("__none__", &op);
}

#define EXPECT_ERR(call, code, token)                                  \
  do {                                                                 \
    clear_error();                                                     \
    int e_rc_ = (call);                                                \
    const char *e_msg_ = sbn_last_error();                             \
    if (e_rc_ != (code))                                               \
      fail_msg("%s: returned %s, expected %s (message: %s)", #call,    \
               sbn_err_name(e_rc_), sbn_err_name(code), e_msg_);       \
    if (e_msg_ == NULL || strlen(e_msg_) == 0 ||                       \
        strstr(e_msg_, (token)) == NULL || strstr(e_msg_, "__none__")) \
      fail_msg("%s: message '%s' does not name '%s'", #call,           \
               e_msg_ ? e_msg_ : "(null)", (token));                   \
  } while (0)

static sbn_layer_params_t params(sbn_op_t op) {
  sbn_layer_params_t p;
  sbn_layer_params_default(&p, op);
  p.channels = 4;
  p.groups = 2;
  p.norm_ndim = 1;
  p.norm_shape[0] = 5;
  return p;
}

static int create(const sbn_layer_params_t *p) {
  sbn_layer_t *l = NULL;
  int rc = sbn_layer_create(p, NULL, &l);
  if (rc == 0)
    sbn_layer_destroy(l);
  return rc;
}

static void test_error_table(void **state) {
  (void)state;
  int codes[] = {
#define XX(name, val, msg) SBN_##name,
      SBN_ERRNO_MAP(XX)
#undef XX
  };
  for (size_t i = 0; i < sizeof codes / sizeof *codes; i++) {
    assert_true(codes[i] < 0);
    assert_non_null(sbn_strerror(codes[i]));
    assert_true(strlen(sbn_strerror(codes[i])) > 0);
    assert_true(strncmp(sbn_err_name(codes[i]), "SBN_E", 5) == 0);
    for (size_t j = 0; j < i; j++)
      assert_true(codes[i] != codes[j]);
  }
  assert_string_equal(sbn_err_name(SBN_EINVAL), "SBN_EINVAL");
  assert_string_equal(sbn_err_name(SBN_ESMALLBATCH), "SBN_ESMALLBATCH");
  assert_non_null(sbn_strerror(-12345));
  assert_non_null(sbn_err_name(-12345));
  sbn_op_t op;
  EXPECT_ERR(sbn_op_parse("batchnrm", &op), SBN_EINVAL, "batchnrm");
  assert_int_equal(sbn_op_parse("groupnorm", &op), 0);
  assert_int_equal(op, SBN_OP_GROUPNORM);
  assert_null(sbn_op_name((sbn_op_t)99));
}

static void test_create_errors(void **state) {
  (void)state;
  sbn_layer_params_t p;
  sbn_layer_t *l = NULL;

  p = params(SBN_OP_GROUPNORM);
  p.groups = 3;
  EXPECT_ERR(create(&p), SBN_EINVAL, "groups");
  p.groups = 0;
  EXPECT_ERR(create(&p), SBN_EINVAL, "groups");
  p = params(SBN_OP_BATCHNORM);
  p.channels = 0;
  EXPECT_ERR(create(&p), SBN_EINVAL, "channels");

  const sbn_op_t norm_ops[] = {SBN_OP_BATCHNORM, SBN_OP_LAYERNORM,
                               SBN_OP_INSTANCENORM, SBN_OP_GROUPNORM};
  const double bad_eps[] = {0.0, -1e-5, NAN, INFINITY, 1e-300, 1e-39};
  for (int o = 0; o < 4; o++)
    for (int i = 0; i < 6; i++) {
      p = params(norm_ops[o]);
      p.eps = bad_eps[i];
      EXPECT_ERR(create(&p), SBN_EINVAL, "eps");
    }
  const double bad_mom[] = {-0.1, 1.0000001, NAN, -INFINITY};
  for (int o = 0; o < 3; o += 2)
    for (int i = 0; i < 4; i++) {
      p = params(norm_ops[o]);
      p.momentum = bad_mom[i];
      EXPECT_ERR(create(&p), SBN_EINVAL, "momentum");
    }
  /* The edges are legal. */
  p = params(SBN_OP_BATCHNORM);
  p.momentum = 0;
  assert_int_equal(create(&p), 0);
  p.momentum = 1;
  assert_int_equal(create(&p), 0);

  const double bad_p[] = {-0.01, 1.01, NAN, INFINITY};
  for (int i = 0; i < 4; i++) {
    p = params(SBN_OP_DROPOUT);
    p.p = bad_p[i];
    EXPECT_ERR(create(&p), SBN_EINVAL, "p");
  }
  p = params(SBN_OP_DROPOUT);
  p.p = 0;
  assert_int_equal(create(&p), 0);
  p.p = 1;
  assert_int_equal(create(&p), 0);

  p = params(SBN_OP_LAYERNORM);
  p.norm_ndim = 0;
  EXPECT_ERR(create(&p), SBN_EINVAL, "norm_ndim");
  p.norm_ndim = SBN_MAX_DIMS + 1;
  EXPECT_ERR(create(&p), SBN_EINVAL, "norm_ndim");
  p.norm_ndim = 2;
  p.norm_shape[1] = 0;
  EXPECT_ERR(create(&p), SBN_EINVAL, "norm_shape");
  p.norm_ndim = 3;
  p.norm_shape[0] = SIZE_MAX / 2;
  p.norm_shape[1] = 3;
  p.norm_shape[2] = 5;
  EXPECT_ERR(create(&p), SBN_EOVERFLOW, "norm_shape");

  p = params(SBN_OP_INSTANCENORM);
  p.cumulative = 1;
  EXPECT_ERR(create(&p), SBN_EINVAL, "cumulative");

  p = params(SBN_OP_BATCHNORM);
  p.op = (sbn_op_t)17;
  EXPECT_ERR(create(&p), SBN_EINVAL, "op");
  p = params(SBN_OP_BATCHNORM);
  EXPECT_ERR(sbn_layer_create(&p, NULL, NULL), SBN_EINVAL, "out");
  EXPECT_ERR(sbn_layer_create(NULL, NULL, &l), SBN_EINVAL, "params");
  assert_null(l);
  static const sbn_comm_vtable_t novt = {NULL, NULL, NULL, NULL, NULL, NULL};
  sbn_comm_t bad = {&novt, 0, 1, 0};
  EXPECT_ERR(sbn_layer_create(&p, &bad, &l), SBN_EINVAL, "comm");
  assert_null(l);
}

static void test_shape_errors(void **state) {
  (void)state;
  sbn_layer_params_t p;
  sbn_layer_t *bn, *ln, *dr, *gn, *in;
  size_t ws, sv;
  p = params(SBN_OP_BATCHNORM);
  bn = tu_layer(&p, NULL);
  p = params(SBN_OP_LAYERNORM);
  ln = tu_layer(&p, NULL);
  p = params(SBN_OP_DROPOUT);
  dr = tu_layer(&p, NULL);
  p = params(SBN_OP_GROUPNORM);
  gn = tu_layer(&p, NULL);
  p = params(SBN_OP_INSTANCENORM);
  in = tu_layer(&p, NULL);

  sbn_tensor_desc_t d =
      tu_desc(SBN_LAYOUT_NCHW, 3, (size_t)2, (size_t)5, (size_t)3);
  EXPECT_ERR(sbn_layer_sizes(bn, &d, &ws, &sv), SBN_ESHAPE, "dims[1]");
  EXPECT_ERR(sbn_layer_sizes(gn, &d, &ws, &sv), SBN_ESHAPE, "dims[1]");
  EXPECT_ERR(sbn_layer_sizes(in, &d, &ws, &sv), SBN_ESHAPE, "dims[1]");
  d = tu_desc(SBN_LAYOUT_NCHW, 1, (size_t)4);
  EXPECT_ERR(sbn_layer_sizes(bn, &d, &ws, &sv), SBN_ESHAPE, "ndim");
  EXPECT_ERR(sbn_layer_sizes(gn, &d, &ws, &sv), SBN_ESHAPE, "ndim");
  d.ndim = 0;
  EXPECT_ERR(sbn_layer_sizes(bn, &d, &ws, &sv), SBN_ESHAPE, "ndim");
  d.ndim = SBN_MAX_DIMS + 1;
  EXPECT_ERR(sbn_layer_sizes(dr, &d, &ws, &sv), SBN_ESHAPE, "ndim");
  EXPECT_ERR(sbn_layer_sizes(bn, NULL, &ws, &sv), SBN_EINVAL, "x_desc");
  EXPECT_ERR(sbn_layer_sizes(NULL, &d, &ws, &sv), SBN_EINVAL, "layer");

  /* LayerNorm: the trailing dims must be the normalized shape. */
  d = tu_desc(SBN_LAYOUT_NCHW, 2, (size_t)3, (size_t)6);
  EXPECT_ERR(sbn_layer_sizes(ln, &d, &ws, &sv), SBN_ESHAPE, "dims[1]");
  sbn_layer_params_t lp = params(SBN_OP_LAYERNORM);
  lp.norm_ndim = 3;
  lp.norm_shape[0] = 2, lp.norm_shape[1] = 3, lp.norm_shape[2] = 4;
  sbn_layer_t *ln3 = tu_layer(&lp, NULL);
  d = tu_desc(SBN_LAYOUT_NCHW, 2, (size_t)3, (size_t)4);
  EXPECT_ERR(sbn_layer_sizes(ln3, &d, &ws, &sv), SBN_ESHAPE, "ndim");
  sbn_layer_destroy(ln3);

  /* NHWC is not a thing for plain arrays. */
  d = tu_desc(SBN_LAYOUT_NHWC, 2, (size_t)3, (size_t)5);
  EXPECT_ERR(sbn_layer_sizes(ln, &d, &ws, &sv), SBN_ESHAPE, "layout");
  EXPECT_ERR(sbn_layer_sizes(dr, &d, &ws, &sv), SBN_ESHAPE, "layout");
  d.layout = (sbn_layout_t)7;
  EXPECT_ERR(sbn_layer_sizes(bn, &d, &ws, &sv), SBN_EINVAL, "layout");

  /* A dims product that overflows size_t. */
  d = tu_desc(SBN_LAYOUT_NCHW, 4, SIZE_MAX / 8, (size_t)4, (size_t)3,
              (size_t)5);
  EXPECT_ERR(sbn_layer_sizes(bn, &d, &ws, &sv), SBN_EOVERFLOW, "dims");
  EXPECT_ERR(sbn_layer_sizes(in, &d, &ws, &sv), SBN_EOVERFLOW, "dims");
  EXPECT_ERR(sbn_layer_sizes(gn, &d, &ws, &sv), SBN_EOVERFLOW, "dims");
  d = tu_desc(SBN_LAYOUT_NCHW, 3, (size_t)1 << 40, (size_t)1 << 30, (size_t)5);
  EXPECT_ERR(sbn_layer_sizes(dr, &d, &ws, &sv), SBN_EOVERFLOW, "dims");
  d = tu_desc(SBN_LAYOUT_NCHW, 3, SIZE_MAX / 3, (size_t)7, (size_t)5);
  EXPECT_ERR(sbn_layer_sizes(ln, &d, &ws, &sv), SBN_EOVERFLOW, "dims");

  /* The same checks guard forward. */
  float x[40] = {0}, y[40];
  sbn_forward_args_t fa;
  memset(&fa, 0, sizeof fa);
  d = tu_desc(SBN_LAYOUT_NCHW, 3, (size_t)2, (size_t)5, (size_t)3);
  fa.x_desc = &d;
  fa.x = x;
  fa.y = y;
  EXPECT_ERR(sbn_forward(bn, &fa), SBN_ESHAPE, "dims[1]");
  EXPECT_ERR(sbn_forward(NULL, &fa), SBN_EINVAL, "layer");
  EXPECT_ERR(sbn_forward(bn, NULL), SBN_EINVAL, "args");
  sbn_backward_args_t ba;
  memset(&ba, 0, sizeof ba);
  ba.x_desc = &d;
  EXPECT_ERR(sbn_backward(bn, &ba), SBN_ESHAPE, "dims[1]");

  sbn_layer_destroy(bn), sbn_layer_destroy(ln), sbn_layer_destroy(dr);
  sbn_layer_destroy(gn), sbn_layer_destroy(in);
}

/* A valid BatchNorm call, broken one argument at a time. */
static void test_buffer_errors(void **state) {
  (void)state;
  sbn_layer_params_t p = params(SBN_OP_BATCHNORM);
  sbn_layer_t *l = tu_layer(&p, NULL);
  sbn_tensor_desc_t d =
      tu_desc(SBN_LAYOUT_NCHW, 3, (size_t)2, (size_t)4, (size_t)3);
  size_t ws, sv;
  assert_int_equal(sbn_layer_sizes(l, &d, &ws, &sv), 0);
  assert_true(ws > 0 && sv > 0);
  void *work = tu_xmalloc(ws), *saved = tu_xmalloc(sv);
  float x[24], y[24], dy[24], dx[24], w[4] = {1, 1, 1, 1}, b[4] = {0}, dw[4],
                                      db[4], rm[4] = {0}, rv[4] = {1, 1, 1, 1};
  for (int i = 0; i < 24; i++)
    x[i] = (float)i, dy[i] = 1.0f / (float)(i + 1);
  sbn_state_t st = {rm, rv, 0};
  sbn_forward_args_t good, fa;
  memset(&good, 0, sizeof good);
  good.mode = SBN_MODE_TRAIN;
  good.x_desc = &d;
  good.x = x;
  good.y = y;
  good.weight = w;
  good.bias = b;
  good.state = &st;
  good.workspace = work;
  good.workspace_bytes = ws;
  good.saved = saved;
  good.saved_bytes = sv;

  fa = good, fa.x = NULL;
  EXPECT_ERR(sbn_forward(l, &fa), SBN_EINVAL, "x");
  fa = good, fa.y = NULL;
  EXPECT_ERR(sbn_forward(l, &fa), SBN_EINVAL, "y");
  fa = good, fa.weight = NULL;
  EXPECT_ERR(sbn_forward(l, &fa), SBN_EINVAL, "weight");
  fa = good, fa.bias = NULL;
  EXPECT_ERR(sbn_forward(l, &fa), SBN_EINVAL, "bias");
  fa = good, fa.state = NULL;
  EXPECT_ERR(sbn_forward(l, &fa), SBN_EINVAL, "state");
  sbn_state_t half = {rm, NULL, 0};
  fa = good, fa.state = &half;
  EXPECT_ERR(sbn_forward(l, &fa), SBN_EINVAL, "state");
  fa = good, fa.workspace = NULL;
  EXPECT_ERR(sbn_forward(l, &fa), SBN_EINVAL, "workspace");
  fa = good, fa.workspace_bytes = ws - 1;
  EXPECT_ERR(sbn_forward(l, &fa), SBN_ENOSPACE, "workspace");
  fa = good, fa.saved_bytes = sv - 1;
  EXPECT_ERR(sbn_forward(l, &fa), SBN_ENOSPACE, "saved");
  fa = good, fa.mode = (sbn_mode_t)5;
  EXPECT_ERR(sbn_forward(l, &fa), SBN_EINVAL, "mode");
  /* None of the failures touched the running state. */
  assert_true(rm[0] == 0 && rv[0] == 1 && st.num_batches_tracked == 0);
  /* The staged API checks the same things. */
  sbn_rec_t recs[4];
  fa = good, fa.workspace_bytes = ws - 1;
  EXPECT_ERR(sbn_bn_forward_local(l, &fa, recs), SBN_ENOSPACE, "workspace");
  EXPECT_ERR(sbn_bn_forward_local(l, &good, NULL), SBN_EINVAL, "recs");

  assert_int_equal(sbn_forward(l, &good), 0);
  sbn_backward_args_t gb, ba;
  memset(&gb, 0, sizeof gb);
  gb.mode = SBN_MODE_TRAIN;
  gb.x_desc = &d;
  gb.x = x;
  gb.dy = dy;
  gb.dx = dx;
  gb.weight = w;
  gb.dweight = dw;
  gb.dbias = db;
  gb.workspace = work;
  gb.workspace_bytes = ws;
  gb.saved = saved;
  gb.saved_bytes = sv;
  ba = gb, ba.dy = NULL;
  EXPECT_ERR(sbn_backward(l, &ba), SBN_EINVAL, "dy");
  ba = gb, ba.dx = NULL;
  EXPECT_ERR(sbn_backward(l, &ba), SBN_EINVAL, "dx");
  ba = gb, ba.x = NULL;
  EXPECT_ERR(sbn_backward(l, &ba), SBN_EINVAL, "x");
  ba = gb, ba.weight = NULL;
  EXPECT_ERR(sbn_backward(l, &ba), SBN_EINVAL, "weight");
  ba = gb, ba.workspace = NULL;
  EXPECT_ERR(sbn_backward(l, &ba), SBN_EINVAL, "workspace");
  ba = gb, ba.workspace_bytes = 1;
  EXPECT_ERR(sbn_backward(l, &ba), SBN_ENOSPACE, "workspace");
  ba = gb, ba.saved = NULL;
  EXPECT_ERR(sbn_backward(l, &ba), SBN_EINVAL, "saved");
  ba = gb, ba.saved_bytes = sv - 1;
  EXPECT_ERR(sbn_backward(l, &ba), SBN_ENOSPACE, "saved");
  ba = gb, ba.mode = SBN_MODE_EVAL;
  EXPECT_ERR(sbn_backward(l, &ba), SBN_ESTATE, "mode");
  ba = gb, ba.mode = (sbn_mode_t)-3;
  EXPECT_ERR(sbn_backward(l, &ba), SBN_EINVAL, "mode");
  assert_int_equal(sbn_backward(l, &gb), 0);

  /* Saved state from another op is refused. */
  sbn_layer_params_t ip = params(SBN_OP_INSTANCENORM);
  ip.affine = 0;
  sbn_layer_t *in = tu_layer(&ip, NULL);
  size_t ws2, sv2;
  assert_int_equal(sbn_layer_sizes(in, &d, &ws2, &sv2), 0);
  void *work2 = tu_xmalloc(ws2 > ws ? ws2 : ws);
  void *saved2 = tu_xmalloc(sv2 > sv ? sv2 : sv);
  memcpy(saved2, saved, sv);
  ba = gb;
  ba.weight = NULL;
  ba.workspace = work2;
  ba.workspace_bytes = ws2 > ws ? ws2 : ws;
  ba.saved = saved2;
  ba.saved_bytes = sv2 > sv ? sv2 : sv;
  EXPECT_ERR(sbn_backward(in, &ba), SBN_ESTATE, "saved");
  sbn_layer_destroy(in);
  free(work2), free(saved2);

  sbn_layer_destroy(l);
  free(work), free(saved);
}

/* Every other op refuses NULL data and small buffers too. */
static void test_other_ops_buffers(void **state) {
  (void)state;
  const sbn_op_t ops[] = {SBN_OP_LAYERNORM, SBN_OP_INSTANCENORM,
                          SBN_OP_GROUPNORM, SBN_OP_DROPOUT};
  for (int o = 0; o < 4; o++) {
    sbn_layer_params_t p = params(ops[o]);
    sbn_layer_t *l = tu_layer(&p, NULL);
    sbn_tensor_desc_t d =
        ops[o] == SBN_OP_LAYERNORM
            ? tu_desc(SBN_LAYOUT_NCHW, 2, (size_t)3, (size_t)5)
            : tu_desc(SBN_LAYOUT_NCHW, 3, (size_t)2, (size_t)4, (size_t)3);
    size_t ws, sv;
    assert_int_equal(sbn_layer_sizes(l, &d, &ws, &sv), 0);
    void *work = tu_xmalloc(ws), *saved = tu_xmalloc(sv);
    float x[24] = {0}, y[24], w[5] = {1, 1, 1, 1, 1}, b[5] = {0};
    sbn_forward_args_t good, fa;
    memset(&good, 0, sizeof good);
    good.x_desc = &d;
    good.x = x;
    good.y = y;
    good.weight = w;
    good.bias = b;
    good.workspace = work;
    good.workspace_bytes = ws;
    good.saved = saved;
    good.saved_bytes = sv;
    for (int i = 0; i < 24; i++)
      x[i] = (float)(i % 7);
    assert_int_equal(sbn_forward(l, &good), 0);
    fa = good, fa.x = NULL;
    EXPECT_ERR(sbn_forward(l, &fa), SBN_EINVAL, "x");
    fa = good, fa.y = NULL;
    EXPECT_ERR(sbn_forward(l, &fa), SBN_EINVAL, "y");
    if (ops[o] != SBN_OP_DROPOUT) {
      fa = good, fa.weight = NULL;
      EXPECT_ERR(sbn_forward(l, &fa), SBN_EINVAL, "weight");
      fa = good, fa.workspace_bytes = ws - 1;
      EXPECT_ERR(sbn_forward(l, &fa), SBN_ENOSPACE, "workspace");
      fa = good, fa.saved_bytes = sv - 1;
      EXPECT_ERR(sbn_forward(l, &fa), SBN_ENOSPACE, "saved");
      sbn_backward_args_t ba;
      memset(&ba, 0, sizeof ba);
      ba.x_desc = &d;
      ba.x = x;
      ba.dy = x;
      ba.dx = y;
      ba.weight = w;
      ba.workspace = work;
      ba.workspace_bytes = ws;
      ba.saved = saved;
      ba.saved_bytes = sv - 1;
      EXPECT_ERR(sbn_backward(l, &ba), SBN_ENOSPACE, "saved");
      ba.saved = NULL;
      ba.saved_bytes = sv;
      EXPECT_ERR(sbn_backward(l, &ba), SBN_EINVAL, "saved");
    }
    sbn_layer_destroy(l);
    free(work), free(saved);
  }
}

/* The op table: every op has a name that parses back to it, the count is
 * not an op, and layer creation refuses values outside the table. */
static void test_op_table(void **state) {
  (void)state;
  for (int i = 0; i < SBN_OP_COUNT; i++) {
    const char *name = sbn_op_name((sbn_op_t)i);
    sbn_op_t op = (sbn_op_t)-1;
    assert_non_null(name);
    assert_int_equal(sbn_op_parse(name, &op), 0);
    assert_int_equal(op, i);
    for (int j = 0; j < i; j++)
      assert_string_not_equal(name, sbn_op_name((sbn_op_t)j));
    /* Each op's defaults (with the shape parameters set) make a layer,
     * and only BatchNorm tracks running statistics by default. */
    sbn_layer_params_t p = params((sbn_op_t)i);
    assert_int_equal(p.op, i);
    assert_int_equal(p.track_running_stats, i == SBN_OP_BATCHNORM);
    assert_int_equal(create(&p), 0);
  }
  assert_null(sbn_op_name(SBN_OP_COUNT));
  assert_null(sbn_op_name((sbn_op_t)-1));
  sbn_op_t op;
  EXPECT_ERR(sbn_op_parse(NULL, &op), SBN_EINVAL, "op");
  EXPECT_ERR(sbn_op_parse("dropout", NULL), SBN_EINVAL, "op");
  sbn_layer_params_t p;
  sbn_layer_params_default(&p, SBN_OP_COUNT);
  assert_int_equal(p.op, SBN_OP_COUNT);
  EXPECT_ERR(create(&p), SBN_EINVAL, "params.op");
  p.op = (sbn_op_t)-1;
  EXPECT_ERR(create(&p), SBN_EINVAL, "params.op");
}

/* What the op rows' flags decide: which ops need running state, weight
 * and the forward input; and the BatchNorm seam's own checks. */
static void test_op_flags(void **state) {
  (void)state;
  sbn_tensor_desc_t d =
      tu_desc(SBN_LAYOUT_NCHW, 3, (size_t)2, (size_t)4, (size_t)3);
  float x[24], y[24], dy[24], dx[24];
  for (int i = 0; i < 24; i++)
    x[i] = (float)i, dy[i] = 1.0f;
  /* InstanceNorm with tracking needs the running state; GroupNorm ignores
   * track_running_stats, so it needs none. */
  const sbn_op_t ops[] = {SBN_OP_INSTANCENORM, SBN_OP_GROUPNORM};
  for (int o = 0; o < 2; o++) {
    sbn_layer_params_t p = params(ops[o]);
    p.affine = 0;
    p.track_running_stats = 1;
    sbn_layer_t *l = tu_layer(&p, NULL);
    size_t ws, sv;
    assert_int_equal(sbn_layer_sizes(l, &d, &ws, &sv), 0);
    void *work = tu_xmalloc(ws), *saved = tu_xmalloc(sv);
    sbn_forward_args_t fa = {SBN_MODE_TRAIN, &d, x,    y,  NULL,  NULL,
                             NULL,           0,  work, ws, saved, sv};
    if (ops[o] == SBN_OP_INSTANCENORM)
      EXPECT_ERR(sbn_forward(l, &fa), SBN_EINVAL, "state");
    else
      assert_int_equal(sbn_forward(l, &fa), 0);
    /* The seam is BatchNorm's only. */
    sbn_rec_t recs[4];
    EXPECT_ERR(sbn_bn_forward_local(l, &fa, recs), SBN_EINVAL, "layer");
    sbn_layer_destroy(l);
    free(work), free(saved);
  }
  /* Dropout's backward reads neither x nor weight. */
  sbn_layer_params_t dp = params(SBN_OP_DROPOUT);
  sbn_layer_t *l = tu_layer(&dp, NULL);
  sbn_backward_args_t ba;
  memset(&ba, 0, sizeof ba);
  ba.mode = SBN_MODE_TRAIN;
  ba.x_desc = &d;
  ba.dy = dy;
  ba.dx = dx;
  assert_int_equal(sbn_backward(l, &ba), 0);
  sbn_layer_destroy(l);
  /* The seam's backward checks the buffers as sbn_backward does. */
  sbn_layer_params_t bp = params(SBN_OP_BATCHNORM);
  l = tu_layer(&bp, NULL);
  size_t ws;
  assert_int_equal(sbn_layer_sizes(l, &d, &ws, NULL), 0);
  void *work = tu_xmalloc(ws);
  sbn_rec_t recs[4];
  ba.x = x;
  ba.workspace = work;
  ba.workspace_bytes = ws;
  EXPECT_ERR(sbn_bn_backward_local(l, &ba, recs), SBN_EINVAL, "weight");
  bp.affine = 0;
  sbn_layer_destroy(l);
  l = tu_layer(&bp, NULL);
  ba.workspace_bytes = ws - 1;
  EXPECT_ERR(sbn_bn_backward_local(l, &ba, recs), SBN_ENOSPACE, "workspace");
  EXPECT_ERR(sbn_bn_backward_finish(l, &ba, recs), SBN_ENOSPACE, "workspace");
  ba.workspace_bytes = ws;
  EXPECT_ERR(sbn_bn_backward_local(l, &ba, recs), SBN_EINVAL, "saved");
  sbn_layer_destroy(l);
  free(work);
}

static void test_misc_errors(void **state) {
  (void)state;
  EXPECT_ERR(sbn_kernel_select("no-such-kernels"), SBN_ENOTSUP,
             "no-such-kernels");
  EXPECT_ERR(sbn_kernel_select(NULL), SBN_EINVAL, "name");
  assert_int_equal(sbn_kernel_select("ref"), 0);
  assert_string_equal(sbn_kernel_name(), "ref");
  size_t n;
  EXPECT_ERR(sbn_desc_numel(NULL, &n), SBN_EINVAL, "x_desc");
  sbn_tensor_desc_t d = tu_desc(SBN_LAYOUT_NCHW, 2, SIZE_MAX, (size_t)2);
  EXPECT_ERR(sbn_desc_numel(&d, &n), SBN_EOVERFLOW, "dims");
  d = tu_desc(SBN_LAYOUT_NCHW, 2, (size_t)0, SIZE_MAX);
  assert_int_equal(sbn_desc_numel(&d, &n), 0);
  assert_int_equal(n, 0);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_error_table),
      cmocka_unit_test(test_create_errors),
      cmocka_unit_test(test_shape_errors),
      cmocka_unit_test(test_buffer_errors),
      cmocka_unit_test(test_other_ops_buffers),
      cmocka_unit_test(test_op_table),
      cmocka_unit_test(test_op_flags),
      cmocka_unit_test(test_misc_errors),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
