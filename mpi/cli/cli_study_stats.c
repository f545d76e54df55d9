/* `syncbn study`, sweep 1: how far the mean and variance of a
 * normalization set fall from the population's, over real data: the
 * standardized Fashion-MNIST pixels (BatchNorm1d's view: one statistic
 * per position over the set's images) and the per-channel outputs of the
 * CNN's first convolution at initialization (BatchNorm2d's view: one
 * statistic per channel over images x 28 x 28). A set of k ranks of b
 * samples is merged as SyncBN merges it; for k equal to the job's ranks
 * that merge is also done for real, through MPI, and compared with the
 * local statistics of the k b samples. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cli_study_int.h"
#include "syncbn_mpi.h"

#define PIXEL_POOL 20000
#define CONV_CHUNK 500
#define CONV_CHANNELS 16

typedef struct source_s {
  const char *name;
  sbn_nn_set_error_args_t a;
  float *x;
  sbn_rec_t *samples, *pop, *set, *chunk;
  uint32_t *perm;
  double min_var;
} source_t;

static int alloc_source(source_t *s, size_t n, size_t c) {
  s->pop = calloc(c, sizeof *s->pop);
  s->set = calloc(c, sizeof *s->set);
  s->chunk = calloc(c, sizeof *s->chunk);
  s->perm = calloc(n, sizeof *s->perm);
  if (!s->pop || !s->set || !s->chunk || !s->perm)
    return sbn_set_error(SBN_ENOMEM, "sweep 1: out of memory");
  s->a.n = n;
  s->a.c = c;
  s->a.pop = s->pop;
  s->a.set = s->set;
  s->a.chunk = s->chunk;
  s->a.perm = s->perm;
  for (size_t i = 0; i < n; i++)
    s->perm[i] = (uint32_t)i;
  return 0;
}

static void free_source(source_t *s) {
  free(s->x);
  free(s->samples);
  free(s->pop);
  free(s->set);
  free(s->chunk);
  free(s->perm);
}

/* The pixels of the first images, standardized as training sees them; the
 * population is the pool itself. */
static int pixel_source(const train_data_t *d, source_t *s) {
  size_t n = d->train.n < PIXEL_POOL ? d->train.n : PIXEL_POOL;
  s->name = "pixels";
  s->min_var = 0.01; /* constant border pixels have no statistics */
  uint8_t *y = malloc(n);
  s->x = malloc(n * 784 * sizeof *s->x);
  int rc = y && s->x ? alloc_source(s, n, 784)
                     : sbn_set_error(SBN_ENOMEM, "sweep 1: out of memory");
  if (rc == 0) {
    sbn_dataset_gather(&d->train, s->perm, n, d->mean, d->std, s->x, y);
    s->a.x = s->x;
    sbn_nn_chunk_moments(&s->a, s->perm, n, s->pop);
  }
  free(y);
  return rc;
}

/* Each image's per-channel moments of the first convolution's output. */
static int conv_records(const train_data_t *d, sbn_nn_model_t *m, source_t *s) {
  sbn_nn_conv_t g = {1, CONV_CHANNELS, 28, 28, 3, 1, SBN_LAYOUT_NCHW};
  size_t per = CONV_CHANNELS * 784;
  float *x = malloc(CONV_CHUNK * 784 * sizeof *x);
  float *out = malloc(CONV_CHUNK * per * sizeof *out);
  float *col = malloc(sbn_nn_conv_col_floats(&g) * sizeof *col);
  uint8_t *y = malloc(CONV_CHUNK);
  int rc = 0;
  if (!x || !out || !col || !y)
    rc = sbn_set_error(SBN_ENOMEM, "sweep 1: out of memory");
  /* The model's parameters start with the first convolution's weights
   * (16 x 1 x 3 x 3) and biases (16). */
  const float *w = sbn_nn_params(m), *b = w + CONV_CHANNELS * 9;
  for (size_t i = 0; rc == 0 && i < s->a.n; i += CONV_CHUNK) {
    size_t k = s->a.n - i < CONV_CHUNK ? s->a.n - i : CONV_CHUNK;
    sbn_dataset_gather(&d->train, s->perm + i, k, d->mean, d->std, x, y);
    sbn_nn_conv_forward(&g, k, x, w, b, out, col);
    for (size_t j = 0; j < k; j++)
      sbn_nn_channel_moments(out + j * per, 1, CONV_CHANNELS, 784, 0,
                             s->samples + (i + j) * CONV_CHANNELS);
  }
  free(x);
  free(out);
  free(col);
  free(y);
  return rc;
}

