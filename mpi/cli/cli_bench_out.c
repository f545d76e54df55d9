/* `syncbn bench`: the one column list and the writers that share it. The
 * table, the JSON records and the CSV rows are all made by walking the same
 * array of columns over the same records, so the formats cannot drift: a
 * column added here appears in all three. */
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "cli_bench.h"

typedef enum { COL_STR, COL_INT, COL_NUM, COL_SHAPE } col_type_t;

typedef struct col_s {
  const char *name;
  col_type_t type;
  size_t off;
  const char *fmt; /* the table's format of a number */
} col_t;

#define STR(f) \
  { #f, COL_STR, offsetof(sbn_bench_rec_t, f), NULL }
#define INT(f) \
  { #f, COL_INT, offsetof(sbn_bench_rec_t, f), NULL }
#define NUM(f, fmt) \
  { #f, COL_NUM, offsetof(sbn_bench_rec_t, f), fmt }

static const col_t cols[] = {
    STR(mode),
    STR(variant),
    STR(op),
    STR(pass),
    STR(layout),
    {"shape", COL_SHAPE, offsetof(sbn_bench_rec_t, shape), NULL},
    INT(ranks),
    INT(group_size),
    NUM(median_us, "%.1f"),
    NUM(p90_us, "%.1f"),
    NUM(best_us, "%.1f"),
    NUM(floor_us, "%.1f"),
    NUM(floor_ratio, "%.2f"),
    NUM(stream_floor_us, "%.1f"),
    NUM(stream_floor_ratio, "%.2f"),
    NUM(gbps, "%.1f"),
    NUM(overhead_us, "%.1f"),
    NUM(overhead_pct, "%.1f"),
    NUM(overhead_per_allreduce, "%.2f"),
    NUM(mpi_us, "%.1f"),
    NUM(bytes, "%.0f"),
    NUM(avg_us, "%.2f"),
    NUM(min_us, "%.2f"),
    NUM(max_us, "%.2f"),
    NUM(iterations, "%.0f"),
    NUM(hop_us, "%.1f"),
    NUM(hop_ratio, "%.2f"),
    NUM(target_us, "%.1f"),
    NUM(target_ratio, "%.2f"),
    NUM(agree_bytes_round, "%.0f"),
};
#define NCOLS (sizeof cols / sizeof *cols)

sbn_bench_rec_t sbn__bench_rec(const sbn_bench_opts_t *o, const char *variant,
                               const char *op, const char *pass,
                               const sbn_tensor_desc_t *shape) {
  sbn_bench_rec_t r;
  memset(&r, 0, sizeof r);
  snprintf(r.mode, sizeof r.mode, "%s", o->mode);
  snprintf(r.variant, sizeof r.variant, "%s", variant);
  snprintf(r.op, sizeof r.op, "%s", op);
  snprintf(r.pass, sizeof r.pass, "%s", pass);
  if (shape != NULL) {
    r.shape = *shape;
    snprintf(r.layout, sizeof r.layout, "%s",
             shape->layout == SBN_LAYOUT_NHWC ? "nhwc" : "nchw");
  }
  r.ranks = o->size;
  r.group_size =
      o->group_size > 0 && o->group_size < o->size ? o->group_size : o->size;
  /* Every number starts absent; the column list knows where they are. */
  for (size_t c = 0; c < NCOLS; c++)
    if (cols[c].type == COL_NUM)
      *(double *)((char *)&r + cols[c].off) = NAN;
  return r;
}

int sbn__bench_push(sbn_bench_out_t *out, const sbn_bench_rec_t *r) {
  if (out->n == out->cap) {
    size_t cap = out->cap ? 2 * out->cap : 64;
    sbn_bench_rec_t *p = realloc(out->recs, cap * sizeof *p);
    if (p == NULL)
      return sbn_set_error(SBN_ENOMEM, "bench: out of memory for records");
    out->recs = p;
    out->cap = cap;
  }
  out->recs[out->n++] = *r;
  return 0;
}

/* Column c of r as text: fmt for numbers (the table's short form, or the
 * exact "%.17g" of the files), "" for an absent number. */
static void cell(const col_t *c, const sbn_bench_rec_t *r, const char *fmt,
                 char *buf, size_t n) {
  const char *p = (const char *)r + c->off;
  switch (c->type) {
    case COL_STR:
      snprintf(buf, n, "%s", p);
      break;
    case COL_INT:
      snprintf(buf, n, "%d", *(const int *)p);
      break;
    case COL_SHAPE:
      sbn__bench_shape_str((const sbn_tensor_desc_t *)p, buf, n);
      break;
    case COL_NUM: {
      double v = *(const double *)p;
      if (isnan(v) || isinf(v))
        buf[0] = '\0';
      else
        snprintf(buf, n, fmt ? fmt : c->fmt, v);
      break;
    }
  }
}

/* Whether column c holds anything in out (the table leaves out columns of
 * other modes). */
static int col_used(const col_t *c, const sbn_bench_out_t *out) {
  char buf[128];
  for (size_t i = 0; i < out->n; i++) {
    cell(c, &out->recs[i], NULL, buf, sizeof buf);
    if (buf[0] != '\0')
      return 1;
  }
  return 0;
}

static void header(const sbn_bench_opts_t *o, FILE *f, const char *prefix) {
  char cpu[320], mpi[256], date[64];
  sbn__bench_cpu(cpu, sizeof cpu);
  sbn__bench_mpi_version(mpi, sizeof mpi);
  sbn__bench_date(date, sizeof date);
  fprintf(f,
          "%ssyncbn bench %s: %s, %d rank%s, %s, kernels %s, %d thread%s, "
          "%s",
          prefix, o->mode, cpu, o->size, o->size == 1 ? "" : "s", mpi,
          sbn_kernel_name(), sbn_threads(), sbn_threads() == 1 ? "" : "s",
          date);
  if (o->gap_us > 0)
    fprintf(f, ", %d us of compute before every call", o->gap_us);
  if (o->rotate_mib > 0)
    fprintf(f, ", copies over %d MiB", o->rotate_mib);
  fprintf(f, "\n");
}

static void write_table(const sbn_bench_opts_t *o, const sbn_bench_out_t *out,
                        FILE *f) {
  int used[NCOLS], width[NCOLS];
  char buf[128];
  header(o, f, "# ");
  for (size_t c = 0; c < NCOLS; c++) {
    /* mode and ranks are in the header already. */
    used[c] = col_used(&cols[c], out) && strcmp(cols[c].name, "mode") != 0 &&
              strcmp(cols[c].name, "ranks") != 0;
    width[c] = (int)strlen(cols[c].name);
    for (size_t i = 0; used[c] && i < out->n; i++) {
      cell(&cols[c], &out->recs[i], NULL, buf, sizeof buf);
      if ((int)strlen(buf) > width[c])
        width[c] = (int)strlen(buf);
    }
  }
  for (size_t c = 0; c < NCOLS; c++)
    if (used[c])
      fprintf(f, "%*s ", cols[c].type == COL_NUM ? width[c] : -width[c],
              cols[c].name);
  fprintf(f, "\n");
  for (size_t i = 0; i < out->n; i++) {
    for (size_t c = 0; c < NCOLS; c++) {
      if (!used[c])
        continue;
      cell(&cols[c], &out->recs[i], NULL, buf, sizeof buf);
      fprintf(f, "%*s ", cols[c].type == COL_NUM ? width[c] : -width[c],
              buf[0] ? buf : "-");
    }
    fprintf(f, "\n");
  }
}

/* A JSON string (the values here are plain ASCII, but quotes and control
 * characters are escaped anyway). */
static void json_str(FILE *f, const char *s) {
  fputc('"', f);
  for (; *s; s++) {
    if (*s == '"' || *s == '\\')
      fprintf(f, "\\%c", *s);
    else if ((unsigned char)*s < 0x20)
      fprintf(f, "\\u%04x", (unsigned char)*s);
    else
      fputc(*s, f);
  }
  fputc('"', f);
}

static void write_json(const sbn_bench_opts_t *o, const sbn_bench_out_t *out,
                       FILE *f) {
  char cpu[320], mpi[256], date[64], buf[128];
  sbn__bench_cpu(cpu, sizeof cpu);
  sbn__bench_mpi_version(mpi, sizeof mpi);
  sbn__bench_date(date, sizeof date);
  fprintf(f, "{\n  \"mode\": ");
  json_str(f, o->mode);
  fprintf(f, ",\n  \"machine\": {\"cpu\": ");
  json_str(f, cpu);
  fprintf(f, ", \"mpi\": ");
  json_str(f, mpi);
  fprintf(f, ", \"kernels\": ");
  json_str(f, sbn_kernel_name());
  fprintf(f, ", \"threads\": %d, \"ranks\": %d, \"date\": ", sbn_threads(),
          o->size);
  json_str(f, date);
  if (o->gap_us > 0)
    fprintf(f, ", \"gap_us\": %d", o->gap_us);
  fprintf(f, ", \"rotate_mib\": %d",
          o->rotate_mib > 0 ? o->rotate_mib : SBN_BENCH_ROTATE_MIB);
  fprintf(f, "},\n  \"columns\": [");
  for (size_t c = 0; c < NCOLS; c++)
    fprintf(f, "%s\"%s\"", c ? ", " : "", cols[c].name);
  fprintf(f, "],\n  \"records\": [");
  for (size_t i = 0; i < out->n; i++) {
    const sbn_bench_rec_t *r = &out->recs[i];
    fprintf(f, "%s\n    {", i ? "," : "");
    for (size_t c = 0; c < NCOLS; c++) {
      fprintf(f, "%s\"%s\": ", c ? ", " : "", cols[c].name);
      if (cols[c].type == COL_SHAPE) {
        fprintf(f, "[");
        for (int d = 0; d < r->shape.ndim; d++)
          fprintf(f, "%s%zu", d ? ", " : "", r->shape.dims[d]);
        fprintf(f, "]");
        continue;
      }
      cell(&cols[c], r, "%.17g", buf, sizeof buf);
      if (cols[c].type == COL_STR)
        json_str(f, buf);
      else
        fprintf(f, "%s", buf[0] ? buf : "null");
    }
    fprintf(f, "}");
  }
  fprintf(f, "\n  ]\n}\n");
}

static void write_csv(const sbn_bench_out_t *out, FILE *f) {
  char buf[128];
  for (size_t c = 0; c < NCOLS; c++)
    fprintf(f, "%s%s", c ? "," : "", cols[c].name);
  fprintf(f, "\n");
  for (size_t i = 0; i < out->n; i++) {
    for (size_t c = 0; c < NCOLS; c++) {
      /* No value holds a comma or a quote, so no field needs quoting. */
      cell(&cols[c], &out->recs[i], "%.17g", buf, sizeof buf);
      fprintf(f, "%s%s", c ? "," : "", buf);
    }
    fprintf(f, "\n");
  }
}

/* Opens path ("-" is stdout) and writes one format into it. */
static int write_file(const sbn_bench_opts_t *o, const sbn_bench_out_t *out,
                      const char *path, int json) {
  FILE *f = strcmp(path, "-") == 0 ? stdout : fopen(path, "w");
  if (f == NULL)
    return sbn_set_error(SBN_EIO, "--%s %s: cannot open for writing",
                         json ? "json" : "csv", path);
  if (json)
    write_json(o, out, f);
  else
    write_csv(out, f);
  int bad = ferror(f) != 0;
  if (f != stdout)
    bad |= fclose(f) != 0;
  else
    bad |= fflush(f) != 0;
  if (bad)
    return sbn_set_error(SBN_EIO, "--%s %s: write failed",
                         json ? "json" : "csv", path);
  return 0;
}

int sbn__bench_write(const sbn_bench_opts_t *o, const sbn_bench_out_t *out,
                     FILE *table) {
  int rc = 0;
  if (o->progress)
    fprintf(stderr, "\r\033[K");
  write_table(o, out, table);
  fflush(table);
  if (o->json != NULL)
    rc = write_file(o, out, o->json, 1);
  if (rc == 0 && o->csv != NULL)
    rc = write_file(o, out, o->csv, 0);
  return rc;
}
