/* syncbn: synchronized normalization for data-parallel training.
 *
 * This header is the whole public C API of the kernel library (libsyncbn).
 * It knows nothing of MPI: BatchNorm's statistic reduction goes through the
 * communicator interface (sbn_comm_t) declared below, with a single-process
 * implementation here and an MPI implementation in libsyncbn_mpi
 * (syncbn_mpi.h).
 *
 * Conventions
 * - Every function that can fail returns 0 or a negative SBN_E* code.
 *   sbn_strerror() names the code; sbn_last_error() returns a message naming
 *   the offending argument for the last failure in the calling thread.
 * - Tensors are fp32. A tensor descriptor gives the logical dims in the order
 *   (N, C, d1, ..., dk) for every layout; the layout says how they sit in
 *   memory: NCHW is C-contiguous in that order, NHWC is channels-last, i.e.
 *   C-contiguous in the order (N, d1, ..., dk, C). LayerNorm and Dropout only
 *   take NCHW (their arrays are plain C-order arrays of any rank >= 1).
 * - Ownership: layers own nothing but their parameters and their
 *   communicator reference. All tensors (inputs, outputs, weight, bias,
 *   running statistics, the saved forward state and the workspace) belong to
 *   the caller, must stay valid for the duration of the call, and may be
 *   freed right after it returns.
 * - Kernels never allocate: the caller provides workspace of at least
 *   sbn_workspace_size() bytes, and a "saved" buffer of at least
 *   sbn_saved_size() bytes that forward fills and backward reads.
 * - Thread safety: distinct layer handles may be used concurrently from
 *   different threads. One handle must not be used from two threads at once
 *   (training forward updates the handle's num_batches_tracked through the
 *   caller's state). sbn_last_error() is per thread.
 */
#ifndef SYNCBN_H
#define SYNCBN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Marks the library's public functions. The libraries are built with
 * -fvisibility=hidden, so only what carries SBN_API is exported: internal
 * sbn__ helpers stay private to the shared object they live in. */
#if defined(__GNUC__)
#define SBN_API __attribute__((visibility("default")))
#else
#define SBN_API
#endif

#if defined(__GNUC__)
#define SBN_PRINTF(a, b) __attribute__((format(printf, a, b)))
#else
#define SBN_PRINTF(a, b)
#endif

#define SBN_VERSION_MAJOR 0
#define SBN_VERSION_MINOR 1
#define SBN_VERSION_PATCH 0

/* The one error table: name, value, message. Values are negative. */
#define SBN_ERRNO_MAP(XX)                                      \
  XX(EINVAL, -1, "invalid argument")                           \
  XX(ESHAPE, -2, "shape or layout mismatch")                   \
  XX(ENOMEM, -3, "out of memory")                              \
  XX(EOVERFLOW, -4, "size overflows size_t")                   \
  XX(ENOTSUP, -5, "operation not supported")                   \
  XX(ECOMM, -6, "communication error")                         \
  XX(EMISMATCH, -7, "layer parameters differ between ranks")   \
  XX(EIO, -8, "input/output error")                            \
  XX(EFORMAT, -9, "malformed file or message")                 \
  XX(ESMALLBATCH, -10, "too few values to compute statistics") \
  XX(ENOSPACE, -11, "workspace or buffer too small")           \
  XX(ESTATE, -12, "call out of order")                         \
  XX(ELIMIT, -13, "limit exceeded")

typedef enum {
#define SBN__ERR_ENUM(name, val, msg) SBN_##name = (val),
  SBN_ERRNO_MAP(SBN__ERR_ENUM)
#undef SBN__ERR_ENUM
} sbn_errno_t;

/* Static string naming the error code ("invalid argument"); never NULL. */
SBN_API const char *sbn_strerror(int err);
/* Static string with the code's symbolic name ("SBN_EINVAL"); never NULL. */
SBN_API const char *sbn_err_name(int err);
/* Message for the last failure in this thread, naming the argument
 * ("x: expected 4 dims, got 3"). Valid until the next failing call in this
 * thread. Empty string if none. */
