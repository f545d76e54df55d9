/* `syncbn train`: a deterministic data-parallel trainer over MPI. Every
 * rank draws the same permutation of the training set each epoch, takes its
 * shard of each global batch, scales its loss as its share of the global
 * batch mean, and sums the gradients (and the loss) with one MPI_Allreduce
 * of one flat buffer per step. Nothing is allocated inside the step loop:
 * the model and every buffer are made before the first epoch. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cli.h"
#include "cli_train_int.h"
#include "syncbn_mpi.h"

#define EVAL_BATCH 500
#define SGD_MOMENTUM 0.9f
#define WEIGHT_DECAY 5e-4f
/* More than the parameter layers of either model: one request each. */
#define MAX_SEGMENTS 32

typedef struct run_s {
  train_opts_t o;
  int rank, size;
  uint64_t *counts; /* size entries */
  uint64_t batch;   /* global batch: the sum of counts */
  uint64_t offset;  /* this rank's first sample in a global batch */
  uint64_t nlocal;  /* this rank's shard of a global batch */
  /* Shallow copies of the caller's data (test.n cut to --test-subset),
   * never freed here. */
  sbn_dataset_t train, test;
  double mean, std;
  size_t ntrain, steps;
  double lr;
  sbn_nn_model_t *m;
  float *mom, *x, *dlogits;
  uint8_t *y;
  uint32_t *perm, *test_idx;
  train_epoch_t *hist;
  train_ckpt_meta_t meta;
  int ema_too;    /* also evaluate the running statistics before the last
                     --precise-bn (sbn__train_run's result) */
  double ema_acc; /* that accuracy */
  /* --overlap: the step's outstanding reductions and the seconds spent
   * starting, polling and finishing them. */
  MPI_Request reqs[MAX_SEGMENTS];
  int nreq;
  double ar_s;
} run_t;

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* A failure that every rank meets the same way (the data, the options):
 * rank 0 says it once. */
static int fail_all(const run_t *r, const char *what) {
  if (r->rank == 0)
    fprintf(stderr, "syncbn train: %s%s%s\n", what, *what ? ": " : "",
            sbn_last_error());
  return 1;
}

/* A failure of one rank inside the loop, where the others would wait in a
 * collective forever: it ends the job. */
static void fail_abort(const run_t *r, const char *what) {
  fprintf(stderr, "syncbn train: rank %d: %s: %s\n", r->rank, what,
          sbn_last_error());
  MPI_Abort(MPI_COMM_WORLD, 1);
}

static int make_comm(void *ctx, const sbn_layer_params_t *p, sbn_comm_t **out) {
  const run_t *r = ctx;
  return sbn_mpi_comm_create(MPI_COMM_WORLD, (int)r->o.group_size, p, out);
}

/* The shard sizes: --counts (one per rank) or --batch on every rank. */
static int setup_counts(run_t *r) {
  if (r->o.counts != NULL && r->o.ncounts != (size_t)r->size) {
    if (r->rank == 0)
      fprintf(stderr,
              "syncbn train: --counts: %zu sizes for %d ranks (give one per "
              "rank)\n",
              r->o.ncounts, r->size);
    return 2;
  }
  if ((r->counts = calloc((size_t)r->size, sizeof *r->counts)) == NULL)
    return 1;
  r->batch = 0;
  for (int i = 0; i < r->size; i++) {
    r->counts[i] = r->o.counts ? r->o.counts[i] : r->o.batch;
    if (i < r->rank)
      r->offset += r->counts[i];
    r->batch += r->counts[i];
  }
  r->nlocal = r->counts[r->rank];
  int bn = r->o.norm == SBN_NN_NORM_BN || r->o.norm == SBN_NN_NORM_SYNCBN;
  if (r->batch < (bn ? 2u : 1u)) {
    if (r->rank == 0)
      fprintf(stderr, "syncbn train: %s: the global batch %s\n",
              r->o.counts ? "--counts" : "--batch",
              bn ? "must hold at least 2 samples (BatchNorm needs two)"
                 : "is empty");
    return 2;
  }
  return 0;
}

