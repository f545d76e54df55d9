/* libFuzzer target: the checkpoint decoder (sbn_ckpt_decode, what
 * sbn_ckpt_load runs on a file's bytes). A checkpoint it accepts must
 * encode again and decode to the same bytes. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "sbn_state.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  sbn_ckpt_t *ck = NULL, *again = NULL;
  void *buf = NULL, *buf2 = NULL;
  size_t len = 0, len2 = 0;
  if (sbn_ckpt_decode(data, size, &ck) != 0)
    return 0;
  if (sbn_ckpt_encode(ck, &buf, &len) != 0 ||
      sbn_ckpt_decode(buf, len, &again) != 0 ||
      sbn_ckpt_encode(again, &buf2, &len2) != 0 || len != len2 ||
      memcmp(buf, buf2, len) != 0)
    abort();
  free(buf);
  free(buf2);
  sbn_ckpt_free(ck);
  sbn_ckpt_free(again);
  return 0;
}
