/* `syncbn bench service`: the layer measurement through syncbnd, one
 * worker per rank, each bench rank a client of the worker of its own rank
 * (the way a non-MPI trainer uses the service). Per configuration and rep,
 * interleaved: a full-tensor forward + backward of a syncbatchnorm layer
 * through the service (service_full) against SyncBN forward + backward in
 * this process (sync); and the stats path, a `stats` + `stats_backward`
 * request pair (service_stats), against its in-process equivalent, the two
 * record allreduces of SyncBN (inproc_stats); and the documented fast path
 * alone, one `stats` entry (service_stats1) against one bare allreduce of
 * the same C records (allreduce1), whose target_us is 1.5 x the allreduce
 * + 50 us (target_ratio <= 1 meets it). hop_us is the service's time minus
 * the in-process time, hop_ratio their quotient; agree_bytes_round is what
 * each worker sent per agreement round to agree (bit sets and gathered
 * lists, from its metrics), the largest over the ranks. The full path's
 * copy floor is unix_echo: x and dy sent through a Unix socket to a thread
 * that sends them back (into y and dx); service_full's floor_us is sync +
 * unix_echo, floor_ratio service_full over it. service_shm is the same
 * syncbatchnorm step as service_full with x and dy in a shared-memory
 * region (protocol 6) and y and dx written into it by the worker, against
 * the in-process step (sync): hop_ratio is their quotient, target_us
 * 1.3 x sync (target_ratio <= 1 meets it). */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "cli_bench.h"
#include "cli_bench_echo.h"
#include "cli_bench_job.h"
#include "client.h"
#include "syncbn_mpi.h"

enum {
  SV_FULL,
  SV_SYNC,
  SV_STATS,
  SV_INPROC_STATS,
  SV_STATS1,
  SV_AR1,
  SV_ECHO,
  SV_SHM,
  SV_COUNT
};

/* One configuration's connection-side state. */
typedef struct svc_cfg_s {
  sbn_client_t *c;
  uint64_t layer;
  uint64_t *step; /* shared by all configurations: steps only grow */
  sbn_layer_t *sync;
  sbn_comm_t *comm;
  sbn_bench_bufs_t u;
  double *mean, *m2, *gsum, *gsum2; /* C doubles each */
  sbn_rec_t *recs;
  sbn_bench_echo_t echo;
  sbn_client_shm_t *shm; /* x, dy, y, dx at 0, 1, 2, 3 x shm_stride */
  size_t shm_stride;
} svc_cfg_t;

/* The copy floor of service_full: x out and y back, dy out and dx back,
 * through the echo. */
static int svc_echo(svc_cfg_t *s, int k) {
  size_t at = (size_t)k * s->u.stride, bytes = s->u.n * sizeof(float);
  int rc = sbn__bench_echo(&s->echo, s->u.x + at, bytes, s->u.y + at);
  if (rc == 0)
    rc = sbn__bench_echo(&s->echo, s->u.dy + at, bytes, s->u.dx + at);
  return rc;
}

static int svc_full(svc_cfg_t *s, const sbn_tensor_desc_t *d, int k) {
  size_t at = (size_t)k * s->u.stride;
  uint64_t step = (*s->step)++;
  int rc = sbn_client_forward(s->c, s->layer, step, 1, d, s->u.x + at, NULL,
                              NULL, 0, s->u.y + at);
  if (rc == 0)
    rc = sbn_client_backward(s->c, s->layer, step, d, s->u.dy + at,
                             s->u.dx + at, s->u.dw, s->u.db, s->u.c);
  return rc;
}

/* The shared-memory step: the tensors live in the region (a trainer
 * writes x there and reads y there), so nothing is copied here. x stays
 * at its offset until the backward (x_stays), so the worker keeps a
 * reference to it instead of copying it for the backward. */
