/* The syncbnd codec's encoding: reply frames (see svc_codec.h). */
#include <msgpack.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "svc_codec.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the codec copies f32 payloads as is: a little-endian host is needed"
#endif

/* ------------------------------------------------------------------ */
/* Replies */

static void svc__pack_key(msgpack_packer *pk, const char *k) {
  msgpack_pack_str_with_body(pk, k, strlen(k));
}

static void svc__pack_id(msgpack_packer *pk, const svc_id_t *id) {
  svc__pack_key(pk, "id");
  if (id == NULL || !id->present)
    msgpack_pack_nil(pk);
  else if (id->negative)
    msgpack_pack_int64(pk, id->i);
  else
    msgpack_pack_uint64(pk, id->u);
}

/* The keys every reply tensor starts with: dtype, shape and layout. */
static int svc__pack_tensor_head(msgpack_packer *pk,
                                 const sbn_tensor_desc_t *desc, uint32_t keys) {
  int rc = 0;
  rc |= msgpack_pack_map(pk, keys);
  svc__pack_key(pk, "dtype");
  rc |= msgpack_pack_str_with_body(pk, "f32", 3);
  svc__pack_key(pk, "shape");
  rc |= msgpack_pack_array(pk, (size_t)desc->ndim);
  for (int i = 0; i < desc->ndim; i++)
    rc |= msgpack_pack_uint64(pk, desc->dims[i]);
  svc__pack_key(pk, "layout");
  rc |= msgpack_pack_str_with_body(
      pk, desc->layout == SBN_LAYOUT_NHWC ? "nhwc" : "nchw", 4);
  return rc;
}

int svc_pack_tensor_at(msgpack_packer *pk, const sbn_tensor_desc_t *desc,
                       const svc_shm_at_t *at) {
  int rc = svc__pack_tensor_head(pk, desc, 5);
  svc__pack_key(pk, "region");
  rc |= msgpack_pack_uint64(pk, at->region);
  svc__pack_key(pk, "offset");
  rc |= msgpack_pack_uint64(pk, at->offset);
  return rc != 0 ? svc_set_error(SVC_RESOURCE, "reply: out of memory") : 0;
}

int svc_pack_tensor_open(msgpack_packer *pk, const sbn_tensor_desc_t *desc,
                         size_t numel) {
  int rc = svc__pack_tensor_head(pk, desc, 4);
  svc__pack_key(pk, "data");
  rc |= msgpack_pack_bin(pk, numel * sizeof(float));
  return rc != 0 ? svc_set_error(SVC_RESOURCE, "reply: out of memory") : 0;
}

int svc_pack_tensor(msgpack_packer *pk, const sbn_tensor_desc_t *desc,
                    const float *data, size_t numel) {
  int rc = svc_pack_tensor_open(pk, desc, numel);
  if (rc == 0 && numel > 0 &&
      msgpack_pack_bin_body(pk, data, numel * sizeof(float)) != 0)
    rc = svc_set_error(SVC_RESOURCE, "reply: out of memory");
  return rc;
}

/* msgpack-c's packers ignore a failed write of one piece and go on with the
 * next; this writer makes every failure sticky, so an out-of-memory reply
 * is never sent half written. */
typedef struct svc__out_s {
  msgpack_sbuffer sb;
  int failed;
} svc__out_t;

static int svc__write(void *data, const char *buf, size_t len) {
  svc__out_t *o = data;
  if (o->failed || msgpack_sbuffer_write(&o->sb, buf, len) != 0) {
    o->failed = 1;
    return -1;
  }
  return 0;
}

/* Starts a reply frame: 4 header bytes patched by svc__finish. */
static int svc__start(svc__out_t *o, msgpack_packer *pk, size_t hint) {
  msgpack_sbuffer *sb = &o->sb;
  msgpack_sbuffer_init(sb);
  o->failed = 0;
  msgpack_packer_init(pk, o, svc__write);
  if (hint > 0 && hint < SIZE_MAX - 256) {
    /* One allocation for a tensor reply instead of repeated doubling. */
    sb->data = malloc(hint + 256);
    if (sb->data == NULL)
      return -1;
    sb->alloc = hint + 256;
  }
  return msgpack_sbuffer_write(sb, "\0\0\0\0", 4);
}

