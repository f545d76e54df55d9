/* The syncbnd server (see svc_server.h). */
#define _GNU_SOURCE /* struct ucred for SO_PEERCRED, explicit_bzero */
#include "svc_server.h"

#include "svc_io.h"
#include "svc_server_int.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

/* 1 if the offered token equals the server's. Both sit zero-padded in
 * SVC_TOKEN_MAX-byte buffers and every byte is compared, with the
 * differences OR-ed together, so that the time taken says nothing about
 * where the first difference is or how long the right token is. */
static int svc__token_equal(const svc_server_t *s, const uint8_t *tok,
                            size_t len) {
  uint8_t offered[SVC_TOKEN_MAX];
  volatile uint8_t diff = 0;
  size_t i;
  memset(offered, 0, sizeof offered);
  if (len > SVC_TOKEN_MAX)
    return 0;
  memcpy(offered, tok, len);
  for (i = 0; i < SVC_TOKEN_MAX; i++)
    diff |= (uint8_t)(offered[i] ^ s->token[i]);
  diff |= (uint8_t)((len ^ s->token_len) != 0);
  explicit_bzero(offered, sizeof offered);
  return diff == 0;
}

/* The first frame of a TCP connection must be a hello with the token.
 * Returns 0 when it is (the connection is then authenticated and the hello
 * goes on to the worker), else replies UNAUTHORIZED and returns -1. The
 * reply says which rule failed but nothing about the token itself. */
static int svc__authenticate(svc__conn_t *c, const uint8_t *body, size_t len) {
  svc_server_t *s = c->srv;
  svc_request_t *req;
  const char *why = NULL;
  svc_id_t id;
  /* A request holds a token buffer; it goes on the heap rather than on
   * the loop's stack. */
  req = malloc(sizeof *req);
  if (req == NULL) {
    svc__fail_conn(c, SVC_RESOURCE, "connection: out of memory");
    return -SVC_RESOURCE;
  }
  if (svc_decode_request(body, len, &s->cfg.limits, req) != 0) {
    id = req->id;
    why =
        "authentication: the first request on a TCP connection must be a "
        "well-formed hello with the token";
  } else {
    id = req->id;
    if (req->op != SVC_OP_HELLO)
      why =
          "authentication: the first request on a TCP connection must be "
          "hello with the token";
    else if (!req->has_token)
      why = "authentication: hello without a token (TCP requires one)";
    else if (!svc__token_equal(s, req->token, req->token_len))
      why = "authentication: wrong token";
    explicit_bzero(req->token, sizeof req->token);
    svc_request_free(req);
  }
  free(req);
  if (why != NULL) {
    svc__fail_conn_id(c, &id, SVC_UNAUTHORIZED, why);
    return -SVC_UNAUTHORIZED;
  }
  return svc__admit_authed(c, &id);
}

static void svc__on_timer(uv_timer_t *t) {
  svc__conn_t *c = t->data;
  if (!c->authed) {
    svc__fail_conn(c, SVC_TIMEOUT,
                   "connection: no hello with the token within the "
                   "authentication deadline");
    return;
  }
  svc__fail_conn(c, SVC_TIMEOUT,
                 c->in_frame ? "frame: not completed within frame_timeout"
                             : "connection: idle for idle_timeout");
}

/* Seconds an unauthenticated TCP connection may hold a client slot: one
 * deadline from the accept, not re-armed by partial frames, so that
 * nobody without the token can keep max_clients slots busy for the idle
 * timeout. */
static double svc__auth_deadline(const svc_server_t *s) {
  double d = SVC_AUTH_TIMEOUT;
  if (s->cfg.frame_timeout > 0 && s->cfg.frame_timeout < d)
    d = s->cfg.frame_timeout;
  return d;
}

static void svc__arm(svc__conn_t *c, double seconds) {
  uv_timer_stop(&c->timer);
  if (seconds > 0)
    uv_timer_start(&c->timer, svc__on_timer, (uint64_t)(seconds * 1000.0), 0);
}

