/* checkpoint_save and checkpoint_load: collective requests of the worker.
 *
 * Every rank's client sends the request, like a SyncBN step. The state
 * travels through the same agreement and fused allreduce as the SyncBN
 * records, so no other collective is needed: the state of every layer is
 * laid out in one flat vector of values, each rank writes the values it
 * owns and leaves zeros elsewhere, and a sum over the job assembles the
 * whole vector on every rank. Floats travel as the integer value of their
 * bit pattern (exact in a double, and x + 0 keeps it), so the file holds
 * the workers' bits exactly, NaN payloads and negative zeros included.
 *
 * Who owns what in the vector: rank 0 owns the affine parameters (data
 * parallelism keeps them equal everywhere) and the file's status; the
 * first rank of each sync group owns that group's running statistics and
 * batch counter. A layer that synchronizes nothing (batchnorm,
 * instancenorm) is a group of one rank: each rank's statistics are its
 * own, stored under its rank.
 *
 * Save: the vector is assembled, rank 0 writes the file (sbn_ckpt_save:
 * temporary file, fsync, rename, fsync of the directory) and a second
 * round carries its status to every rank, so that every client gets the
 * same answer. Load: rank 0 reads and validates the file when the request
 * arrives and contributes its contents with the status; every rank then
 * takes its own group's statistics. */
#include <dirent.h>
#include <fcntl.h>
#include <math.h>
#include <msgpack.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "sbn_state.h"
#include "svc_worker_int.h"

enum { SVC__CKPT_SAVE = 4, SVC__CKPT_LOAD = 5, SVC__CKPT_STATUS = 6 };

/* Where each layer's values sit in the vector. */
typedef struct svc__ckpt_plan_s {
  uint32_t n;   /* layers covered: those registered at the request */
  size_t total; /* values, status first */
  size_t *off;  /* per layer: its first value */
  uint32_t *gs; /* per layer: group size stored in the file */
  uint32_t *ng; /* per layer: number of groups with statistics */
  size_t *alen; /* per layer: affine_len */
  size_t *slen; /* per layer: stats_len */
  uint64_t fp;  /* what the ranks must agree on */
} svc__ckpt_plan_t;

/* The per-request context of a pending checkpoint entry. */
typedef struct svc__ckpt_ctx_s {
  int load;
  int rc; /* rank 0: the status of its read or write */
  char msg[768];
  char name[SVC_NAME_MAX + 1];
  /* Layers registered when the request came: the records were sized for
   * them, and a layer registered while the request waits is not part of
   * this checkpoint (layers are only ever appended). */
  uint32_t nlayers;
} svc__ckpt_ctx_t;

static void svc__plan_free(svc__ckpt_plan_t *pl) {
  free(pl->off);
  free(pl->gs);
  free(pl->ng);
  free(pl->alen);
  free(pl->slen);
  memset(pl, 0, sizeof *pl);
}

static uint64_t svc__fnv(uint64_t h, const void *p, size_t n) {
  const unsigned char *c = p;
  for (size_t i = 0; i < n; i++) {
    h ^= c[i];
    h *= 1099511628211ull;
  }
  return h;
}

/* The group size a layer's statistics are stored under: a syncbatchnorm
 * layer's own (0 for the whole job), 1 for layers that never reduce. */
static uint32_t svc__stored_gs(const svc_worker_t *w, const svc__layer_t *l) {
  if (l->kind == SVC_KIND_SYNCBATCHNORM)
    return l->group_size >= (uint64_t)w->cfg.size ? 0 : (uint32_t)l->group_size;
  return 1;
}

static uint32_t svc__gs_ranks(const svc_worker_t *w, uint32_t gs) {
  return gs == 0 ? (uint32_t)w->cfg.size : gs;
}

