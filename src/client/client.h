/* syncbn client: talks to a syncbnd worker over its Unix socket, or over
 * TCP with a token (the protocol: mpi/service/PROTOCOL.md, version
 * SVC_PROTOCOL_VERSION). Plain blocking POSIX sockets and msgpack; no MPI, no
 * event loop. Tensors are sent as the host stores them, which the protocol
 * requires to be little-endian.
 *
 * Errors follow the library's one convention: every call returns 0 or a
 * negative code and records a message for sbn_last_error() (per thread),
 * which starts with the call ("forward: ...") and names the argument, or
 * for an error reply carries the worker's code and message ("forward:
 * server replied UNKNOWN_LAYER: layer: no layer 7"). The codes:
 *   SBN_EINVAL, SBN_ENOMEM, ...  a bad argument or a local failure, as in
 *                                the library;
 *   SBN_EIO                the socket failed (connect, send or receive);
 *   SBN_CLIENT_ECLOSED     the worker closed the connection;
 *   SBN_CLIENT_ETIMEDOUT   the socket's timeout (SO_RCVTIMEO, SO_SNDTIMEO,
 *                          which the caller may set on sbn_client_fd)
 *                          expired;
 *   SBN_EFORMAT            the reply is not what the protocol says;
 *   anything else: the worker answered with an error, mapped to the
 *   nearest code (SHAPE and BAD_TENSOR: SBN_ESHAPE; NOT_YET: SBN_ENOTSUP;
 *   LAYER_MISMATCH: SBN_EMISMATCH; DUPLICATE_STEP, STALE_STEP,
 *   NO_FORWARD: SBN_ESTATE; SMALL_BATCH: SBN_ESMALLBATCH; TIMEOUT:
 *   SBN_CLIENT_ETIMEDOUT; SHUTDOWN: SBN_CLIENT_ECLOSED; FRAME_TOO_LARGE, LIMIT,
 * RESOURCE, TOO_MANY_CLIENTS: SBN_ELIMIT; the rest, e.g. UNKNOWN_LAYER,
 *   BAD_PARAMS, CHECKPOINT, STALL, UNAUTHORIZED: SBN_EINVAL).
 * sbn_client_server_code() then gives the worker's code string. A client
 * handle is used by one thread at a time; distinct handles are
 * independent.
 */
#ifndef SBN_CLIENT_H
#define SBN_CLIENT_H

#include <stddef.h>
#include <stdint.h>

#include "syncbn.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The client's own codes, beside the library's SBN_ERRNO_MAP: name,
 * value, message. They start at -100 so that the library's table can grow
 * without colliding. */
#define SBN_CLIENT_ERRNO_MAP(XX)   \
  XX(ETIMEDOUT, -100, "timed out") \
  XX(ECLOSED, -101, "connection closed")

typedef enum {
#define SBN__CLIENT_ERR_ENUM(name, val, msg) SBN_CLIENT_##name = (val),
  SBN_CLIENT_ERRNO_MAP(SBN__CLIENT_ERR_ENUM)
#undef SBN__CLIENT_ERR_ENUM
} sbn_client_errno_t;

/* sbn_strerror and sbn_err_name for the codes of both tables ("connection
 * closed", "SBN_CLIENT_ECLOSED"); static strings, never NULL. */
const char *sbn_client_strerror(int err);
const char *sbn_client_err_name(int err);

typedef struct sbn_client_s sbn_client_t;

/* Writes "DIR/rank-<rank>.sock" into buf; SBN_ENOSPACE if it does not fit. */
int sbn_client_socket_path(char *buf, size_t n, const char *dir, int rank);

/* Connects to the worker's socket. *out is freed by sbn_client_close. */
int sbn_client_connect(const char *path, sbn_client_t **out);

/* Connects to a worker's TCP port (rank r listens on the --tcp port + r;
 * host is a name or an address literal, IPv6 without brackets) and sends
 * the hello that carries the token (token_len bytes, 0..1024). A worker
 * that refuses the token answers UNAUTHORIZED and closes; the call then
 * fails with that reply's code (SBN_EINVAL) and sbn_last_error() says why
 * (or what the name lookup or connect said).
 * Unlike sbn_client_connect, *out is set on failure too (it is NULL only
 * for SBN_ENOMEM and invalid arguments), so that
 * sbn_client_server_code(*out) can say "UNAUTHORIZED". Call
 * sbn_client_close(*out) whatever the result; a failed handle answers
 * only sbn_client_server_code. After a success
 * the connection is served like a Unix one (sbn_client_hello may be sent
 * again to read the limits). */
