/* The nn room: the pure compute of `syncbn train` (no MPI). Layers that
 * the normalization library does not have (Linear, Conv2d, ReLU, MaxPool2,
 * global average pool, softmax cross-entropy), the idx data loader, the
 * optimizer and its schedule, and the two models built from them and the
 * library's normalization layers. Built as the static library syncbn_nn,
 * which links OpenBLAS and zlib so that libsyncbn itself needs neither.
 *
 * Conventions are the library's: functions that can fail return 0 or a
 * negative SBN_E* code with sbn_set_error() naming the argument; tensors are
 * fp32, caller-owned, and nothing here allocates except the *_create and
 * *_load functions, so a training step allocates nothing. Activations are
 * NCHW (N, C, H, W) unless a function says otherwise. */
#ifndef SBN_NN_H
#define SBN_NN_H

#include <stddef.h>
#include <stdint.h>

#include "syncbn.h"

/* ------------------------------------------------------------------ */
/* Layers (nn/layers.c) */

/* Sets the number of BLAS threads of this process (OpenBLAS). */
void sbn_nn_set_threads(int threads);

/* y (n x out) = x (n x in) * w^T + b, with w (out x in) and b (out). */
void sbn_nn_linear_forward(size_t n, size_t in, size_t out, const float *x,
                           const float *w, const float *b, float *y);
/* dw = dy^T x and db = column sums of dy (both written, not accumulated);
 * dx = dy w unless dx is NULL. */
void sbn_nn_linear_backward(size_t n, size_t in, size_t out, const float *x,
                            const float *w, const float *dy, float *dx,
                            float *dw, float *db);

/* A stride-1 square convolution: cin x h x w in, cout x oh x ow out with
 * oh = h + 2 pad - k + 1. Weights are (cout, cin, k, k), bias (cout). */
typedef struct sbn_nn_conv_s {
  size_t cin, cout, h, w, k, pad;
  /* NCHW (0, the default of a zeroed struct) or NHWC (channels last) for
   * x, y and their gradients; weights are (cout, cin, k, k) either way, so
   * a model's parameters do not depend on its layout. */
  sbn_layout_t layout;
} sbn_nn_conv_t;

/* Output height and width (stride 1). They are inline here because both
 * layouts' convolutions (layers.c, layers_nhwc.c) need them and neither file
 * should have to call back into the other. */
static inline size_t sbn_nn_conv_oh(const sbn_nn_conv_t *g) {
  return g->h + 2 * g->pad - g->k + 1;
}
static inline size_t sbn_nn_conv_ow(const sbn_nn_conv_t *g) {
  return g->w + 2 * g->pad - g->k + 1;
}
/* The floats of the im2col buffer (one image's (cin k k) x (oh ow) matrix)
 * that forward and backward need. */
size_t sbn_nn_conv_col_floats(const sbn_nn_conv_t *g);
/* Checks the geometry (positive sizes, k <= h + 2 pad and w + 2 pad). */
int sbn_nn_conv_check(const sbn_nn_conv_t *g);
/* im2col + SGEMM per image; col is the caller's buffer. */
void sbn_nn_conv_forward(const sbn_nn_conv_t *g, size_t n, const float *x,
                         const float *w, const float *b, float *y, float *col);
/* dw, db written (summed over the n images); dx written unless NULL. */
void sbn_nn_conv_backward(const sbn_nn_conv_t *g, size_t n, const float *x,
                          const float *w, const float *dy, float *dx, float *dw,
                          float *db, float *col);

/* y = max(x, 0) over len floats; dx = dy where y > 0, else 0 (dx may equal
 * dy). */
void sbn_nn_relu_forward(size_t len, const float *x, float *y);
void sbn_nn_relu_backward(size_t len, const float *y, const float *dy,
                          float *dx);

/* 2x2 max pooling with stride 2 over (n c) planes of h x w (odd trailing
 * rows and columns are dropped, as PyTorch's floor mode). Backward routes
 * dy to the first maximum of each window, recomputed from x. */
void sbn_nn_maxpool2_forward(size_t planes, size_t h, size_t w, const float *x,
                             float *y);
void sbn_nn_maxpool2_backward(size_t planes, size_t h, size_t w, const float *x,
                              const float *dy, float *dx);

