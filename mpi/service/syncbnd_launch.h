/* The one-command launch of syncbnd: `mpirun -np P syncbnd [options] --
 * COMMAND ARGS...` has every worker start COMMAND as its child, with the
 * worker's socket and the job's coordinates in the environment, and ends
 * the job when every rank's child has exited, with the worst status.
 *
 * The launcher polls from the worker's sync tick (it adds no handle to
 * the server's loop) and agrees on the end over its own duplicate of
 * MPI_COMM_WORLD, so its one collective never interleaves with the
 * worker's. */
#ifndef SYNCBND_LAUNCH_H
#define SYNCBND_LAUNCH_H

#include <stdio.h>

#include "svc_server.h"
#include "svc_worker.h"

typedef struct sbnd_launch_s sbnd_launch_t;

/* Collective over MPI_COMM_WORLD (every rank calls it, with or without a
 * command). Sets SYNCBN_SOCKET (socket), SYNCBN_RANK, SYNCBN_SIZE,
 * SYNCBN_LOCAL_RANK and, where unset, MASTER_ADDR, MASTER_PORT, RANK,
 * WORLD_SIZE and LOCAL_RANK, then starts argv[0] (looked up in PATH) with
 * argv. The server and worker are borrowed: the server is stopped when
 * the job's children have all exited. *out is NULL when argv is NULL. Returns
 * 0, or -1 with a message on stderr. */
int sbnd_launch_start(char **argv, const char *socket, int rank, int size,
                      svc_server_t *server, svc_worker_t *worker,
                      sbnd_launch_t **out);

/* Called from the tick, after the worker's own poll: reaps the child and
 * advances the end of the launch; once every rank's child has exited and
 * the worker's agreement has drained (svc_worker_hold), stops the server,
 * so that MPI_Finalize finds no collective in flight. */
void sbnd_launch_poll(sbnd_launch_t *l);

/* After the server returned: a child still running (the worker was
 * signalled) gets SIGTERM, then SIGKILL after a grace period. Returns the
 * exit status for the job: the worst child status over the ranks when
 * they agreed, else this rank's child's (128 + signal for a killed one).
 * Frees l. */
int sbnd_launch_finish(sbnd_launch_t *l);

/* The launch's paragraph of syncbnd --help. */
void sbnd_launch_usage(FILE *f);

/* Removes dir and, when files is set, the plain files in it (a default
 * state directory holds only checkpoints). Missing or non-empty
 * directories are left alone quietly: another rank may remove them. */
void sbnd_remove_dir(const char *dir, int files);

#endif