/* Ends a reply frame whose body is the buffer's bytes plus extra bytes
 * written after it (a frame's tail); rc is the OR of msgpack-c's own
 * returns while it was packed (0 or -1), which is its convention, not
 * the service's. */
static int svc__finish_n(svc__out_t *o, int rc, size_t extra, uint8_t **out,
                         size_t *out_len) {
  msgpack_sbuffer *sb = &o->sb;
  size_t body;
  if (rc != 0 || o->failed || sb->size < 4 || extra > UINT32_MAX ||
      sb->size - 4 > UINT32_MAX - extra) {
    msgpack_sbuffer_destroy(sb);
    *out = NULL;
    *out_len = 0;
    return svc_set_error(SVC_RESOURCE, "reply: out of memory");
  }
  body = sb->size - 4 + extra;
  sb->data[0] = (char)(body >> 24);
  sb->data[1] = (char)(body >> 16);
  sb->data[2] = (char)(body >> 8);
  sb->data[3] = (char)body;
  *out_len = sb->size;
  *out = (uint8_t *)msgpack_sbuffer_release(sb);
  return 0;
}

static int svc__finish(svc__out_t *o, int rc, uint8_t **out, size_t *out_len) {
  return svc__finish_n(o, rc, 0, out, out_len);
}

int svc_encode_error(const svc_id_t *id, svc_code_t code, const char *message,
                     uint8_t **out, size_t *out_len) {
  svc__out_t sb;
  msgpack_packer pk;
  int rc = svc__start(&sb, &pk, 0);
  rc |= msgpack_pack_map(&pk, 2);
  svc__pack_id(&pk, id);
  svc__pack_key(&pk, "error");
  rc |= msgpack_pack_map(&pk, 2);
  svc__pack_key(&pk, "code");
  svc__pack_key(&pk, svc_code_name(code));
  svc__pack_key(&pk, "message");
  svc__pack_key(&pk, message != NULL ? message : "");
  return svc__finish(&sb, rc, out, out_len);
}

int svc_encode_hello(const svc_id_t *id, const svc_hello_reply_t *h,
                     uint8_t **out, size_t *out_len) {
  svc__out_t sb;
  msgpack_packer pk;
  int rc = svc__start(&sb, &pk, 0);
  rc |= msgpack_pack_map(&pk, 6);
  svc__pack_id(&pk, id);
  svc__pack_key(&pk, "protocol");
  rc |= msgpack_pack_uint32(&pk, SVC_PROTOCOL_VERSION);
  svc__pack_key(&pk, "server");
  svc__pack_key(&pk, "syncbnd");
  svc__pack_key(&pk, "rank");
  rc |= msgpack_pack_int(&pk, h->rank);
  svc__pack_key(&pk, "size");
  rc |= msgpack_pack_int(&pk, h->size);
  svc__pack_key(&pk, "limits");
  rc |= msgpack_pack_map(&pk, 8);
  svc__pack_key(&pk, "max_frame");
  rc |= msgpack_pack_uint32(&pk, h->max_frame);
  svc__pack_key(&pk, "max_depth");
  rc |= msgpack_pack_uint32(&pk, h->max_depth);
  svc__pack_key(&pk, "max_objects");
  rc |= msgpack_pack_uint32(&pk, h->max_objects);
  svc__pack_key(&pk, "max_clients");
  rc |= msgpack_pack_uint32(&pk, h->max_clients);
  svc__pack_key(&pk, "max_output");
  rc |= msgpack_pack_uint64(&pk, h->max_output);
  svc__pack_key(&pk, "idle_timeout");
  rc |= msgpack_pack_double(&pk, h->idle_timeout);
  svc__pack_key(&pk, "frame_timeout");
  rc |= msgpack_pack_double(&pk, h->frame_timeout);
  svc__pack_key(&pk, "keep_steps");
  rc |= msgpack_pack_uint32(&pk, h->keep_steps);
  return svc__finish(&sb, rc, out, out_len);
}

