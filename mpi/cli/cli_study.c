/* `syncbn study`: how small normalization sets hurt BatchNorm. Sweep 1
 * measures the set statistics themselves; sweeps 2 and 3 train the models
 * of `syncbn train` through sbn__train_run, one run per (model, norm,
 * point, seed), emulating rank counts above the job's with ghost batches
 * (a ghost batch of b on a rank normalizes as b samples on a rank of its
 * own would) and SyncBN groups. The data are loaded once for all runs. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cli.h"
#include "cli_study_int.h"
#include "syncbn_mpi.h"

typedef struct study_s {
  study_opts_t o;
  int rank, size;
  train_data_t data;
  study_run_t *runs;
  size_t nruns;
  study_progress_t bar;
} study_t;

double sbn__study_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

void sbn__study_progress(study_progress_t *p, const char *what) {
  if (!p->on)
    return;
  const int width = 24;
  double f = p->total > 0 ? p->done / p->total : 0;
  int done = (int)(width * (f < 1 ? f : 1));
  double el = sbn__study_now() - p->t0;
  double eta = f > 0 ? el * (1 - f) / f : 0;
  printf("\r\033[K[%.*s%*s] %3.0f%%  %2d:%02d elapsed  ETA %2d:%02d  %s", done,
         "########################", width - done, "", 100 * f, (int)el / 60,
         (int)el % 60, (int)eta / 60, (int)eta % 60, what);
  fflush(stdout);
}

void sbn__study_progress_clear(const study_progress_t *p) {
  if (p->on) {
    printf("\r\033[K");
    fflush(stdout);
  }
}

/* What a run costs, for the ETA: the images it trains on and evaluates,
 * a CNN image about ten MLP images, and a step's fixed cost about 64. */
static double run_cost(const study_opts_t *o, const study_run_t *r) {
  double steps = (double)(r->subset / r->global);
  double imgs = (double)r->subset + (double)o->test_subset / 3;
  double per = r->arch == SBN_NN_CNN ? 10 : 1;
  return (double)r->epochs * (imgs * per + 64 * steps);
}

/* Sweep 3 changes the global batch with b; it keeps sweep 2's number of
 * optimizer steps (epochs x subset / 64), so that a larger b sees more
 * images rather than fewer steps: a smaller subset in one epoch, or more
 * epochs of the subset. */
static void hold_steps(const study_opts_t *o, study_run_t *r) {
  uint64_t steps = o->epochs * (o->subset / STUDY_GLOBAL);
  uint64_t images = steps * r->global;
  r->subset = o->subset;
  r->epochs = o->epochs;
  if (r->sweep != STUDY_RANK)
    return;
  if (images <= o->subset) {
    r->subset = images;
    r->epochs = 1;
  } else {
    r->epochs = (images + o->subset / 2) / o->subset;
  }
}

/* |S_i| at the first norm layer: the values one statistic is computed
 * over (seed-normalization-notes: S_i per norm kind). */
static double set_values(sbn_nn_arch_t a, sbn_nn_norm_t n, uint64_t nb) {
  double hw = a == SBN_NN_CNN ? 784 : 1, c = a == SBN_NN_CNN ? 16 : 256;
  switch (n) {
    case SBN_NN_NORM_GN:
      return c / 8 * hw;
    case SBN_NN_NORM_LN:
      return c * hw;
    case SBN_NN_NORM_IN:
      return hw;
    default:
      return (double)nb * hw;
  }
}

static study_run_t *add_run(study_t *s, int sweep, sbn_nn_arch_t a,
                            sbn_nn_norm_t n) {
  study_run_t *r = &s->runs[s->nruns++];
  memset(r, 0, sizeof *r);
  r->sweep = sweep;
  r->arch = a;
  r->norm = n;
  r->real = (uint64_t)s->size;
  r->ranks = (uint64_t)s->size;
  r->norm_batch = 1;
  return r;
}