SBN_API const char *sbn_last_error(void);
/* Records code and a printf-style message for sbn_last_error() in the
 * calling thread and returns code, so a failing check reads
 * `return sbn_set_error(SBN_EINVAL, "eps: %g must be positive", eps)`.
 * For implementers of communicators and other extensions outside the
 * library, whose errors must reach callers the same way as the library's. */
SBN_API int sbn_set_error(int code, const char *fmt, ...) SBN_PRINTF(2, 3);

/* ------------------------------------------------------------------ */
/* Tensors */

#define SBN_MAX_DIMS 8

typedef enum { SBN_LAYOUT_NCHW = 0, SBN_LAYOUT_NHWC = 1 } sbn_layout_t;

typedef struct sbn_tensor_desc_s {
  int ndim;                  /* 1..SBN_MAX_DIMS */
  size_t dims[SBN_MAX_DIMS]; /* logical (N, C, spatial...) */
  sbn_layout_t layout;
} sbn_tensor_desc_t;

/* Number of elements, or SBN_EOVERFLOW if the product overflows size_t. */
SBN_API int sbn_desc_numel(const sbn_tensor_desc_t *d, size_t *numel);

/* ------------------------------------------------------------------ */
/* Communicator interface.
 *
 * BatchNorm reduces an array of records over the participating processes.
 * A record is four doubles: a tag and three values. Tag SBN_REC_MOMENTS
 * holds (count, mean, M2) where M2 is the centered sum of squares; such
 * records combine with Chan's parallel merge, which is exact for uneven and
 * empty per-process counts. Tag SBN_REC_SUM holds three plain sums.
 * Any mix of tags may be reduced in one call (that is how several layers'
 * statistics are fused into one collective); the tags must agree between
 * processes record by record. */

enum { SBN_REC_MOMENTS = 0, SBN_REC_SUM = 1 };

typedef struct sbn_rec_s {
  double tag;
  double v[3];
} sbn_rec_t;

/* inout[i] = combine(in[i], inout[i]) for i < n. The combination is
 * bitwise commutative, so every process of a reduction tree that combines
 * the same two partial results gets the same bits. */
SBN_API void sbn_rec_combine(const sbn_rec_t *in, sbn_rec_t *inout, size_t n);

/* What a normalization takes from n reduced SBN_REC_MOMENTS records
 * (count, mean, M2), for a process that normalizes with the records it
 * reduced itself: out[i] is record i's count, mean, biased variance M2 /
 * count, unbiased variance M2 / (count - 1), or inverse standard deviation
 * 1 / sqrt(M2 / count + eps); a variance whose count is too small (0, or
 * 1 for the unbiased one) is 0. out holds n doubles (the caller's). Every
 * kernel set gives the same bits. */
typedef enum {
  SBN_STAT_COUNT = 0,
  SBN_STAT_MEAN = 1,
  SBN_STAT_VAR = 2,
  SBN_STAT_VAR_UNBIASED = 3,
  SBN_STAT_INVSTD = 4
} sbn_stat_t;
SBN_API void sbn_rec_stat(const sbn_rec_t *recs, size_t n, sbn_stat_t which,
                          double eps, double *out);

/* Moves running statistics by n reduced SBN_REC_MOMENTS records as a
 * training forward does (PyTorch's update with factor f, the momentum or
 * 1 / (batches + 1) for a cumulative average): for every record with a
 * nonzero count, running_mean[i] = (1 - f) running_mean[i] + f mean and
 * running_var[i] = (1 - f) running_var[i] + f unbiased variance, in double
 * and rounded to float. The arrays of n floats are the caller's. */
SBN_API void sbn_rec_track(const sbn_rec_t *recs, size_t n, double f,
                           float *running_mean, float *running_var);

/* Fills n records from per-channel arrays and checks them, for a process
 * that computed its statistics itself. With counts: SBN_REC_MOMENTS
 * records (counts[i * cstep], a[i], b[i]) = (count, mean, M2), cstep 0
 * for one count for every channel; every value must be finite, the count
 * and M2 not negative, and a zero count's mean and M2 zero. With counts
 * NULL: SBN_REC_SUM records (a[i], b[i], 0) of finite sums. Returns n when
 * every channel is valid, else the first invalid channel (the records are
 * then partly written). recs holds n records (the caller's). */
