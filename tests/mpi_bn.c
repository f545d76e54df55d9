/* SyncBN over MPI equals single-process BatchNorm on the concatenated
 * batch.
 *
 * Every rank generates the same global batch from a fixed seed and takes its
 * shard (samples are outermost in NCHW and NHWC alike, so a shard is one
 * contiguous range). Each rank then runs
 *   - sync BN on its shard through an MPI communicator (sync group of k),
 *   - single-process BN (comm NULL) on its group's whole batch,
 *   - the float64 reference (tests/ref64.c) on the same whole batch,
 * for several training steps, and compares its shard of y and dx, the
 * group-summed dweight/dbias and the running statistics. Finally rank 0
 * gathers every rank's running statistics and checks that they are
 * bitwise identical within each group. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mpi_util.h"
#include "ref64.h"
#include "syncbn_mpi.h"

#define TOL_Y 1e-5  /* y, dbias, running mean and variance */
#define TOL_DX 1e-4 /* dx, dweight */

typedef struct bn_case_s {
  const char *name;
  const int *counts; /* samples per rank, mu_size entries */
  size_t C;
  int nsp; /* number of spatial dims (0..2) */
  size_t sp[2];
  sbn_layout_t layout;
  double offset; /* added to every channel's mean: large-mean inputs */
  int k;         /* sync group size, 0 = all ranks */
  int steps;
  int cumulative;
  int affine;
} bn_case_t;

typedef struct bn_run_s {
  sbn_layer_t *layer;
  sbn_tensor_desc_t desc;
  float *y, *dx, *dw, *db, *rm, *rv;
  sbn_state_t state;
  void *ws, *saved;
  size_t ws_bytes, saved_bytes;
} bn_run_t;

static void desc_make(sbn_tensor_desc_t *d, size_t N, const bn_case_t *c) {
  memset(d, 0, sizeof *d);
  d->ndim = 2 + c->nsp;
  d->dims[0] = N;
  d->dims[1] = c->C;
  for (int i = 0; i < c->nsp; i++)
    d->dims[2 + i] = c->sp[i];
  d->layout = c->layout;
}

static int run_setup(bn_run_t *r, const sbn_layer_params_t *p, sbn_comm_t *comm,
                     size_t N, const bn_case_t *c, size_t rowsz) {
  int rc;
  memset(r, 0, sizeof *r);
  desc_make(&r->desc, N, c);
  rc = sbn_layer_create(p, comm, &r->layer);
  if (!MU_RC(rc, 0, "sbn_layer_create"))
    return -1;
  rc = sbn_layer_sizes(r->layer, &r->desc, &r->ws_bytes, &r->saved_bytes);
  if (!MU_RC(rc, 0, "sbn_layer_sizes"))
    return -1;
  r->ws = mu_alloc(r->ws_bytes);
  r->saved = mu_alloc(r->saved_bytes);
  r->y = mu_alloc(N * rowsz * sizeof(float));
  r->dx = mu_alloc(N * rowsz * sizeof(float));
  r->dw = mu_alloc(c->C * sizeof(float));
  r->db = mu_alloc(c->C * sizeof(float));
  r->rm = mu_alloc(c->C * sizeof(float));
  r->rv = mu_alloc(c->C * sizeof(float));
  for (size_t i = 0; i < c->C; i++)
    r->rv[i] = 1.0f;
  r->state.running_mean = r->rm;
  r->state.running_var = r->rv;
  return 0;
}

static void run_free(bn_run_t *r) {
  sbn_layer_destroy(r->layer);
  free(r->ws);
  free(r->saved);
  free(r->y);
  free(r->dx);
  free(r->dw);
  free(r->db);
  free(r->rm);
  free(r->rv);
}

/* One training step (forward then backward) of r on x/dy. */
static int run_step(bn_run_t *r, const float *x, const float *dy,
                    const float *w, const float *b) {
  sbn_forward_args_t fa = {0};
  sbn_backward_args_t ba = {0};
  int rc;
  fa.mode = SBN_MODE_TRAIN;
  fa.x_desc = &r->desc;
  fa.x = x;
  fa.y = r->y;
  fa.weight = w;
  fa.bias = b;
  fa.state = &r->state;
  fa.workspace = r->ws;
  fa.workspace_bytes = r->ws_bytes;
  fa.saved = r->saved;
  fa.saved_bytes = r->saved_bytes;
  rc = sbn_forward(r->layer, &fa);
  if (!MU_RC(rc, 0, "sbn_forward"))
    return -1;
  ba.mode = SBN_MODE_TRAIN;
  ba.x_desc = &r->desc;
  ba.x = x;
  ba.dy = dy;
  ba.dx = r->dx;
  ba.weight = w;
  ba.dweight = r->dw;
  ba.dbias = r->db;
  ba.workspace = r->ws;
  ba.workspace_bytes = r->ws_bytes;
  ba.saved = r->saved;
  ba.saved_bytes = r->saved_bytes;
  rc = sbn_backward(r->layer, &ba);
  if (!MU_RC(rc, 0, "sbn_backward"))
    return -1;
  return 0;
}

