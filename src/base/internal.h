/* Internal declarations shared by the kernel library's files. Not installed.
 */
#ifndef SBN_INTERNAL_H
#define SBN_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "syncbn.h"

/* Overflow-checked size_t arithmetic: 0 on success, SBN_EOVERFLOW if not. */
int sbn__mul_size(size_t a, size_t b, size_t *out);

/* ------------------------------------------------------------------ */
/* Kernel table.
 *
 * Every op is written in terms of a few loops over a three-level view
 * (A, C, S) of a contiguous array: element (a, c, s) sits at
 * (a * C + c) * S + s, and per-"channel" c parameters apply. This one view
 * covers every op and layout:
 *   BN  NCHW: (N, C, spatial)        BN NHWC: (N * spatial, C, 1)
 *   IN  NCHW, one sample: (1, C, spatial)      NHWC: (spatial, C, 1)
 *   GN  NCHW, one sample: (1, C, spatial) with per-channel group params
 *   GN  NHWC, one sample: (spatial, C, 1)
 * The reference kernels are portable C; optimized sets override entries.
 */
typedef struct sbn__kernels_s {
  const char *name;
  /* Shifted sums over (a, s) per channel c, added into s1[c] and s2[c]:
   * s1 += sum(x - k[c]), s2 += sum((x - k[c])^2), in double. */
  void (*moments)(const float *x, size_t A, size_t C, size_t S, const float *k,
                  double *s1, double *s2);
  /* y = ((x - mh[c]) - ml[c]) * scale[c] + shift[c]. */
  void (*normalize)(const float *x, float *y, size_t A, size_t C, size_t S,
                    const float *mh, const float *ml, const float *scale,
                    const float *shift);
  /* xhat = (x - mean[c]) * istd[c] in double; adds sum(dy) into sdy[c]
   * and sum(dy * xhat) into sdyx[c], in double. dx depends on these sums
   * to far below fp32 precision when it is small (see bwd_apply). */
  void (*bwd_reduce)(const float *x, const float *dy, size_t A, size_t C,
                     size_t S, const double *mean, const double *istd,
                     double *sdy, double *sdyx);
  /* dx = k1[c] * dy + k2[c] * xhat + k3[c] with xhat = (x - mean[c]) *
   * istd[c], all in double and rounded once. The three terms nearly cancel
   * when eps is small against the variance of a small set (two values per
   * statistic: dx is about eps/var times dy), so fp32 here would lose
   * every digit of dx. */
  void (*bwd_apply)(const float *x, const float *dy, float *dx, size_t A,
                    size_t C, size_t S, const double *mean, const double *istd,
                    const double *k1, const double *k2, const double *k3);
  /* LayerNorm rows (D contiguous elements with per-element affine; w and
   * b are NULL without affine): y = xhat * w + b. */
  void (*ln_forward)(const float *x, float *y, size_t D, float mh, float ml,
                     float istd, const float *w, const float *b);
  /* Adds sum(g) and sum(g * xhat) with g = dy * w into sums[0], sums[1],
   * and dy * xhat, dy into dw[i], db[i]; xhat and the sums in double. */
  void (*ln_bwd_reduce)(const float *x, const float *dy, size_t D, double mean,
                        double istd, const float *w, double *dw, double *db,
                        double sums[2]);
  /* dx = istd * w * dy + (c2 * xhat + c3), in double like bwd_apply. */
  void (*ln_bwd_apply)(const float *x, const float *dy, float *dx, size_t D,
                       double mean, double istd, const float *w, double c2,
                       double c3);
  /* Dropout of n elements starting at element index `first` (a multiple
   * of 4): out = word < thr ? 0 : in * scale, with the Philox words of
   * sbn_philox4x32_10 for counter (block, step, layer) and key. thr < 2^32
   * (p = 1 is handled by the caller). */
  void (*dropout)(const float *in, float *out, size_t n, uint64_t first,
                  const uint32_t key[2], uint32_t step, uint32_t layer,
                  uint32_t thr, float scale);
} sbn__kernels_t;

extern const sbn__kernels_t sbn__kernels_ref;
void sbn__dropout_ref(const float *in, float *out, size_t n, uint64_t first,
                      const uint32_t key[2], uint32_t step, uint32_t layer,
                      uint32_t thr, float scale);
#if defined(__x86_64__) && defined(__GNUC__) && !defined(SBN_NO_AVX2)
#define SBN__HAVE_AVX2 1
extern const sbn__kernels_t sbn__kernels_avx2;
#endif

/* The kernel set in use (chosen on first use from the CPU's features). */
const sbn__kernels_t *sbn__kernels(void);

/* ------------------------------------------------------------------ */
/* Per-channel statistics shared by the ops. */

/* Turns a mean in double into the hi + lo float pair the kernels subtract,
 * so that x - mean is carried out above fp32 precision. */
void sbn__split_mean(double mean, float *hi, float *lo);

/* Finishes shifted sums into (n, mean, M2): mean = k + s1/n,
 * M2 = s2 - s1^2/n clamped at 0 (a NaN stays NaN). */
void sbn__moments_finish(double n, double k, double s1, double s2,
                         sbn_rec_t *rec);

/* Per-channel parameter arrays carved out of the workspace. */
typedef struct sbn__chan_s {
  float *mh, *ml, *k1, *k2, *k;
  double *d1, *d2, *d3, *d4;
  /* Backward's dx parameters, kept in double (see bwd_apply). */
  double *dmean, *distd, *dk1, *dk2, *dk3;
  sbn_rec_t *rec;
} sbn__chan_t;

