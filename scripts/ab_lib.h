/* What the two-build harnesses (ln_ab.c, bn_consume_ab.c) share: one
 * libsyncbn build opened with dlopen, its entry points, and the timing
 * helpers. Header-only; each harness is one file built by hand (see its
 * comment), not by CMake. */
#ifndef SBN_SCRIPTS_AB_LIB_H
#define SBN_SCRIPTS_AB_LIB_H

#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "syncbn.h"

/* One build: its entries, and the layer, workspace and saved state the
 * harness gives it (owned by the harness). */
typedef struct {
  void (*pd)(sbn_layer_params_t *, sbn_op_t);
  int (*cr)(const sbn_layer_params_t *, sbn_comm_t *, sbn_layer_t **);
  int (*sz)(const sbn_layer_t *, const sbn_tensor_desc_t *, size_t *, size_t *);
  int (*fw)(sbn_layer_t *, const sbn_forward_args_t *);
  int (*bw)(sbn_layer_t *, const sbn_backward_args_t *);
  const char *(*err)(void);
  sbn_layer_t *l;
  void *ws, *sv;
  size_t wsb, svb;
} lib_t;

/* Opens the build at path into L (its layer fields left for the caller);
 * 0, or 1 having printed why not. */
static int ab_lib_open(const char *path, lib_t *L) {
  void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (h == NULL) {
    fprintf(stderr, "%s\n", dlerror());
    return 1;
  }
  L->pd = (void (*)(sbn_layer_params_t *, sbn_op_t))dlsym(
      h, "sbn_layer_params_default");
  L->cr = (int (*)(const sbn_layer_params_t *, sbn_comm_t *,
                   sbn_layer_t **))dlsym(h, "sbn_layer_create");
  L->sz = (int (*)(const sbn_layer_t *, const sbn_tensor_desc_t *, size_t *,
                   size_t *))dlsym(h, "sbn_layer_sizes");
  L->fw = (int (*)(sbn_layer_t *, const sbn_forward_args_t *))dlsym(
      h, "sbn_forward");
  L->bw = (int (*)(sbn_layer_t *, const sbn_backward_args_t *))dlsym(
      h, "sbn_backward");
  L->err = (const char *(*)(void))dlsym(h, "sbn_last_error");
  if (!L->pd || !L->cr || !L->sz || !L->fw || !L->bw || !L->err) {
    fprintf(stderr, "%s lacks the API\n", path);
    return 1;
  }
  return 0;
}

static double ab_now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e6 + t.tv_nsec * 1e-3;
}

static int ab_cmp(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

/* The median of v[0..n) (reorders v). */
static double ab_med(double *v, int n) {
  qsort(v, (size_t)n, sizeof *v, ab_cmp);
  return v[n / 2];
}

#endif