SBN_API size_t sbn_rec_fill(sbn_rec_t *recs, size_t n, const double *counts,
                            size_t cstep, const double *a, const double *b);

typedef struct sbn_comm_s sbn_comm_t;
typedef struct sbn_comm_vtable_s sbn_comm_vtable_t;

/* A communicator implementation fills this table. NULL for the optional
 * entries means "not supported" and callers fall back to the blocking one. */
struct sbn_comm_vtable_s {
  /* Required. Reduce n records in place over all processes of comm; every
   * process must call it with the same n and tags. Returns 0 or SBN_E*. */
  int (*allreduce)(sbn_comm_t *comm, sbn_rec_t *recs, size_t n);
  /* Optional non-blocking variant: start, poll, finish. The buffer must
   * stay untouched between begin and a completed test/end. */
  int (*iallreduce_begin)(sbn_comm_t *comm, sbn_rec_t *recs, size_t n,
                          void **request);
  int (*iallreduce_test)(sbn_comm_t *comm, void *request, int *done);
  int (*iallreduce_end)(sbn_comm_t *comm, void *request);
  /* Required. Releases the communicator and its resources. */
  void (*destroy)(sbn_comm_t *comm);
  /* Optional non-blocking allgather of `bytes` bytes per process: recv
   * holds size x bytes, in rank order. Its request is polled and finished
   * with iallreduce_test and iallreduce_end, which serve every request
   * kind. There is no blocking fallback: a caller that needs it (syncbnd)
   * refuses a communicator without it. It comes last so that tables
   * written positionally stay valid. */
  int (*iallgather_begin)(sbn_comm_t *comm, const void *send, void *recv,
                          size_t bytes, void **request);
  /* Optional non-blocking bitwise OR of n 64-bit words in place over all
   * processes (syncbnd's negotiation of cached entries); polled and
   * finished like the others. */
  int (*iallreduce_bor_begin)(sbn_comm_t *comm, uint64_t *words, size_t n,
                              void **request);
  /* Optional doorbell, so that idle processes need no collective to learn
   * that one of them has work: bell_send sends value to process `to`
   * (point to point, never blocking); bell_poll raises *max to the
   * largest value received since the last call (it leaves *max alone when
   * nothing came). Neither is a collective: processes call them whenever
   * they like. */
  int (*bell_send)(sbn_comm_t *comm, int to, uint64_t value);
  int (*bell_poll)(sbn_comm_t *comm, uint64_t *max);
};

/* Implementations embed this struct first. rank/size are within the
 * reduction group (a sync group for SyncBN). */
struct sbn_comm_s {
  const sbn_comm_vtable_t *vt;
  int rank;
  int size;
  int world_rank; /* rank in the whole job, used to seed dropout */
};

/* The single-process communicator: allreduce is the identity. It is a
 * static object; sbn_comm_destroy() on it is a no-op. */
SBN_API sbn_comm_t *sbn_comm_local(void);
/* Makes *c a single-process communicator like sbn_comm_local()'s, but
 * carrying world_rank, so that dropout keys differ between the processes
 * of a job that each run their own layers (syncbnd's workers). */
SBN_API void sbn_comm_local_init(sbn_comm_t *c, int world_rank);
SBN_API int sbn_comm_allreduce(sbn_comm_t *comm, sbn_rec_t *recs, size_t n);
SBN_API void sbn_comm_destroy(sbn_comm_t *comm);

/* ------------------------------------------------------------------ */
/* Layers */

typedef enum {
  SBN_OP_BATCHNORM = 0,
  SBN_OP_LAYERNORM = 1,
  SBN_OP_INSTANCENORM = 2,
  SBN_OP_GROUPNORM = 3,
  SBN_OP_DROPOUT = 4,
  /* The number of ops, not an op: valid ops are 0 .. SBN_OP_COUNT - 1. */
  SBN_OP_COUNT
} sbn_op_t;

