/* The worker's front door (see svc_worker.h): its life cycle, the command
 * table and the dispatch of one request, a batch's sub-requests included,
 * and the events the server reports for the metrics. */
#include "svc_worker.h"

#include <stdlib.h>
#include <string.h>

#include "svc_obs.h"
#include "svc_worker_int.h"

static int svc__cmd_batch(svc__call_t *call);

/* One row per op, in svc_op_t order: the wire name (as svc_op_name), the
 * handler, and whether it may answer later or run inside a batch. */
const svc__cmd_t svc__cmds[SVC_OP_COUNT] = {
    [SVC_OP_HELLO] = {"hello", svc__cmd_hello, 0},
    [SVC_OP_REGISTER] = {"register", svc__cmd_register, 0},
    [SVC_OP_FORWARD] = {"forward", svc__cmd_forward,
                        SVC__CMD_DEFERS | SVC__CMD_IN_BATCH},
    [SVC_OP_BACKWARD] = {"backward", svc__cmd_backward,
                         SVC__CMD_DEFERS | SVC__CMD_IN_BATCH},
    [SVC_OP_BYE] = {"bye", svc__cmd_bye, 0},
    [SVC_OP_BATCH] = {"batch", svc__cmd_batch, SVC__CMD_DEFERS},
    [SVC_OP_STATS] = {"stats", svc__cmd_stats,
                      SVC__CMD_DEFERS | SVC__CMD_IN_BATCH},
    [SVC_OP_STATS_BACKWARD] = {"stats_backward", svc__cmd_stats,
                               SVC__CMD_DEFERS | SVC__CMD_IN_BATCH},
    [SVC_OP_GET_STATE] = {"get_state", svc__cmd_get_state, 0},
    [SVC_OP_SET_STATE] = {"set_state", svc__cmd_set_state, 0},
    [SVC_OP_CHECKPOINT_SAVE] = {"checkpoint_save", svc__cmd_checkpoint,
                                SVC__CMD_DEFERS},
    [SVC_OP_CHECKPOINT_LOAD] = {"checkpoint_load", svc__cmd_checkpoint,
                                SVC__CMD_DEFERS},
    [SVC_OP_SHM_ATTACH] = {"shm_attach", svc__cmd_shm_attach, 0},
    [SVC_OP_METRICS] = {"metrics", svc__cmd_metrics, 0},
};

void svc_worker_config_default(svc_worker_config_t *cfg) {
  memset(cfg, 0, sizeof *cfg);
  cfg->rank = 0;
  cfg->size = 1;
  cfg->keep_steps = 2;
  cfg->max_layers = 1024;
  cfg->max_saved = (uint64_t)4 << 30;
  cfg->cache_slots = 512;
  cfg->speculate = 1;
  svc_limits_default(&cfg->limits);
  cfg->max_clients = 64;
  cfg->max_output = (uint64_t)512 << 20;
  cfg->idle_timeout = 300;
  cfg->frame_timeout = 60;
}

int svc_worker_create(const svc_worker_config_t *cfg, svc_worker_t **out) {
  svc_worker_t *w = NULL;
  *out = NULL;
  if (cfg->max_layers == 0 || cfg->rank < 0)
    return svc_set_error(SVC_BAD_PARAMS, "config: rank %d, max_layers %u",
                         cfg->rank, cfg->max_layers);
  if (cfg->cache_slots == 0 || cfg->cache_slots > SVC_CACHE_SLOTS_MAX)
    return svc_set_error(SVC_BAD_PARAMS,
                         "config: cache_slots %u, expected 1 to %d",
                         cfg->cache_slots, SVC_CACHE_SLOTS_MAX);
  if ((w = calloc(1, sizeof *w)) == NULL)
    goto fail;
  w->cfg = *cfg;
  sbn_comm_local_init(&w->comm, cfg->rank);
  if ((w->layers = calloc(cfg->max_layers, sizeof *w->layers)) == NULL)
    goto fail;
  *out = w;
  return 0;
fail:
  free(w);
  return svc_set_error(SVC_RESOURCE, "worker: out of memory");
}

void svc_worker_destroy(svc_worker_t *w) {
  if (w == NULL)
    return;
  svc__agree_destroy(w);
  for (uint32_t i = 0; i < w->nlayers; i++)
    svc__layer_free(w, w->layers[i]);
  free(w->layers);
  free(w);
}

uint64_t svc_worker_saved_bytes(const svc_worker_t *w) {
  return w->saved_bytes;
}