int sbn__train_load_data(const char *d, int rank, train_data_t *data) {
  char ti[4096], tl[4096], vi[4096], vl[4096];
  memset(data, 0, sizeof *data);
  snprintf(ti, sizeof ti, "%s/train-images-idx3-ubyte.gz", d);
  snprintf(tl, sizeof tl, "%s/train-labels-idx1-ubyte.gz", d);
  snprintf(vi, sizeof vi, "%s/t10k-images-idx3-ubyte.gz", d);
  snprintf(vl, sizeof vl, "%s/t10k-labels-idx1-ubyte.gz", d);
  if (access(ti, F_OK) != 0 && rank == 0)
    fprintf(stderr,
            "syncbn train: no Fashion-MNIST in %s: install Debian's "
            "dataset-fashion-mnist (apt-get install dataset-fashion-mnist) "
            "or pass --data DIR\n",
            d);
  int rc = sbn_idx_load(ti, tl, &data->train);
  if (rc == 0)
    rc = sbn_idx_load(vi, vl, &data->test);
  if (rc == 0 && (data->train.rows != 28 || data->train.cols != 28 ||
                  data->test.rows != 28 || data->test.cols != 28))
    rc = sbn_set_error(SBN_EFORMAT, "%s: images are not 28 x 28", d);
  if (rc != 0) {
    if (rank == 0)
      fprintf(stderr, "syncbn: data: %s\n", sbn_last_error());
    sbn__train_data_free(data);
    return 1;
  }
  /* The training set's moments standardize both sets. */
  sbn_dataset_moments(&data->train, &data->mean, &data->std);
  return 0;
}

void sbn__train_data_free(train_data_t *data) {
  sbn_dataset_free(&data->train);
  sbn_dataset_free(&data->test);
}

/* The run's view of the data: the subsets and the steps per epoch. */
static int fit_data(run_t *r, const train_data_t *data) {
  r->train = data->train;
  r->test = data->test;
  r->mean = data->mean;
  r->std = data->std;
  r->ntrain = r->train.n;
  if (r->o.subset && r->o.subset < r->ntrain)
    r->ntrain = (size_t)r->o.subset;
  if (r->o.test_subset && r->o.test_subset < r->test.n)
    r->test.n = (size_t)r->o.test_subset;
  r->steps = r->ntrain / r->batch;
  if (r->o.precise_bn > r->ntrain ||
      (r->o.precise_bn && r->o.precise_bn < 2 * (uint64_t)r->size)) {
    if (r->rank == 0)
      fprintf(stderr,
              "syncbn train: --precise-bn: %llu samples is not in 2 x %d "
              "ranks .. %zu training images\n",
              (unsigned long long)r->o.precise_bn, r->size, r->ntrain);
    return 2;
  }
  if (r->steps == 0) {
    if (r->rank == 0)
      fprintf(stderr,
              "syncbn train: --batch: the global batch %llu is larger than "
              "the %zu training images\n",
              (unsigned long long)r->batch, r->ntrain);
    return 2;
  }
  return 0;
}

/* FNV-1a over every option that changes the numbers, so that a resume
 * with other options is refused instead of silently diverging. */
static uint64_t fingerprint(const run_t *r) {
  uint64_t h = 1469598103934665603ull;
  double f[] = {(double)r->o.arch,
                (double)r->o.norm,
                (double)r->o.layout,
                (double)r->o.groups,
                (double)r->o.group_size,
                (double)r->o.ghost_batch,
                r->o.dropout,
                r->o.eps,
                r->o.momentum,
                r->lr,
                (double)r->o.epochs,
                (double)r->o.seed,
                (double)r->ntrain,
                (double)r->size,
                (double)sbn_nn_param_count(r->m)};
  const unsigned char *b = (const unsigned char *)f;
  for (size_t i = 0; i < sizeof f; i++)
    h = (h ^ b[i]) * 1099511628211ull;
  for (int i = 0; i < r->size; i++)
    h = (h ^ r->counts[i]) * 1099511628211ull;
  return h;
}

static int overlap_hook(void *ctx, size_t off, size_t len);

