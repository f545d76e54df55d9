/* The one-command launch (syncbnd_launch.h): each worker runs the user's
 * command as its child and the job ends with the worst child status. */
#define _GNU_SOURCE /* setenv, prctl */
#include "syncbnd_launch.h"

#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <mpi.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* The end of a launch, in order: the child runs; its status is posted
 * (every child gone when that completes); the worker holds its rounds and
 * the ranks agree on the last one; the worker drains to it; the server
 * stops. */
enum { L_RUNNING, L_STATUS, L_ROUNDS, L_DRAIN, L_DONE };

struct sbnd_launch_s {
  pid_t pid; /* the child; 0 once reaped */
  int rank;
  int stage;       /* L_* */
  int status;      /* the child's exit status, once reaped */
  int worst;       /* the job's worst status, once agreed */
  uint64_t rounds; /* this worker's agreement rounds when it held */
  uint64_t last;   /* the most any rank had: where every rank drains to */
  double next;     /* monotonic time of the next waitpid */
  MPI_Comm comm;   /* the launcher's own duplicate of MPI_COMM_WORLD */
  MPI_Request req;
  svc_server_t *server;
  svc_worker_t *worker;
};

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* The shell's convention, so that the job's status tells a signal from
 * an exit code. */
static int exit_code(int wstatus) {
  if (WIFEXITED(wstatus))
    return WEXITSTATUS(wstatus);
  if (WIFSIGNALED(wstatus))
    return 128 + WTERMSIG(wstatus);
  return 1;
}

static void setenv_int(const char *name, int v, int overwrite) {
  char buf[32];
  snprintf(buf, sizeof buf, "%d", v);
  setenv(name, buf, overwrite);
}

/* A free TCP port on rank 0 for torch.distributed's rendezvous, and rank
 * 0's address: the loopback one when this rank shares rank 0's host.
 * The port is a suggestion: it is closed again before the children
 * start, and variables already set are kept. */
static void suggest_master(int rank) {
  char host[256], root[256];
  int port = 0;
  memset(host, 0, sizeof host);
  gethostname(host, sizeof host - 1);
  memcpy(root, host, sizeof root);
  if (rank == 0) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in a;
    socklen_t len = sizeof a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    if (fd >= 0 && bind(fd, (struct sockaddr *)&a, sizeof a) == 0 &&
        getsockname(fd, (struct sockaddr *)&a, &len) == 0)
      port = ntohs(a.sin_port);
    if (fd >= 0)
      close(fd);
  }
  MPI_Bcast(root, (int)sizeof root, MPI_CHAR, 0, MPI_COMM_WORLD);
  MPI_Bcast(&port, 1, MPI_INT, 0, MPI_COMM_WORLD);
  setenv("MASTER_ADDR", strcmp(root, host) == 0 ? "127.0.0.1" : root, 0);
  if (port > 0)
    setenv_int("MASTER_PORT", port, 0);
}

/* The child's environment is set here, in the parent, before fork: the
 * worker has threads (MPI, libuv), and after fork only async-signal-safe
 * calls are allowed until exec. */
static void set_environment(const char *socket, int rank, int size) {
  MPI_Comm node;
  int local = 0;
  MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL,
                      &node);
  MPI_Comm_rank(node, &local);
  MPI_Comm_free(&node);
  suggest_master(rank);
  setenv("SYNCBN_SOCKET", socket, 1);
  setenv_int("SYNCBN_RANK", rank, 1);
  setenv_int("SYNCBN_SIZE", size, 1);
  setenv_int("SYNCBN_LOCAL_RANK", local, 1);
  setenv_int("RANK", rank, 0);
  setenv_int("WORLD_SIZE", size, 0);
  setenv_int("LOCAL_RANK", local, 0);
}

/* The child: default signal handling (the worker ignores SIGPIPE and
 * libuv catches SIGINT/SIGTERM), and SIGKILL when the worker dies, so
 * that a killed worker leaves no trainer behind, even one that ignores
 * SIGTERM (a worker that is stopped, not killed, sends SIGTERM first and
 * gives the child 5 s: sbnd_launch_finish). */
static void exec_child(char **argv, pid_t parent) {
  sigset_t none;
  sigemptyset(&none);
  sigprocmask(SIG_SETMASK, &none, NULL);
  signal(SIGPIPE, SIG_DFL);
  signal(SIGINT, SIG_DFL);
  signal(SIGTERM, SIG_DFL);
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (getppid() != parent)
    _exit(128 + SIGKILL);
  execvp(argv[0], argv);
  {
    /* Only write(2) here: the message names the command and the error. */
    const char *e = strerror(errno);
    const char *pre = "syncbnd: cannot run ";
    (void)!write(2, pre, strlen(pre));
    (void)!write(2, argv[0], strlen(argv[0]));
    (void)!write(2, ": ", 2);
    (void)!write(2, e, strlen(e));
    (void)!write(2, "\n", 1);
  }
  _exit(127);
}

