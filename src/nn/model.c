/* The two models of `syncbn train` as a list of nodes over one flat
 * parameter array. Every buffer a step needs (activations, gradients, the
 * im2col matrix, the normalization layers' workspace and saved state) is
 * allocated here, once, for the largest batch. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "nn/sbn_nn.h"

/* Floats after the parameters' gradients that the caller may reduce in the
 * same allreduce (the step's loss). */
#define GRAD_EXTRA 4
#define MAX_NODES 24

enum { N_LINEAR, N_CONV, N_NORM, N_RELU, N_POOL, N_GAP, N_DROP };

typedef struct node_s {
  int kind;
  size_t ic, ih, iw; /* per-sample input shape */
  size_t oc, oh, ow; /* per-sample output shape */
  size_t w_off, w_len, b_off, b_len;
  sbn_nn_conv_t conv;
  sbn_layer_t *layer;
  sbn_comm_t *comm;   /* owned (SyncBN), else NULL */
  sbn_state_t *state; /* running statistics, if the layer tracks them */
  size_t stats_off;   /* where they sit in the stats array */
  void *saved;
  size_t saved_bytes;
  float *out;
} node_t;

struct sbn_nn_model_s {
  sbn_nn_config_t cfg;
  node_t nodes[MAX_NODES];
  size_t count;
  size_t c, h, w; /* the shape the next node receives */
  size_t nparams, nstats, ntracked;
  sbn_state_t states[MAX_NODES];
  float *params, *grads, *stats, *col, *g0, *g1;
  /* Precise BatchNorm: one record per BatchNorm channel, one chunk's
   * records, and running statistics that the pass may update and drop. */
  sbn_rec_t *prec, *chunk_recs;
  float *scratch;
  size_t max_c;
  size_t col_floats, act_floats, ws_bytes;
  void *ws;
  sbn_comm_t local; /* dropout's key: (seed, world rank) */
  sbn_nn_grad_hook_t hook;
  void *hook_ctx;
};

static node_t *push(sbn_nn_model_t *m, int kind) {
  node_t *nd = &m->nodes[m->count++];
  memset(nd, 0, sizeof *nd);
  nd->kind = kind;
  nd->ic = nd->oc = m->c;
  nd->ih = nd->oh = m->h;
  nd->iw = nd->ow = m->w;
  return nd;
}

static void add_params(sbn_nn_model_t *m, node_t *nd, size_t wl, size_t bl) {
  nd->w_off = m->nparams;
  nd->w_len = wl;
  nd->b_off = m->nparams + wl;
  nd->b_len = bl;
  m->nparams += wl + bl;
}

static void add_linear(sbn_nn_model_t *m, size_t out) {
  node_t *nd = push(m, N_LINEAR);
  nd->oc = out;
  nd->oh = nd->ow = 1;
  add_params(m, nd, out * m->c * m->h * m->w, out);
  m->c = out;
  m->h = m->w = 1;
}

static void add_conv(sbn_nn_model_t *m, size_t out) {
  node_t *nd = push(m, N_CONV);
  nd->conv = (sbn_nn_conv_t){m->c, out, m->h, m->w, 3, 1, m->cfg.layout};
  nd->oc = out;
  nd->oh = sbn_nn_conv_oh(&nd->conv);
  nd->ow = sbn_nn_conv_ow(&nd->conv);
  add_params(m, nd, out * m->c * 9, out);
  m->c = out;
  m->h = nd->oh;
  m->w = nd->ow;
}

static void add_pool(sbn_nn_model_t *m) {
  node_t *nd = push(m, N_POOL);
  nd->oh = m->h / 2;
  nd->ow = m->w / 2;
  m->h = nd->oh;
  m->w = nd->ow;
}

static void add_gap(sbn_nn_model_t *m) {
  node_t *nd = push(m, N_GAP);
  nd->oh = nd->ow = 1;
  m->h = m->w = 1;
}

