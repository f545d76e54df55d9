/* InstanceNorm against the float64 reference: per (sample, channel)
 * statistics, optional running statistics (batch mean of the per-instance
 * means and unbiased variances), eval with and without them, NCHW and
 * NHWC, odd shapes, large means, constant instances, NaN isolation and the
 * one-spatial-element error, on every kernel set. */
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

typedef struct {
  sbn_tensor_desc_t d;
  int affine, track;
  double momentum;
  sbn_mode_t mode;
  double xmean, xstd;
} in_case_t;

static sbn_layer_t *in_layer(size_t C, int affine, int track, double mom) {
  sbn_layer_params_t p;
  sbn_layer_params_default(&p, SBN_OP_INSTANCENORM);
  p.channels = C;
  p.affine = affine;
  p.track_running_stats = track;
  p.momentum = mom;
  return tu_layer(&p, NULL);
}

static void run_case(const in_case_t *k, const char *kset, uint64_t seed) {
  size_t N, C, S, n;
  ref64_ncs(&k->d, &N, &C, &S);
  n = N * C * S;
  tu_rng_t rng;
  tu_rng_seed(&rng, seed);
  float *x = tu_floats(n), *dy = tu_floats(n), *y = tu_floats(n),
        *dx = tu_floats(n);
  float *w = tu_floats(C), *b = tu_floats(C), *dw = tu_floats(C),
        *db = tu_floats(C), *rm = tu_floats(C), *rv = tu_floats(C);
  tu_fill_normal(&rng, x, n, k->xmean, k->xstd);
  tu_fill_normal(&rng, dy, n, 0, 1);
  tu_fill_normal(&rng, w, C, 1, 0.5);
  tu_fill_normal(&rng, b, C, 0, 0.5);
  for (size_t c = 0; c < C; c++) {
    rm[c] = (float)(0.3 * tu_rng_normal(&rng));
    rv[c] = (float)(0.5 + tu_rng_uniform(&rng));
  }
  double *xd = tu_to_double(x, n), *dyd = tu_to_double(dy, n);
  double *wd = tu_to_double(w, C), *bd = tu_to_double(b, C);
  double *rmd = tu_to_double(rm, C), *rvd = tu_to_double(rv, C);
  double *rm0 = tu_to_double(rm, C), *rv0 = tu_to_double(rv, C);
  double *yr = tu_doubles(n), *dxr = tu_doubles(n), *dwr = tu_doubles(C),
         *dbr = tu_doubles(C);
  char what[160];
  snprintf(what, sizeof what,
           "in[%s] %s N=%zu C=%zu S=%zu ndim=%d %s affine=%d track=%d mean=%g",
           kset, k->d.layout == SBN_LAYOUT_NHWC ? "NHWC" : "NCHW", N, C, S,
           k->d.ndim, k->mode == SBN_MODE_TRAIN ? "train" : "eval", k->affine,
           k->track, k->xmean);
  sbn_layer_t *l = in_layer(C, k->affine, k->track, k->momentum);
  sbn_state_t st = {rm, rv, 0};
  tu_run_t r = {k->mode,
                &k->d,
                x,
                k->affine ? w : NULL,
                k->affine ? b : NULL,
                dy,
                y,
                dx,
                k->affine ? dw : NULL,
                k->affine ? db : NULL,
                k->track ? &st : NULL,
                0};
  int stage, rc = tu_run(l, &r, &stage);
  if (rc != 0)
    fail_msg("%s: stage %d: %s (%s)", what, stage, sbn_err_name(rc),
             sbn_last_error());
  int train = k->mode == SBN_MODE_TRAIN;
  ref64_in_forward(&k->d, xd, yr, k->affine ? wd : NULL, k->affine ? bd : NULL,
                   k->track ? rmd : NULL, k->track ? rvd : NULL, 1e-5,
                   k->momentum, train);
  ref64_in_backward(&k->d, xd, dyd, dxr, k->affine ? wd : NULL, dwr, dbr,
                    k->track ? rm0 : NULL, k->track ? rv0 : NULL, 1e-5, train);
  double e = tu_rel_l2(y, yr, n);
  tu_err_note("in.y", e);
  TU_ASSERT_REL(e, TOL_Y, "%s y", what);
  e = tu_rel_l2(dx, dxr, n);
  tu_err_note("in.dx", e);
  TU_ASSERT_REL(e, TOL_DX, "%s dx", what);
  if (k->affine) {
    e = tu_rel_l2(dw, dwr, C);
    tu_err_note("in.dweight", e);
    TU_ASSERT_REL(e, TOL_DX, "%s dweight", what);
    e = tu_rel_l2(db, dbr, C);
    tu_err_note("in.dbias", e);
    TU_ASSERT_REL(e, TOL_Y, "%s dbias", what);
  }
  if (k->track) {
    e = tu_rel_l2(rm, rmd, C);
    tu_err_note("in.running_mean", e);
    TU_ASSERT_REL(e, TOL_Y, "%s running_mean", what);
    e = tu_rel_l2(rv, rvd, C);
    tu_err_note("in.running_var", e);
    TU_ASSERT_REL(e, TOL_Y, "%s running_var", what);
  }
  sbn_layer_destroy(l);
  free(x), free(dy), free(y), free(dx), free(w), free(b), free(dw), free(db);
  free(rm), free(rv), free(xd), free(dyd), free(wd), free(bd), free(rmd);
  free(rvd), free(rm0), free(rv0), free(yr), free(dxr), free(dwr), free(dbr);
}

