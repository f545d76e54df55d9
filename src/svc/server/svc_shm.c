/* Receipt of the descriptors a Unix client sends for shm_attach
 * (protocol 6, see svc_worker/svc_shm.h).
 *
 * The choice: Unix connections are libuv pipes opened with ipc = 1, so
 * libuv reads them with recvmsg and queues every SCM_RIGHTS descriptor
 * that arrives with the bytes (a pipe opened without it reads with read(),
 * and the kernel discards the descriptors). libuv hands a queued
 * descriptor out only through uv_accept into a handle, so each one is
 * accepted into a short-lived pipe handle, duplicated, and the handle is
 * closed. This runs from the read callback, while the connection reads,
 * so descriptors reach the inbox in the order they came, before any frame
 * whose bytes carried them runs. */
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#include "svc_server_int.h"

static void svc__shm_tmp_closed(uv_handle_t *h) {
  free(h);
}

/* One queued descriptor, duplicated out of libuv: >= 0, or -1. */
static int svc__shm_take_one(svc__conn_t *c) {
  uv_pipe_t *tmp = malloc(sizeof *tmp);
  uv_os_fd_t fd;
  int dup = -1;
  if (tmp == NULL || uv_pipe_init(&c->srv->loop, tmp, 0) != 0) {
    free(tmp);
    return -1;
  }
  if (uv_accept(&c->h.stream, (uv_stream_t *)tmp) == 0 &&
      uv_fileno((uv_handle_t *)tmp, &fd) == 0)
    dup = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  uv_close((uv_handle_t *)tmp, svc__shm_tmp_closed);
  return dup;
}

int svc__shm_take_fds(svc__conn_t *c) {
  if (c->tcp)
    return 0;
  while (uv_pipe_pending_count(&c->h.pipe) > 0) {
    int fd = svc__shm_take_one(c);
    if (fd < 0 || svc_shm_offer_fd(&c->shm, fd) != 0)
      return -1;
  }
  return 0;
}

void svc__shm_enter(svc__conn_t *c) {
  svc_server_t *s = c->srv;
  c->shm.room = s->adm.budget > s->adm.held ? s->adm.budget - s->adm.held : 0;
  svc_worker_set_shm(s->worker, c->tcp ? NULL : &c->shm);
}
