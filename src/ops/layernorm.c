/* LayerNorm over the trailing K dims: each row of D = prod(normalized
 * shape) contiguous elements has its own statistics, and the affine
 * parameters have the normalized shape (one weight per row element). Train
 * and eval are the same computation. It never communicates. */
#include <math.h>

#include "ops/sbn_ops.h"

/* Rows are processed in chunks so the per-row arrays stay a fixed size. */
#define SBN__LN_CHUNK 256
/* Forward normalizes a chunk of rows right after their statistics, while
 * the chunk is still in cache: then x comes from memory once. A set's
 * ln_forward_rows takes the chunk column block by column block, loading
 * each block of the row-sized w and b once for all its rows, so the chunk
 * is more than one row wherever rows are under 2 MiB: measured (same-run
 * A/B, 4-5 alternating runs over the 12 default shapes) the median floor
 * ratio was 1.32-1.39 with 2 MiB chunks against 1.47-1.50 with 256 KiB (a
 * quarter of the L2, the chunk of the row-by-row form), and no better
 * at 1, 4 or 8 MiB. */
#define SBN__LN_CHUNK_BYTES ((size_t)2 << 20)

/* Row by row (a set without ln_forward_rows), a chunk keeps to a quarter
 * of the core's L2 (1 MiB here), which leaves room for y. */
#define SBN__LN_L2_BYTES ((size_t)256 << 10)

/* Rows per forward chunk: as many as fit `bytes`, at least one. */
static size_t ln_chunk_rows(size_t D, size_t bytes) {
  size_t r = bytes / sizeof(float) / (D > 0 ? D : 1);
  return r < 1 ? 1 : (r > SBN__LN_CHUNK ? SBN__LN_CHUNK : r);
}

static int ln_validate(const sbn_layer_params_t *p) {
  int rc;
  if ((rc = sbn__check_eps(p)) != 0)
    return rc;
  if (p->norm_ndim < 1 || p->norm_ndim > SBN_MAX_DIMS)
    return sbn_set_error(SBN_EINVAL, "norm_ndim: %d is outside [1, %d]",
                         p->norm_ndim, SBN_MAX_DIMS);
  size_t d = 1;
  for (int i = 0; i < p->norm_ndim; i++) {
    if (p->norm_shape[i] == 0)
      return sbn_set_error(SBN_EINVAL, "norm_shape[%d]: must be positive", i);
    if (sbn__mul_size(d, p->norm_shape[i], &d) != 0)
      return sbn_set_error(SBN_EOVERFLOW,
                           "norm_shape: the size overflows size_t");
  }
  return 0;
}

/* A plain array whose trailing dims equal the normalized shape: the rows
 * are the leading dims, the row length D their product. */
static int ln_shape(const sbn_layer_params_t *p, const sbn_tensor_desc_t *d,
                    sbn__shape_t *sh) {
  int rc;
  if ((rc = sbn__shape_plain("layernorm", d, sh)) != 0)
    return rc;
  if (d->ndim < p->norm_ndim)
    return sbn_set_error(SBN_ESHAPE,
                         "x_desc.ndim: %d dims cannot hold a normalized "
                         "shape of %d dims",
                         d->ndim, p->norm_ndim);
  size_t D = 1, N = 1;
  int lead = d->ndim - p->norm_ndim;
  for (int i = 0; i < p->norm_ndim; i++) {
    if (d->dims[lead + i] != p->norm_shape[i])
      return sbn_set_error(SBN_ESHAPE,
                           "x_desc.dims[%d]: %zu differs from "
                           "normalized shape[%d] = %zu",
                           lead + i, d->dims[lead + i], i, p->norm_shape[i]);
    D *= p->norm_shape[i];
  }
  for (int i = 0; i < lead; i++)
    N *= d->dims[i];
  sh->N = N;
  sh->C = D;
  sh->S = 1;
  return 0;
}

static int ln_sizes(const sbn_layer_params_t *p, const sbn__shape_t *sh,
                    size_t *ws, size_t *saved) {
  size_t acc;
  (void)p;
  if (sbn__mul_size(sh->C, 2 * sizeof(double), &acc) != 0)
    return sbn_set_error(SBN_EOVERFLOW, "norm_shape: too large");
  /* dweight and dbias in double, then the kernels' float scratch for
   * them (half as many bytes as the doubles, so it cannot overflow). */
  *ws = sbn__chan_bytes(SBN__LN_CHUNK) + sbn__align64(acc) +
        sbn__align64(acc / 2);
  return sbn__saved_size(sh->N, saved);
}

/* The set's pipelined forward (ln_forward_pipe) over chunks of at most
 * SBN__LN_CHUNK rows, the statistics written straight to the saved state
 * (or to scratch): 1 having done so, 0 where the set has no such entry or
 * declines these rows (then nothing was written). */
