/* LayerNorm against the float64 reference: normalized over the trailing
 * 1, 2 or 3 dims, affine on/off, odd row lengths, a single row, rows of
 * one element, empty batches, large means, constant rows and NaN
 * isolation, on every kernel set. */
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
  int k; /* normalized trailing dims */
  int affine;
  double xmean, xstd;
} ln_case_t;

static sbn_layer_t *ln_layer(const sbn_tensor_desc_t *d, int k, int affine,
                             size_t *D) {
  sbn_layer_params_t p;
  sbn_layer_params_default(&p, SBN_OP_LAYERNORM);
  p.norm_ndim = k;
  p.affine = affine;
  *D = 1;
  for (int i = 0; i < k; i++) {
    p.norm_shape[i] = d->dims[d->ndim - k + i];
    *D *= p.norm_shape[i];
  }
  return tu_layer(&p, NULL);
}

static void run_case(const ln_case_t *k, const char *kset, uint64_t seed,
                     sbn_mode_t mode) {
  size_t D, n = tu_numel(&k->d);
  sbn_layer_t *l = ln_layer(&k->d, k->k, k->affine, &D);
  tu_rng_t rng;
  tu_rng_seed(&rng, seed);
  float *x = tu_floats(n), *dy = tu_floats(n), *y = tu_floats(n),
        *dx = tu_floats(n);
  float *w = tu_floats(D), *b = tu_floats(D), *dw = tu_floats(D),
        *db = tu_floats(D);
  tu_fill_normal(&rng, x, n, k->xmean, k->xstd);
  tu_fill_normal(&rng, dy, n, 0, 1);
  tu_fill_normal(&rng, w, D, 1, 0.5);
  tu_fill_normal(&rng, b, D, 0, 0.5);
  double *xd = tu_to_double(x, n), *dyd = tu_to_double(dy, n);
  double *wd = tu_to_double(w, D), *bd = tu_to_double(b, D);
  double *yr = tu_doubles(n), *dxr = tu_doubles(n), *dwr = tu_doubles(D),
         *dbr = tu_doubles(D);
  char what[128];
  snprintf(what, sizeof what,
           "ln[%s] ndim=%d k=%d D=%zu n=%zu affine=%d mean=%g", kset, k->d.ndim,
           k->k, D, n, k->affine, k->xmean);
  tu_run_t r = {mode, &k->d, x,  k->affine ? w : NULL,  k->affine ? b : NULL,
                dy,   y,     dx, k->affine ? dw : NULL, k->affine ? db : NULL,
                NULL, 0};
  int stage, rc = tu_run(l, &r, &stage);
  if (rc != 0)
    fail_msg("%s: stage %d: %s (%s)", what, stage, sbn_err_name(rc),
             sbn_last_error());
  ref64_ln_forward(n, D, xd, yr, k->affine ? wd : NULL, k->affine ? bd : NULL,
                   1e-5);
  ref64_ln_backward(n, D, xd, dyd, dxr, k->affine ? wd : NULL, dwr, dbr, 1e-5);
  double e = tu_rel_l2(y, yr, n);
  tu_err_note("ln.y", e);
  TU_ASSERT_REL(e, TOL_Y, "%s y", what);
  e = tu_rel_l2(dx, dxr, n);
  if (D == 1) {
    /* A row of one element has dx = 0 exactly, computed as the difference
     * of two terms of size |w dy| / sqrt(eps); measure the error against
     * the size of those terms, since relative to 0 it is undefined. */
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
      double t = dyd[i] * (k->affine ? wd[0] : 1.0) / sqrt(1e-5);
      num += ((double)dx[i] - dxr[i]) * ((double)dx[i] - dxr[i]);
      den += t * t;
    }
    e = den > 0 ? sqrt(num / den) : sqrt(num);
    if (tu_count_nonfinite(dx, n) != 0)
      e = INFINITY;
  }
  tu_err_note("ln.dx", e);
  TU_ASSERT_REL(e, TOL_DX, "%s dx", what);
  if (k->affine) {
    e = tu_rel_l2(dw, dwr, D);
    tu_err_note("ln.dweight", e);
    TU_ASSERT_REL(e, TOL_DX, "%s dweight", what);
    e = tu_rel_l2(db, dbr, D);
    tu_err_note("ln.dbias", e);
    TU_ASSERT_REL(e, TOL_Y, "%s dbias", what);
  }
  sbn_layer_destroy(l);
  free(x), free(dy), free(y), free(dx), free(w), free(b), free(dw), free(db);
  free(xd), free(dyd), free(wd), free(bd), free(yr), free(dxr), free(dwr);
  free(dbr);
}

