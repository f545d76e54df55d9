/* Fused and non-blocking SyncBN (src/syncbn_fused.h) over MPI.
 *
 * One "network" of five layers: three BatchNorm layers in training (NCHW,
 * NHWC, large-mean (N, C)), a GroupNorm and a BatchNorm in eval mode,
 * which the fused step runs without putting them in the reduction. Three
 * copies of it run the same two training steps:
 *   A: unfused, sbn_forward/sbn_backward per layer;
 *   B: fused and blocking: exactly one MPI_Allreduce for forward and one for
 *      backward (counted through PMPI), nothing else;
 *   C: non-blocking begin/test/end: exactly one MPI_Iallreduce each way.
 * All three must agree (y, dx, dweight, dbias, running statistics). Then
 * the error paths: one rank failing locally still joins the one collective
 * and every rank returns an error; layers whose communicator size differs
 * from the fused one are SBN_EINVAL; a short record buffer is
 * SBN_ENOSPACE before any MPI call. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mpi_pmpi.h"
#include "mpi_util.h"
#include "syncbn_fused.h"
#include "syncbn_mpi.h"

#define NL 5
#define TOL_Y 1e-5
#define TOL_DX 1e-4

typedef struct spec_s {
  sbn_op_t op;
  size_t C;
  int ndim;
  size_t sp[2];
  sbn_layout_t layout;
  sbn_mode_t mode;
  double offset;
} spec_t;

static const spec_t specs[NL] = {
    {SBN_OP_BATCHNORM, 3, 4, {2, 2}, SBN_LAYOUT_NCHW, SBN_MODE_TRAIN, 0},
    {SBN_OP_GROUPNORM, 4, 3, {3, 0}, SBN_LAYOUT_NCHW, SBN_MODE_TRAIN, 0},
    {SBN_OP_BATCHNORM, 5, 3, {3, 0}, SBN_LAYOUT_NHWC, SBN_MODE_TRAIN, 0},
    {SBN_OP_BATCHNORM, 2, 2, {0, 0}, SBN_LAYOUT_NCHW, SBN_MODE_TRAIN, 1e4},
    {SBN_OP_BATCHNORM, 3, 3, {2, 0}, SBN_LAYOUT_NHWC, SBN_MODE_EVAL, 0},
};

typedef struct net_s {
  sbn_comm_t *comm[NL];
  sbn_layer_t *l[NL];
  sbn_tensor_desc_t d[NL];
  size_t numel[NL];
  float *x[NL], *y[NL], *dy[NL], *dx[NL], *w[NL], *b[NL], *dw[NL], *db[NL];
  float *rm[NL], *rv[NL];
  sbn_state_t st[NL];
  void *ws[NL], *saved[NL];
  size_t wsb[NL], svb[NL];
  sbn_forward_args_t fa[NL];
  sbn_backward_args_t ba[NL];
} net_t;

static size_t my_batch(void) {
  return mu_rank == 2 ? 0 : 2 + (size_t)(mu_rank * 3) % 4;
}

static int net_open(net_t *n, int group_size) {
  memset(n, 0, sizeof *n);
  size_t N = my_batch();
  for (int i = 0; i < NL; i++) {
    const spec_t *s = &specs[i];
    sbn_layer_params_t p;
    sbn_layer_params_default(&p, s->op);
    p.channels = s->C;
    p.groups = s->op == SBN_OP_GROUPNORM ? 2 : 1;
    int rc = sbn_mpi_comm_create(MPI_COMM_WORLD, group_size, &p, &n->comm[i]);
    if (!MU_RC(rc, 0, "sbn_mpi_comm_create"))
      return -1;
    rc = sbn_layer_create(&p, n->comm[i], &n->l[i]);
    if (!MU_RC(rc, 0, "sbn_layer_create"))
      return -1;
    sbn_tensor_desc_t *d = &n->d[i];
    d->ndim = s->ndim;
    d->dims[0] = N;
    d->dims[1] = s->C;
    for (int j = 2; j < s->ndim; j++)
      d->dims[j] = s->sp[j - 2];
    d->layout = s->layout;
    n->numel[i] = 1;
    for (int j = 0; j < s->ndim; j++)
      n->numel[i] *= d->dims[j];
    rc = sbn_layer_sizes(n->l[i], d, &n->wsb[i], &n->svb[i]);
    if (!MU_RC(rc, 0, "sbn_layer_sizes"))
      return -1;
    size_t m = n->numel[i] * sizeof(float), cb = s->C * sizeof(float);
    n->x[i] = mu_alloc(m);
    n->y[i] = mu_alloc(m);
    n->dy[i] = mu_alloc(m);
    n->dx[i] = mu_alloc(m);
    n->w[i] = mu_alloc(cb);
    n->b[i] = mu_alloc(cb);
    n->dw[i] = mu_alloc(cb);
    n->db[i] = mu_alloc(cb);
    n->rm[i] = mu_alloc(cb);
    n->rv[i] = mu_alloc(cb);
    n->ws[i] = mu_alloc(n->wsb[i]);
    n->saved[i] = mu_alloc(n->svb[i]);
    for (size_t c = 0; c < s->C; c++) {
      n->w[i][c] = 1.0f + 0.25f * (float)c;
      n->b[i][c] = 0.1f * (float)c - 0.2f;
      n->rm[i][c] = 0.5f;
      n->rv[i][c] = 2.0f;
    }
    n->st[i].running_mean = n->rm[i];
    n->st[i].running_var = n->rv[i];

    sbn_forward_args_t *fa = &n->fa[i];
    fa->mode = s->mode;
    fa->x_desc = d;
    fa->x = n->x[i];
    fa->y = n->y[i];
    fa->weight = n->w[i];
    fa->bias = n->b[i];
    fa->state = &n->st[i];
    fa->workspace = n->ws[i];
    fa->workspace_bytes = n->wsb[i];
    fa->saved = n->saved[i];
    fa->saved_bytes = n->svb[i];
    sbn_backward_args_t *ba = &n->ba[i];
    ba->mode = s->mode;
    ba->x_desc = d;
    ba->x = n->x[i];
    ba->dy = n->dy[i];
    ba->dx = n->dx[i];
    ba->weight = n->w[i];
    ba->dweight = n->dw[i];
    ba->dbias = n->db[i];
    ba->workspace = n->ws[i];
    ba->workspace_bytes = n->wsb[i];
    ba->saved = n->saved[i];
    ba->saved_bytes = n->svb[i];
  }
  return 0;
}

static void net_close(net_t *n) {
  for (int i = 0; i < NL; i++) {
    sbn_layer_destroy(n->l[i]);
    sbn_comm_destroy(n->comm[i]);
    free(n->x[i]);
    free(n->y[i]);
    free(n->dy[i]);
    free(n->dx[i]);
    free(n->w[i]);
    free(n->b[i]);
    free(n->dw[i]);
    free(n->db[i]);
    free(n->rm[i]);
    free(n->rv[i]);
    free(n->ws[i]);
    free(n->saved[i]);
  }
}

/* This rank's data for a step; every copy of the net gets the same. */
static void net_fill(net_t *n, int step) {
  mu_rng_t r;
  mu_rng_seed(&r, 31 * (uint64_t)mu_rank + 7 * (uint64_t)step + 1);
  for (int i = 0; i < NL; i++) {
    for (size_t e = 0; e < n->numel[i]; e++) {
      n->x[i][e] = (float)(specs[i].offset + 1.5 * mu_rng_normal(&r));
      n->dy[i][e] = (float)mu_rng_normal(&r);
    }
  }
}

