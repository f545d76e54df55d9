/* What a worker is doing, for people: log events (stalls, mismatches,
 * refused clients, connections) and timeline spans (negotiation rounds,
 * allreduces, the per-layer work that completes them).
 *
 * The library never prints: events go to the sinks the program installs
 * with svc_obs_set (syncbnd writes them to stderr and to a Chrome
 * trace-event file). Without sinks every call is a test of one pointer.
 * The state is per process, as there is one worker per process. */
#ifndef SVC_OBS_H
#define SVC_OBS_H

#include <stdint.h>

typedef enum svc_log_level_e {
  SVC_LOG_ERROR = 0,
  SVC_LOG_WARN = 1,
  SVC_LOG_INFO = 2,
  SVC_LOG_DEBUG = 3
} svc_log_level_t;

/* The kinds of timeline spans. */
typedef enum svc_span_kind_e {
  SVC_SPAN_NEGOTIATION = 0, /* one agreement round (the ready-list gather) */
  SVC_SPAN_ALLREDUCE = 1,   /* one fused allreduce */
  SVC_SPAN_COMPUTE = 2,     /* one layer's entry completed after a reduce */
  SVC_SPAN_KIND_COUNT
} svc_span_kind_t;

typedef struct svc_obs_s {
  svc_log_level_t level; /* events above it are dropped */
  /* msg is a sentence; layer is NULL and step negative when the event
   * has none. The strings live for the call only. */
  void (*log)(void *ctx, svc_log_level_t level, const char *layer, int64_t step,
              const char *msg);
  /* A finished span [t0, t1] in seconds of svc_obs_now(); name is the
   * layer for COMPUTE, else NULL; step negative when none. */
  void (*span)(void *ctx, svc_span_kind_t kind, const char *name, int64_t step,
               double t0, double t1);
  void *ctx;
} svc_obs_t;

/* Installs the sinks (copied); NULL removes them. */
void svc_obs_set(const svc_obs_t *obs);
/* The level names ("error", "warn", "info", "debug"): 0 and *out, or -1. */
int svc_log_level_parse(const char *s, svc_log_level_t *out);
const char *svc_log_level_name(svc_log_level_t level);
/* Monotonic seconds. */
double svc_obs_now(void);

/* One event, printf-style. */
void svc_log(svc_log_level_t level, const char *layer, int64_t step,
             const char *fmt, ...) __attribute__((format(printf, 4, 5)));
/* Whether a timeline sink is installed (to skip taking times). */
int svc_obs_timeline(void);
/* A span of kind that started at t0 and ends now. */
void svc_obs_span(svc_span_kind_t kind, const char *name, int64_t step,
                  double t0);
/* For the spans that begin and end in different functions (at most one
 * of each kind is in flight): mark the start, then end it. */
void svc_obs_begin(svc_span_kind_t kind);
void svc_obs_end(svc_span_kind_t kind);

#endif