int svc_encode_register(const svc_id_t *id, uint64_t layer, int created,
                        uint8_t **out, size_t *out_len) {
  svc__out_t sb;
  msgpack_packer pk;
  int rc = svc__start(&sb, &pk, 0);
  rc |= msgpack_pack_map(&pk, 3);
  svc__pack_id(&pk, id);
  svc__pack_key(&pk, "layer");
  rc |= msgpack_pack_uint64(&pk, layer);
  svc__pack_key(&pk, "created");
  rc |= created ? msgpack_pack_true(&pk) : msgpack_pack_false(&pk);
  return svc__finish(&sb, rc, out, out_len);
}

/* Packs a reply tensor. With at != NULL its data bytes are left out (the
 * bin header goes in) and *at says where they go in the frame. */
static int svc__pack_tensor_or_splice(svc__out_t *o, msgpack_packer *pk,
                                      const sbn_tensor_desc_t *desc,
                                      const float *data, size_t numel,
                                      size_t *at) {
  int rc;
  if (at == NULL)
    return svc_pack_tensor(pk, desc, data, numel);
  rc = svc_pack_tensor_open(pk, desc, numel);
  *at = o->sb.size;
  return rc;
}

/* The forward reply {id, y}; with at != NULL, y's bytes are left out. */
static int svc__encode_fwd(const svc_id_t *id, const sbn_tensor_desc_t *desc,
                           const float *y, size_t numel, size_t *at,
                           uint8_t **out, size_t *out_len) {
  svc__out_t sb;
  msgpack_packer pk;
  int rc = svc__start(&sb, &pk, at != NULL ? 0 : numel * sizeof(float));
  rc |= msgpack_pack_map(&pk, 2);
  svc__pack_id(&pk, id);
  svc__pack_key(&pk, "y");
  rc |= svc__pack_tensor_or_splice(&sb, &pk, desc, y, numel, at);
  return svc__finish_n(&sb, rc, at != NULL ? numel * sizeof(float) : 0, out,
                       out_len);
}

/* The backward reply {id, dx[, dweight, dbias]}; with at != NULL, dx's
 * bytes are left out. */
static int svc__encode_bwd(const svc_id_t *id, const sbn_tensor_desc_t *desc,
                           const float *dx, size_t numel, const float *dw,
                           const float *db, const sbn_tensor_desc_t *wb_desc,
                           size_t wb_numel, size_t *at, uint8_t **out,
                           size_t *out_len) {
  svc__out_t sb;
  msgpack_packer pk;
  int wb = dw != NULL && db != NULL;
  int rc = svc__start(
      &sb, &pk, ((at != NULL ? 0 : numel) + 2 * wb_numel) * sizeof(float));
  rc |= msgpack_pack_map(&pk, wb ? 4 : 2);
  svc__pack_id(&pk, id);
  svc__pack_key(&pk, "dx");
  rc |= svc__pack_tensor_or_splice(&sb, &pk, desc, dx, numel, at);
  if (wb) {
    svc__pack_key(&pk, "dweight");
    rc |= svc_pack_tensor(&pk, wb_desc, dw, wb_numel);
    svc__pack_key(&pk, "dbias");
    rc |= svc_pack_tensor(&pk, wb_desc, db, wb_numel);
  }
  return svc__finish_n(&sb, rc, at != NULL ? numel * sizeof(float) : 0, out,
                       out_len);
}

int svc_encode_forward(const svc_id_t *id, const sbn_tensor_desc_t *desc,
                       const float *y, size_t numel, uint8_t **out,
                       size_t *out_len) {
  return svc__encode_fwd(id, desc, y, numel, NULL, out, out_len);
}

int svc_encode_backward(const svc_id_t *id, const sbn_tensor_desc_t *desc,
                        const float *dx, size_t numel, const float *dw,
                        const float *db, const sbn_tensor_desc_t *wb_desc,
                        size_t wb_numel, uint8_t **out, size_t *out_len) {
  return svc__encode_bwd(id, desc, dx, numel, dw, db, wb_desc, wb_numel, NULL,
                         out, out_len);
}

