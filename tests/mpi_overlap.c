/* The overlapped SyncBN (params.reduce_chunk, ops/batchnorm_overlap.c)
 * equals the one-reduction SyncBN for every chunk plan.
 *
 * Each rank runs the same training steps on its shard through two layers
 * on one MPI communicator: one with SBN_CHUNK_OFF (one blocking allreduce
 * per pass, which tests/mpi_bn.c checks against float64) and one with a
 * chunk plan: every chunk size from 1 channel to more than C, and the
 * automatic plan. y, dx, dweight, dbias and the running statistics must
 * be bitwise equal with the reference kernels on up to two processes
 * (each chunk is the same kernel work and a two-process merge is
 * symmetric), and within the tolerances of tests/mpi_bn.c otherwise: an
 * optimized set may block its sums over several samples, which a chunk's
 * per-sample pieces would round differently (today's AVX2 set does not,
 * and gives the same bits too).
 * Counts cover even, uneven and empty shards; C is 1, 3, 17 and 64; both
 * layouts. The chunked layer's collectives are counted through PMPI, so a
 * plan that silently fell back to one reduction fails. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mpi_pmpi.h"
#include "mpi_util.h"
#include "syncbn_mpi.h"

#define TOL_Y 1e-5
#define TOL_DX 1e-4

/* One communicator of every rank serves all cases (creating one per case
 * made the test slow on a loaded machine); a layer does not have to match
 * the parameters a communicator was created with. */
static sbn_comm_t *ov_comm;

typedef struct ov_case_s {
  const int *counts; /* samples per rank */
  size_t C, S;       /* S: spatial product, as (S) or (h, w) */
  sbn_layout_t layout;
  size_t chunk; /* params.reduce_chunk of the chunked layer */
  const char *kern;
  int steps;
} ov_case_t;

typedef struct ov_run_s {
  sbn_layer_t *layer;
  sbn_tensor_desc_t desc;
  float *y, *dx, *dw, *db, *rm, *rv;
  sbn_state_t state;
  void *ws, *saved;
  size_t ws_bytes, saved_bytes;
} ov_run_t;

static int ov_setup(ov_run_t *r, sbn_comm_t *comm, const ov_case_t *c, size_t N,
                    size_t chunk) {
  sbn_layer_params_t p;
  memset(r, 0, sizeof *r);
  sbn_layer_params_default(&p, SBN_OP_BATCHNORM);
  p.channels = c->C;
  p.reduce_chunk = chunk;
  r->desc.ndim = 4;
  r->desc.dims[0] = N;
  r->desc.dims[1] = c->C;
  r->desc.dims[2] = c->S % 2 == 0 ? 2 : 1;
  r->desc.dims[3] = c->S / r->desc.dims[2];
  r->desc.layout = c->layout;
  if (!MU_RC(sbn_layer_create(&p, comm, &r->layer), 0, "sbn_layer_create") ||
      !MU_RC(sbn_layer_sizes(r->layer, &r->desc, &r->ws_bytes, &r->saved_bytes),
             0, "sbn_layer_sizes"))
    return -1;
  size_t n = N * c->C * c->S;
  r->ws = mu_alloc(r->ws_bytes);
  r->saved = mu_alloc(r->saved_bytes);
  r->y = mu_alloc(n * sizeof(float));
  r->dx = mu_alloc(n * sizeof(float));
  r->dw = mu_alloc(c->C * sizeof(float));
  r->db = mu_alloc(c->C * sizeof(float));
  r->rm = mu_alloc(c->C * sizeof(float));
  r->rv = mu_alloc(c->C * sizeof(float));
  for (size_t i = 0; i < c->C; i++) {
    r->rm[i] = 0.0f;
    r->rv[i] = 1.0f;
  }
  r->state.running_mean = r->rm;
  r->state.running_var = r->rv;
  return 0;
}

