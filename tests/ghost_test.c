/* Ghost batches of BatchNorm against the float64 reference (plain
 * BatchNorm applied to each sub-batch): every kernel set, NCHW and NHWC,
 * N not divisible by g, g >= N (plain BatchNorm bit for bit), g = 1, too
 * small sub-batches, large means, eval, cumulative averages, the
 * equivalence with plain BatchNorm on each g-sample slice, the seam and
 * the refusal by other ops. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "ref64.h"
#include "syncbn_fused.h"
#include "testutil.h"

#define TOL_Y 1e-5  /* y, dbias, running statistics */
#define TOL_DX 1e-4 /* dx, dweight */

/* The inputs and outputs of one forward + backward. */
typedef struct {
  size_t n, C;
  float *x, *dy, *y, *dx, *w, *b, *dw, *db, *rm, *rv;
  sbn_state_t st;
} gh_bufs_t;

static void bufs_init(gh_bufs_t *u, const sbn_tensor_desc_t *d, double xmean,
                      double xstd, uint64_t seed) {
  size_t N, C, S;
  tu_rng_t rng;
  ref64_ncs(d, &N, &C, &S);
  u->n = N * C * S;
  u->C = C;
  tu_rng_seed(&rng, seed);
  u->x = tu_floats(u->n), u->dy = tu_floats(u->n);
  u->y = tu_floats(u->n), u->dx = tu_floats(u->n);
  u->w = tu_floats(C), u->b = tu_floats(C), u->dw = tu_floats(C);
  u->db = tu_floats(C), u->rm = tu_floats(C), u->rv = tu_floats(C);
  tu_fill_normal(&rng, u->x, u->n, xmean, xstd);
  tu_fill_normal(&rng, u->dy, u->n, 0, 1);
  tu_fill_normal(&rng, u->w, C, 1, 0.5);
  tu_fill_normal(&rng, u->b, C, 0, 0.5);
  for (size_t c = 0; c < C; c++) {
    u->rm[c] = (float)(0.3 * tu_rng_normal(&rng));
    u->rv[c] = (float)(0.5 + tu_rng_uniform(&rng));
  }
  u->st.running_mean = u->rm;
  u->st.running_var = u->rv;
  u->st.num_batches_tracked = 3;
}

static void bufs_free(gh_bufs_t *u) {
  free(u->x), free(u->dy), free(u->y), free(u->dx), free(u->w), free(u->b);
  free(u->dw), free(u->db), free(u->rm), free(u->rv);
}

static sbn_layer_t *ghost_layer(size_t C, size_t g, int track, int cum) {
  sbn_layer_params_t p;
  sbn_layer_params_default(&p, SBN_OP_BATCHNORM);
  p.channels = C;
  p.ghost_batch = g;
  p.track_running_stats = track;
  p.cumulative = cum;
  return tu_layer(&p, NULL);
}

static int run(sbn_layer_t *l, sbn_mode_t mode, const sbn_tensor_desc_t *d,
               gh_bufs_t *u, int track) {
  tu_run_t r = {mode,
                d,
                u->x,
                u->w,
                u->b,
                u->dy,
                u->y,
                u->dx,
                u->dw,
                u->db,
                track ? &u->st : NULL,
                0};
  return tu_run(l, &r, NULL);
}

