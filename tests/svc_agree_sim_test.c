/* The agreement engine of syncbnd without MPI: N workers in one process
 * on a simulated communicator whose collectives complete once all N ranks
 * began them (and which checks that every rank began the same kind and
 * size of collective, in the same order). It shows that
 * - an idle job runs no collective and rings no doorbell;
 * - entries submitted together fuse into one allreduce;
 * - once a layer's steps are cached, a step is agreed without any gather,
 *   by the same number of bytes per rank at 2 and at 1024 ranks (printed);
 * - once the rounds repeat, a round is one allreduce with no negotiation
 *   (speculative), and a guess that misses (a late rank, another layer, a
 *   rank at another step, a sync group) costs only that allreduce: every
 *   reply stays right;
 * - ranks at different steps of a cached layer never fuse and stall;
 * - with more layers than cache slots, the ranks evict the same slots in
 *   the same rounds, every reply stays right, and the bytes per rank per
 *   round stay bounded by the cache's size;
 * - every rank gets the Chan merge of all ranks' statistics. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <msgpack.h>

#include "svc_testutil.h"
#include "svc_worker.h"
#include "syncbn.h"

enum { K_BOR = 1, K_GATHER, K_REC, RING = 8 };

/* One collective: what each rank handed in, until the last one arrives. */
typedef struct sim_coll_s {
  uint64_t seq;
  int kind, arrived;
  size_t n; /* words, bytes per rank, or records */
  void **buf;
  const void **send;
} sim_coll_t;

typedef struct sim_world_s {
  int size;
  uint64_t completed; /* collectives 0 .. completed-1 are done */
  uint64_t begun[3];  /* by kind, counted once per collective */
  uint64_t bells;     /* doorbell messages */
  uint64_t *bell;     /* the largest value rung to each rank */
  sim_coll_t ring[RING];
} sim_world_t;

typedef struct sim_rank_s {
  sbn_comm_t base; /* first */
  sim_world_t *wd;
  uint64_t seq;   /* collectives this rank began */
  uint64_t bells; /* doorbell messages this rank sent */
  svc_worker_t *w;
  int ndel;
  uint8_t *reply[8];
  size_t len[8];
} sim_rank_t;

static void sim_complete(sim_world_t *wd, sim_coll_t *c) {
  if (c->kind == K_BOR) {
    uint64_t *acc = calloc(c->n + 1, sizeof *acc);
    for (int r = 0; r < wd->size; r++)
      for (size_t i = 0; i < c->n; i++)
        acc[i] |= ((uint64_t *)c->buf[r])[i];
    for (int r = 0; r < wd->size; r++)
      memcpy(c->buf[r], acc, c->n * sizeof *acc);
    free(acc);
  } else if (c->kind == K_GATHER) {
    for (int q = 0; q < wd->size; q++)
      for (int r = 0; r < wd->size; r++)
        memcpy((uint8_t *)c->buf[q] + (size_t)r * c->n, c->send[r], c->n);
  } else {
    sbn_rec_t *acc = malloc((c->n + 1) * sizeof *acc);
    memcpy(acc, c->buf[0], c->n * sizeof *acc);
    for (int r = 1; r < wd->size; r++)
      sbn_rec_combine(c->buf[r], acc, c->n);
    for (int r = 0; r < wd->size; r++)
      memcpy(c->buf[r], acc, c->n * sizeof *acc);
    free(acc);
  }
  wd->completed = c->seq + 1;
  c->arrived = 0;
}

static int sim_begin(sbn_comm_t *comm, int kind, void *buf, const void *send,
                     size_t n, void **req) {
  sim_rank_t *k = (sim_rank_t *)comm;
  sim_world_t *wd = k->wd;
  uint64_t seq = k->seq++;
  sim_coll_t *c = &wd->ring[seq % RING];
  /* No rank runs more than one collective ahead of the slowest. */
  assert_true(seq < wd->completed + RING);
  if (c->arrived == 0) {
    c->seq = seq;
    c->kind = kind;
    c->n = n;
    wd->begun[kind - 1]++;
  } else {
    /* The ranks' collectives line up: same order, kind and size. */
    assert_int_equal(c->seq, seq);
    assert_int_equal(c->kind, kind);
    assert_int_equal(c->n, n);
  }
  c->buf[comm->rank] = buf;
  c->send[comm->rank] = send;
  if (++c->arrived == wd->size)
    sim_complete(wd, c);
  *req = (void *)(uintptr_t)(seq + 1);
  return 0;
}

