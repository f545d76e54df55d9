/* Replays the PyTorch golden vectors (tests/data/golden/, written by
 * scripts/make_goldens.py; the file format is documented there) through
 * the library on every kernel set, and through the float64 reference as a
 * check of the reference itself. */
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

#ifndef SBN_TEST_DATA_DIR
#define SBN_TEST_DATA_DIR "tests/data"
#endif
#define GOLDEN_DIR SBN_TEST_DATA_DIR "/golden"

#define TOL_Y 1e-5
#define TOL_DX 1e-4
#define MAX_ARRAYS 16

typedef struct {
  char op[32], mode[16], layout[16];
  int ndim, norm_ndim;
  size_t dims[SBN_MAX_DIMS], norm_shape[SBN_MAX_DIMS];
  size_t channels, groups, ghost_batch;
  double eps, momentum;
  int cumulative, affine, track;
  long long nbt_in, nbt_out;
  int narrays;
  char names[MAX_ARRAYS][32];
  size_t counts[MAX_ARRAYS];
  double *data[MAX_ARRAYS];
} golden_t;

static void golden_free(golden_t *g) {
  for (int i = 0; i < g->narrays; i++)
    free(g->data[i]);
}

static int parse_sizes(const char *s, size_t *out, int max) {
  int n = 0;
  char *end;
  while (n < max) {
    unsigned long long v = strtoull(s, &end, 10);
    if (end == s)
      break;
    out[n++] = (size_t)v;
    s = end;
  }
  return n;
}

/* Reads one golden file; fails the test on any malformation. */
static void golden_read(const char *path, golden_t *g) {
  char line[512];
  memset(g, 0, sizeof *g);
  g->groups = 1;
  FILE *f = fopen(path, "rb");
  if (f == NULL)
    fail_msg("cannot open %s", path);
  if (!fgets(line, sizeof line, f) || strcmp(line, "SBNGOLD 1\n") != 0)
    fail_msg("%s: not a version 1 golden file", path);
  for (;;) {
    if (!fgets(line, sizeof line, f))
      fail_msg("%s: header has no end", path);
    line[strcspn(line, "\n")] = 0;
    char *sp = strchr(line, ' ');
    const char *val = sp ? sp + 1 : "";
    if (sp)
      *sp = 0;
    if (strcmp(line, "end") == 0)
      break;
    if (strcmp(line, "op") == 0)
      snprintf(g->op, sizeof g->op, "%s", val);
    else if (strcmp(line, "mode") == 0)
      snprintf(g->mode, sizeof g->mode, "%s", val);
    else if (strcmp(line, "layout") == 0)
      snprintf(g->layout, sizeof g->layout, "%s", val);
    else if (strcmp(line, "dims") == 0)
      g->ndim = parse_sizes(val, g->dims, SBN_MAX_DIMS);
    else if (strcmp(line, "norm_shape") == 0)
      g->norm_ndim = parse_sizes(val, g->norm_shape, SBN_MAX_DIMS);
    else if (strcmp(line, "channels") == 0)
      g->channels = strtoull(val, NULL, 10);
    else if (strcmp(line, "groups") == 0)
      g->groups = strtoull(val, NULL, 10);
    else if (strcmp(line, "eps") == 0)
      g->eps = strtod(val, NULL);
    else if (strcmp(line, "momentum") == 0)
      g->momentum = strtod(val, NULL);
    else if (strcmp(line, "cumulative") == 0)
      g->cumulative = atoi(val);
    else if (strcmp(line, "affine") == 0)
      g->affine = atoi(val);
    else if (strcmp(line, "track") == 0)
      g->track = atoi(val);
    else if (strcmp(line, "ghost_batch") == 0)
      g->ghost_batch = strtoull(val, NULL, 10);
    else if (strcmp(line, "nbt_in") == 0)
      g->nbt_in = atoll(val);
    else if (strcmp(line, "nbt_out") == 0)
      g->nbt_out = atoll(val);
    else if (strcmp(line, "array") == 0) {
      if (g->narrays == MAX_ARRAYS)
        fail_msg("%s: too many arrays", path);
      char name[32];
      unsigned long long cnt;
      if (sscanf(val, "%31s %llu", name, &cnt) != 2)
        fail_msg("%s: bad array line '%s'", path, val);
      snprintf(g->names[g->narrays], sizeof g->names[0], "%s", name);
      g->counts[g->narrays++] = (size_t)cnt;
    } else {
      fail_msg("%s: unknown header key '%s'", path, line);
    }
  }
  for (int i = 0; i < g->narrays; i++) {
    unsigned char *raw = tu_xmalloc(g->counts[i] * 8);
    if (fread(raw, 8, g->counts[i], f) != g->counts[i])
      fail_msg("%s: array %s is truncated", path, g->names[i]);
    g->data[i] = tu_doubles(g->counts[i]);
    for (size_t j = 0; j < g->counts[i]; j++) {
      uint64_t u = 0;
      for (int k = 7; k >= 0; k--)
        u = (u << 8) | raw[j * 8 + (size_t)k];
      memcpy(&g->data[i][j], &u, 8);
    }
    free(raw);
  }
  if (fgetc(f) != EOF)
    fail_msg("%s: trailing bytes", path);
  fclose(f);
}

