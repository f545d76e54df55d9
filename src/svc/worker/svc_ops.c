/* The worker's state and metrics requests: get_state, set_state, metrics
 * (see PROTOCOL.md). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <msgpack.h>

#include "svc_worker_int.h"

/* ------------------------------------------------------------------ */
/* get_state */

int svc__cmd_get_state(svc__call_t *call) {
  const svc_request_t *q = call->q;
  int rc;
  svc__layer_t *l = svc__layer(call->w, q->layer, &rc);
  sbn_tensor_desc_t cdesc;
  svc_reply_t r;
  const char *kind;
  size_t C, hint;
  uint32_t nkeys = 1;
  if (l == NULL)
    return rc;
  C = l->tracking ? l->params.channels : 0;
  memset(&cdesc, 0, sizeof cdesc);
  cdesc.ndim = 1;
  cdesc.dims[0] = C;
  cdesc.layout = SBN_LAYOUT_NCHW;
  if (l->tracking)
    nkeys += 3;
  if (l->wb_numel > 0)
    nkeys += 2;
  /* Registration capped C and wb_numel at a frame's worth of floats, so
   * the hint cannot overflow. */
  hint = (2 * C + 2 * l->wb_numel) * sizeof(float);
  kind = svc_kind_name(l->kind);
  svc_reply_begin(&r, &q->id, nkeys, hint);
  svc_reply_key(&r, "kind");
  if (r.pk != NULL)
    r.rc |= msgpack_pack_str_with_body(r.pk, kind, strlen(kind));
  if (l->tracking && r.pk != NULL) {
    svc_reply_key(&r, "running_mean");
    r.rc |= svc_pack_tensor(r.pk, &cdesc, l->running_mean, C);
    svc_reply_key(&r, "running_var");
    r.rc |= svc_pack_tensor(r.pk, &cdesc, l->running_var, C);
    svc_reply_key(&r, "num_batches_tracked");
    r.rc |= msgpack_pack_int64(r.pk, l->state.num_batches_tracked);
  }
  if (l->wb_numel > 0 && r.pk != NULL) {
    svc_reply_key(&r, "weight");
    r.rc |= svc_pack_tensor(r.pk, &l->wb_desc, l->weight, l->wb_numel);
    svc_reply_key(&r, "bias");
    r.rc |= svc_pack_tensor(r.pk, &l->wb_desc, l->bias, l->wb_numel);
  }
  if (svc_reply_end(&r, &call->out.buf, &call->out.len) != 0)
    return svc_set_error(SVC_RESOURCE, "get_state: out of memory");
  return 0;
}

/* ------------------------------------------------------------------ */
/* set_state */

/* Writes "[d0, d1, ...]" into buf for error messages. */
static const char *svc__dims_str(const sbn_tensor_desc_t *d, char *buf,
                                 size_t size) {
  size_t used = 0;
  int n = snprintf(buf, size, "[");
  if (n > 0)
    used = (size_t)n;
  for (int i = 0; i < d->ndim && used < size; i++) {
    n = snprintf(buf + used, size - used, "%s%zu", i > 0 ? ", " : "",
                 d->dims[i]);
    if (n < 0)
      break;
    used += (size_t)n;
  }
  if (used < size)
    snprintf(buf + used, size - used, "]");
  return buf;
}

/* Checks one incoming state tensor against the layer's: the layer must
 * keep this state at all (has; else the message says it "lacks" it), the
 * shape must be the one get_state returns, and every element finite (and
 * non-negative for a variance). The message names the key and, for a bad
 * value, its first index. */
static int svc__check_state_tensor(const svc__layer_t *l, const svc_tensor_t *t,
                                   const char *what, int has, const char *lacks,
                                   const sbn_tensor_desc_t *want,
                                   int nonnegative) {
  char got_s[128], want_s[128];
  int same;
  if (!t->present)
    return 0;
  if (!has)
    return svc_set_error(SVC_SHAPE, "%s: layer '%s' (%s) %s", what, l->name,
                         svc_kind_name(l->kind), lacks);
  same = t->desc.ndim == want->ndim;
  for (int i = 0; same && i < want->ndim; i++)
    same = t->desc.dims[i] == want->dims[i];
  /* A layout other than C order would change which element is which in a
   * multi-dimensional parameter; in one dimension both are the same. */
  if (t->desc.ndim > 1 && t->desc.layout != SBN_LAYOUT_NCHW)
    return svc_set_error(SVC_SHAPE, "%s: layout must be \"nchw\"", what);
  if (!same)
    return svc_set_error(SVC_SHAPE, "%s: shape %s, the layer's is %s", what,
                         svc__dims_str(&t->desc, got_s, sizeof got_s),
                         svc__dims_str(want, want_s, sizeof want_s));
  for (size_t i = 0; i < t->numel; i++) {
    float v = t->data[i];
    if (!isfinite(v))
      return svc_set_error(SVC_BAD_PARAMS, "%s[%zu]: not a finite number", what,
                           i);
    if (nonnegative && v < 0.0f)
      return svc_set_error(SVC_BAD_PARAMS, "%s[%zu]: negative (%g)", what, i,
                           (double)v);
  }
  return 0;
}

