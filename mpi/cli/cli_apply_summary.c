/* `syncbn apply`: the summary printed after a successful run. */
#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli_apply_int.h"

/* Rows of the summary table; more are counted, not printed. */
#define APPLY_MAX_ROWS 8

/* Summary: what the normalization did, unit by unit (a unit is what one
 * set of statistics covers: a channel for BN, a (sample, channel) for IN,
 * a (sample, group) for GN, a row for LN, the whole tensor for dropout). */

typedef struct apply_units_s {
  size_t n;
  double *mx, *vx, *my, *vy, *cnt;
} apply_units_t;

static size_t unit_of(const apply_run_t *r, size_t i) {
  size_t C = r->C, S = r->N > 0 && C > 0 ? r->inner / C : 0, n, c;
  switch (r->o.op) {
    case SBN_OP_LAYERNORM:
      return i / r->nw;
    case SBN_OP_DROPOUT:
      return 0;
    default:
      break;
  }
  if (r->desc.layout == SBN_LAYOUT_NCHW) {
    c = (i / S) % C;
    n = i / (S * C);
  } else {
    c = i % C;
    n = i / (S * C);
  }
  if (r->o.op == SBN_OP_BATCHNORM)
    return c;
  if (r->o.op == SBN_OP_INSTANCENORM)
    return n * C + c;
  return n * r->o.groups + c / (C / r->o.groups);
}

static int unit_stats(const apply_run_t *r, apply_units_t *u) {
  size_t numel = r->x.numel;
  switch (r->o.op) {
    case SBN_OP_BATCHNORM:
      u->n = r->C;
      break;
    case SBN_OP_INSTANCENORM:
      u->n = r->N * r->C;
      break;
    case SBN_OP_GROUPNORM:
      u->n = r->N * r->o.groups;
      break;
    case SBN_OP_LAYERNORM:
      u->n = r->nw > 0 ? numel / r->nw : 0;
      break;
    case SBN_OP_DROPOUT:
    case SBN_OP_COUNT: /* not an op: the argument parser refuses it */
      u->n = 1;
      break;
  }
  double *all = calloc(5 * u->n + 1, sizeof(double));
  if (all == NULL)
    return -1;
  u->mx = all;
  u->vx = all + u->n;
  u->my = all + 2 * u->n;
  u->vy = all + 3 * u->n;
  u->cnt = all + 4 * u->n;
  if (numel == 0) {
    /* No values: no statistics, printed as nan rather than a made-up 0. */
    for (size_t k = 0; k < 4 * u->n; k++)
      all[k] = NAN;
    return 0;
  }
  for (size_t i = 0; i < numel; i++) {
    size_t k = unit_of(r, i);
    u->mx[k] += r->x.data[i];
    u->my[k] += r->y[i];
    u->cnt[k] += 1;
  }
  for (size_t k = 0; k < u->n; k++) {
    u->mx[k] /= u->cnt[k];
    u->my[k] /= u->cnt[k];
  }
  for (size_t i = 0; i < numel; i++) {
    size_t k = unit_of(r, i);
    double a = r->x.data[i] - u->mx[k], b = r->y[i] - u->my[k];
    u->vx[k] += a * a;
    u->vy[k] += b * b;
  }
  for (size_t k = 0; k < u->n; k++) {
    u->vx[k] /= u->cnt[k];
    u->vy[k] /= u->cnt[k];
  }
  return 0;
}

/* The run's settings: op, shape, mode and the op's parameters. */
static void print_settings(const apply_run_t *r) {
  const apply_opts_t *o = &r->o;
  char xs[160];
  sbn__apply_shape_str(r->x.dims, r->x.ndim, xs, sizeof xs);
  printf("syncbn apply: %s, x %s %s, %s", sbn_op_name(o->op), xs,
         o->layout == SBN_LAYOUT_NHWC ? "nhwc" : "nchw",
         o->eval ? "eval" : "train");
  if (o->op == SBN_OP_DROPOUT)
    printf(", p %g, seed %u, layer %u, step %llu", o->p, o->seed, o->layer,
           (unsigned long long)o->step);
  else
    printf(", eps %g, %s", o->eps, o->weight ? "affine" : "no affine");
  if (o->op == SBN_OP_GROUPNORM)
    printf(", %zu groups", o->groups);
  if (o->op == SBN_OP_LAYERNORM)
    printf(", normalized over the last %d dim%s", o->norm_dims,
           o->norm_dims > 1 ? "s" : "");
  printf("\n");
}

/* How many processes and how the batch was split among them. */
static void print_processes(const apply_run_t *r) {
  const apply_opts_t *o = &r->o;
  int mpi_up = 0;
  MPI_Initialized(&mpi_up);
  if (o->sync) {
    printf("processes: %d (MPI), batch split", r->size);
    for (int i = 0; i < r->size; i++)
      printf("%s%zu", i ? "," : " ", r->counts[i]);
    if (o->op == SBN_OP_BATCHNORM && o->ghost_batch > 0)
      printf(", ghost batches per rank (nothing synchronized)");
    else if (o->op == SBN_OP_BATCHNORM)
      printf(", statistics synchronized in groups of %d",
             o->group_size > 0 && o->group_size < r->size ? o->group_size
                                                          : r->size);
    else
      printf(", each rank on its own shard");
    printf("\n");
  } else {
    printf("processes: 1 (MPI %s)\n",
           mpi_up ? "initialized" : "not initialized");
  }
}

