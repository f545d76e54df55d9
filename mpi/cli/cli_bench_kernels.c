/* `syncbn bench kernels`: every op and pass in every layout it has,
 * against a floor kernel measured in the same run that moves the same
 * compulsory bytes: a memcpy of the tensor for a pass that reads one tensor
 * and writes one (every forward, dropout's backward), a two-read-one-write
 * stream (dx = x + dy) for a backward that reads x and dy and writes dx.
 * floor_ratio = median time / median floor time. The floor stores through
 * the cache; the streaming floor, timed beside it, writes with
 * non-temporal stores and is the stricter limit (stream_floor_ratio;
 * cli_bench_floor.c says why both). No MPI. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cli_bench.h"

typedef struct kpass_s {
  sbn_op_t op;
  const char *pass;
  int backward, eval;
  int channels; /* has an NHWC layout */
} kpass_t;

static const kpass_t kpasses[] = {
    {SBN_OP_BATCHNORM, "train_fwd", 0, 0, 1},
    {SBN_OP_BATCHNORM, "train_bwd", 1, 0, 1},
    {SBN_OP_BATCHNORM, "eval_fwd", 0, 1, 1},
    {SBN_OP_LAYERNORM, "fwd", 0, 0, 0},
    {SBN_OP_LAYERNORM, "bwd", 1, 0, 0},
    {SBN_OP_INSTANCENORM, "fwd", 0, 0, 1},
    {SBN_OP_INSTANCENORM, "bwd", 1, 0, 1},
    {SBN_OP_GROUPNORM, "fwd", 0, 0, 1},
    {SBN_OP_GROUPNORM, "bwd", 1, 0, 1},
    {SBN_OP_DROPOUT, "fwd", 0, 0, 0},
    {SBN_OP_DROPOUT, "bwd", 1, 0, 0},
};
#define NKPASSES (sizeof kpasses / sizeof *kpasses)

/* One layer of the pass's op on shape d, with affine parameters of the
 * op's size (C, or the normalized shape for LayerNorm). */
typedef struct kbench_s {
  sbn_layer_t *l;
  sbn_bench_bufs_t u;
  float *w, *b, *dw, *db; /* LayerNorm's normalized-shape parameters */
} kbench_t;

static int kbench_make(const sbn_bench_opts_t *o, const kpass_t *k,
                       const sbn_tensor_desc_t *d, kbench_t *kb) {
  sbn_layer_params_t p;
  size_t c = d->dims[1], per = sbn__bench_numel(d) / d->dims[0];
  int rc;
  memset(kb, 0, sizeof *kb);
  sbn_layer_params_default(&p, k->op);
  p.channels = c;
  p.groups = c % 32 == 0 ? 32 : (c % 8 == 0 ? 8 : 1);
  p.norm_ndim = d->ndim - 1;
  for (int i = 1; i < d->ndim; i++)
    p.norm_shape[i - 1] = d->dims[i];
  p.p = 0.1;
  if ((rc = sbn_layer_create(&p, NULL, &kb->l)) != 0 ||
      (rc = sbn__bench_bufs_alloc(&kb->u, o, d, kb->l)) != 0)
    return rc;
  kb->w = kb->u.w;
  kb->b = kb->u.b;
  kb->dw = kb->u.dw;
  kb->db = kb->u.db;
  if (k->op == SBN_OP_LAYERNORM) {
    kb->w = malloc(per * 4);
    kb->b = calloc(per, 4);
    kb->dw = malloc(per * 4);
    kb->db = malloc(per * 4);
    if (!kb->w || !kb->b || !kb->dw || !kb->db)
      return sbn_set_error(SBN_ENOMEM, "bench: out of memory for %zu weights",
                           per);
    for (size_t i = 0; i < per; i++)
      kb->w[i] = 1.0f;
  }
  return 0;
}

static void kbench_free(kbench_t *kb) {
  if (kb->w != kb->u.w) {
    free(kb->w);
    free(kb->b);
    free(kb->dw);
    free(kb->db);
  }
  sbn_layer_destroy(kb->l);
  sbn__bench_bufs_free(&kb->u);
}

/* The pass on copy i; a backward reuses the saved state of the warm-up
 * forward (its statistics are of the same data), so that only the
 * backward itself is timed. */
static int kbench_run(const kpass_t *k, const sbn_tensor_desc_t *d,
                      kbench_t *kb, int i, int forward_too) {
  sbn_bench_bufs_t *u = &kb->u;
  size_t at = (size_t)i * u->stride;
  sbn_mode_t m = k->eval ? SBN_MODE_EVAL : SBN_MODE_TRAIN;
  sbn_state_t st = {u->rm, u->rv, 0};
  sbn_forward_args_t fa = {m,     d,           u->x + at, u->y + at,
                           kb->w, kb->b,       &st,       0,
                           u->ws, u->ws_bytes, u->saved,  u->saved_bytes};
  sbn_backward_args_t ba = {
      m,      d, u->x + at, u->dy + at,  u->dx + at, kb->w,         kb->dw,
      kb->db, 0, u->ws,     u->ws_bytes, u->saved,   u->saved_bytes};
  int rc = 0;
  if (!k->backward || forward_too)
    rc = sbn_forward(kb->l, &fa);
  if (rc == 0 && k->backward)
    rc = sbn_backward(kb->l, &ba);
  return rc;
}