int sbn_client_connect_tcp(const char *host, int port, const void *token,
                           size_t token_len, sbn_client_t **out);

/* Closes the connection and frees c; NULL is ignored. */
void sbn_client_close(sbn_client_t *c);

typedef struct sbn_client_hello_s {
  int protocol;       /* the worker's protocol version */
  int rank, size;     /* the worker's MPI rank and the job size */
  uint32_t max_frame; /* largest request body the worker accepts */
  uint32_t keep_steps;
} sbn_client_hello_t;

int sbn_client_hello(sbn_client_t *c, sbn_client_hello_t *out);

/* Registers a layer: kind is "batchnorm", "syncbatchnorm", "layernorm",
 * "instancenorm", "groupnorm" or "dropout"; the fields of p that apply to
 * the kind are sent (p->op and p->layer_id are ignored: the worker assigns
 * the id, which is also the dropout layer id). group_size applies to
 * syncbatchnorm; p->ghost_batch to batchnorm and syncbatchnorm (sent when
 * nonzero, also for instancenorm, where the worker refuses it with
 * BAD_PARAMS; it needs a worker with protocol >= 4). *created says whether
 * the name was new (may be NULL). */
int sbn_client_register(sbn_client_t *c, const char *name, const char *kind,
                        const sbn_layer_params_t *p, uint32_t group_size,
                        uint64_t *layer, int *created);

/* One forward: y gets x's shape. weight and bias (may be NULL) override the
 * worker's affine parameters for this call (and its backward). */
int sbn_client_forward(sbn_client_t *c, uint64_t layer, uint64_t step,
                       int train, const sbn_tensor_desc_t *desc, const float *x,
                       const float *weight, const float *bias, size_t wb_numel,
                       float *y);

/* The backward of a training forward of the same (layer, step). dweight
 * and dbias (wb_numel floats each) may be NULL if not wanted; they are
 * filled only for affine layers. */
int sbn_client_backward(sbn_client_t *c, uint64_t layer, uint64_t step,
                        const sbn_tensor_desc_t *desc, const float *dy,
                        float *dx, float *dweight, float *dbias,
                        size_t wb_numel);

/* ------------------------------------------------------------------ */
/* Protocol 6: zero-copy shared memory, on the Unix socket only.
 *
 * sbn_client_shm_attach creates a memfd of size bytes, seals it
 * (F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_SEAL), maps it and hands it to the
 * worker with SCM_RIGHTS; out->base (owned by the caller, released with
 * sbn_client_shm_unmap) is the client's view and out->region the id that
 * requests name. The worker keeps its mapping until the connection
 * closes. sbn_client_shm_attach_fd sends a descriptor the caller made as
 * it is, declaring size (the worker checks the seals and size and
 * refuses a region it cannot trust).
 *
 * sbn_client_shm_forward reads x from base + x_off and has the worker
 * write y at base + y_off (same shape, float32 in the layout of desc);
 * sbn_client_shm_backward reads dy at dy_off and writes dx at dx_off,
 * returning dweight/dbias through the socket. The worker refuses
 * (BAD_TENSOR) ranges past the region's end and an output that overlaps
 * the input.
 *
 * sbn_client_shm_forward_flags is sbn_client_shm_forward with flags.
 * SBN_CLIENT_SHM_X_STAYS (a training forward) is the caller's promise that
 * the bytes of x stay unchanged at x_off until the step's backward has
 * been answered (or the step is dropped): the worker then keeps a
 * reference to them for the backward instead of a copy. Breaking the
 * promise gives wrong gradients, nothing worse; a backward whose dx_at
 * overlaps the kept x is refused (BAD_TENSOR). A worker without the
 * feature ignores the flag and copies. */
typedef struct sbn_client_shm_s {
  void *base;
  size_t size;
  uint64_t region;
} sbn_client_shm_t;

