/* syncbn over MPI: the MPI implementation of the communicator interface.
 *
 * This is the only public header that includes mpi.h. The caller initializes
 * MPI (any thread level; syncbn calls MPI only from the thread that calls
 * it) and finalizes it after destroying every communicator made here.
 */
#ifndef SYNCBN_MPI_H
#define SYNCBN_MPI_H

#include <mpi.h>

#include "syncbn.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Creates the communicator of one layer. A collective over parent: every
 * process of parent must call it with its own description of the same layer.
 *
 * - group_size k > 0 splits parent into consecutive groups of k ranks (the
 *   last group may be smaller; k = 1 is local BatchNorm); k <= 0 means one
 *   group of all ranks. The group communicator is made once here with
 *   MPI_Comm_split and gets MPI_ERRORS_RETURN.
 * - The layer's kind, channels, groups, eps, momentum, cumulative, affine,
 *   track_running_stats, p and group size are compared across parent in one
 *   small collective; on any difference every process returns
 *   SBN_EMISMATCH (with a message naming the field) and *out stays NULL.
 *
 * On success *out is owned by the caller and released with
 * sbn_comm_destroy() (before MPI_Finalize). comm->rank/size are within the
 * group, comm->world_rank is the rank in parent. */
SBN_API int sbn_mpi_comm_create(MPI_Comm parent, int group_size,
                                const sbn_layer_params_t *params,
                                sbn_comm_t **out);

/* The communicator fills every vtable entry:
 * - allreduce: one MPI_Allreduce of the records (a user-defined MPI_Op
 *   running sbn_rec_combine over a datatype of four doubles);
 * - iallreduce_begin/test/end: one MPI_Iallreduce, or, in a group of two
 *   processes, one MPI_Isend and one MPI_Irecv with tag SBN_MPI_PAIR_TAG
 *   and a local sbn_rec_combine (the same bits, and faster than Open
 *   MPI's MPI_Iallreduce at most sizes here; the environment variable
 *   SBN_MPI_PAIR=0 keeps MPI_Iallreduce); test is MPI_Test (MPI_Testall)
 *   and may be called any number of times (Open MPI has no progress
 *   thread, so polling is what moves the reduction on); after a successful
 *   begin, end must be called exactly once: it waits with MPI_Wait and
 *   frees the request. The fused and non-blocking API of syncbn_fused.h
 *   wraps these;
 * - iallgather_begin: one MPI_Iallgather of bytes over the group, finished
 *   with the same test/end as a reduction (syncbnd's agreement rounds);
 * - iallreduce_bor_begin: one MPI_Iallreduce of MPI_UINT64_T with MPI_BOR
 *   (or the same exchange in a group of two), finished the same way
 *   (syncbnd's negotiation of cached entries);
 * - bell_send/bell_poll: MPI_Isend of one uint64 to one process and an
 *   MPI_Irecv from any of them kept posted, on a tag no collective
 *   uses, so that an idle syncbnd worker learns of work without any
 *   collective running.
 * Destroying a communicator with requests still begun abandons them (their
 * memory here is freed; MPI cannot cancel a collective): for a process
 * that leaves without MPI_Finalize.
 * Every MPI failure is returned as SBN_ECOMM through sbn_mpi_error(). A
 * record count above INT_MAX is SBN_ELIMIT. Calling sbn_mpi_comm_create
 * before MPI_Init or after MPI_Finalize is SBN_ESTATE. */

/* The tags of the point-to-point messages on a communicator's own MPI
 * communicator (a duplicate, so no other message meets them): doorbells,
 * and the two messages of a two-process reduction. */
#define SBN_MPI_BELL_TAG 7321
#define SBN_MPI_PAIR_TAG 7322

/* The MPI group communicator inside c (for callers that need it, such as
 * the gather in `syncbn apply --sync`); MPI_COMM_NULL if c is not an MPI
 * communicator made by sbn_mpi_comm_create. */
SBN_API MPI_Comm sbn_mpi_comm_handle(const sbn_comm_t *c);

/* The seconds this process has spent inside the MPI calls of c's
 * collectives since c was created: MPI_Allreduce, and MPI_Iallreduce,
 * MPI_Iallgather, MPI_Test and MPI_Wait of the non-blocking ones (not the
 * doorbell). A pass that hides its reduction spends little there beyond
 * its polls; one blocking reduction spends its latency and the wait for
 * the slowest process (`syncbn bench layer`'s mpi_us). SBN_EINVAL when
 * seconds is NULL or c is not a communicator made by
 * sbn_mpi_comm_create. */
SBN_API int sbn_mpi_comm_seconds(const sbn_comm_t *c, double *seconds);

/* The MPI datatype of one sbn_rec_t and the commutative Chan-merge op over
 * it, for callers that run their own collectives on records (syncbnd).
 * They are shared with the communicators made here and reference counted:
 * every successful acquire needs one release, before MPI_Finalize. */
SBN_API int sbn_mpi_rec_acquire(MPI_Datatype *type, MPI_Op *op);
SBN_API void sbn_mpi_rec_release(void);

/* Turns an MPI error code into SBN_ECOMM with a message naming the call. */
SBN_API int sbn_mpi_error(int mpi_err, const char *call);

#ifdef __cplusplus
}
#endif
#endif /* SYNCBN_MPI_H */
