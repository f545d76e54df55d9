/* Admission and the worker-wide memory budget of the server (not
 * installed): which connection may take a client slot, which one gives its
 * slot up when the worker is full, and which one is shed when the bytes
 * the server holds for all connections together pass the budget.
 *
 * The server embeds one svc__adm_conn_t in each connection and one
 * svc__adm_t in itself; this room keeps the counts and picks victims, the
 * server does the closing (it owns connection lifetimes). Nothing here
 * allocates. */
#ifndef SBN_SVC_ADMIT_H
#define SBN_SVC_ADMIT_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include "svc_codec.h"

/* A connection as admission sees it. */
typedef struct svc__adm_conn_s {
  void *conn; /* the server's connection (the victim handed back) */
  struct svc__adm_conn_s *prev, *next;
  int tcp;      /* accepted on the TCP listener */
  int authed;   /* holds a client slot (Unix, or TCP past its hello) */
  int idle;     /* between requests: nothing buffered, nothing owed */
  double since; /* when it last became idle */
  uint64_t held;
  struct sockaddr_storage peer; /* TCP peer (family 0 for Unix) */
} svc__adm_conn_t;

typedef struct svc__adm_s {
  svc__adm_conn_t *all;
  uint32_t max_clients;  /* slots of authenticated clients */
  uint32_t max_preauth;  /* TCP connections before their hello */
  uint32_t max_per_addr; /* of those, from one source address */
  double reclaim_idle;   /* least idle time of a reclaimed slot (s) */
  uint64_t budget;       /* bytes held for all connections */
  uint32_t nauthed, npreauth;
  uint64_t held;
} svc__adm_t;

/* Defaults: 16 pre-authentication connections, 4 from one address, and a
 * budget of an eighth of the machine's memory (at least 64 MiB). */
#define SVC_PREAUTH_MAX 16
#define SVC_PREAUTH_PER_ADDR 4
#define SVC_RECLAIM_IDLE 1.0
uint64_t svc__adm_default_budget(void);

/* The listen backlog: backlog when positive, else the system's maximum
 * (/proc/sys/net/core/somaxconn, or SOMAXCONN where it cannot be read), so
 * that a burst of connects is queued rather than dropped. */
int svc__backlog(int backlog);

/* Fills a with the limits (0 budget: the default). */
void svc__adm_init(svc__adm_t *a, uint32_t max_clients, uint32_t max_preauth,
                   uint32_t max_per_addr, uint64_t budget);

/* A new connection: 0 when it is admitted (it is linked in, holding a
 * slot when it is a Unix one, a pre-authentication place when it is TCP),
 * else the refusal code with *why set. A Unix connection that finds every
 * slot taken may be admitted by reclaiming one: *victim is then the
 * longest-idle connection, which the caller closes with an error. */
svc_code_t svc__adm_accept(svc__adm_t *a, svc__adm_conn_t *c, void *conn,
                           int tcp, const struct sockaddr *peer, double now,
                           void **victim, const char **why);
/* A TCP connection passed its hello: it moves from the pre-authentication
 * places to a slot, on the same terms as a Unix connection. */
svc_code_t svc__adm_authed(svc__adm_t *a, svc__adm_conn_t *c, double now,
                           void **victim, const char **why);
/* The connection went: its place and its bytes are given back. */
void svc__adm_leave(svc__adm_t *a, svc__adm_conn_t *c);
/* The connection is between requests (idle) or not, since now. */
void svc__adm_idle(svc__adm_conn_t *c, int idle, double now);
/* The bytes the server holds for c are now held; returns the connection
 * holding the most (c itself possibly) when the total passes the budget,
 * else NULL. */
void *svc__adm_hold(svc__adm_t *a, svc__adm_conn_t *c, uint64_t held);

#endif /* SBN_SVC_ADMIT_H */
