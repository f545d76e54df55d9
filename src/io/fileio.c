/* Atomic file replacement shared by every writer of the library (.npy
 * tensors, checkpoints): a reader never sees a half-written file under the
 * final name, and a failed write leaves the old file as it was. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "io/sbn_io.h"

static int sbn__write_all(int fd, const unsigned char *p, size_t n) {
  while (n > 0) {
    /* Linux writes at most about 2 GiB per call; ask for 1 GiB at a time. */
    ssize_t w = write(fd, p, n > (size_t)1 << 30 ? (size_t)1 << 30 : n);
    if (w < 0) {
      if (errno == EINTR)
        continue;
      return -1;
    }
    p += w;
    n -= (size_t)w;
  }
  return 0;
}

/* The directory part of path ("." without a slash, "/" for a file in the
 * root), malloc'ed; NULL when out of memory. */
static char *sbn__dir_of(const char *path) {
  const char *slash = strrchr(path, '/');
  size_t dlen =
      slash == NULL ? 1 : (slash == path ? 1 : (size_t)(slash - path));
  char *dir = malloc(dlen + 1);
  if (dir == NULL)
    return NULL;
  if (slash == NULL) {
    memcpy(dir, ".", 2);
  } else {
    memcpy(dir, slash == path ? "/" : path, dlen);
    dir[dlen] = 0;
  }
  return dir;
}

int sbn_write_file_tmp(const char *path, const void *const *parts,
                       const size_t *lens, int nparts, unsigned mode,
                       int durable, char **tmp_out) {
  char *dir = NULL, *tmp = NULL;
  int fd = -1, rc;
  if (tmp_out == NULL)
    return sbn_set_error(SBN_EINVAL, "tmp_out: NULL");
  *tmp_out = NULL;
  if (path == NULL || path[0] == 0)
    return sbn_set_error(SBN_EINVAL, "path: NULL or empty");
  size_t plen = strlen(path);
  if (path[plen - 1] == '/')
    return sbn_set_error(SBN_EINVAL, "path: '%s' names a directory", path);

  /* The temporary file lives in the target's directory so that rename()
   * replaces the target in one step (a rename across file systems would
   * fail). Its name starts with '.', which checkpoint names may not, so it
   * cannot clash with a file a client asked for. */
  dir = sbn__dir_of(path);
  size_t tlen = (dir != NULL ? strlen(dir) : 0) + sizeof "/.sbntmp-XXXXXX";
  tmp = malloc(tlen);
  if (dir == NULL || tmp == NULL) {
    rc = sbn_set_error(SBN_ENOMEM, "%s: out of memory", path);
    goto fail;
  }
  snprintf(tmp, tlen, "%s/.sbntmp-XXXXXX", strcmp(dir, "/") == 0 ? "" : dir);
  fd = mkstemp(tmp);
  if (fd < 0) {
    rc = sbn_set_error(SBN_EIO, "%s: cannot create a temporary file in %s: %s",
                       path, dir, strerror(errno));
    free(tmp);
    tmp = NULL; /* nothing to unlink */
    goto fail;
  }
  /* mkstemp makes the file 0600; the caller says what the file should be. */
  if (fchmod(fd, (mode_t)mode) != 0) {
    rc = sbn_set_error(SBN_EIO, "%s: chmod failed: %s", path, strerror(errno));
    goto fail;
  }
  for (int i = 0; i < nparts; i++) {
    if (lens[i] > 0 && sbn__write_all(fd, parts[i], lens[i]) != 0) {
      rc =
          sbn_set_error(SBN_EIO, "%s: write failed: %s", path, strerror(errno));
      goto fail;
    }
  }
  if (durable && fsync(fd) != 0) {
    rc = sbn_set_error(SBN_EIO, "%s: fsync failed: %s", path, strerror(errno));
    goto fail;
  }
  int crc = close(fd);
  fd = -1;
  if (crc != 0) {
    rc = sbn_set_error(SBN_EIO, "%s: close failed: %s", path, strerror(errno));
    goto fail;
  }
  free(dir);
  *tmp_out = tmp;
  return 0;
fail:
  if (fd >= 0)
    close(fd);
  if (tmp != NULL) {
    unlink(tmp);
    free(tmp);
  }
  free(dir);
  return rc;
}

int sbn_fsync_dir_of(const char *path) {
  char *dir = path != NULL ? sbn__dir_of(path) : NULL;
  int dfd, rc = 0;
  if (dir == NULL)
    return sbn_set_error(SBN_ENOMEM, "path: NULL or out of memory");
  /* A rename is durable only once the directory entry is on disk. Some
   * file systems cannot fsync a directory (EINVAL); there is nothing more
   * to do on those. */
  dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd < 0 || (fsync(dfd) != 0 && errno != EINVAL))
    rc = sbn_set_error(SBN_EIO, "%s: cannot fsync directory %s: %s", path, dir,
                       strerror(errno));
  if (dfd >= 0)
    close(dfd);
  free(dir);
  return rc;
}

int sbn__rename_tmp(char *tmp, const char *path) {
  int rc = 0;
  if (rename(tmp, path) != 0) {
    rc = sbn_set_error(SBN_EIO, "%s: cannot rename the temporary file: %s",
                       path, strerror(errno));
    unlink(tmp);
  }
  free(tmp);
  return rc;
}

int sbn_write_file_atomic(const char *path, const void *const *parts,
                          const size_t *lens, int nparts, unsigned mode,
                          int durable) {
  char *tmp = NULL;
  int rc = sbn_write_file_tmp(path, parts, lens, nparts, mode, durable, &tmp);
  if (rc == 0)
    rc = sbn__rename_tmp(tmp, path);
  return rc == 0 && durable ? sbn_fsync_dir_of(path) : rc;
}

int sbn_open_regular(const char *path, int *fd_out) {
  struct stat st;
  int fd, fl;
  if (fd_out == NULL)
    return sbn_set_error(SBN_EINVAL, "fd_out: NULL");
  *fd_out = -1;
  if (path == NULL)
    return sbn_set_error(SBN_EINVAL, "path: NULL");
  /* O_NONBLOCK keeps open() of a FIFO from waiting for a writer; the mode
   * is checked on the descriptor itself, so nothing can swap the file in
   * between, and only a regular file gets its blocking reads back. */
  fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
  if (fd < 0)
    return sbn_set_error(SBN_EIO, "%s: %s", path, strerror(errno));
  if (fstat(fd, &st) != 0) {
    int rc = sbn_set_error(SBN_EIO, "%s: %s", path, strerror(errno));
    close(fd);
    return rc;
  }
  if (!S_ISREG(st.st_mode)) {
    close(fd);
    return sbn_set_error(SBN_EIO, "%s: not a regular file", path);
  }
  if ((fl = fcntl(fd, F_GETFL)) < 0 || fcntl(fd, F_SETFL, fl & ~O_NONBLOCK)) {
    int rc = sbn_set_error(SBN_EIO, "%s: %s", path, strerror(errno));
    close(fd);
    return rc;
  }
  *fd_out = fd;
  return 0;
}
