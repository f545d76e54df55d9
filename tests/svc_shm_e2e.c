/* End-to-end test of zero-copy shared memory (protocol 6): starts
 * `mpirun -np 1 syncbnd` with a small memory budget and a TCP listener,
 * then through the client library (and one raw frame):
 * - attaches a sealed memfd and runs batchnorm training forward/backward
 *   a syncbatchnorm training step (deferred to the agreement) and a
 *   layernorm eval forward with x/dy read from the region and y/dx
 *   written into it, comparing every output bit for bit with the same
 *   request sent over the socket on a twin layer;
 * - sends every hostile case: an unsealed memfd, one sealed but still
 *   shrinkable, a declared size that differs, a descriptor that is no
 *   memfd, a shm_attach without a descriptor, the same memfd twice, more
 *   regions than a connection may hold, a region larger than the memory
 *   budget, offsets past the end or wrapping around 2^64, an unknown
 *   region, inputs and outputs that overlap, and shared memory over TCP; each
 * gets its error code and the connection still serves the happy path
 * afterwards;
 * - sends six descriptors in one SCM_RIGHTS message on a raw connection
 *   (the worker holds at most four unattached): it is refused with
 *   RESOURCE and closed, and the worker's count of open descriptors
 *   (/proc/PID/fd) is back where it was. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <dirent.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "client.h"
#include "svc_job.h"
#include "syncbn.h"

#define CHECK(cond, ...)                                                  \
  do {                                                                    \
    if (!(cond)) {                                                        \
      fprintf(stderr, "svc_shm_e2e: %s:%d: check failed: %s: ", __FILE__, \
              __LINE__, #cond);                                           \
      fprintf(stderr, __VA_ARGS__);                                       \
      fprintf(stderr, "\n");                                              \
      exit(1);                                                            \
    }                                                                     \
  } while (0)

/* A refusal: the call failed with the worker's code want. */
#define CHECK_CODE(rc, c, want)                                      \
  CHECK((rc) != 0 && strcmp(sbn_client_server_code(c), (want)) == 0, \
        "expected %s, got rc %d code '%s' (%s)", (want), (rc),       \
        sbn_client_server_code(c), sbn_last_error())

#define N 3
#define C 4
#define S 5
#define NUMEL (N * C * S)
#define BYTES (NUMEL * sizeof(float))
#define REGION (1u << 20)
#define BUDGET "8388608"

static pid_t g_mpirun = -1;
static char g_root[64];
static char g_path[1][SJ_PATH_MAX];
static int g_port[1];
static const char g_token[] = "shm-token";

static void cleanup(void) {
  sj_stop(&g_mpirun);
  sj_remove("svc_shm_e2e", g_root);
}

static void start_job(void) {
  char dir[128], tok[128];
  snprintf(dir, sizeof dir, "%s/s", g_root);
  snprintf(tok, sizeof tok, "%s/token", g_root);
  sj_write_token("svc_shm_e2e", tok, g_token, sizeof g_token - 1);
  const char *argv[] = {SBN_MPIEXEC,   "--oversubscribe",
                        "--bind-to",   "none",
                        "--timeout",   "150",
                        "--mca",       "pml",
                        "ob1",         "--mca",
                        "btl",         "self,vader,tcp",
                        "-np",         "1",
                        SBN_SYNCBND,   "--socket-dir",
                        dir,           "--max-memory",
                        BUDGET,        "--tcp",
                        "127.0.0.1:0", "--token-file",
                        tok,           NULL};
  g_mpirun = sj_start("svc_shm_e2e", argv, NULL, 1, g_path, g_port);
}

static void fill(float *a, size_t n, uint32_t seed) {
  for (size_t i = 0; i < n; i++) {
    seed = seed * 1664525u + 1013904223u;
    a[i] = (float)((seed >> 8) & 0xffff) / 8192.0f - 4.0f;
  }
}

static uint64_t reg(sbn_client_t *c, const char *name, const char *kind,
                    sbn_op_t op) {
  sbn_layer_params_t p;
  uint64_t id = 0;
  sbn_layer_params_default(&p, op);
  if (op == SBN_OP_LAYERNORM) {
    p.norm_ndim = 1;
    p.norm_shape[0] = S;
  } else {
    p.channels = C;
  }
  CHECK(sbn_client_register(c, name, kind, &p, 0, &id, NULL) == 0,
        "register %s: %s", name, sbn_last_error());
  return id;
}

