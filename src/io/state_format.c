/* The checkpoint byte format described in sbn_state.h: CRC-32,
 * little-endian fields, encoding and the two-pass decoding. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/sbn_io.h"

/* The format stores exactly eight normalized-shape entries. */
_Static_assert(SBN_MAX_DIMS == 8, "the checkpoint format stores 8 dims");
_Static_assert(sizeof(float) == 4, "binary32 floats");
_Static_assert(sizeof(double) == 8, "binary64 doubles");

static const unsigned char sbn__ckpt_magic[8] = {'S', 'B', 'N', 'C',
                                                 'K', 'P', 'T', 0};

/* Bytes of a layer record after its name and before its arrays. */
#define SBN__LAYER_FIXED 156u
/* Bytes of a group record before its two statistics arrays. */
#define SBN__GROUP_FIXED 16u
#define SBN__TRAILER 4u

/* ------------------------------------------------------------------ */
/* CRC-32 */

/* The table of the reflected polynomial 0xEDB88320: entry i is the CRC
 * register after shifting byte i through it (generated once and checked by
 * the tests against the standard check value of "123456789"). A constant
 * table needs no initialization and so no synchronization. */
static const uint32_t sbn__crc_table[256] = {
    0x00000000u, 0x77073096u, 0xee0e612cu, 0x990951bau, 0x076dc419u,
    0x706af48fu, 0xe963a535u, 0x9e6495a3u, 0x0edb8832u, 0x79dcb8a4u,
    0xe0d5e91eu, 0x97d2d988u, 0x09b64c2bu, 0x7eb17cbdu, 0xe7b82d07u,
    0x90bf1d91u, 0x1db71064u, 0x6ab020f2u, 0xf3b97148u, 0x84be41deu,
    0x1adad47du, 0x6ddde4ebu, 0xf4d4b551u, 0x83d385c7u, 0x136c9856u,
    0x646ba8c0u, 0xfd62f97au, 0x8a65c9ecu, 0x14015c4fu, 0x63066cd9u,
    0xfa0f3d63u, 0x8d080df5u, 0x3b6e20c8u, 0x4c69105eu, 0xd56041e4u,
    0xa2677172u, 0x3c03e4d1u, 0x4b04d447u, 0xd20d85fdu, 0xa50ab56bu,
    0x35b5a8fau, 0x42b2986cu, 0xdbbbc9d6u, 0xacbcf940u, 0x32d86ce3u,
    0x45df5c75u, 0xdcd60dcfu, 0xabd13d59u, 0x26d930acu, 0x51de003au,
    0xc8d75180u, 0xbfd06116u, 0x21b4f4b5u, 0x56b3c423u, 0xcfba9599u,
    0xb8bda50fu, 0x2802b89eu, 0x5f058808u, 0xc60cd9b2u, 0xb10be924u,
    0x2f6f7c87u, 0x58684c11u, 0xc1611dabu, 0xb6662d3du, 0x76dc4190u,
    0x01db7106u, 0x98d220bcu, 0xefd5102au, 0x71b18589u, 0x06b6b51fu,
    0x9fbfe4a5u, 0xe8b8d433u, 0x7807c9a2u, 0x0f00f934u, 0x9609a88eu,
    0xe10e9818u, 0x7f6a0dbbu, 0x086d3d2du, 0x91646c97u, 0xe6635c01u,
    0x6b6b51f4u, 0x1c6c6162u, 0x856530d8u, 0xf262004eu, 0x6c0695edu,
    0x1b01a57bu, 0x8208f4c1u, 0xf50fc457u, 0x65b0d9c6u, 0x12b7e950u,
    0x8bbeb8eau, 0xfcb9887cu, 0x62dd1ddfu, 0x15da2d49u, 0x8cd37cf3u,
    0xfbd44c65u, 0x4db26158u, 0x3ab551ceu, 0xa3bc0074u, 0xd4bb30e2u,
    0x4adfa541u, 0x3dd895d7u, 0xa4d1c46du, 0xd3d6f4fbu, 0x4369e96au,
    0x346ed9fcu, 0xad678846u, 0xda60b8d0u, 0x44042d73u, 0x33031de5u,
    0xaa0a4c5fu, 0xdd0d7cc9u, 0x5005713cu, 0x270241aau, 0xbe0b1010u,
    0xc90c2086u, 0x5768b525u, 0x206f85b3u, 0xb966d409u, 0xce61e49fu,
    0x5edef90eu, 0x29d9c998u, 0xb0d09822u, 0xc7d7a8b4u, 0x59b33d17u,
    0x2eb40d81u, 0xb7bd5c3bu, 0xc0ba6cadu, 0xedb88320u, 0x9abfb3b6u,
    0x03b6e20cu, 0x74b1d29au, 0xead54739u, 0x9dd277afu, 0x04db2615u,
    0x73dc1683u, 0xe3630b12u, 0x94643b84u, 0x0d6d6a3eu, 0x7a6a5aa8u,
    0xe40ecf0bu, 0x9309ff9du, 0x0a00ae27u, 0x7d079eb1u, 0xf00f9344u,
    0x8708a3d2u, 0x1e01f268u, 0x6906c2feu, 0xf762575du, 0x806567cbu,
    0x196c3671u, 0x6e6b06e7u, 0xfed41b76u, 0x89d32be0u, 0x10da7a5au,
    0x67dd4accu, 0xf9b9df6fu, 0x8ebeeff9u, 0x17b7be43u, 0x60b08ed5u,
    0xd6d6a3e8u, 0xa1d1937eu, 0x38d8c2c4u, 0x4fdff252u, 0xd1bb67f1u,
    0xa6bc5767u, 0x3fb506ddu, 0x48b2364bu, 0xd80d2bdau, 0xaf0a1b4cu,
    0x36034af6u, 0x41047a60u, 0xdf60efc3u, 0xa867df55u, 0x316e8eefu,
    0x4669be79u, 0xcb61b38cu, 0xbc66831au, 0x256fd2a0u, 0x5268e236u,
    0xcc0c7795u, 0xbb0b4703u, 0x220216b9u, 0x5505262fu, 0xc5ba3bbeu,
    0xb2bd0b28u, 0x2bb45a92u, 0x5cb36a04u, 0xc2d7ffa7u, 0xb5d0cf31u,
    0x2cd99e8bu, 0x5bdeae1du, 0x9b64c2b0u, 0xec63f226u, 0x756aa39cu,
    0x026d930au, 0x9c0906a9u, 0xeb0e363fu, 0x72076785u, 0x05005713u,
    0x95bf4a82u, 0xe2b87a14u, 0x7bb12baeu, 0x0cb61b38u, 0x92d28e9bu,
    0xe5d5be0du, 0x7cdcefb7u, 0x0bdbdf21u, 0x86d3d2d4u, 0xf1d4e242u,
    0x68ddb3f8u, 0x1fda836eu, 0x81be16cdu, 0xf6b9265bu, 0x6fb077e1u,
    0x18b74777u, 0x88085ae6u, 0xff0f6a70u, 0x66063bcau, 0x11010b5cu,
    0x8f659effu, 0xf862ae69u, 0x616bffd3u, 0x166ccf45u, 0xa00ae278u,
    0xd70dd2eeu, 0x4e048354u, 0x3903b3c2u, 0xa7672661u, 0xd06016f7u,
    0x4969474du, 0x3e6e77dbu, 0xaed16a4au, 0xd9d65adcu, 0x40df0b66u,
    0x37d83bf0u, 0xa9bcae53u, 0xdebb9ec5u, 0x47b2cf7fu, 0x30b5ffe9u,
    0xbdbdf21cu, 0xcabac28au, 0x53b39330u, 0x24b4a3a6u, 0xbad03605u,
    0xcdd70693u, 0x54de5729u, 0x23d967bfu, 0xb3667a2eu, 0xc4614ab8u,
    0x5d681b02u, 0x2a6f2b94u, 0xb40bbe37u, 0xc30c8ea1u, 0x5a05df1bu,
    0x2d02ef8du,
};

