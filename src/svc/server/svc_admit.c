/* Admission and the worker-wide memory budget (see svc_admit.h). */
#include "svc_admit.h"

#include <errno.h>
#include <stdlib.h>

#include "svc_server.h"

#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

uint64_t svc__adm_default_budget(void) {
  long pages = sysconf(_SC_PHYS_PAGES), psize = sysconf(_SC_PAGESIZE);
  uint64_t floor = (uint64_t)64 << 20, b;
  if (pages <= 0 || psize <= 0)
    return (uint64_t)1 << 30;
  /* An eighth leaves room for the other ranks on the machine, the layers'
   * kept state and everything else the machine runs. */
  b = (uint64_t)pages * (uint64_t)psize / 8;
  return b < floor ? floor : b;
}

int svc__backlog(int backlog) {
  FILE *f;
  int n = 0;
  if (backlog > 0)
    return backlog;
  f = fopen("/proc/sys/net/core/somaxconn", "r");
  if (f != NULL) {
    if (fscanf(f, "%d", &n) != 1)
      n = 0;
    fclose(f);
  }
  return n > 0 ? n : SOMAXCONN;
}

void svc__adm_init(svc__adm_t *a, uint32_t max_clients, uint32_t max_preauth,
                   uint32_t max_per_addr, uint64_t budget) {
  memset(a, 0, sizeof *a);
  a->max_clients = max_clients;
  a->max_preauth = max_preauth > 0 ? max_preauth : SVC_PREAUTH_MAX;
  a->max_per_addr = max_per_addr > 0 ? max_per_addr : SVC_PREAUTH_PER_ADDR;
  a->reclaim_idle = SVC_RECLAIM_IDLE;
  a->budget = budget > 0 ? budget : svc__adm_default_budget();
}

/* Whether two peers have the same source address (the port aside). */
static int svc__same_addr(const struct sockaddr_storage *x,
                          const struct sockaddr_storage *y) {
  if (x->ss_family != y->ss_family)
    return 0;
  if (x->ss_family == AF_INET)
    return ((const struct sockaddr_in *)x)->sin_addr.s_addr ==
           ((const struct sockaddr_in *)y)->sin_addr.s_addr;
  if (x->ss_family == AF_INET6)
    return memcmp(&((const struct sockaddr_in6 *)x)->sin6_addr,
                  &((const struct sockaddr_in6 *)y)->sin6_addr,
                  sizeof(struct in6_addr)) == 0;
  return 0;
}

/* The slot holder idle the longest, if it has been idle for at least
 * reclaim_idle seconds; NULL otherwise. A client in the middle of a
 * request is never reclaimed. */
static svc__adm_conn_t *svc__oldest_idle(const svc__adm_t *a, double now) {
  svc__adm_conn_t *best = NULL;
  for (svc__adm_conn_t *c = a->all; c != NULL; c = c->next)
    if (c->authed && c->idle && now - c->since >= a->reclaim_idle &&
        (best == NULL || c->since < best->since))
      best = c;
  return best;
}

/* Takes a slot for c, reclaiming the longest-idle one when all are held. */
static svc_code_t svc__take_slot(svc__adm_t *a, svc__adm_conn_t *c, double now,
                                 void **victim, const char **why) {
  if (a->nauthed >= a->max_clients) {
    svc__adm_conn_t *v = svc__oldest_idle(a, now);
    if (v == NULL) {
      *why = "connection: the worker serves max_clients clients, all busy";
      return SVC_TOO_MANY_CLIENTS;
    }
    /* The victim gives its slot up now; the caller closes it. */
    v->authed = 0;
    a->nauthed--;
    *victim = v->conn;
  }
  c->authed = 1;
  a->nauthed++;
  return SVC_OK;
}

svc_code_t svc__adm_accept(svc__adm_t *a, svc__adm_conn_t *c, void *conn,
                           int tcp, const struct sockaddr *peer, double now,
                           void **victim, const char **why) {
  svc_code_t code = SVC_OK;
  memset(c, 0, sizeof *c);
  *victim = NULL;
  c->conn = conn;
  c->tcp = tcp;
  c->idle = 1;
  c->since = now;
  if (tcp && peer != NULL) {
    size_t n = peer->sa_family == AF_INET6 ? sizeof(struct sockaddr_in6)
                                           : sizeof(struct sockaddr_in);
    memcpy(&c->peer, peer, n);
  }
  if (tcp) {
    /* Before its hello a TCP connection holds one of a few places of its
     * own, never a client slot, so that whoever can reach the port without
     * the token cannot lock local clients out. */
    uint32_t same = 0;
    for (const svc__adm_conn_t *o = a->all; o != NULL; o = o->next)
      if (o->tcp == 1 && svc__same_addr(&o->peer, &c->peer))
        same++;
    c->conn = NULL; /* until admitted */
    if (a->npreauth >= a->max_preauth) {
      *why = "connection: too many TCP connections waiting to authenticate";
      return SVC_TOO_MANY_CLIENTS;
    }
    if (same >= a->max_per_addr) {
      *why =
          "connection: too many TCP connections from this address "
          "waiting to authenticate";
      return SVC_TOO_MANY_CLIENTS;
    }
    a->npreauth++;
    c->conn = conn;
  } else if ((code = svc__take_slot(a, c, now, victim, why)) != SVC_OK) {
    c->conn = NULL; /* not admitted: leave() has nothing to give back */
    return code;
  }
  c->next = a->all;
  if (a->all != NULL)
    a->all->prev = c;
  a->all = c;
  return SVC_OK;
}

