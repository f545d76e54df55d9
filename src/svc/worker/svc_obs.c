/* Log events and timeline spans to the program's sinks (svc_obs.h). */
#include "svc_obs.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

static svc_obs_t obs;
static int have_obs;
static double begun[SVC_SPAN_KIND_COUNT];

static const char *const level_names[] = {"error", "warn", "info", "debug"};

void svc_obs_set(const svc_obs_t *o) {
  have_obs = o != NULL;
  if (o != NULL)
    obs = *o;
  else
    memset(&obs, 0, sizeof obs);
}

int svc_log_level_parse(const char *s, svc_log_level_t *out) {
  for (int i = 0; i <= SVC_LOG_DEBUG; i++)
    if (s != NULL && strcmp(s, level_names[i]) == 0) {
      *out = (svc_log_level_t)i;
      return 0;
    }
  return -1;
}

const char *svc_log_level_name(svc_log_level_t level) {
  return level >= SVC_LOG_ERROR && level <= SVC_LOG_DEBUG ? level_names[level]
                                                          : "?";
}

double svc_obs_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

void svc_log(svc_log_level_t level, const char *layer, int64_t step,
             const char *fmt, ...) {
  char msg[512];
  va_list ap;
  if (!have_obs || obs.log == NULL || level > obs.level)
    return;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  obs.log(obs.ctx, level, layer, step, msg);
}

int svc_obs_timeline(void) {
  return have_obs && obs.span != NULL;
}

void svc_obs_span(svc_span_kind_t kind, const char *name, int64_t step,
                  double t0) {
  if (svc_obs_timeline())
    obs.span(obs.ctx, kind, name, step, t0, svc_obs_now());
}

void svc_obs_begin(svc_span_kind_t kind) {
  if (svc_obs_timeline())
    begun[kind] = svc_obs_now();
}

void svc_obs_end(svc_span_kind_t kind) {
  if (svc_obs_timeline() && begun[kind] > 0) {
    obs.span(obs.ctx, kind, NULL, -1, begun[kind], svc_obs_now());
    begun[kind] = 0;
  }
}
