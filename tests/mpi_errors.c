/* Error paths of SyncBN over MPI, which must agree on every rank:
 *   - layer-creation consistency: one rank with a different eps (or any
 *     other compared field) makes every rank return SBN_EMISMATCH with a
 *     message naming the field; equal descriptions (including group sizes
 *     0 and P, which mean the same) succeed; a NULL argument on one rank
 *     is SBN_EINVAL everywhere;
 *   - a global count of 1 in training is SBN_ESMALLBATCH on every rank, even
 *     on ranks with no samples, and the job goes on (no hang);
 *   - a global count of 0 leaves the running statistics untouched;
 *   - the communicators syncbn creates return MPI errors (MPI_ERRORS_RETURN)
 *     and sbn_mpi_error turns one into SBN_ECOMM naming the call;
 *   - creating a communicator before MPI_Init is SBN_ESTATE. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mpi_util.h"
#include "syncbn_mpi.h"

/* Every rank's rc, gathered: 1 if all ranks got want. */
static int all_ranks_got(int rc, int want) {
  int ok = rc == want, all = 0;
  MPI_Allreduce(&ok, &all, 1, MPI_INT, MPI_LAND, MPI_COMM_WORLD);
  return all;
}

typedef void (*mutate_fn)(sbn_layer_params_t *p, int *k);

static void m_eps(sbn_layer_params_t *p, int *k) {
  (void)k;
  p->eps = 1e-3;
}
static void m_momentum(sbn_layer_params_t *p, int *k) {
  (void)k;
  p->momentum = 0.2;
}
static void m_channels(sbn_layer_params_t *p, int *k) {
  (void)k;
  p->channels = 5;
}
static void m_groups(sbn_layer_params_t *p, int *k) {
  (void)k;
  p->groups = 2;
}
static void m_cumulative(sbn_layer_params_t *p, int *k) {
  (void)k;
  p->cumulative = 1;
}
static void m_affine(sbn_layer_params_t *p, int *k) {
  (void)k;
  p->affine = 0;
}
static void m_track(sbn_layer_params_t *p, int *k) {
  (void)k;
  p->track_running_stats = 0;
}
static void m_ghost(sbn_layer_params_t *p, int *k) {
  (void)k;
  p->ghost_batch = 2;
}
static void m_p(sbn_layer_params_t *p, int *k) {
  (void)k;
  p->p = 0.25;
}
static void m_op(sbn_layer_params_t *p, int *k) {
  (void)k;
  p->op = SBN_OP_INSTANCENORM;
}
static void m_group_size(sbn_layer_params_t *p, int *k) {
  (void)p;
  *k = 1;
}

static void test_mismatch(void) {
  static const struct {
    const char *field;
    mutate_fn fn;
  } fields[] = {{"eps", m_eps},
                {"momentum", m_momentum},
                {"channels", m_channels},
                {"groups", m_groups},
                {"cumulative", m_cumulative},
                {"affine", m_affine},
                {"track_running_stats", m_track},
                {"p", m_p},
                {"ghost_batch", m_ghost},
                {"op", m_op},
                {"group_size", m_group_size}};
  for (size_t i = 0; i < sizeof fields / sizeof *fields; i++) {
    sbn_layer_params_t p;
    sbn_comm_t *comm = NULL;
    int k = 0;
    sbn_layer_params_default(&p, SBN_OP_BATCHNORM);
    p.channels = 4;
    /* Rank 1 describes the layer differently (the last rank for the group
     * size, so that it differs from its normalized value everywhere). */
    if (mu_rank == 1)
      fields[i].fn(&p, &k);
    int rc = sbn_mpi_comm_create(MPI_COMM_WORLD, k, &p, &comm);
    int want = mu_size >= 2 ? SBN_EMISMATCH : 0;
    char what[96];
    snprintf(what, sizeof what, "rank 1 with a different %s", fields[i].field);
    MU_RC(rc, want, what);
    MU_CHECK(all_ranks_got(rc, want), "%s: not every rank got %s", what,
             sbn_err_name(want));
    if (want != 0) {
      MU_CHECK(comm == NULL, "%s: *out not NULL after an error", what);
      char needle[64];
      snprintf(needle, sizeof needle, "%s:", fields[i].field);
      MU_CHECK(strncmp(sbn_last_error(), needle, strlen(needle)) == 0,
               "%s: message '%s' does not name the field", what,
               sbn_last_error());
    }
    sbn_comm_destroy(comm);
  }

  /* Group sizes 0, P and anything above P all mean "every rank". */
  {
    sbn_layer_params_t p;
    sbn_comm_t *comm = NULL;
    sbn_layer_params_default(&p, SBN_OP_BATCHNORM);
    p.channels = 4;
    int k = mu_rank % 3 == 0 ? 0 : mu_rank % 3 == 1 ? mu_size : mu_size + 5;
    int rc = sbn_mpi_comm_create(MPI_COMM_WORLD, k, &p, &comm);
    MU_RC(rc, 0, "group sizes 0, P and P + 5 mixed");
    if (comm != NULL)
      MU_CHECK(comm->size == mu_size && comm->rank == mu_rank,
               "one group of all: size %d rank %d", comm->size, comm->rank);
    sbn_comm_destroy(comm);
  }

  /* A NULL params on rank 0 only: every rank fails the same way. */
  {
    sbn_layer_params_t p;
    sbn_comm_t *comm = NULL;
    sbn_layer_params_default(&p, SBN_OP_BATCHNORM);
    p.channels = 4;
    int rc =
        sbn_mpi_comm_create(MPI_COMM_WORLD, 0, mu_rank == 0 ? NULL : &p, &comm);
    MU_RC(rc, SBN_EINVAL, "NULL params on rank 0");
    MU_CHECK(all_ranks_got(rc, SBN_EINVAL),
             "NULL params on rank 0: not every rank got SBN_EINVAL");
    MU_CHECK(comm == NULL, "NULL params: *out set");
  }
}

