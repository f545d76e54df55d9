/* The server's limits that span connections (see svc_server_int.h):
 * admission of new connections into client slots (svc_admit.c decides),
 * the memory budget of all clients together, and the notice each client
 * gets when the worker stops. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "svc_server_int.h"

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
