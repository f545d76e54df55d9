/* syncbnd's log and timeline sinks (syncbnd_obs.h). */
#include "syncbnd_obs.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>

static struct {
  int rank;
  FILE *trace;
  int events;
  double t0;
} g;

static const char *const span_names[SVC_SPAN_KIND_COUNT] = {
    [SVC_SPAN_NEGOTIATION] = "negotiation",
    [SVC_SPAN_ALLREDUCE] = "allreduce",
    [SVC_SPAN_COMPUTE] = "compute",
};

static void log_line(void *ctx, svc_log_level_t level, const char *layer,
                     int64_t step, const char *msg) {
  char where[320] = "";
  (void)ctx;
  if (layer != NULL)
    snprintf(where, sizeof where, " layer '%s':", layer);
  else if (step >= 0)
    snprintf(where, sizeof where, " step %lld:", (long long)step);
  fprintf(stderr, "syncbnd: rank %d: %s:%s %s\n", g.rank,
          svc_log_level_name(level), where, msg);
}

/* s as the inside of a JSON string. */
static void json_str(FILE *f, const char *s) {
  for (; *s != '\0'; s++) {
    unsigned char c = (unsigned char)*s;
    if (c == '"' || c == '\\')
      fprintf(f, "\\%c", c);
    else if (c < 0x20)
      fprintf(f, "\\u%04x", c);
    else
      fputc(c, f);
  }
}

static void span(void *ctx, svc_span_kind_t kind, const char *name,
                 int64_t step, double t0, double t1) {
  FILE *f = g.trace;
  (void)ctx;
  fprintf(f, ",\n{\"name\":\"");
  json_str(f, name != NULL ? name : span_names[kind]);
  fprintf(f,
          "\",\"cat\":\"%s\",\"ph\":\"X\",\"ts\":%.3f,\"dur\":%.3f,"
          "\"pid\":%d,\"tid\":%d",
          span_names[kind], (t0 - g.t0) * 1e6, (t1 - t0) * 1e6, g.rank,
          (int)kind);
  if (step >= 0)
    fprintf(f, ",\"args\":{\"step\":%lld}", (long long)step);
  fputc('}', f);
  g.events++;
}

/* PREFIX.json -> PREFIX.rank-R.json; anything else gets .rank-R.json. */
static int trace_path(const char *file, int rank, char *out, size_t n) {
  size_t len = strlen(file);
  int rc;
  if (len > 5 && strcmp(file + len - 5, ".json") == 0)
    rc = snprintf(out, n, "%.*s.rank-%d.json", (int)(len - 5), file, rank);
  else
    rc = snprintf(out, n, "%s.rank-%d.json", file, rank);
  return rc > 0 && (size_t)rc < n ? 0 : -1;
}

int sbnd_obs_start(svc_log_level_t level, const char *timeline, int rank) {
  svc_obs_t o;
  char path[PATH_MAX];
  memset(&o, 0, sizeof o);
  g.rank = rank;
  g.t0 = svc_obs_now();
  o.level = level;
  o.log = log_line;
  if (timeline != NULL) {
    if (trace_path(timeline, rank, path, sizeof path) != 0 ||
        (g.trace = fopen(path, "w")) == NULL) {
      fprintf(stderr, "syncbnd: rank %d: --timeline %s: %s\n", rank, timeline,
              errno != 0 ? strerror(errno) : "path too long");
      return -1;
    }
    /* The metadata names the rank's row and threads in the viewer; the
     * events follow, each after a comma. */
    fprintf(g.trace,
            "[\n{\"name\":\"process_name\",\"ph\":\"M\",\"pid\":%d,"
            "\"args\":{\"name\":\"syncbnd rank %d\"}}",
            rank, rank);
    for (int k = 0; k < SVC_SPAN_KIND_COUNT; k++)
      fprintf(g.trace,
              ",\n{\"name\":\"thread_name\",\"ph\":\"M\",\"pid\":%d,"
              "\"tid\":%d,\"args\":{\"name\":\"%s\"}}",
              rank, k, span_names[k]);
    o.span = span;
  }
  svc_obs_set(&o);
  return 0;
}

void sbnd_obs_stop(void) {
  svc_obs_set(NULL);
  if (g.trace != NULL) {
    fprintf(g.trace, "\n]\n");
    fclose(g.trace);
    g.trace = NULL;
  }
}
