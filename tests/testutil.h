/* Shared helpers for the unit tests: a deterministic random source,
 * normalized error measures against a float64 reference, tensor helpers,
 * and a one-call forward + backward runner that sizes workspace and saved
 * state through sbn_layer_sizes(). */
#ifndef SBN_TESTUTIL_H
#define SBN_TESTUTIL_H

#include <stddef.h>
#include <stdint.h>

#include "syncbn.h"

/* Deterministic random numbers: splitmix64, Box-Muller for normals. */
typedef struct tu_rng_s {
  uint64_t s;
  int have_spare;
  double spare;
} tu_rng_t;

void tu_rng_seed(tu_rng_t *r, uint64_t seed);
uint64_t tu_rng_u64(tu_rng_t *r);
/* Uniform in [0, 1) with 53 random bits. */
double tu_rng_uniform(tu_rng_t *r);
double tu_rng_normal(tu_rng_t *r);

/* a[i] = mean + std * N(0, 1), rounded to float. */
void tu_fill_normal(tu_rng_t *r, float *a, size_t n, double mean, double std);

/* Allocation that aborts the test program on failure (n may be 0). */
void *tu_xmalloc(size_t bytes);
float *tu_floats(size_t n);
double *tu_doubles(size_t n);
/* A newly allocated double copy of a float array, and the reverse copy. */
double *tu_to_double(const float *a, size_t n);
void tu_to_float(const double *a, float *out, size_t n);

/* ||got - ref||_2 / ||ref||_2 over n elements. When ||ref|| is 0 the
 * absolute norm ||got|| is returned. Any non-finite value in got or ref
 * gives +inf, so a NaN can never pass a tolerance. */
double tu_rel_l2(const float *got, const double *ref, size_t n);
/* The same between two float arrays (b is the reference). */
double tu_rel_l2_ff(const float *a, const float *b, size_t n);
/* Number of non-finite values. */
size_t tu_count_nonfinite(const float *a, size_t n);

/* Builds a descriptor from ndim dims (varargs of type size_t). */
sbn_tensor_desc_t tu_desc(sbn_layout_t layout, int ndim, ...);
size_t tu_numel(const sbn_tensor_desc_t *d);
/* Copies a tensor of logical shape d (d->layout ignored) between the NCHW
 * and NHWC memory orders. */
void tu_nchw_to_nhwc(const sbn_tensor_desc_t *d, const float *in, float *out);
void tu_nhwc_to_nchw(const sbn_tensor_desc_t *d, const float *in, float *out);

/* The kernel sets every op is checked with; sets the CPU lacks are skipped
 * with a visible note. Returns the number of names in *names. */
int tu_kernel_sets(const char *const **names);
/* Selects a set; returns 0, or 1 after printing a skip note if the CPU
 * cannot run it (any other failure aborts). */
int tu_kernel_use(const char *name);

/* One forward and (if dy != NULL) one backward of a layer. The runner
 * queries sbn_layer_sizes() and allocates workspace and saved state of
 * exactly that size (so a sanitizer build catches overruns). */
typedef struct tu_run_s {
  sbn_mode_t mode;
  const sbn_tensor_desc_t *desc;
  const float *x, *w, *b, *dy;
  float *y, *dx, *dw, *db;
  sbn_state_t *state;
  uint64_t step;
} tu_run_t;

/* Returns 0 or the first failing call's code; *stage (may be NULL) tells
 * which call failed: 0 sizes, 1 forward, 2 backward. */
int tu_run(sbn_layer_t *l, const tu_run_t *r, int *stage);

/* Creates a layer or fails the test. */
sbn_layer_t *tu_layer(const sbn_layer_params_t *p, sbn_comm_t *comm);

/* Records a measured error under a label and keeps the maximum per label;
 * tu_err_report() prints the table (for the record of error levels). */
void tu_err_note(const char *label, double err);
void tu_err_report(const char *title);

/* The test-assertion forms (need cmocka.h included before this header's
 * users expand them). */
#define TU_ASSERT_REL(err, tol, ...)                                    \
  do {                                                                  \
    double tu_e_ = (err);                                               \
    if (!(tu_e_ <= (tol))) {                                            \
      char tu_m_[256];                                                  \
      snprintf(tu_m_, sizeof tu_m_, __VA_ARGS__);                       \
      fail_msg("%s: relative L2 error %.3g exceeds %.1g", tu_m_, tu_e_, \
               (double)(tol));                                          \
    }                                                                   \
  } while (0)

#define TU_ASSERT_RC(call, want)                                               \
  do {                                                                         \
    int tu_rc_ = (call);                                                       \
    if (tu_rc_ != (want))                                                      \
      fail_msg("%s returned %d (%s), expected %d (%s); last error: %s", #call, \
               tu_rc_, sbn_err_name(tu_rc_), (int)(want), sbn_err_name(want),  \
               sbn_last_error());                                              \
  } while (0)

#endif /* SBN_TESTUTIL_H */
