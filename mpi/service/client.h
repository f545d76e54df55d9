/* syncbn client: talks to a local syncbnd worker over its Unix socket
 * (protocol: mpi/service/PROTOCOL.md). Plain blocking POSIX sockets and
 * msgpack; no MPI, no event loop.
 *
 * Every call returns 0 or a negative SBN_E* code:
 *   SBN_EIO      the socket failed (connect, send or receive);
 *   SBN_ECLOSED  the worker closed the connection;
 *   SBN_EFORMAT  the reply is not what the protocol says;
 *   anything else: the worker answered with an error, mapped to the
 *   nearest library code (SHAPE and BAD_TENSOR: SBN_ESHAPE; NOT_YET:
 *   SBN_ENOTSUP; LAYER_MISMATCH: SBN_EMISMATCH; DUPLICATE_STEP,
 *   STALE_STEP, NO_FORWARD: SBN_ESTATE; SMALL_BATCH: SBN_ESMALLBATCH;
 *   TIMEOUT: SBN_ETIMEDOUT; FRAME_TOO_LARGE, LIMIT, RESOURCE,
 *   TOO_MANY_CLIENTS: SBN_ELIMIT; the rest: SBN_EINVAL).
 * sbn_client_error_code() then gives the worker's code string and
 * sbn_client_error() a message. A client handle is used by one thread at a
 * time; distinct handles are independent.
 */
#ifndef SBN_CLIENT_H
#define SBN_CLIENT_H

#include <stddef.h>
#include <stdint.h>

#include "syncbn.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct sbn_client_s sbn_client_t;

/* Writes "DIR/rank-<rank>.sock" into buf; SBN_ENOSPACE if it does not fit. */
int sbn_client_socket_path(char *buf, size_t n, const char *dir, int rank);

/* Connects to the worker's socket. *out is freed by sbn_client_close. */
int sbn_client_connect(const char *path, sbn_client_t **out);
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
 * syncbatchnorm. *created says whether the name was new (may be NULL). */
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

/* Says goodbye; the worker answers and closes. */
int sbn_client_bye(sbn_client_t *c);

/* The worker's error code for the last failure ("" if the failure was
 * local) and a message for it. Valid until the next call on c. */
const char *sbn_client_error_code(const sbn_client_t *c);
const char *sbn_client_error(const sbn_client_t *c);

/* Low level, for tests and tools: the socket, a raw send, and one reply
 * frame's body (malloc'ed, the caller frees it). */
int sbn_client_fd(const sbn_client_t *c);
int sbn_client_send_raw(sbn_client_t *c, const void *buf, size_t len);
int sbn_client_recv_frame(sbn_client_t *c, uint8_t **body, size_t *len);
/* Receives one frame and, if it is an error reply, returns its code string
 * in code (n bytes); "" for a non-error reply. */
int sbn_client_recv_error(sbn_client_t *c, char *code, size_t n);

#ifdef __cplusplus
}
#endif
#endif /* SBN_CLIENT_H */