static void svc__frame_done(svc__conn_t *c) {
  svc_frame_t reply;
  int close_after = 0, deferred = 0, rc;
  memset(&reply, 0, sizeof reply);
  svc_worker_note_io(c->srv->worker, 1, 0, 0, 0);
  if (!c->authed && svc__authenticate(c, c->body, c->body_len) != 0)
    rc = 1;
  else {
    svc__shm_enter(c);
    rc = svc_worker_handle_frame(c->srv->worker, c->body, c->body_len, c,
                                 &reply, &close_after, &deferred);
    svc_worker_set_shm(c->srv->worker, NULL);
  }
  free(c->body);
  c->body = NULL;
  c->body_len = c->body_have = 0;
  c->hdr_have = 0;
  c->in_frame = 0;
  if (rc > 0)
    return; /* refused and closing */
  svc__account(c);
  if (rc != 0) {
    svc_frame_free(&reply);
    svc__conn_close(c);
    return;
  }
  if (deferred) {
    /* Replies go in request order, so later requests wait (stashed)
     * until the other ranks have answered this one; no idle timeout
     * meanwhile. */
    c->pending = 1;
    uv_timer_stop(&c->timer);
    svc__spin_kick(&c->srv->spin); /* a new entry starts a round at once */
    return;
  }
  if (close_after) {
    c->close_after = 1;
    uv_read_stop(&c->h.stream);
    uv_timer_stop(&c->timer);
  } else {
    svc__arm(c, c->srv->cfg.idle_timeout);
    svc__adm_idle(&c->adm, 1, svc__now(c->srv));
  }
  svc__send_frame(c, &reply);
  svc__spin_poll(&c->srv->spin);
  if (c->close_after && !c->closing && c->writes == 0)
    svc__conn_close(c);
}

static void svc__alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf) {
  svc__conn_t *c = h->data;
  (void)hint;
  if (svc__io_direct(c->body, c->body_len, c->body_have, c->pending,
                     SVC__READ_BUF, buf))
    return;
  *buf = uv_buf_init(c->srv->rbuf, sizeof c->srv->rbuf);
}

static void svc__feed(svc__conn_t *c, const uint8_t *p, size_t n);

static void svc__on_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf) {
  svc__conn_t *c = st->data;
  const uint8_t *p = (const uint8_t *)buf->base;
  size_t n;
  if (nread < 0) {
    /* EOF or an error, possibly mid-frame (a killed client): the partial
     * frame is dropped with the connection. */
    svc__conn_close(c);
    return;
  }
  n = (size_t)nread;
  svc_worker_note_io(c->srv->worker, 0, n, 0, 0);
  if (svc__shm_take_fds(c) != 0) {
    svc__fail_conn(c, SVC_RESOURCE,
                   "shm: more file descriptors arrived than the worker holds "
                   "unattached (at most 4 shm_attach in flight)");
    return;
  }
  if (c->body != NULL && p == c->body + c->body_have && n > 0) {
    c->body_have += (uint32_t)n; /* read in place (svc__io_direct) */
    if (c->body_have == c->body_len)
      svc__frame_done(c);
    return;
  }
  svc__feed(c, p, n);
}

/* Frames the bytes p[0..n); stops and keeps the rest when a request is
 * deferred. */
static void svc__feed(svc__conn_t *c, const uint8_t *p, size_t n) {
  while (n > 0 && !c->closing && !c->close_after) {
    if (c->pending) {
      /* Reading goes on while a reply is deferred, so that a client that
       * leaves is noticed (its entry is withdrawn); what it sends meanwhile
       * waits here, up to one frame's worth. */
      uint8_t *st = realloc(c->stash, c->stash_len + n);
      if (st == NULL) {
        svc__conn_close(c);
        return;
      }
      memcpy(st + c->stash_len, p, n);
      c->stash = st;
      c->stash_len += n;
      svc__account(c);
      if (c->closing || c->close_after)
        return;
      if (c->stash_len >
          (size_t)c->srv->cfg.limits.max_frame + SVC_HEADER_BYTES)
        uv_read_stop(&c->h.stream);
      return;
    }
    if (!c->in_frame) {
      c->in_frame = 1;
      svc__adm_idle(&c->adm, 0, 0);
      if (c->authed)
        svc__arm(c, c->srv->cfg.frame_timeout);
    }
    if (c->body == NULL) {
      size_t take = SVC_HEADER_BYTES - c->hdr_have;
      int rc;
      if (take > n)
        take = n;
      memcpy(c->hdr + c->hdr_have, p, take);
      c->hdr_have += take;
      p += take;
      n -= take;
      if (c->hdr_have < SVC_HEADER_BYTES)
        break;
      /* The length is checked before a single body byte is buffered. */
      if ((rc = svc_frame_len(c->hdr, &c->srv->cfg.limits, &c->body_len)) !=
          0) {
        svc__fail_conn(c, svc_code_of(rc), svc_last_error());
        return;
      }
      if (!c->authed && c->body_len > SVC_PREAUTH_FRAME_MAX) {
        char m[128];
        snprintf(m, sizeof m,
                 "frame: %u bytes before authentication; at most %d until "
                 "a hello with the token",
                 (unsigned)c->body_len, SVC_PREAUTH_FRAME_MAX);
        svc__fail_conn(c, SVC_FRAME_TOO_LARGE, m);
        return;
      }
      c->body = malloc(c->body_len);
      if (c->body == NULL) {
        svc__fail_conn(c, SVC_RESOURCE, "frame: out of memory");
        return;
      }
      c->body_have = 0;
      svc__account(c);
    } else {
      size_t take = c->body_len - c->body_have;
      if (take > n)
        take = n;
      memcpy(c->body + c->body_have, p, take);
      c->body_have += (uint32_t)take;
      p += take;
      n -= take;
      if (c->body_have == c->body_len)
        svc__frame_done(c);
    }
  }
}

