/* .npy tensor files (NumPy format versions 1.0, 2.0 and 3.0).
 *
 * Reading accepts little-endian float32 ('<f4') as is and float64 ('<f8')
 * converted to float32, C order only. Anything else (another dtype, Fortran
 * order, big-endian, a header that does not parse, a shape whose size
 * overflows, data shorter or longer than the header says) is SBN_EFORMAT
 * with a message naming the file. Writing always produces '<f4' version 1.0.
 */
#ifndef SBN_NPY_H
#define SBN_NPY_H

#include <stddef.h>

#include "syncbn.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct sbn_npy_s {
  int ndim; /* 0..SBN_MAX_DIMS */
  size_t dims[SBN_MAX_DIMS];
  size_t numel;
  float *data; /* owned; release with sbn_npy_free() */
} sbn_npy_t;

/* Reads path into *out (zeroed first). On failure nothing is allocated. */
SBN_API int sbn_npy_read(const char *path, sbn_npy_t *out);
/* Writes numel = prod(dims) floats. Writes to a temporary file in the same
 * directory and renames it, so an existing file is never left half written. */
SBN_API int sbn_npy_write(const char *path, const float *data, int ndim,
                          const size_t *dims);
/* Like sbn_npy_write, but leaves the new file under a temporary name in
 * path's directory and sets *tmp_out to it (malloc'ed): the caller renames
 * it over path, or unlinks it, and frees the name. Writers of several
 * outputs use it to replace them all or none (sbn_write_file_tmp). */
SBN_API int sbn_npy_write_tmp(const char *path, const float *data, int ndim,
                              const size_t *dims, char **tmp_out);
SBN_API void sbn_npy_free(sbn_npy_t *t);

#ifdef __cplusplus
}
#endif
#endif /* SBN_NPY_H */
