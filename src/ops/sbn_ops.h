/* The ops room of the kernel library: one row per op, the table that
 * indexes them, and the per-channel helpers the normalization ops share.
 * Ops compute on arguments the front door (layer.c) has checked; they call
 * down into the kernels and base rooms only. Not installed. */
#ifndef SBN_OPS_H
#define SBN_OPS_H

#include "base/sbn_base.h"
#include "kernels/sbn_kernels.h"

/* ------------------------------------------------------------------ */
/* Op rows (in the manner of ggml's op tables and Open MPI's coll
 * vtables): each op file defines exactly one, and the front door does
 * nothing per op but call through it. */

typedef struct sbn__op_s {
  /* The op's name, as sbn_op_name() returns and sbn_op_parse() reads. */
  const char *name;
  /* SBN__NEED_* flags: what the op's arguments must provide. */
  unsigned flags;
  /* Sets the op's own defaults on top of the shared ones; NULL if the
   * shared defaults are all it has. */
  void (*defaults)(sbn_layer_params_t *p);
  /* Validates the parameters the op reads (params.op is already known to
   * be this op); NULL if it reads none that can be wrong. */
  int (*validate)(const sbn_layer_params_t *p);
  /* Validates x_desc for a layer with these parameters and fills sh. */
  int (*shape)(const sbn_layer_params_t *p, const sbn_tensor_desc_t *d,
               sbn__shape_t *sh);
  /* Workspace and saved bytes for a validated shape; NULL if the op needs
   * neither. */
  int (*sizes)(const sbn_layer_params_t *p, const sbn__shape_t *sh, size_t *ws,
               size_t *saved);
  /* The computation, on arguments checked against shape and sizes. */
  int (*forward)(sbn_layer_t *l, const sbn_forward_args_t *a,
                 const sbn__shape_t *sh);
  int (*backward)(sbn_layer_t *l, const sbn_backward_args_t *a,
                  const sbn__shape_t *sh);
} sbn__op_t;

extern const sbn__op_t sbn__op_batchnorm;
extern const sbn__op_t sbn__op_layernorm;
extern const sbn__op_t sbn__op_instancenorm;
extern const sbn__op_t sbn__op_groupnorm;
extern const sbn__op_t sbn__op_dropout;

/* The rows indexed by sbn_op_t (ops/ops.c); every entry is set. */
extern const sbn__op_t *const sbn__ops[SBN_OP_COUNT];

/* The row for op, or NULL when op is not an sbn_op_t value. */
const sbn__op_t *sbn__op(sbn_op_t op);

/* The shape of x for the layer's op and the buffers and arguments a call
 * on it needs: what the front door and the BatchNorm seam check before
 * the argument checks of base/args.c. */
int sbn__op_need(const sbn_layer_t *l, const sbn_tensor_desc_t *x,
                 sbn__shape_t *sh, sbn__need_t *need);

/* Checks of parameters that several ops share (ops/ops.c). */
int sbn__check_eps(const sbn_layer_params_t *p);
/* momentum in [0, 1]; cumulative only where allow_cumulative is set. */
int sbn__check_momentum(const sbn_layer_params_t *p, int allow_cumulative);
int sbn__check_channels(const sbn_layer_params_t *p);
/* The parameters of a channel op with running statistics (BatchNorm,
 * InstanceNorm): eps, momentum (and cumulative) and channels, in order. */
int sbn__check_running_norm(const sbn_layer_params_t *p, int allow_cumulative);
/* The (N, C, spatial...) shape check of the channel ops, for op rows. */
int sbn__op_shape_channels(const sbn_layer_params_t *p,
                           const sbn_tensor_desc_t *d, sbn__shape_t *sh);

/* The kernel table the ops call (ops/par.c): the active set itself, or
 * with sbn_set_threads(n > 1) in an OpenMP build a table whose entries
 * split each call over n threads and call the active set's. */