static int svc_shm(svc_cfg_t *s, const sbn_tensor_desc_t *d) {
  uint64_t step = (*s->step)++, b = s->shm_stride;
  int rc =
      sbn_client_shm_forward_flags(s->c, s->layer, step, 1, d, s->shm->region,
                                   0, 2 * b, SBN_CLIENT_SHM_X_STAYS);
  if (rc == 0)
    rc = sbn_client_shm_backward(s->c, s->layer, step, d, s->shm->region, b,
                                 3 * b, s->u.dw, s->u.db, s->u.c);
  return rc;
}

/* The stride of the four tensors of a step of n floats in the region. */
static size_t svc_shm_stride(size_t n) {
  return (n * sizeof(float) + 4095) & ~(size_t)4095;
}

/* Fills x and dy of this configuration into the connection's region
 * (attached once, for the largest configuration). */
static void svc_shm_setup(svc_cfg_t *s, sbn_client_shm_t *shm) {
  size_t bytes = s->u.n * sizeof(float);
  s->shm = shm;
  s->shm_stride = svc_shm_stride(s->u.n);
  memcpy(shm->base, s->u.x, bytes);
  memcpy((char *)shm->base + s->shm_stride, s->u.dy, bytes);
}

static int svc_stats(svc_cfg_t *s, const sbn_tensor_desc_t *d) {
  uint64_t step = (*s->step)++;
  uint64_t count = sbn__bench_numel(d) / d->dims[1];
  sbn_client_stats_t st = {NULL, s->gsum, NULL, NULL, NULL};
  int rc = sbn_client_stats(s->c, s->layer, step, s->u.c, count, NULL, s->mean,
                            s->m2, &st);
  if (rc == 0)
    rc = sbn_client_stats_backward(s->c, s->layer, step, s->u.c, s->mean, s->m2,
                                   s->gsum, s->gsum2);
  return rc;
}

/* One stats entry: the fast path for a client computing locally, which
 * takes back what it normalizes with, mean and invstd (the client then
 * asks for those two vectors only). */
static int svc_stats1(svc_cfg_t *s, const sbn_tensor_desc_t *d) {
  uint64_t step = (*s->step)++;
  uint64_t count = sbn__bench_numel(d) / d->dims[1];
  sbn_client_stats_t st = {NULL, s->gsum, NULL, NULL, s->gsum2};
  return sbn_client_stats(s->c, s->layer, step, s->u.c, count, NULL, s->mean,
                          s->m2, &st);
}

/* What the stats pair stands for in process: SyncBN's two reductions of
 * C records (moments forward, sums backward); passes 1 for one. */
static int inproc_stats(svc_cfg_t *s, int passes) {
  for (int pass = 0; pass < passes; pass++) {
    for (size_t c = 0; c < s->u.c; c++) {
      s->recs[c].tag = pass ? SBN_REC_SUM : SBN_REC_MOMENTS;
      s->recs[c].v[0] = 10;
      s->recs[c].v[1] = s->mean[c];
      s->recs[c].v[2] = s->m2[c];
    }
    int rc = sbn_comm_allreduce(s->comm, s->recs, s->u.c);
    if (rc != 0)
      return rc;
  }
  return 0;
}

/* --gap-us: the rank keeps its core busy for us microseconds, as a
 * trainer computing between two layers' calls does. The worker meanwhile
 * ends its poll after a reply (syncbnd --poll-us) and sleeps, so the call
 * that follows pays for waking it; the in-process variants get the same
 * gap, so the ratios compare like with like. */
static void svc_gap(int us) {
  if (us <= 0)
    return;
  double end = sbn__bench_now() + us * 1e-6;
  while (sbn__bench_now() < end) {
  }
}

