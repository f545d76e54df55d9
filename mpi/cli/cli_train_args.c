/* `syncbn train`: the command line. getopt_long over one table; every
 * value is parsed strictly and a bad one exits 2 naming its flag. */
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli_args.h"
#include "cli_train_int.h"

static void usage(FILE *f) {
  fprintf(
      f,
      "usage: mpirun -np P syncbn train [options]\n"
      "       syncbn train [options]           (one process)\n"
      "\n"
      "Trains a small classifier on Fashion-MNIST with data parallelism over\n"
      "MPI: every rank takes its shard of each global batch, gradients are\n"
      "summed with one MPI_Allreduce per step, and the normalization layers\n"
      "are syncbn's. Evaluates on the 10,000 test images after each epoch.\n"
      "\n"
      "Model:\n"
      "  --model mlp|cnn       the network (default mlp)\n"
      "  --norm KIND           none, bn (per rank), syncbn (over the sync\n"
      "                        group), gn, ln or in (cnn only); default "
      "syncbn\n"
      "  --layout nchw|nhwc    the CNN's memory layout (default nchw; nhwc\n"
      "                        is channels-last, not with --norm ln)\n"
      "  --groups G            GroupNorm groups, dividing C (default "
      "min(8, C))\n"
      "  --group-size k        SyncBN: synchronize within consecutive groups\n"
      "                        of k ranks (default: all ranks)\n"
      "  --ghost-batch g       BatchNorm (bn, syncbn): normalize each run of\n"
      "                        g samples of a rank by its own statistics,\n"
      "                        with no reduction (default: off)\n"
      "  --dropout P           dropout after each hidden block, in [0, 1)\n"
      "                        (Philox, keyed by seed and rank; default 0)\n"
      "  --precise-bn N        before each evaluation, replace every\n"
      "                        BatchNorm's running statistics by the exact\n"
      "                        statistics of its inputs over N training\n"
      "                        samples across all ranks (bn, syncbn)\n"
      "  --eps E               normalization eps (default 1e-5)\n"
      "  --momentum M          running-statistics momentum (default 0.1)\n"
      "\n"
      "Training:\n"
      "  --batch B             samples per rank per step (default 64)\n"
      "  --counts c0,c1,...    per-rank shard sizes instead (one per rank;\n"
      "                        zeros allowed): the global batch is their sum\n"
      "  --epochs E            (default 1)\n"
      "  --lr LR               peak one-cycle learning rate (default\n"
      "                        0.05 sqrt(global batch / 32))\n"
      "  --seed S              weights, data order and dropout (default 0)\n"
      "  --train-subset N      train on the first N training images\n"
      "  --test-subset N       evaluate on the first N test images (quick\n"
      "                        runs; default all 10,000)\n"
      "  --overlap             start each layer's share of the gradient\n"
      "                        allreduce (MPI_Iallreduce) as soon as backward\n"
      "                        has it, instead of one allreduce after it\n"
      "  --threads T           BLAS threads per rank (default 1)\n"
      "  --data DIR            the idx files (default " TRAIN_DEFAULT_DATA
      ",\n"
      "                        Debian package dataset-fashion-mnist)\n"
      "\n"
      "Output and state:\n"
      "  --json FILE           per-epoch results as JSON (rank 0)\n"
      "  --csv FILE            per-epoch results as CSV (rank 0)\n"
      "  --checkpoint FILE     written atomically after every epoch\n"
      "  --resume FILE         continue a run from its checkpoint (same\n"
      "                        options); ends with the numbers of an\n"
      "                        uninterrupted run\n"
      "  --stop-after E        stop after epoch E of --epochs, as a job with\n"
      "                        a time limit would (resume it later)\n"
      "  --no-progress         no progress bar, even on a terminal\n"
      "\n"
      "Exit status: 0 success; 1 the data, a file, the library or MPI failed;\n"
      "2 the command line is wrong.\n");
}

const char *sbn__train_norm_name(sbn_nn_norm_t n) {
  static const char *names[] = {"none", "bn", "syncbn", "gn", "ln", "in"};
  return (unsigned)n < 6 ? names[n] : "?";
}

