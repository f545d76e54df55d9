/* A connection's life below the server loop (see svc_server_int.h): its
 * output (replies queued with one writev each), its closing, its
 * admission into a client slot (svc_admit.c decides), the memory budget
 * of all clients together, and the notice each client gets when the worker
 * stops. svc_server.c (the loop, frames, authentication) calls these;
 * nothing here calls back into it. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "svc_server_int.h"

/* ------------------------------------------------------------------ */
/* Output and closing */

static void svc__conn_closed(uv_handle_t *h) {
  svc__conn_t *c = h->data;
  if (--c->handles > 0)
    return;
  free(c->stash);
  free(c->body);
  svc_shm_release(&c->shm);
  free(c);
}

void svc__conn_close(svc__conn_t *c) {
  svc_server_t *s = c->srv;
  if (c->closing)
    return;
  c->closing = 1;
  if (c->prev != NULL)
    c->prev->next = c->next;
  else
    s->conns = c->next;
  if (c->next != NULL)
    c->next->prev = c->prev;
  s->nconns--;
  svc__adm_leave(&s->adm, &c->adm);
  svc_worker_note_leave(s->worker);
  /* A deferred request of this connection is never answered. */
  if (c->pending)
    svc_worker_cancel(s->worker, c);
  /* Steps that keep x in this connection's regions (x_stays) copy it out
   * while the regions are still mapped. */
  svc_worker_shm_gone(s->worker, &c->shm);
  c->pending = 0;
  /* Pending writes are cancelled by uv_close and their callbacks free
   * their buffers before the close callbacks free the connection. */
  uv_close(&c->h.handle, svc__conn_closed);
  uv_close((uv_handle_t *)&c->timer, svc__conn_closed);
}

static void svc__on_write(uv_write_t *req, int status) {
  svc__write_t *w = (svc__write_t *)req;
  svc__conn_t *c = req->handle->data;
  svc_frame_free(&w->frame);
  free(w);
  c->writes--;
  if (c->closing)
    return;
  if (status < 0 || (c->close_after && c->writes == 0))
    svc__conn_close(c);
  else
    svc__account(c);
}

/* Queues a frame (taking ownership of buf). A client whose unread replies
 * exceed max_output is dropped: it is not reading, and holding its replies
 * would let it grow the worker's memory without bound. */
void svc__send_frame(svc__conn_t *c, svc_frame_t *f) {
  svc__write_t *w;
  uv_buf_t b[3];
  unsigned nb = 0;
  size_t len = svc_frame_bytes(f);
  if (c->closing) {
    svc_frame_free(f);
    return;
  }
  w = malloc(sizeof *w);
  if (w == NULL) {
    svc_frame_free(f);
    svc__conn_close(c);
    return;
  }
  w->frame = *f;
  memset(f, 0, sizeof *f);
  f = &w->frame;
  /* The header and msgpack before the tensor, the tensor from its own
   * buffer, and the msgpack after it: one writev, no copy. */
  if (f->tail == NULL) {
    b[nb++] = uv_buf_init((char *)f->buf, (unsigned)f->len);
  } else {
    b[nb++] = uv_buf_init((char *)f->buf, (unsigned)f->at);
    b[nb++] = uv_buf_init(f->tail, (unsigned)f->tail_len);
    if (f->len > f->at)
      b[nb++] = uv_buf_init((char *)f->buf + f->at, (unsigned)(f->len - f->at));
  }
  if (uv_write(&w->req, &c->h.stream, b, nb, svc__on_write) != 0) {
    svc_frame_free(f);
    free(w);
    svc__conn_close(c);
    return;
  }
  c->writes++;
  svc_worker_note_io(c->srv->worker, 0, 0, 1, len);
  if (uv_stream_get_write_queue_size(&c->h.stream) > c->srv->cfg.max_output) {
    svc_worker_note_refusal(c->srv->worker, SVC_RESOURCE);
    svc__conn_close(c);
    return;
  }
  svc__account(c);
}

void svc__send(svc__conn_t *c, uint8_t *buf, size_t len) {
  svc_frame_t f;
  svc_frame_whole(&f, buf, len);
  svc__send_frame(c, &f);
}

/* Replies with a connection-level error that the server itself decided
 * (echoing id when not NULL) and closes after it. */
void svc__fail_conn_id(svc__conn_t *c, const svc_id_t *id, svc_code_t code,
                       const char *m) {
  uint8_t *buf;
  size_t len;
  c->close_after = 1;
  uv_read_stop(&c->h.stream);
  uv_timer_stop(&c->timer);
  svc_worker_note_refusal(c->srv->worker, code);
  if (svc_encode_error(id, code, m, &buf, &len) != 0) {
    svc__conn_close(c);
    return;
  }
  svc__send(c, buf, len);
  if (!c->closing && c->writes == 0)
    svc__conn_close(c);
}

