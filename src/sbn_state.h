/* Layer state that outlives a process: the one checkpoint format.
 *
 * A checkpoint holds, per layer, its name, its parameters, its sync group
 * size, its affine parameters and, per sync group, the running statistics.
 * The service's checkpoint_save/checkpoint_load and `syncbn train` use this
 * format; scripts/state_torch.py converts it to and from a PyTorch
 * state_dict.
 *
 * Why per sync group: when BatchNorm synchronizes over groups smaller than
 * the job, every group computes its own running statistics, so one file
 * stores each group's statistics under its index (world_rank / group_size).
 * Affine parameters are stored once per layer: data-parallel training keeps
 * them identical on every rank (their gradients are reduced over the job).
 *
 * Byte layout (version 1). Every integer is little-endian and fixed width;
 * f32/f64 are IEEE-754 binary32/binary64 stored as the little-endian bytes
 * of their bit patterns (NaN payloads survive). There is no padding.
 *
 *   Header, 32 bytes
 *     0   u8[8]  magic "SBNCKPT\0"
 *     8   u32    version, 1
 *     12  u32    flags, 0 (any other value is refused)
 *     16  u32    layer_count (at most SBN_CKPT_MAX_LAYERS)
 *     20  u32    reserved, 0
 *     24  u64    file_len: bytes in the whole file, trailer included
 *   layer_count layer records, each:
 *         u32    name_len (1..SBN_CKPT_MAX_NAME)
 *         u8[name_len] name: UTF-8, no control characters, no NUL
 *         u32    op (sbn_op_t)
 *         u64    channels
 *         u64    groups
 *         u32    norm_ndim (0..8)
 *         u64[8] norm_shape (all eight entries, as given)
 *         f64    eps
 *         f64    momentum
 *         u32    cumulative (0 or 1)
 *         u32    affine (0 or 1)
 *         u32    track_running_stats (0 or 1)
 *         f64    p
 *         u32    seed
 *         u32    layer_id
 *           (ghost_batch is not stored: the running statistics mean the
 *           same for every ghost batch size, so a decoded descriptor has
 *           ghost_batch 0 and a file loads into a layer of any g)
 *         u32    group_size (0: one group of the whole job)
 *         u32    num_groups (at most SBN_CKPT_MAX_GROUPS)
 *         u64    affine_len (see sbn_ckpt_lengths())
 *         u64    stats_len (see sbn_ckpt_lengths())
 *         f32[affine_len] weight
 *         f32[affine_len] bias
 *         num_groups group records, group indices strictly increasing:
 *           u32  group index
 *           u32  reserved, 0
 *           i64  num_batches_tracked (>= 0)
 *           f32[stats_len] running_mean
 *           f32[stats_len] running_var
 *   Trailer, 4 bytes
 *         u32    CRC-32 (IEEE 802.3, as zlib's crc32) of every byte before
 *
 * A reader refuses, with SBN_EFORMAT and a message saying what is wrong: a
 * wrong magic, another version, nonzero flags or reserved fields, a length
 * that differs from file_len (truncation, trailing bytes), a checksum
 * mismatch, a count or length that does not fit the remaining bytes, a
 * bad name, a duplicate layer name, parameters that sbn_layer_create()
 * refuses, lengths that differ from sbn_ckpt_lengths(), non-increasing group
 * indices, a negative num_batches_tracked, and a flag outside {0, 1}.
 * Counts above the caps below, and buffers or files larger than
 * SBN_CKPT_MAX_FILE, are SBN_ELIMIT (encode refuses to produce one). Decoding
 * validates the whole buffer before it allocates anything.
 *
 * Ownership: a checkpoint (sbn_ckpt_t) owns copies of everything added to or
 * decoded into it. The views it hands out (sbn_ckpt_layer_t and its groups,
 * names and arrays) stay valid until sbn_ckpt_free(); adding layers does not
 * move them. Views are read-only (the running statistics sit behind the
 * non-const pointers of sbn_state_t only because that type is reused):
 * copy the arrays into the caller's own state before training with them.
 * Buffers from sbn_ckpt_encode() belong to the caller (free()).
 *
 * A rank finds its own statistics with sbn_ckpt_find() and
 * sbn_ckpt_group(layer, world_rank / group_size) (index 0 when group_size
 * is 0).
 *
 * Thread safety: a checkpoint may be read from several threads at once;
 * adding to it needs exclusive access.
 */