/* The logical shape of a normalization layer's input: (N, C) in the MLP
 * (BatchNorm1d: statistics over the samples only), (N, C, H, W) in the
 * CNN. */
static sbn_tensor_desc_t norm_desc(const sbn_nn_model_t *m, const node_t *nd,
                                   size_t n) {
  sbn_tensor_desc_t d = {2, {n, nd->ic}, SBN_LAYOUT_NCHW};
  if (m->cfg.arch == SBN_NN_CNN) {
    d.ndim = 4;
    d.dims[2] = nd->ih;
    d.dims[3] = nd->iw;
    d.layout = m->cfg.layout;
  }
  return d;
}

static int norm_params(const sbn_nn_model_t *m, sbn_layer_params_t *p) {
  const sbn_nn_config_t *cfg = &m->cfg;
  switch (cfg->norm) {
    case SBN_NN_NORM_BN:
    case SBN_NN_NORM_SYNCBN:
      sbn_layer_params_default(p, SBN_OP_BATCHNORM);
      p->channels = m->c;
      p->momentum = cfg->momentum;
      p->ghost_batch = cfg->ghost_batch;
      break;
    case SBN_NN_NORM_GN:
      sbn_layer_params_default(p, SBN_OP_GROUPNORM);
      p->channels = m->c;
      p->groups = cfg->groups ? cfg->groups : (m->c < 8 ? m->c : 8);
      break;
    case SBN_NN_NORM_LN:
      if (cfg->layout == SBN_LAYOUT_NHWC)
        return sbn_set_error(SBN_EINVAL,
                             "layout: LayerNorm over (C, H, W) takes NCHW");
      sbn_layer_params_default(p, SBN_OP_LAYERNORM);
      p->norm_ndim = cfg->arch == SBN_NN_CNN ? 3 : 1;
      p->norm_shape[0] = m->c;
      p->norm_shape[1] = m->h;
      p->norm_shape[2] = m->w;
      break;
    case SBN_NN_NORM_IN:
      if (cfg->arch != SBN_NN_CNN)
        return sbn_set_error(SBN_EINVAL,
                             "norm: InstanceNorm needs spatial dims (the "
                             "CNN); in the MLP each sample's channel is one "
                             "value");
      sbn_layer_params_default(p, SBN_OP_INSTANCENORM);
      p->channels = m->c;
      p->momentum = cfg->momentum;
      break;
    default:
      return sbn_set_error(SBN_EINVAL, "norm: unknown kind %d", (int)cfg->norm);
  }
  p->eps = cfg->eps;
  return 0;
}

static int add_norm(sbn_nn_model_t *m) {
  if (m->cfg.norm == SBN_NN_NORM_NONE)
    return 0;
  sbn_layer_params_t p;
  int rc = norm_params(m, &p);
  if (rc != 0)
    return rc;
  node_t *nd = push(m, N_NORM);
  size_t affine = p.op == SBN_OP_LAYERNORM ? m->c * m->h * m->w : m->c;
  add_params(m, nd, affine, affine);
  if (m->cfg.norm == SBN_NN_NORM_SYNCBN) {
    if (m->cfg.make_comm == NULL)
      return sbn_set_error(SBN_EINVAL, "make_comm: SyncBN needs one");
    if ((rc = m->cfg.make_comm(m->cfg.make_comm_ctx, &p, &nd->comm)) != 0)
      return rc;
  }
  if ((rc = sbn_layer_create(&p, nd->comm, &nd->layer)) != 0)
    return rc;
  if (p.track_running_stats) {
    nd->state = &m->states[m->ntracked++];
    nd->stats_off = m->nstats;
    m->nstats += 2 * m->c;
    m->max_c = m->c > m->max_c ? m->c : m->max_c;
  }
  return 0;
}

static void add_relu(sbn_nn_model_t *m) {
  push(m, N_RELU);
}