void svc_server_deliver(void *ctx, void *token, svc_frame_t *reply) {
  svc__conn_t *c = token;
  uint8_t *st;
  size_t n;
  (void)ctx;
  if (!c->pending || c->closing) {
    svc_frame_free(reply);
    return;
  }
  c->pending = 0;
  svc__adm_idle(&c->adm, 1, svc__now(c->srv));
  svc__send_frame(c, reply);
  svc__spin_poll(&c->srv->spin);
  if (c->closing)
    return;
  svc__arm(c, c->srv->cfg.idle_timeout);
  st = c->stash;
  n = c->stash_len;
  c->stash = NULL;
  c->stash_len = 0;
  if (st != NULL) {
    svc__feed(c, st, n);
    free(st);
  }
  if (!c->closing && !c->close_after) {
    /* Reading was stopped only if the stash filled up. */
    int rc = uv_read_start(&c->h.stream, svc__alloc, svc__on_read);
    if (rc != 0 && rc != UV_EALREADY)
      svc__conn_close(c);
  }
}

static void svc__on_connection(uv_stream_t *ls, int status) {
  svc_server_t *s = ls->data;
  svc__conn_t *c;
  struct ucred cred;
  socklen_t clen = sizeof cred;
  uv_os_fd_t fd;
  int tcp = ls == (uv_stream_t *)&s->tcp_listener, rc;
  if (status < 0 || s->stopping)
    return;
  c = calloc(1, sizeof *c);
  if (c == NULL)
    return;
  c->srv = s;
  c->tcp = tcp;
  c->authed = !tcp;
  rc = tcp ? uv_tcp_init(&s->loop, &c->h.tcp)
           : uv_pipe_init(&s->loop, &c->h.pipe, 1); /* ipc: svc_shm.c */
  if (rc != 0) {
    free(c);
    return;
  }
  c->h.handle.data = c;
  c->timer.data = c;
  uv_timer_init(&s->loop, &c->timer);
  c->handles = 2;
  c->next = s->conns;
  if (s->conns != NULL)
    s->conns->prev = c;
  s->conns = c;
  s->nconns++;
  if (uv_accept(ls, &c->h.stream) != 0) {
    svc__conn_close(c);
    return;
  }
  svc_worker_note_connection(s->worker);
  /* Replies are whole frames written at once; Nagle's algorithm would
   * only hold back the last segment of each. */
  if (tcp)
    uv_tcp_nodelay(&c->h.tcp, 1);
  /* A TCP peer has no uid to check: the token in its hello stands in. */
  if (!tcp && (uv_fileno(&c->h.handle, &fd) != 0 ||
               getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &clen) != 0 ||
               cred.uid != geteuid())) {
    svc__fail_conn(c, SVC_FORBIDDEN,
                   "connection: the worker serves only its own user");
    return;
  }
  if (svc__admit(c) != 0)
    return;
  svc__io_big_buffers(&c->h.handle);
  svc__arm(c, c->authed ? s->cfg.idle_timeout : svc__auth_deadline(s));
  if (uv_read_start(&c->h.stream, svc__alloc, svc__on_read) != 0)
    svc__conn_close(c);
}

/* ------------------------------------------------------------------ */
/* Server */

static void svc__shutdown(svc_server_t *s) {
  if (s->stopping)
    return;
  s->stopping = 1;
  for (svc__conn_t *c = s->conns; c != NULL; c = c->next)
    svc__say_shutdown(c, s->stop_signal);
  while (s->conns != NULL)
    svc__conn_close(s->conns);
  if (s->ticking) {
    uv_close((uv_handle_t *)&s->tick, NULL);
    svc__spin_close(&s->spin);
    s->ticking = 0;
  }
  if (s->listening) {
    uv_close((uv_handle_t *)&s->listener, NULL);
    s->listening = 0;
  }
  if (s->tcp_listening) {
    uv_close((uv_handle_t *)&s->tcp_listener, NULL);
    s->tcp_listening = 0;
  }
  if (s->signals) {
    uv_close((uv_handle_t *)&s->sigint, NULL);
    uv_close((uv_handle_t *)&s->sigterm, NULL);
    s->signals = 0;
  }
}