int svc__dispatch(svc__call_t *call) {
  svc_op_t op = call->q->op;
  const svc__cmd_t *c;
  if ((size_t)op >= SVC_OP_COUNT || svc__cmds[op].fn == NULL)
    return svc_set_error(SVC_BAD_REQUEST, "op: %d is not a command", (int)op);
  c = &svc__cmds[op];
  if (call->batch != NULL && !(c->flags & SVC__CMD_IN_BATCH))
    return svc_set_error(SVC_BAD_REQUEST, "op: %s is not allowed in a batch",
                         c->name);
  call->w->m.requests[op]++;
  svc_log(SVC_LOG_DEBUG, NULL, -1, "request %s", c->name);
  return c->fn(call);
}

/* Encodes the error reply of a failed call (rc < 0) into call->out.buf,
 * counting it; returns 0, or RESOURCE when not even that could be built. */
static int svc__error_reply(svc__call_t *call, const svc_id_t *id, int rc) {
  svc_code_t code = svc_code_of(rc);
  call->w->m.errors[code]++;
  if (svc_code_fatal(code))
    call->close_after = 1;
  call->deferred = 0;
  if (svc_encode_error(id, code, svc_last_error(), &call->out.buf,
                       &call->out.len) != 0)
    return svc_set_error(SVC_RESOURCE, "reply: out of memory");
  return 0;
}

/* A batch: its sub-requests run one after another, exactly as if each had
 * come in its own frame, but every cross-rank entry among them is queued
 * before the next agreement round, so they are negotiated together and,
 * being ready on every rank at once, reduced in one fused allreduce in
 * key order: the fusion does not depend on timing. The reply lists the
 * sub-replies in request order, errors included. */
static int svc__cmd_batch(svc__call_t *call) {
  svc_worker_t *w = call->w;
  const svc_request_t *q = call->q;
  svc__batch_t *b = calloc(1, sizeof *b);
  int rc;
  if (b == NULL || (b->reply = calloc(q->nsub, sizeof *b->reply)) == NULL ||
      (b->len = calloc(q->nsub, sizeof *b->len)) == NULL) {
    if (b != NULL)
      svc__batch_free(b);
    return svc_set_error(SVC_RESOURCE, "batch: out of memory");
  }
  b->id = q->id;
  b->token = call->token;
  b->n = q->nsub;
  /* One extra count keeps the batch alive while its sub-requests run,
   * even when a deferred one completes before the loop ends. */
  b->left = q->nsub + 1;
  for (size_t i = 0; i < q->nsub; i++) {
    svc__call_t sub;
    memset(&sub, 0, sizeof sub);
    sub.w = w;
    sub.q = &q->sub[i];
    sub.token = call->token;
    sub.batch = b;
    sub.slot = i;
    if ((rc = svc__dispatch(&sub)) != 0)
      svc__error_reply(&sub, &q->sub[i].id, rc);
    if (!sub.deferred)
      svc__batch_fill(w, b, i, &sub.out);
  }
  if (b->left > 1) {
    /* The last deferred sub-reply sends the batch through deliver. */
    b->left--;
    call->deferred = 1;
    return 0;
  }
  /* Everything was answered at once: the reply goes back directly. */
  rc = svc_encode_batch(&b->id, b->reply, b->len, b->n, &call->out.buf,
                        &call->out.len);
  b->left = 0;
  svc__batch_free(b);
  if (rc != 0)
    return svc_set_error(SVC_RESOURCE, "batch: out of memory");
  return 0;
}

/* Counts the tensor copies a decoded request made: x (or dy) out of the
 * frame into its aligned buffer, one per tensor-carrying request of a
 * batch too. A region's copy is counted where it is made. */
static void svc__count_copy_in(svc_worker_t *w, const svc_request_t *q) {
  if (q->x.present && !q->x.shm && q->x.numel > 0)
    w->m.tensor_copies++;
  for (size_t i = 0; i < q->nsub; i++)
    svc__count_copy_in(w, &q->sub[i]);
}

int svc_worker_handle_frame(svc_worker_t *w, const uint8_t *body, size_t len,
                            void *token, svc_frame_t *reply, int *close_after,
                            int *deferred) {
  svc_request_t q;
  svc__call_t call;
  int rc;
  memset(&call, 0, sizeof call);
  call.w = w;
  call.q = &q;
  call.token = token;
  if ((rc = svc_decode_request(body, len, &w->cfg.limits, &q)) == 0) {
    svc__count_copy_in(w, &q);
    rc = svc__shm_resolve(w, &q);
    if (rc == 0)
      rc = svc__dispatch(&call);
    svc_request_free(&q);
  }
  if (rc != 0) {
    svc_frame_free(&call.out);
    rc = svc__error_reply(&call, &q.id, rc);
  }
  *reply = call.out;
  *close_after = call.close_after;
  *deferred = call.deferred;
  return rc;
}

