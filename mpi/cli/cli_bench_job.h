/* `syncbn bench service`: the syncbnd job it starts (cli_bench_job.c). */
#ifndef SBN_CLI_BENCH_JOB_H
#define SBN_CLI_BENCH_JOB_H

#include <limits.h>
#include <sys/types.h>

#include "syncbn.h"

typedef struct sbn_bench_job_s {
  pid_t pid;          /* the job's mpirun, -1 when none */
  int out_fd;         /* its stdout, where the ready lines come */
  char root[64];      /* the temporary directory, removed at the end */
  char dir[PATH_MAX]; /* the socket directory inside it */
} sbn_bench_job_t;

/* Starts `mpirun -np np syncbnd --socket-dir DIR` and waits until every
 * rank is ready. On failure the caller still calls stop. */
int sbn__bench_job_start(sbn_bench_job_t *j, int np);
/* Stops the job (SIGTERM, then SIGKILL after 10 s) and removes its
 * directory; safe to call on a job that never started. */
void sbn__bench_job_stop(sbn_bench_job_t *j);

#endif /* SBN_CLI_BENCH_JOB_H */