static int add_dropout(sbn_nn_model_t *m) {
  if (m->cfg.dropout <= 0)
    return 0;
  sbn_layer_params_t p;
  sbn_layer_params_default(&p, SBN_OP_DROPOUT);
  p.p = m->cfg.dropout;
  p.seed = (uint32_t)(m->cfg.seed ^ (m->cfg.seed >> 32));
  p.layer_id = (uint32_t)m->count;
  node_t *nd = push(m, N_DROP);
  return sbn_layer_create(&p, &m->local, &nd->layer);
}

static int build(sbn_nn_model_t *m) {
  int rc = 0;
  m->c = 1;
  m->h = m->w = 28;
  if (m->cfg.arch == SBN_NN_MLP) {
    for (int i = 0; i < 2 && rc == 0; i++) {
      add_linear(m, 256);
      if ((rc = add_norm(m)) == 0) {
        add_relu(m);
        rc = add_dropout(m);
      }
    }
    if (rc == 0)
      add_linear(m, 10);
    return rc;
  }
  if (m->cfg.arch != SBN_NN_CNN)
    return sbn_set_error(SBN_EINVAL, "arch: unknown model %d",
                         (int)m->cfg.arch);
  const size_t width[3] = {16, 32, 64};
  for (int i = 0; i < 3 && rc == 0; i++) {
    add_conv(m, width[i]);
    if ((rc = add_norm(m)) == 0) {
      add_relu(m);
      if (i < 2)
        add_pool(m);
      rc = add_dropout(m);
    }
  }
  if (rc == 0) {
    add_gap(m);
    add_linear(m, 10);
  }
  return rc;
}

static void init_params(sbn_nn_model_t *m) {
  uint64_t rng = m->cfg.seed;
  for (size_t i = 0; i < m->count; i++) {
    node_t *nd = &m->nodes[i];
    float *w = m->params + nd->w_off, *b = m->params + nd->b_off;
    if (nd->kind == N_LINEAR || nd->kind == N_CONV) {
      /* kaiming_uniform(a = sqrt(5)) has bound sqrt(6 / ((1 + 5) fan_in))
       * = 1 / sqrt(fan_in), the bias's bound too. */
      size_t fan_in = nd->w_len / nd->oc;
      float bound = (float)(1.0 / sqrt((double)fan_in));
      sbn_nn_uniform(w, nd->w_len, bound, &rng);
      sbn_nn_uniform(b, nd->b_len, bound, &rng);
    } else if (nd->kind == N_NORM) {
      for (size_t j = 0; j < nd->w_len; j++)
        w[j] = 1.0f;
      memset(b, 0, nd->b_len * sizeof *b);
    }
  }
}

