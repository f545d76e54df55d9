/* The syncbnd wire codec: frames, msgpack requests and replies.
 *
 * The codec is pure: it turns bytes into a validated request or an error,
 * and replies into bytes. It never touches a socket, so it is unit-tested
 * and fuzzed on its own (tests/svc_codec_test.c). The protocol it speaks
 * is described in mpi/service/PROTOCOL.md.
 *
 * Hostile input is limited at every step, before anything is allocated:
 * - svc_frame_len() checks a frame's declared length against max_frame
 *   before the server buffers a single body byte;
 * - svc_scan() walks the msgpack encoding itself before msgpack-c sees it,
 *   with a nesting cap, a cap on the total number of objects, and every
 *   declared length or element count checked against the bytes that
 *   remain (msgpack-c sizes its allocations from declared counts, so
 *   `dd ff ff ff ff` would otherwise ask it for ~96 GB, and it reports
 *   nesting deeper than 32 as out-of-memory);
 * - svc_decode_request() checks every key's type and every tensor's shape
 *   product (overflow-checked) against its payload size.
 *
 * Ownership: a decoded request owns its tensor data (aligned copies);
 * svc_request_free() releases them. Encoded replies are malloc'ed byte
 * buffers that the caller frees with free().
 */
#ifndef SBN_SVC_CODEC_H
#define SBN_SVC_CODEC_H

#include <stddef.h>
#include <stdint.h>

#include "syncbn.h"

#define SVC_PROTOCOL_VERSION 6
#define SVC_HEADER_BYTES 4
#define SVC_NAME_MAX 255
/* The largest step a request may carry: 2^63 - 1, the range of a
 * client's signed 64-bit counter, so that steps always order. */
#define SVC_STEP_MAX ((uint64_t)INT64_MAX)
/* Longest token a hello may carry (bytes). */
#define SVC_TOKEN_MAX 1024
/* Most sub-requests in one batch. */
#define SVC_BATCH_MAX 256

/* Stable error codes of the protocol: name, whether the server closes the
 * connection after replying, and a short description. The names are the
 * strings on the wire; PROTOCOL.md lists the same table. */
#define SVC_CODE_MAP(XX)                                                      \
  XX(FRAME_TOO_LARGE, 1, "frame length exceeds the server's max_frame")       \
  XX(BAD_FRAME, 1, "frame length is zero")                                    \
  XX(MALFORMED, 1, "frame is not exactly one well-formed msgpack map")        \
  XX(LIMIT, 1, "nesting depth or element count exceeds the server's limits")  \
  XX(BAD_REQUEST, 0, "a key is missing, repeated or of the wrong type")       \
  XX(UNKNOWN_OP, 0, "unknown op")                                             \
  XX(UNSUPPORTED_VERSION, 0, "protocol version not supported")                \
  XX(BAD_TENSOR, 0, "tensor dtype, shape, layout or payload size is invalid") \
  XX(BAD_PARAMS, 0, "layer parameters are invalid")                           \
  XX(LAYER_MISMATCH, 0, "layer name registered with different parameters")    \
  XX(UNKNOWN_LAYER, 0, "no layer with this id")                               \
  XX(SHAPE, 0, "tensor shape does not fit the layer or its forward")          \
  XX(DUPLICATE_STEP, 0, "this (layer, step) was already submitted")           \
  XX(STALE_STEP, 0, "step is older than the kept window")                     \
  XX(NO_FORWARD, 0, "backward without a kept training forward")               \
  XX(SMALL_BATCH, 0, "too few values to compute statistics")                  \
  XX(NOT_YET, 0, "not implemented yet in this version of the worker")         \
  XX(STALL, 0, "not every rank submitted this sync entry in time")            \
  XX(CHECKPOINT, 0, "checkpoint file unreadable, corrupt or not matching")    \
  XX(RESOURCE, 0, "a worker resource limit or memory is exhausted")           \
  XX(TOO_MANY_CLIENTS, 1, "the worker serves its maximum number of clients")  \
  XX(FORBIDDEN, 1, "connection from another user")                            \
  XX(UNAUTHORIZED, 1, "TCP connection without the right token in hello")      \
  XX(TIMEOUT, 1, "idle or partial-frame timeout")                             \
  XX(SHUTDOWN, 1, "the worker is shutting down")                              \
  XX(INTERNAL, 0, "internal error")

