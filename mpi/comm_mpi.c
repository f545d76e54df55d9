/* The MPI communicator: one MPI communicator per layer (its sync group),
 * records reduced with a user-defined MPI_Op that calls sbn_rec_combine.
 *
 * Every collective syncbn issues runs on a communicator it created itself
 * with MPI_ERRORS_RETURN, so an MPI failure comes back as SBN_ECOMM instead
 * of aborting the job, and the caller's communicators are never modified. */
#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "syncbn.h"
#include "syncbn_mpi.h"

/* A pending non-blocking collective, handed out as the vtable's request.
 * The communicator lists its live ones, so that destroying it with one
 * still in flight (a process leaving without MPI_Finalize) frees them. */
typedef struct sbn__mpi_req_s {
  MPI_Request req;
  /* A reduction over two processes is an exchange (see sbn__mpi_pair):
   * req sends buf, rx receives the peer's n elements into peer, and op
   * combines them into buf once both completed (peer NULL again). */
  MPI_Request rx;
  void *buf, *peer;
  size_t peer_bytes; /* peer's size, which may exceed n elements */
  int n;
  MPI_Datatype type;
  MPI_Op op;
  struct sbn__mpi_req_s *prev, *next;
} sbn__mpi_req_t;

/* A doorbell send in flight: its buffer must live until it completes. */
typedef struct sbn__mpi_bell_s {
  MPI_Request req;
  uint64_t value;
  struct sbn__mpi_bell_s *next;
} sbn__mpi_bell_t;

typedef struct sbn__mpi_comm_s {
  sbn_comm_t base;      /* first, so a sbn_comm_t * is a sbn__mpi_comm_t * */
  MPI_Comm comm;        /* the sync group, owned */
  sbn__mpi_req_t *reqs; /* requests begun and not yet ended */
  /* The doorbell: one receive kept posted once the first poll ran, and
   * the sends not yet known complete. */
  MPI_Request bell_rx;
  uint64_t bell_in;
  int bell_posted;
  sbn__mpi_bell_t *bells;
  /* Seconds spent inside the MPI calls of this communicator's collectives
   * (sbn_mpi_comm_seconds): the part of a reduction a caller did not hide. */
  double mpi_s;
  /* The receive buffer of the last finished two-process exchange, kept
   * for the next one: the service reduces tens of KiB every round, and a
   * fresh buffer each time cost the heap's trim and page faults. */
  void *spare;
  size_t spare_bytes;
} sbn__mpi_comm_t;

/* The tags (syncbn_mpi.h): point-to-point messages never match
 * collectives, and the communicator is syncbn's own, so no other message
 * uses them. */
#define SBN__BELL_TAG SBN_MPI_BELL_TAG
#define SBN__PAIR_TAG SBN_MPI_PAIR_TAG

/* Seconds on the monotonic clock: MPI_Wtime here ticks in microseconds,
 * coarser than a small pass's MPI calls. */
static double sbn__mpi_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* A new request listed in m, or NULL when out of memory. */
static sbn__mpi_req_t *sbn__req_new(sbn__mpi_comm_t *m) {
  sbn__mpi_req_t *r = calloc(1, sizeof *r);
  if (r == NULL)
    return NULL;
  r->req = MPI_REQUEST_NULL;
  r->rx = MPI_REQUEST_NULL;
  r->next = m->reqs;
  if (m->reqs != NULL)
    m->reqs->prev = r;
  m->reqs = r;
  return r;
}

static void sbn__req_free(sbn__mpi_comm_t *m, sbn__mpi_req_t *r) {
  /* An exchange abandoned in flight (the communicator goes first) stops
   * receiving; its receive buffer stays allocated, for MPI may still be
   * writing into it. */
  if (r->rx != MPI_REQUEST_NULL) {
    MPI_Cancel(&r->rx);
    MPI_Request_free(&r->rx);
  } else {
    free(r->peer);
  }
  if (r->prev != NULL)
    r->prev->next = r->next;
  else
    m->reqs = r->next;
  if (r->next != NULL)
    r->next->prev = r->prev;
  free(r);
}

/* The record datatype and the Chan merge operation are created with the
 * first communicator and freed with the last one, so a program that
 * destroys its communicators before MPI_Finalize leaks nothing. The count
 * is not atomic: like all of syncbn's MPI use, creating and destroying
 * communicators happens on one thread (they are collectives anyway). */