typedef struct bn_s {
  sbn_comm_t *comm;
  sbn_layer_t *l;
  float rm[2], rv[2], w[2], b[2];
  sbn_state_t st;
  void *ws, *saved;
  size_t wsb, svb;
} bn_t;

static int bn_open(bn_t *bn) {
  sbn_layer_params_t p;
  memset(bn, 0, sizeof *bn);
  sbn_layer_params_default(&p, SBN_OP_BATCHNORM);
  p.channels = 2;
  int rc = sbn_mpi_comm_create(MPI_COMM_WORLD, 0, &p, &bn->comm);
  if (!MU_RC(rc, 0, "sbn_mpi_comm_create"))
    return -1;
  rc = sbn_layer_create(&p, bn->comm, &bn->l);
  if (!MU_RC(rc, 0, "sbn_layer_create"))
    return -1;
  sbn_tensor_desc_t d = {2, {8, 2}, SBN_LAYOUT_NCHW};
  rc = sbn_layer_sizes(bn->l, &d, &bn->wsb, &bn->svb);
  if (!MU_RC(rc, 0, "sbn_layer_sizes"))
    return -1;
  bn->ws = mu_alloc(bn->wsb);
  bn->saved = mu_alloc(bn->svb);
  for (int c = 0; c < 2; c++) {
    bn->rm[c] = 0.25f * (float)(c + 1);
    bn->rv[c] = 1.5f;
    bn->w[c] = 1;
    bn->b[c] = 0;
  }
  bn->st.running_mean = bn->rm;
  bn->st.running_var = bn->rv;
  bn->st.num_batches_tracked = 3;
  return 0;
}

static void bn_close(bn_t *bn) {
  sbn_layer_destroy(bn->l);
  sbn_comm_destroy(bn->comm);
  free(bn->ws);
  free(bn->saved);
}

/* Training forward of n samples of shape (n, 2). */
static int bn_fwd(bn_t *bn, size_t n, const float *x, float *y) {
  sbn_tensor_desc_t d = {2, {n, 2}, SBN_LAYOUT_NCHW};
  sbn_forward_args_t a = {0};
  a.mode = SBN_MODE_TRAIN;
  a.x_desc = &d;
  a.x = x;
  a.y = y;
  a.weight = bn->w;
  a.bias = bn->b;
  a.state = &bn->st;
  a.workspace = bn->ws;
  a.workspace_bytes = bn->wsb;
  a.saved = bn->saved;
  a.saved_bytes = bn->svb;
  return sbn_forward(bn->l, &a);
}

static void test_small_batch(void) {
  bn_t bn;
  float x[16], y[16];
  for (int i = 0; i < 16; i++)
    x[i] = (float)(i * i % 7) + 0.5f * (float)i;
  if (bn_open(&bn) != 0)
    return;

  /* Global count 1: rank 0 has one sample, every other rank none. */
  float rm0[2], rv0[2];
  memcpy(rm0, bn.rm, sizeof rm0);
  memcpy(rv0, bn.rv, sizeof rv0);
  int rc = bn_fwd(&bn, mu_rank == 0 ? 1 : 0, x, y);
  MU_RC(rc, SBN_ESMALLBATCH, "global count 1");
  MU_CHECK(all_ranks_got(rc, SBN_ESMALLBATCH),
           "global count 1: not every rank got SBN_ESMALLBATCH");
  MU_CHECK(memcmp(rm0, bn.rm, sizeof rm0) == 0 &&
               memcmp(rv0, bn.rv, sizeof rv0) == 0 &&
               bn.st.num_batches_tracked == 3,
           "global count 1: running statistics changed");

  /* Global count 0: every rank empty. Succeeds, changes nothing. */
  rc = bn_fwd(&bn, 0, x, y);
  MU_RC(rc, 0, "global count 0");
  MU_CHECK(memcmp(rm0, bn.rm, sizeof rm0) == 0 &&
               memcmp(rv0, bn.rv, sizeof rv0) == 0,
           "global count 0: running statistics changed");
  MU_CHECK(bn.st.num_batches_tracked == 3,
           "global count 0: num_batches_tracked %lld, want 3",
           (long long)bn.st.num_batches_tracked);

  /* The job is still in step: a normal batch works on every rank and
   * moves the running statistics identically. */
  rc = bn_fwd(&bn, 4 + (size_t)(mu_rank % 3), x, y);
  MU_RC(rc, 0, "normal batch after the errors");
  MU_CHECK(all_ranks_got(rc, 0), "normal batch: not every rank succeeded");
  MU_CHECK(
      bn.st.num_batches_tracked == 4 && memcmp(rm0, bn.rm, sizeof rm0) != 0,
      "normal batch: running statistics not updated");
  float got[2] = {bn.rm[0], bn.rv[0]}, r0[2];
  memcpy(r0, got, sizeof r0);
  MPI_Bcast(r0, 2, MPI_FLOAT, 0, MPI_COMM_WORLD);
  MU_CHECK(memcmp(r0, got, sizeof r0) == 0,
           "running statistics differ from rank 0's");
  bn_close(&bn);
}

