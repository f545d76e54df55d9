/* The cross-rank agreement engine: pending entries and the delivery of
 * their replies, the gathered ready lists, the fused allreduce, stalls,
 * poisoned keys and mismatches (see svc_worker.h).
 *
 * The engine knows an entry by its key (name hash, step, direction) and
 * its agreement fields only; what an entry means is its handler's, which
 * it reaches through the entry's done callback alone. */
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "svc_obs.h"
#include "svc_worker_int.h"

/* The communicator's last error as the engine's: the ranks' collectives
 * no longer line up, which nothing in the worker can repair. */
static int svc__comm_error(int rc, const char *call) {
  return svc_set_error(SVC_INTERNAL, "agreement: %s failed: %s (%s)", call,
                       sbn_err_name(rc), sbn_last_error());
}

/* ------------------------------------------------------------------ */
/* Poisoned keys */

int svc__poisoned(const svc_worker_t *w, uint64_t name, uint64_t step,
                  uint32_t dir, uint32_t grp) {
  size_t n = w->npoison < SVC__POISON ? w->npoison : SVC__POISON;
  for (size_t i = 0; i < n; i++)
    if (w->poison[i].name == name && w->poison[i].step == step &&
        w->poison[i].dir == dir && w->poison[i].grp == grp)
      return (int)w->poison[i].code;
  return 0;
}

/* Remembers why the key failed, so that a rank whose entry comes after
 * the decision (rounds start as soon as some ranks have theirs) fails the
 * same way as those that were there. */
static void svc__poison(svc_worker_t *w, uint64_t name, uint64_t step,
                        uint32_t dir, uint32_t grp, svc_code_t code) {
  if (svc__poisoned(w, name, step, dir, grp))
    return;
  w->poison[w->poison_next].name = name;
  w->poison[w->poison_next].step = step;
  w->poison[w->poison_next].dir = dir;
  w->poison[w->poison_next].grp = grp;
  w->poison[w->poison_next].code = (uint32_t)code;
  w->poison_next = (w->poison_next + 1) % SVC__POISON;
  w->npoison++;
}

/* ------------------------------------------------------------------ */
/* Pending entries and their replies */

svc__pend_t *svc__pend_alloc(svc_worker_t *w, uint64_t name, uint64_t step,
                             uint32_t dir, size_t nrec, uint32_t tag) {
  svc__pend_t *p = calloc(1, sizeof *p);
  if (p == NULL)
    return NULL;
  p->recs = malloc((nrec > 0 ? nrec : 1) * sizeof *p->recs);
  if (p->recs == NULL) {
    free(p);
    return NULL;
  }
  /* Identity records of the entry's kind, written in one pass. */
  for (size_t i = 0; i < nrec; i++)
    p->recs[i] = (sbn_rec_t){(double)tag, {0, 0, 0}};
  p->name = name;
  p->step = step;
  p->dir = dir;
  p->tag = tag;
  p->nrec = nrec;
  p->gsize = (uint32_t)w->cfg.size;
  p->grp = 0;
  p->t0 = w->now;
  return p;
}

void svc__pend_free(svc__pend_t *p) {
  if (p == NULL)
    return;
  svc_request_free(&p->q);
  free(p->y);
  free(p->dx);
  free(p->dw);
  free(p->db);
  free(p->ws);
  free(p->recs);
  free(p->ctx);
  free(p);
}

static void svc__pend_append(svc_worker_t *w, svc__pend_t *p) {
  svc__pend_t **pp = &w->pend;
  while (*pp != NULL)
    pp = &(*pp)->next;
  p->next = NULL;
  p->fresh = 1;
  p->cslot = -1;
  *pp = p;
}

void svc__pend_queue(svc__call_t *call, svc__pend_t *p) {
  p->token = call->token;
  p->batch = call->batch;
  p->slot = call->slot;
  call->deferred = 1;
  svc__pend_append(call->w, p);
}

void svc__pend_chain(svc_worker_t *w, svc__pend_t *p, svc__pend_t *s) {
  s->token = p->token;
  s->batch = p->batch;
  s->slot = p->slot;
  s->direct = p->direct;
  p->batch = NULL;
  p->direct = NULL;
  svc__pend_append(w, s);
}

void svc__pend_unlink(svc_worker_t *w, svc__pend_t *p) {
  for (svc__pend_t **pp = &w->pend; *pp != NULL; pp = &(*pp)->next)
    if (*pp == p) {
      *pp = p->next;
      return;
    }
}

