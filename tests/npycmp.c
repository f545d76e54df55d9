/* npycmp: checks on .npy files for the CLI tests (CI has no NumPy).
 *
 *   npycmp A.npy B.npy TOL
 *       same shape and ||A - B||_2 / ||B||_2 <= TOL (||A - B|| when B is 0;
 *       any non-finite value fails)
 *   npycmp --shape A.npy d0,d1,...       the shape is exactly this ("-": 0-d)
 *   npycmp --moments A.npy KEEP MEAN VAR TOL
 *       for every index over the comma-separated axes KEEP, the mean and
 *       the (biased) variance over all other axes are within TOL of MEAN
 *       and VAR
 *   npycmp --dropout X.npy Y.npy P TOL
 *       every y is 0 or x / (1 - p) (relative TOL), and the fraction of
 *       zeroed nonzero x is within 0.05 of P
 * Prints what it measured. Exit status 0 pass, 1 fail, 2 usage or I/O. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sbn_npy.h"

static int load(const char *path, sbn_npy_t *t) {
  if (sbn_npy_read(path, t) != 0) {
    fprintf(stderr, "npycmp: %s\n", sbn_last_error());
    return -1;
  }
  return 0;
}

static int parse_list(const char *s, size_t *v, int *n) {
  *n = 0;
  if (strcmp(s, "-") == 0)
    return 0;
  while (*s) {
    char *end;
    if (*n == SBN_MAX_DIMS || *s < '0' || *s > '9')
      return -1;
    v[(*n)++] = (size_t)strtoull(s, &end, 10);
    s = end;
    if (*s == ',')
      s++;
    else if (*s)
      return -1;
  }
  return 0;
}

static int cmp(const char *pa, const char *pb, double tol) {
  sbn_npy_t a, b;
  if (load(pa, &a) != 0)
    return 2;
  if (load(pb, &b) != 0) {
    sbn_npy_free(&a);
    return 2;
  }
  int rc = 1;
  int same = a.ndim == b.ndim;
  for (int i = 0; same && i < a.ndim; i++)
    same = a.dims[i] == b.dims[i];
  if (!same) {
    printf("npycmp: %s and %s differ in shape\n", pa, pb);
    goto done;
  }
  double num = 0, den = 0;
  for (size_t i = 0; i < a.numel; i++) {
    double d = (double)a.data[i] - (double)b.data[i];
    num += d * d;
    den += (double)b.data[i] * (double)b.data[i];
  }
  double rel = den > 0 ? sqrt(num / den) : sqrt(num);
  if (!isfinite(rel))
    rel = INFINITY;
  printf("npycmp: %s vs %s: relative L2 %.3g (tolerance %.3g)\n", pa, pb, rel,
         tol);
  rc = rel <= tol ? 0 : 1;
done:
  sbn_npy_free(&a);
  sbn_npy_free(&b);
  return rc;
}

static int shape(const char *pa, const char *dims) {
  sbn_npy_t a;
  size_t want[SBN_MAX_DIMS];
  int n;
  if (parse_list(dims, want, &n) != 0 || load(pa, &a) != 0)
    return 2;
  int same = a.ndim == n;
  for (int i = 0; same && i < n; i++)
    same = a.dims[i] == want[i];
  printf("npycmp: %s: shape %s %s\n", pa, same ? "is" : "is not", dims);
  sbn_npy_free(&a);
  return same ? 0 : 1;
}

static int moments(const char *pa, const char *keep_s, double m, double v,
                   double tol) {
  sbn_npy_t a;
  size_t keep[SBN_MAX_DIMS];
  int nk, iskeep[SBN_MAX_DIMS] = {0};
  if (parse_list(keep_s, keep, &nk) != 0 || load(pa, &a) != 0)
    return 2;
  size_t units = 1;
  for (int k = 0; k < nk; k++) {
    if (keep[k] >= (size_t)a.ndim) {
      sbn_npy_free(&a);
      return 2;
    }
    iskeep[keep[k]] = 1;
    units *= a.dims[keep[k]];
  }
  double *s1 = calloc(units + 1, sizeof(double));
  double *s2 = calloc(units + 1, sizeof(double));
  double *cnt = calloc(units + 1, sizeof(double));
  for (int pass = 0; pass < 2; pass++) {
    for (size_t i = 0; i < a.numel; i++) {
      /* The unit index: the kept axes' indices in row-major order. */
      size_t rem = i, u = 0, mul = 1;
      for (int d = a.ndim - 1; d >= 0; d--) {
        size_t idx = rem % a.dims[d];
        rem /= a.dims[d];
        if (iskeep[d]) {
          u += idx * mul;
          mul *= a.dims[d];
        }
      }
      if (pass == 0) {
        s1[u] += a.data[i];
        cnt[u] += 1;
      } else {
        double dd = a.data[i] - s1[u];
        s2[u] += dd * dd;
      }
    }
    if (pass == 0)
      for (size_t u = 0; u < units; u++)
        s1[u] = cnt[u] > 0 ? s1[u] / cnt[u] : NAN;
  }
  double worst_m = 0, worst_v = 0;
  for (size_t u = 0; u < units; u++) {
    double dm = fabs(s1[u] - m), dv = fabs(s2[u] / cnt[u] - v);
    if (!(dm <= worst_m))
      worst_m = isnan(dm) ? INFINITY : dm;
    if (!(dv <= worst_v))
      worst_v = isnan(dv) ? INFINITY : dv;
  }
  printf(
      "npycmp: %s: %zu units over axes %s: max |mean - %g| = %.3g, "
      "max |var - %g| = %.3g (tolerance %.3g)\n",
      pa, units, keep_s, m, worst_m, v, worst_v, tol);
  free(s1);
  free(s2);
  free(cnt);
  sbn_npy_free(&a);
  return worst_m <= tol && worst_v <= tol ? 0 : 1;
}