static int conv_source(const study_opts_t *o, const train_data_t *d,
                       source_t *s) {
  size_t n = o->quick ? 4000 : 10000;
  n = d->train.n < n ? d->train.n : n;
  s->name = "conv1";
  s->min_var = 1e-8;
  sbn_nn_config_t cfg = {0};
  cfg.arch = SBN_NN_CNN;
  cfg.norm = SBN_NN_NORM_NONE;
  cfg.eps = 1e-5;
  cfg.momentum = 0.1;
  cfg.max_batch = CONV_CHUNK;
  sbn_nn_model_t *m = NULL;
  int rc = alloc_source(s, n, CONV_CHANNELS);
  if (rc == 0 &&
      (s->samples = malloc(n * CONV_CHANNELS * sizeof *s->samples)) == NULL)
    rc = sbn_set_error(SBN_ENOMEM, "sweep 1: out of memory");
  if (rc == 0)
    rc = sbn_nn_model_create(&cfg, &m);
  if (rc == 0)
    rc = conv_records(d, m, s);
  sbn_nn_model_destroy(m);
  if (rc == 0) {
    s->a.samples = s->samples;
    sbn_nn_chunk_moments(&s->a, s->perm, n, s->pop);
  }
  return rc;
}

/* The real SyncBN merge: each rank's chunk of b samples of one draw, its
 * records reduced over the job with the library's MPI operation, against
 * the local moments of all P b samples. Returns the largest difference,
 * relative to the population's sd (means) and variance (variances). */
static double sync_check(source_t *s, uint64_t b, int rank, int size) {
  size_t c = s->a.c, all = (size_t)b * (size_t)size;
  if (all > s->a.n)
    return 0;
  sbn_nn_permutation(s->perm, s->a.n, 7, b);
  sbn_nn_chunk_moments(&s->a, s->perm + (size_t)rank * b, (size_t)b, s->chunk);
  MPI_Datatype type;
  MPI_Op op;
  if (sbn_mpi_rec_acquire(&type, &op) != 0)
    return INFINITY;
  int mrc =
      MPI_Allreduce(MPI_IN_PLACE, s->chunk, (int)c, type, op, MPI_COMM_WORLD);
  sbn_mpi_rec_release();
  if (mrc != MPI_SUCCESS)
    return INFINITY;
  sbn_nn_chunk_moments(&s->a, s->perm, all, s->set);
  double worst = 0;
  for (size_t ch = 0; ch < c; ch++) {
    double pvar = s->pop[ch].v[2] / s->pop[ch].v[0];
    if (!(pvar > s->min_var))
      continue;
    double dm = fabs(s->chunk[ch].v[1] - s->set[ch].v[1]) / sqrt(pvar);
    double dv =
        fabs(s->chunk[ch].v[2] - s->set[ch].v[2]) / (s->set[ch].v[0] * pvar);
    worst = fmax(worst, fmax(dm, dv));
  }
  return worst;
}

static int sweep_source(const study_opts_t *o, source_t *s, int size,
                        study_stat_t *rows, size_t *n) {
  for (size_t i = 0; i < o->nstat_b; i++)
    for (size_t j = 0; j < o->nstat_k; j++) {
      uint64_t b = o->stat_b[i], k = o->stat_k[j];
      if (b * k > s->a.n)
        continue;
      sbn_nn_set_error_t e;
      s->a.per_rank = (size_t)b;
      s->a.ranks = (size_t)k;
      s->a.trials = (size_t)o->trials;
      s->a.seed = 1 + i * 16 + j;
      s->a.min_var = s->min_var;
      if (sbn_nn_set_error(&s->a, &e) != 0)
        return 1;
      double m = e.set_values;
      rows[(*n)++] = (study_stat_t){
          s->name,    b,         k,           k == (uint64_t)size, m,
          e.mean_err, e.var_err, 1 / sqrt(m), sqrt(2 * m - 1) / m, e.channels};
    }
  return 0;
}

int sbn__study_stats(const study_opts_t *o, const train_data_t *d, int rank,
                     int size, study_stat_t **rows, size_t *n,
                     double *sync_diff) {
  source_t src[2];
  memset(src, 0, sizeof src);
  size_t cap = 2 * STUDY_MAX_POINTS * STUDY_MAX_POINTS;
  int rc = 0;
  *rows = NULL;
  *n = 0;
  *sync_diff = 0;
  if (o->models & (1u << SBN_NN_MLP))
    rc = pixel_source(d, &src[0]);
  if (rc == 0 && (o->models & (1u << SBN_NN_CNN)))
    rc = conv_source(o, d, &src[1]);
  for (int i = 0; i < 2 && rc == 0; i++)
    for (size_t j = 0; j < o->nstat_b && src[i].name && size > 1; j++)
      *sync_diff =
          fmax(*sync_diff, sync_check(&src[i], o->stat_b[j], rank, size));
  if (rc == 0 && rank == 0 && (*rows = calloc(cap, sizeof **rows)) == NULL)
    rc = sbn_set_error(SBN_ENOMEM, "sweep 1: out of memory");
  for (int i = 0; i < 2 && rc == 0 && rank == 0; i++)
    if (src[i].name)
      rc = sweep_source(o, &src[i], size, *rows, n);
  if (rc != 0 && rank == 0)
    fprintf(stderr, "syncbn study: sweep 1: %s\n", sbn_last_error());
  for (int i = 0; i < 2; i++)
    free_source(&src[i]);
  return rc ? 1 : 0;
}