void svc__batch_free(svc__batch_t *b) {
  for (size_t i = 0; i < b->n; i++)
    free(b->reply[i]);
  free(b->reply);
  free(b->len);
  free(b);
}

void svc__batch_fill(svc_worker_t *w, svc__batch_t *b, size_t i,
                     svc_frame_t *f) {
  uint8_t *out = NULL;
  size_t out_len = 0;
  if (f->tail != NULL)
    w->m.tensor_copies++;
  svc_frame_flatten(f); /* frees f when out of memory: NULL below */
  b->reply[i] = f->buf;
  b->len[i] = f->len;
  memset(f, 0, sizeof *f);
  if (--b->left > 0)
    return;
  if (b->token != NULL && w->deliver != NULL) {
    /* A sub-reply lost to memory becomes an error element, so the batch
     * reply still has one element per request. */
    for (size_t k = 0; k < b->n; k++)
      if (b->reply[k] == NULL)
        svc_encode_error(NULL, SVC_RESOURCE, "reply: out of memory",
                         &b->reply[k], &b->len[k]);
    if (svc_encode_batch(&b->id, b->reply, b->len, b->n, &out, &out_len) != 0)
      svc_encode_error(&b->id, SVC_RESOURCE, "batch: out of memory", &out,
                       &out_len);
    if (out != NULL) {
      svc_frame_t whole;
      svc_frame_whole(&whole, out, out_len);
      w->deliver(w->deliver_ctx, b->token, &whole);
    }
  }
  svc__batch_free(b);
}

void svc__pend_deliver_frame(svc_worker_t *w, svc__pend_t *p, svc_frame_t *f) {
  if (p->direct != NULL) {
    *p->direct = *f;
    p->direct = NULL;
    return;
  }
  if (p->batch != NULL) {
    svc__batch_t *b = p->batch;
    p->batch = NULL;
    svc__batch_fill(w, b, p->slot, f);
    return;
  }
  if (f->buf == NULL)
    return;
  if (p->token != NULL && w->deliver != NULL)
    w->deliver(w->deliver_ctx, p->token, f);
  else
    svc_frame_free(f);
}

void svc__pend_deliver(svc_worker_t *w, svc__pend_t *p, uint8_t *buf,
                       size_t len) {
  svc_frame_t f;
  svc_frame_whole(&f, buf, len);
  svc__pend_deliver_frame(w, p, &f);
}

void svc__pend_reply_error(svc_worker_t *w, svc__pend_t *p, svc_code_t code,
                           const char *msg) {
  uint8_t *buf = NULL;
  size_t len = 0;
  w->m.errors[code]++;
  svc_encode_error(&p->q.id, code, msg, &buf, &len);
  svc__pend_deliver(w, p, buf, len);
}

int svc__pend_queued(const svc_worker_t *w, uint64_t name, uint64_t step,
                     uint32_t dir) {
  for (const svc__pend_t *p = w->pend; p != NULL; p = p->next)
    if (p->name == name && p->step == step && p->dir == dir)
      return 1;
  return 0;
}

uint64_t svc__pend_count(const svc_worker_t *w) {
  uint64_t n = 0;
  for (const svc__pend_t *p = w->pend; p != NULL; p = p->next)
    n++;
  return n;
}

/* An entry that will not complete, after its error reply (if any): its
 * handler undoes what it reserved, and it goes. */
static void svc__pend_drop(svc_worker_t *w, svc__pend_t *p) {
  svc__pend_unlink(w, p);
  svc__pend_deliver(w, p, NULL, 0);
  if (p->done != NULL)
    p->done(w, p, NULL);
  svc__pend_free(p);
}

void svc__agree_destroy(svc_worker_t *w) {
  while (w->pend != NULL) {
    svc__pend_t *p = w->pend;
    w->pend = p->next;
    if (p->batch != NULL)
      p->batch->token = NULL;
    svc__pend_deliver(w, p, NULL, 0);
    svc__pend_free(p);
  }
  /* A collective still in flight is abandoned with the worker: the job
   * is going away. */
  free(w->grecv);
  free(w->slots);
  free(w->neg);
  free(w->cready);
  free(w->rlist);
  free(w->roff);
  free(w->rbuf);
}

/* ------------------------------------------------------------------ */
/* The public face of the engine */

