/* InstanceNorm: statistics per (sample, channel) over the spatial dims.
 * That is GroupNorm with groups of one channel (G = C), so the passes are
 * GroupNorm's (ops/groupnorm.c); this row adds what is InstanceNorm's own.
 * Running statistics, when tracked, follow PyTorch's InstanceNorm: the
 * batch mean of the per-instance means and of the per-instance unbiased
 * variances, and eval then normalizes with them. It never communicates. */
#include "ops/sbn_ops.h"

static int in_validate(const sbn_layer_params_t *p) {
  return sbn__check_running_norm(p, 0);
}

static int in_sizes(const sbn_layer_params_t *p, const sbn__shape_t *sh,
                    size_t *ws, size_t *saved) {
  (void)p;
  return sbn__grouped_sizes(sh, sh->C, "N*C", ws, saved);
}

static int in_forward(sbn_layer_t *l, const sbn_forward_args_t *a,
                      const sbn__shape_t *sh) {
  sbn__grouping_t gp = {sh->C, 1};
  return sbn__grouped_forward(l, a, sh, &gp);
}

static int in_backward(sbn_layer_t *l, const sbn_backward_args_t *a,
                       const sbn__shape_t *sh) {
  sbn__grouping_t gp = {sh->C, 1};
  return sbn__grouped_backward(l, a, sh, &gp);
}

const sbn__op_t sbn__op_instancenorm = {
    .name = "instancenorm",
    .flags = SBN__NEED_AFFINE | SBN__NEED_RUNNING | SBN__NEED_BWD_X,
    .validate = in_validate,
    .shape = sbn__op_shape_channels,
    .sizes = in_sizes,
    .forward = in_forward,
    .backward = in_backward,
};
