/* SyncBN that hides its allreduce: BatchNorm's training passes split into
 * chunks of channels, each chunk's records reduced with the communicator's
 * non-blocking entries while the previous chunk is normalized.
 *
 * Forward, with chunks 0..K-1 (at most SBN__MAX_DEPTH ahead):
 *   moments(0) begin(0) moments(1) begin(1) ... moments(K-1) begin(K-1)
 *   end(0) normalize(0) end(1) normalize(1) ... end(K-1) normalize(K-1)
 * so chunk k's reduction is in flight while the later chunks' moments are
 * taken and the earlier chunks are normalized. Open MPI has no progress
 * thread here, so the passes poll the request in flight after every
 * block of rows (SBN__BLOCK_SPAN) until it is done; without polling the
 * reduction would only move inside the end call and nothing would be
 * hidden. Backward is the same
 * with the per-channel sums of dy and dy * xhat in place of the moments,
 * and dx in place of normalization.
 *
 * In NCHW a chunk is a channel range of every sample, walked in blocks
 * of samples through the kernels' strided entries (kernels/strided.c).
 * The reference kernels give the unchunked bits exactly (they add each
 * sample's sums into the channel's accumulator either way); an optimized
 * set's float block sums may round differently. In NHWC a chunk measured
 * several times slower than the whole pass, so an NHWC process computes every
 * channel at once and only its reductions follow the plan (pass_bulk): nothing
 * is hidden there. (Chunking positions instead cannot help forward: every
 * position holds every channel, so no record is complete before the whole
 * local pass.) The reduction may differ too: a tree over more than two
 * processes may associate the merges of a sub-array differently from the whole,
 * which is rounding.
 *
 * The same halves, with nothing to reduce, make the local blocked passes
 * (pass_alone): chunks are blocks of channels and each is finished right
 * after its sums. By default only a large backward is blocked, in blocks
 * for the L3 (bn_l3_block); SBN_BN_SINGLE_PASS=1 asks for L2 blocks in
 * both passes, which measured slower than the unblocked passes, and =0
 * for no blocks (see sbn__bn_single_pass). */
#include <math.h>
#include <stdlib.h>

#include "ops/sbn_ops.h"

/* The cache a chunk plan is made for. It is a build-time constant, not
 * the running CPU's size: the plan decides how many collectives a pass
 * issues, so every process of a job must make the same one even on nodes
 * with different caches. 1 MiB is the L2 of one core of the machines this
 * was measured on (AMD EPYC; Intel server cores have 1-2 MiB). */
#ifndef SBN_PLAN_L2_BYTES
#define SBN_PLAN_L2_BYTES (1024.0 * 1024.0)
#endif

/* The share of L2 that one block of a local pass reads (x, or x and dy
 * for backward): the rest holds what the second half writes (y or dx),
 * whose lines are allocated in L2 while the block is reread. */
#ifndef SBN__BLOCK_FILL
#define SBN__BLOCK_FILL 0.5
#endif

/* How many chunks the automatic plan makes. With every chunk's local half
 * run ahead (see pass_run), two chunks already hide the reduction: the
 * records are 32 bytes per channel, so a reduction costs its latency and
 * more chunks do not shorten it. Each chunk adds a collective, about a
 * microsecond of processor time in MPI (an MPI_Iallreduce begun, polled
 * and ended, measured at 0.8-1.4 us against 0.4 us for a blocking one of
 * 64 doubles at np 2), and another strided walk of every sample; the
 * earlier plan of up to 4 chunks (one per 8 L2 sizes) measured no better
 * than 2 (README, "SyncBN that hides its allreduce"). */
#define SBN__AUTO_CHUNKS 2

/* The most chunks whose local half runs ahead of the chunk being
 * finished, which bounds the requests in flight. */
#define SBN__MAX_DEPTH 16

/* The span of a block of rows, in elements, after which the request in
 * flight is polled: 4 MiB of float output, 0.3 to 1 ms of streaming here,
 * against a poll of at most a few microseconds and a reduction of the
 * records that needs a few polls on each process. A
 * block must span at least this much for the AVX-512 set's normalize to
 * stream its stores (it measures a strided call by its span, and streams
 * outputs of 4 MiB or more: avx512_inl.h); blocks of 64 KiB of
 * input, stored normally, made the chunked forward 16 to 24 % slower than
 * the dense one (np 2, NCHW 8x256x56x56 and 32x64x112x112). */
