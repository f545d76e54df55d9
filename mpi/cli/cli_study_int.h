/* `syncbn study`: what its files share (mpi/cli/cli_study*.c). The study
 * drives `syncbn train`'s runs (sbn__train_run, cli_train_int.h) and the
 * set statistics of src/nn (sbn_nn_set_error); these files hold its
 * command line, the sweeps, the progress bar and the output. */
#ifndef SBN_CLI_STUDY_INT_H
#define SBN_CLI_STUDY_INT_H

#include <stdint.h>
#include <stdio.h>

#include "cli_train_int.h"

enum {
  STUDY_STATS = 1,  /* sweep 1: set statistics against the population */
  STUDY_NORM = 2,   /* sweep 2: normalization batch at global batch 64 */
  STUDY_RANK = 4,   /* sweep 3: images per rank at a fixed rank count */
  STUDY_PRECISE = 8 /* EMA against exact population statistics */
};

#define STUDY_GLOBAL 64 /* sweep 2's global batch */
#define STUDY_MAX_POINTS 8

typedef struct study_opts_s {
  int quick, no_progress, help;
  unsigned sweeps; /* STUDY_* bits */
  unsigned models; /* 1 << sbn_nn_arch_t */
  unsigned norms;  /* 1 << sbn_nn_norm_t */
  uint64_t seeds, epochs, subset, test_subset, trials, ranks, precise_n;
  /* The points of each sweep: sweep 1's per-rank batches and sync group
   * sizes, sweep 2's normalization batches, sweep 3's images per rank. */
  uint64_t stat_b[STUDY_MAX_POINTS], stat_k[STUDY_MAX_POINTS];
  uint64_t norm_b[STUDY_MAX_POINTS], rank_b[STUDY_MAX_POINTS];
  size_t nstat_b, nstat_k, nnorm_b, nrank_b;
  const char *data, *out;
  char command[1024]; /* the command line, for the JSON files */
} study_opts_t;

/* Parses argv into o; --quick and the other defaults are applied after
 * the explicit flags so that an explicit flag wins. Returns 0, or 2 after
 * printing one line naming the flag; --help prints the usage and sets
 * o->help. */
int sbn__study_parse(int argc, char **argv, study_opts_t *o);

/* One training run of sweep 2 or 3 and what it gave. */
typedef struct study_run_s {
  int sweep; /* STUDY_NORM or STUDY_RANK */
  sbn_nn_arch_t arch;
  sbn_nn_norm_t norm;
  uint64_t norm_batch;    /* samples behind one BatchNorm statistic; 1 for
                             the per-sample norms */
  uint64_t per_rank;      /* images per (real or emulated) rank */
  uint64_t ranks, real;   /* rank count, of which real MPI ranks */
  uint64_t ghost, group;  /* the train options that emulate them */
  uint64_t local, global; /* samples per real rank and in all per step */
  uint64_t seed;
  uint64_t subset, epochs; /* the run's: sweep 3 holds the step count */
  double set_values;       /* |S_i| at the first norm layer */
  int precise;             /* precise_acc was measured */
  double acc, precise_acc, train_loss, test_loss, wall_s;
} study_run_t;

/* One row of sweep 1. */
typedef struct study_stat_s {
  const char *source; /* "pixels" or "conv1" */
  uint64_t b, k;
  int real;          /* k real ranks (MPI) rather than emulated */
  double set_values; /* |S| */
  double mean_err, var_err, inv_sqrt, gauss_var;
  uint64_t channels;
} study_stat_t;

/* The progress bar over every run of the study (rank 0, on a terminal). */
typedef struct study_progress_s {
  int on;
  double t0, total, done; /* in cost units: samples seen, CNN weighted */
} study_progress_t;

double sbn__study_now(void);
void sbn__study_progress(study_progress_t *p, const char *what);
void sbn__study_progress_clear(const study_progress_t *p);

/* Sweep 1 (cli_study_stats.c): every rank calls it; rows on rank 0 only
 * (malloc'ed, *n of them). Returns 0 or 1 after printing why. */
int sbn__study_stats(const study_opts_t *o, const train_data_t *d, int rank,
                     int size, study_stat_t **rows, size_t *n,
                     double *sync_diff);

/* Output (cli_study_out.c, rank 0): the tables on stdout and, with --out,
 * the CSV and JSON files of each sweep. Return 0 or 1 after printing
 * which file failed. */
void sbn__study_print_stats(const study_stat_t *s, size_t n, int size,
                            double sync_diff);
void sbn__study_print_runs(const study_opts_t *o, const study_run_t *r,
                           size_t n, int sweep);
void sbn__study_print_precise(const study_opts_t *o, const study_run_t *r,
                              size_t n);
int sbn__study_write_stats(const study_opts_t *o, const study_stat_t *s,
                           size_t n, int size);
int sbn__study_write_runs(const study_opts_t *o, const study_run_t *r, size_t n,
                          int sweep, int size);
const char *sbn__study_model_name(sbn_nn_arch_t a);

#endif /* SBN_CLI_STUDY_INT_H */
