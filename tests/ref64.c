/* Float64 reference implementations; see ref64.h. Deliberately plain:
 * every statistic is gathered into a list of element offsets and computed
 * with a two-pass mean and variance in double, so the code has nothing in
 * common with the library's shifted, vectorized kernels. */
#include "ref64.h"

#include <math.h>
#include <stdlib.h>

size_t ref64_index(const sbn_tensor_desc_t *d, size_t n, size_t c, size_t s) {
  size_t N, C, S;
  ref64_ncs(d, &N, &C, &S);
  (void)N;
  if (d->layout == SBN_LAYOUT_NHWC)
    return (n * S + s) * C + c;
  return (n * C + c) * S + s;
}

void ref64_ncs(const sbn_tensor_desc_t *d, size_t *N, size_t *C, size_t *S) {
  *N = d->dims[0];
  *C = d->ndim > 1 ? d->dims[1] : 1;
  *S = 1;
  for (int i = 2; i < d->ndim; i++)
    *S *= d->dims[i];
}

/* One statistic: m elements at offsets off[], element j belonging to
 * channel ch[j] for the affine parameters. */
typedef struct {
  size_t m;
  size_t *off;
  size_t *ch;
} set_t;

static void set_stats(const set_t *st, const double *x, double *mean,
                      double *var) {
  double s = 0, q = 0;
  for (size_t j = 0; j < st->m; j++)
    s += x[st->off[j]];
  *mean = st->m ? s / (double)st->m : 0;
  for (size_t j = 0; j < st->m; j++) {
    double t = x[st->off[j]] - *mean;
    q += t * t;
  }
  *var = st->m ? q / (double)st->m : 0; /* biased */
}

static double wv(const double *w, size_t c) {
  return w ? w[c] : 1.0;
}
static double bv(const double *b, size_t c) {
  return b ? b[c] : 0.0;
}

static void set_normalize(const set_t *st, const double *x, double *y,
                          const double *w, const double *b, double mean,
                          double var, double eps) {
  double istd = 1.0 / sqrt(var + eps);
  for (size_t j = 0; j < st->m; j++) {
    size_t o = st->off[j], c = st->ch[j];
    y[o] = (x[o] - mean) * istd * wv(w, c) + bv(b, c);
  }
}

/* Backward through batch statistics of this set: with g = dy * w and
 * xhat = (x - mean) * istd, dx = istd * (g - mean(g) - xhat * mean(g xhat)).
 * dw and db (indexed by channel) are accumulated. */
static void set_backward_batch(const set_t *st, const double *x,
                               const double *dy, double *dx, const double *w,
                               double *dw, double *db, double eps) {
  double mean, var;
  set_stats(st, x, &mean, &var);
  double istd = 1.0 / sqrt(var + eps);
  double sg = 0, sgx = 0;
  for (size_t j = 0; j < st->m; j++) {
    size_t o = st->off[j], c = st->ch[j];
    double xh = (x[o] - mean) * istd;
    double g = dy[o] * wv(w, c);
    sg += g;
    sgx += g * xh;
    if (dw)
      dw[c] += dy[o] * xh;
    if (db)
      db[c] += dy[o];
  }
  double mg = sg / (double)st->m, mgx = sgx / (double)st->m;
  if (dx) {
    for (size_t j = 0; j < st->m; j++) {
      size_t o = st->off[j], c = st->ch[j];
      double xh = (x[o] - mean) * istd;
      dx[o] = istd * (dy[o] * wv(w, c) - mg - xh * mgx);
    }
  }
}

/* Backward through fixed statistics (eval with running statistics). */
static void set_backward_fixed(const set_t *st, const double *x,
                               const double *dy, double *dx, const double *w,
                               double *dw, double *db, double mean, double var,
                               double eps) {
  double istd = 1.0 / sqrt(var + eps);
  for (size_t j = 0; j < st->m; j++) {
    size_t o = st->off[j], c = st->ch[j];
    if (dx)
      dx[o] = dy[o] * wv(w, c) * istd;
    if (dw)
      dw[c] += dy[o] * (x[o] - mean) * istd;
    if (db)
      db[c] += dy[o];
  }
}

static int set_alloc(set_t *st, size_t m) {
  st->m = 0;
  st->off = malloc((m ? m : 1) * sizeof *st->off);
  st->ch = malloc((m ? m : 1) * sizeof *st->ch);
  if (!st->off || !st->ch)
    abort();
  return 0;
}