static int sim_bor(sbn_comm_t *c, uint64_t *words, size_t n, void **req) {
  return sim_begin(c, K_BOR, words, NULL, n, req);
}

static int sim_gather(sbn_comm_t *c, const void *send, void *recv, size_t bytes,
                      void **req) {
  return sim_begin(c, K_GATHER, recv, send, bytes, req);
}

static int sim_reduce(sbn_comm_t *c, sbn_rec_t *recs, size_t n, void **req) {
  return sim_begin(c, K_REC, recs, NULL, n, req);
}

static int sim_test(sbn_comm_t *c, void *req, int *done) {
  *done = (uint64_t)(uintptr_t)req - 1 < ((sim_rank_t *)c)->wd->completed;
  return 0;
}

static int sim_end(sbn_comm_t *c, void *req) {
  int done = 0;
  sim_test(c, req, &done);
  assert_true(done);
  return 0;
}

static int sim_bell_send(sbn_comm_t *c, int to, uint64_t v) {
  sim_rank_t *k = (sim_rank_t *)c;
  assert_true(to >= 0 && to < k->wd->size && to != c->rank);
  if (v > k->wd->bell[to])
    k->wd->bell[to] = v;
  k->wd->bells++;
  k->bells++;
  return 0;
}

static int sim_bell_poll(sbn_comm_t *c, uint64_t *max) {
  uint64_t v = ((sim_rank_t *)c)->wd->bell[c->rank];
  if (v > *max)
    *max = v;
  return 0;
}

static int sim_allreduce(sbn_comm_t *c, sbn_rec_t *r, size_t n) {
  (void)c, (void)r, (void)n;
  fail_msg("the engine never uses the blocking allreduce");
  return 0;
}

static void sim_destroy(sbn_comm_t *c) {
  (void)c;
}

static const sbn_comm_vtable_t sim_vt = {
    .allreduce = sim_allreduce,
    .iallreduce_begin = sim_reduce,
    .iallreduce_test = sim_test,
    .iallreduce_end = sim_end,
    .destroy = sim_destroy,
    .iallgather_begin = sim_gather,
    .iallreduce_bor_begin = sim_bor,
    .bell_send = sim_bell_send,
    .bell_poll = sim_bell_poll,
};

static void sim_deliver(void *ctx, void *token, svc_frame_t *reply) {
  sim_rank_t *k = ctx;
  (void)token;
  assert_true(k->ndel < 8);
  assert_int_equal(svc_frame_flatten(reply), 0);
  k->reply[k->ndel] = reply->buf;
  k->len[k->ndel++] = reply->len;
}

typedef struct sim_s {
  sim_world_t wd;
  sim_rank_t *k;
} sim_t;

/* What the workers of the next sim_init* are configured with. */
static int sim_speculate = 1;

static void sim_init_slots(sim_t *s, int size, double stall, uint32_t slots) {
  memset(s, 0, sizeof *s);
  s->wd.size = size;
  s->wd.bell = calloc((size_t)size, sizeof *s->wd.bell);
  for (int i = 0; i < RING; i++) {
    s->wd.ring[i].buf = calloc((size_t)size, sizeof(void *));
    s->wd.ring[i].send = calloc((size_t)size, sizeof(void *));
  }
  s->k = calloc((size_t)size, sizeof *s->k);
  for (int r = 0; r < size; r++) {
    svc_worker_config_t cfg;
    sim_rank_t *k = &s->k[r];
    svc_worker_config_default(&cfg);
    cfg.size = size;
    cfg.rank = r;
    if (slots > 0)
      cfg.cache_slots = slots;
    cfg.speculate = sim_speculate;
    assert_int_equal(svc_worker_create(&cfg, &k->w), 0);
    k->base.vt = &sim_vt;
    k->base.rank = r;
    k->base.size = size;
    k->base.world_rank = r;
    k->wd = &s->wd;
    assert_int_equal(svc_worker_set_sync(k->w, &k->base, stall, sim_deliver, k),
                     0);
  }
}

static void sim_init(sim_t *s, int size, double stall) {
  sim_init_slots(s, size, stall, 0);
}

