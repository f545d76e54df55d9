/* `syncbn apply`: one layer's forward (and backward) on .npy files.
 *
 * The order of work is what makes failures clean:
 *   parse the command line (usage errors, exit 2, before MPI exists)
 *   -> read and check every input (exit 1 on any problem)
 *   -> create the layer, size and allocate its buffers
 *   -> forward, backward
 *   -> (with --sync) gather the shards on rank 0
 *   -> create the output directory and write every output.
 * Nothing is written before everything is computed, so a failing run never
 * clobbers an earlier run's outputs. Under --sync the ranks agree on success
 * (one small MPI_Allreduce) after every step that can fail on one rank only,
 * so no rank ever waits in a collective that another rank skipped. */
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <math.h>
#include <mpi.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "cli.h"
#include "sbn_npy.h"
#include "syncbn.h"
#include "syncbn_mpi.h"

/* Rows of the summary table; more are counted, not printed. */
#define APPLY_MAX_ROWS 8

enum {
  O_OP = 1,
  O_X,
  O_DY,
  O_WEIGHT,
  O_BIAS,
  O_RMEAN,
  O_RVAR,
  O_NBT,
  O_NORUN,
  O_EPS,
  O_MOMENTUM,
  O_CUMULATIVE,
  O_EVAL,
  O_LAYOUT,
  O_GROUPS,
  O_NORMDIMS,
  O_P,
  O_SEED,
  O_LAYER,
  O_STEP,
  O_SYNC,
  O_COUNTS,
  O_GROUPSIZE,
  O_OUTDIR,
  O_HELP,
  O_COUNT
};

static const struct option apply_opts[] = {
    {"op", required_argument, 0, O_OP},
    {"x", required_argument, 0, O_X},
    {"dy", required_argument, 0, O_DY},
    {"weight", required_argument, 0, O_WEIGHT},
    {"bias", required_argument, 0, O_BIAS},
    {"running-mean", required_argument, 0, O_RMEAN},
    {"running-var", required_argument, 0, O_RVAR},
    {"num-batches-tracked", required_argument, 0, O_NBT},
    {"no-running-stats", no_argument, 0, O_NORUN},
    {"eps", required_argument, 0, O_EPS},
    {"momentum", required_argument, 0, O_MOMENTUM},
    {"cumulative", no_argument, 0, O_CUMULATIVE},
    {"eval", no_argument, 0, O_EVAL},
    {"layout", required_argument, 0, O_LAYOUT},
    {"groups", required_argument, 0, O_GROUPS},
    {"norm-dims", required_argument, 0, O_NORMDIMS},
    {"p", required_argument, 0, O_P},
    {"seed", required_argument, 0, O_SEED},
    {"layer", required_argument, 0, O_LAYER},
    {"step", required_argument, 0, O_STEP},
    {"sync", no_argument, 0, O_SYNC},
    {"counts", required_argument, 0, O_COUNTS},
    {"group-size", required_argument, 0, O_GROUPSIZE},
    {"out-dir", required_argument, 0, O_OUTDIR},
    {"help", no_argument, 0, O_HELP},
    {0, 0, 0, 0}};

