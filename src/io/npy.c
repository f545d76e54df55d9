/* .npy tensor files: a strict reader for little-endian float32/float64 in
 * C order, and an atomic float32 writer.
 *
 * The header is a Python dict literal. Rather than accept "anything
 * ast.literal_eval would", the reader takes exactly the three keys NumPy
 * writes ('descr', 'fortran_order', 'shape'), each once, in any order, and
 * checks the declared data size against the file size before allocating, so
 * a lying header can never size an allocation beyond what the file holds. */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "io/sbn_io.h"
#include "sbn_npy.h"

/* The largest header accepted (versions 2.0 and 3.0 declare 4-byte header
 * lengths; NumPy itself never writes more than a few hundred bytes). */
#define SBN__NPY_MAX_HEADER (1u << 20)

static const char sbn__npy_magic[6] = {'\x93', 'N', 'U', 'M', 'P', 'Y'};

static int sbn__host_big_endian(void) {
  const uint16_t one = 1;
  unsigned char b;
  memcpy(&b, &one, 1);
  return b == 0;
}

static void sbn__swap_bytes(void *p, size_t width, size_t n) {
  unsigned char *b = p;
  for (size_t i = 0; i < n; i++, b += width) {
    for (size_t j = 0; j < width / 2; j++) {
      unsigned char t = b[j];
      b[j] = b[width - 1 - j];
      b[width - 1 - j] = t;
    }
  }
}

/* ------------------------------------------------------------------ */
/* Header parsing. */

typedef struct sbn__npy_hdr_s {
  int have_descr, have_fortran, have_shape;
  size_t itemsize; /* 4 or 8 */
  int fortran;
  int ndim;
  size_t dims[SBN_MAX_DIMS];
} sbn__npy_hdr_t;

typedef struct sbn__cursor_s {
  const char *start, *p, *end;
  const char *path;
} sbn__cursor_t;

static void sbn__skip_ws(sbn__cursor_t *c) {
  while (c->p < c->end &&
         (*c->p == ' ' || *c->p == '\t' || *c->p == '\n' || *c->p == '\r'))
    c->p++;
}

static int sbn__expect(sbn__cursor_t *c, char ch) {
  sbn__skip_ws(c);
  if (c->p >= c->end || *c->p != ch)
    return sbn_set_error(SBN_EFORMAT,
                         "%s: malformed .npy header: expected '%c' at "
                         "offset %td",
                         c->path, ch, c->p - c->start);
  c->p++;
  return 0;
}

/* A quoted Python string without escapes (none of the accepted keys or
 * values need one) copied into buf. */
static int sbn__parse_str(sbn__cursor_t *c, char *buf, size_t cap) {
  sbn__skip_ws(c);
  if (c->p >= c->end || (*c->p != '\'' && *c->p != '"'))
    return sbn_set_error(
        SBN_EFORMAT, "%s: malformed .npy header: expected a string", c->path);
  char q = *c->p++;
  size_t n = 0;
  while (c->p < c->end && *c->p != q) {
    if (*c->p == '\\' || n + 1 >= cap)
      return sbn_set_error(
          SBN_EFORMAT, "%s: malformed .npy header: unexpected string", c->path);
    buf[n++] = *c->p++;
  }
  if (c->p >= c->end)
    return sbn_set_error(
        SBN_EFORMAT, "%s: malformed .npy header: unterminated string", c->path);
  c->p++;
  buf[n] = '\0';
  return 0;
}

static int sbn__parse_descr(sbn__cursor_t *c, sbn__npy_hdr_t *h) {
  char d[32];
  int rc = sbn__parse_str(c, d, sizeof d);
  if (rc != 0)
    return rc;
  if (strcmp(d, "<f4") == 0) {
    h->itemsize = 4;
    return 0;
  }
  if (strcmp(d, "<f8") == 0) {
    h->itemsize = 8;
    return 0;
  }
  if (d[0] == '>' && (strcmp(d + 1, "f4") == 0 || strcmp(d + 1, "f8") == 0))
    return sbn_set_error(SBN_EFORMAT,
                         "%s: dtype '%s' is big-endian; only little-endian "
                         "'<f4' and '<f8' are read",
                         c->path, d);
  return sbn_set_error(SBN_EFORMAT,
                       "%s: dtype '%s' is not float32 ('<f4') or float64 "
                       "('<f8')",
                       c->path, d);
}

