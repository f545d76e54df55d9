/* Which MPI calls a forward and backward make, counted through PMPI.
 *
 * Every layer is created with an MPI communicator (so it could talk), then
 * the counters are zeroed around each sbn_forward/sbn_backward:
 *   - BatchNorm in training: exactly one MPI_Allreduce for forward and one
 *     for backward (none when the sync group is a single process), and no
 *     other MPI call: no allgather, no barrier, no point to point;
 *   - BatchNorm with ghost batches (which replace the reduction) in
 *     training and eval, BatchNorm in eval (with and without running
 *     statistics), LayerNorm,
 *     InstanceNorm (with and without running statistics), GroupNorm and
 *     Dropout in training and eval: no MPI call at all. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mpi_pmpi.h"
#include "mpi_util.h"
#include "syncbn_mpi.h"

typedef struct count_case_s {
  const char *name;
  sbn_layer_params_t p;
  sbn_layout_t layout;
  int group_size;
} count_case_t;

static void report_counts(const char *what) {
  for (int k = 0; k < PM_KINDS; k++)
    if (pm_calls[k] != 0)
      fprintf(stderr, "[rank %d]   %s: %ld x %s\n", mu_rank, what, pm_calls[k],
              pm_name(k));
}

/* Runs forward and backward in mode and checks the counts: `allreduces`
 * MPI_Allreduce calls in each and nothing else. */
static void count_one(const count_case_t *cc, sbn_mode_t mode) {
  sbn_comm_t *comm = NULL;
  sbn_layer_t *l = NULL;
  sbn_tensor_desc_t d = {0};
  size_t ws = 0, sv = 0, numel = 1, C = 4;
  float *x = NULL, *y = NULL, *dy = NULL, *dx = NULL, *w = NULL, *b = NULL,
        *dw = NULL, *db = NULL, *rm = NULL, *rv = NULL;
  void *wsp = NULL, *svp = NULL;
  sbn_state_t st = {0};
  char name[128];
  int rc;

  snprintf(name, sizeof name, "%s %s %s", cc->name,
           mode == SBN_MODE_TRAIN ? "train" : "eval",
           cc->layout == SBN_LAYOUT_NHWC ? "NHWC" : "NCHW");
  rc = sbn_mpi_comm_create(MPI_COMM_WORLD, cc->group_size, &cc->p, &comm);
  if (!MU_RC(rc, 0, name))
    goto done;
  rc = sbn_layer_create(&cc->p, comm, &l);
  if (!MU_RC(rc, 0, name))
    goto done;
  d.ndim = 4;
  d.dims[0] = 3;
  d.dims[1] = C;
  d.dims[2] = 3;
  d.dims[3] = 2;
  d.layout = cc->layout;
  for (int i = 0; i < 4; i++)
    numel *= d.dims[i];
  rc = sbn_layer_sizes(l, &d, &ws, &sv);
  if (!MU_RC(rc, 0, name))
    goto done;
  x = mu_alloc(numel * sizeof *x);
  y = mu_alloc(numel * sizeof *y);
  dy = mu_alloc(numel * sizeof *dy);
  dx = mu_alloc(numel * sizeof *dx);
  /* Weight and bias cover C channels or LayerNorm's 3 x 2 shape. */
  w = mu_alloc(8 * sizeof *w);
  b = mu_alloc(8 * sizeof *b);
  dw = mu_alloc(8 * sizeof *dw);
  db = mu_alloc(8 * sizeof *db);
  rm = mu_alloc(C * sizeof *rm);
  rv = mu_alloc(C * sizeof *rv);
  wsp = mu_alloc(ws);
  svp = mu_alloc(sv);
  mu_rng_t rng;
  mu_rng_seed(&rng, 99 + (uint64_t)mu_rank);
  for (size_t i = 0; i < numel; i++) {
    x[i] = (float)mu_rng_normal(&rng);
    dy[i] = (float)mu_rng_normal(&rng);
  }
  for (size_t i = 0; i < 8; i++)
    w[i] = 1.0f + 0.1f * (float)i;
  for (size_t i = 0; i < C; i++)
    rv[i] = 1.0f;
  st.running_mean = rm;
  st.running_var = rv;

  sbn_forward_args_t fa = {0};
  fa.mode = mode;
  fa.x_desc = &d;
  fa.x = x;
  fa.y = y;
  fa.weight = w;
  fa.bias = b;
  fa.state = &st;
  fa.step = 3;
  fa.workspace = wsp;
  fa.workspace_bytes = ws;
  fa.saved = svp;
  fa.saved_bytes = sv;
  sbn_backward_args_t ba = {0};
  ba.mode = mode;
  ba.x_desc = &d;
  ba.x = x;
  ba.dy = dy;
  ba.dx = dx;
  ba.weight = w;
  ba.dweight = dw;
  ba.dbias = db;
  ba.step = 3;
  ba.workspace = wsp;
  ba.workspace_bytes = ws;
  ba.saved = svp;
  ba.saved_bytes = sv;

  long want = 0;
  if (cc->p.op == SBN_OP_BATCHNORM && mode == SBN_MODE_TRAIN &&
      cc->p.ghost_batch == 0 && comm->size > 1)
    want = 1;

  pm_reset();
  rc = sbn_forward(l, &fa);
  long f_all = pm_total(), f_ar = pm_calls[PM_ALLREDUCE];
  if (!MU_CHECK(f_all == want && f_ar == want,
                "%s forward: %ld MPI calls (%ld MPI_Allreduce), want %ld "
                "MPI_Allreduce and nothing else",
                name, f_all, f_ar, want))
    report_counts("forward");
  MU_RC(rc, 0, name);

  pm_reset();
  rc = sbn_backward(l, &ba);
  long b_all = pm_total(), b_ar = pm_calls[PM_ALLREDUCE];
  if (!MU_CHECK(b_all == want && b_ar == want,
                "%s backward: %ld MPI calls (%ld MPI_Allreduce), want %ld "
                "MPI_Allreduce and nothing else",
                name, b_all, b_ar, want))
    report_counts("backward");
  MU_RC(rc, 0, name);

done:
  sbn_layer_destroy(l);
  sbn_comm_destroy(comm);
  free(x);
  free(y);
  free(dy);
  free(dx);
  free(w);
  free(b);
  free(dw);
  free(db);
  free(rm);
  free(rv);
  free(wsp);
  free(svp);
}