/* Name ("batchnorm", ...) or NULL for an unknown op (SBN_OP_COUNT too). */
SBN_API const char *sbn_op_name(sbn_op_t op);
/* Parses a name into *op; SBN_EINVAL if unknown. */
SBN_API int sbn_op_parse(const char *name, sbn_op_t *op);

typedef struct sbn_layer_params_s {
  sbn_op_t op;
  /* BN, IN, GN: number of channels C (dims[1] of every input). */
  size_t channels;
  /* GN: number of groups G; must divide channels. */
  size_t groups;
  /* LN: number K of trailing dims normalized over, and their sizes
   * (the normalized shape; weight and bias have this shape). */
  int norm_ndim;
  size_t norm_shape[SBN_MAX_DIMS];
  /* BN, IN, GN, LN: eps > 0 added to the variance. */
  double eps;
  /* BN, IN: running statistic momentum in [0, 1] (PyTorch convention:
   * new = (1 - momentum) * old + momentum * batch). */
  double momentum;
  /* BN: if nonzero, use the cumulative average 1/(num_batches_tracked+1)
   * instead of momentum (PyTorch's momentum=None). */
  int cumulative;
  /* BN, IN, GN, LN: weight and bias are given. */
  int affine;
  /* BN, IN: running statistics are kept (and used in eval). */
  int track_running_stats;
  /* Dropout: probability of zeroing an element, in [0, 1]. */
  double p;
  /* Dropout: the Philox key is (seed, world rank of the communicator);
   * the counter holds layer_id and the step. See sbn_dropout_mask_bits(). */
  uint32_t seed;
  uint32_t layer_id;
  /* BN: ghost batch size g; 0 (the default) turns ghost batches off, and
   * every other op refuses a nonzero value (SBN_EINVAL naming
   * ghost_batch). Wherever BatchNorm uses batch statistics (training, and
   * eval without running statistics) the process's N samples are split
   * into ceil(N/g) consecutive sub-batches of g samples (the last one may
   * be shorter), and each is normalized with its own per-channel
   * statistics; backward is the exact backward of that forward, and
   * dweight/dbias are summed over the sub-batches. A sub-batch with a
   * single value per channel (1 sample and no spatial extent) is
   * SBN_ESMALLBATCH, like a batch of 1.
   *
   * Ghost batches are local: they replace the reduction. A ghost layer
   * never calls its communicator, so with a sync group of k processes the
   * normalization set is g samples of one process (g > 0), the process's
   * b samples (g = 0, no communicator), or the k*b samples of the group
   * (g = 0 with a communicator). sbn_bn_needs_reduce() is 0 for it.
   *
   * Running statistics: one momentum (or cumulative) update per step,
   * with the mean over the sub-batches of their means and the mean of
   * their unbiased variances, each sub-batch weighted alike; and
   * num_batches_tracked + 1. The update is affine in the batch statistics,
   * so this is exactly the average of the running statistics of ceil(N/g)
   * processes that each ran plain BatchNorm on one sub-batch from the same
   * state (as many steps as they run), i.e. g on one process emulates
   * N/g data-parallel ranks of g samples without synchronized BatchNorm.
   * With a communicator each process updates its own running statistics
   * from its own sub-batches, so they differ between the processes of a
   * group. Eval with running statistics is unchanged. An empty batch
   * changes nothing. */
  size_t ghost_batch;
  /* BN on a communicator of more than one process, training: how many
   * channels each reduction of the overlapped SyncBN carries. Forward and
   * backward then reduce channel chunks with the communicator's
   * non-blocking entries, the next chunk's reduction in flight while the
   * current chunk is normalized, so the allreduce hides behind the pass
   * over memory. 0 (the default) chooses from the cache size: chunks of
   * about a quarter of the L2 cache once a rank's tensor exceeds twice the
   * L2 size (the forward plans from the previous training forward's
   * global count, backward from the saved one, so every process plans
   * alike), and one blocking reduction below that or on a communicator
   * without non-blocking entries. A value n > 0 forces chunks of n
   * channels (n >= channels: one reduction); SBN_CHUNK_OFF (or any n >=
   * channels) keeps one blocking allreduce per pass. Results equal the
   * unchunked ones bit for bit on two processes, and to rounding where a
   * reduction tree of more processes associates the merges differently.
   * Every process of the communicator must use the same value (MPI
   * layer creation checks it). */
  size_t reduce_chunk;
} sbn_layer_params_t;