static void test_ln_vs_reference(void **state) {
  (void)state;
  const ln_case_t cases[] = {
      {tu_desc(SBN_LAYOUT_NCHW, 2, (size_t)4, (size_t)7), 1, 1, 0.5, 2},
      {tu_desc(SBN_LAYOUT_NCHW, 3, (size_t)3, (size_t)5, (size_t)17), 1, 1, 0.5,
       2},
      {tu_desc(SBN_LAYOUT_NCHW, 4, (size_t)2, (size_t)3, (size_t)4, (size_t)5),
       3, 1, 0.5, 2},
      {tu_desc(SBN_LAYOUT_NCHW, 4, (size_t)2, (size_t)3, (size_t)4, (size_t)5),
       2, 1, 0.5, 2},
      {tu_desc(SBN_LAYOUT_NCHW, 1, (size_t)17), 1, 1, 0.5, 2},
      {tu_desc(SBN_LAYOUT_NCHW, 2, (size_t)5, (size_t)1), 1, 1, 0.5, 2},
      {tu_desc(SBN_LAYOUT_NCHW, 2, (size_t)2, (size_t)33), 1, 1, 0.5, 2},
      {tu_desc(SBN_LAYOUT_NCHW, 3, (size_t)6, (size_t)1, (size_t)1), 2, 1, 0.5,
       2},
      {tu_desc(SBN_LAYOUT_NCHW, 2, (size_t)3, (size_t)1031), 1, 1, 0.5, 2},
      {tu_desc(SBN_LAYOUT_NCHW, 5, (size_t)2, (size_t)2, (size_t)3, (size_t)5,
               (size_t)7),
       3, 1, 0.5, 2},
      {tu_desc(SBN_LAYOUT_NCHW, 2, (size_t)7, (size_t)64), 1, 1, 1e4, 1},
      {tu_desc(SBN_LAYOUT_NCHW, 2, (size_t)7, (size_t)61), 1, 1, 1e4, 2},
      /* Rows longer than a forward column tile (4096), in more than one
       * chunk of 16 rows and more than one backward block of 16 rows. */
      {tu_desc(SBN_LAYOUT_NCHW, 2, (size_t)20, (size_t)5000), 1, 1, 0.5, 2},
      {tu_desc(SBN_LAYOUT_NCHW, 2, (size_t)19, (size_t)9000), 1, 1, 1e4, 1},
      /* Forward chunks of 2 MiB of rows: several rows a chunk normalized
       * block by block across them, and more than one chunk; backward
       * pairs of rows with an odd last row. */
      {tu_desc(SBN_LAYOUT_NCHW, 2, (size_t)301, (size_t)2003), 1, 1, 1e4, 2},
      {tu_desc(SBN_LAYOUT_NCHW, 2, (size_t)5, (size_t)200003), 1, 1, 1e4, 1},
      /* The pipelined passes (kernels_avx512_lnpipe.c, the backward's
       * groups in kernels_avx512_ln.c) with outputs large enough to stream
       * (4 MiB): groups of 4 rows forward and 2 backward, and a row left
       * over. */
      {tu_desc(SBN_LAYOUT_NCHW, 2, (size_t)9, (size_t)131072), 1, 1, 1e4, 1},
  };
  const char *const *sets;
  int nsets = tu_kernel_sets(&sets);
  uint64_t seed = 1;
  for (int ks = 0; ks < nsets; ks++) {
    if (tu_kernel_use(sets[ks]))
      continue;
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++)
      for (int affine = 0; affine < 2; affine++)
        for (int mode = 0; mode < 2; mode++) {
          ln_case_t k = cases[i];
          k.affine = affine;
          run_case(&k, sets[ks], seed++, (sbn_mode_t)mode);
        }
  }
  sbn_kernel_select("ref");
}

