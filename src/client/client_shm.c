/* syncbn client: zero-copy shared memory (protocol 6, see client.h and
 * PROTOCOL.md "Shared memory"). A region is a sealed memfd that both the
 * client and its worker map; forwards and backwards then name tensors by
 * offset in it and the socket carries only the small request maps. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include "client_internal.h"

/* Sends r's frame in one sendmsg carrying fd (SCM_RIGHTS), so that the
 * descriptor arrives with the frame's bytes, then frees r's buffer. */
static int sbn__send_with_fd(sbn_client_t *c, sbn__req_t *r, int fd) {
  struct msghdr mh;
  struct iovec iov;
  union {
    struct cmsghdr h;
    char buf[CMSG_SPACE(sizeof(int))];
  } ctl;
  struct cmsghdr *cm;
  size_t off = 0, body;
  ssize_t n;
  int rc = 0;
  if (r->bad || r->sb.data == NULL || r->sb.size < 4) {
    msgpack_sbuffer_destroy(&r->sb);
    return sbn__fail(c, SBN_ENOMEM, "request: out of memory");
  }
  body = r->sb.size - 4;
  r->sb.data[0] = (char)(body >> 24);
  r->sb.data[1] = (char)(body >> 16);
  r->sb.data[2] = (char)(body >> 8);
  r->sb.data[3] = (char)body;
  while (off < r->sb.size) {
    memset(&mh, 0, sizeof mh);
    iov.iov_base = r->sb.data + off;
    iov.iov_len = r->sb.size - off;
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    if (off == 0) {
      memset(&ctl, 0, sizeof ctl);
      mh.msg_control = ctl.buf;
      mh.msg_controllen = sizeof ctl.buf;
      cm = CMSG_FIRSTHDR(&mh);
      cm->cmsg_level = SOL_SOCKET;
      cm->cmsg_type = SCM_RIGHTS;
      cm->cmsg_len = CMSG_LEN(sizeof(int));
      memcpy(CMSG_DATA(cm), &fd, sizeof fd);
    }
    n = sendmsg(c->fd, &mh, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0) {
      rc = sbn__fail(c, SBN_EIO, "send: %s", strerror(errno));
      break;
    }
    off += (size_t)n;
  }
  msgpack_sbuffer_destroy(&r->sb);
  return rc;
}

int sbn_client_shm_attach_fd(sbn_client_t *c, int fd, uint64_t size,
                             uint64_t *region) {
  sbn__req_t r;
  sbn__reply_t p;
  int rc = sbn__begin(c, "shm_attach");
  if (rc != 0)
    return rc;
  if (fd < 0 || region == NULL)
    return sbn__fail(c, SBN_EINVAL, "%s: invalid", fd < 0 ? "fd" : "region");
  sbn__req_start(c, &r, "shm_attach", 3);
  r.bad |= sbn__key(&r.pk, "size");
  r.bad |= msgpack_pack_uint64(&r.pk, size);
  if ((rc = sbn__send_with_fd(c, &r, fd)) != 0)
    return rc;
  memset(&p, 0, sizeof p);
  if ((rc = sbn__reply(c, r.id, &p)) != 0)
    return rc;
  if (sbn__uint_field(&p.root, "region", region) != 0)
    rc = sbn__fail(c, SBN_EFORMAT, "reply: no 'region'");
  sbn__reply_free(&p);
  return rc;
}

