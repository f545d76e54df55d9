/* The server's fast paths (svc_io.c), kept apart from the connection
 * logic of svc_server.c: the busy loop that drives the agreement while
 * the worker is busy, reads straight into a frame's buffer, and large
 * socket buffers. Not installed. */
#ifndef SBN_SVC_IO_H
#define SBN_SVC_IO_H
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "svc_worker.h"

/* Runs fn(arg) on every loop iteration while svc_worker_busy(worker), so
 * that a round's collectives follow each other without waiting for the
 * timer, and for poll_s seconds after svc__spin_poll (a reply went out),
 * so that a request right behind it is read without a wake-up; lets the
 * loop sleep otherwise. */
typedef struct svc__spin_s {
  uv_idle_t idle;
  int inited, on, closed;
  void (*fn)(void *arg);
  void *arg;
  svc_worker_t *worker;
  double poll_s, poll_until; /* CLOCK_MONOTONIC seconds */
} svc__spin_t;

void svc__spin_init(svc__spin_t *sp, uv_loop_t *loop, svc_worker_t *worker,
                    void (*fn)(void *arg), void *arg);
/* Runs fn now, then starts or stops the spinning as the worker needs. */
void svc__spin_kick(svc__spin_t *sp);
/* Keeps the loop polling for sp->poll_s seconds from now (a reply went
 * out); a no-op when poll_s is 0. */
void svc__spin_poll(svc__spin_t *sp);
/* Closes the idle handle (with the loop's other handles at shutdown). */
void svc__spin_close(svc__spin_t *sp);

/* Sets *buf to the unfilled rest of a frame body (body[have..len)) and
 * returns 1 when that rest is large enough to be worth reading into
 * directly (at least min bytes) and the connection is reading frames
 * (not pending); else returns 0 and leaves *buf alone. */
int svc__io_direct(uint8_t *body, uint32_t len, uint32_t have, int pending,
                   size_t min, uv_buf_t *buf);

/* Asks for 4 MiB socket buffers on a connection (best effort: the kernel
 * caps them at its maximum). */
void svc__io_big_buffers(uv_handle_t *h);

#endif /* SBN_SVC_IO_H */
