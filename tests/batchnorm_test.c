/* BatchNorm against the float64 reference: every kernel set, NCHW and
 * NHWC, odd shapes and tails, train/eval, affine and running statistics
 * on/off, momentum and cumulative averages, large means, constant
 * channels, NaN isolation, empty and too-small batches. */
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

#define TOL_Y 1e-5  /* y, dbias, running statistics */
#define TOL_DX 1e-4 /* dx, dweight */

typedef struct {
  sbn_tensor_desc_t d;
  int affine, track, cumulative;
  double momentum;
  sbn_mode_t mode;
  double xmean, xstd;
} bn_case_t;

static void desc_str(const sbn_tensor_desc_t *d, char *buf, size_t len) {
  int k =
      snprintf(buf, len, "%s(", d->layout == SBN_LAYOUT_NHWC ? "NHWC" : "NCHW");
  for (int i = 0; i < d->ndim && k > 0 && (size_t)k < len; i++)
    k += snprintf(buf + k, len - (size_t)k, i ? ",%zu" : "%zu", d->dims[i]);
  if (k > 0 && (size_t)k < len)
    snprintf(buf + k, len - (size_t)k, ")");
}

/* Runs one case through the library and the reference and compares every
 * output. */
static void run_case(const bn_case_t *k, const char *kset, uint64_t seed) {
  size_t N, C, S, n;
  char what[160], ds[64];
  tu_rng_t rng;
  ref64_ncs(&k->d, &N, &C, &S);
  n = N * C * S;
  desc_str(&k->d, ds, sizeof ds);
  snprintf(what, sizeof what,
           "bn[%s] %s %s affine=%d track=%d cum=%d mom=%g mean=%g", kset, ds,
           k->mode == SBN_MODE_TRAIN ? "train" : "eval", k->affine, k->track,
           k->cumulative, k->momentum, k->xmean);
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
  double *yr = tu_doubles(n), *dxr = tu_doubles(n), *dwr = tu_doubles(C),
         *dbr = tu_doubles(C);
  /* The eval reference normalizes with the running statistics as they were
   * before the call (eval does not update them). */
  double *rm0 = tu_to_double(rm, C), *rv0 = tu_to_double(rv, C);

  sbn_layer_params_t p;
  sbn_layer_params_default(&p, SBN_OP_BATCHNORM);
  p.channels = C;
  p.affine = k->affine;
  p.track_running_stats = k->track;
  p.cumulative = k->cumulative;
  p.momentum = k->momentum;
  sbn_layer_t *l = tu_layer(&p, NULL);
  sbn_state_t st = {rm, rv, 3};
  int64_t nbt = 3;
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
  int stage;
  int rc = tu_run(l, &r, &stage);
  if (rc != 0)
    fail_msg("%s: stage %d failed: %s (%s)", what, stage, sbn_err_name(rc),
             sbn_last_error());

  int train = k->mode == SBN_MODE_TRAIN;
  ref64_bn_forward(&k->d, xd, yr, k->affine ? wd : NULL, k->affine ? bd : NULL,
                   k->track ? rmd : NULL, k->track ? rvd : NULL, &nbt, 1e-5,
                   k->momentum, k->cumulative, train);
  ref64_bn_backward(&k->d, xd, dyd, dxr, k->affine ? wd : NULL, dwr, dbr,
                    k->track ? rm0 : NULL, k->track ? rv0 : NULL, 1e-5, train);

  double e;
  e = tu_rel_l2(y, yr, n);
  tu_err_note("bn.y", e);
  TU_ASSERT_REL(e, TOL_Y, "%s y", what);
  e = tu_rel_l2(dx, dxr, n);
  tu_err_note("bn.dx", e);
  TU_ASSERT_REL(e, TOL_DX, "%s dx", what);
  if (k->affine) {
    e = tu_rel_l2(dw, dwr, C);
    tu_err_note("bn.dweight", e);
    TU_ASSERT_REL(e, TOL_DX, "%s dweight", what);
    e = tu_rel_l2(db, dbr, C);
    tu_err_note("bn.dbias", e);
    TU_ASSERT_REL(e, TOL_Y, "%s dbias", what);
  }
  if (k->track) {
    e = tu_rel_l2(rm, rmd, C);
    tu_err_note("bn.running_mean", e);
    TU_ASSERT_REL(e, TOL_Y, "%s running_mean", what);
    e = tu_rel_l2(rv, rvd, C);
    tu_err_note("bn.running_var", e);
    TU_ASSERT_REL(e, TOL_Y, "%s running_var", what);
    if (st.num_batches_tracked != nbt)
      fail_msg("%s: num_batches_tracked %lld, expected %lld", what,
               (long long)st.num_batches_tracked, (long long)nbt);
  }
  sbn_layer_destroy(l);
  free(x), free(dy), free(y), free(dx), free(w), free(b), free(dw), free(db);
  free(rm), free(rv), free(xd), free(dyd), free(wd), free(bd), free(rmd);
  free(rvd), free(yr), free(dxr), free(dwr), free(dbr), free(rm0), free(rv0);
}

