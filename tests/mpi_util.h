/* Helpers shared by the MPI test programs (tests/mpi_*.c): checks that
 * count passes and failures per rank, a seeded generator that gives every
 * rank the same global batch, and error measures. */
#ifndef SBN_MPI_UTIL_H
#define SBN_MPI_UTIL_H

#include <mpi.h>
#include <stddef.h>
#include <stdint.h>

#include "syncbn.h"

extern int mu_rank, mu_size;

/* Counts a check; on failure prints where and what, with the rank. */
int mu_check(int ok, const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
#define MU_CHECK(cond, ...) mu_check(!!(cond), __FILE__, __LINE__, __VA_ARGS__)
/* Checks rc == want and prints sbn_last_error() when it is not. rc is
 * evaluated once, so it may be the call itself. */
int mu_check_rc(int rc, int want, const char *what, const char *file, int line);
#define MU_RC(rc, want, what) \
  mu_check_rc((rc), (want), (what), __FILE__, __LINE__)

/* MPI_Init with MPI_ERRORS_RETURN on MPI_COMM_WORLD, so a broken MPI call
 * in a test shows up as a failed check instead of an abort. */
void mu_init(int *argc, char ***argv);
/* Prints "rank r: N passed, N failed", finalizes MPI and returns the exit
 * code: 0 only if no rank failed a check. */
int mu_finish(const char *prog);

/* splitmix64 with Box-Muller normals; the same seed gives the same stream
 * on every rank. */
typedef struct mu_rng_s {
  uint64_t s;
} mu_rng_t;
void mu_rng_seed(mu_rng_t *r, uint64_t seed);
double mu_rng_uniform(mu_rng_t *r);
double mu_rng_normal(mu_rng_t *r);

/* Max |a - b| over max |b| (the normalized error), over n elements; 0 for
 * n = 0. A NaN anywhere gives infinity. */
double mu_rel_err_f(const float *a, const float *b, size_t n);
double mu_rel_err_fd(const float *a, const double *b, size_t n);

/* Allocation that never returns NULL (tests abort on out of memory) and
 * gives a valid pointer for zero bytes. */
void *mu_alloc(size_t bytes);

/* Per-channel sums over the ranks of comm, for dweight/dbias, which
 * sbn_backward leaves local. */
void mu_allreduce_sum_f(float *v, size_t n, MPI_Comm comm);

#endif /* SBN_MPI_UTIL_H */