#define SBN__BLOCK_SPAN ((size_t)1 << 20)

/* Whether l's pass reduces over nothing but this process. */
static int bn_alone(const sbn_layer_t *l) {
  return l->comm == NULL || l->comm->size <= 1;
}

/* The local pass the environment asks for: SBN_BN_SINGLE_PASS=1 the L2
 * single pass, forward and backward; =0 no blocks at all (the unblocked
 * passes, for comparison); otherwise (unset) the default, L3 blocks for a
 * large backward (bn_l3_block). The L2 single pass is off by default: on
 * the machine it was measured on (AMD EPYC, 1 MiB L2 per core, 32 MiB L3,
 * one thread) the unblocked two passes were as fast or faster, forward
 * and backward, at 8 to 100 MB (README, "BatchNorm single pass"): one
 * core's bandwidth is bound by the misses it can keep in flight, not by
 * the bytes moved, and the second pass of a 2-pass forward costs about
 * what the block's second half costs from L2. Read on every call that
 * could use it: a getenv against a pass over more than half a megabyte. */
int sbn__bn_single_pass(void) {
  return sbn__env_bit("SBN_BN_SINGLE_PASS");
}

/* SBN_BN_FUSED=1 or 0 forces the fused NCHW passes on or off (for
 * comparison, and for the tests of the fused entries on any machine);
 * otherwise they are on where the core's L2 is 2 MiB or more
 * (sbn__wide_l2). They were measured winning on a Xeon with 2 MiB of L2
 * per core and a 260 MiB L3 (README, "a fused NCHW forward" and after),
 * where the bench's 64 MiB of copies stayed in the L3, and losing on the
 * AMD EPYC with 1 MiB of L2 and a 32 MiB L3, from memory and from the L3
 * alike (README, "Back on the AMD EPYC"): training floor ratios over six
 * ResNet-50 shapes, three alternated runs, fused forward 1.43-2.17
 * against 0.78-1.82 unfused, backward 1.56-2.44 against 1.18-1.76, and
 * with groups of half the L2 instead of an eighth still 1.12-1.75 and
 * 1.35-2.26. Read on every call, as SBN_BN_SINGLE_PASS is. */
int sbn__bn_fused_nchw(void) {
  int v = sbn__env_bit("SBN_BN_FUSED");
  return v >= 0 ? v : sbn__wide_l2();
}

/* A local backward's blocks of channels whose x and dy together fill
 * about this much, far less than the 32 MiB L3 (which other cores
 * share): the block's sums read x and dy from memory and its dx reads
 * them again from L3, where the unblocked dx of a tensor larger than the
 * L3 read them from memory a second time (24 bytes per element moved
 * instead of 16). Measured against no blocks (SBN_BN_SINGLE_PASS=0), 6
 * alternating rounds, backward floor_ratio: 8x256x56x56 1.60 -> 1.42,
 * 8x64x112x112 1.57 -> 1.36, 8x512x28x28 1.48 -> 1.42 (README, "BatchNorm
 * NCHW: short runs and the L3-blocked backward"). */
#ifndef SBN__L3_BLOCK_BYTES
#define SBN__L3_BLOCK_BYTES (4.0 * 1024.0 * 1024.0)
#endif

/* The shortest run of a block within one sample, in bytes of one tensor:
 * a block is N such runs, and with 32 samples of 64 KiB (32x64x32x32) the
 * blocked backward measured slower than the unblocked one in four runs
 * (1.48-1.58 against 1.30-1.47), each short run starting its streams
 * again. */
#define SBN__L3_MIN_RUN (128.0 * 1024.0)

static size_t bn_l3_block(const sbn__shape_t *sh, double chan) {
  double all = chan * (double)sh->C;
  /* Measured with the AVX-512 set's strided entries; a set without them
   * would run a block as one dense call per sample (kernels/strided.c),
   * and the AVX2 set's calls of fewer than 32 values take the reference's
   * double loops. */
  const sbn__kernels_t *t = sbn__kernels();
  if (all <= 2 * SBN__L3_BLOCK_BYTES || t->bwd_reduce_ld == NULL ||
      t->bwd_apply_ld == NULL)
    return 0;
  double cb = floor(SBN__L3_BLOCK_BYTES / chan);
  if (cb < 1)
    cb = 1;
  if (cb * (double)sh->S * sizeof(float) < SBN__L3_MIN_RUN)
    return 0;
  return cb >= (double)sh->C ? 0 : (size_t)cb;
}

