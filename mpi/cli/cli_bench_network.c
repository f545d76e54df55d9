/* `syncbn bench network`: the 53 BatchNorm layers of ResNet-50 at a
 * per-rank batch N, one training step: every layer's forward in order,
 * then every layer's backward in reverse (the convolutions between them
 * are left out: this is the normalization's share of a step). Variants:
 * unfused SyncBN (one allreduce per layer and direction), fused SyncBN
 * (syncbn_fused.h: all 53 layers' records in one allreduce per direction),
 * local BatchNorm, and GroupNorm(32), which needs no communication. Each
 * layer keeps its own input (as a network keeps its activations for
 * backward); outputs and gradients share buffers. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cli_bench.h"
#include "syncbn_fused.h"
#include "syncbn_mpi.h"

#define NL 53

enum { NV_UNFUSED, NV_FUSED, NV_LOCAL, NV_GROUPNORM, NV_COUNT };
static const char *const nv_names[NV_COUNT] = {"unfused", "fused", "local",
                                               "groupnorm"};

typedef struct net_s {
  sbn_tensor_desc_t d[NL];
  float *x[NL];
  float *y, *dy, *dx;               /* shared, the largest layer's size */
  float *w, *b, *dw, *db, *rm, *rv; /* per channel, the widest layer's */
  sbn_comm_t *comm[NL], *fused_comm;
  sbn_layer_t *l[NV_COUNT][NL];
  void *ws[NL], *saved[NL];
  size_t ws_bytes[NL], saved_bytes[NL];
  sbn_state_t st[NL];
  sbn_forward_args_t fa[NL];
  sbn_backward_args_t ba[NL];
  sbn_rec_t *recs;
  size_t nrecs;
} net_t;

static void net_free(net_t *n) {
  for (int i = 0; i < NL; i++) {
    for (int v = 0; v < NV_COUNT; v++)
      sbn_layer_destroy(n->l[v][i]);
    sbn_comm_destroy(n->comm[i]);
    free(n->x[i]);
    free(n->ws[i]);
    free(n->saved[i]);
  }
  sbn_comm_destroy(n->fused_comm);
  free(n->y);
  free(n->dy);
  free(n->dx);
  free(n->w);
  free(n->b);
  free(n->dw);
  free(n->db);
  free(n->rm);
  free(n->rv);
  free(n->recs);
}

/* The layers of every variant on layer i's shape, and the workspace and
 * saved buffers that fit the largest of them. */
static int net_layer(const sbn_bench_opts_t *o, net_t *n, int i) {
  sbn_layer_params_t p;
  int rc;
  sbn_layer_params_default(&p, SBN_OP_BATCHNORM);
  p.channels = n->d[i].dims[1];
  if ((rc = sbn_mpi_comm_create(MPI_COMM_WORLD, o->group_size, &p,
                                &n->comm[i])) != 0 ||
      (rc = sbn_layer_create(&p, n->comm[i], &n->l[NV_UNFUSED][i])) != 0 ||
      (rc = sbn_layer_create(&p, n->comm[i], &n->l[NV_FUSED][i])) != 0 ||
      (rc = sbn_layer_create(&p, NULL, &n->l[NV_LOCAL][i])) != 0)
    return rc;
  sbn_layer_params_default(&p, SBN_OP_GROUPNORM);
  p.channels = n->d[i].dims[1];
  p.groups = 32;
  if ((rc = sbn_layer_create(&p, NULL, &n->l[NV_GROUPNORM][i])) != 0)
    return rc;
  for (int v = 0; v < NV_COUNT; v++) {
    size_t wsb, svb;
    if ((rc = sbn_layer_sizes(n->l[v][i], &n->d[i], &wsb, &svb)) != 0)
      return rc;
    n->ws_bytes[i] = wsb > n->ws_bytes[i] ? wsb : n->ws_bytes[i];
    n->saved_bytes[i] = svb > n->saved_bytes[i] ? svb : n->saved_bytes[i];
  }
  n->ws[i] = calloc(1, n->ws_bytes[i] + 1);
  n->saved[i] = calloc(1, n->saved_bytes[i] + 1);
  n->x[i] = malloc(sbn__bench_numel(&n->d[i]) * 4);
  if (!n->ws[i] || !n->saved[i] || !n->x[i])
    return sbn_set_error(SBN_ENOMEM, "bench: out of memory for layer %d", i);
  sbn__bench_fill(n->x[i], sbn__bench_numel(&n->d[i]), (unsigned)i);
  return 0;
}