int svc_worker_handle_async(svc_worker_t *w, const uint8_t *body, size_t len,
                            void *token, uint8_t **reply, size_t *reply_len,
                            int *close_after, int *deferred) {
  svc_frame_t f;
  int rc =
      svc_worker_handle_frame(w, body, len, token, &f, close_after, deferred);
  if (f.tail != NULL)
    w->m.tensor_copies++;
  if (svc_frame_flatten(&f) != 0 && rc == 0)
    rc = -SVC_RESOURCE;
  *reply = f.buf;
  *reply_len = f.len;
  return rc;
}

int svc_worker_handle(svc_worker_t *w, const uint8_t *body, size_t len,
                      uint8_t **reply, size_t *reply_len, int *close_after) {
  int deferred = 0;
  return svc_worker_handle_async(w, body, len, NULL, reply, reply_len,
                                 close_after, &deferred);
}

/* ------------------------------------------------------------------ */
/* Events the server reports, and settings */

void svc_worker_note_io(svc_worker_t *w, uint64_t frames_in, uint64_t bytes_in,
                        uint64_t frames_out, uint64_t bytes_out) {
  w->m.frames_in += frames_in;
  w->m.bytes_in += bytes_in;
  w->m.frames_out += frames_out;
  w->m.bytes_out += bytes_out;
}

void svc_worker_note_refusal(svc_worker_t *w, svc_code_t code) {
  if (code > SVC_OK && code < SVC_CODE_COUNT)
    w->m.errors[code]++;
  if (code == SVC_UNAUTHORIZED)
    w->m.auth_failures++;
  svc_log(code == SVC_UNAUTHORIZED ? SVC_LOG_WARN : SVC_LOG_INFO, NULL, -1,
          "client refused: %s", svc_code_name(code));
}

void svc_worker_note_leave(svc_worker_t *w) {
  (void)w;
  svc_log(SVC_LOG_INFO, NULL, -1, "client disconnected");
}

void svc_worker_note_connection(svc_worker_t *w) {
  w->m.connections++;
  svc_log(SVC_LOG_INFO, NULL, -1, "client connected (%llu so far)",
          (unsigned long long)w->m.connections);
}

void svc_worker_note_shed(svc_worker_t *w) {
  w->m.shed++;
}

int svc_worker_set_state_dir(svc_worker_t *w, const char *dir) {
  size_t n = strlen(dir);
  while (n > 1 && dir[n - 1] == '/')
    n--;
  if (n == 0 || n >= sizeof w->state_dir)
    return svc_set_error(SVC_BAD_PARAMS,
                         "state_dir: empty or longer than %zu bytes",
                         sizeof w->state_dir - 1);
  memcpy(w->state_dir, dir, n);
  w->state_dir[n] = '\0';
  /* Rank 0 is the only writer of checkpoints, so the temporaries a kill
   * during checkpoint_save left are its own. */
  if (w->cfg.rank == 0)
    svc__ckpt_sweep(w);
  return 0;
}

int svc_worker_set_sync(svc_worker_t *w, sbn_comm_t *comm, double stall_timeout,
                        svc_deliver_fn deliver, void *deliver_ctx) {
  const sbn_comm_vtable_t *vt = comm != NULL ? comm->vt : NULL;
  if (vt == NULL || vt->iallgather_begin == NULL ||
      vt->iallreduce_begin == NULL || vt->iallreduce_test == NULL ||
      vt->iallreduce_end == NULL || vt->iallreduce_bor_begin == NULL)
    return svc_set_error(SVC_BAD_PARAMS,
                         "comm: the communicator lacks the non-blocking "
                         "allgather or allreduce");
  /* Idle ranks learn of work only by their doorbells. */
  if (comm->size > 1 && (vt->bell_send == NULL || vt->bell_poll == NULL))
    return svc_set_error(SVC_BAD_PARAMS,
                         "comm: the communicator lacks the doorbell "
                         "(bell_send, bell_poll)");
  if (comm->size != w->cfg.size)
    return svc_set_error(SVC_BAD_PARAMS,
                         "comm: %d processes, the job has %d ranks", comm->size,
                         w->cfg.size);
  w->sync = comm;
  w->sync_on = 1;
  w->stall_timeout = stall_timeout;
  w->deliver = deliver;
  w->deliver_ctx = deliver_ctx;
  return 0;
}

void svc_worker_sync_counters(const svc_worker_t *w, uint64_t *allreduces,
                              uint64_t *entries) {
  *allreduces = w->m.allreduces;
  *entries = w->m.entries_fused;
}