static int bad(const char *flag, const char *arg, const char *what) {
  return sbn__cli_bad("train", flag, arg, what);
}

/* The unsigned options: flag name, field, lower and upper bound. */
static int set_uint(train_opts_t *o, const char *flag, const char *arg) {
  static const sbn__cli_uint_t t[] = {
      {"groups", offsetof(train_opts_t, groups), 1, 1u << 20,
       "a positive number of groups"},
      {"group-size", offsetof(train_opts_t, group_size), 1, 1u << 20,
       "a positive group size"},
      {"ghost-batch", offsetof(train_opts_t, ghost_batch), 1, 1u << 16,
       "a sub-batch size in 1..65536"},
      {"batch", offsetof(train_opts_t, batch), 1, 1u << 16,
       "a batch size in 1..65536"},
      {"epochs", offsetof(train_opts_t, epochs), 1, 10000,
       "a number of epochs in 1..10000"},
      {"seed", offsetof(train_opts_t, seed), 0, UINT64_MAX, "a 64-bit seed"},
      {"train-subset", offsetof(train_opts_t, subset), 1, 1u << 24,
       "a positive number of images"},
      {"threads", offsetof(train_opts_t, threads), 1, 256,
       "a thread count in 1..256"},
      {"test-subset", offsetof(train_opts_t, test_subset), 1, 1u << 24,
       "a positive number of images"},
      {"precise-bn", offsetof(train_opts_t, precise_bn), 1, 1u << 24,
       "a positive number of samples"},
      {"stop-after", offsetof(train_opts_t, stop_after), 1, 10000,
       "an epoch in 1..10000"},
  };
  return sbn__cli_set_uint("train", o, t, sizeof t / sizeof *t, flag, arg);
}

static int set_double(train_opts_t *o, const char *flag, const char *arg) {
  double v;
  int ok = sbn__cli_parse_double(arg, &v) == 0;
  if (strcmp(flag, "dropout") == 0) {
    if (!ok || v < 0 || v >= 1)
      return bad(flag, arg, "a probability in [0, 1)");
    o->dropout = v;
  } else if (strcmp(flag, "eps") == 0) {
    if (!ok || !(v > 0))
      return bad(flag, arg, "a positive number");
    o->eps = v;
  } else if (strcmp(flag, "momentum") == 0) {
    if (!ok || v < 0 || v > 1)
      return bad(flag, arg, "a momentum in [0, 1]");
    o->momentum = v;
  } else if (strcmp(flag, "lr") == 0) {
    if (!ok || !(v > 0))
      return bad(flag, arg, "a positive learning rate");
    o->lr = v;
  } else {
    return -1;
  }
  return 0;
}

static int set_word(train_opts_t *o, const char *flag, const char *arg) {
  if (strcmp(flag, "model") == 0) {
    if (strcmp(arg, "mlp") == 0)
      o->arch = SBN_NN_MLP;
    else if (strcmp(arg, "cnn") == 0)
      o->arch = SBN_NN_CNN;
    else
      return bad(flag, arg, "a model (mlp, cnn)");
    return 0;
  }
  if (strcmp(flag, "norm") == 0) {
    for (int n = 0; n < 6; n++)
      if (strcmp(arg, sbn__train_norm_name((sbn_nn_norm_t)n)) == 0) {
        o->norm = (sbn_nn_norm_t)n;
        return 0;
      }
    return bad(flag, arg, "a norm (none, bn, syncbn, gn, ln, in)");
  }
  if (strcmp(flag, "layout") == 0) {
    if (sbn__cli_parse_layout(arg, &o->layout) != 0)
      return bad(flag, arg, "a layout (nchw, nhwc)");
    return 0;
  }
  if (strcmp(flag, "counts") == 0) {
    free(o->counts);
    if (sbn__cli_parse_list(arg, 1u << 16, &o->counts, &o->ncounts) != 0)
      return bad(flag, arg, "a list of shard sizes c0,c1,...");
    return 0;
  }
  static const struct {
    const char *name;
    size_t off;
  } paths[] = {{"data", offsetof(train_opts_t, data)},
               {"json", offsetof(train_opts_t, json)},
               {"csv", offsetof(train_opts_t, csv)},
               {"checkpoint", offsetof(train_opts_t, checkpoint)},
               {"resume", offsetof(train_opts_t, resume)}};
  for (size_t i = 0; i < sizeof paths / sizeof *paths; i++)
    if (strcmp(flag, paths[i].name) == 0) {
      if (*arg == '\0')
        return bad(flag, arg, "a path");
      *(const char **)((char *)o + paths[i].off) = arg;
      return 0;
    }
  return -1;
}

