/* The syncbnd worker: the layers a worker serves and the ops on them.
 *
 * The worker sits between the codec and the server. It owns the layer
 * registry (layers belong to the worker and are shared by all of its
 * clients), each layer's affine parameters and running statistics, and the
 * forward state that a training backward needs, kept per (layer, step).
 * It knows nothing of sockets: the server hands it one frame body and
 * sends back the reply frame it returns, so the whole request path can be
 * tested without a socket.
 *
 * Single-threaded: the server calls it from its event loop only.
 */
#ifndef SBN_SVC_WORKER_H
#define SBN_SVC_WORKER_H

#include <stddef.h>
#include <stdint.h>

#include "svc_codec.h"

typedef struct svc_worker_config_s {
  int rank, size;      /* of this worker in the job */
  uint32_t keep_steps; /* forward state older than this is dropped */
  uint32_t max_layers; /* registry size */
  uint64_t max_saved;  /* bytes of kept forward state, all layers */
  /* Slots of the agreement's response cache, 1 to SVC_CACHE_SLOTS_MAX.
   * Every rank of the job must use the same number: the ranks evict the
   * same slot in the same round because they count alike. */
  uint32_t cache_slots;
  /* Whether predictable cached rounds agree and reduce in one collective
   * (1, the default) or always negotiate first (0). Every rank of the job
   * must use the same value. */
  int speculate;
  svc_limits_t limits; /* frame limits for the codec */
  /* Reported by hello only; the server enforces them. */
  uint32_t max_clients;
  uint64_t max_output;
  double idle_timeout, frame_timeout;
} svc_worker_config_t;

#define SVC_CACHE_SLOTS_MAX 65536

/* keep_steps 2, max_layers 1024, max_saved 4 GiB, cache_slots 512,
 * speculate 1,
 * svc_limits_default(),
 * rank 0 of 1, max_clients 64, max_output 512 MiB, idle_timeout 300 s,
 * frame_timeout 60 s. */
void svc_worker_config_default(svc_worker_config_t *cfg);

typedef struct svc_worker_s svc_worker_t;

/* Returns 0, or a negative service code (RESOURCE: out of memory;
 * BAD_PARAMS: an invalid configuration) with svc_last_error() set. */
int svc_worker_create(const svc_worker_config_t *cfg, svc_worker_t **out);
void svc_worker_destroy(svc_worker_t *w);

/* Decodes and runs one request whose frame body is body[0..len) and
 * returns its reply frame (header included, malloc'ed, the caller frees it)
 * in *reply. *close_after is set when the connection must be closed after
 * the reply (a fatal error or bye). Returns a negative code only when not
 * even an error reply could be encoded (out of memory); the caller then
 * closes. */
int svc_worker_handle(svc_worker_t *w, const uint8_t *body, size_t len,
                      uint8_t **reply, size_t *reply_len, int *close_after);

/* ------------------------------------------------------------------ */
/* syncbatchnorm across ranks.
 *
 * A training forward or backward of a syncbatchnorm layer computes its
 * local records and then waits: the request is deferred (see
 * svc_worker_handle_async) until every rank has submitted the same
 * (layer name, step, direction). The program drives the agreement by
 * calling svc_worker_poll() from its event loop: at once after a request
 * was deferred, continuously while svc_worker_busy(), and every cycle
 * otherwise. A round starts when this rank has a new entry (it rings the
 * others' doorbells, bell_send) or a doorbell of the current epoch came
 * (bell_poll); the worker then runs one non-blocking collective at a time
 * on the job's communicator: an OR of the bit sets over the cached slots
 * (iallreduce_bor_begin), an allgather of the lists of uncached entries
 * (iallgather_begin) when some rank has one, and, when some entries are
 * ready on all ranks of their group, one fused allreduce of all their
 * records (iallreduce_begin), each polled with iallreduce_test and
 * finished with iallreduce_end. Every rank computes the same decisions
 * from the same reduced bytes, so the sequence of collectives is the same
 * on every rank, and every round ends on every rank with the same epoch. */

/* Called with a deferred request's reply frame, possibly in pieces (see
 * svc_frame_t): its contents pass to the callee, which frees them with
 * svc_frame_free once written. */
typedef void (*svc_deliver_fn)(void *ctx, void *token, svc_frame_t *reply);

/* Enables syncbatchnorm training (without it, such requests are NOT_YET)
 * over comm, whose size is the job's and which must outlive the worker;
 * it needs the non-blocking entries (iallgather_begin, iallreduce_begin,
 * iallreduce_bor_begin, _test, _end) and, for more than one rank, the
 * doorbell (bell_send, bell_poll). Returns 0, or -SVC_BAD_PARAMS when they
 * are missing.
 * stall_timeout: seconds after which an entry that some ranks submitted
 * and others did not fails with STALL on every rank. */
