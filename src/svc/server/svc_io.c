/* The server's fast paths: see svc_io.h. */
#include "svc_io.h"

#include <sched.h>
#include <time.h>

static double svc__mono(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

/* Whether the loop is only polling for a client's next request (no round
 * of the worker in flight). */
static int svc__polling(const svc__spin_t *sp) {
  return sp->poll_until > 0 && svc__mono() < sp->poll_until;
}

static void svc__on_spin(uv_idle_t *h) {
  svc__spin_t *sp = h->data;
  /* Polling is worth less than any other process's work on an
   * oversubscribed machine: the core goes to whoever else can run, and
   * the poll goes on when it comes back. That holds during a round too.
   * A client on one core with its worker (mpirun --bind-to core, with the
   * worker started by the rank) would otherwise wait out the scheduler's
   * time slice behind a worker spinning for the other rank, whose own
   * client waits the same way: a stats entry took 11.7 ms instead of
   * 117 us at C = 2048. Where nothing else is runnable the call returns
   * at once. */
  sched_yield();
  svc__spin_kick(sp);
}

void svc__spin_init(svc__spin_t *sp, uv_loop_t *loop, svc_worker_t *worker,
                    void (*fn)(void *arg), void *arg) {
  uv_idle_init(loop, &sp->idle);
  sp->idle.data = sp;
  sp->inited = 1;
  sp->on = sp->closed = 0;
  sp->fn = fn;
  sp->arg = arg;
  sp->worker = worker;
  sp->poll_until = 0;
}

void svc__spin_kick(svc__spin_t *sp) {
  int busy;
  if (!sp->inited || sp->closed)
    return;
  sp->fn(sp->arg);
  if (sp->closed)
    return; /* the tick stopped the server */
  busy = svc_worker_busy(sp->worker) || svc__polling(sp);
  if (busy && !sp->on) {
    sp->on = uv_idle_start(&sp->idle, svc__on_spin) == 0;
  } else if (!busy && sp->on) {
    uv_idle_stop(&sp->idle);
    sp->on = 0;
  }
}

void svc__spin_poll(svc__spin_t *sp) {
  if (!sp->inited || sp->closed || sp->poll_s <= 0)
    return;
  sp->poll_until = svc__mono() + sp->poll_s;
  if (!sp->on)
    sp->on = uv_idle_start(&sp->idle, svc__on_spin) == 0;
}

void svc__spin_close(svc__spin_t *sp) {
  if (!sp->inited || sp->closed)
    return;
  sp->closed = 1;
  uv_close((uv_handle_t *)&sp->idle, NULL);
}

int svc__io_direct(uint8_t *body, uint32_t len, uint32_t have, int pending,
                   size_t min, uv_buf_t *buf) {
  /* In the middle of a large body the socket reads straight into the
   * frame's own buffer: a tensor's bytes are not copied once more. */
  if (body == NULL || pending || have >= len || len - have < min)
    return 0;
  *buf = uv_buf_init((char *)body + have, (unsigned)(len - have));
  return 1;
}

void svc__io_big_buffers(uv_handle_t *h) {
  /* Megabyte tensors go through in fewer, larger reads and writes. */
  int bytes = 4 << 20;
  uv_send_buffer_size(h, &bytes);
  bytes = 4 << 20;
  uv_recv_buffer_size(h, &bytes);
}