/* One case through the library and the reference; every output compared. */
static void ghost_case(const sbn_tensor_desc_t *d, size_t g, sbn_mode_t mode,
                       int track, int cum, double xmean, const char *kset,
                       uint64_t seed) {
  gh_bufs_t u;
  char what[160];
  bufs_init(&u, d, xmean, 2.0, seed);
  size_t n = u.n, C = u.C;
  snprintf(what, sizeof what,
           "ghost[%s] %s N=%zu C=%zu ndim=%d g=%zu %s track=%d cum=%d "
           "mean=%g",
           kset, d->layout == SBN_LAYOUT_NHWC ? "NHWC" : "NCHW", d->dims[0], C,
           d->ndim, g, mode == SBN_MODE_TRAIN ? "train" : "eval", track, cum,
           xmean);
  double *xd = tu_to_double(u.x, n), *dyd = tu_to_double(u.dy, n);
  double *wd = tu_to_double(u.w, C), *bd = tu_to_double(u.b, C);
  double *rmd = tu_to_double(u.rm, C), *rvd = tu_to_double(u.rv, C);
  double *rm0 = tu_to_double(u.rm, C), *rv0 = tu_to_double(u.rv, C);
  double *yr = tu_doubles(n), *dxr = tu_doubles(n), *dwr = tu_doubles(C),
         *dbr = tu_doubles(C);
  int64_t nbt = 3;
  sbn_layer_t *l = ghost_layer(C, g, track, cum);
  int rc = run(l, mode, d, &u, track);
  if (rc != 0)
    fail_msg("%s: %s (%s)", what, sbn_err_name(rc), sbn_last_error());
  int train = mode == SBN_MODE_TRAIN;
  ref64_bn_ghost_forward(d, g, xd, yr, wd, bd, track ? rmd : NULL,
                         track ? rvd : NULL, &nbt, 1e-5, 0.1, cum, train);
  ref64_bn_ghost_backward(d, g, xd, dyd, dxr, wd, dwr, dbr, track ? rm0 : NULL,
                          track ? rv0 : NULL, 1e-5, train);
  double e = tu_rel_l2(u.y, yr, n);
  tu_err_note("ghost.y", e);
  TU_ASSERT_REL(e, TOL_Y, "%s y", what);
  e = tu_rel_l2(u.dx, dxr, n);
  tu_err_note("ghost.dx", e);
  TU_ASSERT_REL(e, TOL_DX, "%s dx", what);
  e = tu_rel_l2(u.dw, dwr, C);
  tu_err_note("ghost.dweight", e);
  TU_ASSERT_REL(e, TOL_DX, "%s dweight", what);
  e = tu_rel_l2(u.db, dbr, C);
  tu_err_note("ghost.dbias", e);
  TU_ASSERT_REL(e, TOL_Y, "%s dbias", what);
  if (track) {
    e = tu_rel_l2(u.rm, rmd, C);
    tu_err_note("ghost.running_mean", e);
    TU_ASSERT_REL(e, TOL_Y, "%s running_mean", what);
    e = tu_rel_l2(u.rv, rvd, C);
    tu_err_note("ghost.running_var", e);
    TU_ASSERT_REL(e, TOL_Y, "%s running_var", what);
    if (u.st.num_batches_tracked != nbt)
      fail_msg("%s: num_batches_tracked %lld, expected %lld", what,
               (long long)u.st.num_batches_tracked, (long long)nbt);
  }
  sbn_layer_destroy(l);
  bufs_free(&u);
  free(xd), free(dyd), free(wd), free(bd), free(rmd), free(rvd), free(rm0);
  free(rv0), free(yr), free(dxr), free(dwr), free(dbr);
}

/* Shapes (N not divisible by g, spatial tails, S = 1 with sub-batches of
 * at least 2 samples) in both layouts, every mode, every kernel set. */