/* A memfd of size bytes with the given seals (0: none). */
static int memfd(size_t size, int seals) {
  int fd = memfd_create("shm-test", MFD_CLOEXEC | MFD_ALLOW_SEALING);
  CHECK(fd >= 0 && ftruncate(fd, (off_t)size) == 0, "memfd: %s",
        strerror(errno));
  if (seals != 0)
    CHECK(fcntl(fd, F_ADD_SEALS, seals) == 0, "seals: %s", strerror(errno));
  return fd;
}

static sbn_tensor_desc_t g_d;
static uint64_t g_bn, g_bn2, g_ln, g_ln2, g_sync, g_sync2, g_keep, g_keep2;

/* Training forward and backward of batchnorm and an eval forward of
 * layernorm through the region, each equal bit for bit to the socket
 * path on a twin layer. step makes each call new. */
static void happy(sbn_client_t *c, const sbn_client_shm_t *m, uint64_t step) {
  uint8_t *b = m->base;
  float x[NUMEL], dy[NUMEL], y[NUMEL], dx[NUMEL], dw[C], db[C], dw2[C], db2[C];
  sbn_tensor_desc_t ld = g_d;
  fill(x, NUMEL, (uint32_t)step);
  fill(dy, NUMEL, (uint32_t)step + 77);
  memcpy(b + 0, x, BYTES);
  memcpy(b + 4096, dy, BYTES);
  CHECK(sbn_client_shm_forward(c, g_bn, step, 1, &g_d, m->region, 0, 8192) == 0,
        "shm forward: %s", sbn_last_error());
  CHECK(sbn_client_forward(c, g_bn2, step, 1, &g_d, x, NULL, NULL, 0, y) == 0,
        "forward: %s", sbn_last_error());
  CHECK(memcmp(b + 8192, y, BYTES) == 0, "y differs from the socket path");
  CHECK(memcmp(b, x, BYTES) == 0, "x in the region was changed");
  CHECK(sbn_client_shm_backward(c, g_bn, step, &g_d, m->region, 4096, 12288, dw,
                                db, C) == 0,
        "shm backward: %s", sbn_last_error());
  CHECK(sbn_client_backward(c, g_bn2, step, &g_d, dy, dx, dw2, db2, C) == 0,
        "backward: %s", sbn_last_error());
  CHECK(memcmp(b + 12288, dx, BYTES) == 0, "dx differs from the socket path");
  CHECK(memcmp(dw, dw2, sizeof dw) == 0 && memcmp(db, db2, sizeof db) == 0,
        "dweight/dbias differ from the socket path");
  /* LayerNorm over the last dim, in eval: x stays at 0, y at 16384. */
  ld.ndim = 2;
  ld.dims[0] = N * C;
  ld.dims[1] = S;
  CHECK(sbn_client_shm_forward(c, g_ln, step, 0, &ld, m->region, 0, 16384) == 0,
        "shm layernorm: %s", sbn_last_error());
  CHECK(sbn_client_forward(c, g_ln2, step, 0, &ld, x, NULL, NULL, 0, y) == 0,
        "layernorm: %s", sbn_last_error());
  CHECK(memcmp(b + 16384, y, BYTES) == 0, "layernorm y differs");
  /* An output at an offset that is not 64-byte aligned (not even 4) is
   * computed aside and copied in: same bytes. */
  CHECK(
      sbn_client_shm_forward(c, g_bn, step, 0, &g_d, m->region, 0, 40962) == 0,
      "shm eval forward: %s", sbn_last_error());
  CHECK(sbn_client_forward(c, g_bn2, step, 0, &g_d, x, NULL, NULL, 0, y) == 0,
        "eval forward: %s", sbn_last_error());
  CHECK(memcmp(b + 40962, y, BYTES) == 0, "unaligned y differs");
}

/* A shm_attach frame with no descriptor, on a raw connection: the reply
 * names the missing descriptor with BAD_REQUEST. */
