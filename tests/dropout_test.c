/* Dropout: Philox4x32-10 known answers, the documented mask rule checked
 * against an independent Philox, the dropped fraction, exact scaling, the
 * p = 0 / p = 1 / eval edge cases, backward, and the dependence of the
 * mask on (seed, rank, layer, step). */
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

/* Random123's published known-answer vectors for philox4x32_10. */
static const struct {
  uint32_t ctr[4], key[2], out[4];
} kat[] = {
    {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}},
    {{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff},
     {0xffffffff, 0xffffffff},
     {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}},
    {{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344},
     {0xa4093822, 0x299f31d0},
     {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}},
};

static void test_philox_kat(void **state) {
  (void)state;
  for (size_t i = 0; i < sizeof kat / sizeof *kat; i++) {
    uint32_t out[4], ref[4];
    sbn_philox4x32_10(kat[i].ctr, kat[i].key, out);
    ref64_philox(kat[i].ctr, kat[i].key, ref);
    for (int j = 0; j < 4; j++) {
      if (out[j] != kat[i].out[j])
        fail_msg("KAT %zu word %d: got 0x%08x, expected 0x%08x", i, j, out[j],
                 kat[i].out[j]);
      assert_int_equal(ref[j], kat[i].out[j]);
    }
  }
}

/* An identity communicator whose world rank is 1, to show that the rank
 * enters the key. */
static int fake_allreduce(sbn_comm_t *c, sbn_rec_t *r, size_t n) {
  (void)c, (void)r, (void)n;
  return 0;
}
static void fake_destroy(sbn_comm_t *c) {
  (void)c;
}
static const sbn_comm_vtable_t fake_vt = {.allreduce = fake_allreduce,
                                          .destroy = fake_destroy};

static sbn_layer_t *do_layer(double p, uint32_t seed, uint32_t layer_id,
                             sbn_comm_t *comm) {
  sbn_layer_params_t lp;
  sbn_layer_params_default(&lp, SBN_OP_DROPOUT);
  lp.p = p;
  lp.seed = seed;
  lp.layer_id = layer_id;
  return tu_layer(&lp, comm);
}

/* Forward (and backward when dy) through the runner. */
static void do_run(sbn_layer_t *l, sbn_mode_t mode, const sbn_tensor_desc_t *d,
                   const float *x, float *y, const float *dy, float *dx,
                   uint64_t step) {
  tu_run_t r = {mode, d, x, NULL, NULL, dy, y, dx, NULL, NULL, NULL, step};
  int stage, rc = tu_run(l, &r, &stage);
  if (rc != 0)
    fail_msg("dropout stage %d: %s (%s)", stage, sbn_err_name(rc),
             sbn_last_error());
}

/* The mask follows the rule in syncbn.h exactly (independent Philox),
 * including tails that are not a multiple of 4 and steps above 2^32 whose
 * low word is what enters the counter. */
static void test_mask_matches_rule(void **state) {
  (void)state;
  const size_t n = 1003;
  sbn_tensor_desc_t d = tu_desc(SBN_LAYOUT_NCHW, 1, n);
  float *x = tu_floats(n), *y = tu_floats(n);
  for (size_t i = 0; i < n; i++)
    x[i] = 1.0f + (float)i;
  sbn_comm_t fake = {&fake_vt, 0, 1, 1};
  const double ps[] = {0.1, 0.5, 0.9, 0.3};
  const uint64_t steps[] = {0, 1, 12345, 0x100000005ull};
  for (int ip = 0; ip < 4; ip++)
    for (int rank = 0; rank < 2; rank++) {
      sbn_layer_t *l =
          do_layer(ps[ip], 1234u + (uint32_t)ip, 7u, rank ? &fake : NULL);
      do_run(l, SBN_MODE_TRAIN, &d, x, y, NULL, NULL, steps[ip]);
      size_t mism = 0;
      for (size_t i = 0; i < n; i++) {
        int dropped = ref64_dropped(i, ps[ip], 1234u + (uint32_t)ip,
                                    (uint32_t)rank, 7u, steps[ip]);
        if (dropped != (y[i] == 0.0f))
          mism++;
      }
      if (mism)
        fail_msg("p=%g rank=%d: %zu of %zu elements differ from the rule",
                 ps[ip], rank, mism, n);
      sbn_layer_destroy(l);
    }
  free(x), free(y);
}

/* The dropped fraction is within 6 sigma of p; kept values are scaled by
 * 1/(1-p) (exactly when that is a power of two, else within the rounding
 * of the scale factor); backward zeroes exactly the same elements. */
