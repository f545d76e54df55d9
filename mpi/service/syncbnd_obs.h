/* syncbnd's sinks for the worker's events (src/svc/worker/svc_obs.h):
 * --log-level lines on stderr, --timeline as Chrome trace-event JSON. */
#ifndef SYNCBND_OBS_H
#define SYNCBND_OBS_H

#include "svc_obs.h"

/* Installs the sinks for this rank: log lines at or below level, and,
 * when timeline is not NULL, the trace of this rank in timeline with
 * ".json" replaced by ".rank-R.json" (or that appended). Returns 0, or -1
 * with a message on stderr when the file cannot be created. */
int sbnd_obs_start(svc_log_level_t level, const char *timeline, int rank);
/* Completes the trace file (a valid JSON array) and removes the sinks. */
void sbnd_obs_stop(void);

#endif