static MPI_Datatype sbn__rec_type = MPI_DATATYPE_NULL;
static MPI_Op sbn__rec_op = MPI_OP_NULL;
static int sbn__rec_users = 0;

int sbn_mpi_error(int mpi_err, const char *call) {
  char msg[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(mpi_err, msg, &len) != MPI_SUCCESS)
    len = 0;
  msg[len < MPI_MAX_ERROR_STRING ? len : MPI_MAX_ERROR_STRING - 1] = '\0';
  return sbn_set_error(SBN_ECOMM, "%s: MPI error %d (%s)",
                       call != NULL ? call : "MPI", mpi_err,
                       len > 0 ? msg : "unknown");
}

/* MPI calls this with len records of sbn__rec_type. */
static void sbn__rec_op_fn(void *in, void *inout, int *len,
                           MPI_Datatype *type) {
  (void)type;
  sbn_rec_combine(in, inout, (size_t)*len);
}

static int sbn__rec_acquire(void) {
  int err;
  if (sbn__rec_users > 0) {
    sbn__rec_users++;
    return 0;
  }
  /* The record is four doubles with no padding, so a contiguous type
   * describes it exactly on every platform. */
  _Static_assert(sizeof(sbn_rec_t) == 4 * sizeof(double),
                 "sbn_rec_t must be four packed doubles");
  err = MPI_Type_contiguous(4, MPI_DOUBLE, &sbn__rec_type);
  if (err != MPI_SUCCESS)
    return sbn_mpi_error(err, "MPI_Type_contiguous");
  err = MPI_Type_commit(&sbn__rec_type);
  if (err != MPI_SUCCESS) {
    MPI_Type_free(&sbn__rec_type);
    return sbn_mpi_error(err, "MPI_Type_commit");
  }
  /* Commutative: sbn_rec_combine gives the same bits either way round. */
  err = MPI_Op_create(sbn__rec_op_fn, 1, &sbn__rec_op);
  if (err != MPI_SUCCESS) {
    MPI_Type_free(&sbn__rec_type);
    return sbn_mpi_error(err, "MPI_Op_create");
  }
  sbn__rec_users = 1;
  return 0;
}

static void sbn__rec_release(void) {
  if (sbn__rec_users <= 0 || --sbn__rec_users > 0)
    return;
  MPI_Op_free(&sbn__rec_op);
  MPI_Type_free(&sbn__rec_type);
}

int sbn_mpi_rec_acquire(MPI_Datatype *type, MPI_Op *op) {
  int rc;
  if (type == NULL || op == NULL)
    return sbn_set_error(SBN_EINVAL, "%s: NULL", type == NULL ? "type" : "op");
  if ((rc = sbn__rec_acquire()) != 0)
    return rc;
  *type = sbn__rec_type;
  *op = sbn__rec_op;
  return 0;
}

void sbn_mpi_rec_release(void) {
  sbn__rec_release();
}

static int sbn__mpi_count(size_t n, int *count) {
  if (n > (size_t)INT_MAX)
    return sbn_set_error(SBN_ELIMIT, "n: %zu records exceed MPI's int count",
                         n);
  *count = (int)n;
  return 0;
}

static int sbn__mpi_allreduce(sbn_comm_t *c, sbn_rec_t *recs, size_t n) {
  sbn__mpi_comm_t *m = (sbn__mpi_comm_t *)c;
  int count = 0, rc, err;
  if ((rc = sbn__mpi_count(n, &count)) != 0)
    return rc;
  if (count == 0)
    return 0;
  double t0 = sbn__mpi_now();
  err = MPI_Allreduce(MPI_IN_PLACE, recs, count, sbn__rec_type, sbn__rec_op,
                      m->comm);
  m->mpi_s += sbn__mpi_now() - t0;
  if (err != MPI_SUCCESS)
    return sbn_mpi_error(err, "MPI_Allreduce");
  return 0;
}

/* The other process of a communicator of two, or -1 for any other size.
 * A reduction over two processes is one message each way and one local
 * combination, which measured faster than Open MPI's MPI_Iallreduce
 * (libnbc) here at most sizes (`syncbn bench sizes`, records_nonblocking,
 * np 2: 2048 records 29-36 us against 34-36, 32768 records 246-257
 * against 360-442; README, "One collective for a predicted round").
 * The result has the bits MPI's would have: with two operands every
 * algorithm combines them once, and the record merge and the OR commute
 * bitwise. With more processes the combination order is a tree's, so
 * MPI's collective stays. */
