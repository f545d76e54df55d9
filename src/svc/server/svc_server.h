/* The syncbnd server: a libuv event loop that moves bytes between Unix
 * socket clients and the worker, and owns connection lifetimes.
 *
 * It listens on a Unix socket and, optionally, on a TCP port. A TCP
 * connection starts unauthenticated: until its first frame, a hello that
 * carries the configured token (compared in constant time), it may send
 * frames of at most SVC_PREAUTH_FRAME_MAX bytes, and anything else is
 * answered UNAUTHORIZED and closed. After that it is served like a Unix
 * connection (SO_PEERCRED does not apply to TCP; the token stands in for
 * it).
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

/* Largest frame body a TCP connection may send before it authenticated:
 * a hello with a token of SVC_TOKEN_MAX bytes fits with room to spare,
 * and an unauthenticated peer cannot make the worker buffer more. */
#define SVC_PREAUTH_FRAME_MAX 4096
/* Seconds a TCP connection has to authenticate (at most frame_timeout). */
#define SVC_AUTH_TIMEOUT 10.0

typedef struct svc_server_config_s {
  const char *socket_path;
  /* TCP listener: NULL for none. tcp_host is an IPv4 or IPv6 literal or a
   * name (getaddrinfo, the first address that binds); tcp_port 0 takes a
   * free port (see svc_server_tcp_info). The token (1..SVC_TOKEN_MAX
   * bytes) is copied; it is required with TCP. */
  const char *tcp_host;
  uint16_t tcp_port;
  const uint8_t *token;
  size_t token_len;
  uint32_t max_clients;
  uint64_t max_output;  /* bytes queued for one client before it is dropped */
  double idle_timeout;  /* seconds without a frame; 0 = never */
  double frame_timeout; /* seconds to finish a started frame; 0 = never */
  svc_limits_t limits;  /* max_frame for the header check */
  /* Admission and memory (svc_admit.h); 0 takes the default of each. */
  uint32_t max_preauth;          /* TCP connections before their hello */
  uint32_t max_preauth_per_addr; /* of those, from one source address */
  uint64_t max_memory; /* input buffered + output queued, all clients */
  int backlog;         /* listen backlog; 0: the system's maximum */
  /* Microseconds the loop keeps polling the sockets after a reply before
   * it sleeps (0: SVC_POLL_US_DEFAULT; negative: never). */
  int64_t poll_us;
} svc_server_config_t;

/* A client's next request usually follows its reply within tens of
 * microseconds to a few milliseconds (the next layer's statistics);
 * read by a loop still polling it costs no wake-up, which on a virtual
 * machine is most of a stats entry. On the Intel virtual machine of
 * 2026-12-03, `syncbn bench service` (np 2, two alternated runs each, its
 * calls a millisecond or more apart) met the stats target on 5-8 of 18
 * shapes with 200 us, 10-11 with 1000 and 14-15 with 2000 (README,
 * "A longer poll window"); two compute processes beside a job whose
 * workers polled all the time ran no slower (scripts/svc_poll_cost.py).
 * The poll yields the core at every turn, so it takes only time nothing
 * else wants. */
#define SVC_POLL_US_DEFAULT 2000

/* Parses one of the server's own options of syncbnd (--max-memory BYTES,
 * --max-preauth N, --max-preauth-per-addr N, --backlog N, --poll-us US)
 * with value v
 * into cfg: 0 when it was one, 1 when a is none of them, or -BAD_PARAMS
 * naming a. svc_server_options_help() is their --help text. */
int svc_server_parse_option(const char *a, const char *v,
                            svc_server_config_t *cfg);
const char *svc_server_options_help(void);
/* Copies the fields svc_server_parse_option sets from src into dst. */
void svc_server_copy_options(svc_server_config_t *dst,
                             const svc_server_config_t *src);

/* Creates dir with mode 0700 if it is missing, then checks that it is a
 * directory (not a symlink), owned by the effective uid, and closed to
 * group and others. Returns 0 or -SVC_BAD_PARAMS (svc_last_error() says
 * why). */
int svc_socket_dir_prepare(const char *dir);

typedef struct svc_server_s svc_server_t;

/* Binds and listens on cfg->socket_path (a stale socket left by a dead
 * worker is replaced; a live one or any other file is an error), and on
 * cfg->tcp_host:tcp_port when tcp_host is set, and
 * installs SIGINT/SIGTERM handlers on a new loop. The worker is borrowed
 * and must outlive the server. Returns 0 or a negative service code
 * (svc_last_error() says why). */
int svc_server_create(const svc_server_config_t *cfg, svc_worker_t *worker,
                      svc_server_t **out);
/* The TCP listener's bound port, and whether its address is a loopback
 * one (127.0.0.0/8, ::1 or ::ffff:127.0.0.0/104), for the caller's
 * messages. Returns -SVC_BAD_PARAMS when there is no TCP listener. */
int svc_server_tcp_info(const svc_server_t *s, int *port, int *loopback);
/* The loop, for later parts that add their own handles to it. */
uv_loop_t *svc_server_loop(svc_server_t *s);
/* Calls fn(arg) every period_us microseconds (rounded up to libuv's
 * milliseconds) from the loop; the timer closes with the server. */
int svc_server_set_tick(svc_server_t *s, uint64_t period_us,
                        void (*fn)(void *arg), void *arg);
/* The worker's deliver callback (svc_deliver_fn): sends a deferred reply
 * on its connection (token) and resumes reading it. */
void svc_server_deliver(void *ctx, void *token, svc_frame_t *reply);
/* Runs until SIGINT or SIGTERM (or svc_server_stop), closing every handle
 * on the way out. Returns the signal number, or 0 when stopped. */
int svc_server_run(svc_server_t *s);
/* Asks a running server to close everything and return from run. */
void svc_server_stop(svc_server_t *s);
/* Frees the server (wiping its copy of the token) and removes its socket
 * file. */
void svc_server_destroy(svc_server_t *s);

#endif /* SBN_SVC_SERVER_H */
