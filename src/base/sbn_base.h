/* The base room of the kernel library: what every other room may use and
 * that itself uses nothing but the public header. Size arithmetic, the
 * layer object, shape facts, the saved-state header and the argument checks
 * shared by forward and backward. Not installed.
 *
 * The rooms of libsyncbn and the one direction their calls go:
 *   layer.c (front door) -> ops -> kernels -> base;  io -> base.
 * A file includes only the headers of its own room and of the rooms below
 * it, so an upward call does not compile without a visible include. */
#ifndef SBN_BASE_H
#define SBN_BASE_H

#include <stddef.h>
#include <stdint.h>

#include "syncbn.h"

/* 1 or 0 where the environment variable name is set to exactly "1" or
 * "0", -1 otherwise (unset, or anything else): the switches that force one
 * path or another for comparison (base/env.c). */
int sbn__env_bit(const char *name);

/* Overflow-checked size_t arithmetic: 0 on success, SBN_EOVERFLOW if not. */
int sbn__mul_size(size_t a, size_t b, size_t *out);

/* Rounds n up to a multiple of 64 bytes, for carving workspace. */
static inline size_t sbn__align64(size_t n) {
  return (n + 63) & ~(size_t)63;
}

/* ------------------------------------------------------------------ */
/* Layers */

struct sbn_layer_s {
  sbn_layer_params_t p;
  sbn_comm_t *comm;
  /* BatchNorm: the global count per channel that the last training
   * sbn_forward reduced through the layer's communicator (0 before the
   * first; the seam's *_finish calls, which take the caller's records,
   * leave it). It is the same on every process of the communicator, so
   * the chunk plan of the next forward (ops/batchnorm_overlap.c), taken
   * from it, is too. */
  double bn_last_count;
};

/* ------------------------------------------------------------------ */
/* Non-blocking reductions over any communicator (base/comm.c) */

/* Whether comm has more than one process and fills the three
 * iallreduce entries. */
int sbn__comm_can_ireduce(const sbn_comm_t *comm);
/* Starts reducing recs[0..n): on a communicator of one process (or NULL)
 * there is nothing to do; without the non-blocking entries it reduces
 * now with the blocking one. *request is NULL in both cases, and
 * otherwise the communicator's request, which sbn__comm_iend must finish.
 * recs stays untouched until then. */
int sbn__comm_ibegin(sbn_comm_t *comm, sbn_rec_t *recs, size_t n,
                     void **request);
/* Polls a request (a no-op for NULL): Open MPI has no progress thread, so
 * polling is what moves a reduction on while the caller computes. *done
 * (when not NULL) becomes 1 once the request has completed. */
int sbn__comm_itest(sbn_comm_t *comm, void *request, int *done);
/* Waits for *request (a no-op for NULL) and sets it to NULL. */
int sbn__comm_iend(sbn_comm_t *comm, void **request);

/* ------------------------------------------------------------------ */
/* Shapes (base/shape.c) */

/* Shape facts derived from a descriptor once per call. */
typedef struct sbn__shape_s {
  size_t N; /* batch (LN: number of rows) */
  size_t C; /* channels (LN: row length D) */
  size_t S; /* spatial product */
  size_t numel;
  sbn_layout_t layout;
} sbn__shape_t;

/* Checks what every op asks of a descriptor (rank, element count, a known
 * layout) and fills numel and layout; the rest of sh is zero. */
int sbn__shape_begin(const sbn_tensor_desc_t *d, sbn__shape_t *sh);
/* The (N, C, spatial...) shape of the channel ops: at least 2 dims and
 * dims[1] == channels. `what` names the op in messages. */
int sbn__shape_channels(const char *what, size_t channels,
                        const sbn_tensor_desc_t *d, sbn__shape_t *sh);
/* A plain C-order array of any rank (NCHW only), seen as (1, 1, numel). */
int sbn__shape_plain(const char *what, const sbn_tensor_desc_t *d,
                     sbn__shape_t *sh);

/* ------------------------------------------------------------------ */
/* The saved forward state (base/saved.c) */

/* The saved buffer starts with this header so backward can check that it
 * got the state of a forward of the same op, mode and shape. */
#define SBN__SAVED_MAGIC 0x73626e31u /* "sbn1" */
typedef struct sbn__saved_hdr_s {
  uint32_t magic;
  uint32_t op;
  uint32_t mode;
  uint32_t pad;
  double count;   /* the (global) element count per statistic */
  uint64_t items; /* number of statistics that follow (mean, istd pairs) */
  uint64_t pad2;
} sbn__saved_hdr_t;

/* Size of a saved buffer holding `items` (mean, istd) pairs in double. */
int sbn__saved_size(size_t items, size_t *bytes);
/* Writes the header and returns the mean and istd arrays. */
void sbn__saved_init(void *saved, sbn_op_t op, sbn_mode_t mode, double count,
                     size_t items, double **mean, double **istd);
/* Checks a saved buffer against the op, mode and item count. */
int sbn__saved_get(const void *saved, size_t bytes, sbn_op_t op,
                   sbn_mode_t mode, size_t items, double *count,
                   const double **mean, const double **istd);

/* ------------------------------------------------------------------ */
/* Argument checks shared by forward and backward (base/args.c) */

/* What an op's arguments must provide beyond the data arrays. The op rows
 * (ops/sbn_ops.h) carry these flags; the checks here only read them, so
 * base needs to know nothing about any particular op. */
enum {
  /* weight and bias are used when params.affine is set. */
  SBN__NEED_AFFINE = 1u << 0,
  /* running statistics are kept when params.track_running_stats is set. */
  SBN__NEED_RUNNING = 1u << 1,
  /* backward reads the forward input x. */
  SBN__NEED_BWD_X = 1u << 2,
  /* the op has ghost batches (params.ghost_batch may be nonzero); the
   * front door refuses a nonzero value for every other op. */
  SBN__CAN_GHOST = 1u << 3
};

/* The buffer sizes a call needs (from the op's sizes) and the op's flags. */
typedef struct sbn__need_s {
  size_t workspace;
  size_t saved;
  unsigned flags;
} sbn__need_t;

/* Checks the buffer arguments of a forward/backward call against a
 * validated shape: the mode, non-NULL data pointers, workspace and saved
 * sizes, weight and bias, and the running state. */
int sbn__check_fwd_args(const sbn_layer_params_t *p,
                        const sbn_forward_args_t *a, const sbn__shape_t *sh,
                        const sbn__need_t *need);
int sbn__check_bwd_args(const sbn_layer_params_t *p,
                        const sbn_backward_args_t *a, const sbn__shape_t *sh,
                        const sbn__need_t *need);

#endif /* SBN_BASE_H */
