/* Randomness, SGD and the one-cycle schedule of `syncbn train`. */
#include <math.h>

#include "nn/sbn_nn.h"

uint64_t sbn_nn_rand64(uint64_t *state) {
  uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

void sbn_nn_uniform(float *x, size_t n, float bound, uint64_t *state) {
  for (size_t i = 0; i < n; i++) {
    /* 24 random bits give every float in [0, 1) a multiple of 2^-24. */
    float u = (float)(sbn_nn_rand64(state) >> 40) * (1.0f / 16777216.0f);
    x[i] = (2.0f * u - 1.0f) * bound;
  }
}

/* An unbiased draw below n (Lemire's multiply and reject). */
static uint64_t below(uint64_t *state, uint64_t n) {
  uint64_t threshold = (0 - n) % n;
  for (;;) {
    uint64_t r = sbn_nn_rand64(state);
    __uint128_t m = (__uint128_t)r * n;
    if ((uint64_t)m >= threshold)
      return (uint64_t)(m >> 64);
  }
}

void sbn_nn_permutation(uint32_t *perm, size_t n, uint64_t seed,
                        uint64_t epoch) {
  uint64_t state = seed ^ (0x5851f42d4c957f2dull * (epoch + 1));
  for (size_t i = 0; i < n; i++)
    perm[i] = (uint32_t)i;
  for (size_t i = n; i > 1; i--) {
    size_t j = (size_t)below(&state, i);
    uint32_t t = perm[i - 1];
    perm[i - 1] = perm[j];
    perm[j] = t;
  }
}

/* PyTorch's _annealing_cos: from start at pct 0 to end at pct 1. */
static double anneal_cos(double start, double end, double pct) {
  return end + (start - end) / 2.0 * (cos(M_PI * pct) + 1.0);
}

double sbn_onecycle_lr(const sbn_onecycle_t *s, uint64_t step) {
  double initial = s->max_lr / s->div_factor;
  double min_lr = initial / s->final_div_factor;
  /* The phase ends as torch.optim.lr_scheduler.OneCycleLR computes them. */
  double up_end = s->pct_start * (double)s->total_steps - 1.0;
  double down_end = (double)s->total_steps - 1.0;
  double t = (double)step;
  if (t <= up_end || down_end <= up_end)
    return anneal_cos(initial, s->max_lr, up_end > 0 ? t / up_end : 1.0);
  return anneal_cos(s->max_lr, min_lr, (t - up_end) / (down_end - up_end));
}

void sbn_nn_sgd(size_t n, float *p, float *buf, const float *g, float lr,
                float momentum, float wd) {
  for (size_t i = 0; i < n; i++) {
    float d = g[i] + wd * p[i];
    buf[i] = momentum * buf[i] + d;
    p[i] -= lr * buf[i];
  }
}