size_t sbn__bn_block(const sbn_layer_t *l, const sbn__shape_t *sh,
                     int tensors) {
  /* The strided entries are single-threaded; a threaded build keeps its
   * split dense calls (ops/par.c). Channels-last rows hold every channel,
   * so no channel block is contiguous there and a block would have to
   * hold the whole tensor. */
  int mode = sbn__bn_single_pass();
  if (!bn_alone(l) || sh->layout != SBN_LAYOUT_NCHW || sh->C < 2 ||
      sh->numel == 0 || sbn_threads() > 1 || mode == 0)
    return 0;
  double chan = (double)sh->N * (double)sh->S * sizeof(float) * tensors;
  if (mode < 0)
    return tensors == 2 ? bn_l3_block(sh, chan) : 0;
  double cb = floor(SBN__BLOCK_FILL * SBN_PLAN_L2_BYTES / chan);
  if (cb >= (double)sh->C)
    return 0;
  return cb < 1 ? 1 : (size_t)cb;
}

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
  double bytes =
      count * (double)C * (double)sizeof(float) / (double)l->comm->size;
  if (bytes <= 2 * SBN_PLAN_L2_BYTES)
    return 0;
  size_t cc = (C + SBN__AUTO_CHUNKS - 1) / SBN__AUTO_CHUNKS;
  return cc < C ? cc : 0;
}

/* A channel range [c0, c1) of the (rows, C, s) view as blocks of `blk`
 * rows: block p is the strided view (n, c1 - c0, s) at element
 * p * blk * lda + c0 * s with lda = C * s, one call of the kernels'
 * strided entries, after which the request in flight is polled. All
 * channels are one block, the dense view. A block holds at least 32
 * values per channel, where the optimized sets keep their float block
 * sums, and otherwise spans at least SBN__BLOCK_SPAN elements. */
typedef struct range_s {
  size_t rows, blk, pieces, lda, s, c0, c1;
} range_t;

static range_t range_of(const sbn__shape_t *sh, size_t c0, size_t c1) {
  range_t r;
  int nchw = sh->layout == SBN_LAYOUT_NCHW;
  size_t cc = c1 - c0;
  r.rows = nchw ? sh->N : sh->N * sh->S;
  r.s = nchw ? sh->S : 1;
  r.lda = sh->C * r.s;
  r.c0 = c0;
  r.c1 = c1;
  if (c0 == 0 && c1 == sh->C) {
    r.blk = r.rows;
  } else {
    size_t least = (32 + r.s - 1) / r.s, run = cc * r.s, blk = 1;
    if (run < SBN__BLOCK_SPAN)
      blk += (SBN__BLOCK_SPAN - run + r.lda - 1) / r.lda;
    r.blk = blk > least ? blk : least;
  }
  if (r.blk > r.rows)
    r.blk = r.rows;
  r.pieces = sh->numel == 0 || r.blk == 0 ? 0 : (r.rows + r.blk - 1) / r.blk;
  return r;
}

/* Rows in block p, and the block's first element. */
static size_t blk_rows(const range_t *r, size_t p) {
  size_t left = r->rows - p * r->blk;
  return left < r->blk ? left : r->blk;
}

static size_t blk_off(const range_t *r, size_t p) {
  return p * r->blk * r->lda + r->c0 * r->s;
}

/* Polls the request in flight (after each block of rows) until it is
 * done: each poll costs a few microseconds of MPI's progress engine (it
 * walks every transport, tcp's sockets too), and a finished request needs
 * none. *done starts at 0 for each walk. */
static int poll(sbn_comm_t *comm, void *req, int *done) {
  return req == NULL || *done ? 0 : sbn__comm_itest(comm, req, done);
}

/* One chunked pass: its two halves per chunk, each a walk over the
 * chunk's blocks of rows, and the requests of the chunks begun and not yet
 * ended, in a ring of depth + 1 slots. */
