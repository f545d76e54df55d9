/* `syncbn apply`: one layer's forward (and backward) on .npy files.
 *
 * The order of work is what makes failures clean:
 *   parse the command line (usage errors, exit 2, before MPI exists)
 *   -> read and check every input (exit 1 on any problem)
 *   -> create the layer, size and allocate its buffers
 *   -> forward, backward
 *   -> (with --sync) gather the shards on rank 0
 *   -> create the output directory and write every output.
 * Nothing is written before everything is computed, so a failing run never
 * clobbers an earlier run's outputs. Under --sync the ranks agree on success
 * (one small MPI_Allreduce) after every step that can fail on one rank only,
 * so no rank ever waits in a collective that another rank skipped. */
#include <limits.h>
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "cli_apply_int.h"
#include "cli_args.h"
#include "syncbn.h"
#include "syncbn_mpi.h"

/* Shard sizes: --counts, or an even split with the first N mod P ranks
 * getting one more. Fails identically on every rank (same inputs). */
static int plan_shards(apply_run_t *r) {
  size_t P = (size_t)r->size;
  r->counts = calloc(P, sizeof *r->counts);
  if (r->counts == NULL)
    return sbn__apply_fail(&r->e, 1, "out of memory");
  if (r->o.counts != NULL) {
    size_t sum = 0;
    if (r->o.ncounts != P)
      return sbn__apply_fail(&r->e, 2, "--counts: %zu numbers for %zu ranks",
                             r->o.ncounts, P);
    for (size_t i = 0; i < P; i++) {
      if (r->o.counts[i] > SIZE_MAX - sum)
        return sbn__apply_fail(&r->e, 2, "--counts: the sum overflows");
      sum += r->o.counts[i];
      r->counts[i] = r->o.counts[i];
    }
    if (sum != r->N)
      return sbn__apply_fail(
          &r->e, 1, "--counts: the counts sum to %zu but --x %s has N = %zu",
          sum, r->o.x, r->N);
  } else {
    for (size_t i = 0; i < P; i++)
      r->counts[i] = r->N / P + (i < r->N % P);
  }
  r->first = 0;
  for (int i = 0; i < r->rank; i++)
    r->first += r->counts[i];
  if (r->o.sync) {
    /* MPI counts and displacements are ints (in samples, with a derived
     * datatype of one sample), and so is the length of dweight. */
    if (r->N > INT_MAX || r->inner > INT_MAX || r->nw > INT_MAX)
      return sbn__apply_fail(
          &r->e, 1,
          "--x: %s is too large to gather with MPI (N %zu, %zu "
          "values per sample; at most %d each)",
          r->o.x, r->N, r->inner, INT_MAX);
  }
  return 0;
}

/* Under --sync: every rank learns the worst status and the lowest rank
 * that failed, which is the one that prints its message. */
