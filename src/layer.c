/* Layer creation, validation and the per-op dispatch of forward/backward. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

static const char *const sbn__op_names[] = {
    "batchnorm", "layernorm", "instancenorm", "groupnorm", "dropout"};

const char *sbn_op_name(sbn_op_t op) {
  if ((unsigned)op >= sizeof sbn__op_names / sizeof *sbn__op_names)
    return NULL;
  return sbn__op_names[op];
}

int sbn_op_parse(const char *name, sbn_op_t *op) {
  if (name == NULL || op == NULL)
    return sbn_set_error(SBN_EINVAL, "op: NULL");
  for (size_t i = 0; i < sizeof sbn__op_names / sizeof *sbn__op_names; i++) {
    if (strcmp(name, sbn__op_names[i]) == 0) {
      *op = (sbn_op_t)i;
      return 0;
    }
  }
  return sbn_set_error(SBN_EINVAL, "op: unknown op '%s'", name);
}

void sbn_layer_params_default(sbn_layer_params_t *p, sbn_op_t op) {
  memset(p, 0, sizeof *p);
  p->op = op;
  p->eps = 1e-5;
  p->momentum = 0.1;
  p->affine = 1;
  p->track_running_stats = (op == SBN_OP_BATCHNORM);
  p->p = 0.5;
  p->groups = 1;
}

static int sbn__validate(const sbn_layer_params_t *p) {
  if (sbn_op_name(p->op) == NULL)
    return sbn_set_error(SBN_EINVAL, "params.op: unknown op %d", (int)p->op);
  if (p->op == SBN_OP_DROPOUT) {
    if (!(p->p >= 0 && p->p <= 1))
      return sbn_set_error(SBN_EINVAL, "p: %g is outside [0, 1]", p->p);
    return 0;
  }
  if (!(p->eps > 0) || isinf(p->eps))
    return sbn_set_error(SBN_EINVAL, "eps: %g must be positive and finite",
                         p->eps);
  if (p->op == SBN_OP_BATCHNORM || p->op == SBN_OP_INSTANCENORM) {
    if (!(p->momentum >= 0 && p->momentum <= 1))
      return sbn_set_error(SBN_EINVAL, "momentum: %g is outside [0, 1]",
                           p->momentum);
    if (p->cumulative && p->op != SBN_OP_BATCHNORM)
      return sbn_set_error(SBN_EINVAL,
                           "cumulative: only BatchNorm keeps a cumulative "
                           "average");
  }
  if (p->op == SBN_OP_LAYERNORM) {
    if (p->norm_ndim < 1 || p->norm_ndim > SBN_MAX_DIMS)
      return sbn_set_error(SBN_EINVAL, "norm_ndim: %d is outside [1, %d]",
                           p->norm_ndim, SBN_MAX_DIMS);
    size_t d = 1;
    for (int i = 0; i < p->norm_ndim; i++) {
      if (p->norm_shape[i] == 0)
        return sbn_set_error(SBN_EINVAL, "norm_shape[%d]: must be positive", i);
      if (sbn__mul_size(d, p->norm_shape[i], &d) != 0)
        return sbn_set_error(SBN_EOVERFLOW,
                             "norm_shape: the size overflows size_t");
    }
    return 0;
  }
  if (p->channels == 0)
    return sbn_set_error(SBN_EINVAL, "channels: must be positive");
  if (p->op == SBN_OP_GROUPNORM) {
    if (p->groups == 0)
      return sbn_set_error(SBN_EINVAL, "groups: must be positive");
    if (p->channels % p->groups != 0)
      return sbn_set_error(SBN_EINVAL,
                           "groups: %zu does not divide %zu channels",
                           p->groups, p->channels);
  }
  return 0;
}

int sbn_layer_create(const sbn_layer_params_t *params, sbn_comm_t *comm,
                     sbn_layer_t **out) {
  sbn_layer_t *l = NULL;
  int rc;
  if (out == NULL)
    return sbn_set_error(SBN_EINVAL, "out: NULL");
  *out = NULL;
  if (params == NULL)
    return sbn_set_error(SBN_EINVAL, "params: NULL");
  if ((rc = sbn__validate(params)) != 0)
    return rc;
  if (comm != NULL && (comm->vt == NULL || comm->vt->allreduce == NULL))
    return sbn_set_error(SBN_EINVAL, "comm: vtable lacks allreduce");
  l = calloc(1, sizeof *l);
  if (l == NULL)
    return sbn_set_error(SBN_ENOMEM, "layer: out of memory");
  l->p = *params;
  l->comm = comm;
  *out = l;
  return 0;
}

void sbn_layer_destroy(sbn_layer_t *layer) {
  free(layer);
}

const sbn_layer_params_t *sbn_layer_params(const sbn_layer_t *layer) {
  return &layer->p;
}

sbn_comm_t *sbn_layer_comm(const sbn_layer_t *layer) {
  return layer->comm;
}

int sbn__check_shape(const sbn_layer_t *l, const sbn_tensor_desc_t *d,
                     sbn__shape_t *sh) {
  int rc;
  const sbn_layer_params_t *p = &l->p;
  memset(sh, 0, sizeof *sh);
  if ((rc = sbn_desc_numel(d, &sh->numel)) != 0)
    return rc;
  if (d->layout != SBN_LAYOUT_NCHW && d->layout != SBN_LAYOUT_NHWC)
    return sbn_set_error(SBN_EINVAL, "x_desc.layout: unknown layout %d",
                         (int)d->layout);
  sh->layout = d->layout;
  if (p->op == SBN_OP_LAYERNORM || p->op == SBN_OP_DROPOUT) {
    if (d->layout != SBN_LAYOUT_NCHW)
      return sbn_set_error(SBN_ESHAPE,
                           "x_desc.layout: %s takes plain C-order arrays "
                           "(NCHW), not NHWC",
                           sbn_op_name(p->op));
    if (p->op == SBN_OP_DROPOUT) {
      sh->N = 1;
      sh->C = 1;
      sh->S = sh->numel;
      return 0;
    }
    if (d->ndim < p->norm_ndim)
      return sbn_set_error(SBN_ESHAPE,
                           "x_desc.ndim: %d dims cannot hold a normalized "
                           "shape of %d dims",
                           d->ndim, p->norm_ndim);
    size_t D = 1, N = 1;
    int lead = d->ndim - p->norm_ndim;
    for (int i = 0; i < p->norm_ndim; i++) {
      if (d->dims[lead + i] != p->norm_shape[i])
        return sbn_set_error(SBN_ESHAPE,
                             "x_desc.dims[%d]: %zu differs from "
                             "normalized shape[%d] = %zu",
                             lead + i, d->dims[lead + i], i, p->norm_shape[i]);
      D *= p->norm_shape[i];
    }
    for (int i = 0; i < lead; i++)
      N *= d->dims[i];
    sh->N = N;
    sh->C = D;
    sh->S = 1;
    return 0;
  }
  if (d->ndim < 2)
    return sbn_set_error(SBN_ESHAPE,
                         "x_desc.ndim: %s needs (N, C, ...) with at least "
                         "2 dims, got %d",
                         sbn_op_name(p->op), d->ndim);
  if (d->dims[1] != p->channels)
    return sbn_set_error(SBN_ESHAPE,
                         "x_desc.dims[1]: expected %zu channels, got %zu",
                         p->channels, d->dims[1]);
  sh->N = d->dims[0];
  sh->C = d->dims[1];
  sh->S = 1;
  for (int i = 2; i < d->ndim; i++)
    sh->S *= d->dims[i];
  /* Per-channel workspace is a small multiple of C; make sure it is
   * representable even for absurd channel counts. */
  if (sh->C > SIZE_MAX / 256)
    return sbn_set_error(SBN_EOVERFLOW,
                         "channels: %zu channels overflow the workspace "
                         "size",
                         sh->C);
  return 0;
}

