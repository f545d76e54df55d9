/* The syncbnd wire codec (see svc_codec.h and mpi/service/PROTOCOL.md):
 * names of codes, ops and kinds, the stats reply's vectors and the `want`
 * list that picks them, limits, frames and the pre-scan. The
 * requests are decoded in svc_decode.c, the replies encoded in
 * svc_encode.c. */
#include "svc_codec.h"

#include <msgpack.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const svc__code_names[] = {"OK",
#define SVC__CODE_NAME(name, fatal, msg) #name,
                                              SVC_CODE_MAP(SVC__CODE_NAME)
#undef SVC__CODE_NAME
};

static const unsigned char svc__code_fatal[] = {0,
#define SVC__CODE_FATAL(name, fatal, msg) fatal,
                                                SVC_CODE_MAP(SVC__CODE_FATAL)
#undef SVC__CODE_FATAL
};

const char *svc_code_name(svc_code_t code) {
  if ((unsigned)code >= SVC_CODE_COUNT)
    return "INTERNAL";
  return svc__code_names[code];
}

int svc_code_fatal(svc_code_t code) {
  if ((unsigned)code >= SVC_CODE_COUNT)
    return 1;
  return svc__code_fatal[code];
}

void svc_limits_default(svc_limits_t *lim) {
  lim->max_frame = 256u << 20;
  lim->max_depth = 8;
  lim->max_objects = 4096;
}

static const char *const svc__kind_names[] = {"batchnorm", "syncbatchnorm",
                                              "layernorm", "instancenorm",
                                              "groupnorm", "dropout"};

const char *svc_kind_name(svc_kind_t kind) {
  if ((unsigned)kind >= sizeof svc__kind_names / sizeof *svc__kind_names)
    return NULL;
  return svc__kind_names[kind];
}

static const char *const svc__op_names[] = {
    "hello",     "register",  "forward",         "backward",
    "bye",       "batch",     "stats",           "stats_backward",
    "get_state", "set_state", "checkpoint_save", "checkpoint_load",
    "metrics",   "shm_attach"};

const char *svc_op_name(svc_op_t op) {
  if ((size_t)op >= sizeof svc__op_names / sizeof *svc__op_names)
    return NULL;
  return svc__op_names[op];
}

static const char *const svc__stats_outs[SVC_STATS_OUTS] = {
    "count", "mean", "var", "var_unbiased", "invstd"};

const char *svc_stats_out_name(int i) {
  return i >= 0 && i < SVC_STATS_OUTS ? svc__stats_outs[i] : NULL;
}

/* The index of the stats vector named by o, or -1. */
static int svc__stats_out_of(const msgpack_object *o) {
  for (int i = 0; o->type == MSGPACK_OBJECT_STR && i < SVC_STATS_OUTS; i++)
    if (o->via.str.size == strlen(svc__stats_outs[i]) &&
        memcmp(o->via.str.ptr, svc__stats_outs[i], o->via.str.size) == 0)
      return i;
  return -1;
}

int svc_decode_want(const msgpack_object *o, unsigned *want) {
  *want = SVC_STATS_ALL;
  if (o == NULL)
    return 0;
  if (o->type != MSGPACK_OBJECT_ARRAY)
    return svc_set_error(SVC_BAD_REQUEST,
                         "want: expected an array of names (count, mean, "
                         "var, var_unbiased, invstd)");
  /* Distinct names: more than SVC_STATS_OUTS elements repeat one. */
  *want = 0;
  for (uint32_t i = 0; i < o->via.array.size; i++) {
    int j = svc__stats_out_of(&o->via.array.ptr[i]);
    if (j < 0)
      return svc_set_error(SVC_BAD_REQUEST,
                           "want[%u]: expected one of count, mean, var, "
                           "var_unbiased, invstd",
                           (unsigned)i);
    if (*want & (1u << j))
      return svc_set_error(SVC_BAD_REQUEST, "want[%u]: '%s' repeated",
                           (unsigned)i, svc__stats_outs[j]);
    *want |= 1u << j;
  }
  return 0;
}

/* ------------------------------------------------------------------ */
/* Frames and the pre-scan */

int svc_frame_len(const uint8_t hdr[SVC_HEADER_BYTES], const svc_limits_t *lim,
                  uint32_t *len) {
  uint32_t n = ((uint32_t)hdr[0] << 24) | ((uint32_t)hdr[1] << 16) |
               ((uint32_t)hdr[2] << 8) | (uint32_t)hdr[3];
  if (n == 0)
    return svc_set_error(SVC_BAD_FRAME, "frame: zero length");
  if (n > lim->max_frame)
    return svc_set_error(SVC_FRAME_TOO_LARGE,
                         "frame: length %u exceeds max_frame %u", n,
                         lim->max_frame);
  *len = n;
  return 0;
}

static uint64_t svc__be(const uint8_t *p, int bytes) {
  uint64_t v = 0;
  for (int i = 0; i < bytes; i++)
    v = (v << 8) | p[i];
  return v;
}

/* msgpack-c's own stack is 32 deep; the scan refuses anything deeper than
 * this, whatever the limits say. */
#define SVC__SCAN_DEPTH_MAX 32

/* What a msgpack tag announces: hdr bytes of length or count after it,
 * skip payload bytes, and for a container (1 array, 2 map) its count of
 * child objects. The tags of the format, one after another: a table in
 * code, so it stays long. */
