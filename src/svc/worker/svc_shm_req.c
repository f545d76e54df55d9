/* Requests that name shared-memory regions (protocol 6, see svc_shm.h):
 * the checks before a forward or backward runs, the copy of its input
 * out of the region, and the write of its output into it. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "svc_shm.h"
#include "svc_worker_int.h"

void svc_worker_set_shm(svc_worker_t *w, svc_shm_t *t) {
  w->shm = t;
}

/* Whether [a, a+n) and [b, b+m) share a byte (both inside one region, so
 * neither end wraps). */
static int svc__overlap(uint64_t a, uint64_t n, uint64_t b, uint64_t m) {
  return n > 0 && m > 0 && a < b + m && b < a + n;
}

/* The input's bytes, copied out of the region into an aligned buffer of
 * the request's own (the kernels want aligned floats, a kept training
 * step outlives the request, and the client may reuse the region as soon
 * as it has the reply). */
static int svc__shm_copy_in(svc_request_t *q, const uint8_t *src, size_t bytes,
                            const char *what) {
  size_t padded = (bytes + 63) & ~(size_t)63;
  if (bytes == 0)
    return 0;
  if ((q->x.data = aligned_alloc(64, padded)) == NULL)
    return svc_set_error(SVC_RESOURCE, "%s: out of memory (%zu bytes)", what,
                         bytes);
  memcpy(q->x.data, src, bytes);
  return 0;
}

int svc__shm_resolve(svc_worker_t *w, svc_request_t *q) {
  const char *in = q->op == SVC_OP_BACKWARD ? "dy" : "x";
  const char *out = q->op == SVC_OP_BACKWARD ? "dx_at" : "y_at";
  uint64_t bytes = (uint64_t)q->x.numel * sizeof(float);
  uint8_t *src = NULL;
  int rc;
  if (q->op == SVC_OP_BATCH) {
    for (size_t i = 0; i < q->nsub; i++)
      if (q->sub[i].x.shm || q->sub[i].out.present)
        return svc_set_error(SVC_BAD_REQUEST,
                             "requests[%zu]: shared-memory tensors are not "
                             "served inside a batch",
                             i);
    return 0;
  }
  if (!q->x.shm && !q->out.present)
    return 0;
  if (w->shm == NULL)
    return svc_set_error(SVC_BAD_REQUEST,
                         "%s: shared memory is offered on the Unix socket "
                         "only",
                         q->x.shm ? in : out);
  if (q->out.present) {
    if ((rc = svc_shm_range(w->shm, q->out.region, q->out.offset, bytes, out,
                            &q->out.dst)) != 0)
      return rc;
  }
  if (!q->x.shm)
    return 0;
  if ((rc = svc_shm_range(w->shm, q->x.shm_region, q->x.shm_offset, bytes, in,
                          &src)) != 0)
    return rc;
  if (q->out.present && q->out.region == q->x.shm_region &&
      svc__overlap(q->x.shm_offset, bytes, q->out.offset, bytes))
    return svc_set_error(SVC_BAD_TENSOR,
                         "%s: bytes [%llu, +%llu) of region %llu overlap %s "
                         "at %llu; inputs and outputs must not overlap",
                         out, (unsigned long long)q->out.offset,
                         (unsigned long long)bytes,
                         (unsigned long long)q->out.region, in,
                         (unsigned long long)q->x.shm_offset);
  /* A backward's dy and an eval forward's x are read where they are:
   * nothing keeps them past the kernel. A training forward keeps x for
   * its backward, so it copies, unless the client promised with x_stays
   * that the bytes stay put until then: the step then keeps a reference
   * (svc__shm_keep). */
  if (bytes > 0 && (uintptr_t)src % 64 == 0 &&
      (q->op == SVC_OP_BACKWARD ||
       (q->op == SVC_OP_FORWARD && (!q->train || q->x.stays)))) {
    q->x.data = (float *)src;
    q->x.borrowed = 1;
    return 0;
  }
  if (bytes > 0)
    w->m.tensor_copies++;
  return svc__shm_copy_in(q, src, (size_t)bytes, in);
}

void svc__shm_keep(const svc_worker_t *w, svc__step_t *s,
                   const svc_request_t *q) {
  const svc_shm_region_t *r = &w->shm->r[q->x.shm_region];
  s->x_shm = w->shm;
  s->x_off = q->x.shm_offset;
  s->x_dev = r->dev;
  s->x_ino = r->ino;
}

