/* `syncbn bench layer`: per BatchNorm layer shape, what SyncBN adds to a
 * training step. Each rep runs, on the same rank-aligned start (a barrier
 * before each), local BatchNorm forward+backward, SyncBN forward+backward
 * on the MPI communicator (its reductions chunked as --chunk says, and
 * with --vs-unchunked also SyncBN with one blocking allreduce per pass),
 * and a bare MPI_Allreduce(MPI_SUM) of the same bytes as one of SyncBN's
 * two reductions; they are interleaved so that a slow moment of the
 * machine hits all of them. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cli_bench.h"
#include "syncbn_mpi.h"

int sbn__bench_reps(const sbn_bench_opts_t *o, int def, int quick) {
  return o->reps > 0 ? o->reps : (o->quick ? quick : def);
}

int sbn__bench_layer_shapes(const sbn_bench_opts_t *o, int layouts,
                            sbn_tensor_desc_t *out, int max) {
  static const int quick_shapes[] = {1, 5, 8};
  size_t batches[16] = {2, 8, 32};
  int nb = 3, n = 0, lay = o->layouts ? o->layouts : layouts;
  if (o->nbatches > 0) {
    nb = o->nbatches;
    memcpy(batches, o->batches, sizeof batches);
  } else if (o->quick) {
    nb = 1;
  }
  int ns = o->nshapes > 0 ? o->nshapes : (o->quick ? 3 : 9);
  for (int s = 0; s < ns; s++)
    for (int b = 0; b < (o->nshapes > 0 ? 1 : nb); b++)
      for (int l = 0; l < 2; l++) {
        if (!(lay & (1 << l)) || n == max)
          continue;
        sbn_tensor_desc_t d;
        if (o->nshapes > 0) {
          d = o->shapes[s];
        } else {
          const size_t *chw =
              sbn__bench_resnet_shapes[o->quick ? quick_shapes[s] : s];
          d = (sbn_tensor_desc_t){
              4, {batches[b], chw[0], chw[1], chw[2]}, SBN_LAYOUT_NCHW};
        }
        d.layout = l ? SBN_LAYOUT_NHWC : SBN_LAYOUT_NCHW;
        out[n++] = d;
      }
  return n;
}

/* The timings of one configuration, seconds per rep; unch is NULL
 * without --vs-unchunked. */
typedef struct layer_times_s {
  double *local, *sync, *bare, *unch;
} layer_times_t;

/* The layers one rep times: local BN, SyncBN as --chunk asks, and SyncBN
 * with one blocking allreduce per pass (NULL without --vs-unchunked). */
typedef struct layer_set_s {
  sbn_layer_t *local, *sync, *unch;
} layer_set_t;

/* One timed SyncBN or local run behind a barrier; *k moves to the next
 * copy of the buffers. */
static int timed(sbn_layer_t *layer, const sbn_tensor_desc_t *d,
                 sbn_bench_bufs_t *u, int *k, uint64_t step, double *dt) {
  int rc;
  MPI_Barrier(MPI_COMM_WORLD);
  double t0 = sbn__bench_now();
  if ((rc = sbn__bench_fwd_bwd(layer, d, u, *k, step)) != 0)
    return rc;
  *dt = sbn__bench_now() - t0;
  *k = (*k + 1) % u->copies;
  return 0;
}

/* One rep: local BatchNorm, SyncBN (and the unchunked SyncBN) and the bare
 * allreduce, each behind a barrier; dt gets their times in seconds. */
static int one_rep(const sbn_tensor_desc_t *d, const layer_set_t *ls,
                   MPI_Comm gc, sbn_bench_bufs_t *u, double *msg, int *k,
                   uint64_t step, double dt[4]) {
  int rc, count = (int)(4 * u->c);
  double t0;
  if ((rc = timed(ls->local, d, u, k, step, &dt[0])) != 0 ||
      (rc = timed(ls->sync, d, u, k, step, &dt[1])) != 0)
    return rc;
  if (ls->unch != NULL && (rc = timed(ls->unch, d, u, k, step, &dt[3])) != 0)
    return rc;
  MPI_Barrier(MPI_COMM_WORLD);
  t0 = sbn__bench_now();
  if (MPI_Allreduce(MPI_IN_PLACE, msg, count, MPI_DOUBLE, MPI_SUM, gc) !=
      MPI_SUCCESS)
    return sbn_set_error(SBN_ECOMM, "bench: bare MPI_Allreduce of %d doubles",
                         count);
  dt[2] = sbn__bench_now() - t0;
  return 0;
}

static int time_reps(const sbn_bench_opts_t *o, const sbn_tensor_desc_t *d,
                     const layer_set_t *ls, MPI_Comm gc, sbn_bench_bufs_t *u,
                     double *msg, int reps, layer_times_t *t) {
  int rc, k = 0;
  uint64_t step = 0;
  double dt[4], t0 = sbn__bench_now();
  /* Warm-up: at least --warmup reps and SBN__BENCH_MIN_WARM_S seconds on
   * the slowest rank (agreed through the world, so every rank runs the
   * same number of reps and no barrier is left waiting). */
  for (int w = 1;; w++) {
    if ((rc = one_rep(d, ls, gc, u, msg, &k, step++, dt)) != 0)
      return rc;
    if (sbn__bench_warm_done(t0, w, o->warmup))
      break;
  }
  for (int it = 0; it < reps; it++) {
    if ((rc = one_rep(d, ls, gc, u, msg, &k, step++, dt)) != 0)
      return rc;
    t->local[it] = dt[0];
    t->sync[it] = dt[1];
    t->bare[it] = dt[2];
    if (t->unch != NULL)
      t->unch[it] = dt[3];
  }
  return 0;
}

