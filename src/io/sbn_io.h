/* The io room of the kernel library: files and checkpoint formats. It uses
 * the base room only, never the ops or kernels. Not installed. */
#ifndef SBN_IO_H
#define SBN_IO_H

#include "base/sbn_base.h"
#include "sbn_state.h"

/* ------------------------------------------------------------------ */
/* Checkpoint internals shared by the in-memory form (io/state.c) and the
 * byte format (io/state_format.c). */

struct sbn_ckpt_s {
  /* Pointers to separately allocated layers, so views stay put when the
   * array grows. */
  sbn_ckpt_layer_t **layers;
  size_t count;
  size_t cap;
};

/* NULL if name is a valid layer name of len bytes, else why not. */
const char *sbn__layer_name_problem(const unsigned char *s, size_t len);

/* Allocates a layer in one block (free() releases it) and points its
 * arrays into the block. The caller fills params, name bytes, arrays and
 * group headers. Every count must be capped already. */
sbn_ckpt_layer_t *sbn__layer_alloc(size_t name_len, size_t affine_len,
                                   size_t stats_len, size_t num_groups,
                                   char **name, float **weight, float **bias,
                                   sbn_ckpt_group_t **groups);

/* Renames the temporary file tmp (from sbn_write_file_tmp) over path, or
 * unlinks it when that fails; frees tmp either way. */
int sbn__rename_tmp(char *tmp, const char *path);

#endif /* SBN_IO_H */