void svc_worker_cancel(svc_worker_t *w, void *token) {
  svc__pend_t *p, *next;
  if (token == NULL)
    return;
  for (p = w->pend; p != NULL; p = next) {
    next = p->next;
    if (p->token != token)
      continue;
    svc_log(SVC_LOG_INFO, NULL, (int64_t)p->step, "client left: %s withdrawn",
            p->what);
    p->token = NULL;
    if (p->batch != NULL)
      p->batch->token = NULL;
    /* An entry already in the fused allreduce still completes (its records
     * are in flight and the running statistics must move on every rank);
     * one not yet negotiated is withdrawn, so this rank contributes
     * nothing and the others see a stall. */
    if (!p->sent && !p->listed)
      svc__pend_drop(w, p);
  }
}

/* ------------------------------------------------------------------ */
/* Gathering the ready lists */

/* The order of keys (name, step, direction), shared by gathered entries
 * and pending ones. */
static int svc__order(uint64_t an, uint64_t as, uint32_t ad, uint64_t bn,
                      uint64_t bs, uint32_t bd) {
  if (an != bn)
    return an < bn ? -1 : 1;
  if (as != bs)
    return as < bs ? -1 : 1;
  if (ad != bd)
    return ad < bd ? -1 : 1;
  return 0;
}

static int svc__key_cmp(const void *a, const void *b) {
  const svc__gent_t *x = a, *y = b;
  return svc__order(x->name, x->step, x->dir, y->name, y->step, y->dir);
}

/* Key order, then the sync group. */
static int svc__gkey_cmp(const void *a, const void *b) {
  const svc__gent_t *x = a, *y = b;
  int c = svc__key_cmp(a, b);
  if (c != 0)
    return c;
  if (x->grp != y->grp)
    return x->grp < y->grp ? -1 : 1;
  return 0;
}

static int svc__pend_key_cmp(const void *a, const void *b) {
  const svc__pend_t *x = *(const svc__pend_t *const *)a;
  const svc__pend_t *y = *(const svc__pend_t *const *)b;
  return svc__order(x->name, x->step, x->dir, y->name, y->step, y->dir);
}

const svc__gmsg_t *svc__gmsg(const svc_worker_t *w, int r) {
  return (const svc__gmsg_t *)(const void *)(w->grecv + (size_t)r * w->gstride);
}

/* Whether p goes into this round's gathered list: every unsent entry in a
 * full round, else those the cache does not cover. */
static int svc__gather_lists(const svc_worker_t *w, const svc__pend_t *p) {
  return !p->sent && (w->full || p->cslot < 0);
}

int svc__gather_begin(svc_worker_t *w, size_t per_rank) {
  uint32_t n = 0;
  size_t total = 0, k = 0, stride;
  svc__pend_t **sel = NULL;
  uint8_t *recv;
  int rc;
  memset(&w->gsend, 0, sizeof w->gsend);
  if (per_rank > SVC__MAXE)
    per_rank = SVC__MAXE;
  /* Every rank sends the same number of entries, so the buffers hold only
   * what the round needs rather than SVC__MAXE per rank. */
  stride = offsetof(svc__gmsg_t, e) + per_rank * sizeof(svc__gent_t);
  recv = realloc(w->grecv, (size_t)w->cfg.size * stride);
  if (recv == NULL)
    return svc_set_error(SVC_RESOURCE, "agreement: out of memory");
  w->grecv = recv;
  w->gstride = stride;
  for (svc__pend_t *p = w->pend; p != NULL; p = p->next)
    total += (size_t)svc__gather_lists(w, p);
  if (total > per_rank) {
    /* More entries wait than one round lists. Every rank lists its
     * smallest keys, not its oldest: ranks that queued the same entries in
     * different orders then list the same ones and make progress, instead
     * of listing disjoint sets until they stall. */
    if ((sel = malloc(total * sizeof *sel)) == NULL)
      return svc_set_error(SVC_RESOURCE, "agreement: out of memory");
    for (svc__pend_t *p = w->pend; p != NULL; p = p->next)
      if (svc__gather_lists(w, p))
        sel[k++] = p;
    qsort(sel, total, sizeof *sel, svc__pend_key_cmp);
  }
  k = 0;
  for (svc__pend_t *p = w->pend; n < per_rank && k < total; n++) {
    svc__gent_t *e = &w->gsend.e[n];
    svc__pend_t *q;
    if (sel == NULL) {
      while (!svc__gather_lists(w, p))
        p = p->next;
      q = p;
      p = p->next;
    } else {
      q = sel[k];
    }
    k++;
    e->name = q->name;
    e->step = q->step;
    e->dir = q->dir;
    e->C = (uint32_t)q->nrec;
    e->fp = q->fp;
    e->gsize = q->gsize;
    e->grp = q->grp;
    e->tag = q->tag;
    e->age = w->now - q->t0;
    q->listed = 1;
  }
  free(sel);
  w->gsend.n = n;
  rc = w->sync->vt->iallgather_begin(w->sync, &w->gsend, w->grecv, stride,
                                     &w->sync_req);
  if (rc != 0)
    return svc__comm_error(rc, "iallgather_begin");
  w->m.gathers++;
  w->m.agree_bytes += stride;
  w->spec.gathered = 1;
  w->phase = SVC__GATHER;
  return 0;
}