/* Bytes of workspace for per-channel arrays of C channels (64-byte
 * aligned pieces). */
size_t sbn__chan_bytes(size_t C);
/* Carves the arrays out of ws (which holds at least sbn__chan_bytes(C)). */
void sbn__chan_carve(void *ws, size_t C, sbn__chan_t *ch);

/* Computes per-channel moments of the (A, C, S) view into recs[c] using
 * the first element of each channel as the shift. Uses ch->k, d1, d2. */
void sbn__view_moments(const float *x, size_t A, size_t C, size_t S,
                       sbn__chan_t *ch, sbn_rec_t *recs);

/* ------------------------------------------------------------------ */
/* Layers */

struct sbn_layer_s {
  sbn_layer_params_t p;
  sbn_comm_t *comm;
};

/* Shape facts derived from a descriptor once per call. */
typedef struct sbn__shape_s {
  size_t N; /* batch (LN: number of rows) */
  size_t C; /* channels (LN: row length D) */
  size_t S; /* spatial product */
  size_t numel;
  sbn_layout_t layout;
} sbn__shape_t;

/* Validates x_desc for the layer and fills shape. */
int sbn__check_shape(const sbn_layer_t *l, const sbn_tensor_desc_t *d,
                     sbn__shape_t *sh);

/* Per-op sizes and entry points (dispatched from layer.c). */
int sbn__bn_sizes(const sbn_layer_t *l, const sbn__shape_t *sh, size_t *ws,
                  size_t *saved);
int sbn__in_sizes(const sbn_layer_t *l, const sbn__shape_t *sh, size_t *ws,
                  size_t *saved);
int sbn__gn_sizes(const sbn_layer_t *l, const sbn__shape_t *sh, size_t *ws,
                  size_t *saved);
int sbn__ln_sizes(const sbn_layer_t *l, const sbn__shape_t *sh, size_t *ws,
                  size_t *saved);

int sbn__bn_forward(sbn_layer_t *l, const sbn_forward_args_t *a,
                    const sbn__shape_t *sh);
int sbn__bn_backward(sbn_layer_t *l, const sbn_backward_args_t *a,
                     const sbn__shape_t *sh);
int sbn__in_forward(sbn_layer_t *l, const sbn_forward_args_t *a,
                    const sbn__shape_t *sh);
int sbn__in_backward(sbn_layer_t *l, const sbn_backward_args_t *a,
                     const sbn__shape_t *sh);
int sbn__gn_forward(sbn_layer_t *l, const sbn_forward_args_t *a,
                    const sbn__shape_t *sh);
int sbn__gn_backward(sbn_layer_t *l, const sbn_backward_args_t *a,
                     const sbn__shape_t *sh);
int sbn__ln_forward(sbn_layer_t *l, const sbn_forward_args_t *a,
                    const sbn__shape_t *sh);
int sbn__ln_backward(sbn_layer_t *l, const sbn_backward_args_t *a,
                     const sbn__shape_t *sh);
int sbn__dropout_forward(sbn_layer_t *l, const sbn_forward_args_t *a,
                         const sbn__shape_t *sh);
int sbn__dropout_backward(sbn_layer_t *l, const sbn_backward_args_t *a,
                          const sbn__shape_t *sh);

/* Checks the common buffer arguments of a forward/backward call: non-NULL
 * data pointers, workspace and saved sizes against what the shape needs. */
int sbn__check_fwd_buffers(const sbn_layer_t *l, const sbn_forward_args_t *a,
                           const sbn__shape_t *sh);
int sbn__check_bwd_buffers(const sbn_layer_t *l, const sbn_backward_args_t *a,
                           const sbn__shape_t *sh);

/* The saved buffer starts with this header so backward can check that it
 * got the state of a forward of the same op, mode and shape. */
#define SBN__SAVED_MAGIC 0x73626e31u /* "sbn1" */
typedef struct sbn__saved_hdr_s {
  uint32_t magic;
  uint32_t op;
  uint32_t mode;
  uint32_t pad;
  double count;   /* the (global) element count per statistic */
  uint64_t items; /* number of statistics that follow (mean, istd pairs) */
  uint64_t pad2;
} sbn__saved_hdr_t;

/* Size of a saved buffer holding `items` (mean, istd) pairs in double. */
int sbn__saved_size(size_t items, size_t *bytes);
/* Writes the header and returns the mean and istd arrays. */
void sbn__saved_init(void *saved, const sbn_layer_t *l, sbn_mode_t mode,
                     double count, size_t items, double **mean, double **istd);
/* Checks a saved buffer against the layer, mode and item count. */
int sbn__saved_get(const void *saved, size_t bytes, const sbn_layer_t *l,
                   sbn_mode_t mode, size_t items, double *count,
                   const double **mean, const double **istd);

/* Writes the concatenation of parts to path atomically: a temporary file
 * in the same directory (created with the given mode), then rename(). With
 * durable, the data and the directory entry are fsync'ed too. On failure
 * the old file is untouched and the temporary file removed. */
int sbn__write_file_atomic(const char *path, const void *const *parts,
                           const size_t *lens, int nparts, unsigned mode,
                           int durable);

/* Rounds n up to a multiple of 64 bytes, for carving workspace. */
static inline size_t sbn__align64(size_t n) {
  return (n + 63) & ~(size_t)63;
}

#endif /* SBN_INTERNAL_H */
