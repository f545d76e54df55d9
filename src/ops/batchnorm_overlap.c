/* SyncBN that hides its allreduce: BatchNorm's training passes split into
 * chunks of channels, each chunk's records reduced with the communicator's
 * non-blocking entries while the previous chunk is normalized.
 *
 * Forward, with chunks 0..K-1:
 *   moments(0) begin(0)
 *   for k: moments(k+1) begin(k+1) | end(k) parameters(k) normalize(k)
 * so chunk k+1's reduction is in flight while chunk k is normalized, and
 * chunk k's while chunk k+1's moments are taken. Open MPI has no progress
 * thread here, so the passes poll the request in flight every
 * SBN__POLL_ELEMS elements; without polling the reduction would only move
 * inside the end call and nothing would be hidden. Backward is the same
 * with the per-channel sums of dy and dy * xhat in place of the moments,
 * and dx in place of normalization.
 *
 * Every channel is computed by the same kernels on the same elements in
 * the same order as the unchunked path (ops/batchnorm.c): a chunk is a
 * channel range walked in pieces (NCHW: one run of the range per sample;
 * NHWC: one row segment per position), each a view (1, range, S) of the
 * kernel table, and the kernels add a piece's sums into the channel's
 * accumulator as they add a sample's. The reference kernels then give
 * the unchunked bits exactly; a vector set may not where a channel falls
 * in a vector body in one view and in the scalar tail in the other (an
 * FMA against a multiply and an add), which is rounding. So is the
 * reduction: a tree over more than two processes may associate the
 * merges of a sub-array differently from the whole. */
#include <math.h>

#include "ops/sbn_ops.h"

/* The cache a chunk plan is made for. It is a build-time constant, not
 * the running CPU's size: the plan decides how many collectives a pass
 * issues, so every process of a job must make the same one even on nodes
 * with different caches. 1 MiB is the L2 of one core of the machines this
 * was measured on (AMD EPYC; Intel server cores have 1-2 MiB). */
#ifndef SBN_PLAN_L2_BYTES
#define SBN_PLAN_L2_BYTES (1024.0 * 1024.0)
#endif

/* The most chunks one pass is split into. Each chunk's reduction costs a
 * few microseconds of processor time in MPI however small it is, so past
 * some count the reductions cost more than they hide (see README:
 * "SyncBN that hides its allreduce"). */
#define SBN__MAX_CHUNKS 16

/* Elements processed between two polls of the request in flight: about
 * 64 KiB of input, a few microseconds of streaming, against a poll of
 * well under a microsecond. */
#define SBN__POLL_ELEMS ((size_t)16384)

size_t sbn__bn_chunk(const sbn_layer_t *l, size_t C, double count) {
  size_t want = l->p.reduce_chunk;
  if (l->comm == NULL || l->comm->size <= 1 || C < 2 || want == SBN_CHUNK_OFF)
    return 0;
  if (want > 0)
    return want < C ? want : 0;
  if (!sbn__comm_can_ireduce(l->comm) || !(count > 0))
    return 0;
  /* The plan reads only numbers every process shares (the global count,
   * the group size, C and the layer's parameters), never its own batch:
   * processes with uneven or empty batches still plan alike. */
  double chan_bytes = count * (double)sizeof(float) / (double)l->comm->size;
  if (chan_bytes * (double)C <= 2 * SBN_PLAN_L2_BYTES)
    return 0;
  double fit = floor(SBN_PLAN_L2_BYTES / 4 / chan_bytes);
  size_t cc = fit < 1 ? 1 : (fit >= (double)C ? C : (size_t)fit);
  size_t least = (C + SBN__MAX_CHUNKS - 1) / SBN__MAX_CHUNKS;
  if (cc < least)
    cc = least;
  return cc < C ? cc : 0;
}

/* A channel range [c0, c1) as pieces of the kernels' (A, C, S) view:
 * piece p starts at element p * stride + c0 * s and is the view
 * (1, c1 - c0, s). */
typedef struct range_s {
  size_t pieces, stride, s, c0, c1;
} range_t;

static range_t range_of(const sbn__shape_t *sh, size_t c0, size_t c1) {
  range_t r;
  int nchw = sh->layout == SBN_LAYOUT_NCHW;
  r.pieces = sh->numel == 0 ? 0 : (nchw ? sh->N : sh->N * sh->S);
  r.stride = nchw ? sh->C * sh->S : sh->C;
  r.s = nchw ? sh->S : 1;
  r.c0 = c0;
  r.c1 = c1;
  return r;
}