static void attach_without_fd(void) {
  static const uint8_t frame[] = {0,    0,   0,   0x17, 0x83, 0xa2, 'o',  'p',
                                  0xaa, 's', 'h', 'm',  '_',  'a',  't',  't',
                                  'a',  'c', 'h', 0xa2, 'i',  'd',  0x07, 0xa4,
                                  's',  'i', 'z', 'e',  0xcd, 0x10, 0x00};
  struct sockaddr_un sa;
  uint8_t buf[512];
  ssize_t n, got = 0;
  int fd = socket(AF_UNIX, SOCK_STREAM, 0);
  CHECK(fd >= 0, "socket");
  memset(&sa, 0, sizeof sa);
  sa.sun_family = AF_UNIX;
  CHECK(strlen(g_path[0]) < sizeof sa.sun_path, "socket path too long");
  memcpy(sa.sun_path, g_path[0], strlen(g_path[0]) + 1);
  CHECK(connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0, "connect: %s",
        strerror(errno));
  {
    uint8_t f[sizeof frame];
    memcpy(f, frame, sizeof f);
    f[3] = (uint8_t)(sizeof f - 4);
    CHECK(write(fd, f, sizeof f) == (ssize_t)sizeof f, "write");
  }
  while (got < 4 || got < 4 + (ssize_t)(((uint32_t)buf[0] << 24) |
                                        ((uint32_t)buf[1] << 16) |
                                        ((uint32_t)buf[2] << 8) | buf[3])) {
    n = read(fd, buf + got, sizeof buf - (size_t)got);
    CHECK(n > 0, "read: %s", n < 0 ? strerror(errno) : "closed");
    got += n;
  }
  CHECK(memmem(buf, (size_t)got, "BAD_REQUEST", 11) != NULL &&
            memmem(buf, (size_t)got, "no file descriptor", 18) != NULL,
        "attach without a descriptor: %.*s", (int)got, buf);
  close(fd);
}

/* A raw connection to the worker's socket. */
static int raw_connect(void) {
  struct sockaddr_un sa;
  int fd = socket(AF_UNIX, SOCK_STREAM, 0);
  CHECK(fd >= 0, "socket");
  memset(&sa, 0, sizeof sa);
  sa.sun_family = AF_UNIX;
  CHECK(strlen(g_path[0]) < sizeof sa.sun_path, "socket path too long");
  memcpy(sa.sun_path, g_path[0], strlen(g_path[0]) + 1);
  CHECK(connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0, "connect: %s",
        strerror(errno));
  return fd;
}

/* The worker's pid: the job's one syncbnd. */
static long worker_pid(void) {
  long pid = -1;
  int n = sj_workers("svc_shm_e2e", g_mpirun, &pid, NULL, 1);
  CHECK(n == 1, "%d syncbnd processes under mpirun %ld", n, (long)g_mpirun);
  return pid;
}

static int open_fds(long pid) {
  char path[64];
  DIR *d;
  int n = 0;
  snprintf(path, sizeof path, "/proc/%ld/fd", pid);
  CHECK((d = opendir(path)) != NULL, "%s: %s", path, strerror(errno));
  while (readdir(d) != NULL)
    n++;
  closedir(d);
  return n;
}

/* The worker's open descriptors once the count has held still for 200
 * ms (connections closed just before are still being closed). */
static int settled_fds(long pid) {
  int n = open_fds(pid), same = 0;
  for (int i = 0; i < 150 && same < 10; i++) {
    struct timespec ts = {0, 20 * 1000 * 1000};
    int m;
    nanosleep(&ts, NULL);
    m = open_fds(pid);
    same = m == n ? same + 1 : 0;
    n = m;
  }
  return n;
}

/* Six memfds in one SCM_RIGHTS message, with a hello's bytes: the worker
 * holds at most four descriptors not yet attached, so it refuses with
 * RESOURCE, closes the connection, and keeps none of them. */