uint32_t sbn_crc32(uint32_t crc, const void *buf, size_t len) {
  const unsigned char *p = buf;
  crc = ~crc;
  for (size_t i = 0; i < len; i++)
    crc = sbn__crc_table[(crc ^ p[i]) & 0xff] ^ (crc >> 8);
  return ~crc;
}

/* ------------------------------------------------------------------ */
/* Little-endian fields, independent of the host's byte order. */

static void sbn__put_u32(unsigned char *p, uint32_t v) {
  for (int i = 0; i < 4; i++)
    p[i] = (unsigned char)(v >> (8 * i));
}

static void sbn__put_u64(unsigned char *p, uint64_t v) {
  for (int i = 0; i < 8; i++)
    p[i] = (unsigned char)(v >> (8 * i));
}

static uint32_t sbn__get_u32(const unsigned char *p) {
  uint32_t v = 0;
  for (int i = 0; i < 4; i++)
    v |= (uint32_t)p[i] << (8 * i);
  return v;
}

static uint64_t sbn__get_u64(const unsigned char *p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; i++)
    v |= (uint64_t)p[i] << (8 * i);
  return v;
}

static void sbn__put_f64(unsigned char *p, double d) {
  uint64_t v;
  memcpy(&v, &d, 8);
  sbn__put_u64(p, v);
}

