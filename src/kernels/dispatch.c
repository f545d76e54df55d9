/* Run-time choice of the kernel set (ggml/BLIS style: the reference set is
 * always there; an optimized set replaces it when the CPU can run it). */
#include <string.h>

#include "kernels/sbn_kernels.h"

static const sbn__kernels_t *sbn__active;

static const sbn__kernels_t *sbn__pick(void) {
#ifdef SBN__HAVE_AVX2
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    return &sbn__kernels_avx2;
#endif
  return &sbn__kernels_ref;
}

const sbn__kernels_t *sbn__kernels(void) {
  /* A benign race: every thread computes the same pointer. */
  const sbn__kernels_t *k = __atomic_load_n(&sbn__active, __ATOMIC_ACQUIRE);
  if (k == NULL) {
    k = sbn__pick();
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
  if (strcmp(name, "ref") == 0) {
    __atomic_store_n(&sbn__active, &sbn__kernels_ref, __ATOMIC_RELEASE);
    return 0;
  }
#ifdef SBN__HAVE_AVX2
  if (strcmp(name, "avx2") == 0) {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma"))
      return sbn_set_error(SBN_ENOTSUP, "name: this CPU lacks AVX2/FMA");
    __atomic_store_n(&sbn__active, &sbn__kernels_avx2, __ATOMIC_RELEASE);
    return 0;
  }
#endif
  return sbn_set_error(SBN_ENOTSUP, "name: no kernel set called '%s'", name);
}