static void too_many_fds(void) {
  enum { NFD = 6 };
  static const uint8_t hello[] = {0,   0,   0,    0x11, 0x82, 0xa2,
                                  'o', 'p', 0xa5, 'h',  'e',  'l',
                                  'l', 'o', 0xa2, 'i',  'd',  0x01};
  char cbuf[CMSG_SPACE(NFD * sizeof(int))];
  struct iovec v = {(void *)hello, sizeof hello};
  struct msghdr m;
  struct cmsghdr *cm;
  uint8_t buf[512];
  ssize_t n, got = 0;
  int fds[NFD], sock, before, after;
  long pid = worker_pid();
  before = settled_fds(pid);
  sock = raw_connect();
  for (int i = 0; i < NFD; i++)
    fds[i] = memfd(4096, F_SEAL_SHRINK | F_SEAL_GROW);
  memset(&m, 0, sizeof m);
  memset(cbuf, 0, sizeof cbuf);
  m.msg_iov = &v;
  m.msg_iovlen = 1;
  m.msg_control = cbuf;
  m.msg_controllen = sizeof cbuf;
  cm = CMSG_FIRSTHDR(&m);
  cm->cmsg_level = SOL_SOCKET;
  cm->cmsg_type = SCM_RIGHTS;
  cm->cmsg_len = CMSG_LEN(NFD * sizeof(int));
  memcpy(CMSG_DATA(cm), fds, sizeof fds);
  CHECK(sendmsg(sock, &m, 0) == (ssize_t)sizeof hello, "sendmsg: %s",
        strerror(errno));
  for (int i = 0; i < NFD; i++)
    close(fds[i]);
  /* The refusal, then the end of the connection. */
  while ((n = read(sock, buf + got, sizeof buf - (size_t)got)) > 0)
    got += n;
  CHECK(n == 0, "read: %s", strerror(errno));
  CHECK(memmem(buf, (size_t)got, "RESOURCE", 8) != NULL &&
            memmem(buf, (size_t)got, "more file descriptors", 21) != NULL,
        "too many descriptors: %.*s", (int)got, buf);
  close(sock);
  after = settled_fds(pid);
  CHECK(after == before, "the worker holds %d descriptors, %d before", after,
        before);
}

static void hostile_attach(sbn_client_t *c) {
  uint64_t r = 0;
  int fd, rc;
  char tmpl[128];
  fd = memfd(4096, 0);
  rc = sbn_client_shm_attach_fd(c, fd, 4096, &r);
  CHECK_CODE(rc, c, "BAD_PARAMS");
  CHECK(strstr(sbn_last_error(), "F_SEAL_SHRINK") != NULL, "%s",
        sbn_last_error());
  close(fd);
  fd = memfd(4096, F_SEAL_GROW | F_SEAL_SEAL); /* still shrinkable */
  CHECK_CODE(sbn_client_shm_attach_fd(c, fd, 4096, &r), c, "BAD_PARAMS");
  close(fd);
  fd = memfd(4096, F_SEAL_SHRINK);
  CHECK_CODE(sbn_client_shm_attach_fd(c, fd, 8192, &r), c, "BAD_PARAMS");
  CHECK(strstr(sbn_last_error(), "differs") != NULL, "%s", sbn_last_error());
  close(fd);
  snprintf(tmpl, sizeof tmpl, "%s/plainXXXXXX", g_root);
  fd = mkstemp(tmpl);
  CHECK(fd >= 0 && ftruncate(fd, 4096) == 0, "mkstemp");
  CHECK_CODE(sbn_client_shm_attach_fd(c, fd, 4096, &r), c, "BAD_PARAMS");
  CHECK(strstr(sbn_last_error(), "memfd") != NULL, "%s", sbn_last_error());
  close(fd);
  attach_without_fd();
  /* A region larger than the whole budget: refused before it is mapped
   * (memfds are sparse, so this costs nothing). */
  fd = memfd(16u << 20, F_SEAL_SHRINK);
  CHECK_CODE(sbn_client_shm_attach_fd(c, fd, 16u << 20, &r), c, "RESOURCE");
  CHECK(strstr(sbn_last_error(), "budget") != NULL, "%s", sbn_last_error());
  close(fd);
}

/* Ranges, overlap and deferred outputs, on the attached region m. */
static void hostile_ranges(sbn_client_t *c, const sbn_client_shm_t *m) {
  const uint64_t end = m->size;
  struct {
    uint64_t region, x, y;
    const char *what;
  } bad[] = {
      {m->region, end - 4, 8192, "x past the end"},
      {m->region, 0, end - BYTES + 4, "y past the end"},
      {m->region, UINT64_MAX - 3, 8192, "x offset wrapping"},
      {m->region, 0, UINT64_MAX - BYTES + 8, "y offset wrapping"},
      {m->region + 50, 0, 8192, "unknown region"},
      {m->region, 0, 0, "y on x"},
      {m->region, 0, 4, "y overlapping x"},
      {m->region, 4096, 4096 - BYTES + 4, "y overlapping the front of x"},
  };
  uint64_t step = 1000;
  for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
    int rc = sbn_client_shm_forward(c, g_bn, step++, 1, &g_d, bad[i].region,
                                    bad[i].x, bad[i].y);
    CHECK(rc != 0 && strcmp(sbn_client_server_code(c), "BAD_TENSOR") == 0,
          "%s: rc %d code '%s' (%s)", bad[i].what, rc,
          sbn_client_server_code(c), sbn_last_error());
  }
  CHECK_CODE(
      sbn_client_shm_backward(c, g_bn, 1, &g_d, m->region, 0, 8, NULL, NULL, 0),
      c, "BAD_TENSOR");
}

