/* The worker's internals, shared by its rooms. Not installed, not used
 * outside src/svc/worker/. The arrows point one way:
 *
 *   svc_worker.c    the front door: public API, the command table, the
 *                   dispatch of one request (and of a batch's)
 *     -> svc_cmd_admin.c (hello, register, bye), svc_cmd_step.c (forward,
 *        backward, stats, stats_backward), svc_ops.c (get_state,
 *        set_state, metrics), svc_ckpt.c (checkpoints): the handlers, one
 *        signature, one call context each
 *       -> svc_agree.c  the cross-rank agreement engine: pending entries,
 *                       replies of deferred requests, the gathered ready
 *                       lists, the fused allreduce, stalls, poison,
 *                       mismatches; it calls a handler back only through
 *                       the done callback of the entry the handler queued
 *       -> svc_registry.c  layers, kept steps, the saved-state budget
 *
 * A function here that can fail returns 0 or a negative service code with
 * the message set by svc_set_error() (svc_codec.h), or NULL for memory. */
#ifndef SBN_SVC_WORKER_INT_H
#define SBN_SVC_WORKER_INT_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "svc_codec.h"
#include "svc_worker.h"

/* ------------------------------------------------------------------ */
/* Registry (svc_registry.c) */

/* Forward state kept for one (layer, step) of a training forward. After
 * its backward the buffers go but the entry stays (done = 1) until the
 * step window passes it, so a repeated step is still recognized. */
