/* libFuzzer target: the .npy reader (sbn_npy_read) on a file holding the
 * input, an in-memory file (memfd) named through /proc/self/fd. What it
 * accepts has as many floats as its shape says. */
#define _GNU_SOURCE /* memfd_create */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include "sbn_npy.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  char path[64];
  sbn_npy_t t;
  size_t numel = 1;
  int fd = memfd_create("fuzz_npy", 0);
  if (fd < 0)
    abort();
  if (size > 0 && write(fd, data, size) != (ssize_t)size)
    abort();
  snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
  if (sbn_npy_read(path, &t) == 0) {
    for (int i = 0; i < t.ndim; i++)
      numel *= t.dims[i];
    if (numel != t.numel || (numel > 0 && t.data == NULL))
      abort();
    volatile float sink = numel > 0 ? t.data[numel - 1] : 0.0f;
    (void)sink;
    sbn_npy_free(&t);
  }
  close(fd);
  return 0;
}
