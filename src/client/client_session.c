/* syncbn client: a request and its reply (sbn__call), hello, bye, and the
 * TCP connect that starts with an authenticating hello. Sits above the
 * connection code (client_conn.c) and the reply decoding
 * (client_reply.c), which know nothing of each other's callers. */
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "client_internal.h"

int sbn__call_tail(sbn_client_t *c, sbn__req_t *r, const void *tail,
                   size_t tail_len, sbn__reply_t *p) {
  int rc = sbn__req_send(c, r, tail, tail_len);
  memset(p, 0, sizeof *p);
  return rc != 0 ? rc : sbn__reply(c, r->id, p);
}

int sbn__call(sbn_client_t *c, sbn__req_t *r, sbn__reply_t *p) {
  return sbn__call_tail(c, r, NULL, 0, p);
}

int sbn_client_recv_error(sbn_client_t *c, char *code, size_t n) {
  sbn__reply_t p;
  char msg[256];
  int rc = sbn__begin(c, "recv_error"), e;
  if (rc != 0)
    return rc;
  if (code == NULL || n == 0)
    return sbn__fail(c, SBN_EINVAL, "code: NULL or 0 bytes");
  code[0] = '\0';
  if ((rc = sbn__reply_read(c, &p)) != 0)
    return rc;
  e = sbn__error_of(&p.root, c->code, sizeof c->code, msg, sizeof msg);
  sbn__reply_free(&p);
  if (e < 0)
    return sbn__fail(c, SBN_EFORMAT, "reply: error without a code");
  snprintf(code, n, "%s", c->code);
  return 0;
}

/* A hello, with the TCP token when token is not NULL. */
static int sbn__hello(sbn_client_t *c, const void *token, size_t token_len,
                      sbn_client_hello_t *out) {
  sbn__req_t r;
  sbn__reply_t p;
  const msgpack_object *lim;
  uint64_t proto, rank, size, mf = 0, ks = 0;
  int rc;
  sbn__req_start(c, &r, "hello", token != NULL ? 4 : 3);
  r.bad |= sbn__key(&r.pk, "version");
  r.bad |= msgpack_pack_uint32(&r.pk, SVC_PROTOCOL_VERSION);
  if (token != NULL) {
    /* bin, because the token is bytes: the file's content, not text. */
    r.bad |= sbn__key(&r.pk, "token");
    r.bad |= msgpack_pack_bin(&r.pk, token_len);
    r.bad |= msgpack_pack_bin_body(&r.pk, token, token_len);
  }
  if ((rc = sbn__call(c, &r, &p)) != 0)
    return rc;
  lim = sbn__get(&p.root, "limits");
  if (sbn__uint_field(&p.root, "protocol", &proto) != 0 ||
      sbn__uint_field(&p.root, "rank", &rank) != 0 ||
      sbn__uint_field(&p.root, "size", &size) != 0 || lim == NULL ||
      sbn__uint_field(lim, "max_frame", &mf) != 0 ||
      sbn__uint_field(lim, "keep_steps", &ks) != 0) {
    sbn__reply_free(&p);
    return sbn__fail(c, SBN_EFORMAT, "reply lacks a field");
  }
  if (out != NULL) {
    out->protocol = (int)proto;
    out->rank = (int)rank;
    out->size = (int)size;
    out->max_frame = (uint32_t)mf;
    out->keep_steps = (uint32_t)ks;
  }
  sbn__reply_free(&p);
  return 0;
}

int sbn_client_hello(sbn_client_t *c, sbn_client_hello_t *out) {
  int rc = sbn__begin(c, "hello");
  return rc != 0 ? rc : sbn__hello(c, NULL, 0, out);
}

int sbn_client_bye(sbn_client_t *c) {
  sbn__req_t r;
  sbn__reply_t p;
  int rc = sbn__begin(c, "bye");
  if (rc != 0)
    return rc;
  sbn__req_start(c, &r, "bye", 2);
  if ((rc = sbn__call(c, &r, &p)) != 0)
    return rc;
  sbn__reply_free(&p);
  return 0;
}

int sbn_client_connect_tcp(const char *host, int port, const void *token,
                           size_t token_len, sbn_client_t **out) {
  sbn_client_t *c;
  int rc;
  if (out == NULL)
    return sbn_set_error(SBN_EINVAL, "connect_tcp: out: NULL");
  *out = NULL;
  if (host == NULL)
    return sbn_set_error(SBN_EINVAL, "connect_tcp: host: NULL");
  if (port <= 0 || port > 65535)
    return sbn_set_error(SBN_EINVAL,
                         "connect_tcp: port: %d is not in [1, 65535]", port);
  if (token == NULL && token_len > 0)
    return sbn_set_error(SBN_EINVAL, "connect_tcp: token: NULL for %zu bytes",
                         token_len);
  if (token_len > SVC_TOKEN_MAX)
    return sbn_set_error(SBN_EINVAL,
                         "connect_tcp: token_len: %zu bytes, at most %d",
                         token_len, SVC_TOKEN_MAX);
  if ((c = sbn__client_new()) == NULL)
    return sbn_set_error(SBN_ENOMEM, "connect_tcp: out of memory");
  /* The handle is handed out even if what follows fails, so that the
   * caller can read the worker's code (see client.h). */
  *out = c;
  c->op = "connect_tcp";
  if ((rc = sbn__tcp_connect(c, host, port)) != 0 ||
      (rc = sbn__hello(c, token != NULL ? token : "", token_len, NULL)) != 0) {
    /* A refused hello closes the connection on the worker's side too;
     * later calls on this handle fail with SBN_EIO. */
    if (c->fd >= 0)
      close(c->fd);
    c->fd = -1;
  }
  return rc;
}
