/* Dropout under MPI is seeded per rank: the Philox key is (seed, world
 * rank of the layer's communicator). With an MPI communicator every rank
 * draws a different mask, the same one again for the same step, a new one
 * for another step, and exactly the mask that the documented rule
 * (tests/ref64.c) gives for its world rank. A layer without a
 * communicator draws rank 0's mask. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mpi_util.h"
#include "ref64.h"
#include "syncbn_mpi.h"

#define NUMEL 1003 /* not a multiple of 4: the last Philox block is partial */

static int drop(sbn_layer_t *l, uint64_t step, const float *x, float *y) {
  sbn_tensor_desc_t d = {3, {1, 17, 59}, SBN_LAYOUT_NCHW};
  sbn_forward_args_t a = {0};
  a.mode = SBN_MODE_TRAIN;
  a.x_desc = &d;
  a.x = x;
  a.y = y;
  a.step = step;
  return sbn_forward(l, &a);
}

/* 1 where the element was dropped. */
static void mask_of(const float *y, unsigned char *m) {
  for (size_t i = 0; i < NUMEL; i++)
    m[i] = y[i] == 0.0f;
}

int main(int argc, char **argv) {
  mu_init(&argc, &argv);
  sbn_layer_params_t p;
  sbn_comm_t *comm = NULL;
  sbn_layer_t *l = NULL, *l0 = NULL;
  float *x = mu_alloc(NUMEL * sizeof *x), *y = mu_alloc(NUMEL * sizeof *y);
  unsigned char *m = mu_alloc(NUMEL), *m2 = mu_alloc(NUMEL);
  unsigned char *all = mu_alloc((size_t)mu_size * NUMEL);
  int rc;

  sbn_layer_params_default(&p, SBN_OP_DROPOUT);
  p.p = 0.4;
  p.seed = 1234;
  p.layer_id = 2;
  rc = sbn_mpi_comm_create(MPI_COMM_WORLD, 0, &p, &comm);
  if (!MU_RC(rc, 0, "sbn_mpi_comm_create"))
    goto done;
  MU_CHECK(comm->world_rank == mu_rank, "world_rank %d, want %d",
           comm->world_rank, mu_rank);
  if (!MU_RC(sbn_layer_create(&p, comm, &l), 0, "sbn_layer_create"))
    goto done;
  if (!MU_RC(sbn_layer_create(&p, NULL, &l0), 0, "sbn_layer_create"))
    goto done;
  for (size_t i = 0; i < NUMEL; i++)
    x[i] = 1.0f + (float)(i % 5);

  MU_RC(drop(l, 7, x, y), 0, "dropout forward");
  mask_of(y, m);
  /* Kept values are scaled by 1 / (1 - p); the mask is the ref rule's. */
  size_t bad = 0, dropped = 0;
  for (size_t i = 0; i < NUMEL; i++) {
    int want = ref64_dropped(i, p.p, p.seed, (uint32_t)mu_rank, p.layer_id, 7);
    if (want != m[i])
      bad++;
    if (!m[i] && y[i] != (float)(1.0 / (1.0 - p.p)) * x[i])
      bad++;
    dropped += m[i];
  }
  MU_CHECK(bad == 0, "%zu elements differ from the rule for rank %d", bad,
           mu_rank);
  MU_CHECK(dropped > NUMEL / 4 && dropped < NUMEL * 11 / 20,
           "dropped %zu of %d at p = 0.4", dropped, NUMEL);

  /* Reproducible: the same step again gives the same mask. */
  MU_RC(drop(l, 7, x, y), 0, "dropout forward again");
  mask_of(y, m2);
  MU_CHECK(memcmp(m, m2, NUMEL) == 0, "step 7 twice: masks differ");
  /* Another step, another mask. */
  MU_RC(drop(l, 8, x, y), 0, "dropout forward step 8");
  mask_of(y, m2);
  MU_CHECK(memcmp(m, m2, NUMEL) != 0, "steps 7 and 8 give the same mask");
  /* No communicator: rank 0's key. */
  MU_RC(drop(l0, 7, x, y), 0, "dropout forward without comm");
  mask_of(y, m2);
  MU_CHECK((memcmp(m, m2, NUMEL) == 0) == (mu_rank == 0),
           "rank %d: mask without a communicator %s rank 0's", mu_rank,
           mu_rank == 0 ? "differs from" : "equals");

  /* Every pair of ranks draws different masks. */
  MPI_Gather(m, NUMEL, MPI_UNSIGNED_CHAR, all, NUMEL, MPI_UNSIGNED_CHAR, 0,
             MPI_COMM_WORLD);
  if (mu_rank == 0) {
    for (int a = 0; a < mu_size; a++)
      for (int b = a + 1; b < mu_size; b++)
        MU_CHECK(memcmp(all + (size_t)a * NUMEL, all + (size_t)b * NUMEL,
                        NUMEL) != 0,
                 "ranks %d and %d drew the same mask", a, b);
  }

done:
  sbn_layer_destroy(l);
  sbn_layer_destroy(l0);
  sbn_comm_destroy(comm);
  free(x);
  free(y);
  free(m);
  free(m2);
  free(all);
  return mu_finish("mpi_dropout");
}