/* A syncbatchnorm training step goes through the agreement (its reply is
 * deferred) and still writes y and dx into the region, equal bit for bit
 * to the socket path on a twin layer. */
static void sync_step(sbn_client_t *c, const sbn_client_shm_t *m, uint64_t step,
                      unsigned flags) {
  uint8_t *b = m->base;
  float x[NUMEL], dy[NUMEL], y[NUMEL], dx[NUMEL], dw[C], db[C], dw2[C], db2[C];
  fill(x, NUMEL, (uint32_t)step + 5);
  fill(dy, NUMEL, (uint32_t)step + 9);
  memcpy(b + 20480, x, BYTES);
  memcpy(b + 24576, dy, BYTES);
  CHECK(sbn_client_shm_forward_flags(c, g_sync, step, 1, &g_d, m->region, 20480,
                                     28672, flags) == 0,
        "shm sync forward: %s", sbn_last_error());
  CHECK(sbn_client_shm_backward(c, g_sync, step, &g_d, m->region, 24576, 32768,
                                dw, db, C) == 0,
        "shm sync backward: %s", sbn_last_error());
  CHECK(sbn_client_forward(c, g_sync2, step, 1, &g_d, x, NULL, NULL, 0, y) == 0,
        "sync forward: %s", sbn_last_error());
  CHECK(sbn_client_backward(c, g_sync2, step, &g_d, dy, dx, dw2, db2, C) == 0,
        "sync backward: %s", sbn_last_error());
  CHECK(memcmp(b + 28672, y, BYTES) == 0 && memcmp(b + 32768, dx, BYTES) == 0,
        "syncbatchnorm y/dx differ from the socket path");
  CHECK(memcmp(dw, dw2, sizeof dw) == 0 && memcmp(db, db2, sizeof db) == 0,
        "syncbatchnorm dweight/dbias differ");
}

static uint64_t copies(sbn_client_t *c) {
  sbn_client_metrics_t mt;
  CHECK(sbn_client_metrics(c, &mt) == 0, "metrics: %s", sbn_last_error());
  return mt.tensor_copies;
}

/* x_stays: a batchnorm training step whose forward keeps x in the region
 * (no copy of any tensor in the worker, counted by tensor_copies) and
 * whose y, dx, dweight and dbias equal the copying socket path bit for
 * bit; the worker did not write x. */
static void keep_step(sbn_client_t *c, const sbn_client_shm_t *m,
                      uint64_t step) {
  uint8_t *b = m->base;
  float x[NUMEL], dy[NUMEL], y[NUMEL], dx[NUMEL], dw[C], db[C], dw2[C], db2[C];
  uint64_t before;
  fill(x, NUMEL, (uint32_t)step + 31);
  fill(dy, NUMEL, (uint32_t)step + 32);
  memcpy(b + 0, x, BYTES);
  memcpy(b + 4096, dy, BYTES);
  before = copies(c);
  CHECK(sbn_client_shm_forward_flags(c, g_keep, step, 1, &g_d, m->region, 0,
                                     8192, SBN_CLIENT_SHM_X_STAYS) == 0,
        "x_stays forward: %s", sbn_last_error());
  CHECK(sbn_client_shm_backward(c, g_keep, step, &g_d, m->region, 4096, 12288,
                                dw, db, C) == 0,
        "x_stays backward: %s", sbn_last_error());
  CHECK(copies(c) == before, "x_stays step copied %llu tensors",
        (unsigned long long)(copies(c) - before));
  CHECK(sbn_client_forward(c, g_keep2, step, 1, &g_d, x, NULL, NULL, 0, y) == 0,
        "forward: %s", sbn_last_error());
  CHECK(sbn_client_backward(c, g_keep2, step, &g_d, dy, dx, dw2, db2, C) == 0,
        "backward: %s", sbn_last_error());
  CHECK(memcmp(b + 8192, y, BYTES) == 0, "x_stays y differs from the copy");
  CHECK(memcmp(b + 12288, dx, BYTES) == 0, "x_stays dx differs from the copy");
  CHECK(memcmp(dw, dw2, sizeof dw) == 0 && memcmp(db, db2, sizeof db) == 0,
        "x_stays dweight/dbias differ from the copy");
  CHECK(memcmp(b, x, BYTES) == 0, "the worker wrote the kept x");
}

