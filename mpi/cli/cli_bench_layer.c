/* `syncbn bench layer`: per BatchNorm layer shape, what SyncBN adds to a
 * training step. Each rep runs, on the same rank-aligned start (a barrier
 * before each), local BatchNorm forward+backward, SyncBN forward+backward
 * on the MPI communicator (its reductions chunked as --chunk says, and
 * with --vs-unchunked also SyncBN with one blocking allreduce per pass),
 * and a bare MPI_Allreduce(MPI_SUM) of the same bytes as one of SyncBN's
 * two reductions; they are interleaved so that a slow moment of the
 * machine hits all of them. Each variant is recorded for its forward, its
 * backward and the two together (pass fwd, bwd, fwd+bwd). */
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

/* The SyncBN variants and local BN of one rep, and the passes each is
 * recorded for: forward alone, backward alone and the two together. */
enum { LV_LOCAL, LV_SYNC, LV_UNCH, LV_COUNT };
enum { LP_FWD, LP_BWD, LP_BOTH, LP_COUNT };
static const char *const lv_name[LV_COUNT] = {"local", "sync",
                                              "sync_unchunked"};
static const char *const lp_name[LP_COUNT] = {"fwd", "bwd", "fwd+bwd"};
/* The bare allreduces each pass stands against: one per pass. */
static const double lp_allreduces[LP_COUNT] = {1, 1, 2};

/* The timings of one configuration, seconds per rep: t[v][p] for variant
 * v and pass p (NULL for sync_unchunked without --vs-unchunked), mpi[v][p]
 * the part of it spent inside the communicator's MPI calls (SyncBN
 * variants only), bare for the allreduce. */
typedef struct layer_times_s {
  double *t[LV_COUNT][LP_COUNT], *mpi[LV_COUNT][LP_COUNT], *bare;
} layer_times_t;

/* The layers one rep times: local BN, SyncBN as --chunk asks, and SyncBN
 * with one blocking allreduce per pass (NULL without --vs-unchunked). */
typedef struct layer_set_s {
  sbn_layer_t *l[LV_COUNT];
  const sbn_comm_t *comm; /* the SyncBN layers' communicator */
} layer_set_t;

/* The seconds comm (NULL for local BN) has spent inside MPI so far. */
static double mpi_now(const sbn_comm_t *comm) {
  double s = 0;
  if (comm != NULL)
    (void)sbn_mpi_comm_seconds(comm, &s);
  return s;
}

/* The differences of three readings: fwd, bwd and both. */
static void split3(const double r[3], double *out) {
  out[LP_FWD] = r[1] - r[0];
  out[LP_BWD] = r[2] - r[1];
  out[LP_BOTH] = r[2] - r[0];
}

/* One timed forward and backward behind a barrier: dt[LP_x] their times
 * on this process and mt[LP_x] the part inside comm's MPI calls (the
 * backward follows at once: no barrier between, as in a training step);
 * *k moves to the next copy of the buffers. */
static int timed(sbn_layer_t *layer, const sbn_comm_t *comm,
                 const sbn_tensor_desc_t *d, sbn_bench_bufs_t *u, int *k,
                 uint64_t step, double *dt, double *mt) {
  double t[3], m[3];
  int rc;
  MPI_Barrier(MPI_COMM_WORLD);
  m[0] = mpi_now(comm);
  t[0] = sbn__bench_now();
  if ((rc = sbn__bench_fwd(layer, d, u, *k, step)) != 0)
    return rc;
  t[1] = sbn__bench_now();
  m[1] = mpi_now(comm);
  if ((rc = sbn__bench_bwd(layer, d, u, *k, step)) != 0)
    return rc;
  t[2] = sbn__bench_now();
  m[2] = mpi_now(comm);
  split3(t, dt);
  split3(m, mt);
  *k = (*k + 1) % u->copies;
  return 0;
}

/* One rep: local BatchNorm, SyncBN (and the unchunked SyncBN) and the bare
 * allreduce, each behind a barrier; dt and *bare get their times in
 * seconds. */
