/* `syncbn train`: the training checkpoint. It belongs to the family of the
 * service's checkpoint format (src/sbn_state.h): a magic, a version, zero
 * flags, the file's length, little-endian fixed-width fields without
 * padding, a CRC-32 trailer over every byte before it, and an atomic
 * write. The layers' running statistics are stored once, as rank 0 holds
 * them after the end-of-epoch broadcast (cli_train.c, sync_stats), so
 * every rank resumes from the same state.
 *
 *   0   u8[8]  magic "SBNTRAIN"
 *   8   u32    version, 1
 *   12  u32    flags, 0
 *   16  u64    file_len, trailer included
 *   24  u64    fingerprint of the options that change the numbers
 *   32  u64    epochs_done
 *   40  u64    step: optimizer steps taken (the schedule's position; the
 *              data order is the permutation of (seed, epoch))
 *   48  u64    nparams
 *   56  u64    nstats
 *   64  u64    ntracked
 *   72  f32[nparams] parameters, f32[nparams] SGD momentum buffers,
 *       f32[nstats] running statistics, i64[ntracked] num_batches_tracked,
 *       f64[5 epochs_done] per-epoch results (train loss, test loss, test
 *       accuracy, wall seconds, allreduce share)
 *       u32    CRC-32 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli_train_int.h"
#include "sbn_state.h"

#define HEAD 72

static void put64(unsigned char **p, uint64_t v) {
  for (int i = 0; i < 8; i++)
    *(*p)++ = (unsigned char)(v >> (8 * i));
}

static uint64_t get64(const unsigned char **p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; i++)
    v |= (uint64_t) * (*p)++ << (8 * i);
  return v;
}

static void put_f32s(unsigned char **p, const float *x, size_t n) {
  for (size_t i = 0; i < n; i++) {
    uint32_t u;
    memcpy(&u, &x[i], 4);
    for (int b = 0; b < 4; b++)
      *(*p)++ = (unsigned char)(u >> (8 * b));
  }
}

static void get_f32s(const unsigned char **p, float *x, size_t n) {
  for (size_t i = 0; i < n; i++) {
    uint32_t u = 0;
    for (int b = 0; b < 4; b++)
      u |= (uint32_t) * (*p)++ << (8 * b);
    memcpy(&x[i], &u, 4);
  }
}

static void put_f64(unsigned char **p, double d) {
  uint64_t u;
  memcpy(&u, &d, 8);
  put64(p, u);
}

static double get_f64(const unsigned char **p) {
  uint64_t u = get64(p);
  double d;
  memcpy(&d, &u, 8);
  return d;
}

static size_t file_len(const sbn_nn_model_t *m, uint64_t epochs) {
  return HEAD + 8 * sbn_nn_param_count(m) + 4 * sbn_nn_stats_count(m) +
         8 * sbn_nn_tracked_count(m) + 40 * (size_t)epochs + 4;
}

int sbn__train_ckpt_save(const char *path, sbn_nn_model_t *m,
                         const float *momentum_buf,
                         const train_ckpt_meta_t *meta) {
  size_t len = file_len(m, meta->epochs_done);
  unsigned char *buf = malloc(len), *p = buf;
  if (buf == NULL)
    return sbn_set_error(SBN_ENOMEM, "%s: no memory", path);
  size_t np = sbn_nn_param_count(m), ns = sbn_nn_stats_count(m);
  size_t nt = sbn_nn_tracked_count(m);
  memcpy(p, "SBNTRAIN", 8);
  p += 8;
  put64(&p, 1); /* version 1, flags 0 */
  put64(&p, len);
  put64(&p, meta->fingerprint);
  put64(&p, meta->epochs_done);
  put64(&p, meta->step);
  put64(&p, np);
  put64(&p, ns);
  put64(&p, nt);
  put_f32s(&p, sbn_nn_params(m), np);
  put_f32s(&p, momentum_buf, np);
  put_f32s(&p, sbn_nn_stats(m), ns);
  for (size_t i = 0; i < nt; i++)
    put64(&p, (uint64_t)sbn_nn_tracked_get(m, i));
  for (uint64_t e = 0; e < meta->epochs_done; e++) {
    const train_epoch_t *ep = &meta->history[e];
    put_f64(&p, ep->train_loss);
    put_f64(&p, ep->test_loss);
    put_f64(&p, ep->test_acc);
    put_f64(&p, ep->wall_s);
    put_f64(&p, ep->allreduce_share);
  }
  uint32_t crc = sbn_crc32(0, buf, len - 4);
  for (int b = 0; b < 4; b++)
    *p++ = (unsigned char)(crc >> (8 * b));
  /* Durable: a crash leaves the last epoch's checkpoint or this one. */
  const void *parts[1] = {buf};
  int rc = sbn_write_file_atomic(path, parts, &len, 1, 0600, 1);
  free(buf);
  return rc;
}

