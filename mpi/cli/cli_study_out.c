/* `syncbn study`: the tables on stdout and the CSV and JSON files of each
 * sweep (rank 0). Both files of a sweep are written from the same
 * formatted cells, so the CSV and the JSON hold the same rows. */
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "cli_study_int.h"

#define MAX_COLS 24
#define CELL 48

typedef struct table_s {
  const char *file; /* without extension */
  const char *cols[MAX_COLS];
  int is_text[MAX_COLS];
  size_t ncols;
} table_t;

const char *sbn__study_model_name(sbn_nn_arch_t a) {
  return a == SBN_NN_CNN ? "cnn" : "mlp";
}

static const char *sweep_name(int sweep) {
  return sweep == STUDY_NORM   ? "sweep2_norm_batch"
         : sweep == STUDY_RANK ? "sweep3_per_rank"
                               : "precise_bn";
}

static void fmt_num(char *cell, double v) {
  if (isnan(v))
    snprintf(cell, CELL, "null");
  else
    snprintf(cell, CELL, "%.9g", v);
}

static void run_cells(const study_run_t *r, char cells[][CELL]) {
  uint64_t emu = r->ranks > r->real ? r->ranks / r->real : 1;
  const char *text[] = {sweep_name(r->sweep), sbn__study_model_name(r->arch),
                        sbn__train_norm_name(r->norm)};
  for (int i = 0; i < 3; i++)
    snprintf(cells[i], CELL, "%s", text[i]);
  const uint64_t u[] = {r->norm_batch, r->per_rank, r->ranks,  r->real,
                        emu,           r->ghost,    r->group,  r->local,
                        r->global,     r->seed,     r->subset, r->epochs};
  for (int i = 0; i < 12; i++)
    snprintf(cells[3 + i], CELL, "%llu", (unsigned long long)u[i]);
  const double d[] = {r->set_values, r->acc,       r->precise_acc,
                      r->train_loss, r->test_loss, r->wall_s};
  for (int i = 0; i < 6; i++)
    fmt_num(cells[15 + i], d[i]);
}

static const table_t run_table = {NULL,
                                  {"sweep",         "model",
                                   "norm",          "norm_batch",
                                   "per_rank",      "ranks",
                                   "real_ranks",    "emulated_per_real",
                                   "ghost_batch",   "group_size",
                                   "local_batch",   "global_batch",
                                   "seed",          "train_subset",
                                   "epochs",        "set_values",
                                   "test_accuracy", "precise_accuracy",
                                   "train_loss",    "test_loss",
                                   "wall_s"},
                                  {1, 1, 1},
                                  21};

static void stat_cells(const study_stat_t *s, char cells[][CELL]) {
  snprintf(cells[0], CELL, "%s", s->source);
  snprintf(cells[1], CELL, "%llu", (unsigned long long)s->b);
  snprintf(cells[2], CELL, "%llu", (unsigned long long)s->k);
  snprintf(cells[3], CELL, "%s", s->real ? "real" : "emulated");
  const double d[] = {s->set_values, s->mean_err,  s->var_err,
                      s->inv_sqrt,   s->gauss_var, (double)s->channels};
  for (int i = 0; i < 6; i++)
    fmt_num(cells[4 + i], d[i]);
}

static const table_t stat_table = {
    "sweep1_stats",
    {"source", "per_rank", "ranks", "ranks_kind", "set_values", "mean_error",
     "var_error", "inv_sqrt_set", "gaussian_var_error", "channels"},
    {1, 0, 0, 1},
    10};

static int closed(FILE *f, const char *path) {
  int bad = ferror(f);
  if (fclose(f) != 0 || bad)
    return sbn_set_error(SBN_EIO, "%s: write failed", path);
  return 0;
}