/* Sizes and allocates every buffer, once, for max_batch samples. */
static int allocate(sbn_nn_model_t *m) {
  size_t n = m->cfg.max_batch, act = 28 * 28;
  for (size_t i = 0; i < m->count; i++) {
    node_t *nd = &m->nodes[i];
    size_t out = nd->oc * nd->oh * nd->ow;
    act = out > act ? out : act;
    if ((nd->out = malloc(n * out * sizeof(float))) == NULL)
      return sbn_set_error(SBN_ENOMEM, "max_batch: no memory for %zu", n);
    if (nd->kind == N_CONV) {
      size_t cf = sbn_nn_conv_col_floats(&nd->conv);
      m->col_floats = cf > m->col_floats ? cf : m->col_floats;
    }
    if (nd->layer != NULL) {
      sbn_tensor_desc_t d = norm_desc(m, nd, n);
      if (nd->kind == N_DROP)
        d = (sbn_tensor_desc_t){
            1, {n * nd->ic * nd->ih * nd->iw}, SBN_LAYOUT_NCHW};
      size_t ws;
      int rc = sbn_layer_sizes(nd->layer, &d, &ws, &nd->saved_bytes);
      if (rc != 0)
        return rc;
      m->ws_bytes = ws > m->ws_bytes ? ws : m->ws_bytes;
      if (nd->saved_bytes && (nd->saved = malloc(nd->saved_bytes)) == NULL)
        return sbn_set_error(SBN_ENOMEM, "max_batch: no memory for %zu", n);
    }
  }
  m->act_floats = act;
  m->params = calloc(m->nparams, sizeof(float));
  m->grads = calloc(m->nparams + GRAD_EXTRA, sizeof(float));
  m->stats = calloc(m->nstats + 1, sizeof(float));
  m->col = malloc((m->col_floats + 1) * sizeof(float));
  m->g0 = malloc(n * act * sizeof(float));
  m->g1 = malloc(n * act * sizeof(float));
  m->ws = malloc(m->ws_bytes + 1);
  m->prec = calloc(m->nstats / 2 + 1, sizeof *m->prec);
  m->chunk_recs = calloc(m->max_c + 1, sizeof *m->chunk_recs);
  m->scratch = calloc(m->nstats + 1, sizeof *m->scratch);
  if (!m->params || !m->grads || !m->stats || !m->col || !m->g0 || !m->g1 ||
      !m->ws || !m->prec || !m->chunk_recs || !m->scratch)
    return sbn_set_error(SBN_ENOMEM, "max_batch: no memory for %zu", n);
  for (size_t i = 0; i < m->count; i++) {
    node_t *nd = &m->nodes[i];
    if (nd->state == NULL)
      continue;
    nd->state->running_mean = m->stats + nd->stats_off;
    nd->state->running_var = m->stats + nd->stats_off + nd->ic;
    for (size_t j = 0; j < nd->ic; j++)
      nd->state->running_var[j] = 1.0f;
  }
  return 0;
}

int sbn_nn_model_create(const sbn_nn_config_t *cfg, sbn_nn_model_t **out) {
  *out = NULL;
  if (cfg->max_batch == 0)
    return sbn_set_error(SBN_EINVAL, "max_batch: must be positive");
  if (cfg->layout != SBN_LAYOUT_NCHW &&
      (cfg->layout != SBN_LAYOUT_NHWC || cfg->arch != SBN_NN_CNN))
    return sbn_set_error(SBN_EINVAL, "layout: NHWC is for the CNN only");
  sbn_nn_model_t *m = calloc(1, sizeof *m);
  if (m == NULL)
    return sbn_set_error(SBN_ENOMEM, "model: out of memory");
  m->cfg = *cfg;
  sbn_comm_local_init(&m->local, cfg->world_rank);
  int rc = build(m);
  if (rc == 0)
    rc = allocate(m);
  if (rc != 0) {
    sbn_nn_model_destroy(m);
    return rc;
  }
  init_params(m);
  *out = m;
  return 0;
}

void sbn_nn_model_destroy(sbn_nn_model_t *m) {
  if (m == NULL)
    return;
  for (size_t i = 0; i < m->count; i++) {
    node_t *nd = &m->nodes[i];
    sbn_layer_destroy(nd->layer);
    if (nd->comm != NULL)
      sbn_comm_destroy(nd->comm);
    free(nd->saved);
    free(nd->out);
  }
  free(m->params);
  free(m->grads);
  free(m->stats);
  free(m->col);
  free(m->g0);
  free(m->g1);
  free(m->ws);
  free(m->prec);
  free(m->chunk_recs);
  free(m->scratch);
  free(m);
}

size_t sbn_nn_max_batch(const sbn_nn_model_t *m) {
  return m->cfg.max_batch;
}

size_t sbn_nn_param_count(const sbn_nn_model_t *m) {
  return m->nparams;
}
float *sbn_nn_params(sbn_nn_model_t *m) {
  return m->params;
}
float *sbn_nn_grads(sbn_nn_model_t *m) {
  return m->grads;
}
size_t sbn_nn_stats_count(const sbn_nn_model_t *m) {
  return m->nstats;
}
float *sbn_nn_stats(sbn_nn_model_t *m) {
  return m->stats;
}
size_t sbn_nn_tracked_count(const sbn_nn_model_t *m) {
  return m->ntracked;
}