static void test_in_vs_reference(void **state) {
  (void)state;
  const char *const *sets;
  int nsets = tu_kernel_sets(&sets);
  uint64_t seed = 1;
  for (int ks = 0; ks < nsets; ks++) {
    if (tu_kernel_use(sets[ks]))
      continue;
    for (int lay = 0; lay < 2; lay++) {
      sbn_layout_t L = (sbn_layout_t)lay;
      sbn_tensor_desc_t shapes[] = {
          tu_desc(L, 4, (size_t)2, (size_t)3, (size_t)5, (size_t)7),
          tu_desc(L, 3, (size_t)1, (size_t)1, (size_t)9),
          tu_desc(L, 3, (size_t)3, (size_t)17, (size_t)3),
          tu_desc(L, 5, (size_t)2, (size_t)3, (size_t)3, (size_t)4, (size_t)5),
          tu_desc(L, 3, (size_t)2, (size_t)16, (size_t)33),
          tu_desc(L, 4, (size_t)1, (size_t)35, (size_t)3, (size_t)3),
          tu_desc(L, 3, (size_t)4, (size_t)8, (size_t)17),
          /* A sample of 469 KiB: NCHW takes it in blocks of 25 and 23
           * channels (the L2 budget of groupnorm.c). */
          tu_desc(L, 4, (size_t)2, (size_t)48, (size_t)50, (size_t)50),
      };
      for (size_t si = 0; si < sizeof shapes / sizeof *shapes; si++)
        for (int mode = 0; mode < 2; mode++)
          for (int affine = 0; affine < 2; affine++)
            for (int track = 0; track < 2; track++) {
              in_case_t k = {shapes[si],       affine, track, 0.1,
                             (sbn_mode_t)mode, 0.5,    2.0};
              run_case(&k, sets[ks], seed++);
            }
      in_case_t big = {shapes[0], 1, 1, 1.0, SBN_MODE_TRAIN, 1e4, 1.0};
      run_case(&big, sets[ks], seed++);
      big.xstd = 2.0;
      big.d = shapes[4];
      run_case(&big, sets[ks], seed++);
      /* Wide channels in three samples at mean 1e4: channels-last takes
       * each sample in one fused call (the AVX-512 set's gn_fwd_nhwc),
       * the later two prefetched by the one before. */
      big.d = tu_desc(L, 4, (size_t)3, (size_t)1000, (size_t)7, (size_t)7);
      run_case(&big, sets[ks], seed++);
      big.d = tu_desc(L, 4, (size_t)3, (size_t)64, (size_t)9, (size_t)9);
      run_case(&big, sets[ks], seed++);
      /* 14x14 planes of 17 channels: the NCHW forward's 16-channel tiles
       * and a one-channel remainder, at mean 1e4. */
      big.d = tu_desc(L, 3, (size_t)2, (size_t)17, (size_t)196);
      run_case(&big, sets[ks], seed++);
      /* The channels-last fused backward (kernels_avx512_clbwd.c) at
       * mean 1e4: rows of 17 channels (a masked last vector per row) over
       * 37 positions (a short last block of rows), and 2048 channels over
       * 6x6 (288 KiB samples, the largest it takes, dx streamed). */
      big.d = tu_desc(L, 3, (size_t)3, (size_t)17, (size_t)37);
      run_case(&big, sets[ks], seed++);
      big.d = tu_desc(L, 4, (size_t)3, (size_t)2048, (size_t)6, (size_t)6);
      run_case(&big, sets[ks], seed++);
    }
    /* Eval with running statistics accepts one spatial element and (N, C)
     * inputs, since no statistics are computed. */
    in_case_t k = {tu_desc(SBN_LAYOUT_NCHW, 2, (size_t)3, (size_t)5),
                   1,
                   1,
                   0.1,
                   SBN_MODE_EVAL,
                   0,
                   1};
    run_case(&k, sets[ks], seed++);
    k.d =
        tu_desc(SBN_LAYOUT_NHWC, 4, (size_t)3, (size_t)5, (size_t)1, (size_t)1);
    run_case(&k, sets[ks], seed++);
  }
  sbn_kernel_select("ref");
}