static svc__pend_t *svc__pend_find(svc_worker_t *w, const svc__gent_t *k) {
  for (svc__pend_t *p = w->pend; p != NULL; p = p->next)
    if (!p->sent && p->name == k->name && p->step == k->step &&
        p->dir == k->dir && (w->full || p->cslot < 0))
      return p;
  return NULL;
}

/* Fails this rank's entry under key k, if it belongs to group k->grp (or
 * to any group with any_grp), and poisons the key for that group. */
static void svc__fail_key(svc_worker_t *w, const svc__gent_t *k, int any_grp,
                          svc_code_t code, const char *why) {
  svc__pend_t *p;
  if (!any_grp)
    svc__poison(w, k->name, k->step, k->dir, k->grp, code);
  while ((p = svc__pend_find(w, k)) != NULL && (any_grp || p->grp == k->grp)) {
    char msg[512];
    if (any_grp)
      svc__poison(w, k->name, k->step, k->dir, p->grp, code);
    snprintf(msg, sizeof msg, "%s: %s", p->what, why);
    svc_log(SVC_LOG_WARN, NULL, (int64_t)p->step, "%s: %s", svc_code_name(code),
            msg);
    svc__pend_unlink(w, p);
    svc__pend_reply_error(w, p, code, msg);
    if (p->done != NULL)
      p->done(w, p, NULL);
    svc__pend_free(p);
  }
}

/* One round's decisions, shared by the steps of svc__gather_done. */
typedef struct svc__round_s {
  svc__gent_t *u; /* every rank's listed entries, in key-group order */
  size_t nu;
  svc__gent_t *rd; /* the ready (key, group) pairs in order */
  size_t nready, nrec;
} svc__round_t;

/* Names the ranks of group [lo, lo + need) that did not list key k, and
 * fails the key for that group with STALL. */
static void svc__stall(svc_worker_t *w, const svc__gent_t *k, int lo,
                       int need) {
  char missing[160];
  size_t ml = (size_t)snprintf(missing, sizeof missing, "ranks");
  for (int r = lo; r < lo + need && ml < sizeof missing - 16; r++) {
    const svc__gmsg_t *m = svc__gmsg(w, r);
    int has = 0;
    for (uint32_t e = 0; e < m->n && e < SVC__MAXE; e++)
      if (svc__key_cmp(&m->e[e], k) == 0)
        has = 1;
    if (!has)
      ml += (size_t)snprintf(missing + ml, sizeof missing - ml, " %d", r);
  }
  snprintf(missing + ml, sizeof missing - ml, " did not submit it within %g s",
           w->stall_timeout);
  w->m.stalls++;
  svc__fail_key(w, k, 0, SVC_STALL, missing);
}

/* The groups of one agreed key, u[i..j): each group that every one of its
 * ranks listed is ready (and this rank's entry of it goes into the
 * allreduce); one that waited too long stalls. */