int sbnd_launch_start(char **argv, const char *socket, int rank, int size,
                      svc_server_t *server, svc_worker_t *worker,
                      sbnd_launch_t **out) {
  sbnd_launch_t *l = NULL;
  pid_t parent = getpid();
  *out = NULL;
  if (argv == NULL || argv[0] == NULL)
    return 0;
  if ((l = calloc(1, sizeof *l)) == NULL) {
    fprintf(stderr, "syncbnd: rank %d: out of memory\n", rank);
    return -1;
  }
  l->rank = rank;
  l->server = server;
  l->worker = worker;
  l->req = MPI_REQUEST_NULL;
  MPI_Comm_dup(MPI_COMM_WORLD, &l->comm);
  set_environment(socket, rank, size);
  fflush(stdout);
  fflush(stderr);
  l->pid = fork();
  if (l->pid < 0) {
    fprintf(stderr, "syncbnd: rank %d: fork: %s\n", rank, strerror(errno));
    MPI_Comm_free(&l->comm);
    free(l);
    return -1;
  }
  if (l->pid == 0)
    exec_child(argv, parent);
  *out = l;
  return 0;
}

/* The child, polled: a waitpid every 10 ms is enough to notice an exit
 * and costs nothing next to the 1 ms tick. Every rank posts its status
 * once, when its own child is gone; the allreduce completes when the last
 * child has exited. */
static void poll_child(sbnd_launch_t *l) {
  int ws;
  double t = now();
  if (t < l->next)
    return;
  l->next = t + 0.01;
  if (waitpid(l->pid, &ws, WNOHANG) != l->pid)
    return;
  l->pid = 0;
  l->status = exit_code(ws);
  MPI_Iallreduce(&l->status, &l->worst, 1, MPI_INT, MPI_MAX, l->comm, &l->req);
  l->stage = L_STATUS;
}

void sbnd_launch_poll(sbnd_launch_t *l) {
  int done = 0;
  if (l == NULL || l->stage == L_DONE)
    return;
  if (l->stage == L_RUNNING) {
    poll_child(l);
    return;
  }
  if (l->stage == L_DRAIN) {
    if (svc_worker_drained(l->worker)) {
      l->stage = L_DONE;
      svc_server_stop(l->server);
    }
    return;
  }
  MPI_Test(&l->req, &done, MPI_STATUS_IGNORE);
  if (!done)
    return;
  if (l->stage == L_STATUS) {
    l->rounds = svc_worker_rounds(l->worker);
    svc_worker_hold(l->worker, l->rounds);
    MPI_Iallreduce(&l->rounds, &l->last, 1, MPI_UINT64_T, MPI_MAX, l->comm,
                   &l->req);
    l->stage = L_ROUNDS;
  } else {
    svc_worker_hold(l->worker, l->last);
    l->stage = L_DRAIN;
  }
}

/* SIGTERM, up to 5 s for the child to leave, then SIGKILL. */
static int stop_child(pid_t pid) {
  int ws;
  kill(pid, SIGTERM);
  for (int i = 0; i < 500; i++) {
    if (waitpid(pid, &ws, WNOHANG) == pid)
      return exit_code(ws);
    usleep(10000);
  }
  kill(pid, SIGKILL);
  if (waitpid(pid, &ws, 0) == pid)
    return exit_code(ws);
  return 128 + SIGKILL;
}

int sbnd_launch_finish(sbnd_launch_t *l) {
  int rc;
  if (l == NULL)
    return 0;
  if (l->pid > 0)
    l->status = stop_child(l->pid);
  rc = l->stage >= L_ROUNDS ? l->worst : l->status;
  /* A pending agreement (the worker was signalled) is abandoned with the
   * process: freeing its communicator would wait for it. */
  if (l->stage == L_RUNNING || l->stage == L_DRAIN || l->stage == L_DONE)
    MPI_Comm_free(&l->comm);
  free(l);
  return rc;
}

void sbnd_launch_usage(FILE *f) {
  fprintf(f,
          "With -- COMMAND, each worker starts COMMAND as its child with "
          "SYNCBN_SOCKET,\n"
          "SYNCBN_RANK, SYNCBN_SIZE, SYNCBN_LOCAL_RANK (SYNCBN_TCP, HOST:PORT, "
          "with "
          "--tcp)\nand (where unset) MASTER_ADDR,\n"
          "MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK in its environment; the "
          "job ends\n"
          "when every rank's child has exited, with the worst exit status "
          "(128 + N\n"
          "for a child killed by signal N). SIGINT/SIGTERM stop the workers "
          "and the\n"
          "children. Directories the job created are removed on exit unless "
          "--keep.\n"
          "\n");
}

void sbnd_remove_dir(const char *dir, int files) {
  char path[PATH_MAX];
  DIR *d;
  struct dirent *e;
  if (files && (d = opendir(dir)) != NULL) {
    while ((e = readdir(d)) != NULL) {
      if (e->d_type != DT_REG)
        continue;
      if (snprintf(path, sizeof path, "%s/%s", dir, e->d_name) <
          (int)sizeof path)
        unlink(path);
    }
    closedir(d);
  }
  rmdir(dir);
}