static double sbn__get_f64(const unsigned char *p) {
  uint64_t v = sbn__get_u64(p);
  double d;
  memcpy(&d, &v, 8);
  return d;
}

static void sbn__put_f32s(unsigned char *p, const float *a, size_t n) {
  for (size_t i = 0; i < n; i++) {
    uint32_t v;
    memcpy(&v, &a[i], 4);
    sbn__put_u32(p + 4 * i, v);
  }
}

static void sbn__get_f32s(const unsigned char *p, float *a, size_t n) {
  for (size_t i = 0; i < n; i++) {
    uint32_t v = sbn__get_u32(p + 4 * i);
    memcpy(&a[i], &v, 4);
  }
}

/* ------------------------------------------------------------------ */
/* Encoding */

static size_t sbn__layer_bytes(const sbn_ckpt_layer_t *l) {
  return 4 + strlen(l->name) + SBN__LAYER_FIXED + 8 * l->affine_len +
         l->num_groups * (SBN__GROUP_FIXED + 8 * l->stats_len);
}

int sbn_ckpt_encode(const sbn_ckpt_t *ck, void **buf, size_t *len) {
  if (buf == NULL || len == NULL)
    return sbn_set_error(SBN_EINVAL, "buf: NULL");
  *buf = NULL;
  *len = 0;
  if (ck == NULL)
    return sbn_set_error(SBN_EINVAL, "ck: NULL");
  /* Every layer is capped at add time (at most 2^26 floats per array and
   * 2^16 groups), so each record is below 2^46 bytes; summing at most 2^16
   * of them stays far below SIZE_MAX on 64-bit hosts. The checks keep
   * 32-bit hosts honest. */
  size_t total = SBN_CKPT_HEADER_BYTES + SBN__TRAILER;
  for (size_t i = 0; i < ck->count; i++) {
    size_t b = sbn__layer_bytes(ck->layers[i]);
    if (b > SIZE_MAX - total)
      return sbn_set_error(SBN_EOVERFLOW,
                           "checkpoint: the encoding overflows size_t");
    total += b;
  }
  /* What is written must be loadable: sbn_ckpt_load() refuses files above
   * the cap. */
  if (total > SBN_CKPT_MAX_FILE)
    return sbn_set_error(SBN_ELIMIT,
                         "checkpoint: %zu bytes exceed the cap of %zu", total,
                         SBN_CKPT_MAX_FILE);
  unsigned char *out = malloc(total);
  if (out == NULL)
    return sbn_set_error(SBN_ENOMEM, "checkpoint: out of memory for %zu bytes",
                         total);
  unsigned char *p = out;
  memcpy(p, sbn__ckpt_magic, 8);
  sbn__put_u32(p + 8, SBN_CKPT_VERSION);
  sbn__put_u32(p + 12, 0);
  sbn__put_u32(p + 16, (uint32_t)ck->count);
  sbn__put_u32(p + 20, 0);
  sbn__put_u64(p + 24, (uint64_t)total);
  p += SBN_CKPT_HEADER_BYTES;
  for (size_t i = 0; i < ck->count; i++) {
    const sbn_ckpt_layer_t *l = ck->layers[i];
    const sbn_layer_params_t *pr = &l->params;
    size_t nlen = strlen(l->name);
    sbn__put_u32(p, (uint32_t)nlen);
    memcpy(p + 4, l->name, nlen);
    p += 4 + nlen;
    sbn__put_u32(p, (uint32_t)pr->op);
    sbn__put_u64(p + 4, (uint64_t)pr->channels);
    sbn__put_u64(p + 12, (uint64_t)pr->groups);
    sbn__put_u32(p + 20, (uint32_t)pr->norm_ndim);
    for (int d = 0; d < SBN_MAX_DIMS; d++)
      sbn__put_u64(p + 24 + 8 * d, (uint64_t)pr->norm_shape[d]);
    sbn__put_f64(p + 88, pr->eps);
    sbn__put_f64(p + 96, pr->momentum);
    sbn__put_u32(p + 104, (uint32_t)pr->cumulative);
    sbn__put_u32(p + 108, (uint32_t)pr->affine);
    sbn__put_u32(p + 112, (uint32_t)pr->track_running_stats);
    sbn__put_f64(p + 116, pr->p);
    sbn__put_u32(p + 124, pr->seed);
    sbn__put_u32(p + 128, pr->layer_id);
    sbn__put_u32(p + 132, l->group_size);
    sbn__put_u32(p + 136, (uint32_t)l->num_groups);
    sbn__put_u64(p + 140, (uint64_t)l->affine_len);
    sbn__put_u64(p + 148, (uint64_t)l->stats_len);
    p += SBN__LAYER_FIXED;
    sbn__put_f32s(p, l->weight, l->affine_len);
    p += 4 * l->affine_len;
    sbn__put_f32s(p, l->bias, l->affine_len);
    p += 4 * l->affine_len;
    for (size_t g = 0; g < l->num_groups; g++) {
      const sbn_ckpt_group_t *gr = &l->groups[g];
      sbn__put_u32(p, gr->index);
      sbn__put_u32(p + 4, 0);
      sbn__put_u64(p + 8, (uint64_t)gr->state.num_batches_tracked);
      p += SBN__GROUP_FIXED;
      sbn__put_f32s(p, gr->state.running_mean, l->stats_len);
      p += 4 * l->stats_len;
      sbn__put_f32s(p, gr->state.running_var, l->stats_len);
      p += 4 * l->stats_len;
    }
  }
  sbn__put_u32(p, sbn_crc32(0, out, total - SBN__TRAILER));
  *buf = out;
  *len = total;
  return 0;
}

