/* Dropout with counter-based randomness: the mask is a pure function of
 * (seed, rank, layer id, step, element index), so backward regenerates it
 * instead of storing it, the result does not depend on how the work is
 * split between threads, and ranks draw independent masks.
 *
 * p is the probability of zeroing an element (PyTorch's convention; the
 * design note writes P(r = 1) = p for keeping, the opposite way round).
 * Kept elements are scaled by 1/(1-p) so the expectation is unchanged. */
#include <string.h>

#include "ops/sbn_ops.h"

static int dropout_validate(const sbn_layer_params_t *p) {
  if (!(p->p >= 0 && p->p <= 1))
    return sbn_set_error(SBN_EINVAL, "p: %g is outside [0, 1]", p->p);
  return 0;
}

/* Dropout takes a plain array of any rank and shape. */
static int dropout_shape(const sbn_layer_params_t *p,
                         const sbn_tensor_desc_t *d, sbn__shape_t *sh) {
  (void)p;
  return sbn__shape_plain("dropout", d, sh);
}

/* Maps in -> out, scaling kept values: the identity in eval or with
 * p = 0, else the mask of (layer, step). Forward (x -> y) and backward
 * (dy -> dx) are the same map, since the mask is regenerated. */
static int dropout_map(const sbn_layer_t *l, sbn_mode_t mode, uint64_t step,
                       const float *in, float *out, size_t n) {
  const sbn_layer_params_t *p = &l->p;
  if (mode == SBN_MODE_EVAL || p->p == 0) {
    if (out != in && n > 0)
      memmove(out, in, n * sizeof(float));
    return 0;
  }
  if (p->p >= 1) {
    /* Every word is below p * 2^32 = 2^32: all dropped, and no 1/(1-p). */
    memset(out, 0, n * sizeof(float));
    return 0;
  }
  uint32_t thr = (uint32_t)(p->p * 4294967296.0);
  float scale = (float)(1.0 / (1.0 - p->p));
  uint32_t key[2] = {p->seed,
                     (uint32_t)(l->comm != NULL ? l->comm->world_rank : 0)};
  sbn__kt()->dropout(in, out, n, 0, key, (uint32_t)step, p->layer_id, thr,
                     scale);
  return 0;
}

static int dropout_forward(sbn_layer_t *l, const sbn_forward_args_t *a,
                           const sbn__shape_t *sh) {
  return dropout_map(l, a->mode, a->step, a->x, a->y, sh->numel);
}

static int dropout_backward(sbn_layer_t *l, const sbn_backward_args_t *a,
                            const sbn__shape_t *sh) {
  return dropout_map(l, a->mode, a->step, a->dy, a->dx, sh->numel);
}

/* No sizes: the mask is regenerated, so dropout needs neither workspace
 * nor saved state. */
const sbn__op_t sbn__op_dropout = {
    .name = "dropout",
    .flags = 0,
    .validate = dropout_validate,
    .shape = dropout_shape,
    .forward = dropout_forward,
    .backward = dropout_backward,
};