static void set_free(set_t *st) {
  free(st->off);
  free(st->ch);
}

static void set_add(set_t *st, size_t off, size_t c) {
  st->off[st->m] = off;
  st->ch[st->m] = c;
  st->m++;
}

/* Gathers the elements of channel c over the whole batch (BatchNorm). */
static void bn_set(const sbn_tensor_desc_t *d, size_t c, set_t *st) {
  size_t N, C, S;
  ref64_ncs(d, &N, &C, &S);
  st->m = 0;
  for (size_t n = 0; n < N; n++)
    for (size_t s = 0; s < S; s++)
      set_add(st, ref64_index(d, n, c, s), c);
}

/* Gathers instance (n, c) (InstanceNorm). */
static void in_set(const sbn_tensor_desc_t *d, size_t n, size_t c, set_t *st) {
  size_t N, C, S;
  ref64_ncs(d, &N, &C, &S);
  st->m = 0;
  for (size_t s = 0; s < S; s++)
    set_add(st, ref64_index(d, n, c, s), c);
}

/* Gathers group g of sample n (GroupNorm). */
static void gn_set(const sbn_tensor_desc_t *d, size_t G, size_t n, size_t g,
                   set_t *st) {
  size_t N, C, S;
  ref64_ncs(d, &N, &C, &S);
  size_t cg = C / G;
  st->m = 0;
  for (size_t c = g * cg; c < (g + 1) * cg; c++)
    for (size_t s = 0; s < S; s++)
      set_add(st, ref64_index(d, n, c, s), c);
}

static void zero(double *a, size_t n) {
  if (a)
    for (size_t i = 0; i < n; i++)
      a[i] = 0;
}

void ref64_bn_forward(const sbn_tensor_desc_t *d, const double *x, double *y,
                      const double *w, const double *b, double *rm, double *rv,
                      int64_t *nbt, double eps, double momentum, int cumulative,
                      int train) {
  size_t N, C, S;
  set_t st;
  ref64_ncs(d, &N, &C, &S);
  set_alloc(&st, N * S);
  double f = momentum;
  if (train && rm && nbt) {
    *nbt += 1;
    if (cumulative)
      f = 1.0 / (double)*nbt;
  }
  for (size_t c = 0; c < C; c++) {
    double mean, var;
    bn_set(d, c, &st);
    if (train || !rm) {
      set_stats(&st, x, &mean, &var);
      if (train && rm && st.m > 0) {
        double uv = st.m > 1 ? var * (double)st.m / (double)(st.m - 1) : NAN;
        rm[c] = (1 - f) * rm[c] + f * mean;
        rv[c] = (1 - f) * rv[c] + f * uv;
      }
    } else {
      mean = rm[c];
      var = rv[c];
    }
    set_normalize(&st, x, y, w, b, mean, var, eps);
  }
  set_free(&st);
}

void ref64_bn_backward(const sbn_tensor_desc_t *d, const double *x,
                       const double *dy, double *dx, const double *w,
                       double *dw, double *db, const double *rm,
                       const double *rv, double eps, int train) {
  size_t N, C, S;
  set_t st;
  ref64_ncs(d, &N, &C, &S);
  set_alloc(&st, N * S);
  zero(dw, C);
  zero(db, C);
  for (size_t c = 0; c < C; c++) {
    bn_set(d, c, &st);
    if (train || !rm)
      set_backward_batch(&st, x, dy, dx, w, dw, db, eps);
    else
      set_backward_fixed(&st, x, dy, dx, w, dw, db, rm[c], rv[c], eps);
  }
  set_free(&st);
}

void ref64_ln_forward(size_t numel, size_t D, const double *x, double *y,
                      const double *w, const double *b, double eps) {
  set_t st;
  set_alloc(&st, D);
  for (size_t r = 0; r < numel / D; r++) {
    double mean, var;
    st.m = 0;
    for (size_t j = 0; j < D; j++)
      set_add(&st, r * D + j, j);
    set_stats(&st, x, &mean, &var);
    set_normalize(&st, x, y, w, b, mean, var, eps);
  }
  set_free(&st);
}