static int sbn__mpi_pair(const sbn__mpi_comm_t *m) {
  /* SBN_MPI_PAIR=0 keeps MPI_Iallreduce, for measuring one against the
   * other in the same run (read once: every process must choose alike). */
  static int off = -1;
  int size = 0, rank = 0;
  if (off < 0) {
    const char *e = getenv("SBN_MPI_PAIR");
    off = e != NULL && strcmp(e, "0") == 0;
  }
  if (off || MPI_Comm_size(m->comm, &size) != MPI_SUCCESS || size != 2 ||
      MPI_Comm_rank(m->comm, &rank) != MPI_SUCCESS)
    return -1;
  return 1 - rank;
}

/* Starts the exchange of buf (count elements) with the peer. */
static int sbn__pair_start(sbn__mpi_comm_t *m, sbn__mpi_req_t *r, void *buf,
                           int count, MPI_Datatype type, MPI_Op op, int peer) {
  int size = 0, err;
  size_t bytes;
  MPI_Type_size(type, &size);
  bytes = (size_t)count * (size_t)size;
  if (m->spare != NULL && m->spare_bytes >= bytes) {
    r->peer = m->spare;
    r->peer_bytes = m->spare_bytes;
    m->spare = NULL;
  } else if ((r->peer = malloc(bytes > 0 ? bytes : 1)) == NULL) {
    return sbn_set_error(SBN_ENOMEM, "request: out of memory");
  } else {
    r->peer_bytes = bytes;
  }
  r->buf = buf;
  r->n = count;
  r->type = type;
  r->op = op;
  err = MPI_Irecv(r->peer, count, type, peer, SBN__PAIR_TAG, m->comm, &r->rx);
  if (err == MPI_SUCCESS)
    err = MPI_Isend(buf, count, type, peer, SBN__PAIR_TAG, m->comm, &r->req);
  if (err != MPI_SUCCESS)
    return sbn_mpi_error(err, "MPI_Isend/MPI_Irecv of a two-process reduction");
  return 0;
}

/* Completes an exchange whose messages both arrived: checks that the peer
 * sent as many elements (a peer in another collective would not) and
 * combines them into buf. */
static int sbn__pair_finish(sbn__mpi_comm_t *m, sbn__mpi_req_t *r,
                            const MPI_Status *st) {
  int got = -1;
  MPI_Get_count(st, r->type, &got);
  if (got != r->n)
    return sbn_set_error(SBN_ECOMM,
                         "two-process reduction: the peer sent %d elements, "
                         "this process %d (the processes run different "
                         "collectives)",
                         got, r->n);
  if (r->op == sbn__rec_op) {
    sbn_rec_combine(r->peer, r->buf, (size_t)r->n);
  } else {
    uint64_t *a = r->peer, *b = r->buf;
    for (int i = 0; i < r->n; i++)
      b[i] |= a[i];
  }
  /* The larger of this buffer and the one kept serves the next exchange. */
  if (m->spare == NULL || m->spare_bytes < r->peer_bytes) {
    free(m->spare);
    m->spare = r->peer;
    m->spare_bytes = r->peer_bytes;
  } else {
    free(r->peer);
  }
  r->peer = NULL;
  return 0;
}

/* A non-blocking in-place allreduce of n elements of type with op, as a
 * request that iallreduce_test and iallreduce_end finish; the records'
 * reduction and the negotiation's OR differ only in type and op. */
static int sbn__mpi_istart(sbn_comm_t *c, void *buf, size_t n,
                           MPI_Datatype type, MPI_Op op, void **request) {
  sbn__mpi_comm_t *m = (sbn__mpi_comm_t *)c;
  sbn__mpi_req_t *r = NULL;
  int count = 0, rc, err;
  if (request == NULL)
    return sbn_set_error(SBN_EINVAL, "request: NULL");
  *request = NULL;
  if ((rc = sbn__mpi_count(n, &count)) != 0)
    return rc;
  r = sbn__req_new(m);
  if (r == NULL)
    return sbn_set_error(SBN_ENOMEM, "request: out of memory");
  if (count > 0) {
    double t0 = sbn__mpi_now();
    int peer = sbn__mpi_pair(m);
    if (peer >= 0) {
      rc = sbn__pair_start(m, r, buf, count, type, op, peer);
    } else {
      err =
          MPI_Iallreduce(MPI_IN_PLACE, buf, count, type, op, m->comm, &r->req);
      rc = err == MPI_SUCCESS ? 0 : sbn_mpi_error(err, "MPI_Iallreduce");
    }
    m->mpi_s += sbn__mpi_now() - t0;
    if (rc != 0) {
      sbn__req_free(m, r);
      return rc;
    }
  }
  *request = r;
  return 0;
}