static void sim_free(sim_t *s) {
  for (int r = 0; r < s->wd.size; r++) {
    for (int i = 0; i < s->k[r].ndel; i++)
      free(s->k[r].reply[i]);
    svc_worker_destroy(s->k[r].w);
  }
  for (int i = 0; i < RING; i++) {
    free(s->wd.ring[i].buf);
    free((void *)s->wd.ring[i].send);
  }
  free(s->wd.bell);
  free(s->k);
}

static void pack_vec(tu_body_t *b, const double *v, size_t n) {
  size_t dims[1] = {n};
  tu_tensor(b, "f64", 1, dims, NULL, v, n * sizeof *v);
}

/* Registers syncbatchnorm layer `name` of c channels on every rank. */
static void sim_register(sim_t *s, const char *name, uint32_t c) {
  for (int r = 0; r < s->wd.size; r++) {
    tu_body_t b;
    tu_reply_t rep;
    tu_register_head(&b, 1, name, "syncbatchnorm");
    tu_key(&b, "channels");
    msgpack_pack_uint32(&b.pk, c);
    assert_string_equal(tu_run(s->k[r].w, &b, &rep), "");
    tu_reply_free(&rep);
  }
}

/* Rank r's statistics of channel ch at a step: a count of 4 and a mean
 * and m2 that differ between ranks, channels and steps. */
static double sim_mean(int r, size_t ch, uint64_t step) {
  return 0.25 * r - 0.5 * (double)ch + 0.01 * (double)step;
}

static double sim_m2(int r, size_t ch) {
  return 1.0 + 0.125 * (r % 7) + (double)ch;
}

/* Submits a stats entry of layer id at step on rank r; it must defer. */
static void sim_stats(sim_t *s, int r, uint64_t layer, uint64_t step,
                      size_t c) {
  double mean[8], m2[8];
  tu_body_t b;
  uint8_t *reply = NULL;
  size_t len = 0;
  int close_after = 0, deferred = 0;
  for (size_t i = 0; i < c; i++) {
    mean[i] = sim_mean(r, i, step);
    m2[i] = sim_m2(r, i);
  }
  tu_body_init(&b);
  msgpack_pack_map(&b.pk, 7);
  tu_key(&b, "op");
  tu_key(&b, "stats");
  tu_key(&b, "id");
  msgpack_pack_uint64(&b.pk, step);
  tu_key(&b, "layer");
  msgpack_pack_uint64(&b.pk, layer);
  tu_key(&b, "step");
  msgpack_pack_uint64(&b.pk, step);
  tu_key(&b, "count");
  msgpack_pack_uint64(&b.pk, 4);
  tu_key(&b, "mean");
  pack_vec(&b, mean, c);
  tu_key(&b, "m2");
  pack_vec(&b, m2, c);
  assert_int_equal(
      svc_worker_handle_async(s->k[r].w, (uint8_t *)b.sb.data, b.sb.size,
                              &s->k[r], &reply, &len, &close_after, &deferred),
      0);
  msgpack_sbuffer_destroy(&b.sb);
  assert_true(deferred);
  assert_null(reply);
}

/* Polls every rank until each has `want` replies (or fails). */
static void sim_run(sim_t *s, int want, double now) {
  for (int sweep = 0; sweep < 64; sweep++) {
    int all = 1;
    for (int r = 0; r < s->wd.size; r++) {
      assert_int_equal(svc_worker_poll(s->k[r].w, now), 0);
      all &= s->k[r].ndel >= want;
    }
    if (all)
      return;
  }
  fail_msg("replies did not come");
}

/* The error code of a reply ("" for none) and, for a success, its mean. */
static void sim_reply(const uint8_t *buf, size_t len, char *code, double *mean,
                      size_t c) {
  msgpack_zone z;
  msgpack_object o;
  size_t off = 0;
  const msgpack_object *e, *m;
  msgpack_zone_init(&z, 1024);
  assert_int_equal(msgpack_unpack((const char *)buf + 4, len - 4, &off, &z, &o),
                   MSGPACK_UNPACK_SUCCESS);
  code[0] = '\0';
  if ((e = tu_get(&o, "error")) != NULL) {
    const msgpack_object *k = tu_get(e, "code");
    snprintf(code, 64, "%.*s", (int)k->via.str.size, k->via.str.ptr);
  } else {
    m = tu_get(tu_get(&o, "mean"), "data");
    assert_int_equal(m->via.bin.size, c * sizeof(double));
    memcpy(mean, m->via.bin.ptr, c * sizeof(double));
  }
  msgpack_zone_destroy(&z);
}