static int setup_model(run_t *r) {
  sbn_nn_config_t cfg = {0};
  cfg.arch = r->o.arch;
  cfg.norm = r->o.norm;
  cfg.layout = r->o.layout;
  cfg.groups = (size_t)r->o.groups;
  cfg.ghost_batch = (size_t)r->o.ghost_batch;
  cfg.eps = r->o.eps;
  cfg.momentum = r->o.momentum;
  cfg.dropout = r->o.dropout;
  cfg.seed = r->o.seed;
  cfg.world_rank = r->rank;
  cfg.max_batch = r->nlocal > EVAL_BATCH ? (size_t)r->nlocal : EVAL_BATCH;
  cfg.make_comm = make_comm;
  cfg.make_comm_ctx = r;
  if (sbn_nn_model_create(&cfg, &r->m) != 0)
    return fail_all(r, "model");
  if (r->o.overlap)
    sbn_nn_set_grad_hook(r->m, overlap_hook, r);
  size_t np = sbn_nn_param_count(r->m), nb = cfg.max_batch;
  r->mom = calloc(np, sizeof *r->mom);
  r->x = malloc(nb * 784 * sizeof *r->x);
  r->dlogits = malloc(nb * 10 * sizeof *r->dlogits);
  r->y = malloc(nb);
  r->perm = malloc(r->ntrain * sizeof *r->perm);
  r->test_idx = malloc(r->test.n * sizeof *r->test_idx);
  r->hist = calloc((size_t)r->o.epochs, sizeof *r->hist);
  if (!r->mom || !r->x || !r->dlogits || !r->y || !r->perm || !r->test_idx ||
      !r->hist) {
    sbn_set_error(SBN_ENOMEM, "model: out of memory");
    return fail_all(r, "");
  }
  for (size_t i = 0; i < r->test.n; i++)
    r->test_idx[i] = (uint32_t)i;
  r->lr = r->o.lr > 0 ? r->o.lr : 0.05 * sqrt((double)r->batch / 32.0);
  r->meta.fingerprint = fingerprint(r);
  r->meta.history = r->hist;
  return 0;
}

/* --overlap: backward reports each layer's finished gradients; their
 * reduction starts at once, and polling the ones already started moves
 * them on (Open MPI has no progress thread). The step's loss, after the
 * parameters, rides with the last layer's segment, reported first. */
static int overlap_hook(void *ctx, size_t off, size_t len) {
  run_t *r = ctx;
  float *g = sbn_nn_grads(r->m);
  if (off + len == sbn_nn_param_count(r->m))
    len++;
  if (r->nreq == MAX_SEGMENTS)
    return sbn_set_error(SBN_ELIMIT, "overlap: more than %d segments",
                         MAX_SEGMENTS);
  double t = now();
  int flag, mrc = MPI_Iallreduce(MPI_IN_PLACE, g + off, (int)len, MPI_FLOAT,
                                 MPI_SUM, MPI_COMM_WORLD, &r->reqs[r->nreq]);
  if (mrc == MPI_SUCCESS) {
    r->nreq++;
    mrc = MPI_Testall(r->nreq, r->reqs, &flag, MPI_STATUSES_IGNORE);
  }
  r->ar_s += now() - t;
  return mrc == MPI_SUCCESS ? 0 : sbn_mpi_error(mrc, "MPI_Iallreduce");
}

/* Sums the gradients and the loss over all ranks: waits for the
 * segments started during backward, or reduces the whole buffer at once. */