static int sbn__mpi_ibegin(sbn_comm_t *c, sbn_rec_t *recs, size_t n,
                           void **request) {
  return sbn__mpi_istart(c, recs, n, sbn__rec_type, sbn__rec_op, request);
}

/* An MPI_Iallgather of bytes; its request is the same kind as a
 * reduction's, so iallreduce_test and iallreduce_end finish it. */
static int sbn__mpi_igather(sbn_comm_t *c, const void *send, void *recv,
                            size_t bytes, void **request) {
  sbn__mpi_comm_t *m = (sbn__mpi_comm_t *)c;
  sbn__mpi_req_t *r = NULL;
  int err;
  if (request == NULL)
    return sbn_set_error(SBN_EINVAL, "request: NULL");
  *request = NULL;
  if (bytes > (size_t)INT_MAX)
    return sbn_set_error(SBN_ELIMIT, "bytes: %zu exceed MPI's int count",
                         bytes);
  r = sbn__req_new(m);
  if (r == NULL)
    return sbn_set_error(SBN_ENOMEM, "request: out of memory");
  double t0 = sbn__mpi_now();
  err = MPI_Iallgather(send, (int)bytes, MPI_BYTE, recv, (int)bytes, MPI_BYTE,
                       m->comm, &r->req);
  m->mpi_s += sbn__mpi_now() - t0;
  if (err != MPI_SUCCESS) {
    sbn__req_free(m, r);
    return sbn_mpi_error(err, "MPI_Iallgather");
  }
  *request = r;
  return 0;
}

/* A bitwise OR of words over the group, for syncbnd's negotiation. */
static int sbn__mpi_ibor(sbn_comm_t *c, uint64_t *words, size_t n,
                         void **request) {
  return sbn__mpi_istart(c, words, n, MPI_UINT64_T, MPI_BOR, request);
}

/* Frees the doorbell sends that completed. */
static int sbn__bell_reap(sbn__mpi_comm_t *m) {
  for (sbn__mpi_bell_t **pp = &m->bells; *pp != NULL;) {
    sbn__mpi_bell_t *b = *pp;
    int done = 0, err;
    err = MPI_Test(&b->req, &done, MPI_STATUS_IGNORE);
    if (err != MPI_SUCCESS)
      return sbn_mpi_error(err, "MPI_Test");
    if (!done) {
      pp = &b->next;
      continue;
    }
    *pp = b->next;
    free(b);
  }
  return 0;
}

static int sbn__mpi_bell_send(sbn_comm_t *c, int to, uint64_t value) {
  sbn__mpi_comm_t *m = (sbn__mpi_comm_t *)c;
  sbn__mpi_bell_t *b;
  int err;
  if (to < 0 || to >= c->size || to == c->rank)
    return sbn_set_error(SBN_EINVAL, "to: %d is not another rank of %d", to,
                         c->size);
  if ((b = calloc(1, sizeof *b)) == NULL)
    return sbn_set_error(SBN_ENOMEM, "bell: out of memory");
  b->value = value;
  err = MPI_Isend(&b->value, 1, MPI_UINT64_T, to, SBN__BELL_TAG, m->comm,
                  &b->req);
  if (err != MPI_SUCCESS) {
    free(b);
    return sbn_mpi_error(err, "MPI_Isend");
  }
  b->next = m->bells;
  m->bells = b;
  return sbn__bell_reap(m);
}

static int sbn__mpi_bell_poll(sbn_comm_t *c, uint64_t *max) {
  sbn__mpi_comm_t *m = (sbn__mpi_comm_t *)c;
  int err, done = 0;
  for (;;) {
    if (!m->bell_posted) {
      err = MPI_Irecv(&m->bell_in, 1, MPI_UINT64_T, MPI_ANY_SOURCE,
                      SBN__BELL_TAG, m->comm, &m->bell_rx);
      if (err != MPI_SUCCESS)
        return sbn_mpi_error(err, "MPI_Irecv");
      m->bell_posted = 1;
    }
    err = MPI_Test(&m->bell_rx, &done, MPI_STATUS_IGNORE);
    if (err != MPI_SUCCESS)
      return sbn_mpi_error(err, "MPI_Test");
    if (!done)
      break;
    m->bell_posted = 0;
    if (m->bell_in > *max)
      *max = m->bell_in;
  }
  return sbn__bell_reap(m);
}