static int svc__plan(const svc_worker_t *w, uint32_t n, svc__ckpt_plan_t *pl) {
  memset(pl, 0, sizeof *pl);
  pl->n = n;
  pl->off = calloc(n + 1, sizeof *pl->off);
  pl->gs = calloc(n + 1, sizeof *pl->gs);
  pl->ng = calloc(n + 1, sizeof *pl->ng);
  pl->alen = calloc(n + 1, sizeof *pl->alen);
  pl->slen = calloc(n + 1, sizeof *pl->slen);
  if (pl->off == NULL || pl->gs == NULL || pl->ng == NULL || pl->alen == NULL ||
      pl->slen == NULL) {
    svc__plan_free(pl);
    return svc_set_error(SVC_RESOURCE, "checkpoint: out of memory");
  }
  pl->total = 1; /* the status */
  pl->fp = svc__fnv(1469598103934665603ull, &n, sizeof n);
  for (uint32_t i = 0; i < n; i++) {
    const svc__layer_t *l = w->layers[i];
    uint32_t g = svc__stored_gs(w, l), r = svc__gs_ranks(w, g);
    pl->gs[i] = g;
    pl->alen[i] = l->wb_numel;
    pl->slen[i] = l->tracking ? l->params.channels : 0;
    pl->ng[i] = pl->slen[i] > 0 ? ((uint32_t)w->cfg.size + r - 1) / r : 0;
    pl->off[i] = pl->total;
    pl->total += 2 * pl->alen[i] + (size_t)pl->ng[i] * (2 * pl->slen[i] + 1);
    pl->fp = svc__fnv(pl->fp, l->name, strlen(l->name) + 1);
    pl->fp = svc__fnv(pl->fp, &l->kind, sizeof l->kind);
    pl->fp = svc__fnv(pl->fp, &g, sizeof g);
    pl->fp = svc__fnv(pl->fp, &pl->alen[i], sizeof pl->alen[i]);
    pl->fp = svc__fnv(pl->fp, &pl->slen[i], sizeof pl->slen[i]);
  }
  return 0;
}

/* Value i of the vector inside the records (three per record). */
static double *svc__val(sbn_rec_t *r, size_t i) {
  return &r[i / 3].v[i % 3];
}
static double svc__get(const sbn_rec_t *r, size_t i) {
  return r[i / 3].v[i % 3];
}

