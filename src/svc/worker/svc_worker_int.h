/* The worker's internals, shared by the files that implement its ops
 * (svc_worker.c: registry, forward/backward and the cross-rank agreement;
 * svc_ops.c: state and metrics; svc_ckpt.c: checkpoints). Not installed,
 * not used outside src/svc/worker/. */
#ifndef SBN_SVC_WORKER_INT_H
#define SBN_SVC_WORKER_INT_H

#include <stddef.h>
#include <stdint.h>

#include "svc_codec.h"
#include "svc_worker.h"

/* Forward state kept for one (layer, step) of a training forward. After
 * its backward the buffers go but the entry stays (done = 1) until the
 * step window passes it, so a repeated step is still recognized. */
typedef struct svc__step_s {
  uint64_t step;
  int done;
  int busy; /* a syncbatchnorm forward or backward of it waits for ranks */
  sbn_tensor_desc_t desc;
  size_t numel;
  float *x;     /* the forward input (NULL for dropout) */
  float *w, *b; /* the affine parameters the forward used */
  void *saved;
  size_t saved_bytes;
  uint64_t bytes; /* counted against max_saved */
  struct svc__step_s *next;
} svc__step_t;

typedef struct svc__layer_s {
  char name[SVC_NAME_MAX + 1];
  svc_kind_t kind;
  uint64_t group_size;
  sbn_layer_params_t params; /* as registered (layer_id = the layer id) */
  sbn_layer_t *layer;
  sbn_tensor_desc_t wb_desc; /* shape of weight and bias */
  size_t wb_numel;           /* 0 when not affine */
  float *weight, *bias;
  float *running_mean, *running_var;
  sbn_state_t state;
  int tracking;
  int have_step;
  uint64_t max_step;
  svc__step_t *steps;
} svc__layer_t;

/* A communicator of one process that carries the worker's rank, so that
 * dropout keys differ between ranks exactly as they do under SyncBN's MPI
 * communicator. */
typedef struct svc__comm_s {
  sbn_comm_t base;
} svc__comm_t;

static int svc__comm_allreduce(sbn_comm_t *c, sbn_rec_t *r, size_t n) {
  (void)c;
  (void)r;
  (void)n;
  return 0;
}
static void svc__comm_destroy(sbn_comm_t *c) {
  (void)c;
}
static const sbn_comm_vtable_t svc__comm_vt = {svc__comm_allreduce, NULL, NULL,
                                               NULL, svc__comm_destroy};

/* A batch request whose sub-requests are not all answered yet: each slot
 * holds a sub-reply frame once it is known; the batch reply goes out when
 * the last one arrives. */
typedef struct svc__batch_s {
  svc_id_t id;
  void *token; /* NULL once the connection is gone */
  size_t n, left;
  uint8_t **reply;
  size_t *len;
} svc__batch_t;

/* Directions of a cross-rank entry: what its records are and what
 * completes it. */
enum {
  SVC__DIR_FORWARD = 0,
  SVC__DIR_BACKWARD = 1,
  SVC__DIR_STATS = 2,
  SVC__DIR_STATS_BACKWARD = 3,
  SVC__DIR_CKPT = 4
};

/* One cross-rank entry (a syncbatchnorm forward or backward, a stats
 * request, a checkpoint) waiting for the other ranks. */
typedef struct svc__pend_s {
  uint64_t name, step; /* the key: layer name hash, step, direction */
  uint32_t dir;        /* SVC__DIR_* */
  uint64_t fp;         /* the layer's parameter fingerprint */
  uint32_t gsize;      /* ranks per sync group (the job size for all) */
  uint32_t grp;        /* this rank's group: rank / gsize */
  size_t nrec;         /* records per group */
  svc__layer_t *l;     /* NULL for a checkpoint */
  svc__step_t *s;      /* the kept step of a forward or backward */
  svc__batch_t *batch; /* the batch it belongs to, or NULL */
  size_t slot;         /* its index in the batch */
  /* A checkpoint's own completion (see svc_ckpt.c). */
  void (*done)(svc_worker_t *w, struct svc__pend_s *p, const sbn_rec_t *recs);
  void *ctx;
  void *token; /* NULL once the connection is gone */
  int sent;    /* part of the fused allreduce in flight */
  int listed;  /* in the ready list of the allgather in flight */
  double t0;
  svc_request_t q; /* id; forward: weight, bias; backward: dy */
  float *y, *dx, *dw, *db;
  void *ws;
  size_t ws_bytes;
  sbn_rec_t *recs; /* channels records */
  struct svc__pend_s *next;
} svc__pend_t;

#define SVC__MAXE 64
#define SVC__POISON 1024

typedef struct svc__gent_s {
  uint64_t name, step, fp;
  uint32_t dir, C; /* C: records per group */
  uint32_t gsize, grp;
  double age;
} svc__gent_t;