/* A child that scribbles NaNs, infinities and random bits over the kept
 * x's bytes while the parent runs steps: the worker only ever computes
 * wrong numbers for this client. */
static pid_t scribbler(uint8_t *x) {
  pid_t pid = fork();
  CHECK(pid >= 0, "fork: %s", strerror(errno));
  if (pid == 0) {
    uint32_t seed = 7;
    for (long i = 0; i < 4000000; i++) {
      seed = seed * 1664525u + 1013904223u;
      memcpy(x + (seed >> 8) % (BYTES - 3), &seed, 4);
      if (i % 4096 == 0)
        memset(x, 0xff, 64); /* NaNs */
    }
    _exit(0);
  }
  return pid;
}

/* A client breaking the x_stays promise: x overwritten between forward
 * and backward gives different gradients (the worker read it in place),
 * and overwritten while the kernels run gives whatever numbers, never a
 * failed worker; keep_step then still matches bit for bit. A backward
 * whose dx_at overlaps the kept x is BAD_TENSOR and uses up nothing. */
static void keep_hostile(sbn_client_t *c, const sbn_client_shm_t *m) {
  uint8_t *b = m->base;
  float x[NUMEL], dy[NUMEL], y[NUMEL], dx[NUMEL], dw[C], db[C];
  uint64_t step = 100;
  pid_t pid;
  int status;
  fill(x, NUMEL, 41);
  fill(dy, NUMEL, 42);
  memcpy(b, x, BYTES);
  memcpy(b + 4096, dy, BYTES);
  CHECK(sbn_client_shm_forward_flags(c, g_keep, step, 1, &g_d, m->region, 0,
                                     8192, SBN_CLIENT_SHM_X_STAYS) == 0,
        "forward: %s", sbn_last_error());
  CHECK_CODE(sbn_client_shm_backward(c, g_keep, step, &g_d, m->region, 4096,
                                     BYTES - 8, dw, db, C),
             c, "BAD_TENSOR");
  CHECK(strstr(sbn_last_error(), "x_stays") != NULL, "%s", sbn_last_error());
  for (size_t i = 0; i < NUMEL; i++)
    ((float *)b)[i] = x[i] * 3.0f + 1.0f;
  CHECK(sbn_client_shm_backward(c, g_keep, step, &g_d, m->region, 4096, 12288,
                                dw, db, C) == 0,
        "backward after the overwrite: %s", sbn_last_error());
  CHECK(
      sbn_client_forward(c, g_keep2, step, 1, &g_d, x, NULL, NULL, 0, y) == 0 &&
          sbn_client_backward(c, g_keep2, step, &g_d, dy, dx, NULL, NULL, 0) ==
              0,
      "twin: %s", sbn_last_error());
  CHECK(memcmp(b + 12288, dx, BYTES) != 0,
        "dx ignores the overwritten x: it was not read in place");
  pid = scribbler(b);
  for (step = 101; step < 301; step++) {
    /* Every other step has no backward: its reference is pruned. */
    CHECK(sbn_client_shm_forward_flags(c, g_keep, step, 1, &g_d, m->region, 0,
                                       8192, SBN_CLIENT_SHM_X_STAYS) == 0,
          "scribbled forward %llu: %s", (unsigned long long)step,
          sbn_last_error());
    if (step % 2 == 0)
      CHECK(sbn_client_shm_backward(c, g_keep, step, &g_d, m->region, 4096,
                                    12288, dw, db, C) == 0,
            "scribbled backward %llu: %s", (unsigned long long)step,
            sbn_last_error());
  }
  kill(pid, SIGKILL);
  waitpid(pid, &status, 0);
  keep_step(c, m, 400);
}

/* A connection that closes while a step keeps x in its region: the
 * worker copies x out first (one tensor_copies), so the backward sent on
 * another connection afterwards, with the region's bytes overwritten
 * since, still equals the copying path bit for bit. */
