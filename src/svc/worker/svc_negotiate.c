/* The event-driven start of agreement rounds and the response cache (see
 * svc_worker_int.h): when a round starts, the bitwise OR of fixed-size
 * bit sets over the cache slots that every rank runs first, and what the
 * ranks learn from it.
 *
 * Words of the negotiation, for S slots in use, H = ceil(S / 4) and
 * W = ceil(S / 64):
 *   [0]       flags: NEG_LIST (some rank has an entry the cache does not
 *             cover), NEG_FULL (some rank has an entry past the stall
 *             timeout, or the cache is stale: every entry goes through the
 *             gathered lists this round), and, from bit 8, one bit 8 + k
 *             per rank where 2^k covers its entries
 *   [1, 1+H)  STEP: 16 bits per slot; bit d - 1 set when this rank has
 *             the slot's step last + d queued (1 <= d <= 16), so the OR
 *             has exactly one bit set only when every rank that has the
 *             slot queued has the same step
 *   then W    LACK: this rank is in the slot's group and has none of the
 *             16 next steps queued
 *   then W    STALE: this rank has the slot's key with other parameters
 *             (the layer was registered again)
 * A slot is ready when its STEP field has one bit and none of its group
 * lacks it. The bytes are the same on every rank and do not grow with the
 * ranks: 8 + 4.25 bytes per slot. */
#include <stdlib.h>
#include <string.h>

#include "svc_obs.h"
#include "svc_worker_int.h"

enum { NEG_LIST = 1, NEG_FULL = 2, NEG_SIZE_SHIFT = 8 };

enum { NEG_STEPS = 16 };

/* The word counts of the STEP, LACK and STALE sets. */
static void svc__neg_shape(const svc_worker_t *w, size_t *h, size_t *W) {
  *h = (w->slot_hi + 3) / 4;
  *W = (w->slot_hi + 63) / 64;
}

static unsigned svc__field(const uint64_t *step, size_t s) {
  return (unsigned)((step[s / 4] >> (16 * (s % 4))) & 0xffffu);
}

static void svc__bit_set(uint64_t *v, size_t i) {
  v[i / 64] |= (uint64_t)1 << (i % 64);
}

static int svc__bit(const uint64_t *v, size_t i) {
  return (int)((v[i / 64] >> (i % 64)) & 1);
}

/* The slot of p's (layer, direction, group), or -1. */
static int svc__slot_of(const svc_worker_t *w, uint64_t name, uint32_t dir,
                        uint32_t grp) {
  for (size_t i = 0; i < w->slot_hi; i++) {
    const svc__slot_t *s = &w->slots[i];
    if (s->used && s->name == name && s->dir == dir && s->grp == grp)
      return (int)i;
  }
  return -1;
}

static int svc__slot_fits(const svc__slot_t *s, const svc__pend_t *p) {
  return s->fp == p->fp && s->C == (uint32_t)p->nrec && s->gsize == p->gsize &&
         s->tag == p->tag;
}

/* Whether this rank belongs to the group of slot s. */
static int svc__slot_mine(const svc_worker_t *w, const svc__slot_t *s) {
  return s->gsize > 0 && (uint32_t)w->cfg.rank / s->gsize == s->grp;
}

/* This rank's entry for each slot: the one of the smallest step among
 * the 16 steps after the slot's last (p->cslot says which it is); the
 * others are left to the gathered lists. */
static void svc__pick(svc_worker_t *w, svc__pend_t **pick, uint64_t *stale,
                      uint64_t *flags, size_t *total) {
  for (svc__pend_t *p = w->pend; p != NULL; p = p->next) {
    int s = svc__slot_of(w, p->name, p->dir, p->grp);
    p->fresh = 0;
    p->cslot = -1;
    if (p->sent)
      continue;
    (*total)++;
    if (w->now - p->t0 > w->stall_timeout)
      *flags |= NEG_FULL;
    if (s >= 0 && !svc__slot_fits(&w->slots[s], p))
      svc__bit_set(stale, (size_t)s);
    else if (s >= 0 && p->step > w->slots[s].last_step &&
             p->step - w->slots[s].last_step <= NEG_STEPS &&
             (pick[s] == NULL || p->step < pick[s]->step))
      pick[s] = p;
  }
}

