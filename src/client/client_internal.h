/* Shared by the client's files:
 *   client_conn.c    connections, frames, error codes;
 *   client_reply.c   receiving and decoding replies;
 *   client_session.c a request and its reply, hello, bye, TCP connect;
 *   client_pack.c   packing requests (shared by the calls and batches);
 *   client_calls.c  the single request calls;
 *   client_metrics.c the metrics call;
 *   client_batch.c   the batch builder. */
#ifndef SBN_CLIENT_INTERNAL_H
#define SBN_CLIENT_INTERNAL_H

#include <msgpack.h>

#include "client.h"
#include "svc_codec.h"

struct sbn_client_s {
  int fd;
  uint64_t next_id;
  /* The call in progress ("forward"): every message starts with it. */
  const char *op;
  /* The worker's error code of the last error reply, "" if none. */
  char code[32];
  /* A reply body buffer kept from one reply to the next (freed on close):
   * a megabyte tensor reply in a fresh allocation would be faulted in
   * page by page on every call, which costs more than its copy. busy
   * while a reply uses it (a second reply then gets its own). */
  uint8_t *keep;
  size_t keep_cap;
  int keep_busy;
};

/* Starts call op on c: names it in messages and forgets the last reply's
 * code. Fails (with the message) for a NULL c and for a handle whose
 * connect_tcp failed, so that no call touches a socket that is not
 * there. */
int sbn__begin(sbn_client_t *c, const char *op);

/* Records "<c->op>: <message>" for sbn_last_error() and returns rc. */
int sbn__fail(sbn_client_t *c, int rc, const char *fmt, ...) SBN_PRINTF(3, 4);

/* Receives one frame's body (malloc'ed) on c. */
int sbn__recv_frame(sbn_client_t *c, uint8_t **body, size_t *len);
/* The same into c's kept buffer when it is free (*kept set), else into a
 * new one. */
int sbn__recv_frame_kept(sbn_client_t *c, uint8_t **body, size_t *len,
                         int *kept);

/* A new handle with no socket (fd -1), or NULL when out of memory. */
sbn_client_t *sbn__client_new(void);
/* Connects c to the first address of host:port that accepts. */
int sbn__tcp_connect(sbn_client_t *c, const char *host, int port);

/* ------------------------------------------------------------------ */
/* Requests */

/* A piece of a request's body sent from the caller's memory instead of
 * being copied into the frame: p[0..n) goes where the frame's first at
 * bytes end. */
typedef struct sbn__ext_s {
  size_t at;
  const void *p;
  size_t n;
} sbn__ext_t;

#define SBN__REQ_EXT 3

typedef struct sbn__req_s {
  msgpack_sbuffer sb;
  msgpack_packer pk;
  uint64_t id;
  int bad; /* nonzero: packing ran out of memory */
  sbn__ext_t ext[SBN__REQ_EXT];
  int next;
} sbn__req_t;

/* Packs the f64 vector v[0..n) into pk; with r (whose packer pk is), only
 * its header, and v's bytes are sent from v by sbn__req_send. v must then
 * stay unchanged until the request is sent. */
int sbn__pack_vec64(msgpack_packer *pk, sbn__req_t *r, const double *v,
                    size_t n);

/* Packs a string (a key, or a string value). */
int sbn__key(msgpack_packer *pk, const char *k);

/* Starts a frame: room for the header and the request's id (the next of
 * c's); the caller packs the whole map. */
void sbn__req_init(sbn_client_t *c, sbn__req_t *r);

/* sbn__req_init, then the head of a request map of n entries (op and id
 * included). */
void sbn__req_start(sbn_client_t *c, sbn__req_t *r, const char *op, size_t n);

/* Packs the head of a request map of n entries (op and id included). */
int sbn__pack_head(msgpack_packer *pk, const char *op, uint64_t id, size_t n);

/* Sends r's frame followed by tail_len bytes of tail (which the frame's
 * header counts; NULL for none) and frees r's buffer. */
int sbn__req_send(sbn_client_t *c, sbn__req_t *r, const void *tail,
                  size_t tail_len);

/* Packs the keys layer and step. */
int sbn__pack_layer_step(msgpack_packer *pk, uint64_t layer, uint64_t step);

/* The stats requests' vectors (with r != NULL) go out by sbn__pack_vec64
 * from the caller's arrays: a stats entry of 2048 channels copied 32 KB
 * into a growing frame (8, 16, 32 then 64 KB) before its send. */
/* The request maps that a batch can hold, packed by one function each
 * for the single calls and the batch queue. The tensor (x, dy) is the
 * map's last value; with x (dy) NULL its bytes are left out, for the
 * caller to send as the request's tail straight from its own buffer. */
