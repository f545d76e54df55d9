/* The buffer checks of forward and backward calls. They run after the
 * shape check and the op's sizes, which the caller passes in, so that the
 * front door and the BatchNorm seam check the same things in one place. */
#include "base/sbn_base.h"

static int sbn__check_mode(sbn_mode_t mode) {
  if (mode != SBN_MODE_TRAIN && mode != SBN_MODE_EVAL)
    return sbn_set_error(SBN_EINVAL, "mode: unknown mode %d", (int)mode);
  return 0;
}

static int sbn__check_ws(const void *ws, size_t have, size_t need) {
  if (need > 0 && ws == NULL)
    return sbn_set_error(SBN_EINVAL, "workspace: NULL, %zu bytes needed", need);
  if (have < need)
    return sbn_set_error(SBN_ENOSPACE, "workspace_bytes: %zu < %zu needed",
                         have, need);
  return 0;
}

int sbn__check_fwd_args(const sbn_layer_params_t *p,
                        const sbn_forward_args_t *a, const sbn__shape_t *sh,
                        const sbn__need_t *need) {
  int rc;
  if ((rc = sbn__check_mode(a->mode)) != 0)
    return rc;
  if (sh->numel > 0 && (a->x == NULL || a->y == NULL))
    return sbn_set_error(SBN_EINVAL, "%s: NULL", a->x == NULL ? "x" : "y");
  if ((rc = sbn__check_ws(a->workspace, a->workspace_bytes, need->workspace)) !=
      0)
    return rc;
  if (a->saved != NULL && a->saved_bytes < need->saved)
    return sbn_set_error(SBN_ENOSPACE, "saved_bytes: %zu < %zu needed",
                         a->saved_bytes, need->saved);
  if ((need->flags & SBN__NEED_AFFINE) && p->affine &&
      (a->weight == NULL || a->bias == NULL))
    return sbn_set_error(SBN_EINVAL, "%s: NULL for an affine layer",
                         a->weight == NULL ? "weight" : "bias");
  if ((need->flags & SBN__NEED_RUNNING) && p->track_running_stats &&
      (a->state == NULL || a->state->running_mean == NULL ||
       a->state->running_var == NULL))
    return sbn_set_error(SBN_EINVAL,
                         "state: running_mean and running_var are needed "
                         "when running statistics are tracked");
  return 0;
}

int sbn__check_bwd_args(const sbn_layer_params_t *p,
                        const sbn_backward_args_t *a, const sbn__shape_t *sh,
                        const sbn__need_t *need) {
  int rc;
  if ((rc = sbn__check_mode(a->mode)) != 0)
    return rc;
  if (sh->numel > 0 && (a->dy == NULL || a->dx == NULL ||
                        (a->x == NULL && (need->flags & SBN__NEED_BWD_X))))
    return sbn_set_error(SBN_EINVAL, "%s: NULL",
                         a->dy == NULL   ? "dy"
                         : a->dx == NULL ? "dx"
                                         : "x");
  if ((rc = sbn__check_ws(a->workspace, a->workspace_bytes, need->workspace)) !=
      0)
    return rc;
  if ((need->flags & SBN__NEED_AFFINE) && p->affine && a->weight == NULL)
    return sbn_set_error(SBN_EINVAL, "weight: NULL for an affine layer");
  return 0;
}