const sbn__kernels_t *sbn__kt(void);

/* ------------------------------------------------------------------ */
/* Per-channel statistics shared by the ops (ops/chan.c). */

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
/* A backward's dbias[c] = db[c] and dweight[c] = dw[c] for c in [c0, c1)
 * (channels, or LayerNorm's positions), rounded to float, each where the
 * caller asked for it (non-NULL). */
void sbn__put_dwb(const sbn_backward_args_t *a, size_t c0, size_t c1,
                  const double *db, const double *dw);

/* Computes per-channel moments of the (A, C, S) view into recs[c] using
 * the first element of each channel as the shift. Uses ch->k, d1, d2. */
void sbn__view_moments(const float *x, size_t A, size_t C, size_t S,
                       sbn__chan_t *ch, sbn_rec_t *recs);
/* The same on a strided view: element (a, c, s) at a * lda + c * S + s
 * (a channel range of a larger array; see the kernels' *_ld entries). */
void sbn__view_moments_ld(const float *x, size_t A, size_t C, size_t S,
                          size_t lda, sbn__chan_t *ch, sbn_rec_t *recs);

/* ------------------------------------------------------------------ */
/* Whether a BatchNorm call in this mode normalizes with the batch's own
 * statistics: in training, and in eval without running statistics. */
static inline int sbn__bn_batch_stats(const sbn_layer_params_t *p,
                                      sbn_mode_t mode) {
  return mode == SBN_MODE_TRAIN || !p->track_running_stats;
}

/* BatchNorm's per-channel finishing steps (ops/batchnorm_chan.c), shared
 * by the one-reduction path (ops/batchnorm.c) and the chunked one
 * (ops/batchnorm_overlap.c), which applies them one channel range at a
 * time. */

/* What the forward's finish derives once per call from the reduced
 * records (or the running statistics) and uses for every channel. */
typedef struct sbn__bn_fin_s {
  double count, f;       /* count per channel; momentum or cumulative factor */
  int batch;             /* normalizes with batch statistics */
  int update;            /* updates the running statistics */
  float *rm, *rv;        /* running statistics, NULL when not tracked */
  double *smean, *sistd; /* the saved state's arrays, NULL without saved */
} sbn__bn_fin_t;

/* Fills fin from recs[0]'s global count (batch statistics) and writes the
 * saved header; SBN_ESMALLBATCH for a count of 1. */
int sbn__bn_fin_init(const sbn_layer_t *l, const sbn_forward_args_t *a,
                     const sbn__shape_t *sh, const sbn_rec_t *recs,
                     sbn__bn_fin_t *fin);
/* Channels [c0, c1): normalization parameters into ch (mh, ml, k1, k2),
 * the saved mean and istd, and the running statistics. */
void sbn__bn_fin_chan(const sbn_layer_t *l, const sbn_forward_args_t *a,
                      const sbn__bn_fin_t *fin, const sbn_rec_t *recs,
                      size_t c0, size_t c1, sbn__chan_t *ch);
/* After every channel: num_batches_tracked. */
void sbn__bn_fin_done(const sbn_forward_args_t *a, const sbn__bn_fin_t *fin);
/* Channels [c0, c1) of backward: dx parameters into ch (dmean, distd,
 * dk1..dk3) from the saved state and the reduced sums. */
void sbn__bn_bwd_chan(const sbn_layer_t *l, const sbn_backward_args_t *a,
                      const double *mean, const double *istd, double count,
                      const sbn_rec_t *recs, size_t c0, size_t c1,
                      sbn__chan_t *ch);

/* The overlapped SyncBN (ops/batchnorm_overlap.c). */

/* Channels per chunk for a training pass of l over C channels with the
 * given global count per channel (the plan of params.reduce_chunk), or 0
 * for one reduction of every channel. */
