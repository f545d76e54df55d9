/* Internals shared by the server's files (not installed). */
#ifndef SBN_SVC_SERVER_INT_H
#define SBN_SVC_SERVER_INT_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "svc_admit.h"
#include "svc_io.h"
#include "svc_server.h"
#include "svc_shm.h"

#define SVC__READ_BUF (64 * 1024)

/* The server and its connections, shared by svc_server.c (the loop,
 * frames, authentication) and svc_conn.c (a connection's output, closing,
 * admission, the memory budget, the shutdown notice), which sits below it. */
typedef struct svc__conn_s svc__conn_t;

struct svc_server_s {
  uv_loop_t loop;
  int loop_ok;
  uv_pipe_t listener;
  int listening;
  uv_tcp_t tcp_listener;
  int tcp_listening;
  int tcp_port;                 /* bound port */
  int tcp_loopback;             /* the bound address is a loopback one */
  uint8_t token[SVC_TOKEN_MAX]; /* zero past token_len */
  size_t token_len;
  uv_signal_t sigint, sigterm;
  int signals;
  svc_server_config_t cfg;
  svc__adm_t adm; /* client slots and the memory budget (svc_admit.c) */
  char *path;
  int bound; /* the socket file is ours to remove */
  svc_worker_t *worker;
  svc__conn_t *conns; /* every open connection, doubly linked */
  uint32_t nconns;
  int stopping;
  int stop_signal;
  uv_timer_t tick;
  int ticking;
  void (*tick_fn)(void *arg);
  void *tick_arg;
  svc__spin_t spin; /* runs the tick continuously while the worker is busy */
  /* libuv calls alloc and read back to back, so one buffer serves every
   * connection. */
  char rbuf[SVC__READ_BUF];
};

struct svc__conn_s {
  /* First: the handle's address is the connection's. A Unix connection
   * uses pipe, a TCP one tcp; both are streams. */
  union {
    uv_handle_t handle;
    uv_stream_t stream;
    uv_pipe_t pipe;
    uv_tcp_t tcp;
  } h;
  uv_timer_t timer;
  svc_server_t *srv;
  svc__conn_t *prev, *next;
  int handles;     /* open libuv handles; freed when it reaches 0 */
  int closing;     /* uv_close called */
  int close_after; /* close once the queued writes are done */
  int in_frame;    /* some bytes of a frame have arrived */
  int tcp;         /* accepted on the TCP listener */
  int authed;      /* a Unix connection, or a TCP one past its hello */
  uint8_t hdr[SVC_HEADER_BYTES];
  size_t hdr_have;
  uint8_t *body;
  uint32_t body_len, body_have;
  size_t writes;  /* uv_write requests in flight */
  int pending;    /* a deferred reply is owed; reading is paused */
  uint8_t *stash; /* bytes read after the deferred request */
  size_t stash_len;
  svc__adm_conn_t adm; /* its slot and the bytes held for it */
  svc_shm_t shm;       /* shared-memory regions (Unix only, protocol 6) */
};

/* A write in flight: the frame's pieces stay alive until its callback. */
typedef struct svc__write_s {
  uv_write_t req;
  svc_frame_t frame;
} svc__write_t;

/* Connection primitives of svc_conn.c. svc__send takes ownership of buf
 * and drops a client past max_output; svc__send_frame does the same with
 * a frame in pieces (written with one writev, the tensor straight from
 * the buffer it was computed in); svc__fail_conn_id replies with a
 * connection-level error (echoing id when not NULL) and closes after it. */
void svc__conn_close(svc__conn_t *c);
void svc__send(svc__conn_t *c, uint8_t *buf, size_t len);
void svc__send_frame(svc__conn_t *c, svc_frame_t *f);
void svc__fail_conn_id(svc__conn_t *c, const svc_id_t *id, svc_code_t code,
                       const char *m);
void svc__fail_conn(svc__conn_t *c, svc_code_t code, const char *m);

/* Limits of svc_conn.c, called by svc_server.c. */
double svc__now(const svc_server_t *s);
/* Recounts the bytes held for c against the memory budget of all clients,
 * shedding the largest holder when it is passed. */
void svc__account(svc__conn_t *c);
/* A new connection's place (admission): -1 when refused (and closing). */
int svc__admit(svc__conn_t *c);
/* A TCP connection past its hello takes a client slot: 0, or a negative
 * code after the refusal was sent. */
int svc__admit_authed(svc__conn_t *c, const svc_id_t *id);
/* Tells a client, without blocking, that the worker is stopping. */
void svc__say_shutdown(svc__conn_t *c, int signum);

/* Shared memory (svc_shm.c): takes the descriptors that came with the
 * bytes read so far into c's inbox (-1: more than it holds; the caller
 * closes), and lends c's region table to the worker for one request. */
int svc__shm_take_fds(svc__conn_t *c);
void svc__shm_enter(svc__conn_t *c);

/* Removes the socket file at path if nobody answers on it (a worker that
 * died without removing it); a live socket or any other file is refused
 * with BAD_PARAMS. Returns 0 when path is free to bind. */
int svc__socket_clear_stale(const char *path);

#endif /* SBN_SVC_SERVER_INT_H */
