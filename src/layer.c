/* The front door of the kernel library: layer creation, and forward and
 * backward for any op. Everything per op is in the op's row (ops/sbn_ops.h),
 * so this file checks what all ops share and calls through the table. */
#include <stdlib.h>
#include <string.h>

#include "base/sbn_base.h"
#include "ops/sbn_ops.h"

const char *sbn_op_name(sbn_op_t op) {
  const sbn__op_t *row = sbn__op(op);
  return row != NULL ? row->name : NULL;
}

int sbn_op_parse(const char *name, sbn_op_t *op) {
  if (name == NULL || op == NULL)
    return sbn_set_error(SBN_EINVAL, "op: NULL");
  for (int i = 0; i < SBN_OP_COUNT; i++) {
    if (strcmp(name, sbn__ops[i]->name) == 0) {
      *op = (sbn_op_t)i;
      return 0;
    }
  }
  return sbn_set_error(SBN_EINVAL, "op: unknown op '%s'", name);
}

void sbn_layer_params_default(sbn_layer_params_t *p, sbn_op_t op) {
  const sbn__op_t *row = sbn__op(op);
  memset(p, 0, sizeof *p);
  p->op = op;
  p->eps = 1e-5;
  p->momentum = 0.1;
  p->affine = 1;
  p->p = 0.5;
  p->groups = 1;
  /* track_running_stats stays 0 but where the op's row says otherwise
   * (BatchNorm), as in PyTorch. */
  if (row != NULL && row->defaults != NULL)
    row->defaults(p);
}

int sbn_layer_create(const sbn_layer_params_t *params, sbn_comm_t *comm,
                     sbn_layer_t **out) {
  const sbn__op_t *row;
  sbn_layer_t *l = NULL;
  int rc;
  if (out == NULL)
    return sbn_set_error(SBN_EINVAL, "out: NULL");
  *out = NULL;
  if (params == NULL)
    return sbn_set_error(SBN_EINVAL, "params: NULL");
  if ((row = sbn__op(params->op)) == NULL)
    return sbn_set_error(SBN_EINVAL, "params.op: unknown op %d",
                         (int)params->op);
  if (params->ghost_batch != 0 && !(row->flags & SBN__CAN_GHOST))
    return sbn_set_error(SBN_EINVAL,
                         "ghost_batch: %zu, but %s has no ghost batches "
                         "(only batchnorm has; 0 turns them off)",
                         params->ghost_batch, row->name);
  if (row->validate != NULL && (rc = row->validate(params)) != 0)
    return rc;
  if (comm != NULL && (comm->vt == NULL || comm->vt->allreduce == NULL))
    return sbn_set_error(SBN_EINVAL, "comm: vtable lacks allreduce");
  l = calloc(1, sizeof *l);
  if (l == NULL)
    return sbn_set_error(SBN_ENOMEM, "layer: out of memory");
  l->p = *params;
  l->comm = comm;
  *out = l;
  return 0;
}

void sbn_layer_destroy(sbn_layer_t *layer) {
  free(layer);
}

const sbn_layer_params_t *sbn_layer_params(const sbn_layer_t *layer) {
  return &layer->p;
}

sbn_comm_t *sbn_layer_comm(const sbn_layer_t *layer) {
  return layer->comm;
}

int sbn_layer_sizes(const sbn_layer_t *l, const sbn_tensor_desc_t *x,
                    size_t *workspace_bytes, size_t *saved_bytes) {
  sbn__shape_t sh;
  sbn__need_t need;
  int rc;
  if (l == NULL)
    return sbn_set_error(SBN_EINVAL, "layer: NULL");
  if ((rc = sbn__op_need(l, x, &sh, &need)) != 0)
    return rc;
  if (workspace_bytes)
    *workspace_bytes = need.workspace;
  if (saved_bytes)
    *saved_bytes = need.saved;
  return 0;
}

/* The prologue forward and backward share: non-NULL handles, then the
 * shape and the sizes of x, which the direction's buffer checks use. */
static int sbn__enter(const sbn_layer_t *l, const void *args,
                      const sbn_tensor_desc_t *x, sbn__shape_t *sh,
                      sbn__need_t *need) {
  if (l == NULL || args == NULL)
    return sbn_set_error(SBN_EINVAL, "%s: NULL", l == NULL ? "layer" : "args");
  return sbn__op_need(l, x, sh, need);
}

int sbn_forward(sbn_layer_t *l, const sbn_forward_args_t *a) {
  sbn__shape_t sh;
  sbn__need_t need;
  int rc = sbn__enter(l, a, a != NULL ? a->x_desc : NULL, &sh, &need);
  if (rc == 0)
    rc = sbn__check_fwd_args(&l->p, a, &sh, &need);
  return rc != 0 ? rc : sbn__ops[l->p.op]->forward(l, a, &sh);
}

int sbn_backward(sbn_layer_t *l, const sbn_backward_args_t *a) {
  sbn__shape_t sh;
  sbn__need_t need;
  int rc = sbn__enter(l, a, a != NULL ? a->x_desc : NULL, &sh, &need);
  if (rc == 0)
    rc = sbn__check_bwd_args(&l->p, a, &sh, &need);
  return rc != 0 ? rc : sbn__ops[l->p.op]->backward(l, a, &sh);
}
