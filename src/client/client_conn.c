/* syncbn client: connections, frames and the client's error codes
 * (client.h). Everything that waits for a reply is in client_session.c and
 * above, so this file needs no reply decoding. */
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#include "client_internal.h"

const char *sbn_client_strerror(int err) {
  switch (err) {
#define SBN__CLIENT_ERR_MSG(name, val, msg) \
  case SBN_CLIENT_##name:                   \
    return msg;
    SBN_CLIENT_ERRNO_MAP(SBN__CLIENT_ERR_MSG)
#undef SBN__CLIENT_ERR_MSG
    default:
      return sbn_strerror(err);
  }
}

const char *sbn_client_err_name(int err) {
  switch (err) {
#define SBN__CLIENT_ERR_NAME(name, val, msg) \
  case SBN_CLIENT_##name:                    \
    return "SBN_CLIENT_" #name;
    SBN_CLIENT_ERRNO_MAP(SBN__CLIENT_ERR_NAME)
#undef SBN__CLIENT_ERR_NAME
    default:
      return sbn_err_name(err);
  }
}

int sbn__begin(sbn_client_t *c, const char *op) {
  if (c == NULL)
    return sbn_set_error(SBN_EINVAL, "%s: c: NULL", op);
  c->op = op;
  c->code[0] = '\0';
  if (c->fd < 0)
    return sbn_set_error(
        SBN_EIO, "%s: not connected (this handle's connect failed)", op);
  return 0;
}

int sbn__fail(sbn_client_t *c, int rc, const char *fmt, ...) {
  char msg[448];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  return sbn_set_error(rc, "%s: %s", c->op != NULL ? c->op : "client", msg);
}

const char *sbn_client_server_code(const sbn_client_t *c) {
  return c != NULL ? c->code : "";
}

int sbn_client_fd(const sbn_client_t *c) {
  return c != NULL ? c->fd : -1;
}

int sbn_client_socket_path(char *buf, size_t n, const char *dir, int rank) {
  int w;
  if (buf == NULL || dir == NULL)
    return sbn_set_error(SBN_EINVAL, "socket_path: %s: NULL",
                         buf == NULL ? "buf" : "dir");
  w = snprintf(buf, n, "%s/rank-%d.sock", dir, rank);
  if (w < 0 || (size_t)w >= n)
    return sbn_set_error(SBN_ENOSPACE,
                         "socket_path: buf: %zu bytes do not hold "
                         "%s/rank-%d.sock",
                         n, dir, rank);
  return 0;
}

/* A handle not yet connected. */
sbn_client_t *sbn__client_new(void) {
  sbn_client_t *c = calloc(1, sizeof *c);
  if (c == NULL)
    return NULL;
  c->fd = -1;
  c->next_id = 1;
  return c;
}

int sbn_client_connect(const char *path, sbn_client_t **out) {
  struct sockaddr_un a;
  sbn_client_t *c;
  if (out == NULL)
    return sbn_set_error(SBN_EINVAL, "connect: out: NULL");
  *out = NULL;
  if (path == NULL)
    return sbn_set_error(SBN_EINVAL, "connect: path: NULL");
  if (strlen(path) >= sizeof a.sun_path)
    return sbn_set_error(SBN_EINVAL,
                         "connect: path: %zu bytes, a socket path holds at "
                         "most %zu",
                         strlen(path), sizeof a.sun_path - 1);
  if ((c = sbn__client_new()) == NULL)
    return sbn_set_error(SBN_ENOMEM, "connect: out of memory");
  c->fd = socket(AF_UNIX, SOCK_STREAM, 0);
  if (c->fd < 0) {
    sbn_set_error(SBN_EIO, "connect: socket: %s", strerror(errno));
    free(c);
    return SBN_EIO;
  }
  memset(&a, 0, sizeof a);
  a.sun_family = AF_UNIX;
  memcpy(a.sun_path, path, strlen(path) + 1);
  if (connect(c->fd, (struct sockaddr *)&a, sizeof a) != 0) {
    sbn_set_error(SBN_EIO, "connect: %s: %s", path, strerror(errno));
    close(c->fd);
    free(c);
    return SBN_EIO;
  }
  sbn__big_buffers(c->fd);
  *out = c;
  return 0;
}

