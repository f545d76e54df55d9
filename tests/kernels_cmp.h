/* The kernel-set comparisons shared by kernels_test.c and
 * kernels_group_test.c: one op run on guarded, optionally misaligned
 * buffers with the current set, and every output of a set compared with
 * the reference's. Included by those test programs only (cmocka's
 * headers first). */
#ifndef SBN_TESTS_KERNELS_CMP_H
#define SBN_TESTS_KERNELS_CMP_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"

#define GUARD 19
#define SENTINEL 12345.678f

/* Layers are made without affine parameters while this is set (the
 * GroupNorm NCHW backward then runs its weightless flat dx). */
static int no_affine __attribute__((unused));
/* GroupNorm's group count when set (else 3 when C allows, or 1). */
static size_t n_groups __attribute__((unused));

typedef struct {
  float *y, *dx, *dw, *db, *rm, *rv;
  int64_t nbt;
  float *ybase, *dxbase; /* y and dx sit `off` floats into these */
} outs_t;

/* The group teardown of both kernel tests: the largest errors seen
 * against the reference. */
static inline int kc_report(void **state) {
  (void)state;
  tu_err_report("optimized vs ref");
  return 0;
}

static inline float *guarded(size_t n) {
  float *a = tu_floats(n + GUARD);
  for (size_t i = 0; i < n + GUARD; i++)
    a[i] = SENTINEL;
  return a;
}

static inline void check_guard(const float *a, size_t n, const char *what) {
  for (size_t i = n; i < n + GUARD; i++)
    if (a[i] != SENTINEL)
      fail_msg("%s: element %zu past the end (n=%zu) was overwritten", what, i,
               n);
}

/* Runs op on (N, C, S) (LN: N rows of C) with the current kernel set, with
 * x, dy, y and dx `off` floats past a 64-byte boundary (0: aligned). */
static inline void run_op_at(sbn_op_t op, sbn_layout_t lay, size_t N, size_t C,
                             size_t S, sbn_mode_t mode, size_t off, outs_t *o,
                             const char *what) {
  size_t n = N * C * S;
  sbn_tensor_desc_t d = op == SBN_OP_LAYERNORM
                            ? tu_desc(SBN_LAYOUT_NCHW, 3, N, S, C)
                            : tu_desc(lay, 3, N, C, S);
  tu_rng_t rng;
  tu_rng_seed(&rng, 1000 + N * 31 + C * 7 + S);
  float *xbase = tu_floats(n + off), *dybase = tu_floats(n + off);
  float *x = xbase + off, *dy = dybase + off, *w = tu_floats(C),
        *b = tu_floats(C);
  tu_fill_normal(&rng, x, n, 2, 3);
  tu_fill_normal(&rng, dy, n, 0, 1);
  tu_fill_normal(&rng, w, C, 1, 0.5);
  tu_fill_normal(&rng, b, C, 0, 0.5);
  o->ybase = guarded(n + off), o->dxbase = guarded(n + off);
  o->y = o->ybase + off, o->dx = o->dxbase + off;
  o->dw = guarded(C), o->db = guarded(C);
  o->rm = guarded(C), o->rv = guarded(C);
  for (size_t c = 0; c < C; c++)
    o->rm[c] = 0.1f * (float)c, o->rv[c] = 1.5f;
  sbn_layer_params_t p;
  sbn_layer_params_default(&p, op);
  p.channels = C;
  p.groups = n_groups != 0 ? n_groups : (C % 3 == 0) ? 3 : 1;
  p.affine = !no_affine;
  p.norm_ndim = 1;
  p.norm_shape[0] = C;
  p.track_running_stats = (op == SBN_OP_BATCHNORM || op == SBN_OP_INSTANCENORM);
  sbn_layer_t *l = tu_layer(&p, NULL);
  sbn_state_t st = {o->rm, o->rv, 0};
  tu_run_t r = {mode,
                &d,
                x,
                w,
                b,
                dy,
                o->y,
                o->dx,
                o->dw,
                o->db,
                p.track_running_stats ? &st : NULL,
                0};
  int stage, rc = tu_run(l, &r, &stage);
  if (rc != 0)
    fail_msg("%s: stage %d: %s (%s)", what, stage, sbn_err_name(rc),
             sbn_last_error());
  check_guard(o->y, n, what);
  check_guard(o->dx, n, what);
  check_guard(o->dw, C, what);
  check_guard(o->db, C, what);
  o->nbt = st.num_batches_tracked;
  sbn_layer_destroy(l);
  free(xbase), free(dybase), free(w), free(b);
}

