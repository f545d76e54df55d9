/* Dropout with counter-based randomness: the mask is a pure function of
 * (seed, rank, layer id, step, element index), so backward regenerates it
 * instead of storing it, the result does not depend on how the work is
 * split between threads, and ranks draw independent masks.
 *
 * p is the probability of zeroing an element (PyTorch's convention; the
 * design note writes P(r = 1) = p for keeping, the opposite way round).
 * Kept elements are scaled by 1/(1-p) so the expectation is unchanged. */
#include <string.h>

#include "internal.h"

#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u

void sbn_philox4x32_10(const uint32_t ctr[4], const uint32_t key[2],
                       uint32_t out[4]) {
  uint32_t c0 = ctr[0], c1 = ctr[1], c2 = ctr[2], c3 = ctr[3];
  uint32_t k0 = key[0], k1 = key[1];
  for (int r = 0; r < 10; r++) {
    uint64_t p0 = (uint64_t)PHILOX_M0 * c0;
    uint64_t p1 = (uint64_t)PHILOX_M1 * c2;
    uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0;
    uint32_t n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1;
    c0 = n0;
    c1 = (uint32_t)p1;
    c2 = n2;
    c3 = (uint32_t)p0;
    k0 += PHILOX_W0;
    k1 += PHILOX_W1;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

/* The reference dropout kernel: one Philox block per 4 elements. */
void sbn__dropout_ref(const float *in, float *out, size_t n, uint64_t first,
                      const uint32_t key[2], uint32_t step, uint32_t layer,
                      uint32_t thr, float scale) {
  uint32_t ctr[4] = {0, 0, step, layer}, r[4];
  for (size_t i = 0; i < n; i += 4) {
    uint64_t block = (first + i) / 4;
    ctr[0] = (uint32_t)block;
    ctr[1] = (uint32_t)(block >> 32);
    sbn_philox4x32_10(ctr, key, r);
    size_t m = n - i < 4 ? n - i : 4;
    for (size_t j = 0; j < m; j++)
      out[i + j] = r[j] < thr ? 0.0f : in[i + j] * scale;
  }
}

/* Applies the mask of (layer, step) to in -> out, scaling kept values.
 * The same function serves forward (x -> y) and backward (dy -> dx). */
static void dropout_apply(const sbn_layer_t *l, uint64_t step, const float *in,
                          float *out, size_t n) {
  const sbn_layer_params_t *p = &l->p;
  if (p->p >= 1) {
    /* Every word is below p * 2^32 = 2^32: all dropped, and no 1/(1-p). */
    memset(out, 0, n * sizeof(float));
    return;
  }
  uint32_t thr = (uint32_t)(p->p * 4294967296.0);
  float scale = (float)(1.0 / (1.0 - p->p));
  uint32_t key[2] = {p->seed,
                     (uint32_t)(l->comm != NULL ? l->comm->world_rank : 0)};
  sbn__kernels()->dropout(in, out, n, 0, key, (uint32_t)step, p->layer_id, thr,
                          scale);
}

int sbn__dropout_forward(sbn_layer_t *l, const sbn_forward_args_t *a,
                         const sbn__shape_t *sh) {
  if (a->mode == SBN_MODE_EVAL || l->p.p == 0) {
    if (a->y != a->x && sh->numel > 0)
      memmove(a->y, a->x, sh->numel * sizeof(float));
    return 0;
  }
  dropout_apply(l, a->step, a->x, a->y, sh->numel);
  return 0;
}

int sbn__dropout_backward(sbn_layer_t *l, const sbn_backward_args_t *a,
                          const sbn__shape_t *sh) {
  if (a->mode == SBN_MODE_EVAL || l->p.p == 0) {
    if (a->dx != a->dy && sh->numel > 0)
      memmove(a->dx, a->dy, sh->numel * sizeof(float));
    return 0;
  }
  dropout_apply(l, a->step, a->dy, a->dx, sh->numel);
  return 0;
}