static const double *arr(const golden_t *g, const char *name, size_t *n) {
  for (int i = 0; i < g->narrays; i++)
    if (strcmp(g->names[i], name) == 0) {
      if (n)
        *n = g->counts[i];
      return g->data[i];
    }
  return NULL;
}

static float *floats_of(const double *a, size_t n) {
  float *f = tu_floats(n);
  if (a)
    tu_to_float(a, f, n);
  return f;
}

static void check(const char *file, const char *kset, const char *what,
                  const float *got, const double *want, size_t n, double tol,
                  const char *op) {
  double e = tu_rel_l2(got, want, n);
  char lab[48];
  snprintf(lab, sizeof lab, "%s.%s", op, what);
  tu_err_note(lab, e);
  TU_ASSERT_REL(e, tol, "%s [%s] %s", file, kset, what);
}

static void check_d(const char *file, const char *what, const double *got,
                    const double *want, size_t n) {
  double num = 0, den = 0;
  for (size_t i = 0; i < n; i++) {
    num += (got[i] - want[i]) * (got[i] - want[i]);
    den += want[i] * want[i];
  }
  double e = den > 0 ? sqrt(num / den) : sqrt(num);
  if (!(e <= 1e-10))
    fail_msg("%s: the float64 reference disagrees with PyTorch on %s (%.3g)",
             file, what, e);
}