int svc__cmd_set_state(svc__call_t *call) {
  const svc_request_t *q = call->q;
  int rc;
  static const char stats_none[] = "keeps no running statistics";
  static const char affine_none[] = "has no affine parameters";
  svc__layer_t *l = svc__layer(call->w, q->layer, &rc);
  sbn_tensor_desc_t cdesc;
  svc_reply_t r;
  if (l == NULL)
    return rc;
  memset(&cdesc, 0, sizeof cdesc);
  cdesc.ndim = 1;
  cdesc.dims[0] = l->tracking ? l->params.channels : 0;
  cdesc.layout = SBN_LAYOUT_NCHW;
  /* Everything is checked before anything changes, so a refused request
   * leaves the layer exactly as it was. */
  if ((rc = svc__check_state_tensor(l, &q->running_mean, "running_mean",
                                    l->tracking, stats_none, &cdesc, 0)) != 0 ||
      (rc = svc__check_state_tensor(l, &q->running_var, "running_var",
                                    l->tracking, stats_none, &cdesc, 1)) != 0 ||
      (rc = svc__check_state_tensor(l, &q->weight, "weight", l->wb_numel > 0,
                                    affine_none, &l->wb_desc, 0)) != 0 ||
      (rc = svc__check_state_tensor(l, &q->bias, "bias", l->wb_numel > 0,
                                    affine_none, &l->wb_desc, 0)) != 0)
    return rc;
  if (q->has_nbt && !l->tracking)
    return svc_set_error(SVC_SHAPE, "num_batches_tracked: layer '%s' (%s) %s",
                         l->name, svc_kind_name(l->kind), stats_none);
  /* The reply is built first too: running out of memory for it must not
   * leave a changed layer behind an error reply. */
  svc_reply_begin(&r, &q->id, 0, 0);
  if (svc_reply_end(&r, &call->out.buf, &call->out.len) != 0)
    return svc_set_error(SVC_RESOURCE, "set_state: out of memory");
  /* Kept forward steps hold their own copies of the parameters they used,
   * so overwriting the layer's arrays in place affects only later
   * forwards. */
  if (q->running_mean.present)
    memcpy(l->running_mean, q->running_mean.data,
           q->running_mean.numel * sizeof(float));
  if (q->running_var.present)
    memcpy(l->running_var, q->running_var.data,
           q->running_var.numel * sizeof(float));
  if (q->weight.present)
    memcpy(l->weight, q->weight.data, q->weight.numel * sizeof(float));
  if (q->bias.present)
    memcpy(l->bias, q->bias.data, q->bias.numel * sizeof(float));
  if (q->has_nbt)
    l->state.num_batches_tracked = (int64_t)q->num_batches_tracked;
  return 0;
}

/* ------------------------------------------------------------------ */
/* metrics */

static int svc__cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

/* Nearest-rank percentile of n sorted values: the smallest value with at
 * least p of them at or below it. */
static double svc__pct(const double *v, size_t n, double p) {
  size_t rank;
  if (n == 0)
    return 0.0;
  rank = (size_t)ceil(p * (double)n);
  if (rank < 1)
    rank = 1;
  if (rank > n)
    rank = n;
  return v[rank - 1];
}

static void svc__pack_str(svc_reply_t *r, const char *s) {
  r->rc |= msgpack_pack_str_with_body(r->pk, s, strlen(s));
}

static void svc__pack_u64(svc_reply_t *r, const char *k, uint64_t v) {
  svc_reply_key(r, k);
  r->rc |= msgpack_pack_uint64(r->pk, v);
}

