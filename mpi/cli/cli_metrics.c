/* `syncbn metrics`: a running worker's counters (the protocol's metrics
 * request through the C client), as a table or as JSON. Needs no MPI: it
 * is a client of the workers' Unix sockets. */
#define _GNU_SOURCE /* scandir, alphasort */
#include <dirent.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "cli.h"
#include "client.h"

static void usage(FILE *f) {
  fprintf(f,
          "usage: syncbn metrics [--socket PATH|DIR] [--json]\n"
          "\n"
          "Prints the counters of running syncbnd workers: requests by op, "
          "errors by\n"
          "code, bytes and frames, connections, refused tokens, fused "
          "allreduces and\n"
          "their latency percentiles, stalls, mismatches.\n"
          "\n"
          "  --socket PATH   a worker's socket; a directory means every "
          "rank-*.sock in\n"
          "                  it (default: $SYNCBN_SOCKET, as `syncbnd -- "
          "COMMAND` sets it)\n"
          "  --json          one JSON object per worker (an array for a "
          "directory)\n");
}

static void print_table(const char *path, const sbn_client_hello_t *h,
                        const sbn_client_metrics_t *m) {
  printf("rank %d of %d (%s)\n", h->rank, h->size, path);
  printf("  %-22s", "requests");
  for (size_t i = 0; i < m->nrequests; i++)
    if (m->requests[i].n > 0)
      printf(" %s %llu", m->requests[i].name,
             (unsigned long long)m->requests[i].n);
  printf("\n  %-22s", "errors");
  for (size_t i = 0; i < m->nerrors; i++)
    printf(" %s %llu", m->errors[i].name, (unsigned long long)m->errors[i].n);
  printf("%s\n", m->nerrors == 0 ? " none" : "");
  printf("  %-22s in %llu (%llu frames), out %llu (%llu frames)\n", "bytes",
         (unsigned long long)m->bytes_in, (unsigned long long)m->frames_in,
         (unsigned long long)m->bytes_out, (unsigned long long)m->frames_out);
  printf("  %-22s %llu (auth failures %llu)\n", "connections",
         (unsigned long long)m->connections,
         (unsigned long long)m->auth_failures);
  printf("  %-22s %llu carrying %llu entries; %llu agreement rounds\n",
         "allreduces", (unsigned long long)m->allreduces,
         (unsigned long long)m->entries_fused, (unsigned long long)m->gathers);
  printf("  %-22s p50 %.3g s, p90 %.3g s, p99 %.3g s, max %.3g s (%llu)\n",
         "allreduce latency", m->latency_p50, m->latency_p90, m->latency_p99,
         m->latency_max, (unsigned long long)m->latency_count);
  printf(
      "  %-22s stalls %llu, mismatches %llu, layers %llu, saved %llu "
      "bytes\n",
      "state", (unsigned long long)m->stalls, (unsigned long long)m->mismatches,
      (unsigned long long)m->layers, (unsigned long long)m->saved_bytes);
}

static void print_counts(const char *key, const sbn_client_count_t *c,
                         size_t n) {
  printf("\"%s\":{", key);
  for (size_t i = 0; i < n; i++)
    printf("%s\"%s\":%llu", i ? "," : "", c[i].name,
           (unsigned long long)c[i].n);
  printf("}");
}

/* The protocol's names and the worker's own names are plain identifiers
 * (ops, error codes), so they need no JSON escaping; the path is the
 * caller's and is escaped. */