/* The same on channels-last (n, h, w, c) tensors (nn/layers_nhwc.c): the
 * same windows, ties and summation order per channel, so they give the
 * NCHW functions' values bit for bit. */
void sbn_nn_maxpool2_forward_nhwc(size_t n, size_t h, size_t w, size_t c,
                                  const float *x, float *y);
void sbn_nn_maxpool2_backward_nhwc(size_t n, size_t h, size_t w, size_t c,
                                   const float *x, const float *dy, float *dx);
void sbn_nn_gap_forward_nhwc(size_t n, size_t s, size_t c, const float *x,
                             float *y);
void sbn_nn_gap_backward_nhwc(size_t n, size_t s, size_t c, const float *dy,
                              float *dx);
/* The NHWC convolution that sbn_nn_conv_forward and _backward call for
 * layout NHWC: per image, col (oh ow) x (cin k k) and y = col w^T. */
void sbn_nn_conv_forward_nhwc(const sbn_nn_conv_t *g, size_t n, const float *x,
                              const float *w, const float *b, float *y,
                              float *col);
void sbn_nn_conv_backward_nhwc(const sbn_nn_conv_t *g, size_t n, const float *x,
                               const float *w, const float *dy, float *dx,
                               float *dw, float *db, float *col);

/* y (planes) = mean of each plane of s floats; dx = dy / s. */
void sbn_nn_gap_forward(size_t planes, size_t s, const float *x, float *y);
void sbn_nn_gap_backward(size_t planes, size_t s, const float *dy, float *dx);

/* Softmax cross-entropy of n rows of k logits against labels (< k).
 * Adds the summed loss to *loss_sum and the number of rows whose first
 * largest logit is the label to *correct. Unless dlogits is NULL, writes
 * dlogits = scale (softmax - onehot): scale is 1 / (global batch) so that
 * every rank's loss is its share of the global-batch mean. */
int sbn_nn_xent(size_t n, size_t k, const float *logits, const uint8_t *labels,
                float scale, float *dlogits, double *loss_sum,
                uint64_t *correct);

/* ------------------------------------------------------------------ */
/* Data (nn/idx.c): the idx files of MNIST and Fashion-MNIST, gzip'd or
 * not. */

typedef struct sbn_dataset_s {
  size_t n;        /* images */
  size_t rows;     /* 28 */
  size_t cols;     /* 28 */
  uint8_t *images; /* n rows cols bytes */
  uint8_t *labels; /* n labels, each < 10 */
} sbn_dataset_t;

/* Reads an idx3 image file and its idx1 label file. SBN_EIO naming the
 * file when it cannot be opened or read; SBN_EFORMAT naming the file when
 * it is malformed (magic, dims, truncated or trailing bytes, a label above
 * 9, counts that differ between the two files). *out is zeroed on
 * failure. */
int sbn_idx_load(const char *images_path, const char *labels_path,
                 sbn_dataset_t *out);
void sbn_dataset_free(sbn_dataset_t *d);
/* Mean and standard deviation (population) of all pixels scaled to [0, 1]. */
void sbn_dataset_moments(const sbn_dataset_t *d, double *mean, double *std);
/* Writes n standardized images, (pixel / 255 - mean) / std, and their
 * labels, for the dataset indices idx[0..n). */
void sbn_dataset_gather(const sbn_dataset_t *d, const uint32_t *idx, size_t n,
                        double mean, double std, float *x, uint8_t *labels);

/* ------------------------------------------------------------------ */
/* Randomness, optimizer and schedule (nn/optim.c) */

/* SplitMix64: the trainer's one generator, so that the same seed gives
 * the same weights and data order on every machine. */
uint64_t sbn_nn_rand64(uint64_t *state);
/* n floats uniform in [-bound, bound). */
void sbn_nn_uniform(float *x, size_t n, float bound, uint64_t *state);
/* perm[0..n) = a permutation of 0..n-1 that depends only on (seed, epoch):
 * Fisher-Yates driven by SplitMix64. */
void sbn_nn_permutation(uint32_t *perm, size_t n, uint64_t seed,
                        uint64_t epoch);

/* PyTorch's OneCycleLR with anneal_strategy "cos" and three_phase False. */
typedef struct sbn_onecycle_s {
  double max_lr;
  double pct_start;        /* 0.3 */
  double div_factor;       /* 25: initial lr = max_lr / div_factor */
  double final_div_factor; /* 1e4: final lr = initial lr / this */
  uint64_t total_steps;
} sbn_onecycle_t;