int sbn_client_shm_attach(sbn_client_t *c, size_t size, sbn_client_shm_t *out);
int sbn_client_shm_attach_fd(sbn_client_t *c, int fd, uint64_t size,
                             uint64_t *region);
void sbn_client_shm_unmap(sbn_client_shm_t *s);
int sbn_client_shm_forward(sbn_client_t *c, uint64_t layer, uint64_t step,
                           int train, const sbn_tensor_desc_t *desc,
                           uint64_t region, uint64_t x_off, uint64_t y_off);
#define SBN_CLIENT_SHM_X_STAYS 1u
int sbn_client_shm_forward_flags(sbn_client_t *c, uint64_t layer, uint64_t step,
                                 int train, const sbn_tensor_desc_t *desc,
                                 uint64_t region, uint64_t x_off,
                                 uint64_t y_off, unsigned flags);
int sbn_client_shm_backward(sbn_client_t *c, uint64_t layer, uint64_t step,
                            const sbn_tensor_desc_t *desc, uint64_t region,
                            uint64_t dy_off, uint64_t dx_off, float *dweight,
                            float *dbias, size_t wb_numel);

/* ------------------------------------------------------------------ */
/* Protocol 3: the stats path, layer state, checkpoints, metrics, batches.
 * They need a worker with protocol >= 3 (sbn_client_hello says). */

/* The reply of stats: caller-provided arrays of `channels` doubles each;
 * a NULL member is not filled, and not sent: the request names the
 * members wanted (`want`), so a caller that needs only mean and invstd
 * gets 2 of the 5 vectors back. A NULL out moves the running statistics
 * only. */
typedef struct sbn_client_stats_s {
  double *count;        /* values per channel in the group's batch */
  double *mean;         /* the group's mean */
  double *var;          /* biased variance, m2 / count */
  double *var_unbiased; /* m2 / (count - 1) */
  double *invstd;       /* 1 / sqrt(var + eps) */
} sbn_client_stats_t;

/* Reduces a syncbatchnorm layer's batch statistics, computed by the
 * caller, over the layer's sync group, and moves its running statistics
 * as a training forward would. Every rank of the group sends the same
 * (layer, step). This rank's values per channel are `count` when counts
 * is NULL, else counts[0..channels); mean and m2 (the sum of squared
 * deviations from this rank's mean) have `channels` doubles. They travel
 * as f64 tensors. */
int sbn_client_stats(sbn_client_t *c, uint64_t layer, uint64_t step,
                     size_t channels, uint64_t count, const double *counts,
                     const double *mean, const double *m2,
                     sbn_client_stats_t *out);

/* Sums this rank's per-channel sum_dy and sum_dy_xhat (`channels` doubles
 * each) over the group into group_sum_dy and group_sum_dy_xhat (caller's
 * arrays of `channels` doubles; NULL: not wanted). */
int sbn_client_stats_backward(sbn_client_t *c, uint64_t layer, uint64_t step,
                              size_t channels, const double *sum_dy,
                              const double *sum_dy_xhat, double *group_sum_dy,
                              double *group_sum_dy_xhat);

/* A layer's state. sbn_client_get_state fills it with arrays it allocates
 * (the caller need not know the layer's shapes); they belong to the
 * struct and are freed by sbn_client_state_free. sbn_client_set_state
 * reads a struct the caller filled or got from get_state. */
typedef struct sbn_client_state_s {
  char kind[16]; /* get_state: the registered kind; set_state ignores it */
  /* Running statistics: [channels] each. get_state sets the flag when the
   * layer tracks them; set_state sends each array that is not NULL. */
  int has_running_stats;
  size_t channels;
  float *running_mean, *running_var;
  /* get_state: present when the statistics are tracked; set_state sends
   * the value when the flag is set (0 .. 2^63 - 1). */
  int has_num_batches_tracked;
  int64_t num_batches_tracked;
  /* Affine parameters, shape param_desc (layout NCHW): [channels], or
   * normalized_shape for layernorm. get_state sets the flag for affine
   * layers; set_state sends each array that is not NULL. */
  int has_affine;
  sbn_tensor_desc_t param_desc;
  float *weight, *bias;
} sbn_client_state_t;

