/* syncbn client: the worker's counters (metrics). */
#include <string.h>

#include "client_internal.h"

/* Copies a map str -> uint into tab (at most SBN_CLIENT_METRICS_NAMES
 * entries; names too long for an entry are left out, since a lookup could
 * not match them). */
static int sbn__take_counts(const msgpack_object *m, sbn_client_count_t *tab,
                            size_t *n) {
  *n = 0;
  if (m == NULL || m->type != MSGPACK_OBJECT_MAP)
    return -1;
  for (uint32_t i = 0; i < m->via.map.size; i++) {
    const msgpack_object *k = &m->via.map.ptr[i].key,
                         *v = &m->via.map.ptr[i].val;
    if (k->type != MSGPACK_OBJECT_STR ||
        v->type != MSGPACK_OBJECT_POSITIVE_INTEGER)
      return -1;
    if (*n == SBN_CLIENT_METRICS_NAMES || k->via.str.size >= sizeof tab->name)
      continue;
    memcpy(tab[*n].name, k->via.str.ptr, k->via.str.size);
    tab[*n].name[k->via.str.size] = '\0';
    tab[*n].n = v->via.u64;
    (*n)++;
  }
  return 0;
}

static uint64_t sbn__count_of(const sbn_client_count_t *tab, size_t n,
                              const char *name) {
  for (size_t i = 0; i < n; i++)
    if (strcmp(tab[i].name, name) == 0)
      return tab[i].n;
  return 0;
}

uint64_t sbn_client_metrics_requests(const sbn_client_metrics_t *m,
                                     const char *op) {
  return sbn__count_of(m->requests, m->nrequests, op);
}

uint64_t sbn_client_metrics_errors(const sbn_client_metrics_t *m,
                                   const char *code) {
  return sbn__count_of(m->errors, m->nerrors, code);
}

int sbn_client_metrics(sbn_client_t *c, sbn_client_metrics_t *out) {
  static const char *const buckets[8] = {"1",    "2",     "3-4",   "5-8",
                                         "9-16", "17-32", "33-64", "65+"};
  sbn__req_t r;
  sbn__reply_t p;
  sbn_client_metrics_t m;
  const msgpack_object *fused, *lat;
  const struct {
    const char *key;
    uint64_t *v;
  } u[] = {{"bytes_in", &m.bytes_in},
           {"bytes_out", &m.bytes_out},
           {"frames_in", &m.frames_in},
           {"frames_out", &m.frames_out},
           {"connections", &m.connections},
           {"auth_failures", &m.auth_failures},
           {"allreduces", &m.allreduces},
           {"entries_fused", &m.entries_fused},
           {"gathers", &m.gathers},
           {"negotiations", &m.negotiations},
           {"rounds", &m.rounds},
           {"bells", &m.bells},
           {"agree_bytes", &m.agree_bytes},
           {"cache_hits", &m.cache_hits},
           {"pending", &m.pending},
           {"stalls", &m.stalls},
           {"mismatches", &m.mismatches},
           {"saved_bytes", &m.saved_bytes},
           {"layers", &m.layers}};
  /* Added within protocol 6: a worker from before them does not send
   * them, and they read as 0. */
  const struct {
    const char *key;
    uint64_t *v;
  } later[] = {{"cache_evictions", &m.cache_evictions},
               {"tensor_copies", &m.tensor_copies},
               {"in_place", &m.in_place},
               {"zero_copy_replies", &m.zero_copy_replies},
               {"spec_rounds", &m.spec_rounds},
               {"spec_misses", &m.spec_misses}};
  int rc = sbn__begin(c, "metrics"), bad = 0;
  if (rc != 0)
    return rc;
  memset(&m, 0, sizeof m);
  sbn__req_start(c, &r, "metrics", 2);
  if ((rc = sbn__call(c, &r, &p)) != 0)
    return rc;
  bad |=
      sbn__take_counts(sbn__get(&p.root, "requests"), m.requests, &m.nrequests);
  bad |= sbn__take_counts(sbn__get(&p.root, "errors"), m.errors, &m.nerrors);
  for (size_t i = 0; i < sizeof u / sizeof *u; i++)
    bad |= sbn__uint_field(&p.root, u[i].key, u[i].v);
  for (size_t i = 0; i < sizeof later / sizeof *later; i++)
    if (sbn__get(&p.root, later[i].key) != NULL)
      bad |= sbn__uint_field(&p.root, later[i].key, later[i].v);
  fused = sbn__get(&p.root, "fused_per_allreduce");
  for (int i = 0; i < 8; i++)
    bad |= fused == NULL ||
           sbn__uint_field(fused, buckets[i], &m.fused_per_allreduce[i]) != 0;
  lat = sbn__get(&p.root, "allreduce_latency");
  bad |= lat == NULL || sbn__uint_field(lat, "count", &m.latency_count) != 0 ||
         sbn__num_field(lat, "p50", &m.latency_p50) != 0 ||
         sbn__num_field(lat, "p90", &m.latency_p90) != 0 ||
         sbn__num_field(lat, "p99", &m.latency_p99) != 0 ||
         sbn__num_field(lat, "max", &m.latency_max) != 0;
  sbn__reply_free(&p);
  if (bad)
    return sbn__fail(c, SBN_EFORMAT, "reply lacks a field");
  if (out != NULL)
    *out = m;
  return 0;
}
