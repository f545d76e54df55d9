/* `syncbn apply`: replacing the whole output set or none of it. Every
 * output is first written in full under a temporary name; then each old
 * file is kept under a backup name (a hard link, which fails early for a
 * directory or an immutable file, before anything changed); then the
 * temporaries are renamed over the outputs. A failure at any point undoes
 * what was done: temporaries go, replaced outputs get their old files
 * back, and new ones are removed. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cli_apply_int.h"

/* One output of the set while it is being committed. */
typedef struct commit_s {
  char *path; /* the final name (owned) */
  char *tmp;  /* the written temporary, NULL once renamed or gone */
  char *bak;  /* the old file's backup link, NULL when there was none */
  int done;   /* renamed over path */
} commit_t;

static void commit_free(commit_t *c, int n) {
  for (int i = 0; i < n; i++) {
    if (c[i].tmp != NULL)
      unlink(c[i].tmp);
    if (c[i].bak != NULL)
      unlink(c[i].bak);
    free(c[i].path);
    free(c[i].tmp);
    free(c[i].bak);
  }
}

/* Keeps the old file at c->path (if any) under a backup name next to it.
 * A directory or an immutable file cannot be linked, so it stops the run
 * here, before any output changed. */
static int keep_old(apply_run_t *r, commit_t *c, int i) {
  struct stat st;
  size_t len = strlen(r->o.out_dir) + 48;
  if (lstat(c->path, &st) != 0)
    return errno == ENOENT ? 0
                           : sbn__apply_fail(&r->e, 1, "--out-dir: %s: %s",
                                             c->path, strerror(errno));
  if (S_ISDIR(st.st_mode))
    return sbn__apply_fail(
        &r->e, 1, "--out-dir: %s is a directory; nothing was written", c->path);
  if ((c->bak = malloc(len)) == NULL)
    return sbn__apply_fail(&r->e, 1, "out of memory");
  snprintf(c->bak, len, "%s/.sbnold-%ld-%d", r->o.out_dir, (long)getpid(), i);
  unlink(c->bak);
  if (link(c->path, c->bak) != 0) {
    int err = errno;
    free(c->bak);
    c->bak = NULL;
    return sbn__apply_fail(&r->e, 1,
                           "--out-dir: cannot replace %s: %s; nothing was "
                           "written",
                           c->path, strerror(err));
  }
  return 0;
}

/* Puts the outputs renamed so far back as they were. */
static void roll_back(commit_t *c, int n) {
  for (int i = 0; i < n; i++) {
    if (!c[i].done)
      continue;
    if (c[i].bak != NULL) {
      if (rename(c[i].bak, c[i].path) == 0) {
        free(c[i].bak);
        c[i].bak = NULL;
      }
    } else {
      unlink(c[i].path);
    }
  }
}

int sbn__apply_commit(apply_run_t *r, const apply_out_t *outs, int n,
                      char *written, size_t cap) {
  commit_t c[SBN__APPLY_MAX_OUTS];
  size_t used = 0;
  int rc = 0, i;
  memset(c, 0, sizeof c);
  written[0] = '\0';
  for (i = 0; i < n && rc == 0; i++) {
    size_t len = strlen(r->o.out_dir) + strlen(outs[i].name) + 2;
    if ((c[i].path = malloc(len)) == NULL) {
      rc = sbn__apply_fail(&r->e, 1, "out of memory");
      break;
    }
    snprintf(c[i].path, len, "%s/%s", r->o.out_dir, outs[i].name);
    int lrc = sbn_npy_write_tmp(c[i].path, outs[i].data, outs[i].ndim,
                                outs[i].dims, &c[i].tmp);
    if (lrc != 0)
      rc = sbn__apply_fail_lib(&r->e, "--out-dir", lrc);
  }
  for (i = 0; i < n && rc == 0; i++)
    rc = keep_old(r, &c[i], i);
  for (i = 0; i < n && rc == 0; i++) {
    if (rename(c[i].tmp, c[i].path) != 0) {
      rc = sbn__apply_fail(&r->e, 1,
                           "--out-dir: cannot rename into %s: %s; the old "
                           "outputs were put back",
                           c[i].path, strerror(errno));
      roll_back(c, i);
      break;
    }
    free(c[i].tmp);
    c[i].tmp = NULL;
    c[i].done = 1;
    if (used < cap)
      used += (size_t)snprintf(written + used, cap - used, "%s%s", i ? " " : "",
                               c[i].path);
  }
  commit_free(c, n);
  return rc;
}
