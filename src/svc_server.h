/* The syncbnd server: a libuv event loop that moves bytes between Unix
 * socket clients and the worker, and owns connection lifetimes.
 *
 * The server frames bytes (4-byte big-endian length, checked against the
 * frame limit before any body byte is buffered), hands each complete body
 * to svc_worker_handle(), and queues the reply. It enforces the
 * per-connection limits: frame size, an output queue cap (a client that
 * does not read its replies is dropped), an idle timeout, a partial-frame
 * timeout, and the number of clients; and it refuses peers of another uid
 * (SO_PEERCRED). After a fatal error it replies if it can, stops reading
 * that connection, closes it once the reply is written, and keeps serving
 * the others. Work per loop turn is bounded by libuv (at most 32 reads of
 * at most 64 KiB per connection), and the loop never blocks on anything but
 * the kernel's poll, so later parts can drive MPI from it by polling.
 *
 * The server never prints: it reports through return values and messages.
 */
#ifndef SBN_SVC_SERVER_H
#define SBN_SVC_SERVER_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "svc_worker.h"

typedef struct svc_server_config_s {
  const char *socket_path;
  uint32_t max_clients;
  uint64_t max_output;  /* bytes queued for one client before it is dropped */
  double idle_timeout;  /* seconds without a frame; 0 = never */
  double frame_timeout; /* seconds to finish a started frame; 0 = never */
  svc_limits_t limits;  /* max_frame for the header check */
} svc_server_config_t;

/* Creates dir with mode 0700 if it is missing, then checks that it is a
 * directory (not a symlink), owned by the effective uid, and closed to
 * group and others. Returns 0 or -1 with a message in msg. */
int svc_socket_dir_prepare(const char *dir, char *msg, size_t msglen);

typedef struct svc_server_s svc_server_t;

/* Binds and listens on cfg->socket_path (a stale socket left by a dead
 * worker is replaced; a live one or any other file is an error) and
 * installs SIGINT/SIGTERM handlers on a new loop. The worker is borrowed
 * and must outlive the server. Returns 0 or -1 with a message in msg. */
int svc_server_create(const svc_server_config_t *cfg, svc_worker_t *worker,
                      svc_server_t **out, char *msg, size_t msglen);
/* The loop, for later parts that add their own handles to it. */
uv_loop_t *svc_server_loop(svc_server_t *s);
/* Calls fn(arg) every period_us microseconds (rounded up to libuv's
 * milliseconds) from the loop; the timer closes with the server. */
int svc_server_set_tick(svc_server_t *s, uint64_t period_us,
                        void (*fn)(void *arg), void *arg);
/* The worker's deliver callback (svc_deliver_fn): sends a deferred reply
 * on its connection (token) and resumes reading it. */
void svc_server_deliver(void *ctx, void *token, uint8_t *reply, size_t len);
/* Runs until SIGINT or SIGTERM (or svc_server_stop), closing every handle
 * on the way out. Returns the signal number, or 0 when stopped. */
int svc_server_run(svc_server_t *s);
/* Asks a running server to close everything and return from run. */
void svc_server_stop(svc_server_t *s);
/* Frees the server and removes its socket file. */
void svc_server_destroy(svc_server_t *s);

#endif /* SBN_SVC_SERVER_H */
