/* The C client's stats call against a scripted worker on a Unix socket
 * (a thread here, no MPI): the `want` list it sends for the members the
 * caller fills, and the replies it reads, among them those of a worker
 * that predates `want` and sends all five vectors (read by key, the same
 * values), and broken replies (a wanted vector missing or short), which
 * are SBN_EFORMAT naming the key. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <msgpack.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "client.h"
#include "svc_codec.h"

#define NC 6

/* What the scripted worker answers to each request. */
typedef enum {
  R_ALL,        /* all five vectors, as a worker without `want` does */
  R_AS_ASKED,   /* the vectors the request wants */
  R_NO_INVSTD,  /* all but invstd */
  R_SHORT_MEAN, /* mean with NC - 1 values */
  R_ECHO,       /* the wanted vectors are the request's mean, then m2 */
} reply_kind_t;

typedef struct fake_s {
  int lfd;
  const reply_kind_t *script;
  int n;
  unsigned skip[8]; /* each request's decoded skip set */
  double v[SVC_STATS_OUTS][NC];
  const double *counts; /* R_ECHO: the count vector expected, or NULL */
  int counts_ok;
} fake_t;

static int read_all(int fd, void *p, size_t n) {
  for (size_t at = 0; at < n;) {
    ssize_t k = read(fd, (char *)p + at, n - at);
    if (k <= 0)
      return -1;
    at += (size_t)k;
  }
  return 0;
}

static int write_all(int fd, const void *p, size_t n) {
  for (size_t at = 0; at < n;) {
    ssize_t k = write(fd, (const char *)p + at, n - at);
    if (k <= 0)
      return -1;
    at += (size_t)k;
  }
  return 0;
}

/* R_ECHO: a stats request's mean and m2 come back as the two vectors it
 * wants (mean and invstd), a stats_backward's two sums as its sums; the
 * count vector is compared with the one expected. */
static int fake_echo(fake_t *f, int fd, const svc_request_t *q) {
  int fwd = q->op == SVC_OP_STATS;
  uint8_t *buf = NULL;
  size_t len = 0;
  svc_reply_t r;
  f->counts_ok =
      f->counts == NULL || (!q->count.scalar && q->count.n == q->mean.n &&
                            memcmp(q->count.v, f->counts, q->count.n * 8) == 0);
  svc_reply_begin(&r, &q->id, 2, 0);
  svc_reply_key(&r, fwd ? "mean" : "sum_dy");
  r.rc |= svc_pack_vec64(r.pk, q->mean.v, q->mean.n);
  svc_reply_key(&r, fwd ? "invstd" : "sum_dy_xhat");
  r.rc |= svc_pack_vec64(r.pk, q->m2.v, q->m2.n);
  if (svc_reply_end(&r, &buf, &len) != 0)
    return -1;
  int rc = write_all(fd, buf, len);
  free(buf);
  return rc;
}

/* One reply of kind k to q. */
static int fake_reply(fake_t *f, int fd, const svc_request_t *q,
                      reply_kind_t k) {
  unsigned keep = SVC_STATS_ALL;
  uint32_t nv = 0;
  uint8_t *buf = NULL;
  size_t len = 0;
  svc_reply_t r;
  if (k == R_AS_ASKED)
    keep &= ~q->skip;
  else if (k == R_NO_INVSTD)
    keep &= ~(unsigned)SVC_STATS_INVSTD;
  for (int i = 0; i < SVC_STATS_OUTS; i++)
    nv += (keep >> i) & 1u;
  if (k == R_ECHO)
    return fake_echo(f, fd, q);
  svc_reply_begin(&r, &q->id, nv, 0);
  for (int i = 0; i < SVC_STATS_OUTS; i++) {
    if (!(keep & (1u << i)))
      continue;
    svc_reply_key(&r, svc_stats_out_name(i));
    r.rc |= svc_pack_vec64(r.pk, f->v[i],
                           k == R_SHORT_MEAN && i == 1 ? NC - 1 : NC);
  }
  if (svc_reply_end(&r, &buf, &len) != 0)
    return -1;
  int rc = write_all(fd, buf, len);
  free(buf);
  return rc;
}