/* Fills *out (zeroed first; on failure it owns nothing). */
int sbn_client_get_state(sbn_client_t *c, uint64_t layer,
                         sbn_client_state_t *out);
/* Frees what get_state allocated and zeroes *s. Only for structs filled by
 * sbn_client_get_state (or zeroed ones). */
void sbn_client_state_free(sbn_client_state_t *s);
/* Sends the members of s that are present (see sbn_client_state_t); the
 * worker checks them all before it changes anything. A request with none
 * of them changes nothing. */
int sbn_client_set_state(sbn_client_t *c, uint64_t layer,
                         const sbn_client_state_t *s);

/* Collective: every rank's client must send the same one. name is a file
 * name in the workers' state directory. *layers (may be NULL) gets the
 * number of layers written or read. */
int sbn_client_checkpoint_save(sbn_client_t *c, const char *name,
                               uint64_t *layers);
int sbn_client_checkpoint_load(sbn_client_t *c, const char *name,
                               uint64_t *layers);

/* The worker's counters (this rank only). The requests-by-op and
 * errors-by-code tables keep their first SBN_CLIENT_METRICS_NAMES entries
 * (the protocol has fewer ops and codes); read them with the lookups
 * below. No allocation: the struct owns everything. */
#define SBN_CLIENT_METRICS_NAMES 32
typedef struct sbn_client_count_s {
  char name[32];
  uint64_t n;
} sbn_client_count_t;

typedef struct sbn_client_metrics_s {
  sbn_client_count_t requests[SBN_CLIENT_METRICS_NAMES];
  size_t nrequests;
  sbn_client_count_t errors[SBN_CLIENT_METRICS_NAMES];
  size_t nerrors;
  uint64_t bytes_in, bytes_out, frames_in, frames_out;
  uint64_t connections, auth_failures;
  uint64_t allreduces;    /* fused cross-rank allreduces started */
  uint64_t entries_fused; /* entries (layer steps) they carried */
  uint64_t gathers;       /* full exchanges of the ready lists */
  uint64_t negotiations;  /* bit-set ORs over the cached entries */
  uint64_t rounds;        /* agreement rounds (each one or more of these) */
  uint64_t bells;         /* doorbells rung to wake the idle ranks */
  uint64_t agree_bytes;   /* bytes this rank sent to agree (not reduce) */
  uint64_t cache_hits;    /* entries agreed through the response cache */
  uint64_t pending;       /* entries waiting for the other ranks now */
  /* Allreduces by entries fused: 1, 2, 3-4, 5-8, 9-16, 17-32, 33-64, 65+. */
  uint64_t fused_per_allreduce[8];
  uint64_t latency_count; /* allreduces timed; percentiles in seconds */
  double latency_p50, latency_p90, latency_p99, latency_max;
  uint64_t stalls, mismatches, saved_bytes, layers;
  uint64_t cache_evictions; /* cache slots handed to a new entry (LRU) */
  /* Tensor payloads the worker copied (out of a frame or a region, into a
   * reply or a region), results it computed in their input's buffer, and
   * tensor replies it wrote from the result buffer without a copy. */
  uint64_t tensor_copies, in_place, zero_copy_replies;
  /* Agreement rounds run as one speculative allreduce (agreeing and
   * reducing at once), and those of them that delivered nothing. */
  uint64_t spec_rounds, spec_misses;
} sbn_client_metrics_t;

int sbn_client_metrics(sbn_client_t *c, sbn_client_metrics_t *out);
/* Requests by op name ("forward") and error replies by code ("STALL");
 * 0 for a name the worker did not list. */
uint64_t sbn_client_metrics_requests(const sbn_client_metrics_t *m,
                                     const char *op);
uint64_t sbn_client_metrics_errors(const sbn_client_metrics_t *m,
                                   const char *code);

/* A batch: forwards, backwards, stats and stats_backwards queued one by
 * one and sent as one request, whose cross-rank entries the workers
 * reduce together (up to 64 in one allreduce). The queue calls copy their
 * inputs into the request at once, so the caller's arrays may change as
 * soon as they return. sbn_client_batch_run sends it and keeps every
 * sub-reply in the batch; sub-request i is the i-th queued (at most 256).
 * A batch is used by one thread at a time and may be run again (the same
 * requests) or reset and refilled. */
