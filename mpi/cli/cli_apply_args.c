/* `syncbn apply`: the command line. One table lists every option with its
 * setter and the ops it applies to; parsing is getopt_long over that
 * table, then the checks that look at several options together. */
#include <float.h>
#include <getopt.h>
#include <math.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli_apply_int.h"
#include "cli_args.h"

/* Bits of sbn_op_t for an option's `ops`. */
#define BN (1u << SBN_OP_BATCHNORM)
#define LN (1u << SBN_OP_LAYERNORM)
#define IN (1u << SBN_OP_INSTANCENORM)
#define GN (1u << SBN_OP_GROUPNORM)
#define DR (1u << SBN_OP_DROPOUT)
#define ALL (BN | LN | IN | GN | DR)

typedef struct apply_flag_s apply_flag_t;

/* Sets the option's value from arg (NULL for a flag without one); 0 or 2
 * with the message in e. */
typedef int (*apply_set_t)(apply_opts_t *o, const apply_flag_t *f,
                           const char *arg, apply_err_t *e);

struct apply_flag_s {
  const char *name;
  int has_arg;
  unsigned ops;     /* the ops it applies to; using it with another fails */
  apply_set_t set;  /* NULL: --help */
  size_t off;       /* the field of apply_opts_t that set_path, set_flag
                       and set_u32 write */
  const char *what; /* the message's "is not ..." for numeric values */
};

static void usage(FILE *f) {
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
      "Ghost batches:\n"
      "  --ghost-batch G       BatchNorm: normalize each run of G consecutive\n"
      "                        samples of a rank with its own statistics\n"
      "                        (the last may be shorter); no reduction over\n"
      "                        ranks, even with --sync. Running statistics:\n"
      "                        one update per step from the mean over the\n"
      "                        sub-batches of their means and unbiased\n"
      "                        variances (default 0: off)\n"
      "\n"
      "Exit status: 0 success; 1 a file, the data, the library or MPI failed;\n"
      "2 the command line is wrong. Every failure prints one line naming the\n"
      "flag or file.\n");
}
static int bad_value(const apply_flag_t *f, const char *arg, apply_err_t *e) {
  return sbn__apply_fail(e, 2, "--%s: '%s' is not %s", f->name, arg, f->what);
}

/* An unsigned value in [lo, hi]. */
static int uint_arg(const apply_flag_t *f, const char *arg, uint64_t lo,
                    uint64_t hi, uint64_t *u, apply_err_t *e) {
  if (sbn__cli_parse_u64(arg, hi, u) != 0 || *u < lo)
    return bad_value(f, arg, e);
  return 0;
}

static int set_path(apply_opts_t *o, const apply_flag_t *f, const char *arg,
                    apply_err_t *e) {
  (void)e;
  *(const char **)((char *)o + f->off) = arg;
  return 0;
}

static int set_flag(apply_opts_t *o, const apply_flag_t *f, const char *arg,
                    apply_err_t *e) {
  (void)arg;
  (void)e;
  *(int *)((char *)o + f->off) = 1;
  return 0;
}

static int set_out_dir(apply_opts_t *o, const apply_flag_t *f, const char *arg,
                       apply_err_t *e) {
  if (*arg == '\0')
    return sbn__apply_fail(e, 2, "--out-dir: empty path");
  return set_path(o, f, arg, e);
}

static int set_op(apply_opts_t *o, const apply_flag_t *f, const char *arg,
                  apply_err_t *e) {
  (void)f;
  if (sbn_op_parse(arg, &o->op) != 0)
    return sbn__apply_fail(e, 2,
                           "--op: unknown op '%s' (batchnorm, layernorm, "
                           "instancenorm, groupnorm, dropout)",
                           arg);
  return 0;
}

static int set_layout(apply_opts_t *o, const apply_flag_t *f, const char *arg,
                      apply_err_t *e) {
  return sbn__cli_parse_layout(arg, &o->layout) != 0 ? bad_value(f, arg, e) : 0;
}

static int set_eps(apply_opts_t *o, const apply_flag_t *f, const char *arg,
                   apply_err_t *e) {
  /* The library's bound (FLT_MIN): smaller overflows 1/sqrt(var + eps). */
  if (sbn__cli_parse_double(arg, &o->eps) != 0 || !(o->eps >= FLT_MIN) ||
      isinf(o->eps))
    return bad_value(f, arg, e);
  return 0;
}

static int set_momentum(apply_opts_t *o, const apply_flag_t *f, const char *arg,
                        apply_err_t *e) {
  if (sbn__cli_parse_double(arg, &o->momentum) != 0 || o->momentum < 0 ||
      o->momentum > 1)
    return bad_value(f, arg, e);
  return 0;
}

static int set_p(apply_opts_t *o, const apply_flag_t *f, const char *arg,
                 apply_err_t *e) {
  if (sbn__cli_parse_double(arg, &o->p) != 0 || o->p < 0 || o->p > 1)
    return bad_value(f, arg, e);
  return 0;
}