/* A SyncBN record's derived columns against its local and bare records
 * (their definitions, which tests/bench_check.py checks). */
static void derive(sbn_bench_rec_t *s, const sbn_bench_rec_t *l,
                   const sbn_bench_rec_t *a) {
  s->bytes = 2 * a->bytes;
  s->overhead_us = s->median_us - l->median_us;
  s->overhead_pct = 100.0 * s->overhead_us / s->median_us;
  s->overhead_per_allreduce = s->overhead_us / (2.0 * a->median_us);
}

/* The records of one configuration, with the derived columns on the
 * SyncBN ones. */
static int push_layer(const sbn_bench_opts_t *o, const sbn_tensor_desc_t *d,
                      layer_times_t *t, int reps, sbn_bench_out_t *out) {
  sbn_bench_rec_t l = sbn__bench_rec(o, "local", "batchnorm", "fwd+bwd", d);
  sbn_bench_rec_t s = sbn__bench_rec(o, "sync", "batchnorm", "fwd+bwd", d);
  sbn_bench_rec_t n =
      sbn__bench_rec(o, "sync_unchunked", "batchnorm", "fwd+bwd", d);
  sbn_bench_rec_t a =
      sbn__bench_rec(o, "bare_allreduce", "allreduce", "sum", d);
  sbn__bench_set_times(&l, t->local, reps);
  sbn__bench_set_times(&s, t->sync, reps);
  sbn__bench_set_times(&a, t->bare, reps);
  a.bytes = (double)(d->dims[1] * sizeof(sbn_rec_t));
  derive(&s, &l, &a);
  int rc = sbn__bench_push(out, &l);
  if (rc == 0)
    rc = sbn__bench_push(out, &s);
  if (rc == 0 && t->unch != NULL) {
    sbn__bench_set_times(&n, t->unch, reps);
    derive(&n, &l, &a);
    rc = sbn__bench_push(out, &n);
  }
  if (rc == 0)
    rc = sbn__bench_push(out, &a);
  sbn__bench_progress(o, "done", &s);
  return rc;
}

/* Creates the layers of one configuration; the unchunked one only with
 * --vs-unchunked. */
static int make_layers(const sbn_bench_opts_t *o, sbn_layer_params_t *p,
                       sbn_comm_t *comm, layer_set_t *ls) {
  int rc;
  p->reduce_chunk = SBN_CHUNK_OFF;
  if ((rc = sbn_layer_create(p, NULL, &ls->local)) != 0)
    return rc;
  if (o->vs_unchunked && (rc = sbn_layer_create(p, comm, &ls->unch)) != 0)
    return rc;
  p->reduce_chunk = o->chunk;
  return sbn_layer_create(p, comm, &ls->sync);
}

static int layer_one(const sbn_bench_opts_t *o, const sbn_tensor_desc_t *d,
                     sbn_bench_out_t *out) {
  sbn_layer_params_t p;
  sbn_comm_t *comm = NULL;
  layer_set_t ls = {NULL, NULL, NULL};
  sbn_bench_bufs_t u;
  int reps = sbn__bench_reps(o, 20, 5), rc;
  layer_times_t t = {calloc((size_t)reps, 8), calloc((size_t)reps, 8),
                     calloc((size_t)reps, 8),
                     o->vs_unchunked ? calloc((size_t)reps, 8) : NULL};
  double *msg = calloc(4 * d->dims[1], sizeof *msg);
  memset(&u, 0, sizeof u);
  sbn_layer_params_default(&p, SBN_OP_BATCHNORM);
  p.channels = d->dims[1];
  p.reduce_chunk = o->chunk;
  if (!t.local || !t.sync || !t.bare || !msg || (o->vs_unchunked && !t.unch)) {
    rc = sbn_set_error(SBN_ENOMEM, "bench: out of memory for %d reps", reps);
    goto done;
  }
  if ((rc = sbn_mpi_comm_create(MPI_COMM_WORLD, o->group_size, &p, &comm)) !=
          0 ||
      (rc = make_layers(o, &p, comm, &ls)) != 0 ||
      (rc = sbn__bench_bufs_alloc(&u, d, ls.sync)) != 0 ||
      (rc = sbn__bench_bufs_fit(&u, d, ls.local)) != 0)
    goto done;
  rc = time_reps(o, d, &ls, sbn_mpi_comm_handle(comm), &u, msg, reps, &t);
  double *all[4] = {t.local, t.sync, t.bare, t.unch};
  for (int i = 0; i < 4 && rc == 0; i++)
    if (all[i] != NULL)
      rc = sbn__bench_max_over_ranks(MPI_COMM_WORLD, all[i], reps);
  if (rc == 0)
    rc = push_layer(o, d, &t, reps, out);
done:
  sbn_layer_destroy(ls.local);
  sbn_layer_destroy(ls.sync);
  sbn_layer_destroy(ls.unch);
  sbn_comm_destroy(comm);
  sbn__bench_bufs_free(&u);
  free(t.local);
  free(t.sync);
  free(t.bare);
  free(t.unch);
  free(msg);
  return rc;
}

int sbn__bench_layer(const sbn_bench_opts_t *o, sbn_bench_out_t *out) {
  sbn_tensor_desc_t shapes[9 * 16 * 2 + SBN_BENCH_MAX_SHAPES * 2];
  int n = sbn__bench_layer_shapes(o, 3, shapes,
                                  (int)(sizeof shapes / sizeof *shapes));
  int rc = 0;
  for (int i = 0; i < n && rc == 0; i++)
    rc = layer_one(o, &shapes[i], out);
  return rc;
}
