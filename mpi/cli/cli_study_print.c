/* `syncbn study`: the tables on stdout (rank 0). Runs of one point that
 * differ only in their seed are shown as mean +- sd (sample sd over the
 * seeds; 0 for one seed). */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "cli_study_int.h"

typedef struct agg_s {
  double mean, sd;
  size_t n;
} agg_t;

static int same_point(const study_run_t *a, const study_run_t *b) {
  return a->sweep == b->sweep && a->arch == b->arch && a->norm == b->norm &&
         a->norm_batch == b->norm_batch && a->per_rank == b->per_rank;
}

/* Mean and sd over the seeds of r's point of field (0 accuracy, 1 precise
 * accuracy). */
static agg_t aggregate(const study_run_t *all, size_t n, const study_run_t *r,
                       int field) {
  double s = 0, s2 = 0;
  agg_t a = {0, 0, 0};
  for (size_t i = 0; i < n; i++)
    if (same_point(&all[i], r)) {
      double v = field ? all[i].precise_acc : all[i].acc;
      s += v;
      s2 += v * v;
      a.n++;
    }
  a.mean = s / (double)a.n;
  a.sd = a.n > 1 ? sqrt(fmax(0, (s2 - s * s / (double)a.n) / (double)(a.n - 1)))
                 : 0;
  return a;
}

/* The first run of each point in the sweep. */
static int first_of_point(const study_run_t *all, size_t i) {
  for (size_t j = 0; j < i; j++)
    if (same_point(&all[j], &all[i]))
      return 0;
  return 1;
}

static void rank_words(const study_run_t *r, char *buf, size_t len) {
  if (r->norm_batch == 1)
    snprintf(buf, len, "%llu real, per sample", (unsigned long long)r->real);
  else if (r->ghost)
    snprintf(buf, len, "%llu = %llu real x %llu emulated",
             (unsigned long long)r->ranks, (unsigned long long)r->real,
             (unsigned long long)(r->ranks / r->real));
  else if (r->group)
    snprintf(buf, len, "%llu groups of %llu real", (unsigned long long)r->ranks,
             (unsigned long long)r->group);
  else if (r->norm == SBN_NN_NORM_SYNCBN && r->ranks > r->real)
    snprintf(buf, len, "%llu = %llu real x %llu emulated, one sync group",
             (unsigned long long)r->ranks, (unsigned long long)r->real,
             (unsigned long long)(r->ranks / r->real));
  else if (r->norm == SBN_NN_NORM_SYNCBN)
    snprintf(buf, len, "1 group of %llu real", (unsigned long long)r->real);
  else
    snprintf(buf, len, "%llu real", (unsigned long long)r->real);
}

void sbn__study_print_stats(const study_stat_t *s, size_t n, int size,
                            double sync_diff) {
  printf(
      "Sweep 1: error of a normalization set's statistics against the "
      "population's\n(rms over sets and channels; mean error in "
      "population sd, variance error\nrelative; BatchNorm's biased "
      "variance; for iid Gaussian values the two are\n1/sqrt(|S|) and "
      "sqrt(2|S|-1)/|S|). k ranks of b samples are merged as SyncBN\n"
      "merges them.");
  if (size > 1)
    printf(
        " For k = %d the merge ran for real over MPI on %d ranks and\n"
        "equals local BatchNorm over k*b samples to %.1e (largest "
        "difference, relative).\nOther k are emulated.\n\n",
        size, size, sync_diff);
  else
    printf(" One real rank: every k is emulated.\n\n");
  printf("%-7s %4s %3s %-8s %9s %10s %10s %11s %12s\n", "source", "b", "k",
         "ranks", "|S|", "mean err", "var err", "1/sqrt|S|", "gauss var");
  for (size_t i = 0; i < n; i++)
    printf("%-7s %4llu %3llu %-8s %9.0f %10.4f %10.4f %11.4f %12.4f\n",
           s[i].source, (unsigned long long)s[i].b, (unsigned long long)s[i].k,
           s[i].real ? "real" : "emulated", s[i].set_values, s[i].mean_err,
           s[i].var_err, s[i].inv_sqrt, s[i].gauss_var);
  printf("\n");
}

void sbn__study_print_runs(const study_opts_t *o, const study_run_t *r,
                           size_t n, int sweep) {
  if (sweep == STUDY_NORM)
    printf(
        "Sweep 2: global batch %d, only the normalization changes "
        "(test accuracy %%,\nmean +- sd over %llu seed%s, %llu epoch%s on "
        "%llu images)\n",
        STUDY_GLOBAL, (unsigned long long)o->seeds, o->seeds > 1 ? "s" : "",
        (unsigned long long)o->epochs, o->epochs > 1 ? "s" : "",
        (unsigned long long)o->subset);
  else
    printf(
        "Sweep 3: b images per rank on %llu ranks (test accuracy %%, "
        "mean +- sd over\n%llu seed%s; the global batch is %llu b; every "
        "run takes sweep 2's %llu steps,\nso a larger b sees more images: "
        "GroupNorm's line shows that effect alone)\n",
        (unsigned long long)o->ranks, (unsigned long long)o->seeds,
        o->seeds > 1 ? "s" : "", (unsigned long long)o->ranks,
        (unsigned long long)(o->epochs * (o->subset / STUDY_GLOBAL)));
  printf("%-5s %-7s %10s %9s %10s  %s\n", "model", "norm",
         sweep == STUDY_NORM ? "norm batch" : "per rank", "|S_i|", "accuracy",
         "ranks");
  for (size_t i = 0; i < n; i++) {
    if (r[i].sweep != sweep || !first_of_point(r, i))
      continue;
    agg_t a = aggregate(r, n, &r[i], 0);
    char words[96];
    rank_words(&r[i], words, sizeof words);
    printf("%-5s %-7s %10llu %9.0f %5.2f+-%-4.2f  %s\n",
           sbn__study_model_name(r[i].arch), sbn__train_norm_name(r[i].norm),
           (unsigned long long)(sweep == STUDY_NORM ? r[i].norm_batch
                                                    : r[i].per_rank),
           r[i].set_values, 100 * a.mean, 100 * a.sd, words);
  }
  printf("\n");
}

void sbn__study_print_precise(const study_opts_t *o, const study_run_t *r,
                              size_t n) {
  printf(
      "PreciseBN: sweep 2's BatchNorm runs evaluated with the running "
      "(EMA)\nstatistics and with exact population statistics of %llu "
      "training images\n(computed with the training normalization "
      "batch); test accuracy %%\n",
      (unsigned long long)o->precise_n);
  printf("%-5s %-7s %10s %12s %12s %8s\n", "model", "norm", "norm batch", "EMA",
         "precise", "gain");
  for (size_t i = 0; i < n; i++) {
    if (!r[i].precise || !first_of_point(r, i))
      continue;
    agg_t e = aggregate(r, n, &r[i], 0), p = aggregate(r, n, &r[i], 1);
    printf("%-5s %-7s %10llu %6.2f+-%-4.2f %6.2f+-%-4.2f %+8.2f\n",
           sbn__study_model_name(r[i].arch), sbn__train_norm_name(r[i].norm),
           (unsigned long long)r[i].norm_batch, 100 * e.mean, 100 * e.sd,
           100 * p.mean, 100 * p.sd, 100 * (p.mean - e.mean));
  }
  printf("\n");
}