typedef struct sbn_client_batch_s sbn_client_batch_t;

int sbn_client_batch_new(sbn_client_batch_t **out);
/* Frees b and its results; NULL is ignored. */
void sbn_client_batch_free(sbn_client_batch_t *b);
/* Empties b (queue and results) for reuse. */
void sbn_client_batch_reset(sbn_client_batch_t *b);
size_t sbn_client_batch_size(const sbn_client_batch_t *b);

/* Queueing: the arguments of the single calls, without the outputs. They
 * return 0, SBN_ELIMIT when b holds 256 already, SBN_ENOMEM, or the
 * arguments' error (with its message, as every call); a failed call
 * queues nothing. */
int sbn_client_batch_forward(sbn_client_batch_t *b, uint64_t layer,
                             uint64_t step, int train,
                             const sbn_tensor_desc_t *desc, const float *x,
                             const float *weight, const float *bias,
                             size_t wb_numel);
int sbn_client_batch_backward(sbn_client_batch_t *b, uint64_t layer,
                              uint64_t step, const sbn_tensor_desc_t *desc,
                              const float *dy);
int sbn_client_batch_stats(sbn_client_batch_t *b, uint64_t layer, uint64_t step,
                           size_t channels, uint64_t count,
                           const double *counts, const double *mean,
                           const double *m2);
int sbn_client_batch_stats_backward(sbn_client_batch_t *b, uint64_t layer,
                                    uint64_t step, size_t channels,
                                    const double *sum_dy,
                                    const double *sum_dy_xhat);

/* Sends b and reads its reply. 0 means every sub-reply arrived; each has
 * its own result (a sub-request's error fails only that one). A negative
 * code means the batch as a whole failed (transport, a malformed reply,
 * the worker refused the batch, or b is empty: SBN_EINVAL), and
 * sbn_last_error() says why. */
int sbn_client_batch_run(sbn_client_t *c, sbn_client_batch_t *b);

/* One sub-reply. Every pointer belongs to the batch and stays valid until
 * it is run again, reset or freed; members that do not apply are NULL. */
typedef struct sbn_client_result_s {
  int rc;            /* 0, or the error mapped as for a single call */
  char code[32];     /* the worker's error code; "" on success */
  char message[256]; /* the worker's message */
  const float *y;    /* forward: numel floats, the shape of x */
  const float *dx;   /* backward: numel floats, the shape of dy */
  size_t numel;
  const float *dweight, *dbias; /* backward, affine layers: wb_numel each */
  size_t wb_numel;
  /* stats: count .. invstd; stats_backward: sum_dy, sum_dy_xhat (the
   * group's). channels doubles each. */
  const double *count, *mean, *var, *var_unbiased, *invstd;
  const double *sum_dy, *sum_dy_xhat;
  size_t channels;
} sbn_client_result_t;

/* Sub-reply i of the last successful run; NULL if there is none. */
const sbn_client_result_t *sbn_client_batch_result(const sbn_client_batch_t *b,
                                                   size_t i);

/* Says goodbye; the worker answers and closes. */
int sbn_client_bye(sbn_client_t *c);

/* The worker's error code ("UNKNOWN_LAYER") of the last call on c that
 * got an error reply; "" if the last call got none (it succeeded, or
 * failed before a reply: the message is then sbn_last_error()'s alone).
 * Valid until the next call on c. */
const char *sbn_client_server_code(const sbn_client_t *c);

/* Low level, for tests and tools: the socket, a raw send, and one reply
 * frame's body (malloc'ed, the caller frees it). */
int sbn_client_fd(const sbn_client_t *c);
int sbn_client_send_raw(sbn_client_t *c, const void *buf, size_t len);
int sbn_client_recv_frame(sbn_client_t *c, uint8_t **body, size_t *len);
/* Receives one frame and, if it is an error reply, returns 0 with its
 * code string in code (n bytes); "" for a non-error reply. A transport or
 * decoding failure returns its code. */
int sbn_client_recv_error(sbn_client_t *c, char *code, size_t n);

#ifdef __cplusplus
}
#endif
#endif /* SBN_CLIENT_H */
