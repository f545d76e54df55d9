/* Value parsers shared by the subcommands' option parsers. Each returns 0
 * or -1 and leaves the message to the caller, which knows the flag's name
 * and what it expects. */
#ifndef SBN_CLI_ARGS_H
#define SBN_CLI_ARGS_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "syncbn.h"

/* Strict unsigned decimal: digits only, no sign, no blanks, no trailing
 * text, at most max. */
int sbn__cli_parse_u64(const char *s, uint64_t max, uint64_t *out);

/* Strict finite double: no leading blanks, no trailing text, no range
 * error, no NaN or infinity. */
int sbn__cli_parse_double(const char *s, double *out);

/* "nchw" or "nhwc". */
int sbn__cli_parse_layout(const char *s, sbn_layout_t *out);

/* A comma-separated list of unsigned decimals (each as
 * sbn__cli_parse_u64 with max): *out is malloc'ed with *n entries, and
 * also on failure (then possibly partly filled) so that one free() is the
 * caller's only cleanup. */
int sbn__cli_parse_list(const char *s, uint64_t max, uint64_t **out, size_t *n);

/* "syncbn CMD: --FLAG: 'ARG' is not WHAT" on stderr; returns 2, the usage
 * error's exit status. */
int sbn__cli_bad(const char *cmd, const char *flag, const char *arg,
                 const char *what);

/* An unsigned option: its flag, the uint64_t field at off in the
 * subcommand's options struct, its bounds, and what it must be (for the
 * message). */
typedef struct sbn__cli_uint_s {
  const char *name;
  size_t off;
  uint64_t lo, hi;
  const char *what;
} sbn__cli_uint_t;

/* Sets the field of flag in opts from arg when t[0..n) names flag:
 * returns 0, 2 after the message when arg is not a decimal in its bounds,
 * or -1 when t does not name flag. */
int sbn__cli_set_uint(const char *cmd, void *opts, const sbn__cli_uint_t *t,
                      size_t n, const char *flag, const char *arg);

/* A flag without a value (--quick) and the int it sets to 1. */
typedef struct sbn__cli_flag_s {
  const char *name;
  int *set;
} sbn__cli_flag_t;

/* Called for each option with a value: returns 0, or nonzero after printing
 * what is wrong with value (a usage error). */
typedef int (*sbn__cli_value_fn)(void *ctx, const char *flag,
                                 const char *value);

/* One getopt_long loop for a subcommand whose options are n_with names that
 * take a value (each handed to on_value) and n_flags flags, plus --help
 * (usage(stdout), then *help = 1). Unknown options, missing values and
 * stray arguments are reported as "syncbn CMD: ..." on stderr. Returns 0
 * when parsed or --help was given (the caller checks *help), 2 on a usage
 * error. At most 48 options in all. */
int sbn__cli_getopt(const char *cmd, int argc, char **argv,
                    const char *const *with_arg, int n_with,
                    const sbn__cli_flag_t *flags, int n_flags,
                    sbn__cli_value_fn on_value, void *ctx,
                    void (*usage)(FILE *), int *help);

/* The rank and size a launcher (mpirun: Open MPI, or PMI) gave this
 * process, read from the environment without initializing MPI; 0 and 1
 * outside a launcher. For the warnings of subcommands that initialize MPI
 * only on request. */
void sbn__cli_launcher_rank(int *rank, int *size);

#endif /* SBN_CLI_ARGS_H */