/* The learning rate of step (0-based) of total_steps. */
double sbn_onecycle_lr(const sbn_onecycle_t *s, uint64_t step);

/* PyTorch's SGD (dampening 0, no Nesterov): d = g + wd p; buf = momentum
 * buf + d; p -= lr buf, over n floats. buf starts at zero, which equals
 * PyTorch's first step buf = d. */
void sbn_nn_sgd(size_t n, float *p, float *buf, const float *g, float lr,
                float momentum, float wd);

/* ------------------------------------------------------------------ */
/* Models (nn/model.c) */

typedef enum {
  SBN_NN_MLP = 0, /* Flatten, Linear(784, 256), norm, ReLU, Linear(256,
                     256), norm, ReLU, Linear(256, 10) */
  SBN_NN_CNN = 1  /* 3 x (Conv3x3 pad 1, norm, ReLU) with MaxPool2 after the
                     first two, global average pool, Linear(64, 10) */
} sbn_nn_arch_t;

typedef enum {
  SBN_NN_NORM_NONE = 0,
  SBN_NN_NORM_BN,     /* BatchNorm over the rank's own samples */
  SBN_NN_NORM_SYNCBN, /* BatchNorm over the sync group (make_comm) */
  SBN_NN_NORM_GN,
  SBN_NN_NORM_LN,
  SBN_NN_NORM_IN
} sbn_nn_norm_t;

/* Makes the communicator of one SyncBN layer (a collective for an MPI
 * one); the model owns what it returns and destroys it. */
typedef int (*sbn_nn_make_comm_t)(void *ctx, const sbn_layer_params_t *p,
                                  sbn_comm_t **out);

typedef struct sbn_nn_config_s {
  sbn_nn_arch_t arch;
  sbn_nn_norm_t norm;
  size_t groups;                /* GroupNorm: 0 means min(8, C) */
  size_t ghost_batch;           /* BatchNorm: sub-batch size, 0 for none */
  double eps;                   /* 1e-5 */
  double momentum;              /* 0.1 */
  double dropout;               /* p after each hidden block; 0 for none */
  uint64_t seed;                /* weights and dropout */
  int world_rank;               /* dropout's per-rank key */
  size_t max_batch;             /* the largest n forward will see */
  sbn_layout_t layout;          /* the CNN's activations: NCHW or NHWC */
  sbn_nn_make_comm_t make_comm; /* required for SBN_NN_NORM_SYNCBN */
  void *make_comm_ctx;
} sbn_nn_config_t;

typedef struct sbn_nn_model_s sbn_nn_model_t;

/* Builds the model, initializes its weights as PyTorch's defaults for
 * Linear and Conv2d (uniform in +-1/sqrt(fan_in) for weights and biases;
 * norm weights 1 and biases 0) and allocates every buffer a step needs. */
int sbn_nn_model_create(const sbn_nn_config_t *cfg, sbn_nn_model_t **out);
void sbn_nn_model_destroy(sbn_nn_model_t *m);

/* Every trainable parameter lives in one flat array, and so does its
 * gradient (one allreduce per step); the gradient array has extra floats
 * after the parameters' for what the caller reduces with them. */
size_t sbn_nn_param_count(const sbn_nn_model_t *m);
/* The largest n that forward takes (the configuration's max_batch). */
size_t sbn_nn_max_batch(const sbn_nn_model_t *m);
float *sbn_nn_params(sbn_nn_model_t *m);
float *sbn_nn_grads(sbn_nn_model_t *m);

/* The running statistics of the BatchNorm and InstanceNorm layers that
 * track them, as one flat array of mean and variance pairs of arrays, and
 * each such layer's num_batches_tracked. */
size_t sbn_nn_stats_count(const sbn_nn_model_t *m);
float *sbn_nn_stats(sbn_nn_model_t *m);
size_t sbn_nn_tracked_count(const sbn_nn_model_t *m);
int64_t sbn_nn_tracked_get(const sbn_nn_model_t *m, size_t i);
void sbn_nn_tracked_set(sbn_nn_model_t *m, size_t i, int64_t v);

/* Forward of n <= max_batch images (n x 1 x 28 x 28); returns the logits
 * (n x 10) through *logits. step keys dropout. */
