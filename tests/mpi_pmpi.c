/* The counting wrappers; see mpi_pmpi.h. */
#include "mpi_pmpi.h"

#include <mpi.h>

#include "syncbn_mpi.h"

long pm_calls[PM_KINDS];

static const char *const pm_names[PM_KINDS] = {
    "MPI_Allreduce",       "MPI_Iallreduce",  "MPI_Allgather*",
    "MPI_Bcast",           "MPI_Reduce",      "MPI_Barrier",
    "MPI_Gather*",         "MPI_Scatter*",    "MPI_Alltoall*",
    "MPI_Reduce_scatter*", "MPI_Scan/Exscan", "other MPI_I* collectives",
    "point to point"};

void pm_reset(void) {
  for (int i = 0; i < PM_KINDS; i++)
    pm_calls[i] = 0;
}

long pm_total(void) {
  long t = 0;
  for (int i = 0; i < PM_KINDS; i++)
    t += pm_calls[i];
  return t;
}

const char *pm_name(int kind) {
  return kind >= 0 && kind < PM_KINDS ? pm_names[kind] : "?";
}

int MPI_Allreduce(const void *sb, void *rb, int n, MPI_Datatype t, MPI_Op op,
                  MPI_Comm c) {
  pm_calls[PM_ALLREDUCE]++;
  return PMPI_Allreduce(sb, rb, n, t, op, c);
}

int MPI_Iallreduce(const void *sb, void *rb, int n, MPI_Datatype t, MPI_Op op,
                   MPI_Comm c, MPI_Request *r) {
  pm_calls[PM_IALLREDUCE]++;
  return PMPI_Iallreduce(sb, rb, n, t, op, c, r);
}

int MPI_Allgather(const void *sb, int sn, MPI_Datatype st, void *rb, int rn,
                  MPI_Datatype rt, MPI_Comm c) {
  pm_calls[PM_ALLGATHER]++;
  return PMPI_Allgather(sb, sn, st, rb, rn, rt, c);
}

int MPI_Allgatherv(const void *sb, int sn, MPI_Datatype st, void *rb,
                   const int rn[], const int d[], MPI_Datatype rt, MPI_Comm c) {
  pm_calls[PM_ALLGATHER]++;
  return PMPI_Allgatherv(sb, sn, st, rb, rn, d, rt, c);
}

int MPI_Bcast(void *b, int n, MPI_Datatype t, int root, MPI_Comm c) {
  pm_calls[PM_BCAST]++;
  return PMPI_Bcast(b, n, t, root, c);
}

int MPI_Reduce(const void *sb, void *rb, int n, MPI_Datatype t, MPI_Op op,
               int root, MPI_Comm c) {
  pm_calls[PM_REDUCE]++;
  return PMPI_Reduce(sb, rb, n, t, op, root, c);
}

int MPI_Barrier(MPI_Comm c) {
  pm_calls[PM_BARRIER]++;
  return PMPI_Barrier(c);
}

int MPI_Gather(const void *sb, int sn, MPI_Datatype st, void *rb, int rn,
               MPI_Datatype rt, int root, MPI_Comm c) {
  pm_calls[PM_GATHER]++;
  return PMPI_Gather(sb, sn, st, rb, rn, rt, root, c);
}

int MPI_Gatherv(const void *sb, int sn, MPI_Datatype st, void *rb,
                const int rn[], const int d[], MPI_Datatype rt, int root,
                MPI_Comm c) {
  pm_calls[PM_GATHER]++;
  return PMPI_Gatherv(sb, sn, st, rb, rn, d, rt, root, c);
}

int MPI_Scatter(const void *sb, int sn, MPI_Datatype st, void *rb, int rn,
                MPI_Datatype rt, int root, MPI_Comm c) {
  pm_calls[PM_SCATTER]++;
  return PMPI_Scatter(sb, sn, st, rb, rn, rt, root, c);
}

int MPI_Alltoall(const void *sb, int sn, MPI_Datatype st, void *rb, int rn,
                 MPI_Datatype rt, MPI_Comm c) {
  pm_calls[PM_ALLTOALL]++;
  return PMPI_Alltoall(sb, sn, st, rb, rn, rt, c);
}