/* Runs one golden case through the library with the current kernel set. */
static void run_golden(const char *file, const golden_t *g, const char *kset) {
  sbn_layer_params_t p;
  sbn_op_t op;
  if (sbn_op_parse(g->op, &op) != 0)
    fail_msg("%s: unknown op %s", file, g->op);
  sbn_layer_params_default(&p, op);
  p.channels = g->channels;
  p.groups = g->groups;
  p.norm_ndim = g->norm_ndim;
  memcpy(p.norm_shape, g->norm_shape, sizeof p.norm_shape);
  p.eps = g->eps;
  p.momentum = g->momentum;
  p.cumulative = g->cumulative;
  p.affine = g->affine;
  p.track_running_stats = g->track;
  p.ghost_batch = g->ghost_batch;
  sbn_layer_t *l = tu_layer(&p, NULL);
  sbn_tensor_desc_t d;
  memset(&d, 0, sizeof d);
  d.ndim = g->ndim;
  memcpy(d.dims, g->dims, sizeof d.dims);
  d.layout = strcmp(g->layout, "nhwc") == 0 ? SBN_LAYOUT_NHWC : SBN_LAYOUT_NCHW;
  size_t n = 0, C = 0, k = 0;
  const double *x = arr(g, "x", &n), *dy = arr(g, "dy", &k);
  if (!x || !dy || k != n || n != tu_numel(&d))
    fail_msg("%s: bad x/dy", file);
  const double *w = arr(g, "weight", &C), *b = arr(g, "bias", NULL);
  const double *rmi = arr(g, "running_mean_in", &C),
               *rvi = arr(g, "running_var_in", NULL);
  if (!w && !rmi)
    C = op == SBN_OP_LAYERNORM ? 0 : g->channels;
  float *xf = floats_of(x, n), *dyf = floats_of(dy, n), *y = tu_floats(n),
        *dx = tu_floats(n);
  float *wf = floats_of(w, C), *bf = floats_of(b, C), *dw = tu_floats(C),
        *db = tu_floats(C), *rm = floats_of(rmi, C), *rv = floats_of(rvi, C);
  sbn_state_t st = {rm, rv, g->nbt_in};
  sbn_mode_t mode =
      strcmp(g->mode, "eval") == 0 ? SBN_MODE_EVAL : SBN_MODE_TRAIN;
  tu_run_t r = {mode,
                &d,
                xf,
                w ? wf : NULL,
                b ? bf : NULL,
                dyf,
                y,
                dx,
                w ? dw : NULL,
                b ? db : NULL,
                rmi ? &st : NULL,
                0};
  int stage, rc = tu_run(l, &r, &stage);
  if (rc != 0)
    fail_msg("%s [%s]: stage %d: %s (%s)", file, kset, stage, sbn_err_name(rc),
             sbn_last_error());
  const char *opn = sbn_op_name(op);
  check(file, kset, "y", y, arr(g, "y", NULL), n, TOL_Y, opn);
  check(file, kset, "dx", dx, arr(g, "dx", NULL), n, TOL_DX, opn);
  if (w) {
    check(file, kset, "dweight", dw, arr(g, "dweight", NULL), C, TOL_DX, opn);
    check(file, kset, "dbias", db, arr(g, "dbias", NULL), C, TOL_Y, opn);
  }
  if (rmi) {
    check(file, kset, "running_mean", rm, arr(g, "running_mean_out", NULL), C,
          TOL_Y, opn);
    check(file, kset, "running_var", rv, arr(g, "running_var_out", NULL), C,
          TOL_Y, opn);
    if (op == SBN_OP_BATCHNORM && st.num_batches_tracked != g->nbt_out)
      fail_msg("%s [%s]: num_batches_tracked %lld, PyTorch %lld", file, kset,
               (long long)st.num_batches_tracked, g->nbt_out);
  }
  sbn_layer_destroy(l);
  free(xf), free(dyf), free(y), free(dx), free(wf), free(bf), free(dw);
  free(db), free(rm), free(rv);
}

/* The float64 reference on the same inputs, which must agree with PyTorch
 * to float64 precision: this pins the reference's semantics (cumulative
 * averages, InstanceNorm running statistics, eval formulas). */
