/* Fused and non-blocking SyncBN over the communicator interface.
 *
 * A fused step is the BatchNorm seam applied to many layers at once: every
 * reduced layer's local records go into one buffer, the buffer is reduced
 * once, and each layer finishes from its slice. The buffer ends with a
 * status record (a plain sum of "this process failed" flags), so that an
 * error on one process before the reduction becomes an error on every
 * process after it, in the same single collective. */
#include <string.h>

#include "syncbn_fused.h"

static int comm_size(const sbn_comm_t *c) {
  return c == NULL ? 1 : c->size;
}

static sbn_mode_t arg_mode(const sbn_fused_req_t *r, size_t i) {
  return r->fargs != NULL ? r->fargs[i].mode : r->bargs[i].mode;
}

/* Whether layer i puts records into the fused buffer. */
static int reduced(const sbn_layer_t *l, sbn_mode_t mode) {
  return sbn_layer_params(l)->op == SBN_OP_BATCHNORM &&
         sbn_bn_needs_reduce(l, mode) != 0;
}

/* Counts the records for the layers of r (whose layers and args are set). */
static int count_records(const sbn_fused_req_t *r, size_t *count) {
  size_t total = 1;
  if (r->nlayers > 0 && r->layers == NULL)
    return sbn_set_error(SBN_EINVAL, "layers: NULL");
  if (r->nlayers > 0 && r->fargs == NULL && r->bargs == NULL)
    return sbn_set_error(SBN_EINVAL, "args: NULL");
  for (size_t i = 0; i < r->nlayers; i++) {
    const sbn_layer_t *l = r->layers[i];
    if (l == NULL)
      return sbn_set_error(SBN_EINVAL, "layers[%zu]: NULL", i);
    if (!reduced(l, arg_mode(r, i)))
      continue;
    size_t C = sbn_layer_params(l)->channels;
    if (C > SIZE_MAX - total)
      return sbn_set_error(SBN_EOVERFLOW,
                           "layers: the record count overflows size_t");
    total += C;
  }
  *count = total;
  return 0;
}

/* Fills the buffer with every reduced layer's local records. After the
 * first failure the remaining slices get the combination's identity
 * (count 0, or zero sums) so that the reduction stays well formed; the
 * status record says whether this process failed. */
static int gather_local(sbn_fused_req_t *r) {
  int rc = 0;
  size_t off = 0;
  int fwd = r->fargs != NULL;
  int size = comm_size(r->comm);
  for (size_t i = 0; i < r->nlayers; i++) {
    sbn_layer_t *l = r->layers[i];
    if (!reduced(l, arg_mode(r, i)))
      continue;
    size_t C = sbn_layer_params(l)->channels;
    sbn_rec_t *recs = r->recs + off;
    if (rc == 0 && comm_size(sbn_layer_comm(l)) != size)
      rc = sbn_set_error(SBN_EINVAL,
                         "layers[%zu]: its communicator has %d processes, "
                         "the fused reduction's has %d",
                         i, comm_size(sbn_layer_comm(l)), size);
    if (rc == 0)
      rc = fwd ? sbn_bn_forward_local(l, &r->fargs[i], recs)
               : sbn_bn_backward_local(l, &r->bargs[i], recs);
    if (rc != 0) {
      for (size_t c = 0; c < C; c++) {
        recs[c].tag = fwd ? SBN_REC_MOMENTS : SBN_REC_SUM;
        recs[c].v[0] = recs[c].v[1] = recs[c].v[2] = 0;
      }
    }
    off += C;
  }
  sbn_rec_t *st = &r->recs[r->nrecs - 1];
  st->tag = SBN_REC_SUM;
  st->v[0] = rc != 0 ? 1.0 : 0.0;
  st->v[1] = st->v[2] = 0;
  return rc;
}

