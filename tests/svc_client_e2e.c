/* End-to-end test of the client library's protocol 3 calls against
 * `mpirun -np 2 syncbnd --stall-timeout 2 --state-dir ... --tcp ...`, with
 * one thread per rank wherever the ranks must submit together:
 * - a batch of 4 syncbatchnorm forwards, then one of their backwards,
 *   against the single-process library on the concatenated batch, each
 *   batch exactly one allreduce of 4 entries (metrics deltas);
 * - sub-request errors inside a batch, and an empty batch;
 * - stats and stats_backward (single calls and in a batch) against a
 *   float64 computation, and the running statistics they move;
 * - get_state/set_state round trips, bit-exact, for syncbatchnorm,
 *   layernorm and dropout, and their refusals (nothing changes);
 * - checkpoint_save/load round trip, a missing file and a bad name;
 * - metrics counters by op and by error code;
 * - TCP: the right token, a wrong one and none.
 * Every error path asserts the exact worker code and the mapped SBN_E*
 * value. Every blocking step has a timeout; alarm() is the backstop. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

#include "client.h"
#include "svc_job.h"
#include "syncbn.h"

#define NP 2
#define C 3
#define S 4  /* spatial size */
#define NL 4 /* layers in the fused batches */
#define MAXN 8

static pid_t g_mpirun = -1;
static char g_root[64], g_errlog[128];
static char g_path[NP][SJ_PATH_MAX];
static int g_port[NP];
static const char g_token[] = "client3-token-\x01\x02 bytes";