static void test_fraction_and_scale(void **state) {
  (void)state;
  const size_t n = 200003;
  sbn_tensor_desc_t d =
      tu_desc(SBN_LAYOUT_NCHW, 3, (size_t)7, (size_t)1, n / 7);
  size_t nn = tu_numel(&d);
  float *x = tu_floats(nn), *y = tu_floats(nn), *dy = tu_floats(nn),
        *dx = tu_floats(nn);
  tu_rng_t rng;
  tu_rng_seed(&rng, 5);
  /* Nonzero inputs, so a zero output always means "dropped". */
  for (size_t i = 0; i < nn; i++) {
    x[i] = (float)(1.0 + tu_rng_uniform(&rng)) * (i % 2 ? 1.f : -1.f);
    dy[i] = (float)(0.5 + tu_rng_uniform(&rng));
  }
  const double ps[] = {0.01, 0.1, 0.3, 0.5, 0.75, 0.9, 0.99};
  for (int ip = 0; ip < 7; ip++) {
    double p = ps[ip];
    sbn_layer_t *l = do_layer(p, 42u + (uint32_t)ip, 3, NULL);
    do_run(l, SBN_MODE_TRAIN, &d, x, y, dy, dx, 17);
    size_t dropped = 0;
    double exact = 1.0 / (1.0 - p);
    int pow2 = (p == 0.5 || p == 0.75);
    for (size_t i = 0; i < nn; i++) {
      if (y[i] == 0.0f) {
        dropped++;
        if (dx[i] != 0.0f)
          fail_msg("p=%g: dx[%zu] = %g where y was dropped", p, i,
                   (double)dx[i]);
        continue;
      }
      double want = (double)x[i] * exact, dwant = (double)dy[i] * exact;
      if (pow2) {
        if (y[i] != (float)want || dx[i] != (float)dwant)
          fail_msg("p=%g: element %zu not scaled exactly", p, i);
      } else if (fabs(y[i] - want) > 0x1p-23 * fabs(want) ||
                 fabs(dx[i] - dwant) > 0x1p-23 * fabs(dwant)) {
        fail_msg("p=%g: element %zu scaled to %.9g, expected %.9g", p, i,
                 (double)y[i], want);
      }
      if (dx[i] == 0.0f)
        fail_msg("p=%g: dx[%zu] dropped where y was kept", p, i);
    }
    double frac = (double)dropped / (double)nn;
    double sigma = sqrt(p * (1 - p) / (double)nn);
    printf("# dropout p=%.2f: dropped fraction %.5f (%.2f sigma)\n", p, frac,
           (frac - p) / sigma);
    if (fabs(frac - p) > 6 * sigma)
      fail_msg("p=%g: dropped fraction %g is %.1f sigma away", p, frac,
               fabs(frac - p) / sigma);
    sbn_layer_destroy(l);
  }
  free(x), free(y), free(dy), free(dx);
}

static void test_p0_p1_eval(void **state) {
  (void)state;
  const size_t n = 1001;
  sbn_tensor_desc_t d = tu_desc(SBN_LAYOUT_NCHW, 2, (size_t)7, (size_t)143);
  float *x = tu_floats(n), *y = tu_floats(n), *dy = tu_floats(n),
        *dx = tu_floats(n);
  tu_rng_t rng;
  tu_rng_seed(&rng, 6);
  tu_fill_normal(&rng, x, n, 0, 3);
  tu_fill_normal(&rng, dy, n, 0, 1);
  /* p = 0: identity, bit for bit. */
  sbn_layer_t *l = do_layer(0.0, 1, 1, NULL);
  do_run(l, SBN_MODE_TRAIN, &d, x, y, dy, dx, 3);
  assert_memory_equal(y, x, n * sizeof *x);
  assert_memory_equal(dx, dy, n * sizeof *dy);
  sbn_layer_destroy(l);
  /* p = 1: all zeros, no inf or NaN from 1/(1-p). */
  l = do_layer(1.0, 1, 1, NULL);
  do_run(l, SBN_MODE_TRAIN, &d, x, y, dy, dx, 3);
  for (size_t i = 0; i < n; i++) {
    if (!(y[i] == 0.0f) || !(dx[i] == 0.0f))
      fail_msg("p=1: element %zu is %g / %g", i, (double)y[i], (double)dx[i]);
  }
  /* Eval: identity whatever p is. */
  do_run(l, SBN_MODE_EVAL, &d, x, y, dy, dx, 3);
  assert_memory_equal(y, x, n * sizeof *x);
  assert_memory_equal(dx, dy, n * sizeof *dy);
  sbn_layer_destroy(l);
  l = do_layer(0.5, 1, 1, NULL);
  do_run(l, SBN_MODE_EVAL, &d, x, y, dy, dx, 3);
  assert_memory_equal(y, x, n * sizeof *x);
  assert_memory_equal(dx, dy, n * sizeof *dy);
  sbn_layer_destroy(l);
  free(x), free(y), free(dy), free(dx);
}