/* With momentum 1 the running statistics become the batch averages of the
 * per-instance mean and unbiased variance, checked at a large mean to
 * within 1e-6 (relative for the variance, in units of std for the mean,
 * plus the float rounding of the stored mean). */
static void test_in_running_large_mean(void **state) {
  (void)state;
  const size_t N = 4, C = 3, S = 211, n = N * C * S;
  const char *const *sets;
  int nsets = tu_kernel_sets(&sets);
  for (int ks = 0; ks < nsets; ks++) {
    if (tu_kernel_use(sets[ks]))
      continue;
    for (int lay = 0; lay < 2; lay++) {
      sbn_tensor_desc_t d = tu_desc((sbn_layout_t)lay, 3, N, C, S);
      tu_rng_t rng;
      tu_rng_seed(&rng, 99);
      float *x = tu_floats(n), *y = tu_floats(n);
      tu_fill_normal(&rng, x, n, 1e4, 2.0);
      double *xd = tu_to_double(x, n);
      float rm[3] = {0}, rv[3] = {1, 1, 1};
      sbn_state_t st = {rm, rv, 0};
      sbn_layer_t *l = in_layer(C, 0, 1, 1.0);
      tu_run_t r = {SBN_MODE_TRAIN, &d,   x,    NULL, NULL, NULL, y,
                    NULL,           NULL, NULL, &st,  0};
      TU_ASSERT_RC(tu_run(l, &r, NULL), 0);
      for (size_t c = 0; c < C; c++) {
        double am = 0, av = 0;
        for (size_t i = 0; i < N; i++) {
          double m = 0, q = 0;
          for (size_t s = 0; s < S; s++)
            m += xd[ref64_index(&d, i, c, s)];
          m /= (double)S;
          for (size_t s = 0; s < S; s++) {
            double t = xd[ref64_index(&d, i, c, s)] - m;
            q += t * t;
          }
          am += m / (double)N;
          av += q / (double)(S - 1) / (double)N;
        }
        double ve = fabs((double)rv[c] - av) / av;
        tu_err_note("in.largemean.running_var", ve);
        if (!(ve <= 1e-6))
          fail_msg("[%s] running_var[%zu] rel err %.3g", sets[ks], c, ve);
        if (!(fabs((double)rm[c] - am) <= 1e-6 * sqrt(av) + fabs(am) * 0x1p-24))
          fail_msg("[%s] running_mean[%zu] = %.9g, expected %.9g", sets[ks], c,
                   (double)rm[c], am);
      }
      sbn_layer_destroy(l);
      free(x), free(y), free(xd);
    }
  }
  sbn_kernel_select("ref");
}