int svc__neg_begin(svc_worker_t *w) {
  size_t h, W, n, total = 0;
  uint64_t *v, *step, *lack, *stale;
  svc__pend_t **pick = calloc(w->slot_hi + 1, sizeof *pick);
  int rc, k = 0;
  svc__neg_shape(w, &h, &W);
  n = 1 + h + 2 * W;
  v = calloc(n, sizeof *v);
  if (v == NULL || pick == NULL) {
    free(v);
    free(pick);
    return svc_set_error(SVC_RESOURCE, "agreement: out of memory");
  }
  step = v + 1;
  lack = step + h;
  stale = lack + W;
  svc__pick(w, pick, stale, &v[0], &total);
  for (size_t i = 0; i < w->slot_hi; i++) {
    svc__pend_t *p = pick[i];
    if (p != NULL) {
      uint64_t d = p->step - w->slots[i].last_step - 1;
      step[i / 4] |= (uint64_t)1 << (16 * (i % 4) + d);
      p->cslot = (int)i;
      p->listed = 1;
    } else if (w->slots[i].used && svc__slot_mine(w, &w->slots[i])) {
      svc__bit_set(lack, i);
    }
  }
  for (svc__pend_t *p = w->pend; p != NULL; p = p->next)
    if (!p->sent && p->cslot < 0)
      v[0] |= NEG_LIST;
  free(pick);
  /* The gather, if the round needs one, must fit every rank's entries,
   * all of them in a full round (which a rank learns only afterwards). */
  if (total > SVC__MAXE)
    total = SVC__MAXE;
  while (((size_t)1 << k) < total)
    k++;
  v[0] |= (uint64_t)1 << (NEG_SIZE_SHIFT + k);
  free(w->neg);
  w->neg = v;
  w->neg_n = n;
  rc = w->sync->vt->iallreduce_bor_begin(w->sync, v, n, &w->sync_req);
  if (rc != 0)
    return svc_set_error(SVC_INTERNAL, "agreement: iallreduce_bor_begin: %s",
                         sbn_last_error());
  w->m.negotiations++;
  w->m.agree_bytes += n * sizeof *v;
  svc_obs_begin(SVC_SPAN_NEGOTIATION);
  w->phase = SVC__NEG;
  return 0;
}

/* Puts slot s, ready, into the round: its pair into w->cready, this
 * rank's entry (if it is in the group) into the reduce list. */
static int svc__slot_ready(svc_worker_t *w, size_t s, unsigned d) {
  svc__slot_t *sl = &w->slots[s];
  svc__gent_t *e = &w->cready[w->ncready++];
  memset(e, 0, sizeof *e);
  e->name = sl->name;
  e->step = sl->last_step + d;
  e->fp = sl->fp;
  e->dir = sl->dir;
  e->C = sl->C;
  e->gsize = sl->gsize;
  e->grp = sl->grp;
  e->tag = sl->tag;
  if (svc__slot_mine(w, sl)) {
    svc__pend_t *p = w->pend;
    while (p != NULL && p->cslot != (int)s)
      p = p->next;
    if (p == NULL)
      return svc_set_error(SVC_INTERNAL,
                           "agreement: a cached entry is missing");
    p->sent = 1;
    w->roff[w->rlist_n] = w->cready_nrec;
    w->rlist[w->rlist_n++] = p;
    w->m.cache_hits++;
  }
  w->cready_nrec += sl->C;
  sl->last_step += d;
  sl->used_at = w->epoch;
  svc__spec_note(w, (int)s);
  return 0;
}

int svc__neg_done(svc_worker_t *w, int *gather, size_t *per_rank) {
  size_t h, W;
  const uint64_t *v = w->neg, *step, *lack, *stale;
  int k = 63 - NEG_SIZE_SHIFT;
  svc__neg_shape(w, &h, &W);
  step = v + 1;
  lack = step + h;
  stale = lack + W;
  w->rlist_n = 0;
  w->ncready = 0;
  w->cready_nrec = 0;
  w->full = (v[0] & NEG_FULL) != 0;
  /* A slot some rank holds with other parameters goes on every rank; the
   * round then lists everything, so that the gather's comparison reports
   * the mismatch to every rank. */
  for (size_t i = 0; i < w->slot_hi; i++)
    if (svc__bit(stale, i)) {
      w->slots[i].used = 0;
      w->full = 1;
    }
  while (k > 0 && !((v[0] >> (NEG_SIZE_SHIFT + k)) & 1))
    k--;
  *per_rank = (size_t)1 << k;
  *gather = w->full || (v[0] & NEG_LIST) != 0;
  if (w->full)
    return 0;
  for (size_t i = 0; i < w->slot_hi; i++) {
    unsigned f = svc__field(step, i), d = 0;
    int rc;
    /* No bit: nobody has it; two bits: the ranks are at different steps
     * and wait (the stall timeout settles it through the lists). */
    if (f == 0 || (f & (f - 1)) != 0 || svc__bit(lack, i) || !w->slots[i].used)
      continue;
    while (!((f >> d) & 1))
      d++;
    if ((rc = svc__slot_ready(w, i, d + 1)) != 0)
      return rc;
  }
  return 0;
}

