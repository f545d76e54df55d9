/* GroupNorm against the float64 reference: G groups of C/G channels per
 * sample, per-channel affine, NCHW and NHWC, G = 1 and G = C, odd shapes,
 * large means, constant groups, NaN isolation per (sample, group), on
 * every kernel set. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "ref64.h"
#include "testutil.h"

#define TOL_Y 1e-5
#define TOL_DX 1e-4

static sbn_layer_t *gn_layer(size_t C, size_t G, int affine) {
  sbn_layer_params_t p;
  sbn_layer_params_default(&p, SBN_OP_GROUPNORM);
  p.channels = C;
  p.groups = G;
  p.affine = affine;
  return tu_layer(&p, NULL);
}

static void run_case(const sbn_tensor_desc_t *d, size_t G, int affine,
                     sbn_mode_t mode, double xmean, double xstd,
                     const char *kset, uint64_t seed) {
  size_t N, C, S, n;
  ref64_ncs(d, &N, &C, &S);
  n = N * C * S;
  tu_rng_t rng;
  tu_rng_seed(&rng, seed);
  float *x = tu_floats(n), *dy = tu_floats(n), *y = tu_floats(n),
        *dx = tu_floats(n);
  float *w = tu_floats(C), *b = tu_floats(C), *dw = tu_floats(C),
        *db = tu_floats(C);
  tu_fill_normal(&rng, x, n, xmean, xstd);
  tu_fill_normal(&rng, dy, n, 0, 1);
  tu_fill_normal(&rng, w, C, 1, 0.5);
  tu_fill_normal(&rng, b, C, 0, 0.5);
  double *xd = tu_to_double(x, n), *dyd = tu_to_double(dy, n);
  double *wd = tu_to_double(w, C), *bd = tu_to_double(b, C);
  double *yr = tu_doubles(n), *dxr = tu_doubles(n), *dwr = tu_doubles(C),
         *dbr = tu_doubles(C);
  char what[160];
  snprintf(what, sizeof what,
           "gn[%s] %s N=%zu C=%zu S=%zu ndim=%d G=%zu affine=%d mean=%g", kset,
           d->layout == SBN_LAYOUT_NHWC ? "NHWC" : "NCHW", N, C, S, d->ndim, G,
           affine, xmean);
  sbn_layer_t *l = gn_layer(C, G, affine);
  tu_run_t r = {mode, d, x,  affine ? w : NULL,  affine ? b : NULL,
                dy,   y, dx, affine ? dw : NULL, affine ? db : NULL,
                NULL, 0};
  int stage, rc = tu_run(l, &r, &stage);
  if (rc != 0)
    fail_msg("%s: stage %d: %s (%s)", what, stage, sbn_err_name(rc),
             sbn_last_error());
  ref64_gn_forward(d, G, xd, yr, affine ? wd : NULL, affine ? bd : NULL, 1e-5);
  ref64_gn_backward(d, G, xd, dyd, dxr, affine ? wd : NULL, dwr, dbr, 1e-5);
  double e = tu_rel_l2(y, yr, n);
  tu_err_note("gn.y", e);
  TU_ASSERT_REL(e, TOL_Y, "%s y", what);
  e = tu_rel_l2(dx, dxr, n);
  if ((C / G) * S == 1) {
    /* One element per group: dx = 0 exactly, as the difference of terms
     * of size |w dy| / sqrt(eps); measure against that size. */
    double num = 0, den = 0;
    for (size_t i = 0; i < N; i++)
      for (size_t c = 0; c < C; c++) {
        size_t o = ref64_index(d, i, c, 0);
        double t = dyd[o] * (affine ? wd[c] : 1.0) / sqrt(1e-5);
        num += ((double)dx[o] - dxr[o]) * ((double)dx[o] - dxr[o]);
        den += t * t;
      }
    e = den > 0 ? sqrt(num / den) : sqrt(num);
    if (tu_count_nonfinite(dx, n) != 0)
      e = INFINITY;
  }
  tu_err_note("gn.dx", e);
  TU_ASSERT_REL(e, TOL_DX, "%s dx", what);
  if (affine) {
    e = tu_rel_l2(dw, dwr, C);
    tu_err_note("gn.dweight", e);
    TU_ASSERT_REL(e, TOL_DX, "%s dweight", what);
    e = tu_rel_l2(db, dbr, C);
    tu_err_note("gn.dbias", e);
    TU_ASSERT_REL(e, TOL_Y, "%s dbias", what);
  }
  sbn_layer_destroy(l);
  free(x), free(dy), free(y), free(dx), free(w), free(b), free(dw), free(db);
  free(xd), free(dyd), free(wd), free(bd), free(yr), free(dxr), free(dwr);
  free(dbr);
}