static void *fake_worker(void *arg) {
  fake_t *f = arg;
  svc_limits_t lim;
  int fd = accept(f->lfd, NULL, NULL);
  svc_limits_default(&lim);
  for (int i = 0; fd >= 0 && i < f->n; i++) {
    uint8_t hdr[SVC_HEADER_BYTES], *body;
    uint32_t len = 0;
    svc_request_t q;
    if (read_all(fd, hdr, sizeof hdr) != 0 ||
        svc_frame_len(hdr, &lim, &len) != 0 || (body = malloc(len)) == NULL)
      break;
    if (read_all(fd, body, len) != 0 ||
        svc_decode_request(body, len, &lim, &q) != 0) {
      free(body);
      break;
    }
    free(body);
    f->skip[i] = q.op == SVC_OP_STATS ? q.skip : ~0u;
    int rc = fake_reply(f, fd, &q, f->script[i]);
    svc_request_free(&q);
    if (rc != 0)
      break;
  }
  if (fd >= 0)
    close(fd);
  return NULL;
}

/* Starts the scripted worker on a fresh socket and connects to it. */
static sbn_client_t *fake_start(fake_t *f, pthread_t *t, char *dir,
                                const reply_kind_t *script, int n) {
  struct sockaddr_un a;
  sbn_client_t *c = NULL;
  memset(f, 0, sizeof *f);
  f->script = script;
  f->n = n;
  for (int i = 0; i < SVC_STATS_OUTS; i++)
    for (int k = 0; k < NC; k++)
      f->v[i][k] = (i + 1) * 1000.0 + k / 7.0;
  assert_non_null(mkdtemp(dir));
  memset(&a, 0, sizeof a);
  a.sun_family = AF_UNIX;
  snprintf(a.sun_path, sizeof a.sun_path, "%s/w.sock", dir);
  f->lfd = socket(AF_UNIX, SOCK_STREAM, 0);
  assert_true(f->lfd >= 0);
  assert_int_equal(bind(f->lfd, (struct sockaddr *)&a, sizeof a), 0);
  assert_int_equal(listen(f->lfd, 1), 0);
  assert_int_equal(pthread_create(t, NULL, fake_worker, f), 0);
  assert_int_equal(sbn_client_connect(a.sun_path, &c), 0);
  return c;
}

static void fake_stop(fake_t *f, pthread_t t, sbn_client_t *c, char *dir) {
  char p[128];
  sbn_client_close(c);
  assert_int_equal(pthread_join(t, NULL), 0);
  close(f->lfd);
  snprintf(p, sizeof p, "%s/w.sock", dir);
  unlink(p);
  rmdir(dir);
}

/* The want list follows the members; each reply, full or compact, fills
 * exactly them with the worker's bits. */
static void test_want_and_older_worker(void **st) {
  static const reply_kind_t script[] = {R_ALL, R_AS_ASKED, R_ALL, R_AS_ASKED,
                                        R_ALL};
  double mean[NC], m2[NC], got[SVC_STATS_OUTS][NC], canary[NC];
  char dir[] = "/tmp/sbn-want-XXXXXX";
  fake_t f;
  pthread_t t;
  sbn_client_t *c = fake_start(&f, &t, dir, script, 5);
  sbn_client_stats_t two = {NULL, got[1], NULL, NULL, got[4]};
  sbn_client_stats_t all = {got[0], got[1], got[2], got[3], got[4]};
  (void)st;
  for (int k = 0; k < NC; k++)
    mean[k] = k, m2[k] = 1 + k;
  memset(got, 0, sizeof got);
  for (int k = 0; k < NC; k++)
    canary[k] = -7.0;
  memcpy(got[0], canary, sizeof canary);
  /* An older worker's full reply: mean and invstd read, count untouched. */
  assert_int_equal(sbn_client_stats(c, 0, 1, NC, 10, NULL, mean, m2, &two), 0);
  assert_memory_equal(got[1], f.v[1], sizeof got[1]);
  assert_memory_equal(got[4], f.v[4], sizeof got[4]);
  assert_memory_equal(got[0], canary, sizeof canary);
  /* A compact reply: the same. */
  memset(got, 0, sizeof got);
  assert_int_equal(sbn_client_stats(c, 0, 2, NC, 10, NULL, mean, m2, &two), 0);
  assert_memory_equal(got[1], f.v[1], sizeof got[1]);
  assert_memory_equal(got[4], f.v[4], sizeof got[4]);
  /* All five members: no `want` key (the request of every version). */
  assert_int_equal(sbn_client_stats(c, 0, 3, NC, 10, NULL, mean, m2, &all), 0);
  for (int i = 0; i < SVC_STATS_OUTS; i++)
    assert_memory_equal(got[i], f.v[i], sizeof got[i]);
  /* No members (out NULL): an empty want, and an empty reply is enough. */
  assert_int_equal(sbn_client_stats(c, 0, 4, NC, 10, NULL, mean, m2, NULL), 0);
  /* The same with a full reply (older worker). */
  assert_int_equal(sbn_client_stats(c, 0, 5, NC, 10, NULL, mean, m2, NULL), 0);
  fake_stop(&f, t, c, dir);
  assert_int_equal(f.skip[0],
                   SVC_STATS_COUNT | SVC_STATS_VAR | SVC_STATS_VAR_UNBIASED);
  assert_int_equal(f.skip[1], f.skip[0]);
  assert_int_equal(f.skip[2], 0);
  assert_int_equal(f.skip[3], SVC_STATS_ALL);
  assert_int_equal(f.skip[4], SVC_STATS_ALL);
}