/* Zero rows are accepted and leave the parameter gradients zero. */
static void test_ln_empty(void **state) {
  (void)state;
  sbn_tensor_desc_t d = tu_desc(SBN_LAYOUT_NCHW, 2, (size_t)0, (size_t)8);
  size_t D;
  sbn_layer_t *l = ln_layer(&d, 1, 1, &D);
  float w[8], b[8], dw[8], db[8], buf[1] = {0}, buf2[1] = {0};
  for (int i = 0; i < 8; i++)
    w[i] = 1, b[i] = 0, dw[i] = 9, db[i] = 9;
  tu_run_t r = {SBN_MODE_TRAIN, &d,   buf, w,  b,    buf,
                buf2,           buf2, dw,  db, NULL, 0};
  TU_ASSERT_RC(tu_run(l, &r, NULL), 0);
  for (int i = 0; i < 8; i++)
    assert_true(dw[i] == 0 && db[i] == 0);
  sbn_layer_destroy(l);
}

/* A constant row gives y = bias with nothing NaN; a NaN in one row makes
 * that row's y and dx NaN and leaves the other rows finite. Rows of 37
 * and of 4100 (the pipelined passes: a group of 4 rows and one of 2). */
static void test_ln_constant_and_nan(void **state) {
  (void)state;
  const char *const *sets;
  int nsets = tu_kernel_sets(&sets);
  for (int ks = 0; ks < nsets; ks++)
    for (int id = 0; id < 2; id++) {
      if (tu_kernel_use(sets[ks]))
        continue;
      const size_t R = 6, D = id == 0 ? 37 : 4100, n = R * D;
      sbn_tensor_desc_t d = tu_desc(SBN_LAYOUT_NCHW, 2, R, D);
      size_t Dd;
      sbn_layer_t *l = ln_layer(&d, 1, 1, &Dd);
      tu_rng_t rng;
      tu_rng_seed(&rng, 11);
      float *x = tu_floats(n), *dy = tu_floats(n), *y = tu_floats(n),
            *dx = tu_floats(n), *w = tu_floats(D), *b = tu_floats(D),
            *dw = tu_floats(D), *db = tu_floats(D);
      tu_fill_normal(&rng, x, n, 0, 1);
      tu_fill_normal(&rng, dy, n, 0, 1);
      tu_fill_normal(&rng, w, D, 1, 0.2);
      tu_fill_normal(&rng, b, D, 0, 1);
      for (size_t j = 0; j < D; j++)
        x[2 * D + j] = -77.25f;
      tu_run_t r = {SBN_MODE_TRAIN, &d, x, w, b, dy, y, dx, dw, db, NULL, 0};
      TU_ASSERT_RC(tu_run(l, &r, NULL), 0);
      for (size_t j = 0; j < D; j++)
        assert_true(y[2 * D + j] == b[j]);
      assert_int_equal(tu_count_nonfinite(y, n), 0);
      assert_int_equal(tu_count_nonfinite(dx, n), 0);

      x[4 * D + 5] = NAN;
      TU_ASSERT_RC(tu_run(l, &r, NULL), 0);
      for (size_t i = 0; i < R; i++)
        for (size_t j = 0; j < D; j++) {
          size_t o = i * D + j;
          if (i == 4) {
            if (!isnan(y[o]) || !isnan(dx[o]))
              fail_msg("[%s] D=%zu NaN row: y or dx finite at column %zu",
                       sets[ks], D, j);
          } else if (!isfinite(y[o]) || !isfinite(dx[o])) {
            fail_msg("[%s] D=%zu NaN leaked into row %zu", sets[ks], D, i);
          }
        }
      sbn_layer_destroy(l);
      free(x), free(dy), free(y), free(dx), free(w), free(b), free(dw),
          free(db);
    }
  sbn_kernel_select("ref");
}

