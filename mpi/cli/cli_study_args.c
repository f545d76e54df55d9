/* `syncbn study`: the command line. A flag's bad value exits 2 naming the
 * flag; --quick sets smaller defaults that explicit flags override. */
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli_args.h"
#include "cli_study_int.h"

static void usage(FILE *f) {
  fprintf(
      f,
      "usage: mpirun -np P syncbn study [options]\n"
      "\n"
      "How small normalization batches hurt BatchNorm, and what SyncBN,\n"
      "GroupNorm, LayerNorm, InstanceNorm and PreciseBN do about it, on\n"
      "Fashion-MNIST with the models of `syncbn train`. Rank counts above\n"
      "P are emulated with ghost batches; the output says which were real.\n"
      "\n"
      "Sweeps (--sweeps, default all):\n"
      "  stats    sweep 1: error of the batch mean and variance against the\n"
      "           population over sets of b samples on k ranks (pixels and\n"
      "           the CNN's first convolution), beside 1/sqrt(|S|)\n"
      "  norm     sweep 2: global batch 64, BatchNorm over 2..32 samples\n"
      "           (ghost batches and ranks) against SyncBN over 64, gn, ln, "
      "in\n"
      "  rank     sweep 3: b images per rank at a fixed rank count, per norm\n"
      "  precise  the accuracy of sweep 2's BatchNorm runs with the running\n"
      "           (EMA) statistics and with exact population statistics\n"
      "\n"
      "Options:\n"
      "  --quick               fewer points, 1 seed, 1 epoch, smaller subsets\n"
      "                        (a few minutes at np 2)\n"
      "  --sweeps LIST         stats,norm,rank,precise (or 1,2,3)\n"
      "  --models LIST         mlp,cnn (default both)\n"
      "  --norms LIST          bn,syncbn,gn,ln,in (default all)\n"
      "  --seeds N             seeds 0..N-1 per point (default 3; quick 1)\n"
      "  --epochs E            per run (default 2; quick 1)\n"
      "  --train-subset N      train on the first N images (default 10000;\n"
      "                        quick 5000)\n"
      "  --test-subset N       evaluate on the first N test images (default\n"
      "                        5000; quick 2000)\n"
      "  --trials T            sweep 1's sets per point (default 200; quick "
      "50)\n"
      "  --ranks R             sweep 3's rank count, a multiple of P\n"
      "                        (default 8, at least P)\n"
      "  --precise-bn N        samples of the exact statistics (default\n"
      "                        min(4096, --train-subset))\n"
      "  --out DIR             CSV and JSON per sweep (scripts/study_plot.py\n"
      "                        DIR draws the PNGs)\n"
      "  --data DIR            the idx files (default " TRAIN_DEFAULT_DATA
      ")\n"
      "  --no-progress         no progress bar, even on a terminal\n"
      "\n"
      "Exit status: 0 success; 1 the data, a file or MPI failed; 2 the\n"
      "command line is wrong.\n");
}

static int bad(const char *flag, const char *arg, const char *what) {
  return sbn__cli_bad("study", flag, arg, what);
}

/* A comma-separated list of words from names[0..n): sets bit i for each. */
static int parse_words(const char *arg, const char *const *names, size_t n,
                       unsigned *bits) {
  char buf[256];
  if (strlen(arg) >= sizeof buf || *arg == '\0')
    return -1;
  strcpy(buf, arg);
  size_t len = strlen(buf);
  /* strtok would skip an empty item: "bn," and "bn,,gn" are mistakes. */
  if (buf[0] == ',' || buf[len - 1] == ',' || strstr(buf, ",,") != NULL)
    return -1;
  *bits = 0;
  char *save = NULL;
  for (char *w = strtok_r(buf, ",", &save); w; w = strtok_r(NULL, ",", &save)) {
    size_t i = 0;
    while (i < n && strcmp(w, names[i]) != 0)
      i++;
    if (i == n)
      return -1;
    *bits |= 1u << i;
  }
  return *bits ? 0 : -1;
}

static int set_list(study_opts_t *o, const char *flag, const char *arg) {
  static const char *const sweeps[] = {"stats", "norm", "rank", "precise"};
  static const char *const numbered[] = {"1", "2", "3"};
  static const char *const models[] = {"mlp", "cnn"};
  static const char *const norms[] = {"none", "bn", "syncbn", "gn", "ln", "in"};
  unsigned b;
  if (strcmp(flag, "sweeps") == 0) {
    if (parse_words(arg, sweeps, 4, &b) != 0 &&
        parse_words(arg, numbered, 3, &b) != 0)
      return bad(flag, arg, "a list of sweeps (stats,norm,rank,precise)");
    o->sweeps = b;
  } else if (strcmp(flag, "models") == 0) {
    if (parse_words(arg, models, 2, &b) != 0)
      return bad(flag, arg, "a list of models (mlp,cnn)");
    o->models = b;
  } else if (strcmp(flag, "norms") == 0) {
    if (parse_words(arg, norms, 6, &b) != 0 || (b & 1u))
      return bad(flag, arg, "a list of norms (bn,syncbn,gn,ln,in)");
    o->norms = b;
  } else {
    return -1;
  }
  return 0;
}