static int sbn__parse_bool(sbn__cursor_t *c, int *out) {
  sbn__skip_ws(c);
  size_t left = (size_t)(c->end - c->p);
  if (left >= 4 && memcmp(c->p, "True", 4) == 0) {
    c->p += 4;
    *out = 1;
    return 0;
  }
  if (left >= 5 && memcmp(c->p, "False", 5) == 0) {
    c->p += 5;
    *out = 0;
    return 0;
  }
  return sbn_set_error(SBN_EFORMAT,
                       "%s: malformed .npy header: fortran_order is not "
                       "True or False",
                       c->path);
}

static int sbn__parse_shape(sbn__cursor_t *c, sbn__npy_hdr_t *h) {
  int rc;
  if ((rc = sbn__expect(c, '(')) != 0)
    return rc;
  h->ndim = 0;
  for (;;) {
    sbn__skip_ws(c);
    if (c->p < c->end && *c->p == ')') {
      c->p++;
      return 0;
    }
    if (c->p >= c->end || *c->p < '0' || *c->p > '9')
      return sbn_set_error(SBN_EFORMAT,
                           "%s: malformed .npy header: shape is not a "
                           "tuple of non-negative integers",
                           c->path);
    size_t v = 0;
    while (c->p < c->end && *c->p >= '0' && *c->p <= '9') {
      size_t digit = (size_t)(*c->p - '0');
      if (v > (SIZE_MAX - digit) / 10)
        return sbn_set_error(
            SBN_EFORMAT, "%s: shape: a dimension overflows size_t", c->path);
      v = v * 10 + digit;
      c->p++;
    }
    if (h->ndim == SBN_MAX_DIMS)
      return sbn_set_error(SBN_EFORMAT,
                           "%s: shape: more than %d dims are not supported",
                           c->path, SBN_MAX_DIMS);
    h->dims[h->ndim++] = v;
    sbn__skip_ws(c);
    if (c->p < c->end && *c->p == ',') {
      c->p++;
      continue;
    }
    if (c->p < c->end && *c->p == ')') {
      /* A one-element tuple needs its trailing comma in Python. */
      if (h->ndim == 1)
        return sbn_set_error(SBN_EFORMAT,
                             "%s: malformed .npy header: shape (%zu) is not "
                             "a tuple",
                             c->path, v);
      c->p++;
      return 0;
    }
    return sbn_set_error(SBN_EFORMAT,
                         "%s: malformed .npy header: bad shape tuple", c->path);
  }
}

static int sbn__parse_header(const char *path, const char *text, size_t len,
                             sbn__npy_hdr_t *h) {
  sbn__cursor_t c = {text, text, text + len, path};
  int rc;
  memset(h, 0, sizeof *h);
  if ((rc = sbn__expect(&c, '{')) != 0)
    return rc;
  for (;;) {
    char key[32];
    sbn__skip_ws(&c);
    if (c.p < c.end && *c.p == '}') {
      c.p++;
      break;
    }
    if ((rc = sbn__parse_str(&c, key, sizeof key)) != 0)
      return rc;
    if ((rc = sbn__expect(&c, ':')) != 0)
      return rc;
    int *seen;
    if (strcmp(key, "descr") == 0) {
      seen = &h->have_descr;
      rc = sbn__parse_descr(&c, h);
    } else if (strcmp(key, "fortran_order") == 0) {
      seen = &h->have_fortran;
      rc = sbn__parse_bool(&c, &h->fortran);
    } else if (strcmp(key, "shape") == 0) {
      seen = &h->have_shape;
      rc = sbn__parse_shape(&c, h);
    } else {
      return sbn_set_error(SBN_EFORMAT,
                           "%s: malformed .npy header: unknown key '%s'", path,
                           key);
    }
    if (rc != 0)
      return rc;
    if (*seen)
      return sbn_set_error(SBN_EFORMAT,
                           "%s: malformed .npy header: key '%s' given twice",
                           path, key);
    *seen = 1;
    sbn__skip_ws(&c);
    if (c.p < c.end && *c.p == ',') {
      c.p++;
      continue;
    }
    if ((rc = sbn__expect(&c, '}')) != 0)
      return rc;
    break;
  }
  sbn__skip_ws(&c);
  /* NumPy pads with spaces and ends with a newline; nothing else may
   * follow the dict. */
  if (c.p != c.end)
    return sbn_set_error(
        SBN_EFORMAT, "%s: malformed .npy header: text after the dict", path);
  if (!h->have_descr || !h->have_fortran || !h->have_shape)
    return sbn_set_error(SBN_EFORMAT, "%s: malformed .npy header: no '%s'",
                         path,
                         !h->have_descr     ? "descr"
                         : !h->have_fortran ? "fortran_order"
                                            : "shape");
  if (h->fortran)
    return sbn_set_error(SBN_EFORMAT,
                         "%s: Fortran-order arrays are not supported "
                         "(save a C-order array)",
                         path);
  return 0;
}

