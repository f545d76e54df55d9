/* The service's one error convention (see svc_codec.h): a negative code
 * returned, the message kept per thread. */
#include <stdarg.h>
#include <stdio.h>

#include "svc_codec.h"

/* Long enough for a checkpoint's library message behind a file name. */
static _Thread_local char svc__last_msg[1024];

int svc_set_error(svc_code_t code, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(svc__last_msg, sizeof svc__last_msg, fmt, ap);
  va_end(ap);
  return -(int)code;
}

const char *svc_last_error(void) {
  return svc__last_msg;
}

svc_code_t svc_code_of(int rc) {
  if (rc < 0 && -rc < SVC_CODE_COUNT)
    return (svc_code_t)-rc;
  return SVC_INTERNAL;
}
