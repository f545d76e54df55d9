/* Checkpoint files: an atomic, durable save and a load that reads the
 * whole file before decoding it. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "io/sbn_io.h"

int sbn_ckpt_save(const sbn_ckpt_t *ck, const char *path) {
  void *buf = NULL;
  size_t len = 0;
  int rc;
  if (ck == NULL)
    return sbn_set_error(SBN_EINVAL, "ck: NULL");
  if (path == NULL || path[0] == 0)
    return sbn_set_error(SBN_EINVAL, "path: NULL or empty");
  if ((rc = sbn_ckpt_encode(ck, &buf, &len)) != 0)
    return rc;
  /* Checkpoints are private (0600) and must survive a crash right after
   * the save returns, so the data and the directory entry are fsync'ed. */
  const void *parts[1] = {buf};
  rc = sbn_write_file_atomic(path, parts, &len, 1, 0600, 1);
  free(buf);
  return rc;
}

int sbn_ckpt_load(const char *path, sbn_ckpt_t **out) {
  unsigned char *buf = NULL;
  struct stat st;
  int fd = -1, rc;
  if (out == NULL)
    return sbn_set_error(SBN_EINVAL, "out: NULL");
  *out = NULL;
  if (path == NULL)
    return sbn_set_error(SBN_EINVAL, "path: NULL");
  /* A FIFO under a checkpoint's name is refused without blocking. */
  if ((rc = sbn_open_regular(path, &fd)) != 0)
    return rc;
  if (fstat(fd, &st) != 0) {
    rc = sbn_set_error(SBN_EIO, "%s: %s", path, strerror(errno));
    goto fail;
  }
  if ((uint64_t)st.st_size > (uint64_t)SBN_CKPT_MAX_FILE) {
    rc = sbn_set_error(SBN_ELIMIT, "%s: %lld bytes exceed the cap of %zu", path,
                       (long long)st.st_size, SBN_CKPT_MAX_FILE);
    goto fail;
  }
  size_t size = (size_t)st.st_size;
  /* One spare byte lets the read notice a file that grew since fstat. */
  buf = malloc(size + 1);
  if (buf == NULL) {
    rc = sbn_set_error(SBN_ENOMEM, "%s: out of memory", path);
    goto fail;
  }
  size_t got = 0;
  while (got < size + 1) {
    ssize_t n = read(fd, buf + got, size + 1 - got);
    if (n < 0) {
      if (errno == EINTR)
        continue;
      rc = sbn_set_error(SBN_EIO, "%s: read failed: %s", path, strerror(errno));
      goto fail;
    }
    if (n == 0)
      break;
    got += (size_t)n;
  }
  if (got != size) {
    rc = sbn_set_error(SBN_EIO, "%s: the file changed size while being read",
                       path);
    goto fail;
  }
  close(fd);
  fd = -1;
  if ((rc = sbn_ckpt_decode(buf, size, out)) != 0) {
    char msg[512];
    snprintf(msg, sizeof msg, "%s", sbn_last_error());
    rc = sbn_set_error(rc, "%s: %s", path, msg);
    goto fail;
  }
  free(buf);
  return 0;
fail:
  if (fd >= 0)
    close(fd);
  free(buf);
  return rc;
}