static double svc__fbits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return (double)u;
}
static float svc__bitsf(double d) {
  uint32_t u = (uint32_t)d;
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

/* Writes the values this rank owns: rank 0 the affine parameters, the
 * first rank of each group its statistics. */
static void svc__fill_own(const svc_worker_t *w, const svc__ckpt_plan_t *pl,
                          sbn_rec_t *recs) {
  uint32_t rank = (uint32_t)w->cfg.rank;
  for (uint32_t i = 0; i < pl->n; i++) {
    const svc__layer_t *l = w->layers[i];
    size_t o = pl->off[i], a = pl->alen[i], s = pl->slen[i];
    uint32_t r = svc__gs_ranks(w, pl->gs[i]), grp = rank / r;
    if (rank == 0)
      for (size_t k = 0; k < a; k++) {
        *svc__val(recs, o + k) = svc__fbits(l->weight[k]);
        *svc__val(recs, o + a + k) = svc__fbits(l->bias[k]);
      }
    if (s == 0 || rank % r != 0)
      continue;
    o += 2 * a + (size_t)grp * (2 * s + 1);
    *svc__val(recs, o) = (double)l->state.num_batches_tracked;
    for (size_t k = 0; k < s; k++) {
      *svc__val(recs, o + 1 + k) = svc__fbits(l->running_mean[k]);
      *svc__val(recs, o + 1 + s + k) = svc__fbits(l->running_var[k]);
    }
  }
}

/* Rank 0: the whole vector as a checkpoint, written to path. Returns 0 or
 * the library's code with its message (sbn_last_error()): rank 0's status
 * travels to every rank as such a code. */
static int svc__write(const svc_worker_t *w, const svc__ckpt_plan_t *pl,
                      const sbn_rec_t *recs, const char *path) {
  sbn_ckpt_t *ck = NULL;
  float *buf = NULL;
  sbn_ckpt_group_t *groups = NULL;
  size_t most = 0, most_g = 0;
  int rc;
  for (uint32_t i = 0; i < pl->n; i++) {
    size_t need = 2 * pl->alen[i] + (size_t)pl->ng[i] * 2 * pl->slen[i];
    most = need > most ? need : most;
    most_g = pl->ng[i] > most_g ? pl->ng[i] : most_g;
  }
  buf = malloc((most + 1) * sizeof *buf);
  groups = calloc(most_g + 1, sizeof *groups);
  if (buf == NULL || groups == NULL) {
    rc = sbn_set_error(SBN_ENOMEM, "checkpoint_save: out of memory");
    goto fail;
  }
  if ((rc = sbn_ckpt_new(&ck)) != 0)
    goto fail;
  for (uint32_t i = 0; i < pl->n; i++) {
    const svc__layer_t *l = w->layers[i];
    sbn_ckpt_layer_t in;
    size_t o = pl->off[i], a = pl->alen[i], s = pl->slen[i], k;
    float *p = buf;
    memset(&in, 0, sizeof in);
    in.name = l->name;
    in.params = l->params;
    in.group_size = pl->gs[i];
    in.affine_len = a;
    in.stats_len = s;
    for (k = 0; k < 2 * a; k++)
      p[k] = svc__bitsf(svc__get(recs, o + k));
    in.weight = a > 0 ? p : NULL;
    in.bias = a > 0 ? p + a : NULL;
    p += 2 * a;
    o += 2 * a;
    for (uint32_t g = 0; g < pl->ng[i]; g++) {
      groups[g].index = g;
      groups[g].state.num_batches_tracked = (int64_t)svc__get(recs, o);
      for (k = 0; k < 2 * s; k++)
        p[k] = svc__bitsf(svc__get(recs, o + 1 + k));
      groups[g].state.running_mean = p;
      groups[g].state.running_var = p + s;
      p += 2 * s;
      o += 2 * s + 1;
    }
    in.num_groups = pl->ng[i];
    in.groups = pl->ng[i] > 0 ? groups : NULL;
    if ((rc = sbn_ckpt_add(ck, &in)) != 0)
      goto fail;
  }
  rc = sbn_ckpt_save(ck, path);
fail:
  sbn_ckpt_free(ck);
  free(buf);
  free(groups);
  return rc;
}

/* Rank 0 of a load: reads path, checks that it describes exactly this
 * worker's layers, and writes its contents into the vector. Returns as
 * svc__write. */
static int svc__read(const svc_worker_t *w, const svc__ckpt_plan_t *pl,
                     sbn_rec_t *recs, const char *path, const char *name) {
  sbn_ckpt_t *ck = NULL;
  int rc = sbn_ckpt_load(path, &ck);
  if (rc != 0)
    return rc;
  if (sbn_ckpt_count(ck) != pl->n) {
    rc = sbn_set_error(SBN_EFORMAT,
                       "checkpoint_load: %s holds %zu layers, the worker has "
                       "%u",
                       name, sbn_ckpt_count(ck), pl->n);
    goto done;
  }
  for (uint32_t i = 0; i < pl->n; i++) {
    const svc__layer_t *l = w->layers[i];
    const sbn_ckpt_layer_t *f = sbn_ckpt_find(ck, l->name);
    size_t o = pl->off[i], a = pl->alen[i], s = pl->slen[i];
    if (f == NULL) {
      rc =
          sbn_set_error(SBN_EFORMAT, "checkpoint_load: layer '%s' is not in %s",
                        l->name, name);
      goto done;
    }
    if (!svc__lib_params_equal(&f->params, &l->params) ||
        f->group_size != pl->gs[i] || f->affine_len != a || f->stats_len != s ||
        f->num_groups != pl->ng[i]) {
      rc = sbn_set_error(SBN_EFORMAT,
                         "checkpoint_load: layer '%s' in %s has other "
                         "parameters, group size or number of groups",
                         l->name, name);
      goto done;
    }
    for (size_t k = 0; k < a; k++) {
      *svc__val(recs, o + k) = svc__fbits(f->weight[k]);
      *svc__val(recs, o + a + k) = svc__fbits(f->bias[k]);
    }
    o += 2 * a;
    for (uint32_t g = 0; g < pl->ng[i]; g++) {
      const sbn_ckpt_group_t *gr = sbn_ckpt_group(f, g);
      if (gr == NULL) {
        rc = sbn_set_error(SBN_EFORMAT,
                           "checkpoint_load: layer '%s' lacks group %u",
                           l->name, g);
        goto done;
      }
      *svc__val(recs, o) = (double)gr->state.num_batches_tracked;
      for (size_t k = 0; k < s; k++) {
        *svc__val(recs, o + 1 + k) = svc__fbits(gr->state.running_mean[k]);
        *svc__val(recs, o + 1 + s + k) = svc__fbits(gr->state.running_var[k]);
      }
      o += 2 * s + 1;
    }
  }
  rc = 0;
done:
  sbn_ckpt_free(ck);
  return rc;
}

/* Every rank of a load: takes the affine parameters and its own group's
 * statistics from the assembled vector. */
static void svc__apply(svc_worker_t *w, const svc__ckpt_plan_t *pl,
                       const sbn_rec_t *recs) {
  uint32_t rank = (uint32_t)w->cfg.rank;
  for (uint32_t i = 0; i < pl->n; i++) {
    svc__layer_t *l = w->layers[i];
    size_t o = pl->off[i], a = pl->alen[i], s = pl->slen[i];
    uint32_t grp = rank / svc__gs_ranks(w, pl->gs[i]);
    for (size_t k = 0; k < a; k++) {
      l->weight[k] = svc__bitsf(svc__get(recs, o + k));
      l->bias[k] = svc__bitsf(svc__get(recs, o + a + k));
    }
    if (s == 0)
      continue;
    o += 2 * a + (size_t)grp * (2 * s + 1);
    l->state.num_batches_tracked = (int64_t)svc__get(recs, o);
    for (size_t k = 0; k < s; k++) {
      l->running_mean[k] = svc__bitsf(svc__get(recs, o + 1 + k));
      l->running_var[k] = svc__bitsf(svc__get(recs, o + 1 + s + k));
    }
  }
}

static int svc__ckpt_reply(const svc_id_t *id, const char *name, int load,
                           uint32_t layers, uint8_t **buf, size_t *len) {
  svc_reply_t r;
  svc_reply_begin(&r, id, 3, 0);
  svc_reply_key(&r, "name");
  r.rc |= msgpack_pack_str_with_body(r.pk, name, strlen(name));
  svc_reply_key(&r, "layers");
  r.rc |= msgpack_pack_uint32(r.pk, layers);
  svc_reply_key(&r, load ? "loaded" : "saved");
  r.rc |= msgpack_pack_true(r.pk);
  return svc_reply_end(&r, buf, len);
}

/* The final answer of a checkpoint on this rank: rc is rank 0's status,
 * which every rank received. */
static void svc__ckpt_finish(svc_worker_t *w, svc__pend_t *p, int rc) {
  svc__ckpt_ctx_t *c = p->ctx;
  uint8_t *buf = NULL;
  size_t len = 0;
  if (rc != 0) {
    char msg[1024];
    if (w->cfg.rank == 0)
      snprintf(msg, sizeof msg, "%s", c->msg);
    else
      snprintf(msg, sizeof msg, "%s '%s': rank 0 failed: %s",
               c->load ? "checkpoint_load" : "checkpoint_save", c->name,
               sbn_strerror(rc));
    svc__pend_reply_error(
        w, p, rc == SBN_ENOMEM ? SVC_RESOURCE : SVC_CHECKPOINT, msg);
    return;
  }
  if (svc__ckpt_reply(&p->q.id, c->name, c->load, c->nlayers, &buf, &len) !=
      0) {
    svc__pend_reply_error(w, p, SVC_RESOURCE, "checkpoint: out of memory");
    return;
  }
  svc__pend_deliver(w, p, buf, len);
}

static void svc__status_done(svc_worker_t *w, svc__pend_t *p,
                             const sbn_rec_t *recs) {
  if (recs != NULL)
    svc__ckpt_finish(w, p, (int)recs[0].v[0]);
}

/* A new entry that carries the status of rank 0's write to every rank
 * (queued by every rank in the same completion, so it is agreed on in the
 * next round). On a worker alone it completes at once. */
static void svc__save_done(svc_worker_t *w, svc__pend_t *p,
                           const sbn_rec_t *recs) {
  svc__ckpt_ctx_t *c = p->ctx;
  svc__ckpt_plan_t pl;
  svc__pend_t *s;
  char path[4096 + SVC_NAME_MAX + 2];
  if (recs == NULL)
    return;
  if (w->cfg.rank == 0) {
    if (svc__plan(w, c->nlayers, &pl) != 0) {
      c->rc = sbn_set_error(SBN_ENOMEM, "checkpoint_save: out of memory");
    } else {
      snprintf(path, sizeof path, "%s/%s", w->state_dir, c->name);
      c->rc = svc__write(w, &pl, recs, path);
      svc__plan_free(&pl);
    }
    /* The message waits for the status round. */
    if (c->rc != 0)
      snprintf(c->msg, sizeof c->msg, "%s", sbn_last_error());
  }
  if (!w->sync_on) {
    svc__ckpt_finish(w, p, c->rc);
    return;
  }
  s = svc__pend_alloc(w, p->name, p->step, SVC__CKPT_STATUS, 1, SBN_REC_SUM);
  if (s == NULL) {
    /* The other ranks will wait for this status and report a stall. */
    svc__pend_reply_error(w, p, SVC_RESOURCE, "checkpoint_save: out of memory");
    return;
  }
  s->fp = p->fp;
  s->recs[0].v[0] = w->cfg.rank == 0 ? c->rc : 0;
  s->q.id = p->q.id;
  snprintf(s->what, sizeof s->what, "%s", p->what);
  s->ctx = c;
  p->ctx = NULL;
  s->done = svc__status_done;
  svc__pend_chain(w, p, s);
}

static void svc__load_done(svc_worker_t *w, svc__pend_t *p,
                           const sbn_rec_t *recs) {
  const svc__ckpt_ctx_t *c = p->ctx;
  svc__ckpt_plan_t pl;
  int rc;
  if (recs == NULL)
    return;
  rc = (int)recs[0].v[0];
  if (rc == 0) {
    if (svc__plan(w, c->nlayers, &pl) != 0) {
      svc__pend_reply_error(w, p, SVC_RESOURCE,
                            "checkpoint_load: out of "
                            "memory");
      return;
    }
    svc__apply(w, &pl, recs);
    svc__plan_free(&pl);
  }
  svc__ckpt_finish(w, p, rc);
}

/* What a checkpoint request may be refused for before anything is
 * allocated. */
static int svc__ckpt_check(const svc_worker_t *w, const svc_request_t *q,
                           const char *op) {
  if (w->state_dir[0] == '\0')
    return svc_set_error(SVC_BAD_PARAMS,
                         "%s: this worker has no state directory "
                         "(--state-dir)",
                         op);
  /* A name, never a path: no client can make the worker touch a file
   * outside its state directory. */
  if (sbn_ckpt_name_check(q->reg.name) != 0)
    return svc_set_error(SVC_BAD_PARAMS, "name: %s", sbn_last_error());
  if (!w->sync_on && w->cfg.size != 1)
    return svc_set_error(SVC_NOT_YET,
                         "%s: a job of several ranks needs the cross-rank "
                         "transport",
                         op);
  return 0;
}

/* This rank's records of the request: a save writes the values it owns;
 * rank 0 of a load reads the file, and sends its status either way. */
static void svc__ckpt_fill(svc_worker_t *w, const svc__ckpt_plan_t *pl,
                           svc__pend_t *p) {
  svc__ckpt_ctx_t *c = p->ctx;
  char path[4096 + SVC_NAME_MAX + 2];
  if (!c->load) {
    svc__fill_own(w, pl, p->recs);
    return;
  }
  if (w->cfg.rank != 0)
    return;
  snprintf(path, sizeof path, "%s/%s", w->state_dir, c->name);
  c->rc = svc__read(w, pl, p->recs, path, c->name);
  if (c->rc != 0) {
    snprintf(c->msg, sizeof c->msg, "%s", sbn_last_error());
    for (size_t i = 0; i < p->nrec; i++)
      p->recs[i].v[0] = p->recs[i].v[1] = p->recs[i].v[2] = 0;
  }
  p->recs[0].v[0] = c->rc;
}

/* The key step of a new checkpoint entry under (name, dir): the first one
 * that no stall has poisoned and that this rank has not queued already.
 * Both come from what every rank agrees on (the gathered rounds decide
 * stalls identically everywhere) or from this rank's own queue, never from
 * a count of requests, so a lone request that stalls (a trainer that died
 * before its save) never shifts the keys of later ones. */
static uint64_t svc__ckpt_step(const svc_worker_t *w, uint64_t name,
                               uint32_t dir) {
  uint64_t step = 0;
  while (step < SVC__POISON + 64 && (svc__poisoned(w, name, step, dir, 0) ||
                                     svc__pend_queued(w, name, step, dir)))
    step++;
  return step;
}

int svc__cmd_checkpoint(svc__call_t *call) {
  svc_worker_t *w = call->w;
  const svc_request_t *q = call->q;
  int load = q->op == SVC_OP_CHECKPOINT_LOAD, rc;
  uint64_t key;
  uint32_t dir;
  const char *op = load ? "checkpoint_load" : "checkpoint_save";
  svc__ckpt_plan_t pl;
  svc__ckpt_ctx_t *c = NULL;
  svc__pend_t *p = NULL;
  if ((rc = svc__ckpt_check(w, q, op)) != 0)
    return rc;
  if (svc__plan(w, w->nlayers, &pl) != 0)
    return svc_set_error(SVC_RESOURCE, "%s: out of memory", op);
  c = calloc(1, sizeof *c);
  key = svc__hash_name(q->reg.name) ^ 0x636b7074ull;
  dir = load ? SVC__CKPT_LOAD : SVC__CKPT_SAVE;
  p = svc__pend_alloc(w, key, svc__ckpt_step(w, key, dir), dir,
                      (pl.total + 2) / 3, SBN_REC_SUM);
  if (c == NULL || p == NULL) {
    free(c);
    svc__pend_free(p);
    svc__plan_free(&pl);
    return svc_set_error(SVC_RESOURCE, "%s: out of memory", op);
  }
  c->load = load;
  c->nlayers = w->nlayers;
  snprintf(c->name, sizeof c->name, "%s", q->reg.name);
  snprintf(p->what, sizeof p->what, "checkpoint");
  p->ctx = c;
  p->fp = pl.fp;
  p->q.id = q->id;
  p->done = load ? svc__load_done : svc__save_done;
  svc__ckpt_fill(w, &pl, p);
  svc__plan_free(&pl);
  if (w->sync_on) {
    svc__pend_queue(call, p);
    return 0;
  }
  /* A worker alone: its records are already the job's, and the entry
   * completes at once, its reply going straight into the call's. */
  p->direct = &call->out;
  p->done(w, p, p->recs);
  svc__pend_free(p);
  if (call->out.buf == NULL)
    return svc_set_error(SVC_RESOURCE, "%s: out of memory", op);
  return 0;
}

int svc__ckpt_sweep(svc_worker_t *w) {
  DIR *d = opendir(w->state_dir);
  struct dirent *e;
  int n = 0;
  if (d == NULL)
    return 0;
  while ((e = readdir(d)) != NULL) {
    struct stat st;
    if (strncmp(e->d_name, ".sbntmp-", 8) != 0)
      continue;
    /* Only plain files: the directory is the worker's own (mode 0700), but
     * a link or anything else under that name is left for a person. */
    if (fstatat(dirfd(d), e->d_name, &st, AT_SYMLINK_NOFOLLOW) == 0 &&
        S_ISREG(st.st_mode) && unlinkat(dirfd(d), e->d_name, 0) == 0)
      n++;
  }
  closedir(d);
  return n;
}
