/* The C side of the "Python client == C client" test (tests/svc_pyc.py):
 *
 *   svc_pyc_driver SOCKET PREFIX OUTDIR
 *
 * registers one layer of each kind under PREFIX.<case> on the worker at
 * SOCKET and runs a fixed script through the C client library: three
 * training steps (forward and backward; step 1 uses the worker's own
 * affine parameters, steps 0 and 2 pass weight and bias) and one eval
 * forward. It writes every input it generated and every output it got as
 * raw little-endian float32 files in OUTDIR (in-<case>-s<step>-<x|dy|w|b>
 * and out-<case>-s<step>-<y|dx|dw|db>). svc_pyc.py replays the same
 * script with the same inputs through the Python client and compares the
 * outputs byte for byte, so the case table below and the one in
 * svc_pyc.py must stay the same. Exit 0, or 1 with a message. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "client.h"
#include "syncbn.h"

#define PYC_TRAIN_STEPS 3
#define PYC_MAX_NUMEL 256

typedef struct pyc_case_s {
  const char *kind;
  sbn_op_t op;
  int ndim;
  size_t dims[4]; /* logical (N, C, ...) */
  sbn_layout_t layout;
  size_t channels, groups;
  int norm_ndim;
  size_t norm_shape[2];
  int cumulative, track;
  double p;
  uint32_t seed;
  float offset; /* added to x: a large mean exercises the numerics */
  size_t ghost; /* ghost_batch (batchnorm kinds) */
} pyc_case_t;

static const pyc_case_t pyc_cases[] = {
    {"batchnorm",
     SBN_OP_BATCHNORM,
     3,
     {4, 3, 5},
     SBN_LAYOUT_NCHW,
     3,
     0,
     0,
     {0},
     0,
     1,
     0,
     0,
     1000.0f,
     0},
    {"batchnorm",
     SBN_OP_BATCHNORM,
     4,
     {3, 4, 2, 5},
     SBN_LAYOUT_NHWC,
     4,
     0,
     0,
     {0},
     1,
     1,
     0,
     0,
     0.0f,
     0},
    {"layernorm",
     SBN_OP_LAYERNORM,
     3,
     {4, 3, 5},
     SBN_LAYOUT_NCHW,
     0,
     0,
     2,
     {3, 5},
     0,
     0,
     0,
     0,
     0.0f,
     0},
    {"groupnorm",
     SBN_OP_GROUPNORM,
     3,
     {2, 6, 7},
     SBN_LAYOUT_NCHW,
     6,
     3,
     0,
     {0},
     0,
     0,
     0,
     0,
     0.0f,
     0},
    {"instancenorm",
     SBN_OP_INSTANCENORM,
     3,
     {2, 3, 9},
     SBN_LAYOUT_NCHW,
     3,
     0,
     0,
     {0},
     0,
     1,
     0,
     0,
     0.0f,
     0},
    {"dropout",
     SBN_OP_DROPOUT,
     3,
     {4, 3, 5},
     SBN_LAYOUT_NCHW,
     0,
     0,
     0,
     {0},
     0,
     0,
     0.3,
     11,
     0.0f,
     0},
    {"syncbatchnorm",
     SBN_OP_BATCHNORM,
     3,
     {5, 4, 3},
     SBN_LAYOUT_NCHW,
     4,
     0,
     0,
     {0},
     0,
     1,
     0,
     0,
     0.0f,
     0},
    {"batchnorm",
     SBN_OP_BATCHNORM,
     3,
     {7, 3, 4},
     SBN_LAYOUT_NCHW,
     3,
     0,
     0,
     {0},
     0,
     1,
     0,
     0,
     0.0f,
     3},
    {"syncbatchnorm",
     SBN_OP_BATCHNORM,
     4,
     {6, 4, 2, 2},
     SBN_LAYOUT_NHWC,
     4,
     0,
     0,
     {0},
     0,
     1,
     0,
     0,
     0.0f,
     2},
};

static uint64_t pyc_rng = 0x9e3779b97f4a7c15ull;

/* Uniform in [off - scale/2, off + scale/2): the exact values do not
 * matter, only that both clients see the same ones (they are written out). */
static void pyc_fill(float *a, size_t n, float scale, float off) {
  for (size_t i = 0; i < n; i++) {
    pyc_rng = pyc_rng * 6364136223846793005ull + 1442695040888963407ull;
    a[i] = off + scale * ((float)(pyc_rng >> 40) / (float)(1 << 24) - 0.5f);
  }
}