static int svc_reps(const sbn_bench_opts_t *o, svc_cfg_t *s,
                    const sbn_tensor_desc_t *d, int reps, double *t[SV_COUNT]) {
  int rc = 0, k = 0;
  for (int it = -o->warmup; it < reps && rc == 0; it++)
    for (int v = 0; v < SV_COUNT && rc == 0; v++) {
      if ((rc = sbn__bench_quiet_barrier()) != 0)
        break;
      svc_gap(o->gap_us);
      double t0 = sbn__bench_now();
      if (v == SV_FULL)
        rc = svc_full(s, d, k);
      else if (v == SV_SYNC)
        rc = sbn__bench_fwd_bwd(s->sync, d, &s->u, k, (uint64_t)it);
      else if (v == SV_STATS)
        rc = svc_stats(s, d);
      else if (v == SV_INPROC_STATS)
        rc = inproc_stats(s, 2);
      else if (v == SV_STATS1)
        rc = svc_stats1(s, d);
      else if (v == SV_AR1)
        rc = inproc_stats(s, 1);
      else if (v == SV_SHM)
        rc = svc_shm(s, d);
      else
        rc = svc_echo(s, k);
      double t1 = sbn__bench_now();
      k = (k + 1) % s->u.copies;
      if (it >= 0)
        t[v][it] = t1 - t0;
    }
  for (int v = 0; v < SV_COUNT && rc == 0; v++)
    rc = sbn__bench_max_over_ranks(MPI_COMM_WORLD, t[v], reps);
  return rc;
}

static int svc_push(const sbn_bench_opts_t *o, const sbn_tensor_desc_t *d,
                    double *t[SV_COUNT], int reps, double agree,
                    sbn_bench_out_t *out) {
  static const char *const names[SV_COUNT] = {
      "service_full",   "sync",       "service_stats", "inproc_stats",
      "service_stats1", "allreduce1", "unix_echo",     "service_shm"};
  static const char *const passes[SV_COUNT] = {
      "fwd+bwd", "fwd+bwd",   "stats+stats_backward", "2x_allreduce",
      "stats",   "allreduce", "x+dy_echoed",          "fwd+bwd"};
  sbn_bench_rec_t r[SV_COUNT];
  int rc = 0;
  for (int v = 0; v < SV_COUNT; v++) {
    r[v] = sbn__bench_rec(o, names[v], "batchnorm", passes[v], d);
    sbn__bench_set_times(&r[v], t[v], reps);
  }
  for (int v = 0; v < SV_ECHO; v += 2) {
    r[v].hop_us = r[v].median_us - r[v + 1].median_us;
    r[v].hop_ratio = r[v].median_us / r[v + 1].median_us;
  }
  /* The full path's floor: the in-process step plus moving the same bytes
   * through a Unix socket and back. */
  r[SV_FULL].floor_us = r[SV_SYNC].median_us + r[SV_ECHO].median_us;
  r[SV_FULL].floor_ratio = r[SV_FULL].median_us / r[SV_FULL].floor_us;
  r[SV_STATS1].target_us = 1.5 * r[SV_AR1].median_us + 50.0;
  r[SV_STATS1].target_ratio = r[SV_STATS1].median_us / r[SV_STATS1].target_us;
  r[SV_SHM].hop_us = r[SV_SHM].median_us - r[SV_SYNC].median_us;
  r[SV_SHM].hop_ratio = r[SV_SHM].median_us / r[SV_SYNC].median_us;
  r[SV_SHM].target_us = 1.3 * r[SV_SYNC].median_us;
  r[SV_SHM].target_ratio = r[SV_SHM].median_us / r[SV_SHM].target_us;
  r[SV_STATS].agree_bytes_round = agree;
  r[SV_STATS1].agree_bytes_round = agree;
  for (int v = 0; v < SV_COUNT && rc == 0; v++)
    rc = sbn__bench_push(out, &r[v]);
  sbn__bench_progress(o, "done", &r[0]);
  return rc;
}

/* Called before the reps (agree NAN) and after them: then *agree becomes
 * the agreement bytes per round this worker sent meanwhile, the largest
 * over the ranks. */
