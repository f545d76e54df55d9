/* The op table and the parameter checks that several op rows share. */
#include <float.h>
#include <math.h>
#include <string.h>

#include "ops/sbn_ops.h"

/* Indexed by sbn_op_t. Designated initializers keep each row at its enum
 * value whatever order the enum is written in. */
const sbn__op_t *const sbn__ops[SBN_OP_COUNT] = {
    [SBN_OP_BATCHNORM] = &sbn__op_batchnorm,
    [SBN_OP_LAYERNORM] = &sbn__op_layernorm,
    [SBN_OP_INSTANCENORM] = &sbn__op_instancenorm,
    [SBN_OP_GROUPNORM] = &sbn__op_groupnorm,
    [SBN_OP_DROPOUT] = &sbn__op_dropout,
};

const sbn__op_t *sbn__op(sbn_op_t op) {
  /* The unsigned comparison also rejects negative values, which an enum
   * read from a file or a message may hold. */
  if ((unsigned)op >= SBN_OP_COUNT)
    return NULL;
  return sbn__ops[op];
}

int sbn__check_eps(const sbn_layer_params_t *p) {
  if (!(p->eps > 0) || isinf(p->eps))
    return sbn_set_error(SBN_EINVAL, "eps: %g must be positive and finite",
                         p->eps);
  /* Below the smallest normal float, 1 / sqrt(var + eps) of a (near)
   * constant input overflows float32 to inf, which would come out as
   * silent infinities and NaNs in y. */
  if (p->eps < FLT_MIN)
    return sbn_set_error(SBN_EINVAL,
                         "eps: %g is below the smallest normal float %g, "
                         "where 1/sqrt(var + eps) overflows float32",
                         p->eps, (double)FLT_MIN);
  return 0;
}

int sbn__check_momentum(const sbn_layer_params_t *p, int allow_cumulative) {
  if (!(p->momentum >= 0 && p->momentum <= 1))
    return sbn_set_error(SBN_EINVAL, "momentum: %g is outside [0, 1]",
                         p->momentum);
  if (p->cumulative && !allow_cumulative)
    return sbn_set_error(SBN_EINVAL,
                         "cumulative: only BatchNorm keeps a cumulative "
                         "average");
  return 0;
}

int sbn__check_channels(const sbn_layer_params_t *p) {
  if (p->channels == 0)
    return sbn_set_error(SBN_EINVAL, "channels: must be positive");
  return 0;
}

int sbn__check_running_norm(const sbn_layer_params_t *p, int allow_cumulative) {
  int rc;
  if ((rc = sbn__check_eps(p)) != 0 ||
      (rc = sbn__check_momentum(p, allow_cumulative)) != 0)
    return rc;
  return sbn__check_channels(p);
}

int sbn__op_shape_channels(const sbn_layer_params_t *p,
                           const sbn_tensor_desc_t *d, sbn__shape_t *sh) {
  const sbn__op_t *op = sbn__op(p->op);
  return sbn__shape_channels(op != NULL ? op->name : "?", p->channels, d, sh);
}

int sbn__op_need(const sbn_layer_t *l, const sbn_tensor_desc_t *x,
                 sbn__shape_t *sh, sbn__need_t *need) {
  /* A layer holds validated parameters, so its row always exists. */
  const sbn__op_t *row = sbn__ops[l->p.op];
  int rc;
  memset(need, 0, sizeof *need);
  need->flags = row->flags;
  if ((rc = row->shape(&l->p, x, sh)) != 0)
    return rc;
  if (row->sizes == NULL)
    return 0;
  return row->sizes(&l->p, sh, &need->workspace, &need->saved);
}