/* Polling is what moves the reduction forward: Open MPI has no progress
 * thread here, so a caller overlapping work should call this now and then.
 * The request stays allocated until iallreduce_end. */
static int sbn__mpi_itest(sbn_comm_t *c, void *request, int *done) {
  sbn__mpi_comm_t *m = (sbn__mpi_comm_t *)c;
  sbn__mpi_req_t *r = request;
  int err;
  if (r == NULL || done == NULL)
    return sbn_set_error(SBN_EINVAL, "%s: NULL",
                         r == NULL ? "request" : "done");
  /* A completed request becomes MPI_REQUEST_NULL, and MPI_Test on that
   * reports completion again, so polling after completion is harmless. */
  double t0 = sbn__mpi_now();
  if (r->peer != NULL) {
    MPI_Request q[2] = {r->req, r->rx};
    MPI_Status st[2];
    err = MPI_Testall(2, q, done, st);
    r->req = q[0];
    r->rx = q[1];
    if (err == MPI_SUCCESS && *done) {
      m->mpi_s += sbn__mpi_now() - t0;
      return sbn__pair_finish(m, r, &st[1]);
    }
  } else {
    err = MPI_Test(&r->req, done, MPI_STATUS_IGNORE);
  }
  m->mpi_s += sbn__mpi_now() - t0;
  if (err != MPI_SUCCESS)
    return sbn_mpi_error(err, "MPI_Test");
  return 0;
}

static int sbn__mpi_iend(sbn_comm_t *c, void *request) {
  sbn__mpi_req_t *r = request;
  int err;
  if (r == NULL)
    return sbn_set_error(SBN_EINVAL, "request: NULL");
  double t0 = sbn__mpi_now();
  int rc = 0;
  if (r->peer != NULL) {
    MPI_Status st[2];
    MPI_Request q[2] = {r->req, r->rx};
    err = MPI_Waitall(2, q, st);
    r->req = q[0];
    r->rx = q[1];
    if (err == MPI_SUCCESS)
      rc = sbn__pair_finish((sbn__mpi_comm_t *)c, r, &st[1]);
  } else {
    err = MPI_Wait(&r->req, MPI_STATUS_IGNORE);
  }
  ((sbn__mpi_comm_t *)c)->mpi_s += sbn__mpi_now() - t0;
  sbn__req_free((sbn__mpi_comm_t *)c, r);
  if (err != MPI_SUCCESS)
    return sbn_mpi_error(err, "MPI_Wait");
  return rc;
}

static void sbn__mpi_destroy(sbn_comm_t *c) {
  sbn__mpi_comm_t *m = (sbn__mpi_comm_t *)c;
  if (m == NULL)
    return;
  /* A collective still in flight can be neither cancelled nor freed in
   * MPI; its memory here goes, and MPI's request is left to the end of
   * the process. */
  while (m->reqs != NULL)
    sbn__req_free(m, m->reqs);
  /* The posted doorbell receive is cancelled; sends are finished (their
   * receivers keep a receive posted until they go too). */
  if (m->bell_posted) {
    MPI_Cancel(&m->bell_rx);
    MPI_Request_free(&m->bell_rx);
  }
  while (m->bells != NULL) {
    sbn__mpi_bell_t *b = m->bells;
    m->bells = b->next;
    MPI_Request_free(&b->req);
    free(b);
  }
  if (m->comm != MPI_COMM_NULL)
    MPI_Comm_free(&m->comm);
  free(m->spare);
  free(m);
  sbn__rec_release();
}

static const sbn_comm_vtable_t sbn__mpi_vt = {
    .allreduce = sbn__mpi_allreduce,
    .iallreduce_begin = sbn__mpi_ibegin,
    .iallreduce_test = sbn__mpi_itest,
    .iallreduce_end = sbn__mpi_iend,
    .destroy = sbn__mpi_destroy,
    .iallgather_begin = sbn__mpi_igather,
    .iallreduce_bor_begin = sbn__mpi_ibor,
    .bell_send = sbn__mpi_bell_send,
    .bell_poll = sbn__mpi_bell_poll,
};