/* ------------------------------------------------------------------ */
/* Decoding */

/* A cursor over the layer records (between the header and the trailer). */
typedef struct sbn__rd_s {
  const unsigned char *base;
  size_t off; /* absolute offset of the next byte */
  size_t end; /* absolute offset where the layer records end */
} sbn__rd_t;

/* Returns a pointer to the next n bytes and advances, or NULL if fewer
 * remain. */
static const unsigned char *sbn__take(sbn__rd_t *r, size_t n) {
  if (n > r->end - r->off)
    return NULL;
  const unsigned char *p = r->base + r->off;
  r->off += n;
  return p;
}

static int sbn__short(const sbn__rd_t *r, size_t layer, const char *what) {
  return sbn_set_error(SBN_EFORMAT,
                       "checkpoint: layer %zu: %s runs past the end of the "
                       "layer records (offset %zu of %zu)",
                       layer, what, r->off, r->end);
}

/* The part of a layer record before its arrays, as read and checked. */
typedef struct sbn__lrec_s {
  const unsigned char *name;
  uint32_t nlen;
  sbn_layer_params_t params;
  uint32_t group_size;
  uint32_t ngroups;
  size_t alen, slen; /* the array lengths (checked against params) */
} sbn__lrec_t;

/* The name length and name of layer li. */
static int sbn__parse_name(sbn__rd_t *r, size_t li, sbn__lrec_t *h) {
  const unsigned char *p;
  if ((p = sbn__take(r, 4)) == NULL)
    return sbn__short(r, li, "the name length");
  h->nlen = sbn__get_u32(p);
  if (h->nlen == 0 || h->nlen > SBN_CKPT_MAX_NAME)
    return sbn_set_error(SBN_EFORMAT,
                         "checkpoint: layer %zu: name length %u is outside "
                         "[1, %u]",
                         li, h->nlen, SBN_CKPT_MAX_NAME);
  h->name = sbn__take(r, h->nlen);
  if (h->name == NULL)
    return sbn__short(r, li, "the name");
  const char *why = sbn__layer_name_problem(h->name, h->nlen);
  if (why != NULL)
    return sbn_set_error(SBN_EFORMAT, "checkpoint: layer %zu: the name %s", li,
                         why);
  return 0;
}

