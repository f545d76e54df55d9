/* The worker's registry: layers, their kept forward steps and the budget
 * of saved state, and the small helpers every room shares. It calls
 * nothing above it. */
#include <stdlib.h>
#include <string.h>

#include "svc_worker_int.h"

svc__layer_t *svc__layer(svc_worker_t *w, uint64_t id, int *rc) {
  if (id >= w->nlayers) {
    *rc = svc_set_error(SVC_UNKNOWN_LAYER, "layer: no layer %llu",
                        (unsigned long long)id);
    return NULL;
  }
  return w->layers[id];
}

void svc__layer_append(svc_worker_t *w, svc__layer_t *l) {
  w->layers[w->nlayers++] = l;
}

void svc__step_release(svc_worker_t *w, svc__step_t *s) {
  if (s->x_shm == NULL) /* else the client's bytes in its region */
    free(s->x);
  s->x_shm = NULL;
  free(s->w);
  free(s->b);
  free(s->saved);
  s->x = s->w = s->b = NULL;
  s->saved = NULL;
  w->saved_bytes -= s->bytes;
  s->bytes = 0;
}

void svc__layer_free(svc_worker_t *w, svc__layer_t *l) {
  svc__step_t *s, *next;
  if (l == NULL)
    return;
  for (s = l->steps; s != NULL; s = next) {
    next = s->next;
    svc__step_release(w, s);
    free(s);
  }
  sbn_layer_destroy(l->layer);
  free(l->weight);
  free(l->bias);
  free(l->running_mean);
  free(l->running_var);
  free(l);
}

int svc__budget_take(svc_worker_t *w, uint64_t bytes) {
  if (bytes > w->cfg.max_saved - w->saved_bytes ||
      w->saved_bytes > w->cfg.max_saved)
    return svc_set_error(SVC_RESOURCE,
                         "forward: keeping %llu more bytes of forward state "
                         "exceeds max_saved (%llu kept)",
                         (unsigned long long)bytes,
                         (unsigned long long)w->saved_bytes);
  w->saved_bytes += bytes;
  return 0;
}

int svc__step_stale(const svc_worker_t *w, uint64_t step, uint64_t newest) {
  /* A difference, never step + keep_steps: that sum wraps near 2^64. */
  return step < newest && newest - step > w->cfg.keep_steps;
}

/* Drops the forward state of steps that fell out of the window. */
void svc__prune(svc_worker_t *w, svc__layer_t *l) {
  svc__step_t **pp = &l->steps;
  while (*pp != NULL) {
    svc__step_t *s = *pp;
    if (svc__step_stale(w, s->step, l->max_step) && !s->busy) {
      *pp = s->next;
      svc__step_release(w, s);
      free(s);
    } else {
      pp = &s->next;
    }
  }
}

void svc__step_keep(svc_worker_t *w, svc__layer_t *l, svc__step_t *s) {
  s->next = l->steps;
  l->steps = s;
  if (!l->have_step || s->step > l->max_step)
    l->max_step = s->step;
  l->have_step = 1;
  svc__prune(w, l);
}

svc__step_t *svc__find_step(svc__layer_t *l, uint64_t step) {
  for (svc__step_t *s = l->steps; s != NULL; s = s->next)
    if (s->step == step)
      return s;
  return NULL;
}

/* Library failures as protocol codes: anything about the data's shape is
 * the client's; memory is a resource; the rest is ours. */
svc_code_t svc__lib_code(int rc) {
  switch (rc) {
    case SBN_ESHAPE:
    case SBN_EINVAL:
    case SBN_EOVERFLOW:
      return SVC_SHAPE;
    case SBN_ESMALLBATCH:
      return SVC_SMALL_BATCH;
    case SBN_ENOMEM:
      return SVC_RESOURCE;
    default:
      return SVC_INTERNAL;
  }
}

int svc__lib_error(int rc) {
  return svc_set_error(svc__lib_code(rc), "%s", sbn_last_error());
}

float *svc__floats(size_t n) {
  size_t bytes = n * sizeof(float);
  if (n == 0)
    return NULL;
  return aligned_alloc(64, (bytes + 63) & ~(size_t)63);
}

/* ghost_batch is not compared here but by register: checkpoints (the
 * other caller) do not store it, since running statistics mean the same
 * for every ghost batch size. */
int svc__lib_params_equal(const sbn_layer_params_t *a,
                          const sbn_layer_params_t *b) {
  if (a->op != b->op || a->channels != b->channels || a->groups != b->groups ||
      a->norm_ndim != b->norm_ndim || a->eps != b->eps ||
      a->momentum != b->momentum || a->cumulative != b->cumulative ||
      a->affine != b->affine ||
      a->track_running_stats != b->track_running_stats || a->p != b->p ||
      a->seed != b->seed)
    return 0;
  for (int i = 0; i < a->norm_ndim; i++)
    if (a->norm_shape[i] != b->norm_shape[i])
      return 0;
  return 1;
}

uint64_t svc__hash_name(const char *name) {
  uint64_t h = 1469598103934665603ull;
  for (const unsigned char *c = (const unsigned char *)name; *c; c++) {
    h ^= *c;
    h *= 1099511628211ull;
  }
  return h;
}

static uint64_t svc__mix(uint64_t h, uint64_t v) {
  for (int i = 0; i < 8; i++) {
    h ^= (v >> (8 * i)) & 0xff;
    h *= 1099511628211ull;
  }
  return h;
}

uint64_t svc__fingerprint(const svc__layer_t *l) {
  uint64_t h = 1469598103934665603ull, b;
  double d;
  h = svc__mix(h, (uint64_t)l->kind);
  h = svc__mix(h, (uint64_t)l->params.channels);
  d = l->params.eps;
  memcpy(&b, &d, sizeof b);
  h = svc__mix(h, b);
  d = l->params.momentum;
  memcpy(&b, &d, sizeof b);
  h = svc__mix(h, b);
  h = svc__mix(h, (uint64_t)l->params.cumulative);
  h = svc__mix(h, (uint64_t)l->params.affine);
  h = svc__mix(h, (uint64_t)l->params.track_running_stats);
  h = svc__mix(h, l->group_size);
  h = svc__mix(h, (uint64_t)l->params.ghost_batch);
  return h;
}

uint32_t svc__gsize(const svc_worker_t *w, const svc__layer_t *l) {
  if (l->group_size == 0 || l->group_size >= (uint64_t)w->cfg.size)
    return (uint32_t)w->cfg.size;
  return (uint32_t)l->group_size;
}
