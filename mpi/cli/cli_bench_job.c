/* `syncbn bench service`: starting and stopping the syncbnd job that the
 * service mode measures. The bench itself runs under mpirun, so rank 0
 * starts a second, separate job (`mpirun -np P syncbnd`, the syncbnd found
 * next to this program) with its own socket directory, and waits for its P
 * ready lines. The new mpirun must not see the variables by which the
 * outer mpirun told this process who it is (it would take itself for one
 * of the outer job's ranks), so they are left out of its environment;
 * only the user's own settings (run as root, pml, btl) pass. */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include "cli_bench_job.h"

extern char **environ;

/* Whether the variable "NAME=value" belongs to the outer job's launch. */
static int launch_var(const char *e) {
  static const char *const keep[] = {
      "OMPI_ALLOW_RUN_AS_ROOT=", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=",
      "OMPI_MCA_pml=", "OMPI_MCA_btl=", "OMPI_MCA_btl_tcp_if_include="};
  static const char *const drop[] = {"OMPI_", "PMIX_", "OPAL_", "ORTE_",
                                     "PRTE_"};
  for (size_t i = 0; i < sizeof keep / sizeof *keep; i++)
    if (strncmp(e, keep[i], strlen(keep[i])) == 0)
      return 0;
  for (size_t i = 0; i < sizeof drop / sizeof *drop; i++)
    if (strncmp(e, drop[i], strlen(drop[i])) == 0)
      return 1;
  return 0;
}

/* The syncbnd beside this program (/proc/self/exe's directory). */
static int syncbnd_path(char *buf, size_t n) {
  char self[PATH_MAX];
  ssize_t len = readlink("/proc/self/exe", self, sizeof self - 1);
  if (len <= 0)
    return sbn_set_error(SBN_EIO, "service: cannot read /proc/self/exe: %s",
                         strerror(errno));
  self[len] = '\0';
  char *slash = strrchr(self, '/');
  if (slash != NULL)
    *slash = '\0';
  if ((size_t)snprintf(buf, n, "%s/syncbnd", self) >= n)
    return sbn_set_error(SBN_ENOSPACE, "service: path of syncbnd too long");
  if (access(buf, X_OK) != 0)
    return sbn_set_error(SBN_EIO,
                         "service: no syncbnd next to this program (%s); "
                         "start a job and pass --socket-dir",
                         buf);
  return 0;
}

static void child(const char *bin, int np, const char *dir, int out_fd) {
  char nps[16];
  size_t ne = 0, k = 0;
  while (environ[ne] != NULL)
    ne++;
  char **env = calloc(ne + 1, sizeof *env);
  if (env == NULL)
    _exit(127);
  for (size_t i = 0; i < ne; i++)
    if (!launch_var(environ[i]))
      env[k++] = environ[i];
  snprintf(nps, sizeof nps, "%d", np);
  /* A bench killed before it could stop the job takes the job along. */
  prctl(PR_SET_PDEATHSIG, SIGTERM);
  dup2(out_fd, 1);
  char *const argv[] = {
      "mpirun", "--oversubscribe", "--bind-to",    "none",      "-np",
      nps,      (char *)bin,       "--socket-dir", (char *)dir, NULL};
  environ = env;
  execvp("mpirun", argv);
  _exit(127);
}

/* Reads lines from fd until np distinct "syncbnd: rank R ready on" lines
 * came, the job ended, or 60 s passed. */
static int wait_ready(sbn_bench_job_t *j, int np) {
  char buf[4096];
  size_t have = 0;
  int ready = 0;
  while (ready < np) {
    struct pollfd p = {j->out_fd, POLLIN, 0};
    if (poll(&p, 1, 60000) <= 0)
      return sbn_set_error(SBN_EIO,
                           "service: syncbnd not ready within 60 s "
                           "(%d of %d ranks)",
                           ready, np);
    ssize_t r = read(j->out_fd, buf + have, sizeof buf - 1 - have);
    if (r <= 0)
      return sbn_set_error(SBN_EIO,
                           "service: the syncbnd job ended before "
                           "it was ready (%d of %d ranks)",
                           ready, np);
    have += (size_t)r;
    buf[have] = '\0';
    char *nl;
    while ((nl = strchr(buf, '\n')) != NULL) {
      int rank;
      *nl = '\0';
      if (sscanf(buf, "syncbnd: rank %d ready on", &rank) == 1)
        ready++;
      have -= (size_t)(nl + 1 - buf);
      memmove(buf, nl + 1, have + 1);
    }
    if (have == sizeof buf - 1)
      have = 0; /* a line longer than the buffer is not a ready line */
  }
  return 0;
}

int sbn__bench_job_start(sbn_bench_job_t *j, int np) {
  char bin[PATH_MAX];
  int fds[2], rc;
  memset(j, 0, sizeof *j);
  j->pid = -1;
  j->out_fd = -1;
  if ((rc = syncbnd_path(bin, sizeof bin)) != 0)
    return rc;
  /* $TMPDIR when set, so that concurrent runs (and their tests) can keep
   * apart; /tmp when it is unset or too long for the sockets below it
   * (sockaddr_un holds 108 bytes). */
  const char *tmp = getenv("TMPDIR");
  if (tmp == NULL || tmp[0] != '/' || strlen(tmp) > 40)
    tmp = "/tmp";
  snprintf(j->root, sizeof j->root, "%s/syncbn-bench-XXXXXX", tmp);
  if (mkdtemp(j->root) == NULL) {
    j->root[0] = '\0';
    return sbn_set_error(SBN_EIO, "service: mkdtemp: %s", strerror(errno));
  }
  snprintf(j->dir, sizeof j->dir, "%s/sock", j->root);
  if (pipe(fds) != 0)
    return sbn_set_error(SBN_EIO, "service: pipe: %s", strerror(errno));
  fflush(stdout);
  fflush(stderr);
  j->pid = fork();
  if (j->pid < 0) {
    close(fds[0]);
    close(fds[1]);
    return sbn_set_error(SBN_EIO, "service: fork: %s", strerror(errno));
  }
  if (j->pid == 0) {
    close(fds[0]);
    child(bin, np, j->dir, fds[1]);
  }
  close(fds[1]);
  j->out_fd = fds[0];
  return wait_ready(j, np);
}

void sbn__bench_job_stop(sbn_bench_job_t *j) {
  if (j->pid > 0) {
    /* mpirun forwards SIGTERM to the workers, which close and exit. */
    kill(j->pid, SIGTERM);
    for (int i = 0; i < 100 && waitpid(j->pid, NULL, WNOHANG) == 0; i++)
      usleep(100000);
    kill(j->pid, SIGKILL);
    waitpid(j->pid, NULL, 0);
    j->pid = -1;
  }
  if (j->out_fd >= 0)
    close(j->out_fd);
  j->out_fd = -1;
  if (j->root[0] != '\0') {
    char cmd[PATH_MAX + 16];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", j->root);
    if (system(cmd) != 0)
      fprintf(stderr, "syncbn bench: could not remove %s\n", j->root);
    j->root[0] = '\0';
  }
}