typedef struct pass_s pass_t;
struct pass_s {
  sbn_layer_t *l;
  const sbn__shape_t *sh;
  size_t cc, K, depth;
  /* Nothing to reduce over other processes: see pass_alone. */
  int alone;
  sbn__chan_t ch;
  void *req[SBN__MAX_DEPTH + 1];
  /* The local half of range r: begun, block p of rows added, ended
   * (its records complete in ch.rec). */
  void (*lbegin)(pass_t *p, range_t r);
  void (*lblock)(pass_t *p, range_t r, size_t b);
  void (*lend)(pass_t *p, range_t r);
  /* The second half of chunk k (range r) from its reduced records:
   * prepared, then block b of rows written. */
  int (*aprep)(pass_t *p, size_t k, range_t r);
  void (*ablock)(pass_t *p, range_t r, size_t b);
  /* Forward: the arguments and what chunk 0's count gives. */
  const sbn_forward_args_t *fa;
  sbn__bn_fin_t fin;
  /* Backward: the arguments and the saved state. */
  const sbn_backward_args_t *ba;
  const double *mean, *istd;
  double count;
};

/* The local half of r, polling req meanwhile. */
static int pass_local(pass_t *p, range_t r, void *req) {
  int rc = 0, done = 0;
  p->lbegin(p, r);
  for (size_t b = 0; b < r.pieces && rc == 0; b++) {
    p->lblock(p, r, b);
    rc = poll(p->l->comm, req, &done);
  }
  p->lend(p, r);
  return rc;
}

/* The second half of chunk k, polling req meanwhile. */
static int pass_apply(pass_t *p, size_t k, range_t r, void *req) {
  int rc = p->aprep(p, k, r), done = 0;
  for (size_t b = 0; b < r.pieces && rc == 0; b++) {
    p->ablock(p, r, b);
    rc = poll(p->l->comm, req, &done);
  }
  return rc;
}

/* Chunk k of the pass. */
static range_t chunk(const pass_t *p, size_t k) {
  size_t c0 = k * p->cc, c1 = c0 + p->cc < p->sh->C ? c0 + p->cc : p->sh->C;
  range_t r = range_of(p->sh, c0, c1);
  /* With nothing to poll, a block's rows are one strided call. */
  if (p->alone) {
    r.blk = r.rows;
    r.pieces = p->sh->numel == 0 ? 0 : 1;
  }
  return r;
}

static void **slot(pass_t *p, size_t k) {
  return &p->req[k % (p->depth + 1)];
}

/* On failure every request begun is still ended, so every process
 * finishes the collectives it began (a count of 1 fails everywhere at
 * once, after chunk 0, and the others must not wait on chunk 1). */
static int end_all(pass_t *p, int rc) {
  for (size_t i = 0; i <= SBN__MAX_DEPTH; i++) {
    int e = sbn__comm_iend(p->l->comm, &p->req[i]);
    if (rc == 0)
      rc = e;
  }
  return rc;
}

/* Channels-last: a channel range is a segment of every row. Dense calls
 * per row cost 5 to 12 times the whole pass (16-channel segments), and
 * the AVX-512 set's strided entries, in blocks of rows spanning 4 MiB,
 * 3.4 to 6.7 times forward and 4.5 to 6.2 times backward; with the local
 * half dense over every channel and only the second half by segments
 * (each after its own reduction), still 2.3 to 4.0 and 3.0 to 3.6 times
 * (np 2, 8x256x56x56, 32x64x112x112, 32x512x28x28, one run; README,
 * "SyncBN that hides its allreduce"). So an NHWC process runs its
 * local half over every channel at once, issues the plan's chunk
 * reductions (the same collectives as every other process, whatever their
 * layout), and applies once they are all done: correct in a job that
 * mixes layouts, with nothing hidden here. */
static int pass_bulk(pass_t *p) {
  sbn_comm_t *comm = p->l->comm;
  range_t all = range_of(p->sh, 0, p->sh->C);
  int rc = pass_local(p, all, NULL);
  for (size_t k = 0; k < p->K && rc == 0; k++) {
    range_t n = chunk(p, k);
    if (k > p->depth)
      rc = sbn__comm_iend(comm, slot(p, k - p->depth - 1));
    if (rc == 0)
      rc = sbn__comm_ibegin(comm, p->ch.rec + n.c0, n.c1 - n.c0, slot(p, k));
  }
  rc = end_all(p, rc);
  return rc == 0 ? pass_apply(p, 0, all, NULL) : rc;
}