static void reduce_grads(run_t *r) {
  size_t np = sbn_nn_param_count(r->m);
  double t = now();
  int mrc;
  if (r->o.overlap) {
    mrc = MPI_Waitall(r->nreq, r->reqs, MPI_STATUSES_IGNORE);
    r->nreq = 0;
  } else {
    mrc = MPI_Allreduce(MPI_IN_PLACE, sbn_nn_grads(r->m), (int)np + 1,
                        MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
  }
  r->ar_s += now() - t;
  if (mrc != MPI_SUCCESS) {
    sbn_mpi_error(mrc, "MPI_Allreduce");
    fail_abort(r, "gradients");
  }
}

static void progress(const run_t *r, uint64_t epoch, size_t step, double t0,
                     double loss) {
  const int width = 30;
  int done = (int)((double)width * (double)step / (double)r->steps);
  double rate = (double)(step * r->batch) / (now() - t0 + 1e-9);
  printf("\repoch %llu/%llu [%.*s%*s] %zu/%zu  %.0f img/s  loss %.4f",
         (unsigned long long)epoch + 1, (unsigned long long)r->o.epochs, done,
         "##############################", width - done, "", step, r->steps,
         rate, loss);
  fflush(stdout);
}

/* One epoch of training; fills ep->train_loss, and r->ar_s with the
 * seconds spent in the gradient allreduce. */
static int train_epoch(run_t *r, uint64_t epoch, train_epoch_t *ep) {
  size_t np = sbn_nn_param_count(r->m);
  float *params = sbn_nn_params(r->m), *g = sbn_nn_grads(r->m);
  sbn_onecycle_t sched = {r->lr, 0.3, 25.0, 1e4, r->o.epochs * r->steps};
  int bar = r->rank == 0 && !r->o.no_progress && isatty(STDOUT_FILENO);
  size_t every = r->steps / 50 ? r->steps / 50 : 1;
  double t0 = now(), loss_sum = 0;
  r->ar_s = 0;
  sbn_nn_permutation(r->perm, r->ntrain, r->o.seed, epoch);
  for (size_t s = 0; s < r->steps; s++) {
    size_t n = (size_t)r->nlocal;
    const float *logits;
    double loss = 0;
    uint64_t hits = 0;
    sbn_dataset_gather(&r->train, r->perm + s * r->batch + r->offset, n,
                       r->mean, r->std, r->x, r->y);
    if (sbn_nn_forward(r->m, SBN_MODE_TRAIN, n, r->x, r->meta.step, &logits) !=
            0 ||
        sbn_nn_xent(n, 10, logits, r->y, (float)(1.0 / (double)r->batch),
                    r->dlogits, &loss, &hits) != 0)
      fail_abort(r, "step");
    /* The loss rides along in the gradients' allreduce: one per step. */
    g[np] = (float)(loss / (double)r->batch);
    if (sbn_nn_backward(r->m, n, r->x, r->dlogits, r->meta.step) != 0)
      fail_abort(r, "step");
    reduce_grads(r);
    loss_sum += g[np];
    float lr = (float)sbn_onecycle_lr(&sched, r->meta.step);
    sbn_nn_sgd(np, params, r->mom, g, lr, SGD_MOMENTUM, WEIGHT_DECAY);
    r->meta.step++;
    if (bar && ((s + 1) % every == 0 || s + 1 == r->steps))
      progress(r, epoch, s + 1, t0, loss_sum / (double)(s + 1));
  }
  if (bar)
    printf("\r\033[K");
  ep->train_loss = loss_sum / (double)r->steps;
  return 0;
}

/* Running statistics that differ between ranks (BatchNorm per rank, ghost
 * batches, which never reduce, or SyncBN in groups smaller than the job)
 * are replaced by rank 0's before
 * evaluating and saving, as PyTorch's DistributedDataParallel broadcasts
 * rank 0's buffers: rank 0's own statistics never change by this, so the
 * evaluated model is rank 0's on every rank. */
static void sync_stats(run_t *r) {
  int per_rank = r->o.norm == SBN_NN_NORM_BN || r->o.ghost_batch > 0 ||
                 (r->o.norm == SBN_NN_NORM_SYNCBN && r->o.group_size > 0 &&
                  r->o.group_size < (uint64_t)r->size);
  size_t ns = sbn_nn_stats_count(r->m);
  if (!per_rank || r->size == 1 || ns == 0)
    return;
  int mrc =
      MPI_Bcast(sbn_nn_stats(r->m), (int)ns, MPI_FLOAT, 0, MPI_COMM_WORLD);
  if (mrc != MPI_SUCCESS) {
    sbn_mpi_error(mrc, "MPI_Bcast");
    fail_abort(r, "running statistics");
  }
}

/* --precise-bn N: the first N samples of this epoch's order, each rank
 * on its slice in chunks of its training shard (at least 2), then one
 * reduction of every BatchNorm's records over all ranks. A chunk that
 * would leave a single sample behind takes it along. */
static void precise_bn(run_t *r) {
  size_t n = (size_t)r->o.precise_bn;
  size_t lo = n * (size_t)r->rank / (size_t)r->size;
  size_t hi = n * (size_t)(r->rank + 1) / (size_t)r->size;
  size_t max = sbn_nn_max_batch(r->m);
  size_t chunk = r->nlocal > 2 ? (size_t)r->nlocal : 2;
  chunk = chunk < max ? chunk : max - 1;
  sbn_nn_precise_begin(r->m);
  for (size_t i = lo; i < hi;) {
    size_t k = hi - i < chunk ? hi - i : chunk;
    if (hi - i - k == 1)
      k++;
    sbn_dataset_gather(&r->train, r->perm + i, k, r->mean, r->std, r->x, r->y);
    if (sbn_nn_forward_precise(r->m, k, r->x) != 0)
      fail_abort(r, "--precise-bn");
    i += k;
  }
  MPI_Datatype type;
  MPI_Op op;
  if (sbn_mpi_rec_acquire(&type, &op) != 0)
    fail_abort(r, "--precise-bn");
  int mrc =
      MPI_Allreduce(MPI_IN_PLACE, sbn_nn_precise_records(r->m),
                    (int)sbn_nn_precise_count(r->m), type, op, MPI_COMM_WORLD);
  sbn_mpi_rec_release();
  if (mrc != MPI_SUCCESS) {
    sbn_mpi_error(mrc, "MPI_Allreduce");
    fail_abort(r, "--precise-bn");
  }
  sbn_nn_precise_finish(r->m);
}

/* Test loss and accuracy in eval mode, each rank on its slice of the test
 * set, summed over ranks. */
static void evaluate(run_t *r, train_epoch_t *ep) {
  size_t lo = r->test.n * (size_t)r->rank / (size_t)r->size;
  size_t hi = r->test.n * (size_t)(r->rank + 1) / (size_t)r->size;
  double sums[2] = {0, 0};
  for (size_t i = lo; i < hi; i += EVAL_BATCH) {
    size_t n = hi - i < EVAL_BATCH ? hi - i : EVAL_BATCH;
    const float *logits;
    uint64_t hits = 0;
    sbn_dataset_gather(&r->test, r->test_idx + i, n, r->mean, r->std, r->x,
                       r->y);
    if (sbn_nn_forward(r->m, SBN_MODE_EVAL, n, r->x, 0, &logits) != 0 ||
        sbn_nn_xent(n, 10, logits, r->y, 0, NULL, &sums[0], &hits) != 0)
      fail_abort(r, "evaluation");
    sums[1] += (double)hits;
  }
  int mrc =
      MPI_Allreduce(MPI_IN_PLACE, sums, 2, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
  if (mrc != MPI_SUCCESS) {
    sbn_mpi_error(mrc, "MPI_Allreduce");
    fail_abort(r, "evaluation");
  }
  ep->test_loss = sums[0] / (double)r->test.n;
  ep->test_acc = sums[1] / (double)r->test.n;
}

/* Rank 0 writes the checkpoint; every rank learns whether it worked. */
static int save_checkpoint(run_t *r) {
  int rc = 0;
  if (r->rank == 0 &&
      sbn__train_ckpt_save(r->o.checkpoint, r->m, r->mom, &r->meta) != 0) {
    fprintf(stderr, "syncbn train: checkpoint: %s\n", sbn_last_error());
    rc = 1;
  }
  MPI_Bcast(&rc, 1, MPI_INT, 0, MPI_COMM_WORLD);
  return rc;
}

static int run_epochs(run_t *r) {
  for (uint64_t e = r->meta.epochs_done; e < r->o.epochs; e++) {
    train_epoch_t *ep = &r->hist[e];
    double t0 = now();
    train_epoch(r, e, ep);
    sync_stats(r);
    if (r->o.precise_bn && r->ema_too && e + 1 == r->o.epochs) {
      /* The study's comparison: the running statistics' accuracy first. */
      train_epoch_t ema;
      evaluate(r, &ema);
      r->ema_acc = ema.test_acc;
    }
    if (r->o.precise_bn)
      precise_bn(r);
    evaluate(r, ep);
    ep->wall_s = now() - t0;
    ep->allreduce_share = r->ar_s / ep->wall_s;
    r->meta.epochs_done = e + 1;
    if (r->rank == 0 && !r->o.quiet) {
      printf(
          "epoch %llu/%llu  train loss %.4f  test loss %.4f  test "
          "accuracy %.2f%%  %.2f s  allreduce %.1f%%\n",
          (unsigned long long)e + 1, (unsigned long long)r->o.epochs,
          ep->train_loss, ep->test_loss, 100 * ep->test_acc, ep->wall_s,
          100 * ep->allreduce_share);
      fflush(stdout);
    }
    if (r->o.checkpoint != NULL && save_checkpoint(r) != 0)
      return 1;
    if (r->o.stop_after == e + 1)
      break;
  }
  return 0;
}

static int write_outputs(const run_t *r) {
  if (r->rank != 0)
    return 0;
  size_t n = (size_t)r->meta.epochs_done;
  if (r->o.json && sbn__train_write_json(r->o.json, &r->o, r->hist, n) != 0)
    return fail_all(r, "--json");
  if (r->o.csv && sbn__train_write_csv(r->o.csv, r->hist, n) != 0)
    return fail_all(r, "--csv");
  if (!r->o.quiet)
    printf("test accuracy %.2f%%\n", 100 * r->hist[n - 1].test_acc);
  return 0;
}

static int train(run_t *r, const train_data_t *data) {
  int rc = setup_counts(r);
  if (rc == 0)
    rc = fit_data(r, data);
  if (rc == 0)
    rc = setup_model(r);
  if (rc == 0 && r->o.resume != NULL &&
      sbn__train_ckpt_load(r->o.resume, r->m, r->mom, &r->meta, r->o.epochs) !=
          0)
    rc = fail_all(r, "--resume");
  if (rc == 0 && r->meta.epochs_done >= r->o.epochs) {
    if (r->rank == 0)
      fprintf(stderr,
              "syncbn train: --resume: the run already has its %llu "
              "epochs\n",
              (unsigned long long)r->o.epochs);
    rc = 2;
  }
  if (rc == 0)
    rc = run_epochs(r);
  if (rc == 0)
    rc = write_outputs(r);
  return rc;
}

static void cleanup(run_t *r) {
  sbn_nn_model_destroy(r->m);
  free(r->counts);
  free(r->mom);
  free(r->x);
  free(r->dlogits);
  free(r->y);
  free(r->perm);
  free(r->test_idx);
  free(r->hist);
}

int sbn__train_run(const train_opts_t *o, const train_data_t *data,
                   train_result_t *res) {
  run_t r;
  memset(&r, 0, sizeof r);
  r.o = *o;
  r.ema_too = res != NULL;
  MPI_Comm_rank(MPI_COMM_WORLD, &r.rank);
  MPI_Comm_size(MPI_COMM_WORLD, &r.size);
  int rc = train(&r, data);
  if (rc == 0 && res != NULL) {
    res->last = r.hist[r.meta.epochs_done - 1];
    res->ema_acc = r.o.precise_bn ? r.ema_acc : res->last.test_acc;
    res->global_batch = r.batch;
    res->steps = r.steps;
  }
  cleanup(&r);
  return rc;
}

int sbn_cli_train(int argc, char **argv) {
  run_t r;
  memset(&r, 0, sizeof r);
  int rc = sbn__train_parse(argc, argv, &r.o);
  if (rc != 0 || r.o.help) {
    sbn__train_opts_free(&r.o);
    return rc;
  }
  if (MPI_Init(&argc, &argv) != MPI_SUCCESS) {
    fprintf(stderr, "syncbn train: MPI_Init failed\n");
    sbn__train_opts_free(&r.o);
    return 1;
  }
  MPI_Comm_rank(MPI_COMM_WORLD, &r.rank);
  MPI_Comm_size(MPI_COMM_WORLD, &r.size);
  sbn_nn_set_threads((int)r.o.threads);
  train_data_t data;
  rc = sbn__train_load_data(r.o.data, r.rank, &data);
  if (rc == 0)
    rc = train(&r, &data);
  cleanup(&r);
  sbn__train_data_free(&data);
  sbn__train_opts_free(&r.o);
  MPI_Finalize();
  return rc;
}