static int svc__decide_groups(svc_worker_t *w, svc__round_t *rd, size_t i,
                              size_t j) {
  const svc__gent_t *u = rd->u;
  int size = w->cfg.size, rc = 0;
  for (size_t g0 = i; g0 < j;) {
    size_t g1 = g0;
    uint32_t gs = u[g0].gsize, grp = u[g0].grp;
    int lo = (int)(grp * gs);
    int need = size - lo < (int)gs ? size - lo : (int)gs;
    double age = 0;
    while (g1 < j && u[g1].grp == grp) {
      if (u[g1].age > age)
        age = u[g1].age;
      g1++;
    }
    if ((int)(g1 - g0) == need) {
      rd->rd[rd->nready++] = u[g0];
      if ((uint32_t)w->cfg.rank / gs == grp) {
        svc__pend_t *p = svc__pend_find(w, &u[g0]);
        if (p == NULL) {
          /* Every rank of the group listed it, this one included. */
          rc = svc_set_error(SVC_INTERNAL,
                             "agreement: a listed entry is missing");
        } else {
          p->sent = 1;
          w->roff[w->rlist_n] = rd->nrec;
          w->rlist[w->rlist_n++] = p;
        }
      }
      rd->nrec += u[g0].C;
    } else if (age > w->stall_timeout) {
      svc__stall(w, &u[g0], lo, need);
    }
    g0 = g1;
  }
  return rc;
}

/* Walks the sorted entries key by key: a key whose ranks disagree fails
 * everywhere with LAYER_MISMATCH; the others are decided per group. */
static int svc__decide(svc_worker_t *w, svc__round_t *rd) {
  const svc__gent_t *u = rd->u;
  int rc = 0;
  for (size_t i = 0; i < rd->nu;) {
    size_t j = i;
    int agree = 1;
    /* The run of one key over all groups must agree everywhere. */
    while (j < rd->nu && svc__key_cmp(&u[i], &u[j]) == 0) {
      if (u[j].fp != u[i].fp || u[j].C != u[i].C || u[j].gsize != u[i].gsize ||
          u[j].tag != u[i].tag)
        agree = 0;
      j++;
    }
    if (!agree) {
      /* Every group that listed the key fails it on every rank, also on
       * the ranks whose entry has not come yet. */
      for (size_t x = i; x < j; x++)
        svc__poison(w, u[x].name, u[x].step, u[x].dir, u[x].grp,
                    SVC_LAYER_MISMATCH);
      w->m.mismatches++;
      svc__fail_key(w, &u[i], 1, SVC_LAYER_MISMATCH,
                    "the ranks registered this layer with different "
                    "parameters (kind, channels, eps, momentum, affine or "
                    "group size), or hold different layers");
    } else if (svc__decide_groups(w, rd, i, j) != 0) {
      rc = -SVC_INTERNAL;
    }
    i = j;
  }
  return rc;
}

/* After a round: entries whose connection went while they were listed
 * are withdrawn now, unless they are being reduced, and local entries
 * that arrived after the round started but whose key was just poisoned
 * fail too. */
static void svc__round_cleanup(svc_worker_t *w) {
  for (svc__pend_t *p = w->pend, *next; p != NULL; p = next) {
    next = p->next;
    p->listed = 0;
    if (p->token == NULL && !p->sent)
      svc__pend_drop(w, p);
  }
  for (svc__pend_t *p = w->pend, *next; p != NULL; p = next) {
    int why;
    next = p->next;
    if (!p->sent &&
        (why = svc__poisoned(w, p->name, p->step, p->dir, p->grp)) != 0) {
      svc__gent_t k;
      memset(&k, 0, sizeof k);
      k.name = p->name;
      k.step = p->step;
      k.dir = p->dir;
      k.grp = p->grp;
      svc__fail_key(w, &k, 0, (svc_code_t)why,
                    why == SVC_STALL ? "stalled on another rank"
                                     : "the ranks registered this layer with "
                                       "different parameters");
    }
  }
}

void svc__round_end(svc_worker_t *w) {
  svc__round_cleanup(w);
  svc__spec_learn(w);
  for (svc__pend_t *p = w->pend; p != NULL; p = p->next)
    p->cslot = -1;
  w->full = 0;
  w->ncready = 0;
  w->cready_nrec = 0;
  w->phase = SVC__IDLE;
  w->epoch++;
  w->m.rounds++;
}

/* Counts an allreduce that reduces nready entries (its metrics). */
static void svc__count_fused(svc_worker_t *w, size_t nready) {
  int b = 0;
  while (b < SVC__FUSE_BUCKETS - 1 && ((size_t)1 << b) < nready)
    b++;
  w->m.fuse_hist[b]++;
  w->m.allreduces++;
  w->m.entries_fused += nready;
}

/* Starts the fused allreduce of the ready pairs: identity records
 * everywhere, with the tag of each slot's kind, and this rank's records in
 * its own slots. The pairs ready by their cache bits come first, then
 * those the gather found. */