static inline void run_op(sbn_op_t op, sbn_layout_t lay, size_t N, size_t C,
                          size_t S, sbn_mode_t mode, outs_t *o,
                          const char *what) {
  run_op_at(op, lay, N, C, S, mode, 0, o, what);
}

static inline void free_outs(outs_t *o) {
  free(o->ybase), free(o->dxbase), free(o->dw), free(o->db), free(o->rm);
  free(o->rv);
}

/* Every output of set b against ref's a on one case. */
static inline void compare_outs(sbn_op_t op, const char *opn, size_t N,
                                size_t C, size_t S, const outs_t *a,
                                const outs_t *b, const char *what) {
  size_t n = N * C * S;
  double e;
  char lab[32];
  e = tu_rel_l2_ff(b->y, a->y, n);
  snprintf(lab, sizeof lab, "%s.y", opn);
  tu_err_note(lab, e);
  TU_ASSERT_REL(e, 1e-5, "%s y", what);
  e = tu_rel_l2_ff(b->dx, a->dx, n);
  /* Elements per statistic. With one, dx is an exact zero
   * computed as a difference of large terms; with two, dx is
   * about eps/var times dy, again a cancellation that no fp32
   * kernel gets to 1e-4 relative. Neither says anything about
   * a kernel set, so their dx is not compared. */
  size_t m = op == SBN_OP_BATCHNORM      ? N * S
             : op == SBN_OP_INSTANCENORM ? S
             : op == SBN_OP_GROUPNORM    ? (C / (n_groups != 0 ? n_groups
                                                 : C % 3       ? 1
                                                               : 3)) *
                                            S
                                      : C;
  if (m > 2) {
    snprintf(lab, sizeof lab, "%s.dx", opn);
    tu_err_note(lab, e);
    TU_ASSERT_REL(e, 1e-4, "%s dx", what);
  }
  e = tu_rel_l2_ff(b->dw, a->dw, C);
  snprintf(lab, sizeof lab, "%s.dweight", opn);
  tu_err_note(lab, e);
  TU_ASSERT_REL(e, 1e-4, "%s dweight", what);
  e = tu_rel_l2_ff(b->db, a->db, C);
  snprintf(lab, sizeof lab, "%s.dbias", opn);
  tu_err_note(lab, e);
  TU_ASSERT_REL(e, 1e-5, "%s dbias", what);
  TU_ASSERT_REL(tu_rel_l2_ff(b->rm, a->rm, C), 1e-5, "%s running_mean", what);
  TU_ASSERT_REL(tu_rel_l2_ff(b->rv, a->rv, C), 1e-5, "%s running_var", what);
  assert_int_equal(a->nbt, b->nbt);
}

/* Runs op on (N, C, S) with set `set` (its buffers `off` floats off
 * alignment) and with ref at offset 0, and compares every output. */
static inline void vs_ref(const char *set, sbn_op_t op, const char *opn,
                          sbn_layout_t lay, size_t N, size_t C, size_t S,
                          sbn_mode_t mode, size_t off, const char *what) {
  outs_t a, b;
  assert_int_equal(sbn_kernel_select("ref"), 0);
  run_op_at(op, lay, N, C, S, mode, 0, &a, what);
  assert_int_equal(sbn_kernel_select(set), 0);
  run_op_at(op, lay, N, C, S, mode, off, &b, what);
  compare_outs(op, opn, N, C, S, &a, &b, what);
  free_outs(&a);
  free_outs(&b);
}

#endif /* SBN_TESTS_KERNELS_CMP_H */
