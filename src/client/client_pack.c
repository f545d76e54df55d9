/* syncbn client: packing requests. The maps that a batch can hold are
 * packed by one function each, for the single calls and the batch queue
 * alike. */
#include <string.h>

#include "client_internal.h"

int sbn__key(msgpack_packer *pk, const char *k) {
  return msgpack_pack_str_with_body(pk, k, strlen(k));
}

void sbn__req_init(sbn_client_t *c, sbn__req_t *r) {
  msgpack_sbuffer_init(&r->sb);
  msgpack_packer_init(&r->pk, &r->sb, msgpack_sbuffer_write);
  r->bad = msgpack_sbuffer_write(&r->sb, "\0\0\0\0", 4);
  r->id = c->next_id++;
  r->next = 0;
}

int sbn__pack_vec64(msgpack_packer *pk, sbn__req_t *r, const double *v,
                    size_t n) {
  if (r == NULL || n == 0)
    return svc_pack_vec64(pk, v, n);
  if (r->next == SBN__REQ_EXT)
    return -1; /* a packing bug, refused as a failed write */
  int rc = svc_pack_vec64_open(pk, n);
  r->ext[r->next++] = (sbn__ext_t){r->sb.size, v, n * sizeof(double)};
  return rc;
}

int sbn__pack_head(msgpack_packer *pk, const char *op, uint64_t id, size_t n) {
  int rc = msgpack_pack_map(pk, n);
  rc |= sbn__key(pk, "op");
  rc |= sbn__key(pk, op);
  rc |= sbn__key(pk, "id");
  rc |= msgpack_pack_uint64(pk, id);
  return rc;
}

void sbn__req_start(sbn_client_t *c, sbn__req_t *r, const char *op, size_t n) {
  sbn__req_init(c, r);
  r->bad |= sbn__pack_head(&r->pk, op, r->id, n);
}

int sbn__pack_layer_step(msgpack_packer *pk, uint64_t layer, uint64_t step) {
  int rc = sbn__key(pk, "layer");
  rc |= msgpack_pack_uint64(pk, layer);
  rc |= sbn__key(pk, "step");
  rc |= msgpack_pack_uint64(pk, step);
  return rc;
}

int sbn__pack_forward(msgpack_packer *pk, uint64_t id, uint64_t layer,
                      uint64_t step, int train, const sbn_tensor_desc_t *desc,
                      const float *x, size_t numel, const float *weight,
                      const float *bias, size_t wb_numel) {
  sbn_tensor_desc_t wd;
  int rc;
  memset(&wd, 0, sizeof wd);
  wd.ndim = 1;
  wd.dims[0] = wb_numel;
  rc = sbn__pack_head(pk, "forward", id,
                      6 + (weight != NULL ? 1 : 0) + (bias != NULL ? 1 : 0));
  rc |= sbn__pack_layer_step(pk, layer, step);
  rc |= sbn__key(pk, "train");
  rc |= train ? msgpack_pack_true(pk) : msgpack_pack_false(pk);
  if (weight != NULL) {
    rc |= sbn__key(pk, "weight");
    rc |= svc_pack_tensor(pk, &wd, weight, wb_numel);
  }
  if (bias != NULL) {
    rc |= sbn__key(pk, "bias");
    rc |= svc_pack_tensor(pk, &wd, bias, wb_numel);
  }
  rc |= sbn__key(pk, "x");
  rc |= x != NULL ? svc_pack_tensor(pk, desc, x, numel)
                  : svc_pack_tensor_open(pk, desc, numel);
  return rc;
}

int sbn__pack_backward(msgpack_packer *pk, uint64_t id, uint64_t layer,
                       uint64_t step, const sbn_tensor_desc_t *desc,
                       const float *dy, size_t numel) {
  int rc = sbn__pack_head(pk, "backward", id, 5);
  rc |= sbn__pack_layer_step(pk, layer, step);
  rc |= sbn__key(pk, "dy");
  rc |= dy != NULL ? svc_pack_tensor(pk, desc, dy, numel)
                   : svc_pack_tensor_open(pk, desc, numel);
  return rc;
}

/* stats: the count is one uint for every channel, or an f64 tensor; a
 * `want` list when the caller wants fewer than all five vectors back. */
int sbn__pack_stats(msgpack_packer *pk, sbn__req_t *r, uint64_t id,
                    uint64_t layer, uint64_t step, size_t channels,
                    uint64_t count, const double *counts, const double *mean,
                    const double *m2, unsigned want) {
  int all = (want & SVC_STATS_ALL) == SVC_STATS_ALL, n = 0;
  int rc = sbn__pack_head(pk, "stats", id, all ? 7 : 8);
  if (!all) {
    rc |= sbn__key(pk, "want");
    for (int i = 0; i < SVC_STATS_OUTS; i++)
      n += (want >> i) & 1u;
    rc |= msgpack_pack_array(pk, (size_t)n);
    for (int i = 0; i < SVC_STATS_OUTS; i++)
      if (want & (1u << i))
        rc |= sbn__key(pk, svc_stats_out_name(i));
  }
  rc |= sbn__pack_layer_step(pk, layer, step);
  rc |= sbn__key(pk, "count");
  if (counts != NULL)
    rc |= sbn__pack_vec64(pk, r, counts, channels);
  else
    rc |= msgpack_pack_uint64(pk, count);
  rc |= sbn__key(pk, "mean");
  rc |= sbn__pack_vec64(pk, r, mean, channels);
  rc |= sbn__key(pk, "m2");
  rc |= sbn__pack_vec64(pk, r, m2, channels);
  return rc;
}

int sbn__pack_stats_backward(msgpack_packer *pk, sbn__req_t *r, uint64_t id,
                             uint64_t layer, uint64_t step, size_t channels,
                             const double *sum_dy, const double *sum_dy_xhat) {
  int rc = sbn__pack_head(pk, "stats_backward", id, 6);
  rc |= sbn__pack_layer_step(pk, layer, step);
  rc |= sbn__key(pk, "sum_dy");
  rc |= sbn__pack_vec64(pk, r, sum_dy, channels);
  rc |= sbn__key(pk, "sum_dy_xhat");
  rc |= sbn__pack_vec64(pk, r, sum_dy_xhat, channels);
  return rc;
}

int sbn__check_vecs(const char *op, size_t channels, const void *a,
                    const char *aname, const void *b, const char *bname) {
  if (channels == 0)
    return sbn_set_error(SBN_EINVAL, "%s: channels: 0", op);
  if (a == NULL || b == NULL)
    return sbn_set_error(SBN_EINVAL, "%s: %s: NULL", op,
                         a == NULL ? aname : bname);
  /* An f64 tensor of channels elements must fit one frame. */
  if (channels > UINT32_MAX / sizeof(double))
    return sbn_set_error(SBN_ELIMIT,
                         "%s: channels: %zu do not fit one frame as f64", op,
                         channels);
  return 0;
}
