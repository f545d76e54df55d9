/* checkpoint_save and checkpoint_load: collective requests of the worker. */
#include <string.h>

#include "svc_worker_int.h"

int svc__checkpoint(svc_worker_t *w, svc_request_t *q, void *token,
                    int *deferred, uint8_t **reply, size_t *reply_len,
                    svc_err_t *err) {
  (void)w;
  (void)q;
  (void)token;
  (void)deferred;
  (void)reply;
  (void)reply_len;
  return svc_fail(err, SVC_NOT_YET, "checkpoint: not served yet");
}
