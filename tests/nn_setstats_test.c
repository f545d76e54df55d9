/* The set statistics of `syncbn study` (src/nn/setstats.c) against closed
 * forms on synthetic Gaussian data, and the precise pass of a ghost-batch
 * model (src/nn/model.c), which uses them. For n iid N(mu, sigma^2) values
 * the set mean's error has E[(m - mu)^2] = sigma^2 / n and the biased
 * variance v has E[(v - sigma^2)^2] = sigma^4 (2 n - 1) / n^2: the rms
 * relative errors are 1/sqrt(n) and sqrt(2 n - 1) / n. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "nn/sbn_nn.h"
#include "testutil.h"

#define POOL 4096
#define CH 64

typedef struct pool_s {
  float *x;
  sbn_rec_t *samples, pop[CH], set[CH], chunk[CH];
  uint32_t perm[POOL];
  sbn_nn_set_error_args_t a;
} pool_t;

/* POOL samples of CH channels of `values` iid N(3, 4) each; the
 * population is the distribution itself (mean 3, variance 4), so the
 * closed forms hold without a finite-population correction. */
static pool_t *make_pool(size_t values) {
  pool_t *p = calloc(1, sizeof *p);
  assert_non_null(p);
  tu_rng_t rng;
  tu_rng_seed(&rng, 11);
  p->x = tu_floats(POOL * CH * values);
  tu_fill_normal(&rng, p->x, POOL * CH * values, 3.0, 2.0);
  if (values > 1) {
    /* Sample i's channel ch is values floats: NCHW with s = values. */
    p->samples = tu_xmalloc(POOL * CH * sizeof *p->samples);
    for (size_t i = 0; i < POOL; i++)
      sbn_nn_channel_moments(p->x + i * CH * values, 1, CH, values, 0,
                             p->samples + i * CH);
    p->a.samples = p->samples;
  } else {
    p->a.x = p->x;
  }
  for (size_t ch = 0; ch < CH; ch++)
    p->pop[ch] = (sbn_rec_t){SBN_REC_MOMENTS, {1e9, 3.0, 4.0 * 1e9}};
  p->a.pop = p->pop;
  p->a.n = POOL;
  p->a.c = CH;
  p->a.perm = p->perm;
  p->a.set = p->set;
  p->a.chunk = p->chunk;
  p->a.min_var = 0;
  return p;
}

static void free_pool(pool_t *p) {
  free(p->x);
  free(p->samples);
  free(p);
}

static sbn_nn_set_error_t sweep(pool_t *p, size_t per_rank, size_t ranks,
                                size_t trials, uint64_t seed) {
  sbn_nn_set_error_t e;
  p->a.per_rank = per_rank;
  p->a.ranks = ranks;
  p->a.trials = trials;
  p->a.seed = seed;
  assert_int_equal(sbn_nn_set_error(&p->a, &e), 0);
  return e;
}

/* 400 trials x 64 channels = 25,600 squared errors per point: the rms of
 * the mean's has a relative sd near 0.5 %, the variance's near 1-2 %;
 * the bounds are 4-5 of those sds. */
static void check_closed_form(pool_t *p, size_t values) {
  const size_t sizes[] = {1, 2, 4, 8, 32};
  for (size_t i = 0; i < 5; i++) {
    size_t n = sizes[i];
    sbn_nn_set_error_t e = sweep(p, n, 1, 400, 5 + i);
    double m = (double)(n * values);
    assert_true(fabs(e.set_values - m) < 1e-9);
    assert_int_equal(e.channels, CH);
    double want_mean = 1 / sqrt(m), want_var = sqrt(2 * m - 1) / m;
    assert_true(fabs(e.mean_err / want_mean - 1) < 0.025);
    if (m == 1)
      assert_true(fabs(e.var_err - 1) < 1e-12); /* one value: variance 0 */
    else
      assert_true(fabs(e.var_err / want_var - 1) < 0.06);
  }
}

static void test_gaussian_values(void **state) {
  (void)state;
  pool_t *p = make_pool(1);
  check_closed_form(p, 1);
  free_pool(p);
}

/* Samples of 16 values per channel, as the CNN's H x W: |S| = 16 n. */
static void test_gaussian_records(void **state) {
  (void)state;
  pool_t *p = make_pool(16);
  check_closed_form(p, 16);
  free_pool(p);
}

/* k ranks of b samples merge to local statistics over k b: with the same
 * draws (same seed), 4 x 2 and 1 x 8 give the same errors, and the
 * chunked merge of the pool is its one-pass moments. */
static void test_sync_equals_local(void **state) {
  (void)state;
  pool_t *p = make_pool(1);
  sbn_nn_set_error_t a = sweep(p, 2, 4, 50, 3), b = sweep(p, 8, 1, 50, 3);
  assert_true(fabs(a.mean_err - b.mean_err) < 1e-12 * b.mean_err);
  assert_true(fabs(a.var_err - b.var_err) < 1e-10 * b.var_err);
  sbn_nn_set_error_t c = sweep(p, 8, 1, 50, 4);
  assert_true(fabs(c.mean_err - b.mean_err) > 1e-6); /* the seed matters */
  free_pool(p);
}