/* A pass with nothing to reduce over other processes: the chunks are L2
 * blocks of channels (sbn__bn_block), and each block's second half runs
 * right after its local half, while the block is in L2. (Interleaving
 * block k's second half with block k + 1's local half, 64 KiB at a time,
 * measured slower still.) */
static int pass_alone(pass_t *p) {
  int rc = 0;
  for (size_t k = 0; k < p->K && rc == 0; k++) {
    range_t r = chunk(p, k);
    rc = pass_local(p, r, NULL);
    if (rc == 0)
      rc = pass_apply(p, k, r, NULL);
  }
  return rc;
}

/* Runs the local half of every chunk up to `depth` chunks ahead of the
 * one being applied, beginning each chunk's reduction as soon as its
 * records are complete. A process that is behind then never waits: the
 * others began every chunk's reduction before it needs the result; and
 * the one ahead waits only for the late one's chunk, not for its whole
 * pass. */
static int pass_run(pass_t *p) {
  sbn_comm_t *comm = p->l->comm;
  size_t next = 0;
  int rc = 0;
  p->K = (p->sh->C + p->cc - 1) / p->cc;
  p->depth = p->K - 1 < SBN__MAX_DEPTH ? p->K - 1 : SBN__MAX_DEPTH;
  for (size_t i = 0; i <= SBN__MAX_DEPTH; i++)
    p->req[i] = NULL;
  if (p->alone)
    return pass_alone(p);
  if (p->sh->layout == SBN_LAYOUT_NHWC)
    return pass_bulk(p);
  for (size_t k = 0; k < p->K && rc == 0; k++) {
    for (; next < p->K && next <= k + p->depth && rc == 0; next++) {
      range_t n = chunk(p, next);
      rc = pass_local(p, n, next > k ? *slot(p, k) : NULL);
      if (rc == 0)
        rc = sbn__comm_ibegin(comm, p->ch.rec + n.c0, n.c1 - n.c0,
                              slot(p, next));
    }
    if (rc == 0)
      rc = sbn__comm_iend(comm, slot(p, k));
    if (rc == 0)
      rc = pass_apply(p, k, chunk(p, k), k + 1 < next ? *slot(p, k + 1) : NULL);
  }
  return end_all(p, rc);
}

/* Forward's local half: the shifted moments of the range into
 * ch.rec[c0..c1) (the shift and sums of sbn__view_moments). */
static void fwd_lbegin(pass_t *p, range_t r) {
  const float *x = p->fa->x;
  for (size_t c = r.c0; c < r.c1; c++) {
    p->ch.k[c] = r.pieces > 0 ? x[c * r.s] : 0.0f;
    p->ch.d1[c] = 0;
    p->ch.d2[c] = 0;
  }
}

static void fwd_lblock(pass_t *p, range_t r, size_t b) {
  sbn__chan_t *ch = &p->ch;
  sbn__k_moments_ld(p->fa->x + blk_off(&r, b), blk_rows(&r, b), r.c1 - r.c0,
                    r.s, r.lda, ch->k + r.c0, ch->d1 + r.c0, ch->d2 + r.c0);
}

static void fwd_lend(pass_t *p, range_t r) {
  double n = (double)p->sh->N * (double)p->sh->S;
  for (size_t c = r.c0; c < r.c1; c++)
    sbn__moments_finish(n, p->ch.k[c], p->ch.d1[c], p->ch.d2[c], &p->ch.rec[c]);
}

static int fwd_aprep(pass_t *p, size_t k, range_t r) {
  int rc;
  /* The count is global, so chunk 0's reduction gives it to all. */
  if (k == 0) {
    p->l->bn_last_count = p->ch.rec[0].v[0];
    if ((rc = sbn__bn_fin_init(p->l, p->fa, p->sh, p->ch.rec, &p->fin)) != 0)
      return rc;
  }
  sbn__bn_fin_chan(p->l, p->fa, &p->fin, p->ch.rec, r.c0, r.c1, &p->ch);
  return 0;
}

