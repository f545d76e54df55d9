/* The single-process communicator (the record combination, which its
 * reductions never need, is the kernel sets': kernels/records.c). */
#include "base/sbn_base.h"

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