int svc__cmd_metrics(svc__call_t *call) {
  const svc_worker_t *w = call->w;
  const svc_request_t *q = call->q;
  static const char *const fuse_labels[SVC__FUSE_BUCKETS] = {
      "1", "2", "3-4", "5-8", "9-16", "17-32", "33-64", "65+"};
  static const char *const pct_names[3] = {"p50", "p90", "p99"};
  static const double pct[3] = {0.50, 0.90, 0.99};
  const svc__metrics_t *m = &w->m;
  /* The ring is small (8 KiB), so its sorted copy lives on the stack and
   * the reply needs no allocation besides its own buffer. */
  double lat[SVC__LAT_RING];
  size_t nlat = m->nlat < SVC__LAT_RING ? (size_t)m->nlat : SVC__LAT_RING;
  uint32_t nerr = 0;
  svc_reply_t r;
  memcpy(lat, m->lat, nlat * sizeof *lat);
  qsort(lat, nlat, sizeof *lat, svc__cmp_double);
  for (int c = 1; c < SVC_CODE_COUNT; c++)
    nerr += m->errors[c] != 0;

  if (svc_reply_begin(&r, &q->id, 30, 0) != 0 || r.pk == NULL)
    goto out;
  svc_reply_key(&r, "requests");
  r.rc |= msgpack_pack_map(r.pk, SVC_OP_COUNT);
  for (int op = 0; op < SVC_OP_COUNT; op++) {
    svc__pack_str(&r, svc_op_name((svc_op_t)op));
    r.rc |= msgpack_pack_uint64(r.pk, m->requests[op]);
  }
  svc_reply_key(&r, "errors");
  r.rc |= msgpack_pack_map(r.pk, nerr);
  for (int c = 1; c < SVC_CODE_COUNT; c++) {
    if (m->errors[c] == 0)
      continue;
    svc__pack_str(&r, svc_code_name((svc_code_t)c));
    r.rc |= msgpack_pack_uint64(r.pk, m->errors[c]);
  }
  svc__pack_u64(&r, "bytes_in", m->bytes_in);
  svc__pack_u64(&r, "bytes_out", m->bytes_out);
  svc__pack_u64(&r, "frames_in", m->frames_in);
  svc__pack_u64(&r, "frames_out", m->frames_out);
  svc__pack_u64(&r, "connections", m->connections);
  svc__pack_u64(&r, "auth_failures", m->auth_failures);
  svc__pack_u64(&r, "shed", m->shed);
  svc__pack_u64(&r, "allreduces", m->allreduces);
  svc__pack_u64(&r, "entries_fused", m->entries_fused);
  svc__pack_u64(&r, "gathers", m->gathers);
  svc__pack_u64(&r, "negotiations", m->negotiations);
  svc__pack_u64(&r, "rounds", m->rounds);
  svc__pack_u64(&r, "bells", m->bells);
  svc__pack_u64(&r, "agree_bytes", m->agree_bytes);
  svc__pack_u64(&r, "cache_hits", m->cache_hits);
  svc__pack_u64(&r, "cache_evictions", m->cache_evictions);
  svc__pack_u64(&r, "spec_rounds", m->spec_rounds);
  svc__pack_u64(&r, "spec_misses", m->spec_misses);
  svc__pack_u64(&r, "tensor_copies", m->tensor_copies);
  svc__pack_u64(&r, "in_place", m->in_place);
  svc__pack_u64(&r, "zero_copy_replies", m->zero_copy_replies);
  svc__pack_u64(&r, "pending", svc__pend_count(w));
  svc_reply_key(&r, "fused_per_allreduce");
  r.rc |= msgpack_pack_map(r.pk, SVC__FUSE_BUCKETS);
  for (int i = 0; i < SVC__FUSE_BUCKETS; i++) {
    svc__pack_str(&r, fuse_labels[i]);
    r.rc |= msgpack_pack_uint64(r.pk, m->fuse_hist[i]);
  }
  svc_reply_key(&r, "allreduce_latency");
  r.rc |= msgpack_pack_map(r.pk, 5);
  svc__pack_u64(&r, "count", m->nlat);
  for (int i = 0; i < 3; i++) {
    svc_reply_key(&r, pct_names[i]);
    r.rc |= msgpack_pack_double(r.pk, svc__pct(lat, nlat, pct[i]));
  }
  svc_reply_key(&r, "max");
  r.rc |= msgpack_pack_double(r.pk, nlat > 0 ? lat[nlat - 1] : 0.0);
  svc__pack_u64(&r, "stalls", m->stalls);
  svc__pack_u64(&r, "mismatches", m->mismatches);
  svc__pack_u64(&r, "saved_bytes", w->saved_bytes);
  svc__pack_u64(&r, "layers", w->nlayers);
out:
  if (svc_reply_end(&r, &call->out.buf, &call->out.len) != 0)
    return svc_set_error(SVC_RESOURCE, "metrics: out of memory");
  return 0;
}