/* Shapes with tails (C and spatial sizes not multiples of 8 or 16), C = 1,
 * spatial size 1, N = 1, (N, C) inputs and three spatial dims. */
static sbn_tensor_desc_t shapes[16];
static int nshapes;

static void make_shapes(sbn_layout_t lay) {
  nshapes = 0;
  shapes[nshapes++] =
      tu_desc(lay, 4, (size_t)2, (size_t)3, (size_t)5, (size_t)7);
  shapes[nshapes++] = tu_desc(lay, 3, (size_t)1, (size_t)1, (size_t)9);
  shapes[nshapes++] =
      tu_desc(lay, 4, (size_t)3, (size_t)17, (size_t)1, (size_t)1);
  shapes[nshapes++] = tu_desc(lay, 2, (size_t)4, (size_t)17);
  shapes[nshapes++] = tu_desc(lay, 2, (size_t)37, (size_t)3);
  shapes[nshapes++] =
      tu_desc(lay, 5, (size_t)2, (size_t)3, (size_t)3, (size_t)4, (size_t)5);
  shapes[nshapes++] = tu_desc(lay, 3, (size_t)5, (size_t)16, (size_t)33);
  shapes[nshapes++] =
      tu_desc(lay, 4, (size_t)2, (size_t)35, (size_t)3, (size_t)3);
  shapes[nshapes++] = tu_desc(lay, 3, (size_t)1, (size_t)17, (size_t)19);
  shapes[nshapes++] = tu_desc(lay, 3, (size_t)3, (size_t)8, (size_t)16);
}

static void test_bn_vs_reference(void **state) {
  (void)state;
  const char *const *sets;
  int nsets = tu_kernel_sets(&sets);
  uint64_t seed = 1;
  for (int ks = 0; ks < nsets; ks++) {
    if (tu_kernel_use(sets[ks]))
      continue;
    for (int lay = 0; lay < 2; lay++) {
      make_shapes((sbn_layout_t)lay);
      for (int si = 0; si < nshapes; si++)
        for (int mode = 0; mode < 2; mode++)
          for (int affine = 0; affine < 2; affine++)
            for (int track = 0; track < 2; track++)
              for (int cum = 0; cum < 1 + track; cum++) {
                bn_case_t k = {shapes[si], affine,           track, cum,
                               0.1,        (sbn_mode_t)mode, 0.5,   2.0};
                run_case(&k, sets[ks], seed++);
              }
    }
  }
  sbn_kernel_select("ref");
}

/* Momentum 0, 1 and an odd value, and a cumulative average over a few
 * batches, all through the reference. */
static void test_bn_momentum_values(void **state) {
  (void)state;
  double moms[] = {0.0, 1.0, 0.37};
  for (int i = 0; i < 3; i++) {
    bn_case_t k = {tu_desc(SBN_LAYOUT_NCHW, 3, (size_t)4, (size_t)5, (size_t)6),
                   1,
                   1,
                   0,
                   moms[i],
                   SBN_MODE_TRAIN,
                   1.0,
                   3.0};
    run_case(&k, "default", 100 + (uint64_t)i);
  }
}

/* The cumulative average over several batches equals the plain mean of the
 * batch statistics, and num_batches_tracked counts training forwards only. */
static void test_bn_cumulative_sequence(void **state) {
  (void)state;
  const size_t N = 4, C = 3, S = 5, n = N * C * S;
  sbn_tensor_desc_t d = tu_desc(SBN_LAYOUT_NCHW, 3, N, C, S);
  sbn_layer_params_t p;
  sbn_layer_params_default(&p, SBN_OP_BATCHNORM);
  p.channels = C;
  p.cumulative = 1;
  p.affine = 0;
  sbn_layer_t *l = tu_layer(&p, NULL);
  float rm[3] = {0, 0, 0}, rv[3] = {1, 1, 1};
  sbn_state_t st = {rm, rv, 0};
  double rmd[3] = {0, 0, 0}, rvd[3] = {1, 1, 1};
  int64_t nbt = 0;
  float *x = tu_floats(n), *y = tu_floats(n);
  double *yr = tu_doubles(n);
  tu_rng_t rng;
  tu_rng_seed(&rng, 7);
  for (int it = 0; it < 5; it++) {
    tu_fill_normal(&rng, x, n, it, 1 + it);
    tu_run_t r = {SBN_MODE_TRAIN, &d,   x,    NULL, NULL, NULL, y,
                  NULL,           NULL, NULL, &st,  0};
    TU_ASSERT_RC(tu_run(l, &r, NULL), 0);
    double *xd = tu_to_double(x, n);
    ref64_bn_forward(&d, xd, yr, NULL, NULL, rmd, rvd, &nbt, 1e-5, 0.1, 1, 1);
    free(xd);
    assert_int_equal(st.num_batches_tracked, it + 1);
    TU_ASSERT_REL(tu_rel_l2(rm, rmd, C), TOL_Y, "cumulative running_mean %d",
                  it);
    TU_ASSERT_REL(tu_rel_l2(rv, rvd, C), TOL_Y, "cumulative running_var %d",
                  it);
    /* After the first batch with f = 1 the old values are gone entirely. */
  }
  /* Eval does not count. */
  tu_run_t r = {SBN_MODE_EVAL, &d,   x,    NULL, NULL, NULL, y,
                NULL,          NULL, NULL, &st,  0};
  TU_ASSERT_RC(tu_run(l, &r, NULL), 0);
  assert_int_equal(st.num_batches_tracked, 5);
  sbn_layer_destroy(l);
  free(x), free(y), free(yr);
}