/* Checks and frees the replies of every rank: each mean is the float64
 * average of the ranks' means (equal counts). */
static void sim_check(sim_t *s, int n, const uint64_t *steps, size_t c) {
  for (int r = 0; r < s->wd.size; r++) {
    assert_int_equal(s->k[r].ndel, n);
    for (int i = 0; i < n; i++) {
      char code[64];
      double mean[8];
      sim_reply(s->k[r].reply[i], s->k[r].len[i], code, mean, c);
      assert_string_equal(code, "");
      for (size_t ch = 0; ch < c; ch++) {
        double want = 0;
        for (int q = 0; q < s->wd.size; q++)
          want += sim_mean(q, ch, steps[i]);
        want /= s->wd.size;
        assert_true(fabs(mean[ch] - want) <= 1e-12 * (1 + fabs(want)));
      }
      free(s->k[r].reply[i]);
    }
    s->k[r].ndel = 0;
  }
}

static uint64_t sim_metric(svc_worker_t *w, const char *key) {
  tu_body_t b;
  tu_reply_t rep;
  uint64_t v;
  tu_body_init(&b);
  msgpack_pack_map(&b.pk, 2);
  tu_key(&b, "op");
  tu_key(&b, "metrics");
  tu_key(&b, "id");
  msgpack_pack_uint32(&b.pk, 1);
  assert_string_equal(tu_run(w, &b, &rep), "");
  v = tu_get_u64(&rep.o, key);
  tu_reply_free(&rep);
  return v;
}

/* Two layers, four steps; returns rank 0's agreement bytes of the last
 * (cached) step and checks what every step cost. */
static uint64_t sim_steps(int size) {
  enum { C = 3, STEPS = 4 };
  sim_t s;
  uint64_t bytes = 0;
  sim_init(&s, size, 30.0);
  sim_register(&s, "a", C);
  sim_register(&s, "b", C);
  for (uint64_t step = 1; step <= STEPS; step++) {
    uint64_t g0 = s.wd.begun[K_GATHER - 1], n0 = s.wd.begun[K_BOR - 1];
    uint64_t r0 = s.wd.begun[K_REC - 1];
    uint64_t b0 = sim_metric(s.k[0].w, "agree_bytes");
    uint64_t steps[2] = {step, step}, most = 0;
    uint64_t *bells0 = malloc((size_t)size * sizeof *bells0);
    for (int r = 0; r < size; r++)
      bells0[r] = s.k[r].bells;
    for (int r = 0; r < size; r++) {
      sim_stats(&s, r, 0, step, C);
      sim_stats(&s, r, 1, step, C);
    }
    sim_run(&s, 2, 1.0);
    sim_check(&s, 2, steps, C);
    /* Both layers in one round: one fused allreduce; the first step also
     * gathers the lists (nothing cached yet), the first two negotiate,
     * and from the third on the round is predicted: the allreduce alone
     * agrees. */
    assert_int_equal(s.wd.begun[K_BOR - 1] - n0, step <= 2 ? 1 : 0);
    assert_int_equal(s.wd.begun[K_REC - 1] - r0, 1);
    assert_int_equal(s.wd.begun[K_GATHER - 1] - g0, step == 1 ? 1 : 0);
    bytes = sim_metric(s.k[0].w, "agree_bytes") - b0;
    /* The doorbell goes along a tree: at most three messages per rank. */
    for (int r = 0; r < size; r++)
      if (s.k[r].bells - bells0[r] > most)
        most = s.k[r].bells - bells0[r];
    free(bells0);
    assert_true(most <= 3);
    printf(
        "svc_agree_sim: np %4d step %d: %llu agreement bytes per rank "
        "per round, at most %llu doorbell messages per rank\n",
        size, (int)step, (unsigned long long)bytes, (unsigned long long)most);
  }
  assert_int_equal(sim_metric(s.k[size - 1].w, "cache_hits"), 2 * (STEPS - 1));
  /* Idle: polls over 2 s of the engine's clock run no collective and ring
   * no doorbell. */
  {
    uint64_t all = s.wd.begun[0] + s.wd.begun[1] + s.wd.begun[2];
    uint64_t bells = s.wd.bells;
    for (int i = 0; i < 200; i++)
      for (int r = 0; r < size; r++)
        assert_int_equal(svc_worker_poll(s.k[r].w, 1.0 + 0.01 * i), 0);
    assert_int_equal(s.wd.begun[0] + s.wd.begun[1] + s.wd.begun[2], all);
    assert_int_equal(s.wd.bells, bells);
    assert_int_equal(sim_metric(s.k[0].w, "negotiations"), 2);
    assert_int_equal(sim_metric(s.k[0].w, "spec_rounds"), STEPS - 2);
    assert_int_equal(sim_metric(s.k[0].w, "spec_misses"), 0);
  }
  sim_free(&s);
  return bytes;
}

