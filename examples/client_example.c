/* A syncbnd client: says hello, registers a BatchNorm layer, runs one
 * training forward and backward through the worker, and prints a summary.
 *
 *   mpirun -np 2 build/bin/syncbnd --socket-dir /tmp/sbn &
 *   build/bin/client_example /tmp/sbn/rank-0.sock
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "client.h"

int main(int argc, char **argv) {
  sbn_client_t *c = NULL;
  sbn_client_hello_t h;
  sbn_layer_params_t p;
  sbn_tensor_desc_t d = {4, {8, 3, 5, 5}, SBN_LAYOUT_NCHW};
  enum { N = 8 * 3 * 5 * 5, C = 3 };
  static float x[N], y[N], dy[N], dx[N];
  float dw[C], db[C];
  uint64_t layer;
  int created, rc, status = 1;
  if (argc != 2) {
    fprintf(stderr, "usage: %s SOCKET_PATH\n", argv[0]);
    return 2;
  }
  for (int i = 0; i < N; i++) {
    x[i] = (float)((i * 37) % 101) / 10.0f - 5.0f;
    dy[i] = (float)((i * 53) % 97) / 97.0f - 0.5f;
  }
  if ((rc = sbn_client_connect(argv[1], &c)) != 0) {
    fprintf(stderr, "client_example: %s: %s\n", sbn_client_err_name(rc),
            sbn_last_error());
    return 1;
  }
  if ((rc = sbn_client_hello(c, &h)) != 0)
    goto fail;
  printf("worker rank %d of %d, protocol %d, max frame %u bytes\n", h.rank,
         h.size, h.protocol, h.max_frame);
  sbn_layer_params_default(&p, SBN_OP_BATCHNORM);
  p.channels = C;
  if ((rc = sbn_client_register(c, "example.bn1", "batchnorm", &p, 0, &layer,
                                &created)) != 0)
    goto fail;
  printf("layer %llu (%s)\n", (unsigned long long)layer,
         created ? "new" : "already registered");
  /* Steps of a layer only move forward and each is submitted once, so
   * reruns against the same worker take the wall clock in milliseconds. */
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  uint64_t step = (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
  if ((rc = sbn_client_forward(c, layer, step, 1, &d, x, NULL, NULL, 0, y)) !=
          0 ||
      (rc = sbn_client_backward(c, layer, step, &d, dy, dx, dw, db, C)) != 0)
    goto fail;
  printf("y[0] = %.6f, dx[0] = %.6f, dweight = [%.6f %.6f %.6f]\n", y[0], dx[0],
         dw[0], dw[1], dw[2]);
  /* Protocol 3: the layer's state as the worker keeps it. The arrays are
   * the client's; sbn_client_state_free releases them. */
  if (h.protocol >= 3) {
    sbn_client_state_t st;
    if ((rc = sbn_client_get_state(c, layer, &st)) != 0)
      goto fail;
    printf("running_mean[0] = %.6f after %lld batches\n", st.running_mean[0],
           (long long)st.num_batches_tracked);
    sbn_client_state_free(&st);
  }
  sbn_client_bye(c);
  status = 0;
fail:
  if (status != 0)
    /* The message names the call and, for an error reply, carries the
     * worker's code and message. */
    fprintf(stderr, "client_example: %s: %s\n", sbn_client_err_name(rc),
            sbn_last_error());
  sbn_client_close(c);
  return status;
}
