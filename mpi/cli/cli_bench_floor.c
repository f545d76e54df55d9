/* The floor kernels of `syncbn bench kernels`: the plainest code that moves
 * a pass's compulsory bytes, in two forms.
 *
 * - The floor (floor_us): a memcpy of the tensor (glibc's, as the issue
 *   defines it), or dx = x + dy in whole vectors with ordinary stores.
 *   Both store through the cache, so each written line is first read
 *   (12 bytes of traffic per element copied, 16 per element of x + dy).
 * - The streaming floor (stream_floor_us): the same with non-temporal
 *   stores, which write a line without reading it. On the development
 *   machine it took 0.6 to 0.75 of the floor's time from 0.8 to 51 MB:
 *   the nearest thing here to what the memory system allows, and what
 *   syncbn's own kernels do for outputs past their streaming thresholds.
 *
 * The vector forms are AVX-512 where the CPU has it (chosen at run time,
 * as the library's kernel sets are) and SSE2 otherwise; other processors
 * get the scalar loop for both. */
#include <stdint.h>
#include <string.h>

#include "cli_bench.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

/* One body per (vector width, b present (hb), streaming (nt)): the flags
 * are constants at each call, so each instance is a loop without
 * branches. */
#define FLOOR_BODY(VT, W, LD, ADD, ST, NTST, ALIGN)                 \
  size_t i = 0;                                                     \
  if (nt) /* scalar head up to the output's first aligned vector */ \
    for (; i < n && ((uintptr_t)(c + i) & (ALIGN - 1)) != 0; i++)   \
      c[i] = hb ? a[i] + b[i] : a[i];                               \
  for (; i + W <= n; i += W) {                                      \
    VT v = hb ? ADD(LD(a + i), LD(b + i)) : LD(a + i);              \
    if (nt)                                                         \
      NTST(c + i, v);                                               \
    else                                                            \
      ST(c + i, v);                                                 \
  }                                                                 \
  for (; i < n; i++)                                                \
    c[i] = hb ? a[i] + b[i] : a[i];                                 \
  if (nt)                                                           \
    _mm_sfence();

static inline __attribute__((always_inline, target("avx512f"))) void
floor_avx512(const float *a, const float *b, float *c, size_t n, int hb,
             int nt) {
  FLOOR_BODY(__m512, 16, _mm512_loadu_ps, _mm512_add_ps, _mm512_storeu_ps,
             _mm512_stream_ps, 64)
}

static inline __attribute__((always_inline)) void floor_sse2(const float *a,
                                                             const float *b,
                                                             float *c, size_t n,
                                                             int hb, int nt) {
  FLOOR_BODY(__m128, 4, _mm_loadu_ps, _mm_add_ps, _mm_storeu_ps, _mm_stream_ps,
             16)
}

__attribute__((target("avx512f"))) static void f512_add(const float *a,
                                                        const float *b,
                                                        float *c, size_t n) {
  floor_avx512(a, b, c, n, 1, 0);
}
__attribute__((target("avx512f"))) static void f512_add_nt(const float *a,
                                                           const float *b,
                                                           float *c, size_t n) {
  floor_avx512(a, b, c, n, 1, 1);
}
__attribute__((target("avx512f"))) static void f512_copy_nt(const float *a,
                                                            const float *b,
                                                            float *c,
                                                            size_t n) {
  floor_avx512(a, b, c, n, 0, 1);
}
static void f128_add(const float *a, const float *b, float *c, size_t n) {
  floor_sse2(a, b, c, n, 1, 0);
}
static void f128_add_nt(const float *a, const float *b, float *c, size_t n) {
  floor_sse2(a, b, c, n, 1, 1);
}
static void f128_copy_nt(const float *a, const float *b, float *c, size_t n) {
  floor_sse2(a, b, c, n, 0, 1);
}

typedef void (*floor_fn)(const float *, const float *, float *, size_t);

void sbn__bench_floor(const float *a, const float *b, float *c, size_t n,
                      int stream) {
  static int wide = -1;
  if (wide < 0)
    wide = __builtin_cpu_supports("avx512f") ? 1 : 0;
  if (b == NULL && !stream) {
    memcpy(c, a, n * sizeof(float));
    return;
  }
  /* [wide][b present][stream]; the copy without streaming is memcpy. */
  static const floor_fn fns[2][2][2] = {
      {{NULL, f128_copy_nt}, {f128_add, f128_add_nt}},
      {{NULL, f512_copy_nt}, {f512_add, f512_add_nt}}};
  fns[wide][b != NULL][stream != 0](a, b, c, n);
}

#else

void sbn__bench_floor(const float *a, const float *b, float *c, size_t n,
                      int stream) {
  (void)stream;
  if (b == NULL) {
    memcpy(c, a, n * sizeof(float));
    return;
  }
  for (size_t i = 0; i < n; i++)
    c[i] = a[i] + b[i];
}

#endif