int64_t sbn_nn_tracked_get(const sbn_nn_model_t *m, size_t i) {
  return m->states[i].num_batches_tracked;
}

void sbn_nn_tracked_set(sbn_nn_model_t *m, size_t i, int64_t v) {
  m->states[i].num_batches_tracked = v;
}

/* Runs a library layer (a normalization or dropout) forward. */
static int layer_forward(sbn_nn_model_t *m, node_t *nd, sbn_mode_t mode,
                         size_t n, const float *x, uint64_t step) {
  sbn_tensor_desc_t d = norm_desc(m, nd, n);
  if (nd->kind == N_DROP)
    d = (sbn_tensor_desc_t){1, {n * nd->ic * nd->ih * nd->iw}, SBN_LAYOUT_NCHW};
  sbn_forward_args_t a = {0};
  a.mode = mode;
  a.x_desc = &d;
  a.x = x;
  a.y = nd->out;
  a.weight = nd->w_len ? m->params + nd->w_off : NULL;
  a.bias = nd->b_len ? m->params + nd->b_off : NULL;
  a.state = nd->state;
  a.step = step;
  a.workspace = m->ws;
  a.workspace_bytes = m->ws_bytes;
  a.saved = nd->saved;
  a.saved_bytes = nd->saved_bytes;
  return sbn_forward(nd->layer, &a);
}

/* A BatchNorm in the precise pass: the chunk's records are merged into the
 * layer's and normalize the chunk; the running statistics it updates are
 * scratch copies, dropped. A ghost-batch layer normalizes the chunk by its
 * ghost batches, as in training, so the inputs of the layers after it are
 * the ones training saw (Wu and Johnson 2021, section 3). */
static int precise_norm(sbn_nn_model_t *m, node_t *nd, size_t n,
                        const float *x) {
  sbn_tensor_desc_t d = norm_desc(m, nd, n);
  sbn_state_t st = {m->scratch + nd->stats_off,
                    m->scratch + nd->stats_off + nd->ic, 0};
  sbn_forward_args_t a = {0};
  a.mode = SBN_MODE_TRAIN;
  a.x_desc = &d;
  a.x = x;
  a.y = nd->out;
  a.weight = m->params + nd->w_off;
  a.bias = m->params + nd->b_off;
  a.state = &st;
  a.workspace = m->ws;
  a.workspace_bytes = m->ws_bytes;
  if (m->cfg.ghost_batch > 0) {
    int cnn = m->cfg.arch == SBN_NN_CNN;
    sbn_nn_channel_moments(x, n, nd->ic, cnn ? nd->ih * nd->iw : 1,
                           cnn && m->cfg.layout == SBN_LAYOUT_NHWC,
                           m->chunk_recs);
    sbn_rec_combine(m->chunk_recs, m->prec + nd->stats_off / 2, nd->ic);
    return sbn_bn_forward_finish(nd->layer, &a, NULL);
  }
  int rc = sbn_bn_forward_local(nd->layer, &a, m->chunk_recs);
  if (rc != 0)
    return rc;
  sbn_rec_combine(m->chunk_recs, m->prec + nd->stats_off / 2, nd->ic);
  return sbn_bn_forward_finish(nd->layer, &a, m->chunk_recs);
}