static void test_gn_vs_reference(void **state) {
  (void)state;
  const char *const *sets;
  int nsets = tu_kernel_sets(&sets);
  uint64_t seed = 1;
  for (int ks = 0; ks < nsets; ks++) {
    if (tu_kernel_use(sets[ks]))
      continue;
    for (int lay = 0; lay < 2; lay++) {
      sbn_layout_t L = (sbn_layout_t)lay;
      struct {
        sbn_tensor_desc_t d;
        size_t G;
      } cases[] = {
          {tu_desc(L, 4, (size_t)2, (size_t)6, (size_t)5, (size_t)5), 3},
          {tu_desc(L, 3, (size_t)1, (size_t)17, (size_t)9), 17},
          {tu_desc(L, 3, (size_t)1, (size_t)17, (size_t)9), 1},
          {tu_desc(L, 3, (size_t)3, (size_t)16, (size_t)7), 4},
          {tu_desc(L, 2, (size_t)2, (size_t)6), 2},
          {tu_desc(L, 2, (size_t)3, (size_t)5), 5},
          {tu_desc(L, 5, (size_t)2, (size_t)6, (size_t)3, (size_t)4, (size_t)5),
           2},
          {tu_desc(L, 4, (size_t)1, (size_t)35, (size_t)3, (size_t)3), 7},
          {tu_desc(L, 4, (size_t)2, (size_t)3, (size_t)1, (size_t)1), 1},
          {tu_desc(L, 3, (size_t)2, (size_t)32, (size_t)33), 8},
          /* A sample of 400 KiB: NCHW takes it in blocks of groups that
           * fit the L2 budget (5 groups, then 3). */
          {tu_desc(L, 4, (size_t)2, (size_t)64, (size_t)40, (size_t)40), 8},
          /* One group of odd C: channels-last moments take the sample as
           * one run of 27200 values (ops/chan.c). */
          {tu_desc(L, 4, (size_t)2, (size_t)17, (size_t)40, (size_t)40), 1},
      };
      for (size_t i = 0; i < sizeof cases / sizeof *cases; i++)
        for (int affine = 0; affine < 2; affine++)
          for (int mode = 0; mode < 2; mode++)
            run_case(&cases[i].d, cases[i].G, affine, (sbn_mode_t)mode, 0.5,
                     2.0, sets[ks], seed++);
      run_case(&cases[0].d, 3, 1, SBN_MODE_TRAIN, 1e4, 1.0, sets[ks], seed++);
      run_case(&cases[3].d, 4, 1, SBN_MODE_TRAIN, 1e4, 2.0, sets[ks], seed++);
      run_case(&cases[11].d, 1, 1, SBN_MODE_TRAIN, 1e4, 1.0, sets[ks], seed++);
      /* Groups of 3 and of 1000 channels over three samples at mean 1e4
       * (the channels-last fused forward; see instancenorm_test.c). */
      sbn_tensor_desc_t wide =
          tu_desc(L, 4, (size_t)3, (size_t)96, (size_t)10, (size_t)10);
      run_case(&wide, 32, 1, SBN_MODE_TRAIN, 1e4, 1.0, sets[ks], seed++);
      wide = tu_desc(L, 4, (size_t)3, (size_t)2000, (size_t)7, (size_t)7);
      run_case(&wide, 2, 1, SBN_MODE_TRAIN, 1e4, 2.0, sets[ks], seed++);
      /* Groups of 16 and 32 channels of 7x7: the NCHW backward's
       * 16-channel chunks of a group, at mean 1e4. */
      sbn_tensor_desc_t g16 =
          tu_desc(L, 4, (size_t)2, (size_t)64, (size_t)7, (size_t)7);
      run_case(&g16, 4, 1, SBN_MODE_TRAIN, 1e4, 1.0, sets[ks], seed++);
      run_case(&g16, 2, 0, SBN_MODE_TRAIN, 1e4, 2.0, sets[ks], seed++);
      /* The channels-last fused backward (kernels_avx512_clbwd.c) at mean
       * 1e4: two groups of 1024 channels over 5x7 (286 KiB samples, the
       * largest it takes, dx streamed), and 17 groups of 3 channels over
       * 11x11 (rows of 51: a masked last vector per row). */
      wide = tu_desc(L, 4, (size_t)3, (size_t)2048, (size_t)5, (size_t)7);
      run_case(&wide, 2, 1, SBN_MODE_TRAIN, 1e4, 1.0, sets[ks], seed++);
      wide = tu_desc(L, 4, (size_t)3, (size_t)51, (size_t)11, (size_t)11);
      run_case(&wide, 17, 1, SBN_MODE_TRAIN, 1e4, 2.0, sets[ks], seed++);
    }
  }
  sbn_kernel_select("ref");
}