void ref64_ln_backward(size_t numel, size_t D, const double *x,
                       const double *dy, double *dx, const double *w,
                       double *dw, double *db, double eps) {
  set_t st;
  set_alloc(&st, D);
  zero(dw, D);
  zero(db, D);
  for (size_t r = 0; r < numel / D; r++) {
    st.m = 0;
    for (size_t j = 0; j < D; j++)
      set_add(&st, r * D + j, j);
    set_backward_batch(&st, x, dy, dx, w, dw, db, eps);
  }
  set_free(&st);
}

void ref64_in_forward(const sbn_tensor_desc_t *d, const double *x, double *y,
                      const double *w, const double *b, double *rm, double *rv,
                      double eps, double momentum, int train) {
  size_t N, C, S;
  set_t st;
  ref64_ncs(d, &N, &C, &S);
  set_alloc(&st, S);
  for (size_t c = 0; c < C; c++) {
    double sm = 0, sv = 0;
    for (size_t n = 0; n < N; n++) {
      double mean, var;
      in_set(d, n, c, &st);
      if (train || !rm) {
        set_stats(&st, x, &mean, &var);
        sm += mean;
        sv += S > 1 ? var * (double)S / (double)(S - 1) : NAN;
      } else {
        mean = rm[c];
        var = rv[c];
      }
      set_normalize(&st, x, y, w, b, mean, var, eps);
    }
    if (train && rm && N > 0) {
      rm[c] = (1 - momentum) * rm[c] + momentum * sm / (double)N;
      rv[c] = (1 - momentum) * rv[c] + momentum * sv / (double)N;
    }
  }
  set_free(&st);
}

void ref64_in_backward(const sbn_tensor_desc_t *d, const double *x,
                       const double *dy, double *dx, const double *w,
                       double *dw, double *db, const double *rm,
                       const double *rv, double eps, int train) {
  size_t N, C, S;
  set_t st;
  ref64_ncs(d, &N, &C, &S);
  set_alloc(&st, S);
  zero(dw, C);
  zero(db, C);
  for (size_t c = 0; c < C; c++)
    for (size_t n = 0; n < N; n++) {
      in_set(d, n, c, &st);
      if (train || !rm)
        set_backward_batch(&st, x, dy, dx, w, dw, db, eps);
      else
        set_backward_fixed(&st, x, dy, dx, w, dw, db, rm[c], rv[c], eps);
    }
  set_free(&st);
}

void ref64_gn_forward(const sbn_tensor_desc_t *d, size_t G, const double *x,
                      double *y, const double *w, const double *b, double eps) {
  size_t N, C, S;
  set_t st;
  ref64_ncs(d, &N, &C, &S);
  set_alloc(&st, (C / G) * S);
  for (size_t n = 0; n < N; n++)
    for (size_t g = 0; g < G; g++) {
      double mean, var;
      gn_set(d, G, n, g, &st);
      set_stats(&st, x, &mean, &var);
      set_normalize(&st, x, y, w, b, mean, var, eps);
    }
  set_free(&st);
}

void ref64_gn_backward(const sbn_tensor_desc_t *d, size_t G, const double *x,
                       const double *dy, double *dx, const double *w,
                       double *dw, double *db, double eps) {
  size_t N, C, S;
  set_t st;
  ref64_ncs(d, &N, &C, &S);
  set_alloc(&st, (C / G) * S);
  zero(dw, C);
  zero(db, C);
  for (size_t n = 0; n < N; n++)
    for (size_t g = 0; g < G; g++) {
      gn_set(d, G, n, g, &st);
      set_backward_batch(&st, x, dy, dx, w, dw, db, eps);
    }
  set_free(&st);
}

/* Philox4x32-10 round constants from Random123. */
#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u

