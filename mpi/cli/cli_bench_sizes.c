/* `syncbn bench sizes`: an OSU-style (osu_allreduce) latency table of
 * SyncBN's reduction. For C channels it times the allreduce of C records
 * (32 bytes each, the Chan-merge MPI_Op), the same through the
 * communicator's non-blocking reduction polled to completion (what the
 * chunked SyncBN and syncbnd wait for), a plain MPI_SUM over the same
 * bytes (what the merge costs beyond summing), and MPI_SUM over the 2C + 1
 * floats that sum-based SyncBN implementations send (sum, sum of squares,
 * count: what exactness costs in bytes), and beside them the merge of C
 * records alone in this process, with no message (records_merge: the
 * part of a records allreduce that is sbn_rec_combine, run by the kernel
 * set in use). avg, min and max follow OSU: each
 * rank's average over the iterations, then the average, minimum and
 * maximum of those over ranks; median and p90 are over iterations of the
 * slowest rank's time. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cli_bench.h"
#include "syncbn_mpi.h"

enum { V_RECORDS, V_RECORDS_NB, V_MERGE, V_SUM_SAME, V_SUM_2C1, V_COUNT };
static const char *const vnames[V_COUNT] = {"records", "records_nonblocking",
                                            "records_merge", "sum_same_bytes",
                                            "sum_2c1"};

typedef struct sizes_bufs_s {
  sbn_rec_t *recs, *peer; /* peer: the other operand of records_merge */
  double *d;
  float *f;
} sizes_bufs_t;

static void init_recs(sbn_rec_t *r, size_t c) {
  for (size_t i = 0; i < c; i++) {
    r[i].tag = SBN_REC_MOMENTS;
    r[i].v[0] = 10;
    r[i].v[1] = (double)i;
    r[i].v[2] = 3;
  }
}

/* One allreduce of variant v over c channels. */
static int one_call(int v, sbn_comm_t *comm, MPI_Comm gc, sizes_bufs_t *b,
                    size_t c) {
  switch (v) {
    case V_RECORDS:
      return sbn_comm_allreduce(comm, b->recs, c);
    case V_RECORDS_NB: {
      /* The communicator's non-blocking reduction, polled to completion:
       * what the chunked SyncBN and syncbnd's rounds wait for. */
      void *req = NULL;
      int done = 0, rc = comm->vt->iallreduce_begin(comm, b->recs, c, &req);
      while (rc == 0 && !done)
        rc = comm->vt->iallreduce_test(comm, req, &done);
      if (req != NULL) {
        int e = comm->vt->iallreduce_end(comm, req);
        rc = rc != 0 ? rc : e;
      }
      return rc;
    }
    case V_MERGE:
      sbn_rec_combine(b->peer, b->recs, c);
      return 0;
    case V_SUM_SAME:
      if (MPI_Allreduce(MPI_IN_PLACE, b->d, (int)(4 * c), MPI_DOUBLE, MPI_SUM,
                        gc) != MPI_SUCCESS)
        return sbn_set_error(SBN_ECOMM, "bench: MPI_Allreduce of %zu doubles",
                             4 * c);
      return 0;
    default:
      if (MPI_Allreduce(MPI_IN_PLACE, b->f, (int)(2 * c + 1), MPI_FLOAT,
                        MPI_SUM, gc) != MPI_SUCCESS)
        return sbn_set_error(SBN_ECOMM, "bench: MPI_Allreduce of %zu floats",
                             2 * c + 1);
      return 0;
  }
}

static int time_variant(const sbn_bench_opts_t *o, int v, sbn_comm_t *comm,
                        sizes_bufs_t *b, size_t c, int iters,
                        sbn_bench_out_t *out) {
  MPI_Comm gc = sbn_mpi_comm_handle(comm);
  double *t = calloc((size_t)iters, sizeof *t), sum = 0, avg[3];
  int rc = 0, warm = o->warmup * 5 + 5;
  if (t == NULL)
    return sbn_set_error(SBN_ENOMEM, "bench: out of memory for %d iterations",
                         iters);
  MPI_Barrier(MPI_COMM_WORLD);
  for (int it = -warm; it < iters && rc == 0; it++) {
    /* The records are reset outside the timing: merged in place again and
     * again their counts would grow without bound. */
    if (v <= V_MERGE)
      init_recs(b->recs, c);
    double t0 = sbn__bench_now();
    rc = one_call(v, comm, gc, b, c);
    double t1 = sbn__bench_now();
    if (it >= 0) {
      t[it] = t1 - t0;
      sum += t1 - t0;
    }
  }
  if (rc == 0) {
    double mine = sum / iters * 1e6;
    MPI_Allreduce(&mine, &avg[0], 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
    MPI_Allreduce(&mine, &avg[1], 1, MPI_DOUBLE, MPI_MIN, MPI_COMM_WORLD);
    MPI_Allreduce(&mine, &avg[2], 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    rc = sbn__bench_max_over_ranks(MPI_COMM_WORLD, t, iters);
  }
  if (rc == 0) {
    sbn_tensor_desc_t d = {1, {c}, SBN_LAYOUT_NCHW};
    sbn_bench_rec_t r =
        sbn__bench_rec(o, vnames[v], v == V_MERGE ? "merge" : "allreduce",
                       v <= V_MERGE ? "chan_merge" : "sum", &d);
    r.layout[0] = '\0';
    sbn__bench_set_times(&r, t, iters);
    r.bytes = v == V_SUM_2C1 ? (double)(2 * c + 1) * 4 : (double)c * 32;
    r.avg_us = avg[0] / o->size;
    r.min_us = avg[1];
    r.max_us = avg[2];
    r.iterations = iters;
    rc = sbn__bench_push(out, &r);
    sbn__bench_progress(o, vnames[v], &r);
  }
  free(t);
  return rc;
}

int sbn__bench_sizes(const sbn_bench_opts_t *o, sbn_bench_out_t *out) {
  const size_t cmax = o->quick ? 4096 : 65536;
  sbn_layer_params_t p;
  sizes_bufs_t b = {
      calloc(cmax, sizeof(sbn_rec_t)), calloc(cmax, sizeof(sbn_rec_t)),
      calloc(4 * cmax, sizeof(double)), calloc(2 * cmax + 1, sizeof(float))};
  int rc = 0;
  if (b.peer != NULL)
    init_recs(b.peer, cmax);
  if (!b.recs || !b.peer || !b.d || !b.f)
    rc =
        sbn_set_error(SBN_ENOMEM, "bench: out of memory for %zu records", cmax);
  sbn_layer_params_default(&p, SBN_OP_BATCHNORM);
  for (size_t c = 1; c <= cmax && rc == 0; c *= 2) {
    sbn_comm_t *comm = NULL;
    /* OSU's rule: fewer iterations once messages pass 8 KiB. */
    int iters = o->reps > 0 ? o->reps
                            : (c * 32 <= 8192 ? (o->quick ? 100 : 1000)
                                              : (o->quick ? 20 : 100));
    p.channels = c;
    if ((rc = sbn_mpi_comm_create(MPI_COMM_WORLD, o->group_size, &p, &comm)) !=
        0)
      break;
    for (int v = 0; v < V_COUNT && rc == 0; v++)
      rc = time_variant(o, v, comm, &b, c, iters, out);
    sbn_comm_destroy(comm);
  }
  free(b.recs);
  free(b.peer);
  free(b.d);
  free(b.f);
  return rc;
}