/* The layer parameters of the fixed part p (SBN__LAYER_FIXED bytes). The
 * name is valid UTF-8 without control characters by now, so messages may
 * quote it (nq, nm). A linear read of the fields, in format order. */
static int sbn__parse_params(const unsigned char *p, int nq, const char *nm,
                             sbn_layer_params_t *pr) {
  memset(pr, 0, sizeof *pr);
  uint32_t op = sbn__get_u32(p);
  if (op >= (uint32_t)SBN_OP_COUNT)
    return sbn_set_error(SBN_EFORMAT, "checkpoint: layer '%.*s': unknown op %u",
                         nq, nm, op);
  pr->op = (sbn_op_t)op;
  uint64_t ch = sbn__get_u64(p + 4), gr = sbn__get_u64(p + 12);
  uint32_t nd = sbn__get_u32(p + 20);
  if (ch > SIZE_MAX || gr > SIZE_MAX)
    return sbn_set_error(SBN_ELIMIT,
                         "checkpoint: layer '%.*s': channels or groups do not "
                         "fit size_t",
                         nq, nm);
  pr->channels = (size_t)ch;
  pr->groups = (size_t)gr;
  if (nd > SBN_MAX_DIMS)
    return sbn_set_error(SBN_EFORMAT,
                         "checkpoint: layer '%.*s': norm_ndim %u is outside "
                         "[0, %d]",
                         nq, nm, nd, SBN_MAX_DIMS);
  pr->norm_ndim = (int)nd;
  for (int d = 0; d < SBN_MAX_DIMS; d++) {
    uint64_t v = sbn__get_u64(p + 24 + 8 * d);
    if (v > SIZE_MAX)
      return sbn_set_error(SBN_ELIMIT,
                           "checkpoint: layer '%.*s': norm_shape[%d] does "
                           "not fit size_t",
                           nq, nm, d);
    pr->norm_shape[d] = (size_t)v;
  }
  pr->eps = sbn__get_f64(p + 88);
  pr->momentum = sbn__get_f64(p + 96);
  uint32_t flags[3] = {sbn__get_u32(p + 104), sbn__get_u32(p + 108),
                       sbn__get_u32(p + 112)};
  static const char *const flag_names[3] = {"cumulative", "affine",
                                            "track_running_stats"};
  for (int k = 0; k < 3; k++)
    if (flags[k] > 1)
      return sbn_set_error(SBN_EFORMAT,
                           "checkpoint: layer '%.*s': %s is %u, not 0 or 1", nq,
                           nm, flag_names[k], flags[k]);
  pr->cumulative = (int)flags[0];
  pr->affine = (int)flags[1];
  pr->track_running_stats = (int)flags[2];
  pr->p = sbn__get_f64(p + 116);
  pr->seed = sbn__get_u32(p + 124);
  pr->layer_id = sbn__get_u32(p + 128);
  return 0;
}

/* The group count and array lengths of the fixed part p against the
 * parameters and the bytes that remain, before any array is touched. */