static int set_nbt(apply_opts_t *o, const apply_flag_t *f, const char *arg,
                   apply_err_t *e) {
  uint64_t u;
  if (uint_arg(f, arg, 0, INT64_MAX, &u, e) != 0)
    return 2;
  o->nbt = (int64_t)u;
  return 0;
}

static int set_groups(apply_opts_t *o, const apply_flag_t *f, const char *arg,
                      apply_err_t *e) {
  uint64_t u;
  if (uint_arg(f, arg, 1, SIZE_MAX, &u, e) != 0)
    return 2;
  o->groups = (size_t)u;
  return 0;
}

static int set_norm_dims(apply_opts_t *o, const apply_flag_t *f,
                         const char *arg, apply_err_t *e) {
  uint64_t u;
  if (uint_arg(f, arg, 1, SBN_MAX_DIMS, &u, e) != 0)
    return 2;
  o->norm_dims = (int)u;
  return 0;
}

/* --seed and --layer: the uint32_t field at f->off. */
static int set_u32(apply_opts_t *o, const apply_flag_t *f, const char *arg,
                   apply_err_t *e) {
  uint64_t u;
  if (uint_arg(f, arg, 0, UINT32_MAX, &u, e) != 0)
    return 2;
  *(uint32_t *)((char *)o + f->off) = (uint32_t)u;
  return 0;
}

static int set_step(apply_opts_t *o, const apply_flag_t *f, const char *arg,
                    apply_err_t *e) {
  return uint_arg(f, arg, 0, UINT64_MAX, &o->step, e);
}

static int set_group_size(apply_opts_t *o, const apply_flag_t *f,
                          const char *arg, apply_err_t *e) {
  uint64_t u;
  if (uint_arg(f, arg, 1, INT_MAX, &u, e) != 0)
    return 2;
  o->group_size = (int)u;
  return 0;
}

static int set_ghost(apply_opts_t *o, const apply_flag_t *f, const char *arg,
                     apply_err_t *e) {
  uint64_t u;
  if (uint_arg(f, arg, 0, SIZE_MAX, &u, e) != 0)
    return 2;
  o->ghost_batch = (size_t)u;
  return 0;
}

static int set_counts(apply_opts_t *o, const apply_flag_t *f, const char *arg,
                      apply_err_t *e) {
  if (sbn__cli_parse_list(arg, SIZE_MAX, &o->counts, &o->ncounts) != 0)
    return bad_value(f, arg, e);
  return 0;
}

/* The options, in the order of the enum below (which indexes them). */
#define PATH(name, field)                                                  \
  {                                                                        \
    name, required_argument, ALL, set_path, offsetof(apply_opts_t, field), \
        NULL                                                               \
  }
#define FLAG(name, ops, field) \
  { name, no_argument, ops, set_flag, offsetof(apply_opts_t, field), NULL }
#define VALUE(name, ops, fn, what) \
  { name, required_argument, ops, fn, 0, what }
static const apply_flag_t flags[] = {
    VALUE("op", ALL, set_op, NULL),
    PATH("x", x),
    PATH("dy", dy),
    {"weight", required_argument, BN | LN | IN | GN, set_path,
     offsetof(apply_opts_t, weight), NULL},
    {"bias", required_argument, BN | LN | IN | GN, set_path,
     offsetof(apply_opts_t, bias), NULL},
    {"running-mean", required_argument, BN | IN, set_path,
     offsetof(apply_opts_t, rmean), NULL},
    {"running-var", required_argument, BN | IN, set_path,
     offsetof(apply_opts_t, rvar), NULL},
    VALUE("num-batches-tracked", BN, set_nbt, "an integer in [0, 2^63)"),
    FLAG("no-running-stats", BN | IN, no_running),
    VALUE("eps", BN | LN | IN | GN, set_eps,
          "a finite number >= 1.17549435e-38 (FLT_MIN)"),
    VALUE("momentum", BN | IN, set_momentum, "a number in [0, 1]"),
    FLAG("cumulative", BN, cumulative),
    FLAG("eval", ALL, eval),
    VALUE("layout", ALL, set_layout, "nchw or nhwc"),
    VALUE("groups", GN, set_groups, "a positive integer"),
    VALUE("norm-dims", LN, set_norm_dims, "an integer in [1, 8]"),
    VALUE("p", DR, set_p, "a probability in [0, 1]"),
    {"seed", required_argument, DR, set_u32, offsetof(apply_opts_t, seed),
     "an integer in [0, 2^32)"},
    {"layer", required_argument, DR, set_u32, offsetof(apply_opts_t, layer),
     "an integer in [0, 2^32)"},
    VALUE("step", DR, set_step, "an integer in [0, 2^64)"),
    FLAG("sync", ALL, sync),
    VALUE("counts", ALL, set_counts,
          "a comma-separated list of non-negative integers"),
    VALUE("group-size", BN, set_group_size, "a positive integer"),
    VALUE("ghost-batch", BN, set_ghost, "a non-negative integer"),
    {"out-dir", required_argument, ALL, set_out_dir,
     offsetof(apply_opts_t, out_dir), NULL},
    {"help", no_argument, ALL, NULL, 0, NULL},
};
#undef PATH
#undef FLAG
#undef VALUE

