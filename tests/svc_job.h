/* Helpers shared by the syncbnd end-to-end tests that start the job
 * themselves (tests/svc_sync_e2e.c, svc_client_e2e.c, svc_shm_e2e.c): start
 * `mpirun ... syncbnd`, wait for every rank's ready line, connect to a
 * rank with socket timeouts, find the workers' processes, and stop the
 * job and remove its directory.
 * A failure here prints the test's name and exits with 1, like the tests'
 * own checks. */
#ifndef SBN_SVC_JOB_H
#define SBN_SVC_JOB_H

#include <sys/types.h>

#include "client.h"

/* Room for one rank's socket path. */
#define SJ_PATH_MAX 256

/* Runs argv (argv[0] is the mpiexec to execute; NULL-terminated) with
 * stdout on a pipe and, when errlog is not NULL, stderr into the file
 * errlog. Waits up to 60 s per read until each of the np ranks printed
 * "syncbnd: rank R ready on PATH" (stored in path[R]) and, when port is
 * not NULL, "syncbnd: rank R listening on tcp 127.0.0.1:PORT" (stored in
 * port[R]). Returns the mpirun pid. The pipe stays open (unread lines are
 * few), so the job never gets SIGPIPE for writing to stdout. */
pid_t sj_start(const char *prog, const char *const *argv, const char *errlog,
               int np, char (*path)[SJ_PATH_MAX], int *port);
/* SIGTERM to *pid, up to 10 s to exit, then SIGKILL; sets *pid to -1.
 * Does nothing when *pid is not positive. */
void sj_stop(pid_t *pid);
/* Removes the directory root and everything under it, unless root is "". */
void sj_remove(const char *prog, const char *root);
/* Receive and send timeouts of timeout_s seconds on c's socket. */
void sj_set_timeouts(sbn_client_t *c, int timeout_s);
/* Writes the n bytes of token into a new file path of mode 0600 (the
 * job's --token-file; an existing file fails the test). */
void sj_write_token(const char *prog, const char *path, const void *token,
                    size_t n);
/* Connects to the worker socket path and sets its timeouts. */
sbn_client_t *sj_connect(const char *prog, const char *path, int timeout_s);
/* The syncbnd workers that mpirun forked, from /proc: up to max of their
 * pids into pids (when not NULL) and each one's CPU time, user and
 * system, in clock ticks into cpu (when not NULL). Returns how many there
 * are (which may exceed max). */
int sj_workers(const char *prog, pid_t mpirun, long *pids, long *cpu, int max);

/* A communicator of one process (size 1, rank 0) whose allreduce leaves
 * the records as they are: the library on one process's whole batch, the
 * reference the tests hold the job's results against. */
extern const sbn_comm_vtable_t sj_self_vt;

#endif