/* The frame takes the tensor t (numel floats) as its tail. */
static void svc__frame_take(svc_frame_t *f, float **t, size_t numel) {
  f->tail = *t;
  f->tail_len = numel * sizeof(float);
  *t = NULL;
}

int svc_encode_forward_frame(const svc_id_t *id, const sbn_tensor_desc_t *desc,
                             float **y, size_t numel, svc_frame_t *f) {
  int rc;
  memset(f, 0, sizeof *f);
  rc = svc__encode_fwd(id, desc, *y, numel, &f->at, &f->buf, &f->len);
  if (rc == 0)
    svc__frame_take(f, y, numel);
  return rc;
}

int svc_encode_backward_frame(const svc_id_t *id, const sbn_tensor_desc_t *desc,
                              float **dx, size_t numel, const float *dw,
                              const float *db, const sbn_tensor_desc_t *wb_desc,
                              size_t wb_numel, svc_frame_t *f) {
  int rc;
  memset(f, 0, sizeof *f);
  rc = svc__encode_bwd(id, desc, *dx, numel, dw, db, wb_desc, wb_numel, &f->at,
                       &f->buf, &f->len);
  if (rc == 0)
    svc__frame_take(f, dx, numel);
  return rc;
}

void svc_tensor_free(svc_tensor_t *t) {
  if (!t->borrowed)
    free(t->data);
  memset(t, 0, sizeof *t);
}

void svc_frame_whole(svc_frame_t *f, uint8_t *buf, size_t len) {
  f->buf = buf;
  f->len = f->at = len;
  f->tail = NULL;
  f->tail_len = 0;
}

size_t svc_frame_bytes(const svc_frame_t *f) {
  return f->len + f->tail_len;
}

void svc_frame_free(svc_frame_t *f) {
  free(f->buf);
  free(f->tail);
  memset(f, 0, sizeof *f);
}

int svc_frame_flatten(svc_frame_t *f) {
  uint8_t *b;
  size_t n = svc_frame_bytes(f);
  if (f->tail == NULL)
    return 0;
  if ((b = malloc(n)) == NULL) {
    svc_frame_free(f);
    return svc_set_error(SVC_RESOURCE, "reply: out of memory");
  }
  memcpy(b, f->buf, f->at);
  memcpy(b + f->at, f->tail, f->tail_len);
  memcpy(b + f->at + f->tail_len, f->buf + f->at, f->len - f->at);
  svc_frame_free(f);
  svc_frame_whole(f, b, n);
  return 0;
}

int svc_encode_forward_at(const svc_id_t *id, const sbn_tensor_desc_t *desc,
                          const svc_shm_at_t *at, uint8_t **out,
                          size_t *out_len) {
  svc__out_t sb;
  msgpack_packer pk;
  int rc = svc__start(&sb, &pk, 0);
  rc |= msgpack_pack_map(&pk, 2);
  svc__pack_id(&pk, id);
  svc__pack_key(&pk, "y");
  rc |= svc_pack_tensor_at(&pk, desc, at);
  return svc__finish(&sb, rc, out, out_len);
}

int svc_encode_backward_at(const svc_id_t *id, const sbn_tensor_desc_t *desc,
                           const svc_shm_at_t *at, const float *dw,
                           const float *db, const sbn_tensor_desc_t *wb_desc,
                           size_t wb_numel, uint8_t **out, size_t *out_len) {
  svc__out_t sb;
  msgpack_packer pk;
  int wb = dw != NULL && db != NULL;
  int rc = svc__start(&sb, &pk, 2 * wb_numel * sizeof(float));
  rc |= msgpack_pack_map(&pk, wb ? 4 : 2);
  svc__pack_id(&pk, id);
  svc__pack_key(&pk, "dx");
  rc |= svc_pack_tensor_at(&pk, desc, at);
  if (wb) {
    svc__pack_key(&pk, "dweight");
    rc |= svc_pack_tensor(&pk, wb_desc, dw, wb_numel);
    svc__pack_key(&pk, "dbias");
    rc |= svc_pack_tensor(&pk, wb_desc, db, wb_numel);
  }
  return svc__finish(&sb, rc, out, out_len);
}