enum {
  O_OP,
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
  O_GHOST,
  O_OUTDIR,
  O_HELP,
  O_COUNT
};
#define NFLAGS (sizeof flags / sizeof *flags)
_Static_assert(NFLAGS == O_COUNT, "flags[] and the enum disagree");
_Static_assert(O_COUNT <= SBN__APPLY_MAX_OPTS, "apply_opts_t.seen too small");
_Static_assert(SBN_MAX_DIMS == 8, "--norm-dims' message says [1, 8]");

static void set_defaults(apply_opts_t *o) {
  memset(o, 0, sizeof *o);
  o->eps = 1e-5;
  o->momentum = 0.1;
  o->p = 0.5;
  o->norm_dims = 1;
  o->layout = SBN_LAYOUT_NCHW;
}

/* Required flags, then flags that do not apply to the op: silently
 * ignoring one would run a different experiment than the one asked for. */
static int check_applies(const apply_opts_t *o, apply_err_t *e) {
  if (!o->seen[O_OP])
    return sbn__apply_fail(e, 2, "--op: required (see syncbn apply --help)");
  if (!o->seen[O_X])
    return sbn__apply_fail(e, 2, "--x: required");
  if (!o->seen[O_OUTDIR])
    return sbn__apply_fail(e, 2, "--out-dir: required");
  for (size_t i = 0; i < NFLAGS; i++)
    if (o->seen[i] && !(flags[i].ops & (1u << o->op)))
      return sbn__apply_fail(e, 2, "--%s: does not apply to --op %s",
                             flags[i].name, sbn_op_name(o->op));
  if (o->layout == SBN_LAYOUT_NHWC &&
      (o->op == SBN_OP_LAYERNORM || o->op == SBN_OP_DROPOUT))
    return sbn__apply_fail(e, 2,
                           "--layout: nhwc applies to batchnorm, instancenorm "
                           "and groupnorm; %s takes plain C-order arrays",
                           sbn_op_name(o->op));
  if (o->op == SBN_OP_GROUPNORM && !o->seen[O_GROUPS])
    return sbn__apply_fail(e, 2, "--groups: required for --op groupnorm");
  return 0;
}

/* Options that come in pairs or exclude each other. */
static int check_conflicts(const apply_opts_t *o, apply_err_t *e) {
  if (!!o->weight != !!o->bias)
    return sbn__apply_fail(e, 2, "--%s: given without --%s (both or neither)",
                           o->weight ? "weight" : "bias",
                           o->weight ? "bias" : "weight");
  if (!!o->rmean != !!o->rvar)
    return sbn__apply_fail(e, 2, "--%s: given without --%s (both or neither)",
                           o->rmean ? "running-mean" : "running-var",
                           o->rmean ? "running-var" : "running-mean");
  if (o->no_running && o->rmean)
    return sbn__apply_fail(e, 2,
                           "--no-running-stats: conflicts with --running-mean "
                           "and --running-var");
  if (o->no_running && o->seen[O_NBT])
    return sbn__apply_fail(
        e, 2, "--num-batches-tracked: conflicts with --no-running-stats");
  if (o->cumulative && o->seen[O_MOMENTUM])
    return sbn__apply_fail(e, 2, "--cumulative: conflicts with --momentum");
  if (!o->sync && o->seen[O_COUNTS])
    return sbn__apply_fail(e, 2, "--counts: needs --sync");
  if (!o->sync && o->seen[O_GROUPSIZE])
    return sbn__apply_fail(e, 2, "--group-size: needs --sync");
  return 0;
}

int sbn__apply_parse_args(int argc, char **argv, apply_opts_t *o,
                          apply_err_t *e) {
  struct option opts[NFLAGS + 1];
  int c;
  for (size_t i = 0; i < NFLAGS; i++)
    opts[i] = (struct option){flags[i].name, flags[i].has_arg, NULL, (int)i};
  opts[NFLAGS] = (struct option){NULL, 0, NULL, 0};
  set_defaults(o);
  optind = 1;
  opterr = 0;
  /* The leading ':' makes a missing value ':' and an unknown option '?';
   * option i returns i, and '?' and ':' are above every index. */
  while ((c = getopt_long(argc, argv, ":", opts, NULL)) != -1) {
    if (c == '?')
      return sbn__apply_fail(e, 2,
                             "unknown option '%s' (see syncbn apply --help)",
                             argv[optind - 1]);
    if (c == ':')
      return sbn__apply_fail(e, 2, "%s: missing value", argv[optind - 1]);
    if (c < 0 || c >= O_COUNT)
      return sbn__apply_fail(e, 2, "unexpected option");
    if (c == O_HELP) {
      usage(stdout);
      return -1;
    }
    if (o->seen[c]++)
      return sbn__apply_fail(e, 2, "--%s: given more than once", flags[c].name);
    if (flags[c].set(o, &flags[c], optarg, e) != 0)
      return e->status;
  }
  if (optind < argc)
    return sbn__apply_fail(e, 2, "unexpected argument '%s'", argv[optind]);
  if (check_applies(o, e) != 0 || check_conflicts(o, e) != 0)
    return e->status;
  return 0;
}