/* Runs every layer's second half once the records are reduced. */
static int finish_all(sbn_fused_req_t *r) {
  size_t off = 0;
  int rc;
  int fwd = r->fargs != NULL;
  double failed = r->recs[r->nrecs - 1].v[0];
  if (r->rc != 0)
    return r->rc;
  /* This process's own error still has its message from the local step. */
  if (r->local_rc != 0)
    return r->local_rc;
  if (failed > 0)
    return sbn_set_error(SBN_ECOMM,
                         "recs: %.0f process(es) of the fused reduction "
                         "failed before it (see their errors)",
                         failed);
  for (size_t i = 0; i < r->nlayers; i++) {
    sbn_layer_t *l = r->layers[i];
    if (reduced(l, arg_mode(r, i))) {
      const sbn_rec_t *recs = r->recs + off;
      off += sbn_layer_params(l)->channels;
      rc = fwd ? sbn_bn_forward_finish(l, &r->fargs[i], recs)
               : sbn_bn_backward_finish(l, &r->bargs[i], recs);
    } else {
      rc = fwd ? sbn_forward(l, &r->fargs[i]) : sbn_backward(l, &r->bargs[i]);
    }
    if (rc != 0)
      return rc;
  }
  return 0;
}

static int init_req(sbn_fused_req_t *r, sbn_comm_t *comm, size_t nlayers,
                    sbn_layer_t *const *layers, const sbn_forward_args_t *fargs,
                    const sbn_backward_args_t *bargs, sbn_rec_t *recs_ws,
                    size_t recs_ws_count) {
  size_t need;
  int rc;
  memset(r, 0, sizeof *r);
  r->comm = comm;
  r->nlayers = nlayers;
  r->layers = layers;
  r->fargs = fargs;
  r->bargs = bargs;
  if (fargs == NULL && bargs == NULL)
    return sbn_set_error(SBN_EINVAL, "args: NULL");
  if ((rc = count_records(r, &need)) != 0)
    return rc;
  if (recs_ws == NULL)
    return sbn_set_error(SBN_EINVAL, "recs_ws: NULL, %zu records needed", need);
  if (recs_ws_count < need)
    return sbn_set_error(SBN_ENOSPACE, "recs_ws_count: %zu < %zu needed",
                         recs_ws_count, need);
  if (comm != NULL && (comm->vt == NULL || comm->vt->allreduce == NULL))
    return sbn_set_error(SBN_EINVAL, "comm: vtable lacks allreduce");
  r->recs = recs_ws;
  r->nrecs = need;
  return 0;
}

/* Common begin: local half, then start the reduction, non-blocking when
 * asked for and the communicator supports it. */
static int fused_begin(sbn_fused_req_t *r, sbn_comm_t *comm, size_t nlayers,
                       sbn_layer_t *const *layers,
                       const sbn_forward_args_t *fargs,
                       const sbn_backward_args_t *bargs, sbn_rec_t *recs_ws,
                       size_t recs_ws_count, int nonblocking) {
  int rc;
  if (r == NULL)
    return sbn_set_error(SBN_EINVAL, "req: NULL");
  if ((rc = init_req(r, comm, nlayers, layers, fargs, bargs, recs_ws,
                     recs_ws_count)) != 0)
    return rc;
  r->local_rc = gather_local(r);
  if (comm_size(comm) > 1) {
    const sbn_comm_vtable_t *vt = comm->vt;
    if (nonblocking && vt->iallreduce_begin != NULL &&
        vt->iallreduce_test != NULL && vt->iallreduce_end != NULL)
      rc = vt->iallreduce_begin(comm, r->recs, r->nrecs, &r->handle);
    else
      rc = vt->allreduce(comm, r->recs, r->nrecs);
    if (rc != 0) {
      r->handle = NULL;
      return rc;
    }
  }
  r->phase = 1;
  return 0;
}

static int fused_test(sbn_fused_req_t *r, int fwd, int *done) {
  int rc;
  if (r == NULL || done == NULL)
    return sbn_set_error(SBN_EINVAL, "%s: NULL", r == NULL ? "req" : "done");
  if (r->phase != 1 || (r->fargs != NULL) != fwd)
    return sbn_set_error(SBN_ESTATE, "req: no %s step in flight",
                         fwd ? "forward" : "backward");
  *done = 1;
  if (r->handle == NULL || r->rc != 0)
    return r->rc;
  rc = r->comm->vt->iallreduce_test(r->comm, r->handle, done);
  if (rc != 0)
    r->rc = rc;
  return rc;
}

