/* `syncbn apply`, shared between its files:
 *   cli_apply.c          the entry point and the run, single process or
 *                        --sync (shards, agreement, layer, gather);
 *   cli_apply_args.c     the command line: options table, usage, checks;
 *   cli_apply_npy.c      reading and checking the .npy inputs, writing the
 *                        outputs;
 *   cli_apply_summary.c  the summary printed after a successful run;
 *   cli_apply_util.c     failure recording and shape printing, used by all
 *                        of them. */
#ifndef SBN_CLI_APPLY_INT_H
#define SBN_CLI_APPLY_INT_H

#include <stddef.h>
#include <stdint.h>

#include "sbn_npy.h"
#include "syncbn.h"

/* Enough for every option of `syncbn apply` (cli_apply_args.c checks). */
#define SBN__APPLY_MAX_OPTS 32

typedef struct apply_opts_s {
  int seen[SBN__APPLY_MAX_OPTS]; /* times each option was given */
  sbn_op_t op;
  const char *x, *dy, *weight, *bias, *rmean, *rvar, *out_dir;
  int64_t nbt;
  double eps, momentum, p;
  int cumulative, eval, no_running, sync, norm_dims, group_size;
  sbn_layout_t layout;
  size_t groups;
  size_t ghost_batch; /* --ghost-batch, 0: off */
  uint32_t seed, layer;
  uint64_t step;
  uint64_t *counts; /* --counts, ncounts entries */
  size_t ncounts;
} apply_opts_t;

typedef struct apply_err_s {
  int status; /* 0, 1 (runtime) or 2 (usage) */
  char msg[1024];
} apply_err_t;

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

/* Records the first failure in e (later ones are consequences) and
 * returns its exit status. */
int sbn__apply_fail(apply_err_t *e, int status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* A library failure: the context, the code's name and the library's
 * message, which names the argument. */
int sbn__apply_fail_lib(apply_err_t *e, const char *what, int rc);

/* Parses argv into o. Returns 0 to go on, -1 after printing --help, or 2
 * with the message in e. Nothing here touches files or MPI. */
int sbn__apply_parse_args(int argc, char **argv, apply_opts_t *o,
                          apply_err_t *e);

/* "(2, 3)" or "(4,)" into buf. */
void sbn__apply_shape_str(const size_t *dims, int ndim, char *buf, size_t cap);

/* Reads every input and checks shapes against the op and the flags. */
int sbn__apply_load_inputs(apply_run_t *r);

/* Creates --out-dir and writes every output; written gets the paths. */
int sbn__apply_write_outputs(apply_run_t *r, char *written, size_t cap);

/* One output file of a run: its name in --out-dir and its float32 data
 * (borrowed from the run). */
#define SBN__APPLY_MAX_OUTS 6
typedef struct apply_out_s {
  const char *name;
  const float *data;
  int ndim;
  size_t dims[SBN_MAX_DIMS];
} apply_out_t;

/* Replaces the n outputs in --out-dir all together or not at all
 * (cli_apply_commit.c); lists the paths written in written. */
int sbn__apply_commit(apply_run_t *r, const apply_out_t *outs, int n,
                      char *written, size_t cap);

/* The summary on stdout (rank 0, after a successful run). */
void sbn__apply_print_summary(apply_run_t *r, const char *written);

#endif /* SBN_CLI_APPLY_INT_H */
