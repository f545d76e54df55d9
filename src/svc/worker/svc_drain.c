/* Holding and draining the cross-rank agreement (svc_worker.h), for a job
 * that ends without a signal: a collective left in flight would write
 * into freed buffers inside MPI_Finalize. */
#include "svc_worker_int.h"

uint64_t svc_worker_rounds(const svc_worker_t *w) {
  return w->m.gathers;
}

void svc_worker_hold(svc_worker_t *w, uint64_t last_round) {
  w->hold = 1;
  w->hold_last = last_round;
}

int svc_worker_drained(const svc_worker_t *w) {
  return !w->sync_on ||
         (w->hold && w->phase == 0 && w->m.gathers >= w->hold_last);
}
