/* Shared helpers for the unit tests; see testutil.h. */
#include "testutil.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void tu_rng_seed(tu_rng_t *r, uint64_t seed) {
  r->s = seed;
  r->have_spare = 0;
  r->spare = 0;
}

uint64_t tu_rng_u64(tu_rng_t *r) {
  uint64_t z = (r->s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

double tu_rng_uniform(tu_rng_t *r) {
  return (double)(tu_rng_u64(r) >> 11) * (1.0 / 9007199254740992.0);
}

double tu_rng_normal(tu_rng_t *r) {
  if (r->have_spare) {
    r->have_spare = 0;
    return r->spare;
  }
  double u1, u2;
  do
    u1 = tu_rng_uniform(r);
  while (u1 <= 0);
  u2 = tu_rng_uniform(r);
  double rad = sqrt(-2.0 * log(u1));
  double th = 6.283185307179586 * u2;
  r->spare = rad * sin(th);
  r->have_spare = 1;
  return rad * cos(th);
}

void tu_fill_normal(tu_rng_t *r, float *a, size_t n, double mean, double std) {
  for (size_t i = 0; i < n; i++)
    a[i] = (float)(mean + std * tu_rng_normal(r));
}

void *tu_xmalloc(size_t bytes) {
  void *p = malloc(bytes ? bytes : 1);
  if (p == NULL) {
    fprintf(stderr, "testutil: out of memory (%zu bytes)\n", bytes);
    abort();
  }
  return p;
}

float *tu_floats(size_t n) {
  return tu_xmalloc(n * sizeof(float));
}

double *tu_doubles(size_t n) {
  return tu_xmalloc(n * sizeof(double));
}

double *tu_to_double(const float *a, size_t n) {
  double *d = tu_doubles(n);
  for (size_t i = 0; i < n; i++)
    d[i] = a[i];
  return d;
}

void tu_to_float(const double *a, float *out, size_t n) {
  for (size_t i = 0; i < n; i++)
    out[i] = (float)a[i];
}

double tu_rel_l2(const float *got, const double *ref, size_t n) {
  double num = 0, den = 0;
  for (size_t i = 0; i < n; i++) {
    if (!isfinite(got[i]) || !isfinite(ref[i]))
      return INFINITY;
    double d = (double)got[i] - ref[i];
    num += d * d;
    den += ref[i] * ref[i];
  }
  if (den == 0)
    return sqrt(num);
  return sqrt(num / den);
}

double tu_rel_l2_ff(const float *a, const float *b, size_t n) {
  double *d = tu_to_double(b, n);
  double e = tu_rel_l2(a, d, n);
  free(d);
  return e;
}

size_t tu_count_nonfinite(const float *a, size_t n) {
  size_t k = 0;
  for (size_t i = 0; i < n; i++)
    k += !isfinite(a[i]);
  return k;
}

sbn_tensor_desc_t tu_desc(sbn_layout_t layout, int ndim, ...) {
  sbn_tensor_desc_t d;
  va_list ap;
  memset(&d, 0, sizeof d);
  d.ndim = ndim;
  d.layout = layout;
  va_start(ap, ndim);
  for (int i = 0; i < ndim && i < SBN_MAX_DIMS; i++)
    d.dims[i] = va_arg(ap, size_t);
  va_end(ap);
  return d;
}

size_t tu_numel(const sbn_tensor_desc_t *d) {
  size_t n = 1;
  for (int i = 0; i < d->ndim; i++)
    n *= d->dims[i];
  return n;
}

static void tu_ncs(const sbn_tensor_desc_t *d, size_t *N, size_t *C,
                   size_t *S) {
  *N = d->dims[0];
  *C = d->ndim > 1 ? d->dims[1] : 1;
  *S = 1;
  for (int i = 2; i < d->ndim; i++)
    *S *= d->dims[i];
}

void tu_nchw_to_nhwc(const sbn_tensor_desc_t *d, const float *in, float *out) {
  size_t N, C, S;
  tu_ncs(d, &N, &C, &S);
  for (size_t n = 0; n < N; n++)
    for (size_t c = 0; c < C; c++)
      for (size_t s = 0; s < S; s++)
        out[(n * S + s) * C + c] = in[(n * C + c) * S + s];
}

void tu_nhwc_to_nchw(const sbn_tensor_desc_t *d, const float *in, float *out) {
  size_t N, C, S;
  tu_ncs(d, &N, &C, &S);
  for (size_t n = 0; n < N; n++)
    for (size_t c = 0; c < C; c++)
      for (size_t s = 0; s < S; s++)
        out[(n * C + c) * S + s] = in[(n * S + s) * C + c];
}

static const char *const tu_sets[] = {"ref", "avx2", "avx512"};

int tu_kernel_sets(const char *const **names) {
  *names = tu_sets;
  return (int)(sizeof tu_sets / sizeof *tu_sets);
}

int tu_kernel_use(const char *name) {
  int rc = sbn_kernel_select(name);
  if (rc == SBN_ENOTSUP) {
    printf("# SKIP kernel set '%s': %s\n", name, sbn_last_error());
    return 1;
  }
  if (rc != 0) {
    fprintf(stderr, "testutil: sbn_kernel_select(%s): %s\n", name,
            sbn_err_name(rc));
    abort();
  }
  return 0;
}

int tu_run(sbn_layer_t *l, const tu_run_t *r, int *stage) {
  size_t ws = 0, sv = 0;
  void *work = NULL, *saved = NULL;
  int rc;
  if (stage)
    *stage = 0;
  if ((rc = sbn_layer_sizes(l, r->desc, &ws, &sv)) != 0)
    goto fail;
  /* Exact sizes, so that an overrun is caught by a sanitizer build. */
  work = ws ? tu_xmalloc(ws) : NULL;
  saved = sv ? tu_xmalloc(sv) : NULL;
  sbn_forward_args_t fa;
  memset(&fa, 0, sizeof fa);
  fa.mode = r->mode;
  fa.x_desc = r->desc;
  fa.x = r->x;
  fa.y = r->y;
  fa.weight = r->w;
  fa.bias = r->b;
  fa.state = r->state;
  fa.step = r->step;
  fa.workspace = work;
  fa.workspace_bytes = ws;
  fa.saved = saved;
  fa.saved_bytes = sv;
  if (stage)
    *stage = 1;
  if ((rc = sbn_forward(l, &fa)) != 0)
    goto fail;
  if (r->dy != NULL) {
    sbn_backward_args_t ba;
    memset(&ba, 0, sizeof ba);
    ba.mode = r->mode;
    ba.x_desc = r->desc;
    ba.x = r->x;
    ba.dy = r->dy;
    ba.dx = r->dx;
    ba.weight = r->w;
    ba.dweight = r->dw;
    ba.dbias = r->db;
    ba.step = r->step;
    ba.workspace = work;
    ba.workspace_bytes = ws;
    ba.saved = saved;
    ba.saved_bytes = sv;
    if (stage)
      *stage = 2;
    if ((rc = sbn_backward(l, &ba)) != 0)
      goto fail;
  }
  rc = 0;
fail:
  free(saved);
  free(work);
  return rc;
}

sbn_layer_t *tu_layer(const sbn_layer_params_t *p, sbn_comm_t *comm) {
  sbn_layer_t *l = NULL;
  int rc = sbn_layer_create(p, comm, &l);
  if (rc != 0 || l == NULL) {
    fprintf(stderr, "testutil: sbn_layer_create failed: %s (%s)\n",
            sbn_err_name(rc), sbn_last_error());
    abort();
  }
  return l;
}

#define TU_MAX_LABELS 64

static struct {
  char label[48];
  double max;
  size_t count;
} tu_errs[TU_MAX_LABELS];
static int tu_nerrs;

void tu_err_note(const char *label, double err) {
  int i;
  for (i = 0; i < tu_nerrs; i++)
    if (strcmp(tu_errs[i].label, label) == 0)
      break;
  if (i == tu_nerrs) {
    if (tu_nerrs == TU_MAX_LABELS)
      return;
    snprintf(tu_errs[i].label, sizeof tu_errs[i].label, "%s", label);
    tu_errs[i].max = 0;
    tu_errs[i].count = 0;
    tu_nerrs++;
  }
  /* Written so that a NaN error is recorded, not skipped. */
  if (!(err <= tu_errs[i].max))
    tu_errs[i].max = err;
  tu_errs[i].count++;
}

void tu_err_report(const char *title) {
  printf("# %s: max relative L2 error per quantity\n", title);
  for (int i = 0; i < tu_nerrs; i++)
    printf("#   %-28s %.3e  (%zu checks)\n", tu_errs[i].label, tu_errs[i].max,
           tu_errs[i].count);
}