static int net_make(const sbn_bench_opts_t *o, net_t *n, size_t batch,
                    sbn_layout_t layout) {
  size_t big = 0, cmax = 0;
  sbn_layer_params_t p;
  int rc = 0;
  memset(n, 0, sizeof *n);
  for (int i = 0; i < NL; i++) {
    const size_t *chw = sbn__bench_resnet_layers[i];
    n->d[i] = (sbn_tensor_desc_t){4, {batch, chw[0], chw[1], chw[2]}, layout};
    big = sbn__bench_numel(&n->d[i]) > big ? sbn__bench_numel(&n->d[i]) : big;
    cmax = chw[0] > cmax ? chw[0] : cmax;
  }
  n->y = malloc(big * 4);
  n->dy = malloc(big * 4);
  n->dx = malloc(big * 4);
  n->w = malloc(cmax * 4);
  n->b = calloc(cmax, 4);
  n->dw = malloc(cmax * 4);
  n->db = malloc(cmax * 4);
  n->rm = calloc(cmax, 4);
  n->rv = malloc(cmax * 4);
  if (!n->y || !n->dy || !n->dx || !n->w || !n->b || !n->dw || !n->db ||
      !n->rm || !n->rv)
    return sbn_set_error(SBN_ENOMEM, "bench: out of memory for %zu values",
                         big);
  sbn__bench_fill(n->dy, big, 99);
  memset(n->y, 0, big * 4);
  memset(n->dx, 0, big * 4);
  for (size_t c = 0; c < cmax; c++)
    n->w[c] = n->rv[c] = 1.0f;
  for (int i = 0; i < NL && rc == 0; i++)
    rc = net_layer(o, n, i);
  sbn_layer_params_default(&p, SBN_OP_BATCHNORM);
  p.channels = 1;
  if (rc == 0)
    rc = sbn_mpi_comm_create(MPI_COMM_WORLD, o->group_size, &p, &n->fused_comm);
  return rc;
}

/* Fills the per-layer arguments (the same for every variant) and the
 * fused record buffer. */
static int net_args(net_t *n) {
  for (int i = 0; i < NL; i++) {
    n->st[i] = (sbn_state_t){n->rm, n->rv, 0};
    n->fa[i] = (sbn_forward_args_t){
        SBN_MODE_TRAIN, &n->d[i],       n->x[i],     n->y,
        n->w,           n->b,           &n->st[i],   0,
        n->ws[i],       n->ws_bytes[i], n->saved[i], n->saved_bytes[i]};
    n->ba[i] = (sbn_backward_args_t){SBN_MODE_TRAIN,
                                     &n->d[i],
                                     n->x[i],
                                     n->dy,
                                     n->dx,
                                     n->w,
                                     n->dw,
                                     n->db,
                                     0,
                                     n->ws[i],
                                     n->ws_bytes[i],
                                     n->saved[i],
                                     n->saved_bytes[i]};
  }
  size_t fc, bc;
  int rc = sbn_fused_forward_records(NL, n->l[NV_FUSED], n->fa, &fc);
  if (rc == 0)
    rc = sbn_fused_backward_records(NL, n->l[NV_FUSED], n->ba, &bc);
  if (rc != 0)
    return rc;
  n->nrecs = fc > bc ? fc : bc;
  if ((n->recs = calloc(n->nrecs, sizeof *n->recs)) == NULL)
    return sbn_set_error(SBN_ENOMEM, "bench: out of memory for %zu records",
                         n->nrecs);
  return 0;
}

/* One step of variant v: forward of every layer, then backward in
 * reverse. t[0] and t[1] get the two halves' seconds. */