static int svc__tag(uint8_t t, size_t at, int *hdr, uint64_t *skip,
                    uint64_t *count, int *container) {
  if (t <= 0x7f || t >= 0xe0 || t == 0xc0 || t == 0xc2 || t == 0xc3) {
    /* fixint, nil, bool: the tag is the whole object. */
  } else if (t >= 0x80 && t <= 0x8f) {
    *container = 1;
    *count = 2u * (uint64_t)(t & 0x0f);
  } else if (t >= 0x90 && t <= 0x9f) {
    *container = 1;
    *count = t & 0x0f;
  } else if (t >= 0xa0 && t <= 0xbf) {
    *skip = t & 0x1f;
  } else {
    switch (t) {
      case 0xc4:
      case 0xd9:
        *hdr = 1;
        break; /* bin8, str8 */
      case 0xc5:
      case 0xda:
        *hdr = 2;
        break; /* bin16, str16 */
      case 0xc6:
      case 0xdb:
        *hdr = 4;
        break; /* bin32, str32 */
      case 0xc7:
        *hdr = 1;
        *skip = 1;
        break; /* ext8: + type byte */
      case 0xc8:
        *hdr = 2;
        *skip = 1;
        break;
      case 0xc9:
        *hdr = 4;
        *skip = 1;
        break;
      case 0xca:
        *skip = 4;
        break; /* float32 */
      case 0xcb:
        *skip = 8;
        break; /* float64 */
      case 0xcc:
      case 0xd0:
        *skip = 1;
        break;
      case 0xcd:
      case 0xd1:
        *skip = 2;
        break;
      case 0xce:
      case 0xd2:
        *skip = 4;
        break;
      case 0xcf:
      case 0xd3:
        *skip = 8;
        break;
      case 0xd4:
        *skip = 2;
        break; /* fixext: type + data */
      case 0xd5:
        *skip = 3;
        break;
      case 0xd6:
        *skip = 5;
        break;
      case 0xd7:
        *skip = 9;
        break;
      case 0xd8:
        *skip = 17;
        break;
      case 0xdc:
        *hdr = 2;
        *container = 1;
        break; /* array16 */
      case 0xdd:
        *hdr = 4;
        *container = 1;
        break; /* array32 */
      case 0xde:
        *hdr = 2;
        *container = 2;
        break; /* map16 */
      case 0xdf:
        *hdr = 4;
        *container = 2;
        break; /* map32 */
      default:
        return svc_set_error(SVC_MALFORMED,
                             "frame: invalid msgpack tag 0x%02x at byte %zu", t,
                             at);
    }
  }
  return 0;
}

int svc_scan(const uint8_t *p, size_t n, const svc_limits_t *lim) {
  /* left[d]: objects still expected by the container at depth d. */
  uint64_t left[SVC__SCAN_DEPTH_MAX + 1];
  uint32_t max_depth = lim->max_depth;
  uint64_t objects = 0;
  size_t pos = 0;
  int depth = 0, rc;
  if (max_depth > SVC__SCAN_DEPTH_MAX)
    max_depth = SVC__SCAN_DEPTH_MAX;
  if (n == 0)
    return svc_set_error(SVC_MALFORMED, "frame: empty body");
  if (!(p[0] >= 0x80 && p[0] <= 0x8f) && p[0] != 0xde && p[0] != 0xdf)
    return svc_set_error(SVC_MALFORMED,
                         "frame: the root object is not a map (tag 0x%02x)",
                         p[0]);
  left[0] = 1;
  for (;;) {
    size_t at = pos;
    uint8_t t;
    int hdr = 0;        /* bytes of length/count after the tag */
    uint64_t skip = 0;  /* payload bytes */
    uint64_t count = 0; /* child objects of a container */
    int container = 0;
    if (pos >= n)
      return svc_set_error(SVC_MALFORMED,
                           "frame: truncated msgpack at byte %zu", pos);
    t = p[pos++];
    if ((rc = svc__tag(t, at, &hdr, &skip, &count, &container)) != 0)
      return rc;
    if (hdr > 0) {
      uint64_t v;
      if ((size_t)hdr > n - pos)
        return svc_set_error(SVC_MALFORMED,
                             "frame: truncated msgpack header at byte %zu", at);
      v = svc__be(p + pos, hdr);
      pos += (size_t)hdr;
      if (container == 1)
        count = v;
      else if (container == 2)
        count = 2 * v;
      else
        skip += v;
    }
    if (skip > n - pos)
      return svc_set_error(
          SVC_MALFORMED,
          "frame: msgpack object at byte %zu declares %llu bytes, "
          "%zu remain",
          at, (unsigned long long)skip, n - pos);
    pos += (size_t)skip;
    if (++objects > lim->max_objects)
      return svc_set_error(SVC_LIMIT, "frame: more than %u msgpack objects",
                           lim->max_objects);
    /* One object consumed from the enclosing container. */
    left[depth]--;
    if (container && count > 0) {
      /* Every child takes at least one byte, so a count beyond the
       * remaining bytes is a lie; refuse it before anyone allocates. */
      if (count > n - pos)
        return svc_set_error(
            SVC_LIMIT,
            "frame: container at byte %zu declares %llu elements, "
            "%zu bytes remain",
            at, (unsigned long long)count, n - pos);
      if (count > (uint64_t)lim->max_objects)
        return svc_set_error(
            SVC_LIMIT,
            "frame: container at byte %zu declares %llu elements, "
            "more than %u",
            at, (unsigned long long)count, lim->max_objects);
      if ((uint32_t)depth + 1 >= max_depth + 1u)
        return svc_set_error(SVC_LIMIT,
                             "frame: nesting deeper than %u at byte %zu",
                             max_depth, at);
      left[++depth] = count;
      continue;
    }
    while (depth > 0 && left[depth] == 0)
      depth--;
    if (depth == 0 && left[0] == 0)
      break;
  }
  if (pos != n)
    return svc_set_error(SVC_MALFORMED,
                         "frame: %zu bytes after the msgpack map", n - pos);
  return 0;
}
