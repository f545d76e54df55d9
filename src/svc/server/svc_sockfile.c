/* The server's files: the private socket directory and a stale socket
 * left by a worker that died (see svc_server.h). */
#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "svc_server.h"
#include "svc_server_int.h"

int svc_socket_dir_prepare(const char *dir) {
  struct stat st;
  if (mkdir(dir, 0700) != 0 && errno != EEXIST)
    return svc_set_error(SVC_BAD_PARAMS, "socket dir %s: cannot create: %s",
                         dir, strerror(errno));
  if (lstat(dir, &st) != 0)
    return svc_set_error(SVC_BAD_PARAMS, "socket dir %s: %s", dir,
                         strerror(errno));
  if (S_ISLNK(st.st_mode))
    return svc_set_error(SVC_BAD_PARAMS,
                         "socket dir %s: is a symlink; refusing it", dir);
  if (!S_ISDIR(st.st_mode))
    return svc_set_error(SVC_BAD_PARAMS, "socket dir %s: not a directory", dir);
  if (st.st_uid != geteuid())
    return svc_set_error(SVC_BAD_PARAMS,
                         "socket dir %s: owned by uid %u, not by this user "
                         "(uid %u); refusing it",
                         dir, (unsigned)st.st_uid, (unsigned)geteuid());
  if ((st.st_mode & 077) != 0)
    return svc_set_error(SVC_BAD_PARAMS,
                         "socket dir %s: mode %03o is open to group or "
                         "others; refusing it (chmod 700)",
                         dir, (unsigned)(st.st_mode & 0777));
  return 0;
}

/* An existing socket file is replaced only if nobody answers on it: that
 * is a worker that died without removing it. */
int svc__socket_clear_stale(const char *path) {
  struct stat st;
  struct sockaddr_un a;
  int fd, rc;
  if (lstat(path, &st) != 0)
    return errno == ENOENT ? 0
                           : svc_set_error(SVC_BAD_PARAMS, "socket %s: %s",
                                           path, strerror(errno));
  if (!S_ISSOCK(st.st_mode))
    return svc_set_error(SVC_BAD_PARAMS,
                         "socket %s: exists and is not a socket", path);
  fd = socket(AF_UNIX, SOCK_STREAM, 0);
  if (fd < 0)
    return svc_set_error(SVC_BAD_PARAMS, "socket: %s", strerror(errno));
  memset(&a, 0, sizeof a);
  a.sun_family = AF_UNIX;
  memcpy(a.sun_path, path, strlen(path) + 1);
  rc = connect(fd, (struct sockaddr *)&a, sizeof a);
  close(fd);
  if (rc == 0)
    return svc_set_error(SVC_BAD_PARAMS,
                         "socket %s: another worker is listening on it", path);
  if (unlink(path) != 0)
    return svc_set_error(SVC_BAD_PARAMS,
                         "socket %s: cannot remove stale socket: %s", path,
                         strerror(errno));
  return 0;
}