/* precise: BatchNorm layers go through precise_norm and dropout is off. */
static int run_forward(sbn_nn_model_t *m, sbn_mode_t mode, size_t n,
                       const float *x, uint64_t step, int precise,
                       const float **logits) {
  int nhwc = m->cfg.layout == SBN_LAYOUT_NHWC;
  if (n > m->cfg.max_batch)
    return sbn_set_error(SBN_EINVAL, "n: %zu is above max_batch %zu", n,
                         m->cfg.max_batch);
  const float *in = x;
  for (size_t i = 0; i < m->count; i++) {
    node_t *nd = &m->nodes[i];
    size_t in_len = n * nd->ic * nd->ih * nd->iw;
    int rc = 0;
    switch (nd->kind) {
      case N_LINEAR:
        sbn_nn_linear_forward(n, nd->ic * nd->ih * nd->iw, nd->oc, in,
                              m->params + nd->w_off, m->params + nd->b_off,
                              nd->out);
        break;
      case N_CONV:
        sbn_nn_conv_forward(&nd->conv, n, in, m->params + nd->w_off,
                            m->params + nd->b_off, nd->out, m->col);
        break;
      case N_RELU:
        sbn_nn_relu_forward(in_len, in, nd->out);
        break;
      case N_POOL:
        if (nhwc)
          sbn_nn_maxpool2_forward_nhwc(n, nd->ih, nd->iw, nd->ic, in, nd->out);
        else
          sbn_nn_maxpool2_forward(n * nd->ic, nd->ih, nd->iw, in, nd->out);
        break;
      case N_GAP:
        if (nhwc)
          sbn_nn_gap_forward_nhwc(n, nd->ih * nd->iw, nd->ic, in, nd->out);
        else
          sbn_nn_gap_forward(n * nd->ic, nd->ih * nd->iw, in, nd->out);
        break;
      default:
        if (precise && nd->kind == N_NORM && nd->state != NULL)
          rc = precise_norm(m, nd, n, in);
        else
          rc =
              layer_forward(m, nd, precise ? SBN_MODE_EVAL : mode, n, in, step);
    }
    if (rc != 0)
      return rc;
    in = nd->out;
  }
  *logits = in;
  return 0;
}

int sbn_nn_forward(sbn_nn_model_t *m, sbn_mode_t mode, size_t n, const float *x,
                   uint64_t step, const float **logits) {
  return run_forward(m, mode, n, x, step, 0, logits);
}

size_t sbn_nn_precise_count(const sbn_nn_model_t *m) {
  int bn = m->cfg.norm == SBN_NN_NORM_BN || m->cfg.norm == SBN_NN_NORM_SYNCBN;
  return bn ? m->nstats / 2 : 0;
}

void sbn_nn_precise_begin(sbn_nn_model_t *m) {
  /* Tag SBN_REC_MOMENTS (0) with count 0: the empty set's moments. */
  memset(m->prec, 0, (m->nstats / 2) * sizeof *m->prec);
  memcpy(m->scratch, m->stats, m->nstats * sizeof *m->stats);
}

int sbn_nn_forward_precise(sbn_nn_model_t *m, size_t n, const float *x) {
  const float *logits;
  if (n < 2)
    return sbn_set_error(SBN_ESMALLBATCH,
                         "n: a precise BatchNorm chunk needs 2 samples");
  return run_forward(m, SBN_MODE_TRAIN, n, x, 0, 1, &logits);
}

sbn_rec_t *sbn_nn_precise_records(sbn_nn_model_t *m) {
  return m->prec;
}

void sbn_nn_precise_finish(sbn_nn_model_t *m) {
  for (size_t i = 0; i < m->count; i++) {
    node_t *nd = &m->nodes[i];
    if (nd->kind != N_NORM || nd->state == NULL)
      continue;
    const sbn_rec_t *r = m->prec + nd->stats_off / 2;
    for (size_t c = 0; c < nd->ic; c++) {
      double count = r[c].v[0];
      if (count < 2)
        continue;
      nd->state->running_mean[c] = (float)r[c].v[1];
      nd->state->running_var[c] = (float)(r[c].v[2] / (count - 1));
    }
  }
}

/* Runs a library layer backward: dx = d(loss)/dx, and the affine
 * gradients into the flat gradient array. */
