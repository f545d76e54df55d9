/* syncbn client (see client.h). */
#include "client.h"

#include <errno.h>
#include <msgpack.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "svc_codec.h"

struct sbn_client_s {
  int fd;
  uint64_t next_id;
  char code[32];
  char msg[256];
};

/* Replies are trusted more than requests, but are still scanned before
 * msgpack-c sees them: a broken worker must not make the client allocate
 * from a garbage count. A batch reply of 256 backwards holds about 50
 * objects per sub-reply, so the object cap is well above a request's; it
 * still bounds what msgpack-c allocates to a few MiB. */
static const svc_limits_t sbn__reply_limits = {UINT32_MAX, 8, 1u << 16};

static int sbn__cfail(sbn_client_t *c, int rc, const char *code,
                      const char *fmt, ...) {
  va_list ap;
  snprintf(c->code, sizeof c->code, "%s", code);
  va_start(ap, fmt);
  vsnprintf(c->msg, sizeof c->msg, fmt, ap);
  va_end(ap);
  return rc;
}

int sbn_client_socket_path(char *buf, size_t n, const char *dir, int rank) {
  int w = snprintf(buf, n, "%s/rank-%d.sock", dir, rank);
  return (w < 0 || (size_t)w >= n) ? SBN_ENOSPACE : 0;
}

int sbn_client_connect(const char *path, sbn_client_t **out) {
  struct sockaddr_un a;
  sbn_client_t *c;
  *out = NULL;
  if (path == NULL || strlen(path) >= sizeof a.sun_path)
    return SBN_EINVAL;
  c = calloc(1, sizeof *c);
  if (c == NULL)
    return SBN_ENOMEM;
  c->next_id = 1;
  c->fd = socket(AF_UNIX, SOCK_STREAM, 0);
  if (c->fd < 0) {
    free(c);
    return SBN_EIO;
  }
  memset(&a, 0, sizeof a);
  a.sun_family = AF_UNIX;
  memcpy(a.sun_path, path, strlen(path) + 1);
  if (connect(c->fd, (struct sockaddr *)&a, sizeof a) != 0) {
    close(c->fd);
    free(c);
    return SBN_EIO;
  }
  *out = c;
  return 0;
}

void sbn_client_close(sbn_client_t *c) {
  if (c == NULL)
    return;
  if (c->fd >= 0)
    close(c->fd);
  free(c);
}

int sbn_client_fd(const sbn_client_t *c) {
  return c->fd;
}

const char *sbn_client_error_code(const sbn_client_t *c) {
  return c->code;
}

const char *sbn_client_error(const sbn_client_t *c) {
  return c->msg;
}

int sbn_client_send_raw(sbn_client_t *c, const void *buf, size_t len) {
  const char *p = buf;
  while (len > 0) {
    /* MSG_NOSIGNAL: a worker that went away is an error, not a SIGPIPE. */
    ssize_t w = send(c->fd, p, len, MSG_NOSIGNAL);
    if (w < 0) {
      if (errno == EINTR)
        continue;
      return sbn__cfail(c, errno == EPIPE ? SBN_ECLOSED : SBN_EIO, "",
                        "send: %s", strerror(errno));
    }
    p += w;
    len -= (size_t)w;
  }
  return 0;
}

static int sbn__recv_all(sbn_client_t *c, void *buf, size_t len) {
  char *p = buf;
  while (len > 0) {
    ssize_t r = recv(c->fd, p, len, 0);
    if (r == 0)
      return sbn__cfail(c, SBN_ECLOSED, "", "the worker closed the connection");
    if (r < 0) {
      if (errno == EINTR)
        continue;
      return sbn__cfail(c, errno == ECONNRESET ? SBN_ECLOSED : SBN_EIO, "",
                        "recv: %s", strerror(errno));
    }
    p += r;
    len -= (size_t)r;
  }
  return 0;
}

int sbn_client_recv_frame(sbn_client_t *c, uint8_t **body, size_t *len) {
  uint8_t hdr[4];
  uint32_t n;
  uint8_t *b;
  int rc;
  *body = NULL;
  *len = 0;
  if ((rc = sbn__recv_all(c, hdr, 4)) != 0)
    return rc;
  n = ((uint32_t)hdr[0] << 24) | ((uint32_t)hdr[1] << 16) |
      ((uint32_t)hdr[2] << 8) | hdr[3];
  if (n == 0)
    return sbn__cfail(c, SBN_EFORMAT, "", "reply: zero-length frame");
  b = malloc(n);
  if (b == NULL)
    return sbn__cfail(c, SBN_ENOMEM, "", "reply: out of memory (%u bytes)", n);
  if ((rc = sbn__recv_all(c, b, n)) != 0) {
    free(b);
    return rc;
  }
  *body = b;
  *len = n;
  return 0;
}

/* ------------------------------------------------------------------ */
/* Requests and replies */

typedef struct sbn__req_s {
  msgpack_sbuffer sb;
  msgpack_packer pk;
  uint64_t id;
  int bad; /* nonzero: packing ran out of memory */
} sbn__req_t;

static void sbn__key(msgpack_packer *pk, const char *k) {
  msgpack_pack_str_with_body(pk, k, strlen(k));
}

/* Starts a frame: room for the header and the request's id; the caller
 * packs the whole map. */
static void sbn__req_init(sbn_client_t *c, sbn__req_t *r) {
  msgpack_sbuffer_init(&r->sb);
  msgpack_packer_init(&r->pk, &r->sb, msgpack_sbuffer_write);
  msgpack_sbuffer_write(&r->sb, "\0\0\0\0", 4);
  r->id = c->next_id++;
  r->bad = 0;
}

/* Packs the head of a request map of n entries (op and id included). */
static int sbn__pack_head(msgpack_packer *pk, const char *op, uint64_t id,
                          size_t n) {
  int rc = msgpack_pack_map(pk, n);
  rc |= msgpack_pack_str_with_body(pk, "op", 2);
  rc |= msgpack_pack_str_with_body(pk, op, strlen(op));
  rc |= msgpack_pack_str_with_body(pk, "id", 2);
  rc |= msgpack_pack_uint64(pk, id);
  return rc;
}

/* Starts a request map of n entries (op and id included). */
static void sbn__req_start(sbn_client_t *c, sbn__req_t *r, const char *op,
                           size_t n) {
  sbn__req_init(c, r);
  sbn__pack_head(&r->pk, op, r->id, n);
}

static int sbn__req_send(sbn_client_t *c, sbn__req_t *r) {
  size_t body;
  int rc;
  if (r->bad || r->sb.data == NULL || r->sb.size < 4) {
    msgpack_sbuffer_destroy(&r->sb);
    return sbn__cfail(c, SBN_ENOMEM, "", "request: out of memory");
  }
  body = r->sb.size - 4;
  if (body > UINT32_MAX) {
    msgpack_sbuffer_destroy(&r->sb);
    return sbn__cfail(c, SBN_ELIMIT, "", "request: larger than 4 GiB");
  }
  r->sb.data[0] = (char)(body >> 24);
  r->sb.data[1] = (char)(body >> 16);
  r->sb.data[2] = (char)(body >> 8);
  r->sb.data[3] = (char)body;
  rc = sbn_client_send_raw(c, r->sb.data, r->sb.size);
  msgpack_sbuffer_destroy(&r->sb);
  return rc;
}