void sbn__big_buffers(int fd) {
  /* Tensors of megabytes go through in fewer, larger writes and reads;
   * the kernel caps the size at its maximum (net.core.wmem_max) without
   * failing, so the result is not checked. */
  int bytes = 4 << 20;
  setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &bytes, sizeof bytes);
  setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &bytes, sizeof bytes);
}

void sbn_client_close(sbn_client_t *c) {
  if (c == NULL)
    return;
  if (c->fd >= 0)
    close(c->fd);
  free(c->keep);
  free(c);
}

/* ------------------------------------------------------------------ */
/* Frames */

/* The code for a failed send or recv: the worker went away, the socket's
 * timeout (SO_SNDTIMEO, SO_RCVTIMEO) expired, or anything else. */
static int sbn__errno_rc(int e) {
  if (e == EPIPE || e == ECONNRESET)
    return SBN_CLIENT_ECLOSED;
  if (e == EAGAIN || e == EWOULDBLOCK)
    return SBN_CLIENT_ETIMEDOUT;
  return SBN_EIO;
}

static int sbn__send(sbn_client_t *c, const void *buf, size_t len) {
  const char *p = buf;
  while (len > 0) {
    /* MSG_NOSIGNAL: a worker that went away is an error, not a SIGPIPE. */
    ssize_t w = send(c->fd, p, len, MSG_NOSIGNAL);
    if (w < 0) {
      if (errno == EINTR)
        continue;
      return sbn__fail(c, sbn__errno_rc(errno), "send: %s", strerror(errno));
    }
    p += w;
    len -= (size_t)w;
  }
  return 0;
}

/* Sends the n pieces v[0..n) in order with as few calls as the socket
 * allows: sendmsg of all of them, again from where it stopped, until
 * every byte is out. v is consumed. */
static int sbn__sendv(sbn_client_t *c, struct iovec *v, int n) {
  struct msghdr m;
  while (n > 0) {
    ssize_t w;
    memset(&m, 0, sizeof m);
    m.msg_iov = v;
    m.msg_iovlen = (size_t)n;
    do
      w = sendmsg(c->fd, &m, MSG_NOSIGNAL);
    while (w < 0 && errno == EINTR);
    if (w < 0)
      return sbn__fail(c, sbn__errno_rc(errno), "send: %s", strerror(errno));
    size_t done = (size_t)w;
    while (n > 0 && done >= v->iov_len) {
      done -= v->iov_len;
      v++;
      n--;
    }
    if (n > 0) {
      v->iov_base = (char *)v->iov_base + done;
      v->iov_len -= done;
    }
  }
  return 0;
}

int sbn_client_send_raw(sbn_client_t *c, const void *buf, size_t len) {
  int rc = sbn__begin(c, "send_raw");
  if (rc != 0)
    return rc;
  if (buf == NULL && len > 0)
    return sbn__fail(c, SBN_EINVAL, "buf: NULL for %zu bytes", len);
  return sbn__send(c, buf, len);
}

static int sbn__recv_all(sbn_client_t *c, void *buf, size_t len) {
  char *p = buf;
  while (len > 0) {
    ssize_t r = recv(c->fd, p, len, 0);
    if (r == 0)
      return sbn__fail(c, SBN_CLIENT_ECLOSED,
                       "the worker closed the connection");
    if (r < 0) {
      if (errno == EINTR)
        continue;
      return sbn__fail(c, sbn__errno_rc(errno), "recv: %s", strerror(errno));
    }
    p += r;
    len -= (size_t)r;
  }
  return 0;
}

int sbn__recv_frame(sbn_client_t *c, uint8_t **body, size_t *len) {
  return sbn__recv_frame_kept(c, body, len, NULL);
}