/* ------------------------------------------------------------------ */
/* Reading. */

static int sbn__read_full(FILE *f, void *buf, size_t n) {
  return fread(buf, 1, n, f) == n ? 0 : -1;
}

/* The magic, the version and the header length: *start is where the
 * header text begins, *hlen its length. */
static int sbn__read_preamble(FILE *f, const char *path, size_t *hlen,
                              size_t *start) {
  unsigned char pre[12];
  if (sbn__read_full(f, pre, 8) != 0 ||
      memcmp(pre, sbn__npy_magic, sizeof sbn__npy_magic) != 0)
    return sbn_set_error(SBN_EFORMAT, "%s: not a .npy file (bad magic)", path);
  if (pre[6] == 1) {
    if (sbn__read_full(f, pre + 8, 2) != 0)
      return sbn_set_error(SBN_EFORMAT, "%s: truncated .npy header", path);
    *hlen = (size_t)pre[8] | (size_t)pre[9] << 8;
    *start = 10;
  } else if (pre[6] == 2 || pre[6] == 3) {
    if (sbn__read_full(f, pre + 8, 4) != 0)
      return sbn_set_error(SBN_EFORMAT, "%s: truncated .npy header", path);
    *hlen = (size_t)pre[8] | (size_t)pre[9] << 8 | (size_t)pre[10] << 16 |
            (size_t)pre[11] << 24;
    *start = 12;
  } else {
    return sbn_set_error(SBN_EFORMAT, "%s: unsupported .npy version %u.%u",
                         path, pre[6], pre[7]);
  }
  return 0;
}

/* Reads and parses the header text of hlen bytes into h. */
static int sbn__read_header(FILE *f, const char *path, size_t hlen,
                            sbn__npy_hdr_t *h) {
  char *hdr = NULL;
  int rc;
  if (hlen > SBN__NPY_MAX_HEADER)
    return sbn_set_error(SBN_EFORMAT,
                         "%s: .npy header of %zu bytes exceeds the %u byte "
                         "limit",
                         path, hlen, SBN__NPY_MAX_HEADER);
  hdr = malloc(hlen + 1);
  if (hdr == NULL)
    return sbn_set_error(SBN_ENOMEM, "%s: out of memory", path);
  if (sbn__read_full(f, hdr, hlen) != 0) {
    rc = sbn_set_error(SBN_EFORMAT, "%s: truncated .npy header", path);
    goto fail;
  }
  hdr[hlen] = '\0';
  rc = sbn__parse_header(path, hdr, hlen, h);
fail:
  free(hdr);
  return rc;
}

/* The element count and data bytes the header declares, checked against
 * the bytes the file holds after the header (st_size, from start on). */
