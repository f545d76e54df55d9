/* libFuzzer target: a byte stream as a connection would deliver it, cut
 * into frames by the 4-byte header (svc_frame_len), each body scanned and
 * decoded (svc_decode_request) and then run through a worker
 * (svc_worker_handle), which validates the request against its layers:
 * shapes, steps, parameters, checkpoint names. The worker persists across
 * inputs, as a long-lived one does, with small limits so that registered
 * layers and kept steps stay bounded. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "svc_codec.h"
#include "svc_worker.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static svc_worker_t *worker(void) {
  static svc_worker_t *w;
  if (w == NULL) {
    svc_worker_config_t cfg;
    svc_worker_config_default(&cfg);
    cfg.max_layers = 16;
    cfg.max_saved = 1u << 22;
    cfg.limits.max_frame = 1u << 20;
    if (svc_worker_create(&cfg, &w) != 0)
      abort();
  }
  return w;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  svc_worker_t *w = worker();
  svc_limits_t lim;
  svc_limits_default(&lim);
  lim.max_frame = 1u << 20;
  while (size >= SVC_HEADER_BYTES) {
    uint32_t len = 0;
    uint8_t *reply = NULL;
    size_t rlen = 0;
    int close_after = 0;
    svc_request_t req;
    if (svc_frame_len(data, &lim, &len) != 0)
      break; /* the server closes here */
    data += SVC_HEADER_BYTES;
    size -= SVC_HEADER_BYTES;
    if (len > size)
      len = (uint32_t)size; /* a short frame: decode what arrived */
    if (svc_decode_request(data, len, &lim, &req) == 0)
      svc_request_free(&req);
    if (svc_worker_handle(w, data, len, &reply, &rlen, &close_after) == 0) {
      /* Every reply is itself one well-formed frame. */
      uint32_t back = 0;
      if (reply == NULL || rlen < SVC_HEADER_BYTES ||
          svc_frame_len(reply, &(svc_limits_t){UINT32_MAX, 32, 1u << 30},
                        &back) != 0 ||
          back != rlen - SVC_HEADER_BYTES)
        abort();
    }
    free(reply);
    data += len;
    size -= len;
    if (close_after)
      break;
  }
  return 0;
}