int sbn_layer_sizes(const sbn_layer_t *l, const sbn_tensor_desc_t *x,
                    size_t *workspace_bytes, size_t *saved_bytes) {
  sbn__shape_t sh;
  size_t ws = 0, sv = 0;
  int rc;
  if (l == NULL)
    return sbn_set_error(SBN_EINVAL, "layer: NULL");
  if ((rc = sbn__check_shape(l, x, &sh)) != 0)
    return rc;
  switch (l->p.op) {
    case SBN_OP_BATCHNORM:
      rc = sbn__bn_sizes(l, &sh, &ws, &sv);
      break;
    case SBN_OP_INSTANCENORM:
      rc = sbn__in_sizes(l, &sh, &ws, &sv);
      break;
    case SBN_OP_GROUPNORM:
      rc = sbn__gn_sizes(l, &sh, &ws, &sv);
      break;
    case SBN_OP_LAYERNORM:
      rc = sbn__ln_sizes(l, &sh, &ws, &sv);
      break;
    case SBN_OP_DROPOUT:
      break;
  }
  if (rc != 0)
    return rc;
  if (workspace_bytes)
    *workspace_bytes = ws;
  if (saved_bytes)
    *saved_bytes = sv;
  return 0;
}

int sbn__saved_size(size_t items, size_t *bytes) {
  size_t b;
  if (sbn__mul_size(items, 2 * sizeof(double), &b) != 0 ||
      b > SIZE_MAX - sizeof(sbn__saved_hdr_t))
    return sbn_set_error(SBN_EOVERFLOW,
                         "x_desc.dims: the saved state overflows size_t");
  *bytes = b + sizeof(sbn__saved_hdr_t);
  return 0;
}