static int fused_end(sbn_fused_req_t *r, int fwd) {
  int rc;
  if (r == NULL)
    return sbn_set_error(SBN_EINVAL, "req: NULL");
  if (r->phase != 1 || (r->fargs != NULL) != fwd)
    return sbn_set_error(SBN_ESTATE, "req: no %s step in flight",
                         fwd ? "forward" : "backward");
  if (r->handle != NULL) {
    rc = r->comm->vt->iallreduce_end(r->comm, r->handle);
    r->handle = NULL;
    if (rc != 0 && r->rc == 0)
      r->rc = rc;
  }
  r->phase = 0;
  return finish_all(r);
}

int sbn_fused_forward_records(size_t nlayers, sbn_layer_t *const *layers,
                              const sbn_forward_args_t *args, size_t *count) {
  sbn_fused_req_t r;
  if (count == NULL)
    return sbn_set_error(SBN_EINVAL, "count: NULL");
  memset(&r, 0, sizeof r);
  r.nlayers = nlayers;
  r.layers = layers;
  r.fargs = args;
  return count_records(&r, count);
}

int sbn_fused_backward_records(size_t nlayers, sbn_layer_t *const *layers,
                               const sbn_backward_args_t *args, size_t *count) {
  sbn_fused_req_t r;
  if (count == NULL)
    return sbn_set_error(SBN_EINVAL, "count: NULL");
  memset(&r, 0, sizeof r);
  r.nlayers = nlayers;
  r.layers = layers;
  r.bargs = args;
  return count_records(&r, count);
}

int sbn_bn_forward_fused(sbn_comm_t *comm, size_t nlayers,
                         sbn_layer_t *const *layers,
                         const sbn_forward_args_t *args, sbn_rec_t *recs_ws,
                         size_t recs_ws_count) {
  sbn_fused_req_t r;
  int rc;
  if (args == NULL)
    return sbn_set_error(SBN_EINVAL, "args: NULL");
  if ((rc = fused_begin(&r, comm, nlayers, layers, args, NULL, recs_ws,
                        recs_ws_count, 0)) != 0)
    return rc;
  return fused_end(&r, 1);
}

int sbn_bn_backward_fused(sbn_comm_t *comm, size_t nlayers,
                          sbn_layer_t *const *layers,
                          const sbn_backward_args_t *args, sbn_rec_t *recs_ws,
                          size_t recs_ws_count) {
  sbn_fused_req_t r;
  int rc;
  if (args == NULL)
    return sbn_set_error(SBN_EINVAL, "args: NULL");
  if ((rc = fused_begin(&r, comm, nlayers, layers, NULL, args, recs_ws,
                        recs_ws_count, 0)) != 0)
    return rc;
  return fused_end(&r, 0);
}

int sbn_bn_forward_begin(sbn_fused_req_t *req, sbn_comm_t *comm, size_t nlayers,
                         sbn_layer_t *const *layers,
                         const sbn_forward_args_t *args, sbn_rec_t *recs_ws,
                         size_t recs_ws_count) {
  if (args == NULL)
    return sbn_set_error(SBN_EINVAL, "args: NULL");
  return fused_begin(req, comm, nlayers, layers, args, NULL, recs_ws,
                     recs_ws_count, 1);
}

int sbn_bn_forward_test(sbn_fused_req_t *req, int *done) {
  return fused_test(req, 1, done);
}

int sbn_bn_forward_end(sbn_fused_req_t *req) {
  return fused_end(req, 1);
}

int sbn_bn_backward_begin(sbn_fused_req_t *req, sbn_comm_t *comm,
                          size_t nlayers, sbn_layer_t *const *layers,
                          const sbn_backward_args_t *args, sbn_rec_t *recs_ws,
                          size_t recs_ws_count) {
  if (args == NULL)
    return sbn_set_error(SBN_EINVAL, "args: NULL");
  return fused_begin(req, comm, nlayers, layers, NULL, args, recs_ws,
                     recs_ws_count, 1);
}

int sbn_bn_backward_test(sbn_fused_req_t *req, int *done) {
  return fused_test(req, 0, done);
}

int sbn_bn_backward_end(sbn_fused_req_t *req) {
  return fused_end(req, 0);
}
