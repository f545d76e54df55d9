/* `syncbn bench service`'s copy floor for full tensors: the same bytes
 * sent through a Unix socket to a thread that reads each frame whole and
 * writes it back, the way a worker that did no work at all would answer
 * (one frame out, one frame back, 4 MiB socket buffers like the client's
 * and the worker's). */
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "cli_bench.h"
#include "cli_bench_echo.h"

static int echo_io(int fd, void *buf, size_t len, int out) {
  uint8_t *p = buf;
  while (len > 0) {
    ssize_t k = out ? send(fd, p, len, MSG_NOSIGNAL) : recv(fd, p, len, 0);
    if (k < 0 && errno == EINTR)
      continue;
    if (k <= 0)
      return -1;
    p += k;
    len -= (size_t)k;
  }
  return 0;
}

/* The echoing side: frames until a zero length or an error. */
static void *echo_main(void *arg) {
  sbn_bench_echo_t *e = arg;
  for (;;) {
    uint32_t n = 0;
    if (echo_io(e->fd[1], &n, sizeof n, 0) != 0 || n == 0 || n > e->cap ||
        echo_io(e->fd[1], e->buf, n, 0) != 0 ||
        echo_io(e->fd[1], &n, sizeof n, 1) != 0 ||
        echo_io(e->fd[1], e->buf, n, 1) != 0)
      break;
  }
  return NULL;
}

int sbn__bench_echo_start(sbn_bench_echo_t *e, size_t max_bytes) {
  int bytes = 4 << 20;
  memset(e, 0, sizeof *e);
  e->fd[0] = e->fd[1] = -1;
  if (max_bytes > UINT32_MAX)
    return sbn_set_error(SBN_ELIMIT, "echo: %zu bytes exceed a frame",
                         max_bytes);
  e->cap = max_bytes;
  if ((e->buf = malloc(max_bytes > 0 ? max_bytes : 1)) == NULL)
    return sbn_set_error(SBN_ENOMEM, "echo: out of memory for %zu bytes",
                         max_bytes);
  if (socketpair(AF_UNIX, SOCK_STREAM, 0, e->fd) != 0) {
    sbn__bench_echo_stop(e);
    return sbn_set_error(SBN_EIO, "echo: socketpair: %s", strerror(errno));
  }
  for (int i = 0; i < 2; i++) {
    setsockopt(e->fd[i], SOL_SOCKET, SO_SNDBUF, &bytes, sizeof bytes);
    setsockopt(e->fd[i], SOL_SOCKET, SO_RCVBUF, &bytes, sizeof bytes);
  }
  if (pthread_create(&e->thread, NULL, echo_main, e) != 0) {
    sbn__bench_echo_stop(e);
    return sbn_set_error(SBN_EIO, "echo: cannot start its thread");
  }
  e->running = 1;
  return 0;
}

int sbn__bench_echo(sbn_bench_echo_t *e, const void *out, size_t len,
                    void *in) {
  uint32_t n = (uint32_t)len;
  if (len == 0 || len > e->cap)
    return sbn_set_error(SBN_EINVAL, "echo: %zu bytes (1 to %zu)", len, e->cap);
  if (echo_io(e->fd[0], &n, sizeof n, 1) != 0 ||
      echo_io(e->fd[0], (void *)out, len, 1) != 0 ||
      echo_io(e->fd[0], &n, sizeof n, 0) != 0 || n != len ||
      echo_io(e->fd[0], in, len, 0) != 0)
    return sbn_set_error(SBN_EIO, "echo: the echo thread went away");
  return 0;
}

void sbn__bench_echo_stop(sbn_bench_echo_t *e) {
  if (e->running) {
    uint32_t zero = 0;
    echo_io(e->fd[0], &zero, sizeof zero, 1);
    pthread_join(e->thread, NULL);
    e->running = 0;
  }
  for (int i = 0; i < 2; i++)
    if (e->fd[i] >= 0)
      close(e->fd[i]);
  e->fd[0] = e->fd[1] = -1;
  free(e->buf);
  e->buf = NULL;
}
