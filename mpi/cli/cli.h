/* Subcommands of the `syncbn` program. Each takes the arguments after the
 * subcommand name (argv[0] is the subcommand), prints its own messages, and
 * returns the process exit status: 0 success, 1 a runtime failure (a file,
 * the data, the library, MPI), 2 a usage error (the command line itself is
 * wrong). */
#ifndef SBN_CLI_H
#define SBN_CLI_H

/* `syncbn apply`: one forward (and backward) of one layer on .npy files,
 * single process or, with --sync, SyncBN over MPI (mpi/cli/cli_apply*.c). */
int sbn_cli_apply(int argc, char **argv);

/* `syncbn bench MODE`: what SyncBN costs, as tables, JSON and CSV
 * (mpi/cli/cli_bench*.c; cli_bench.h lists the files). */
int sbn_cli_bench(int argc, char **argv);

/* `syncbn train`: data-parallel training on Fashion-MNIST with syncbn's
 * normalization layers (mpi/cli/cli_train*.c, compute in src/nn). */
int sbn_cli_train(int argc, char **argv);

/* `syncbn metrics`: a running worker's counters, as a table or JSON
 * (mpi/cli/cli_metrics.c; a client of the worker's socket, no MPI). */
int sbn_cli_metrics(int argc, char **argv);

/* `syncbn study`: small normalization batches, swept with `train`'s runs
 * (mpi/cli/cli_study*.c). */
int sbn_cli_study(int argc, char **argv);

#endif /* SBN_CLI_H */