static FILE *open_out(const study_opts_t *o, const char *file, const char *ext,
                      char *path, size_t len) {
  if (mkdir(o->out, 0777) != 0 && errno != EEXIST) {
    sbn_set_error(SBN_EIO, "--out %s: cannot create the directory", o->out);
    return NULL;
  }
  snprintf(path, len, "%s/%s.%s", o->out, file, ext);
  FILE *f = fopen(path, "w");
  if (f == NULL)
    sbn_set_error(SBN_EIO, "%s: cannot create", path);
  return f;
}

/* cells: nrows x t->ncols formatted values. */
static int write_table(const study_opts_t *o, const table_t *t,
                       const char *file, char (*cells)[CELL], size_t nrows,
                       int size) {
  char csv[4096], json[4096];
  FILE *f = open_out(o, file, "csv", csv, sizeof csv);
  if (f == NULL)
    return 1;
  for (size_t j = 0; j < t->ncols; j++)
    fprintf(f, "%s%s", j ? "," : "", t->cols[j]);
  fprintf(f, "\n");
  for (size_t i = 0; i < nrows; i++)
    for (size_t j = 0; j < t->ncols; j++)
      fprintf(f, "%s%s", cells[i * t->ncols + j],
              j + 1 < t->ncols ? "," : "\n");
  if (closed(f, csv) != 0 ||
      (f = open_out(o, file, "json", json, sizeof json)) == NULL)
    return 1;
  fprintf(f,
          "{\n  \"sweep\": \"%s\",\n  \"command\": \"%s\",\n  \"real_ranks\": "
          "%d,\n  \"seeds\": %llu,\n  \"epochs\": %llu,\n  \"train_subset\": "
          "%llu,\n  \"test_subset\": %llu,\n  \"rows\": [\n",
          file, o->command, size, (unsigned long long)o->seeds,
          (unsigned long long)o->epochs, (unsigned long long)o->subset,
          (unsigned long long)o->test_subset);
  for (size_t i = 0; i < nrows; i++) {
    fprintf(f, "    {");
    for (size_t j = 0; j < t->ncols; j++)
      fprintf(f, t->is_text[j] ? "\"%s\": \"%s\"%s" : "\"%s\": %s%s",
              t->cols[j], cells[i * t->ncols + j],
              j + 1 < t->ncols ? ", " : "");
    fprintf(f, "}%s\n", i + 1 < nrows ? "," : "");
  }
  fprintf(f, "  ]\n}\n");
  if (closed(f, json) != 0)
    return 1;
  printf("wrote %s and %s\n", csv, json);
  return 0;
}

static int report(int rc) {
  if (rc != 0)
    fprintf(stderr, "syncbn study: --out: %s\n", sbn_last_error());
  return rc;
}

int sbn__study_write_stats(const study_opts_t *o, const study_stat_t *s,
                           size_t n, int size) {
  if (o->out == NULL)
    return 0;
  char(*cells)[CELL] = calloc(n * MAX_COLS + 1, CELL);
  if (cells == NULL)
    return 1;
  for (size_t i = 0; i < n; i++)
    stat_cells(&s[i], cells + i * stat_table.ncols);
  int rc = write_table(o, &stat_table, stat_table.file, cells, n, size);
  free(cells);
  return report(rc);
}

static int in_sweep(const study_run_t *r, int sweep) {
  return sweep == STUDY_PRECISE ? r->precise : r->sweep == sweep;
}

int sbn__study_write_runs(const study_opts_t *o, const study_run_t *r, size_t n,
                          int sweep, int size) {
  if (o->out == NULL)
    return 0;
  char(*cells)[CELL] = calloc(n * MAX_COLS + 1, CELL);
  if (cells == NULL)
    return 1;
  size_t rows = 0;
  for (size_t i = 0; i < n; i++)
    if (in_sweep(&r[i], sweep))
      run_cells(&r[i], cells + rows++ * run_table.ncols);
  int rc = write_table(o, &run_table, sweep_name(sweep), cells, rows, size);
  free(cells);
  return report(rc);
}