MPI_Comm sbn_mpi_comm_handle(const sbn_comm_t *c) {
  if (c == NULL || c->vt != &sbn__mpi_vt)
    return MPI_COMM_NULL;
  return ((const sbn__mpi_comm_t *)c)->comm;
}

int sbn_mpi_comm_seconds(const sbn_comm_t *c, double *seconds) {
  if (seconds == NULL)
    return sbn_set_error(SBN_EINVAL, "seconds: NULL");
  if (c == NULL || c->vt != &sbn__mpi_vt)
    return sbn_set_error(
        SBN_EINVAL, "comm: %s",
        c == NULL ? "NULL" : "not made by sbn_mpi_comm_create");
  *seconds = ((const sbn__mpi_comm_t *)c)->mpi_s;
  return 0;
}

/* The fields compared across ranks at layer creation, in the order of the
 * array exchanged. Field 0 says whether the caller's arguments were usable
 * at all, so a rank with a NULL argument still joins the collective and
 * every rank fails the same way instead of some of them hanging. */
enum {
  F_OK,
  F_OP,
  F_CHANNELS,
  F_GROUPS,
  F_EPS,
  F_MOMENTUM,
  F_CUMULATIVE,
  F_AFFINE,
  F_TRACK,
  F_P,
  F_GROUP_SIZE,
  F_NORM_NDIM,
  F_GHOST_BATCH,
  F_REDUCE_CHUNK,
  F_NORM_SHAPE,
  F_COUNT = F_NORM_SHAPE + SBN_MAX_DIMS
};

static const char *const sbn__field_names[F_NORM_SHAPE + 1] = {
    "arguments",   "op",           "channels",
    "groups",      "eps",          "momentum",
    "cumulative",  "affine",       "track_running_stats",
    "p",           "group_size",   "norm_ndim",
    "ghost_batch", "reduce_chunk", "norm_shape"};

static uint64_t sbn__dbits(double v) {
  uint64_t u;
  memcpy(&u, &v, sizeof u);
  return u;
}

/* Fills the description of a layer as bit patterns: doubles compare by
 * their bits, so NaN and -0.0 are handled exactly. */
static void sbn__describe(const sbn_layer_params_t *p, int group_size,
                          uint64_t f[F_COUNT]) {
  memset(f, 0, F_COUNT * sizeof *f);
  if (p == NULL)
    return;
  f[F_OK] = 1;
  f[F_OP] = (uint64_t)p->op;
  f[F_CHANNELS] = (uint64_t)p->channels;
  f[F_GROUPS] = (uint64_t)p->groups;
  f[F_EPS] = sbn__dbits(p->eps);
  f[F_MOMENTUM] = sbn__dbits(p->momentum);
  f[F_CUMULATIVE] = (uint64_t)(p->cumulative != 0);
  f[F_AFFINE] = (uint64_t)(p->affine != 0);
  f[F_TRACK] = (uint64_t)(p->track_running_stats != 0);
  f[F_P] = sbn__dbits(p->p);
  f[F_GROUP_SIZE] = (uint64_t)group_size;
  f[F_NORM_NDIM] = (uint64_t)(int64_t)p->norm_ndim;
  f[F_GHOST_BATCH] = (uint64_t)p->ghost_batch;
  /* The chunk plan decides how many collectives a pass issues, so ranks
   * that disagreed would pair unrelated reductions. */
  f[F_REDUCE_CHUNK] = (uint64_t)p->reduce_chunk;
  if (p->op == SBN_OP_LAYERNORM)
    for (int i = 0; i < SBN_MAX_DIMS; i++)
      f[F_NORM_SHAPE + i] = (uint64_t)p->norm_shape[i];
}

/* One MPI_Allreduce with MPI_BAND over the fields and their complements:
 * the AND of the values equals the complement of the AND of the
 * complements (which is the OR of the values) exactly when every rank
 * holds the same bits. */
static int sbn__check_same(MPI_Comm comm, const uint64_t f[F_COUNT],
                           int *first_diff, int *all_ok) {
  uint64_t buf[2 * F_COUNT];
  int err;
  for (int i = 0; i < F_COUNT; i++) {
    buf[i] = f[i];
    buf[F_COUNT + i] = ~f[i];
  }
  err = MPI_Allreduce(MPI_IN_PLACE, buf, 2 * F_COUNT, MPI_UINT64_T, MPI_BAND,
                      comm);
  if (err != MPI_SUCCESS)
    return sbn_mpi_error(err, "MPI_Allreduce");
  *all_ok = buf[F_OK] != 0;
  *first_diff = -1;
  for (int i = 0; i < F_COUNT; i++) {
    if (buf[i] != ~buf[F_COUNT + i]) {
      *first_diff = i;
      break;
    }
  }
  return 0;
}