static void net_compare(const net_t *a, const net_t *b, const char *what) {
  for (int i = 0; i < NL; i++) {
    size_t m = a->numel[i], C = specs[i].C;
    double ey = mu_rel_err_f(b->y[i], a->y[i], m);
    double edx = mu_rel_err_f(b->dx[i], a->dx[i], m);
    double edb = mu_rel_err_f(b->db[i], a->db[i], C);
    double edw = mu_rel_err_f(b->dw[i], a->dw[i], C);
    double erm = mu_rel_err_f(b->rm[i], a->rm[i], C);
    double erv = mu_rel_err_f(b->rv[i], a->rv[i], C);
    MU_CHECK(ey <= TOL_Y && edb <= TOL_Y && erm <= TOL_Y && erv <= TOL_Y,
             "%s layer %d: y %.3g dbias %.3g running mean %.3g var %.3g", what,
             i, ey, edb, erm, erv);
    MU_CHECK(edx <= TOL_DX && edw <= TOL_DX, "%s layer %d: dx %.3g dw %.3g",
             what, i, edx, edw);
    MU_CHECK(a->st[i].num_batches_tracked == b->st[i].num_batches_tracked,
             "%s layer %d: num_batches_tracked differs", what, i);
  }
}

/* Checks the counters after a fused step: `want` calls of kind and no
 * other MPI call. */