/* y may alias x and dx may alias dy, in every set: the pipelined passes
 * write one group of rows while they read the next. Rows of 9000 (groups
 * of 4 and a row left over) and of 131072 with streamed outputs. */
static void test_ln_in_place(void **state) {
  (void)state;
  const size_t Rs[] = {19, 9}, Ds[] = {9000, 131072};
  const char *const *sets;
  int nsets = tu_kernel_sets(&sets);
  for (int ks = 0; ks < nsets; ks++)
    for (int ic = 0; ic < 2; ic++) {
      if (tu_kernel_use(sets[ks]))
        continue;
      size_t R = Rs[ic], D = Ds[ic], n = R * D, Dd;
      sbn_tensor_desc_t d = tu_desc(SBN_LAYOUT_NCHW, 2, R, D);
      sbn_layer_t *l = ln_layer(&d, 1, 1, &Dd);
      tu_rng_t rng;
      tu_rng_seed(&rng, 5);
      float *x = tu_floats(n), *dy = tu_floats(n), *y = tu_floats(n),
            *dx = tu_floats(n), *buf = tu_floats(n), *gbuf = tu_floats(n),
            *w = tu_floats(D), *b = tu_floats(D), *dw = tu_floats(D),
            *db = tu_floats(D);
      tu_fill_normal(&rng, x, n, 3, 2);
      tu_fill_normal(&rng, dy, n, 0, 1);
      tu_fill_normal(&rng, w, D, 1, 0.5);
      tu_fill_normal(&rng, b, D, 0, 0.5);
      tu_run_t r = {SBN_MODE_TRAIN, &d, x, w, b, dy, y, dx, dw, db, NULL, 0};
      TU_ASSERT_RC(tu_run(l, &r, NULL), 0);
      /* In-place forward only (backward needs the original x). */
      memcpy(buf, x, n * sizeof *buf);
      tu_run_t r2 = {SBN_MODE_TRAIN, &d,   buf,  w,    b, NULL, buf,
                     NULL,           NULL, NULL, NULL, 0};
      TU_ASSERT_RC(tu_run(l, &r2, NULL), 0);
      if (memcmp(buf, y, n * sizeof *y) != 0)
        fail_msg("[%s] R=%zu D=%zu: in-place y differs", sets[ks], R, D);
      memcpy(gbuf, dy, n * sizeof *gbuf);
      tu_run_t r3 = {SBN_MODE_TRAIN, &d, x,  w,    b, gbuf, buf,
                     gbuf,           dw, db, NULL, 0};
      TU_ASSERT_RC(tu_run(l, &r3, NULL), 0);
      if (memcmp(gbuf, dx, n * sizeof *dx) != 0)
        fail_msg("[%s] R=%zu D=%zu: in-place dx differs", sets[ks], R, D);
      sbn_layer_destroy(l);
      free(x), free(dy), free(y), free(dx), free(buf), free(gbuf);
      free(w), free(b), free(dw), free(db);
    }
  sbn_kernel_select("ref");
}

static int report(void **state) {
  (void)state;
  tu_err_report("layernorm");
  return 0;
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_ln_vs_reference),
      cmocka_unit_test(test_ln_empty),
      cmocka_unit_test(test_ln_constant_and_nan),
      cmocka_unit_test(test_ln_in_place),
  };
  return cmocka_run_group_tests(tests, NULL, report);
}