int sbn_mpi_comm_create(MPI_Comm parent, int group_size,
                        const sbn_layer_params_t *params, sbn_comm_t **out) {
  MPI_Comm world = MPI_COMM_NULL, group = MPI_COMM_NULL;
  sbn__mpi_comm_t *m = NULL;
  uint64_t f[F_COUNT];
  int rank, size, k, diff = -1, all_ok = 0, err, rc = 0, have_rec = 0;

  if (out != NULL)
    *out = NULL;
  /* Calling MPI outside its lifetime is undefined (usually an abort), so
   * this one mistake is caught before any MPI call. */
  int inited = 0, finalized = 0;
  MPI_Initialized(&inited);
  MPI_Finalized(&finalized);
  if (!inited || finalized)
    return sbn_set_error(SBN_ESTATE, "MPI: %s",
                         finalized ? "already finalized"
                                   : "not initialized (call MPI_Init first)");
  /* Work on a duplicate so that the checks run with MPI_ERRORS_RETURN
   * without touching the caller's error handler. */
  err = MPI_Comm_dup(parent, &world);
  if (err != MPI_SUCCESS)
    return sbn_mpi_error(err, "MPI_Comm_dup");
  err = MPI_Comm_set_errhandler(world, MPI_ERRORS_RETURN);
  if (err != MPI_SUCCESS) {
    rc = sbn_mpi_error(err, "MPI_Comm_set_errhandler");
    goto fail;
  }
  if ((err = MPI_Comm_rank(world, &rank)) != MPI_SUCCESS ||
      (err = MPI_Comm_size(world, &size)) != MPI_SUCCESS) {
    rc = sbn_mpi_error(err, "MPI_Comm_rank");
    goto fail;
  }
  /* k <= 0 and k >= size both mean one group of every rank; normalizing
   * first makes the two spellings compare equal. */
  k = (group_size <= 0 || group_size > size) ? size : group_size;
  sbn__describe(out != NULL ? params : NULL, k, f);
  if ((rc = sbn__check_same(world, f, &diff, &all_ok)) != 0)
    goto fail;
  if (!all_ok) {
    rc = sbn_set_error(SBN_EINVAL,
                       "params: NULL params or out on at least one rank");
    goto fail;
  }
  if (diff >= 0) {
    const char *name =
        sbn__field_names[diff < F_NORM_SHAPE ? diff : F_NORM_SHAPE];
    rc = sbn_set_error(SBN_EMISMATCH,
                       "%s: differs between ranks of the layer's "
                       "communicator",
                       name);
    goto fail;
  }

  err = MPI_Comm_split(world, rank / k, rank, &group);
  if (err != MPI_SUCCESS) {
    rc = sbn_mpi_error(err, "MPI_Comm_split");
    goto fail;
  }
  err = MPI_Comm_set_errhandler(group, MPI_ERRORS_RETURN);
  if (err != MPI_SUCCESS) {
    rc = sbn_mpi_error(err, "MPI_Comm_set_errhandler");
    goto fail;
  }
  if ((rc = sbn__rec_acquire()) != 0)
    goto fail;
  have_rec = 1;
  m = calloc(1, sizeof *m);
  if (m == NULL) {
    rc = sbn_set_error(SBN_ENOMEM, "comm: out of memory");
    goto fail;
  }
  m->base.vt = &sbn__mpi_vt;
  m->base.world_rank = rank;
  if ((err = MPI_Comm_rank(group, &m->base.rank)) != MPI_SUCCESS ||
      (err = MPI_Comm_size(group, &m->base.size)) != MPI_SUCCESS) {
    rc = sbn_mpi_error(err, "MPI_Comm_rank");
    goto fail;
  }
  m->comm = group;
  MPI_Comm_free(&world);
  *out = &m->base;
  return 0;

fail:
  free(m);
  if (have_rec)
    sbn__rec_release();
  if (group != MPI_COMM_NULL)
    MPI_Comm_free(&group);
  if (world != MPI_COMM_NULL)
    MPI_Comm_free(&world);
  return rc;
}