int svc_encode_bye(const svc_id_t *id, uint8_t **out, size_t *out_len) {
  svc__out_t sb;
  msgpack_packer pk;
  int rc = svc__start(&sb, &pk, 0);
  rc |= msgpack_pack_map(&pk, 1);
  svc__pack_id(&pk, id);
  return svc__finish(&sb, rc, out, out_len);
}

int svc_encode_batch(const svc_id_t *id, uint8_t *const *subs,
                     const size_t *sub_lens, size_t n, uint8_t **out,
                     size_t *out_len) {
  svc__out_t sb;
  msgpack_packer pk;
  size_t hint = 0;
  int rc;
  for (size_t i = 0; i < n; i++)
    hint += sub_lens[i];
  rc = svc__start(&sb, &pk, hint);
  rc |= msgpack_pack_map(&pk, 2);
  svc__pack_id(&pk, id);
  svc__pack_key(&pk, "replies");
  rc |= msgpack_pack_array(&pk, n);
  /* Each sub-reply is already one encoded map: its body is copied as is. */
  for (size_t i = 0; i < n; i++) {
    if (sub_lens[i] < SVC_HEADER_BYTES) {
      rc = -1;
      break;
    }
    rc |= svc__write(&sb, (const char *)subs[i] + SVC_HEADER_BYTES,
                     sub_lens[i] - SVC_HEADER_BYTES);
  }
  return svc__finish(&sb, rc, out, out_len);
}

int svc_pack_vec64(msgpack_packer *pk, const double *v, size_t n) {
  int rc = svc_pack_vec64_open(pk, n);
  if (rc == 0 && n > 0 && msgpack_pack_bin_body(pk, v, n * sizeof(double)) != 0)
    rc = svc_set_error(SVC_RESOURCE, "reply: out of memory");
  return rc;
}

int svc_pack_vec64_open(msgpack_packer *pk, size_t n) {
  int rc = 0;
  rc |= msgpack_pack_map(pk, 4);
  svc__pack_key(pk, "dtype");
  rc |= msgpack_pack_str_with_body(pk, "f64", 3);
  svc__pack_key(pk, "shape");
  rc |= msgpack_pack_array(pk, 1);
  rc |= msgpack_pack_uint64(pk, n);
  svc__pack_key(pk, "layout");
  rc |= msgpack_pack_str_with_body(pk, "nchw", 4);
  svc__pack_key(pk, "data");
  rc |= msgpack_pack_bin(pk, n * sizeof(double));
  return rc != 0 ? svc_set_error(SVC_RESOURCE, "reply: out of memory") : 0;
}

struct svc__reply_impl_s {
  svc__out_t sb;
  msgpack_packer pk;
};

int svc_reply_begin(svc_reply_t *r, const svc_id_t *id, uint32_t nkeys,
                    size_t hint) {
  r->impl = malloc(sizeof *r->impl);
  r->pk = NULL;
  r->rc = -1;
  if (r->impl == NULL)
    return svc_set_error(SVC_RESOURCE, "reply: out of memory");
  r->pk = &r->impl->pk;
  r->rc = svc__start(&r->impl->sb, &r->impl->pk, hint);
  r->rc |= msgpack_pack_map(r->pk, nkeys + 1);
  svc__pack_id(r->pk, id);
  if (r->rc != 0)
    return svc_set_error(SVC_RESOURCE, "reply: out of memory");
  return 0;
}

void svc_reply_key(svc_reply_t *r, const char *key) {
  if (r->impl != NULL)
    svc__pack_key(r->pk, key);
}

int svc_reply_end(svc_reply_t *r, uint8_t **out, size_t *out_len) {
  int rc;
  *out = NULL;
  *out_len = 0;
  if (r->impl == NULL)
    return svc_set_error(SVC_RESOURCE, "reply: out of memory");
  rc = svc__finish(&r->impl->sb, r->rc, out, out_len);
  free(r->impl);
  r->impl = NULL;
  return rc;
}