static int read_all(const char *path, unsigned char **out, size_t *len) {
  *out = NULL;
  FILE *f = fopen(path, "rb");
  if (f == NULL)
    return sbn_set_error(SBN_EIO, "%s: cannot open", path);
  unsigned char *buf = NULL;
  size_t cap = 0, n = 0;
  int rc = 0;
  for (;;) {
    if (n == cap) {
      unsigned char *nb = cap < SBN_CKPT_MAX_FILE
                              ? realloc(buf, cap ? 2 * cap : 1 << 16)
                              : NULL;
      if (nb == NULL) {
        rc = sbn_set_error(SBN_ELIMIT, "%s: too large", path);
        break;
      }
      buf = nb;
      cap = cap ? 2 * cap : 1 << 16;
    }
    size_t got = fread(buf + n, 1, cap - n, f);
    n += got;
    if (got == 0) {
      if (ferror(f))
        rc = sbn_set_error(SBN_EIO, "%s: read failed", path);
      break;
    }
  }
  fclose(f);
  if (rc != 0) {
    free(buf);
    return rc;
  }
  *out = buf;
  *len = n;
  return 0;
}

/* Checks everything before the model is touched. */
static int check_head(const char *path, const unsigned char *buf, size_t len,
                      const sbn_nn_model_t *m, const train_ckpt_meta_t *meta,
                      uint64_t max_epochs) {
  const unsigned char *p = buf + 8;
  if (len < HEAD + 4 || memcmp(buf, "SBNTRAIN", 8) != 0)
    return sbn_set_error(SBN_EFORMAT, "%s: not a syncbn train checkpoint",
                         path);
  if (get64(&p) != 1)
    return sbn_set_error(SBN_EFORMAT, "%s: unknown version or flags", path);
  if (get64(&p) != len)
    return sbn_set_error(SBN_EFORMAT, "%s: truncated or trailing bytes", path);
  uint32_t crc = 0;
  for (int b = 0; b < 4; b++)
    crc |= (uint32_t)buf[len - 4 + b] << (8 * b);
  if (crc != sbn_crc32(0, buf, len - 4))
    return sbn_set_error(SBN_EFORMAT, "%s: checksum mismatch", path);
  if (get64(&p) != meta->fingerprint)
    return sbn_set_error(SBN_EMISMATCH,
                         "%s: written by a run with other options (model, "
                         "norm, batch, counts, ranks, seed, lr, epochs, "
                         "subset)",
                         path);
  uint64_t done = get64(&p);
  p += 8;
  if (done > max_epochs || get64(&p) != sbn_nn_param_count(m) ||
      get64(&p) != sbn_nn_stats_count(m) ||
      get64(&p) != sbn_nn_tracked_count(m) || len != file_len(m, done))
    return sbn_set_error(SBN_EFORMAT, "%s: sizes do not match this model",
                         path);
  return 0;
}

int sbn__train_ckpt_load(const char *path, sbn_nn_model_t *m,
                         float *momentum_buf, train_ckpt_meta_t *meta,
                         uint64_t max_epochs) {
  unsigned char *buf;
  size_t len = 0;
  int rc = read_all(path, &buf, &len);
  if (rc != 0)
    return rc;
  if ((rc = check_head(path, buf, len, m, meta, max_epochs)) != 0) {
    free(buf);
    return rc;
  }
  const unsigned char *p = buf + 32;
  meta->epochs_done = get64(&p);
  meta->step = get64(&p);
  p += 24;
  size_t np = sbn_nn_param_count(m);
  get_f32s(&p, sbn_nn_params(m), np);
  get_f32s(&p, momentum_buf, np);
  get_f32s(&p, sbn_nn_stats(m), sbn_nn_stats_count(m));
  for (size_t i = 0; i < sbn_nn_tracked_count(m); i++)
    sbn_nn_tracked_set(m, i, (int64_t)get64(&p));
  for (uint64_t e = 0; e < meta->epochs_done; e++) {
    train_epoch_t *ep = &meta->history[e];
    ep->train_loss = get_f64(&p);
    ep->test_loss = get_f64(&p);
    ep->test_acc = get_f64(&p);
    ep->wall_s = get_f64(&p);
    ep->allreduce_share = get_f64(&p);
  }
  free(buf);
  return 0;
}