static int ln_forward_pipe(const sbn__kernels_t *k, const sbn_forward_args_t *a,
                           size_t N, size_t D, double eps, const float *w,
                           const float *b, double *smean, double *sistd,
                           const sbn__chan_t *ch) {
  if (k->ln_forward_pipe == NULL)
    return 0;
  for (size_t r0 = 0; r0 < N; r0 += SBN__LN_CHUNK) {
    size_t R = N - r0 < SBN__LN_CHUNK ? N - r0 : SBN__LN_CHUNK;
    /* The set decides by the row length alone, so it declines the first
     * chunk or none. */
    if (!k->ln_forward_pipe(a->x + r0 * D, a->y + r0 * D, R, D, N * D, eps, w,
                            b, smean != NULL ? smean + r0 : ch->d1,
                            sistd != NULL ? sistd + r0 : ch->d2))
      return 0;
  }
  return 1;
}

static int ln_forward(sbn_layer_t *l, const sbn_forward_args_t *a,
                      const sbn__shape_t *sh) {
  const sbn_layer_params_t *p = &l->p;
  size_t N = sh->N, D = sh->C;
  double *smean = NULL, *sistd = NULL;
  sbn__chan_t ch;
  sbn__chan_carve(a->workspace, SBN__LN_CHUNK, &ch);
  if (a->saved != NULL)
    sbn__saved_init(a->saved, p->op, a->mode, (double)D, N, &smean, &sistd);
  const sbn__kernels_t *k = sbn__kernels();
  const float *w = p->affine ? a->weight : NULL;
  const float *b = p->affine ? a->bias : NULL;
  if (ln_forward_pipe(k, a, N, D, p->eps, w, b, smean, sistd, &ch))
    return 0;
  size_t chunk = ln_chunk_rows(
      D, k->ln_forward_rows != NULL ? SBN__LN_CHUNK_BYTES : SBN__LN_L2_BYTES);
  for (size_t r0 = 0; r0 < N; r0 += chunk) {
    size_t R = N - r0 < chunk ? N - r0 : chunk;
    /* A chunk of rows is the view (1, R, D): each row is a "channel". */
    sbn__view_moments(a->x + r0 * D, 1, R, D, &ch, ch.rec);
    for (size_t r = 0; r < R; r++) {
      double mean = ch.rec[r].v[1];
      double istd = 1.0 / sqrt(ch.rec[r].v[2] / (double)D + p->eps);
      sbn__split_mean(mean, &ch.mh[r], &ch.ml[r]);
      ch.k1[r] = (float)istd;
      if (smean != NULL) {
        smean[r0 + r] = mean;
        sistd[r0 + r] = istd;
      }
    }
    const float *x = a->x + r0 * D;
    float *y = a->y + r0 * D;
    if (k->ln_forward_rows != NULL) {
      k->ln_forward_rows(x, y, R, D, N * D, ch.mh, ch.ml, ch.k1, w, b);
      continue;
    }
    for (size_t r = 0; r < R; r++)
      k->ln_forward(x + r * D, y + r * D, D, N * D, ch.mh[r], ch.ml[r],
                    ch.k1[r], w, b);
  }
  return 0;
}

static int ln_backward(sbn_layer_t *l, const sbn_backward_args_t *a,
                       const sbn__shape_t *sh) {
  const sbn_layer_params_t *p = &l->p;
  size_t N = sh->N, D = sh->C;
  const double *mean, *istd;
  double count;
  sbn__chan_t ch;
  int rc = sbn__saved_get(a->saved, a->saved_bytes, p->op, a->mode, N, &count,
                          &mean, &istd);
  if (rc != 0)
    return rc;
  sbn__chan_carve(a->workspace, SBN__LN_CHUNK, &ch);
  double *dw =
      (double *)(void *)((char *)a->workspace + sbn__chan_bytes(SBN__LN_CHUNK));
  double *db = dw + D;
  const float *w = p->affine ? a->weight : NULL;
  const sbn__kernels_t *k = sbn__kernels();
  if (k->ln_bwd_rows != NULL) {
    /* The set writes dweight and dbias itself (its scratch needs no
     * zeroing: with few long rows, passes over these row-sized arrays
     * cost as much as the rows). */
    float *fw =
        (float *)(void *)((char *)dw + sbn__align64(2 * D * sizeof(double)));
    k->ln_bwd_rows(a->x, a->dy, a->dx, N, D, mean, istd, w, count, dw, db, fw,
                   fw + D, a->dweight, a->dbias);
    return 0;
  }
  for (size_t i = 0; i < D; i++) {
    dw[i] = 0;
    db[i] = 0;
  }
  for (size_t r = 0; r < N; r++) {
    const float *x = a->x + r * D, *dy = a->dy + r * D;
    double sums[2] = {0, 0};
    k->ln_bwd_reduce(x, dy, D, mean[r], istd[r], w, dw, db, sums);
    /* dx = istd * (w*dy - mean(w*dy) - xhat * mean(w*dy*xhat)). */
    double c2 = -istd[r] * sums[1] / count;
    double c3 = -istd[r] * sums[0] / count;
    k->ln_bwd_apply(x, dy, a->dx + r * D, D, mean[r], istd[r], w, c2, c3);
  }
  sbn__put_dwb(a, 0, D, db, dw);
  return 0;
}

const sbn__op_t sbn__op_layernorm = {
    .name = "layernorm",
    .flags = SBN__NEED_AFFINE | SBN__NEED_BWD_X,
    .validate = ln_validate,
    .shape = ln_shape,
    .sizes = ln_sizes,
    .forward = ln_forward,
    .backward = ln_backward,
};