static void apply_usage(FILE *f) {
  fprintf(
      f,
      "usage: syncbn apply --op OP --x X.npy --out-dir DIR [options]\n"
      "       mpirun -np P syncbn apply --op OP --sync [--counts c0,c1,...]\n"
      "              [--group-size k] --x X.npy --out-dir DIR [options]\n"
      "\n"
      "Runs one forward (and, with --dy, one backward) of a freshly created\n"
      "layer on float32/float64 .npy arrays and writes float32 .npy results\n"
      "to DIR (created if missing): y.npy; with --dy also dx.npy, and\n"
      "dweight.npy and dbias.npy when the layer is affine; running_mean.npy\n"
      "and running_var.npy when running statistics are tracked. Nothing is\n"
      "written unless every step succeeds. A summary goes to stdout.\n"
      "\n"
      "  --op OP               batchnorm, layernorm, instancenorm, groupnorm\n"
      "                        or dropout (required)\n"
      "  --x X.npy             the input (required). BN/IN/GN: (N, C, "
      "d1..dk),\n"
      "                        or (N, d1..dk, C) with --layout nhwc; LN and\n"
      "                        dropout: any shape with at least 1 dim\n"
      "  --dy DY.npy           gradient of y (same shape as x): run backward\n"
      "  --out-dir DIR         where the outputs go (required)\n"
      "  --weight W.npy        affine weight: (C,) for BN/IN/GN, the\n"
      "  --bias B.npy          normalized shape for LN; both or neither\n"
      "                        (neither: no affine transform)\n"
      "  --eval                eval mode (default: train)\n"
      "  --layout nchw|nhwc    memory layout of x for BN/IN/GN (default nchw)\n"
      "  --eps E               added to the variance, finite > 0 (default "
      "1e-5)\n"
      "\n"
      "BatchNorm and InstanceNorm running statistics:\n"
      "  --running-mean RM.npy --running-var RV.npy\n"
      "                        (C,) each, both or neither. Given: used (eval)\n"
      "                        or updated (train). Neither: BatchNorm starts\n"
      "                        from fresh buffers (mean 0, var 1) and\n"
      "                        InstanceNorm tracks none (PyTorch's default).\n"
      "                        Tracked statistics are always written.\n"
      "  --no-running-stats    BatchNorm: use batch statistics in train and\n"
      "                        eval, track and write nothing\n"
      "  --momentum M          update factor in [0, 1] (default 0.1)\n"
      "  --cumulative          BatchNorm: cumulative average instead of\n"
      "                        momentum (PyTorch's momentum=None)\n"
      "  --num-batches-tracked N\n"
      "                        BatchNorm: the count before this step (default "
      "0)\n"
      "\n"
      "GroupNorm and LayerNorm:\n"
      "  --groups G            GroupNorm: number of groups, divides C "
      "(required)\n"
      "  --norm-dims K         LayerNorm: normalize over the trailing K dims\n"
      "                        of x (default 1)\n"
      "\n"
      "Dropout:\n"
      "  --p P                 probability of zeroing, in [0, 1] (default "
      "0.5)\n"
      "  --seed S --layer L    Philox key seed and layer id, 32-bit (default "
      "0)\n"
      "  --step T              step in the Philox counter, 64-bit (default 0)\n"
      "\n"
      "Under mpirun:\n"
      "  --sync                every rank reads the whole x (and dy) and "
      "takes\n"
      "                        a shard of the batch (dim 0): an even split,\n"
      "                        the first N mod P ranks getting one more.\n"
      "                        BatchNorm reduces its statistics over MPI\n"
      "                        (SyncBN); the other ops run per rank. Rank 0\n"
      "                        gathers y and dx in batch order and writes\n"
      "                        them; dweight and dbias are summed over ranks;\n"
      "                        running statistics are rank 0's (group 0's).\n"
      "                        MPI is initialized only with --sync.\n"
      "  --counts c0,c1,...    the shard sizes instead: P non-negative\n"
      "                        numbers summing to N (empty shards allowed)\n"
      "  --group-size k        BatchNorm: synchronize within consecutive\n"
      "                        groups of k ranks (default: all ranks)\n"
      "\n"
      "Exit status: 0 success; 1 a file, the data, the library or MPI failed;\n"
      "2 the command line is wrong. Every failure prints one line naming the\n"
      "flag or file.\n");
}

/* ------------------------------------------------------------------ */
/* Options and errors. */

typedef struct apply_opts_s {
  int seen[O_COUNT];
  sbn_op_t op;
  const char *x, *dy, *weight, *bias, *rmean, *rvar, *out_dir;
  int64_t nbt;
  double eps, momentum, p;
  int cumulative, eval, no_running, sync, norm_dims, group_size;
  sbn_layout_t layout;
  size_t groups;
  uint32_t seed, layer;
  uint64_t step;
  size_t *counts; /* --counts, ncounts entries */
  size_t ncounts;
} apply_opts_t;

typedef struct apply_err_s {
  int status; /* 0, 1 (runtime) or 2 (usage) */
  char msg[1024];
} apply_err_t;

/* Records the first failure (later ones are consequences) and returns its
 * exit status. */