static void check_err(const char *cs, const char *what, double err,
                      double tol) {
  MU_CHECK(err <= tol, "%s: %s relative error %.3g > %.1g", cs, what, err, tol);
}

static void run_case(const bn_case_t *c) {
  const int P = mu_size, me = mu_rank;
  int k = (c->k <= 0 || c->k > P) ? P : c->k;
  int g0 = (me / k) * k, g1 = g0 + k < P ? g0 + k : P;
  size_t S = 1, rowsz, *offs = mu_alloc((size_t)(P + 1) * sizeof *offs);
  sbn_layer_params_t p;
  sbn_comm_t *comm = NULL;
  bn_run_t sync, single;
  float *w = NULL, *b = NULL, *x = NULL, *dy = NULL;
  double *xd = NULL, *dyd = NULL, *yr = NULL, *dxr = NULL, *dwr = NULL,
         *dbr = NULL, *rmr = NULL, *rvr = NULL, *wd = NULL, *bd = NULL;
  int64_t nbt_r = 0;
  char cs[160];
  int rc;

  snprintf(cs, sizeof cs, "%s (P=%d k=%d)", c->name, P, k);
  for (int i = 0; i < c->nsp; i++)
    S *= c->sp[i];
  rowsz = c->C * S;
  offs[0] = 0;
  for (int r = 0; r < P; r++)
    offs[r + 1] = offs[r] + (size_t)c->counts[r];
  size_t Ntot = offs[P], gOff = offs[g0], gN = offs[g1] - offs[g0];
  size_t myN = (size_t)c->counts[me], myOff = offs[me] - gOff;

  sbn_layer_params_default(&p, SBN_OP_BATCHNORM);
  p.channels = c->C;
  p.cumulative = c->cumulative;
  p.affine = c->affine;
  rc = sbn_mpi_comm_create(MPI_COMM_WORLD, c->k, &p, &comm);
  if (!MU_RC(rc, 0, cs))
    goto done;
  MU_CHECK(
      comm->size == g1 - g0 && comm->rank == me - g0 && comm->world_rank == me,
      "%s: comm rank/size %d/%d, want %d/%d", cs, comm->rank, comm->size,
      me - g0, g1 - g0);
  memset(&sync, 0, sizeof sync);
  memset(&single, 0, sizeof single);
  if (run_setup(&sync, &p, comm, myN, c, rowsz) != 0)
    goto done;
  if (run_setup(&single, &p, NULL, gN, c, rowsz) != 0)
    goto done;

  w = mu_alloc(c->C * sizeof *w);
  b = mu_alloc(c->C * sizeof *b);
  wd = mu_alloc(c->C * sizeof *wd);
  bd = mu_alloc(c->C * sizeof *bd);
  rmr = mu_alloc(c->C * sizeof *rmr);
  rvr = mu_alloc(c->C * sizeof *rvr);
  dwr = mu_alloc(c->C * sizeof *dwr);
  dbr = mu_alloc(c->C * sizeof *dbr);
  mu_rng_t rng;
  mu_rng_seed(&rng, 7);
  for (size_t i = 0; i < c->C; i++) {
    w[i] = (float)(1.0 + 0.5 * mu_rng_normal(&rng));
    b[i] = (float)(0.5 * mu_rng_normal(&rng));
    wd[i] = w[i];
    bd[i] = b[i];
    rvr[i] = 1.0;
  }
  x = mu_alloc(Ntot * rowsz * sizeof *x);
  dy = mu_alloc(Ntot * rowsz * sizeof *dy);
  xd = mu_alloc(gN * rowsz * sizeof *xd);
  dyd = mu_alloc(gN * rowsz * sizeof *dyd);
  yr = mu_alloc(gN * rowsz * sizeof *yr);
  dxr = mu_alloc(gN * rowsz * sizeof *dxr);

  for (int step = 0; step < c->steps; step++) {
    /* The same global batch on every rank. Channels get different means
     * and scales so that a channel mix-up shows. */
    mu_rng_seed(&rng, 1000 + (uint64_t)step);
    for (size_t i = 0; i < Ntot * rowsz; i++) {
      size_t ch = c->layout == SBN_LAYOUT_NCHW ? (i / S) % c->C : i % c->C;
      x[i] = (float)(c->offset + 0.5 * (double)ch +
                     (1.0 + 0.25 * (double)ch) * mu_rng_normal(&rng));
      dy[i] = (float)mu_rng_normal(&rng);
    }
    const float *xs = x + offs[me] * rowsz, *dys = dy + offs[me] * rowsz;
    const float *xg = x + gOff * rowsz, *dyg = dy + gOff * rowsz;
    const float *wp = c->affine ? w : NULL, *bp = c->affine ? b : NULL;
    if (run_step(&sync, xs, dys, wp, bp) != 0)
      goto done;
    if (run_step(&single, xg, dyg, wp, bp) != 0)
      goto done;
    /* dweight/dbias are left local by sbn_backward; a trainer sums them
     * over the group, as done here. */
    mu_allreduce_sum_f(sync.dw, c->C, sbn_mpi_comm_handle(comm));
    mu_allreduce_sum_f(sync.db, c->C, sbn_mpi_comm_handle(comm));

    size_t n = myN * rowsz, o = myOff * rowsz;
    char what[64];
    snprintf(what, sizeof what, "step %d y vs single", step);
    check_err(cs, what, mu_rel_err_f(sync.y, single.y + o, n), TOL_Y);
    snprintf(what, sizeof what, "step %d dx vs single", step);
    check_err(cs, what, mu_rel_err_f(sync.dx, single.dx + o, n), TOL_DX);
    snprintf(what, sizeof what, "step %d dbias vs single", step);
    check_err(cs, what, mu_rel_err_f(sync.db, single.db, c->C), TOL_Y);
    snprintf(what, sizeof what, "step %d dweight vs single", step);
    check_err(cs, what, mu_rel_err_f(sync.dw, single.dw, c->C), TOL_DX);
    snprintf(what, sizeof what, "step %d running_mean vs single", step);
    check_err(cs, what, mu_rel_err_f(sync.rm, single.rm, c->C), TOL_Y);
    snprintf(what, sizeof what, "step %d running_var vs single", step);
    check_err(cs, what, mu_rel_err_f(sync.rv, single.rv, c->C), TOL_Y);
    MU_CHECK(sync.state.num_batches_tracked == single.state.num_batches_tracked,
             "%s: num_batches_tracked %lld vs %lld", cs,
             (long long)sync.state.num_batches_tracked,
             (long long)single.state.num_batches_tracked);

    /* The float64 reference on the group's batch (an empty group has no
     * statistics and leaves everything unchanged, checked above). */
    if (gN == 0)
      continue;
    for (size_t i = 0; i < gN * rowsz; i++) {
      xd[i] = xg[i];
      dyd[i] = dyg[i];
    }
    sbn_tensor_desc_t gd = single.desc;
    ref64_bn_forward(&gd, xd, yr, c->affine ? wd : NULL, c->affine ? bd : NULL,
                     rmr, rvr, &nbt_r, p.eps, p.momentum, p.cumulative, 1);
    ref64_bn_backward(&gd, xd, dyd, dxr, c->affine ? wd : NULL, dwr, dbr, NULL,
                      NULL, p.eps, 1);
    snprintf(what, sizeof what, "step %d y vs float64", step);
    check_err(cs, what, mu_rel_err_fd(sync.y, yr + o, n), TOL_Y);
    snprintf(what, sizeof what, "step %d dx vs float64", step);
    check_err(cs, what, mu_rel_err_fd(sync.dx, dxr + o, n), TOL_DX);
    snprintf(what, sizeof what, "step %d dbias vs float64", step);
    check_err(cs, what, mu_rel_err_fd(sync.db, dbr, c->C), TOL_Y);
    snprintf(what, sizeof what, "step %d dweight vs float64", step);
    check_err(cs, what, mu_rel_err_fd(sync.dw, dwr, c->C), TOL_DX);
    snprintf(what, sizeof what, "step %d running_mean vs float64", step);
    check_err(cs, what, mu_rel_err_fd(sync.rm, rmr, c->C), TOL_Y);
    snprintf(what, sizeof what, "step %d running_var vs float64", step);
    check_err(cs, what, mu_rel_err_fd(sync.rv, rvr, c->C), TOL_Y);
  }

  /* Running statistics must be bitwise identical within a group: rank 0
   * gathers them and compares every rank with its group's first rank. */
  {
    size_t m = 2 * c->C;
    float *mine = mu_alloc(m * sizeof *mine);
    float *all = mu_alloc((size_t)P * m * sizeof *all);
    memcpy(mine, sync.rm, c->C * sizeof *mine);
    memcpy(mine + c->C, sync.rv, c->C * sizeof *mine);
    MPI_Gather(mine, (int)m, MPI_FLOAT, all, (int)m, MPI_FLOAT, 0,
               MPI_COMM_WORLD);
    if (me == 0) {
      for (int r = 0; r < P; r++) {
        int first = (r / k) * k;
        MU_CHECK(memcmp(all + (size_t)r * m, all + (size_t)first * m,
                        m * sizeof *all) == 0,
                 "%s: running stats of rank %d differ from rank %d's", cs, r,
                 first);
      }
    }
    free(mine);
    free(all);
  }
  run_free(&sync);
  run_free(&single);

done:
  sbn_comm_destroy(comm);
  free(offs);
  free(w);
  free(b);
  free(wd);
  free(bd);
  free(x);
  free(dy);
  free(xd);
  free(dyd);
  free(yr);
  free(dxr);
  free(dwr);
  free(dbr);
  free(rmr);
  free(rvr);
}

