/* `syncbn apply`: the .npy side. Inputs are read and checked against the
 * op and the flags before any layer exists; outputs are written only after
 * everything is computed, so a failing run never clobbers an earlier
 * run's files. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "cli_apply_int.h"

static int read_input(apply_run_t *r, const char *flag, const char *path,
                      sbn_npy_t *t) {
  int rc = sbn_npy_read(path, t);
  if (rc != 0)
    return sbn__apply_fail(&r->e, 1, "--%s: %s: %s", flag, sbn_err_name(rc),
                           sbn_last_error());
  return 0;
}

static int expect_shape(apply_run_t *r, const char *flag, const char *path,
                        const sbn_npy_t *t, const size_t *dims, int ndim) {
  int same = t->ndim == ndim;
  for (int i = 0; same && i < ndim; i++)
    same = t->dims[i] == dims[i];
  if (same)
    return 0;
  char got[160], want[160];
  sbn__apply_shape_str(t->dims, t->ndim, got, sizeof got);
  sbn__apply_shape_str(dims, ndim, want, sizeof want);
  return sbn__apply_fail(&r->e, 1, "--%s: %s has shape %s, expected %s", flag,
                         path, got, want);
}

static int read_inputs(apply_run_t *r) {
  apply_opts_t *o = &r->o;
  if (read_input(r, "x", o->x, &r->x))
    return r->e.status;
  if (o->dy && read_input(r, "dy", o->dy, &r->dy))
    return r->e.status;
  if (o->weight && (read_input(r, "weight", o->weight, &r->w) ||
                    read_input(r, "bias", o->bias, &r->b)))
    return r->e.status;
  if (o->rmean && (read_input(r, "running-mean", o->rmean, &r->rm) ||
                   read_input(r, "running-var", o->rvar, &r->rv)))
    return r->e.status;
  return 0;
}

/* The logical shape of x (r->desc), its batch, sample size, channels and
 * parameter size, checked against the op and the flags. */
static int shape_x(apply_run_t *r) {
  apply_opts_t *o = &r->o;
  const char *name = sbn_op_name(o->op);
  const sbn_npy_t *x = &r->x;
  char xs[160];
  sbn__apply_shape_str(x->dims, x->ndim, xs, sizeof xs);
  if (x->ndim < 1)
    return sbn__apply_fail(&r->e, 1,
                           "--x: %s is a 0-d array; %s needs at least 1 dim",
                           o->x, name);
  r->N = x->dims[0];
  r->inner = r->N > 0 ? x->numel / r->N : 0;
  if (r->N == 0) {
    r->inner = 1;
    for (int i = 1; i < x->ndim; i++)
      r->inner *= x->dims[i]; /* cannot overflow: numel checked by npy */
  }
  sbn_tensor_desc_t *d = &r->desc;
  d->ndim = x->ndim;
  d->layout = o->layout;
  memcpy(d->dims, x->dims, sizeof d->dims);
  if (o->op == SBN_OP_BATCHNORM || o->op == SBN_OP_INSTANCENORM ||
      o->op == SBN_OP_GROUPNORM) {
    if (x->ndim < 2)
      return sbn__apply_fail(
          &r->e, 1,
          "--x: %s has shape %s; %s needs (N, C, ...) with at least "
          "2 dims",
          o->x, xs, name);
    if (o->layout == SBN_LAYOUT_NHWC) {
      /* The file is channels-last (N, d1..dk, C); the library takes the
       * logical dims (N, C, d1..dk) plus the layout. */
      d->dims[1] = x->dims[x->ndim - 1];
      for (int i = 2; i < x->ndim; i++)
        d->dims[i] = x->dims[i - 1];
    }
    r->C = d->dims[1];
    r->nw = r->C;
    if (o->op == SBN_OP_GROUPNORM && r->C % o->groups != 0)
      return sbn__apply_fail(&r->e, 1,
                             "--groups: %zu does not divide %zu channels",
                             o->groups, r->C);
  } else if (o->op == SBN_OP_LAYERNORM) {
    if (o->norm_dims > x->ndim)
      return sbn__apply_fail(&r->e, 1,
                             "--norm-dims: %d exceeds the %d dims of --x %s %s",
                             o->norm_dims, x->ndim, o->x, xs);
    if (o->sync && o->norm_dims == x->ndim)
      return sbn__apply_fail(
          &r->e, 1,
          "--norm-dims: with --sync dim 0 of --x %s is split "
          "between ranks and cannot be normalized over",
          o->x);
    r->nw = 1;
    for (int i = x->ndim - o->norm_dims; i < x->ndim; i++)
      r->nw *= x->dims[i];
  }
  return 0;
}