size_t sbn__bn_chunk(const sbn_layer_t *l, size_t C, double count);
/* Channels per block for a local training pass that reads `tensors`
 * tensors of sh (1: forward's x; 2: backward's x and dy), or 0 where the
 * one unblocked pass is as good: a layer that reduces over other
 * processes, channels-last, a threaded build, or a tensor whose blocks
 * would hold every channel. By default only a backward of more than
 * 8 MiB of x and dy is blocked, for the L3; SBN_BN_SINGLE_PASS=1 plans L2
 * blocks for both passes (a channel larger than the block is a block of
 * its own), =0 none. */
size_t sbn__bn_block(const sbn_layer_t *l, const sbn__shape_t *sh, int tensors);
/* SBN_BN_SINGLE_PASS: 1 or 0 when set to one of them (the L2 blocks, or
 * no blocks), -1 otherwise; either setting also keeps the local NCHW
 * passes off the set's fused ones (bn_fwd_nchw, bn_bwd_nchw), for
 * comparison. */
int sbn__bn_single_pass(void);
/* Whether the local NCHW passes may take the set's fused entries
 * (bn_fwd_nchw, bn_bwd_nchw): SBN_BN_FUSED=1 or 0 when set to one of
 * them, otherwise 1 on a core with an L2 of 2 MiB or more (where they
 * were measured faster) and 0 below. */
int sbn__bn_fused_nchw(void);
/* Training forward and backward in chunks of cc channels (0 < cc < C),
 * on arguments the front door has checked. On a layer that reduces over
 * nothing but this process the chunks are the blocks of sbn__bn_block and
 * each is finished (normalized, or dx) right after its sums are taken,
 * while it is in L2: x (and dy) are read once from memory. */
int sbn__bn_overlap_forward(sbn_layer_t *l, const sbn_forward_args_t *a,
                            const sbn__shape_t *sh, size_t cc);
int sbn__bn_overlap_backward(sbn_layer_t *l, const sbn_backward_args_t *a,
                             const sbn__shape_t *sh, size_t cc);

/* ------------------------------------------------------------------ */
/* Ghost batches of BatchNorm (ops/batchnorm_ghost.c): sub-batches of
 * params.ghost_batch samples, each normalized with its own statistics,
 * with no reduction. */

/* ceil(N / g): the number of sub-batches (0 for an empty batch). */
size_t sbn__ghost_count(size_t N, size_t g);
/* Saved bytes: (mean, istd) of C channels per sub-batch (at least one). */
int sbn__bn_ghost_sizes(const sbn_layer_params_t *p, const sbn__shape_t *sh,
                        size_t *saved);
int sbn__bn_ghost_forward(const sbn_layer_params_t *p,
                          const sbn_forward_args_t *a, const sbn__shape_t *sh);
int sbn__bn_ghost_backward(const sbn_layer_params_t *p,
                           const sbn_backward_args_t *a,
                           const sbn__shape_t *sh);

/* ------------------------------------------------------------------ */
/* Statistics per (sample, group of channels), shared by GroupNorm and
 * InstanceNorm (ops/groupnorm.c). InstanceNorm is the case of groups of
 * one channel (G = C) plus running statistics. */

typedef struct sbn__grouping_s {
  size_t groups; /* G; divides C */
  /* InstanceNorm: running statistics (when tracked), the small-input
   * check, and its own rounding order in backward. */
  int instance;
} sbn__grouping_t;

/* Workspace and saved bytes for G groups; `what` is the product named
 * when N * G overflows ("N*G"). */
int sbn__grouped_sizes(const sbn__shape_t *sh, size_t G, const char *what,
                       size_t *ws, size_t *saved);
int sbn__grouped_forward(sbn_layer_t *l, const sbn_forward_args_t *a,
                         const sbn__shape_t *sh, const sbn__grouping_t *gp);
int sbn__grouped_backward(sbn_layer_t *l, const sbn_backward_args_t *a,
                          const sbn__shape_t *sh, const sbn__grouping_t *gp);

#endif /* SBN_OPS_H */