#define CHECK(cond, ...)                                                     \
  do {                                                                       \
    if (!(cond)) {                                                           \
      fprintf(stderr, "svc_client_e2e: %s:%d: check failed: %s: ", __FILE__, \
              __LINE__, #cond);                                              \
      fprintf(stderr, __VA_ARGS__);                                          \
      fprintf(stderr, "\n");                                                 \
      exit(1);                                                               \
    }                                                                        \
  } while (0)

/* An error reply: the mapped code and the worker's code string. */
#define CHECK_ERR(rc, c, want_rc, want_code)                              \
  CHECK((rc) == (want_rc) &&                                              \
            strcmp(sbn_client_server_code(c), (want_code)) == 0,          \
        "expected %s %s, got %s '%s' (%s)", sbn_client_err_name(want_rc), \
        (want_code), sbn_client_err_name(rc), sbn_client_server_code(c),  \
        sbn_last_error())

static void stop_job(void) {
  sj_stop(&g_mpirun);
}

static void cleanup(void) {
  stop_job();
  sj_remove("svc_client_e2e", g_root);
}

/* Under the sanitizers a worker's report goes to its stderr, which the
 * job writes to g_errlog: a report fails the test even when every reply
 * was right. The log is echoed so that warnings stay visible. */
static int job_stderr_clean(void) {
  static char buf[1 << 16];
  FILE *f = fopen(g_errlog, "r");
  size_t n;
  if (f == NULL)
    return 1;
  n = fread(buf, 1, sizeof buf - 1, f);
  fclose(f);
  buf[n] = '\0';
  if (n > 0)
    fprintf(stderr, "svc_client_e2e: the job's stderr:\n%s\n", buf);
  return strstr(buf, "AddressSanitizer") == NULL &&
         strstr(buf, "LeakSanitizer") == NULL &&
         strstr(buf, "runtime error:") == NULL;
}

static void start_job(void) {
  char dir[128], state[128], tok[128];
  snprintf(dir, sizeof dir, "%s/s", g_root);
  snprintf(state, sizeof state, "%s/state", g_root);
  snprintf(tok, sizeof tok, "%s/token", g_root);
  snprintf(g_errlog, sizeof g_errlog, "%s/stderr.log", g_root);
  sj_write_token("svc_client_e2e", tok, g_token, sizeof g_token - 1);
  const char *argv[] = {SBN_MPIEXEC,   "--oversubscribe",
                        "--bind-to",   "none",
                        "--timeout",   "150",
                        "--mca",       "pml",
                        "ob1",         "--mca",
                        "btl",         "self,vader,tcp",
                        "-np",         "2",
                        SBN_SYNCBND,   "--socket-dir",
                        dir,           "--state-dir",
                        state,         "--stall-timeout",
                        "2",           "--cycle-us",
                        "1000",        "--tcp",
                        "127.0.0.1:0", "--token-file",
                        tok,           NULL};
  g_mpirun = sj_start("svc_client_e2e", argv, g_errlog, NP, g_path, g_port);
}

static sbn_client_t *connect_rank(int rank) {
  return sj_connect("svc_client_e2e", g_path[rank], 30);
}

static void fill(float *a, size_t n, uint64_t seed, float scale, float off) {
  for (size_t i = 0; i < n; i++) {
    seed = seed * 6364136223846793005ull + 1442695040888963407ull;
    a[i] = off + scale * ((float)(seed >> 40) / (float)(1 << 24) - 0.5f);
  }
}

static int close_enough(double a, double b, double rel) {
  return fabs(a - b) <= rel * (1.0 + fabs(b));
}

/* Runs fn(rank) on every rank at once. */
static void par(void *(*fn)(void *)) {
  pthread_t t[NP];
  static int ranks[NP];
  for (int r = 0; r < NP; r++) {
    ranks[r] = r;
    CHECK(pthread_create(&t[r], NULL, fn, &ranks[r]) == 0, "thread");
  }
  for (int r = 0; r < NP; r++)
    pthread_join(t[r], NULL);
}

/* ------------------------------------------------------------------ */
/* Layers: the same on every rank, so ids agree and checkpoints match. */

static uint64_t g_bn[NL], g_st, g_ln, g_dr;

static void register_all(void) {
  for (int r = 0; r < NP; r++) {
    sbn_client_t *c = connect_rank(r);
    sbn_client_hello_t h;
    sbn_layer_params_t p;
    char name[16];
    CHECK(sbn_client_hello(c, &h) == 0, "hello: %s", sbn_last_error());
    CHECK(h.protocol >= 3 && h.rank == r && h.size == NP,
          "hello: protocol %d rank %d size %d", h.protocol, h.rank, h.size);
    sbn_layer_params_default(&p, SBN_OP_BATCHNORM);
    p.channels = C;
    p.eps = 1e-5f;
    p.momentum = 0.1f;
    for (int i = 0; i < NL; i++) {
      snprintf(name, sizeof name, "b%d", i);
      CHECK(sbn_client_register(c, name, "syncbatchnorm", &p, 0, &g_bn[i],
                                NULL) == 0,
            "register %s: %s", name, sbn_last_error());
    }
    CHECK(
        sbn_client_register(c, "st", "syncbatchnorm", &p, 0, &g_st, NULL) == 0,
        "register st: %s", sbn_last_error());
    sbn_layer_params_default(&p, SBN_OP_LAYERNORM);
    p.norm_ndim = 2;
    p.norm_shape[0] = 2;
    p.norm_shape[1] = 3;
    CHECK(sbn_client_register(c, "ln", "layernorm", &p, 0, &g_ln, NULL) == 0,
          "register ln: %s", sbn_last_error());
    sbn_layer_params_default(&p, SBN_OP_DROPOUT);
    p.p = 0.25f;
    CHECK(sbn_client_register(c, "dr", "dropout", &p, 0, &g_dr, NULL) == 0,
          "register dr: %s", sbn_last_error());
    sbn_client_close(c);
  }
}

/* ------------------------------------------------------------------ */
/* Fused batches of forwards and backwards against the library */

static const int g_n[NP] = {3, 2};
#define TOTAL ((3 + 2) * C * S)
static float g_x[NL][TOTAL], g_dy[NL][TOTAL], g_w[NL][C], g_b[NL][C];
static float g_y[NL][TOTAL], g_dx[NL][TOTAL], g_dw[NP][NL][C], g_db[NP][NL][C];

static size_t offset_of(int rank) {
  size_t o = 0;
  for (int r = 0; r < rank; r++)
    o += (size_t)g_n[r] * C * S;
  return o;
}

static void metrics_of(sbn_client_t *c, sbn_client_metrics_t *m) {
  int rc = sbn_client_metrics(c, m);
  CHECK(rc == 0, "metrics: %s %s", sbn_client_strerror(rc), sbn_last_error());
}

/* Runs b and checks that it took exactly one allreduce of NL entries. */
static void run_fused(sbn_client_t *c, sbn_client_batch_t *b, int rank,
                      const char *what) {
  sbn_client_metrics_t m0, m1;
  int rc;
  metrics_of(c, &m0);
  /* The ranks' batches arrive at different times; they fuse anyway. */
  if (rank == 1)
    usleep(50000);
  rc = sbn_client_batch_run(c, b);
  CHECK(rc == 0, "%s rank %d: %s %s", what, rank, sbn_client_strerror(rc),
        sbn_last_error());
  metrics_of(c, &m1);
  CHECK(m1.allreduces - m0.allreduces == 1,
        "%s rank %d: %llu allreduces, not 1", what, rank,
        (unsigned long long)(m1.allreduces - m0.allreduces));
  CHECK(m1.entries_fused - m0.entries_fused == NL,
        "%s rank %d: %llu entries fused, not %d", what, rank,
        (unsigned long long)(m1.entries_fused - m0.entries_fused), NL);
  CHECK(sbn_client_metrics_requests(&m1, "batch") -
                sbn_client_metrics_requests(&m0, "batch") ==
            1,
        "%s rank %d: batch requests not counted once", what, rank);
}

static void *fused_thread(void *arg) {
  int r = *(int *)arg;
  sbn_client_t *c = connect_rank(r);
  sbn_client_batch_t *b = NULL;
  sbn_tensor_desc_t d = {3, {(size_t)g_n[r], C, S}, SBN_LAYOUT_NCHW};
  size_t o = offset_of(r), numel = (size_t)g_n[r] * C * S;
  CHECK(sbn_client_batch_new(&b) == 0, "batch_new");
  for (int i = 0; i < NL; i++)
    CHECK(sbn_client_batch_forward(b, g_bn[i], 1, 1, &d, g_x[i] + o, g_w[i],
                                   g_b[i], C) == 0,
          "queue forward %d", i);
  CHECK(sbn_client_batch_size(b) == NL, "batch size");
  run_fused(c, b, r, "forwards");
  for (int i = 0; i < NL; i++) {
    const sbn_client_result_t *res = sbn_client_batch_result(b, (size_t)i);
    CHECK(res != NULL && res->rc == 0 && res->code[0] == '\0',
          "forward %d rank %d: %s %s", i, r, res ? res->code : "(none)",
          res ? res->message : "");
    CHECK(res->y != NULL && res->numel == numel && res->dx == NULL &&
              res->mean == NULL,
          "forward %d: result members", i);
    memcpy(g_y[i] + o, res->y, numel * sizeof(float));
  }
  CHECK(sbn_client_batch_result(b, NL) == NULL, "result past the end");
  sbn_client_batch_reset(b);
  CHECK(sbn_client_batch_size(b) == 0 && sbn_client_batch_result(b, 0) == NULL,
        "reset");
  for (int i = 0; i < NL; i++)
    CHECK(sbn_client_batch_backward(b, g_bn[i], 1, &d, g_dy[i] + o) == 0,
          "queue backward %d", i);
  run_fused(c, b, r, "backwards");
  for (int i = 0; i < NL; i++) {
    const sbn_client_result_t *res = sbn_client_batch_result(b, (size_t)i);
    CHECK(res != NULL && res->rc == 0, "backward %d rank %d: %s %s", i, r,
          res ? res->code : "(none)", res ? res->message : "");
    CHECK(res->dx != NULL && res->numel == numel && res->dweight != NULL &&
              res->dbias != NULL && res->wb_numel == C && res->y == NULL,
          "backward %d: result members", i);
    memcpy(g_dx[i] + o, res->dx, numel * sizeof(float));
    memcpy(g_dw[r][i], res->dweight, sizeof g_dw[r][i]);
    memcpy(g_db[r][i], res->dbias, sizeof g_db[r][i]);
  }
  sbn_client_batch_free(b);
  sbn_client_close(c);
  return NULL;
}

/* The library in one process on the whole batch of layer i. */
static void library_ref(int i, float *y, float *dx, float *dw, float *db) {
  sbn_comm_t comm = {&sj_self_vt, 0, 1, 0};
  sbn_layer_params_t p;
  sbn_layer_t *l = NULL;
  sbn_tensor_desc_t d = {3, {TOTAL / (C * S), C, S}, SBN_LAYOUT_NCHW};
  float rm[C] = {0, 0, 0}, rv[C] = {1, 1, 1};
  sbn_state_t st;
  size_t ws = 0, sv = 0;
  void *wsb, *svb;
  sbn_forward_args_t fa;
  sbn_backward_args_t ba;
  sbn_layer_params_default(&p, SBN_OP_BATCHNORM);
  p.channels = C;
  p.eps = 1e-5f;
  p.momentum = 0.1f;
  CHECK(sbn_layer_create(&p, &comm, &l) == 0, "%s", sbn_last_error());
  CHECK(sbn_layer_sizes(l, &d, &ws, &sv) == 0, "%s", sbn_last_error());
  wsb = malloc(ws + 1);
  svb = malloc(sv + 1);
  CHECK(wsb != NULL && svb != NULL, "malloc");
  memset(&st, 0, sizeof st);
  st.running_mean = rm;
  st.running_var = rv;
  memset(&fa, 0, sizeof fa);
  fa.mode = SBN_MODE_TRAIN;
  fa.x_desc = &d;
  fa.x = g_x[i];
  fa.y = y;
  fa.weight = g_w[i];
  fa.bias = g_b[i];
  fa.state = &st;
  fa.step = 1;
  fa.workspace = wsb;
  fa.workspace_bytes = ws;
  fa.saved = svb;
  fa.saved_bytes = sv;
  CHECK(sbn_forward(l, &fa) == 0, "%s", sbn_last_error());
  memset(&ba, 0, sizeof ba);
  ba.mode = SBN_MODE_TRAIN;
  ba.x_desc = &d;
  ba.x = g_x[i];
  ba.dy = g_dy[i];
  ba.dx = dx;
  ba.weight = g_w[i];
  ba.dweight = dw;
  ba.dbias = db;
  ba.step = 1;
  ba.workspace = wsb;
  ba.workspace_bytes = ws;
  ba.saved = svb;
  ba.saved_bytes = sv;
  CHECK(sbn_backward(l, &ba) == 0, "%s", sbn_last_error());
  sbn_layer_destroy(l);
  free(wsb);
  free(svb);
}

static void test_fused_batches(void) {
  static float y[TOTAL], dx[TOTAL];
  float dw[C], db[C];
  for (int i = 0; i < NL; i++) {
    fill(g_x[i], TOTAL, 11 + (uint64_t)i, 4.0f, 1.5f + (float)i);
    fill(g_dy[i], TOTAL, 31 + (uint64_t)i, 2.0f, 0.1f);
    fill(g_w[i], C, 51 + (uint64_t)i, 1.0f, 1.0f);
    fill(g_b[i], C, 71 + (uint64_t)i, 1.0f, 0.0f);
  }
  par(fused_thread);
  for (int i = 0; i < NL; i++) {
    library_ref(i, y, dx, dw, db);
    for (size_t k = 0; k < TOTAL; k++) {
      CHECK(close_enough(g_y[i][k], y[k], 1e-5), "layer %d y[%zu] %g vs %g", i,
            k, g_y[i][k], y[k]);
      CHECK(close_enough(g_dx[i][k], dx[k], 1e-4), "layer %d dx[%zu] %g vs %g",
            i, k, g_dx[i][k], dx[k]);
    }
    /* Each rank's dweight and dbias are its own batch's share. */
    for (int k = 0; k < C; k++) {
      float sw = 0, sb = 0;
      for (int r = 0; r < NP; r++) {
        sw += g_dw[r][i][k];
        sb += g_db[r][i][k];
      }
      CHECK(close_enough(sw, dw[k], 1e-4), "layer %d dw %g vs %g", i, sw,
            dw[k]);
      CHECK(close_enough(sb, db[k], 1e-4), "layer %d db %g vs %g", i, sb,
            db[k]);
    }
  }
}

/* Sub-request errors are results; the others in the batch still work.
 * All local (rank 0 only): an unknown layer, a backward without a
 * forward, and an eval forward, which needs no other rank. */
static void test_batch_errors(void) {
  sbn_client_t *c = connect_rank(0);
  sbn_client_batch_t *b = NULL;
  sbn_tensor_desc_t d = {3, {(size_t)g_n[0], C, S}, SBN_LAYOUT_NCHW};
  const sbn_client_result_t *res;
  int rc;
  CHECK(sbn_client_batch_new(&b) == 0, "batch_new");
  rc = sbn_client_batch_run(c, b);
  CHECK_ERR(rc, c, SBN_EINVAL, "");
  CHECK(sbn_client_batch_forward(b, 999, 1, 1, &d, g_x[0], NULL, NULL, 0) == 0,
        "queue");
  CHECK(sbn_client_batch_backward(b, g_bn[0], 99, &d, g_dy[0]) == 0, "queue");
  CHECK(sbn_client_batch_forward(b, g_bn[0], 1, 0, &d, g_x[0], g_w[0], g_b[0],
                                 C) == 0,
        "queue");
  rc = sbn_client_batch_run(c, b);
  CHECK(rc == 0, "batch: %s %s", sbn_client_strerror(rc), sbn_last_error());
  res = sbn_client_batch_result(b, 0);
  CHECK(res->rc == SBN_EINVAL && strcmp(res->code, "UNKNOWN_LAYER") == 0 &&
            res->message[0] != '\0' && res->y == NULL,
        "unknown layer: %d %s", res->rc, res->code);
  res = sbn_client_batch_result(b, 1);
  CHECK(res->rc == SBN_ESTATE && strcmp(res->code, "NO_FORWARD") == 0 &&
            res->dx == NULL,
        "no forward: %d %s", res->rc, res->code);
  res = sbn_client_batch_result(b, 2);
  CHECK(res->rc == 0 && res->y != NULL && res->numel == (size_t)g_n[0] * C * S,
        "eval forward: %d %s %s", res->rc, res->code, res->message);
  /* A queue call with a broken desc queues nothing. */
  d.ndim = 0;
  CHECK(sbn_client_batch_forward(b, g_bn[0], 1, 0, &d, g_x[0], NULL, NULL, 0) !=
                0 &&
            sbn_client_batch_size(b) == 3,
        "bad desc queued");
  CHECK(sbn_client_batch_stats(b, g_st, 1, 0, 1, NULL, NULL, NULL) ==
                SBN_EINVAL &&
            sbn_client_batch_size(b) == 3,
        "bad stats queued");
  sbn_client_batch_free(b);
  sbn_client_close(c);
}

/* ------------------------------------------------------------------ */
/* stats and stats_backward against float64 */

#define EPS 1e-5
static float g_sx[NP][MAXN * C * S], g_sdy[NP][MAXN * C * S];
static double g_cnt[NP][C], g_mean[NP][C], g_m2[NP][C], g_sdy_sum[NP][C],
    g_sdyx_sum[NP][C];
/* The float64 reference over the global batch. */
static double r_cnt[C], r_mean[C], r_var[C], r_uvar[C], r_istd[C], r_sdy[C],
    r_sdyx[C];

static void stats_data(void) {
  memset(r_cnt, 0, sizeof r_cnt);
  memset(r_mean, 0, sizeof r_mean);
  memset(r_var, 0, sizeof r_var);
  memset(r_sdy, 0, sizeof r_sdy);
  memset(r_sdyx, 0, sizeof r_sdyx);
  for (int r = 0; r < NP; r++) {
    fill(g_sx[r], (size_t)g_n[r] * C * S, 91 + (uint64_t)r, 3.0f, 2.0f);
    fill(g_sdy[r], (size_t)g_n[r] * C * S, 97 + (uint64_t)r, 1.0f, 0.2f);
  }
  /* Per-rank statistics, as a GPU client would compute them. */
  for (int r = 0; r < NP; r++)
    for (int k = 0; k < C; k++) {
      double s = 0, q = 0;
      int n = g_n[r] * S;
      for (int i = 0; i < g_n[r]; i++)
        for (int j = 0; j < S; j++)
          s += g_sx[r][(i * C + k) * S + j];
      g_cnt[r][k] = n;
      g_mean[r][k] = s / n;
      for (int i = 0; i < g_n[r]; i++)
        for (int j = 0; j < S; j++) {
          double e = g_sx[r][(i * C + k) * S + j] - g_mean[r][k];
          q += e * e;
        }
      g_m2[r][k] = q;
    }
  /* The global batch, two-pass. */
  for (int k = 0; k < C; k++) {
    double s = 0, q = 0;
    for (int r = 0; r < NP; r++)
      for (int i = 0; i < g_n[r] * S; i++)
        s += g_sx[r][((i / S) * C + k) * S + i % S];
    for (int r = 0; r < NP; r++)
      r_cnt[k] += g_n[r] * S;
    r_mean[k] = s / r_cnt[k];
    for (int r = 0; r < NP; r++)
      for (int i = 0; i < g_n[r] * S; i++) {
        double e = g_sx[r][((i / S) * C + k) * S + i % S] - r_mean[k];
        q += e * e;
      }
    r_var[k] = q / r_cnt[k];
    r_uvar[k] = q / (r_cnt[k] - 1);
    r_istd[k] = 1.0 / sqrt(r_var[k] + EPS);
  }
  for (int r = 0; r < NP; r++)
    for (int k = 0; k < C; k++) {
      double a = 0, bx = 0;
      for (int i = 0; i < g_n[r] * S; i++) {
        size_t at = ((size_t)(i / S) * C + (size_t)k) * S + (size_t)(i % S);
        double xhat = (g_sx[r][at] - r_mean[k]) * r_istd[k];
        a += g_sdy[r][at];
        bx += g_sdy[r][at] * xhat;
      }
      g_sdy_sum[r][k] = a;
      g_sdyx_sum[r][k] = bx;
      r_sdy[k] += a;
      r_sdyx[k] += bx;
    }
}

static void check_stats(const double *cnt, const double *mean,
                        const double *var, const double *uvar,
                        const double *istd, const char *what) {
  for (int k = 0; k < C; k++) {
    CHECK(cnt[k] == r_cnt[k], "%s count[%d] %g vs %g", what, k, cnt[k],
          r_cnt[k]);
    CHECK(close_enough(mean[k], r_mean[k], 1e-12), "%s mean[%d] %.17g vs %.17g",
          what, k, mean[k], r_mean[k]);
    CHECK(close_enough(var[k], r_var[k], 1e-12), "%s var[%d] %.17g vs %.17g",
          what, k, var[k], r_var[k]);
    CHECK(close_enough(uvar[k], r_uvar[k], 1e-12), "%s var_unbiased[%d]", what,
          k);
    CHECK(close_enough(istd[k], r_istd[k], 1e-12), "%s invstd[%d]", what, k);
  }
}

static void check_sums(const double *sdy, const double *sdyx,
                       const char *what) {
  for (int k = 0; k < C; k++) {
    CHECK(close_enough(sdy[k], r_sdy[k], 1e-12), "%s sum_dy[%d] %g vs %g", what,
          k, sdy[k], r_sdy[k]);
    CHECK(close_enough(sdyx[k], r_sdyx[k], 1e-12),
          "%s sum_dy_xhat[%d] %g vs %g", what, k, sdyx[k], r_sdyx[k]);
  }
}

static void *stats_thread(void *arg) {
  int r = *(int *)arg;
  sbn_client_t *c = connect_rank(r);
  sbn_client_batch_t *b = NULL;
  double cnt[C], mean[C], var[C], uvar[C], istd[C], sdy[C], sdyx[C];
  sbn_client_stats_t out = {cnt, mean, var, uvar, istd};
  const sbn_client_result_t *res;
  /* Rank 0 sends one count for all channels, rank 1 a count tensor. */
  const double *counts = r == 1 ? g_cnt[r] : NULL;
  uint64_t count = (uint64_t)g_n[r] * S;
  int rc;
  rc = sbn_client_stats(c, g_st, 1, C, count, counts, g_mean[r], g_m2[r], &out);
  CHECK(rc == 0, "stats rank %d: %s %s", r, sbn_client_server_code(c),
        sbn_last_error());
  check_stats(cnt, mean, var, uvar, istd, "stats");
  rc = sbn_client_stats_backward(c, g_st, 1, C, g_sdy_sum[r], g_sdyx_sum[r],
                                 sdy, sdyx);
  CHECK(rc == 0, "stats_backward rank %d: %s %s", r, sbn_client_server_code(c),
        sbn_last_error());
  check_sums(sdy, sdyx, "stats_backward");
  /* The next step in one batch. */
  CHECK(sbn_client_batch_new(&b) == 0, "batch_new");
  CHECK(sbn_client_batch_stats(b, g_st, 2, C, count, counts, g_mean[r],
                               g_m2[r]) == 0,
        "queue stats");
  CHECK(sbn_client_batch_stats_backward(b, g_st, 2, C, g_sdy_sum[r],
                                        g_sdyx_sum[r]) == 0,
        "queue stats_backward");
  rc = sbn_client_batch_run(c, b);
  CHECK(rc == 0, "stats batch rank %d: %s", r, sbn_last_error());
  res = sbn_client_batch_result(b, 0);
  CHECK(res->rc == 0 && res->channels == C && res->count != NULL &&
            res->sum_dy == NULL,
        "batch stats: %s %s", res->code, res->message);
  check_stats(res->count, res->mean, res->var, res->var_unbiased, res->invstd,
              "batch stats");
  res = sbn_client_batch_result(b, 1);
  CHECK(res->rc == 0 && res->channels == C && res->sum_dy != NULL &&
            res->mean == NULL,
        "batch stats_backward: %s %s", res->code, res->message);
  check_sums(res->sum_dy, res->sum_dy_xhat, "batch stats_backward");
  sbn_client_batch_free(b);
  /* The compact reply (`want`): asking for mean and invstd only gets the
   * same bits as the full reply of step 1 (the same records reduce the
   * same way); asking for nothing still moves the running statistics. */
  {
    double mean3[C], istd3[C];
    sbn_client_stats_t two = {NULL, mean3, NULL, NULL, istd3};
    rc = sbn_client_stats(c, g_st, 3, C, count, counts, g_mean[r], g_m2[r],
                          &two);
    CHECK(rc == 0, "compact stats rank %d: %s %s", r, sbn_client_server_code(c),
          sbn_last_error());
    CHECK(memcmp(mean3, mean, sizeof mean) == 0 &&
              memcmp(istd3, istd, sizeof istd) == 0,
          "compact stats rank %d: not the full reply's bits", r);
    rc = sbn_client_stats(c, g_st, 4, C, count, counts, g_mean[r], g_m2[r],
                          NULL);
    CHECK(rc == 0, "stats without outputs rank %d: %s %s", r,
          sbn_client_server_code(c), sbn_last_error());
  }
  /* Refused before any cross-rank agreement: a negative m2 is
   * BAD_PARAMS, stats on a layer of another kind is SHAPE, an unknown
   * layer is UNKNOWN_LAYER, and no channels is refused by the client. */
  {
    double bad[C] = {1, -1, 1};
    rc = sbn_client_stats(c, g_st, 5, C, count, counts, g_mean[r], bad, &out);
    CHECK_ERR(rc, c, SBN_EINVAL, "BAD_PARAMS");
  }
  rc = sbn_client_stats(c, g_ln, 1, C, count, counts, g_mean[r], g_m2[r], NULL);
  CHECK_ERR(rc, c, SBN_ESHAPE, "SHAPE");
  rc = sbn_client_stats_backward(c, 999, 1, C, g_sdy_sum[r], g_sdyx_sum[r],
                                 NULL, NULL);
  CHECK_ERR(rc, c, SBN_EINVAL, "UNKNOWN_LAYER");
  rc = sbn_client_stats(c, g_st, 5, 0, count, NULL, g_mean[r], g_m2[r], NULL);
  CHECK_ERR(rc, c, SBN_EINVAL, "");
  sbn_client_close(c);
  return NULL;
}

static void test_stats(void) {
  sbn_client_t *c;
  sbn_client_state_t s;
  int rc;
  stats_data();
  par(stats_thread);
  /* Four stats steps (full, batch, compact, none wanted) moved the running
   * statistics as four training forwards would (momentum 0.1, unbiased
   * variance), on every rank. */
  for (int r = 0; r < NP; r++) {
    c = connect_rank(r);
    rc = sbn_client_get_state(c, g_st, &s);
    CHECK(rc == 0, "get_state: %s", sbn_last_error());
    CHECK(s.has_running_stats && s.num_batches_tracked == 4,
          "num_batches_tracked %lld", (long long)s.num_batches_tracked);
    for (int k = 0; k < C; k++) {
      double m = 0, v = 1.0;
      for (int step = 0; step < 4; step++) {
        m = 0.9 * m + 0.1 * r_mean[k];
        v = 0.9 * v + 0.1 * r_uvar[k];
      }
      CHECK(close_enough(s.running_mean[k], m, 1e-6), "running_mean %g vs %g",
            s.running_mean[k], m);
      CHECK(close_enough(s.running_var[k], v, 1e-6), "running_var %g vs %g",
            s.running_var[k], v);
    }
    sbn_client_state_free(&s);
    sbn_client_close(c);
  }
}

/* ------------------------------------------------------------------ */
/* get_state / set_state */

static int floats_equal(const float *a, const float *b, size_t n) {
  return (a == NULL && b == NULL) ||
         (a != NULL && b != NULL && memcmp(a, b, n * sizeof *a) == 0);
}

/* Bit-exact equality of two states. */
static int states_equal(const sbn_client_state_t *a,
                        const sbn_client_state_t *b) {
  size_t pn = 0;
  if (strcmp(a->kind, b->kind) != 0 ||
      a->has_running_stats != b->has_running_stats ||
      a->has_num_batches_tracked != b->has_num_batches_tracked ||
      a->has_affine != b->has_affine || a->channels != b->channels ||
      a->num_batches_tracked != b->num_batches_tracked ||
      a->param_desc.ndim != b->param_desc.ndim)
    return 0;
  if (a->has_affine) {
    if (memcmp(a->param_desc.dims, b->param_desc.dims,
               (size_t)a->param_desc.ndim * sizeof(size_t)) != 0 ||
        sbn_desc_numel(&a->param_desc, &pn) != 0)
      return 0;
  }
  return floats_equal(a->running_mean, b->running_mean, a->channels) &&
         floats_equal(a->running_var, b->running_var, a->channels) &&
         floats_equal(a->weight, b->weight, pn) &&
         floats_equal(a->bias, b->bias, pn);
}

static void get(sbn_client_t *c, uint64_t layer, sbn_client_state_t *s) {
  int rc = sbn_client_get_state(c, layer, s);
  CHECK(rc == 0, "get_state %llu: %s %s", (unsigned long long)layer,
        sbn_client_server_code(c), sbn_last_error());
}

static void test_state(void) {
  sbn_client_t *c = connect_rank(0);
  sbn_client_state_t s0, s1, s2, set;
  float rm[C], rv[C], w[C], b[C], lw[6];
  int rc;

  /* syncbatchnorm: every member, new values, then the old ones back. */
  get(c, g_st, &s0);
  CHECK(strcmp(s0.kind, "syncbatchnorm") == 0 && s0.has_running_stats &&
            s0.has_num_batches_tracked && s0.has_affine && s0.channels == C &&
            s0.param_desc.ndim == 1 && s0.param_desc.dims[0] == C &&
            s0.running_mean != NULL && s0.weight != NULL,
        "syncbatchnorm state: kind %s", s0.kind);
  fill(rm, C, 5, 3.0f, 0.0f);
  fill(rv, C, 6, 1.0f, 2.0f);
  fill(w, C, 7, 1.0f, 1.0f);
  fill(b, C, 8, 1.0f, 0.0f);
  memset(&set, 0, sizeof set);
  set.channels = C;
  set.running_mean = rm;
  set.running_var = rv;
  set.has_num_batches_tracked = 1;
  set.num_batches_tracked = 7;
  set.weight = w;
  set.bias = b;
  rc = sbn_client_set_state(c, g_st, &set);
  CHECK(rc == 0, "set_state: %s", sbn_last_error());
  get(c, g_st, &s1);
  CHECK(s1.num_batches_tracked == 7 && floats_equal(s1.running_mean, rm, C) &&
            floats_equal(s1.running_var, rv, C) &&
            floats_equal(s1.weight, w, C) && floats_equal(s1.bias, b, C),
        "set_state did not round-trip");
  sbn_client_state_free(&s1);
  rc = sbn_client_set_state(c, g_st, &s0);
  CHECK(rc == 0, "set_state back: %s", sbn_last_error());
  get(c, g_st, &s1);
  CHECK(states_equal(&s0, &s1), "get_state after set_state(get_state)");
  sbn_client_state_free(&s1);

  /* Refusals change nothing: a negative variance, statistics on a layer
   * without them, unknown layers, a negative counter (local). */
  rv[1] = -1.0f;
  memset(&set, 0, sizeof set);
  set.channels = C;
  set.running_mean = rm;
  set.running_var = rv;
  rc = sbn_client_set_state(c, g_st, &set);
  CHECK_ERR(rc, c, SBN_EINVAL, "BAD_PARAMS");
  CHECK(strstr(sbn_last_error(), "running_var[1]") != NULL, "message: %s",
        sbn_last_error());
  get(c, g_st, &s1);
  CHECK(states_equal(&s0, &s1), "a refused set_state changed the layer");
  sbn_client_state_free(&s1);
  set.running_var = NULL;
  rc = sbn_client_set_state(c, g_ln, &set);
  CHECK_ERR(rc, c, SBN_ESHAPE, "SHAPE");
  rc = sbn_client_set_state(c, 999, &set);
  CHECK_ERR(rc, c, SBN_EINVAL, "UNKNOWN_LAYER");
  rc = sbn_client_get_state(c, 999, &s1);
  CHECK_ERR(rc, c, SBN_EINVAL, "UNKNOWN_LAYER");
  CHECK(s1.running_mean == NULL && s1.kind[0] == '\0',
        "a failed get_state left members");
  memset(&set, 0, sizeof set);
  set.has_num_batches_tracked = 1;
  set.num_batches_tracked = -1;
  rc = sbn_client_set_state(c, g_st, &set);
  CHECK_ERR(rc, c, SBN_EINVAL, "");
  sbn_client_state_free(&s0);

  /* layernorm: a 2-D parameter shape, no running statistics. */
  get(c, g_ln, &s0);
  CHECK(strcmp(s0.kind, "layernorm") == 0 && !s0.has_running_stats &&
            !s0.has_num_batches_tracked && s0.has_affine &&
            s0.running_mean == NULL && s0.param_desc.ndim == 2 &&
            s0.param_desc.dims[0] == 2 && s0.param_desc.dims[1] == 3,
        "layernorm state: kind %s", s0.kind);
  fill(lw, 6, 9, 2.0f, 1.0f);
  memset(&set, 0, sizeof set);
  set.param_desc = s0.param_desc;
  set.weight = lw;
  rc = sbn_client_set_state(c, g_ln, &set);
  CHECK(rc == 0, "set_state ln: %s", sbn_last_error());
  get(c, g_ln, &s1);
  CHECK(floats_equal(s1.weight, lw, 6) && floats_equal(s1.bias, s0.bias, 6),
        "layernorm weight did not round-trip");
  rc = sbn_client_set_state(c, g_ln, &s0);
  CHECK(rc == 0, "set_state ln back: %s", sbn_last_error());
  get(c, g_ln, &s2);
  CHECK(states_equal(&s0, &s2), "layernorm state after restore");
  sbn_client_state_free(&s0);
  sbn_client_state_free(&s1);
  sbn_client_state_free(&s2);

  /* dropout: the kind only. */
  get(c, g_dr, &s0);
  CHECK(strcmp(s0.kind, "dropout") == 0 && !s0.has_running_stats &&
            !s0.has_affine && s0.weight == NULL && s0.running_mean == NULL,
        "dropout state: kind %s", s0.kind);
  sbn_client_state_free(&s0);
  sbn_client_close(c);
}

/* ------------------------------------------------------------------ */
/* Checkpoints */

static sbn_client_state_t g_saved[NP][2];

static void *ckpt_thread(void *arg) {
  int r = *(int *)arg;
  sbn_client_t *c = connect_rank(r);
  sbn_client_state_t s;
  float five[C] = {5, 5, 5}, three[6] = {3, 3, 3, 3, 3, 3};
  uint64_t layers = 0;
  int rc;
  rc = sbn_client_checkpoint_save(c, "ck1", &layers);
  CHECK(rc == 0, "save rank %d: %s %s", r, sbn_client_server_code(c),
        sbn_last_error());
  CHECK(layers == NL + 3, "save: %llu layers", (unsigned long long)layers);
  get(c, g_st, &g_saved[r][0]);
  get(c, g_ln, &g_saved[r][1]);
  /* The state moves on. */
  memset(&s, 0, sizeof s);
  s.channels = C;
  s.running_mean = five;
  s.has_num_batches_tracked = 1;
  s.num_batches_tracked = 99;
  CHECK(sbn_client_set_state(c, g_st, &s) == 0, "%s", sbn_last_error());
  memset(&s, 0, sizeof s);
  s.param_desc = g_saved[r][1].param_desc;
  s.weight = three;
  CHECK(sbn_client_set_state(c, g_ln, &s) == 0, "%s", sbn_last_error());
  layers = 0;
  rc = sbn_client_checkpoint_load(c, "ck1", &layers);
  CHECK(rc == 0, "load rank %d: %s %s", r, sbn_client_server_code(c),
        sbn_last_error());
  CHECK(layers == NL + 3, "load: %llu layers", (unsigned long long)layers);
  get(c, g_st, &s);
  CHECK(states_equal(&s, &g_saved[r][0]), "rank %d: st after load", r);
  sbn_client_state_free(&s);
  get(c, g_ln, &s);
  CHECK(states_equal(&s, &g_saved[r][1]), "rank %d: ln after load", r);
  sbn_client_state_free(&s);
  /* A missing file is CHECKPOINT on every rank and changes nothing; a
   * name that is a path is BAD_PARAMS before any file is touched. */
  rc = sbn_client_checkpoint_load(c, "missing", NULL);
  CHECK_ERR(rc, c, SBN_EINVAL, "CHECKPOINT");
  rc = sbn_client_checkpoint_save(c, "../x", NULL);
  CHECK_ERR(rc, c, SBN_EINVAL, "BAD_PARAMS");
  rc = sbn_client_checkpoint_load(c, NULL, NULL);
  CHECK_ERR(rc, c, SBN_EINVAL, "");
  get(c, g_st, &s);
  CHECK(states_equal(&s, &g_saved[r][0]), "rank %d: st after refusals", r);
  sbn_client_state_free(&s);
  sbn_client_close(c);
  return NULL;
}

static void test_checkpoint(void) {
  char path[128];
  struct stat st;
  par(ckpt_thread);
  snprintf(path, sizeof path, "%s/state/ck1", g_root);
  CHECK(stat(path, &st) == 0 && (st.st_mode & 077) == 0,
        "checkpoint file %s missing or readable by others", path);
  snprintf(path, sizeof path, "%s/x", g_root);
  CHECK(stat(path, &st) != 0, "a refused name wrote %s", path);
  for (int r = 0; r < NP; r++)
    for (int i = 0; i < 2; i++)
      sbn_client_state_free(&g_saved[r][i]);
}

/* ------------------------------------------------------------------ */
/* The error convention: a code, and a message for sbn_last_error() that
 * names the call and the argument, or carries the worker's reply. */

/* rc is want and sbn_last_error() starts with prefix. */
#define CHECK_MSG(rc, want, prefix)                                    \
  CHECK((rc) == (want) &&                                              \
            strncmp(sbn_last_error(), (prefix), strlen(prefix)) == 0,  \
        "expected %s '%s...', got %s '%s'", sbn_client_err_name(want), \
        (prefix), sbn_client_err_name(rc), sbn_last_error())

static void test_errors(void) {
  sbn_client_t *c = connect_rank(0), *none = NULL;
  sbn_client_batch_t *b = NULL;
  sbn_client_hello_t h;
  sbn_layer_params_t p;
  sbn_tensor_desc_t d = {3, {(size_t)g_n[0], C, S}, SBN_LAYOUT_NCHW};
  char buf[16];
  uint64_t id;
  int rc;
  CHECK(strcmp(sbn_client_err_name(SBN_CLIENT_ECLOSED), "SBN_CLIENT_ECLOSED") ==
                0 &&
            strcmp(sbn_client_err_name(SBN_CLIENT_ETIMEDOUT),
                   "SBN_CLIENT_ETIMEDOUT") == 0 &&
            strcmp(sbn_client_err_name(SBN_ESHAPE), "SBN_ESHAPE") == 0 &&
            strcmp(sbn_client_strerror(SBN_CLIENT_ECLOSED),
                   "connection closed") == 0 &&
            strcmp(sbn_client_strerror(SBN_EINVAL), "invalid argument") == 0,
        "the client's error names");
  /* An error reply: the mapped code, the worker's code, its message. */
  rc = sbn_client_forward(c, 999, 1, 1, &d, g_x[0], NULL, NULL, 0, g_y[0]);
  CHECK_MSG(rc, SBN_EINVAL, "forward: server replied UNKNOWN_LAYER: ");
  CHECK(strcmp(sbn_client_server_code(c), "UNKNOWN_LAYER") == 0, "code %s",
        sbn_client_server_code(c));
  CHECK(sbn_client_hello(c, &h) == 0 && sbn_client_server_code(c)[0] == '\0',
        "a success forgets the code: '%s'", sbn_client_server_code(c));
  /* Local failures name the argument and leave no worker code. */
  sbn_layer_params_default(&p, SBN_OP_BATCHNORM);
  p.channels = C;
  rc = sbn_client_register(c, "bogus", "bogusnorm", &p, 0, &id, NULL);
  CHECK_MSG(rc, SBN_EINVAL, "register: kind: unknown layer kind 'bogusnorm'");
  CHECK(sbn_client_server_code(c)[0] == '\0', "local failure has a code");
  rc = sbn_client_register(c, NULL, "batchnorm", &p, 0, &id, NULL);
  CHECK_MSG(rc, SBN_EINVAL, "register: name: NULL");
  rc =
      sbn_client_forward(c, g_bn[0], 1, 1, NULL, g_x[0], NULL, NULL, 0, g_y[0]);
  CHECK_MSG(rc, SBN_EINVAL, "forward: desc: ");
  rc = sbn_client_stats(c, g_st, 1, 0, 1, NULL, NULL, NULL, NULL);
  CHECK_MSG(rc, SBN_EINVAL, "stats: channels: 0");
  rc = sbn_client_stats_backward(c, g_st, 1, C, g_sdy_sum[0], NULL, NULL, NULL);
  CHECK_MSG(rc, SBN_EINVAL, "stats_backward: sum_dy_xhat: NULL");
  rc = sbn_client_set_state(c, g_st, NULL);
  CHECK_MSG(rc, SBN_EINVAL, "set_state: state: NULL");
  rc = sbn_client_checkpoint_save(c, NULL, NULL);
  CHECK_MSG(rc, SBN_EINVAL, "checkpoint_save: name: NULL");
  rc = sbn_client_hello(NULL, &h);
  CHECK_MSG(rc, SBN_EINVAL, "hello: c: NULL");
  CHECK(sbn_client_batch_new(&b) == 0, "batch_new");
  rc = sbn_client_batch_stats(b, g_st, 1, C, 1, NULL, g_mean[0], NULL);
  CHECK_MSG(rc, SBN_EINVAL, "batch_stats: m2: NULL");
  rc = sbn_client_batch_run(c, b);
  CHECK_MSG(rc, SBN_EINVAL, "batch: b: no sub-requests");
  sbn_client_batch_free(b);
  rc = sbn_client_socket_path(buf, sizeof buf, g_root, 0);
  CHECK_MSG(rc, SBN_ENOSPACE, "socket_path: buf: 16 bytes");
  rc = sbn_client_connect("/nonexistent/rank-0.sock", &none);
  CHECK_MSG(rc, SBN_EIO, "connect: /nonexistent/rank-0.sock: ");
  CHECK(none == NULL, "a failed connect gave a handle");
  rc = sbn_client_connect_tcp("127.0.0.1", 70000, NULL, 0, &none);
  CHECK_MSG(rc, SBN_EINVAL, "connect_tcp: port: 70000");
  /* After bye the worker closes: the next calls say so and name
   * themselves, whether the send or the receive notices. */
  CHECK(sbn_client_bye(c) == 0, "bye: %s", sbn_last_error());
  rc = sbn_client_forward(c, g_bn[0], 1, 1, &d, g_x[0], NULL, NULL, 0, g_y[0]);
  CHECK_MSG(rc, SBN_CLIENT_ECLOSED, "forward: ");
  rc = sbn_client_hello(c, &h);
  CHECK_MSG(rc, SBN_CLIENT_ECLOSED, "hello: ");
  sbn_client_close(c);
}

/* ------------------------------------------------------------------ */
/* metrics and TCP */

static void test_metrics(void) {
  sbn_client_t *c = connect_rank(0);
  sbn_client_metrics_t m0, m1;
  sbn_client_state_t s;
  metrics_of(c, &m0);
  CHECK(sbn_client_get_state(c, 999, &s) == SBN_EINVAL, "unknown layer");
  metrics_of(c, &m1);
  CHECK(sbn_client_metrics_requests(&m1, "get_state") -
                sbn_client_metrics_requests(&m0, "get_state") ==
            1,
        "get_state count");
  /* The metrics request counts itself. */
  CHECK(sbn_client_metrics_requests(&m1, "metrics") -
                sbn_client_metrics_requests(&m0, "metrics") ==
            1,
        "metrics count");
  CHECK(sbn_client_metrics_errors(&m1, "UNKNOWN_LAYER") -
                sbn_client_metrics_errors(&m0, "UNKNOWN_LAYER") ==
            1,
        "UNKNOWN_LAYER count");
  CHECK(m1.nrequests == 14 && sbn_client_metrics_requests(&m1, "nope") == 0,
        "requests table: %zu ops", m1.nrequests);
  CHECK(sbn_client_metrics_errors(&m1, "CHECKPOINT") >= 1 &&
            sbn_client_metrics_requests(&m1, "checkpoint_load") >= 2 &&
            sbn_client_metrics_requests(&m1, "stats") >= 2,
        "counters of the earlier tests");
  /* Every fused allreduce so far is in one histogram bucket; the fused
   * batches carried 4 entries each, bucket "3-4". */
  {
    uint64_t sum = 0;
    for (int i = 0; i < 8; i++)
      sum += m1.fused_per_allreduce[i];
    CHECK(sum == m1.allreduces && m1.fused_per_allreduce[2] >= 2,
          "fused_per_allreduce: sum %llu of %llu, 3-4: %llu",
          (unsigned long long)sum, (unsigned long long)m1.allreduces,
          (unsigned long long)m1.fused_per_allreduce[2]);
    CHECK(m1.latency_count == m1.allreduces && m1.latency_max > 0 &&
              m1.latency_p50 <= m1.latency_max,
          "allreduce_latency");
  }
  CHECK(m1.layers == NL + 3 && m1.frames_in > m0.frames_in &&
            m1.bytes_out > m0.bytes_out,
        "scalar counters");
  /* An eval forward over the socket: y computed in x's buffer and written
   * from it with writev; the only tensor copy is x out of the frame. */
  {
    sbn_tensor_desc_t d = {3, {(size_t)g_n[0], C, S}, SBN_LAYOUT_NCHW};
    int rc = sbn_client_forward(c, g_bn[0], 77, 0, &d, g_x[0], NULL, NULL, 0,
                                g_y[0]);
    CHECK(rc == 0, "eval forward: %s", sbn_last_error());
    metrics_of(c, &m0);
    CHECK(m0.zero_copy_replies == m1.zero_copy_replies + 1 &&
              m0.in_place == m1.in_place + 1 &&
              m0.tensor_copies == m1.tensor_copies + 1,
          "eval forward: %llu zero-copy replies, %llu in place, %llu copies",
          (unsigned long long)(m0.zero_copy_replies - m1.zero_copy_replies),
          (unsigned long long)(m0.in_place - m1.in_place),
          (unsigned long long)(m0.tensor_copies - m1.tensor_copies));
  }
  sbn_client_close(c);
}

static void test_tcp(void) {
  sbn_client_t *u = connect_rank(0), *c = NULL;
  sbn_client_metrics_t m0, m1;
  sbn_client_hello_t h;
  int rc;
  metrics_of(u, &m0);
  for (int r = 0; r < NP; r++) {
    rc = sbn_client_connect_tcp("127.0.0.1", g_port[r], g_token,
                                sizeof g_token - 1, &c);
    CHECK(rc == 0, "tcp rank %d: %s %s", r, sbn_client_strerror(rc),
          sbn_last_error());
    sj_set_timeouts(c, 30);
    CHECK(sbn_client_hello(c, &h) == 0 && h.rank == r && h.protocol >= 3,
          "tcp hello rank %d: %s", r, sbn_last_error());
    sbn_client_close(c);
  }
  rc = sbn_client_connect_tcp("127.0.0.1", g_port[0], "wrong", 5, &c);
  CHECK(c != NULL, "no handle after a refusal");
  CHECK_ERR(rc, c, SBN_EINVAL, "UNAUTHORIZED");
  CHECK(sbn_client_hello(c, NULL) != 0, "a refused handle still works");
  sbn_client_close(c);
  rc = sbn_client_connect_tcp("127.0.0.1", g_port[0], NULL, 0, &c);
  CHECK_ERR(rc, c, SBN_EINVAL, "UNAUTHORIZED");
  sbn_client_close(c);
  CHECK(sbn_client_connect_tcp("127.0.0.1", 0, NULL, 0, &c) == SBN_EINVAL &&
            c == NULL,
        "port 0");
  metrics_of(u, &m1);
  CHECK(m1.auth_failures - m0.auth_failures == 2, "auth_failures +%llu",
        (unsigned long long)(m1.auth_failures - m0.auth_failures));
  sbn_client_close(u);
}

int main(void) {
  alarm(170);
  signal(SIGPIPE, SIG_IGN);
  snprintf(g_root, sizeof g_root, "/tmp/svcc3-XXXXXX");
  CHECK(mkdtemp(g_root) != NULL, "mkdtemp: %s", strerror(errno));
  atexit(cleanup);
  start_job();
  register_all();
  test_fused_batches();
  test_batch_errors();
  test_stats();
  test_state();
  test_checkpoint();
  test_metrics();
  test_tcp();
  test_errors();
  stop_job();
  CHECK(job_stderr_clean(), "a worker reported a sanitizer error");
  printf("svc_client_e2e: np=%d ok\n", NP);
  return 0;
}