static void test_bytes_independent_of_ranks(void **st) {
  static const int sizes[] = {2, 3, 16, 128, 1024};
  uint64_t b2 = 0;
  (void)st;
  for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++) {
    uint64_t b = sim_steps(sizes[i]);
    if (i == 0)
      b2 = b;
    assert_true(b > 0);
    assert_int_equal(b, b2);
  }
}

/* Polls every rank n times at time now. */
static void sim_poll(sim_t *s, int n, double now) {
  for (int i = 0; i < n; i++)
    for (int r = 0; r < s->wd.size; r++)
      assert_int_equal(svc_worker_poll(s->k[r].w, now), 0);
}

/* Polls two ranks at time now, past the stall timeout of their entries
 * at different steps of layer 0: both must fail with STALL; then a
 * common step `next` on both works. */
static void sim_stall_then(sim_t *s, size_t c, double now, uint64_t next) {
  uint64_t steps[1] = {next};
  sim_run(s, 1, now);
  for (int r = 0; r < 2; r++) {
    char code[64];
    double mean[8];
    sim_reply(s->k[r].reply[0], s->k[r].len[0], code, mean, c);
    assert_string_equal(code, "STALL");
    free(s->k[r].reply[0]);
    s->k[r].ndel = 0;
  }
  sim_stats(s, 0, 0, next, c);
  sim_stats(s, 1, 0, next, c);
  sim_run(s, 1, now + 0.5);
  sim_check(s, 1, steps, c);
}

/* Ranks at different steps of a cached layer: their bits differ, nothing
 * fuses, and once the stall timeout passes both fail with STALL; the next
 * step on both works. */
static void test_cached_step_mismatch_stalls(void **st) {
  enum { C = 2 };
  sim_t s;
  uint64_t steps[1] = {1};
  (void)st;
  sim_init(&s, 2, 1.0);
  sim_register(&s, "a", C);
  sim_stats(&s, 0, 0, 1, C);
  sim_stats(&s, 1, 0, 1, C);
  sim_run(&s, 1, 0.0);
  sim_check(&s, 1, steps, C);
  sim_stats(&s, 0, 0, 2, C);
  sim_stats(&s, 1, 0, 3, C);
  sim_poll(&s, 4, 0.1);
  assert_int_equal(s.k[0].ndel + s.k[1].ndel, 0);
  assert_int_equal(s.wd.begun[K_REC - 1], 1);
  sim_stall_then(&s, C, 2.0, 4);
  sim_free(&s);
}

/* An entry one rank submits long after the other: the late one's own
 * arrival starts the round that completes it (no timer involved). */
static void test_late_rank_wakes(void **st) {
  enum { C = 2 };
  sim_t s;
  uint64_t steps[1] = {1};
  (void)st;
  sim_init(&s, 3, 30.0);
  sim_register(&s, "a", C);
  sim_stats(&s, 0, 0, 1, C);
  sim_stats(&s, 1, 0, 1, C);
  for (int i = 0; i < 8; i++)
    for (int r = 0; r < 3; r++)
      assert_int_equal(svc_worker_poll(s.k[r].w, 0.5), 0);
  assert_int_equal(s.k[0].ndel, 0);
  sim_stats(&s, 2, 0, 1, C);
  sim_run(&s, 1, 0.6);
  sim_check(&s, 1, steps, C);
  sim_free(&s);
}

/* One step of layers first .. first+3, all submitted before the round;
 * returns rank 0's agreement bytes for it and checks the replies. */