static int wanted(const study_t *s, sbn_nn_arch_t a, sbn_nn_norm_t n) {
  if (!(s->o.norms & (1u << n)))
    return 0;
  return n != SBN_NN_NORM_IN || a == SBN_NN_CNN;
}

/* Sweep 2: global batch 64 on P ranks (64 / P each). A normalization
 * batch nb below the rank's share is a ghost batch (64 / nb emulated
 * ranks); above it, SyncBN over groups of nb / (64 / P) real ranks; 64 is
 * SyncBN over the job. */
static void plan_norm(study_t *s, sbn_nn_arch_t a, int bn_only) {
  uint64_t local = STUDY_GLOBAL / (uint64_t)s->size;
  for (size_t i = 0; i < s->o.nnorm_b; i++) {
    uint64_t nb = s->o.norm_b[i];
    sbn_nn_norm_t kind = nb <= local ? SBN_NN_NORM_BN : SBN_NN_NORM_SYNCBN;
    if (!wanted(s, a, kind))
      continue;
    study_run_t *r = add_run(s, STUDY_NORM, a, kind);
    r->norm_batch = nb;
    r->ghost = nb < local ? nb : 0;
    r->group = nb > local ? nb / local : 0;
    r->ranks = STUDY_GLOBAL / nb;
    r->per_rank = nb;
  }
  const sbn_nn_norm_t other[] = {SBN_NN_NORM_SYNCBN, SBN_NN_NORM_GN,
                                 SBN_NN_NORM_LN, SBN_NN_NORM_IN};
  for (size_t i = 0; i < 4; i++) {
    if (!wanted(s, a, other[i]) || (bn_only && i > 0))
      continue;
    study_run_t *r = add_run(s, STUDY_NORM, a, other[i]);
    r->norm_batch = other[i] == SBN_NN_NORM_SYNCBN ? STUDY_GLOBAL : 1;
    r->ranks = other[i] == SBN_NN_NORM_SYNCBN ? 1 : (uint64_t)s->size;
    r->per_rank = other[i] == SBN_NN_NORM_SYNCBN ? STUDY_GLOBAL : local;
  }
}

/* Sweep 3: R ranks of b images each, R / P emulated per real rank. */
static void plan_rank(study_t *s, sbn_nn_arch_t a) {
  uint64_t e = s->o.ranks / (uint64_t)s->size;
  const sbn_nn_norm_t kinds[] = {SBN_NN_NORM_BN, SBN_NN_NORM_SYNCBN,
                                 SBN_NN_NORM_GN, SBN_NN_NORM_LN,
                                 SBN_NN_NORM_IN};
  for (size_t k = 0; k < 5; k++)
    for (size_t i = 0; i < s->o.nrank_b && wanted(s, a, kinds[k]); i++) {
      uint64_t b = s->o.rank_b[i];
      study_run_t *r = add_run(s, STUDY_RANK, a, kinds[k]);
      r->per_rank = b;
      r->ranks = s->o.ranks;
      r->ghost = kinds[k] == SBN_NN_NORM_BN && e > 1 ? b : 0;
      r->norm_batch = kinds[k] == SBN_NN_NORM_BN       ? b
                      : kinds[k] == SBN_NN_NORM_SYNCBN ? b * s->o.ranks
                                                       : 1;
      r->local = b * e;
    }
}