static void ref_golden(const char *file, const golden_t *g) {
  sbn_tensor_desc_t d;
  memset(&d, 0, sizeof d);
  d.ndim = g->ndim;
  memcpy(d.dims, g->dims, sizeof d.dims);
  d.layout = strcmp(g->layout, "nhwc") == 0 ? SBN_LAYOUT_NHWC : SBN_LAYOUT_NCHW;
  size_t n = tu_numel(&d), C = 0;
  const double *x = arr(g, "x", NULL), *dy = arr(g, "dy", NULL);
  const double *w = arr(g, "weight", &C), *b = arr(g, "bias", NULL);
  const double *rmi = arr(g, "running_mean_in", &C),
               *rvi = arr(g, "running_var_in", NULL);
  if (!w && !rmi)
    C = g->channels;
  if (strcmp(g->op, "layernorm") == 0) {
    C = 1;
    for (int i = 0; i < g->norm_ndim; i++)
      C *= g->norm_shape[i];
  }
  int train = strcmp(g->mode, "train") == 0;
  double *y = tu_doubles(n), *dx = tu_doubles(n), *dw = tu_doubles(C),
         *db = tu_doubles(C), *rm = tu_doubles(C), *rv = tu_doubles(C);
  if (rmi)
    memcpy(rm, rmi, C * sizeof *rm), memcpy(rv, rvi, C * sizeof *rv);
  int64_t nbt = g->nbt_in;
  if (strcmp(g->op, "batchnorm") == 0) {
    ref64_bn_ghost_forward(&d, g->ghost_batch, x, y, w, b, rmi ? rm : NULL,
                           rmi ? rv : NULL, &nbt, g->eps, g->momentum,
                           g->cumulative, train);
    ref64_bn_ghost_backward(&d, g->ghost_batch, x, dy, dx, w, dw, db, rmi, rvi,
                            g->eps, train);
  } else if (strcmp(g->op, "instancenorm") == 0) {
    ref64_in_forward(&d, x, y, w, b, rmi ? rm : NULL, rmi ? rv : NULL, g->eps,
                     g->momentum, train);
    ref64_in_backward(&d, x, dy, dx, w, dw, db, rmi, rvi, g->eps, train);
  } else if (strcmp(g->op, "groupnorm") == 0) {
    ref64_gn_forward(&d, g->groups, x, y, w, b, g->eps);
    ref64_gn_backward(&d, g->groups, x, dy, dx, w, dw, db, g->eps);
  } else {
    ref64_ln_forward(n, C, x, y, w, b, g->eps);
    ref64_ln_backward(n, C, x, dy, dx, w, dw, db, g->eps);
  }
  check_d(file, "y", y, arr(g, "y", NULL), n);
  check_d(file, "dx", dx, arr(g, "dx", NULL), n);
  if (w) {
    check_d(file, "dweight", dw, arr(g, "dweight", NULL), C);
    check_d(file, "dbias", db, arr(g, "dbias", NULL), C);
  }
  if (rmi) {
    check_d(file, "running_mean", rm, arr(g, "running_mean_out", NULL), C);
    check_d(file, "running_var", rv, arr(g, "running_var_out", NULL), C);
  }
  free(y), free(dx), free(dw), free(db), free(rm), free(rv);
}

static char manifest[128][128];
static int nmanifest;

static void read_manifest(void) {
  FILE *f = fopen(GOLDEN_DIR "/MANIFEST", "r");
  char line[120];
  if (f == NULL)
    fail_msg("cannot open " GOLDEN_DIR "/MANIFEST");
  nmanifest = 0;
  while (fgets(line, sizeof line, f) && nmanifest < 128) {
    line[strcspn(line, "\n")] = 0;
    if (line[0])
      snprintf(manifest[nmanifest++], sizeof manifest[0], "%s", line);
  }
  fclose(f);
  /* The generator writes more than 40 cases; far fewer means the data set
   * was damaged, which must not pass silently. */
  if (nmanifest < 40)
    fail_msg("MANIFEST lists only %d cases", nmanifest);
}

static void test_goldens(void **state) {
  (void)state;
  read_manifest();
  const char *const *sets;
  int nsets = tu_kernel_sets(&sets), ops_seen = 0;
  for (int i = 0; i < nmanifest; i++) {
    char path[1024];
    golden_t g;
    snprintf(path, sizeof path, "%s/%.127s", GOLDEN_DIR, manifest[i]);
    golden_read(path, &g);
    ref_golden(manifest[i], &g);
    for (int ks = 0; ks < nsets; ks++) {
      if (tu_kernel_use(sets[ks]))
        continue;
      run_golden(manifest[i], &g, sets[ks]);
    }
    ops_seen |= 1 << (g.op[0] == 'b'   ? 0
                      : g.op[0] == 'l' ? 1
                      : g.op[0] == 'i' ? 2
                                       : 3);
    golden_free(&g);
  }
  assert_int_equal(ops_seen, 15);
  printf("# replayed %d golden cases\n", nmanifest);
  sbn_kernel_select("ref");
}

static int report(void **state) {
  (void)state;
  tu_err_report("goldens (PyTorch float64)");
  return 0;
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_goldens),
  };
  return cmocka_run_group_tests(tests, NULL, report);
}