int svc_worker_set_sync(svc_worker_t *w, sbn_comm_t *comm, double stall_timeout,
                        svc_deliver_fn deliver, void *deliver_ctx);

/* As svc_worker_handle, but a request that must wait for the other ranks
 * sets *deferred and no reply: it comes later through the deliver
 * callback with the same token (the connection). */
int svc_worker_handle_async(svc_worker_t *w, const uint8_t *body, size_t len,
                            void *token, uint8_t **reply, size_t *reply_len,
                            int *close_after, int *deferred);

/* As svc_worker_handle_async, with the reply as a frame in pieces: a
 * full-tensor forward or backward leaves y or dx in the buffer the kernel
 * wrote (the frame's tail) for the server to write with writev. The
 * frame's contents are the caller's. */
int svc_worker_handle_frame(svc_worker_t *w, const uint8_t *body, size_t len,
                            void *token, svc_frame_t *reply, int *close_after,
                            int *deferred);

/* The connection `token` is gone: its deferred requests are not answered,
 * and those not yet negotiated are withdrawn. */
void svc_worker_cancel(svc_worker_t *w, void *token);

/* Advances the cross-rank agreement; now is in seconds (monotonic).
 * Returns 0, or a negative code when the transport failed or the ranks no
 * longer agree (the worker cannot go on; svc_last_error() says why). */
int svc_worker_poll(svc_worker_t *w, double now);

/* Draining the agreement so that the ranks can leave through
 * MPI_Finalize with no collective in flight (svc_drain.c). The ranks run
 * their agreement rounds in lockstep, so the ones that have started fewer
 * rounds than the most advanced are at most one behind. A rank holds
 * (svc_worker_hold(w, svc_worker_rounds(w))), the ranks agree on the
 * largest count M, each holds at M, and polls until svc_worker_drained:
 * round M is then complete everywhere and nothing is in flight. */
uint64_t svc_worker_rounds(const svc_worker_t *w);
void svc_worker_hold(svc_worker_t *w, uint64_t last_round);
int svc_worker_drained(const svc_worker_t *w);
/* Whether the engine wants to be polled again at once rather than at the
 * next cycle: a collective is in flight, a doorbell or a new entry waits
 * to start a round, or an entry arrived in the last few milliseconds
 * (another rank's doorbell for it is expected soon). An idle worker is
 * not busy and runs no collective at all. */
int svc_worker_busy(const svc_worker_t *w);

/* Debug counters: fused allreduces issued and entries they carried. */
void svc_worker_sync_counters(const svc_worker_t *w, uint64_t *allreduces,
                              uint64_t *entries);

/* Events only the server sees, for the metrics reply: frames and bytes
 * read and written (headers included), an error the server sends itself
 * (a refused frame, a timeout, too many clients, a foreign uid, a failed
 * TCP authentication), and an accepted connection. */
void svc_worker_note_io(svc_worker_t *w, uint64_t frames_in, uint64_t bytes_in,
                        uint64_t frames_out, uint64_t bytes_out);
void svc_worker_note_refusal(svc_worker_t *w, svc_code_t code);
void svc_worker_note_connection(svc_worker_t *w);
/* A connection the server shed because the bytes it held for all clients
 * passed its memory budget. */
void svc_worker_note_shed(svc_worker_t *w);
/* A connection closed (after bye, an error, a timeout or the client's
 * going): for the log. */
void svc_worker_note_leave(svc_worker_t *w);

/* Directory of checkpoint files (checkpoint_save/checkpoint_load); they
 * are refused until it is set. Returns 0, or -SVC_BAD_PARAMS when it is
 * empty or too long. */
int svc_worker_set_state_dir(svc_worker_t *w, const char *dir);

/* The shared-memory regions (svc_shm.h) of the connection whose request
 * the next svc_worker_handle_async runs, or NULL where shared memory is
 * not offered (TCP). The table stays the caller's. */
struct svc_shm_s;
void svc_worker_set_shm(svc_worker_t *w, struct svc_shm_s *t);
/* Called when the connection whose regions t holds closes, before they are
 * unmapped: every kept step whose x the client left in one of them
 * (x_stays) gets its own copy, so that its backward (from any connection,
 * or a pending syncbatchnorm forward) still reads the forward's bytes. */
void svc_worker_shm_gone(svc_worker_t *w, const struct svc_shm_s *t);

/* Bytes of forward state currently kept (for tests and metrics). */
uint64_t svc_worker_saved_bytes(const svc_worker_t *w);

#endif /* SBN_SVC_WORKER_H */