static uint64_t sim_group_step(sim_t *s, uint64_t first, uint64_t step,
                               size_t c) {
  uint64_t b0 = sim_metric(s->k[0].w, "agree_bytes");
  uint64_t steps[4] = {step, step, step, step};
  uint64_t agreed = s->wd.begun[K_REC - 1];
  for (int r = 0; r < s->wd.size; r++)
    for (uint64_t l = first; l < first + 4; l++)
      sim_stats(s, r, l, step, c);
  sim_run(s, 4, 1.0);
  sim_check(s, 4, steps, c);
  /* The four entries still fuse into one allreduce. */
  assert_int_equal(s->wd.begun[K_REC - 1] - agreed, 1);
  return sim_metric(s->k[0].w, "agree_bytes") - b0;
}

/* Eight layers through a cache of four slots: the steps alternate between
 * layers 0-3 and 4-7, so every switch evicts all four slots, on every rank
 * alike (the simulated communicator fails any rank whose collectives
 * differ in kind or size from the others'). The bytes of a round are the
 * same at every switch, and a run of steps of one group then agrees with
 * the bit sets of four slots alone: 32 bytes per rank, whatever the
 * number of layers seen before. */
static void sim_eviction(int size) {
  enum { C = 2, SLOTS = 4, SWITCHES = 5 };
  sim_t s;
  uint64_t step = 1, switch_bytes = 0;
  char name[8];
  sim_init_slots(&s, size, 30.0, SLOTS);
  for (int l = 0; l < 8; l++) {
    snprintf(name, sizeof name, "l%d", l);
    sim_register(&s, name, C);
  }
  sim_group_step(&s, 0, step++, C);
  for (int i = 0; i < SWITCHES; i++) {
    uint64_t g0 = s.wd.begun[K_GATHER - 1];
    uint64_t b = sim_group_step(&s, i % 2 == 0 ? 4 : 0, step++, C);
    assert_int_equal(s.wd.begun[K_GATHER - 1] - g0, 1);
    if (i == 0)
      switch_bytes = b;
    assert_int_equal(b, switch_bytes);
  }
  for (int r = 0; r < size; r++)
    assert_int_equal(sim_metric(s.k[r].w, "cache_evictions"), SLOTS * SWITCHES);
  for (int i = 0; i < 3; i++) {
    uint64_t g0 = s.wd.begun[K_GATHER - 1];
    uint64_t b = sim_group_step(&s, 0, step++, C);
    /* After the first of these (a switch), cached: no gather; the second
     * negotiates by the bit sets of four slots, and the third, predicted
     * by the second, sends only its five readiness records. */
    if (i > 0)
      assert_int_equal(s.wd.begun[K_GATHER - 1], g0);
    if (i == 1)
      assert_int_equal(b, 8 * (1 + SLOTS / 4 + 2));
    if (i == 2)
      assert_int_equal(b, (1 + SLOTS) * sizeof(sbn_rec_t));
  }
  printf(
      "svc_agree_sim: np %4d, 8 layers over %d cache slots: %llu bytes "
      "per rank for a round that evicts, %d bytes once cached\n",
      size, SLOTS, (unsigned long long)switch_bytes, 8 * (1 + SLOTS / 4 + 2));
  sim_free(&s);
}

static void test_eviction_agrees(void **st) {
  (void)st;
  sim_eviction(2);
  sim_eviction(64);
}

/* Runs steps 1 .. 3 of layer 0 (c channels) on every rank, which brings
 * the rounds to speculation: the third step is a speculative round. */
static void sim_warm(sim_t *s, size_t c) {
  for (uint64_t step = 1; step <= 3; step++) {
    uint64_t steps[1] = {step};
    for (int r = 0; r < s->wd.size; r++)
      sim_stats(s, r, 0, step, c);
    sim_run(s, 1, 1.0);
    sim_check(s, 1, steps, c);
  }
  assert_int_equal(sim_metric(s->k[0].w, "spec_rounds"), 1);
  assert_int_equal(sim_metric(s->k[0].w, "spec_misses"), 0);
}

/* A rank late for a speculative round: the guess delivers nothing (one
 * allreduce, counted as a miss), the others' entries wait, and the late
 * entry starts the round that completes all of them, again speculative:
 * two allreduces and no negotiation for the step. */