typedef struct svc__gmsg_s {
  uint32_t n, pad;
  svc__gent_t e[SVC__MAXE];
} svc__gmsg_t;

typedef struct svc__key_s {
  uint64_t name, step;
  uint32_t dir, grp;
} svc__key_t;

/* Latencies kept for the percentiles of the metrics reply (a ring). */
#define SVC__LAT_RING 1024
/* Buckets of layers per fused allreduce: 1, 2, 3-4, 5-8, ..., 65+. */
#define SVC__FUSE_BUCKETS 8

typedef struct svc__metrics_s {
  uint64_t requests[SVC_OP_METRICS + 1]; /* decoded requests by op */
  uint64_t errors[SVC_CODE_COUNT];       /* error replies (and refusals) */
  uint64_t bytes_in, bytes_out;          /* frame bytes, headers included */
  uint64_t frames_in, frames_out;
  uint64_t connections, auth_failures;
  uint64_t allreduces, entries_fused, gathers;
  uint64_t fuse_hist[SVC__FUSE_BUCKETS];
  uint64_t stalls, mismatches;
  double lat[SVC__LAT_RING]; /* seconds from allreduce start to done */
  uint64_t nlat;
  double reduce_t0;
} svc__metrics_t;

struct svc_worker_s {
  svc_worker_config_t cfg;
  svc__comm_t comm;
  svc__layer_t **layers;
  uint32_t nlayers;
  uint64_t saved_bytes;
  /* syncbatchnorm coordination */
  int sync_on;
  svc_sync_ops_t ops;
  double stall_timeout;
  svc_deliver_fn deliver;
  void *deliver_ctx;
  double now;
  svc__pend_t *pend; /* oldest first */
  int phase;         /* 0 idle, 1 gathering, 2 reducing */
  svc__gmsg_t gsend;
  svc__gmsg_t *grecv;
  sbn_rec_t *rbuf;
  svc__pend_t **rlist; /* this rank's entries in the allreduce in flight */
  size_t *roff;        /* and the offset of each one's records */
  size_t rlist_n;
  svc__key_t poison[SVC__POISON];
  size_t npoison, poison_next;
  svc__metrics_t m;
  /* The batch and slot of the sub-request being run (NULL outside a
   * batch), and the pending entry the last svc__pend_add() queued. */
  svc__batch_t *cur_batch;
  size_t cur_slot;
  svc__pend_t *last_added;
  /* checkpoints: where files live (absolute, no trailing slash) */
  char state_dir[4096];
  uint64_t ckpt_seq; /* checkpoint requests queued so far (their step) */
};

/* Shared helpers of svc_worker.c. */
svc__layer_t *svc__layer(svc_worker_t *w, uint64_t id, svc_err_t *err);
svc_code_t svc__lib_code(int rc);
float *svc__floats(size_t n);
uint64_t svc__hash_name(const char *name);
/* Whether two layers' library parameters agree (layer_id aside). */
int svc__lib_params_equal(const sbn_layer_params_t *a,
                          const sbn_layer_params_t *b);
/* A new cross-rank entry with nrec records per group (zeroed), keyed by
 * (name, step, dir), for the job-wide group; the caller fills the rest
 * and queues it with svc__pend_add(). */
svc__pend_t *svc__pend_alloc(svc_worker_t *w, uint64_t name, uint64_t step,
                             uint32_t dir, size_t nrec, void *token);
void svc__pend_add(svc_worker_t *w, svc__pend_t *p);
void svc__pend_free(svc__pend_t *p);
/* Hands a deferred reply (NULL: none, the entry was withdrawn) to its
 * connection or batch; takes ownership of buf. */
void svc__pend_deliver(svc_worker_t *w, svc__pend_t *p, uint8_t *buf,
                       size_t len);
void svc__pend_reply_error(svc_worker_t *w, svc__pend_t *p, svc_code_t code,
                           const char *msg);

/* Ops implemented outside svc_worker.c; each returns 0 with *reply set,
 * or -1 with err set. */
int svc__get_state(svc_worker_t *w, const svc_request_t *q, uint8_t **reply,
                   size_t *reply_len, svc_err_t *err);
int svc__set_state(svc_worker_t *w, const svc_request_t *q, uint8_t **reply,
                   size_t *reply_len, svc_err_t *err);
int svc__metrics(svc_worker_t *w, const svc_request_t *q, uint8_t **reply,
                 size_t *reply_len, svc_err_t *err);
/* checkpoint_save / checkpoint_load: collective, deferred like a
 * syncbatchnorm step (svc_ckpt.c). */
int svc__checkpoint(svc_worker_t *w, svc_request_t *q, void *token,
                    int *deferred, uint8_t **reply, size_t *reply_len,
                    svc_err_t *err);

#endif /* SBN_SVC_WORKER_INT_H */