static void check_counts(const char *what, int kind, long want) {
  long got = pm_calls[kind], all = pm_total();
  MU_CHECK(got == want && all == want,
           "%s: %ld %s and %ld MPI calls in all, want %ld and nothing else",
           what, got, pm_name(kind), all, want);
}

static void test_equal(void) {
  net_t A, B, Cn;
  sbn_rec_t *recs = NULL;
  size_t nrec = 0, want_rec = 1 + 3 + 5 + 2;
  long one = mu_size > 1 ? 1 : 0;
  if (net_open(&A, 0) || net_open(&B, 0) || net_open(&Cn, 0))
    return;

  int rc = sbn_fused_forward_records(NL, B.l, B.fa, &nrec);
  MU_RC(rc, 0, "sbn_fused_forward_records");
  MU_CHECK(nrec == want_rec, "forward records %zu, want %zu", nrec, want_rec);
  rc = sbn_fused_backward_records(NL, B.l, B.ba, &nrec);
  MU_RC(rc, 0, "sbn_fused_backward_records");
  MU_CHECK(nrec == want_rec, "backward records %zu, want %zu", nrec, want_rec);
  recs = mu_alloc(want_rec * sizeof *recs);

  for (int step = 0; step < 2; step++) {
    net_fill(&A, step);
    net_fill(&B, step);
    net_fill(&Cn, step);
    for (int i = 0; i < NL; i++) {
      MU_RC(sbn_forward(A.l[i], &A.fa[i]), 0, "unfused forward");
      MU_RC(sbn_backward(A.l[i], &A.ba[i]), 0, "unfused backward");
    }

    pm_reset();
    rc = sbn_bn_forward_fused(B.comm[0], NL, B.l, B.fa, recs, want_rec);
    check_counts("fused forward", PM_ALLREDUCE, one);
    MU_RC(rc, 0, "sbn_bn_forward_fused");
    pm_reset();
    rc = sbn_bn_backward_fused(B.comm[0], NL, B.l, B.ba, recs, want_rec);
    check_counts("fused backward", PM_ALLREDUCE, one);
    MU_RC(rc, 0, "sbn_bn_backward_fused");
    net_compare(&A, &B, "fused vs unfused");

    /* Non-blocking: start, do something else while polling, finish. */
    sbn_fused_req_t req;
    int done = 0;
    long polls = 0;
    pm_reset();
    rc =
        sbn_bn_forward_begin(&req, Cn.comm[0], NL, Cn.l, Cn.fa, recs, want_rec);
    MU_RC(rc, 0, "sbn_bn_forward_begin");
    while (rc == 0 && !done && polls < 100000000) {
      rc = sbn_bn_forward_test(&req, &done);
      polls++;
    }
    MU_RC(rc, 0, "sbn_bn_forward_test");
    MU_CHECK(done, "forward test never reported completion");
    MU_RC(sbn_bn_forward_end(&req), 0, "sbn_bn_forward_end");
    check_counts("non-blocking forward", PM_IALLREDUCE, one);

    pm_reset();
    rc = sbn_bn_backward_begin(&req, Cn.comm[0], NL, Cn.l, Cn.ba, recs,
                               want_rec);
    MU_RC(rc, 0, "sbn_bn_backward_begin");
    /* end without polling must wait by itself. */
    MU_RC(sbn_bn_backward_end(&req), 0, "sbn_bn_backward_end");
    check_counts("non-blocking backward", PM_IALLREDUCE, one);
    net_compare(&B, &Cn, "non-blocking vs blocking");

    /* A request is used once: a second end is out of order. */
    MU_RC(sbn_bn_backward_end(&req), SBN_ESTATE, "second end");
    MU_RC(sbn_bn_forward_test(&req, &done), SBN_ESTATE, "test after end");
  }
  net_close(&A);
  net_close(&B);
  net_close(&Cn);
  free(recs);
}