/* Reads every input and checks shapes against the op and the flags. */
int sbn__apply_load_inputs(apply_run_t *r) {
  apply_opts_t *o = &r->o;
  const sbn_npy_t *x = &r->x;
  if (read_inputs(r) != 0 || shape_x(r) != 0)
    return r->e.status;
  if (o->dy && expect_shape(r, "dy", o->dy, &r->dy, x->dims, x->ndim))
    return r->e.status;
  if (o->weight) {
    const size_t *wd = &x->dims[x->ndim - o->norm_dims];
    int wn = o->op == SBN_OP_LAYERNORM ? o->norm_dims : 1;
    if (o->op != SBN_OP_LAYERNORM)
      wd = &r->C;
    if (expect_shape(r, "weight", o->weight, &r->w, wd, wn) ||
        expect_shape(r, "bias", o->bias, &r->b, wd, wn))
      return r->e.status;
  }
  if (o->rmean &&
      (expect_shape(r, "running-mean", o->rmean, &r->rm, &r->C, 1) ||
       expect_shape(r, "running-var", o->rvar, &r->rv, &r->C, 1)))
    return r->e.status;
  r->track = o->rmean != NULL || (o->op == SBN_OP_BATCHNORM && !o->no_running);
  r->fresh = r->track && o->rmean == NULL;
  return 0;
}

/* mkdir -p. */
static int make_dir(apply_run_t *r, const char *dir) {
  char *p = strdup(dir);
  struct stat st;
  int rc = 0;
  if (p == NULL)
    return sbn__apply_fail(&r->e, 1, "out of memory");
  for (char *s = p + 1;; s++) {
    if (*s == '/' || *s == '\0') {
      char keep = *s;
      *s = '\0';
      if (mkdir(p, 0777) != 0 && errno != EEXIST) {
        rc = sbn__apply_fail(&r->e, 1, "--out-dir: cannot create %s: %s", p,
                             strerror(errno));
        break;
      }
      *s = keep;
      if (keep == '\0')
        break;
    }
  }
  if (rc == 0 && (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode)))
    rc = sbn__apply_fail(&r->e, 1, "--out-dir: %s is not a directory", dir);
  free(p);
  return rc;
}

int sbn__apply_write_outputs(apply_run_t *r, char *written, size_t cap) {
  apply_opts_t *o = &r->o;
  apply_out_t outs[SBN__APPLY_MAX_OUTS];
  int n = 0;
  outs[n++] = (apply_out_t){"y.npy", r->y, r->x.ndim, {0}};
  memcpy(outs[0].dims, r->x.dims, sizeof outs[0].dims);
  if (o->dy) {
    outs[n] = (apply_out_t){"dx.npy", r->dx, r->x.ndim, {0}};
    memcpy(outs[n++].dims, r->x.dims, sizeof outs[0].dims);
    if (o->weight) {
      outs[n] = (apply_out_t){"dweight.npy", r->dw, r->w.ndim, {0}};
      memcpy(outs[n++].dims, r->w.dims, sizeof outs[0].dims);
      outs[n] = (apply_out_t){"dbias.npy", r->db, r->w.ndim, {0}};
      memcpy(outs[n++].dims, r->w.dims, sizeof outs[0].dims);
    }
  }
  if (r->track) {
    outs[n++] =
        (apply_out_t){"running_mean.npy", r->state.running_mean, 1, {r->C}};
    outs[n++] =
        (apply_out_t){"running_var.npy", r->state.running_var, 1, {r->C}};
  }
  if (make_dir(r, o->out_dir) != 0)
    return r->e.status;
  return sbn__apply_commit(r, outs, n, written, cap);
}