/* Large means: the variance must come out within 1e-6 relative and the mean
 * within 1e-6 std of float64, checked through the double records of the
 * seam and through the running statistics with momentum 1 (running_mean is
 * the batch mean up to float rounding, running_var the unbiased variance). */
static void large_mean_case(double mean, double stdv, sbn_layout_t lay,
                            const char *kset) {
  const size_t N = 8, C = 5, S = 97, n = N * C * S;
  sbn_tensor_desc_t d = tu_desc(lay, 3, N, C, S);
  tu_rng_t rng;
  tu_rng_seed(&rng, 4242);
  float *x = tu_floats(n), *y = tu_floats(n);
  tu_fill_normal(&rng, x, n, mean, stdv);
  double *xd = tu_to_double(x, n), *yr = tu_doubles(n);
  sbn_layer_params_t p;
  sbn_layer_params_default(&p, SBN_OP_BATCHNORM);
  p.channels = C;
  p.momentum = 1.0;
  sbn_layer_t *l = tu_layer(&p, NULL);
  float w[5] = {1, 0.5f, 2, 1, 1}, b[5] = {0, 1, -1, 0.25f, 0};
  double wd[5], bd[5];
  for (int i = 0; i < 5; i++)
    wd[i] = w[i], bd[i] = b[i];
  float rm[5] = {0}, rv[5] = {1, 1, 1, 1, 1};
  sbn_state_t st = {rm, rv, 0};

  /* The seam's double records. */
  size_t ws;
  TU_ASSERT_RC(sbn_layer_sizes(l, &d, &ws, NULL), 0);
  void *work = tu_xmalloc(ws);
  sbn_rec_t recs[5];
  sbn_forward_args_t fa;
  memset(&fa, 0, sizeof fa);
  fa.mode = SBN_MODE_TRAIN;
  fa.x_desc = &d;
  fa.x = x;
  fa.y = y;
  fa.weight = w;
  fa.bias = b;
  fa.state = &st;
  fa.workspace = work;
  fa.workspace_bytes = ws;
  TU_ASSERT_RC(sbn_bn_forward_local(l, &fa, recs), 0);
  free(work);

  tu_run_t r = {SBN_MODE_TRAIN, &d, x, w, b, NULL, y, NULL, NULL, NULL, &st, 0};
  TU_ASSERT_RC(tu_run(l, &r, NULL), 0);
  double rmd[5], rvd[5];
  int64_t nbt = 0;
  ref64_bn_forward(&d, xd, yr, wd, bd, rmd, rvd, &nbt, 1e-5, 1.0, 0, 1);
  for (size_t c = 0; c < C; c++) {
    double m = 0, q = 0;
    for (size_t i = 0; i < N; i++)
      for (size_t s = 0; s < S; s++)
        m += xd[ref64_index(&d, i, c, s)];
    m /= (double)(N * S);
    for (size_t i = 0; i < N; i++)
      for (size_t s = 0; s < S; s++) {
        double t = xd[ref64_index(&d, i, c, s)] - m;
        q += t * t;
      }
    double var = q / (double)(N * S), uvar = q / (double)(N * S - 1);
    double sd = sqrt(var);
    double rec_mean_err = fabs(recs[c].v[1] - m) / sd;
    double rec_var_err = fabs(recs[c].v[2] / recs[c].v[0] - var) / var;
    tu_err_note("bn.largemean.rec_mean/std", rec_mean_err);
    tu_err_note("bn.largemean.rec_var", rec_var_err);
    if (!(rec_mean_err <= 1e-6) || !(rec_var_err <= 1e-6))
      fail_msg(
          "[%s] mean %g: channel %zu record mean err %.3g std, var err %.3g",
          kset, mean, c, rec_mean_err, rec_var_err);
    /* running_mean is a float: allow its own rounding on top of 1e-6 std. */
    double rm_err = fabs((double)rm[c] - m);
    if (!(rm_err <= 1e-6 * sd + fabs(m) * 0x1p-24))
      fail_msg("[%s] mean %g: running_mean[%zu] = %.9g, batch mean %.9g", kset,
               mean, c, (double)rm[c], m);
    double rv_err = fabs((double)rv[c] - uvar) / uvar;
    tu_err_note("bn.largemean.running_var", rv_err);
    if (!(rv_err <= 1e-6))
      fail_msg("[%s] mean %g: running_var[%zu] rel err %.3g", kset, mean, c,
               rv_err);
  }
  double e = tu_rel_l2(y, yr, n);
  tu_err_note("bn.largemean.y", e);
  TU_ASSERT_REL(e, TOL_Y, "[%s] large mean %g y", kset, mean);
  sbn_layer_destroy(l);
  free(x), free(y), free(xd), free(yr);
}