/* The slot for a key the cache does not hold: the first free one, else
 * the one agreed least recently (the lowest index among equals), evicted;
 * -1 when every slot was agreed in this very round (the key then waits
 * for a later one). Every rank has the same table and the same rounds,
 * so every rank picks the same slot. */
static int svc__slot_take(svc_worker_t *w) {
  int s, old = -1;
  for (s = 0; s < (int)w->cfg.cache_slots; s++) {
    if (!w->slots[s].used)
      return s;
    if (w->slots[s].used_at < w->epoch &&
        (old < 0 || w->slots[s].used_at < w->slots[old].used_at))
      old = s;
  }
  if (old >= 0)
    w->m.cache_evictions++;
  return old;
}

void svc__cache_learn(svc_worker_t *w, const svc__gent_t *rd, size_t n) {
  for (size_t i = 0; i < n; i++) {
    int s = svc__slot_of(w, rd[i].name, rd[i].dir, rd[i].grp), known = s >= 0;
    svc__slot_t *sl;
    if (s < 0 && (s = svc__slot_take(w)) < 0)
      continue;
    sl = &w->slots[s];
    if (!known)
      sl->nnxt = 0; /* what the slot's last key knew */
    sl->used_at = w->epoch;
    sl->used = 1;
    sl->name = rd[i].name;
    sl->dir = rd[i].dir;
    sl->grp = rd[i].grp;
    sl->fp = rd[i].fp;
    sl->C = rd[i].C;
    sl->gsize = rd[i].gsize;
    sl->tag = rd[i].tag;
    if ((size_t)s >= w->slot_hi)
      w->slot_hi = (size_t)s + 1;
    /* A step agreed through the lists (out of order, or in a full round)
     * moves the slot's cadence only forward. */
    if (!known || rd[i].step > sl->last_step)
      sl->last_step = rd[i].step;
    svc__spec_note(w, s);
  }
}

int svc__wake(svc_worker_t *w, int *rc) {
  int own = 0;
  *rc = 0;
  for (const svc__pend_t *p = w->pend; p != NULL; p = p->next) {
    if (p->fresh)
      own = 1;
    else if (!p->sent && w->now - p->t0 > w->stall_timeout &&
             w->now >= w->expire_next)
      own = 2;
  }
  if (own == 2)
    w->expire_next = w->now + w->stall_timeout / 2;
  if (!own && w->bell_max < w->epoch)
    return 0;
  /* The round of this epoch starts here. The others are idle in it (or
   * will be once their last round ends) and learn of it by the doorbell,
   * passed on along a binary tree over the ranks (parent (r - 1) / 2,
   * children 2r + 1 and 2r + 2) by every rank that joins: every rank hears
   * of it after at most 2 log2(P) hops, and none sends more than three
   * messages per round, whatever the job's size. The one sent back to
   * where it came from is harmless: a doorbell only raises bell_max. */
  for (int k = 0; k < 3 && w->cfg.size > 1; k++) {
    int r = w->cfg.rank, to = k == 0 ? (r > 0 ? (r - 1) / 2 : -1) : 2 * r + k;
    int e;
    if (to < 0 || to >= w->cfg.size)
      continue;
    if ((e = w->sync->vt->bell_send(w->sync, to, w->epoch)) != 0) {
      *rc = svc_set_error(SVC_INTERNAL, "agreement: bell_send: %s",
                          sbn_last_error());
      return 0;
    }
    w->m.bells++;
  }
  return 1;
}

/* ------------------------------------------------------------------ */
/* Speculative rounds (see svc__spec_t) */

