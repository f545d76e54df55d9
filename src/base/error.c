/* The error table and per-thread error messages. */
#include <stdarg.h>
#include <stdio.h>

#include "base/sbn_base.h"

/* Each thread keeps the message of its own last failure, so concurrent
 * users of distinct layers never see each other's messages. */
static _Thread_local char sbn__last_msg[512];

const char *sbn_strerror(int err) {
  switch (err) {
    case 0:
      return "success";
#define SBN__ERR_MSG(name, val, msg) \
  case SBN_##name:                   \
    return msg;
      SBN_ERRNO_MAP(SBN__ERR_MSG)
#undef SBN__ERR_MSG
    default:
      return "unknown error";
  }
}

const char *sbn_err_name(int err) {
  switch (err) {
    case 0:
      return "SBN_OK";
#define SBN__ERR_NAME(name, val, msg) \
  case SBN_##name:                    \
    return "SBN_" #name;
      SBN_ERRNO_MAP(SBN__ERR_NAME)
#undef SBN__ERR_NAME
    default:
      return "SBN_EUNKNOWN";
  }
}

const char *sbn_last_error(void) {
  return sbn__last_msg;
}

int sbn_set_error(int code, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(sbn__last_msg, sizeof sbn__last_msg, fmt, ap);
  va_end(ap);
  return code;
}

int sbn__mul_size(size_t a, size_t b, size_t *out) {
  if (a != 0 && b > SIZE_MAX / a)
    return SBN_EOVERFLOW;
  *out = a * b;
  return 0;
}

int sbn_desc_numel(const sbn_tensor_desc_t *d, size_t *numel) {
  size_t n = 1;
  if (d == NULL || numel == NULL)
    return sbn_set_error(SBN_EINVAL, "x_desc: NULL");
  if (d->ndim < 1 || d->ndim > SBN_MAX_DIMS)
    return sbn_set_error(SBN_ESHAPE, "x_desc.ndim: %d is outside [1, %d]",
                         d->ndim, SBN_MAX_DIMS);
  for (int i = 0; i < d->ndim; i++)
    if (sbn__mul_size(n, d->dims[i], &n) != 0)
      return sbn_set_error(SBN_EOVERFLOW,
                           "x_desc.dims: the element count overflows size_t");
  *numel = n;
  return 0;
}