#ifndef SBN_STATE_H
#define SBN_STATE_H

#include <stddef.h>
#include <stdint.h>

#include "syncbn.h"

#ifdef __cplusplus
extern "C" {
#endif

#define SBN_CKPT_VERSION 1
#define SBN_CKPT_HEADER_BYTES 32
/* Caps a decoder enforces (SBN_ELIMIT beyond them). */
#define SBN_CKPT_MAX_LAYERS 65536u
#define SBN_CKPT_MAX_NAME 255u              /* bytes of a layer name */
#define SBN_CKPT_MAX_GROUPS 65536u          /* sync groups of one layer */
#define SBN_CKPT_MAX_ELEMS (1u << 26)       /* floats in one array */
#define SBN_CKPT_MAX_FILE ((size_t)1 << 30) /* bytes of a checkpoint */
/* Longest checkpoint file name sbn_ckpt_name_check() accepts. */
#define SBN_CKPT_MAX_FILE_NAME 128u

/* One sync group's running state. In a view, state.running_mean and
 * state.running_var hold stats_len floats each (NULL when stats_len is 0)
 * and belong to the checkpoint. */
typedef struct sbn_ckpt_group_s {
  uint32_t index; /* world_rank / group_size, or 0 for a job-wide group */
  sbn_state_t state;
} sbn_ckpt_group_t;

/* One layer. Used as input to sbn_ckpt_add() (everything is copied) and as
 * the read-only view that sbn_ckpt_layer()/sbn_ckpt_find() return. */
typedef struct sbn_ckpt_layer_s {
  const char *name; /* NUL-terminated UTF-8, 1..SBN_CKPT_MAX_NAME bytes */
  sbn_layer_params_t params;
  uint32_t group_size; /* 0: one group of the whole job */
  /* Lengths of weight/bias and of each running statistic; on input they
   * must equal what sbn_ckpt_lengths() gives for params (a check that the
   * caller's arrays have the size the layer implies). */
  size_t affine_len;
  size_t stats_len;
  const float *weight; /* affine_len floats; NULL when affine_len is 0 */
  const float *bias;
  size_t num_groups; /* 0..SBN_CKPT_MAX_GROUPS; 0 when stats_len is 0 */
  const sbn_ckpt_group_t *groups; /* indices strictly increasing */
} sbn_ckpt_layer_t;

typedef struct sbn_ckpt_s sbn_ckpt_t;

/* The array lengths a layer with these parameters stores:
 * affine_len = channels (BN, IN, GN) or prod(norm_shape) (LN) when affine,
 * else 0; stats_len = channels for BN and IN with track_running_stats,
 * else 0. Validates params as sbn_layer_create() does and applies the caps
 * (SBN_ELIMIT when an array exceeds SBN_CKPT_MAX_ELEMS). */
SBN_API int sbn_ckpt_lengths(const sbn_layer_params_t *params,
                             size_t *affine_len, size_t *stats_len);

/* Creates an empty checkpoint, owned by the caller. */
SBN_API int sbn_ckpt_new(sbn_ckpt_t **out);
/* Frees a checkpoint and everything it owns; NULL is a no-op. */
SBN_API void sbn_ckpt_free(sbn_ckpt_t *ck);

/* Adds a copy of layer. Fails without changing ck on a bad or duplicate
 * name (SBN_EINVAL), invalid params (as sbn_layer_create), lengths that
 * differ from sbn_ckpt_lengths() (SBN_ESHAPE), NULL arrays where data is
 * needed, non-increasing group indices, groups without running statistics,
 * a negative num_batches_tracked (SBN_EINVAL), or a cap (SBN_ELIMIT). */
SBN_API int sbn_ckpt_add(sbn_ckpt_t *ck, const sbn_ckpt_layer_t *layer);

/* Number of layers, and the i-th in the order they were added or decoded
 * (NULL if i is out of range). */
SBN_API size_t sbn_ckpt_count(const sbn_ckpt_t *ck);
SBN_API const sbn_ckpt_layer_t *sbn_ckpt_layer(const sbn_ckpt_t *ck, size_t i);
/* The layer named name, or NULL. */
SBN_API const sbn_ckpt_layer_t *sbn_ckpt_find(const sbn_ckpt_t *ck,
                                              const char *name);
/* The group of a layer with the given index, or NULL. */
SBN_API const sbn_ckpt_group_t *sbn_ckpt_group(const sbn_ckpt_layer_t *layer,
                                               uint32_t index);

/* Serializes ck into a new buffer of *len bytes that the caller releases
 * with free(). On failure *buf is NULL and *len 0. */
SBN_API int sbn_ckpt_encode(const sbn_ckpt_t *ck, void **buf, size_t *len);
/* Validates buf completely, then builds a new checkpoint in *out (owned by
 * the caller). On failure *out is NULL and nothing stays allocated. */
SBN_API int sbn_ckpt_decode(const void *buf, size_t len, sbn_ckpt_t **out);

/* Writes ck to path atomically: a temporary file in the same directory is
 * written, fsynced and renamed over path, then the directory is fsynced.
 * A crash or failure leaves either the old file or the new one under path,
 * never a partial one; on failure the temporary file is removed. The file
 * gets mode 0600. I/O failures are SBN_EIO with a message naming the path. */
SBN_API int sbn_ckpt_save(const sbn_ckpt_t *ck, const char *path);
/* Reads and decodes path (SBN_EIO naming the path when it cannot be read,
 * SBN_ELIMIT when it exceeds SBN_CKPT_MAX_FILE, else as decode, with the
 * path in the message). */
SBN_API int sbn_ckpt_load(const char *path, sbn_ckpt_t **out);

/* Checks a checkpoint file name given by a client (a name, not a path):
 * refuses NULL, empty, longer than SBN_CKPT_MAX_FILE_NAME bytes, a leading
 * '.', any '/', any "..", and control characters (bytes below 0x20 and
 * 0x7f). Returns 0 or SBN_EINVAL with a message saying why. */
SBN_API int sbn_ckpt_name_check(const char *name);
/* 1 if sbn_ckpt_name_check() accepts name, else 0; sets no error. */
SBN_API int sbn_ckpt_name_valid(const char *name);

/* CRC-32 (IEEE 802.3, reflected polynomial 0xEDB88320) of len bytes,
 * continuing from crc (start with 0); equals zlib's crc32(). */
SBN_API uint32_t sbn_crc32(uint32_t crc, const void *buf, size_t len);

/* Writes the concatenation of parts to path atomically: a temporary file
 * in the same directory (created with the given mode), then rename(). With
 * durable, the data and the directory entry are fsync'ed too, so a crash
 * leaves the old file or the new one, never a torn one. On failure the old
 * file is untouched and the temporary file removed. Checkpoints of every
 * kind (the service's, the trainer's) and .npy outputs use it. */
SBN_API int sbn_write_file_atomic(const char *path, const void *const *parts,
                                  const size_t *lens, int nparts, unsigned mode,
                                  int durable);

/* The first half of sbn_write_file_atomic, for writers of several files
 * that must appear together: writes the parts to a new temporary file
 * (".sbntmp-XXXXXX" in path's directory, mode mode, fsync'ed with durable)
 * and sets *tmp_out to its name (malloc'ed; the caller renames it over
 * path or unlinks it, then frees it). On failure nothing is left behind
 * and *tmp_out is NULL. */
SBN_API int sbn_write_file_tmp(const char *path, const void *const *parts,
                               const size_t *lens, int nparts, unsigned mode,
                               int durable, char **tmp_out);

/* fsyncs the directory holding path, so that a rename into it is durable
 * (a file system that cannot fsync directories counts as done). */
SBN_API int sbn_fsync_dir_of(const char *path);

/* Opens path for reading only if it is a regular file, without blocking
 * on a FIFO or a device first: *fd_out is a blocking descriptor (the
 * caller closes it), or -1 with SBN_EIO naming path. */
SBN_API int sbn_open_regular(const char *path, int *fd_out);

#ifdef __cplusplus
}
#endif
#endif /* SBN_STATE_H */
