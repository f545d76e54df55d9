/* The header of the saved forward state, which lets backward check that
 * the buffer it is given was filled by a forward of the same op, mode and
 * shape before it trusts the statistics in it. */
#include "base/sbn_base.h"

int sbn__saved_size(size_t items, size_t *bytes) {
  size_t b;
  if (sbn__mul_size(items, 2 * sizeof(double), &b) != 0 ||
      b > SIZE_MAX - sizeof(sbn__saved_hdr_t))
    return sbn_set_error(SBN_EOVERFLOW,
                         "x_desc.dims: the saved state overflows size_t");
  *bytes = b + sizeof(sbn__saved_hdr_t);
  return 0;
}

void sbn__saved_init(void *saved, sbn_op_t op, sbn_mode_t mode, double count,
                     size_t items, double **mean, double **istd) {
  sbn__saved_hdr_t *h = saved;
  h->magic = SBN__SAVED_MAGIC;
  h->op = (uint32_t)op;
  h->mode = (uint32_t)mode;
  h->pad = 0;
  h->count = count;
  h->items = items;
  h->pad2 = 0;
  *mean = (double *)(void *)(h + 1);
  *istd = *mean + items;
}

int sbn__saved_get(const void *saved, size_t bytes, sbn_op_t op,
                   sbn_mode_t mode, size_t items, double *count,
                   const double **mean, const double **istd) {
  const sbn__saved_hdr_t *h = saved;
  size_t need = 0;
  int rc;
  if (saved == NULL)
    return sbn_set_error(SBN_EINVAL,
                         "saved: NULL (backward needs the "
                         "forward's saved state)");
  if ((rc = sbn__saved_size(items, &need)) != 0)
    return rc;
  if (bytes < need)
    return sbn_set_error(SBN_ENOSPACE, "saved_bytes: %zu < %zu needed", bytes,
                         need);
  if (h->magic != SBN__SAVED_MAGIC || h->op != (uint32_t)op ||
      h->items != items)
    return sbn_set_error(SBN_ESTATE,
                         "saved: not filled by a forward of this layer "
                         "and shape");
  if (h->mode != (uint32_t)mode)
    return sbn_set_error(SBN_ESTATE,
                         "mode: backward mode differs from the forward's");
  *count = h->count;
  *mean = (const double *)(const void *)(h + 1);
  *istd = *mean + items;
  return 0;
}