static void test_ghost_vs_reference(void **state) {
  (void)state;
  const char *const *sets;
  int nsets = tu_kernel_sets(&sets);
  uint64_t seed = 11;
  struct {
    size_t N, C, H, W, g;
  } cs[] = {{7, 3, 5, 1, 2},  {7, 3, 2, 3, 3},  {9, 5, 3, 3, 4},
            {6, 4, 0, 0, 2},  {8, 17, 0, 0, 3}, {4, 3, 5, 1, 1},
            {10, 2, 1, 1, 4}, {5, 6, 7, 3, 5},  {5, 6, 7, 3, 9}};
  for (int ks = 0; ks < nsets; ks++) {
    if (tu_kernel_use(sets[ks]))
      continue;
    for (size_t i = 0; i < sizeof cs / sizeof cs[0]; i++)
      for (int lay = 0; lay < 2; lay++)
        for (int mode = 0; mode < 2; mode++)
          for (int track = 0; track < 2; track++)
            for (int cum = 0; cum < 1 + track; cum++) {
              sbn_tensor_desc_t d =
                  cs[i].H == 0 ? tu_desc((sbn_layout_t)lay, 2, cs[i].N, cs[i].C)
                               : tu_desc((sbn_layout_t)lay, 4, cs[i].N, cs[i].C,
                                         cs[i].H, cs[i].W);
              ghost_case(&d, cs[i].g, (sbn_mode_t)mode, track, cum, 0.5,
                         sets[ks], seed++);
            }
    for (int lay = 0; lay < 2; lay++) {
      sbn_tensor_desc_t d = tu_desc((sbn_layout_t)lay, 4, (size_t)9, (size_t)3,
                                    (size_t)4, (size_t)5);
      ghost_case(&d, 4, SBN_MODE_TRAIN, 1, 0, 1e4, sets[ks], seed++);
    }
  }
  sbn_kernel_select("ref");
}

/* g >= N is plain BatchNorm, bit for bit (same kernels on the same view,
 * same formulas), running statistics included. */
static void test_ghost_whole_batch(void **state) {
  (void)state;
  for (int lay = 0; lay < 2; lay++)
    for (size_t g = 5; g <= 8; g += 3) {
      sbn_tensor_desc_t d = tu_desc((sbn_layout_t)lay, 4, (size_t)5, (size_t)6,
                                    (size_t)3, (size_t)3);
      gh_bufs_t a, b;
      bufs_init(&a, &d, 3, 2, 5);
      bufs_init(&b, &d, 3, 2, 5);
      sbn_layer_t *lg = ghost_layer(6, g, 1, 0), *lp = ghost_layer(6, 0, 1, 0);
      TU_ASSERT_RC(run(lg, SBN_MODE_TRAIN, &d, &a, 1), 0);
      TU_ASSERT_RC(run(lp, SBN_MODE_TRAIN, &d, &b, 1), 0);
      assert_memory_equal(a.y, b.y, a.n * sizeof(float));
      assert_memory_equal(a.dx, b.dx, a.n * sizeof(float));
      assert_memory_equal(a.dw, b.dw, 6 * sizeof(float));
      assert_memory_equal(a.db, b.db, 6 * sizeof(float));
      assert_memory_equal(a.rm, b.rm, 6 * sizeof(float));
      assert_memory_equal(a.rv, b.rv, 6 * sizeof(float));
      assert_int_equal(a.st.num_batches_tracked, b.st.num_batches_tracked);
      sbn_layer_destroy(lg), sbn_layer_destroy(lp);
      bufs_free(&a), bufs_free(&b);
    }
}

/* One process with ghost batches of g over N = k*g samples gives the y and
 * dx of plain BatchNorm on each g-sample slice (bit for bit), dweight and
 * dbias their sums, and running statistics the average of k plain layers
 * that each saw one slice from the same state: k ranks of g emulated. */