static void test_bn_large_mean(void **state) {
  (void)state;
  const char *const *sets;
  int nsets = tu_kernel_sets(&sets);
  for (int ks = 0; ks < nsets; ks++) {
    if (tu_kernel_use(sets[ks]))
      continue;
    for (int lay = 0; lay < 2; lay++) {
      large_mean_case(1e4, 1.0, (sbn_layout_t)lay, sets[ks]);
      large_mean_case(1e4, 2.0, (sbn_layout_t)lay, sets[ks]);
      large_mean_case(-3e4, 0.5, (sbn_layout_t)lay, sets[ks]);
    }
    /* The full forward/backward comparison at a large mean too. */
    bn_case_t k = {
        tu_desc(SBN_LAYOUT_NCHW, 4, (size_t)3, (size_t)7, (size_t)5, (size_t)9),
        1,
        1,
        0,
        0.1,
        SBN_MODE_TRAIN,
        1e4,
        1.0};
    run_case(&k, sets[ks], 77);
    k.d.layout = SBN_LAYOUT_NHWC;
    run_case(&k, sets[ks], 78);
    /* Channels-last at odd and wide C with enough rows that the float
     * partial sums of the optimized sets are folded into double many
     * times, and a long NCHW run (several fold chunks per run). */
    const sbn_tensor_desc_t big[] = {
        tu_desc(SBN_LAYOUT_NHWC, 4, (size_t)8, (size_t)17, (size_t)16,
                (size_t)16),
        tu_desc(SBN_LAYOUT_NHWC, 4, (size_t)4, (size_t)1000, (size_t)3,
                (size_t)5),
        /* Over 8 MiB: wide rows read in memory order, one row a sweep
         * with a partial last vector (kernels_avx512_nhwc.c). */
        tu_desc(SBN_LAYOUT_NHWC, 4, (size_t)1, (size_t)300, (size_t)84,
                (size_t)84),
        /* Two pieces of a row (2100 > PMAX), rows strided: the float dx
         * of the wide position view. */
        tu_desc(SBN_LAYOUT_NHWC, 4, (size_t)4, (size_t)2100, (size_t)3,
                (size_t)3),
        tu_desc(SBN_LAYOUT_NHWC, 4, (size_t)64, (size_t)3, (size_t)9,
                (size_t)7),
        tu_desc(SBN_LAYOUT_NCHW, 4, (size_t)2, (size_t)3, (size_t)50,
                (size_t)61),
        /* NCHW short runs (kernels_avx512_short.c): 7x7 and 14x14 planes,
         * whose dx is formed in float along flat rows; runs of 21 with 42
         * values per channel; a sample of one with 20 (below 32 values per
         * channel: the double dx); and an output of over 4 MiB, whose
         * normalize streams along flat rows. */
        tu_desc(SBN_LAYOUT_NCHW, 4, (size_t)8, (size_t)33, (size_t)7,
                (size_t)7),
        tu_desc(SBN_LAYOUT_NCHW, 4, (size_t)4, (size_t)17, (size_t)14,
                (size_t)14),
        /* The longest short run (SHORT_S = 256: 16 values per lane). */
        tu_desc(SBN_LAYOUT_NCHW, 4, (size_t)3, (size_t)19, (size_t)16,
                (size_t)16),
        tu_desc(SBN_LAYOUT_NCHW, 4, (size_t)2, (size_t)5, (size_t)3, (size_t)7),
        tu_desc(SBN_LAYOUT_NCHW, 4, (size_t)1, (size_t)3, (size_t)4, (size_t)5),
        tu_desc(SBN_LAYOUT_NCHW, 4, (size_t)16, (size_t)333, (size_t)14,
                (size_t)14)};
    for (size_t i = 0; i < sizeof big / sizeof *big; i++) {
      k.d = big[i];
      run_case(&k, sets[ks], 79 + i);
    }
  }
  sbn_kernel_select("ref");
}

/* The local blocked passes (ops/batchnorm_overlap.c) and the same shapes
 * unblocked: SBN_BN_SINGLE_PASS=1 plans L2 blocks of half of 1 MiB of x,
 * or of x and dy; unset, a backward of more than 8 MiB of x and dy runs
 * in L3 blocks of 4 MiB; =0 blocks nothing. C not a multiple of the
 * block (37 channels of 32 KiB: forward blocks of 16, backward of 8; 37
 * channels of 392 KiB of x and dy: L3 blocks of 10 and a last of 7), one
 * channel larger than the block (blocks of one), N = 1, and a block of
 * one sample's channels, at a large mean, against float64 in every
 * kernel set, training and eval. */