void svc__spec_note(svc_worker_t *w, int s) {
  svc__spec_t *sp = &w->spec;
  for (uint32_t i = 0; i < sp->nnow; i++)
    if (sp->now[i] == s)
      return;
  if (sp->nnow < SVC__SPEC_SLOTS)
    sp->now[sp->nnow++] = s;
  else
    sp->over = 1;
}

void svc__spec_learn(svc_worker_t *w) {
  svc__spec_t *sp = &w->spec;
  /* A speculative round that delivered only part of its guess, or that
   * some rank's other entries follow with a negotiation, is one round
   * with the next for the learning: were its slots learned apart, the
   * guess would keep covering only them, and every step would take two
   * rounds. */
  if (sp->carry) {
    sp->carry = 0;
    return;
  }
  if (sp->nnow > 0) {
    if (sp->prev >= 0 && (size_t)sp->prev < w->slot_hi) {
      svc__slot_t *from = &w->slots[sp->prev];
      from->nnxt = sp->over ? 0 : sp->nnow;
      memcpy(from->nxt, sp->now, sp->nnow * sizeof *sp->now);
    }
    sp->prev = sp->now[0];
    sp->prev_cached = !sp->gathered;
  }
  sp->nnow = 0;
  sp->over = 0;
  sp->gathered = 0;
  sp->force = 0;
}

/* The ranks of slot s's group: its size, or fewer for the last group of
 * a job whose size the group size does not divide. */
static int svc__slot_need(const svc_worker_t *w, const svc__slot_t *s) {
  int lo = (int)(s->grp * s->gsize);
  return w->cfg.size - lo < (int)s->gsize ? w->cfg.size - lo : (int)s->gsize;
}

/* The predicted slots (into w->spec.set) and the round's record count,
 * or 0 when the shared state predicts nothing. */
static size_t svc__spec_predict(svc_worker_t *w) {
  svc__spec_t *sp = &w->spec;
  const svc__slot_t *from;
  size_t nrec = 1;
  if (!w->cfg.speculate || sp->force || !sp->prev_cached || sp->prev < 0 ||
      (size_t)sp->prev >= w->slot_hi)
    return 0;
  from = &w->slots[sp->prev];
  if (!from->used || from->nnxt == 0)
    return 0;
  for (uint32_t i = 0; i < from->nnxt; i++) {
    int32_t s = from->nxt[i];
    if (s < 0 || (size_t)s >= w->slot_hi || !w->slots[s].used)
      return 0;
    nrec += 1 + w->slots[s].C;
  }
  if (nrec > SVC__SPEC_RECS)
    return 0;
  sp->nset = from->nnxt;
  memcpy(sp->set, from->nxt, sp->nset * sizeof *sp->set);
  return nrec;
}

/* The index of slot s in the speculative set, or -1. */
static int svc__spec_index(const svc_worker_t *w, int s) {
  for (uint32_t i = 0; i < w->spec.nset; i++)
    if (w->spec.set[i] == s)
      return (int)i;
  return -1;
}

/* Puts this rank's entries of the predicted slots into the round (their
 * readiness records and records at their slot's place, p->cslot = the
 * slot's index in the set) and returns whether some entry or stall of
 * this rank needs the negotiation instead. */
static int svc__spec_fill(svc_worker_t *w, svc__pend_t **pick,
                          uint64_t stale_or_full) {
  svc__spec_t *sp = &w->spec;
  size_t at = 1 + sp->nset;
  int other = stale_or_full != 0;
  const sbn_rec_t none = {SBN_REC_SUM, {0, 0, 0}};
  /* Every record is written once (the buffer is not zeroed first): an
   * entry's records are copied over its slot whole, tags included, and
   * the slots without one get identity records. */
  w->rbuf[0] = none;
  for (uint32_t i = 0; i < sp->nset; i++) {
    const svc__slot_t *sl = &w->slots[sp->set[i]];
    svc__pend_t *p = svc__slot_mine(w, sl) ? pick[sp->set[i]] : NULL;
    w->rbuf[1 + i] = none;
    if (p == NULL)
      for (uint32_t c = 0; c < sl->C; c++)
        w->rbuf[at + c] = (sbn_rec_t){sl->tag, {0, 0, 0}};
    if (p != NULL) {
      double d = (double)(p->step - sl->last_step);
      w->rbuf[1 + i].v[0] = 1;
      w->rbuf[1 + i].v[1] = d;
      w->rbuf[1 + i].v[2] = d * d;
      memcpy(w->rbuf + at, p->recs, sl->C * sizeof *w->rbuf);
      p->cslot = (int)i;
      p->listed = 1;
      w->roff[w->rlist_n] = at;
      w->rlist[w->rlist_n++] = p;
    }
    at += sl->C;
  }
  /* Entries the guess does not cover: no slot, another slot, or a step
   * outside the slot's window (a later step of a predicted slot waits for
   * the next round, which may guess it too). */
  for (const svc__pend_t *p = w->pend; p != NULL && !other; p = p->next) {
    int s = svc__slot_of(w, p->name, p->dir, p->grp);
    if (p->sent || p->cslot >= 0)
      continue;
    if (s < 0 || svc__spec_index(w, s) < 0 ||
        !svc__slot_fits(&w->slots[s], p) || p->step <= w->slots[s].last_step ||
        p->step - w->slots[s].last_step > NEG_STEPS)
      other = 1;
  }
  return other;
}