svc_code_t svc__adm_authed(svc__adm_t *a, svc__adm_conn_t *c, double now,
                           void **victim, const char **why) {
  *victim = NULL;
  if (c->authed)
    return SVC_OK;
  a->npreauth--;
  c->tcp = 2; /* no longer counted as pre-authentication */
  return svc__take_slot(a, c, now, victim, why);
}

void svc__adm_leave(svc__adm_t *a, svc__adm_conn_t *c) {
  if (c->conn == NULL)
    return;
  if (c->authed)
    a->nauthed--;
  else if (c->tcp == 1)
    a->npreauth--;
  a->held -= c->held;
  if (c->prev != NULL)
    c->prev->next = c->next;
  else
    a->all = c->next;
  if (c->next != NULL)
    c->next->prev = c->prev;
  memset(c, 0, sizeof *c);
}

void svc__adm_idle(svc__adm_conn_t *c, int idle, double now) {
  if (idle && !c->idle)
    c->since = now;
  c->idle = idle;
}

void *svc__adm_hold(svc__adm_t *a, svc__adm_conn_t *c, uint64_t held) {
  svc__adm_conn_t *big = NULL;
  if (c->conn == NULL)
    return NULL;
  a->held = a->held - c->held + held;
  c->held = held;
  if (a->held <= a->budget)
    return NULL;
  for (svc__adm_conn_t *o = a->all; o != NULL; o = o->next)
    if (big == NULL || o->held > big->held)
      big = o;
  return big != NULL && big->held > 0 ? big->conn : NULL;
}

/* An unsigned decimal in [lo, hi], or -BAD_PARAMS naming the option. */
static int svc__opt_u64(const char *a, const char *v, uint64_t lo, uint64_t hi,
                        uint64_t *out) {
  char *end = NULL;
  unsigned long long u;
  errno = 0;
  if (v == NULL || v[0] < '0' || v[0] > '9')
    return svc_set_error(SVC_BAD_PARAMS, "%s: expected a number, got '%s'", a,
                         v != NULL ? v : "");
  u = strtoull(v, &end, 10);
  if (errno != 0 || *end != '\0' || u < lo || u > hi)
    return svc_set_error(SVC_BAD_PARAMS, "%s: '%s' is not in [%llu, %llu]", a,
                         v, (unsigned long long)lo, (unsigned long long)hi);
  *out = u;
  return 0;
}

int svc_server_parse_option(const char *a, const char *v,
                            svc_server_config_t *cfg) {
  uint64_t u = 0;
  int rc;
  if (strcmp(a, "--max-memory") == 0) {
    if ((rc = svc__opt_u64(a, v, (uint64_t)1 << 20, UINT64_MAX, &u)) != 0)
      return rc;
    cfg->max_memory = u;
  } else if (strcmp(a, "--max-preauth") == 0) {
    if ((rc = svc__opt_u64(a, v, 1, 100000, &u)) != 0)
      return rc;
    cfg->max_preauth = (uint32_t)u;
  } else if (strcmp(a, "--max-preauth-per-addr") == 0) {
    if ((rc = svc__opt_u64(a, v, 1, 100000, &u)) != 0)
      return rc;
    cfg->max_preauth_per_addr = (uint32_t)u;
  } else if (strcmp(a, "--backlog") == 0) {
    if ((rc = svc__opt_u64(a, v, 1, 1 << 20, &u)) != 0)
      return rc;
    cfg->backlog = (int)u;
  } else if (strcmp(a, "--poll-us") == 0) {
    if ((rc = svc__opt_u64(a, v, 0, 1000000, &u)) != 0)
      return rc;
    cfg->poll_us = u == 0 ? -1 : (int64_t)u;
  } else {
    return 1;
  }
  return 0;
}

void svc_server_copy_options(svc_server_config_t *dst,
                             const svc_server_config_t *src) {
  dst->max_memory = src->max_memory;
  dst->max_preauth = src->max_preauth;
  dst->max_preauth_per_addr = src->max_preauth_per_addr;
  dst->backlog = src->backlog;
  dst->poll_us = src->poll_us;
}

const char *svc_server_options_help(void) {
  return "  --max-memory BYTES   bytes buffered for all clients together "
         "(frames being\n"
         "                       read, requests waiting, unread replies); past "
         "it the\n"
         "                       largest holder is dropped (default: an eighth "
         "of\n"
         "                       the machine's memory, at least 64 MiB)\n"
         "  --max-preauth N      TCP connections waiting to authenticate, "
         "which never\n"
         "                       take client slots (default 16)\n"
         "  --max-preauth-per-addr N\n"
         "                       of those, from one source address (default "
         "4)\n"
         "  --backlog N          listen backlog (default: the system's "
         "maximum,\n"
         "                       /proc/sys/net/core/somaxconn)\n"
         "  --poll-us US         after a reply, keep polling the sockets for "
         "US\n"
         "                       microseconds (giving the core to any other "
         "process\n"
         "                       between polls) before sleeping, so that a "
         "request\n"
         "                       right behind it needs no wake-up; 0 = never "
         "(default\n"
         "                       2000)\n";
}