static void test_bn_l2_blocks(void **state) {
  (void)state;
  const char *const *sets;
  int nsets = tu_kernel_sets(&sets);
  const sbn_tensor_desc_t blk[] = {
      tu_desc(SBN_LAYOUT_NCHW, 4, (size_t)2, (size_t)37, (size_t)64,
              (size_t)64),
      tu_desc(SBN_LAYOUT_NCHW, 4, (size_t)2, (size_t)3, (size_t)256,
              (size_t)512),
      tu_desc(SBN_LAYOUT_NCHW, 4, (size_t)1, (size_t)37, (size_t)96,
              (size_t)97),
      tu_desc(SBN_LAYOUT_NCHW, 3, (size_t)1, (size_t)5, (size_t)300000),
      tu_desc(SBN_LAYOUT_NCHW, 4, (size_t)4, (size_t)37, (size_t)112,
              (size_t)112)};
  static const char *const env[] = {NULL, "1", "0"};
  uint64_t seed = 900;
  for (int on = 0; on < 3; on++) {
    if (env[on] != NULL)
      setenv("SBN_BN_SINGLE_PASS", env[on], 1);
    for (int ks = 0; ks < nsets; ks++) {
      if (tu_kernel_use(sets[ks]))
        continue;
      for (size_t i = 0; i < sizeof blk / sizeof *blk; i++)
        for (int mode = 0; mode < 2; mode++) {
          bn_case_t k = {blk[i], 1, 1, 0, 0.1, (sbn_mode_t)mode, 1e4, 1.0};
          run_case(&k, sets[ks], seed++);
        }
    }
  }
  unsetenv("SBN_BN_SINGLE_PASS");
  sbn_kernel_select("ref");
}

/* A constant channel has variance 0: y is exactly the bias, nothing is NaN,
 * and the gradients are finite and match the reference. */
static void test_bn_constant_channel(void **state) {
  (void)state;
  const size_t N = 3, C = 4, S = 10, n = N * C * S;
  const char *const *sets;
  int nsets = tu_kernel_sets(&sets);
  for (int ks = 0; ks < nsets; ks++) {
    if (tu_kernel_use(sets[ks]))
      continue;
    for (int lay = 0; lay < 2; lay++) {
      sbn_tensor_desc_t d = tu_desc((sbn_layout_t)lay, 3, N, C, S);
      tu_rng_t rng;
      tu_rng_seed(&rng, 5);
      float *x = tu_floats(n), *y = tu_floats(n), *dy = tu_floats(n),
            *dx = tu_floats(n);
      tu_fill_normal(&rng, x, n, 0, 1);
      tu_fill_normal(&rng, dy, n, 0, 1);
      for (size_t i = 0; i < N; i++)
        for (size_t s = 0; s < S; s++)
          x[ref64_index(&d, i, 2, s)] = 1234.5f;
      float w[4] = {1, 2, 3, 4}, b[4] = {0.5f, -1, 7, 2}, dw[4], db[4];
      float rm[4] = {0}, rv[4] = {1, 1, 1, 1};
      sbn_state_t st = {rm, rv, 0};
      sbn_layer_params_t p;
      sbn_layer_params_default(&p, SBN_OP_BATCHNORM);
      p.channels = C;
      sbn_layer_t *l = tu_layer(&p, NULL);
      tu_run_t r = {SBN_MODE_TRAIN, &d, x, w, b, dy, y, dx, dw, db, &st, 0};
      TU_ASSERT_RC(tu_run(l, &r, NULL), 0);
      for (size_t i = 0; i < N; i++)
        for (size_t s = 0; s < S; s++)
          assert_true(y[ref64_index(&d, i, 2, s)] == b[2]);
      assert_int_equal(tu_count_nonfinite(y, n), 0);
      assert_int_equal(tu_count_nonfinite(dx, n), 0);
      assert_int_equal(tu_count_nonfinite(dw, C), 0);
      assert_int_equal(tu_count_nonfinite(rm, C), 0);
      assert_int_equal(tu_count_nonfinite(rv, C), 0);
      double *xd = tu_to_double(x, n), *dyd = tu_to_double(dy, n);
      double wd[4], dxr_w[4], dbr[4];
      for (int i = 0; i < 4; i++)
        wd[i] = w[i];
      double *dxr = tu_doubles(n);
      ref64_bn_backward(&d, xd, dyd, dxr, wd, dxr_w, dbr, NULL, NULL, 1e-5, 1);
      TU_ASSERT_REL(tu_rel_l2(dx, dxr, n), TOL_DX, "[%s] constant channel dx",
                    sets[ks]);
      sbn_layer_destroy(l);
      free(x), free(y), free(dy), free(dx), free(xd), free(dyd), free(dxr);
    }
  }
  sbn_kernel_select("ref");
}

/* A NaN in one channel makes that channel's y and dx NaN and leaves every
 * other channel finite. */