static int sbn__data_size(const char *path, const sbn__npy_hdr_t *h,
                          off_t st_size, size_t start, size_t *numel,
                          size_t *bytes) {
  size_t n = 1;
  for (int i = 0; i < h->ndim; i++)
    if (sbn__mul_size(n, h->dims[i], &n) != 0)
      return sbn_set_error(SBN_EFORMAT, "%s: shape: the size overflows size_t",
                           path);
  if (sbn__mul_size(n, h->itemsize, bytes) != 0)
    return sbn_set_error(SBN_EFORMAT, "%s: shape: the size overflows size_t",
                         path);
  /* st_size is compared in uintmax_t so that neither side is truncated. */
  uintmax_t have = (uintmax_t)st_size, begin = start;
  if (have < begin || have - begin != (uintmax_t)*bytes)
    return sbn_set_error(SBN_EFORMAT,
                         "%s: the header declares %zu data bytes but the file "
                         "holds %ju",
                         path, *bytes, have < begin ? 0 : have - begin);
  *numel = n;
  return 0;
}

/* Reads numel elements of the header's type into data as float32. */
static int sbn__read_data(FILE *f, const char *path, const sbn__npy_hdr_t *h,
                          size_t numel, size_t bytes, float *data) {
  if (h->itemsize == 4) {
    if (sbn__read_full(f, data, bytes) != 0)
      return sbn_set_error(SBN_EIO, "%s: short read", path);
    if (sbn__host_big_endian())
      sbn__swap_bytes(data, 4, numel);
    return 0;
  }
  /* Converted in chunks so a float64 file needs only its float32 copy
   * plus a small buffer. */
  enum { CHUNK = 4096 };
  double *chunk = malloc(CHUNK * sizeof(double));
  int rc = 0;
  if (chunk == NULL)
    return sbn_set_error(SBN_ENOMEM, "%s: out of memory", path);
  for (size_t i = 0; i < numel; i += CHUNK) {
    size_t n = numel - i < CHUNK ? numel - i : CHUNK;
    if (sbn__read_full(f, chunk, n * sizeof(double)) != 0) {
      rc = sbn_set_error(SBN_EIO, "%s: short read", path);
      goto fail;
    }
    if (sbn__host_big_endian())
      sbn__swap_bytes(chunk, 8, n);
    for (size_t j = 0; j < n; j++)
      data[i + j] = (float)chunk[j];
  }
fail:
  free(chunk);
  return rc;
}

int sbn_npy_read(const char *path, sbn_npy_t *out) {
  FILE *f = NULL;
  float *data = NULL;
  sbn__npy_hdr_t h;
  struct stat st;
  size_t hlen = 0, start = 0, numel = 0, bytes = 0;
  int rc, fd = -1;

  if (out == NULL)
    return sbn_set_error(SBN_EINVAL, "out: NULL");
  memset(out, 0, sizeof *out);
  if (path == NULL)
    return sbn_set_error(SBN_EINVAL, "path: NULL");
  /* Only a regular file, checked before anything can block on a FIFO:
   * the size check in sbn__data_size is what keeps a lying header from
   * sizing an allocation, and it needs a size. */
  if ((rc = sbn_open_regular(path, &fd)) != 0)
    goto fail;
  if (fstat(fd, &st) != 0 || (f = fdopen(fd, "rb")) == NULL) {
    rc = sbn_set_error(SBN_EIO, "%s: %s", path, strerror(errno));
    goto fail;
  }
  fd = -1; /* f owns it now */
  if ((rc = sbn__read_preamble(f, path, &hlen, &start)) != 0 ||
      (rc = sbn__read_header(f, path, hlen, &h)) != 0 ||
      (rc = sbn__data_size(path, &h, st.st_size, start + hlen, &numel,
                           &bytes)) != 0)
    goto fail;
  data = malloc((numel > 0 ? numel : 1) * sizeof(float));
  if (data == NULL) {
    rc = sbn_set_error(SBN_ENOMEM, "%s: out of memory for %zu floats", path,
                       numel);
    goto fail;
  }
  if ((rc = sbn__read_data(f, path, &h, numel, bytes, data)) != 0)
    goto fail;
  out->ndim = h.ndim;
  memcpy(out->dims, h.dims, sizeof h.dims);
  out->numel = numel;
  out->data = data;
  data = NULL;
  rc = 0;
fail:
  free(data);
  if (f != NULL)
    fclose(f);
  if (fd >= 0)
    close(fd);
  return rc;
}

