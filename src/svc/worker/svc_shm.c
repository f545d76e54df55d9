/* The region table of a connection and shm_attach (see svc_shm.h). */
#define _GNU_SOURCE
#include "svc_shm.h"

#include <errno.h>
#include <fcntl.h>
#include <msgpack.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "svc_worker_int.h"

#ifndef F_SEAL_SHRINK
#define F_SEAL_SEAL 0x0001
#define F_SEAL_SHRINK 0x0002
#define F_SEAL_GROW 0x0004
#define F_SEAL_WRITE 0x0008
#endif
#ifndef F_GET_SEALS
#define F_GET_SEALS 1034
#endif
#ifndef F_SEAL_FUTURE_WRITE
#define F_SEAL_FUTURE_WRITE 0x0010
#endif

void svc_shm_init(svc_shm_t *t) {
  memset(t, 0, sizeof *t);
}

int svc_shm_offer_fd(svc_shm_t *t, int fd) {
  if (t->ninbox >= SVC_SHM_INBOX) {
    close(fd);
    return -1;
  }
  t->inbox[t->ninbox++] = fd;
  return 0;
}

void svc_shm_release(svc_shm_t *t) {
  for (uint32_t i = 0; i < t->nregions; i++)
    if (t->r[i].base != NULL)
      munmap(t->r[i].base, (size_t)t->r[i].size);
  for (uint32_t i = 0; i < t->ninbox; i++)
    close(t->inbox[i]);
  svc_shm_init(t);
}

int svc_shm_range(const svc_shm_t *t, uint64_t region, uint64_t offset,
                  uint64_t bytes, const char *what, uint8_t **p) {
  const svc_shm_region_t *r;
  if (region >= t->nregions || t->r[region].base == NULL)
    return svc_set_error(SVC_BAD_TENSOR,
                         "%s: region %llu is not attached on this connection",
                         what, (unsigned long long)region);
  r = &t->r[region];
  /* offset + bytes <= size, written so that it cannot wrap. */
  if (offset > r->size || bytes > r->size - offset)
    return svc_set_error(SVC_BAD_TENSOR,
                         "%s: bytes [%llu, +%llu) pass the end of region %llu "
                         "(%llu bytes)",
                         what, (unsigned long long)offset,
                         (unsigned long long)bytes, (unsigned long long)region,
                         (unsigned long long)r->size);
  *p = r->base + offset;
  return 0;
}

/* Why the descriptor fd cannot be a region of size bytes, or 0. */
static int svc__shm_check_fd(const svc_shm_t *t, int fd, uint64_t size,
                             struct stat *st) {
  int seals = fcntl(fd, F_GET_SEALS);
  if (seals < 0)
    return svc_set_error(SVC_BAD_PARAMS,
                         "shm_attach: the descriptor is not a sealable memfd "
                         "(F_GET_SEALS: %s)",
                         strerror(errno));
  if (!(seals & F_SEAL_SHRINK))
    return svc_set_error(SVC_BAD_PARAMS,
                         "shm_attach: the memfd is not sealed with "
                         "F_SEAL_SHRINK (a shrinkable region could fault the "
                         "worker)");
  if (seals & (F_SEAL_WRITE | F_SEAL_FUTURE_WRITE))
    return svc_set_error(SVC_BAD_PARAMS,
                         "shm_attach: the memfd is sealed against writing; "
                         "the worker writes y and dx into it");
  if (fstat(fd, st) != 0 || !S_ISREG(st->st_mode))
    return svc_set_error(SVC_BAD_PARAMS,
                         "shm_attach: the descriptor is not a regular file");
  if (size == 0 || (uint64_t)st->st_size != size)
    return svc_set_error(SVC_BAD_PARAMS,
                         "shm_attach: size %llu differs from the memfd's "
                         "%lld bytes (or is 0)",
                         (unsigned long long)size, (long long)st->st_size);
  if (size > SIZE_MAX)
    return svc_set_error(SVC_BAD_PARAMS, "shm_attach: size too large");
  for (uint32_t i = 0; i < t->nregions; i++)
    if (t->r[i].base != NULL && t->r[i].dev == st->st_dev &&
        t->r[i].ino == st->st_ino)
      return svc_set_error(SVC_BAD_PARAMS,
                           "shm_attach: this memfd is attached already as "
                           "region %u (one file is mapped once, so that "
                           "inputs and outputs cannot alias unseen)",
                           i);
  return 0;
}

/* Maps the inbox's oldest descriptor as a new region. */
static int svc__shm_attach(svc_shm_t *t, uint64_t size, uint32_t *region) {
  struct stat st;
  int fd, rc;
  void *base;
  if (t->ninbox == 0)
    return svc_set_error(SVC_BAD_REQUEST,
                         "shm_attach: no file descriptor came with the "
                         "request (send one with SCM_RIGHTS on its bytes)");
  fd = t->inbox[0];
  memmove(t->inbox, t->inbox + 1, (t->ninbox - 1) * sizeof *t->inbox);
  t->ninbox--;
  if ((rc = svc__shm_check_fd(t, fd, size, &st)) != 0)
    goto done;
  if (t->nregions >= SVC_SHM_MAX_REGIONS) {
    rc = svc_set_error(SVC_RESOURCE,
                       "shm_attach: this connection holds %d regions, the "
                       "most it may",
                       SVC_SHM_MAX_REGIONS);
    goto done;
  }
  if (size > t->room) {
    rc = svc_set_error(SVC_RESOURCE,
                       "shm_attach: %llu bytes pass what the worker's memory "
                       "budget (--max-memory) has left (%llu bytes)",
                       (unsigned long long)size, (unsigned long long)t->room);
    goto done;
  }
  base = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (base == MAP_FAILED) {
    rc = svc_set_error(SVC_RESOURCE, "shm_attach: mmap: %s", strerror(errno));
    goto done;
  }
  *region = t->nregions;
  t->r[t->nregions].base = base;
  t->r[t->nregions].size = size;
  t->r[t->nregions].dev = st.st_dev;
  t->r[t->nregions].ino = st.st_ino;
  t->nregions++;
  t->mapped += size;
  t->room -= size;
done:
  close(fd); /* the mapping keeps the memory */
  return rc;
}

int svc__cmd_shm_attach(svc__call_t *call) {
  svc_reply_t r;
  uint32_t region = 0;
  int rc;
  if (call->w->shm == NULL)
    return svc_set_error(SVC_BAD_REQUEST,
                         "shm_attach: shared memory is offered on the Unix "
                         "socket only");
  if ((rc = svc__shm_attach(call->w->shm, call->q->size, &region)) != 0)
    return rc;
  if ((rc = svc_reply_begin(&r, &call->q->id, 2, 0)) != 0)
    return rc;
  svc_reply_key(&r, "region");
  r.rc |= msgpack_pack_uint32(r.pk, region);
  svc_reply_key(&r, "size");
  r.rc |= msgpack_pack_uint64(r.pk, call->q->size);
  return svc_reply_end(&r, &call->out.buf, &call->out.len);
}