static int svc_agree_bytes(sbn_client_t *c, double *agree) {
  static double b0, r0;
  sbn_client_metrics_t m;
  double per;
  int rc = sbn_client_metrics(c, &m);
  if (rc != 0)
    return rc;
  if (isnan(*agree)) {
    b0 = (double)m.agree_bytes;
    r0 = (double)m.rounds;
    *agree = 0;
    return 0;
  }
  per = m.rounds > r0 ? ((double)m.agree_bytes - b0) / ((double)m.rounds - r0)
                      : 0;
  MPI_Allreduce(&per, agree, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return 0;
}

static void cfg_free(svc_cfg_t *s) {
  sbn__bench_echo_stop(&s->echo);
  sbn_layer_destroy(s->sync);
  sbn_comm_destroy(s->comm);
  sbn__bench_bufs_free(&s->u);
  free(s->mean);
  free(s->m2);
  free(s->gsum);
  free(s->gsum2);
  free(s->recs);
}

static int svc_one(const sbn_bench_opts_t *o, sbn_client_t *c,
                   sbn_client_shm_t *shm, unsigned long long run, int idx,
                   uint64_t *step, const sbn_tensor_desc_t *d,
                   sbn_bench_out_t *out) {
  sbn_layer_params_t p;
  svc_cfg_t s;
  char name[64];
  int reps = sbn__bench_reps(o, 20, 5), rc;
  double agree = NAN;
  size_t C = d->dims[1];
  double *all = calloc((size_t)(SV_COUNT * reps), sizeof *all), *t[SV_COUNT];
  memset(&s, 0, sizeof s);
  s.echo.fd[0] = s.echo.fd[1] = -1;
  s.c = c;
  s.step = step;
  s.mean = calloc(C, 8);
  s.m2 = calloc(C, 8);
  s.gsum = calloc(C, 8);
  s.gsum2 = calloc(C, 8);
  s.recs = calloc(C, sizeof *s.recs);
  if (!all || !s.mean || !s.m2 || !s.gsum || !s.gsum2 || !s.recs) {
    rc = sbn_set_error(SBN_ENOMEM, "bench: out of memory for %zu channels", C);
    goto done;
  }
  for (int v = 0; v < SV_COUNT; v++)
    t[v] = all + (size_t)(v * reps);
  for (size_t i = 0; i < C; i++) {
    s.mean[i] = 0.25 * (double)(i % 5);
    s.m2[i] = 1.0 + (double)(i % 3);
  }
  sbn_layer_params_default(&p, SBN_OP_BATCHNORM);
  p.channels = C;
  /* A job given by --socket-dir keeps the layers of earlier runs, whose
   * steps are ahead of this run's: every run registers its own names. */
  snprintf(name, sizeof name, "bench-%llx-%d", run, idx);
  if ((rc = sbn_client_register(c, name, "syncbatchnorm", &p,
                                (uint32_t)o->group_size, &s.layer, NULL)) !=
          0 ||
      (rc = sbn_mpi_comm_create(MPI_COMM_WORLD, o->group_size, &p, &s.comm)) !=
          0 ||
      (rc = sbn_layer_create(&p, s.comm, &s.sync)) != 0 ||
      (rc = sbn__bench_bufs_alloc(&s.u, o, d, s.sync)) != 0 ||
      (rc = sbn__bench_echo_start(&s.echo, s.u.n * sizeof(float))) != 0)
    goto done;
  svc_shm_setup(&s, shm);
  if ((rc = svc_agree_bytes(c, &agree)) == 0 &&
      (rc = svc_reps(o, &s, d, reps, t)) == 0 &&
      (rc = svc_agree_bytes(c, &agree)) == 0)
    rc = svc_push(o, d, t, reps, agree, out);
done:
  cfg_free(&s);
  free(all);
  return rc;
}

/* Connects this rank to its worker and checks that the job has this
 * job's size. */
static int svc_connect(const sbn_bench_opts_t *o, const char *dir,
                       sbn_client_t **c) {
  char path[4096];
  sbn_client_hello_t h;
  int rc = sbn_client_socket_path(path, sizeof path, dir, o->rank);
  if (rc == 0)
    rc = sbn_client_connect(path, c);
  if (rc != 0)
    return rc;
  /* A worker that stops answering fails the bench instead of hanging it. */
  struct timeval tv = {120, 0};
  setsockopt(sbn_client_fd(*c), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  setsockopt(sbn_client_fd(*c), SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  if ((rc = sbn_client_hello(*c, &h)) != 0)
    return rc;
  if (h.size != o->size || h.rank != o->rank)
    return sbn_set_error(SBN_EINVAL,
                         "--socket-dir %s: worker is rank %d of %d, this is "
                         "rank %d of %d",
                         dir, h.rank, h.size, o->rank, o->size);
  return 0;
}

/* Rank 0 starts the job (unless --socket-dir names one) and tells every
 * rank where it is; an empty name means it failed. */
static int svc_start(const sbn_bench_opts_t *o, sbn_bench_job_t *job,
                     char dir[PATH_MAX]) {
  int rc = 0;
  dir[0] = '\0';
  if (o->socket_dir != NULL) {
    snprintf(dir, PATH_MAX, "%s", o->socket_dir);
  } else if (o->rank == 0) {
    if ((rc = sbn__bench_job_start(job, o->size)) == 0)
      snprintf(dir, PATH_MAX, "%s", job->dir);
  }
  MPI_Bcast(dir, PATH_MAX, MPI_CHAR, 0, MPI_COMM_WORLD);
  if (rc == 0 && dir[0] == '\0')
    rc = sbn_set_error(SBN_EIO, "service: rank 0 could not start syncbnd");
  return rc;
}

int sbn__bench_service(const sbn_bench_opts_t *o, sbn_bench_out_t *out) {
  sbn_tensor_desc_t shapes[9 * 16 * 2 + SBN_BENCH_MAX_SHAPES * 2];
  sbn_bench_opts_t so = *o;
  /* Per-rank N = 32 sends up to 100 MB per request through the socket,
   * four times a step: the default stops at N = 8 (--batch 32 asks). */
  if (so.nbatches == 0 && !so.quick) {
    so.batches[0] = 2;
    so.batches[1] = 8;
    so.nbatches = 2;
  }
  int n = sbn__bench_layer_shapes(&so, 1, shapes,
                                  (int)(sizeof shapes / sizeof *shapes));
  sbn_bench_job_t job;
  sbn_client_t *c = NULL;
  sbn_client_shm_t shm;
  char dir[PATH_MAX];
  uint64_t step = 1;
  memset(&job, 0, sizeof job);
  memset(&shm, 0, sizeof shm);
  job.pid = -1;
  job.out_fd = -1;
  int rc = svc_start(o, &job, dir), any = 0;
  if (rc == 0)
    rc = svc_connect(o, dir, &c);
  /* One region serves every configuration: a connection holds at most
   * 16. */
  size_t most = 0;
  for (int i = 0; i < n; i++)
    if (sbn__bench_numel(&shapes[i]) > most)
      most = sbn__bench_numel(&shapes[i]);
  if (rc == 0)
    rc = sbn_client_shm_attach(c, 4 * svc_shm_stride(most), &shm);
  /* Agree before the first collective request, so that one rank that
   * could not connect does not leave the others waiting on a STALL. */
  any = rc != 0;
  MPI_Allreduce(MPI_IN_PLACE, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (rc == 0 && any)
    rc = sbn_set_error(SBN_EIO, "service: another rank could not connect");
  unsigned long long run =
      ((unsigned long long)getpid() << 32) ^ (unsigned long long)time(NULL);
  MPI_Bcast(&run, 1, MPI_UNSIGNED_LONG_LONG, 0, MPI_COMM_WORLD);
  for (int i = 0; i < n && rc == 0; i++)
    rc = svc_one(o, c, &shm, run, i, &step, &shapes[i], out);
  sbn_client_shm_unmap(&shm);
  if (c != NULL && rc == 0)
    sbn_client_bye(c);
  sbn_client_close(c);
  MPI_Barrier(MPI_COMM_WORLD);
  sbn__bench_job_stop(&job);
  return rc;
}
