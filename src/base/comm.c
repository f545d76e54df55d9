/* The record combination and the single-process communicator. */
#include "base/sbn_base.h"

/* Chan's parallel merge of two (n, mean, M2) triples. Every operation is
 * written symmetrically in a and b (sums and products commute bitwise in
 * IEEE arithmetic, and delta is only used squared), so combine(a, b) and
 * combine(b, a) give the same bits: ranks of a reduction tree that combine
 * the same two partials agree exactly. The weighted mean (na*ma + nb*mb)/n
 * loses nothing that matters here: its error is relative to |mean|, and the
 * variance is built from M2 and delta, not from the mean's square. */
static void sbn__merge_moments(const double *a, double *b) {
  double na = a[0], nb = b[0];
  if (na == 0)
    return;
  if (nb == 0) {
    b[0] = a[0];
    b[1] = a[1];
    b[2] = a[2];
    return;
  }
  double n = na + nb;
  double delta = b[1] - a[1];
  double mean = (na * a[1] + nb * b[1]) / n;
  double m2 = (a[2] + b[2]) + delta * delta * (na * nb / n);
  b[0] = n;
  b[1] = mean;
  b[2] = m2;
}

void sbn_rec_combine(const sbn_rec_t *in, sbn_rec_t *inout, size_t n) {
  for (size_t i = 0; i < n; i++) {
    if (in[i].tag == SBN_REC_MOMENTS) {
      sbn__merge_moments(in[i].v, inout[i].v);
    } else {
      inout[i].v[0] += in[i].v[0];
      inout[i].v[1] += in[i].v[1];
      inout[i].v[2] += in[i].v[2];
    }
  }
}

static int sbn__local_allreduce(sbn_comm_t *comm, sbn_rec_t *recs, size_t n) {
  (void)comm;
  (void)recs;
  (void)n;
  return 0;
}

/* The local communicator's non-blocking reduction is complete as soon as
 * it begins (the identity needs no partner), so its request is a token
 * that owns nothing: the address of the communicator's own table. */
static int sbn__local_ibegin(sbn_comm_t *comm, sbn_rec_t *recs, size_t n,
                             void **request) {
  (void)comm;
  (void)recs;
  (void)n;
  if (request == NULL)
    return sbn_set_error(SBN_EINVAL, "request: NULL");
  *request = (void *)&sbn__local_ibegin;
  return 0;
}

static int sbn__local_itest(sbn_comm_t *comm, void *request, int *done) {
  (void)comm;
  if (request == NULL || done == NULL)
    return sbn_set_error(SBN_EINVAL, "%s: NULL",
                         request == NULL ? "request" : "done");
  *done = 1;
  return 0;
}

static int sbn__local_iend(sbn_comm_t *comm, void *request) {
  (void)comm;
  if (request == NULL)
    return sbn_set_error(SBN_EINVAL, "request: NULL");
  return 0;
}

static void sbn__local_destroy(sbn_comm_t *comm) {
  (void)comm;
}

static const sbn_comm_vtable_t sbn__local_vt = {
    .allreduce = sbn__local_allreduce,
    .iallreduce_begin = sbn__local_ibegin,
    .iallreduce_test = sbn__local_itest,
    .iallreduce_end = sbn__local_iend,
    .destroy = sbn__local_destroy,
};

static sbn_comm_t sbn__local_comm = {&sbn__local_vt, 0, 1, 0};

sbn_comm_t *sbn_comm_local(void) {
  return &sbn__local_comm;
}

void sbn_comm_local_init(sbn_comm_t *c, int world_rank) {
  c->vt = &sbn__local_vt;
  c->rank = 0;
  c->size = 1;
  c->world_rank = world_rank;
}

int sbn_comm_allreduce(sbn_comm_t *comm, sbn_rec_t *recs, size_t n) {
  if (comm == NULL || comm->size <= 1)
    return 0;
  return comm->vt->allreduce(comm, recs, n);
}

int sbn__comm_can_ireduce(const sbn_comm_t *comm) {
  return comm != NULL && comm->size > 1 && comm->vt->iallreduce_begin != NULL &&
         comm->vt->iallreduce_test != NULL && comm->vt->iallreduce_end != NULL;
}

int sbn__comm_ibegin(sbn_comm_t *comm, sbn_rec_t *recs, size_t n,
                     void **request) {
  *request = NULL;
  if (comm == NULL || comm->size <= 1)
    return 0;
  if (!sbn__comm_can_ireduce(comm))
    return comm->vt->allreduce(comm, recs, n);
  return comm->vt->iallreduce_begin(comm, recs, n, request);
}

int sbn__comm_itest(sbn_comm_t *comm, void *request, int *done) {
  int d = 0;
  if (request == NULL)
    return 0;
  return comm->vt->iallreduce_test(comm, request, done != NULL ? done : &d);
}

int sbn__comm_iend(sbn_comm_t *comm, void **request) {
  void *r = *request;
  *request = NULL;
  return r == NULL ? 0 : comm->vt->iallreduce_end(comm, r);
}

void sbn_comm_destroy(sbn_comm_t *comm) {
  if (comm != NULL && comm->vt != NULL && comm->vt->destroy != NULL)
    comm->vt->destroy(comm);
}