int MPI_Alltoallv(const void *sb, const int sn[], const int sd[],
                  MPI_Datatype st, void *rb, const int rn[], const int rd[],
                  MPI_Datatype rt, MPI_Comm c) {
  pm_calls[PM_ALLTOALL]++;
  return PMPI_Alltoallv(sb, sn, sd, st, rb, rn, rd, rt, c);
}

int MPI_Reduce_scatter(const void *sb, void *rb, const int rn[], MPI_Datatype t,
                       MPI_Op op, MPI_Comm c) {
  pm_calls[PM_REDUCE_SCATTER]++;
  return PMPI_Reduce_scatter(sb, rb, rn, t, op, c);
}

int MPI_Reduce_scatter_block(const void *sb, void *rb, int rn, MPI_Datatype t,
                             MPI_Op op, MPI_Comm c) {
  pm_calls[PM_REDUCE_SCATTER]++;
  return PMPI_Reduce_scatter_block(sb, rb, rn, t, op, c);
}

int MPI_Scan(const void *sb, void *rb, int n, MPI_Datatype t, MPI_Op op,
             MPI_Comm c) {
  pm_calls[PM_SCAN]++;
  return PMPI_Scan(sb, rb, n, t, op, c);
}

int MPI_Exscan(const void *sb, void *rb, int n, MPI_Datatype t, MPI_Op op,
               MPI_Comm c) {
  pm_calls[PM_SCAN]++;
  return PMPI_Exscan(sb, rb, n, t, op, c);
}

int MPI_Ibarrier(MPI_Comm c, MPI_Request *r) {
  pm_calls[PM_NB_OTHER]++;
  return PMPI_Ibarrier(c, r);
}

int MPI_Ibcast(void *b, int n, MPI_Datatype t, int root, MPI_Comm c,
               MPI_Request *r) {
  pm_calls[PM_NB_OTHER]++;
  return PMPI_Ibcast(b, n, t, root, c, r);
}

int MPI_Ireduce(const void *sb, void *rb, int n, MPI_Datatype t, MPI_Op op,
                int root, MPI_Comm c, MPI_Request *r) {
  pm_calls[PM_NB_OTHER]++;
  return PMPI_Ireduce(sb, rb, n, t, op, root, c, r);
}

int MPI_Iallgather(const void *sb, int sn, MPI_Datatype st, void *rb, int rn,
                   MPI_Datatype rt, MPI_Comm c, MPI_Request *r) {
  pm_calls[PM_NB_OTHER]++;
  return PMPI_Iallgather(sb, sn, st, rb, rn, rt, c, r);
}

int MPI_Send(const void *b, int n, MPI_Datatype t, int dst, int tag,
             MPI_Comm c) {
  pm_calls[PM_P2P]++;
  return PMPI_Send(b, n, t, dst, tag, c);
}

int MPI_Recv(void *b, int n, MPI_Datatype t, int src, int tag, MPI_Comm c,
             MPI_Status *s) {
  pm_calls[PM_P2P]++;
  return PMPI_Recv(b, n, t, src, tag, c, s);
}

/* syncbn's communicator reduces over two processes by one MPI_Isend and
 * one MPI_Irecv on SBN_MPI_PAIR_TAG (syncbn_mpi.h): that pair counts as
 * one non-blocking allreduce, which is what it stands for. */
int MPI_Isend(const void *b, int n, MPI_Datatype t, int dst, int tag,
              MPI_Comm c, MPI_Request *r) {
  pm_calls[tag == SBN_MPI_PAIR_TAG ? PM_IALLREDUCE : PM_P2P]++;
  return PMPI_Isend(b, n, t, dst, tag, c, r);
}

int MPI_Irecv(void *b, int n, MPI_Datatype t, int src, int tag, MPI_Comm c,
              MPI_Request *r) {
  if (tag != SBN_MPI_PAIR_TAG)
    pm_calls[PM_P2P]++;
  return PMPI_Irecv(b, n, t, src, tag, c, r);
}

int MPI_Sendrecv(const void *sb, int sn, MPI_Datatype st, int dst, int stag,
                 void *rb, int rn, MPI_Datatype rt, int src, int rtag,
                 MPI_Comm c, MPI_Status *s) {
  pm_calls[PM_P2P]++;
  return PMPI_Sendrecv(sb, sn, st, dst, stag, rb, rn, rt, src, rtag, c, s);
}