void sbn__saved_init(void *saved, const sbn_layer_t *l, sbn_mode_t mode,
                     double count, size_t items, double **mean, double **istd) {
  sbn__saved_hdr_t *h = saved;
  h->magic = SBN__SAVED_MAGIC;
  h->op = (uint32_t)l->p.op;
  h->mode = (uint32_t)mode;
  h->pad = 0;
  h->count = count;
  h->items = items;
  h->pad2 = 0;
  *mean = (double *)(void *)(h + 1);
  *istd = *mean + items;
}

int sbn__saved_get(const void *saved, size_t bytes, const sbn_layer_t *l,
                   sbn_mode_t mode, size_t items, double *count,
                   const double **mean, const double **istd) {
  const sbn__saved_hdr_t *h = saved;
  size_t need = 0;
  int rc;
  if (saved == NULL)
    return sbn_set_error(SBN_EINVAL,
                         "saved: NULL (backward needs the "
                         "forward's saved state)");
  if ((rc = sbn__saved_size(items, &need)) != 0)
    return rc;
  if (bytes < need)
    return sbn_set_error(SBN_ENOSPACE, "saved_bytes: %zu < %zu needed", bytes,
                         need);
  if (h->magic != SBN__SAVED_MAGIC || h->op != (uint32_t)l->p.op ||
      h->items != items)
    return sbn_set_error(SBN_ESTATE,
                         "saved: not filled by a forward of this layer "
                         "and shape");
  if (h->mode != (uint32_t)mode)
    return sbn_set_error(SBN_ESTATE,
                         "mode: backward mode differs from the forward's");
  *count = h->count;
  *mean = (const double *)(const void *)(h + 1);
  *istd = *mean + items;
  return 0;
}

static int sbn__check_ws(void *ws, size_t have, size_t need) {
  if (need > 0 && ws == NULL)
    return sbn_set_error(SBN_EINVAL, "workspace: NULL, %zu bytes needed", need);
  if (have < need)
    return sbn_set_error(SBN_ENOSPACE, "workspace_bytes: %zu < %zu needed",
                         have, need);
  return 0;
}

int sbn__check_fwd_buffers(const sbn_layer_t *l, const sbn_forward_args_t *a,
                           const sbn__shape_t *sh) {
  size_t ws = 0, sv = 0;
  int rc;
  if (a->mode != SBN_MODE_TRAIN && a->mode != SBN_MODE_EVAL)
    return sbn_set_error(SBN_EINVAL, "mode: unknown mode %d", (int)a->mode);
  if (sh->numel > 0 && (a->x == NULL || a->y == NULL))
    return sbn_set_error(SBN_EINVAL, "%s: NULL", a->x == NULL ? "x" : "y");
  if ((rc = sbn_layer_sizes(l, a->x_desc, &ws, &sv)) != 0)
    return rc;
  if ((rc = sbn__check_ws(a->workspace, a->workspace_bytes, ws)) != 0)
    return rc;
  if (a->saved != NULL && a->saved_bytes < sv)
    return sbn_set_error(SBN_ENOSPACE, "saved_bytes: %zu < %zu needed",
                         a->saved_bytes, sv);
  if (l->p.op != SBN_OP_DROPOUT && l->p.affine &&
      (a->weight == NULL || a->bias == NULL))
    return sbn_set_error(SBN_EINVAL, "%s: NULL for an affine layer",
                         a->weight == NULL ? "weight" : "bias");
  if ((l->p.op == SBN_OP_BATCHNORM || l->p.op == SBN_OP_INSTANCENORM) &&
      l->p.track_running_stats &&
      (a->state == NULL || a->state->running_mean == NULL ||
       a->state->running_var == NULL))
    return sbn_set_error(SBN_EINVAL,
                         "state: running_mean and running_var are needed "
                         "when running statistics are tracked");
  return 0;
}