int sbn_client_shm_attach(sbn_client_t *c, size_t size, sbn_client_shm_t *out) {
  int fd, rc = sbn__begin(c, "shm_attach");
  void *base;
  if (rc != 0)
    return rc;
  if (out == NULL || size == 0)
    return sbn__fail(c, SBN_EINVAL, "%s",
                     out == NULL ? "out: NULL" : "size: 0");
  memset(out, 0, sizeof *out);
  fd = memfd_create("syncbn-shm", MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (fd < 0)
    return sbn__fail(c, SBN_EIO, "memfd_create: %s", strerror(errno));
  /* Sealed against shrinking (a worker's mapping could fault past a
   * shrunk end), growing (the worker maps the size it was told) and
   * further seals. */
  if (ftruncate(fd, (off_t)size) != 0 ||
      fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0) {
    rc = sbn__fail(c, SBN_EIO, "memfd: %s", strerror(errno));
    close(fd);
    return rc;
  }
  base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (base == MAP_FAILED) {
    rc = sbn__fail(c, SBN_ENOMEM, "mmap: %s", strerror(errno));
    close(fd);
    return rc;
  }
  rc = sbn_client_shm_attach_fd(c, fd, size, &out->region);
  close(fd); /* both mappings keep the memory */
  if (rc != 0) {
    munmap(base, size);
    return rc;
  }
  out->base = base;
  out->size = size;
  return 0;
}

void sbn_client_shm_unmap(sbn_client_shm_t *s) {
  if (s != NULL && s->base != NULL)
    munmap(s->base, s->size);
  if (s != NULL)
    memset(s, 0, sizeof *s);
}

/* The head of a shared-memory tensor: {dtype, shape, layout, region,
 * offset}. */
static int sbn__pack_shm_tensor(msgpack_packer *pk, const sbn_tensor_desc_t *d,
                                uint64_t region, uint64_t off) {
  svc_shm_at_t at;
  memset(&at, 0, sizeof at);
  at.region = region;
  at.offset = off;
  return svc_pack_tensor_at(pk, d, &at);
}

static int sbn__pack_at(msgpack_packer *pk, const char *key, uint64_t region,
                        uint64_t off) {
  int rc = sbn__key(pk, key);
  rc |= msgpack_pack_map(pk, 2);
  rc |= sbn__key(pk, "region");
  rc |= msgpack_pack_uint64(pk, region);
  rc |= sbn__key(pk, "offset");
  rc |= msgpack_pack_uint64(pk, off);
  return rc;
}

int sbn_client_shm_forward(sbn_client_t *c, uint64_t layer, uint64_t step,
                           int train, const sbn_tensor_desc_t *desc,
                           uint64_t region, uint64_t x_off, uint64_t y_off) {
  return sbn_client_shm_forward_flags(c, layer, step, train, desc, region,
                                      x_off, y_off, 0);
}

int sbn_client_shm_forward_flags(sbn_client_t *c, uint64_t layer, uint64_t step,
                                 int train, const sbn_tensor_desc_t *desc,
                                 uint64_t region, uint64_t x_off,
                                 uint64_t y_off, unsigned flags) {
  sbn__req_t r;
  sbn__reply_t p;
  int stays = (flags & SBN_CLIENT_SHM_X_STAYS) != 0;
  int rc = sbn__begin(c, "shm_forward");
  if (rc != 0)
    return rc;
  if (desc == NULL)
    return sbn__fail(c, SBN_EINVAL, "desc: NULL");
  if ((flags & ~SBN_CLIENT_SHM_X_STAYS) != 0)
    return sbn__fail(c, SBN_EINVAL, "flags: unknown bits 0x%x",
                     flags & ~SBN_CLIENT_SHM_X_STAYS);
  sbn__req_start(c, &r, "forward", 7 + (size_t)stays);
  r.bad |= sbn__pack_layer_step(&r.pk, layer, step);
  if (stays) {
    r.bad |= sbn__key(&r.pk, "x_stays");
    r.bad |= msgpack_pack_true(&r.pk);
  }
  r.bad |= sbn__key(&r.pk, "train");
  r.bad |= train ? msgpack_pack_true(&r.pk) : msgpack_pack_false(&r.pk);
  r.bad |= sbn__key(&r.pk, "x");
  r.bad |= sbn__pack_shm_tensor(&r.pk, desc, region, x_off);
  r.bad |= sbn__pack_at(&r.pk, "y_at", region, y_off);
  if ((rc = sbn__call(c, &r, &p)) != 0)
    return rc;
  sbn__reply_free(&p);
  return 0;
}

int sbn_client_shm_backward(sbn_client_t *c, uint64_t layer, uint64_t step,
                            const sbn_tensor_desc_t *desc, uint64_t region,
                            uint64_t dy_off, uint64_t dx_off, float *dweight,
                            float *dbias, size_t wb_numel) {
  sbn__req_t r;
  sbn__reply_t p;
  int rc = sbn__begin(c, "shm_backward");
  if (rc != 0)
    return rc;
  if (desc == NULL)
    return sbn__fail(c, SBN_EINVAL, "desc: NULL");
  sbn__req_start(c, &r, "backward", 6);
  r.bad |= sbn__pack_layer_step(&r.pk, layer, step);
  r.bad |= sbn__key(&r.pk, "dy");
  r.bad |= sbn__pack_shm_tensor(&r.pk, desc, region, dy_off);
  r.bad |= sbn__pack_at(&r.pk, "dx_at", region, dx_off);
  if ((rc = sbn__call(c, &r, &p)) != 0)
    return rc;
  rc = sbn__take_dparams(c, &p.root, dweight, dbias, wb_numel);
  sbn__reply_free(&p);
  return rc;
}