static void ov_free(ov_run_t *r) {
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

static int ov_step(ov_run_t *r, const float *x, const float *dy, const float *w,
                   const float *b) {
  sbn_forward_args_t fa = {0};
  sbn_backward_args_t ba = {0};
  fa.mode = ba.mode = SBN_MODE_TRAIN;
  fa.x_desc = ba.x_desc = &r->desc;
  fa.x = ba.x = x;
  fa.y = r->y;
  fa.weight = ba.weight = w;
  fa.bias = b;
  fa.state = &r->state;
  fa.workspace = ba.workspace = r->ws;
  fa.workspace_bytes = ba.workspace_bytes = r->ws_bytes;
  fa.saved = r->saved;
  ba.saved = r->saved;
  fa.saved_bytes = ba.saved_bytes = r->saved_bytes;
  ba.dy = dy;
  ba.dx = r->dx;
  ba.dweight = r->dw;
  ba.dbias = r->db;
  if (!MU_RC(sbn_forward(r->layer, &fa), 0, "sbn_forward"))
    return -1;
  return MU_RC(sbn_backward(r->layer, &ba), 0, "sbn_backward") ? 0 : -1;
}

/* Bitwise, or within tol as a normalized error. */
static void ov_cmp(const char *cs, const char *what, const float *got,
                   const float *want, size_t n, int bitwise, double tol) {
  if (bitwise) {
    size_t i = 0;
    while (i < n && memcmp(&got[i], &want[i], sizeof *got) == 0)
      i++;
    MU_CHECK(i == n, "%s: %s differs at %zu (%.9g vs %.9g)", cs, what, i,
             i < n ? got[i] : 0.0, i < n ? want[i] : 0.0);
  } else {
    double e = mu_rel_err_f(got, want, n);
    MU_CHECK(e <= tol, "%s: %s relative error %.3g > %.1g", cs, what, e, tol);
  }
}

/* The chunked layer's collectives in one step: more than one
 * MPI_Iallreduce per pass wherever the plan splits the channels. */
static void ov_check_calls(const char *cs, const ov_case_t *c, int step,
                           long iar, long ar) {
  size_t cc = c->chunk;
  if (mu_size < 2)
    return;
  if (cc == 0) {
    /* The automatic plan of these small tensors is one reduction. */
    MU_CHECK(iar == 0 && ar == 2, "%s step %d: auto plan made %ld/%ld calls",
             cs, step, iar, ar);
    return;
  }
  size_t K = cc >= c->C ? 1 : (c->C + cc - 1) / cc;
  if (K == 1)
    MU_CHECK(iar == 0 && ar == 2, "%s step %d: %ld Iallreduce, %ld Allreduce",
             cs, step, iar, ar);
  else
    MU_CHECK(iar == (long)(2 * K) && ar == 0,
             "%s step %d: %ld Iallreduce, %ld Allreduce, want %zu", cs, step,
             iar, ar, 2 * K);
}

static void ov_case(const ov_case_t *c) {
  const int P = mu_size, me = mu_rank;
  size_t rowsz = c->C * c->S, off = 0, Ntot = 0;
  for (int r = 0; r < P; r++) {
    if (r < me)
      off += (size_t)c->counts[r];
    Ntot += (size_t)c->counts[r];
  }
  size_t myN = (size_t)c->counts[me];
  char cs[160];
  snprintf(cs, sizeof cs, "P=%d N=%zu C=%zu S=%zu %s chunk=%zu %s", P, myN,
           c->C, c->S, c->layout == SBN_LAYOUT_NCHW ? "NCHW" : "NHWC", c->chunk,
           c->kern);
  sbn_comm_t *comm = ov_comm;
  ov_run_t ref, chk;
  memset(&ref, 0, sizeof ref);
  memset(&chk, 0, sizeof chk);
  float *x = mu_alloc(Ntot * rowsz * sizeof *x);
  float *dy = mu_alloc(Ntot * rowsz * sizeof *dy);
  float *w = mu_alloc(c->C * sizeof *w), *b = mu_alloc(c->C * sizeof *b);
  mu_rng_t rng;
  mu_rng_seed(&rng, 11);
  for (size_t i = 0; i < c->C; i++) {
    w[i] = (float)(1.0 + 0.5 * mu_rng_normal(&rng));
    b[i] = (float)(0.5 * mu_rng_normal(&rng));
  }
  if (ov_setup(&ref, comm, c, myN, SBN_CHUNK_OFF) != 0 ||
      ov_setup(&chk, comm, c, myN, c->chunk) != 0)
    goto done;
  int bitwise = P <= 2 && strcmp(c->kern, "ref") == 0;
  for (int step = 0; step < c->steps; step++) {
    mu_rng_seed(&rng, 500 + (uint64_t)step);
    for (size_t i = 0; i < Ntot * rowsz; i++) {
      size_t ch = c->layout == SBN_LAYOUT_NCHW ? (i / c->S) % c->C : i % c->C;
      x[i] = (float)(0.3 * (double)ch +
                     (1.0 + 0.1 * (double)ch) * mu_rng_normal(&rng));
      dy[i] = (float)mu_rng_normal(&rng);
    }
    const float *xs = x + off * rowsz, *dys = dy + off * rowsz;
    if (ov_step(&ref, xs, dys, w, b) != 0)
      goto done;
    pm_reset();
    if (ov_step(&chk, xs, dys, w, b) != 0)
      goto done;
    ov_check_calls(cs, c, step, pm_calls[PM_IALLREDUCE],
                   pm_calls[PM_ALLREDUCE]);
    size_t n = myN * rowsz;
    ov_cmp(cs, "y", chk.y, ref.y, n, bitwise, TOL_Y);
    ov_cmp(cs, "dx", chk.dx, ref.dx, n, bitwise, TOL_DX);
    ov_cmp(cs, "dbias", chk.db, ref.db, c->C, bitwise, TOL_Y);
    ov_cmp(cs, "dweight", chk.dw, ref.dw, c->C, bitwise, TOL_DX);
    ov_cmp(cs, "running_mean", chk.rm, ref.rm, c->C, bitwise, TOL_Y);
    ov_cmp(cs, "running_var", chk.rv, ref.rv, c->C, bitwise, TOL_Y);
    MU_CHECK(chk.state.num_batches_tracked == ref.state.num_batches_tracked,
             "%s: num_batches_tracked %lld vs %lld", cs,
             (long long)chk.state.num_batches_tracked,
             (long long)ref.state.num_batches_tracked);
  }
done:
  ov_free(&ref);
  ov_free(&chk);
  free(x);
  free(dy);
  free(w);
  free(b);
}

/* A tensor past the automatic plan's threshold (2 MiB per rank, see
 * sbn__bn_chunk): the first forward has no count to plan from and reduces
 * once, its backward and every later pass reduce in chunks; results stay
 * those of the one-reduction layer. */
static void ov_auto_large(void) {
  static const int counts[4] = {3, 2, 3, 0};
  ov_case_t c = {0};
  int cnt[4];
  for (int r = 0; r < mu_size; r++)
    cnt[r] = r < 4 ? counts[r] : 1;
  c.counts = cnt;
  c.C = 40;
  c.S = 96 * 96;
  c.layout = SBN_LAYOUT_NCHW;
  c.chunk = 0;
  c.kern = "default";
  /* Chunks are expected only where the plan's per-rank share of the
   * global tensor passes 2 MiB: C * count * 4 / P with count = total N *
   * S. The case below sits above it for every P the tests run. */
  int total = 0;
  for (int r = 0; r < mu_size; r++)
    total += cnt[r];
  double share = 40.0 * total * c.S * 4 / mu_size;
  MU_CHECK(mu_size < 2 || share > 2.0 * 1024 * 1024,
           "auto case too small: %.0f bytes per rank", share);
  sbn_layer_params_t p;
  sbn_comm_t *comm = NULL;
  ov_run_t ref, chk;
  memset(&ref, 0, sizeof ref);
  memset(&chk, 0, sizeof chk);
  sbn_layer_params_default(&p, SBN_OP_BATCHNORM);
  p.channels = c.C;
  size_t rowsz = c.C * c.S, myN = (size_t)cnt[mu_rank], off = 0;
  for (int r = 0; r < mu_rank; r++)
    off += (size_t)cnt[r];
  float *x = mu_alloc((size_t)total * rowsz * sizeof *x);
  float *dy = mu_alloc((size_t)total * rowsz * sizeof *dy);
  float *w = mu_alloc(c.C * sizeof *w), *b = mu_alloc(c.C * sizeof *b);
  for (size_t i = 0; i < c.C; i++) {
    w[i] = 1.0f + 0.01f * (float)i;
    b[i] = 0.1f;
  }
  mu_rng_t rng;
  mu_rng_seed(&rng, 3);
  for (size_t i = 0; i < (size_t)total * rowsz; i++) {
    x[i] = (float)(2.0 + mu_rng_normal(&rng));
    dy[i] = (float)mu_rng_normal(&rng);
  }
  if (!MU_RC(sbn_mpi_comm_create(MPI_COMM_WORLD, 0, &p, &comm), 0, "comm") ||
      ov_setup(&ref, comm, &c, myN, SBN_CHUNK_OFF) != 0 ||
      ov_setup(&chk, comm, &c, myN, 0) != 0)
    goto done;
  long iar[3];
  for (int step = 0; step < 3; step++) {
    if (ov_step(&ref, x + off * rowsz, dy + off * rowsz, w, b) != 0)
      goto done;
    pm_reset();
    if (ov_step(&chk, x + off * rowsz, dy + off * rowsz, w, b) != 0)
      goto done;
    iar[step] = pm_calls[PM_IALLREDUCE];
    ov_cmp("auto large", "y", chk.y, ref.y, myN * rowsz, 0, TOL_Y);
    ov_cmp("auto large", "dx", chk.dx, ref.dx, myN * rowsz, 0, TOL_DX);
    ov_cmp("auto large", "running_var", chk.rv, ref.rv, c.C, 0, TOL_Y);
  }
  /* Two chunks per pass (SBN__AUTO_CHUNKS); the first forward has no
   * count to plan from and reduces once, blocking. */
  if (mu_size >= 2)
    MU_CHECK(iar[0] == 2 && iar[1] == 4 && iar[2] == 4,
             "auto large: Iallreduce calls per step %ld, %ld, %ld", iar[0],
             iar[1], iar[2]);
done:
  ov_free(&ref);
  ov_free(&chk);
  sbn_comm_destroy(comm);
  free(x);
  free(dy);
  free(w);
  free(b);
}

/* A global batch of one value per channel fails after chunk 0's
 * reduction, with SBN_ESMALLBATCH on every rank; chunk 1's reduction,
 * already begun, must still be finished everywhere, so the communicator
 * stays in step for the next collective. */
static void ov_small_batch(void) {
  int cnt[64];
  for (int r = 0; r < mu_size && r < 64; r++)
    cnt[r] = r == mu_size - 1;
  ov_case_t c = {cnt, 6, 1, SBN_LAYOUT_NCHW, 2, "ref", 1};
  sbn_layer_params_t p;
  sbn_comm_t *comm = NULL;
  ov_run_t chk;
  memset(&chk, 0, sizeof chk);
  sbn_layer_params_default(&p, SBN_OP_BATCHNORM);
  p.channels = c.C;
  p.reduce_chunk = c.chunk;
  size_t myN = (size_t)cnt[mu_rank];
  float *x = mu_alloc(6 * sizeof *x), *y = mu_alloc(6 * sizeof *y);
  float w[6] = {1, 1, 1, 1, 1, 1}, b[6] = {0};
  for (int i = 0; i < 6; i++)
    x[i] = (float)i;
  if (mu_size > 64 ||
      !MU_RC(sbn_mpi_comm_create(MPI_COMM_WORLD, 0, &p, &comm), 0, "comm") ||
      ov_setup(&chk, comm, &c, myN, c.chunk) != 0)
    goto done;
  sbn_forward_args_t fa = {0};
  fa.mode = SBN_MODE_TRAIN;
  fa.x_desc = &chk.desc;
  fa.x = x;
  fa.y = y;
  fa.weight = w;
  fa.bias = b;
  fa.state = &chk.state;
  fa.workspace = chk.ws;
  fa.workspace_bytes = chk.ws_bytes;
  fa.saved = chk.saved;
  fa.saved_bytes = chk.saved_bytes;
  MU_RC(sbn_forward(chk.layer, &fa), SBN_ESMALLBATCH, "count 1, chunked");
  sbn_rec_t rec = {SBN_REC_SUM, {1, 2, 3}};
  MU_RC(sbn_comm_allreduce(comm, &rec, 1), 0, "allreduce after the error");
  MU_CHECK(rec.v[0] == mu_size && rec.v[2] == 3.0 * mu_size,
           "allreduce after the error: %g %g", rec.v[0], rec.v[2]);
done:
  ov_free(&chk);
  sbn_comm_destroy(comm);
  free(x);
  free(y);
}

/* Chunks walked in several blocks of rows: the passes poll the request
 * in flight after each block, and a block spans 2^20 elements (4 MiB of
 * output, SBN__BLOCK_SPAN in ops/batchnorm_overlap.c), so only a shard
 * of more than that has more than one. Rank 0's shard here (42 samples
 * of 7 x 4096) is 1.15 times that: chunks of 3, 3 and 1 channels, each in
 * blocks of 38 samples (1 + ceil((2^20 - 3 * 4096) / (7 * 4096))), so 2
 * blocks with an uneven last one; the other shards are small (one block)
 * or empty, and kept small because every rank makes the whole batch. */
static void ov_blocks(int *buf) {
  static const int counts[4] = {42, 5, 0, 3};
  static const char *const kerns[] = {"ref", "avx512"};
  for (int r = 0; r < mu_size; r++)
    buf[r] = r < 4 ? counts[r] : 1;
  for (int ki = 0; ki < 2; ki++) {
    if (sbn_kernel_select(kerns[ki]) != 0)
      continue;
    ov_case_t c = {0};
    c.counts = buf;
    c.C = 7;
    c.S = 4096;
    c.layout = SBN_LAYOUT_NCHW;
    c.chunk = 3;
    c.kern = kerns[ki];
    c.steps = 1;
    ov_case(&c);
  }
}

static const int *counts_for(int which, int *buf) {
  static const int sets[3][4] = {{3, 5, 2, 4}, {0, 4, 0, 1}, {1, 1, 1, 1}};
  for (int r = 0; r < mu_size; r++)
    buf[r] = r < 4 ? sets[which][r] : 2;
  return buf;
}

/* sbn_mpi_comm_seconds: the time inside the communicator's MPI calls
 * grows with every pass that reduces (the chunked layer's MPI_Iallreduce,
 * MPI_Test and MPI_Wait, the other's MPI_Allreduce), and a bad argument
 * is SBN_EINVAL naming it. */
static void ov_seconds(int *buf) {
  double s0 = -1, s1 = -1, s;
  MU_RC(sbn_mpi_comm_seconds(ov_comm, &s0), 0, "sbn_mpi_comm_seconds");
  ov_case_t c = {0};
  c.counts = counts_for(0, buf);
  c.C = 17;
  c.S = 15;
  c.layout = SBN_LAYOUT_NCHW;
  c.chunk = 5;
  c.kern = "ref";
  c.steps = 1;
  if (sbn_kernel_select("ref") == 0)
    ov_case(&c);
  MU_RC(sbn_mpi_comm_seconds(ov_comm, &s1), 0, "sbn_mpi_comm_seconds");
  MU_CHECK(s0 >= 0 && (mu_size < 2 ? s1 >= s0 : s1 > s0),
           "sbn_mpi_comm_seconds: %.9g then %.9g after a step", s0, s1);
  MU_RC(sbn_mpi_comm_seconds(ov_comm, NULL), SBN_EINVAL, "seconds NULL");
  MU_CHECK(strstr(sbn_last_error(), "seconds") != NULL, "message '%s'",
           sbn_last_error());
  MU_RC(sbn_mpi_comm_seconds(sbn_comm_local(), &s), SBN_EINVAL, "local comm");
  MU_CHECK(strstr(sbn_last_error(), "comm") != NULL, "message '%s'",
           sbn_last_error());
  MU_RC(sbn_mpi_comm_seconds(NULL, &s), SBN_EINVAL, "NULL comm");
}

int main(int argc, char **argv) {
  mu_init(&argc, &argv);
  sbn_layer_params_t p;
  sbn_layer_params_default(&p, SBN_OP_BATCHNORM);
  p.channels = 1;
  if (!MU_RC(sbn_mpi_comm_create(MPI_COMM_WORLD, 0, &p, &ov_comm), 0, "comm"))
    return mu_finish("mpi_overlap");
  int *buf = mu_alloc((size_t)mu_size * sizeof *buf);
  static const size_t Cs[] = {1, 3, 17, 64};
  static const size_t chunks[] = {1, 2, 5, 63, 1000, 0};
  static const char *const kerns[] = {"ref", "avx2", "avx512"};
  for (int which = 0; which < 3; which++)
    for (int ci = 0; ci < 4; ci++)
      for (int lay = 0; lay < 2; lay++)
        for (size_t k = 0; k < sizeof chunks / sizeof *chunks; k++)
          for (int ki = 0; ki < 3; ki++) {
            /* A build or CPU without the vector set runs the reference
             * cases only (the same on every rank). */
            if (sbn_kernel_select(kerns[ki]) != 0)
              continue;
            ov_case_t c = {0};
            c.counts = counts_for(which, buf);
            c.C = Cs[ci];
            /* Odd spatial sizes put channels in the kernels' tails. */
            c.S = ci % 2 ? 15 : 22;
            c.layout = lay ? SBN_LAYOUT_NHWC : SBN_LAYOUT_NCHW;
            c.chunk = chunks[k];
            c.kern = kerns[ki];
            c.steps = 2;
            ov_case(&c);
          }
  ov_blocks(buf);
  ov_seconds(buf);
  ov_auto_large();
  ov_small_batch();
  sbn_comm_destroy(ov_comm);
  free(buf);
  return mu_finish("mpi_overlap");
}