static void test_ghost_equals_slices(void **state) {
  (void)state;
  const size_t g = 3, k = 4, C = 5, H = 2, W = 3;
  for (int lay = 0; lay < 2; lay++) {
    sbn_tensor_desc_t d = tu_desc((sbn_layout_t)lay, 4, g * k, C, H, W);
    sbn_tensor_desc_t ds = tu_desc((sbn_layout_t)lay, 4, g, C, H, W);
    gh_bufs_t a;
    bufs_init(&a, &d, 1, 2, 21);
    float *rm0 = tu_floats(C), *rv0 = tu_floats(C);
    memcpy(rm0, a.rm, C * sizeof(float));
    memcpy(rv0, a.rv, C * sizeof(float));
    sbn_layer_t *lg = ghost_layer(C, g, 1, 0), *lp = ghost_layer(C, 0, 1, 0);
    TU_ASSERT_RC(run(lg, SBN_MODE_TRAIN, &d, &a, 1), 0);
    size_t per = g * C * H * W;
    double sdw[5] = {0}, sdb[5] = {0}, srm[5] = {0}, srv[5] = {0};
    for (size_t j = 0; j < k; j++) {
      float y[90], dx[90], dw[5], db[5], rm[5], rv[5];
      memcpy(rm, rm0, sizeof rm);
      memcpy(rv, rv0, sizeof rv);
      sbn_state_t st = {rm, rv, 3};
      tu_run_t r = {SBN_MODE_TRAIN,
                    &ds,
                    a.x + j * per,
                    a.w,
                    a.b,
                    a.dy + j * per,
                    y,
                    dx,
                    dw,
                    db,
                    &st,
                    0};
      TU_ASSERT_RC(tu_run(lp, &r, NULL), 0);
      assert_memory_equal(y, a.y + j * per, per * sizeof(float));
      assert_memory_equal(dx, a.dx + j * per, per * sizeof(float));
      for (size_t c = 0; c < C; c++) {
        sdw[c] += dw[c], sdb[c] += db[c];
        srm[c] += rm[c], srv[c] += rv[c];
      }
    }
    for (size_t c = 0; c < C; c++) {
      assert_true(fabs(a.dw[c] - sdw[c]) <= 1e-5 * (1 + fabs(sdw[c])));
      assert_true(fabs(a.db[c] - sdb[c]) <= 1e-5 * (1 + fabs(sdb[c])));
      assert_true(fabs(a.rm[c] - srm[c] / k) <= 1e-6 * (1 + fabs(srm[c] / k)));
      assert_true(fabs(a.rv[c] - srv[c] / k) <= 1e-6 * (1 + fabs(srv[c] / k)));
    }
    assert_int_equal(a.st.num_batches_tracked, 4);
    sbn_layer_destroy(lg), sbn_layer_destroy(lp);
    bufs_free(&a);
    free(rm0), free(rv0);
  }
}

/* A sub-batch with one value per channel is SBN_ESMALLBATCH and changes
 * nothing: g = 1 with S = 1, and a last sub-batch of 1 sample. g = 1 with
 * S > 1 is fine (covered by the reference test); eval with running
 * statistics does not use sub-batches. An empty batch changes nothing. */
static void test_ghost_small_and_empty(void **state) {
  (void)state;
  struct {
    size_t N, g;
  } bad[] = {{4, 1}, {5, 2}, {1, 3}, {7, 3}};
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
    for (int lay = 0; lay < 2; lay++) {
      sbn_tensor_desc_t d = tu_desc((sbn_layout_t)lay, 4, bad[i].N, (size_t)3,
                                    (size_t)1, (size_t)1);
      gh_bufs_t a;
      bufs_init(&a, &d, 0, 1, 3);
      float rm0 = a.rm[0], rv0 = a.rv[0];
      sbn_layer_t *l = ghost_layer(3, bad[i].g, 1, 0);
      TU_ASSERT_RC(run(l, SBN_MODE_TRAIN, &d, &a, 1), SBN_ESMALLBATCH);
      assert_non_null(strstr(sbn_last_error(), "ghost_batch"));
      assert_true(a.rm[0] == rm0 && a.rv[0] == rv0);
      assert_int_equal(a.st.num_batches_tracked, 3);
      TU_ASSERT_RC(run(l, SBN_MODE_EVAL, &d, &a, 1), 0);
      sbn_layer_destroy(l);
      bufs_free(&a);
    }
  sbn_tensor_desc_t d0 =
      tu_desc(SBN_LAYOUT_NCHW, 4, (size_t)0, (size_t)3, (size_t)2, (size_t)2);
  float rm[3] = {0.5f, 1, 2}, rv[3] = {1, 2, 3}, w[3] = {1, 1, 1},
        b[3] = {0, 0, 0}, dw[3], db[3];
  sbn_state_t st = {rm, rv, 7};
  float x[1], y[1], dy[1], dx[1];
  sbn_layer_t *l = ghost_layer(3, 2, 1, 0);
  tu_run_t r = {SBN_MODE_TRAIN, &d0, x, w, b, dy, y, dx, dw, db, &st, 0};
  TU_ASSERT_RC(tu_run(l, &r, NULL), 0);
  assert_true(rm[0] == 0.5f && rv[2] == 3 && st.num_batches_tracked == 7);
  assert_true(dw[0] == 0 && db[2] == 0);
  sbn_layer_destroy(l);
}