/* params.reduce_chunk: never split SyncBN's reductions. */
#define SBN_CHUNK_OFF ((size_t)-1)

/* Fills p with PyTorch's defaults for op: eps 1e-5, momentum 0.1,
 * affine 1, track_running_stats 1 for BN and 0 for IN, p 0.5. */
SBN_API void sbn_layer_params_default(sbn_layer_params_t *p, sbn_op_t op);

typedef struct sbn_layer_s sbn_layer_t;

/* Validates params and creates a layer. comm may be NULL (single process);
 * the layer keeps the pointer but does not own it: the communicator must
 * outlive the layer. Only BatchNorm ever calls the communicator. */
SBN_API int sbn_layer_create(const sbn_layer_params_t *params, sbn_comm_t *comm,
                             sbn_layer_t **out);
SBN_API void sbn_layer_destroy(sbn_layer_t *layer);
SBN_API const sbn_layer_params_t *sbn_layer_params(const sbn_layer_t *layer);
SBN_API sbn_comm_t *sbn_layer_comm(const sbn_layer_t *layer);

/* Checks x against the layer (rank, C, layout, normalized shape, overflow)
 * and returns the number of bytes of workspace and of saved state that
 * forward/backward need for that shape. Either pointer may be NULL. */
SBN_API int sbn_layer_sizes(const sbn_layer_t *layer,
                            const sbn_tensor_desc_t *x, size_t *workspace_bytes,
                            size_t *saved_bytes);

typedef enum { SBN_MODE_TRAIN = 0, SBN_MODE_EVAL = 1 } sbn_mode_t;

/* Running state owned by the caller; NULL pointers where not tracked. */
typedef struct sbn_state_s {
  float *running_mean;         /* C floats, BN/IN with tracking */
  float *running_var;          /* C floats */
  int64_t num_batches_tracked; /* BN: incremented by training forward */
} sbn_state_t;

typedef struct sbn_forward_args_s {
  sbn_mode_t mode;
  const sbn_tensor_desc_t *x_desc;
  const float *x;
  float *y;            /* same shape and layout as x; may equal x */
  const float *weight; /* affine: C (BN/IN/GN) or normalized shape (LN) */
  const float *bias;
  sbn_state_t *state; /* BN/IN with tracking; otherwise may be NULL */
  uint64_t step;      /* dropout: the step in the counter */
  void *workspace;
  size_t workspace_bytes;
  void *saved; /* filled for backward; may be NULL if no backward follows */
  size_t saved_bytes;
} sbn_forward_args_t;

typedef struct sbn_backward_args_s {
  sbn_mode_t mode; /* must equal the forward's */
  const sbn_tensor_desc_t *x_desc;
  const float *x; /* the forward input (not needed by dropout) */
  const float *dy;
  float *dx; /* may equal dy */
  const float *weight;
  float *dweight; /* affine: written (not accumulated); may be NULL */
  float *dbias;
  uint64_t step;
  void *workspace;
  size_t workspace_bytes;
  const void *saved; /* as filled by the matching forward */
  size_t saved_bytes;
} sbn_backward_args_t;

/* Forward and backward for any op. For BatchNorm in training (or without
 * running statistics) this is the three steps below with a blocking
 * allreduce on the layer's communicator in the middle. */
SBN_API int sbn_forward(sbn_layer_t *layer, const sbn_forward_args_t *args);
SBN_API int sbn_backward(sbn_layer_t *layer, const sbn_backward_args_t *args);