static void test_spec_late_rank(void **st) {
  enum { C = 3 };
  sim_t s;
  uint64_t steps[1] = {4}, n0, r0;
  (void)st;
  sim_init(&s, 3, 30.0);
  sim_register(&s, "a", C);
  sim_warm(&s, C);
  n0 = s.wd.begun[K_BOR - 1];
  r0 = s.wd.begun[K_REC - 1];
  sim_stats(&s, 0, 0, 4, C);
  sim_stats(&s, 1, 0, 4, C);
  sim_poll(&s, 8, 1.5);
  assert_int_equal(s.k[0].ndel + s.k[1].ndel + s.k[2].ndel, 0);
  assert_int_equal(s.wd.begun[K_REC - 1] - r0, 1);
  assert_int_equal(sim_metric(s.k[0].w, "spec_misses"), 1);
  sim_stats(&s, 2, 0, 4, C);
  sim_run(&s, 1, 1.6);
  sim_check(&s, 1, steps, C);
  assert_int_equal(s.wd.begun[K_REC - 1] - r0, 2);
  assert_int_equal(s.wd.begun[K_BOR - 1] - n0, 0);
  assert_int_equal(sim_metric(s.k[2].w, "spec_rounds"), 3);
  sim_free(&s);
}

/* A new layer's first step beside a speculated one: the speculative
 * round delivers the cached layer and says that a rank has more, the
 * next round negotiates and gathers the new one, and the guess learned
 * from the two rounds together covers both layers from then on: one
 * allreduce per step, both replies right. */
static void test_spec_new_layer(void **st) {
  enum { C = 2 };
  sim_t s;
  (void)st;
  sim_init(&s, 2, 30.0);
  sim_register(&s, "a", C);
  sim_register(&s, "b", C);
  sim_warm(&s, C);
  for (uint64_t step = 4; step <= 9; step++) {
    uint64_t steps[2] = {step, step - 3};
    uint64_t n0 = s.wd.begun[K_BOR - 1], r0 = s.wd.begun[K_REC - 1];
    uint64_t g0 = s.wd.begun[K_GATHER - 1];
    for (int r = 0; r < 2; r++) {
      sim_stats(&s, r, 0, step, C);
      sim_stats(&s, r, 1, step - 3, C);
    }
    sim_run(&s, 2, 1.0);
    sim_check(&s, 2, steps, C);
    assert_int_equal(s.wd.begun[K_GATHER - 1] - g0, step == 4 ? 1 : 0);
    if (step == 4) /* speculative a, then b negotiated and gathered */
      assert_int_equal(s.wd.begun[K_REC - 1] - r0, 2);
    if (step >= 7) { /* learned: one round, no negotiation */
      assert_int_equal(s.wd.begun[K_REC - 1] - r0, 1);
      assert_int_equal(s.wd.begun[K_BOR - 1] - n0, 0);
    }
  }
  sim_free(&s);
}

/* Ranks at different steps of a speculated layer: the readiness record
 * tells them apart (its sums do not come from one offset), nothing is
 * delivered, and once the stall timeout passes both fail with STALL
 * through a negotiated round; the next common step works. */
static void test_spec_step_mismatch_stalls(void **st) {
  enum { C = 2 };
  sim_t s;
  (void)st;
  sim_init(&s, 2, 1.0);
  sim_register(&s, "a", C);
  sim_warm(&s, C);
  sim_stats(&s, 0, 0, 4, C);
  sim_stats(&s, 1, 0, 5, C);
  sim_poll(&s, 4, 1.1);
  assert_int_equal(s.k[0].ndel + s.k[1].ndel, 0);
  assert_true(sim_metric(s.k[0].w, "spec_misses") >= 1);
  sim_stall_then(&s, C, 3.0, 6);
  sim_free(&s);
}

/* Sync groups of two ranks out of four: every group has its own slot, a
 * speculative round carries both, and each rank gets its group's merge;
 * a group missing a rank's entry waits while the other is delivered. */