int svc__shm_kept_check(const svc_worker_t *w, const svc__step_t *s,
                        const svc_request_t *q) {
  const svc_shm_region_t *r;
  uint64_t bytes = (uint64_t)s->numel * sizeof(float);
  if (s->x_lost)
    return svc_set_error(SVC_NO_FORWARD,
                         "step: %llu kept its x in a region of a connection "
                         "that closed, and copying it out ran out of memory",
                         (unsigned long long)q->step);
  if (s->x_shm == NULL || q->out.dst == NULL || w->shm == NULL)
    return 0;
  /* The same file through another connection's mapping aliases too, so
   * the file is compared, not the mapping. */
  r = &w->shm->r[q->out.region];
  if (r->dev == s->x_dev && r->ino == s->x_ino &&
      svc__overlap(s->x_off, bytes, q->out.offset, bytes))
    return svc_set_error(SVC_BAD_TENSOR,
                         "dx_at: bytes [%llu, +%llu) overlap the x that "
                         "step %llu keeps in place (x_stays) at %llu",
                         (unsigned long long)q->out.offset,
                         (unsigned long long)bytes, (unsigned long long)q->step,
                         (unsigned long long)s->x_off);
  return 0;
}

/* The kept x of every step that references t, copied into buffers of the
 * steps' own (their budget already counts those bytes). */
static void svc__shm_unkeep(svc_worker_t *w, const svc_shm_t *t,
                            svc__step_t *s) {
  float *copy;
  for (; s != NULL; s = s->next) {
    if (s->x_shm != t)
      continue;
    copy = svc__floats(s->numel);
    if (copy != NULL)
      memcpy(copy, s->x, s->numel * sizeof(float));
    else
      s->x_lost = 1; /* its backward is NO_FORWARD, a pending one fails */
    s->x = copy;
    s->x_shm = NULL;
    w->m.tensor_copies++;
  }
}

void svc_worker_shm_gone(svc_worker_t *w, const svc_shm_t *t) {
  if (w == NULL || t == NULL)
    return;
  for (size_t i = 0; i < w->nlayers; i++)
    svc__shm_unkeep(w, t, w->layers[i]->steps);
}

float *svc__out_ptr(const svc_shm_at_t *at, float *fallback) {
  if (at == NULL || at->dst == NULL || (uintptr_t)at->dst % 64 != 0)
    return fallback;
  return (float *)at->dst;
}

/* Writes res into the region at names unless the kernel wrote it there,
 * and counts that copy. */
static void svc__put_region(svc_worker_t *w, const svc_shm_at_t *at,
                            const float *res, size_t numel) {
  if (numel > 0 && (const uint8_t *)res != at->dst) {
    memcpy(at->dst, res, numel * sizeof(float));
    w->m.tensor_copies++;
  }
}

int svc__encode_y(svc_worker_t *w, const svc_id_t *id, const svc_shm_at_t *at,
                  const sbn_tensor_desc_t *desc, const float *res, float **own,
                  size_t numel, svc_frame_t *f) {
  memset(f, 0, sizeof *f);
  if (at != NULL && at->dst != NULL) {
    svc__put_region(w, at, res, numel);
    return svc_encode_forward_at(id, desc, at, &f->buf, &f->len);
  }
  if (svc_encode_forward_frame(id, desc, own, numel, f) != 0)
    return -SVC_RESOURCE;
  w->m.zero_copy_replies++;
  return 0;
}

int svc__encode_dx(svc_worker_t *w, const svc_id_t *id, const svc_shm_at_t *at,
                   const sbn_tensor_desc_t *desc, const float *res, float **own,
                   size_t numel, const float *dw, const float *db,
                   const sbn_tensor_desc_t *wb_desc, size_t wb_numel,
                   svc_frame_t *f) {
  memset(f, 0, sizeof *f);
  if (at != NULL && at->dst != NULL) {
    svc__put_region(w, at, res, numel);
    return svc_encode_backward_at(id, desc, at, dw, db, wb_desc, wb_numel,
                                  &f->buf, &f->len);
  }
  if (svc_encode_backward_frame(id, desc, own, numel, dw, db, wb_desc, wb_numel,
                                f) != 0)
    return -SVC_RESOURCE;
  w->m.zero_copy_replies++;
  return 0;
}