int sbn__recv_frame_kept(sbn_client_t *c, uint8_t **body, size_t *len,
                         int *kept) {
  uint8_t hdr[4];
  uint32_t n;
  uint8_t *b;
  int rc, keep = kept != NULL && !c->keep_busy;
  *body = NULL;
  *len = 0;
  if (kept != NULL)
    *kept = 0;
  if ((rc = sbn__recv_all(c, hdr, 4)) != 0)
    return rc;
  n = ((uint32_t)hdr[0] << 24) | ((uint32_t)hdr[1] << 16) |
      ((uint32_t)hdr[2] << 8) | hdr[3];
  if (n == 0)
    return sbn__fail(c, SBN_EFORMAT, "reply: zero-length frame");
  if (keep && n > c->keep_cap) {
    free(c->keep);
    c->keep_cap = 0;
    if ((c->keep = malloc(n)) != NULL)
      c->keep_cap = n;
  }
  keep = keep && c->keep != NULL;
  b = keep ? c->keep : malloc(n);
  if (b == NULL)
    return sbn__fail(c, SBN_ENOMEM, "reply: out of memory (%u bytes)", n);
  if ((rc = sbn__recv_all(c, b, n)) != 0) {
    if (!keep)
      free(b);
    return rc;
  }
  if (keep) {
    c->keep_busy = 1;
    *kept = 1;
  }
  *body = b;
  *len = n;
  return 0;
}

int sbn_client_recv_frame(sbn_client_t *c, uint8_t **body, size_t *len) {
  int rc = sbn__begin(c, "recv_frame");
  if (rc != 0)
    return rc;
  if (body == NULL || len == NULL)
    return sbn__fail(c, SBN_EINVAL, "%s: NULL", body == NULL ? "body" : "len");
  return sbn__recv_frame(c, body, len);
}

int sbn__req_send(sbn_client_t *c, sbn__req_t *r, const void *tail,
                  size_t tail_len) {
  /* The frame's pieces: the packed bytes around each external piece, then
   * the tail. */
  struct iovec v[2 * SBN__REQ_EXT + 2];
  size_t body, at = 0;
  int n = 0, rc;
  if (r->bad || r->sb.data == NULL || r->sb.size < 4) {
    msgpack_sbuffer_destroy(&r->sb);
    return sbn__fail(c, SBN_ENOMEM, "request: out of memory");
  }
  body = r->sb.size - 4 + tail_len;
  for (int i = 0; i < r->next; i++)
    body += r->ext[i].n;
  if (body > UINT32_MAX) {
    msgpack_sbuffer_destroy(&r->sb);
    return sbn__fail(c, SBN_ELIMIT, "request: larger than 4 GiB");
  }
  r->sb.data[0] = (char)(body >> 24);
  r->sb.data[1] = (char)(body >> 16);
  r->sb.data[2] = (char)(body >> 8);
  r->sb.data[3] = (char)body;
  for (int i = 0; i <= r->next; i++) {
    size_t end = i < r->next ? r->ext[i].at : r->sb.size;
    if (end > at)
      v[n++] = (struct iovec){r->sb.data + at, end - at};
    if (i < r->next && r->ext[i].n > 0)
      v[n++] = (struct iovec){(void *)r->ext[i].p, r->ext[i].n};
    at = end;
  }
  if (tail_len > 0)
    v[n++] = (struct iovec){(void *)tail, tail_len};
  rc = sbn__sendv(c, v, n);
  msgpack_sbuffer_destroy(&r->sb);
  return rc;
}

/* Connects c to the first address of host:port that accepts. */
int sbn__tcp_connect(sbn_client_t *c, const char *host, int port) {
  struct addrinfo hints, *ai = NULL;
  char ps[16];
  int gai, err = 0, one = 1;
  snprintf(ps, sizeof ps, "%d", port);
  memset(&hints, 0, sizeof hints);
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  if ((gai = getaddrinfo(host, ps, &hints, &ai)) != 0)
    return sbn__fail(c, SBN_EIO, "host: %s: %s", host, gai_strerror(gai));
  for (const struct addrinfo *a = ai; a != NULL; a = a->ai_next) {
    int fd = socket(a->ai_family, a->ai_socktype, a->ai_protocol);
    if (fd < 0) {
      err = errno;
      continue;
    }
    if (connect(fd, a->ai_addr, a->ai_addrlen) == 0) {
      c->fd = fd;
      break;
    }
    err = errno;
    close(fd);
  }
  freeaddrinfo(ai);
  if (c->fd < 0)
    return sbn__fail(c, SBN_EIO, "%s:%d: %s", host, port, strerror(err));
  /* Requests and replies are small exchanges that wait on each other:
   * Nagle's delay would only add latency. */
  setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  return 0;
}
