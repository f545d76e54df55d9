/* npygen: writes .npy files for the CLI tests (CI has no NumPy).
 *
 *   npygen [--seed S] [--mean M] [--std SD] [--vary AXIS] [--f8] OUT d0,d1,..
 *       normal values; with --vary, the slice at index i along AXIS has mean
 *       M + 10 i and standard deviation SD (1 + i), so every channel (or
 *       row) differs. "-" as the dims writes a 0-d array.
 *   npygen --raw DICT NBYTES OUT
 *       a version 1.0 file with the header dict DICT (padded as NumPy pads
 *       it) followed by NBYTES zero bytes, for malformed-file tests.
 * Exit status 0, or 2 on a usage or write error. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sbn_npy.h"

static uint64_t g_s;

static uint64_t next_u64(void) {
  uint64_t z = (g_s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

static double normal(void) {
  double u1 = ((double)(next_u64() >> 11) + 1.0) / 9007199254740993.0;
  double u2 = (double)(next_u64() >> 11) / 9007199254740992.0;
  return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

static int parse_dims(const char *s, size_t *dims, int *ndim) {
  *ndim = 0;
  if (strcmp(s, "-") == 0)
    return 0;
  while (*s) {
    char *end;
    if (*ndim == SBN_MAX_DIMS || *s < '0' || *s > '9')
      return -1;
    dims[(*ndim)++] = (size_t)strtoull(s, &end, 10);
    s = end;
    if (*s == ',')
      s++;
    else if (*s)
      return -1;
  }
  return 0;
}

static int write_raw(const char *dict, size_t nbytes, const char *out) {
  size_t dl = strlen(dict), total = (10 + dl + 1 + 63) / 64 * 64;
  FILE *f = fopen(out, "wb");
  if (f == NULL)
    return -1;
  fwrite("\x93NUMPY\x01\x00", 1, 8, f);
  fputc((int)((total - 10) & 0xff), f);
  fputc((int)((total - 10) >> 8), f);
  fputs(dict, f);
  for (size_t i = 10 + dl; i + 1 < total; i++)
    fputc(' ', f);
  fputc('\n', f);
  for (size_t i = 0; i < nbytes; i++)
    fputc(0, f);
  return fclose(f);
}

static int write_f8(const char *out, const float *a, size_t n, int ndim,
                    const size_t *dims) {
  char dict[256];
  int k = snprintf(dict, sizeof dict,
                   "{'descr': '<f8', 'fortran_order': False, 'shape': (");
  for (int i = 0; i < ndim; i++)
    k += snprintf(dict + k, sizeof dict - (size_t)k, "%zu, ", dims[i]);
  snprintf(dict + k, sizeof dict - (size_t)k, "), }");
  if (write_raw(dict, 0, out) != 0)
    return -1;
  FILE *f = fopen(out, "ab");
  if (f == NULL)
    return -1;
  for (size_t i = 0; i < n; i++) {
    double d = a[i];
    fwrite(&d, sizeof d, 1, f);
  }
  return fclose(f);
}

int main(int argc, char **argv) {
  double mean = 0, sd = 1;
  int vary = -1, f8 = 0, i = 1;
  g_s = 1;
  if (argc == 5 && strcmp(argv[1], "--raw") == 0) {
    if (write_raw(argv[2], (size_t)strtoull(argv[3], NULL, 10), argv[4])) {
      perror(argv[4]);
      return 2;
    }
    return 0;
  }
  for (; i + 1 < argc && strncmp(argv[i], "--", 2) == 0; i++) {
    if (strcmp(argv[i], "--f8") == 0)
      f8 = 1;
    else if (strcmp(argv[i], "--seed") == 0)
      g_s = strtoull(argv[++i], NULL, 10);
    else if (strcmp(argv[i], "--mean") == 0)
      mean = atof(argv[++i]);
    else if (strcmp(argv[i], "--std") == 0)
      sd = atof(argv[++i]);
    else if (strcmp(argv[i], "--vary") == 0)
      vary = atoi(argv[++i]);
    else
      break;
  }
  size_t dims[SBN_MAX_DIMS], n = 1;
  int ndim;
  if (argc - i != 2 || parse_dims(argv[i + 1], dims, &ndim) != 0 ||
      vary >= ndim) {
    fprintf(stderr,
            "usage: npygen [--seed S] [--mean M] [--std SD] [--vary AXIS] "
            "[--f8] OUT d0,d1,...\n"
            "       npygen --raw DICT NBYTES OUT\n");
    return 2;
  }
  size_t inner = 1;
  for (int d = 0; d < ndim; d++) {
    n *= dims[d];
    if (vary >= 0 && d > vary)
      inner *= dims[d];
  }
  float *a = malloc(n * sizeof(float) + 1);
  if (a == NULL)
    return 2;
  for (size_t k = 0; k < n; k++) {
    double m = mean, s = sd;
    if (vary >= 0) {
      size_t idx = (k / inner) % dims[vary];
      m += 10.0 * (double)idx;
      s *= 1.0 + (double)idx;
    }
    a[k] = (float)(m + s * normal());
  }
  int rc = f8 ? write_f8(argv[i], a, n, ndim, dims)
              : sbn_npy_write(argv[i], a, ndim, dims);
  free(a);
  if (rc != 0) {
    fprintf(stderr, "npygen: cannot write %s: %s\n", argv[i], sbn_last_error());
    return 2;
  }
  return 0;
}
