/* `syncbn apply`: the helpers every part of it uses (recording the first
 * failure, printing a shape), below the parts so that they depend on this
 * file and never on each other's callers. */
#include <stdarg.h>
#include <stdio.h>

#include "cli_apply_int.h"

int sbn__apply_fail(apply_err_t *e, int status, const char *fmt, ...) {
  if (e->status != 0)
    return e->status;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(e->msg, sizeof e->msg, fmt, ap);
  va_end(ap);
  e->status = status;
  return status;
}

int sbn__apply_fail_lib(apply_err_t *e, const char *what, int rc) {
  return sbn__apply_fail(e, 1, "%s: %s: %s", what, sbn_err_name(rc),
                         sbn_last_error());
}

void sbn__apply_shape_str(const size_t *dims, int ndim, char *buf, size_t cap) {
  size_t n = (size_t)snprintf(buf, cap, "(");
  for (int i = 0; i < ndim && n < cap; i++)
    n += (size_t)snprintf(buf + n, cap - n, "%s%zu", i ? ", " : "", dims[i]);
  if (n < cap)
    snprintf(buf + n, cap - n, "%s)", ndim == 1 ? "," : "");
}