static void print_json(const char *path, const sbn_client_hello_t *h,
                       const sbn_client_metrics_t *m) {
  static const char *const buckets[8] = {"1",    "2",     "3-4",   "5-8",
                                         "9-16", "17-32", "33-64", "65+"};
  printf("{\"socket\":\"");
  for (const char *s = path; *s != '\0'; s++)
    printf(*s == '"' || *s == '\\' ? "\\%c" : "%c", *s);
  printf("\",\"rank\":%d,\"size\":%d,", h->rank, h->size);
  print_counts("requests", m->requests, m->nrequests);
  printf(",");
  print_counts("errors", m->errors, m->nerrors);
  printf(
      ",\"bytes_in\":%llu,\"bytes_out\":%llu,\"frames_in\":%llu,"
      "\"frames_out\":%llu,\"connections\":%llu,\"auth_failures\":%llu,"
      "\"allreduces\":%llu,\"entries_fused\":%llu,\"gathers\":%llu,"
      "\"fused_per_allreduce\":{",
      (unsigned long long)m->bytes_in, (unsigned long long)m->bytes_out,
      (unsigned long long)m->frames_in, (unsigned long long)m->frames_out,
      (unsigned long long)m->connections, (unsigned long long)m->auth_failures,
      (unsigned long long)m->allreduces, (unsigned long long)m->entries_fused,
      (unsigned long long)m->gathers);
  for (int i = 0; i < 8; i++)
    printf("%s\"%s\":%llu", i ? "," : "", buckets[i],
           (unsigned long long)m->fused_per_allreduce[i]);
  printf(
      "},\"allreduce_latency\":{\"count\":%llu,\"p50\":%.9g,\"p90\":%.9g,"
      "\"p99\":%.9g,\"max\":%.9g},\"stalls\":%llu,\"mismatches\":%llu,"
      "\"saved_bytes\":%llu,\"layers\":%llu}",
      (unsigned long long)m->latency_count, m->latency_p50, m->latency_p90,
      m->latency_p99, m->latency_max, (unsigned long long)m->stalls,
      (unsigned long long)m->mismatches, (unsigned long long)m->saved_bytes,
      (unsigned long long)m->layers);
}

/* One worker: connect, hello, metrics, print. */
static int one(const char *path, int json) {
  sbn_client_t *c = NULL;
  sbn_client_hello_t h;
  sbn_client_metrics_t *m = NULL;
  int rc = 1;
  if ((m = calloc(1, sizeof *m)) == NULL) {
    fprintf(stderr, "syncbn metrics: out of memory\n");
    goto fail;
  }
  if (sbn_client_connect(path, &c) != 0 || sbn_client_hello(c, &h) != 0 ||
      sbn_client_metrics(c, m) != 0) {
    fprintf(stderr, "syncbn metrics: %s: %s\n", path, sbn_last_error());
    goto fail;
  }
  if (json)
    print_json(path, &h, m);
  else
    print_table(path, &h, m);
  rc = 0;
fail:
  sbn_client_close(c);
  free(m);
  return rc;
}

static int is_rank_socket(const struct dirent *e) {
  size_t n = strlen(e->d_name);
  return strncmp(e->d_name, "rank-", 5) == 0 && n > 10 &&
         strcmp(e->d_name + n - 5, ".sock") == 0;
}

/* Every rank-*.sock of dir, in name order (rank-10 after rank-1: the
 * rank is in each entry). */
static int all(const char *dir, int json) {
  struct dirent **list = NULL;
  char path[PATH_MAX];
  int n = scandir(dir, &list, is_rank_socket, alphasort), rc = 0;
  if (n < 0) {
    perror(dir);
    return 1;
  }
  if (n == 0) {
    fprintf(stderr, "syncbn metrics: %s: no rank-*.sock in it\n", dir);
    rc = 1;
  }
  if (json)
    printf("[");
  for (int i = 0; i < n; i++) {
    if (json && i > 0)
      printf(",\n");
    if (snprintf(path, sizeof path, "%s/%s", dir, list[i]->d_name) >=
        (int)sizeof path)
      rc = 1;
    else if (one(path, json) != 0)
      rc = 1;
    free(list[i]);
  }
  if (json)
    printf("]\n");
  free(list);
  return rc;
}

int sbn_cli_metrics(int argc, char **argv) {
  const char *sock = getenv("SYNCBN_SOCKET");
  struct stat st;
  int json = 0, rc;
  for (int i = 1; i < argc; i++) {
    if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
      usage(stdout);
      return 0;
    } else if (strcmp(argv[i], "--json") == 0) {
      json = 1;
    } else if (strcmp(argv[i], "--socket") == 0 && i + 1 < argc) {
      sock = argv[++i];
    } else {
      fprintf(stderr, "syncbn metrics: %s: unknown option or missing value\n",
              argv[i]);
      usage(stderr);
      return 2;
    }
  }
  if (sock == NULL || sock[0] == '\0') {
    fprintf(stderr,
            "syncbn metrics: no worker given: pass --socket PATH|DIR "
            "or set SYNCBN_SOCKET\n");
    return 2;
  }
  if (stat(sock, &st) != 0) {
    perror(sock);
    return 1;
  }
  if (S_ISDIR(st.st_mode))
    return all(sock, json);
  rc = one(sock, json);
  if (json && rc == 0)
    printf("\n");
  return rc;
}