void ref64_philox(const uint32_t ctr[4], const uint32_t key[2],
                  uint32_t out[4]) {
  uint32_t c0 = ctr[0], c1 = ctr[1], c2 = ctr[2], c3 = ctr[3];
  uint32_t k0 = key[0], k1 = key[1];
  for (int r = 0; r < 10; r++) {
    uint64_t p0 = (uint64_t)PHILOX_M0 * c0;
    uint64_t p1 = (uint64_t)PHILOX_M1 * c2;
    uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0;
    uint32_t n1 = (uint32_t)p1;
    uint32_t n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1;
    uint32_t n3 = (uint32_t)p0;
    c0 = n0;
    c1 = n1;
    c2 = n2;
    c3 = n3;
    k0 += PHILOX_W0;
    k1 += PHILOX_W1;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

int ref64_dropped(size_t i, double p, uint32_t seed, uint32_t rank,
                  uint32_t layer_id, uint64_t step) {
  uint64_t block = (uint64_t)i / 4;
  uint32_t ctr[4] = {(uint32_t)block, (uint32_t)(block >> 32), (uint32_t)step,
                     layer_id};
  uint32_t key[2] = {seed, rank};
  uint32_t out[4];
  ref64_philox(ctr, key, out);
  /* The threshold p * 2^32 is truncated to a 64-bit integer, so p = 1
   * gives 2^32, above every word. */
  uint64_t thr = (uint64_t)(p * 4294967296.0);
  return (uint64_t)out[i % 4] < thr;
}

/* Ghost batches, from their definition: sub-batch j is the slice of
 * samples [j*g, min(N, j*g+g)), a tensor of the same layout on its own (a
 * sample is contiguous in both layouts), normalized by plain BatchNorm.
 * The running statistics are the average of the states that one BatchNorm
 * per sub-batch reaches from the same start. */
void ref64_bn_ghost_forward(const sbn_tensor_desc_t *d, size_t g,
                            const double *x, double *y, const double *w,
                            const double *b, double *rm, double *rv,
                            int64_t *nbt, double eps, double momentum,
                            int cumulative, int train) {
  size_t N, C, S;
  ref64_ncs(d, &N, &C, &S);
  if (g == 0 || (!train && rm != NULL)) {
    ref64_bn_forward(d, x, y, w, b, rm, rv, nbt, eps, momentum, cumulative,
                     train);
    return;
  }
  size_t nsub = N == 0 ? 0 : (N - 1) / g + 1;
  double *am = calloc(C + 1, sizeof *am), *av = calloc(C + 1, sizeof *av);
  double *tm = calloc(C + 1, sizeof *tm), *tv = calloc(C + 1, sizeof *tv);
  for (size_t j = 0; j < nsub; j++) {
    sbn_tensor_desc_t dj = *d;
    size_t off = j * g * C * S;
    dj.dims[0] = N - j * g < g ? N - j * g : g;
    int64_t tn = nbt != NULL ? *nbt : 0;
    for (size_t c = 0; c < C && rm != NULL; c++) {
      tm[c] = rm[c];
      tv[c] = rv[c];
    }
    ref64_bn_forward(&dj, x + off, y + off, w, b, rm ? tm : NULL,
                     rm ? tv : NULL, &tn, eps, momentum, cumulative, train);
    for (size_t c = 0; c < C; c++) {
      am[c] += tm[c];
      av[c] += tv[c];
    }
  }
  if (rm != NULL && nsub > 0 && S > 0) {
    for (size_t c = 0; c < C; c++) {
      rm[c] = am[c] / (double)nsub;
      rv[c] = av[c] / (double)nsub;
    }
    if (nbt != NULL)
      *nbt += 1;
  }
  free(am), free(av), free(tm), free(tv);
}

void ref64_bn_ghost_backward(const sbn_tensor_desc_t *d, size_t g,
                             const double *x, const double *dy, double *dx,
                             const double *w, double *dw, double *db,
                             const double *rm, const double *rv, double eps,
                             int train) {
  size_t N, C, S;
  ref64_ncs(d, &N, &C, &S);
  if (g == 0 || (!train && rm != NULL)) {
    ref64_bn_backward(d, x, dy, dx, w, dw, db, rm, rv, eps, train);
    return;
  }
  size_t nsub = N == 0 ? 0 : (N - 1) / g + 1;
  double *tw = calloc(C + 1, sizeof *tw), *tb = calloc(C + 1, sizeof *tb);
  for (size_t c = 0; c < C; c++)
    dw[c] = db[c] = 0;
  for (size_t j = 0; j < nsub; j++) {
    sbn_tensor_desc_t dj = *d;
    size_t off = j * g * C * S;
    dj.dims[0] = N - j * g < g ? N - j * g : g;
    ref64_bn_backward(&dj, x + off, dy + off, dx + off, w, tw, tb, NULL, NULL,
                      eps, 1);
    for (size_t c = 0; c < C; c++) {
      dw[c] += tw[c];
      db[c] += tb[c];
    }
  }
  free(tw), free(tb);
}