static void svc__on_signal(uv_signal_t *h, int signum) {
  svc_server_t *s = h->data;
  s->stop_signal = signum;
  svc__shutdown(s);
}

static int svc__is_loopback(const struct sockaddr *sa) {
  if (sa->sa_family == AF_INET) {
    const struct sockaddr_in *in = (const struct sockaddr_in *)sa;
    return (ntohl(in->sin_addr.s_addr) >> 24) == 127;
  }
  if (sa->sa_family == AF_INET6) {
    const struct in6_addr *a = &((const struct sockaddr_in6 *)sa)->sin6_addr;
    return IN6_IS_ADDR_LOOPBACK(a) ||
           (IN6_IS_ADDR_V4MAPPED(a) && a->s6_addr[12] == 127);
  }
  return 0;
}

/* Resolves host (a literal or a name) and listens on the first address
 * that binds. */
static int svc__tcp_listen(svc_server_t *s) {
  struct addrinfo hints, *res = NULL, *ai;
  struct sockaddr_storage bound;
  int namelen = (int)sizeof bound;
  char port[8];
  int rc = UV_EINVAL, gai;
  memset(&hints, 0, sizeof hints);
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  snprintf(port, sizeof port, "%u", (unsigned)s->cfg.tcp_port);
  gai = getaddrinfo(s->cfg.tcp_host, port, &hints, &res);
  if (gai != 0) {
    return svc_set_error(SVC_BAD_PARAMS, "tcp %s: cannot resolve: %s",
                         s->cfg.tcp_host, gai_strerror(gai));
  }
  for (ai = res; ai != NULL; ai = ai->ai_next) {
    if ((rc = uv_tcp_init(&s->loop, &s->tcp_listener)) != 0)
      break;
    s->tcp_listener.data = s;
    s->tcp_listening = 1;
    rc = uv_tcp_bind(&s->tcp_listener, ai->ai_addr, 0);
    if (rc == 0)
      rc = uv_listen((uv_stream_t *)&s->tcp_listener,
                     svc__backlog(s->cfg.backlog), svc__on_connection);
    if (rc == 0)
      break;
    /* The handle must be closed (and the loop run for its callback)
     * before it is initialized again for the next address. */
    uv_close((uv_handle_t *)&s->tcp_listener, NULL);
    s->tcp_listening = 0;
    uv_run(&s->loop, UV_RUN_NOWAIT);
  }
  freeaddrinfo(res);
  if (rc != 0) {
    return svc_set_error(SVC_BAD_PARAMS, "tcp %s port %u: %s", s->cfg.tcp_host,
                         (unsigned)s->cfg.tcp_port, uv_strerror(rc));
  }
  memset(&bound, 0, sizeof bound);
  if ((rc = uv_tcp_getsockname(&s->tcp_listener, (struct sockaddr *)&bound,
                               &namelen)) != 0) {
    return svc_set_error(SVC_BAD_PARAMS, "tcp %s: getsockname: %s",
                         s->cfg.tcp_host, uv_strerror(rc));
  }
  s->tcp_port = bound.ss_family == AF_INET6
                    ? ntohs(((struct sockaddr_in6 *)&bound)->sin6_port)
                    : ntohs(((struct sockaddr_in *)&bound)->sin_port);
  s->tcp_loopback = svc__is_loopback((struct sockaddr *)&bound);
  return 0;
}

int svc_server_tcp_info(const svc_server_t *s, int *port, int *loopback) {
  if (!s->tcp_listening)
    return svc_set_error(SVC_BAD_PARAMS, "tcp: the server has no listener");
  *port = s->tcp_port;
  *loopback = s->tcp_loopback;
  return 0;
}