static int fail(apply_err_t *e, int status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int fail(apply_err_t *e, int status, const char *fmt, ...) {
  if (e->status != 0)
    return e->status;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(e->msg, sizeof e->msg, fmt, ap);
  va_end(ap);
  e->status = status;
  return status;
}

/* A library failure: the context, the code's name and the library's
 * message, which names the argument. */
static int fail_lib(apply_err_t *e, const char *what, int rc) {
  return fail(e, 1, "%s: %s: %s", what, sbn_err_name(rc), sbn_last_error());
}

/* Strict unsigned decimal: digits only (strtoull would accept a sign and
 * wrap "-1" around), no trailing text, at most max. */
static int parse_u64(const char *s, uint64_t max, uint64_t *out) {
  char *end;
  if (*s < '0' || *s > '9')
    return -1;
  errno = 0;
  unsigned long long v = strtoull(s, &end, 10);
  if (errno != 0 || *end != '\0' || v > max)
    return -1;
  *out = (uint64_t)v;
  return 0;
}

/* Strict finite double: no leading blanks, no trailing text, no range
 * error, no NaN or infinity. */
static int parse_double(const char *s, double *out) {
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

static int parse_counts(const char *s, apply_opts_t *o) {
  size_t n = 1;
  for (const char *q = s; *q; q++)
    n += *q == ',';
  o->counts = calloc(n, sizeof *o->counts);
  if (o->counts == NULL)
    return -1;
  o->ncounts = 0;
  const char *q = s;
  for (;;) {
    const char *comma = strchr(q, ',');
    size_t len = comma ? (size_t)(comma - q) : strlen(q);
    char buf[32];
    uint64_t v;
    if (len == 0 || len >= sizeof buf)
      return -1;
    memcpy(buf, q, len);
    buf[len] = '\0';
    if (parse_u64(buf, SIZE_MAX, &v) != 0)
      return -1;
    o->counts[o->ncounts++] = (size_t)v;
    if (comma == NULL)
      return 0;
    q = comma + 1;
  }
}

static const char *opt_name(int id) {
  for (const struct option *p = apply_opts; p->name; p++)
    if (p->val == id)
      return p->name;
  return "?";
}

/* Parses argv into o. Returns 0 to go on, -1 after printing --help, or 2
 * with the message in e. Nothing here touches files or MPI. */
static int parse_args(int argc, char **argv, apply_opts_t *o, apply_err_t *e) {
  int c;
  uint64_t u;
  memset(o, 0, sizeof *o);
  o->eps = 1e-5;
  o->momentum = 0.1;
  o->p = 0.5;
  o->norm_dims = 1;
  o->layout = SBN_LAYOUT_NCHW;
  optind = 1;
  opterr = 0;
  while ((c = getopt_long(argc, argv, ":", apply_opts, NULL)) != -1) {
    if (c == '?')
      return fail(e, 2, "unknown option '%s' (see syncbn apply --help)",
                  argv[optind - 1]);
    if (c == ':')
      return fail(e, 2, "%s: missing value", argv[optind - 1]);
    if (c == O_HELP) {
      apply_usage(stdout);
      return -1;
    }
    if (c <= 0 || c >= O_COUNT)
      return fail(e, 2, "unexpected option");
    if (o->seen[c]++)
      return fail(e, 2, "--%s: given more than once", opt_name(c));
    switch (c) {
      case O_OP:
        if (sbn_op_parse(optarg, &o->op) != 0)
          return fail(e, 2,
                      "--op: unknown op '%s' (batchnorm, layernorm, "
                      "instancenorm, groupnorm, dropout)",
                      optarg);
        break;
      case O_X:
        o->x = optarg;
        break;
      case O_DY:
        o->dy = optarg;
        break;
      case O_WEIGHT:
        o->weight = optarg;
        break;
      case O_BIAS:
        o->bias = optarg;
        break;
      case O_RMEAN:
        o->rmean = optarg;
        break;
      case O_RVAR:
        o->rvar = optarg;
        break;
      case O_OUTDIR:
        if (*optarg == '\0')
          return fail(e, 2, "--out-dir: empty path");
        o->out_dir = optarg;
        break;
      case O_NBT:
        if (parse_u64(optarg, INT64_MAX, &u) != 0)
          return fail(e, 2,
                      "--num-batches-tracked: '%s' is not an integer in "
                      "[0, 2^63)",
                      optarg);
        o->nbt = (int64_t)u;
        break;
      case O_NORUN:
        o->no_running = 1;
        break;
      case O_EPS:
        if (parse_double(optarg, &o->eps) != 0 || !(o->eps > 0))
          return fail(e, 2, "--eps: '%s' is not a finite number > 0", optarg);
        break;
      case O_MOMENTUM:
        if (parse_double(optarg, &o->momentum) != 0 || o->momentum < 0 ||
            o->momentum > 1)
          return fail(e, 2, "--momentum: '%s' is not a number in [0, 1]",
                      optarg);
        break;
      case O_CUMULATIVE:
        o->cumulative = 1;
        break;
      case O_EVAL:
        o->eval = 1;
        break;
      case O_LAYOUT:
        if (strcmp(optarg, "nchw") == 0)
          o->layout = SBN_LAYOUT_NCHW;
        else if (strcmp(optarg, "nhwc") == 0)
          o->layout = SBN_LAYOUT_NHWC;
        else
          return fail(e, 2, "--layout: '%s' is not nchw or nhwc", optarg);
        break;
      case O_GROUPS:
        if (parse_u64(optarg, SIZE_MAX, &u) != 0 || u == 0)
          return fail(e, 2, "--groups: '%s' is not a positive integer", optarg);
        o->groups = (size_t)u;
        break;
      case O_NORMDIMS:
        if (parse_u64(optarg, SBN_MAX_DIMS, &u) != 0 || u == 0)
          return fail(e, 2, "--norm-dims: '%s' is not an integer in [1, %d]",
                      optarg, SBN_MAX_DIMS);
        o->norm_dims = (int)u;
        break;
      case O_P:
        if (parse_double(optarg, &o->p) != 0 || o->p < 0 || o->p > 1)
          return fail(e, 2, "--p: '%s' is not a probability in [0, 1]", optarg);
        break;
      case O_SEED:
      case O_LAYER:
        if (parse_u64(optarg, UINT32_MAX, &u) != 0)
          return fail(e, 2, "--%s: '%s' is not an integer in [0, 2^32)",
                      opt_name(c), optarg);
        *(c == O_SEED ? &o->seed : &o->layer) = (uint32_t)u;
        break;
      case O_STEP:
        if (parse_u64(optarg, UINT64_MAX, &u) != 0)
          return fail(e, 2, "--step: '%s' is not an integer in [0, 2^64)",
                      optarg);
        o->step = u;
        break;
      case O_SYNC:
        o->sync = 1;
        break;
      case O_COUNTS:
        if (parse_counts(optarg, o) != 0)
          return fail(e, 2,
                      "--counts: '%s' is not a comma-separated list of "
                      "non-negative integers",
                      optarg);
        break;
      case O_GROUPSIZE:
        if (parse_u64(optarg, INT_MAX, &u) != 0 || u == 0)
          return fail(e, 2, "--group-size: '%s' is not a positive integer",
                      optarg);
        o->group_size = (int)u;
        break;
    }
  }
  if (optind < argc)
    return fail(e, 2, "unexpected argument '%s'", argv[optind]);

  /* Required flags, then flags that do not apply to the op: silently
   * ignoring one would run a different experiment than the one asked for. */
  if (!o->seen[O_OP])
    return fail(e, 2, "--op: required (see syncbn apply --help)");
  if (!o->seen[O_X])
    return fail(e, 2, "--x: required");
  if (!o->seen[O_OUTDIR])
    return fail(e, 2, "--out-dir: required");
  const char *name = sbn_op_name(o->op);
  int gn = o->op == SBN_OP_GROUPNORM, ln = o->op == SBN_OP_LAYERNORM;
  int dr = o->op == SBN_OP_DROPOUT;
  static const struct {
    int id;
    unsigned ops; /* bit per sbn_op_t */
  } applies[] = {
      {O_WEIGHT, 0xf},    {O_BIAS, 0xf},     {O_EPS, 0xf},
      {O_RMEAN, 0x5},     {O_RVAR, 0x5},     {O_NORUN, 0x5},
      {O_MOMENTUM, 0x5},  {O_NBT, 0x1},      {O_CUMULATIVE, 0x1},
      {O_GROUPS, 0x8},    {O_NORMDIMS, 0x2}, {O_P, 0x10},
      {O_SEED, 0x10},     {O_LAYER, 0x10},   {O_STEP, 0x10},
      {O_GROUPSIZE, 0x1},
  };
  for (size_t i = 0; i < sizeof applies / sizeof *applies; i++)
    if (o->seen[applies[i].id] && !(applies[i].ops & (1u << o->op)))
      return fail(e, 2, "--%s: does not apply to --op %s",
                  opt_name(applies[i].id), name);
  if (o->layout == SBN_LAYOUT_NHWC && (ln || dr))
    return fail(e, 2,
                "--layout: nhwc applies to batchnorm, instancenorm and "
                "groupnorm; %s takes plain C-order arrays",
                name);
  if (gn && !o->seen[O_GROUPS])
    return fail(e, 2, "--groups: required for --op groupnorm");
  if (!!o->weight != !!o->bias)
    return fail(e, 2, "--%s: given without --%s (both or neither)",
                o->weight ? "weight" : "bias", o->weight ? "bias" : "weight");
  if (!!o->rmean != !!o->rvar)
    return fail(e, 2, "--%s: given without --%s (both or neither)",
                o->rmean ? "running-mean" : "running-var",
                o->rmean ? "running-var" : "running-mean");
  if (o->no_running && o->rmean)
    return fail(e, 2,
                "--no-running-stats: conflicts with --running-mean and "
                "--running-var");
  if (o->no_running && o->seen[O_NBT])
    return fail(e, 2,
                "--num-batches-tracked: conflicts with --no-running-stats");
  if (o->cumulative && o->seen[O_MOMENTUM])
    return fail(e, 2, "--cumulative: conflicts with --momentum");
  if (!o->sync && o->seen[O_COUNTS])
    return fail(e, 2, "--counts: needs --sync");
  if (!o->sync && o->seen[O_GROUPSIZE])
    return fail(e, 2, "--group-size: needs --sync");
  return 0;
}

/* ------------------------------------------------------------------ */
/* The run. */

typedef struct apply_run_s {
  apply_opts_t o;
  apply_err_t e;
  int rank, size;
  /* Inputs, every rank the whole arrays. */
  sbn_npy_t x, dy, w, b, rm, rv;
  sbn_tensor_desc_t desc; /* logical (N, C, ...) of the whole x */
  size_t N, inner, C, nw; /* batch, elements per sample, channels, |weight| */
  int track, fresh;       /* running stats tracked; starting from 0/1 */
  size_t *counts, first;  /* shard sizes per rank, this rank's first sample */
  /* Working state. */
  sbn_layer_params_t params;
  sbn_comm_t *comm;
  sbn_layer_t *layer;
  sbn_state_t state;
  int64_t nbt_before;
  float *y, *dx, *dw, *db; /* y, dx: the whole batch on rank 0 */
  float *y_mine, *dx_mine; /* this rank's shard (into y/dx on rank 0) */
  void *ws, *saved;
  size_t ws_bytes, saved_bytes;
} apply_run_t;

static void shape_str(const size_t *dims, int ndim, char *buf, size_t cap) {
  size_t n = (size_t)snprintf(buf, cap, "(");
  for (int i = 0; i < ndim && n < cap; i++)
    n += (size_t)snprintf(buf + n, cap - n, "%s%zu", i ? ", " : "", dims[i]);
  if (n < cap)
    snprintf(buf + n, cap - n, "%s)", ndim == 1 ? "," : "");
}

static int read_input(apply_run_t *r, const char *flag, const char *path,
                      sbn_npy_t *t) {
  int rc = sbn_npy_read(path, t);
  if (rc != 0)
    return fail(&r->e, 1, "--%s: %s: %s", flag, sbn_err_name(rc),
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
  shape_str(t->dims, t->ndim, got, sizeof got);
  shape_str(dims, ndim, want, sizeof want);
  return fail(&r->e, 1, "--%s: %s has shape %s, expected %s", flag, path, got,
              want);
}

/* Reads every input and checks shapes against the op and the flags. */
static int load_inputs(apply_run_t *r) {
  apply_opts_t *o = &r->o;
  const char *name = sbn_op_name(o->op);
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

  const sbn_npy_t *x = &r->x;
  char xs[160];
  shape_str(x->dims, x->ndim, xs, sizeof xs);
  if (x->ndim < 1)
    return fail(&r->e, 1, "--x: %s is a 0-d array; %s needs at least 1 dim",
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
      return fail(&r->e, 1,
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
      return fail(&r->e, 1, "--groups: %zu does not divide %zu channels",
                  o->groups, r->C);
  } else if (o->op == SBN_OP_LAYERNORM) {
    if (o->norm_dims > x->ndim)
      return fail(&r->e, 1, "--norm-dims: %d exceeds the %d dims of --x %s %s",
                  o->norm_dims, x->ndim, o->x, xs);
    if (o->sync && o->norm_dims == x->ndim)
      return fail(&r->e, 1,
                  "--norm-dims: with --sync dim 0 of --x %s is split "
                  "between ranks and cannot be normalized over",
                  o->x);
    r->nw = 1;
    for (int i = x->ndim - o->norm_dims; i < x->ndim; i++)
      r->nw *= x->dims[i];
  }
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

/* Shard sizes: --counts, or an even split with the first N mod P ranks
 * getting one more. Fails identically on every rank (same inputs). */
static int plan_shards(apply_run_t *r) {
  size_t P = (size_t)r->size;
  r->counts = calloc(P, sizeof *r->counts);
  if (r->counts == NULL)
    return fail(&r->e, 1, "out of memory");
  if (r->o.counts != NULL) {
    size_t sum = 0;
    if (r->o.ncounts != P)
      return fail(&r->e, 2, "--counts: %zu numbers for %zu ranks", r->o.ncounts,
                  P);
    for (size_t i = 0; i < P; i++) {
      if (r->o.counts[i] > SIZE_MAX - sum)
        return fail(&r->e, 2, "--counts: the sum overflows");
      sum += r->o.counts[i];
      r->counts[i] = r->o.counts[i];
    }
    if (sum != r->N)
      return fail(&r->e, 1,
                  "--counts: the counts sum to %zu but --x %s has N = %zu", sum,
                  r->o.x, r->N);
  } else {
    for (size_t i = 0; i < P; i++)
      r->counts[i] = r->N / P + (i < r->N % P);
  }
  r->first = 0;
  for (int i = 0; i < r->rank; i++)
    r->first += r->counts[i];
  if (r->o.sync) {
    /* MPI counts and displacements are ints (in samples, with a derived
     * datatype of one sample), and so is the length of dweight. */
    if (r->N > INT_MAX || r->inner > INT_MAX || r->nw > INT_MAX)
      return fail(&r->e, 1,
                  "--x: %s is too large to gather with MPI (N %zu, %zu "
                  "values per sample; at most %d each)",
                  r->o.x, r->N, r->inner, INT_MAX);
  }
  return 0;
}

/* Under --sync: every rank learns the worst status and the lowest rank
 * that failed, which is the one that prints its message. */
static int agree(apply_run_t *r) {
  if (!r->o.sync)
    return r->e.status;
  int v[2] = {r->e.status, r->e.status ? r->size - r->rank : 0};
  MPI_Allreduce(MPI_IN_PLACE, v, 2, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  int speaker = v[1] > 0 ? r->size - v[1] : -1;
  /* Only the lowest failing rank prints, so a failure that every rank
   * sees (a bad --counts) is reported once. */
  if (v[0] != 0 && r->rank != speaker)
    r->e.msg[0] = '\0';
  r->e.status = v[0];
  return v[0];
}

static int setup_layer(apply_run_t *r) {
  apply_opts_t *o = &r->o;
  sbn_layer_params_t *p = &r->params;
  int rc;
  sbn_layer_params_default(p, o->op);
  p->channels = r->C;
  p->groups = o->op == SBN_OP_GROUPNORM ? o->groups : 1;
  if (o->op == SBN_OP_LAYERNORM) {
    p->norm_ndim = o->norm_dims;
    for (int i = 0; i < o->norm_dims; i++)
      p->norm_shape[i] = r->x.dims[r->x.ndim - o->norm_dims + i];
  }
  p->eps = o->eps;
  p->momentum = o->momentum;
  p->cumulative = o->cumulative;
  p->affine = o->weight != NULL;
  p->track_running_stats = r->track;
  p->p = o->p;
  p->seed = o->seed;
  p->layer_id = o->layer;
  /* BatchNorm synchronizes through the MPI communicator. Dropout gets one
   * too, only for its world rank, which keys each rank's Philox stream so
   * that ranks draw independent masks; it never communicates. */
  if (o->sync && (o->op == SBN_OP_BATCHNORM || o->op == SBN_OP_DROPOUT)) {
    rc = sbn_mpi_comm_create(MPI_COMM_WORLD,
                             o->op == SBN_OP_BATCHNORM ? o->group_size : 1, p,
                             &r->comm);
    if (rc != 0)
      return fail_lib(&r->e, "creating the MPI communicator", rc);
  }
  return 0;
}

static int alloc_buffers(apply_run_t *r) {
  apply_opts_t *o = &r->o;
  sbn_tensor_desc_t mine = r->desc;
  size_t n_mine = r->counts[r->rank] * r->inner, n_all = r->x.numel;
  int root = r->rank == 0, rc;
  mine.dims[0] = r->counts[r->rank];
  if ((rc = sbn_layer_create(&r->params, r->comm, &r->layer)) != 0)
    return fail_lib(&r->e, "creating the layer", rc);
  if ((rc = sbn_layer_sizes(r->layer, &mine, &r->ws_bytes, &r->saved_bytes)) !=
      0)
    return fail_lib(&r->e, "--x", rc);
  /* Rank 0 holds the whole batch, its shard at the front (shards are in
   * rank order and rank 0's starts at sample 0); the others only theirs. */
  r->y = malloc((root ? n_all : n_mine) * sizeof(float) + 1);
  if (o->dy)
    r->dx = malloc((root ? n_all : n_mine) * sizeof(float) + 1);
  r->dw = malloc(r->nw * sizeof(float) + 1);
  r->db = malloc(r->nw * sizeof(float) + 1);
  r->ws = malloc(r->ws_bytes + 1);
  r->saved = malloc(r->saved_bytes + 1);
  if (r->track) {
    r->state.running_mean = malloc(r->C * sizeof(float) + 1);
    r->state.running_var = malloc(r->C * sizeof(float) + 1);
  }
  if (!r->y || (o->dy && !r->dx) || !r->dw || !r->db || !r->ws || !r->saved ||
      (r->track && (!r->state.running_mean || !r->state.running_var)))
    return fail(&r->e, 1, "out of memory for a batch of %zu values", n_all);
  r->y_mine = r->y;
  r->dx_mine = r->dx;
  if (r->track) {
    for (size_t c = 0; c < r->C; c++) {
      r->state.running_mean[c] = r->fresh ? 0.0f : r->rm.data[c];
      r->state.running_var[c] = r->fresh ? 1.0f : r->rv.data[c];
    }
  }
  r->state.num_batches_tracked = o->nbt;
  r->nbt_before = o->nbt;
  return 0;
}

static int run_forward(apply_run_t *r) {
  sbn_tensor_desc_t mine = r->desc;
  mine.dims[0] = r->counts[r->rank];
  const float *x = r->x.data + r->first * r->inner;
  sbn_forward_args_t fa = {r->o.eval ? SBN_MODE_EVAL : SBN_MODE_TRAIN,
                           &mine,
                           x,
                           r->y_mine,
                           r->o.weight ? r->w.data : NULL,
                           r->o.weight ? r->b.data : NULL,
                           &r->state,
                           r->o.step,
                           r->ws,
                           r->ws_bytes,
                           r->saved,
                           r->saved_bytes};
  int rc = sbn_forward(r->layer, &fa);
  return rc != 0 ? fail_lib(&r->e, "forward", rc) : 0;
}

static int run_backward(apply_run_t *r) {
  sbn_tensor_desc_t mine = r->desc;
  mine.dims[0] = r->counts[r->rank];
  size_t off = r->first * r->inner;
  sbn_backward_args_t ba = {r->o.eval ? SBN_MODE_EVAL : SBN_MODE_TRAIN,
                            &mine,
                            r->x.data + off,
                            r->dy.data + off,
                            r->dx_mine,
                            r->o.weight ? r->w.data : NULL,
                            r->o.weight ? r->dw : NULL,
                            r->o.weight ? r->db : NULL,
                            r->o.step,
                            r->ws,
                            r->ws_bytes,
                            r->saved,
                            r->saved_bytes};
  int rc = sbn_backward(r->layer, &ba);
  return rc != 0 ? fail_lib(&r->e, "backward", rc) : 0;
}

/* Rank 0 collects y and dx in batch order and the sums of dweight and
 * dbias. Every rank reaches this only after agree() said all is well. */
static int gather(apply_run_t *r) {
  MPI_Datatype sample = MPI_DATATYPE_NULL;
  int *cnt = NULL, *dsp = NULL, root = r->rank == 0, err;
  cnt = malloc(sizeof(int) * (size_t)r->size);
  dsp = malloc(sizeof(int) * (size_t)r->size);
  if (!cnt || !dsp) {
    free(cnt);
    free(dsp);
    /* An allocation this small failing leaves no way to stay consistent
     * with the other ranks' collectives. */
    fprintf(stderr, "syncbn apply: rank %d: out of memory\n", r->rank);
    MPI_Abort(MPI_COMM_WORLD, 1);
    return 1;
  }
  for (int i = 0, at = 0; i < r->size; i++) {
    cnt[i] = (int)r->counts[i];
    dsp[i] = at;
    at += cnt[i];
  }
  err = MPI_Type_contiguous((int)r->inner, MPI_FLOAT, &sample);
  if (err == MPI_SUCCESS)
    err = MPI_Type_commit(&sample);
  float *bufs[2] = {r->y, r->dx};
  for (int k = 0; k < 2 && err == MPI_SUCCESS; k++) {
    if (bufs[k] == NULL || r->inner == 0)
      continue;
    err = MPI_Gatherv(root ? MPI_IN_PLACE : bufs[k], cnt[r->rank], sample,
                      bufs[k], cnt, dsp, sample, 0, MPI_COMM_WORLD);
  }
  if (err == MPI_SUCCESS && r->o.dy && r->o.weight && r->nw > 0) {
    err = MPI_Reduce(root ? MPI_IN_PLACE : r->dw, r->dw, (int)r->nw, MPI_FLOAT,
                     MPI_SUM, 0, MPI_COMM_WORLD);
    if (err == MPI_SUCCESS)
      err = MPI_Reduce(root ? MPI_IN_PLACE : r->db, r->db, (int)r->nw,
                       MPI_FLOAT, MPI_SUM, 0, MPI_COMM_WORLD);
  }
  if (sample != MPI_DATATYPE_NULL)
    MPI_Type_free(&sample);
  free(cnt);
  free(dsp);
  if (err != MPI_SUCCESS)
    return fail_lib(&r->e, "gathering the results",
                    sbn_mpi_error(err, "MPI_Gatherv/MPI_Reduce"));
  return 0;
}

/* mkdir -p. */
static int make_dir(apply_run_t *r, const char *dir) {
  char *p = strdup(dir);
  struct stat st;
  int rc = 0;
  if (p == NULL)
    return fail(&r->e, 1, "out of memory");
  for (char *s = p + 1;; s++) {
    if (*s == '/' || *s == '\0') {
      char keep = *s;
      *s = '\0';
      if (mkdir(p, 0777) != 0 && errno != EEXIST) {
        rc = fail(&r->e, 1, "--out-dir: cannot create %s: %s", p,
                  strerror(errno));
        break;
      }
      *s = keep;
      if (keep == '\0')
        break;
    }
  }
  if (rc == 0 && (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode)))
    rc = fail(&r->e, 1, "--out-dir: %s is not a directory", dir);
  free(p);
  return rc;
}

typedef struct apply_out_s {
  const char *name;
  const float *data;
  int ndim;
  size_t dims[SBN_MAX_DIMS];
} apply_out_t;

static int write_outputs(apply_run_t *r, char *written, size_t cap) {
  apply_opts_t *o = &r->o;
  apply_out_t outs[6];
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
  size_t used = 0;
  written[0] = '\0';
  for (int i = 0; i < n; i++) {
    size_t len = strlen(o->out_dir) + strlen(outs[i].name) + 2;
    char *path = malloc(len);
    if (path == NULL)
      return fail(&r->e, 1, "out of memory");
    snprintf(path, len, "%s/%s", o->out_dir, outs[i].name);
    int rc = sbn_npy_write(path, outs[i].data, outs[i].ndim, outs[i].dims);
    if (rc == 0 && used < cap)
      used += (size_t)snprintf(written + used, cap - used, "%s%s", i ? " " : "",
                               path);
    free(path);
    if (rc != 0)
      return fail_lib(&r->e, "--out-dir", rc);
  }
  return 0;
}

/* ------------------------------------------------------------------ */
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

static void print_summary(apply_run_t *r, const char *written) {
  apply_opts_t *o = &r->o;
  char xs[160];
  shape_str(r->x.dims, r->x.ndim, xs, sizeof xs);
  int mpi_up = 0;
  MPI_Initialized(&mpi_up);
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
  if (o->sync) {
    printf("processes: %d (MPI), batch split", r->size);
    for (int i = 0; i < r->size; i++)
      printf("%s%zu", i ? "," : " ", r->counts[i]);
    if (o->op == SBN_OP_BATCHNORM)
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
  if (o->op == SBN_OP_BATCHNORM || o->op == SBN_OP_INSTANCENORM) {
    const char *src = !r->track  ? "none tracked"
                      : r->fresh ? "fresh buffers (mean 0, var 1)"
                                 : "from --running-mean/--running-var";
    const char *used =
        (o->eval && r->track) ? "running statistics" : "batch statistics";
    printf("running statistics: %s; normalized with %s", src, used);
    if (r->track && o->op == SBN_OP_BATCHNORM)
      printf("; %s, num_batches_tracked %lld -> %lld",
             o->cumulative
                 ? "cumulative average"
                 : (o->eval ? "not updated (eval)" : "momentum update"),
             (long long)r->nbt_before, (long long)r->state.num_batches_tracked);
    printf("\n");
  }

  apply_units_t u;
  memset(&u, 0, sizeof u);
  if (unit_stats(r, &u) != 0) {
    printf("(no memory for the statistics table)\n");
  } else if (o->op == SBN_OP_DROPOUT) {
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
    printf("mean x %.6g -> y %.6g, var x %.6g -> y %.6g\n", u.mx[0], u.my[0],
           u.vx[0], u.vy[0]);
  } else {
    const char *label = o->op == SBN_OP_BATCHNORM      ? "channel"
                        : o->op == SBN_OP_INSTANCENORM ? "n,channel"
                        : o->op == SBN_OP_GROUPNORM    ? "n,group"
                                                       : "row";
    printf("%-10s %12s %12s %12s %12s", label, "x mean", "x var", "y mean",
           "y var");
    if (r->track && o->op == SBN_OP_BATCHNORM)
      printf(" %14s %13s", "running_mean", "running_var");
    printf("\n");
    for (size_t k = 0; k < u.n && k < APPLY_MAX_ROWS; k++) {
      char id[32];
      if (o->op == SBN_OP_INSTANCENORM)
        snprintf(id, sizeof id, "%zu,%zu", k / r->C, k % r->C);
      else if (o->op == SBN_OP_GROUPNORM)
        snprintf(id, sizeof id, "%zu,%zu", k / o->groups, k % o->groups);
      else
        snprintf(id, sizeof id, "%zu", k);
      printf("%-10s %12.5g %12.5g %12.5g %12.5g", id, u.mx[k], u.vx[k], u.my[k],
             u.vy[k]);
      if (r->track && o->op == SBN_OP_BATCHNORM)
        printf(" %14.6g %13.6g", r->state.running_mean[k],
               r->state.running_var[k]);
      printf("\n");
    }
    if (u.n > APPLY_MAX_ROWS)
      printf("... %zu more %ss\n", u.n - APPLY_MAX_ROWS,
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
  free(u.mx);
  printf("wrote: %s\n", written);
}

static void run_free(apply_run_t *r) {
  sbn_layer_destroy(r->layer);
  sbn_comm_destroy(r->comm);
  sbn_npy_free(&r->x);
  sbn_npy_free(&r->dy);
  sbn_npy_free(&r->w);
  sbn_npy_free(&r->b);
  sbn_npy_free(&r->rm);
  sbn_npy_free(&r->rv);
  free(r->counts);
  free(r->o.counts);
  free(r->y);
  free(r->dx);
  free(r->dw);
  free(r->db);
  free(r->ws);
  free(r->saved);
  free(r->state.running_mean);
  free(r->state.running_var);
}

int sbn_cli_apply(int argc, char **argv) {
  apply_run_t *r = calloc(1, sizeof *r);
  char written[4096];
  int st;
  if (r == NULL) {
    fprintf(stderr, "syncbn apply: out of memory\n");
    return 1;
  }
  r->size = 1;
  st = parse_args(argc, argv, &r->o, &r->e);
  if (st != 0) {
    if (st > 0)
      fprintf(stderr, "syncbn apply: %s\n", r->e.msg);
    free(r->o.counts);
    free(r);
    return st > 0 ? st : 0;
  }
  if (r->o.sync) {
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &r->rank);
    MPI_Comm_size(MPI_COMM_WORLD, &r->size);
  }
  /* Each step runs only if every rank got through the ones before. */
  if (load_inputs(r) == 0)
    plan_shards(r);
  if (agree(r) == 0)
    setup_layer(r);
  if (agree(r) == 0)
    alloc_buffers(r);
  if (agree(r) == 0)
    run_forward(r);
  if (agree(r) == 0 && r->o.dy)
    run_backward(r);
  if (agree(r) == 0 && r->o.sync)
    gather(r);
  if (agree(r) == 0 && r->rank == 0 &&
      write_outputs(r, written, sizeof written) == 0)
    print_summary(r, written);
  agree(r);
  st = r->e.status;
  if (st != 0 && r->e.msg[0] != '\0') {
    if (r->o.sync)
      fprintf(stderr, "syncbn apply: rank %d of %d: %s\n", r->rank, r->size,
              r->e.msg);
    else
      fprintf(stderr, "syncbn apply: %s\n", r->e.msg);
  }
  fflush(stdout);
  /* Communicators go before MPI_Finalize. */
  sbn_layer_destroy(r->layer);
  r->layer = NULL;
  sbn_comm_destroy(r->comm);
  r->comm = NULL;
  if (r->o.sync)
    MPI_Finalize();
  run_free(r);
  free(r);
  return st;
}