static int one_rep(const sbn_tensor_desc_t *d, const layer_set_t *ls,
                   MPI_Comm gc, sbn_bench_bufs_t *u, double *msg, int *k,
                   uint64_t step, double dt[2][LV_COUNT][LP_COUNT],
                   double *bare) {
  int rc, count = (int)(4 * u->c);
  for (int v = 0; v < LV_COUNT; v++)
    if (ls->l[v] != NULL &&
        (rc = timed(ls->l[v], v == LV_LOCAL ? NULL : ls->comm, d, u, k, step,
                    dt[0][v], dt[1][v])) != 0)
      return rc;
  MPI_Barrier(MPI_COMM_WORLD);
  double t0 = sbn__bench_now();
  if (MPI_Allreduce(MPI_IN_PLACE, msg, count, MPI_DOUBLE, MPI_SUM, gc) !=
      MPI_SUCCESS)
    return sbn_set_error(SBN_ECOMM, "bench: bare MPI_Allreduce of %d doubles",
                         count);
  *bare = sbn__bench_now() - t0;
  return 0;
}

static int time_reps(const sbn_bench_opts_t *o, const sbn_tensor_desc_t *d,
                     const layer_set_t *ls, MPI_Comm gc, sbn_bench_bufs_t *u,
                     double *msg, int reps, layer_times_t *t) {
  int rc, k = 0;
  uint64_t step = 0;
  double dt[2][LV_COUNT][LP_COUNT], bare, t0 = sbn__bench_now();
  /* Warm-up: at least --warmup reps and SBN__BENCH_MIN_WARM_S seconds on
   * the slowest rank (agreed through the world, so every rank runs the
   * same number of reps and no barrier is left waiting). */
  for (int w = 1;; w++) {
    if ((rc = one_rep(d, ls, gc, u, msg, &k, step++, dt, &bare)) != 0)
      return rc;
    if (sbn__bench_warm_done(t0, w, o->warmup))
      break;
  }
  for (int it = 0; it < reps; it++) {
    if ((rc = one_rep(d, ls, gc, u, msg, &k, step++, dt, &bare)) != 0)
      return rc;
    for (int v = 0; v < LV_COUNT; v++)
      for (int p = 0; p < LP_COUNT; p++) {
        if (t->t[v][p] != NULL)
          t->t[v][p][it] = dt[0][v][p];
        if (t->mpi[v][p] != NULL)
          t->mpi[v][p][it] = dt[1][v][p];
      }
    t->bare[it] = bare;
  }
  return 0;
}

/* A SyncBN record's derived columns against its local and bare records
 * (their definitions, which tests/bench_check.py checks): the time SyncBN
 * adds to local BN (difference of the medians), over the median of as
 * many bare allreduces of the records as the pass has (one per pass). */
static void derive(sbn_bench_rec_t *s, const sbn_bench_rec_t *l,
                   const sbn_bench_rec_t *a, double allreduces) {
  s->bytes = allreduces * a->bytes;
  s->overhead_us = s->median_us - l->median_us;
  s->overhead_pct = 100.0 * s->overhead_us / s->median_us;
  s->overhead_per_allreduce = s->overhead_us / (allreduces * a->median_us);
}

/* The records of one configuration, with the derived columns on the
 * SyncBN ones: per pass local, sync (and sync_unchunked), then the bare
 * allreduce. */
static int push_layer(const sbn_bench_opts_t *o, const sbn_tensor_desc_t *d,
                      layer_times_t *t, int reps, sbn_bench_out_t *out) {
  sbn_bench_rec_t a =
      sbn__bench_rec(o, "bare_allreduce", "allreduce", "sum", d);
  sbn__bench_set_times(&a, t->bare, reps);
  a.bytes = (double)(d->dims[1] * sizeof(sbn_rec_t));
  int rc = 0;
  for (int p = 0; p < LP_COUNT && rc == 0; p++) {
    sbn_bench_rec_t r[LV_COUNT];
    for (int v = 0; v < LV_COUNT && rc == 0; v++) {
      if (t->t[v][p] == NULL)
        continue;
      r[v] = sbn__bench_rec(o, lv_name[v], "batchnorm", lp_name[p], d);
      sbn__bench_set_times(&r[v], t->t[v][p], reps);
      if (v != LV_LOCAL) {
        double p90;
        derive(&r[v], &r[LV_LOCAL], &a, lp_allreduces[p]);
        sbn__bench_quantiles(t->mpi[v][p], reps, &r[v].mpi_us, &p90);
        r[v].mpi_us *= 1e6;
      }
      rc = sbn__bench_push(out, &r[v]);
    }
    if (p == LP_BOTH)
      sbn__bench_progress(o, "done", &r[LV_SYNC]);
  }
  return rc == 0 ? sbn__bench_push(out, &a) : rc;
}

/* Creates the layers of one configuration; the unchunked one only with
 * --vs-unchunked. */
