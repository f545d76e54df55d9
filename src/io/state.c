/* Checkpoints of layer state: the in-memory form (layer names, array
 * lengths, the checkpoint and its layers). The byte format is in
 * io/state_format.c, the files in io/state_file.c. */
#include <stdlib.h>
#include <string.h>

#include "io/sbn_io.h"

/* ------------------------------------------------------------------ */
/* Names */

/* NULL if name is a valid layer name of len bytes, else why not. Layer
 * names are well-formed UTF-8 (no overlong forms, no surrogates, nothing
 * above U+10FFFF) without control characters. */
const char *sbn__layer_name_problem(const unsigned char *s, size_t len) {
  if (len == 0)
    return "is empty";
  if (len > SBN_CKPT_MAX_NAME)
    return "is longer than 255 bytes";
  for (size_t i = 0; i < len;) {
    unsigned c = s[i];
    if (c < 0x20 || c == 0x7f)
      return "contains a control character or NUL";
    if (c < 0x80) {
      i++;
      continue;
    }
    size_t n;
    uint32_t cp, min;
    if ((c & 0xe0) == 0xc0) {
      n = 2, cp = c & 0x1f, min = 0x80;
    } else if ((c & 0xf0) == 0xe0) {
      n = 3, cp = c & 0x0f, min = 0x800;
    } else if ((c & 0xf8) == 0xf0) {
      n = 4, cp = c & 0x07, min = 0x10000;
    } else {
      return "is not valid UTF-8";
    }
    if (len - i < n)
      return "is not valid UTF-8";
    for (size_t k = 1; k < n; k++) {
      if ((s[i + k] & 0xc0) != 0x80)
        return "is not valid UTF-8";
      cp = (cp << 6) | (s[i + k] & 0x3f);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
      return "is not valid UTF-8";
    i += n;
  }
  return NULL;
}

static const char *sbn__file_name_problem(const char *name) {
  if (name == NULL)
    return "is NULL";
  size_t len = strlen(name);
  if (len == 0)
    return "is empty";
  if (len > SBN_CKPT_MAX_FILE_NAME)
    return "is longer than 128 bytes";
  /* A leading '.' also keeps client names apart from the hidden temporary
   * files that sbn_ckpt_save() writes. */
  if (name[0] == '.')
    return "starts with '.'";
  if (strchr(name, '/') != NULL)
    return "contains '/'";
  if (strstr(name, "..") != NULL)
    return "contains '..'";
  for (size_t i = 0; i < len; i++) {
    unsigned char c = (unsigned char)name[i];
    if (c < 0x20 || c == 0x7f)
      return "contains a control character";
  }
  return NULL;
}

int sbn_ckpt_name_check(const char *name) {
  const char *why = sbn__file_name_problem(name);
  if (why != NULL)
    return sbn_set_error(SBN_EINVAL, "checkpoint name: %s", why);
  return 0;
}

int sbn_ckpt_name_valid(const char *name) {
  return sbn__file_name_problem(name) == NULL;
}

/* ------------------------------------------------------------------ */
/* Lengths */

int sbn_ckpt_lengths(const sbn_layer_params_t *params, size_t *affine_len,
                     size_t *stats_len) {
  sbn_layer_t *l = NULL;
  size_t a = 0, s = 0;
  int rc;
  if (params == NULL || affine_len == NULL || stats_len == NULL)
    return sbn_set_error(SBN_EINVAL, "params: NULL");
  /* Creating a layer applies exactly the rules sbn_layer_create() applies,
   * so a checkpoint can never hold a layer that cannot be made. */
  if ((rc = sbn_layer_create(params, NULL, &l)) != 0)
    return rc;
  sbn_layer_destroy(l);
  if (params->norm_ndim < 0 || params->norm_ndim > SBN_MAX_DIMS)
    return sbn_set_error(SBN_EINVAL, "norm_ndim: %d is outside [0, %d]",
                         params->norm_ndim, SBN_MAX_DIMS);
  switch (params->op) {
    case SBN_OP_BATCHNORM:
    case SBN_OP_INSTANCENORM:
    case SBN_OP_GROUPNORM:
      if (params->channels > SBN_CKPT_MAX_ELEMS)
        return sbn_set_error(SBN_ELIMIT,
                             "channels: %zu exceeds the checkpoint cap of %u",
                             params->channels, SBN_CKPT_MAX_ELEMS);
      if (params->affine)
        a = params->channels;
      if (params->op != SBN_OP_GROUPNORM && params->track_running_stats)
        s = params->channels;
      break;
    case SBN_OP_LAYERNORM: {
      /* sbn_layer_create() has checked that the product fits size_t. */
      size_t d = 1;
      for (int i = 0; i < params->norm_ndim; i++)
        d *= params->norm_shape[i];
      if (d > SBN_CKPT_MAX_ELEMS)
        return sbn_set_error(SBN_ELIMIT,
                             "norm_shape: %zu elements exceed the checkpoint "
                             "cap of %u",
                             d, SBN_CKPT_MAX_ELEMS);
      if (params->affine)
        a = d;
      break;
    }
    case SBN_OP_DROPOUT:
    case SBN_OP_COUNT: /* not an op: sbn_layer_create() has rejected it */
      break;
  }
  *affine_len = a;
  *stats_len = s;
  return 0;
}

/* ------------------------------------------------------------------ */
/* The in-memory checkpoint */

/* Bytes of one layer allocation: the view, its groups, weight, bias, the
 * statistics of every group, and the name with its NUL. Every count is
 * capped before this is called, so the sum cannot overflow. */
static size_t sbn__layer_alloc_bytes(size_t name_len, size_t affine_len,
                                     size_t stats_len, size_t num_groups) {
  return sizeof(sbn_ckpt_layer_t) + num_groups * sizeof(sbn_ckpt_group_t) +
         2 * affine_len * sizeof(float) +
         2 * num_groups * stats_len * sizeof(float) + name_len + 1;
}

/* Allocates a layer in one block and points its arrays into the block.
 * The caller fills params, name bytes, arrays and group headers. */
sbn_ckpt_layer_t *sbn__layer_alloc(size_t name_len, size_t affine_len,
                                   size_t stats_len, size_t num_groups,
                                   char **name, float **weight, float **bias,
                                   sbn_ckpt_group_t **groups) {
  size_t bytes =
      sbn__layer_alloc_bytes(name_len, affine_len, stats_len, num_groups);
  unsigned char *mem = calloc(1, bytes);
  if (mem == NULL)
    return NULL;
  sbn_ckpt_layer_t *l = (sbn_ckpt_layer_t *)mem;
  unsigned char *p = mem + sizeof *l;
  *groups = num_groups ? (sbn_ckpt_group_t *)p : NULL;
  p += num_groups * sizeof(sbn_ckpt_group_t);
  float *f = (float *)p;
  *weight = affine_len ? f : NULL;
  *bias = affine_len ? f + affine_len : NULL;
  f += 2 * affine_len;
  for (size_t g = 0; g < num_groups; g++) {
    (*groups)[g].state.running_mean = stats_len ? f : NULL;
    (*groups)[g].state.running_var = stats_len ? f + stats_len : NULL;
    f += 2 * stats_len;
  }
  *name = (char *)f;
  l->name = *name;
  l->affine_len = affine_len;
  l->stats_len = stats_len;
  l->weight = *weight;
  l->bias = *bias;
  l->num_groups = num_groups;
  l->groups = *groups;
  return l;
}

int sbn_ckpt_new(sbn_ckpt_t **out) {
  if (out == NULL)
    return sbn_set_error(SBN_EINVAL, "out: NULL");
  *out = calloc(1, sizeof **out);
  if (*out == NULL)
    return sbn_set_error(SBN_ENOMEM, "checkpoint: out of memory");
  return 0;
}

void sbn_ckpt_free(sbn_ckpt_t *ck) {
  if (ck == NULL)
    return;
  for (size_t i = 0; i < ck->count; i++)
    free(ck->layers[i]);
  free(ck->layers);
  free(ck);
}

size_t sbn_ckpt_count(const sbn_ckpt_t *ck) {
  return ck ? ck->count : 0;
}

const sbn_ckpt_layer_t *sbn_ckpt_layer(const sbn_ckpt_t *ck, size_t i) {
  if (ck == NULL || i >= ck->count)
    return NULL;
  return ck->layers[i];
}

const sbn_ckpt_layer_t *sbn_ckpt_find(const sbn_ckpt_t *ck, const char *name) {
  if (ck == NULL || name == NULL)
    return NULL;
  for (size_t i = 0; i < ck->count; i++)
    if (strcmp(ck->layers[i]->name, name) == 0)
      return ck->layers[i];
  return NULL;
}

const sbn_ckpt_group_t *sbn_ckpt_group(const sbn_ckpt_layer_t *layer,
                                       uint32_t index) {
  if (layer == NULL)
    return NULL;
  /* Indices are strictly increasing, so a binary search finds one. */
  size_t lo = 0, hi = layer->num_groups;
  while (lo < hi) {
    size_t mid = lo + (hi - lo) / 2;
    uint32_t v = layer->groups[mid].index;
    if (v == index)
      return &layer->groups[mid];
    if (v < index)
      lo = mid + 1;
    else
      hi = mid;
  }
  return NULL;
}

/* Makes room for one more layer pointer. */
static int sbn__ckpt_reserve(sbn_ckpt_t *ck) {
  if (ck->count < ck->cap)
    return 0;
  size_t cap = ck->cap ? 2 * ck->cap : 8;
  sbn_ckpt_layer_t **a = realloc(ck->layers, cap * sizeof *a);
  if (a == NULL)
    return sbn_set_error(SBN_ENOMEM, "checkpoint: out of memory");
  ck->layers = a;
  ck->cap = cap;
  return 0;
}

/* Flags are stored as 0 or 1, so the in-memory copy holds what a decode of
 * its encoding gives back. */
static void sbn__canon_params(sbn_layer_params_t *p) {
  p->cumulative = p->cumulative != 0;
  p->affine = p->affine != 0;
  p->track_running_stats = p->track_running_stats != 0;
}

int sbn_ckpt_add(sbn_ckpt_t *ck, const sbn_ckpt_layer_t *in) {
  size_t alen, slen, nlen;
  const char *why;
  int rc;
  if (ck == NULL)
    return sbn_set_error(SBN_EINVAL, "ck: NULL");
  if (in == NULL)
    return sbn_set_error(SBN_EINVAL, "layer: NULL");
  if (in->name == NULL)
    return sbn_set_error(SBN_EINVAL, "layer.name: NULL");
  nlen = strnlen(in->name, SBN_CKPT_MAX_NAME + 1);
  if ((why = sbn__layer_name_problem((const unsigned char *)in->name, nlen)))
    return sbn_set_error(SBN_EINVAL, "layer.name: '%.64s' %s", in->name, why);
  if (sbn_ckpt_find(ck, in->name) != NULL)
    return sbn_set_error(SBN_EINVAL, "layer.name: '%s' is already present",
                         in->name);
  if (ck->count >= SBN_CKPT_MAX_LAYERS)
    return sbn_set_error(SBN_ELIMIT, "checkpoint: more than %u layers",
                         SBN_CKPT_MAX_LAYERS);
  if ((rc = sbn_ckpt_lengths(&in->params, &alen, &slen)) != 0)
    return rc;
  if (in->affine_len != alen)
    return sbn_set_error(SBN_ESHAPE,
                         "layer.affine_len: %zu, but the parameters of '%s' "
                         "need %zu",
                         in->affine_len, in->name, alen);
  if (in->stats_len != slen)
    return sbn_set_error(SBN_ESHAPE,
                         "layer.stats_len: %zu, but the parameters of '%s' "
                         "need %zu",
                         in->stats_len, in->name, slen);
  if (alen > 0 && (in->weight == NULL || in->bias == NULL))
    return sbn_set_error(SBN_EINVAL, "layer.weight: NULL for affine '%s'",
                         in->name);
  if (in->num_groups > SBN_CKPT_MAX_GROUPS)
    return sbn_set_error(SBN_ELIMIT, "layer.num_groups: %zu exceeds %u",
                         in->num_groups, SBN_CKPT_MAX_GROUPS);
  if (in->num_groups > 0 && slen == 0)
    return sbn_set_error(SBN_EINVAL,
                         "layer.num_groups: '%s' keeps no running "
                         "statistics, so it has no groups",
                         in->name);
  if (in->num_groups > 0 && in->groups == NULL)
    return sbn_set_error(SBN_EINVAL, "layer.groups: NULL");
  for (size_t g = 0; g < in->num_groups; g++) {
    const sbn_ckpt_group_t *gr = &in->groups[g];
    if (g > 0 && gr->index <= in->groups[g - 1].index)
      return sbn_set_error(SBN_EINVAL,
                           "layer.groups[%zu].index: %u does not follow %u "
                           "(indices must increase)",
                           g, gr->index, in->groups[g - 1].index);
    if (gr->state.running_mean == NULL || gr->state.running_var == NULL)
      return sbn_set_error(
          SBN_EINVAL, "layer.groups[%zu].state: NULL running statistics", g);
    if (gr->state.num_batches_tracked < 0)
      return sbn_set_error(SBN_EINVAL,
                           "layer.groups[%zu].state.num_batches_tracked: "
                           "%lld is negative",
                           g, (long long)gr->state.num_batches_tracked);
  }
  if ((rc = sbn__ckpt_reserve(ck)) != 0)
    return rc;

  char *name;
  float *w, *b;
  sbn_ckpt_group_t *groups;
  sbn_ckpt_layer_t *l = sbn__layer_alloc(nlen, alen, slen, in->num_groups,
                                         &name, &w, &b, &groups);
  if (l == NULL)
    return sbn_set_error(SBN_ENOMEM, "checkpoint: out of memory");
  memcpy(name, in->name, nlen + 1);
  l->params = in->params;
  sbn__canon_params(&l->params);
  l->group_size = in->group_size;
  if (alen > 0) {
    memcpy(w, in->weight, alen * sizeof *w);
    memcpy(b, in->bias, alen * sizeof *b);
  }
  for (size_t g = 0; g < in->num_groups; g++) {
    groups[g].index = in->groups[g].index;
    groups[g].state.num_batches_tracked =
        in->groups[g].state.num_batches_tracked;
    memcpy(groups[g].state.running_mean, in->groups[g].state.running_mean,
           slen * sizeof(float));
    memcpy(groups[g].state.running_var, in->groups[g].state.running_var,
           slen * sizeof(float));
  }
  ck->layers[ck->count++] = l;
  return 0;
}