/* The seam for SyncBN (fusion, overlap, a stats-only service path).
 * Forward = stats_local -> reduce the C records -> forward_finish.
 * Backward = backward_local -> reduce the C records -> backward_finish.
 * sbn_bn_needs_reduce() says whether a call in this mode reduces at all:
 * 1 only for a BatchNorm layer in training without ghost batches. In eval
 * the *_finish calls do the whole (local) work themselves and ignore recs
 * (it may be NULL), and the *_local calls are not needed: eval uses the
 * running statistics, or the local batch statistics when none are
 * tracked, and never communicates (PyTorch's SyncBatchNorm does the
 * same). A ghost-batch layer (params.ghost_batch > 0) is local in every
 * mode the same way: its *_finish calls do the whole work and ignore
 * recs, and its *_local calls are SBN_EINVAL wherever it uses batch
 * statistics (training, and eval without running statistics), since a
 * ghost layer has no records to reduce. */
SBN_API int sbn_bn_needs_reduce(const sbn_layer_t *layer, sbn_mode_t mode);
/* Writes C SBN_REC_MOMENTS records (count, mean, M2) of the local batch. */
SBN_API int sbn_bn_forward_local(sbn_layer_t *layer,
                                 const sbn_forward_args_t *args,
                                 sbn_rec_t *recs);
/* Takes the reduced records, updates running statistics, normalizes. A
 * global count of 1 in training is SBN_ESMALLBATCH (the same on every
 * process, since every process sees the same count). A global count of 0
 * leaves the running state unchanged. */
SBN_API int sbn_bn_forward_finish(sbn_layer_t *layer,
                                  const sbn_forward_args_t *args,
                                  const sbn_rec_t *recs);
/* Writes C SBN_REC_SUM records (sum dy, sum dy*xhat, 0). */
SBN_API int sbn_bn_backward_local(sbn_layer_t *layer,
                                  const sbn_backward_args_t *args,
                                  sbn_rec_t *recs);
SBN_API int sbn_bn_backward_finish(sbn_layer_t *layer,
                                   const sbn_backward_args_t *args,
                                   const sbn_rec_t *recs);

/* ------------------------------------------------------------------ */
/* Dropout randomness.
 *
 * Philox4x32-10 with key = (seed, rank) and counter
 * (c0, c1, c2, c3) = (block & 0xffffffff, block >> 32, step & 0xffffffff,
 * layer_id), where block = element_index / 4 and the element takes output
 * word element_index % 4 of that block. Element indices run over the tensor
 * in memory order. An element is dropped when word < p * 2^32 (compared in
 * 64 bits, so p = 1 drops every element). */
SBN_API void sbn_philox4x32_10(const uint32_t ctr[4], const uint32_t key[2],
                               uint32_t out[4]);

/* ------------------------------------------------------------------ */
/* Run-time kernel dispatch. */

/* Name of the kernel set in use ("ref", "avx2", "avx512"): the best one
 * this CPU runs, or the one the environment variable SBN_KERNELS names
 * when this CPU runs it (an unknown or unusable name there is ignored). */
SBN_API const char *sbn_kernel_name(void);
/* Forces a kernel set by name (tests compare every set to "ref"); "auto"
 * returns to the choice above. Returns SBN_ENOTSUP if there is no such
 * set or the CPU cannot run it. Not thread-safe: call before any other
 * thread uses the library. */
SBN_API int sbn_kernel_select(const char *name);

/* ------------------------------------------------------------------ */
/* Threads. */

/* Sets how many OpenMP threads each kernel call of the ops may use
 * (BatchNorm, InstanceNorm, GroupNorm and dropout; LayerNorm and the
 * chunked SyncBN reductions stay on the calling thread). The default is
 * 1. n > 1 is SBN_ENOTSUP in a build without -DSBN_OPENMP=ON; n < 1 is
 * SBN_EINVAL. Not thread-safe: call it between calls of the library, like
 * sbn_kernel_select(). */
SBN_API int sbn_set_threads(int n);
/* The thread count set (1 unless sbn_set_threads() raised it). */
SBN_API int sbn_threads(void);

#ifdef __cplusplus
}
#endif
#endif /* SYNCBN_H */