void sbn_npy_free(sbn_npy_t *t) {
  if (t == NULL)
    return;
  free(t->data);
  memset(t, 0, sizeof *t);
}

/* ------------------------------------------------------------------ */
/* Writing. */

int sbn_npy_write(const char *path, const float *data, int ndim,
                  const size_t *dims) {
  char *tmp = NULL;
  int rc = sbn_npy_write_tmp(path, data, ndim, dims, &tmp);
  return rc != 0 ? rc : sbn__rename_tmp(tmp, path);
}

int sbn_npy_write_tmp(const char *path, const float *data, int ndim,
                      const size_t *dims, char **tmp_out) {
  char hdr[320];
  float *swapped = NULL;
  size_t numel = 1, bytes;
  int rc, n;

  if (tmp_out == NULL)
    return sbn_set_error(SBN_EINVAL, "tmp_out: NULL");
  *tmp_out = NULL;
  if (path == NULL)
    return sbn_set_error(SBN_EINVAL, "path: NULL");
  if (ndim < 0 || ndim > SBN_MAX_DIMS)
    return sbn_set_error(SBN_EINVAL, "%s: ndim %d is outside [0, %d]", path,
                         ndim, SBN_MAX_DIMS);
  if (ndim > 0 && dims == NULL)
    return sbn_set_error(SBN_EINVAL, "%s: dims: NULL", path);
  for (int i = 0; i < ndim; i++)
    if (sbn__mul_size(numel, dims[i], &numel) != 0)
      return sbn_set_error(SBN_EOVERFLOW, "%s: the size overflows size_t",
                           path);
  if (sbn__mul_size(numel, sizeof(float), &bytes) != 0)
    return sbn_set_error(SBN_EOVERFLOW, "%s: the size overflows size_t", path);
  if (numel > 0 && data == NULL)
    return sbn_set_error(SBN_EINVAL, "%s: data: NULL", path);

  /* The dict, padded with spaces so that the data starts at a multiple of
   * 64 bytes (NumPy's alignment), and ended with a newline. */
  n = snprintf(hdr + 10, sizeof hdr - 10,
               "{'descr': '<f4', 'fortran_order': False, 'shape': (");
  for (int i = 0; i < ndim; i++)
    n += snprintf(hdr + 10 + n, sizeof hdr - 10 - (size_t)n, "%s%zu",
                  i ? ", " : "", dims[i]);
  n += snprintf(hdr + 10 + n, sizeof hdr - 10 - (size_t)n, "%s), }",
                ndim == 1 ? "," : "");
  size_t total = 10 + (size_t)n + 1;
  total = (total + 63) / 64 * 64;
  if (total > sizeof hdr)
    return sbn_set_error(SBN_EINVAL, "%s: header too long", path);
  memset(hdr + 10 + n, ' ', total - 10 - (size_t)n);
  hdr[total - 1] = '\n';
  memcpy(hdr, sbn__npy_magic, sizeof sbn__npy_magic);
  hdr[6] = 1;
  hdr[7] = 0;
  hdr[8] = (char)((total - 10) & 0xff);
  hdr[9] = (char)((total - 10) >> 8);

  const float *src = data;
  if (sbn__host_big_endian() && numel > 0) {
    swapped = malloc(bytes);
    if (swapped == NULL) {
      rc = sbn_set_error(SBN_ENOMEM, "%s: out of memory", path);
      goto fail;
    }
    memcpy(swapped, data, bytes);
    sbn__swap_bytes(swapped, 4, numel);
    src = swapped;
  }
  {
    const void *parts[2] = {hdr, src};
    size_t lens[2] = {total, bytes};
    /* An output tensor is ordinary data (0644) and is cheap to recompute,
     * so no fsync: atomic replacement is what matters here. */
    rc = sbn_write_file_tmp(path, parts, lens, 2, 0644, 0, tmp_out);
  }
fail:
  free(swapped);
  return rc;
}