typedef struct sbn__reply_s {
  uint8_t *body;
  msgpack_zone zone;
  int zone_ok;
  msgpack_object root;
} sbn__reply_t;

static void sbn__reply_free(sbn__reply_t *p) {
  if (p->zone_ok)
    msgpack_zone_destroy(&p->zone);
  free(p->body);
  memset(p, 0, sizeof *p);
}

static const msgpack_object *sbn__get(const msgpack_object *map,
                                      const char *key) {
  size_t l = strlen(key);
  if (map->type != MSGPACK_OBJECT_MAP)
    return NULL;
  for (uint32_t i = 0; i < map->via.map.size; i++) {
    const msgpack_object *k = &map->via.map.ptr[i].key;
    if (k->type == MSGPACK_OBJECT_STR && k->via.str.size == l &&
        memcmp(k->via.str.ptr, key, l) == 0)
      return &map->via.map.ptr[i].val;
  }
  return NULL;
}

static int sbn__server_rc(const char *code) {
  static const struct {
    const char *code;
    int rc;
  } map[] = {{"SHAPE", SBN_ESHAPE},           {"BAD_TENSOR", SBN_ESHAPE},
             {"NOT_YET", SBN_ENOTSUP},        {"LAYER_MISMATCH", SBN_EMISMATCH},
             {"DUPLICATE_STEP", SBN_ESTATE},  {"STALE_STEP", SBN_ESTATE},
             {"NO_FORWARD", SBN_ESTATE},      {"SMALL_BATCH", SBN_ESMALLBATCH},
             {"TIMEOUT", SBN_ETIMEDOUT},      {"FRAME_TOO_LARGE", SBN_ELIMIT},
             {"LIMIT", SBN_ELIMIT},           {"RESOURCE", SBN_ELIMIT},
             {"TOO_MANY_CLIENTS", SBN_ELIMIT}};
  for (size_t i = 0; i < sizeof map / sizeof *map; i++)
    if (strcmp(code, map[i].code) == 0)
      return map[i].rc;
  return SBN_EINVAL;
}

/* If m is an error reply, copies its code and message and returns 1; 0
 * for any other map; -1 for an error reply without a code. */
static int sbn__error_of(const msgpack_object *m, char *code, size_t ncode,
                         char *msg, size_t nmsg) {
  const msgpack_object *e = sbn__get(m, "error"), *k, *t;
  if (e == NULL)
    return 0;
  k = sbn__get(e, "code");
  t = sbn__get(e, "message");
  if (k == NULL || k->type != MSGPACK_OBJECT_STR)
    return -1;
  snprintf(code, ncode, "%.*s", (int)k->via.str.size, k->via.str.ptr);
  if (t != NULL && t->type == MSGPACK_OBJECT_STR)
    snprintf(msg, nmsg, "%.*s", (int)t->via.str.size, t->via.str.ptr);
  else
    snprintf(msg, nmsg, "%s", "");
  return 1;
}

/* Receives the reply to request id and turns an error reply into a code. */
static int sbn__reply(sbn_client_t *c, uint64_t id, sbn__reply_t *p) {
  size_t len, off = 0;
  const msgpack_object *o;
  int rc, e;
  memset(p, 0, sizeof *p);
  c->code[0] = '\0';
  c->msg[0] = '\0';
  if ((rc = sbn_client_recv_frame(c, &p->body, &len)) != 0)
    return rc;
  if (svc_scan(p->body, len, &sbn__reply_limits) != 0) {
    rc = sbn__cfail(c, SBN_EFORMAT, "", "reply: %s", svc_last_error());
    goto fail;
  }
  if (!msgpack_zone_init(&p->zone, 1024)) {
    rc = sbn__cfail(c, SBN_ENOMEM, "", "reply: out of memory");
    goto fail;
  }
  p->zone_ok = 1;
  if (msgpack_unpack((const char *)p->body, len, &off, &p->zone, &p->root) !=
      MSGPACK_UNPACK_SUCCESS) {
    rc = sbn__cfail(c, SBN_EFORMAT, "", "reply: not a msgpack map");
    goto fail;
  }
  e = sbn__error_of(&p->root, c->code, sizeof c->code, c->msg, sizeof c->msg);
  if (e < 0) {
    rc = sbn__cfail(c, SBN_EFORMAT, "", "reply: error without a code");
    goto fail;
  }
  if (e > 0) {
    rc = sbn__server_rc(c->code);
    goto fail;
  }
  o = sbn__get(&p->root, "id");
  if (o == NULL || o->type != MSGPACK_OBJECT_POSITIVE_INTEGER ||
      o->via.u64 != id) {
    rc = sbn__cfail(c, SBN_EFORMAT, "", "reply: id does not match request %llu",
                    (unsigned long long)id);
    goto fail;
  }
  return 0;
fail:
  sbn__reply_free(p);
  return rc;
}

/* Copies a reply tensor into out after checking it has shape desc. */
static int sbn__take_tensor(sbn_client_t *c, const msgpack_object *root,
                            const char *key, const sbn_tensor_desc_t *desc,
                            float *out) {
  const msgpack_object *o = sbn__get(root, key);
  svc_tensor_t t;
  if (o == NULL)
    return sbn__cfail(c, SBN_EFORMAT, "", "reply: no '%s'", key);
  if (svc_decode_tensor(o, key, &t) != 0)
    return sbn__cfail(c, SBN_EFORMAT, "", "reply: %s", svc_last_error());
  if (t.desc.ndim != desc->ndim ||
      memcmp(t.desc.dims, desc->dims,
             (size_t)desc->ndim * sizeof *desc->dims) != 0) {
    svc_tensor_free(&t);
    return sbn__cfail(c, SBN_EFORMAT, "", "reply: '%s' has the wrong shape",
                      key);
  }
  if (t.numel > 0 && out != NULL)
    memcpy(out, t.data, t.numel * sizeof(float));
  svc_tensor_free(&t);
  return 0;
}