static void test_spec_groups(void **st) {
  enum { C = 2, SIZE = 4, G = 2 };
  sim_t s;
  (void)st;
  sim_init(&s, SIZE, 30.0);
  for (int r = 0; r < SIZE; r++) {
    tu_body_t b;
    tu_reply_t rep;
    tu_register_head(&b, 2, "a", "syncbatchnorm");
    tu_key(&b, "channels");
    msgpack_pack_uint32(&b.pk, C);
    tu_key(&b, "group_size");
    msgpack_pack_uint32(&b.pk, G);
    assert_string_equal(tu_run(s.k[r].w, &b, &rep), "");
    tu_reply_free(&rep);
  }
  for (uint64_t step = 1; step <= 5; step++) {
    uint64_t n0 = s.wd.begun[K_BOR - 1];
    for (int r = 0; r < SIZE; r++)
      if (step != 5 || r != 3)
        sim_stats(&s, r, 0, step, C);
    if (step == 5) {
      /* Rank 3 is late: group 0 is delivered, group 1 waits. */
      sim_poll(&s, 8, 1.0);
      assert_int_equal(s.k[0].ndel + s.k[1].ndel, 2);
      assert_int_equal(s.k[2].ndel, 0);
      sim_stats(&s, 3, 0, step, C);
    }
    sim_run(&s, 1, 1.0);
    if (step >= 3)
      assert_int_equal(s.wd.begun[K_BOR - 1] - n0, 0);
    for (int r = 0; r < SIZE; r++) {
      char code[64];
      double mean[C];
      assert_int_equal(s.k[r].ndel, 1);
      sim_reply(s.k[r].reply[0], s.k[r].len[0], code, mean, C);
      assert_string_equal(code, "");
      for (size_t ch = 0; ch < C; ch++) {
        int lo = r / G * G;
        double want = (sim_mean(lo, ch, step) + sim_mean(lo + 1, ch, step)) / 2;
        assert_true(fabs(mean[ch] - want) <= 1e-12 * (1 + fabs(want)));
      }
      free(s.k[r].reply[0]);
      s.k[r].ndel = 0;
    }
  }
  sim_free(&s);
}

/* A training loop: three layers, each submitted after the one before was
 * answered (a round each), step after step. From the third step on every
 * round is one speculative allreduce, none missed. */
static void test_spec_layer_chain(void **st) {
  enum { C = 2, L = 3, STEPS = 6 };
  sim_t s;
  (void)st;
  sim_init(&s, 2, 30.0);
  sim_register(&s, "a", C);
  sim_register(&s, "b", C);
  sim_register(&s, "c", C);
  for (uint64_t step = 1; step <= STEPS; step++)
    for (uint64_t l = 0; l < L; l++) {
      uint64_t steps[1] = {step};
      uint64_t n0 = s.wd.begun[K_BOR - 1], r0 = s.wd.begun[K_REC - 1];
      for (int r = 0; r < 2; r++)
        sim_stats(&s, r, l, step, C);
      sim_run(&s, 1, 1.0);
      sim_check(&s, 1, steps, C);
      assert_int_equal(s.wd.begun[K_REC - 1] - r0, 1);
      if (step >= 3)
        assert_int_equal(s.wd.begun[K_BOR - 1] - n0, 0);
    }
  assert_int_equal(sim_metric(s.k[0].w, "spec_misses"), 0);
  assert_true(sim_metric(s.k[0].w, "spec_rounds") >= (STEPS - 2) * L);
  sim_free(&s);
}

/* Without speculation every cached round negotiates: a bit-set OR and
 * the allreduce at every step, and no speculative round. */
static void test_no_speculate(void **st) {
  enum { C = 2 };
  sim_t s;
  (void)st;
  sim_speculate = 0;
  sim_init(&s, 2, 30.0);
  sim_speculate = 1;
  sim_register(&s, "a", C);
  for (uint64_t step = 1; step <= 5; step++) {
    uint64_t steps[1] = {step}, n0 = s.wd.begun[K_BOR - 1];
    for (int r = 0; r < 2; r++)
      sim_stats(&s, r, 0, step, C);
    sim_run(&s, 1, 1.0);
    sim_check(&s, 1, steps, C);
    assert_int_equal(s.wd.begun[K_BOR - 1] - n0, 1);
  }
  assert_int_equal(sim_metric(s.k[0].w, "spec_rounds"), 0);
  sim_free(&s);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_eviction_agrees),
      cmocka_unit_test(test_bytes_independent_of_ranks),
      cmocka_unit_test(test_cached_step_mismatch_stalls),
      cmocka_unit_test(test_late_rank_wakes),
      cmocka_unit_test(test_spec_late_rank),
      cmocka_unit_test(test_spec_new_layer),
      cmocka_unit_test(test_spec_step_mismatch_stalls),
      cmocka_unit_test(test_spec_groups),
      cmocka_unit_test(test_spec_layer_chain),
      cmocka_unit_test(test_no_speculate),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