static void keep_closed(sbn_client_t *c) {
  sbn_client_t *c2 = sj_connect("svc_shm_e2e", g_path[0], 30);
  sbn_client_shm_t m2;
  float x[NUMEL], dy[NUMEL], y[NUMEL], dx[NUMEL], dx2[NUMEL], dw[C], db[C],
      dw2[C], db2[C];
  uint64_t before;
  int waited = 0;
  CHECK(sbn_client_shm_attach(c2, 65536, &m2) == 0, "attach: %s",
        sbn_last_error());
  fill(x, NUMEL, 51);
  fill(dy, NUMEL, 52);
  memcpy(m2.base, x, BYTES);
  CHECK(sbn_client_shm_forward_flags(c2, g_keep, 500, 1, &g_d, m2.region, 0,
                                     8192, SBN_CLIENT_SHM_X_STAYS) == 0,
        "forward: %s", sbn_last_error());
  before = copies(c);
  sbn_client_close(c2);
  while (copies(c) == before && waited++ < 500)
    usleep(10000);
  CHECK(copies(c) == before + 1, "the close copied %llu tensors, not 1",
        (unsigned long long)(copies(c) - before));
  memset(m2.base, 0xff, BYTES);
  sbn_client_shm_unmap(&m2);
  CHECK(sbn_client_backward(c, g_keep, 500, &g_d, dy, dx, dw, db, C) == 0,
        "backward after the close: %s", sbn_last_error());
  CHECK(
      sbn_client_forward(c, g_keep2, 500, 1, &g_d, x, NULL, NULL, 0, y) == 0 &&
          sbn_client_backward(c, g_keep2, 500, &g_d, dy, dx2, dw2, db2, C) == 0,
      "twin: %s", sbn_last_error());
  CHECK(memcmp(dx, dx2, sizeof dx) == 0 && memcmp(dw, dw2, sizeof dw) == 0 &&
            memcmp(db, db2, sizeof db) == 0,
        "the backward after the close differs from the copying path");
}

/* The same memfd attached on a second connection: a backward there whose
 * dx_at overlaps the x that a step keeps through the first connection's
 * mapping is BAD_TENSOR (the file is compared, not the mapping). */