void svc__fail_conn(svc__conn_t *c, svc_code_t code, const char *m) {
  svc__fail_conn_id(c, NULL, code, m);
}

/* ------------------------------------------------------------------ */
/* Limits */

/* A monotonic clock in seconds, fine enough to order clients whose
 * requests came in the same loop turn (uv_now is cached per turn). */
double svc__now(const svc_server_t *s) {
  (void)s;
  return (double)uv_hrtime() / 1e9;
}

/* Sheds c because the bytes held for all clients passed the budget: its
 * buffered input goes at once and it gets a RESOURCE error. A client with
 * replies still queued cannot get the error ahead of them, so it is closed
 * at once instead (its queue is what is freed). */
static void svc__shed(svc__conn_t *c) {
  svc_server_t *s = c->srv;
  char m[200];
  svc_worker_note_shed(s->worker);
  if (c->closing)
    return;
  if (c->close_after || c->writes > 0) {
    svc_worker_note_refusal(s->worker, SVC_RESOURCE);
    svc__conn_close(c);
    return;
  }
  snprintf(m, sizeof m,
           "memory: the buffers of all clients passed max_memory (%llu "
           "bytes) and this connection held the most (%llu)",
           (unsigned long long)s->adm.budget, (unsigned long long)c->adm.held);
  free(c->body);
  c->body = NULL;
  free(c->stash);
  c->stash = NULL;
  c->stash_len = 0;
  svc__adm_hold(&s->adm, &c->adm, 0);
  svc__fail_conn(c, SVC_RESOURCE, m);
}

/* Recounts the bytes the server holds for c (a frame being read, bytes
 * stashed behind a deferred request, replies queued) against the budget
 * of all connections, shedding the largest holder when it is passed. */
void svc__account(svc__conn_t *c) {
  svc_server_t *s = c->srv;
  uint64_t held;
  void *v;
  if (c->closing)
    return;
  held = (c->body != NULL ? c->body_len : 0) + c->stash_len +
         uv_stream_get_write_queue_size(&c->h.stream) + c->shm.mapped;
  if ((v = svc__adm_hold(&s->adm, &c->adm, held)) != NULL)
    svc__shed(v);
}

/* Closes the connection whose slot admission just reclaimed. */
static void svc__reclaim(void *victim) {
  svc__fail_conn((svc__conn_t *)victim, SVC_TIMEOUT,
                 "connection: idle the longest while the worker was full; "
                 "its slot went to a new client");
}

/* A TCP connection past its hello takes a client slot like a Unix one
 * (reclaiming the longest-idle one when all are held). */
int svc__admit_authed(svc__conn_t *c, const svc_id_t *id) {
  svc_server_t *s = c->srv;
  const char *why = NULL;
  void *victim = NULL;
  svc_code_t code =
      svc__adm_authed(&s->adm, &c->adm, svc__now(s), &victim, &why);
  if (code != SVC_OK) {
    svc__fail_conn_id(c, id, code, why);
    return -(int)code;
  }
  if (victim != NULL)
    svc__reclaim(victim);
  c->authed = 1;
  return 0;
}

/* Gives a new connection its place (svc_admit.c): a slot for a Unix one,
 * possibly reclaimed from the longest-idle client; a pre-authentication
 * place for a TCP one. Returns -1 when it is refused (and closing). */
int svc__admit(svc__conn_t *c) {
  svc_server_t *s = c->srv;
  struct sockaddr_storage peer;
  int plen = (int)sizeof peer;
  const char *why = NULL;
  void *victim = NULL;
  svc_code_t code;
  memset(&peer, 0, sizeof peer);
  if (c->tcp)
    uv_tcp_getpeername(&c->h.tcp, (struct sockaddr *)&peer, &plen);
  code = svc__adm_accept(&s->adm, &c->adm, c, c->tcp,
                         (const struct sockaddr *)&peer, svc__now(s), &victim,
                         &why);
  if (code != SVC_OK) {
    svc__fail_conn(c, code, why);
    return -1;
  }
  if (victim != NULL)
    svc__reclaim(victim);
  return 0;
}

/* Tells a client the worker is going, in one non-blocking write: the
 * frame goes out only when nothing else is queued on the connection (a
 * frame behind unsent bytes cannot be written out of order) and the socket
 * takes it now; the connection is closed right after either way. */
void svc__say_shutdown(svc__conn_t *c, int signum) {
  char m[96];
  uint8_t *buf = NULL;
  size_t len = 0;
  uv_buf_t b;
  if (c->closing || c->writes > 0)
    return;
  snprintf(m, sizeof m, "worker: shutting down (signal %d)", signum);
  if (svc_encode_error(NULL, SVC_SHUTDOWN, m, &buf, &len) != 0)
    return;
  b = uv_buf_init((char *)buf, (unsigned)len);
  if (uv_try_write(&c->h.stream, &b, 1) == (int)len)
    svc_worker_note_refusal(c->srv->worker, SVC_SHUTDOWN);
  free(buf);
}