/* A reply without a wanted vector, or with one of the wrong length, is
 * SBN_EFORMAT naming it; a vector not wanted may be missing. */
static void test_broken_replies(void **st) {
  static const reply_kind_t script[] = {R_NO_INVSTD, R_NO_INVSTD, R_SHORT_MEAN};
  double mean[NC], m2[NC], a[NC], b[NC];
  char dir[] = "/tmp/sbn-want-XXXXXX";
  fake_t f;
  pthread_t t;
  sbn_client_t *c = fake_start(&f, &t, dir, script, 3);
  sbn_client_stats_t two = {NULL, a, NULL, NULL, b};
  sbn_client_stats_t one = {NULL, a, NULL, NULL, NULL};
  (void)st;
  for (int k = 0; k < NC; k++)
    mean[k] = k, m2[k] = 1 + k;
  assert_int_equal(sbn_client_stats(c, 0, 1, NC, 10, NULL, mean, m2, &two),
                   SBN_EFORMAT);
  assert_non_null(strstr(sbn_last_error(), "'invstd'"));
  assert_int_equal(sbn_client_stats(c, 0, 2, NC, 10, NULL, mean, m2, &one), 0);
  assert_memory_equal(a, f.v[1], sizeof a);
  assert_int_equal(sbn_client_stats(c, 0, 3, NC, 10, NULL, mean, m2, &one),
                   SBN_EFORMAT);
  assert_non_null(strstr(sbn_last_error(), "'mean'"));
  fake_stop(&f, t, c, dir);
}

/* A request of megabytes goes out in several sendmsg calls (the socket
 * takes less at once), from the caller's arrays: the worker must get
 * every byte of count, mean and m2 in order. The scripted worker echoes
 * mean as the reply's mean and m2 as its invstd. */
static void test_large_request(void **st) {
  static const reply_kind_t script[] = {R_ECHO, R_ECHO};
  enum { BIG = 300001 };
  double *mean = malloc(BIG * 8), *m2 = malloc(BIG * 8), *cnt = malloc(BIG * 8);
  double *a = malloc(BIG * 8), *b = malloc(BIG * 8);
  char dir[] = "/tmp/sbn-want-XXXXXX";
  fake_t f;
  pthread_t t;
  sbn_client_t *c;
  (void)st;
  assert_true(mean && m2 && cnt && a && b);
  for (size_t k = 0; k < BIG; k++) {
    mean[k] = (double)k / 3.0;
    m2[k] = 1e6 - (double)k;
    cnt[k] = (double)(k % 17 + 2);
  }
  c = fake_start(&f, &t, dir, script, 2);
  f.counts = cnt;
  sbn_client_stats_t two = {NULL, a, NULL, NULL, b};
  assert_int_equal(sbn_client_stats(c, 0, 1, BIG, 0, cnt, mean, m2, &two), 0);
  assert_true(f.counts_ok);
  assert_memory_equal(a, mean, BIG * 8);
  assert_memory_equal(b, m2, BIG * 8);
  /* stats_backward's two vectors the same way (echoed as its sums). */
  memset(a, 0, BIG * 8);
  memset(b, 0, BIG * 8);
  f.counts = NULL;
  assert_int_equal(sbn_client_stats_backward(c, 0, 1, BIG, mean, m2, a, b), 0);
  assert_memory_equal(a, mean, BIG * 8);
  assert_memory_equal(b, m2, BIG * 8);
  fake_stop(&f, t, c, dir);
  free(mean);
  free(m2);
  free(cnt);
  free(a);
  free(b);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_want_and_older_worker),
      cmocka_unit_test(test_broken_replies),
      cmocka_unit_test(test_large_request),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