static void test_bn_nan_isolation(void **state) {
  (void)state;
  const size_t N = 3, C = 19, S = 11, n = N * C * S;
  const char *const *sets;
  int nsets = tu_kernel_sets(&sets);
  for (int ks = 0; ks < nsets; ks++) {
    if (tu_kernel_use(sets[ks]))
      continue;
    for (int lay = 0; lay < 2; lay++) {
      sbn_tensor_desc_t d = tu_desc((sbn_layout_t)lay, 3, N, C, S);
      tu_rng_t rng;
      tu_rng_seed(&rng, 9);
      float *x = tu_floats(n), *y = tu_floats(n), *dy = tu_floats(n),
            *dx = tu_floats(n), *w = tu_floats(C), *b = tu_floats(C),
            *dw = tu_floats(C), *db = tu_floats(C), *rm = tu_floats(C),
            *rv = tu_floats(C);
      tu_fill_normal(&rng, x, n, 0, 1);
      tu_fill_normal(&rng, dy, n, 0, 1);
      tu_fill_normal(&rng, w, C, 1, 0.1);
      tu_fill_normal(&rng, b, C, 0, 0.1);
      for (size_t c = 0; c < C; c++)
        rm[c] = 0, rv[c] = 1;
      const size_t bad = 13;
      x[ref64_index(&d, 1, bad, 4)] = NAN;
      sbn_state_t st = {rm, rv, 0};
      sbn_layer_params_t p;
      sbn_layer_params_default(&p, SBN_OP_BATCHNORM);
      p.channels = C;
      sbn_layer_t *l = tu_layer(&p, NULL);
      tu_run_t r = {SBN_MODE_TRAIN, &d, x, w, b, dy, y, dx, dw, db, &st, 0};
      TU_ASSERT_RC(tu_run(l, &r, NULL), 0);
      for (size_t i = 0; i < N; i++)
        for (size_t c = 0; c < C; c++)
          for (size_t s = 0; s < S; s++) {
            size_t o = ref64_index(&d, i, c, s);
            if (c == bad) {
              if (!isnan(y[o]) || !isnan(dx[o]))
                fail_msg("[%s] NaN channel: y or dx finite at (%zu,%zu,%zu)",
                         sets[ks], i, c, s);
            } else if (!isfinite(y[o]) || !isfinite(dx[o])) {
              fail_msg("[%s] NaN leaked into channel %zu at (%zu,%zu)",
                       sets[ks], c, i, s);
            }
          }
      for (size_t c = 0; c < C; c++)
        if (c != bad && (!isfinite(rm[c]) || !isfinite(rv[c]) ||
                         !isfinite(dw[c]) || !isfinite(db[c])))
          fail_msg("[%s] NaN leaked into statistics of channel %zu", sets[ks],
                   c);
      sbn_layer_destroy(l);
      free(x), free(y), free(dy), free(dx), free(w), free(b), free(dw);
      free(db), free(rm), free(rv);
    }
  }
  sbn_kernel_select("ref");
}

/* N = 0 is accepted: nothing to write, running statistics unchanged, and
 * the parameter gradients are written as zeros. */
static void test_bn_empty_batch(void **state) {
  (void)state;
  sbn_tensor_desc_t d =
      tu_desc(SBN_LAYOUT_NCHW, 4, (size_t)0, (size_t)3, (size_t)4, (size_t)4);
  sbn_layer_params_t p;
  sbn_layer_params_default(&p, SBN_OP_BATCHNORM);
  p.channels = 3;
  sbn_layer_t *l = tu_layer(&p, NULL);
  float rm[3] = {0.5f, -1, 2}, rv[3] = {1, 2, 3};
  float w[3] = {1, 1, 1}, b[3] = {0, 0, 0};
  float dw[3] = {9, 9, 9}, db[3] = {9, 9, 9};
  float xbuf[1] = {0}, ybuf[1] = {0}, dybuf[1] = {0}, dxbuf[1] = {0};
  sbn_state_t st = {rm, rv, 4};
  tu_run_t r = {SBN_MODE_TRAIN, &d,    xbuf, w,  b,   dybuf,
                ybuf,           dxbuf, dw,   db, &st, 0};
  int stage;
  int rc = tu_run(l, &r, &stage);
  if (rc != 0)
    fail_msg("N=0: stage %d failed: %s (%s)", stage, sbn_err_name(rc),
             sbn_last_error());
  assert_true(rm[0] == 0.5f && rm[1] == -1 && rm[2] == 2);
  assert_true(rv[0] == 1 && rv[1] == 2 && rv[2] == 3);
  for (int c = 0; c < 3; c++) {
    assert_true(dw[c] == 0);
    assert_true(db[c] == 0);
  }
  /* NHWC and eval too. */
  d.layout = SBN_LAYOUT_NHWC;
  r.mode = SBN_MODE_EVAL;
  TU_ASSERT_RC(tu_run(l, &r, NULL), 0);
  assert_true(rm[0] == 0.5f && rv[2] == 3);
  sbn_layer_destroy(l);
}

/* Exactly one value per channel in training is SBN_ESMALLBATCH; eval with
 * running statistics is fine. */