/* Checks that look at several options together. */
static int check(const train_opts_t *o) {
  if (o->norm == SBN_NN_NORM_IN && o->arch != SBN_NN_CNN) {
    fprintf(stderr,
            "syncbn train: --norm: in needs --model cnn (in the MLP "
            "each sample's channel is a single value)\n");
    return 2;
  }
  if (o->layout == SBN_LAYOUT_NHWC &&
      (o->arch != SBN_NN_CNN || o->norm == SBN_NN_NORM_LN)) {
    fprintf(stderr,
            "syncbn train: --layout: nhwc is for --model cnn, "
            "without --norm ln (LayerNorm takes NCHW)\n");
    return 2;
  }
  if (o->groups && o->norm != SBN_NN_NORM_GN) {
    fprintf(stderr, "syncbn train: --groups: only with --norm gn\n");
    return 2;
  }
  if (o->group_size && o->norm != SBN_NN_NORM_SYNCBN) {
    fprintf(stderr, "syncbn train: --group-size: only with --norm syncbn\n");
    return 2;
  }
  if (o->ghost_batch && o->norm != SBN_NN_NORM_BN &&
      o->norm != SBN_NN_NORM_SYNCBN) {
    fprintf(stderr,
            "syncbn train: --ghost-batch: only with --norm bn or syncbn\n");
    return 2;
  }
  if (o->precise_bn && o->norm != SBN_NN_NORM_BN &&
      o->norm != SBN_NN_NORM_SYNCBN) {
    fprintf(stderr,
            "syncbn train: --precise-bn: only with --norm bn or "
            "syncbn\n");
    return 2;
  }
  if (o->stop_after > o->epochs) {
    fprintf(stderr, "syncbn train: --stop-after: %llu is past --epochs %llu\n",
            (unsigned long long)o->stop_after, (unsigned long long)o->epochs);
    return 2;
  }
  if (o->counts != NULL && o->ncounts == 0) {
    fprintf(stderr, "syncbn train: --counts: empty list\n");
    return 2;
  }
  return 0;
}

/* Each option's value goes to the setter whose table names the flag. */
static int train_value(void *ctx, const char *flag, const char *value) {
  int rc = set_uint(ctx, flag, value);
  if (rc < 0)
    rc = set_double(ctx, flag, value);
  if (rc < 0)
    rc = set_word(ctx, flag, value);
  return rc != 0;
}

int sbn__train_parse(int argc, char **argv, train_opts_t *o) {
  memset(o, 0, sizeof *o);
  o->arch = SBN_NN_MLP;
  o->norm = SBN_NN_NORM_SYNCBN;
  o->eps = 1e-5;
  o->momentum = 0.1;
  o->batch = 64;
  o->epochs = 1;
  o->threads = 1;
  o->data = TRAIN_DEFAULT_DATA;
  static const char *const with_arg[] = {
      "model",       "norm",       "groups",       "group-size", "dropout",
      "eps",         "momentum",   "lr",           "batch",      "counts",
      "epochs",      "seed",       "train-subset", "threads",    "data",
      "json",        "csv",        "checkpoint",   "resume",     "stop-after",
      "test-subset", "precise-bn", "layout",       "ghost-batch"};
  const sbn__cli_flag_t flags[] = {{"no-progress", &o->no_progress},
                                   {"overlap", &o->overlap}};
  int st = sbn__cli_getopt("train", argc, argv, with_arg,
                           (int)(sizeof with_arg / sizeof *with_arg), flags, 2,
                           train_value, o, usage, &o->help);
  if (st != 0 || o->help)
    return st;
  return check(o);
}

void sbn__train_opts_free(train_opts_t *o) {
  free(o->counts);
  o->counts = NULL;
}