/* Times the pass and its floor, interleaved, on rotating copies. */
static int kernel_one(const sbn_bench_opts_t *o, const kpass_t *k,
                      const sbn_tensor_desc_t *d, sbn_bench_out_t *out) {
  kbench_t kb;
  int reps = sbn__bench_reps(o, 20, 5), rc,
      two = k->backward && k->op != SBN_OP_DROPOUT;
  double *tk = calloc((size_t)reps, 8), *tf = calloc((size_t)reps, 8),
         *ts = calloc((size_t)reps, 8);
  if (!tk || !tf || !ts) {
    free(tk);
    free(tf);
    free(ts);
    return sbn_set_error(SBN_ENOMEM, "bench: out of memory for %d reps", reps);
  }
  if ((rc = kbench_make(o, k, d, &kb)) == 0)
    rc = kbench_run(k, d, &kb, 0, 1);
  sbn_bench_bufs_t *u = &kb.u;
  for (int it = -o->warmup, c = 0; rc == 0 && it < reps; it++) {
    /* The floor, the streaming floor and the pass, each on a copy that
     * none of the three touched last. */
    double t[4];
    t[0] = sbn__bench_now();
    for (int s = 0; s < 2; s++) {
      size_t at = (size_t)c * u->stride;
      float *dst = two ? u->dx + at : u->y + at;
      sbn__bench_floor(u->x + at, two ? u->dy + at : NULL, dst, u->n, s);
      t[s + 1] = sbn__bench_now();
      c = (c + 1) % u->copies;
    }
    rc = kbench_run(k, d, &kb, c, 0);
    t[3] = sbn__bench_now();
    c = (c + 1) % u->copies;
    if (it >= 0) {
      tf[it] = t[1] - t[0];
      ts[it] = t[2] - t[1];
      tk[it] = t[3] - t[2];
    }
  }
  if (rc == 0) {
    sbn_bench_rec_t r =
        sbn__bench_rec(o, "kernel", sbn_op_name(k->op), k->pass, d);
    double fm, fp;
    r.group_size = r.ranks = 1;
    sbn__bench_set_times(&r, tk, reps);
    sbn__bench_quantiles(tf, reps, &fm, &fp);
    r.bytes = (double)u->n * 4.0 * (two ? 3.0 : 2.0);
    r.gbps = r.bytes / (r.median_us * 1e-6) / 1e9;
    r.floor_us = fm * 1e6;
    r.floor_ratio = r.median_us / r.floor_us;
    sbn__bench_quantiles(ts, reps, &fm, &fp);
    r.stream_floor_us = fm * 1e6;
    r.stream_floor_ratio = r.median_us / r.stream_floor_us;
    rc = sbn__bench_push(out, &r);
    sbn__bench_progress(o, "done", &r);
  }
  kbench_free(&kb);
  free(tk);
  free(tf);
  free(ts);
  return rc;
}

int sbn__bench_kernels(const sbn_bench_opts_t *o, sbn_bench_out_t *out) {
  sbn_tensor_desc_t shapes[SBN_BENCH_MAX_SHAPES];
  int ns = 0, rc = 0;
  if (o->nshapes > 0) {
    ns = o->nshapes;
    memcpy(shapes, o->shapes, sizeof(sbn_tensor_desc_t) * (size_t)ns);
  } else {
    /* The design note's shape, then ResNet-50's at N = 8, then two odd
     * channel counts (--quick: the design note's and two of ResNet-50's). */
    static const int quick_shapes[] = {1, 8};
    shapes[ns++] = (sbn_tensor_desc_t){4, {32, 64, 32, 32}, SBN_LAYOUT_NCHW};
    for (int s = 0; s < (o->quick ? 2 : 9); s++) {
      const size_t *chw =
          sbn__bench_resnet_shapes[o->quick ? quick_shapes[s] : s];
      shapes[ns++] =
          (sbn_tensor_desc_t){4, {8, chw[0], chw[1], chw[2]}, SBN_LAYOUT_NCHW};
    }
    /* Odd channel counts, where vector code meets its tails: C = 17
     * (channels-last rows shorter than two vectors) and C = 1000 (wider
     * than one row of per-position parameters in some views). */
    if (!o->quick) {
      shapes[ns++] = (sbn_tensor_desc_t){4, {8, 17, 64, 64}, SBN_LAYOUT_NCHW};
      shapes[ns++] = (sbn_tensor_desc_t){4, {8, 1000, 14, 14}, SBN_LAYOUT_NCHW};
    }
  }
  sbn_op_t only = SBN_OP_COUNT;
  if (o->op != NULL)
    sbn_op_parse(o->op, &only);
  int lay = o->layouts ? o->layouts : 3;
  for (int s = 0; s < ns && rc == 0; s++)
    for (size_t k = 0; k < NKPASSES && rc == 0; k++)
      for (int l = 0; l < 2 && rc == 0; l++) {
        if (!(lay & (1 << l)) || (l == 1 && !kpasses[k].channels) ||
            (only != SBN_OP_COUNT && kpasses[k].op != only))
          continue;
        sbn_tensor_desc_t d = shapes[s];
        d.layout = l ? SBN_LAYOUT_NHWC : SBN_LAYOUT_NCHW;
        rc = kernel_one(o, &kpasses[k], &d, out);
      }
  return rc;
}