int sbn__pack_forward(msgpack_packer *pk, uint64_t id, uint64_t layer,
                      uint64_t step, int train, const sbn_tensor_desc_t *desc,
                      const float *x, size_t numel, const float *weight,
                      const float *bias, size_t wb_numel);
int sbn__pack_backward(msgpack_packer *pk, uint64_t id, uint64_t layer,
                       uint64_t step, const sbn_tensor_desc_t *desc,
                       const float *dy, size_t numel);
/* want: the reply's vectors as a bit set (SVC_STATS_*); SVC_STATS_ALL
 * sends no `want` key, the request of every protocol version. */
int sbn__pack_stats(msgpack_packer *pk, sbn__req_t *r, uint64_t id,
                    uint64_t layer, uint64_t step, size_t channels,
                    uint64_t count, const double *counts, const double *mean,
                    const double *m2, unsigned want);
int sbn__pack_stats_backward(msgpack_packer *pk, sbn__req_t *r, uint64_t id,
                             uint64_t layer, uint64_t step, size_t channels,
                             const double *sum_dy, const double *sum_dy_xhat);

/* The checks that stats and stats_backward (single or queued) make of
 * their arrays: channels > 0, both arrays, one frame's worth. op names the
 * call in the message. */
int sbn__check_vecs(const char *op, size_t channels, const void *a,
                    const char *aname, const void *b, const char *bname);

/* ------------------------------------------------------------------ */
/* Replies */

typedef struct sbn__reply_s {
  uint8_t *body;
  sbn_client_t *kept; /* body is this client's kept buffer (not freed) */
  msgpack_zone zone;
  int zone_ok;
  msgpack_object root;
} sbn__reply_t;

void sbn__reply_free(sbn__reply_t *p);

/* Receives the reply to request id into p. An error reply fails with the
 * mapped code, its code kept in c->code and its message recorded. On
 * failure p owns nothing. */
int sbn__reply(sbn_client_t *c, uint64_t id, sbn__reply_t *p);

/* Sends r and receives its reply (sbn__req_send, then sbn__reply). */
int sbn__call(sbn_client_t *c, sbn__req_t *r, sbn__reply_t *p);
/* The same with tail_len bytes of tail after r's bytes in the frame. */
int sbn__call_tail(sbn_client_t *c, sbn__req_t *r, const void *tail,
                   size_t tail_len, sbn__reply_t *p);

/* Receives one frame and decodes it into p, without looking at what it
 * says. */
int sbn__reply_read(sbn_client_t *c, sbn__reply_t *p);

/* If m is an error reply, copies its code and message and returns 1; 0
 * for any other map; -1 for an error reply without a code. */
int sbn__error_of(const msgpack_object *m, char *code, size_t ncode, char *msg,
                  size_t nmsg);

/* The library code nearest to a worker's error code (client.h). */
int sbn__server_rc(const char *code);

const msgpack_object *sbn__get(const msgpack_object *map, const char *key);
/* 0 with the value, or -1 if key is missing or not what is asked. */
int sbn__uint_field(const msgpack_object *m, const char *key, uint64_t *out);
int sbn__num_field(const msgpack_object *m, const char *key, double *out);
int sbn__bool_field(const msgpack_object *m, const char *key, int *out);

/* Decodes the f32 tensor key into t (owned by the caller, freed with
 * svc_tensor_free); with want, its shape must be want's. */
int sbn__decode_f32(sbn_client_t *c, const msgpack_object *root,
                    const char *key, const sbn_tensor_desc_t *want,
                    svc_tensor_t *t);

/* A backward reply's dweight and dbias (wb_numel floats each) into the
 * arrays that are not NULL; nothing when the reply has none. */
int sbn__take_dparams(sbn_client_t *c, const msgpack_object *root,
                      float *dweight, float *dbias, size_t wb_numel);

/* Copies the f32 tensor key, of shape want, into out (NULL: only
 * checks it). */
int sbn__take_tensor(sbn_client_t *c, const msgpack_object *root,
                     const char *key, const sbn_tensor_desc_t *want,
                     float *out);

/* Reads the f64 tensor key of shape [n] into out (n doubles; NULL only
 * checks it). */
int sbn__take_vec64(sbn_client_t *c, const msgpack_object *root,
                    const char *key, size_t n, double *out);

/* The stats reply: f64 [channels] tensors into the non-NULL arrays (a
 * NULL one's tensor need not be in the reply). */
int sbn__take_stats(sbn_client_t *c, const msgpack_object *root,
                    size_t channels, double *count, double *mean, double *var,
                    double *var_unbiased, double *invstd);

/* Asks for 4 MiB socket buffers on fd (best effort). */
void sbn__big_buffers(int fd);

#endif /* SBN_CLIENT_INTERNAL_H */
