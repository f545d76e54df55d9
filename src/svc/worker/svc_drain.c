/* Holding and draining the cross-rank agreement (svc_worker.h), for a job
 * that ends without a signal: a collective left in flight would write
 * into freed buffers inside MPI_Finalize. */
#include "svc_worker_int.h"

/* Rounds this rank has started: every round that ended moved the epoch
 * on by one (from 1), and a round in flight counts too. */
uint64_t svc_worker_rounds(const svc_worker_t *w) {
  if (w->epoch == 0)
    return 0;
  return w->epoch - 1 + (w->phase != SVC__IDLE);
}

void svc_worker_hold(svc_worker_t *w, uint64_t last_round) {
  w->hold = 1;
  w->hold_last = last_round;
}

int svc_worker_drained(const svc_worker_t *w) {
  return !w->sync_on || (w->hold && w->phase == SVC__IDLE &&
                         svc_worker_rounds(w) >= w->hold_last);
}