int sbn__check_bwd_buffers(const sbn_layer_t *l, const sbn_backward_args_t *a,
                           const sbn__shape_t *sh) {
  size_t ws = 0;
  int rc;
  if (a->mode != SBN_MODE_TRAIN && a->mode != SBN_MODE_EVAL)
    return sbn_set_error(SBN_EINVAL, "mode: unknown mode %d", (int)a->mode);
  if (sh->numel > 0 && (a->dy == NULL || a->dx == NULL ||
                        (a->x == NULL && l->p.op != SBN_OP_DROPOUT)))
    return sbn_set_error(SBN_EINVAL, "%s: NULL",
                         a->dy == NULL   ? "dy"
                         : a->dx == NULL ? "dx"
                                         : "x");
  if ((rc = sbn_layer_sizes(l, a->x_desc, &ws, NULL)) != 0)
    return rc;
  if ((rc = sbn__check_ws(a->workspace, a->workspace_bytes, ws)) != 0)
    return rc;
  if (l->p.op != SBN_OP_DROPOUT && l->p.affine && a->weight == NULL)
    return sbn_set_error(SBN_EINVAL, "weight: NULL for an affine layer");
  return 0;
}

int sbn_forward(sbn_layer_t *l, const sbn_forward_args_t *a) {
  sbn__shape_t sh;
  int rc;
  if (l == NULL || a == NULL)
    return sbn_set_error(SBN_EINVAL, "%s: NULL", l == NULL ? "layer" : "args");
  if ((rc = sbn__check_shape(l, a->x_desc, &sh)) != 0)
    return rc;
  if ((rc = sbn__check_fwd_buffers(l, a, &sh)) != 0)
    return rc;
  switch (l->p.op) {
    case SBN_OP_BATCHNORM:
      return sbn__bn_forward(l, a, &sh);
    case SBN_OP_INSTANCENORM:
      return sbn__in_forward(l, a, &sh);
    case SBN_OP_GROUPNORM:
      return sbn__gn_forward(l, a, &sh);
    case SBN_OP_LAYERNORM:
      return sbn__ln_forward(l, a, &sh);
    case SBN_OP_DROPOUT:
      return sbn__dropout_forward(l, a, &sh);
  }
  return sbn_set_error(SBN_EINVAL, "layer: unknown op");
}

int sbn_backward(sbn_layer_t *l, const sbn_backward_args_t *a) {
  sbn__shape_t sh;
  int rc;
  if (l == NULL || a == NULL)
    return sbn_set_error(SBN_EINVAL, "%s: NULL", l == NULL ? "layer" : "args");
  if ((rc = sbn__check_shape(l, a->x_desc, &sh)) != 0)
    return rc;
  if ((rc = sbn__check_bwd_buffers(l, a, &sh)) != 0)
    return rc;
  switch (l->p.op) {
    case SBN_OP_BATCHNORM:
      return sbn__bn_backward(l, a, &sh);
    case SBN_OP_INSTANCENORM:
      return sbn__in_backward(l, a, &sh);
    case SBN_OP_GROUPNORM:
      return sbn__gn_backward(l, a, &sh);
    case SBN_OP_LAYERNORM:
      return sbn__ln_backward(l, a, &sh);
    case SBN_OP_DROPOUT:
      return sbn__dropout_backward(l, a, &sh);
  }
  return sbn_set_error(SBN_EINVAL, "layer: unknown op");
}
