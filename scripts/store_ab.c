/* How one core writes an output it computes from an input in cache, five
 * ways, on rotating cold copies of the output over 64 MiB: plain stores,
 * plain stores with PREFETCHW 1 KiB ahead (the kernels' SBN__PFW), streaming
 * stores, blocks of 8 KiB computed in L1 and copied out with `rep movsb`,
 * and `clzero` before each line's store (AMD only). After each write a
 * consumer reads the output back, as the next layer would, and that read
 * is timed too: a streamed output is not in cache for it. Medians of 41
 * reps per way, the ways alternating rep by rep. Not built by CMake; a
 * measurement tool (README, "Back on the AMD EPYC"):
 *
 *   gcc -O2 -mavx512f -o /tmp/store_ab scripts/store_ab.c
 *   for n in 16384 65536 131072 262144 524288; do /tmp/store_ab $n 4; done
 *
 * The first argument is the output's floats (default 200704), the second
 * how many of the five ways to time (default 5; 4 leaves out clzero, which
 * the CPU may lack and which is slow). */
#define _GNU_SOURCE
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define REPS 41

static double now_us(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static void st_plain(float *y, const float *x, size_t n) {
  __m512 a = _mm512_set1_ps(1.5f), b = _mm512_set1_ps(.5f);
  for (size_t i = 0; i < n; i += 16)
    _mm512_storeu_ps(y + i, _mm512_fmadd_ps(_mm512_loadu_ps(x + i), a, b));
}

static void st_pfw(float *y, const float *x, size_t n) {
  __m512 a = _mm512_set1_ps(1.5f), b = _mm512_set1_ps(.5f);
  for (size_t i = 0; i < n; i += 16) {
    __builtin_prefetch((const void *)((uintptr_t)(y + i) + 1024), 1, 3);
    _mm512_storeu_ps(y + i, _mm512_fmadd_ps(_mm512_loadu_ps(x + i), a, b));
  }
}

static void st_nt(float *y, const float *x, size_t n) {
  __m512 a = _mm512_set1_ps(1.5f), b = _mm512_set1_ps(.5f);
  for (size_t i = 0; i < n; i += 16)
    _mm512_stream_ps(y + i, _mm512_fmadd_ps(_mm512_loadu_ps(x + i), a, b));
  _mm_sfence();
}

static void st_rep(float *y, const float *x, size_t n) {
  __m512 a = _mm512_set1_ps(1.5f), b = _mm512_set1_ps(.5f);
  float t[2048] __attribute__((aligned(64)));
  for (size_t i = 0; i < n; i += 2048) {
    for (size_t j = 0; j < 2048; j += 16)
      _mm512_store_ps(t + j, _mm512_fmadd_ps(_mm512_loadu_ps(x + i + j), a, b));
    void *d = y + i;
    const void *s = t;
    size_t c = sizeof t;
    __asm__ volatile("rep movsb" : "+D"(d), "+S"(s), "+c"(c)::"memory");
  }
}

static void st_clzero(float *y, const float *x, size_t n) {
  __m512 a = _mm512_set1_ps(1.5f), b = _mm512_set1_ps(.5f);
  for (size_t i = 0; i < n; i += 16) {
    __asm__ volatile("clzero" ::"a"(y + i) : "memory");
    _mm512_storeu_ps(y + i, _mm512_fmadd_ps(_mm512_loadu_ps(x + i), a, b));
  }
}

static float read_back(const float *y, size_t n) {
  __m512 s = _mm512_setzero_ps();
  for (size_t i = 0; i < n; i += 16)
    s = _mm512_add_ps(s, _mm512_load_ps(y + i));
  return _mm512_reduce_add_ps(s);
}

static int cmp(const void *p, const void *q) {
  double d = *(const double *)p - *(const double *)q;
  return d < 0 ? -1 : d > 0;
}

int main(int argc, char **argv) {
  size_t n = argc > 1 ? strtoul(argv[1], NULL, 10) : 200704;
  int nf = argc > 2 ? atoi(argv[2]) : 5;
  if (n < 2048 || n % 2048 != 0 || nf < 1 || nf > 5) {
    fprintf(stderr,
            "usage: store_ab [FLOATS, a multiple of 2048] [WAYS 1..5]\n");
    return 2;
  }
  size_t copies = ((size_t)64 << 20) / (n * sizeof(float)) + 1;
  float *x = aligned_alloc(64, n * sizeof(float));
  float **ys = malloc(copies * sizeof *ys);
  if (x == NULL || ys == NULL)
    return 1;
  for (size_t i = 0; i < n; i++)
    x[i] = (float)i * 1e-3f;
  for (size_t c = 0; c < copies; c++) {
    ys[c] = aligned_alloc(64, n * sizeof(float));
    if (ys[c] == NULL)
      return 1;
    memset(ys[c], 0, n * sizeof(float));
  }
  void (*const way[])(float *, const float *, size_t) = {
      st_plain, st_pfw, st_nt, st_rep, st_clzero};
  static const char *const name[] = {"plain", "pfw", "nt", "rep", "clzero"};
  static double tw[5][REPS], tr[5][REPS];
  volatile float sink = 0;
  size_t c = 0;
  for (int r = 0; r < REPS; r++)
    for (int k = 0; k < nf; k++) {
      c = (c + 1) % copies;
      sink += read_back(x, n); /* x in cache, as a kernel's input would be */
      double t0 = now_us();
      way[k](ys[c], x, n);
      double t1 = now_us();
      sink += read_back(ys[c], n);
      tw[k][r] = t1 - t0;
      tr[k][r] = now_us() - t1;
    }
  printf("output %zu KiB, %d copies\n", n * sizeof(float) >> 10, (int)copies);
  for (int k = 0; k < nf; k++) {
    qsort(tw[k], REPS, sizeof(double), cmp);
    qsort(tr[k], REPS, sizeof(double), cmp);
    printf("%-7s write %8.1f us (%5.1f GB/s)  read back %8.1f us\n", name[k],
           tw[k][REPS / 2], (double)n * sizeof(float) / tw[k][REPS / 2] / 1e3,
           tr[k][REPS / 2]);
  }
  return sink == 12345.0f;
}