int main(int argc, char **argv) {
  mu_init(&argc, &argv);

  /* The wrappers must see calls at all, or every zero below is vacuous. */
  pm_reset();
  MPI_Barrier(MPI_COMM_WORLD);
  MU_CHECK(pm_calls[PM_BARRIER] == 1 && pm_total() == 1,
           "PMPI wrappers do not count (barrier count %ld)",
           pm_calls[PM_BARRIER]);

  count_case_t cases[10];
  int n = 0;
  memset(cases, 0, sizeof cases);
  cases[n].name = "batchnorm";
  sbn_layer_params_default(&cases[n].p, SBN_OP_BATCHNORM);
  cases[n++].p.channels = 4;
  cases[n].name = "batchnorm no-running-stats";
  sbn_layer_params_default(&cases[n].p, SBN_OP_BATCHNORM);
  cases[n].p.track_running_stats = 0;
  cases[n++].p.channels = 4;
  cases[n].name = "batchnorm group-size-2";
  sbn_layer_params_default(&cases[n].p, SBN_OP_BATCHNORM);
  cases[n].group_size = 2;
  cases[n++].p.channels = 4;
  cases[n].name = "batchnorm ghost-batch-2";
  sbn_layer_params_default(&cases[n].p, SBN_OP_BATCHNORM);
  cases[n].p.ghost_batch = 2;
  cases[n++].p.channels = 4;
  cases[n].name = "instancenorm";
  sbn_layer_params_default(&cases[n].p, SBN_OP_INSTANCENORM);
  cases[n++].p.channels = 4;
  cases[n].name = "instancenorm running-stats";
  sbn_layer_params_default(&cases[n].p, SBN_OP_INSTANCENORM);
  cases[n].p.track_running_stats = 1;
  cases[n++].p.channels = 4;
  cases[n].name = "groupnorm";
  sbn_layer_params_default(&cases[n].p, SBN_OP_GROUPNORM);
  cases[n].p.channels = 4;
  cases[n++].p.groups = 2;
  cases[n].name = "layernorm";
  sbn_layer_params_default(&cases[n].p, SBN_OP_LAYERNORM);
  cases[n].p.norm_ndim = 2;
  cases[n].p.norm_shape[0] = 3;
  cases[n++].p.norm_shape[1] = 2;
  cases[n].name = "dropout";
  sbn_layer_params_default(&cases[n].p, SBN_OP_DROPOUT);
  cases[n].p.p = 0.3;
  cases[n++].p.seed = 5;

  for (int i = 0; i < n; i++) {
    for (int lay = 0; lay < 2; lay++) {
      /* LayerNorm and Dropout take plain C-order arrays only. */
      if (lay == 1 && (cases[i].p.op == SBN_OP_LAYERNORM ||
                       cases[i].p.op == SBN_OP_DROPOUT))
        continue;
      cases[i].layout = lay ? SBN_LAYOUT_NHWC : SBN_LAYOUT_NCHW;
      count_one(&cases[i], SBN_MODE_TRAIN);
      count_one(&cases[i], SBN_MODE_EVAL);
    }
  }
  return mu_finish("mpi_count");
}