/* Every run of sweeps 2 and 3, each repeated per seed. */
static int plan(study_t *s) {
  size_t cap = 2 * (STUDY_MAX_POINTS + 4) * 6 * (size_t)s->o.seeds + 1;
  cap *= 2;
  if ((s->runs = calloc(cap, sizeof *s->runs)) == NULL)
    return 1;
  int norm = (s->o.sweeps & STUDY_NORM) != 0;
  int precise_only = !norm && (s->o.sweeps & STUDY_PRECISE);
  for (int a = 0; a < 2; a++) {
    if (!(s->o.models & (1u << a)))
      continue;
    size_t first = s->nruns;
    if (norm || precise_only)
      plan_norm(s, (sbn_nn_arch_t)a, precise_only);
    if (s->o.sweeps & STUDY_RANK)
      plan_rank(s, (sbn_nn_arch_t)a);
    /* Seeds: copies of this model's points, seed by seed. */
    size_t points = s->nruns - first;
    for (uint64_t seed = 1; seed < s->o.seeds; seed++)
      for (size_t i = 0; i < points; i++) {
        s->runs[s->nruns] = s->runs[first + i];
        s->runs[s->nruns++].seed = seed;
      }
  }
  for (size_t i = 0; i < s->nruns; i++) {
    study_run_t *r = &s->runs[i];
    if (r->sweep == STUDY_NORM) {
      r->global = STUDY_GLOBAL;
      r->local = STUDY_GLOBAL / (uint64_t)s->size;
    } else {
      r->global = r->local * (uint64_t)s->size;
    }
    hold_steps(&s->o, r);
    r->set_values = set_values(r->arch, r->norm, r->norm_batch);
    r->precise = (s->o.sweeps & STUDY_PRECISE) && r->sweep == STUDY_NORM &&
                 (r->norm == SBN_NN_NORM_BN || r->norm == SBN_NN_NORM_SYNCBN);
    s->bar.total += run_cost(&s->o, r);
  }
  return 0;
}

/* The job's shape must fit the sweeps: P divides 64 and R. */
static int check_job(const study_t *s) {
  const char *why = NULL;
  if ((s->o.sweeps & (STUDY_NORM | STUDY_PRECISE)) &&
      (STUDY_GLOBAL % s->size != 0 || s->size > 32))
    why =
        "sweep 2 splits a global batch of 64: run on 1, 2, 4, 8, 16 or "
        "32 ranks";
  else if ((s->o.sweeps & STUDY_RANK) && (s->o.ranks % (uint64_t)s->size != 0))
    why =
        "--ranks: sweep 3's rank count must be a multiple of the job's "
        "ranks";
  if (why != NULL && s->rank == 0)
    fprintf(stderr, "syncbn study: %s (np %d, --ranks %llu)\n", why, s->size,
            (unsigned long long)s->o.ranks);
  return why ? 2 : 0;
}

static void train_opts(const study_t *s, const study_run_t *r,
                       train_opts_t *t) {
  memset(t, 0, sizeof *t);
  t->arch = r->arch;
  t->norm = r->norm;
  t->ghost_batch = r->ghost;
  t->group_size = r->group;
  t->eps = 1e-5;
  t->momentum = 0.1;
  t->batch = r->local;
  t->epochs = r->epochs;
  t->subset = r->subset;
  t->test_subset = s->o.test_subset;
  t->seed = r->seed;
  t->threads = 1;
  t->precise_bn = r->precise ? s->o.precise_n : 0;
  t->no_progress = 1;
  t->quiet = 1;
  t->data = s->o.data;
}

static void describe(const study_run_t *r, char *buf, size_t len) {
  snprintf(buf, len, "sweep %d %s %s %s %llu seed %llu",
           r->sweep == STUDY_NORM ? 2 : 3, sbn__study_model_name(r->arch),
           sbn__train_norm_name(r->norm),
           r->sweep == STUDY_NORM ? "norm batch" : "per rank",
           (unsigned long long)(r->sweep == STUDY_NORM ? r->norm_batch
                                                       : r->per_rank),
           (unsigned long long)r->seed);
}

