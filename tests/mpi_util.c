/* Helpers shared by the MPI test programs; see mpi_util.h. */
#include "mpi_util.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

int mu_rank = 0, mu_size = 1;
static int mu_passed = 0, mu_failed = 0;

int mu_check(int ok, const char *file, int line, const char *fmt, ...) {
  if (ok) {
    mu_passed++;
    return 1;
  }
  mu_failed++;
  va_list ap;
  fprintf(stderr, "[rank %d] FAIL %s:%d: ", mu_rank, file, line);
  va_start(ap, fmt);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fputc('\n', stderr);
  return 0;
}

int mu_check_rc(int rc, int want, const char *what, const char *file,
                int line) {
  return mu_check(rc == want, file, line, "%s: got %d (%s), want %d (%s): %s",
                  what, rc, sbn_err_name(rc), want, sbn_err_name(want),
                  sbn_last_error());
}

void mu_init(int *argc, char ***argv) {
  MPI_Init(argc, argv);
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  MPI_Comm_rank(MPI_COMM_WORLD, &mu_rank);
  MPI_Comm_size(MPI_COMM_WORLD, &mu_size);
}

int mu_finish(const char *prog) {
  int local[2] = {mu_passed, mu_failed}, total[2] = {0, 0};
  printf("%s rank %d/%d: %d passed, %d failed\n", prog, mu_rank, mu_size,
         mu_passed, mu_failed);
  fflush(stdout);
  MPI_Allreduce(local, total, 2, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  if (mu_rank == 0) {
    printf("%s all ranks: %d passed, %d failed\n", prog, total[0], total[1]);
    fflush(stdout);
  }
  MPI_Finalize();
  /* A program that checked nothing is broken, not passing. */
  return total[1] == 0 && total[0] > 0 ? 0 : 1;
}

void mu_rng_seed(mu_rng_t *r, uint64_t seed) {
  r->s = seed;
}

static uint64_t mu_rng_u64(mu_rng_t *r) {
  uint64_t z = (r->s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

double mu_rng_uniform(mu_rng_t *r) {
  return (double)(mu_rng_u64(r) >> 11) * (1.0 / 9007199254740992.0);
}

double mu_rng_normal(mu_rng_t *r) {
  double u1 = mu_rng_uniform(r), u2 = mu_rng_uniform(r);
  if (u1 < 1e-300)
    u1 = 1e-300;
  return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

double mu_rel_err_f(const float *a, const float *b, size_t n) {
  double num = 0, den = 0;
  for (size_t i = 0; i < n; i++) {
    double d = fabs((double)a[i] - (double)b[i]);
    if (isnan(d))
      return INFINITY;
    if (d > num)
      num = d;
    if (fabs((double)b[i]) > den)
      den = fabs((double)b[i]);
  }
  if (num == 0)
    return 0;
  return den > 0 ? num / den : INFINITY;
}

double mu_rel_err_fd(const float *a, const double *b, size_t n) {
  double num = 0, den = 0;
  for (size_t i = 0; i < n; i++) {
    double d = fabs((double)a[i] - b[i]);
    if (isnan(d))
      return INFINITY;
    if (d > num)
      num = d;
    if (fabs(b[i]) > den)
      den = fabs(b[i]);
  }
  if (num == 0)
    return 0;
  return den > 0 ? num / den : INFINITY;
}

void *mu_alloc(size_t bytes) {
  void *p = calloc(1, bytes > 0 ? bytes : 1);
  if (p == NULL) {
    fprintf(stderr, "[rank %d] out of memory (%zu bytes)\n", mu_rank, bytes);
    MPI_Abort(MPI_COMM_WORLD, 2);
  }
  return p;
}

void mu_allreduce_sum_f(float *v, size_t n, MPI_Comm comm) {
  double *d = mu_alloc(n * sizeof *d);
  for (size_t i = 0; i < n; i++)
    d[i] = v[i];
  MPI_Allreduce(MPI_IN_PLACE, d, (int)n, MPI_DOUBLE, MPI_SUM, comm);
  for (size_t i = 0; i < n; i++)
    v[i] = (float)d[i];
  free(d);
}