static int sbn__parse_lengths(const sbn__rd_t *r, const unsigned char *p,
                              int nq, const char *nm, sbn__lrec_t *h) {
  int rc;
  h->group_size = sbn__get_u32(p + 132);
  h->ngroups = sbn__get_u32(p + 136);
  uint64_t alen64 = sbn__get_u64(p + 140), slen64 = sbn__get_u64(p + 148);
  if ((rc = sbn_ckpt_lengths(&h->params, &h->alen, &h->slen)) != 0) {
    char msg[256];
    snprintf(msg, sizeof msg, "%s", sbn_last_error());
    return sbn_set_error(rc == SBN_ELIMIT ? SBN_ELIMIT : SBN_EFORMAT,
                         "checkpoint: layer '%.*s': invalid parameters: %s", nq,
                         nm, msg);
  }
  if (alen64 != h->alen || slen64 != h->slen)
    return sbn_set_error(SBN_EFORMAT,
                         "checkpoint: layer '%.*s': array lengths (affine "
                         "%llu, stats %llu) differ from what its parameters "
                         "imply (%zu, %zu)",
                         nq, nm, (unsigned long long)alen64,
                         (unsigned long long)slen64, h->alen, h->slen);
  if (h->ngroups > SBN_CKPT_MAX_GROUPS)
    return sbn_set_error(SBN_ELIMIT,
                         "checkpoint: layer '%.*s': %u groups exceed the cap "
                         "of %u",
                         nq, nm, h->ngroups, SBN_CKPT_MAX_GROUPS);
  if (h->ngroups > 0 && h->slen == 0)
    return sbn_set_error(SBN_EFORMAT,
                         "checkpoint: layer '%.*s': %u groups, but the layer "
                         "keeps no running statistics",
                         nq, nm, h->ngroups);
  /* The factors are capped, so the products fit in 64 bits. */
  uint64_t need =
      8 * (uint64_t)h->alen +
      (uint64_t)h->ngroups * (SBN__GROUP_FIXED + 8 * (uint64_t)h->slen);
  if (need > r->end - r->off)
    return sbn_set_error(SBN_EFORMAT,
                         "checkpoint: layer '%.*s': its arrays need %llu "
                         "bytes but only %zu remain",
                         nq, nm, (unsigned long long)need, r->end - r->off);
  return 0;
}

/* The group records of a layer whose sizes are checked. With groups ==
 * NULL it only validates; otherwise it fills groups[0 .. ngroups). */
static int sbn__parse_groups(sbn__rd_t *r, int nq, const char *nm,
                             const sbn__lrec_t *h, sbn_ckpt_group_t *groups) {
  uint32_t prev = 0;
  for (uint32_t g = 0; g < h->ngroups; g++) {
    const unsigned char *p = sbn__take(r, SBN__GROUP_FIXED);
    uint32_t index = sbn__get_u32(p);
    uint32_t reserved = sbn__get_u32(p + 4);
    int64_t nbt = (int64_t)sbn__get_u64(p + 8);
    if (g > 0 && index <= prev)
      return sbn_set_error(SBN_EFORMAT,
                           "checkpoint: layer '%.*s': group index %u follows "
                           "%u (indices must increase)",
                           nq, nm, index, prev);
    if (reserved != 0)
      return sbn_set_error(SBN_EFORMAT,
                           "checkpoint: layer '%.*s': group %u: reserved field "
                           "is %u, not 0",
                           nq, nm, index, reserved);
    if (nbt < 0)
      return sbn_set_error(SBN_EFORMAT,
                           "checkpoint: layer '%.*s': group %u: "
                           "num_batches_tracked %lld is negative",
                           nq, nm, index, (long long)nbt);
    prev = index;
    const unsigned char *mean = sbn__take(r, 4 * h->slen);
    const unsigned char *var = sbn__take(r, 4 * h->slen);
    if (groups != NULL) {
      groups[g].index = index;
      groups[g].state.num_batches_tracked = nbt;
      sbn__get_f32s(mean, groups[g].state.running_mean, h->slen);
      sbn__get_f32s(var, groups[g].state.running_var, h->slen);
    }
  }
  return 0;
}