int svc_server_create(const svc_server_config_t *cfg, svc_worker_t *worker,
                      svc_server_t **out) {
  svc_server_t *s = NULL;
  struct sockaddr_un a;
  int rc, err;
  *out = NULL;
  if (strlen(cfg->socket_path) >= sizeof a.sun_path) {
    return svc_set_error(SVC_BAD_PARAMS,
                         "socket %s: path longer than %zu bytes",
                         cfg->socket_path, sizeof a.sun_path - 1);
  }
  s = calloc(1, sizeof *s);
  if (s == NULL) {
    return svc_set_error(SVC_RESOURCE, "server: out of memory");
  }
  s->cfg = *cfg;
  s->cfg.token = NULL;
  s->worker = worker;
  svc__adm_init(&s->adm, cfg->max_clients, cfg->max_preauth,
                cfg->max_preauth_per_addr, cfg->max_memory);
  if (cfg->tcp_host != NULL) {
    if (cfg->token == NULL || cfg->token_len == 0 ||
        cfg->token_len > SVC_TOKEN_MAX) {
      err = svc_set_error(SVC_BAD_PARAMS,
                          "tcp: a token of 1 to %d bytes is required",
                          SVC_TOKEN_MAX);
      goto fail;
    }
    memcpy(s->token, cfg->token, cfg->token_len);
    s->token_len = cfg->token_len;
  }
  s->path = strdup(cfg->socket_path);
  if (s->path == NULL) {
    err = svc_set_error(SVC_RESOURCE, "server: out of memory");
    goto fail;
  }
  s->cfg.socket_path = s->path;
  if ((rc = uv_loop_init(&s->loop)) != 0) {
    err = svc_set_error(SVC_INTERNAL, "uv_loop_init: %s", uv_strerror(rc));
    goto fail;
  }
  s->loop_ok = 1;
  /* TCP first: trying the next address runs the loop to close the handle
   * that failed, and no other handle should be live then. */
  if (s->cfg.tcp_host != NULL && (err = svc__tcp_listen(s)) != 0)
    goto fail;
  if ((err = svc__socket_clear_stale(s->path)) != 0)
    goto fail;
  uv_pipe_init(&s->loop, &s->listener, 0);
  s->listener.data = s;
  s->listening = 1;
  if ((rc = uv_pipe_bind(&s->listener, s->path)) != 0) {
    err = svc_set_error(SVC_BAD_PARAMS, "socket %s: bind: %s", s->path,
                        uv_strerror(rc));
    goto fail;
  }
  s->bound = 1;
  /* The umask already keeps others out; chmod says so explicitly in case
   * the caller's umask was looser. */
  chmod(s->path, 0600);
  if ((rc = uv_listen((uv_stream_t *)&s->listener, svc__backlog(s->cfg.backlog),
                      svc__on_connection)) != 0) {
    err = svc_set_error(SVC_BAD_PARAMS, "socket %s: listen: %s", s->path,
                        uv_strerror(rc));
    goto fail;
  }
  uv_signal_init(&s->loop, &s->sigint);
  uv_signal_init(&s->loop, &s->sigterm);
  s->sigint.data = s->sigterm.data = s;
  s->signals = 1;
  uv_signal_start(&s->sigint, svc__on_signal, SIGINT);
  uv_signal_start(&s->sigterm, svc__on_signal, SIGTERM);
  *out = s;
  return 0;
fail:
  svc_server_destroy(s);
  return err;
}

static void svc__on_tick(uv_timer_t *t) {
  svc_server_t *s = t->data;
  svc__spin_kick(&s->spin);
}

int svc_server_set_tick(svc_server_t *s, uint64_t period_us,
                        void (*fn)(void *arg), void *arg) {
  uint64_t ms = (period_us + 999) / 1000;
  int rc;
  if (s->ticking)
    return svc_set_error(SVC_BAD_PARAMS, "tick: already set");
  s->tick_fn = fn;
  s->tick_arg = arg;
  uv_timer_init(&s->loop, &s->tick);
  svc__spin_init(&s->spin, &s->loop, s->worker, fn, arg);
  s->spin.poll_s = s->cfg.poll_us == 0  ? SVC_POLL_US_DEFAULT * 1e-6
                   : s->cfg.poll_us < 0 ? 0
                                        : (double)s->cfg.poll_us * 1e-6;
  s->tick.data = s;
  s->ticking = 1;
  if ((rc = uv_timer_start(&s->tick, svc__on_tick, ms, ms > 0 ? ms : 1)) != 0)
    return svc_set_error(SVC_INTERNAL, "tick: %s", uv_strerror(rc));
  return 0;
}

uv_loop_t *svc_server_loop(svc_server_t *s) {
  return &s->loop;
}

int svc_server_run(svc_server_t *s) {
  uv_run(&s->loop, UV_RUN_DEFAULT);
  return s->stop_signal;
}

void svc_server_stop(svc_server_t *s) {
  svc__shutdown(s);
}

void svc_server_destroy(svc_server_t *s) {
  if (s == NULL)
    return;
  if (s->loop_ok) {
    svc__shutdown(s);
    /* Let the close callbacks run so every connection is freed. */
    uv_run(&s->loop, UV_RUN_DEFAULT);
    uv_loop_close(&s->loop);
  }
  if (s->bound)
    unlink(s->path);
  free(s->path);
  explicit_bzero(s->token, sizeof s->token);
  free(s);
}
