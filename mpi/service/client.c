/* syncbn client (see client.h). */
#include "client.h"

#include <errno.h>
#include <msgpack.h>
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
 * from a garbage count. */
static const svc_limits_t sbn__reply_limits = {UINT32_MAX, 8, 4096};

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
} sbn__req_t;

static void sbn__key(msgpack_packer *pk, const char *k) {
  msgpack_pack_str_with_body(pk, k, strlen(k));
}

/* Starts a request map of n entries (op and id included). */
static void sbn__req_start(sbn_client_t *c, sbn__req_t *r, const char *op,
                           size_t n) {
  msgpack_sbuffer_init(&r->sb);
  msgpack_packer_init(&r->pk, &r->sb, msgpack_sbuffer_write);
  msgpack_sbuffer_write(&r->sb, "\0\0\0\0", 4);
  r->id = c->next_id++;
  msgpack_pack_map(&r->pk, n);
  sbn__key(&r->pk, "op");
  sbn__key(&r->pk, op);
  sbn__key(&r->pk, "id");
  msgpack_pack_uint64(&r->pk, r->id);
}

static int sbn__req_send(sbn_client_t *c, sbn__req_t *r) {
  size_t body;
  int rc;
  if (r->sb.data == NULL || r->sb.size < 4) {
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

/* Receives the reply to request id and turns an error reply into a code. */
static int sbn__reply(sbn_client_t *c, uint64_t id, sbn__reply_t *p) {
  size_t len, off = 0;
  svc_err_t err;
  const msgpack_object *o, *e;
  int rc;
  memset(p, 0, sizeof *p);
  c->code[0] = '\0';
  c->msg[0] = '\0';
  if ((rc = sbn_client_recv_frame(c, &p->body, &len)) != 0)
    return rc;
  if (svc_scan(p->body, len, &sbn__reply_limits, &err) != 0) {
    rc = sbn__cfail(c, SBN_EFORMAT, "", "reply: %s", err.msg);
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
  if ((e = sbn__get(&p->root, "error")) != NULL) {
    const msgpack_object *code = sbn__get(e, "code");
    const msgpack_object *msg = sbn__get(e, "message");
    if (code == NULL || code->type != MSGPACK_OBJECT_STR) {
      rc = sbn__cfail(c, SBN_EFORMAT, "", "reply: error without a code");
      goto fail;
    }
    snprintf(c->code, sizeof c->code, "%.*s", (int)code->via.str.size,
             code->via.str.ptr);
    if (msg != NULL && msg->type == MSGPACK_OBJECT_STR)
      snprintf(c->msg, sizeof c->msg, "%.*s", (int)msg->via.str.size,
               msg->via.str.ptr);
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
  svc_err_t err;
  if (o == NULL)
    return sbn__cfail(c, SBN_EFORMAT, "", "reply: no '%s'", key);
  if (svc_decode_tensor(o, key, &t, &err) != 0)
    return sbn__cfail(c, SBN_EFORMAT, "", "reply: %s", err.msg);
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

int sbn_client_hello(sbn_client_t *c, sbn_client_hello_t *out) {
  sbn__req_t r;
  sbn__reply_t p;
  const msgpack_object *lim;
  uint64_t proto, rank, size, mf = 0, ks = 0;
  int rc;
  sbn__req_start(c, &r, "hello", 3);
  sbn__key(&r.pk, "version");
  msgpack_pack_uint32(&r.pk, SVC_PROTOCOL_VERSION);
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

int sbn_client_forward(sbn_client_t *c, uint64_t layer, uint64_t step,
                       int train, const sbn_tensor_desc_t *desc, const float *x,
                       const float *weight, const float *bias, size_t wb_numel,
                       float *y) {
  sbn__req_t r;
  sbn__reply_t p;
  sbn_tensor_desc_t wd;
  size_t numel;
  int rc;
  if ((rc = sbn__desc_numel(desc, &numel)) != 0)
    return sbn__cfail(c, rc, "", "desc: %s", sbn_last_error());
  memset(&wd, 0, sizeof wd);
  wd.ndim = 1;
  wd.dims[0] = wb_numel;
  sbn__req_start(c, &r, "forward",
                 6 + (weight != NULL ? 1 : 0) + (bias != NULL ? 1 : 0));
  sbn__key(&r.pk, "layer");
  msgpack_pack_uint64(&r.pk, layer);
  sbn__key(&r.pk, "step");
  msgpack_pack_uint64(&r.pk, step);
  sbn__key(&r.pk, "train");
  train ? msgpack_pack_true(&r.pk) : msgpack_pack_false(&r.pk);
  sbn__key(&r.pk, "x");
  svc_pack_tensor(&r.pk, desc, x, numel);
  if (weight != NULL) {
    sbn__key(&r.pk, "weight");
    svc_pack_tensor(&r.pk, &wd, weight, wb_numel);
  }
  if (bias != NULL) {
    sbn__key(&r.pk, "bias");
    svc_pack_tensor(&r.pk, &wd, bias, wb_numel);
  }
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
  sbn__req_start(c, &r, "backward", 5);
  sbn__key(&r.pk, "layer");
  msgpack_pack_uint64(&r.pk, layer);
  sbn__key(&r.pk, "step");
  msgpack_pack_uint64(&r.pk, step);
  sbn__key(&r.pk, "dy");
  svc_pack_tensor(&r.pk, desc, dy, numel);
  if ((rc = sbn__req_send(c, &r)) != 0 || (rc = sbn__reply(c, r.id, &p)) != 0)
    return rc;
  rc = sbn__take_tensor(c, &p.root, "dx", desc, dx);
  if (rc == 0 && sbn__get(&p.root, "dweight") != NULL &&
      (dweight != NULL || dbias != NULL)) {
    sbn_tensor_desc_t wd;
    const msgpack_object *o = sbn__get(&p.root, "dweight");
    svc_tensor_t t;
    svc_err_t err;
    /* The parameter shape is the layer's (C, or LayerNorm's normalized
     * shape); only its size is checked here. */
    if (svc_decode_tensor(o, "dweight", &t, &err) != 0 || t.numel != wb_numel) {
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