typedef struct svc__step_s {
  uint64_t step;
  int done;
  int busy; /* a syncbatchnorm forward or backward of it waits for ranks */
  sbn_tensor_desc_t desc;
  size_t numel;
  float *x; /* the forward input (NULL for dropout) */
  /* x_stays (protocol 6): x is not a copy but the client's bytes in a
   * region of connection x_shm (not owned, not freed), at byte x_off of
   * the file x_dev/x_ino. svc_worker_shm_gone copies them out before that
   * mapping goes; x_lost says the copy failed (the step has no x). */
  const struct svc_shm_s *x_shm;
  uint64_t x_off;
  dev_t x_dev;
  ino_t x_ino;
  int x_lost;
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

/* The layer with id `id`, or NULL with UNKNOWN_LAYER set (*rc). */
svc__layer_t *svc__layer(svc_worker_t *w, uint64_t id, int *rc);
/* Appends l to the registry (the caller checked the room for it). */
void svc__layer_append(svc_worker_t *w, svc__layer_t *l);
void svc__layer_free(svc_worker_t *w, svc__layer_t *l);
/* Releases a step's buffers and their share of the saved-state budget. */
void svc__step_release(svc_worker_t *w, svc__step_t *s);
svc__step_t *svc__find_step(svc__layer_t *l, uint64_t step);
/* Charges bytes of kept forward state to the budget; RESOURCE when the
 * budget cannot hold them. */
int svc__budget_take(svc_worker_t *w, uint64_t bytes);
/* Links s into l as its newest kept step and drops the steps that fell
 * out of the window. */
void svc__step_keep(svc_worker_t *w, svc__layer_t *l, svc__step_t *s);
void svc__prune(svc_worker_t *w, svc__layer_t *l);
/* Whether step is more than keep_steps behind newest (computed without
 * overflow). */
int svc__step_stale(const svc_worker_t *w, uint64_t step, uint64_t newest);
/* Library failures as protocol codes. */
svc_code_t svc__lib_code(int rc);
/* The library's last error as the service's: -code, message kept. */
int svc__lib_error(int rc);
float *svc__floats(size_t n);
uint64_t svc__hash_name(const char *name);
/* Whether two layers' library parameters agree (layer_id and ghost_batch
 * aside: register compares ghost_batch itself). */
int svc__lib_params_equal(const sbn_layer_params_t *a,
                          const sbn_layer_params_t *b);
/* Everything that must agree between ranks for a layer to be reduced
 * together: kind, channels, eps, momentum, affine, group size, ghost
 * batch size. */
uint64_t svc__fingerprint(const svc__layer_t *l);
/* Ranks per sync group of a layer (group_size 0 means the whole job). */
uint32_t svc__gsize(const svc_worker_t *w, const svc__layer_t *l);

/* ------------------------------------------------------------------ */
/* Calls and commands (svc_worker.c) */

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

/* One request being run: everything a handler sees and everything it
 * answers with. A handler either sets reply (and returns 0), returns a
 * negative code (the dispatcher encodes the error reply), or queues a
 * pending entry with svc__pend_queue(), which marks the call deferred and
 * remembers where the later reply goes (token, batch, slot). */
typedef struct svc__call_s {
  svc_worker_t *w;
  svc_request_t *q;    /* decoded; a handler may take over its buffers */
  void *token;         /* the connection (NULL for svc_worker_handle) */
  svc__batch_t *batch; /* the batch it belongs to, or NULL */
  size_t slot;         /* its index in the batch */
  svc_frame_t out;     /* the reply frame, when answered at once */
  int deferred;        /* the reply comes later, through the worker's deliver */
  int close_after;     /* close the connection after the reply */
} svc__call_t;

typedef int (*svc__cmd_fn)(svc__call_t *call);

/* Flags of a command row. */
enum {
  SVC__CMD_DEFERS = 1,  /* may answer later, after the other ranks */
  SVC__CMD_IN_BATCH = 2 /* allowed as a sub-request of a batch */
};

typedef struct svc__cmd_s {
  const char *name; /* the wire name, as svc_op_name() */
  svc__cmd_fn fn;
  unsigned flags;
} svc__cmd_t;

/* The command table, indexed by svc_op_t (svc_worker.c). */
extern const svc__cmd_t svc__cmds[SVC_OP_COUNT];

/* Runs one decoded request through its row of the table: an op without a
 * row, or one not allowed in a batch when call->batch is set, is refused
 * with BAD_REQUEST; the rest are counted and handed to their handler. A
 * batch's sub-requests come through here too, so that each behaves
 * exactly as it would on its own. */
int svc__dispatch(svc__call_t *call);

/* The handlers. */
int svc__cmd_hello(svc__call_t *call);
int svc__cmd_register(svc__call_t *call);
int svc__cmd_bye(svc__call_t *call);
int svc__cmd_forward(svc__call_t *call);
int svc__cmd_backward(svc__call_t *call);
int svc__cmd_stats(svc__call_t *call); /* and stats_backward */
int svc__cmd_get_state(svc__call_t *call);
int svc__cmd_set_state(svc__call_t *call);
int svc__cmd_metrics(svc__call_t *call);
int svc__cmd_shm_attach(svc__call_t *call);

/* Shared memory (svc_shm_req.c): checks the regions a request names and
 * copies its input out of them before it runs. The replies of forward
 * and backward: with at->dst set, y or dx is written there and the reply
 * names the region; with at (or at->dst) NULL they carry the bytes. A
 * deferred entry passes at only while its connection (whose mapping at
 * points into) is still there. */
int svc__shm_resolve(svc_worker_t *w, svc_request_t *q);
/* x_stays: the step s keeps a reference to the training forward q's x,
 * read in place in the current connection's region. */
void svc__shm_keep(const svc_worker_t *w, svc__step_t *s,
                   const svc_request_t *q);
/* A backward q of step s: BAD_TENSOR when its dx_at would overwrite the
 * x that s keeps in a region (the same file, overlapping bytes);
 * NO_FORWARD when that x was lost. */
int svc__shm_kept_check(const svc_worker_t *w, const svc__step_t *s,
                        const svc_request_t *q);
/* Where a kernel writes its output: straight into the region when the
 * request names one at a 64-byte aligned address (the kernels' alignment),
 * else fallback, which the encoders then copy into the region. */
float *svc__out_ptr(const svc_shm_at_t *at, float *fallback);
/* The reply of a forward whose result res (numel floats) the kernel
 * wrote: into the region when at names one (copying res there unless it
 * is already), else with res as the frame's tail, taken over from *own,
 * the variable that owns it (set to NULL then): no copy of the tensor.
 * Counts the copy or the zero-copy reply. */
int svc__encode_y(svc_worker_t *w, const svc_id_t *id, const svc_shm_at_t *at,
                  const sbn_tensor_desc_t *desc, const float *res, float **own,
                  size_t numel, svc_frame_t *f);
int svc__encode_dx(svc_worker_t *w, const svc_id_t *id, const svc_shm_at_t *at,
                   const sbn_tensor_desc_t *desc, const float *res, float **own,
                   size_t numel, const float *dw, const float *db,
                   const sbn_tensor_desc_t *wb_desc, size_t wb_numel,
                   svc_frame_t *f);
int svc__cmd_checkpoint(svc__call_t *call); /* save and load */
/* Removes the ".sbntmp-*" files a killed checkpoint_save left in the
 * state directory (a state directory serves one job at a time); returns
 * how many went. */
int svc__ckpt_sweep(svc_worker_t *w);

/* ------------------------------------------------------------------ */
/* The agreement engine (svc_agree.c) */

typedef struct svc__pend_s svc__pend_t;

/* The one completion of a pending entry, set by the handler that queued
 * it. recs are the job's reduced records of the entry; NULL means it will
 * not complete (stalled, mismatched or withdrawn: its error reply, if any,
 * is already sent) and the handler undoes what it reserved. The engine
 * frees the entry afterwards. */
typedef void (*svc__done_fn)(svc_worker_t *w, svc__pend_t *p,
                             const sbn_rec_t *recs);

/* One cross-rank entry waiting for the other ranks. The engine reads the
 * key, the agreement fields, the records and the reply's destination;
 * the rest belongs to the handler. */
struct svc__pend_s {
  uint64_t name, step; /* the key: a name hash, step, direction */
  uint32_t dir;        /* distinguishes a key's kinds of entries */
  uint32_t tag;        /* SBN_REC_MOMENTS or SBN_REC_SUM: how recs reduce */
  uint64_t fp;         /* what the ranks must agree on */
  uint32_t gsize;      /* ranks per sync group (the job size for all) */
  uint32_t grp;        /* this rank's group: rank / gsize */
  size_t nrec;         /* records per group */
  sbn_rec_t *recs;     /* this rank's records */
  char what[320];      /* names the entry in error messages */
  svc__done_fn done;
  /* Where the reply goes. */
  void *token;         /* NULL once the connection is gone */
  svc__batch_t *batch; /* the batch it belongs to, or NULL */
  size_t slot;         /* its index in the batch */
  svc_frame_t *direct; /* or here, for an entry completed at once */
  int sent;            /* part of the fused allreduce in flight */
  int listed;          /* in the round in flight (its bit set or gathered) */
  int fresh;           /* queued since the last round began: wakes the engine */
  int cslot;           /* the cache slot whose bit it set this round, or -1 */
  double t0;
  /* The handler's. */
  svc_request_t q; /* id; forward: weight, bias; backward: dy */
  svc__layer_t *l;
  svc__step_t *s;
  float *y, *dx, *dw, *db;
  void *ws;
  size_t ws_bytes;
  void *ctx; /* freed with the entry */
  struct svc__pend_s *next;
};

/* A new entry of nrec records (zeroed, tagged tag) under (name, step,
 * dir), for the job-wide group; NULL when out of memory. */
svc__pend_t *svc__pend_alloc(svc_worker_t *w, uint64_t name, uint64_t step,
                             uint32_t dir, size_t nrec, uint32_t tag);
void svc__pend_free(svc__pend_t *p);
/* Unlinks p from the pending list (p itself stays). */
void svc__pend_unlink(svc_worker_t *w, svc__pend_t *p);
/* Queues p for the agreement; its reply goes where call's would have
 * gone, and the call is deferred. */
void svc__pend_queue(svc__call_t *call, svc__pend_t *p);
/* Queues s as the continuation of p (done, being completed): s answers
 * where p would have answered. */
void svc__pend_chain(svc_worker_t *w, svc__pend_t *p, svc__pend_t *s);
/* Hands a deferred reply (NULL: none, the entry was withdrawn) to its
 * destination; takes ownership of buf. */
void svc__pend_deliver(svc_worker_t *w, svc__pend_t *p, uint8_t *buf,
                       size_t len);
/* The same for a reply frame in pieces (its contents pass). */
void svc__pend_deliver_frame(svc_worker_t *w, svc__pend_t *p, svc_frame_t *f);
void svc__pend_reply_error(svc_worker_t *w, svc__pend_t *p, svc_code_t code,
                           const char *msg);
/* Whether the key stalled or mismatched before in group grp (then it is
 * refused): 0, or the code it failed with. */
int svc__poisoned(const svc_worker_t *w, uint64_t name, uint64_t step,
                  uint32_t dir, uint32_t grp);
/* Whether this rank already has an entry queued under this key (a second
 * one would be counted as another rank's). */
int svc__pend_queued(const svc_worker_t *w, uint64_t name, uint64_t step,
                     uint32_t dir);
/* Fills slot i of a batch with a sub-reply (its contents pass; a frame
 * in pieces is made whole: a batch reply copies its sub-replies anyway);
 * the last one sends the batch's reply (or, when the connection is gone,
 * just frees it). */
void svc__batch_fill(svc_worker_t *w, svc__batch_t *b, size_t i,
                     svc_frame_t *f);
void svc__batch_free(svc__batch_t *b);
/* Entries waiting for the other ranks. */
uint64_t svc__pend_count(const svc_worker_t *w);
/* Drops every pending entry unanswered (the worker goes away). */
void svc__agree_destroy(svc_worker_t *w);

#define SVC__MAXE 64
#define SVC__POISON 1024

typedef struct svc__gent_s {
  uint64_t name, step, fp;
  uint32_t dir, C; /* C: records per group */
  uint32_t gsize, grp;
  uint32_t tag, pad;
  double age;
} svc__gent_t;

typedef struct svc__gmsg_s {
  uint32_t n, pad;
  svc__gent_t e[SVC__MAXE];
} svc__gmsg_t;

/* Makes w->rbuf n zeroed records, keeping its allocation from round to
 * round (a fresh one each round cost the heap's trim and page faults at
 * tens of KiB); 0, or -SVC_RESOURCE with nothing changed. With zero 0
 * the records are left as they are, for a caller that writes each. */
int svc__rbuf_zero(svc_worker_t *w, size_t n, int zero);

/* The negotiation round (svc_negotiate.c), shared with the gather and
 * reduce steps of svc_agree.c. */
int svc__neg_begin(svc_worker_t *w);
/* After the bit sets came back: the cached entries ready on every rank of
 * their group go into w->cready and this rank's into the reduce list;
 * *gather says whether the full lists must be gathered too, with
 * *per_rank entries each. */
int svc__neg_done(svc_worker_t *w, int *gather, size_t *per_rank);
/* Gives the (key, group) pairs a gather round found ready a cache slot,
 * or moves their slot's step on. */
void svc__cache_learn(svc_worker_t *w, const svc__gent_t *rd, size_t n);
/* Whether this rank must start a round now (fresh entries, a doorbell of
 * this epoch, or an entry waiting past the stall timeout); rings the
 * others' doorbells when the reason is its own. */
int svc__wake(svc_worker_t *w, int *rc);
/* Starts the fused allreduce of w->cready plus the nr pairs rd (found by
 * a gather), whose total record count is nrec. */
int svc__reduce_begin(svc_worker_t *w, const svc__gent_t *rd, size_t nr,
                      size_t nrec);
/* The gather of per_rank entries a rank (the smallest keys first). */
int svc__gather_begin(svc_worker_t *w, size_t per_rank);
/* The list this rank gathered: rank r's message in w->grecv. */
const svc__gmsg_t *svc__gmsg(const svc_worker_t *w, int r);
/* Ends a round on this rank: cleanup, what the speculation learns from
 * it (svc__spec_learn), epoch + 1. */
void svc__round_end(svc_worker_t *w);

/* Speculative rounds (svc_negotiate.c): a round whose cached slots the
 * ranks can predict agrees and reduces in one collective. Starts one and
 * returns 1 when the shared state predicts the round, else returns 0 (the
 * round then negotiates); negative on error. */
int svc__spec_begin(svc_worker_t *w);
/* After the speculative collective: sets ready[i] for the predicted slots
 * that every rank of their group had at one step (their entries complete:
 * svc_agree.c delivers them and ends the round), moves those slots on and
 * returns how many; a rank's uncovered entries make the next round
 * negotiate. */
size_t svc__spec_settle(svc_worker_t *w, unsigned char *ready);
/* Notes that slot s became ready in the round in flight. */
void svc__spec_note(svc_worker_t *w, int s);
/* At the end of a round: the slots of the round before it learn which
 * slots followed them. */
void svc__spec_learn(svc_worker_t *w);

typedef struct svc__key_s {
  uint64_t name, step;
  uint32_t dir, grp;
  uint32_t code; /* why it is poisoned: STALL or LAYER_MISMATCH */
} svc__key_t;

/* The response cache (svc_negotiate.c): a (layer, direction, group) the
 * ranks agreed on once gets a slot, the same index on every rank because
 * every rank inserts from the same decisions. Later steps of it agree by a
 * bitwise OR of fixed-size bit sets over the slots instead of the
 * gathered lists, so their cost does not grow with the ranks. There are
 * cfg.cache_slots of them; when all are taken, a new key takes the one
 * agreed least recently (the lowest index among equals), which every rank
 * picks alike since every rank saw the same rounds. */
/* Seconds after an entry's arrival during which the server polls the
 * engine continuously (see svc_worker_busy) rather than on its timer. */
#define SVC__SPIN_S 0.005
/* Slots a speculative round covers at most, and its records at most
 * (beyond that a wrong guess would move more bytes than the bit sets
 * save). */
#define SVC__SPEC_SLOTS 8
#define SVC__SPEC_RECS 65536
typedef struct svc__slot_s {
  uint64_t name, fp, last_step; /* the step it was last agreed at */
  uint64_t used_at;             /* the epoch of the round that did */
  uint32_t dir, C, gsize, grp, tag;
  int used;
  /* The slots that became ready in the round after the last round that
   * this slot led (see svc__spec_t); nnxt 0: none known. */
  int32_t nxt[SVC__SPEC_SLOTS];
  uint32_t nnxt;
} svc__slot_t;

/* What the speculation knows, the same on every rank because it is
 * learned from the rounds alone. A training loop submits its layers in
 * the same order every step, so the slots that become ready in a round
 * follow from those of the round before: the slot that led a round (the
 * first to become ready in it) remembers the slots of the next round.
 * When the last round with progress was cached and its leader knows its
 * successors, the next round is one allreduce of, per predicted slot, a
 * summed readiness record (ranks that have the slot's next entry, the sum
 * of their step offsets and of their squares: all at one offset exactly
 * when count * sum of squares = sum^2) and the slot's records, after one
 * summed record counting the ranks with entries the guess does not cover
 * (then the next round negotiates). A wrong guess costs that allreduce;
 * the entries in it stay queued. */
typedef struct svc__spec_s {
  int32_t now[SVC__SPEC_SLOTS]; /* slots ready in the round in flight */
  uint32_t nnow;
  int over;        /* more than SVC__SPEC_SLOTS became ready */
  int gathered;    /* the round in flight gathered lists */
  int32_t prev;    /* the leader of the last round with progress, or -1 */
  int prev_cached; /* that round gathered nothing */
  int force;       /* the next round negotiates */
  int carry;       /* the next round learns with the one that ended */
  int32_t set[SVC__SPEC_SLOTS]; /* the speculative round in flight */
  uint32_t nset;
} svc__spec_t;

/* The engine's phases: idle (no collective), negotiating (the bit sets),
 * gathering (the full lists), reducing (the fused allreduce), and the
 * speculative round's one allreduce. */
enum { SVC__IDLE = 0, SVC__NEG, SVC__GATHER, SVC__REDUCE, SVC__SPEC };

/* Latencies kept for the percentiles of the metrics reply (a ring). */
#define SVC__LAT_RING 1024
/* Buckets of layers per fused allreduce: 1, 2, 3-4, 5-8, ..., 65+. */
#define SVC__FUSE_BUCKETS 8

typedef struct svc__metrics_s {
  uint64_t requests[SVC_OP_COUNT]; /* decoded requests by op */
  uint64_t errors[SVC_CODE_COUNT]; /* error replies (and refusals) */
  uint64_t bytes_in, bytes_out;    /* frame bytes, headers included */
  uint64_t frames_in, frames_out;
  uint64_t connections, auth_failures;
  uint64_t shed; /* connections dropped for the server's memory budget */
  uint64_t allreduces, entries_fused, gathers;
  uint64_t negotiations, bells, rounds; /* bit-set ORs, doorbells sent */
  uint64_t agree_bytes;     /* negotiation + gather bytes this rank sent */
  uint64_t cache_hits;      /* entries agreed through their cache slot */
  uint64_t cache_evictions; /* slots given to a new key (least recent) */
  uint64_t spec_rounds;     /* rounds run as one speculative allreduce */
  uint64_t spec_misses;     /* of them, those that delivered nothing */
  /* Tensor payloads (x, dy, y, dx) copied by the worker: out of a frame
   * or a region into a private buffer, into a reply buffer, into a
   * region. Results computed in their input's buffer, and tensor
   * replies written from the result buffer (writev) instead. */
  uint64_t tensor_copies, in_place, zero_copy_replies;
  uint64_t fuse_hist[SVC__FUSE_BUCKETS];
  uint64_t stalls, mismatches;
  double lat[SVC__LAT_RING]; /* seconds from allreduce start to done */
  uint64_t nlat;
  double reduce_t0;
} svc__metrics_t;

struct svc_worker_s {
  svc_worker_config_t cfg;
  /* The region table of the connection whose request runs now (protocol
   * 6), or NULL (TCP, or no socket): set by the server around each call. */
  struct svc_shm_s *shm;
  /* The communicator the layers run on: one process, carrying the
   * worker's rank so that dropout keys differ between ranks exactly as
   * they do under SyncBN's MPI communicator. */
  sbn_comm_t comm;
  svc__layer_t **layers;
  uint32_t nlayers;
  uint64_t saved_bytes;
  /* syncbatchnorm coordination */
  int sync_on;
  sbn_comm_t *sync; /* the job's communicator (not owned) */
  void *sync_req;   /* the collective in flight */
  double stall_timeout;
  svc_deliver_fn deliver;
  void *deliver_ctx;
  double now;
  svc__pend_t *pend; /* oldest first */
  int phase;         /* SVC__IDLE, _NEG, _GATHER, _REDUCE, _SPEC */
  int hold;          /* start no round after round hold_last (svc_drain.c) */
  uint64_t hold_last;
  svc__gmsg_t gsend;
  uint8_t *grecv; /* size x gstride bytes: every rank's list */
  size_t gstride; /* bytes per rank of the gather in flight */
  /* Event-driven rounds: a round starts when this rank has fresh entries
   * (then it rings the others' doorbells with epoch) or a doorbell for
   * the current epoch came; every round ends on every rank with epoch + 1,
   * so stale doorbells are told apart. */
  uint64_t epoch, bell_max;
  double expire_next; /* no expiry wake before this time */
  svc__slot_t *slots; /* cfg.cache_slots, allocated with the first poll */
  size_t slot_hi;     /* slots in use are below this index */
  uint64_t *neg;      /* the negotiation words in flight */
  size_t neg_n;
  int full;            /* this round lists every entry in the gather */
  svc__gent_t *cready; /* slots ready by their bits this round */
  size_t ncready, cready_nrec;
  sbn_rec_t *rbuf; /* the round's records, rbuf_cap of them allocated */
  size_t rbuf_cap;
  svc__pend_t **rlist; /* this rank's entries in the allreduce in flight */
  size_t *roff;        /* and the offset of each one's records */
  size_t rlist_n;
  svc__spec_t spec;
  svc__key_t poison[SVC__POISON];
  size_t npoison, poison_next;
  svc__metrics_t m;
  /* checkpoints: where files live (absolute, no trailing slash) */
  char state_dir[4096];
};

#endif /* SBN_SVC_WORKER_INT_H */