/* Fraction of positions where two masks differ (each about p(1-p)*2 for
 * independent masks). */
static double mask_diff(const float *a, const float *b, size_t n) {
  size_t k = 0;
  for (size_t i = 0; i < n; i++)
    k += (a[i] == 0.0f) != (b[i] == 0.0f);
  return (double)k / (double)n;
}

static void test_mask_dependence(void **state) {
  (void)state;
  const size_t n = 4099;
  sbn_tensor_desc_t d = tu_desc(SBN_LAYOUT_NCHW, 1, n);
  float *x = tu_floats(n), *y0 = tu_floats(n), *y1 = tu_floats(n);
  for (size_t i = 0; i < n; i++)
    x[i] = 1.0f;
  sbn_comm_t fake = {&fake_vt, 0, 1, 1};
  sbn_layer_t *base = do_layer(0.5, 99, 4, NULL);
  do_run(base, SBN_MODE_TRAIN, &d, x, y0, NULL, NULL, 10);

  /* Same (seed, rank, layer, step): the same mask, from a fresh layer. */
  sbn_layer_t *same = do_layer(0.5, 99, 4, NULL);
  do_run(same, SBN_MODE_TRAIN, &d, x, y1, NULL, NULL, 10);
  assert_memory_equal(y0, y1, n * sizeof *y0);
  /* The shape does not matter, only memory order. */
  sbn_tensor_desc_t d3 = tu_desc(SBN_LAYOUT_NCHW, 3, (size_t)1, (size_t)1, n);
  do_run(same, SBN_MODE_TRAIN, &d3, x, y1, NULL, NULL, 10);
  assert_memory_equal(y0, y1, n * sizeof *y0);
  sbn_layer_destroy(same);

  struct {
    const char *what;
    double p;
    uint32_t seed, layer;
    sbn_comm_t *comm;
    uint64_t step;
  } var[] = {
      {"rank", 0.5, 99, 4, &fake, 10},
      {"layer", 0.5, 99, 5, NULL, 10},
      {"step", 0.5, 99, 4, NULL, 11},
      {"seed", 0.5, 100, 4, NULL, 10},
  };
  for (int i = 0; i < 4; i++) {
    sbn_layer_t *l = do_layer(var[i].p, var[i].seed, var[i].layer, var[i].comm);
    do_run(l, SBN_MODE_TRAIN, &d, x, y1, NULL, NULL, var[i].step);
    double f = mask_diff(y0, y1, n);
    /* Independent masks at p = 0.5 differ in half the positions; allow 6
     * sigma around that. */
    if (fabs(f - 0.5) > 6 * sqrt(0.25 / (double)n))
      fail_msg("changing the %s: masks differ in a fraction %g, expected ~0.5",
               var[i].what, f);
    sbn_layer_destroy(l);
  }
  sbn_layer_destroy(base);
  free(x), free(y0), free(y1);
}

/* In place: y may equal x and dx may equal dy. */
static void test_in_place(void **state) {
  (void)state;
  const size_t n = 515;
  sbn_tensor_desc_t d = tu_desc(SBN_LAYOUT_NCHW, 1, n);
  float *x = tu_floats(n), *y = tu_floats(n), *buf = tu_floats(n);
  for (size_t i = 0; i < n; i++)
    x[i] = (float)i + 0.5f;
  sbn_layer_t *l = do_layer(0.3, 8, 8, NULL);
  do_run(l, SBN_MODE_TRAIN, &d, x, y, NULL, NULL, 2);
  memcpy(buf, x, n * sizeof *buf);
  do_run(l, SBN_MODE_TRAIN, &d, buf, buf, NULL, NULL, 2);
  assert_memory_equal(buf, y, n * sizeof *y);
  memcpy(buf, x, n * sizeof *buf);
  do_run(l, SBN_MODE_TRAIN, &d, x, y, buf, buf, 2);
  assert_memory_equal(buf, y, n * sizeof *y);
  sbn_layer_destroy(l);
  free(x), free(y), free(buf);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_philox_kat),
      cmocka_unit_test(test_mask_matches_rule),
      cmocka_unit_test(test_fraction_and_scale),
      cmocka_unit_test(test_p0_p1_eval),
      cmocka_unit_test(test_mask_dependence),
      cmocka_unit_test(test_in_place),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
