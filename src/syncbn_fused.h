/* syncbn fused and non-blocking SyncBN: several layers' statistics in one
 * reduction, and a reduction that overlaps other work.
 *
 * These functions use only the communicator interface of syncbn.h (no MPI),
 * so they work with any implementation of it; with the MPI communicator a
 * fused step is exactly one MPI_Allreduce (or one MPI_Iallreduce).
 *
 * The layer list may hold any layers. BatchNorm layers that need the
 * reduction in this call (sbn_bn_needs_reduce() != 0) put their C records
 * into one buffer, one layer after the other in list order; every other
 * layer (BatchNorm in eval or with ghost batches, LayerNorm, InstanceNorm,
 * GroupNorm, Dropout) runs plain sbn_forward()/sbn_backward(), which never
 * communicates. The buffer ends with one status record, so that a rank
 * whose local step failed (a bad argument, say) still joins the reduction
 * and every rank returns an error instead of some of them waiting
 * forever.
 *
 * Every process of comm must call with the same layers (same channel
 * counts, same modes) in the same order. The communicator of every layer
 * that is reduced must have the size of comm (SBN_EINVAL otherwise): the
 * fused reduction runs on comm, so the layers must share its sync group.
 * comm may be NULL (a single process).
 *
 * args[i] belongs to layers[i] and follows the rules of sbn_forward() and
 * sbn_backward(); each layer uses its own workspace and saved buffer.
 */
#ifndef SYNCBN_FUSED_H
#define SYNCBN_FUSED_H

#include "syncbn.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Number of records (elements of recs_ws) the fused forward or backward of
 * these layers needs: the channels of each reduced layer plus one. */
SBN_API int sbn_fused_forward_records(size_t nlayers,
                                      sbn_layer_t *const *layers,
                                      const sbn_forward_args_t *args,
                                      size_t *count);
SBN_API int sbn_fused_backward_records(size_t nlayers,
                                       sbn_layer_t *const *layers,
                                       const sbn_backward_args_t *args,
                                       size_t *count);

/* Forward of every layer with one blocking reduction on comm. recs_ws is
 * caller workspace of recs_ws_count records (at least the count above).
 * Returns 0 or the first error; on an error the layers after the failing
 * one are not run. */
SBN_API int sbn_bn_forward_fused(sbn_comm_t *comm, size_t nlayers,
                                 sbn_layer_t *const *layers,
                                 const sbn_forward_args_t *args,
                                 sbn_rec_t *recs_ws, size_t recs_ws_count);
/* Backward of every layer with one blocking reduction of the per-channel
 * sums. dweight/dbias stay local, as in sbn_backward(). */
SBN_API int sbn_bn_backward_fused(sbn_comm_t *comm, size_t nlayers,
                                  sbn_layer_t *const *layers,
                                  const sbn_backward_args_t *args,
                                  sbn_rec_t *recs_ws, size_t recs_ws_count);

/* A fused step in flight. Owned by the caller (it may live on the stack);
 * the fields are private. The layers, args and recs_ws given to begin must
 * stay valid, and x and recs_ws untouched, until end returns. */
typedef struct sbn_fused_req_s {
  sbn_comm_t *comm;
  size_t nlayers;
  sbn_layer_t *const *layers;
  const sbn_forward_args_t *fargs;
  const sbn_backward_args_t *bargs;
  sbn_rec_t *recs;
  size_t nrecs;
  void *handle; /* the communicator's request, NULL when already done */
  int local_rc; /* this rank's error before the reduction */
  int rc;       /* first error of the reduction itself */
  int phase;    /* 0 idle, 1 started */
} sbn_fused_req_t;

/* Non-blocking fused forward: begin computes the local statistics and
 * starts the reduction (the communicator's iallreduce_begin, or the
 * blocking allreduce when the communicator has none); test polls it and
 * sets *done (call it now and then while doing other work: with MPI this
 * is what moves the reduction forward); end waits for it and finishes
 * every layer. After a successful begin, end must be called exactly once,
 * even if test failed; it returns the first error of the whole step. */
SBN_API int sbn_bn_forward_begin(sbn_fused_req_t *req, sbn_comm_t *comm,
                                 size_t nlayers, sbn_layer_t *const *layers,
                                 const sbn_forward_args_t *args,
                                 sbn_rec_t *recs_ws, size_t recs_ws_count);
SBN_API int sbn_bn_forward_test(sbn_fused_req_t *req, int *done);
SBN_API int sbn_bn_forward_end(sbn_fused_req_t *req);

/* The same for backward. */
SBN_API int sbn_bn_backward_begin(sbn_fused_req_t *req, sbn_comm_t *comm,
                                  size_t nlayers, sbn_layer_t *const *layers,
                                  const sbn_backward_args_t *args,
                                  sbn_rec_t *recs_ws, size_t recs_ws_count);
SBN_API int sbn_bn_backward_test(sbn_fused_req_t *req, int *done);
SBN_API int sbn_bn_backward_end(sbn_fused_req_t *req);

#ifdef __cplusplus
}
#endif
#endif /* SYNCBN_FUSED_H */
