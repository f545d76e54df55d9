/* Run-time choice of the kernel set (ggml/BLIS style: the reference set is
 * always there; an optimized set replaces it when the CPU can run it). */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kernels/sbn_kernels.h"

static const sbn__kernels_t *sbn__active;

int sbn__pfw_on;

/* The tuning read with the kernel set (sbn__pfw_on). */
static void sbn__tune(void) {
  int on = sbn__env_bit("SBN_PFW");
  __atomic_store_n(&sbn__pfw_on, on >= 0 ? on : sbn__wide_l2(),
                   __ATOMIC_RELAXED);
}

/* One row per optimized set, best first. */
typedef struct sbn__kset_s {
  const sbn__kernels_t *k;
  int (*usable)(void);
  const char *lacks; /* what the CPU lacks when usable() is 0 */
} sbn__kset_t;

#ifdef SBN__HAVE_AVX512
static int sbn__can_avx512(void) {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") &&
         __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma");
}
#endif

#ifdef SBN__HAVE_AVX2
static int sbn__can_avx2(void) {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#endif

static const sbn__kset_t sbn__ksets[] = {
#ifdef SBN__HAVE_AVX512
    {&sbn__kernels_avx512, sbn__can_avx512, "AVX-512 F/BW/DQ/VL"},
#endif
#ifdef SBN__HAVE_AVX2
    {&sbn__kernels_avx2, sbn__can_avx2, "AVX2/FMA"},
#endif
    {&sbn__kernels_ref, NULL, NULL},
};
#define SBN__NKSETS (sizeof sbn__ksets / sizeof *sbn__ksets)

/* The row named name, or NULL. */
static const sbn__kset_t *sbn__kset(const char *name) {
  for (size_t i = 0; i < SBN__NKSETS; i++)
    if (strcmp(sbn__ksets[i].k->name, name) == 0)
      return &sbn__ksets[i];
  return NULL;
}

static int sbn__usable(const sbn__kset_t *s) {
  return s->usable == NULL || s->usable();
}

static const sbn__kernels_t *sbn__pick(void) {
  /* A forced set (tests and benchmarks compare sets with it) that this
   * CPU cannot run, or that does not exist, is ignored: the library has
   * no way to report it here, and the automatic choice is always safe.
   * sbn_kernel_name() shows which set is in use. */
  const char *env = getenv("SBN_KERNELS");
  const sbn__kset_t *s = env != NULL ? sbn__kset(env) : NULL;
  if (s != NULL && sbn__usable(s))
    return s->k;
  for (size_t i = 0; i < SBN__NKSETS; i++)
    if (sbn__usable(&sbn__ksets[i]))
      return sbn__ksets[i].k;
  return &sbn__kernels_ref;
}

const sbn__kernels_t *sbn__kernels(void) {
  /* A benign race: every thread computes the same pointer. */
  const sbn__kernels_t *k = __atomic_load_n(&sbn__active, __ATOMIC_ACQUIRE);
  if (k == NULL) {
    k = sbn__pick();
    sbn__tune();
    __atomic_store_n(&sbn__active, k, __ATOMIC_RELEASE);
  }
  return k;
}

const char *sbn_kernel_name(void) {
  return sbn__kernels()->name;
}

int sbn_kernel_select(const char *name) {
  if (name == NULL)
    return sbn_set_error(SBN_EINVAL, "name: NULL");
  if (strcmp(name, "auto") == 0) {
    __atomic_store_n(&sbn__active, NULL, __ATOMIC_RELEASE);
    sbn__kernels();
    return 0;
  }
  const sbn__kset_t *s = sbn__kset(name);
  if (s == NULL)
    return sbn_set_error(SBN_ENOTSUP, "name: no kernel set called '%s'", name);
  if (!sbn__usable(s))
    return sbn_set_error(SBN_ENOTSUP, "name: this CPU lacks %s", s->lacks);
  sbn__tune();
  __atomic_store_n(&sbn__active, s->k, __ATOMIC_RELEASE);
  return 0;
}

/* The L2 of one core, from the C library (which reads the CPU's cache
 * descriptors); 1 MiB when it cannot tell (not Linux/glibc, or a virtual
 * machine that hides them). Size thresholds that were tuned against the
 * L2 scale with it, so that a machine with a larger L2 keeps whole
 * samples or blocks in it too. Read once; a benign race as above. */
size_t sbn__l2_bytes(void) {
  static size_t l2;
  size_t v = __atomic_load_n(&l2, __ATOMIC_ACQUIRE);
  if (v == 0) {
    long s = -1;
#ifdef _SC_LEVEL2_CACHE_SIZE
    s = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    /* Anything outside 128 KiB .. 64 MiB is a misreading. */
    v = s >= (128L << 10) && s <= (64L << 20) ? (size_t)s : (size_t)1 << 20;
    __atomic_store_n(&l2, v, __ATOMIC_RELEASE);
  }
  return v;
}

/* The L2 from which the choices of sbn__wide_l2 (sbn_kernels.h) take
 * the Xeon's side; SBN_WIDE_L2=1 or 0 takes one side on any core (for
 * comparison, and for the tests of both sides). Read on every call: the
 * callers are once per pass or once per kernel choice. */
#define SBN__WIDE_L2 ((size_t)2 << 20)

int sbn__wide_l2(void) {
  int v = sbn__env_bit("SBN_WIDE_L2");
  return v >= 0 ? v : sbn__l2_bytes() >= SBN__WIDE_L2;
}

/* The last-level (L3) cache in bytes as the C library reports it (the
 * whole cache, shared by the cores that share it), 0 when it cannot tell:
 * thresholds that use it then fall back to their L2 rule. Read once; a
 * benign race as above. */
size_t sbn__l3_bytes(void) {
  static size_t l3 = (size_t)-1;
  size_t v = __atomic_load_n(&l3, __ATOMIC_ACQUIRE);
  if (v == (size_t)-1) {
    long s = -1;
#ifdef _SC_LEVEL3_CACHE_SIZE
    s = sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
    /* Anything outside 1 MiB .. 4 GiB is a misreading. */
    v = s >= (1L << 20) && (unsigned long)s <= (4UL << 30) ? (size_t)s : 0;
    __atomic_store_n(&l3, v, __ATOMIC_RELEASE);
  }
  return v;
}