static int net_step(net_t *n, int v, double t[2]) {
  int rc = 0;
  double t0 = sbn__bench_now();
  if (v == NV_FUSED)
    rc = sbn_bn_forward_fused(n->fused_comm, NL, n->l[v], n->fa, n->recs,
                              n->nrecs);
  for (int i = 0; v != NV_FUSED && i < NL && rc == 0; i++)
    rc = sbn_forward(n->l[v][i], &n->fa[i]);
  double t1 = sbn__bench_now();
  if (rc == 0 && v == NV_FUSED)
    rc = sbn_bn_backward_fused(n->fused_comm, NL, n->l[v], n->ba, n->recs,
                               n->nrecs);
  for (int i = NL - 1; v != NV_FUSED && i >= 0 && rc == 0; i--)
    rc = sbn_backward(n->l[v][i], &n->ba[i]);
  double t2 = sbn__bench_now();
  t[0] = t1 - t0;
  t[1] = t2 - t1;
  return rc;
}

/* The records of every variant and half; overhead_us and overhead_pct
 * compare each variant with local BatchNorm on the same half. */
static int net_push(const sbn_bench_opts_t *o, const sbn_tensor_desc_t *d,
                    double *t[NV_COUNT][3], int reps, sbn_bench_out_t *out) {
  static const char *const passes[3] = {"fwd", "bwd", "step"};
  sbn_bench_rec_t r[NV_COUNT][3];
  int rc = 0;
  for (int v = 0; v < NV_COUNT; v++)
    for (int p = 0; p < 3; p++) {
      r[v][p] = sbn__bench_rec(o, nv_names[v],
                               v == NV_GROUPNORM ? "groupnorm" : "batchnorm",
                               passes[p], d);
      sbn__bench_set_times(&r[v][p], t[v][p], reps);
    }
  for (int v = 0; v < NV_COUNT; v++)
    for (int p = 0; p < 3 && rc == 0; p++) {
      if (v != NV_LOCAL) {
        r[v][p].overhead_us = r[v][p].median_us - r[NV_LOCAL][p].median_us;
        r[v][p].overhead_pct = 100.0 * r[v][p].overhead_us / r[v][p].median_us;
      }
      rc = sbn__bench_push(out, &r[v][p]);
    }
  return rc;
}

static int net_time(const sbn_bench_opts_t *o, net_t *n, int reps,
                    double *t[NV_COUNT][3]) {
  int rc = 0;
  for (int it = -o->warmup; it < reps && rc == 0; it++)
    for (int v = 0; v < NV_COUNT && rc == 0; v++) {
      double h[2];
      MPI_Barrier(MPI_COMM_WORLD);
      rc = net_step(n, v, h);
      if (it >= 0) {
        t[v][0][it] = h[0];
        t[v][1][it] = h[1];
        t[v][2][it] = h[0] + h[1];
      }
    }
  for (int v = 0; v < NV_COUNT && rc == 0; v++)
    for (int p = 0; p < 3 && rc == 0; p++)
      rc = sbn__bench_max_over_ranks(MPI_COMM_WORLD, t[v][p], reps);
  return rc;
}

int sbn__bench_network(const sbn_bench_opts_t *o, sbn_bench_out_t *out) {
  size_t batch = o->nbatches > 0 ? o->batches[0] : (o->quick ? 2 : 8);
  sbn_layout_t layout = o->layouts == 2 ? SBN_LAYOUT_NHWC : SBN_LAYOUT_NCHW;
  int reps = sbn__bench_reps(o, 10, 3), rc;
  double *t[NV_COUNT][3];
  net_t *n = calloc(1, sizeof *n);
  double *all = calloc((size_t)(NV_COUNT * 3 * reps), sizeof *all);
  if (n == NULL || all == NULL) {
    free(n);
    free(all);
    return sbn_set_error(SBN_ENOMEM, "bench: out of memory for the network");
  }
  for (int v = 0; v < NV_COUNT; v++)
    for (int p = 0; p < 3; p++)
      t[v][p] = all + (size_t)((v * 3 + p) * reps);
  if ((rc = net_make(o, n, batch, layout)) == 0 && (rc = net_args(n)) == 0)
    rc = net_time(o, n, reps, t);
  if (rc == 0) {
    /* The records' shape is the network's input, 3x224x224 per image. */
    sbn_tensor_desc_t d = {4, {batch, 3, 224, 224}, layout};
    rc = net_push(o, &d, t, reps, out);
  }
  net_free(n);
  free(n);
  free(all);
  return rc;
}