typedef enum {
  SVC_OK = 0,
#define SVC__CODE_ENUM(name, fatal, msg) SVC_##name,
  SVC_CODE_MAP(SVC__CODE_ENUM)
#undef SVC__CODE_ENUM
      SVC_CODE_COUNT
} svc_code_t;

/* Wire name of a code ("MALFORMED"); "OK" for SVC_OK. Never NULL. */
const char *svc_code_name(svc_code_t code);
/* 1 if the server closes the connection after replying with code. */
int svc_code_fatal(svc_code_t code);

/* The service's error convention, as the kernel library's: a function
 * returns 0 or a negative service code (-SVC_BAD_REQUEST) and leaves a
 * message naming the offending argument, read with svc_last_error().
 * svc_set_error records code and message and returns -code, so checks
 * read `return svc_set_error(SVC_BAD_REQUEST, "step: ...")`. The message
 * is per thread, like sbn_last_error(). */
int svc_set_error(svc_code_t code, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
/* The message of the last svc_set_error on this thread ("" if none). */
const char *svc_last_error(void);
/* The code of a negative return value (INTERNAL for anything else). */
svc_code_t svc_code_of(int rc);

typedef struct svc_limits_s {
  uint32_t max_frame;   /* body bytes after the 4-byte header */
  uint32_t max_depth;   /* msgpack nesting (root map = 1), at most 32 */
  uint32_t max_objects; /* msgpack objects in one frame (keys included) */
} svc_limits_t;

/* max_frame 256 MiB, max_depth 8, max_objects 4096. */
void svc_limits_default(svc_limits_t *lim);

/* ------------------------------------------------------------------ */
/* Frames */

/* Reads a 4-byte big-endian header. Fails with FRAME_TOO_LARGE above
 * lim->max_frame and BAD_FRAME for zero. */
int svc_frame_len(const uint8_t hdr[SVC_HEADER_BYTES], const svc_limits_t *lim,
                  uint32_t *len);

/* Checks that body[0..len) is exactly one msgpack object, a map at the
 * root, within the nesting and object limits, with every declared length
 * and count fitting the remaining bytes. Allocates nothing. */
int svc_scan(const uint8_t *body, size_t len, const svc_limits_t *lim);

/* ------------------------------------------------------------------ */
/* Requests */

typedef enum {
  SVC_OP_HELLO = 0,
  SVC_OP_REGISTER,
  SVC_OP_FORWARD,
  SVC_OP_BACKWARD,
  SVC_OP_BYE,
  SVC_OP_BATCH,
  SVC_OP_STATS,
  SVC_OP_STATS_BACKWARD,
  SVC_OP_GET_STATE,
  SVC_OP_SET_STATE,
  SVC_OP_CHECKPOINT_SAVE,
  SVC_OP_CHECKPOINT_LOAD,
  SVC_OP_METRICS,
  SVC_OP_SHM_ATTACH, /* protocol 6: a shared-memory region */
  SVC_OP_COUNT       /* the number of ops: sizes per-op tables */
} svc_op_t;

/* Wire name of an op ("forward"); NULL past the last one. */
const char *svc_op_name(svc_op_t op);

/* The layer kinds of the protocol: the library's ops plus syncbatchnorm
 * (BatchNorm whose statistics are reduced over the job's ranks). */
typedef enum {
  SVC_KIND_BATCHNORM = 0,
  SVC_KIND_SYNCBATCHNORM,
  SVC_KIND_LAYERNORM,
  SVC_KIND_INSTANCENORM,
  SVC_KIND_GROUPNORM,
  SVC_KIND_DROPOUT
} svc_kind_t;

const char *svc_kind_name(svc_kind_t kind);

/* The request id as sent: any msgpack integer. */
typedef struct svc_id_s {
  int present;  /* 0: absent or not an integer (replies carry nil) */
  int negative; /* 1: value in i, else in u */
  uint64_t u;
  int64_t i;
} svc_id_t;

/* A decoded f32 tensor. data is a 64-byte aligned copy owned by the
 * request (NULL when numel is 0 or the tensor is absent). */
typedef struct svc_tensor_s {
  int present;
  sbn_tensor_desc_t desc;
  size_t numel;
  float *data;
  /* Protocol 6: x or dy named in a shared-memory region (`region` and
   * `offset` in place of `data`); data stays NULL until the worker copies
   * the bytes out of the region (svc_shm_req.c). */
  int shm;
  uint64_t shm_region, shm_offset;
  /* data points straight into the region (read in place, not freed with
   * the tensor): an input nothing needs after the request's kernel ran. */
  int borrowed;
  /* A forward's `x_stays` (protocol 6): the client promises that x stays
   * unchanged in its region until the step's backward, so a training
   * forward may keep a reference to it instead of a copy. */
  int stays;
} svc_tensor_t;

/* Protocol 6: where a forward's y (`y_at`) or a backward's dx (`dx_at`)
 * goes in a shared-memory region. dst is filled by the worker once the
 * range is checked; it points into the connection's mapping (not owned). */
typedef struct svc_shm_at_s {
  int present;
  uint64_t region, offset;
  uint8_t *dst;
} svc_shm_at_t;

/* A decoded per-channel vector (a 1-D tensor of dtype f32 or f64, or for
 * `count` also a single integer, then scalar = 1 and n = 1), widened to
 * double and owned by the request. */
typedef struct svc_vec_s {
  int present;
  int scalar;
  size_t n;
  double *v;
} svc_vec_t;

/* The vectors a stats reply may carry, in the order they go out; a
 * request's `want` (protocol 6, later workers) picks some of them as a
 * bit set (bit i for svc_stats_out_name(i)). */
enum {
  SVC_STATS_OUTS = 5,
  SVC_STATS_ALL = (1u << SVC_STATS_OUTS) - 1,
  SVC_STATS_COUNT = 1u << 0,
  SVC_STATS_MEAN = 1u << 1,
  SVC_STATS_VAR = 1u << 2,
  SVC_STATS_VAR_UNBIASED = 1u << 3,
  SVC_STATS_INVSTD = 1u << 4
};
/* "count", "mean", "var", "var_unbiased", "invstd"; NULL past the end. */
const char *svc_stats_out_name(int i);
struct msgpack_object;
/* Reads a stats request's `want` (NULL: absent) into *want: an array of
 * distinct names of svc_stats_out_name, at most SVC_STATS_OUTS of them;
 * absent, every vector. Anything else is BAD_REQUEST naming the element. */
int svc_decode_want(const struct msgpack_object *o, unsigned *want);

typedef struct svc_register_s {
  char name[SVC_NAME_MAX + 1];
  svc_kind_t kind;
  /* params.op is the library op (BatchNorm for syncbatchnorm); layer_id
   * is left 0 for the worker to fill. */
  sbn_layer_params_t params;
  uint64_t group_size; /* syncbatchnorm: ranks per sync group, 0 = all */
} svc_register_t;

typedef struct svc_request_s {
  svc_op_t op;
  svc_id_t id;
  uint64_t version; /* hello */
  /* hello: the TCP authentication token (bin or str), if sent. */
  int has_token;
  size_t token_len;
  uint8_t token[SVC_TOKEN_MAX];
  svc_register_t reg; /* register; checkpoint_*: reg.name is the file name */
  uint64_t layer;     /* forward, backward, stats*, get_state, set_state */
  uint64_t step;      /* forward, backward, stats, stats_backward */
  int train;          /* forward */
  svc_tensor_t x;     /* forward: x; backward: dy */
  svc_shm_at_t out;   /* forward: y_at; backward: dx_at (protocol 6) */
  uint64_t size;      /* shm_attach: the region's size in bytes */
  /* forward (optional): this step's affine parameters; set_state
   * (optional): the layer's new ones. */
  svc_tensor_t weight, bias;
  /* set_state (optional) */
  svc_tensor_t running_mean, running_var;
  int has_nbt;
  uint64_t num_batches_tracked;
  /* stats: count, mean, m2; stats_backward: sum_dy in mean, sum_dy_xhat in
   * m2. */
  svc_vec_t count, mean, m2;
  /* stats: the vectors its reply leaves out, as a bit set (the
   * complement of its `want`; 0, none, without one), so that a request
   * built as zeros gets the full reply. */
  unsigned skip;
  /* batch: nsub decoded sub-requests (forward, backward, stats,
   * stats_backward), owned by this request. */
  struct svc_request_s *sub;
  size_t nsub;
} svc_request_t;

/* Scans and decodes body into req. On failure req holds no allocations,
 * but req->id is filled whenever the frame carried an integer id, so the
 * error reply can echo it. */
int svc_decode_request(const uint8_t *body, size_t len, const svc_limits_t *lim,
                       svc_request_t *req);
void svc_request_free(svc_request_t *req);

/* ------------------------------------------------------------------ */
/* Replies: each returns a malloc'ed frame (header included) in *out and
 * its size in *out_len, or -SVC_RESOURCE (out of memory). */

int svc_encode_error(const svc_id_t *id, svc_code_t code, const char *message,
                     uint8_t **out, size_t *out_len);

typedef struct svc_hello_reply_s {
  int rank, size;
  uint32_t max_frame, max_depth, max_objects;
  uint32_t max_clients;
  uint64_t max_output;
  double idle_timeout, frame_timeout;
  uint32_t keep_steps;
} svc_hello_reply_t;

int svc_encode_hello(const svc_id_t *id, const svc_hello_reply_t *h,
                     uint8_t **out, size_t *out_len);
int svc_encode_register(const svc_id_t *id, uint64_t layer, int created,
                        uint8_t **out, size_t *out_len);
/* A reply frame in up to three pieces, written back to back (writev):
 * buf[0..at), then tail[0..tail_len), then buf[at..len). buf holds the
 * frame header, whose length counts the tail, and the msgpack around a
 * tensor's data; tail is that tensor's bytes, left in the buffer the
 * kernel wrote them to, so the reply path does not copy them. Both are
 * malloc'ed (tail may come from aligned_alloc) and owned by the frame
 * until svc_frame_free; tail is NULL (and at == len) for a frame in one
 * piece. */
typedef struct svc_frame_s {
  uint8_t *buf;
  size_t len, at;
  void *tail;
  size_t tail_len;
} svc_frame_t;

/* A frame in one piece (buf[0..len), ownership passes to it). */
void svc_frame_whole(svc_frame_t *f, uint8_t *buf, size_t len);
/* The frame's total length on the wire. */
size_t svc_frame_bytes(const svc_frame_t *f);
/* Frees both pieces and zeroes f. */
void svc_frame_free(svc_frame_t *f);
/* Makes f one piece (copying the tail into a new buffer, then freeing it),
 * for callers that want a single buffer. Returns 0, or -SVC_RESOURCE with
 * f freed. */
int svc_frame_flatten(svc_frame_t *f);

/* Tensors in replies have x's shape and layout; dw/db may be NULL (not
 * affine) with wb_numel elements each otherwise. */
int svc_encode_forward(const svc_id_t *id, const sbn_tensor_desc_t *desc,
                       const float *y, size_t numel, uint8_t **out,
                       size_t *out_len);
int svc_encode_backward(const svc_id_t *id, const sbn_tensor_desc_t *desc,
                        const float *dx, size_t numel, const float *dw,
                        const float *db, const sbn_tensor_desc_t *wb_desc,
                        size_t wb_numel, uint8_t **out, size_t *out_len);
/* The same replies with y or dx as the frame's tail: on success the frame
 * owns *y (or *dx) and the pointer is set to NULL; on failure both stay
 * the caller's. The bytes on the wire equal those of the copying
 * encoders above. */
int svc_encode_forward_frame(const svc_id_t *id, const sbn_tensor_desc_t *desc,
                             float **y, size_t numel, svc_frame_t *f);
int svc_encode_backward_frame(const svc_id_t *id, const sbn_tensor_desc_t *desc,
                              float **dx, size_t numel, const float *dw,
                              const float *db, const sbn_tensor_desc_t *wb_desc,
                              size_t wb_numel, svc_frame_t *f);
/* Protocol 6: the replies of a forward or backward whose y or dx was
 * written into a shared-memory region: the tensor carries `region` and
 * `offset` in place of `data`. */
struct msgpack_packer;
int svc_pack_tensor_at(struct msgpack_packer *pk, const sbn_tensor_desc_t *desc,
                       const svc_shm_at_t *at);
int svc_encode_forward_at(const svc_id_t *id, const sbn_tensor_desc_t *desc,
                          const svc_shm_at_t *at, uint8_t **out,
                          size_t *out_len);
int svc_encode_backward_at(const svc_id_t *id, const sbn_tensor_desc_t *desc,
                           const svc_shm_at_t *at, const float *dw,
                           const float *db, const sbn_tensor_desc_t *wb_desc,
                           size_t wb_numel, uint8_t **out, size_t *out_len);
int svc_encode_bye(const svc_id_t *id, uint8_t **out, size_t *out_len);
/* The reply to a batch: {id, replies: [...]}, whose elements are the
 * bodies of the n sub-reply frames subs[i] (header included, as the other
 * encoders return them; not freed here). */
int svc_encode_batch(const svc_id_t *id, uint8_t *const *subs,
                     const size_t *sub_lens, size_t n, uint8_t **out,
                     size_t *out_len);

/* A reply of any shape, for ops whose keys vary: begin with the number of
 * keys besides id, then for each key svc_reply_key() and one packed value
 * (through r->pk, svc_pack_tensor or svc_pack_vec64), then end. Any
 * failure along the way makes end return -SVC_RESOURCE and free everything. */
typedef struct svc_reply_s {
  struct svc__reply_impl_s *impl;
  struct msgpack_packer *pk;
  int rc;
} svc_reply_t;
int svc_reply_begin(svc_reply_t *r, const svc_id_t *id, uint32_t nkeys,
                    size_t hint);
void svc_reply_key(svc_reply_t *r, const char *key);
int svc_reply_end(svc_reply_t *r, uint8_t **out, size_t *out_len);

/* ------------------------------------------------------------------ */
/* Shared by the client: packing a tensor map and reading one back. The
 * packers return 0 or -SVC_RESOURCE (a failed write); callers often OR
 * them with msgpack-c's own returns and test the sum for nonzero. */

struct msgpack_packer;
struct msgpack_object;
/* Packs {dtype: "f32", shape: [...], data: bin, layout: "nchw"|"nhwc"}. */
int svc_pack_tensor(struct msgpack_packer *pk, const sbn_tensor_desc_t *desc,
                    const float *data, size_t numel);
/* Packs the same map up to data's bin header, without the bytes: the
 * caller sends numel floats right after what was packed (so the tensor
 * must be the last value of the frame), from wherever they are. */
int svc_pack_tensor_open(struct msgpack_packer *pk,
                         const sbn_tensor_desc_t *desc, size_t numel);
/* Decodes a tensor map into t (data copied and owned by t). what names
 * the key in messages. */
int svc_decode_tensor(const struct msgpack_object *o, const char *what,
                      svc_tensor_t *t);
/* The same checks without the copy: t gets the shape (t->data stays NULL)
 * and *payload points at the f32 bytes inside o, valid as long as o is. */
int svc_decode_tensor_view(const struct msgpack_object *o, const char *what,
                           svc_tensor_t *t, const uint8_t **payload);
void svc_tensor_free(svc_tensor_t *t);
/* Packs a 1-D f64 tensor {dtype: "f64", shape: [n], data, layout}. */
int svc_pack_vec64(struct msgpack_packer *pk, const double *v, size_t n);
/* The same up to the data's bin header: the n doubles are to follow. */
int svc_pack_vec64_open(struct msgpack_packer *pk, size_t n);

#endif /* SBN_SVC_CODEC_H */