static int run_all(study_t *s) {
  for (size_t i = 0; i < s->nruns; i++) {
    study_run_t *r = &s->runs[i];
    train_opts_t t;
    train_result_t res;
    char what[128];
    train_opts(s, r, &t);
    describe(r, what, sizeof what);
    sbn__study_progress(&s->bar, what);
    double t0 = sbn__study_now();
    int rc = sbn__train_run(&t, &s->data, &res);
    if (rc != 0) {
      sbn__study_progress_clear(&s->bar);
      if (s->rank == 0)
        fprintf(stderr, "syncbn study: the run '%s' failed\n", what);
      return rc;
    }
    r->wall_s = sbn__study_now() - t0;
    r->acc = res.ema_acc;
    r->precise_acc = r->precise ? res.last.test_acc : NAN;
    r->train_loss = res.last.train_loss;
    r->test_loss = res.last.test_loss;
    s->bar.done += run_cost(&s->o, r);
  }
  sbn__study_progress_clear(&s->bar);
  return 0;
}

static int study(study_t *s) {
  int rc = check_job(s);
  if (rc == 0)
    rc = sbn__train_load_data(s->o.data, s->rank, &s->data);
  if (rc == 0)
    rc = plan(s);
  if (rc != 0)
    return rc;
  s->bar.on = s->rank == 0 && !s->o.no_progress && isatty(STDOUT_FILENO);
  s->bar.t0 = sbn__study_now();
  if (s->rank == 0)
    printf(
        "syncbn study on %d real rank%s%s: |S_i|, the normalization set, "
        "is the set of values one mean and variance are computed over: "
        "N for BatchNorm1d in the MLP, N*H*W for BatchNorm2d in the CNN "
        "(N*784 at its first norm, N*49 at its last), (C/G)*H*W for "
        "GroupNorm, C*H*W for LayerNorm, H*W for InstanceNorm.\n\n",
        s->size, s->size == 1 ? "" : "s", s->o.quick ? " (--quick)" : "");
  if (s->o.sweeps & STUDY_STATS) {
    study_stat_t *rows = NULL;
    size_t n = 0;
    double diff = 0;
    sbn__study_progress(&s->bar, "sweep 1: set statistics");
    rc = sbn__study_stats(&s->o, &s->data, s->rank, s->size, &rows, &n, &diff);
    sbn__study_progress_clear(&s->bar);
    if (rc == 0 && s->rank == 0) {
      sbn__study_print_stats(rows, n, s->size, diff);
      rc = sbn__study_write_stats(&s->o, rows, n, s->size);
    }
    free(rows);
    if (rc != 0)
      return rc;
  }
  if ((rc = run_all(s)) != 0 || s->rank != 0)
    return rc;
  const int sweeps[] = {STUDY_NORM, STUDY_RANK, STUDY_PRECISE};
  for (size_t i = 0; i < 3 && rc == 0; i++)
    if (s->o.sweeps & sweeps[i]) {
      if (sweeps[i] == STUDY_PRECISE)
        sbn__study_print_precise(&s->o, s->runs, s->nruns);
      else
        sbn__study_print_runs(&s->o, s->runs, s->nruns, sweeps[i]);
      rc = sbn__study_write_runs(&s->o, s->runs, s->nruns, sweeps[i], s->size);
    }
  printf("study: %.1f s\n", sbn__study_now() - s->bar.t0);
  return rc;
}

int sbn_cli_study(int argc, char **argv) {
  study_t s;
  memset(&s, 0, sizeof s);
  int rc = sbn__study_parse(argc, argv, &s.o);
  if (rc != 0 || s.o.help)
    return rc;
  if (MPI_Init(&argc, &argv) != MPI_SUCCESS) {
    fprintf(stderr, "syncbn study: MPI_Init failed\n");
    return 1;
  }
  MPI_Comm_rank(MPI_COMM_WORLD, &s.rank);
  MPI_Comm_size(MPI_COMM_WORLD, &s.size);
  if (s.o.ranks == 0)
    s.o.ranks = s.size > 8 ? (uint64_t)s.size : 8;
  sbn_nn_set_threads(1);
  rc = study(&s);
  free(s.runs);
  sbn__train_data_free(&s.data);
  MPI_Finalize();
  return rc;
}