int svc__reduce_begin(svc_worker_t *w, const svc__gent_t *rd, size_t nr,
                      size_t nrec) {
  size_t at = 0, nready = w->ncready + nr;
  int rc;
  if (svc__rbuf_zero(w, nrec, 1) != 0)
    return svc_set_error(SVC_RESOURCE, "agreement: out of memory");
  for (size_t i = 0; i < nready; i++) {
    const svc__gent_t *e = i < w->ncready ? &w->cready[i] : &rd[i - w->ncready];
    for (uint32_t c = 0; c < e->C; c++)
      w->rbuf[at + c].tag = e->tag;
    at += e->C;
  }
  for (size_t i = 0; i < w->rlist_n; i++)
    memcpy(w->rbuf + w->roff[i], w->rlist[i]->recs,
           w->rlist[i]->nrec * sizeof *w->rbuf);
  rc = w->sync->vt->iallreduce_begin(w->sync, w->rbuf, nrec, &w->sync_req);
  if (rc != 0)
    return svc__comm_error(rc, "iallreduce_begin");
  svc__count_fused(w, nready);
  w->m.reduce_t0 = svc_obs_now();
  svc_obs_end(SVC_SPAN_NEGOTIATION);
  svc_obs_begin(SVC_SPAN_ALLREDUCE);
  w->phase = SVC__REDUCE;
  return 0;
}

/* Every rank runs this on the same gathered bytes, so every rank reaches
 * the same decisions: which (key, group) pairs are ready, which stalled,
 * which disagree, and where each ready pair's records sit in the fused
 * allreduce (after the pairs the cache bits made ready). A pair's slot
 * holds the records of its group's ranks; every other rank contributes
 * identity records there (a count of 0, or zero sums), so one allreduce
 * over the job serves every group at once. */
static int svc__gather_done(svc_worker_t *w) {
  size_t per = (w->gstride - offsetof(svc__gmsg_t, e)) / sizeof(svc__gent_t);
  size_t cap = (size_t)w->cfg.size * per;
  svc__round_t rd;
  int rc;
  memset(&rd, 0, sizeof rd);
  rd.u = malloc((cap > 0 ? cap : 1) * sizeof *rd.u);
  rd.rd = malloc((cap > 0 ? cap : 1) * sizeof *rd.rd);
  if (rd.u == NULL || rd.rd == NULL) {
    rc = svc_set_error(SVC_RESOURCE, "agreement: out of memory");
    goto done;
  }
  for (int r = 0; r < w->cfg.size; r++) {
    const svc__gmsg_t *m = svc__gmsg(w, r);
    for (uint32_t i = 0; i < m->n && i < per; i++)
      rd.u[rd.nu++] = m->e[i];
  }
  qsort(rd.u, rd.nu, sizeof *rd.u, svc__gkey_cmp);
  rd.nrec = w->cready_nrec;
  rc = svc__decide(w, &rd);
  svc__cache_learn(w, rd.rd, rd.nready);
  if (rc != 0 || rd.nready + w->ncready == 0) {
    svc__round_end(w);
    goto done;
  }
  rc = svc__reduce_begin(w, rd.rd, rd.nready, rd.nrec);
done:
  free(rd.u);
  free(rd.rd);
  return rc;
}

/* After the allreduce of a round: this rank's entries in it complete with
 * their reduced records (those of the slots in ready only, for a
 * speculative round), its latency is kept, and after progress the
 * entries still waiting try again at once: one of them may have waited
 * only for the one just reduced to leave its cache slot. Rounds without
 * progress end this chain. */
static void svc__deliver(svc_worker_t *w, const unsigned char *ready,
                         int progress) {
  if (progress) {
    w->m.lat[w->m.nlat % SVC__LAT_RING] = svc_obs_now() - w->m.reduce_t0;
    w->m.nlat++;
  }
  svc_obs_end(SVC_SPAN_ALLREDUCE);
  for (size_t i = 0; i < w->rlist_n; i++) {
    svc__pend_t *p = w->rlist[i];
    double t0 = svc_obs_now();
    if (ready != NULL && !ready[p->cslot])
      continue;
    svc__pend_unlink(w, p);
    p->done(w, p, w->rbuf + w->roff[i]);
    svc_obs_span(SVC_SPAN_COMPUTE, p->what, (int64_t)p->step, t0);
    svc__pend_free(p);
    if (ready != NULL)
      w->m.cache_hits++;
  }
  w->rlist_n = 0;
  /* A speculative round whose guess some rank's other entries missed
   * wakes them too: they start the negotiated round that follows. */
  if (progress || w->spec.force)
    for (svc__pend_t *p = w->pend; p != NULL; p = p->next)
      p->fresh = 1;
  svc__round_end(w);
}

