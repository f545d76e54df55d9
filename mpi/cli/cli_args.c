/* Value parsers shared by the subcommands (cli_args.h). */
#include "cli_args.h"

#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

int sbn__cli_parse_u64(const char *s, uint64_t max, uint64_t *out) {
  char *end;
  /* strtoull would accept blanks and a sign, and wrap "-1" around. */
  if (*s < '0' || *s > '9')
    return -1;
  errno = 0;
  unsigned long long v = strtoull(s, &end, 10);
  if (errno != 0 || *end != '\0' || v > max)
    return -1;
  *out = (uint64_t)v;
  return 0;
}

int sbn__cli_parse_double(const char *s, double *out) {
  char *end;
  if (*s == '\0' || *s == ' ' || *s == '\t' || *s == '\n')
    return -1;
  errno = 0;
  double v = strtod(s, &end);
  if (end == s || *end != '\0' || errno != 0 || !isfinite(v))
    return -1;
  *out = v;
  return 0;
}

int sbn__cli_parse_layout(const char *s, sbn_layout_t *out) {
  if (strcmp(s, "nchw") == 0)
    *out = SBN_LAYOUT_NCHW;
  else if (strcmp(s, "nhwc") == 0)
    *out = SBN_LAYOUT_NHWC;
  else
    return -1;
  return 0;
}

int sbn__cli_parse_list(const char *s, uint64_t max, uint64_t **out,
                        size_t *n) {
  size_t cap = 1;
  for (const char *q = s; *q; q++)
    cap += *q == ',';
  *n = 0;
  *out = calloc(cap, sizeof **out);
  if (*out == NULL)
    return -1;
  for (const char *q = s;;) {
    const char *comma = strchr(q, ',');
    size_t len = comma ? (size_t)(comma - q) : strlen(q);
    char buf[32];
    if (len == 0 || len >= sizeof buf)
      return -1;
    memcpy(buf, q, len);
    buf[len] = '\0';
    if (sbn__cli_parse_u64(buf, max, &(*out)[*n]) != 0)
      return -1;
    ++*n;
    if (comma == NULL)
      return 0;
    q = comma + 1;
  }
}

int sbn__cli_bad(const char *cmd, const char *flag, const char *arg,
                 const char *what) {
  fprintf(stderr, "syncbn %s: --%s: '%s' is not %s\n", cmd, flag, arg, what);
  return 2;
}

int sbn__cli_set_uint(const char *cmd, void *opts, const sbn__cli_uint_t *t,
                      size_t n, const char *flag, const char *arg) {
  for (size_t i = 0; i < n; i++)
    if (strcmp(flag, t[i].name) == 0) {
      uint64_t *u = (uint64_t *)(void *)((char *)opts + t[i].off);
      if (sbn__cli_parse_u64(arg, t[i].hi, u) != 0 || *u < t[i].lo)
        return sbn__cli_bad(cmd, flag, arg, t[i].what);
      return 0;
    }
  return -1;
}

int sbn__cli_getopt(const char *cmd, int argc, char **argv,
                    const char *const *with_arg, int n_with,
                    const sbn__cli_flag_t *flags, int n_flags,
                    sbn__cli_value_fn on_value, void *ctx,
                    void (*usage)(FILE *), int *help) {
  enum { MAX_OPTS = 48, FLAG0 = 1000, VALUE0 = 2000 };
  struct option opts[MAX_OPTS + 2];
  int n = 0;
  if (n_with + n_flags > MAX_OPTS)
    return 2;
  /* Option values are FLAG0 + i and VALUE0 + i, above every character
   * getopt_long returns itself ('h', '?' and ':'). */
  for (int i = 0; i < n_with; i++)
    opts[n++] =
        (struct option){with_arg[i], required_argument, NULL, VALUE0 + i};
  for (int i = 0; i < n_flags; i++)
    opts[n++] = (struct option){flags[i].name, no_argument, NULL, FLAG0 + i};
  opts[n++] = (struct option){"help", no_argument, NULL, 'h'};
  opts[n] = (struct option){NULL, 0, NULL, 0};
  optind = 1;
  opterr = 0;
  int c;
  /* The leading ':' makes a missing value ':' and an unknown option '?'. */
  while ((c = getopt_long(argc, argv, ":h", opts, NULL)) != -1) {
    if (c == 'h') {
      usage(stdout);
      *help = 1;
      return 0;
    }
    if (c == '?' || c == ':') {
      fprintf(stderr, "syncbn %s: %s: %s\n", cmd, argv[optind - 1],
              c == ':' ? "missing value" : "unknown option");
      return 2;
    }
    if (c >= VALUE0) {
      if (on_value(ctx, with_arg[c - VALUE0], optarg) != 0)
        return 2;
    } else {
      *flags[c - FLAG0].set = 1;
    }
  }
  if (optind < argc) {
    fprintf(stderr, "syncbn %s: unexpected argument '%s'\n", cmd, argv[optind]);
    return 2;
  }
  return 0;
}

/* A variable's value as a rank or size: a decimal below 2^30, else dflt. */
static int env_int(const char *name, int dflt) {
  const char *v = getenv(name);
  uint64_t u;
  if (v == NULL || sbn__cli_parse_u64(v, 1u << 30, &u) != 0)
    return dflt;
  return (int)u;
}

void sbn__cli_launcher_rank(int *rank, int *size) {
  *rank = env_int("OMPI_COMM_WORLD_RANK", env_int("PMI_RANK", 0));
  *size = env_int("OMPI_COMM_WORLD_SIZE", env_int("PMI_SIZE", 1));
}