static void test_bn_small_batch(void **state) {
  (void)state;
  sbn_layer_params_t p;
  sbn_layer_params_default(&p, SBN_OP_BATCHNORM);
  p.channels = 3;
  sbn_layer_t *l = tu_layer(&p, NULL);
  float x[3] = {1, 2, 3}, y[3], w[3] = {1, 1, 1}, b[3] = {0, 0, 0};
  float rm[3] = {0, 0, 0}, rv[3] = {1, 1, 1};
  sbn_state_t st = {rm, rv, 0};
  sbn_tensor_desc_t shapes2[3] = {
      tu_desc(SBN_LAYOUT_NCHW, 2, (size_t)1, (size_t)3),
      tu_desc(SBN_LAYOUT_NCHW, 4, (size_t)1, (size_t)3, (size_t)1, (size_t)1),
      tu_desc(SBN_LAYOUT_NHWC, 4, (size_t)1, (size_t)3, (size_t)1, (size_t)1)};
  for (int i = 0; i < 3; i++) {
    tu_run_t r = {SBN_MODE_TRAIN, &shapes2[i], x,    w,   b, NULL, y,
                  NULL,           NULL,        NULL, &st, 0};
    TU_ASSERT_RC(tu_run(l, &r, NULL), SBN_ESMALLBATCH);
    assert_true(strlen(sbn_last_error()) > 0);
    assert_true(rm[0] == 0 && rv[0] == 1);
    assert_int_equal(st.num_batches_tracked, 0);
    r.mode = SBN_MODE_EVAL;
    TU_ASSERT_RC(tu_run(l, &r, NULL), 0);
  }
  sbn_layer_destroy(l);
}

/* NCHW and NHWC give the same results after transposing. */
static void test_bn_layout_agreement(void **state) {
  (void)state;
  const size_t N = 3, C = 11, H = 5, W = 3, n = N * C * H * W;
  sbn_tensor_desc_t dc = tu_desc(SBN_LAYOUT_NCHW, 4, N, C, H, W);
  sbn_tensor_desc_t dh = dc;
  dh.layout = SBN_LAYOUT_NHWC;
  tu_rng_t rng;
  tu_rng_seed(&rng, 31);
  float *x = tu_floats(n), *dy = tu_floats(n), *xh = tu_floats(n),
        *dyh = tu_floats(n), *y1 = tu_floats(n), *dx1 = tu_floats(n),
        *y2 = tu_floats(n), *dx2 = tu_floats(n), *t = tu_floats(n);
  tu_fill_normal(&rng, x, n, 3, 2);
  tu_fill_normal(&rng, dy, n, 0, 1);
  tu_nchw_to_nhwc(&dc, x, xh);
  tu_nchw_to_nhwc(&dc, dy, dyh);
  float w[11], b[11], dw1[11], db1[11], dw2[11], db2[11];
  float rm1[11] = {0}, rv1[11], rm2[11] = {0}, rv2[11];
  for (int c = 0; c < 11; c++) {
    w[c] = 1 + 0.1f * (float)c, b[c] = 0.2f * (float)c;
    rv1[c] = rv2[c] = 1;
  }
  sbn_state_t s1 = {rm1, rv1, 0}, s2 = {rm2, rv2, 0};
  sbn_layer_params_t p;
  sbn_layer_params_default(&p, SBN_OP_BATCHNORM);
  p.channels = C;
  sbn_layer_t *l = tu_layer(&p, NULL);
  tu_run_t r1 = {SBN_MODE_TRAIN, &dc, x, w, b, dy, y1, dx1, dw1, db1, &s1, 0};
  tu_run_t r2 = {SBN_MODE_TRAIN, &dh, xh, w, b, dyh, y2, dx2, dw2, db2, &s2, 0};
  TU_ASSERT_RC(tu_run(l, &r1, NULL), 0);
  TU_ASSERT_RC(tu_run(l, &r2, NULL), 0);
  tu_nhwc_to_nchw(&dc, y2, t);
  TU_ASSERT_REL(tu_rel_l2_ff(t, y1, n), 1e-6, "NHWC vs NCHW y");
  tu_nhwc_to_nchw(&dc, dx2, t);
  TU_ASSERT_REL(tu_rel_l2_ff(t, dx1, n), 1e-5, "NHWC vs NCHW dx");
  TU_ASSERT_REL(tu_rel_l2_ff(dw2, dw1, C), 1e-5, "NHWC vs NCHW dweight");
  TU_ASSERT_REL(tu_rel_l2_ff(db2, db1, C), 1e-6, "NHWC vs NCHW dbias");
  TU_ASSERT_REL(tu_rel_l2_ff(rm2, rm1, C), 1e-6, "NHWC vs NCHW running_mean");
  TU_ASSERT_REL(tu_rel_l2_ff(rv2, rv1, C), 1e-6, "NHWC vs NCHW running_var");
  sbn_layer_destroy(l);
  free(x), free(dy), free(xh), free(dyh), free(y1), free(dx1), free(y2);
  free(dx2), free(t);
}

