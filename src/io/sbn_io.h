/* The io room of the kernel library: files and checkpoint formats. It uses
 * the base room only, never the ops or kernels. Not installed. */
#ifndef SBN_IO_H
#define SBN_IO_H

#include "base/sbn_base.h"

/* Writes the concatenation of parts to path atomically: a temporary file
 * in the same directory (created with the given mode), then rename(). With
 * durable, the data and the directory entry are fsync'ed too. On failure
 * the old file is untouched and the temporary file removed. */
int sbn__write_file_atomic(const char *path, const void *const *parts,
                           const size_t *lens, int nparts, unsigned mode,
                           int durable);

#endif /* SBN_IO_H */