static int make_layers(const sbn_bench_opts_t *o, sbn_layer_params_t *p,
                       sbn_comm_t *comm, layer_set_t *ls) {
  int rc;
  ls->comm = comm;
  p->reduce_chunk = SBN_CHUNK_OFF;
  if ((rc = sbn_layer_create(p, NULL, &ls->l[LV_LOCAL])) != 0)
    return rc;
  if (o->vs_unchunked && (rc = sbn_layer_create(p, comm, &ls->l[LV_UNCH])) != 0)
    return rc;
  p->reduce_chunk = o->chunk;
  return sbn_layer_create(p, comm, &ls->l[LV_SYNC]);
}

/* Allocates the time series of a configuration (sync_unchunked's only
 * with --vs-unchunked); SBN_ENOMEM. */
static int times_alloc(const sbn_bench_opts_t *o, int reps, layer_times_t *t) {
  int ok = (t->bare = calloc((size_t)reps, sizeof(double))) != NULL;
  for (int v = 0; v < LV_COUNT; v++)
    for (int p = 0; p < LP_COUNT; p++)
      if (v != LV_UNCH || o->vs_unchunked) {
        ok &= (t->t[v][p] = calloc((size_t)reps, sizeof(double))) != NULL;
        if (v != LV_LOCAL)
          ok &= (t->mpi[v][p] = calloc((size_t)reps, sizeof(double))) != NULL;
      }
  return ok ? 0
            : sbn_set_error(SBN_ENOMEM, "bench: out of memory for %d reps",
                            reps);
}

static void times_free(layer_times_t *t) {
  for (int v = 0; v < LV_COUNT; v++)
    for (int p = 0; p < LP_COUNT; p++) {
      free(t->t[v][p]);
      free(t->mpi[v][p]);
    }
  free(t->bare);
}

/* Every series' rep times as their maximum over ranks. */
static int times_max(layer_times_t *t, int reps) {
  int rc = sbn__bench_max_over_ranks(MPI_COMM_WORLD, t->bare, reps);
  for (int v = 0; v < LV_COUNT; v++)
    for (int p = 0; p < LP_COUNT && rc == 0; p++) {
      if (t->t[v][p] != NULL)
        rc = sbn__bench_max_over_ranks(MPI_COMM_WORLD, t->t[v][p], reps);
      if (rc == 0 && t->mpi[v][p] != NULL)
        rc = sbn__bench_max_over_ranks(MPI_COMM_WORLD, t->mpi[v][p], reps);
    }
  return rc;
}

static int layer_one(const sbn_bench_opts_t *o, const sbn_tensor_desc_t *d,
                     sbn_bench_out_t *out) {
  sbn_layer_params_t p;
  sbn_comm_t *comm = NULL;
  layer_set_t ls;
  sbn_bench_bufs_t u;
  layer_times_t t;
  int reps = sbn__bench_reps(o, 20, 5), rc;
  double *msg = calloc(4 * d->dims[1], sizeof *msg);
  memset(&ls, 0, sizeof ls);
  memset(&u, 0, sizeof u);
  memset(&t, 0, sizeof t);
  sbn_layer_params_default(&p, SBN_OP_BATCHNORM);
  p.channels = d->dims[1];
  p.reduce_chunk = o->chunk;
  if ((rc = times_alloc(o, reps, &t)) != 0)
    goto done;
  if (msg == NULL) {
    rc = sbn_set_error(SBN_ENOMEM, "bench: out of memory for the message");
    goto done;
  }
  if ((rc = sbn_mpi_comm_create(MPI_COMM_WORLD, o->group_size, &p, &comm)) !=
          0 ||
      (rc = make_layers(o, &p, comm, &ls)) != 0 ||
      (rc = sbn__bench_bufs_alloc(&u, o, d, ls.l[LV_SYNC])) != 0 ||
      (rc = sbn__bench_bufs_fit(&u, d, ls.l[LV_LOCAL])) != 0)
    goto done;
  rc = time_reps(o, d, &ls, sbn_mpi_comm_handle(comm), &u, msg, reps, &t);
  if (rc == 0)
    rc = times_max(&t, reps);
  if (rc == 0)
    rc = push_layer(o, d, &t, reps, out);
done:
  for (int v = 0; v < LV_COUNT; v++)
    sbn_layer_destroy(ls.l[v]);
  sbn_comm_destroy(comm);
  sbn__bench_bufs_free(&u);
  times_free(&t);
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