/* One spatial element in training (or in eval without running statistics,
 * which also uses instance statistics) is SBN_ESMALLBATCH. */
static void test_in_small(void **state) {
  (void)state;
  float x[6] = {1, 2, 3, 4, 5, 6}, y[6];
  float rm[3] = {0}, rv[3] = {1, 1, 1};
  sbn_state_t st = {rm, rv, 0};
  sbn_tensor_desc_t ds[] = {
      tu_desc(SBN_LAYOUT_NCHW, 2, (size_t)2, (size_t)3),
      tu_desc(SBN_LAYOUT_NCHW, 4, (size_t)2, (size_t)3, (size_t)1, (size_t)1),
      tu_desc(SBN_LAYOUT_NHWC, 3, (size_t)2, (size_t)3, (size_t)1)};
  for (int track = 0; track < 2; track++) {
    sbn_layer_t *l = in_layer(3, 0, track, 0.1);
    for (int i = 0; i < 3; i++) {
      tu_run_t r = {
          SBN_MODE_TRAIN,     &ds[i], x, NULL, NULL, NULL, y, NULL, NULL, NULL,
          track ? &st : NULL, 0};
      TU_ASSERT_RC(tu_run(l, &r, NULL), SBN_ESMALLBATCH);
      assert_true(strlen(sbn_last_error()) > 0);
      assert_true(rm[0] == 0 && rv[0] == 1);
      if (!track) {
        r.mode = SBN_MODE_EVAL;
        TU_ASSERT_RC(tu_run(l, &r, NULL), SBN_ESMALLBATCH);
      }
    }
    sbn_layer_destroy(l);
  }
}

/* Constant instances give y = bias; a NaN in one instance stays in it. The
 * PyTorch semantics make (sample, channel) the unit, so the NaN in sample 1
 * channel 2 must not reach sample 0 channel 2 nor any other channel. */
static void test_in_constant_and_nan(void **state) {
  (void)state;
  const size_t N = 3, C = 5, S = 19, n = N * C * S;
  const char *const *sets;
  int nsets = tu_kernel_sets(&sets);
  for (int ks = 0; ks < nsets; ks++) {
    if (tu_kernel_use(sets[ks]))
      continue;
    for (int lay = 0; lay < 2; lay++) {
      sbn_tensor_desc_t d = tu_desc((sbn_layout_t)lay, 3, N, C, S);
      tu_rng_t rng;
      tu_rng_seed(&rng, 21);
      float *x = tu_floats(n), *dy = tu_floats(n), *y = tu_floats(n),
            *dx = tu_floats(n);
      tu_fill_normal(&rng, x, n, 0, 1);
      tu_fill_normal(&rng, dy, n, 0, 1);
      float w[5] = {1, 2, 0.5f, 1, 3}, b[5] = {0.1f, 0.2f, 0.3f, 0.4f, 0.5f};
      float dw[5], db[5];
      for (size_t s = 0; s < S; s++)
        x[ref64_index(&d, 0, 3, s)] = 8.5f;
      sbn_layer_t *l = in_layer(C, 1, 0, 0.1);
      tu_run_t r = {SBN_MODE_TRAIN, &d, x, w, b, dy, y, dx, dw, db, NULL, 0};
      TU_ASSERT_RC(tu_run(l, &r, NULL), 0);
      for (size_t s = 0; s < S; s++)
        assert_true(y[ref64_index(&d, 0, 3, s)] == b[3]);
      assert_int_equal(tu_count_nonfinite(y, n), 0);
      assert_int_equal(tu_count_nonfinite(dx, n), 0);
      x[ref64_index(&d, 1, 2, 7)] = NAN;
      TU_ASSERT_RC(tu_run(l, &r, NULL), 0);
      for (size_t i = 0; i < N; i++)
        for (size_t c = 0; c < C; c++)
          for (size_t s = 0; s < S; s++) {
            size_t o = ref64_index(&d, i, c, s);
            if (i == 1 && c == 2) {
              if (!isnan(y[o]) || !isnan(dx[o]))
                fail_msg("[%s] NaN instance has finite y/dx", sets[ks]);
            } else if (!isfinite(y[o]) || !isfinite(dx[o])) {
              fail_msg("[%s] NaN leaked into (%zu, %zu)", sets[ks], i, c);
            }
          }
      sbn_layer_destroy(l);
      free(x), free(dy), free(y), free(dx);
    }
  }
  sbn_kernel_select("ref");
}

