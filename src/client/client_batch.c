/* syncbn client: the batch builder (client.h). */
#include <stdlib.h>
#include <string.h>

#include "client_internal.h"

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
  sbn_client_batch_t *b;
  if (out == NULL)
    return sbn_set_error(SBN_EINVAL, "batch_new: out: NULL");
  *out = NULL;
  if ((b = calloc(1, sizeof *b)) == NULL)
    return sbn_set_error(SBN_ENOMEM, "batch_new: out of memory");
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
  if (b == NULL)
    return;
  sbn__batch_clear(b);
  b->n = 0;
  b->sb.size = 0;
}

size_t sbn_client_batch_size(const sbn_client_batch_t *b) {
  return b != NULL ? b->n : 0;
}

/* Makes room for one more sub-request and returns it (zeroed), or NULL
 * with *rc set. It counts only once its map is packed (sbn__batch_commit).
 * what names the queueing call in messages. */
static sbn__sub_t *sbn__batch_slot(sbn_client_batch_t *b, const char *what,
                                   svc_op_t op, int *rc) {
  sbn__sub_t *s;
  if (b == NULL) {
    *rc = sbn_set_error(SBN_EINVAL, "%s: b: NULL", what);
    return NULL;
  }
  if (b->n == SVC_BATCH_MAX) {
    *rc = sbn_set_error(SBN_ELIMIT, "%s: b holds %d sub-requests already", what,
                        SVC_BATCH_MAX);
    return NULL;
  }
  if (b->n == b->cap) {
    size_t cap = b->cap == 0 ? 8 : 2 * b->cap;
    sbn__sub_t *p = realloc(b->subs, cap * sizeof *p);
    if (p == NULL) {
      *rc = sbn_set_error(SBN_ENOMEM, "%s: out of memory", what);
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
static int sbn__batch_commit(sbn_client_batch_t *b, const char *what,
                             int packed, size_t old) {
  if (packed != 0) {
    b->sb.size = old;
    return sbn_set_error(SBN_ENOMEM, "%s: out of memory", what);
  }
  b->n++;
  return 0;
}

/* A forward or backward: the slot, with desc's shape kept to check the
 * reply against. */
static sbn__sub_t *sbn__batch_tensor_slot(sbn_client_batch_t *b,
                                          const char *what, svc_op_t op,
                                          const sbn_tensor_desc_t *desc,
                                          size_t *numel, int *rc) {
  sbn__sub_t *s;
  if ((*rc = sbn_desc_numel(desc, numel)) != 0) {
    *rc = sbn_set_error(*rc, "%s: desc: %s", what, sbn_last_error());
    return NULL;
  }
  if ((s = sbn__batch_slot(b, what, op, rc)) != NULL)
    s->desc = *desc;
  return s;
}

int sbn_client_batch_forward(sbn_client_batch_t *b, uint64_t layer,
                             uint64_t step, int train,
                             const sbn_tensor_desc_t *desc, const float *x,
                             const float *weight, const float *bias,
                             size_t wb_numel) {
  static const char what[] = "batch_forward";
  size_t numel;
  int rc;
  if (sbn__batch_tensor_slot(b, what, SVC_OP_FORWARD, desc, &numel, &rc) ==
      NULL)
    return rc;
  size_t old = b->sb.size;
  return sbn__batch_commit(
      b, what,
      sbn__pack_forward(&b->pk, b->n, layer, step, train, desc, x, numel,
                        weight, bias, wb_numel),
      old);
}

int sbn_client_batch_backward(sbn_client_batch_t *b, uint64_t layer,
                              uint64_t step, const sbn_tensor_desc_t *desc,
                              const float *dy) {
  static const char what[] = "batch_backward";
  size_t numel;
  int rc;
  if (sbn__batch_tensor_slot(b, what, SVC_OP_BACKWARD, desc, &numel, &rc) ==
      NULL)
    return rc;
  size_t old = b->sb.size;
  return sbn__batch_commit(
      b, what, sbn__pack_backward(&b->pk, b->n, layer, step, desc, dy, numel),
      old);
}

int sbn_client_batch_stats(sbn_client_batch_t *b, uint64_t layer, uint64_t step,
                           size_t channels, uint64_t count,
                           const double *counts, const double *mean,
                           const double *m2) {
  static const char what[] = "batch_stats";
  sbn__sub_t *s;
  int rc;
  if ((rc = sbn__check_vecs(what, channels, mean, "mean", m2, "m2")) != 0 ||
      (s = sbn__batch_slot(b, what, SVC_OP_STATS, &rc)) == NULL)
    return rc;
  s->channels = channels;
  size_t old = b->sb.size;
  return sbn__batch_commit(
      b, what,
      sbn__pack_stats(&b->pk, NULL, b->n, layer, step, channels, count, counts,
                      mean, m2, SVC_STATS_ALL),
      old);
}

int sbn_client_batch_stats_backward(sbn_client_batch_t *b, uint64_t layer,
                                    uint64_t step, size_t channels,
                                    const double *sum_dy,
                                    const double *sum_dy_xhat) {
  static const char what[] = "batch_stats_backward";
  sbn__sub_t *s;
  int rc;
  if ((rc = sbn__check_vecs(what, channels, sum_dy, "sum_dy", sum_dy_xhat,
                            "sum_dy_xhat")) != 0 ||
      (s = sbn__batch_slot(b, what, SVC_OP_STATS_BACKWARD, &rc)) == NULL)
    return rc;
  s->channels = channels;
  size_t old = b->sb.size;
  return sbn__batch_commit(
      b, what,
      sbn__pack_stats_backward(&b->pk, NULL, b->n, layer, step, channels,
                               sum_dy, sum_dy_xhat),
      old);
}

/* ------------------------------------------------------------------ */
/* run */

/* A forward's y or a backward's dx (and dweight, dbias) into s->res. */
static int sbn__batch_take_tensors(sbn_client_t *c, sbn__sub_t *s,
                                   const msgpack_object *m) {
  sbn_client_result_t *r = &s->res;
  int fwd = s->op == SVC_OP_FORWARD, rc;
  if ((rc = sbn__decode_f32(c, m, fwd ? "y" : "dx", &s->desc, &s->t[0])) != 0)
    return rc;
  r->numel = s->t[0].numel;
  *(fwd ? &r->y : &r->dx) = s->t[0].data;
  if (fwd || sbn__get(m, "dweight") == NULL)
    return 0;
  if ((rc = sbn__decode_f32(c, m, "dweight", NULL, &s->t[1])) != 0 ||
      (rc = sbn__decode_f32(c, m, "dbias", &s->t[1].desc, &s->t[2])) != 0)
    return rc;
  r->dweight = s->t[1].data;
  r->dbias = s->t[2].data;
  r->wb_numel = s->t[1].numel;
  return 0;
}

/* A stats or stats_backward reply's arrays into s->res (owned by s->v). */
static int sbn__batch_take_vecs(sbn_client_t *c, sbn__sub_t *s,
                                const msgpack_object *m) {
  sbn_client_result_t *r = &s->res;
  size_t C = s->channels, k = s->op == SVC_OP_STATS ? 5 : 2;
  double *v = malloc(k * C * sizeof *v);
  if (v == NULL)
    return sbn__fail(c, SBN_ENOMEM, "out of memory");
  s->v = v;
  r->channels = C;
  if (s->op == SVC_OP_STATS_BACKWARD) {
    int rc;
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
  return sbn__take_stats(c, m, C, v, v + C, v + 2 * C, v + 3 * C, v + 4 * C);
}

/* Reads sub-reply i (m) into s->res. A sub-request's error reply is its
 * result; only a reply that breaks the protocol fails (the whole run). */
static int sbn__batch_take(sbn_client_t *c, sbn__sub_t *s, size_t i,
                           const msgpack_object *m) {
  sbn_client_result_t *r = &s->res;
  uint64_t id;
  int e =
      sbn__error_of(m, r->code, sizeof r->code, r->message, sizeof r->message);
  if (e < 0)
    return sbn__fail(c, SBN_EFORMAT, "replies[%zu]: error without a code", i);
  if (e > 0) {
    r->rc = sbn__server_rc(r->code);
    return 0;
  }
  if (sbn__uint_field(m, "id", &id) != 0 || id != i)
    return sbn__fail(c, SBN_EFORMAT, "replies[%zu]: id does not match", i);
  switch (s->op) {
    case SVC_OP_FORWARD:
    case SVC_OP_BACKWARD:
      return sbn__batch_take_tensors(c, s, m);
    case SVC_OP_STATS:
    case SVC_OP_STATS_BACKWARD:
      return sbn__batch_take_vecs(c, s, m);
    default:
      return sbn__fail(c, SBN_EFORMAT, "sub-request %zu", i);
  }
}

int sbn_client_batch_run(sbn_client_t *c, sbn_client_batch_t *b) {
  sbn__req_t r;
  sbn__reply_t p;
  const msgpack_object *replies;
  int rc = sbn__begin(c, "batch");
  if (rc != 0)
    return rc;
  if (b == NULL)
    return sbn__fail(c, SBN_EINVAL, "b: NULL");
  sbn__batch_clear(b);
  if (b->n == 0)
    return sbn__fail(c, SBN_EINVAL, "b: no sub-requests");
  /* The head, then the sub-requests' maps as they were queued. */
  sbn__req_start(c, &r, "batch", 3);
  r.bad |= sbn__key(&r.pk, "requests");
  r.bad |= msgpack_pack_array(&r.pk, b->n);
  if ((rc = sbn__req_send(c, &r, b->sb.data, b->sb.size)) != 0 ||
      (rc = sbn__reply(c, r.id, &p)) != 0)
    return rc;
  replies = sbn__get(&p.root, "replies");
  if (replies == NULL || replies->type != MSGPACK_OBJECT_ARRAY ||
      replies->via.array.size != b->n) {
    rc = sbn__fail(c, SBN_EFORMAT, "reply lacks %zu replies", b->n);
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
  if (b == NULL || !b->have_results || i >= b->n)
    return NULL;
  return &b->subs[i].res;
}
