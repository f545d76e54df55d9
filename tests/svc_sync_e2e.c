/* End-to-end test of syncbatchnorm across syncbnd workers: `svc_sync_e2e
 * NP` starts `mpirun -np NP syncbnd --stall-timeout 2` and, with one
 * thread per rank (clients are blocking, the ranks must submit
 * concurrently):
 * - checks training forward and backward against the single-process
 *   library on the concatenated batch, with uneven and empty per-rank
 *   batches, and that the running statistics agree (eval forwards);
 * - submits two layers in opposite orders on different ranks;
 * - lets an entry stall (only rank 0 submits): STALL naming the missing
 *   ranks, the step is poisoned, the next step works;
 * - closes a client with a pending entry: the others get STALL and the
 *   workers go on.
 * Every blocking step has a timeout; alarm() is the backstop. */
#define _GNU_SOURCE
#include <errno.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "client.h"
#include "svc_job.h"
#include "syncbn.h"

#define MAXNP 4
#define C 3
#define S 4 /* spatial size */

static int NP = 2;
static pid_t g_mpirun = -1;
static char g_root[64];
static char g_path[MAXNP][SJ_PATH_MAX];

#define CHECK(cond, ...)                                                   \
  do {                                                                     \
    if (!(cond)) {                                                         \
      fprintf(stderr, "svc_sync_e2e: %s:%d: check failed: %s: ", __FILE__, \
              __LINE__, #cond);                                            \
      fprintf(stderr, __VA_ARGS__);                                        \
      fprintf(stderr, "\n");                                               \
      exit(1);                                                             \
    }                                                                      \
  } while (0)

static void cleanup(void) {
  sj_stop(&g_mpirun);
  sj_remove("svc_sync_e2e", g_root);
}

static void start_job(const char *dir) {
  char npbuf[8];
  snprintf(npbuf, sizeof npbuf, "%d", NP);
  const char *argv[] = {SBN_MPIEXEC, "--oversubscribe",
                        "--bind-to", "none",
                        "--timeout", "150",
                        "--mca",     "pml",
                        "ob1",       "--mca",
                        "btl",       "self,vader,tcp",
                        "-np",       npbuf,
                        SBN_SYNCBND, "--socket-dir",
                        dir,         "--stall-timeout",
                        "2",         "--cycle-us",
                        "1000",      NULL};
  g_mpirun = sj_start("svc_sync_e2e", argv, NULL, NP, g_path, NULL);
}

static sbn_client_t *connect_rank(int rank, int timeout_s) {
  return sj_connect("svc_sync_e2e", g_path[rank], timeout_s);
}

static uint64_t reg(sbn_client_t *c, const char *name) {
  sbn_layer_params_t p;
  uint64_t id = 0;
  int rc;
  memset(&p, 0, sizeof p);
  p.op = SBN_OP_BATCHNORM;
  p.channels = C;
  p.eps = 1e-5f;
  p.momentum = 0.1f;
  p.affine = 1;
  p.track_running_stats = 1;
  rc = sbn_client_register(c, name, "syncbatchnorm", &p, 0, &id, NULL);
  CHECK(rc == 0, "register %s: %s", name, sbn_last_error());
  return id;
}

static void fill(float *a, size_t n, uint64_t seed, float scale, float off) {
  for (size_t i = 0; i < n; i++) {
    seed = seed * 6364136223846793005ull + 1442695040888963407ull;
    a[i] = off + scale * ((float)(seed >> 40) / (float)(1 << 24) - 0.5f);
  }
}

static int close_enough(float a, float b, float rel) {
  return fabsf(a - b) <= rel * (1.0f + fabsf(b));
}

/* ------------------------------------------------------------------ */
/* Forward/backward against the library */

static int g_n[MAXNP];
static float g_x[64 * C * S], g_dy[64 * C * S], g_w[C], g_b[C];
static float g_y[64 * C * S], g_dx[64 * C * S], g_ey[MAXNP][64 * C * S];
static float g_dw[MAXNP][C], g_db[MAXNP][C];

typedef struct job_s {
  int rank;
  uint64_t layer, step;
  int rc;
  char code[32];
  double delay;
  int what; /* 0 fwd+bwd+eval, 1 forward only */
} job_t;

static size_t offset_of(int rank) {
  size_t o = 0;
  for (int r = 0; r < rank; r++)
    o += (size_t)g_n[r] * C * S;
  return o;
}

static void *fb_thread(void *arg) {
  job_t *j = arg;
  sbn_client_t *c = connect_rank(j->rank, 30);
  sbn_tensor_desc_t d = {3, {(size_t)g_n[j->rank], C, S}, SBN_LAYOUT_NCHW};
  size_t o = offset_of(j->rank);
  int rc;
  if (j->delay > 0)
    usleep((useconds_t)(j->delay * 1e6));
  rc = sbn_client_forward(c, j->layer, j->step, 1, &d, g_x + o, g_w, g_b, C,
                          g_y + o);
  j->rc = rc;
  snprintf(j->code, sizeof j->code, "%s", sbn_client_server_code(c));
  if (rc == 0 && j->what == 0) {
    rc = sbn_client_backward(c, j->layer, j->step, &d, g_dy + o, g_dx + o,
                             g_dw[j->rank], g_db[j->rank], C);
    CHECK(rc == 0, "backward rank %d: %s", j->rank, sbn_last_error());
    /* Eval with every rank's running statistics on the same input. */
    sbn_tensor_desc_t e = {3, {(size_t)g_n[0], C, S}, SBN_LAYOUT_NCHW};
    rc = sbn_client_forward(c, j->layer, j->step, 0, &e, g_x, g_w, g_b, C,
                            g_ey[j->rank]);
    CHECK(rc == 0, "eval rank %d: %s", j->rank, sbn_last_error());
  }
  sbn_client_close(c);
  return NULL;
}

static void run_threads(job_t *jobs, int n) {
  pthread_t t[2 * MAXNP];
  for (int i = 0; i < n; i++)
    CHECK(pthread_create(&t[i], NULL, fb_thread, &jobs[i]) == 0, "thread");
  for (int i = 0; i < n; i++)
    pthread_join(t[i], NULL);
}

static void test_matches_library(const char *name, const int *ns) {
  sbn_client_t *c;
  job_t jobs[MAXNP];
  size_t total = 0;
  uint64_t id = 0;
  for (int r = 0; r < NP; r++) {
    g_n[r] = ns[r];
    total += (size_t)ns[r] * C * S;
    c = connect_rank(r, 10);
    id = reg(c, name);
    sbn_client_close(c);
  }
  fill(g_x, total, 11, 4.0f, 1.5f);
  fill(g_dy, total, 12, 2.0f, 0.1f);
  fill(g_w, C, 13, 1.0f, 1.0f);
  fill(g_b, C, 14, 1.0f, 0.0f);
  memset(jobs, 0, sizeof jobs);
  for (int r = 0; r < NP; r++) {
    jobs[r].rank = r;
    jobs[r].layer = id;
    jobs[r].step = 1;
  }
  run_threads(jobs, NP);
  for (int r = 0; r < NP; r++)
    CHECK(jobs[r].rc == 0, "forward rank %d: %s", r, jobs[r].code);

  /* The library on the concatenated batch, in one process. */
  {
    sbn_comm_t comm = {&sj_self_vt, 0, 1, 0};
    sbn_layer_params_t p;
    sbn_layer_t *l = NULL;
    sbn_tensor_desc_t d = {3, {total / (C * S), C, S}, SBN_LAYOUT_NCHW};
    sbn_tensor_desc_t e = {3, {(size_t)g_n[0], C, S}, SBN_LAYOUT_NCHW};
    float rm[C] = {0, 0, 0}, rv[C] = {1, 1, 1}, dw[C], db[C];
    float *y = malloc(total * 4), *dx = malloc(total * 4),
          *ey = malloc(total * 4 + 4);
    sbn_state_t st;
    size_t ws = 0, sv = 0;
    void *wsb, *svb;
    sbn_forward_args_t fa;
    sbn_backward_args_t ba;
    memset(&p, 0, sizeof p);
    p.op = SBN_OP_BATCHNORM;
    p.channels = C;
    p.eps = 1e-5f;
    p.momentum = 0.1f;
    p.affine = 1;
    p.track_running_stats = 1;
    CHECK(sbn_layer_create(&p, &comm, &l) == 0, "%s", sbn_last_error());
    CHECK(sbn_layer_sizes(l, &d, &ws, &sv) == 0, "%s", sbn_last_error());
    wsb = malloc(ws + 1);
    svb = malloc(sv + 1);
    memset(&st, 0, sizeof st);
    st.running_mean = rm;
    st.running_var = rv;
    memset(&fa, 0, sizeof fa);
    fa.mode = SBN_MODE_TRAIN;
    fa.x_desc = &d;
    fa.x = g_x;
    fa.y = y;
    fa.weight = g_w;
    fa.bias = g_b;
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
    ba.x = g_x;
    ba.dy = g_dy;
    ba.dx = dx;
    ba.weight = g_w;
    ba.dweight = dw;
    ba.dbias = db;
    ba.step = 1;
    ba.workspace = wsb;
    ba.workspace_bytes = ws;
    ba.saved = svb;
    ba.saved_bytes = sv;
    CHECK(sbn_backward(l, &ba) == 0, "%s", sbn_last_error());
    for (size_t i = 0; i < total; i++) {
      CHECK(close_enough(g_y[i], y[i], 1e-5f), "y[%zu] %g vs %g", i, g_y[i],
            y[i]);
      CHECK(close_enough(g_dx[i], dx[i], 1e-4f), "dx[%zu] %g vs %g", i, g_dx[i],
            dx[i]);
    }
    /* As in PyTorch's SyncBatchNorm, each rank's dweight and dbias are
     * its own batch's share (data parallelism sums them later). */
    for (int k = 0; k < C; k++) {
      float sw = 0, sb = 0;
      for (int r = 0; r < NP; r++) {
        sw += g_dw[r][k];
        sb += g_db[r][k];
      }
      CHECK(close_enough(sw, dw[k], 1e-4f), "sum dw %g vs %g", sw, dw[k]);
      CHECK(close_enough(sb, db[k], 1e-4f), "sum db %g vs %g", sb, db[k]);
    }
    /* Eval with the reference running statistics. */
    fa.mode = SBN_MODE_EVAL;
    fa.x_desc = &e;
    fa.y = ey;
    fa.saved = NULL;
    fa.saved_bytes = 0;
    CHECK(sbn_forward(l, &fa) == 0, "%s", sbn_last_error());
    for (int r = 0; r < NP; r++)
      for (size_t i = 0; i < (size_t)g_n[0] * C * S; i++) {
        CHECK(g_ey[r][i] == g_ey[0][i], "running stats differ: rank %d", r);
        CHECK(close_enough(g_ey[r][i], ey[i], 1e-5f), "eval[%zu] %g vs %g", i,
              g_ey[r][i], ey[i]);
      }
    sbn_layer_destroy(l);
    free(y);
    free(dx);
    free(ey);
    free(wsb);
    free(svb);
  }
}

/* Two layers in opposite orders on different ranks: both complete. */
static void test_out_of_order(void) {
  job_t jobs[2 * MAXNP];
  uint64_t a = 0, b = 0;
  for (int r = 0; r < NP; r++) {
    sbn_client_t *c = connect_rank(r, 10);
    a = reg(c, "A");
    b = reg(c, "B");
    sbn_client_close(c);
  }
  memset(jobs, 0, sizeof jobs);
  for (int r = 0; r < NP; r++) {
    jobs[2 * r] = (job_t){r, a, 3, 0, "", (r % 2) ? 0.3 : 0.0, 1};
    jobs[2 * r + 1] = (job_t){r, b, 3, 0, "", (r % 2) ? 0.0 : 0.3, 1};
  }
  run_threads(jobs, 2 * NP);
  for (int i = 0; i < 2 * NP; i++)
    CHECK(jobs[i].rc == 0, "out of order job %d: %s", i, jobs[i].code);
}

/* Only rank 0 submits: STALL; the step is poisoned; the next step works. */
static void test_stall(void) {
  job_t jobs[MAXNP];
  uint64_t id = 0;
  for (int r = 0; r < NP; r++) {
    sbn_client_t *c = connect_rank(r, 10);
    id = reg(c, "stall");
    sbn_client_close(c);
  }
  memset(jobs, 0, sizeof jobs);
  jobs[0] = (job_t){0, id, 5, 0, "", 0, 1};
  run_threads(jobs, 1);
  CHECK(jobs[0].rc != 0 && strcmp(jobs[0].code, "STALL") == 0,
        "expected STALL, got %d %s", jobs[0].rc, jobs[0].code);
  /* A late submission of the poisoned step fails at once. */
  jobs[0] = (job_t){1, id, 5, 0, "", 0, 1};
  run_threads(jobs, 1);
  CHECK(strcmp(jobs[0].code, "STALL") == 0, "late: %s", jobs[0].code);
  for (int r = 0; r < NP; r++)
    jobs[r] = (job_t){r, id, 6, 0, "", 0, 1};
  run_threads(jobs, NP);
  for (int r = 0; r < NP; r++)
    CHECK(jobs[r].rc == 0, "step after stall rank %d: %s", r, jobs[r].code);
}

/* A client that leaves with a pending entry: the others stall, then the
 * next step works. */
static void test_disconnect(void) {
  job_t jobs[MAXNP];
  uint64_t id = 0;
  sbn_client_t *c;
  sbn_tensor_desc_t d = {3, {(size_t)g_n[0], C, S}, SBN_LAYOUT_NCHW};
  struct timeval tv = {0, 300000};
  pthread_t t;
  int rc;
  for (int r = 0; r < NP; r++) {
    c = connect_rank(r, 10);
    id = reg(c, "gone");
    sbn_client_close(c);
  }
  /* Rank 0's client gives up after 0.3 s (its socket's SO_RCVTIMEO:
   * SBN_CLIENT_ETIMEDOUT) and closes. */
  c = connect_rank(0, 10);
  setsockopt(sbn_client_fd(c), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  rc = sbn_client_forward(c, id, 7, 1, &d, g_x, g_w, g_b, C, g_y);
  CHECK(rc == SBN_CLIENT_ETIMEDOUT &&
            strncmp(sbn_last_error(), "forward: recv: ", 15) == 0,
        "a lone forward should time out, got %s: %s", sbn_client_err_name(rc),
        sbn_last_error());
  sbn_client_close(c);
  /* Rank 1 may submit the step only once rank 0's worker has withdrawn
   * it: its close is handled before the metrics reply below (it was
   * readable before that request was sent), but an entry that is listed
   * in the agreement round in flight is withdrawn only when that round
   * ends, and a rank 1 that lists the step in that same round completes
   * it (seen in CI under load). Rounds are event-driven (an idle worker
   * runs none), so the wait is for rank 0's pending count to reach 0. */
  {
    sbn_client_metrics_t m;
    c = connect_rank(0, 10);
    for (int i = 0; i < 5000; i++) {
      CHECK(sbn_client_metrics(c, &m) == 0, "metrics: %s", sbn_last_error());
      if (m.pending == 0)
        break;
      usleep(1000);
    }
    CHECK(m.pending == 0, "rank 0 still holds the entry after 5 s");
    sbn_client_close(c);
  }
  memset(jobs, 0, sizeof jobs);
  jobs[0] = (job_t){1, id, 7, 0, "", 0, 1};
  CHECK(pthread_create(&t, NULL, fb_thread, &jobs[0]) == 0, "thread");
  pthread_join(t, NULL);
  CHECK(strcmp(jobs[0].code, "STALL") == 0, "disconnect: %s", jobs[0].code);
  for (int r = 0; r < NP; r++)
    jobs[r] = (job_t){r, id, 8, 0, "", 0, 1};
  run_threads(jobs, NP);
  for (int r = 0; r < NP; r++)
    CHECK(jobs[r].rc == 0, "step after disconnect rank %d: %s", r,
          jobs[r].code);
}

/* The CPU time (clock ticks) of the syncbnd workers that mpirun forked,
 * summed, and how many there are. */
static long workers_cpu(int *n) {
  long cpu[2 * MAXNP], sum = 0;
  *n = sj_workers("svc_sync_e2e", g_mpirun, NULL, cpu, 2 * MAXNP);
  CHECK(*n <= 2 * MAXNP, "%d syncbnd workers", *n);
  for (int i = 0; i < *n; i++)
    sum += cpu[i];
  return sum;
}

/* An idle job runs no collective: over one second without requests no
 * worker starts an agreement round (rounds are event-driven since
 * protocol 5; they used to run every cycle). Nor does it keep a core
 * busy: the poll after a reply (--poll-us, 2 ms by default) ends, and
 * the workers take under a tenth of a core each (1 to 2 % here) over
 * the second that follows the replies to the metrics requests. */
static void test_idle(void) {
  sbn_client_metrics_t m0[MAXNP], m1[MAXNP];
  sbn_client_t *c[MAXNP];
  long cpu0, cpu1, hz = sysconf(_SC_CLK_TCK);
  int nw0, nw1;
  for (int r = 0; r < NP; r++) {
    c[r] = connect_rank(r, 10);
    CHECK(sbn_client_metrics(c[r], &m0[r]) == 0, "metrics: %s",
          sbn_last_error());
  }
  cpu0 = workers_cpu(&nw0);
  sleep(1);
  cpu1 = workers_cpu(&nw1);
  CHECK(nw0 == NP && nw1 == NP, "found %d and %d syncbnd workers, not %d", nw0,
        nw1, NP);
  CHECK((double)(cpu1 - cpu0) / (double)hz < 0.1 * NP,
        "idle workers took %.2f s of CPU in 1 s", (double)(cpu1 - cpu0) / hz);
  for (int r = 0; r < NP; r++) {
    CHECK(sbn_client_metrics(c[r], &m1[r]) == 0, "metrics: %s",
          sbn_last_error());
    CHECK(m1[r].negotiations == m0[r].negotiations &&
              m1[r].gathers == m0[r].gathers &&
              m1[r].allreduces == m0[r].allreduces &&
              m1[r].bells == m0[r].bells,
          "rank %d ran collectives while idle: %llu negotiations, %llu "
          "gathers, %llu allreduces in 1 s",
          r, (unsigned long long)(m1[r].negotiations - m0[r].negotiations),
          (unsigned long long)(m1[r].gathers - m0[r].gathers),
          (unsigned long long)(m1[r].allreduces - m0[r].allreduces));
    CHECK(m1[r].negotiations > 0, "rank %d never negotiated", r);
    sbn_client_close(c[r]);
  }
}

int main(int argc, char **argv) {
  char dir[128];
  static const int ns2[MAXNP] = {5, 0}, ns3[MAXNP] = {2, 0, 5};
  if (argc > 1)
    NP = atoi(argv[1]);
  CHECK(NP >= 2 && NP <= 3, "NP %d", NP);
  alarm(170);
  signal(SIGPIPE, SIG_IGN);
  snprintf(g_root, sizeof g_root, "/tmp/svcsync-XXXXXX");
  CHECK(mkdtemp(g_root) != NULL, "mkdtemp: %s", strerror(errno));
  atexit(cleanup);
  snprintf(dir, sizeof dir, "%s/s", g_root);
  start_job(dir);
  test_matches_library("bn", NP == 2 ? ns2 : ns3);
  test_out_of_order();
  test_stall();
  test_disconnect();
  test_idle();
  printf("svc_sync_e2e: np=%d ok\n", NP);
  return 0;
}