/* Parses one layer record. With build == NULL it only validates; otherwise
 * it allocates the layer and copies the data into *build. The first pass
 * over a buffer runs without build, so nothing is allocated for a buffer
 * that is not valid throughout. */
static int sbn__parse_layer(sbn__rd_t *r, size_t li, sbn_ckpt_layer_t **build) {
  const unsigned char *p;
  sbn__lrec_t h;
  int rc;
  if ((rc = sbn__parse_name(r, li, &h)) != 0)
    return rc;
  int nq = (int)h.nlen;
  const char *nm = (const char *)h.name;
  if ((p = sbn__take(r, SBN__LAYER_FIXED)) == NULL)
    return sbn__short(r, li, "the parameters");
  if ((rc = sbn__parse_params(p, nq, nm, &h.params)) != 0 ||
      (rc = sbn__parse_lengths(r, p, nq, nm, &h)) != 0)
    return rc;

  char *dname = NULL;
  float *w = NULL, *b = NULL;
  sbn_ckpt_group_t *groups = NULL;
  sbn_ckpt_layer_t *l = NULL;
  if (build != NULL) {
    l = sbn__layer_alloc(h.nlen, h.alen, h.slen, h.ngroups, &dname, &w, &b,
                         &groups);
    if (l == NULL)
      return sbn_set_error(SBN_ENOMEM, "checkpoint: out of memory");
    memcpy(dname, h.name, h.nlen);
    dname[h.nlen] = 0;
    l->params = h.params;
    l->group_size = h.group_size;
  }
  p = sbn__take(r, 4 * h.alen);
  if (l != NULL)
    sbn__get_f32s(p, w, h.alen);
  p = sbn__take(r, 4 * h.alen);
  if (l != NULL)
    sbn__get_f32s(p, b, h.alen);
  if ((rc = sbn__parse_groups(r, nq, nm, &h, groups)) != 0)
    goto fail;
  if (build != NULL)
    *build = l;
  return 0;
fail:
  free(l);
  return rc;
}

/* Orders name spans for the duplicate check. */
typedef struct sbn__span_s {
  const unsigned char *p;
  size_t n;
} sbn__span_t;

static int sbn__span_cmp(const void *a, const void *b) {
  const sbn__span_t *x = a, *y = b;
  size_t n = x->n < y->n ? x->n : y->n;
  int c = memcmp(x->p, y->p, n);
  if (c != 0)
    return c;
  return (x->n > y->n) - (x->n < y->n);
}

/* Checks that no two layers share a name. Runs after the validating pass,
 * which has bounded the layer count by the bytes present. */
static int sbn__check_duplicates(const unsigned char *buf, size_t end,
                                 uint32_t count) {
  sbn__span_t *spans = NULL;
  sbn__rd_t r = {buf, SBN_CKPT_HEADER_BYTES, end};
  int rc = 0;
  if (count < 2)
    return 0;
  spans = malloc(count * sizeof *spans);
  if (spans == NULL)
    return sbn_set_error(SBN_ENOMEM, "checkpoint: out of memory");
  for (uint32_t i = 0; i < count; i++) {
    /* The validating pass has accepted this buffer, so the walk over the
     * records cannot fail. */
    size_t start = r.off;
    uint32_t nlen = sbn__get_u32(buf + start);
    spans[i].p = buf + start + 4;
    spans[i].n = nlen;
    (void)sbn__parse_layer(&r, i, NULL);
  }
  qsort(spans, count, sizeof *spans, sbn__span_cmp);
  for (uint32_t i = 1; i < count; i++) {
    if (sbn__span_cmp(&spans[i - 1], &spans[i]) == 0) {
      rc = sbn_set_error(SBN_EFORMAT,
                         "checkpoint: layer name '%.*s' appears twice",
                         (int)spans[i].n, (const char *)spans[i].p);
      break;
    }
  }
  free(spans);
  return rc;
}

