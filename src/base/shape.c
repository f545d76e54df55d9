/* Shape checks of tensor descriptors: the parts every op shares. The op
 * rows compose them (ops/sbn_ops.h), so the per-op knowledge stays in the
 * op files and this file names ops only through the `what` it is given. */
#include <string.h>

#include "base/sbn_base.h"

int sbn__shape_begin(const sbn_tensor_desc_t *d, sbn__shape_t *sh) {
  int rc;
  memset(sh, 0, sizeof *sh);
  if ((rc = sbn_desc_numel(d, &sh->numel)) != 0)
    return rc;
  if (d->layout != SBN_LAYOUT_NCHW && d->layout != SBN_LAYOUT_NHWC)
    return sbn_set_error(SBN_EINVAL, "x_desc.layout: unknown layout %d",
                         (int)d->layout);
  sh->layout = d->layout;
  return 0;
}

int sbn__shape_channels(const char *what, size_t channels,
                        const sbn_tensor_desc_t *d, sbn__shape_t *sh) {
  int rc;
  if ((rc = sbn__shape_begin(d, sh)) != 0)
    return rc;
  if (d->ndim < 2)
    return sbn_set_error(SBN_ESHAPE,
                         "x_desc.ndim: %s needs (N, C, ...) with at least "
                         "2 dims, got %d",
                         what, d->ndim);
  if (d->dims[1] != channels)
    return sbn_set_error(SBN_ESHAPE,
                         "x_desc.dims[1]: expected %zu channels, got %zu",
                         channels, d->dims[1]);
  sh->N = d->dims[0];
  sh->C = d->dims[1];
  sh->S = 1;
  for (int i = 2; i < d->ndim; i++)
    sh->S *= d->dims[i];
  /* Per-channel workspace is a small multiple of C; make sure it is
   * representable even for absurd channel counts. */
  if (sh->C > SIZE_MAX / 256)
    return sbn_set_error(SBN_EOVERFLOW,
                         "channels: %zu channels overflow the workspace "
                         "size",
                         sh->C);
  return 0;
}

int sbn__shape_plain(const char *what, const sbn_tensor_desc_t *d,
                     sbn__shape_t *sh) {
  int rc;
  if ((rc = sbn__shape_begin(d, sh)) != 0)
    return rc;
  if (d->layout != SBN_LAYOUT_NCHW)
    return sbn_set_error(SBN_ESHAPE,
                         "x_desc.layout: %s takes plain C-order arrays "
                         "(NCHW), not NHWC",
                         what);
  sh->N = 1;
  sh->C = 1;
  sh->S = sh->numel;
  return 0;
}