/* Where the running statistics came from and what normalized. */
static void print_running(const apply_run_t *r) {
  const apply_opts_t *o = &r->o;
  if (o->op != SBN_OP_BATCHNORM && o->op != SBN_OP_INSTANCENORM)
    return;
  const char *src = !r->track  ? "none tracked"
                    : r->fresh ? "fresh buffers (mean 0, var 1)"
                               : "from --running-mean/--running-var";
  const char *used =
      (o->eval && r->track) ? "running statistics" : "batch statistics";
  printf("running statistics: %s; normalized with %s", src, used);
  /* Ghost batches replace the batch statistics wherever those are used. */
  if (o->ghost_batch > 0 && !(o->eval && r->track))
    printf(" of each ghost batch of %zu samples", o->ghost_batch);
  if (r->track && o->op == SBN_OP_BATCHNORM)
    printf("; %s, num_batches_tracked %lld -> %lld",
           o->cumulative ? "cumulative average"
                         : (o->eval ? "not updated (eval)" : "momentum update"),
           (long long)r->nbt_before, (long long)r->state.num_batches_tracked);
  printf("\n");
}

static void print_dropout(const apply_run_t *r, const apply_units_t *u) {
  const apply_opts_t *o = &r->o;
  size_t zeroed = 0, nz = 0;
  for (size_t i = 0; i < r->x.numel; i++) {
    if (r->x.data[i] != 0) {
      nz++;
      zeroed += r->y[i] == 0;
    }
  }
  printf(
      "dropout: zeroed %zu of %zu nonzero values (%.4f; p %g), kept "
      "values scaled by %g\n",
      zeroed, nz, nz ? (double)zeroed / (double)nz : 0.0, o->p,
      o->p < 1 ? 1.0 / (1.0 - o->p) : 0.0);
  printf("mean x %.6g -> y %.6g, var x %.6g -> y %.6g\n", u->mx[0], u->my[0],
         u->vx[0], u->vy[0]);
}

/* One row per unit (up to APPLY_MAX_ROWS), with BatchNorm's running
 * statistics beside them. */
static void print_table(const apply_run_t *r, const apply_units_t *u) {
  const apply_opts_t *o = &r->o;
  const char *label = o->op == SBN_OP_BATCHNORM      ? "channel"
                      : o->op == SBN_OP_INSTANCENORM ? "n,channel"
                      : o->op == SBN_OP_GROUPNORM    ? "n,group"
                                                     : "row";
  printf("%-10s %12s %12s %12s %12s", label, "x mean", "x var", "y mean",
         "y var");
  if (r->track && o->op == SBN_OP_BATCHNORM)
    printf(" %14s %13s", "running_mean", "running_var");
  printf("\n");
  for (size_t k = 0; k < u->n && k < APPLY_MAX_ROWS; k++) {
    char id[32];
    if (o->op == SBN_OP_INSTANCENORM)
      snprintf(id, sizeof id, "%zu,%zu", k / r->C, k % r->C);
    else if (o->op == SBN_OP_GROUPNORM)
      snprintf(id, sizeof id, "%zu,%zu", k / o->groups, k % o->groups);
    else
      snprintf(id, sizeof id, "%zu", k);
    printf("%-10s %12.5g %12.5g %12.5g %12.5g", id, u->mx[k], u->vx[k],
           u->my[k], u->vy[k]);
    if (r->track && o->op == SBN_OP_BATCHNORM)
      printf(" %14.6g %13.6g", r->state.running_mean[k],
             r->state.running_var[k]);
    printf("\n");
  }
  if (u->n > APPLY_MAX_ROWS)
    printf("... %zu more %ss\n", u->n - APPLY_MAX_ROWS,
           o->op == SBN_OP_LAYERNORM      ? "row"
           : o->op == SBN_OP_BATCHNORM    ? "channel"
           : o->op == SBN_OP_INSTANCENORM ? "instance"
                                          : "group");
  if (r->track && o->op == SBN_OP_INSTANCENORM) {
    printf("running_mean/running_var per channel:");
    for (size_t c = 0; c < r->C && c < APPLY_MAX_ROWS; c++)
      printf(" %.6g/%.6g", r->state.running_mean[c], r->state.running_var[c]);
    printf("%s\n", r->C > APPLY_MAX_ROWS ? " ..." : "");
  }
}

void sbn__apply_print_summary(apply_run_t *r, const char *written) {
  apply_units_t u;
  print_settings(r);
  print_processes(r);
  print_running(r);
  memset(&u, 0, sizeof u);
  if (unit_stats(r, &u) != 0)
    printf("(no memory for the statistics table)\n");
  else if (r->o.op == SBN_OP_DROPOUT)
    print_dropout(r, &u);
  else
    print_table(r, &u);
  free(u.mx);
  printf("wrote: %s\n", written);
}