static int sbn__uint_field(const msgpack_object *m, const char *key,
                           uint64_t *out) {
  const msgpack_object *o = sbn__get(m, key);
  if (o == NULL || o->type != MSGPACK_OBJECT_POSITIVE_INTEGER)
    return -1;
  *out = o->via.u64;
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
  sbn__key(&r.pk, "version");
  msgpack_pack_uint32(&r.pk, SVC_PROTOCOL_VERSION);
  if (token != NULL) {
    /* bin, because the token is bytes: the file's content, not text. */
    sbn__key(&r.pk, "token");
    msgpack_pack_bin(&r.pk, token_len);
    msgpack_pack_bin_body(&r.pk, token, token_len);
  }
  if ((rc = sbn__req_send(c, &r)) != 0 || (rc = sbn__reply(c, r.id, &p)) != 0)
    return rc;
  lim = sbn__get(&p.root, "limits");
  if (sbn__uint_field(&p.root, "protocol", &proto) != 0 ||
      sbn__uint_field(&p.root, "rank", &rank) != 0 ||
      sbn__uint_field(&p.root, "size", &size) != 0 || lim == NULL ||
      sbn__uint_field(lim, "max_frame", &mf) != 0 ||
      sbn__uint_field(lim, "keep_steps", &ks) != 0) {
    sbn__reply_free(&p);
    return sbn__cfail(c, SBN_EFORMAT, "", "hello: reply lacks a field");
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
  return sbn__hello(c, NULL, 0, out);
}

int sbn_client_register(sbn_client_t *c, const char *name, const char *kind,
                        const sbn_layer_params_t *prm, uint32_t group_size,
                        uint64_t *layer, int *created) {
  sbn__req_t r;
  sbn__reply_t p;
  const msgpack_object *cr;
  int bn = strcmp(kind, "batchnorm") == 0,
      sync = strcmp(kind, "syncbatchnorm") == 0,
      in = strcmp(kind, "instancenorm") == 0,
      gn = strcmp(kind, "groupnorm") == 0, ln = strcmp(kind, "layernorm") == 0,
      dr = strcmp(kind, "dropout") == 0;
  size_t n = 4;
  int rc;
  if (!(bn || sync || in || gn || ln || dr))
    return sbn__cfail(c, SBN_EINVAL, "", "kind: unknown layer kind '%s'", kind);
  if (bn || sync || in)
    n += 5 + (sync ? 1 : 0); /* channels eps momentum affine track */
  else if (gn)
    n += 4; /* channels groups eps affine */
  else if (ln)
    n += 3; /* normalized_shape eps affine */
  else
    n += 2; /* p seed */
  sbn__req_start(c, &r, "register", n);
  sbn__key(&r.pk, "name");
  sbn__key(&r.pk, name);
  sbn__key(&r.pk, "kind");
  sbn__key(&r.pk, kind);
  if (dr) {
    sbn__key(&r.pk, "p");
    msgpack_pack_double(&r.pk, prm->p);
    sbn__key(&r.pk, "seed");
    msgpack_pack_uint32(&r.pk, prm->seed);
  } else {
    if (ln) {
      sbn__key(&r.pk, "normalized_shape");
      msgpack_pack_array(&r.pk, (size_t)prm->norm_ndim);
      for (int i = 0; i < prm->norm_ndim; i++)
        msgpack_pack_uint64(&r.pk, prm->norm_shape[i]);
    } else {
      sbn__key(&r.pk, "channels");
      msgpack_pack_uint64(&r.pk, prm->channels);
    }
    if (gn) {
      sbn__key(&r.pk, "groups");
      msgpack_pack_uint64(&r.pk, prm->groups);
    }
    sbn__key(&r.pk, "eps");
    msgpack_pack_double(&r.pk, prm->eps);
    sbn__key(&r.pk, "affine");
    prm->affine ? msgpack_pack_true(&r.pk) : msgpack_pack_false(&r.pk);
    if (bn || sync || in) {
      sbn__key(&r.pk, "momentum");
      if (prm->cumulative)
        msgpack_pack_nil(&r.pk);
      else
        msgpack_pack_double(&r.pk, prm->momentum);
      sbn__key(&r.pk, "track_running_stats");
      prm->track_running_stats ? msgpack_pack_true(&r.pk)
                               : msgpack_pack_false(&r.pk);
    }
    if (sync) {
      sbn__key(&r.pk, "group_size");
      msgpack_pack_uint32(&r.pk, group_size);
    }
  }
  if ((rc = sbn__req_send(c, &r)) != 0 || (rc = sbn__reply(c, r.id, &p)) != 0)
    return rc;
  cr = sbn__get(&p.root, "created");
  if (sbn__uint_field(&p.root, "layer", layer) != 0 || cr == NULL ||
      cr->type != MSGPACK_OBJECT_BOOLEAN) {
    sbn__reply_free(&p);
    return sbn__cfail(c, SBN_EFORMAT, "", "register: reply lacks a field");
  }
  if (created != NULL)
    *created = cr->via.boolean;
  sbn__reply_free(&p);
  return 0;
}

static int sbn__desc_numel(const sbn_tensor_desc_t *d, size_t *n) {
  return sbn_desc_numel(d, n);
}

/* The request maps that a batch can hold are packed by one function
 * each, shared by the single calls and the batch queue. */
static int sbn__pack_layer_step(msgpack_packer *pk, uint64_t layer,
                                uint64_t step) {
  int rc = msgpack_pack_str_with_body(pk, "layer", 5);
  rc |= msgpack_pack_uint64(pk, layer);
  rc |= msgpack_pack_str_with_body(pk, "step", 4);
  rc |= msgpack_pack_uint64(pk, step);
  return rc;
}

static int sbn__pack_forward(msgpack_packer *pk, uint64_t id, uint64_t layer,
                             uint64_t step, int train,
                             const sbn_tensor_desc_t *desc, const float *x,
                             size_t numel, const float *weight,
                             const float *bias, size_t wb_numel) {
  sbn_tensor_desc_t wd;
  int rc;
  memset(&wd, 0, sizeof wd);
  wd.ndim = 1;
  wd.dims[0] = wb_numel;
  rc = sbn__pack_head(pk, "forward", id,
                      6 + (weight != NULL ? 1 : 0) + (bias != NULL ? 1 : 0));
  rc |= sbn__pack_layer_step(pk, layer, step);
  rc |= msgpack_pack_str_with_body(pk, "train", 5);
  rc |= train ? msgpack_pack_true(pk) : msgpack_pack_false(pk);
  rc |= msgpack_pack_str_with_body(pk, "x", 1);
  rc |= svc_pack_tensor(pk, desc, x, numel);
  if (weight != NULL) {
    rc |= msgpack_pack_str_with_body(pk, "weight", 6);
    rc |= svc_pack_tensor(pk, &wd, weight, wb_numel);
  }
  if (bias != NULL) {
    rc |= msgpack_pack_str_with_body(pk, "bias", 4);
    rc |= svc_pack_tensor(pk, &wd, bias, wb_numel);
  }
  return rc;
}

static int sbn__pack_backward(msgpack_packer *pk, uint64_t id, uint64_t layer,
                              uint64_t step, const sbn_tensor_desc_t *desc,
                              const float *dy, size_t numel) {
  int rc = sbn__pack_head(pk, "backward", id, 5);
  rc |= sbn__pack_layer_step(pk, layer, step);
  rc |= msgpack_pack_str_with_body(pk, "dy", 2);
  rc |= svc_pack_tensor(pk, desc, dy, numel);
  return rc;
}

/* stats: the count is one uint for every channel, or an f64 tensor. */
static int sbn__pack_stats(msgpack_packer *pk, uint64_t id, uint64_t layer,
                           uint64_t step, size_t channels, uint64_t count,
                           const double *counts, const double *mean,
                           const double *m2) {
  int rc = sbn__pack_head(pk, "stats", id, 7);
  rc |= sbn__pack_layer_step(pk, layer, step);
  rc |= msgpack_pack_str_with_body(pk, "count", 5);
  if (counts != NULL)
    rc |= svc_pack_vec64(pk, counts, channels);
  else
    rc |= msgpack_pack_uint64(pk, count);
  rc |= msgpack_pack_str_with_body(pk, "mean", 4);
  rc |= svc_pack_vec64(pk, mean, channels);
  rc |= msgpack_pack_str_with_body(pk, "m2", 2);
  rc |= svc_pack_vec64(pk, m2, channels);
  return rc;
}

static int sbn__pack_stats_backward(msgpack_packer *pk, uint64_t id,
                                    uint64_t layer, uint64_t step,
                                    size_t channels, const double *sum_dy,
                                    const double *sum_dy_xhat) {
  int rc = sbn__pack_head(pk, "stats_backward", id, 6);
  rc |= sbn__pack_layer_step(pk, layer, step);
  rc |= msgpack_pack_str_with_body(pk, "sum_dy", 6);
  rc |= svc_pack_vec64(pk, sum_dy, channels);
  rc |= msgpack_pack_str_with_body(pk, "sum_dy_xhat", 11);
  rc |= svc_pack_vec64(pk, sum_dy_xhat, channels);
  return rc;
}

int sbn_client_forward(sbn_client_t *c, uint64_t layer, uint64_t step,
                       int train, const sbn_tensor_desc_t *desc, const float *x,
                       const float *weight, const float *bias, size_t wb_numel,
                       float *y) {
  sbn__req_t r;
  sbn__reply_t p;
  size_t numel;
  int rc;
  if ((rc = sbn__desc_numel(desc, &numel)) != 0)
    return sbn__cfail(c, rc, "", "desc: %s", sbn_last_error());
  sbn__req_init(c, &r);
  r.bad = sbn__pack_forward(&r.pk, r.id, layer, step, train, desc, x, numel,
                            weight, bias, wb_numel);
  if ((rc = sbn__req_send(c, &r)) != 0 || (rc = sbn__reply(c, r.id, &p)) != 0)
    return rc;
  rc = sbn__take_tensor(c, &p.root, "y", desc, y);
  sbn__reply_free(&p);
  return rc;
}

int sbn_client_backward(sbn_client_t *c, uint64_t layer, uint64_t step,
                        const sbn_tensor_desc_t *desc, const float *dy,
                        float *dx, float *dweight, float *dbias,
                        size_t wb_numel) {
  sbn__req_t r;
  sbn__reply_t p;
  size_t numel;
  int rc;
  if ((rc = sbn__desc_numel(desc, &numel)) != 0)
    return sbn__cfail(c, rc, "", "desc: %s", sbn_last_error());
  sbn__req_init(c, &r);
  r.bad = sbn__pack_backward(&r.pk, r.id, layer, step, desc, dy, numel);
  if ((rc = sbn__req_send(c, &r)) != 0 || (rc = sbn__reply(c, r.id, &p)) != 0)
    return rc;
  rc = sbn__take_tensor(c, &p.root, "dx", desc, dx);
  if (rc == 0 && sbn__get(&p.root, "dweight") != NULL &&
      (dweight != NULL || dbias != NULL)) {
    sbn_tensor_desc_t wd;
    const msgpack_object *o = sbn__get(&p.root, "dweight");
    svc_tensor_t t;
    /* The parameter shape is the layer's (C, or LayerNorm's normalized
     * shape); only its size is checked here. */
    if (svc_decode_tensor(o, "dweight", &t) != 0 || t.numel != wb_numel) {
      svc_tensor_free(&t);
      sbn__reply_free(&p);
      return sbn__cfail(c, SBN_EFORMAT, "", "reply: dweight is not %zu floats",
                        wb_numel);
    }
    wd = t.desc;
    svc_tensor_free(&t);
    if (dweight != NULL)
      rc = sbn__take_tensor(c, &p.root, "dweight", &wd, dweight);
    if (rc == 0 && dbias != NULL)
      rc = sbn__take_tensor(c, &p.root, "dbias", &wd, dbias);
  }
  sbn__reply_free(&p);
  return rc;
}

int sbn_client_bye(sbn_client_t *c) {
  sbn__req_t r;
  sbn__reply_t p;
  int rc;
  sbn__req_start(c, &r, "bye", 2);
  if ((rc = sbn__req_send(c, &r)) != 0 || (rc = sbn__reply(c, r.id, &p)) != 0)
    return rc;
  sbn__reply_free(&p);
  return 0;
}

int sbn_client_recv_error(sbn_client_t *c, char *code, size_t n) {
  sbn__reply_t p;
  int rc = sbn__reply(c, 0, &p);
  if (rc == 0 || rc == SBN_EFORMAT) {
    /* Not an error reply (an id mismatch against 0 is expected here). */
    if (rc == 0)
      sbn__reply_free(&p);
    if (rc == SBN_EFORMAT && c->code[0] == '\0' &&
        strncmp(c->msg, "reply: id", 9) != 0)
      return rc;
    snprintf(code, n, "%s", "");
    return 0;
  }
  if (c->code[0] != '\0') {
    snprintf(code, n, "%s", c->code);
    return 0;
  }
  return rc;
}

/* ------------------------------------------------------------------ */
/* TCP */

int sbn_client_connect_tcp(const char *host, int port, const void *token,
                           size_t token_len, sbn_client_t **out) {
  struct addrinfo hints, *ai = NULL;
  sbn_client_t *c;
  char ps[16];
  int rc, gai, err = 0, one = 1;
  *out = NULL;
  if (host == NULL || port <= 0 || port > 65535 || token_len > SVC_TOKEN_MAX ||
      (token == NULL && token_len > 0))
    return SBN_EINVAL;
  c = calloc(1, sizeof *c);
  if (c == NULL)
    return SBN_ENOMEM;
  c->fd = -1;
  c->next_id = 1;
  /* The handle is handed out even if what follows fails, so that the
   * caller can read why (see client.h). */
  *out = c;
  snprintf(ps, sizeof ps, "%d", port);
  memset(&hints, 0, sizeof hints);
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  if ((gai = getaddrinfo(host, ps, &hints, &ai)) != 0) {
    ai = NULL;
    rc = sbn__cfail(c, SBN_EIO, "", "tcp: %s: %s", host, gai_strerror(gai));
    goto fail;
  }
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
  if (c->fd < 0) {
    rc = sbn__cfail(c, SBN_EIO, "", "tcp: connect %s:%d: %s", host, port,
                    strerror(err));
    goto fail;
  }
  /* Requests and replies are small exchanges that wait on each other:
   * Nagle's delay would only add latency. */
  setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  if ((rc = sbn__hello(c, token != NULL ? token : "", token_len, NULL)) != 0)
    goto fail;
  freeaddrinfo(ai);
  return 0;
fail:
  if (ai != NULL)
    freeaddrinfo(ai);
  if (c->fd >= 0) {
    /* A refused hello closes the connection on the worker's side too;
     * later calls on this handle fail with SBN_EIO. */
    close(c->fd);
    c->fd = -1;
  }
  return rc;
}

/* ------------------------------------------------------------------ */
/* Reply helpers for the version 3 ops */

static int sbn__str_is(const msgpack_object *o, const char *s) {
  size_t l = strlen(s);
  return o != NULL && o->type == MSGPACK_OBJECT_STR && o->via.str.size == l &&
         memcmp(o->via.str.ptr, s, l) == 0;
}

/* Reads the f64 tensor key of shape [n] into out (n doubles; NULL only
 * checks it). The bytes are little-endian whatever the host. */
static int sbn__take_vec64(sbn_client_t *c, const msgpack_object *root,
                           const char *key, size_t n, double *out) {
  const msgpack_object *o = sbn__get(root, key), *shape, *data;
  if (o == NULL || o->type != MSGPACK_OBJECT_MAP)
    return sbn__cfail(c, SBN_EFORMAT, "", "reply: no tensor '%s'", key);
  shape = sbn__get(o, "shape");
  data = sbn__get(o, "data");
  if (!sbn__str_is(sbn__get(o, "dtype"), "f64") || shape == NULL ||
      shape->type != MSGPACK_OBJECT_ARRAY || shape->via.array.size != 1 ||
      shape->via.array.ptr[0].type != MSGPACK_OBJECT_POSITIVE_INTEGER ||
      shape->via.array.ptr[0].via.u64 != n || data == NULL ||
      data->type != MSGPACK_OBJECT_BIN || data->via.bin.size / 8 != n ||
      data->via.bin.size % 8 != 0)
    return sbn__cfail(c, SBN_EFORMAT, "", "reply: '%s' is not f64 [%zu]", key,
                      n);
  for (size_t i = 0; out != NULL && i < n; i++) {
    const unsigned char *b = (const unsigned char *)data->via.bin.ptr + 8 * i;
    uint64_t u = 0;
    for (int k = 7; k >= 0; k--)
      u = (u << 8) | b[k];
    memcpy(&out[i], &u, sizeof u);
  }
  return 0;
}

/* Decodes the f32 tensor key into t (owned by the caller, freed with
 * svc_tensor_free); with want, its shape must be want's. */
static int sbn__decode_f32(sbn_client_t *c, const msgpack_object *root,
                           const char *key, const sbn_tensor_desc_t *want,
                           svc_tensor_t *t) {
  const msgpack_object *o = sbn__get(root, key);
  memset(t, 0, sizeof *t);
  if (o == NULL)
    return sbn__cfail(c, SBN_EFORMAT, "", "reply: no '%s'", key);
  if (svc_decode_tensor(o, key, t) != 0) {
    svc_tensor_free(t);
    return sbn__cfail(c, SBN_EFORMAT, "", "reply: %s", svc_last_error());
  }
  if (want != NULL && (t->desc.ndim != want->ndim ||
                       memcmp(t->desc.dims, want->dims,
                              (size_t)want->ndim * sizeof *want->dims) != 0)) {
    svc_tensor_free(t);
    return sbn__cfail(c, SBN_EFORMAT, "", "reply: '%s' has the wrong shape",
                      key);
  }
  return 0;
}

static int sbn__num_field(const msgpack_object *m, const char *key,
                          double *out) {
  const msgpack_object *o = sbn__get(m, key);
  if (o == NULL)
    return -1;
  switch (o->type) {
    case MSGPACK_OBJECT_FLOAT32:
    case MSGPACK_OBJECT_FLOAT64:
      *out = o->via.f64;
      return 0;
    case MSGPACK_OBJECT_POSITIVE_INTEGER:
      *out = (double)o->via.u64;
      return 0;
    default:
      return -1;
  }
}

/* The stats reply: five f64 [channels] tensors, into out's non-NULL
 * arrays. */
static int sbn__take_stats(sbn_client_t *c, const msgpack_object *root,
                           size_t channels, double *count, double *mean,
                           double *var, double *var_unbiased, double *invstd) {
  int rc;
  if ((rc = sbn__take_vec64(c, root, "count", channels, count)) != 0 ||
      (rc = sbn__take_vec64(c, root, "mean", channels, mean)) != 0 ||
      (rc = sbn__take_vec64(c, root, "var", channels, var)) != 0 ||
      (rc = sbn__take_vec64(c, root, "var_unbiased", channels, var_unbiased)) !=
          0 ||
      (rc = sbn__take_vec64(c, root, "invstd", channels, invstd)) != 0)
    return rc;
  return 0;
}

static int sbn__vec_args(sbn_client_t *c, size_t channels, const void *a,
                         const void *b) {
  if (channels == 0 || a == NULL || b == NULL)
    return sbn__cfail(c, SBN_EINVAL, "",
                      "stats: expected channels > 0 and both arrays");
  /* An f64 tensor of channels elements must fit one frame. */
  if (channels > UINT32_MAX / sizeof(double))
    return sbn__cfail(c, SBN_ELIMIT, "", "stats: %zu channels", channels);
  return 0;
}

/* ------------------------------------------------------------------ */
/* stats, stats_backward */

int sbn_client_stats(sbn_client_t *c, uint64_t layer, uint64_t step,
                     size_t channels, uint64_t count, const double *counts,
                     const double *mean, const double *m2,
                     sbn_client_stats_t *out) {
  sbn__req_t r;
  sbn__reply_t p;
  int rc;
  if ((rc = sbn__vec_args(c, channels, mean, m2)) != 0)
    return rc;
  sbn__req_init(c, &r);
  r.bad = sbn__pack_stats(&r.pk, r.id, layer, step, channels, count, counts,
                          mean, m2);
  if ((rc = sbn__req_send(c, &r)) != 0 || (rc = sbn__reply(c, r.id, &p)) != 0)
    return rc;
  rc =
      sbn__take_stats(c, &p.root, channels, out ? out->count : NULL,
                      out ? out->mean : NULL, out ? out->var : NULL,
                      out ? out->var_unbiased : NULL, out ? out->invstd : NULL);
  sbn__reply_free(&p);
  return rc;
}

int sbn_client_stats_backward(sbn_client_t *c, uint64_t layer, uint64_t step,
                              size_t channels, const double *sum_dy,
                              const double *sum_dy_xhat, double *group_sum_dy,
                              double *group_sum_dy_xhat) {
  sbn__req_t r;
  sbn__reply_t p;
  int rc;
  if ((rc = sbn__vec_args(c, channels, sum_dy, sum_dy_xhat)) != 0)
    return rc;
  sbn__req_init(c, &r);
  r.bad = sbn__pack_stats_backward(&r.pk, r.id, layer, step, channels, sum_dy,
                                   sum_dy_xhat);
  if ((rc = sbn__req_send(c, &r)) != 0 || (rc = sbn__reply(c, r.id, &p)) != 0)
    return rc;
  if ((rc = sbn__take_vec64(c, &p.root, "sum_dy", channels, group_sum_dy)) == 0)
    rc =
        sbn__take_vec64(c, &p.root, "sum_dy_xhat", channels, group_sum_dy_xhat);
  sbn__reply_free(&p);
  return rc;
}

/* ------------------------------------------------------------------ */
/* get_state, set_state */

void sbn_client_state_free(sbn_client_state_t *s) {
  if (s == NULL)
    return;
  free(s->running_mean);
  free(s->running_var);
  free(s->weight);
  free(s->bias);
  memset(s, 0, sizeof *s);
}

/* Moves a decoded tensor's data into *dst (freed with free()). */
static void sbn__steal(svc_tensor_t *t, float **dst) {
  *dst = t->data;
  t->data = NULL;
  svc_tensor_free(t);
}

int sbn_client_get_state(sbn_client_t *c, uint64_t layer,
                         sbn_client_state_t *out) {
  sbn__req_t r;
  sbn__reply_t p;
  const msgpack_object *kind, *nbt;
  svc_tensor_t t;
  sbn_tensor_desc_t cd;
  int rc;
  memset(out, 0, sizeof *out);
  sbn__req_start(c, &r, "get_state", 3);
  sbn__key(&r.pk, "layer");
  msgpack_pack_uint64(&r.pk, layer);
  if ((rc = sbn__req_send(c, &r)) != 0 || (rc = sbn__reply(c, r.id, &p)) != 0)
    return rc;
  kind = sbn__get(&p.root, "kind");
  if (kind == NULL || kind->type != MSGPACK_OBJECT_STR ||
      kind->via.str.size >= sizeof out->kind) {
    rc = sbn__cfail(c, SBN_EFORMAT, "", "get_state: reply lacks 'kind'");
    goto fail;
  }
  memcpy(out->kind, kind->via.str.ptr, kind->via.str.size);
  if (sbn__get(&p.root, "running_mean") != NULL) {
    if ((rc = sbn__decode_f32(c, &p.root, "running_mean", NULL, &t)) != 0)
      goto fail;
    cd = t.desc;
    out->channels = t.numel;
    sbn__steal(&t, &out->running_mean);
    if (cd.ndim != 1) {
      rc = sbn__cfail(c, SBN_EFORMAT, "", "get_state: running_mean not 1-D");
      goto fail;
    }
    if ((rc = sbn__decode_f32(c, &p.root, "running_var", &cd, &t)) != 0)
      goto fail;
    sbn__steal(&t, &out->running_var);
    nbt = sbn__get(&p.root, "num_batches_tracked");
    if (nbt == NULL || nbt->type != MSGPACK_OBJECT_POSITIVE_INTEGER ||
        nbt->via.u64 > INT64_MAX) {
      rc = sbn__cfail(c, SBN_EFORMAT, "",
                      "get_state: reply lacks 'num_batches_tracked'");
      goto fail;
    }
    out->num_batches_tracked = (int64_t)nbt->via.u64;
    out->has_running_stats = 1;
    out->has_num_batches_tracked = 1;
  }
  if (sbn__get(&p.root, "weight") != NULL) {
    if ((rc = sbn__decode_f32(c, &p.root, "weight", NULL, &t)) != 0)
      goto fail;
    out->param_desc = t.desc;
    sbn__steal(&t, &out->weight);
    if ((rc = sbn__decode_f32(c, &p.root, "bias", &out->param_desc, &t)) != 0)
      goto fail;
    sbn__steal(&t, &out->bias);
    out->has_affine = 1;
  }
  sbn__reply_free(&p);
  return 0;
fail:
  sbn__reply_free(&p);
  sbn_client_state_free(out);
  return rc;
}

int sbn_client_set_state(sbn_client_t *c, uint64_t layer,
                         const sbn_client_state_t *s) {
  sbn__req_t r;
  sbn__reply_t p;
  sbn_tensor_desc_t cd, pd;
  size_t n = 3, pn = 0;
  int rc;
  memset(&cd, 0, sizeof cd);
  cd.ndim = 1;
  cd.dims[0] = s->channels;
  pd = s->param_desc;
  /* A 1-D parameter shape may be left out: it is [channels]. */
  if (pd.ndim == 0)
    pd = cd;
  if ((s->weight != NULL || s->bias != NULL) &&
      (rc = sbn_desc_numel(&pd, &pn)) != 0)
    return sbn__cfail(c, rc, "", "param_desc: %s", sbn_last_error());
  if (s->has_num_batches_tracked && s->num_batches_tracked < 0)
    return sbn__cfail(c, SBN_EINVAL, "", "num_batches_tracked: negative");
  n += (s->running_mean != NULL) + (s->running_var != NULL) +
       (s->weight != NULL) + (s->bias != NULL) +
       (s->has_num_batches_tracked != 0);
  sbn__req_start(c, &r, "set_state", n);
  sbn__key(&r.pk, "layer");
  r.bad |= msgpack_pack_uint64(&r.pk, layer);
  if (s->running_mean != NULL) {
    sbn__key(&r.pk, "running_mean");
    r.bad |= svc_pack_tensor(&r.pk, &cd, s->running_mean, s->channels);
  }
  if (s->running_var != NULL) {
    sbn__key(&r.pk, "running_var");
    r.bad |= svc_pack_tensor(&r.pk, &cd, s->running_var, s->channels);
  }
  if (s->has_num_batches_tracked) {
    sbn__key(&r.pk, "num_batches_tracked");
    r.bad |= msgpack_pack_uint64(&r.pk, (uint64_t)s->num_batches_tracked);
  }
  if (s->weight != NULL) {
    sbn__key(&r.pk, "weight");
    r.bad |= svc_pack_tensor(&r.pk, &pd, s->weight, pn);
  }
  if (s->bias != NULL) {
    sbn__key(&r.pk, "bias");
    r.bad |= svc_pack_tensor(&r.pk, &pd, s->bias, pn);
  }
  if ((rc = sbn__req_send(c, &r)) != 0 || (rc = sbn__reply(c, r.id, &p)) != 0)
    return rc;
  sbn__reply_free(&p);
  return 0;
}

/* ------------------------------------------------------------------ */
/* checkpoint_save, checkpoint_load */

static int sbn__checkpoint(sbn_client_t *c, const char *op, const char *done,
                           const char *name, uint64_t *layers) {
  sbn__req_t r;
  sbn__reply_t p;
  const msgpack_object *ok;
  uint64_t nl = 0;
  int rc;
  if (name == NULL)
    return sbn__cfail(c, SBN_EINVAL, "", "%s: no name", op);
  sbn__req_start(c, &r, op, 3);
  sbn__key(&r.pk, "name");
  sbn__key(&r.pk, name);
  if ((rc = sbn__req_send(c, &r)) != 0 || (rc = sbn__reply(c, r.id, &p)) != 0)
    return rc;
  ok = sbn__get(&p.root, done);
  if (sbn__uint_field(&p.root, "layers", &nl) != 0 || ok == NULL ||
      ok->type != MSGPACK_OBJECT_BOOLEAN || !ok->via.boolean) {
    sbn__reply_free(&p);
    return sbn__cfail(c, SBN_EFORMAT, "", "%s: reply lacks '%s'", op, done);
  }
  if (layers != NULL)
    *layers = nl;
  sbn__reply_free(&p);
  return 0;
}

int sbn_client_checkpoint_save(sbn_client_t *c, const char *name,
                               uint64_t *layers) {
  return sbn__checkpoint(c, "checkpoint_save", "saved", name, layers);
}

int sbn_client_checkpoint_load(sbn_client_t *c, const char *name,
                               uint64_t *layers) {
  return sbn__checkpoint(c, "checkpoint_load", "loaded", name, layers);
}

/* ------------------------------------------------------------------ */
/* metrics */

/* Copies a map str -> uint into tab (at most SBN_CLIENT_METRICS_NAMES
 * entries; names too long for an entry are left out, since a lookup could
 * not match them). */
static int sbn__take_counts(const msgpack_object *m, sbn_client_count_t *tab,
                            size_t *n) {
  *n = 0;
  if (m == NULL || m->type != MSGPACK_OBJECT_MAP)
    return -1;
  for (uint32_t i = 0; i < m->via.map.size; i++) {
    const msgpack_object *k = &m->via.map.ptr[i].key,
                         *v = &m->via.map.ptr[i].val;
    if (k->type != MSGPACK_OBJECT_STR ||
        v->type != MSGPACK_OBJECT_POSITIVE_INTEGER)
      return -1;
    if (*n == SBN_CLIENT_METRICS_NAMES || k->via.str.size >= sizeof tab->name)
      continue;
    memcpy(tab[*n].name, k->via.str.ptr, k->via.str.size);
    tab[*n].name[k->via.str.size] = '\0';
    tab[*n].n = v->via.u64;
    (*n)++;
  }
  return 0;
}

static uint64_t sbn__count_of(const sbn_client_count_t *tab, size_t n,
                              const char *name) {
  for (size_t i = 0; i < n; i++)
    if (strcmp(tab[i].name, name) == 0)
      return tab[i].n;
  return 0;
}

uint64_t sbn_client_metrics_requests(const sbn_client_metrics_t *m,
                                     const char *op) {
  return sbn__count_of(m->requests, m->nrequests, op);
}

uint64_t sbn_client_metrics_errors(const sbn_client_metrics_t *m,
                                   const char *code) {
  return sbn__count_of(m->errors, m->nerrors, code);
}

int sbn_client_metrics(sbn_client_t *c, sbn_client_metrics_t *out) {
  static const char *const buckets[8] = {"1",    "2",     "3-4",   "5-8",
                                         "9-16", "17-32", "33-64", "65+"};
  sbn__req_t r;
  sbn__reply_t p;
  sbn_client_metrics_t m;
  const msgpack_object *fused, *lat;
  const struct {
    const char *key;
    uint64_t *v;
  } u[] = {{"bytes_in", &m.bytes_in},
           {"bytes_out", &m.bytes_out},
           {"frames_in", &m.frames_in},
           {"frames_out", &m.frames_out},
           {"connections", &m.connections},
           {"auth_failures", &m.auth_failures},
           {"allreduces", &m.allreduces},
           {"entries_fused", &m.entries_fused},
           {"gathers", &m.gathers},
           {"stalls", &m.stalls},
           {"mismatches", &m.mismatches},
           {"saved_bytes", &m.saved_bytes},
           {"layers", &m.layers}};
  int rc, bad = 0;
  memset(&m, 0, sizeof m);
  sbn__req_start(c, &r, "metrics", 2);
  if ((rc = sbn__req_send(c, &r)) != 0 || (rc = sbn__reply(c, r.id, &p)) != 0)
    return rc;
  bad |=
      sbn__take_counts(sbn__get(&p.root, "requests"), m.requests, &m.nrequests);
  bad |= sbn__take_counts(sbn__get(&p.root, "errors"), m.errors, &m.nerrors);
  for (size_t i = 0; i < sizeof u / sizeof *u; i++)
    bad |= sbn__uint_field(&p.root, u[i].key, u[i].v);
  fused = sbn__get(&p.root, "fused_per_allreduce");
  for (int i = 0; i < 8; i++)
    bad |= fused == NULL ||
           sbn__uint_field(fused, buckets[i], &m.fused_per_allreduce[i]) != 0;
  lat = sbn__get(&p.root, "allreduce_latency");
  bad |= lat == NULL || sbn__uint_field(lat, "count", &m.latency_count) != 0 ||
         sbn__num_field(lat, "p50", &m.latency_p50) != 0 ||
         sbn__num_field(lat, "p90", &m.latency_p90) != 0 ||
         sbn__num_field(lat, "p99", &m.latency_p99) != 0 ||
         sbn__num_field(lat, "max", &m.latency_max) != 0;
  sbn__reply_free(&p);
  if (bad)
    return sbn__cfail(c, SBN_EFORMAT, "", "metrics: reply lacks a field");
  if (out != NULL)
    *out = m;
  return 0;
}

/* ------------------------------------------------------------------ */
/* batch */

typedef struct sbn__sub_s {
  svc_op_t op;
  sbn_tensor_desc_t desc; /* forward, backward: the shape of x or dy */
  size_t channels;        /* stats, stats_backward */
  svc_tensor_t t[3];      /* y or dx, dweight, dbias */
  double *v;              /* the stats replies' arrays */
  sbn_client_result_t res;
} sbn__sub_t;

struct sbn_client_batch_s {
  /* The sub-request maps, packed as they are queued; run sends the batch
   * head and then these bytes, so tensors are copied only once. */
  msgpack_sbuffer sb;
  msgpack_packer pk;
  sbn__sub_t *subs;
  size_t n, cap;
  int have_results;
};

static void sbn__batch_clear(sbn_client_batch_t *b) {
  for (size_t i = 0; i < b->n; i++) {
    sbn__sub_t *s = &b->subs[i];
    for (int k = 0; k < 3; k++)
      svc_tensor_free(&s->t[k]);
    free(s->v);
    s->v = NULL;
    memset(&s->res, 0, sizeof s->res);
  }
  b->have_results = 0;
}

int sbn_client_batch_new(sbn_client_batch_t **out) {
  sbn_client_batch_t *b = calloc(1, sizeof *b);
  *out = NULL;
  if (b == NULL)
    return SBN_ENOMEM;
  msgpack_sbuffer_init(&b->sb);
  msgpack_packer_init(&b->pk, &b->sb, msgpack_sbuffer_write);
  *out = b;
  return 0;
}

void sbn_client_batch_free(sbn_client_batch_t *b) {
  if (b == NULL)
    return;
  sbn__batch_clear(b);
  msgpack_sbuffer_destroy(&b->sb);
  free(b->subs);
  free(b);
}

void sbn_client_batch_reset(sbn_client_batch_t *b) {
  sbn__batch_clear(b);
  b->n = 0;
  b->sb.size = 0;
}

size_t sbn_client_batch_size(const sbn_client_batch_t *b) {
  return b->n;
}

/* Makes room for one more sub-request and returns it (zeroed), or NULL
 * with *rc set. It counts only once its map is packed (sbn__batch_commit). */
static sbn__sub_t *sbn__batch_slot(sbn_client_batch_t *b, svc_op_t op,
                                   int *rc) {
  sbn__sub_t *s;
  if (b->n == SVC_BATCH_MAX) {
    *rc = SBN_ELIMIT;
    return NULL;
  }
  if (b->n == b->cap) {
    size_t cap = b->cap == 0 ? 8 : 2 * b->cap;
    sbn__sub_t *p = realloc(b->subs, cap * sizeof *p);
    if (p == NULL) {
      *rc = SBN_ENOMEM;
      return NULL;
    }
    b->subs = p;
    b->cap = cap;
  }
  /* Queueing after a run starts a new set of requests: the old results
   * would no longer line up with them. */
  if (b->have_results)
    sbn__batch_clear(b);
  s = &b->subs[b->n];
  memset(s, 0, sizeof *s);
  s->op = op;
  return s;
}

/* Keeps the sub-request whose map was just packed, or drops its bytes if
 * packing failed (old: the buffer size before it). */
static int sbn__batch_commit(sbn_client_batch_t *b, int packed, size_t old) {
  if (packed != 0) {
    b->sb.size = old;
    return SBN_ENOMEM;
  }
  b->n++;
  return 0;
}

int sbn_client_batch_forward(sbn_client_batch_t *b, uint64_t layer,
                             uint64_t step, int train,
                             const sbn_tensor_desc_t *desc, const float *x,
                             const float *weight, const float *bias,
                             size_t wb_numel) {
  size_t numel, old = b->sb.size;
  int rc;
  sbn__sub_t *s;
  if ((rc = sbn_desc_numel(desc, &numel)) != 0)
    return rc;
  if ((s = sbn__batch_slot(b, SVC_OP_FORWARD, &rc)) == NULL)
    return rc;
  s->desc = *desc;
  return sbn__batch_commit(
      b,
      sbn__pack_forward(&b->pk, b->n, layer, step, train, desc, x, numel,
                        weight, bias, wb_numel),
      old);
}

int sbn_client_batch_backward(sbn_client_batch_t *b, uint64_t layer,
                              uint64_t step, const sbn_tensor_desc_t *desc,
                              const float *dy) {
  size_t numel, old = b->sb.size;
  int rc;
  sbn__sub_t *s;
  if ((rc = sbn_desc_numel(desc, &numel)) != 0)
    return rc;
  if ((s = sbn__batch_slot(b, SVC_OP_BACKWARD, &rc)) == NULL)
    return rc;
  s->desc = *desc;
  return sbn__batch_commit(
      b, sbn__pack_backward(&b->pk, b->n, layer, step, desc, dy, numel), old);
}

int sbn_client_batch_stats(sbn_client_batch_t *b, uint64_t layer, uint64_t step,
                           size_t channels, uint64_t count,
                           const double *counts, const double *mean,
                           const double *m2) {
  size_t old = b->sb.size;
  int rc;
  sbn__sub_t *s;
  if (channels == 0 || mean == NULL || m2 == NULL)
    return SBN_EINVAL;
  if (channels > UINT32_MAX / sizeof(double))
    return SBN_ELIMIT;
  if ((s = sbn__batch_slot(b, SVC_OP_STATS, &rc)) == NULL)
    return rc;
  s->channels = channels;
  return sbn__batch_commit(b,
                           sbn__pack_stats(&b->pk, b->n, layer, step, channels,
                                           count, counts, mean, m2),
                           old);
}

int sbn_client_batch_stats_backward(sbn_client_batch_t *b, uint64_t layer,
                                    uint64_t step, size_t channels,
                                    const double *sum_dy,
                                    const double *sum_dy_xhat) {
  size_t old = b->sb.size;
  int rc;
  sbn__sub_t *s;
  if (channels == 0 || sum_dy == NULL || sum_dy_xhat == NULL)
    return SBN_EINVAL;
  if (channels > UINT32_MAX / sizeof(double))
    return SBN_ELIMIT;
  if ((s = sbn__batch_slot(b, SVC_OP_STATS_BACKWARD, &rc)) == NULL)
    return rc;
  s->channels = channels;
  return sbn__batch_commit(
      b,
      sbn__pack_stats_backward(&b->pk, b->n, layer, step, channels, sum_dy,
                               sum_dy_xhat),
      old);
}

/* Reads sub-reply i (m) into s->res. A sub-request's error reply is its
 * result; only a reply that breaks the protocol fails (the whole run). */
static int sbn__batch_take(sbn_client_t *c, sbn__sub_t *s, size_t i,
                           const msgpack_object *m) {
  sbn_client_result_t *r = &s->res;
  uint64_t id;
  int e, rc;
  e = sbn__error_of(m, r->code, sizeof r->code, r->message, sizeof r->message);
  if (e < 0)
    return sbn__cfail(c, SBN_EFORMAT, "",
                      "batch: replies[%zu]: error without a code", i);
  if (e > 0) {
    r->rc = sbn__server_rc(r->code);
    return 0;
  }
  if (sbn__uint_field(m, "id", &id) != 0 || id != i)
    return sbn__cfail(c, SBN_EFORMAT, "",
                      "batch: replies[%zu]: id does not match", i);
  switch (s->op) {
    case SVC_OP_FORWARD:
    case SVC_OP_BACKWARD: {
      int fwd = s->op == SVC_OP_FORWARD;
      if ((rc = sbn__decode_f32(c, m, fwd ? "y" : "dx", &s->desc, &s->t[0])) !=
          0)
        return rc;
      r->numel = s->t[0].numel;
      *(fwd ? &r->y : &r->dx) = s->t[0].data;
      if (!fwd && sbn__get(m, "dweight") != NULL) {
        if ((rc = sbn__decode_f32(c, m, "dweight", NULL, &s->t[1])) != 0 ||
            (rc = sbn__decode_f32(c, m, "dbias", &s->t[1].desc, &s->t[2])) != 0)
          return rc;
        r->dweight = s->t[1].data;
        r->dbias = s->t[2].data;
        r->wb_numel = s->t[1].numel;
      }
      return 0;
    }
    case SVC_OP_STATS:
    case SVC_OP_STATS_BACKWARD: {
      size_t C = s->channels, k = s->op == SVC_OP_STATS ? 5 : 2;
      double *v = malloc(k * C * sizeof *v);
      if (v == NULL)
        return sbn__cfail(c, SBN_ENOMEM, "", "batch: out of memory");
      s->v = v;
      r->channels = C;
      if (s->op == SVC_OP_STATS_BACKWARD) {
        r->sum_dy = v;
        r->sum_dy_xhat = v + C;
        if ((rc = sbn__take_vec64(c, m, "sum_dy", C, v)) != 0)
          return rc;
        return sbn__take_vec64(c, m, "sum_dy_xhat", C, v + C);
      }
      r->count = v;
      r->mean = v + C;
      r->var = v + 2 * C;
      r->var_unbiased = v + 3 * C;
      r->invstd = v + 4 * C;
      return sbn__take_stats(c, m, C, v, v + C, v + 2 * C, v + 3 * C,
                             v + 4 * C);
    }
    default:
      return sbn__cfail(c, SBN_EFORMAT, "", "batch: sub-request %zu", i);
  }
}

int sbn_client_batch_run(sbn_client_t *c, sbn_client_batch_t *b) {
  msgpack_sbuffer hs;
  msgpack_packer hpk;
  sbn__reply_t p;
  const msgpack_object *replies;
  uint64_t id;
  size_t body;
  int rc, packed;
  sbn__batch_clear(b);
  if (b->n == 0)
    return sbn__cfail(c, SBN_EINVAL, "", "batch: no sub-requests");
  id = c->next_id++;
  msgpack_sbuffer_init(&hs);
  msgpack_packer_init(&hpk, &hs, msgpack_sbuffer_write);
  packed = msgpack_sbuffer_write(&hs, "\0\0\0\0", 4);
  packed |= sbn__pack_head(&hpk, "batch", id, 3);
  packed |= msgpack_pack_str_with_body(&hpk, "requests", 8);
  packed |= msgpack_pack_array(&hpk, b->n);
  if (packed != 0 || hs.data == NULL) {
    msgpack_sbuffer_destroy(&hs);
    return sbn__cfail(c, SBN_ENOMEM, "", "batch: out of memory");
  }
  body = hs.size - 4 + b->sb.size;
  if (body > UINT32_MAX) {
    msgpack_sbuffer_destroy(&hs);
    return sbn__cfail(c, SBN_ELIMIT, "", "batch: larger than 4 GiB");
  }
  hs.data[0] = (char)(body >> 24);
  hs.data[1] = (char)(body >> 16);
  hs.data[2] = (char)(body >> 8);
  hs.data[3] = (char)body;
  rc = sbn_client_send_raw(c, hs.data, hs.size);
  msgpack_sbuffer_destroy(&hs);
  if (rc != 0 || (rc = sbn_client_send_raw(c, b->sb.data, b->sb.size)) != 0 ||
      (rc = sbn__reply(c, id, &p)) != 0)
    return rc;
  replies = sbn__get(&p.root, "replies");
  if (replies == NULL || replies->type != MSGPACK_OBJECT_ARRAY ||
      replies->via.array.size != b->n) {
    rc = sbn__cfail(c, SBN_EFORMAT, "", "batch: reply lacks %zu replies", b->n);
    goto fail;
  }
  for (size_t i = 0; i < b->n; i++)
    if ((rc = sbn__batch_take(c, &b->subs[i], i, &replies->via.array.ptr[i])) !=
        0)
      goto fail;
  sbn__reply_free(&p);
  b->have_results = 1;
  return 0;
fail:
  sbn__reply_free(&p);
  sbn__batch_clear(b);
  return rc;
}

const sbn_client_result_t *sbn_client_batch_result(const sbn_client_batch_t *b,
                                                   size_t i) {
  if (!b->have_results || i >= b->n)
    return NULL;
  return &b->subs[i].res;
}