/* Polls the request in flight once every SBN__POLL_ELEMS elements;
 * *since counts the elements since the last poll. */
static int poll(sbn_comm_t *comm, void *req, size_t elems, size_t *since) {
  *since += elems;
  if (req == NULL || *since < SBN__POLL_ELEMS)
    return 0;
  *since = 0;
  return sbn__comm_itest(comm, req);
}

/* The shifted moments of the range into recs[c0..c1) (the shift and sums
 * of sbn__view_moments). */
static int range_moments(const float *x, const sbn__shape_t *sh, range_t r,
                         sbn__chan_t *ch, sbn_rec_t *recs, sbn_comm_t *comm,
                         void *req) {
  const sbn__kernels_t *kt = sbn__kernels();
  size_t cc = r.c1 - r.c0, since = 0;
  int rc = 0;
  for (size_t c = r.c0; c < r.c1; c++) {
    ch->k[c] = r.pieces > 0 ? x[c * r.s] : 0.0f;
    ch->d1[c] = 0;
    ch->d2[c] = 0;
  }
  for (size_t p = 0; p < r.pieces && rc == 0; p++) {
    kt->moments(x + p * r.stride + r.c0 * r.s, 1, cc, r.s, ch->k + r.c0,
                ch->d1 + r.c0, ch->d2 + r.c0);
    rc = poll(comm, req, cc * r.s, &since);
  }
  double n = (double)sh->N * (double)sh->S;
  for (size_t c = r.c0; c < r.c1; c++)
    sbn__moments_finish(n, ch->k[c], ch->d1[c], ch->d2[c], &recs[c]);
  return rc;
}

static int range_normalize(const sbn_forward_args_t *a, range_t r,
                           const sbn__chan_t *ch, sbn_comm_t *comm, void *req) {
  const sbn__kernels_t *kt = sbn__kernels();
  size_t cc = r.c1 - r.c0, since = 0, c0 = r.c0;
  int rc = 0;
  for (size_t p = 0; p < r.pieces && rc == 0; p++) {
    size_t off = p * r.stride + c0 * r.s;
    kt->normalize(a->x + off, a->y + off, 1, cc, r.s, ch->mh + c0, ch->ml + c0,
                  ch->k1 + c0, ch->k2 + c0);
    rc = poll(comm, req, cc * r.s, &since);
  }
  return rc;
}

/* Backward's local sums of the range into recs[c0..c1) and the local
 * dbias and dweight (as bn_bwd_local writes them). */
static int range_bwd_sums(const sbn_backward_args_t *a, range_t r,
                          sbn__chan_t *ch, sbn_rec_t *recs, sbn_comm_t *comm,
                          void *req) {
  const sbn__kernels_t *kt = sbn__kernels();
  size_t cc = r.c1 - r.c0, since = 0, c0 = r.c0;
  int rc = 0;
  for (size_t p = 0; p < r.pieces && rc == 0; p++) {
    size_t off = p * r.stride + c0 * r.s;
    kt->bwd_reduce(a->x + off, a->dy + off, 1, cc, r.s, ch->dmean + c0,
                   ch->distd + c0, ch->d1 + c0, ch->d2 + c0);
    rc = poll(comm, req, cc * r.s, &since);
  }
  for (size_t c = r.c0; c < r.c1; c++) {
    recs[c].tag = SBN_REC_SUM;
    recs[c].v[0] = ch->d1[c];
    recs[c].v[1] = ch->d2[c];
    recs[c].v[2] = 0;
    if (a->dbias != NULL)
      a->dbias[c] = (float)ch->d1[c];
    if (a->dweight != NULL)
      a->dweight[c] = (float)ch->d2[c];
  }
  return rc;
}

static int range_bwd_apply(const sbn_backward_args_t *a, range_t r,
                           const sbn__chan_t *ch, sbn_comm_t *comm, void *req) {
  const sbn__kernels_t *kt = sbn__kernels();
  size_t cc = r.c1 - r.c0, since = 0, c0 = r.c0;
  int rc = 0;
  for (size_t p = 0; p < r.pieces && rc == 0; p++) {
    size_t off = p * r.stride + c0 * r.s;
    kt->bwd_apply(a->x + off, a->dy + off, a->dx + off, 1, cc, r.s,
                  ch->dmean + c0, ch->distd + c0, ch->dk1 + c0, ch->dk2 + c0,
                  ch->dk3 + c0);
    rc = poll(comm, req, cc * r.s, &since);
  }
  return rc;
}