int svc__rbuf_zero(svc_worker_t *w, size_t n, int zero) {
  if (n > w->rbuf_cap || w->rbuf == NULL) {
    sbn_rec_t *b = calloc(n > 0 ? n : 1, sizeof *b);
    if (b == NULL)
      return -SVC_RESOURCE;
    free(w->rbuf);
    w->rbuf = b;
    w->rbuf_cap = n > 0 ? n : 1;
    return 0;
  }
  if (zero)
    memset(w->rbuf, 0, n * sizeof *w->rbuf);
  return 0;
}

int svc__spec_begin(svc_worker_t *w) {
  size_t nrec = svc__spec_predict(w), W = (w->slot_hi + 63) / 64, total = 0;
  svc__pend_t **pick;
  uint64_t *stale, flags = 0, any = 0;
  int rc;
  if (nrec == 0)
    return 0;
  pick = calloc(w->slot_hi + 1, sizeof *pick);
  stale = calloc(W + 1, sizeof *stale);
  if (pick == NULL || stale == NULL || svc__rbuf_zero(w, nrec, 0) != 0) {
    free(pick);
    free(stale);
    return svc_set_error(SVC_RESOURCE, "agreement: out of memory");
  }
  svc__pick(w, pick, stale, &flags, &total);
  for (size_t i = 0; i < W; i++)
    any |= stale[i];
  w->rlist_n = 0;
  w->rbuf[0].v[0] = svc__spec_fill(w, pick, any | (flags & NEG_FULL));
  free(pick);
  free(stale);
  rc = w->sync->vt->iallreduce_begin(w->sync, w->rbuf, nrec, &w->sync_req);
  if (rc != 0)
    return svc_set_error(SVC_INTERNAL, "agreement: iallreduce_begin: %s",
                         sbn_last_error());
  w->m.spec_rounds++;
  w->m.agree_bytes += (1 + w->spec.nset) * sizeof *w->rbuf;
  w->m.reduce_t0 = svc_obs_now();
  svc_obs_begin(SVC_SPAN_ALLREDUCE);
  w->phase = SVC__SPEC;
  return 1;
}

/* Whether the readiness record r of slot sl says that every rank of the
 * group has its entry at one step offset; sets *d to it. */
static int svc__spec_ready(const svc_worker_t *w, const svc__slot_t *sl,
                           const sbn_rec_t *r, uint64_t *d) {
  double n = r->v[0], s = r->v[1], q = r->v[2];
  if (n != (double)svc__slot_need(w, sl) || n * q != s * s)
    return 0;
  *d = (uint64_t)(s / n);
  return *d >= 1 && *d <= NEG_STEPS && (double)*d * n == s;
}

size_t svc__spec_settle(svc_worker_t *w, unsigned char *ready) {
  svc__spec_t *sp = &w->spec;
  size_t nready = 0;
  int other = w->rbuf[0].v[0] > 0;
  for (uint32_t i = 0; i < sp->nset; i++) {
    svc__slot_t *sl = &w->slots[sp->set[i]];
    uint64_t d;
    ready[i] = (unsigned char)svc__spec_ready(w, sl, &w->rbuf[1 + i], &d);
    if (!ready[i])
      continue;
    sl->last_step += d;
    sl->used_at = w->epoch;
    svc__spec_note(w, sp->set[i]);
    nready++;
  }
  if (nready == 0)
    w->m.spec_misses++;
  sp->carry = other || nready < sp->nset;
  sp->force = other;
  return nready;
}