/* The seam: no reduction for a ghost layer; *_local refuse it in
 * training, *_finish do the whole work with recs NULL and equal the
 * one-call path bit for bit. Other ops refuse a nonzero ghost_batch. */
static void test_ghost_seam_and_params(void **state) {
  (void)state;
  sbn_tensor_desc_t d =
      tu_desc(SBN_LAYOUT_NCHW, 4, (size_t)7, (size_t)4, (size_t)2, (size_t)2);
  gh_bufs_t a, b;
  bufs_init(&a, &d, 0, 1, 8);
  bufs_init(&b, &d, 0, 1, 8);
  sbn_layer_t *l = ghost_layer(4, 3, 1, 0);
  assert_int_equal(sbn_bn_needs_reduce(l, SBN_MODE_TRAIN), 0);
  assert_int_equal(sbn_bn_needs_reduce(l, SBN_MODE_EVAL), 0);
  TU_ASSERT_RC(run(l, SBN_MODE_TRAIN, &d, &a, 1), 0);
  size_t ws, sv, sv0;
  TU_ASSERT_RC(sbn_layer_sizes(l, &d, &ws, &sv), 0);
  sbn_layer_t *lp = ghost_layer(4, 0, 1, 0);
  TU_ASSERT_RC(sbn_layer_sizes(lp, &d, NULL, &sv0), 0);
  /* Three sub-batches' (mean, istd) where plain BatchNorm keeps one. */
  assert_int_equal(sv - sv0, 2 * 4 * 2 * sizeof(double));
  void *work = tu_xmalloc(ws), *saved = tu_xmalloc(sv);
  sbn_forward_args_t fa = {SBN_MODE_TRAIN, &d, b.x,  b.y, b.w,   b.b,
                           &b.st,          0,  work, ws,  saved, sv};
  sbn_rec_t recs[4];
  TU_ASSERT_RC(sbn_bn_forward_local(l, &fa, recs), SBN_EINVAL);
  assert_non_null(strstr(sbn_last_error(), "ghost_batch"));
  TU_ASSERT_RC(sbn_bn_forward_finish(l, &fa, NULL), 0);
  sbn_backward_args_t ba = {SBN_MODE_TRAIN, &d, b.x,  b.dy, b.dx,  b.w, b.dw,
                            b.db,           0,  work, ws,   saved, sv};
  TU_ASSERT_RC(sbn_bn_backward_local(l, &ba, recs), SBN_EINVAL);
  TU_ASSERT_RC(sbn_bn_backward_finish(l, &ba, NULL), 0);
  assert_memory_equal(a.y, b.y, a.n * sizeof(float));
  assert_memory_equal(a.dx, b.dx, a.n * sizeof(float));
  assert_memory_equal(a.rm, b.rm, 4 * sizeof(float));
  assert_memory_equal(a.dw, b.dw, 4 * sizeof(float));
  free(work), free(saved);
  sbn_layer_destroy(l), sbn_layer_destroy(lp);
  bufs_free(&a), bufs_free(&b);
  for (int op = 1; op < SBN_OP_COUNT; op++) {
    sbn_layer_params_t p;
    sbn_layer_t *x = NULL;
    sbn_layer_params_default(&p, (sbn_op_t)op);
    p.channels = 4;
    p.groups = 2;
    p.norm_ndim = 1;
    p.norm_shape[0] = 4;
    p.ghost_batch = 2;
    TU_ASSERT_RC(sbn_layer_create(&p, NULL, &x), SBN_EINVAL);
    assert_non_null(strstr(sbn_last_error(), "ghost_batch"));
    assert_null(x);
  }
}