/* N = 0 is accepted and leaves the running statistics unchanged. */
static void test_in_empty(void **state) {
  (void)state;
  sbn_tensor_desc_t d =
      tu_desc(SBN_LAYOUT_NCHW, 3, (size_t)0, (size_t)3, (size_t)5);
  float rm[3] = {1, 2, 3}, rv[3] = {4, 5, 6}, w[3] = {1, 1, 1},
        b[3] = {0, 0, 0}, dw[3] = {9, 9, 9}, db[3] = {9, 9, 9};
  float buf[1] = {0}, buf2[1] = {0};
  sbn_state_t st = {rm, rv, 0};
  sbn_layer_t *l = in_layer(3, 1, 1, 0.5);
  tu_run_t r = {SBN_MODE_TRAIN, &d, buf, w, b, buf, buf2, buf2, dw, db, &st, 0};
  TU_ASSERT_RC(tu_run(l, &r, NULL), 0);
  assert_true(rm[0] == 1 && rm[2] == 3 && rv[0] == 4 && rv[2] == 6);
  for (int c = 0; c < 3; c++)
    assert_true(dw[c] == 0 && db[c] == 0);
  sbn_layer_destroy(l);
}

/* An empty spatial extent (S = 0) with N > 0 also leaves the running
 * statistics as they were, as PyTorch's InstanceNorm does: there are no
 * values to take statistics of, so folding in zeros would move them. */
static void test_in_empty_spatial(void **state) {
  (void)state;
  sbn_tensor_desc_t d =
      tu_desc(SBN_LAYOUT_NCHW, 3, (size_t)2, (size_t)3, (size_t)0);
  float rm[3] = {1, 2, 3}, rv[3] = {4, 5, 6}, w[3] = {1, 1, 1},
        b[3] = {0, 0, 0}, dw[3] = {9, 9, 9}, db[3] = {9, 9, 9};
  float buf[1] = {0}, buf2[1] = {0};
  sbn_state_t st = {rm, rv, 0};
  sbn_layer_t *l = in_layer(3, 1, 1, 0.1);
  tu_run_t r = {SBN_MODE_TRAIN, &d, buf, w, b, buf, buf2, buf2, dw, db, &st, 0};
  TU_ASSERT_RC(tu_run(l, &r, NULL), 0);
  for (int c = 0; c < 3; c++)
    assert_true(rm[c] == (float)(c + 1) && rv[c] == (float)(c + 4));
  sbn_layer_destroy(l);
}

static int report(void **state) {
  (void)state;
  tu_err_report("instancenorm");
  return 0;
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_in_vs_reference),
      cmocka_unit_test(test_in_running_large_mean),
      cmocka_unit_test(test_in_small),
      cmocka_unit_test(test_in_constant_and_nan),
      cmocka_unit_test(test_in_empty),
      cmocka_unit_test(test_in_empty_spatial),
  };
  return cmocka_run_group_tests(tests, NULL, report);
}
