/* The `syncbn` program: dispatches to a subcommand through the table in
 * main. Everything else lives in mpi/cli/cli_*.c. MPI is initialized by a
 * subcommand only when it needs it (--sync), so every subcommand also runs
 * without mpirun. */
#include <stdio.h>
#include <string.h>

#include "cli.h"
#include "syncbn.h"

typedef struct sbn_subcmd_s {
  const char *name;
  int (*run)(int argc, char **argv);
  const char *what;
} sbn_subcmd_t;

static void usage(FILE *f, const sbn_subcmd_t *cmds, size_t n) {
  fprintf(f,
          "usage: syncbn <command> [options]\n"
          "       syncbn --help | --version\n"
          "\n"
          "Synchronized normalization (BatchNorm, LayerNorm, InstanceNorm,\n"
          "GroupNorm, Dropout); SyncBN over MPI under mpirun.\n"
          "\n"
          "commands:\n");
  for (size_t i = 0; i < n; i++)
    fprintf(f, "  %-8s %s\n", cmds[i].name, cmds[i].what);
  fprintf(f,
          "\n"
          "`syncbn <command> --help` documents each command's options.\n"
          "Exit status: 0 success, 1 runtime failure, 2 usage error.\n");
}

int main(int argc, char **argv) {
  const sbn_subcmd_t cmds[] = {
      {"apply", sbn_cli_apply,
       "run one layer's forward (and backward) on .npy files"},
      {"bench", sbn_cli_bench,
       "measure what SyncBN costs (layer, network, sizes, service, "
       "kernels)"},
      {"train", sbn_cli_train,
       "train an MLP or a CNN on Fashion-MNIST, data parallel under mpirun"},
      {"metrics", sbn_cli_metrics,
       "print a running syncbnd worker's counters (table or --json)"},
      {"study", sbn_cli_study,
       "how small normalization batches hurt BatchNorm: sweeps, tables, "
       "plots"},
  };
  const size_t n = sizeof cmds / sizeof *cmds;
  if (argc < 2) {
    usage(stderr, cmds, n);
    return 2;
  }
  if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 ||
      strcmp(argv[1], "help") == 0) {
    usage(stdout, cmds, n);
    return 0;
  }
  if (strcmp(argv[1], "--version") == 0) {
    printf("syncbn %d.%d.%d (kernels: %s)\n", SBN_VERSION_MAJOR,
           SBN_VERSION_MINOR, SBN_VERSION_PATCH, sbn_kernel_name());
    return 0;
  }
  for (size_t i = 0; i < n; i++)
    if (strcmp(argv[1], cmds[i].name) == 0)
      return cmds[i].run(argc - 1, argv + 1);
  fprintf(stderr, "syncbn: unknown command '%s'\n\n", argv[1]);
  usage(stderr, cmds, n);
  return 2;
}