int sbn_ckpt_decode(const void *buf, size_t len, sbn_ckpt_t **out) {
  const unsigned char *b = buf;
  sbn_ckpt_t *ck = NULL;
  int rc;
  if (out == NULL)
    return sbn_set_error(SBN_EINVAL, "out: NULL");
  *out = NULL;
  if (buf == NULL && len > 0)
    return sbn_set_error(SBN_EINVAL, "buf: NULL");
  if (len < SBN_CKPT_HEADER_BYTES + SBN__TRAILER)
    return sbn_set_error(SBN_EFORMAT,
                         "checkpoint: truncated: %zu bytes, shorter than the "
                         "%u-byte header and trailer",
                         len, SBN_CKPT_HEADER_BYTES + SBN__TRAILER);
  if (len > SBN_CKPT_MAX_FILE)
    return sbn_set_error(SBN_ELIMIT,
                         "checkpoint: %zu bytes exceed the cap of %zu", len,
                         SBN_CKPT_MAX_FILE);
  if (memcmp(b, sbn__ckpt_magic, 8) != 0)
    return sbn_set_error(SBN_EFORMAT,
                         "checkpoint: bad magic (not a syncbn checkpoint)");
  uint32_t version = sbn__get_u32(b + 8);
  if (version != SBN_CKPT_VERSION)
    return sbn_set_error(SBN_EFORMAT,
                         "checkpoint: unsupported version %u (this build "
                         "reads version %d)",
                         version, SBN_CKPT_VERSION);
  uint32_t flags = sbn__get_u32(b + 12);
  if (flags != 0)
    return sbn_set_error(SBN_EFORMAT, "checkpoint: unknown flags 0x%x", flags);
  if (sbn__get_u32(b + 20) != 0)
    return sbn_set_error(SBN_EFORMAT,
                         "checkpoint: reserved header field is not 0");
  uint64_t file_len = sbn__get_u64(b + 24);
  if (file_len != len)
    return sbn_set_error(SBN_EFORMAT,
                         "checkpoint: %s: the header says %llu bytes, got "
                         "%zu",
                         file_len > len ? "truncated" : "wrong length",
                         (unsigned long long)file_len, len);
  uint32_t want = sbn__get_u32(b + len - SBN__TRAILER);
  uint32_t got = sbn_crc32(0, b, len - SBN__TRAILER);
  if (want != got)
    return sbn_set_error(SBN_EFORMAT,
                         "checkpoint: checksum mismatch (stored 0x%08x, "
                         "computed 0x%08x): the data is corrupt",
                         want, got);
  uint32_t count = sbn__get_u32(b + 16);
  if (count > SBN_CKPT_MAX_LAYERS)
    return sbn_set_error(SBN_ELIMIT,
                         "checkpoint: %u layers exceed the cap of %u", count,
                         SBN_CKPT_MAX_LAYERS);

  /* Pass 1: validate every record without allocating. */
  sbn__rd_t r = {b, SBN_CKPT_HEADER_BYTES, len - SBN__TRAILER};
  for (uint32_t i = 0; i < count; i++)
    if ((rc = sbn__parse_layer(&r, i, NULL)) != 0)
      return rc;
  if (r.off != r.end)
    return sbn_set_error(SBN_EFORMAT,
                         "checkpoint: %zu stray bytes after the last layer",
                         r.end - r.off);
  if ((rc = sbn__check_duplicates(b, r.end, count)) != 0)
    return rc;

  /* Pass 2: build. Only allocation can fail now. */
  if ((rc = sbn_ckpt_new(&ck)) != 0)
    return rc;
  if (count > 0) {
    ck->layers = calloc(count, sizeof *ck->layers);
    if (ck->layers == NULL) {
      rc = sbn_set_error(SBN_ENOMEM, "checkpoint: out of memory");
      goto fail;
    }
    ck->cap = count;
  }
  r.off = SBN_CKPT_HEADER_BYTES;
  for (uint32_t i = 0; i < count; i++) {
    if ((rc = sbn__parse_layer(&r, i, &ck->layers[i])) != 0)
      goto fail;
    ck->count++;
  }
  *out = ck;
  return 0;
fail:
  sbn_ckpt_free(ck);
  return rc;
}