static void test_mpi_errors(void) {
  bn_t bn;
  if (bn_open(&bn) != 0)
    return;
  MPI_Comm h = sbn_mpi_comm_handle(bn.comm);
  MU_CHECK(h != MPI_COMM_NULL, "sbn_mpi_comm_handle: MPI_COMM_NULL");
  MU_CHECK(sbn_mpi_comm_handle(sbn_comm_local()) == MPI_COMM_NULL,
           "sbn_mpi_comm_handle of the local comm is not MPI_COMM_NULL");
  MU_CHECK(sbn_mpi_comm_handle(NULL) == MPI_COMM_NULL,
           "sbn_mpi_comm_handle(NULL) is not MPI_COMM_NULL");
  if (h != MPI_COMM_NULL) {
    MPI_Errhandler eh;
    MPI_Comm_get_errhandler(h, &eh);
    MU_CHECK(eh == MPI_ERRORS_RETURN,
             "the group communicator's error handler is not "
             "MPI_ERRORS_RETURN");
    MPI_Errhandler_free(&eh);
    /* A real MPI error on it comes back instead of aborting. */
    int v = 1;
    int err = MPI_Bcast(&v, 1, MPI_INT, mu_size + 3, h);
    MU_CHECK(err != MPI_SUCCESS, "MPI_Bcast with a bad root succeeded");
    int rc = sbn_mpi_error(err, "MPI_Bcast");
    MU_RC(rc, SBN_ECOMM, "sbn_mpi_error");
    MU_CHECK(strstr(sbn_last_error(), "MPI_Bcast") != NULL,
             "sbn_mpi_error message '%s' does not name the call",
             sbn_last_error());
  }
  /* The vtable's own count limit is checked before MPI sees it. */
  if (bn.comm->size > 1) {
    sbn_rec_t r;
    int rc = bn.comm->vt->allreduce(bn.comm, &r, (size_t)1 << 40);
    MU_RC(rc, SBN_ELIMIT, "allreduce of 2^40 records");
  }
  bn_close(&bn);
}

/* Two processes that begin non-blocking reductions of different sizes (a
 * bug in the caller, which MPI's collective would not notice) both get
 * SBN_ECOMM from the two-process exchange instead of a hang or a silent
 * half-merged result; a matching reduction afterwards still works. */
static void test_pair_mismatch(void) {
  bn_t bn;
  sbn_rec_t r[8];
  void *req = NULL;
  int rc, done = 0;
  if (mu_size != 2 || bn_open(&bn) != 0)
    return;
  for (int i = 0; i < 8; i++) {
    r[i].tag = SBN_REC_SUM;
    r[i].v[0] = r[i].v[1] = r[i].v[2] = 1;
  }
  rc = bn.comm->vt->iallreduce_begin(bn.comm, r, mu_rank == 0 ? 3 : 5, &req);
  MU_RC(rc, 0, "iallreduce_begin");
  while (rc == 0 && !done)
    rc = bn.comm->vt->iallreduce_test(bn.comm, req, &done);
  int e = bn.comm->vt->iallreduce_end(bn.comm, req);
  if (rc == 0)
    rc = e;
  MU_CHECK(all_ranks_got(rc, SBN_ECOMM),
           "reductions of 3 and 5 records: not every rank got SBN_ECOMM "
           "(this rank: %d, %s)",
           rc, sbn_last_error());
  rc = bn.comm->vt->allreduce(bn.comm, r, 2);
  MU_CHECK(all_ranks_got(rc, 0) && r[0].v[0] == 2,
           "a blocking reduction after the mismatch: rc %d, count %g", rc,
           r[0].v[0]);
  bn_close(&bn);
}

int main(int argc, char **argv) {
  /* Before MPI_Init: refused without touching MPI. */
  {
    sbn_layer_params_t p;
    sbn_comm_t *comm = NULL;
    sbn_layer_params_default(&p, SBN_OP_BATCHNORM);
    p.channels = 4;
    int rc = sbn_mpi_comm_create(MPI_COMM_WORLD, 0, &p, &comm);
    MU_RC(rc, SBN_ESTATE, "sbn_mpi_comm_create before MPI_Init");
  }
  mu_init(&argc, &argv);
  test_mismatch();
  test_small_batch();
  test_mpi_errors();
  test_pair_mismatch();
  return mu_finish("mpi_errors");
}