static void test_errors(void) {
  net_t B;
  size_t nrec = 1 + 3 + 5 + 2;
  sbn_rec_t *recs = mu_alloc(nrec * sizeof *recs);
  long one = mu_size > 1 ? 1 : 0;
  int rc;
  if (net_open(&B, 0) != 0)
    return;
  net_fill(&B, 0);

  /* Too few records: every rank finds out before any MPI call. */
  pm_reset();
  rc = sbn_bn_forward_fused(B.comm[0], NL, B.l, B.fa, recs, nrec - 1);
  MU_RC(rc, SBN_ENOSPACE, "short record buffer");
  check_counts("short record buffer", PM_ALLREDUCE, 0);

  /* Rank 0's second BatchNorm layer gets too little workspace: rank 0
   * reports that, every other rank SBN_ECOMM, all in one collective. */
  size_t keep = B.fa[2].workspace_bytes;
  if (mu_rank == 0)
    B.fa[2].workspace_bytes = 1;
  int want = mu_rank == 0 ? SBN_ENOSPACE : SBN_ECOMM;
  pm_reset();
  rc = sbn_bn_forward_fused(B.comm[0], NL, B.l, B.fa, recs, nrec);
  check_counts("one rank failing locally", PM_ALLREDUCE, one);
  MU_RC(rc, want, "one rank failing locally");
  B.fa[2].workspace_bytes = keep;

  /* And the job goes on: the next fused step works everywhere. */
  rc = sbn_bn_forward_fused(B.comm[0], NL, B.l, B.fa, recs, nrec);
  MU_RC(rc, 0, "fused forward after a failed one");
  net_close(&B);

  /* Layers in sync groups of 1 fused over a communicator of every rank. */
  if (mu_size > 1) {
    net_t G;
    if (net_open(&G, 1) == 0) {
      sbn_comm_t *world = NULL;
      sbn_layer_params_t p;
      sbn_layer_params_default(&p, SBN_OP_BATCHNORM);
      p.channels = 1;
      MU_RC(sbn_mpi_comm_create(MPI_COMM_WORLD, 0, &p, &world), 0,
            "world comm");
      net_fill(&G, 0);
      rc = sbn_bn_forward_fused(world, NL, G.l, G.fa, recs, nrec);
      MU_RC(rc, SBN_EINVAL, "layers of another group size");
      sbn_comm_destroy(world);
    }
    net_close(&G);
  }

  /* Out of order. */
  sbn_fused_req_t req;
  memset(&req, 0, sizeof req);
  MU_RC(sbn_bn_forward_end(&req), SBN_ESTATE, "end without begin");
  free(recs);
}

int main(int argc, char **argv) {
  mu_init(&argc, &argv);
  test_equal();
  test_errors();
  return mu_finish("mpi_fused");
}
