/* Float64 reference implementations of the normalization ops, written
 * straight from the definitions (PyTorch semantics) so that the kernels can
 * be checked against something that shares none of their code.
 *
 * Every function takes the logical shape as a tensor descriptor (N, C,
 * spatial...) and reads and writes arrays in the descriptor's memory layout
 * through ref64_index(). Inputs and outputs are double. NULL weight/bias
 * means "not affine" (weight 1, bias 0); NULL running statistics mean "not
 * tracked"; NULL gradient outputs are skipped. */
#ifndef SBN_REF64_H
#define SBN_REF64_H

#include <stddef.h>
#include <stdint.h>

#include "syncbn.h"

/* Memory offset of logical element (n, c, s), s being the flat spatial
 * index (row-major over dims[2..ndim-1]). */
size_t ref64_index(const sbn_tensor_desc_t *d, size_t n, size_t c, size_t s);
/* N, C and the spatial product of a descriptor (ndim >= 2). */
void ref64_ncs(const sbn_tensor_desc_t *d, size_t *N, size_t *C, size_t *S);

/* BatchNorm. train: batch statistics; eval with running statistics: the
 * running ones; eval without (rm == NULL): batch statistics. In training
 * with rm/rv given, updates them with momentum, or with 1/(nbt+1) if
 * cumulative, using the unbiased variance, and increments *nbt (which may
 * be NULL when not cumulative). */
void ref64_bn_forward(const sbn_tensor_desc_t *d, const double *x, double *y,
                      const double *w, const double *b, double *rm, double *rv,
                      int64_t *nbt, double eps, double momentum, int cumulative,
                      int train);
/* Backward of the above. rm/rv are the running statistics the forward
 * normalized with (eval) and are only read in eval mode. */
void ref64_bn_backward(const sbn_tensor_desc_t *d, const double *x,
                       const double *dy, double *dx, const double *w,
                       double *dw, double *db, const double *rm,
                       const double *rv, double eps, int train);

/* BatchNorm with ghost batches of g samples (g = 0: the functions
 * above): each sub-batch of g consecutive samples (the last may be
 * shorter) is normalized as a batch of its own, wherever batch statistics
 * are used; the running statistics become the mean over the sub-batches
 * of the states that a BatchNorm per sub-batch reaches from the same
 * start, and *nbt (may be NULL) gains 1 per step. dw and db (not NULL)
 * are summed over the sub-batches. */
void ref64_bn_ghost_forward(const sbn_tensor_desc_t *d, size_t g,
                            const double *x, double *y, const double *w,
                            const double *b, double *rm, double *rv,
                            int64_t *nbt, double eps, double momentum,
                            int cumulative, int train);
void ref64_bn_ghost_backward(const sbn_tensor_desc_t *d, size_t g,
                             const double *x, const double *dy, double *dx,
                             const double *w, double *dw, double *db,
                             const double *rm, const double *rv, double eps,
                             int train);

/* LayerNorm over the trailing k dims of a plain C-order array of numel
 * elements whose last k dims have product D. w and b have D elements. */
void ref64_ln_forward(size_t numel, size_t D, const double *x, double *y,
                      const double *w, const double *b, double eps);
void ref64_ln_backward(size_t numel, size_t D, const double *x,
                       const double *dy, double *dx, const double *w,
                       double *dw, double *db, double eps);

/* InstanceNorm: statistics per (n, c). With rm/rv and train, the running
 * statistics are updated with the mean over the batch of the per-instance
 * mean and of the per-instance unbiased variance. In eval with rm/rv the
 * running statistics normalize. */
void ref64_in_forward(const sbn_tensor_desc_t *d, const double *x, double *y,
                      const double *w, const double *b, double *rm, double *rv,
                      double eps, double momentum, int train);
void ref64_in_backward(const sbn_tensor_desc_t *d, const double *x,
                       const double *dy, double *dx, const double *w,
                       double *dw, double *db, const double *rm,
                       const double *rv, double eps, int train);

/* GroupNorm with G groups of C/G consecutive channels, per-channel affine. */
void ref64_gn_forward(const sbn_tensor_desc_t *d, size_t G, const double *x,
                      double *y, const double *w, const double *b, double eps);
void ref64_gn_backward(const sbn_tensor_desc_t *d, size_t G, const double *x,
                       const double *dy, double *dx, const double *w,
                       double *dw, double *db, double eps);

/* An independent Philox4x32-10 (Salmon et al., SC'11). */
void ref64_philox(const uint32_t ctr[4], const uint32_t key[2],
                  uint32_t out[4]);
/* 1 if element i of a dropout with these parameters is dropped, following
 * the rule documented in syncbn.h. */
int ref64_dropped(size_t i, double p, uint32_t seed, uint32_t rank,
                  uint32_t layer_id, uint64_t step);

#endif /* SBN_REF64_H */