static int layer_backward(sbn_nn_model_t *m, node_t *nd, size_t n,
                          const float *x, const float *dy, float *dx,
                          uint64_t step) {
  sbn_tensor_desc_t d = norm_desc(m, nd, n);
  if (nd->kind == N_DROP)
    d = (sbn_tensor_desc_t){1, {n * nd->ic * nd->ih * nd->iw}, SBN_LAYOUT_NCHW};
  sbn_backward_args_t a = {0};
  a.mode = SBN_MODE_TRAIN;
  a.x_desc = &d;
  a.x = x;
  a.dy = dy;
  a.dx = dx;
  a.weight = nd->w_len ? m->params + nd->w_off : NULL;
  a.dweight = nd->w_len ? m->grads + nd->w_off : NULL;
  a.dbias = nd->b_len ? m->grads + nd->b_off : NULL;
  a.step = step;
  a.workspace = m->ws;
  a.workspace_bytes = m->ws_bytes;
  a.saved = nd->saved;
  a.saved_bytes = nd->saved_bytes;
  return sbn_backward(nd->layer, &a);
}

void sbn_nn_set_grad_hook(sbn_nn_model_t *m, sbn_nn_grad_hook_t fn, void *ctx) {
  m->hook = fn;
  m->hook_ctx = ctx;
}

int sbn_nn_backward(sbn_nn_model_t *m, size_t n, const float *x,
                    const float *dlogits, uint64_t step) {
  const float *dy = dlogits;
  size_t ready = m->nparams; /* gradients from here on are final */
  int nhwc = m->cfg.layout == SBN_LAYOUT_NHWC;
  float *bufs[2] = {m->g0, m->g1};
  int which = 0;
  for (size_t i = m->count; i-- > 0;) {
    node_t *nd = &m->nodes[i];
    const float *in = i > 0 ? m->nodes[i - 1].out : x;
    /* The first node's input is the data: no gradient is needed there. */
    float *dx = i > 0 ? bufs[which] : NULL;
    size_t in_len = n * nd->ic * nd->ih * nd->iw;
    float *gw = m->grads + nd->w_off, *gb = m->grads + nd->b_off;
    int rc = 0;
    switch (nd->kind) {
      case N_LINEAR:
        sbn_nn_linear_backward(n, nd->ic * nd->ih * nd->iw, nd->oc, in,
                               m->params + nd->w_off, dy, dx, gw, gb);
        break;
      case N_CONV:
        sbn_nn_conv_backward(&nd->conv, n, in, m->params + nd->w_off, dy, dx,
                             gw, gb, m->col);
        break;
      case N_RELU:
        sbn_nn_relu_backward(in_len, nd->out, dy, dx);
        break;
      case N_POOL:
        if (nhwc)
          sbn_nn_maxpool2_backward_nhwc(n, nd->ih, nd->iw, nd->ic, in, dy, dx);
        else
          sbn_nn_maxpool2_backward(n * nd->ic, nd->ih, nd->iw, in, dy, dx);
        break;
      case N_GAP:
        if (nhwc)
          sbn_nn_gap_backward_nhwc(n, nd->ih * nd->iw, nd->ic, dy, dx);
        else
          sbn_nn_gap_backward(n * nd->ic, nd->ih * nd->iw, dy, dx);
        break;
      default:
        if (dx == NULL)
          return sbn_set_error(SBN_ESTATE, "model: a library layer first");
        rc = layer_backward(m, nd, n, in, dy, dx, step);
    }
    if (rc == 0 && m->hook != NULL && nd->w_len + nd->b_len > 0) {
      /* Parameters are laid out in node order, so this node's segment
       * ends where the one reported before it begins. */
      rc = m->hook(m->hook_ctx, nd->w_off, ready - nd->w_off);
      ready = nd->w_off;
    }
    if (rc != 0)
      return rc;
    dy = dx;
    which ^= 1;
  }
  return 0;
}