static int set_value(study_opts_t *o, const char *flag, const char *arg) {
  static const sbn__cli_uint_t t[] = {
      {"seeds", offsetof(study_opts_t, seeds), 1, 100,
       "a seed count in 1..100"},
      {"epochs", offsetof(study_opts_t, epochs), 1, 1000,
       "an epoch count in 1..1000"},
      {"train-subset", offsetof(study_opts_t, subset), 256, 1u << 24,
       "a number of images, at least 256"},
      {"test-subset", offsetof(study_opts_t, test_subset), 1, 1u << 24,
       "a positive number of images"},
      {"trials", offsetof(study_opts_t, trials), 1, 100000,
       "a trial count in 1..100000"},
      {"ranks", offsetof(study_opts_t, ranks), 1, 4096,
       "a rank count in 1..4096"},
      {"precise-bn", offsetof(study_opts_t, precise_n), 2, 1u << 24,
       "a number of samples, at least 2"},
  };
  int rc = sbn__cli_set_uint("study", o, t, sizeof t / sizeof *t, flag, arg);
  if (rc >= 0)
    return rc;
  if (strcmp(flag, "out") == 0 || strcmp(flag, "data") == 0) {
    if (*arg == '\0')
      return bad(flag, arg, "a directory");
    *(flag[0] == 'o' ? &o->out : &o->data) = arg;
    return 0;
  }
  return set_list(o, flag, arg);
}

static void copy_points(uint64_t *dst, size_t *n, const uint64_t *src,
                        size_t count) {
  memcpy(dst, src, count * sizeof *src);
  *n = count;
}

/* The defaults, full or --quick, for whatever the flags left unset. */
static void defaults(study_opts_t *o) {
  static const uint64_t stat_b[] = {1, 2, 4, 8, 16, 32, 64};
  static const uint64_t stat_k[] = {1, 2, 4, 8};
  static const uint64_t full[] = {2, 4, 8, 16, 32};
  static const uint64_t quick[] = {2, 8, 32};
  int q = o->quick;
  if (!o->sweeps)
    o->sweeps = STUDY_STATS | STUDY_NORM | STUDY_RANK | STUDY_PRECISE;
  if (!o->models)
    o->models = 3;
  if (!o->norms)
    o->norms = 0x3e;
  if (!o->seeds)
    o->seeds = q ? 1 : 3;
  if (!o->epochs)
    o->epochs = q ? 1 : 2;
  if (!o->subset)
    o->subset = q ? 5000 : 10000;
  if (!o->test_subset)
    o->test_subset = q ? 2000 : 5000;
  if (!o->trials)
    o->trials = q ? 50 : 200;
  if (!o->precise_n)
    o->precise_n = o->subset < 4096 ? o->subset : 4096;
  copy_points(o->stat_b, &o->nstat_b, stat_b, 7);
  copy_points(o->stat_k, &o->nstat_k, stat_k, 4);
  copy_points(o->norm_b, &o->nnorm_b, q ? quick : full, q ? 3 : 5);
  copy_points(o->rank_b, &o->nrank_b, q ? quick : full, q ? 3 : 5);
  if (!o->data)
    o->data = TRAIN_DEFAULT_DATA;
}

static void keep_command(study_opts_t *o, int argc, char **argv) {
  size_t len = 0;
  o->command[0] = '\0';
  for (int i = 0; i < argc; i++) {
    int w = snprintf(o->command + len, sizeof o->command - len, "%s%s",
                     i ? " " : "syncbn ", argv[i]);
    if (w < 0 || (size_t)w >= sizeof o->command - len)
      break;
    len += (size_t)w;
  }
}

static int study_value(void *ctx, const char *flag, const char *value) {
  return set_value(ctx, flag, value);
}

int sbn__study_parse(int argc, char **argv, study_opts_t *o) {
  memset(o, 0, sizeof *o);
  static const char *const with_arg[] = {
      "sweeps",      "models", "norms", "seeds",      "epochs", "train-subset",
      "test-subset", "trials", "ranks", "precise-bn", "out",    "data"};
  const sbn__cli_flag_t flags[] = {{"no-progress", &o->no_progress},
                                   {"quick", &o->quick}};
  keep_command(o, argc, argv);
  int st = sbn__cli_getopt("study", argc, argv, with_arg,
                           (int)(sizeof with_arg / sizeof *with_arg), flags, 2,
                           study_value, o, usage, &o->help);
  if (st != 0 || o->help)
    return st;
  defaults(o);
  if (o->precise_n > o->subset) {
    fprintf(stderr,
            "syncbn study: --precise-bn: %llu samples is more than the "
            "--train-subset %llu\n",
            (unsigned long long)o->precise_n, (unsigned long long)o->subset);
    return 2;
  }
  return 0;
}