/* Constant groups give y = bias; a NaN in one (sample, group) stays in it. */
static void test_gn_constant_and_nan(void **state) {
  (void)state;
  const size_t N = 2, C = 12, S = 7, G = 4, n = N * C * S;
  const char *const *sets;
  int nsets = tu_kernel_sets(&sets);
  for (int ks = 0; ks < nsets; ks++) {
    if (tu_kernel_use(sets[ks]))
      continue;
    for (int lay = 0; lay < 2; lay++) {
      sbn_tensor_desc_t d = tu_desc((sbn_layout_t)lay, 3, N, C, S);
      tu_rng_t rng;
      tu_rng_seed(&rng, 23);
      float *x = tu_floats(n), *dy = tu_floats(n), *y = tu_floats(n),
            *dx = tu_floats(n), *w = tu_floats(C), *b = tu_floats(C),
            *dw = tu_floats(C), *db = tu_floats(C);
      tu_fill_normal(&rng, x, n, 0, 1);
      tu_fill_normal(&rng, dy, n, 0, 1);
      tu_fill_normal(&rng, w, C, 1, 0.2);
      tu_fill_normal(&rng, b, C, 0, 1);
      /* Group 1 of sample 0 (channels 3..5) constant. */
      for (size_t c = 3; c < 6; c++)
        for (size_t s = 0; s < S; s++)
          x[ref64_index(&d, 0, c, s)] = 3.75f;
      sbn_layer_t *l = gn_layer(C, G, 1);
      tu_run_t r = {SBN_MODE_TRAIN, &d, x, w, b, dy, y, dx, dw, db, NULL, 0};
      TU_ASSERT_RC(tu_run(l, &r, NULL), 0);
      for (size_t c = 3; c < 6; c++)
        for (size_t s = 0; s < S; s++)
          assert_true(y[ref64_index(&d, 0, c, s)] == b[c]);
      assert_int_equal(tu_count_nonfinite(y, n), 0);
      assert_int_equal(tu_count_nonfinite(dx, n), 0);
      /* NaN in sample 1, channel 10 (group 3). */
      x[ref64_index(&d, 1, 10, 2)] = NAN;
      TU_ASSERT_RC(tu_run(l, &r, NULL), 0);
      for (size_t i = 0; i < N; i++)
        for (size_t c = 0; c < C; c++)
          for (size_t s = 0; s < S; s++) {
            size_t o = ref64_index(&d, i, c, s);
            if (i == 1 && c / (C / G) == 3) {
              if (!isnan(y[o]) || !isnan(dx[o]))
                fail_msg("[%s] NaN group has finite y/dx at c=%zu", sets[ks],
                         c);
            } else if (!isfinite(y[o]) || !isfinite(dx[o])) {
              fail_msg("[%s] NaN leaked into sample %zu channel %zu", sets[ks],
                       i, c);
            }
          }
      sbn_layer_destroy(l);
      free(x), free(dy), free(y), free(dx), free(w), free(b), free(dw),
          free(db);
    }
  }
  sbn_kernel_select("ref");
}

static void test_gn_empty(void **state) {
  (void)state;
  sbn_tensor_desc_t d =
      tu_desc(SBN_LAYOUT_NHWC, 3, (size_t)0, (size_t)6, (size_t)4);
  float w[6] = {1, 1, 1, 1, 1, 1}, b[6] = {0}, dw[6], db[6];
  float buf[1] = {0}, buf2[1] = {0};
  for (int c = 0; c < 6; c++)
    dw[c] = db[c] = 9;
  sbn_layer_t *l = gn_layer(6, 3, 1);
  tu_run_t r = {SBN_MODE_TRAIN, &d,   buf, w,  b,    buf,
                buf2,           buf2, dw,  db, NULL, 0};
  TU_ASSERT_RC(tu_run(l, &r, NULL), 0);
  for (int c = 0; c < 6; c++)
    assert_true(dw[c] == 0 && db[c] == 0);
  sbn_layer_destroy(l);
}

static int report(void **state) {
  (void)state;
  tu_err_report("groupnorm");
  return 0;
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_gn_vs_reference),
      cmocka_unit_test(test_gn_constant_and_nan),
      cmocka_unit_test(test_gn_empty),
  };
  return cmocka_run_group_tests(tests, NULL, report);
}
