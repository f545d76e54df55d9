/* Threaded ops (ops/par.c, sbn_set_threads): with 2 and 3 threads every
 * op gives what it gives on one thread: bit for bit with the reference
 * kernels where the split keeps each element's arithmetic (NCHW, and
 * channels-last rows of more than 1024 channels, split by channel) and
 * for dropout with any set; within rounding where channels-last rows of
 * up to 1024 channels are split into per-thread partial sums, and with
 * the vector sets, whose float block sums follow the call's view. In a
 * build without OpenMP the only thing to check is the refusal. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "testutil.h"

typedef struct par_out_s {
  float *y, *dx, *dw, *db, *rm, *rv;
} par_out_t;

/* One training forward + backward of op on shape d at `threads`. */
static void run_op(sbn_op_t op, const sbn_tensor_desc_t *d, int threads,
                   const float *x, const float *dy, par_out_t *o) {
  size_t n = tu_numel(d), C = d->dims[1];
  sbn_layer_params_t p;
  sbn_layer_params_default(&p, op);
  p.channels = C;
  p.groups = op == SBN_OP_GROUPNORM ? 4 : 1;
  p.p = 0.3;
  sbn_layer_t *l = tu_layer(&p, NULL);
  float *w = tu_floats(C), *b = tu_floats(C);
  for (size_t c = 0; c < C; c++) {
    w[c] = 1.0f + 0.01f * (float)c;
    b[c] = 0.5f - 0.02f * (float)c;
  }
  o->y = tu_floats(n);
  o->dx = tu_floats(n);
  o->dw = tu_floats(C);
  o->db = tu_floats(C);
  o->rm = tu_floats(C);
  o->rv = tu_floats(C);
  for (size_t c = 0; c < C; c++) {
    o->rm[c] = 0.0f;
    o->rv[c] = 1.0f;
  }
  sbn_state_t st = {o->rm, o->rv, 0};
  tu_run_t r = {SBN_MODE_TRAIN, d,     x,     w,     b,   dy,
                o->y,           o->dx, o->dw, o->db, &st, 3};
  if (op == SBN_OP_DROPOUT) {
    r.w = r.b = NULL;
    r.dw = r.db = NULL;
  }
  assert_int_equal(sbn_set_threads(threads), 0);
  int stage = -1, rc = tu_run(l, &r, &stage);
  if (rc != 0)
    fail_msg("%s stage %d: %s", sbn_op_name(op), stage, sbn_last_error());
  assert_int_equal(sbn_set_threads(1), 0);
  sbn_layer_destroy(l);
  free(w);
  free(b);
}

static void out_free(par_out_t *o) {
  free(o->y);
  free(o->dx);
  free(o->dw);
  free(o->db);
  free(o->rm);
  free(o->rv);
}

/* The case being compared, for failure messages. */
static char par_case[128];

static void same(const float *a, const float *b, size_t n, int bitwise,
                 double tol, const char *what) {
  if (bitwise) {
    if (memcmp(a, b, n * sizeof *a) != 0)
      fail_msg("%s: %s differs from one thread", par_case, what);
  } else {
    double e = tu_rel_l2_ff(a, b, n);
    if (!(e <= tol))
      fail_msg("%s: %s: relative error %.3g against one thread", par_case, what,
               e);
  }
}

/* Every op and layout at 2 and 3 threads against 1, on shapes with fewer
 * rows than threads, odd sizes and short and long channels-last rows. */
static void test_threads_match_one(void **state) {
  (void)state;
  if (sbn_set_threads(2) == SBN_ENOTSUP)
    skip();
  assert_int_equal(sbn_set_threads(1), 0);
  static const sbn_op_t ops[] = {SBN_OP_BATCHNORM, SBN_OP_INSTANCENORM,
                                 SBN_OP_GROUPNORM, SBN_OP_DROPOUT};
  static const size_t shapes[][4] = {
      {1, 8, 5, 7}, {3, 12, 9, 11}, {4, 256, 6, 5}, {2, 2000, 3, 1}};
  tu_rng_t rng;
  tu_rng_seed(&rng, 42);
  for (int kset = 0; kset < 2; kset++) {
    if (tu_kernel_use(kset == 0 ? "ref" : "avx2") != 0)
      continue;
    for (size_t si = 0; si < 4; si++)
      for (int lay = 0; lay < 2; lay++) {
        const size_t *s = shapes[si];
        sbn_tensor_desc_t d = tu_desc(lay ? SBN_LAYOUT_NHWC : SBN_LAYOUT_NCHW,
                                      4, s[0], s[1], s[2], s[3]);
        size_t n = tu_numel(&d);
        float *x = tu_floats(n), *dy = tu_floats(n);
        tu_fill_normal(&rng, x, n, 3.0, 2.0);
        tu_fill_normal(&rng, dy, n, 0.0, 1.0);
        /* Dropout takes plain C-order arrays only. */
        for (size_t oi = 0; oi < (lay ? 3u : 4u); oi++) {
          /* With the reference kernels only the row split of
           * channels-last rows reassociates. The vector sets may add float
           * block sums (kernels/sbn_kernels.h), whose blocks follow the
           * call's view, so a split call rounds differently there. */
          int bitwise = kset == 0 && (!lay || s[1] > 1024);
          par_out_t one, many;
          run_op(ops[oi], &d, 1, x, dy, &one);
          for (int t = 2; t <= 3; t++) {
            snprintf(par_case, sizeof par_case, "%s %s %zux%zux%zux%zu %s t=%d",
                     sbn_op_name(ops[oi]), lay ? "nhwc" : "nchw", s[0], s[1],
                     s[2], s[3], sbn_kernel_name(), t);
            run_op(ops[oi], &d, t, x, dy, &many);
            int bw = bitwise || ops[oi] == SBN_OP_DROPOUT;
            same(many.y, one.y, n, bw, 1e-6, "y");
            same(many.dx, one.dx, n, bw, 1e-5, "dx");
            if (ops[oi] != SBN_OP_DROPOUT) {
              same(many.dw, one.dw, s[1], bw, 1e-5, "dweight");
              same(many.db, one.db, s[1], bw, 1e-6, "dbias");
            }
            if (ops[oi] == SBN_OP_BATCHNORM)
              same(many.rv, one.rv, s[1], bw, 1e-6, "running_var");
            out_free(&many);
          }
          out_free(&one);
        }
        free(x);
        free(dy);
      }
  }
  assert_int_equal(tu_kernel_use("ref"), 0);
}

/* The thread count's own checks: at least 1, and more than 1 only in an
 * OpenMP build. */
static void test_set_threads_errors(void **state) {
  (void)state;
  assert_int_equal(sbn_set_threads(0), SBN_EINVAL);
  assert_non_null(strstr(sbn_last_error(), "threads"));
  assert_int_equal(sbn_set_threads(-3), SBN_EINVAL);
  int rc = sbn_set_threads(4);
  if (rc == SBN_ENOTSUP) {
    assert_non_null(strstr(sbn_last_error(), "SBN_OPENMP"));
    assert_int_equal(sbn_threads(), 1);
  } else {
    assert_int_equal(rc, 0);
    assert_int_equal(sbn_threads(), 4);
  }
  assert_int_equal(sbn_set_threads(1), 0);
  assert_int_equal(sbn_threads(), 1);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_set_threads_errors),
      cmocka_unit_test(test_threads_match_one),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