/* A fused step over a ghost layer and a plain one: only the plain layer's
 * records go into the buffer (its C plus the status record), and both
 * layers' results equal their one-call paths bit for bit. */
static void test_ghost_fused(void **state) {
  (void)state;
  sbn_tensor_desc_t d =
      tu_desc(SBN_LAYOUT_NHWC, 4, (size_t)5, (size_t)3, (size_t)2, (size_t)2);
  gh_bufs_t one[2], fz[2];
  sbn_layer_t *ls[2] = {ghost_layer(3, 2, 1, 0), ghost_layer(3, 0, 1, 0)};
  sbn_forward_args_t fa[2];
  sbn_backward_args_t ba[2];
  void *work[2], *saved[2];
  size_t ws[2], sv[2], count;
  for (int i = 0; i < 2; i++) {
    bufs_init(&one[i], &d, 1, 1, 40 + (uint64_t)i);
    bufs_init(&fz[i], &d, 1, 1, 40 + (uint64_t)i);
    TU_ASSERT_RC(run(ls[i], SBN_MODE_TRAIN, &d, &one[i], 1), 0);
    TU_ASSERT_RC(sbn_layer_sizes(ls[i], &d, &ws[i], &sv[i]), 0);
    work[i] = tu_xmalloc(ws[i]);
    saved[i] = tu_xmalloc(sv[i]);
    gh_bufs_t *u = &fz[i];
    fa[i] = (sbn_forward_args_t){SBN_MODE_TRAIN, &d,    u->x,     u->y,
                                 u->w,           u->b,  &u->st,   0,
                                 work[i],        ws[i], saved[i], sv[i]};
    ba[i] = (sbn_backward_args_t){
        SBN_MODE_TRAIN, &d, u->x,    u->dy, u->dx,    u->w, u->dw,
        u->db,          0,  work[i], ws[i], saved[i], sv[i]};
  }
  TU_ASSERT_RC(sbn_fused_forward_records(2, ls, fa, &count), 0);
  assert_int_equal(count, 3 + 1);
  sbn_rec_t recs[4];
  TU_ASSERT_RC(sbn_bn_forward_fused(NULL, 2, ls, fa, recs, 4), 0);
  TU_ASSERT_RC(sbn_bn_backward_fused(NULL, 2, ls, ba, recs, 4), 0);
  for (int i = 0; i < 2; i++) {
    assert_memory_equal(one[i].y, fz[i].y, one[i].n * sizeof(float));
    assert_memory_equal(one[i].dx, fz[i].dx, one[i].n * sizeof(float));
    assert_memory_equal(one[i].rm, fz[i].rm, 3 * sizeof(float));
    assert_memory_equal(one[i].dw, fz[i].dw, 3 * sizeof(float));
    free(work[i]), free(saved[i]);
    sbn_layer_destroy(ls[i]);
    bufs_free(&one[i]), bufs_free(&fz[i]);
  }
}

static int report(void **state) {
  (void)state;
  tu_err_report("ghost batches vs float64 reference (max rel L2)");
  return 0;
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_ghost_vs_reference),
      cmocka_unit_test(test_ghost_whole_batch),
      cmocka_unit_test(test_ghost_equals_slices),
      cmocka_unit_test(test_ghost_small_and_empty),
      cmocka_unit_test(test_ghost_seam_and_params),
      cmocka_unit_test(test_ghost_fused),
  };
  return cmocka_run_group_tests(tests, NULL, report);
}