/* The two requests a pass has in flight at most, indexed by chunk parity.
 * Ending one that was never begun is a no-op, so the one cleanup path
 * ends both: after a failure every process still finishes the
 * collectives it began (a count of 1 fails everywhere at once, and the
 * others must not be left waiting on the next chunk). */
static int end_all(sbn_comm_t *comm, void *req[2], int rc) {
  for (int i = 0; i < 2; i++) {
    int e = sbn__comm_iend(comm, &req[i]);
    if (rc == 0)
      rc = e;
  }
  return rc;
}

static range_t chunk(const sbn__shape_t *sh, size_t cc, size_t k) {
  size_t c0 = k * cc, c1 = c0 + cc < sh->C ? c0 + cc : sh->C;
  return range_of(sh, c0, c1);
}

int sbn__bn_overlap_forward(sbn_layer_t *l, const sbn_forward_args_t *a,
                            const sbn__shape_t *sh, size_t cc) {
  sbn_comm_t *comm = l->comm;
  size_t K = (sh->C + cc - 1) / cc;
  void *req[2] = {NULL, NULL};
  sbn__chan_t ch;
  sbn__bn_fin_t fin;
  int rc;
  sbn__chan_carve(a->workspace, sh->C, &ch);
  range_t r = chunk(sh, cc, 0);
  rc = range_moments(a->x, sh, r, &ch, ch.rec, comm, NULL);
  if (rc == 0)
    rc = sbn__comm_ibegin(comm, ch.rec + r.c0, r.c1 - r.c0, &req[0]);
  for (size_t k = 0; k < K && rc == 0; k++) {
    if (k + 1 < K) {
      range_t n = chunk(sh, cc, k + 1);
      rc = range_moments(a->x, sh, n, &ch, ch.rec, comm, req[k & 1]);
      if (rc == 0)
        rc = sbn__comm_ibegin(comm, ch.rec + n.c0, n.c1 - n.c0,
                              &req[(k + 1) & 1]);
    }
    if (rc == 0)
      rc = sbn__comm_iend(comm, &req[k & 1]);
    /* The count is global, so chunk 0's reduction gives it to all. */
    if (rc == 0 && k == 0)
      rc = sbn__bn_fin_init(l, a, sh, ch.rec, &fin);
    if (rc != 0)
      break;
    r = chunk(sh, cc, k);
    sbn__bn_fin_chan(l, a, &fin, ch.rec, r.c0, r.c1, &ch);
    rc = range_normalize(a, r, &ch, comm, req[(k + 1) & 1]);
  }
  rc = end_all(comm, req, rc);
  if (rc == 0)
    sbn__bn_fin_done(a, &fin);
  return rc;
}

int sbn__bn_overlap_backward(sbn_layer_t *l, const sbn_backward_args_t *a,
                             const sbn__shape_t *sh, size_t cc) {
  sbn_comm_t *comm = l->comm;
  size_t C = sh->C, K = (C + cc - 1) / cc;
  const double *mean, *istd;
  double count;
  void *req[2] = {NULL, NULL};
  sbn__chan_t ch;
  int rc = sbn__saved_get(a->saved, a->saved_bytes, l->p.op, a->mode, C, &count,
                          &mean, &istd);
  if (rc != 0)
    return rc;
  sbn__chan_carve(a->workspace, C, &ch);
  for (size_t c = 0; c < C; c++) {
    ch.dmean[c] = mean[c];
    ch.distd[c] = istd[c];
    ch.d1[c] = 0;
    ch.d2[c] = 0;
  }
  range_t r = chunk(sh, cc, 0);
  rc = range_bwd_sums(a, r, &ch, ch.rec, comm, NULL);
  if (rc == 0)
    rc = sbn__comm_ibegin(comm, ch.rec + r.c0, r.c1 - r.c0, &req[0]);
  for (size_t k = 0; k < K && rc == 0; k++) {
    if (k + 1 < K) {
      range_t n = chunk(sh, cc, k + 1);
      rc = range_bwd_sums(a, n, &ch, ch.rec, comm, req[k & 1]);
      if (rc == 0)
        rc = sbn__comm_ibegin(comm, ch.rec + n.c0, n.c1 - n.c0,
                              &req[(k + 1) & 1]);
    }
    if (rc == 0)
      rc = sbn__comm_iend(comm, &req[k & 1]);
    if (rc != 0)
      break;
    r = chunk(sh, cc, k);
    sbn__bn_bwd_chan(l, a, mean, istd, count, ch.rec, r.c0, r.c1, &ch);
    rc = range_bwd_apply(a, r, &ch, comm, req[(k + 1) & 1]);
  }
  return end_all(comm, req, rc);
}