/* Polls the collective in flight: 1 once it completed (and its request is
 * finished), 0 while it runs. */
static int svc__sync_test(svc_worker_t *w) {
  const sbn_comm_vtable_t *vt = w->sync->vt;
  int done = 0, rc = vt->iallreduce_test(w->sync, w->sync_req, &done);
  if (rc != 0)
    return svc__comm_error(rc, "iallreduce_test");
  if (!done)
    return 0;
  rc = vt->iallreduce_end(w->sync, w->sync_req);
  w->sync_req = NULL;
  if (rc != 0)
    return svc__comm_error(rc, "iallreduce_end");
  return 1;
}

static int svc__alloc_engine(svc_worker_t *w) {
  size_t own = SVC__MAXE + (size_t)w->cfg.cache_slots;
  w->rlist = calloc(own, sizeof *w->rlist);
  w->roff = calloc(own, sizeof *w->roff);
  w->slots = calloc(w->cfg.cache_slots, sizeof *w->slots);
  w->cready = calloc(w->cfg.cache_slots, sizeof *w->cready);
  if (w->rlist == NULL || w->roff == NULL || w->slots == NULL ||
      w->cready == NULL)
    return svc_set_error(SVC_RESOURCE, "agreement: out of memory");
  w->epoch = 1;
  w->spec.prev = -1;
  return 0;
}

/* One step of the round in flight, if its collective completed: 1 when
 * the engine moved on, 0 when the collective still runs. */
static int svc__advance(svc_worker_t *w) {
  int rc, gather = 0;
  size_t per = 0;
  if ((rc = svc__sync_test(w)) <= 0)
    return rc;
  switch (w->phase) {
    case SVC__NEG:
      if ((rc = svc__neg_done(w, &gather, &per)) != 0)
        return rc;
      if (gather)
        rc = svc__gather_begin(w, per);
      else if (w->ncready > 0)
        rc = svc__reduce_begin(w, NULL, 0, w->cready_nrec);
      else
        svc__round_end(w);
      break;
    case SVC__GATHER:
      rc = svc__gather_done(w);
      break;
    case SVC__SPEC: {
      unsigned char ready[SVC__SPEC_SLOTS];
      size_t n = svc__spec_settle(w, ready);
      if (n > 0)
        svc__count_fused(w, n);
      svc__deliver(w, ready, n > 0);
      break;
    }
    default:
      svc__deliver(w, NULL, 1);
      break;
  }
  return rc != 0 ? rc : 1;
}

int svc_worker_poll(svc_worker_t *w, double now) {
  int rc = 0;
  w->now = now;
  if (!w->sync_on)
    return 0;
  if (w->slots == NULL && (rc = svc__alloc_engine(w)) != 0)
    return rc;
  if (w->sync->vt->bell_poll != NULL &&
      (rc = w->sync->vt->bell_poll(w->sync, &w->bell_max)) != 0)
    return svc__comm_error(rc, "bell_poll");
  /* A round is a chain of collectives; each completed one starts the
   * next, and a round that ended may be followed at once by another when
   * this rank or another one has new work. */
  for (;;) {
    if (w->phase != SVC__IDLE) {
      if ((rc = svc__advance(w)) <= 0)
        return rc;
      continue;
    }
    /* A job that is ending joins the rounds up to the agreed last one
     * (svc_drain.c) and starts none after it. */
    if (w->hold && svc_worker_rounds(w) >= w->hold_last)
      return 0;
    if (!svc__wake(w, &rc))
      return rc;
    if ((rc = svc__spec_begin(w)) < 0 ||
        (rc == 0 && (rc = svc__neg_begin(w)) != 0))
      return rc;
  }
}

int svc_worker_busy(const svc_worker_t *w) {
  if (!w->sync_on)
    return 0;
  if (w->phase != SVC__IDLE)
    return 1;
  for (const svc__pend_t *p = w->pend; p != NULL; p = p->next)
    if (p->fresh || w->now - p->t0 < SVC__SPIN_S)
      return 1;
  return w->bell_max >= w->epoch && w->epoch > 0;
}