static void fwd_ablock(pass_t *p, range_t r, size_t b) {
  size_t off = blk_off(&r, b), c0 = r.c0;
  const sbn__chan_t *ch = &p->ch;
  sbn__k_normalize_ld(p->fa->x + off, p->fa->y + off, blk_rows(&r, b),
                      r.c1 - c0, r.s, r.lda, ch->mh + c0, ch->ml + c0,
                      ch->k1 + c0, ch->k2 + c0);
}

/* Backward's local half: the sums of the range into ch.rec[c0..c1) and
 * the local dbias and dweight (as bn_bwd_local writes them); d1 and d2
 * start at 0 for every channel (sbn__bn_overlap_backward). */
static void bwd_lbegin(pass_t *p, range_t r) {
  (void)p, (void)r;
}

static void bwd_lblock(pass_t *p, range_t r, size_t b) {
  size_t off = blk_off(&r, b), c0 = r.c0;
  sbn__chan_t *ch = &p->ch;
  sbn__k_bwd_reduce_ld(p->ba->x + off, p->ba->dy + off, blk_rows(&r, b),
                       r.c1 - c0, r.s, r.lda, ch->dmean + c0, ch->distd + c0,
                       ch->d1 + c0, ch->d2 + c0);
}

static void bwd_lend(pass_t *p, range_t r) {
  const sbn_backward_args_t *a = p->ba;
  sbn_rec_t *recs = p->ch.rec;
  for (size_t c = r.c0; c < r.c1; c++) {
    recs[c].tag = SBN_REC_SUM;
    recs[c].v[0] = p->ch.d1[c];
    recs[c].v[1] = p->ch.d2[c];
    recs[c].v[2] = 0;
  }
  sbn__put_dwb(a, r.c0, r.c1, p->ch.d1, p->ch.d2);
}

static int bwd_aprep(pass_t *p, size_t k, range_t r) {
  (void)k;
  sbn__bn_bwd_chan(p->l, p->ba, p->mean, p->istd, p->count, p->ch.rec, r.c0,
                   r.c1, &p->ch);
  return 0;
}

static void bwd_ablock(pass_t *p, range_t r, size_t b) {
  size_t off = blk_off(&r, b), c0 = r.c0;
  const sbn_backward_args_t *a = p->ba;
  const sbn__chan_t *ch = &p->ch;
  sbn__k_bwd_apply_ld(a->x + off, a->dy + off, a->dx + off, blk_rows(&r, b),
                      r.c1 - c0, r.s, r.lda, ch->dmean + c0, ch->distd + c0,
                      ch->dk1 + c0, ch->dk2 + c0, ch->dk3 + c0);
}

int sbn__bn_overlap_forward(sbn_layer_t *l, const sbn_forward_args_t *a,
                            const sbn__shape_t *sh, size_t cc) {
  pass_t p = {.l = l, .sh = sh, .cc = cc, .alone = bn_alone(l), .fa = a};
  p.lbegin = fwd_lbegin;
  p.lblock = fwd_lblock;
  p.lend = fwd_lend;
  p.aprep = fwd_aprep;
  p.ablock = fwd_ablock;
  sbn__chan_carve(a->workspace, sh->C, &p.ch);
  int rc = pass_run(&p);
  if (rc == 0)
    sbn__bn_fin_done(a, &p.fin);
  return rc;
}

int sbn__bn_overlap_backward(sbn_layer_t *l, const sbn_backward_args_t *a,
                             const sbn__shape_t *sh, size_t cc) {
  pass_t p = {.l = l, .sh = sh, .cc = cc, .alone = bn_alone(l), .ba = a};
  int rc = sbn__saved_get(a->saved, a->saved_bytes, l->p.op, a->mode, sh->C,
                          &p.count, &p.mean, &p.istd);
  if (rc != 0)
    return rc;
  p.lbegin = bwd_lbegin;
  p.lblock = bwd_lblock;
  p.lend = bwd_lend;
  p.aprep = bwd_aprep;
  p.ablock = bwd_ablock;
  sbn__chan_carve(a->workspace, sh->C, &p.ch);
  for (size_t c = 0; c < sh->C; c++) {
    p.ch.dmean[c] = p.mean[c];
    p.ch.distd[c] = p.istd[c];
    p.ch.d1[c] = 0;
    p.ch.d2[c] = 0;
  }
  return pass_run(&p);
}
