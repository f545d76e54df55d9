/* Zero-copy shared memory (protocol 6): the regions a Unix client handed
 * its worker, and the checks a request naming them passes.
 *
 * A client creates a memfd, seals it against shrinking, and sends it with
 * SCM_RIGHTS on the bytes of a `shm_attach` frame. The server (which owns
 * the socket, svc_server/svc_shm.c) takes every descriptor that came with
 * a frame into the connection's inbox before the frame runs; the worker's
 * shm_attach takes the oldest one, checks its seals and size, counts it
 * against the memory budget and maps it. Forwards and backwards may then
 * name x or dy by (region, offset) and ask for y or dx at (region,
 * offset): the worker copies the input out of the region and writes the
 * output into it, so no tensor byte crosses the socket.
 *
 * Ownership: the table lives in the server's connection and is released
 * with it (svc_shm_release unmaps every region and closes the descriptors
 * still in the inbox). The worker only borrows it for one request (see
 * svc_worker_set_shm). Not installed. */
#ifndef SBN_SVC_SHM_H
#define SBN_SVC_SHM_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "svc_codec.h"

/* Regions per connection, and descriptors received but not yet taken. */
#define SVC_SHM_MAX_REGIONS 16
#define SVC_SHM_INBOX 4

typedef struct svc_shm_region_s {
  uint8_t *base; /* the shared, writable mapping; NULL: a free slot */
  uint64_t size;
  dev_t dev; /* the file, so that one file cannot be mapped twice */
  ino_t ino;
} svc_shm_region_t;

typedef struct svc_shm_s {
  int inbox[SVC_SHM_INBOX];
  uint32_t ninbox;
  svc_shm_region_t r[SVC_SHM_MAX_REGIONS];
  uint32_t nregions; /* slots used, r[0..nregions) */
  uint64_t mapped;   /* bytes mapped, counted by the server's budget */
  /* Bytes the worker's memory budget has left for a new region, set by
   * the server before each request. */
  uint64_t room;
} svc_shm_t;

void svc_shm_init(svc_shm_t *t);
/* A descriptor that came with a frame: 0, or -1 when the inbox is full
 * (the descriptor is then closed). */
int svc_shm_offer_fd(svc_shm_t *t, int fd);
/* Unmaps every region and closes the inbox's descriptors. */
void svc_shm_release(svc_shm_t *t);

/* Checks region id, offset and bytes against the table: on success *p
 * points at the first byte. Overflow-safe; BAD_TENSOR naming what. */
int svc_shm_range(const svc_shm_t *t, uint64_t region, uint64_t offset,
                  uint64_t bytes, const char *what, uint8_t **p);

#endif /* SBN_SVC_SHM_H */
