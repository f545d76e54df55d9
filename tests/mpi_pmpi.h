/* Counting MPI calls through the PMPI profiling interface: mpi_pmpi.c
 * defines MPI_Allreduce and friends, which count and forward to PMPI_*.
 * Linked into a test program, they also catch the calls libsyncbn_mpi
 * makes (the program's definitions take precedence over libmpi's). */
#ifndef SBN_MPI_PMPI_H
#define SBN_MPI_PMPI_H

enum {
  PM_ALLREDUCE,
  PM_IALLREDUCE,
  PM_ALLGATHER,
  PM_BCAST,
  PM_REDUCE,
  PM_BARRIER,
  PM_GATHER,
  PM_SCATTER,
  PM_ALLTOALL,
  PM_REDUCE_SCATTER,
  PM_SCAN,
  PM_NB_OTHER, /* the other non-blocking collectives */
  PM_P2P,      /* point to point: send, recv and their variants */
  PM_KINDS
};

extern long pm_calls[PM_KINDS];
/* Zeroes every counter. */
void pm_reset(void);
/* Sum of every counter. */
long pm_total(void);
/* Name of a counter ("MPI_Allreduce"). */
const char *pm_name(int kind);

#endif /* SBN_MPI_PMPI_H */