static int pyc_write(const char *dir, const char *what, int cs, int step,
                     const char *name, const float *a, size_t n) {
  char path[512];
  FILE *f;
  size_t put;
  snprintf(path, sizeof path, "%s/%s-%d-s%d-%s.f32", dir, what, cs, step, name);
  if ((f = fopen(path, "wb")) == NULL) {
    fprintf(stderr, "svc_pyc_driver: cannot write %s\n", path);
    return -1;
  }
  put = fwrite(a, sizeof(float), n, f);
  if (fclose(f) != 0 || put != n) {
    fprintf(stderr, "svc_pyc_driver: short write to %s\n", path);
    return -1;
  }
  return 0;
}

int main(int argc, char **argv) {
  static float x[PYC_MAX_NUMEL], dy[PYC_MAX_NUMEL], y[PYC_MAX_NUMEL],
      dx[PYC_MAX_NUMEL];
  float w[16], b[16], dw[16], db[16];
  sbn_client_t *c = NULL;
  const char *what = "connect";
  int rc = 0, status = 1;
  if (argc != 4) {
    fprintf(stderr, "usage: %s SOCKET PREFIX OUTDIR\n", argv[0]);
    return 2;
  }
  const char *dir = argv[3];
  if ((rc = sbn_client_connect(argv[1], &c)) != 0)
    goto fail;
  for (int cs = 0; cs < (int)(sizeof pyc_cases / sizeof pyc_cases[0]); cs++) {
    const pyc_case_t *k = &pyc_cases[cs];
    sbn_tensor_desc_t d = {k->ndim, {0}, k->layout};
    sbn_layer_params_t p;
    size_t n = 1, wb = 0;
    uint64_t layer = 0;
    char name[256];
    for (int i = 0; i < k->ndim; i++) {
      d.dims[i] = k->dims[i];
      n *= k->dims[i];
    }
    sbn_layer_params_default(&p, k->op);
    p.channels = k->channels;
    p.groups = k->groups;
    p.norm_ndim = k->norm_ndim;
    for (int i = 0; i < k->norm_ndim; i++)
      p.norm_shape[i] = k->norm_shape[i];
    p.cumulative = k->cumulative;
    p.track_running_stats = k->track;
    p.p = k->p;
    p.seed = k->seed;
    p.ghost_batch = k->ghost;
    if (k->op != SBN_OP_DROPOUT)
      wb = k->op == SBN_OP_LAYERNORM ? k->norm_shape[0] * k->norm_shape[1]
                                     : k->channels;
    snprintf(name, sizeof name, "%s.%d", argv[2], cs);
    what = "register";
    if ((rc = sbn_client_register(c, name, k->kind, &p, 0, &layer, NULL)) != 0)
      goto fail;
    for (int step = 0; step <= PYC_TRAIN_STEPS; step++) {
      int train = step<PYC_TRAIN_STEPS, given = wb> 0 && step != 1;
      pyc_fill(x, n, 4.0f, k->offset);
      pyc_fill(dy, n, 2.0f, 0.0f);
      pyc_fill(w, wb, 1.0f, 1.0f);
      pyc_fill(b, wb, 1.0f, 0.0f);
      if (pyc_write(dir, "in", cs, step, "x", x, n) != 0 ||
          pyc_write(dir, "in", cs, step, "dy", dy, n) != 0 ||
          pyc_write(dir, "in", cs, step, "w", w, wb) != 0 ||
          pyc_write(dir, "in", cs, step, "b", b, wb) != 0)
        goto fail;
      what = "forward";
      if ((rc = sbn_client_forward(c, layer, (uint64_t)step, train, &d, x,
                                   given ? w : NULL, given ? b : NULL,
                                   given ? wb : 0, y)) != 0)
        goto fail;
      if (pyc_write(dir, "out", cs, step, "y", y, n) != 0)
        goto fail;
      if (!train)
        continue;
      what = "backward";
      if ((rc = sbn_client_backward(c, layer, (uint64_t)step, &d, dy, dx,
                                    wb ? dw : NULL, wb ? db : NULL, wb)) != 0)
        goto fail;
      if (pyc_write(dir, "out", cs, step, "dx", dx, n) != 0 ||
          pyc_write(dir, "out", cs, step, "dw", dw, wb) != 0 ||
          pyc_write(dir, "out", cs, step, "db", db, wb) != 0)
        goto fail;
    }
  }
  what = "bye";
  if ((rc = sbn_client_bye(c)) != 0)
    goto fail;
  status = 0;
fail:
  if (status != 0 && rc != 0)
    fprintf(stderr, "svc_pyc_driver: %s: %s: %s\n", what,
            sbn_client_err_name(rc), sbn_last_error());
  sbn_client_close(c);
  return status;
}
