/* Philox4x32-10, the counter-based generator behind dropout, and the
 * reference dropout kernel built on it. It sits with the kernels because
 * every kernel set must draw the very same words: the optimized sets
 * vectorize the same rounds and hand their tails to sbn__dropout_ref. */
#include "kernels/sbn_kernels.h"

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