int sbn_nn_forward(sbn_nn_model_t *m, sbn_mode_t mode, size_t n, const float *x,
                   uint64_t step, const float **logits);
/* Called by backward as soon as the gradients of a layer's parameters are
 * final: floats [off, off + len) of sbn_nn_grads(), in decreasing off, the
 * segments covering [0, param count) exactly once. For starting each
 * segment's allreduce while backward goes on (--overlap). A nonzero return
 * stops backward with that code. */
typedef int (*sbn_nn_grad_hook_t)(void *ctx, size_t off, size_t len);
void sbn_nn_set_grad_hook(sbn_nn_model_t *m, sbn_nn_grad_hook_t fn, void *ctx);

/* Backward of the last training forward from dlogits (n x 10): writes the
 * parameter gradients into sbn_nn_grads(). */
int sbn_nn_backward(sbn_nn_model_t *m, size_t n, const float *x,
                    const float *dlogits, uint64_t step);

/* Precise BatchNorm: replaces each BatchNorm's running statistics with the
 * exact population statistics of its inputs over many samples. Begin
 * zeroes one (count, mean, M2) record per BatchNorm channel; every
 * forward_precise runs n samples as in training (each BatchNorm normalizing
 * with the statistics of these n samples, dropout off) without touching
 * the running statistics and merges each layer's input moments into the
 * records (Chan's merge: exact whatever the chunks); the caller reduces
 * the records over its ranks (one fused reduction: sbn_rec_combine); finish
 * sets running_mean to the mean and running_var to the unbiased variance.
 * n must be at least 2 (a chunk's own statistics need two samples). */
size_t sbn_nn_precise_count(const sbn_nn_model_t *m);
void sbn_nn_precise_begin(sbn_nn_model_t *m);
int sbn_nn_forward_precise(sbn_nn_model_t *m, size_t n, const float *x);
sbn_rec_t *sbn_nn_precise_records(sbn_nn_model_t *m);
void sbn_nn_precise_finish(sbn_nn_model_t *m);

/* ------------------------------------------------------------------ */
/* Statistics of normalization sets (nn/setstats.c) */

/* recs[ch] = the (count, mean, M2) moments of channel ch over n samples
 * of c channels of s values each (NCHW, or NHWC when nhwc; s = 1 for an
 * (N, C) matrix). Two passes in double. */
void sbn_nn_channel_moments(const float *x, size_t n, size_t c, size_t s,
                            int nhwc, sbn_rec_t *recs);

/* How far the moments of a normalization set fall from the population's.
 * Each of `trials` draws a fresh permutation of the n samples (seed, trial)
 * and takes its first ranks x per_rank samples as ranks chunks of per_rank,
 * each chunk merged on its own and then the chunks together (SyncBN over
 * that many ranks). Buffers are the caller's. */
typedef struct sbn_nn_set_error_args_s {
  const sbn_rec_t *samples; /* n x c records: each sample's own moments */
  const float *x;           /* or, when not NULL, n x c values (one per
                               sample and channel, as pixels) */
  const sbn_rec_t *pop;     /* c records: the population's */
  size_t n, c;
  size_t per_rank, ranks, trials;
  uint64_t seed;
  double min_var;   /* channels whose population variance is not above it
                       are left out (constant border pixels) */
  uint32_t *perm;   /* n entries, scratch */
  sbn_rec_t *set;   /* c records, scratch */
  sbn_rec_t *chunk; /* c records, scratch */
} sbn_nn_set_error_args_t;

typedef struct sbn_nn_set_error_s {
  /* Root mean squares over trials and channels of (set mean - mean) / sd
   * and of (set variance - variance) / variance, the set variance biased
   * as BatchNorm's: for n iid Gaussian values 1 / sqrt(n) and
   * sqrt(2 n - 1) / n. */
  double mean_err, var_err;
  size_t channels;   /* the channels counted */
  double set_values; /* |S|: values per statistic (samples x count) */
} sbn_nn_set_error_t;

int sbn_nn_set_error(const sbn_nn_set_error_args_t *a, sbn_nn_set_error_t *out);
/* chunk (c records) = the moments of the samples idx[0..count) of a's
 * samples or values (the chunk of one rank). */
void sbn_nn_chunk_moments(const sbn_nn_set_error_args_t *a, const uint32_t *idx,
                          size_t count, sbn_rec_t *chunk);

#endif /* SBN_NN_H */