static void test_bad_args(void **state) {
  (void)state;
  pool_t *p = make_pool(1);
  sbn_nn_set_error_t e;
  p->a.trials = 10;
  p->a.per_rank = 0;
  p->a.ranks = 1;
  assert_int_equal(sbn_nn_set_error(&p->a, &e), SBN_EINVAL);
  assert_non_null(strstr(sbn_last_error(), "per_rank"));
  p->a.per_rank = POOL;
  p->a.ranks = 2;
  assert_int_equal(sbn_nn_set_error(&p->a, &e), SBN_EINVAL);
  p->a.per_rank = 2;
  p->a.trials = 0;
  assert_int_equal(sbn_nn_set_error(&p->a, &e), SBN_EINVAL);
  assert_non_null(strstr(sbn_last_error(), "trials"));
  p->a.trials = 10;
  p->a.min_var = 100;
  assert_int_equal(sbn_nn_set_error(&p->a, &e), SBN_EINVAL);
  assert_non_null(strstr(sbn_last_error(), "min_var"));
  free_pool(p);
}

/* NCHW and NHWC moments against a float64 reference. */
static void test_channel_moments(void **state) {
  (void)state;
  enum { N = 3, C = 5, S = 7 };
  tu_rng_t rng;
  tu_rng_seed(&rng, 2);
  float x[N * C * S], t[N * C * S];
  tu_fill_normal(&rng, x, N * C * S, -1.0, 3.0);
  for (size_t i = 0; i < N; i++)
    for (size_t c = 0; c < C; c++)
      for (size_t j = 0; j < S; j++)
        t[(i * S + j) * C + c] = x[(i * C + c) * S + j];
  sbn_rec_t a[C], b[C];
  sbn_nn_channel_moments(x, N, C, S, 0, a);
  sbn_nn_channel_moments(t, N, C, S, 1, b);
  for (size_t c = 0; c < C; c++) {
    double s = 0, s2 = 0;
    for (size_t i = 0; i < N; i++)
      for (size_t j = 0; j < S; j++)
        s += x[(i * C + c) * S + j];
    double mean = s / (N * S);
    for (size_t i = 0; i < N; i++)
      for (size_t j = 0; j < S; j++)
        s2 += pow(x[(i * C + c) * S + j] - mean, 2);
    assert_true(a[c].v[0] == N * S && b[c].v[0] == N * S);
    assert_true(fabs(a[c].v[1] - mean) < 1e-12 &&
                fabs(b[c].v[1] - mean) < 1e-12);
    assert_true(fabs(a[c].v[2] - s2) < 1e-9 && fabs(b[c].v[2] - s2) < 1e-9);
  }
}

static sbn_nn_model_t *mlp(size_t ghost) {
  sbn_nn_config_t cfg = {0};
  cfg.arch = SBN_NN_MLP;
  cfg.norm = SBN_NN_NORM_BN;
  cfg.ghost_batch = ghost;
  cfg.eps = 1e-5;
  cfg.momentum = 0.1;
  cfg.seed = 4;
  cfg.max_batch = 32;
  sbn_nn_model_t *m = NULL;
  assert_int_equal(sbn_nn_model_create(&cfg, &m), 0);
  return m;
}

/* A ghost-batch model's precise pass: the first BatchNorm sees the first
 * Linear's outputs, which do not depend on normalization, so its exact
 * statistics equal the plain model's; the second sees inputs normalized
 * by ghost batches of 4, so its statistics differ. */
static void test_precise_ghost(void **state) {
  (void)state;
  tu_rng_t rng;
  tu_rng_seed(&rng, 9);
  float *x = tu_floats(64 * 784);
  tu_fill_normal(&rng, x, 64 * 784, 0.0, 1.0);
  sbn_nn_model_t *g = mlp(4), *p = mlp(0);
  sbn_nn_model_t *ms[2] = {g, p};
  for (int k = 0; k < 2; k++) {
    sbn_nn_precise_begin(ms[k]);
    for (size_t i = 0; i < 64; i += 16)
      assert_int_equal(sbn_nn_forward_precise(ms[k], 16, x + i * 784), 0);
    sbn_nn_precise_finish(ms[k]);
  }
  const float *sg = sbn_nn_stats(g), *sp = sbn_nn_stats(p);
  double first = 0, second = 0;
  for (size_t i = 0; i < 512; i++) /* mean and var of the first layer */
    first = fmax(first, fabs(sg[i] - sp[i]) / (fabs(sp[i]) + 1e-3));
  for (size_t i = 512; i < 1024; i++)
    second = fmax(second, fabs(sg[i] - sp[i]) / (fabs(sp[i]) + 1e-3));
  assert_true(first < 1e-4);
  assert_true(second > 1e-2);
  sbn_nn_model_destroy(g);
  sbn_nn_model_destroy(p);
  free(x);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_gaussian_values),
      cmocka_unit_test(test_gaussian_records),
      cmocka_unit_test(test_sync_equals_local),
      cmocka_unit_test(test_bad_args),
      cmocka_unit_test(test_channel_moments),
      cmocka_unit_test(test_precise_ghost),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