static void keep_alias(void) {
  sbn_client_t *c = sj_connect("svc_shm_e2e", g_path[0], 30);
  sbn_client_t *c2 = sj_connect("svc_shm_e2e", g_path[0], 30);
  uint64_t r1 = 0, r2 = 0;
  int fd = memfd(65536, F_SEAL_SHRINK);
  float x[NUMEL], dw[C], db[C];
  uint8_t *b = mmap(NULL, 65536, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  CHECK(b != MAP_FAILED, "mmap: %s", strerror(errno));
  CHECK(sbn_client_shm_attach_fd(c, fd, 65536, &r1) == 0 &&
            sbn_client_shm_attach_fd(c2, fd, 65536, &r2) == 0,
        "attach: %s", sbn_last_error());
  close(fd);
  fill(x, NUMEL, 61);
  memcpy(b, x, BYTES);
  memcpy(b + 4096, x, BYTES);
  CHECK(sbn_client_shm_forward_flags(c, g_keep, 800, 1, &g_d, r1, 0, 8192,
                                     SBN_CLIENT_SHM_X_STAYS) == 0,
        "forward: %s", sbn_last_error());
  CHECK_CODE(
      sbn_client_shm_backward(c2, g_keep, 800, &g_d, r2, 4096, 0, dw, db, C),
      c2, "BAD_TENSOR");
  CHECK(sbn_client_shm_backward(c2, g_keep, 800, &g_d, r2, 4096, 12288, dw, db,
                                C) == 0,
        "backward: %s", sbn_last_error());
  CHECK(sbn_client_shm_forward_flags(c, g_keep, 801, 1, &g_d, r1, 0, 8192, 2) !=
                0 &&
            strstr(sbn_last_error(), "flags") != NULL,
        "unknown flags: %s", sbn_last_error());
  sbn_client_close(c2);
  sbn_client_close(c);
  munmap(b, 65536);
}

/* 16 regions per connection: the happy region and 15 more fill them; the
 * next is RESOURCE, and the same memfd twice is BAD_PARAMS. */
static void hostile_limits(sbn_client_t *c) {
  uint64_t r = 0;
  int fd = memfd(4096, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL);
  CHECK(sbn_client_shm_attach_fd(c, fd, 4096, &r) == 0, "attach: %s",
        sbn_last_error());
  CHECK_CODE(sbn_client_shm_attach_fd(c, fd, 4096, &r), c, "BAD_PARAMS");
  CHECK(strstr(sbn_last_error(), "already") != NULL, "%s", sbn_last_error());
  close(fd);
  for (int i = 2; i < 16; i++) {
    fd = memfd(4096, F_SEAL_SHRINK);
    CHECK(sbn_client_shm_attach_fd(c, fd, 4096, &r) == 0, "attach %d: %s", i,
          sbn_last_error());
    close(fd);
  }
  fd = memfd(4096, F_SEAL_SHRINK);
  CHECK_CODE(sbn_client_shm_attach_fd(c, fd, 4096, &r), c, "RESOURCE");
  CHECK(strstr(sbn_last_error(), "regions") != NULL, "%s", sbn_last_error());
  close(fd);
}

static void over_tcp(void) {
  sbn_client_t *t = NULL;
  int rc = sbn_client_connect_tcp("127.0.0.1", g_port[0], g_token,
                                  sizeof g_token - 1, &t);
  CHECK(rc == 0, "tcp connect: %s", sbn_last_error());
  sj_set_timeouts(t, 30);
  CHECK_CODE(sbn_client_shm_forward(t, g_bn, 5000, 1, &g_d, 0, 0, 8192), t,
             "BAD_REQUEST");
  CHECK(strstr(sbn_last_error(), "Unix socket only") != NULL, "%s",
        sbn_last_error());
  sbn_client_close(t);
}

int main(void) {
  sbn_client_t *c;
  sbn_client_hello_t h;
  sbn_client_shm_t m;
  snprintf(g_root, sizeof g_root, "/tmp/sbn-shm-XXXXXX");
  CHECK(mkdtemp(g_root) != NULL, "mkdtemp: %s", strerror(errno));
  atexit(cleanup);
  alarm(170);
  start_job();
  c = sj_connect("svc_shm_e2e", g_path[0], 30);
  CHECK(sbn_client_hello(c, &h) == 0 && h.protocol == 6, "hello: protocol %d",
        h.protocol);
  g_d.ndim = 3;
  g_d.dims[0] = N;
  g_d.dims[1] = C;
  g_d.dims[2] = S;
  g_bn = reg(c, "bn", "batchnorm", SBN_OP_BATCHNORM);
  g_bn2 = reg(c, "bn2", "batchnorm", SBN_OP_BATCHNORM);
  g_ln = reg(c, "ln", "layernorm", SBN_OP_LAYERNORM);
  g_ln2 = reg(c, "ln2", "layernorm", SBN_OP_LAYERNORM);
  g_sync = reg(c, "sync", "syncbatchnorm", SBN_OP_BATCHNORM);
  g_sync2 = reg(c, "sync2", "syncbatchnorm", SBN_OP_BATCHNORM);
  g_keep = reg(c, "keep", "batchnorm", SBN_OP_BATCHNORM);
  g_keep2 = reg(c, "keep2", "batchnorm", SBN_OP_BATCHNORM);
  CHECK(sbn_client_shm_attach(c, REGION, &m) == 0, "attach: %s",
        sbn_last_error());
  CHECK(m.region == 0, "first region %llu", (unsigned long long)m.region);
  happy(c, &m, 1);
  sync_step(c, &m, 1, 0);
  sync_step(c, &m, 2, SBN_CLIENT_SHM_X_STAYS);
  keep_step(c, &m, 1);
  keep_hostile(c, &m);
  keep_closed(c);
  hostile_attach(c);
  hostile_ranges(c, &m);
  hostile_limits(c);
  over_tcp();
  too_many_fds();
  /* The connection survived every refusal. */
  happy(c, &m, 2);
  sync_step(c, &m, 3, 0);
  sync_step(c, &m, 4, SBN_CLIENT_SHM_X_STAYS);
  keep_step(c, &m, 700);
  keep_alias();
  CHECK(sbn_client_bye(c) == 0, "bye: %s", sbn_last_error());
  sbn_client_close(c);
  sbn_client_shm_unmap(&m);
  printf("svc_shm_e2e: ok\n");
  return 0;
}