static int dropout(const char *px, const char *py, double p, double tol) {
  sbn_npy_t x, y;
  if (load(px, &x) != 0)
    return 2;
  if (load(py, &y) != 0) {
    sbn_npy_free(&x);
    return 2;
  }
  size_t nz = 0, zeroed = 0, bad = 0;
  double scale = p < 1 ? 1.0 / (1.0 - p) : 0.0;
  for (size_t i = 0; i < x.numel && x.numel == y.numel; i++) {
    if (x.data[i] == 0)
      continue;
    nz++;
    if (y.data[i] == 0)
      zeroed++;
    else if (fabs(y.data[i] - x.data[i] * scale) >
             tol * fabs(x.data[i] * scale))
      bad++;
  }
  double frac = nz ? (double)zeroed / (double)nz : 0;
  printf(
      "npycmp: dropout %s -> %s: zeroed %.4f (p %g), %zu values not "
      "x/(1-p)\n",
      px, py, frac, p, bad);
  int ok = x.numel == y.numel && bad == 0 && fabs(frac - p) <= 0.05;
  sbn_npy_free(&x);
  sbn_npy_free(&y);
  return ok ? 0 : 1;
}

int main(int argc, char **argv) {
  if (argc == 4 && argv[1][0] != '-')
    return cmp(argv[1], argv[2], atof(argv[3]));
  if (argc == 4 && strcmp(argv[1], "--shape") == 0)
    return shape(argv[2], argv[3]);
  if (argc == 7 && strcmp(argv[1], "--moments") == 0)
    return moments(argv[2], argv[3], atof(argv[4]), atof(argv[5]),
                   atof(argv[6]));
  if (argc == 6 && strcmp(argv[1], "--dropout") == 0)
    return dropout(argv[2], argv[3], atof(argv[4]), atof(argv[5]));
  fprintf(stderr,
          "usage: npycmp A.npy B.npy TOL\n"
          "       npycmp --shape A.npy d0,d1,...\n"
          "       npycmp --moments A.npy KEEP_AXES MEAN VAR TOL\n"
          "       npycmp --dropout X.npy Y.npy P TOL\n");
  return 2;
}