/* y may alias x and dx may alias dy. */
static void test_bn_in_place(void **state) {
  (void)state;
  const size_t N = 2, C = 5, S = 13, n = N * C * S;
  sbn_tensor_desc_t d = tu_desc(SBN_LAYOUT_NCHW, 3, N, C, S);
  tu_rng_t rng;
  tu_rng_seed(&rng, 3);
  float *x = tu_floats(n), *dy = tu_floats(n), *y = tu_floats(n),
        *dx = tu_floats(n), *buf = tu_floats(n), *gbuf = tu_floats(n);
  tu_fill_normal(&rng, x, n, 1, 2);
  tu_fill_normal(&rng, dy, n, 0, 1);
  float w[5] = {1, 2, 3, 4, 5}, b[5] = {0}, dw[5], db[5];
  float rm[5] = {0}, rv[5] = {1, 1, 1, 1, 1};
  sbn_state_t st = {rm, rv, 0};
  sbn_layer_params_t p;
  sbn_layer_params_default(&p, SBN_OP_BATCHNORM);
  p.channels = C;
  p.track_running_stats = 0;
  sbn_layer_t *l = tu_layer(&p, NULL);
  tu_run_t r = {SBN_MODE_TRAIN, &d, x, w, b, dy, y, dx, dw, db, &st, 0};
  TU_ASSERT_RC(tu_run(l, &r, NULL), 0);
  /* In-place forward only (backward needs the original x). */
  memcpy(buf, x, n * sizeof *buf);
  tu_run_t r2 = {SBN_MODE_TRAIN, &d,   buf,  w,   b, NULL, buf,
                 NULL,           NULL, NULL, &st, 0};
  TU_ASSERT_RC(tu_run(l, &r2, NULL), 0);
  assert_memory_equal(buf, y, n * sizeof *y);
  memcpy(gbuf, dy, n * sizeof *gbuf);
  tu_run_t r3 = {SBN_MODE_TRAIN, &d, x, w, b, gbuf, buf, gbuf, dw, db, &st, 0};
  TU_ASSERT_RC(tu_run(l, &r3, NULL), 0);
  assert_memory_equal(gbuf, dx, n * sizeof *dx);
  sbn_layer_destroy(l);
  free(x), free(dy), free(y), free(dx), free(buf), free(gbuf);
}

static int report(void **state) {
  (void)state;
  tu_err_report("batchnorm");
  return 0;
}

/* With two values per channel and eps far below the variance, the true dx
 * is about eps/var times dy: the difference of nearly equal terms. Computed
 * in fp32 every digit is lost (relative error ~1); syncbn forms xhat, the
 * sums and dx in double. The reference here is the closed form for n = 2
 * in long double: dx_i = w*istd*(d_i - xhat_i*s) with d_i = dy_i - mean(dy),
 * s = mean(dy*xhat). */
static void test_bn_two_values_small_eps(void **state) {
  (void)state;
  const size_t N = 2, C = 5;
  const double eps = 1e-8;
  tu_rng_t rng;
  tu_rng_seed(&rng, 4242);
  float x[10], dy[10], y[10], dx[10], w[5], b[5], dw[5], db[5];
  tu_fill_normal(&rng, x, N * C, 3, 2);
  tu_fill_normal(&rng, dy, N * C, 0, 1);
  tu_fill_normal(&rng, w, C, 1, 0.3);
  tu_fill_normal(&rng, b, C, 0, 0.3);
  sbn_layer_params_t p;
  sbn_layer_params_default(&p, SBN_OP_BATCHNORM);
  p.channels = C;
  p.eps = eps;
  p.track_running_stats = 0;
  sbn_layer_t *l = tu_layer(&p, NULL);
  sbn_tensor_desc_t d = tu_desc(SBN_LAYOUT_NCHW, 2, N, C);
  tu_run_t r = {.mode = SBN_MODE_TRAIN,
                .desc = &d,
                .x = x,
                .w = w,
                .b = b,
                .dy = dy,
                .y = y,
                .dx = dx,
                .dw = dw,
                .db = db};
  assert_int_equal(tu_run(l, &r, NULL), 0);
  long double num = 0, den = 0;
  for (size_t c = 0; c < C; c++) {
    long double x0 = x[c], x1 = x[C + c], m = (x0 + x1) / 2;
    long double var = ((x0 - m) * (x0 - m) + (x1 - m) * (x1 - m)) / 2;
    long double is = 1 / sqrtl(var + eps);
    long double h0 = (x0 - m) * is, h1 = (x1 - m) * is;
    long double md = ((long double)dy[c] + dy[C + c]) / 2;
    long double s = (dy[c] * h0 + dy[C + c] * h1) / 2;
    long double r0 = w[c] * is * (dy[c] - md - h0 * s);
    long double r1 = w[c] * is * (dy[C + c] - md - h1 * s);
    num += (dx[c] - r0) * (dx[c] - r0) + (dx[C + c] - r1) * (dx[C + c] - r1);
    den += r0 * r0 + r1 * r1;
  }
  double e = (double)sqrtl(num / den);
  tu_err_note("bn.two_values_small_eps.dx", e);
  if (!(e <= 1e-4))
    fail_msg("dx relative L2 error %.3g > 1e-4 for two values per channel", e);
  sbn_layer_destroy(l);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_bn_vs_reference),
      cmocka_unit_test(test_bn_momentum_values),
      cmocka_unit_test(test_bn_cumulative_sequence),
      cmocka_unit_test(test_bn_large_mean),
      cmocka_unit_test(test_bn_l2_blocks),
      cmocka_unit_test(test_bn_constant_channel),
      cmocka_unit_test(test_bn_nan_isolation),
      cmocka_unit_test(test_bn_empty_batch),
      cmocka_unit_test(test_bn_small_batch),
      cmocka_unit_test(test_bn_layout_agreement),
      cmocka_unit_test(test_bn_in_place),
      cmocka_unit_test(test_bn_two_values_small_eps),
  };
  return cmocka_run_group_tests(tests, NULL, report);
}