/* Per-rank sample counts for each world size: even, uneven, with empty
 * ranks, and tiny shards. */
static const int *counts_for(int which, int P, int *buf) {
  static const int c1[][1] = {{6}, {3}, {7}};
  static const int c2[][2] = {{3, 5}, {0, 5}, {1, 1}};
  static const int c3[][3] = {{5, 0, 7}, {2, 3, 4}, {1, 1, 1}};
  static const int c4[][4] = {{1, 1, 1, 6}, {2, 0, 3, 0}, {3, 3, 3, 3}};
  switch (P) {
    case 1:
      return c1[which];
    case 2:
      return c2[which];
    case 3:
      return c3[which];
    case 4:
      return c4[which];
  }
  for (int r = 0; r < P; r++)
    buf[r] = (r * 7 + 3 + which) % 5;
  buf[0] += 2;
  return buf;
}

int main(int argc, char **argv) {
  mu_init(&argc, &argv);
  int *buf = mu_alloc((size_t)mu_size * sizeof *buf);
  static const char *const set_names[3] = {"counts A", "counts B", "counts C"};
  for (int which = 0; which < 3; which++) {
    const int *counts = counts_for(which, mu_size, buf);
    for (int lay = 0; lay < 2; lay++) {
      sbn_layout_t layout = lay ? SBN_LAYOUT_NHWC : SBN_LAYOUT_NCHW;
      char name[96];
      bn_case_t c = {0};
      c.counts = counts;
      c.layout = layout;
      c.affine = 1;
      c.steps = 3;
      c.name = name;

      /* (N, C, 3, 2), plain data. */
      snprintf(name, sizeof name, "%s %s 4d", set_names[which],
               lay ? "NHWC" : "NCHW");
      c.C = 3;
      c.nsp = 2;
      c.sp[0] = 3;
      c.sp[1] = 2;
      run_case(&c);

      /* Large means: 1e4 + N(0, 1). */
      snprintf(name, sizeof name, "%s %s large-mean", set_names[which],
               lay ? "NHWC" : "NCHW");
      c.offset = 1e4;
      run_case(&c);
      c.offset = 0;

      /* (N, C, L) with a cumulative average and no affine parameters. */
      snprintf(name, sizeof name, "%s %s 3d cumulative no-affine",
               set_names[which], lay ? "NHWC" : "NCHW");
      c.C = 5;
      c.nsp = 1;
      c.sp[0] = 4;
      c.cumulative = 1;
      c.affine = 0;
      run_case(&c);
      c.cumulative = 0;
      c.affine = 1;

      /* Sync groups of k consecutive ranks. */
      for (int k = 1; k <= 3; k++) {
        snprintf(name, sizeof name, "%s %s groups k=%d", set_names[which],
                 lay ? "NHWC" : "NCHW", k);
        c.C = 4;
        c.nsp = 2;
        c.sp[0] = 2;
        c.sp[1] = 3;
        c.k = k;
        run_case(&c);
      }
      c.k = 0;
    }
    /* (N, C): one value per sample and channel, one group of all ranks
     * (smaller groups could hold a single value). With exactly two values
     * per channel xhat is +-1 and dx is identically zero, so a relative
     * error of dx means nothing there: such sets are left out. */
    {
      bn_case_t c = {0};
      c.counts = counts;
      c.layout = SBN_LAYOUT_NCHW;
      c.affine = 1;
      c.steps = 2;
      c.C = 6;
      c.name = "(N, C) 2d";
      c.offset = 1e4;
      int total = 0;
      for (int r = 0; r < mu_size; r++)
        total += counts[r];
      if (total >= 3)
        run_case(&c);
    }
  }
  free(buf);
  return mu_finish("mpi_bn");
}
