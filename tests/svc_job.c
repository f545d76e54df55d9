/* Starting and stopping the syncbnd job for the end-to-end tests; see
 * svc_job.h. */
#define _GNU_SOURCE
#include "svc_job.h"

#include "syncbn.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

/* Exits with 1 after printing prog, where, what failed and why. */
#define SJ_CHECK(prog, cond, ...)                              \
  do {                                                         \
    if (!(cond))                                               \
      sj_fail((prog), __FILE__, __LINE__, #cond, __VA_ARGS__); \
  } while (0)

static void sj_fail(const char *prog, const char *file, int line,
                    const char *cond, const char *fmt, ...)
    __attribute__((format(printf, 5, 6), noreturn));

static void sj_fail(const char *prog, const char *file, int line,
                    const char *cond, const char *fmt, ...) {
  va_list ap;
  fprintf(stderr, "%s: %s:%d: check failed: %s: ", prog, file, line, cond);
  va_start(ap, fmt);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fprintf(stderr, "\n");
  exit(1);
}

pid_t sj_start(const char *prog, const char *const *argv, const char *errlog,
               int np, char (*path)[SJ_PATH_MAX], int *port) {
  int fds[2], ready = 0, listening = 0;
  char buf[4096];
  size_t have = 0;
  pid_t pid;
  SJ_CHECK(prog, pipe(fds) == 0, "pipe: %s", strerror(errno));
  pid = fork();
  SJ_CHECK(prog, pid >= 0, "fork: %s", strerror(errno));
  if (pid == 0) {
    dup2(fds[1], 1);
    if (errlog != NULL) {
      int ef = open(errlog, O_WRONLY | O_CREAT | O_TRUNC, 0600);
      if (ef >= 0)
        dup2(ef, 2);
    }
    close(fds[0]);
    close(fds[1]);
    execv(argv[0], (char *const *)argv);
    _exit(127);
  }
  close(fds[1]);
  /* Each rank prints its ready line, then (with --tcp) its TCP line. */
  while (ready < np || (port != NULL && listening < np)) {
    struct pollfd p = {fds[0], POLLIN, 0};
    ssize_t r;
    char *nl;
    SJ_CHECK(prog, poll(&p, 1, 60000) > 0, "no ready lines within 60 s");
    r = read(fds[0], buf + have, sizeof buf - 1 - have);
    SJ_CHECK(prog, r > 0, "the job ended before it was ready");
    have += (size_t)r;
    buf[have] = '\0';
    while ((nl = strchr(buf, '\n')) != NULL) {
      int rank, tcp;
      char sock[SJ_PATH_MAX];
      *nl = '\0';
      if (sscanf(buf, "syncbnd: rank %d ready on %255s", &rank, sock) == 2 &&
          rank >= 0 && rank < np) {
        snprintf(path[rank], SJ_PATH_MAX, "%s", sock);
        ready++;
      } else if (port != NULL &&
                 sscanf(buf, "syncbnd: rank %d listening on tcp 127.0.0.1:%d",
                        &rank, &tcp) == 2 &&
                 rank >= 0 && rank < np) {
        port[rank] = tcp;
        listening++;
      }
      have -= (size_t)(nl + 1 - buf);
      memmove(buf, nl + 1, have + 1);
    }
  }
  return pid;
}

void sj_stop(pid_t *pid) {
  if (*pid <= 0)
    return;
  kill(*pid, SIGTERM);
  for (int i = 0; i < 100 && waitpid(*pid, NULL, WNOHANG) == 0; i++)
    usleep(100000);
  kill(*pid, SIGKILL);
  waitpid(*pid, NULL, 0);
  *pid = -1;
}

void sj_remove(const char *prog, const char *root) {
  char cmd[128];
  if (root[0] == '\0')
    return;
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", root);
  if (system(cmd) != 0)
    fprintf(stderr, "%s: could not remove %s\n", prog, root);
}

void sj_set_timeouts(sbn_client_t *c, int timeout_s) {
  struct timeval tv = {timeout_s, 0};
  setsockopt(sbn_client_fd(c), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  setsockopt(sbn_client_fd(c), SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

sbn_client_t *sj_connect(const char *prog, const char *path, int timeout_s) {
  sbn_client_t *c = NULL;
  int rc = sbn_client_connect(path, &c);
  SJ_CHECK(prog, rc == 0, "%s: %s", sbn_client_err_name(rc), sbn_last_error());
  sj_set_timeouts(c, timeout_s);
  return c;
}

int sj_workers(const char *prog, pid_t mpirun, long *pids, long *cpu, int max) {
  char path[300], buf[512];
  DIR *d = opendir("/proc");
  struct dirent *e;
  int n = 0;
  SJ_CHECK(prog, d != NULL, "/proc: %s", strerror(errno));
  while ((e = readdir(d)) != NULL) {
    char comm[64], *close;
    long ppid, ut, st;
    FILE *f;
    if (e->d_name[0] < '0' || e->d_name[0] > '9')
      continue;
    snprintf(path, sizeof path, "/proc/%s/stat", e->d_name);
    if ((f = fopen(path, "r")) == NULL)
      continue;
    buf[0] = '\0';
    if (fgets(buf, sizeof buf, f) == NULL)
      buf[0] = '\0';
    fclose(f);
    /* pid (comm) state ppid ... field 14 utime, 15 stime; comm may hold
     * spaces, so fields are counted from its closing parenthesis. */
    close = strrchr(buf, ')');
    if (close == NULL || sscanf(buf, "%*d (%63[^)]", comm) != 1 ||
        strcmp(comm, "syncbnd") != 0 ||
        sscanf(close + 1,
               " %*c %ld %*d %*d %*d %*d %*u %*u %*u %*u %*u %ld %ld", &ppid,
               &ut, &st) != 3 ||
        ppid != (long)mpirun)
      continue;
    if (n < max && pids != NULL)
      pids[n] = strtol(e->d_name, NULL, 10);
    if (n < max && cpu != NULL)
      cpu[n] = ut + st;
    n++;
  }
  closedir(d);
  return n;
}

void sj_write_token(const char *prog, const char *path, const void *token,
                    size_t n) {
  int fd = open(path, O_WRONLY | O_CREAT | O_EXCL, 0600);
  SJ_CHECK(prog, fd >= 0, "token file %s: %s", path, strerror(errno));
  SJ_CHECK(prog, write(fd, token, n) == (ssize_t)n, "token write: %s",
           strerror(errno));
  close(fd);
}

static int sj_self_allreduce(sbn_comm_t *c, sbn_rec_t *r, size_t n) {
  (void)c, (void)r, (void)n;
  return 0;
}

static void sj_self_destroy(sbn_comm_t *c) {
  (void)c;
}

const sbn_comm_vtable_t sj_self_vt = {.allreduce = sj_self_allreduce,
                                      .destroy = sj_self_destroy};
