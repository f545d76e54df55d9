/* `syncbn train`: what its files share (mpi/cli/cli_train*.c). The pure
 * compute (layers, data, optimizer, models) is the library room src/nn;
 * these files hold the command line, the MPI data-parallel loop, the output
 * and the checkpoint. */
#ifndef SBN_CLI_TRAIN_INT_H
#define SBN_CLI_TRAIN_INT_H

#include <stdint.h>
#include <stdio.h>

#include "nn/sbn_nn.h"

#define TRAIN_DEFAULT_DATA "/usr/share/datasets/fashion-mnist"

typedef struct train_opts_s {
  sbn_nn_arch_t arch;
  sbn_nn_norm_t norm;
  sbn_layout_t layout;  /* the CNN's activations */
  uint64_t groups;      /* 0: min(8, C) */
  uint64_t group_size;  /* 0: all ranks */
  uint64_t ghost_batch; /* 0: none */
  double dropout, eps, momentum;
  double lr; /* 0: 0.05 sqrt(B / 32) */
  uint64_t batch, epochs, subset, seed, threads;
  uint64_t stop_after;  /* 0: run every epoch */
  uint64_t test_subset; /* 0: the whole test set */
  uint64_t precise_bn;  /* 0: keep the running statistics */
  int no_progress;
  int quiet;        /* no per-epoch lines (callers of sbn__train_run) */
  int overlap;      /* start each layer's gradient allreduce during backward */
  uint64_t *counts; /* malloc'ed, or NULL for batch on every rank */
  size_t ncounts;
  const char *data, *json, *csv, *checkpoint, *resume;
  int help;
} train_opts_t;

/* Parses argv into o (defaults first). Returns 0, or 2 after printing one
 * line naming the flag; with --help prints the usage and sets o->help. */
int sbn__train_parse(int argc, char **argv, train_opts_t *o);
void sbn__train_opts_free(train_opts_t *o);
/* The name of a norm kind as the command line spells it. */
const char *sbn__train_norm_name(sbn_nn_norm_t n);

/* One epoch's results, as printed and written to --json and --csv. */
typedef struct train_epoch_s {
  double train_loss, test_loss, test_acc; /* acc in [0, 1] */
  double wall_s, allreduce_share;
} train_epoch_t;

/* Everything a checkpoint holds besides the model's arrays, and what must
 * match for a resume. */
typedef struct train_ckpt_meta_s {
  uint64_t fingerprint; /* of every option that changes the numbers */
  uint64_t epochs_done;
  uint64_t step;          /* global optimizer steps taken */
  train_epoch_t *history; /* epochs_done entries */
} train_ckpt_meta_t;

/* The data every run of a job shares: loaded once (sbn__train_load_data,
 * every rank; rank 0 prints what failed), freed by sbn__train_data_free. */
typedef struct train_data_s {
  sbn_dataset_t train, test;
  double mean, std; /* of the training pixels, which standardize both */
} train_data_t;

int sbn__train_load_data(const char *dir, int rank, train_data_t *data);
void sbn__train_data_free(train_data_t *data);

/* What one run ends with: its last epoch, and its test accuracy with the
 * running statistics before the last --precise-bn replaced them (the
 * last epoch's accuracy when there is no --precise-bn). */
typedef struct train_result_s {
  train_epoch_t last;
  double ema_acc;
  uint64_t global_batch, steps; /* per step, per epoch */
} train_result_t;

/* One training run with options o inside an initialized MPI job, every
 * rank calling it with the same o: what `syncbn train` runs once, without
 * --resume. o stays the caller's; data is only read. res may be NULL.
 * Returns 0, 1 (a runtime failure) or 2 (options that do not fit the data
 * or the job), after rank 0 printed why. */
int sbn__train_run(const train_opts_t *o, const train_data_t *data,
                   train_result_t *res);

/* Writes the checkpoint atomically (rank 0 only). */
int sbn__train_ckpt_save(const char *path, sbn_nn_model_t *m,
                         const float *momentum_buf,
                         const train_ckpt_meta_t *meta);
/* Reads it into the model and momentum buffer; history must have room for
 * max_epochs entries. */
int sbn__train_ckpt_load(const char *path, sbn_nn_model_t *m,
                         float *momentum_buf, train_ckpt_meta_t *meta,
                         uint64_t max_epochs);

/* --json and --csv. */
int sbn__train_write_json(const char *path, const train_opts_t *o,
                          const train_epoch_t *ep, size_t n);
int sbn__train_write_csv(const char *path, const train_epoch_t *ep, size_t n);

#endif /* SBN_CLI_TRAIN_INT_H */