static int agree(apply_run_t *r) {
  if (!r->o.sync)
    return r->e.status;
  int v[2] = {r->e.status, r->e.status ? r->size - r->rank : 0};
  MPI_Allreduce(MPI_IN_PLACE, v, 2, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  int speaker = v[1] > 0 ? r->size - v[1] : -1;
  /* Only the lowest failing rank prints, so a failure that every rank
   * sees (a bad --counts) is reported once. */
  if (v[0] != 0 && r->rank != speaker)
    r->e.msg[0] = '\0';
  r->e.status = v[0];
  return v[0];
}

static int setup_layer(apply_run_t *r) {
  apply_opts_t *o = &r->o;
  sbn_layer_params_t *p = &r->params;
  int rc;
  sbn_layer_params_default(p, o->op);
  p->channels = r->C;
  p->groups = o->op == SBN_OP_GROUPNORM ? o->groups : 1;
  if (o->op == SBN_OP_LAYERNORM) {
    p->norm_ndim = o->norm_dims;
    for (int i = 0; i < o->norm_dims; i++)
      p->norm_shape[i] = r->x.dims[r->x.ndim - o->norm_dims + i];
  }
  p->eps = o->eps;
  p->momentum = o->momentum;
  p->cumulative = o->cumulative;
  p->ghost_batch = o->ghost_batch;
  p->affine = o->weight != NULL;
  p->track_running_stats = r->track;
  p->p = o->p;
  p->seed = o->seed;
  p->layer_id = o->layer;
  /* BatchNorm synchronizes through the MPI communicator. Dropout gets one
   * too, only for its world rank, which keys each rank's Philox stream so
   * that ranks draw independent masks; it never communicates. */
  if (o->sync && (o->op == SBN_OP_BATCHNORM || o->op == SBN_OP_DROPOUT)) {
    rc = sbn_mpi_comm_create(MPI_COMM_WORLD,
                             o->op == SBN_OP_BATCHNORM ? o->group_size : 1, p,
                             &r->comm);
    if (rc != 0)
      return sbn__apply_fail_lib(&r->e, "creating the MPI communicator", rc);
  }
  return 0;
}

static int alloc_buffers(apply_run_t *r) {
  apply_opts_t *o = &r->o;
  sbn_tensor_desc_t mine = r->desc;
  size_t n_mine = r->counts[r->rank] * r->inner, n_all = r->x.numel;
  int root = r->rank == 0, rc;
  mine.dims[0] = r->counts[r->rank];
  if ((rc = sbn_layer_create(&r->params, r->comm, &r->layer)) != 0)
    return sbn__apply_fail_lib(&r->e, "creating the layer", rc);
  if ((rc = sbn_layer_sizes(r->layer, &mine, &r->ws_bytes, &r->saved_bytes)) !=
      0)
    return sbn__apply_fail_lib(&r->e, "--x", rc);
  /* Rank 0 holds the whole batch, its shard at the front (shards are in
   * rank order and rank 0's starts at sample 0); the others only theirs. */
  r->y = malloc((root ? n_all : n_mine) * sizeof(float) + 1);
  if (o->dy)
    r->dx = malloc((root ? n_all : n_mine) * sizeof(float) + 1);
  r->dw = malloc(r->nw * sizeof(float) + 1);
  r->db = malloc(r->nw * sizeof(float) + 1);
  r->ws = malloc(r->ws_bytes + 1);
  r->saved = malloc(r->saved_bytes + 1);
  if (r->track) {
    r->state.running_mean = malloc(r->C * sizeof(float) + 1);
    r->state.running_var = malloc(r->C * sizeof(float) + 1);
  }
  if (!r->y || (o->dy && !r->dx) || !r->dw || !r->db || !r->ws || !r->saved ||
      (r->track && (!r->state.running_mean || !r->state.running_var)))
    return sbn__apply_fail(&r->e, 1, "out of memory for a batch of %zu values",
                           n_all);
  r->y_mine = r->y;
  r->dx_mine = r->dx;
  if (r->track) {
    for (size_t c = 0; c < r->C; c++) {
      r->state.running_mean[c] = r->fresh ? 0.0f : r->rm.data[c];
      r->state.running_var[c] = r->fresh ? 1.0f : r->rv.data[c];
    }
  }
  r->state.num_batches_tracked = o->nbt;
  r->nbt_before = o->nbt;
  return 0;
}

static int run_forward(apply_run_t *r) {
  sbn_tensor_desc_t mine = r->desc;
  mine.dims[0] = r->counts[r->rank];
  const float *x = r->x.data + r->first * r->inner;
  sbn_forward_args_t fa = {r->o.eval ? SBN_MODE_EVAL : SBN_MODE_TRAIN,
                           &mine,
                           x,
                           r->y_mine,
                           r->o.weight ? r->w.data : NULL,
                           r->o.weight ? r->b.data : NULL,
                           &r->state,
                           r->o.step,
                           r->ws,
                           r->ws_bytes,
                           r->saved,
                           r->saved_bytes};
  int rc = sbn_forward(r->layer, &fa);
  return rc != 0 ? sbn__apply_fail_lib(&r->e, "forward", rc) : 0;
}

static int run_backward(apply_run_t *r) {
  sbn_tensor_desc_t mine = r->desc;
  mine.dims[0] = r->counts[r->rank];
  size_t off = r->first * r->inner;
  sbn_backward_args_t ba = {r->o.eval ? SBN_MODE_EVAL : SBN_MODE_TRAIN,
                            &mine,
                            r->x.data + off,
                            r->dy.data + off,
                            r->dx_mine,
                            r->o.weight ? r->w.data : NULL,
                            r->o.weight ? r->dw : NULL,
                            r->o.weight ? r->db : NULL,
                            r->o.step,
                            r->ws,
                            r->ws_bytes,
                            r->saved,
                            r->saved_bytes};
  int rc = sbn_backward(r->layer, &ba);
  return rc != 0 ? sbn__apply_fail_lib(&r->e, "backward", rc) : 0;
}

/* Rank 0 collects y and dx in batch order and the sums of dweight and
 * dbias. Every rank reaches this only after agree() said all is well. */
static int gather(apply_run_t *r) {
  MPI_Datatype sample = MPI_DATATYPE_NULL;
  int *cnt = NULL, *dsp = NULL, root = r->rank == 0, err;
  cnt = malloc(sizeof(int) * (size_t)r->size);
  dsp = malloc(sizeof(int) * (size_t)r->size);
  if (!cnt || !dsp) {
    free(cnt);
    free(dsp);
    /* An allocation this small failing leaves no way to stay consistent
     * with the other ranks' collectives. */
    fprintf(stderr, "syncbn apply: rank %d: out of memory\n", r->rank);
    MPI_Abort(MPI_COMM_WORLD, 1);
    return 1;
  }
  for (int i = 0, at = 0; i < r->size; i++) {
    cnt[i] = (int)r->counts[i];
    dsp[i] = at;
    at += cnt[i];
  }
  err = MPI_Type_contiguous((int)r->inner, MPI_FLOAT, &sample);
  if (err == MPI_SUCCESS)
    err = MPI_Type_commit(&sample);
  float *bufs[2] = {r->y, r->dx};
  for (int k = 0; k < 2 && err == MPI_SUCCESS; k++) {
    if (bufs[k] == NULL || r->inner == 0)
      continue;
    err = MPI_Gatherv(root ? MPI_IN_PLACE : bufs[k], cnt[r->rank], sample,
                      bufs[k], cnt, dsp, sample, 0, MPI_COMM_WORLD);
  }
  if (err == MPI_SUCCESS && r->o.dy && r->o.weight && r->nw > 0) {
    err = MPI_Reduce(root ? MPI_IN_PLACE : r->dw, r->dw, (int)r->nw, MPI_FLOAT,
                     MPI_SUM, 0, MPI_COMM_WORLD);
    if (err == MPI_SUCCESS)
      err = MPI_Reduce(root ? MPI_IN_PLACE : r->db, r->db, (int)r->nw,
                       MPI_FLOAT, MPI_SUM, 0, MPI_COMM_WORLD);
  }
  if (sample != MPI_DATATYPE_NULL)
    MPI_Type_free(&sample);
  free(cnt);
  free(dsp);
  if (err != MPI_SUCCESS)
    return sbn__apply_fail_lib(&r->e, "gathering the results",
                               sbn_mpi_error(err, "MPI_Gatherv/MPI_Reduce"));
  return 0;
}

static void run_free(apply_run_t *r) {
  sbn_layer_destroy(r->layer);
  sbn_comm_destroy(r->comm);
  sbn_npy_free(&r->x);
  sbn_npy_free(&r->dy);
  sbn_npy_free(&r->w);
  sbn_npy_free(&r->b);
  sbn_npy_free(&r->rm);
  sbn_npy_free(&r->rv);
  free(r->counts);
  free(r->o.counts);
  free(r->y);
  free(r->dx);
  free(r->dw);
  free(r->db);
  free(r->ws);
  free(r->saved);
  free(r->state.running_mean);
  free(r->state.running_var);
}

/* The two ways to get a rank count that does not do what was meant,
 * said after the run. */
static void warn_ranks(const apply_run_t *r) {
  int rank, size;
  if (r->o.sync && r->size == 1) {
    fprintf(stderr,
            "syncbn apply: warning: --sync with one MPI rank: there "
            "is nothing to synchronize (run it under mpirun -np P)\n");
    return;
  }
  sbn__cli_launcher_rank(&rank, &size);
  if (!r->o.sync && size > 1 && rank == 0)
    fprintf(stderr,
            "syncbn apply: warning: %d ranks without --sync: every rank "
            "runs the whole batch on its own and writes the same outputs "
            "(add --sync for SyncBN)\n",
            size);
}

int sbn_cli_apply(int argc, char **argv) {
  apply_run_t *r = calloc(1, sizeof *r);
  char written[4096];
  int st;
  if (r == NULL) {
    fprintf(stderr, "syncbn apply: out of memory\n");
    return 1;
  }
  r->size = 1;
  st = sbn__apply_parse_args(argc, argv, &r->o, &r->e);
  if (st != 0) {
    if (st > 0)
      fprintf(stderr, "syncbn apply: %s\n", r->e.msg);
    free(r->o.counts);
    free(r);
    return st > 0 ? st : 0;
  }
  if (r->o.sync) {
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &r->rank);
    MPI_Comm_size(MPI_COMM_WORLD, &r->size);
  }
  /* Each step runs only if every rank got through the ones before. */
  if (sbn__apply_load_inputs(r) == 0)
    plan_shards(r);
  if (agree(r) == 0)
    setup_layer(r);
  if (agree(r) == 0)
    alloc_buffers(r);
  if (agree(r) == 0)
    run_forward(r);
  if (agree(r) == 0 && r->o.dy)
    run_backward(r);
  if (agree(r) == 0 && r->o.sync)
    gather(r);
  if (agree(r) == 0 && r->rank == 0 &&
      sbn__apply_write_outputs(r, written, sizeof written) == 0)
    sbn__apply_print_summary(r, written);
  agree(r);
  st = r->e.status;
  if (st != 0 && r->e.msg[0] != '\0') {
    if (r->o.sync)
      fprintf(stderr, "syncbn apply: rank %d of %d: %s\n", r->rank, r->size,
              r->e.msg);
    else
      fprintf(stderr, "syncbn apply: %s\n", r->e.msg);
  }
  fflush(stdout);
  /* After a successful run only: a failure's message stays the one line
   * on stderr. */
  if (st == 0)
    warn_ranks(r);
  /* Communicators go before MPI_Finalize. */
  sbn_layer_destroy(r->layer);
  r->layer = NULL;
  sbn_comm_destroy(r->comm);
  r->comm = NULL;
  if (r->o.sync)
    MPI_Finalize();
  run_free(r);
  free(r);
  return st;
}