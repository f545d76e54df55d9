/* The idx files of MNIST and Fashion-MNIST: a big-endian header (magic
 * 0x00000801 for labels, 0x00000803 for images, then one u32 per dim) and
 * unsigned bytes. zlib's gzread reads gzip'd and plain files alike. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <zlib.h>

#include "nn/sbn_nn.h"

/* Fashion-MNIST has 60,000 training images; a cap well above that keeps a
 * corrupt header from asking for gigabytes. */
#define IDX_MAX_ITEMS 1000000u
#define IDX_MAX_SIDE 1024u

static uint32_t be32(const unsigned char *b) {
  return (uint32_t)b[0] << 24 | (uint32_t)b[1] << 16 | (uint32_t)b[2] << 8 |
         (uint32_t)b[3];
}

/* Reads exactly len bytes; SBN_EFORMAT for a short file, SBN_EIO for a
 * read error (a corrupt gzip stream is one). */
static int read_exact(gzFile f, const char *path, void *buf, size_t len,
                      const char *what) {
  unsigned char *p = buf;
  while (len > 0) {
    unsigned chunk = len > (1u << 30) ? 1u << 30 : (unsigned)len;
    int got = gzread(f, p, chunk);
    if (got < 0) {
      int zerr;
      const char *msg = gzerror(f, &zerr);
      return sbn_set_error(SBN_EFORMAT, "%s: cannot read the %s (%s)", path,
                           what, msg);
    }
    if (got == 0)
      return sbn_set_error(SBN_EFORMAT, "%s: truncated in the %s", path, what);
    p += got;
    len -= (size_t)got;
  }
  return 0;
}

/* Opens path and reads its header: ndim dims after a magic of 0x0800 +
 * ndim (unsigned bytes). */
static int open_idx(const char *path, int ndim, uint32_t *dims, gzFile *out) {
  *out = NULL;
  gzFile f = gzopen(path, "rb");
  if (f == NULL)
    return sbn_set_error(SBN_EIO, "%s: cannot open (%s)", path,
                         errno ? strerror(errno) : "out of memory");
  unsigned char head[4 + 4 * 3];
  int rc = read_exact(f, path, head, 4 + 4 * (size_t)ndim, "header");
  if (rc == 0 && be32(head) != 0x0800u + (uint32_t)ndim)
    rc = sbn_set_error(SBN_EFORMAT,
                       "%s: magic 0x%08x is not an idx%d file of unsigned "
                       "bytes (0x%08x)",
                       path, be32(head), ndim, 0x0800u + (uint32_t)ndim);
  for (int i = 0; rc == 0 && i < ndim; i++) {
    dims[i] = be32(head + 4 + 4 * i);
    uint32_t cap = i == 0 ? IDX_MAX_ITEMS : IDX_MAX_SIDE;
    if (dims[i] == 0 || dims[i] > cap)
      rc = sbn_set_error(SBN_EFORMAT, "%s: dim %d is %u (1..%u)", path, i,
                         dims[i], cap);
  }
  if (rc != 0) {
    gzclose(f);
    return rc;
  }
  *out = f;
  return 0;
}

/* Reads len payload bytes and checks that nothing follows them. */
static int read_payload(gzFile f, const char *path, uint8_t *buf, size_t len) {
  int rc = read_exact(f, path, buf, len, "data");
  unsigned char extra;
  if (rc == 0 && gzread(f, &extra, 1) != 0)
    rc = sbn_set_error(SBN_EFORMAT, "%s: trailing bytes after the data", path);
  return rc;
}

int sbn_idx_load(const char *images_path, const char *labels_path,
                 sbn_dataset_t *out) {
  memset(out, 0, sizeof *out);
  uint32_t idims[3], ldims[1];
  gzFile fi = NULL, fl = NULL;
  int rc = open_idx(images_path, 3, idims, &fi);
  if (rc == 0)
    rc = open_idx(labels_path, 1, ldims, &fl);
  if (rc == 0 && ldims[0] != idims[0])
    rc = sbn_set_error(SBN_EFORMAT, "%s: %u labels for the %u images of %s",
                       labels_path, ldims[0], idims[0], images_path);
  sbn_dataset_t d = {idims[0], idims[1], idims[2], NULL, NULL};
  if (rc == 0) {
    d.images = malloc(d.n * d.rows * d.cols);
    d.labels = malloc(d.n);
    if (d.images == NULL || d.labels == NULL)
      rc = sbn_set_error(SBN_ENOMEM, "%s: no memory for %zu images",
                         images_path, d.n);
  }
  if (rc == 0)
    rc = read_payload(fi, images_path, d.images, d.n * d.rows * d.cols);
  if (rc == 0)
    rc = read_payload(fl, labels_path, d.labels, d.n);
  for (size_t i = 0; rc == 0 && i < d.n; i++)
    if (d.labels[i] > 9)
      rc = sbn_set_error(SBN_EFORMAT, "%s: label %zu is %u (0..9)", labels_path,
                         i, (unsigned)d.labels[i]);
  if (fi != NULL)
    gzclose(fi);
  if (fl != NULL)
    gzclose(fl);
  if (rc != 0) {
    sbn_dataset_free(&d);
    return rc;
  }
  *out = d;
  return 0;
}

void sbn_dataset_free(sbn_dataset_t *d) {
  free(d->images);
  free(d->labels);
  memset(d, 0, sizeof *d);
}

void sbn_dataset_moments(const sbn_dataset_t *d, double *mean, double *std) {
  /* Integer sums are exact, so the moments do not depend on the order. */
  uint64_t s = 0, s2 = 0;
  size_t len = d->n * d->rows * d->cols;
  for (size_t i = 0; i < len; i++) {
    s += d->images[i];
    s2 += (uint64_t)d->images[i] * d->images[i];
  }
  double m = len ? (double)s / (double)len : 0;
  double v = len ? (double)s2 / (double)len - m * m : 0;
  *mean = m / 255.0;
  *std = v > 0 ? sqrt(v) / 255.0 : 1.0;
}

void sbn_dataset_gather(const sbn_dataset_t *d, const uint32_t *idx, size_t n,
                        double mean, double std, float *x, uint8_t *labels) {
  size_t px = d->rows * d->cols;
  float lut[256];
  for (int v = 0; v < 256; v++)
    lut[v] = (float)((v / 255.0 - mean) / std);
  for (size_t i = 0; i < n; i++) {
    const uint8_t *img = d->images + (size_t)idx[i] * px;
    for (size_t j = 0; j < px; j++)
      x[i * px + j] = lut[img[j]];
    labels[i] = d->labels[idx[i]];
  }
}
