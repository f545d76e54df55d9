/* Every optimized kernel set against "ref" on the shapes where vector code
 * goes wrong: channel counts and spatial sizes around and between
 * multiples of 8 and 16, in both layouts, for every normalization op, plus
 * guard elements after every output to catch tail overruns; wide and odd
 * channel counts (1, 3, 17, 1000) on unaligned pointers; channels-last
 * rows of several register tiles and samples large enough to stream. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "testutil.h"

#include "kernels_cmp.h"

static void test_sets_vs_ref(void **state) {
  (void)state;
  const char *const *sets;
  int nsets = tu_kernel_sets(&sets);
  /* 48: GroupNorm NHWC groups of 16 channels, summed as short runs. */
  const size_t Cs[] = {1, 3, 7, 8, 9, 15, 16, 17, 24, 31, 33, 48};
  const size_t Ss[] = {1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 33, 67};
  const sbn_op_t ops[] = {SBN_OP_BATCHNORM, SBN_OP_INSTANCENORM,
                          SBN_OP_GROUPNORM, SBN_OP_LAYERNORM};
  const char *opn[] = {"bn", "in", "gn", "ln"};
  int compared = 0;
  for (int ks = 0; ks < nsets; ks++) {
    if (strcmp(sets[ks], "ref") == 0)
      continue;
    if (sbn_kernel_select(sets[ks]) == SBN_ENOTSUP) {
      printf("# SKIP kernel set '%s': %s\n", sets[ks], sbn_last_error());
      continue;
    }
    compared++;
    for (int io = 0; io < 4; io++)
      for (int lay = 0; lay < 2; lay++)
        for (size_t ic = 0; ic < sizeof Cs / sizeof *Cs; ic++)
          for (size_t is = 0; is < sizeof Ss / sizeof *Ss; is++)
            for (int mode = 0; mode < 2; mode++) {
              size_t N = 3 + (ic + is) % 3, C = Cs[ic], S = Ss[is];
              /* Training InstanceNorm needs two spatial elements; LN has
               * one layout. */
              if (ops[io] == SBN_OP_INSTANCENORM && S == 1 && mode == 0)
                continue;
              if (ops[io] == SBN_OP_LAYERNORM && lay == 1)
                continue;
              char what[128];
              snprintf(what, sizeof what, "%s %s %s N=%zu C=%zu S=%zu %s",
                       sets[ks], opn[io], lay ? "NHWC" : "NCHW", N, C, S,
                       mode ? "eval" : "train");
              outs_t a, b;
              assert_int_equal(sbn_kernel_select("ref"), 0);
              run_op(ops[io], (sbn_layout_t)lay, N, C, S, (sbn_mode_t)mode, &a,
                     what);
              assert_int_equal(sbn_kernel_select(sets[ks]), 0);
              run_op(ops[io], (sbn_layout_t)lay, N, C, S, (sbn_mode_t)mode, &b,
                     what);
              compare_outs(ops[io], opn[io], N, C, S, &a, &b, what);
              free_outs(&a);
              free_outs(&b);
            }
  }
  printf("# compared %d optimized kernel set(s) with ref\n", compared);
  sbn_kernel_select("ref");
}

/* Wide and odd channel counts (C = 1000 needs more than one vector row of
 * parameters per position), enough rows that the float partial sums are
 * folded into double many times, and x, dy, y, dx 1 or 3 floats past
 * what malloc returns, so that no vector access may assume alignment.
 * Each set is compared with ref run on the same data at offset 0. */
static void test_wide_unaligned(void **state) {
  (void)state;
  const char *const *sets;
  int nsets = tu_kernel_sets(&sets);
  /* 1500: LayerNorm rows long enough to be pipelined row by row. */
  const size_t Cs[] = {1, 3, 17, 1000, 1500};
  /* 49 and 196: NCHW planes of 7x7 and 14x14, summed 16 channels at a
   * time with a tail block of C % 16 channels. */
  const size_t Ss[] = {1, 5, 19, 49, 196};
  const sbn_op_t ops[] = {SBN_OP_BATCHNORM, SBN_OP_INSTANCENORM,
                          SBN_OP_GROUPNORM, SBN_OP_LAYERNORM};
  const char *opn[] = {"bn", "in", "gn", "ln"};
  for (int ks = 0; ks < nsets; ks++) {
    if (strcmp(sets[ks], "ref") == 0 || tu_kernel_use(sets[ks]) != 0)
      continue;
    for (int io = 0; io < 4; io++)
      for (int lay = 0; lay < 2; lay++)
        for (size_t ic = 0; ic < sizeof Cs / sizeof *Cs; ic++)
          for (size_t is = 0; is < sizeof Ss / sizeof *Ss; is++) {
            size_t C = Cs[ic], S = Ss[is], off = 1 + 2 * (is % 2);
            /* About 40k elements, at least 2 per channel and sample. */
            size_t N = 40000 / (C * S) + 2;
            if (ops[io] == SBN_OP_INSTANCENORM && S == 1)
              continue;
            if (ops[io] == SBN_OP_LAYERNORM && lay == 1)
              continue;
            char what[128];
            snprintf(what, sizeof what, "%s %s %s N=%zu C=%zu S=%zu off=%zu",
                     sets[ks], opn[io], lay ? "NHWC" : "NCHW", N, C, S, off);
            vs_ref(sets[ks], ops[io], opn[io], (sbn_layout_t)lay, N, C, S,
                   SBN_MODE_TRAIN, off, what);
          }
  }
  /* Outputs of 4 MiB and more are streamed, after a masked head up to the
   * first cache line (x, dy, y and dx 1 and 3 floats off here): BatchNorm
   * in both layouts, LayerNorm's rows, and the NCHW blocks of
   * InstanceNorm and GroupNorm (slices of a large output). */
  static const struct {
    sbn_op_t op;
    sbn_layout_t ly;
    const char *name;
  } big[] = {{SBN_OP_BATCHNORM, SBN_LAYOUT_NCHW, "bn"},
             {SBN_OP_BATCHNORM, SBN_LAYOUT_NHWC, "bn"},
             {SBN_OP_LAYERNORM, SBN_LAYOUT_NCHW, "ln"},
             {SBN_OP_INSTANCENORM, SBN_LAYOUT_NCHW, "in"},
             {SBN_OP_GROUPNORM, SBN_LAYOUT_NCHW, "gn"}};
  for (int ks = 0; ks < nsets; ks++) {
    if (strcmp(sets[ks], "ref") == 0 || tu_kernel_use(sets[ks]) != 0)
      continue;
    for (size_t ib = 0; ib < sizeof big / sizeof *big; ib++)
      for (size_t off = 1; off <= 3; off += 2) {
        sbn_op_t op = big[ib].op;
        sbn_layout_t ly = big[ib].ly;
        char what[128];
        snprintf(what, sizeof what, "%s %s %s N=16 C=64 S=1024 off=%zu",
                 sets[ks], big[ib].name,
                 ly == SBN_LAYOUT_NHWC ? "NHWC" : "NCHW", off);
        vs_ref(sets[ks], op, big[ib].name, ly, 16, 64, 1024, SBN_MODE_TRAIN,
               off, what);
      }
  }
  /* NCHW short runs in outputs of 4 MiB and more, whose normalize streams
   * along flat rows (kernels_avx512_short.c): runs of 196, 49 and 17
   * values that start and end inside vectors, odd C, and x, dy, y, dx 1
   * and 3 floats off alignment, so that the head of each row, the vectors
   * that straddle two channels and the row's tail are all taken. */
  static const size_t shortrun[][3] = {
      {16, 333, 196}, {24, 1001, 49}, {16, 3855, 17}};
  for (int ks = 0; ks < nsets; ks++) {
    if (strcmp(sets[ks], "ref") == 0 || tu_kernel_use(sets[ks]) != 0)
      continue;
    for (size_t i = 0; i < sizeof shortrun / sizeof *shortrun; i++)
      for (size_t off = 1; off <= 3; off += 2) {
        size_t N = shortrun[i][0], C = shortrun[i][1], S = shortrun[i][2];
        char what[128];
        snprintf(what, sizeof what, "%s bn NCHW N=%zu C=%zu S=%zu off=%zu",
                 sets[ks], N, C, S, off);
        vs_ref(sets[ks], SBN_OP_BATCHNORM, "bn", SBN_LAYOUT_NCHW, N, C, S,
               SBN_MODE_TRAIN, off, what);
      }
  }
  sbn_kernel_select("ref");
}

/* Channels-last shapes for the register-tile passes of the optimized sets
 * (kernels_avx512_nhwc.c): rows of several tiles with and without a partial
 * last vector (C = 48 .. 1000; C = 272 is the period of 17 channels;
 * C = 300 and 600 have a partial last vector after two and four tiles;
 * C = 2100 is more than one piece of 2048 positions), GroupNorm groups of
 * 16, 32 and 64 channels (short runs in the group view, beside the channel
 * view's rows), samples of over 256 KiB (whose outputs stream after a
 * masked head) and x, dy, y, dx 1 or 3 floats off alignment. */
static void test_channels_last_tiles(void **state) {
  (void)state;
  const char *const *sets;
  int nsets = tu_kernel_sets(&sets);
  const size_t Cs[] = {48, 96, 192, 256, 272, 300, 600, 1000, 1024, 2100};
  const sbn_op_t ops[] = {SBN_OP_BATCHNORM, SBN_OP_INSTANCENORM,
                          SBN_OP_GROUPNORM};
  const char *opn[] = {"bn", "in", "gn"};
  for (int ks = 0; ks < nsets; ks++) {
    if (strcmp(sets[ks], "ref") == 0 || tu_kernel_use(sets[ks]) != 0)
      continue;
    for (int io = 0; io < 3; io++)
      for (size_t ic = 0; ic < sizeof Cs / sizeof *Cs; ic++)
        for (int mode = 0; mode < 2; mode++) {
          /* About 70k elements (280 KB) per sample, two samples. */
          size_t C = Cs[ic], S = 70000 / C + 1, N = 2, off = 1 + 2 * (ic % 2);
          char what[128];
          snprintf(what, sizeof what, "%s %s NHWC N=%zu C=%zu S=%zu off=%zu %s",
                   sets[ks], opn[io], N, C, S, off, mode ? "eval" : "train");
          vs_ref(sets[ks], ops[io], opn[io], SBN_LAYOUT_NHWC, N, C, S,
                 (sbn_mode_t)mode, off, what);
        }
  }
  sbn_kernel_select("ref");
}

/* Channels-last moments over 8 MiB or more (kernels_avx512_nhwc.c's
 * CL_COLD_BYTES), which read rows in memory order: one row a sweep (C =
 * 300), eight (C = 1000, 2100: two pieces), GroupNorm's laid out per
 * position (C = 600 in groups of 200), row counts that leave partial
 * blocks and sweeps, x 1 or 3 floats off alignment; C = 256 and 1024
 * (rows of whole vectors over 4 MiB) also take the flat normalize
 * (kernels_avx512_nhwc.c's CL_FLAT_ELEMS). (InstanceNorm's one
 * sample of N = 1 is BatchNorm's view.) Training forward only: backward
 * never sweeps. */
static void test_channels_last_sweeps(void **state) {
  (void)state;
  const char *const *sets;
  int nsets = tu_kernel_sets(&sets);
  const struct {
    sbn_op_t op;
    const char *name;
    size_t C, S;
  } cases[] = {{SBN_OP_BATCHNORM, "bn", 300, 7013},
               {SBN_OP_BATCHNORM, "bn", 1000, 2107},
               {SBN_OP_BATCHNORM, "bn", 2100, 1003},
               {SBN_OP_GROUPNORM, "gn", 600, 3511},
               {SBN_OP_BATCHNORM, "bn", 256, 8213},
               {SBN_OP_BATCHNORM, "bn", 1024, 1031}};
  for (int ks = 0; ks < nsets; ks++) {
    if (strcmp(sets[ks], "ref") == 0 || tu_kernel_use(sets[ks]) != 0)
      continue;
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
      size_t C = cases[i].C, S = cases[i].S, off = 1 + 2 * (i % 2);
      char what[128];
      snprintf(what, sizeof what, "%s %s NHWC N=1 C=%zu S=%zu off=%zu",
               sets[ks], cases[i].name, C, S, off);
      vs_ref(sets[ks], cases[i].op, cases[i].name, SBN_LAYOUT_NHWC, 1, C, S,
             SBN_MODE_TRAIN, off, what);
    }
  }
  sbn_kernel_select("ref");
}

/* Training on NHWC (N, C, S) of each op for each (C, S) of shapes, with
 * every optimized set against ref, x, dy, y and dx offs[k] floats off
 * alignment: every offset for each shape (every), or the shapes taking
 * the offsets in turn. */
static void nhwc_vs_ref(const sbn_op_t *ops, const char *const *opn, int nops,
                        const size_t (*shapes)[2], size_t ns, size_t N,
                        const size_t *offs, size_t noffs, int every) {
  const char *const *sets;
  int nsets = tu_kernel_sets(&sets);
  for (int ks = 0; ks < nsets; ks++) {
    if (strcmp(sets[ks], "ref") == 0 || tu_kernel_use(sets[ks]) != 0)
      continue;
    for (int io = 0; io < nops; io++)
      for (size_t i = 0; i < ns; i++)
        for (size_t k = 0; k < (every ? noffs : 1); k++) {
          size_t C = shapes[i][0], S = shapes[i][1];
          size_t off = every ? offs[k] : offs[i % noffs];
          char what[128];
          snprintf(what, sizeof what, "%s %s NHWC N=%zu C=%zu S=%zu off=%zu",
                   sets[ks], opn[io], N, C, S, off);
          vs_ref(sets[ks], ops[io], opn[io], SBN_LAYOUT_NHWC, N, C, S,
                 SBN_MODE_TRAIN, off, what);
        }
  }
  sbn_kernel_select("ref");
}

/* InstanceNorm and GroupNorm training on NHWC (N, C, S) for each (C, S)
 * of shapes, 1 or 3 floats off alignment (alternately). */
static void in_gn_nhwc_vs_ref(const size_t (*shapes)[2], size_t ns, size_t N) {
  static const sbn_op_t ops[] = {SBN_OP_INSTANCENORM, SBN_OP_GROUPNORM};
  static const char *const opn[] = {"in", "gn"};
  static const size_t offs[] = {1, 3};
  nhwc_vs_ref(ops, opn, 2, shapes, ns, N, offs, 2, 0);
}

/* Channels-last samples whose x and dy fit half of a 1 MiB L2 but whose
 * x, dy and dx do not (400 KB per tensor): the wide position view streams
 * dx there (kernels_avx512.c's pos_apply_nt), from an unaligned head.
 * Rows of 1000 (one piece) and 2048 (one periodic row) channels. */
static void test_channels_last_stream_dx(void **state) {
  (void)state;
  /* S = 100000 / C. */
  static const size_t shapes[][2] = {{1000, 100}, {2048, 48}};
  in_gn_nhwc_vs_ref(shapes, 2, 2);
}

/* BatchNorm channels-last dx on both sides of the position view's
 * streaming threshold (kernels_avx512.c's pos_apply_nt: x, dy and dx
 * together over half of the core's L2): tensors of 16 to 32 KB, stored
 * normally on any L2 of 192 KiB or more, and of 1.6 MB (C = 128, 256, 512,
 * 1000 and 2048, the last the wide rows of pos_apply_wide), streamed on any
 * L2 up to 9 MiB, below want_nt's 4 MiB; C = 1000 and 2048 over 16 rows
 * fall on either side depending on the L2. Offsets of 1 and 12 floats: a
 * masked head before dx's first line, and none. */
static void test_channels_last_dx_l2(void **state) {
  (void)state;
  static const size_t shapes[][2] = {{128, 16},  {256, 16},   {1000, 16},
                                     {2048, 16}, {128, 1600}, {256, 800},
                                     {512, 400}, {1000, 200}, {2048, 100}};
  static const size_t offs[] = {1, 12};
  static const sbn_op_t ops[] = {SBN_OP_BATCHNORM};
  static const char *const opn[] = {"bn"};
  nhwc_vs_ref(ops, opn, 1, shapes, sizeof shapes / sizeof *shapes, 2, offs, 2,
              1);
}

/* Channels-last dx of the optimized sets' backward in the shapes whose
 * stores stream or whose rows are taken a few at a time: register-tile
 * rows (C = 1, 3, 16, 64; kernels_avx512_nhwc.c's cl_apply) in samples
 * of over 256 KiB, and rows wider than 1024 positions (C = 1500 with a
 * partial last vector, 2048, and 2100 in two pieces; kernels_avx512.c's
 * piece_bwd_sums and pos_apply_wide) over 49, 70 and 37 rows, which leave
 * a short last block of rows; flat rows whose backward sums start at x's
 * first line (C = 17: periods of 272, 1000; cl_sums_flat, pos_bwd_flat),
 * over 4 MiB (dx streamed and prefetched) and under 16 rows (not
 * rotated). Offsets of 1 and 12 floats: a masked head before the first
 * line, and (with glibc's 16-byte header on the large buffers it maps)
 * no head at all, so both the streamed and the plain store paths run. */
static void test_channels_last_stream_rows(void **state) {
  (void)state;
  static const size_t shapes[][2] = {
      {1, 70001}, {3, 23334}, {16, 4376},  {64, 1094}, {1500, 70},
      {2048, 49}, {2100, 37}, {17, 31001}, {1000, 21}, {1000, 7}};
  static const size_t offs[] = {1, 12};
  static const sbn_op_t ops[] = {SBN_OP_BATCHNORM, SBN_OP_INSTANCENORM,
                                 SBN_OP_GROUPNORM};
  static const char *const opn[] = {"bn", "in", "gn"};
  nhwc_vs_ref(ops, opn, 3, shapes, sizeof shapes / sizeof *shapes, 2, offs, 2,
              1);
}

/* The channels-last training forward of a sample in one call
 * (kernels_avx512_clfwd.c): three samples, so that the first is read from
 * memory and swept, and the later ones were prefetched by the one before
 * (samples of at most 512 KiB and 1024 channels) and take the register
 * tiles (rows of at most 512); outputs of 256 KiB and more, which stream
 * after a masked head; C = 1, 3 and 17 (vectors that wrap from the last
 * channel to the first), 1000 (rows that start inside a line) and 2048;
 * GroupNorm in 3 groups where 3 divides C (groups of 1, 16 and 341
 * channels: the position view and short runs; one group otherwise, which
 * the op takes itself); and x, y 1 or 3 floats off
 * alignment. 2048 x 60 positions is a sample over the prefetch's limit. */
static void test_channels_last_fused(void **state) {
  (void)state;
  static const size_t shapes[][2] = {{1, 40001}, {3, 12001}, {17, 2003},
                                     {48, 700},  {64, 333},  {1000, 37},
                                     {1023, 49}, {2048, 7},  {2048, 60}};
  in_gn_nhwc_vs_ref(shapes, sizeof shapes / sizeof *shapes, 3);
}

/* The channels-last training backward of a sample in one call
 * (kernels_avx512_clbwd.c), three samples each: C = 1 and 3 (declined: rows
 * narrower than a vector), 16, 17 and 51 (a masked last vector per row), 48
 * (GroupNorm's groups of 16), 1000 (one group), 1002 and 1023 (groups of 334
 * and 341), 2048 over 35 and 36 positions (the largest samples its L2 rule
 * takes at a 1 MiB L2), 37, 64 (512 KiB: the largest its L3 rule takes at a 32
 * MiB L3) and 521 (4.3 MB, just over a 64th of a 260 MiB L3: declined), and
 * rows of 64 and 128 channels over 1500 and 750 positions (384 KiB: the L3 rule
 * declines rows under 128 channels); so each side of both rules runs on a 1 MiB
 * L2 with a 32 MiB L3 and on a 2 MiB L2 with a 260 MiB L3; positions that leave
 * a short last block of rows and an odd row; outputs under 256 KiB (plain
 * stores) and over (streamed, masked head and tail); x, dy and dx 1 or 3 floats
 * off alignment; 1002 x 19 has InstanceNorm statistics of 19 values (declined,
 * dx in double). */
static void test_channels_last_bwd_fused(void **state) {
  (void)state;
  static const size_t shapes[][2] = {
      {1, 401},   {3, 45},     {16, 33},   {17, 2003}, {48, 701},  {51, 333},
      {1000, 37}, {1002, 19},  {1023, 49}, {2048, 35}, {2048, 36}, {2048, 37},
      {2048, 64}, {2048, 521}, {64, 1500}, {128, 750}};
  in_gn_nhwc_vs_ref(shapes, sizeof shapes / sizeof *shapes, 3);
}

/* The name reported matches the selection, and the automatic choice is one
 * of the known sets. */
static void test_names(void **state) {
  (void)state;
  const char *const *sets;
  int nsets = tu_kernel_sets(&sets), known = 0;
  const char *autoname = sbn_kernel_name();
  for (int i = 0; i < nsets; i++)
    known |= strcmp(autoname, sets[i]) == 0;
  if (!known)
    fail_msg("automatic kernel set '%s' is not tested here", autoname);
  for (int i = 0; i < nsets; i++) {
    if (sbn_kernel_select(sets[i]) != 0)
      continue;
    assert_string_equal(sbn_kernel_name(), sets[i]);
  }
  /* "auto" returns to the automatic choice; an unknown name is refused
   * with its name in the message and changes nothing. */
  assert_int_equal(sbn_kernel_select("ref"), 0);
  assert_int_equal(sbn_kernel_select("auto"), 0);
  assert_string_equal(sbn_kernel_name(), autoname);
  assert_int_equal(sbn_kernel_select("sse9"), SBN_ENOTSUP);
  if (strstr(sbn_last_error(), "'sse9'") == NULL)
    fail_msg("error message '%s' does not name the set", sbn_last_error());
  assert_string_equal(sbn_kernel_name(), autoname);
  sbn_kernel_select("ref");
}

/* NCHW and NHWC agree after transposing, for every op with channels and
 * every kernel set (the two layouts take different kernel paths). */
static void test_layout_agreement(void **state) {
  (void)state;
  const char *const *sets;
  int nsets = tu_kernel_sets(&sets);
  const sbn_op_t ops[] = {SBN_OP_BATCHNORM, SBN_OP_INSTANCENORM,
                          SBN_OP_GROUPNORM};
  const size_t N = 3, C = 18, H = 5, W = 7, n = N * C * H * W;
  sbn_tensor_desc_t dc = tu_desc(SBN_LAYOUT_NCHW, 4, N, C, H, W);
  sbn_tensor_desc_t dh = dc;
  dh.layout = SBN_LAYOUT_NHWC;
  for (int ks = 0; ks < nsets; ks++) {
    if (tu_kernel_use(sets[ks]))
      continue;
    for (int io = 0; io < 3; io++) {
      tu_rng_t rng;
      tu_rng_seed(&rng, 77 + (uint64_t)io);
      float *x = tu_floats(n), *dy = tu_floats(n), *xh = tu_floats(n),
            *dyh = tu_floats(n), *y1 = tu_floats(n), *dx1 = tu_floats(n),
            *y2 = tu_floats(n), *dx2 = tu_floats(n), *t = tu_floats(n);
      float w[18], b[18], dw1[18], db1[18], dw2[18], db2[18];
      float rm1[18], rv1[18], rm2[18], rv2[18];
      tu_fill_normal(&rng, x, n, -2, 3);
      tu_fill_normal(&rng, dy, n, 0, 1);
      tu_fill_normal(&rng, w, C, 1, 0.3);
      tu_fill_normal(&rng, b, C, 0, 0.3);
      for (size_t c = 0; c < C; c++)
        rm1[c] = rm2[c] = 0, rv1[c] = rv2[c] = 1;
      tu_nchw_to_nhwc(&dc, x, xh);
      tu_nchw_to_nhwc(&dc, dy, dyh);
      sbn_layer_params_t p;
      sbn_layer_params_default(&p, ops[io]);
      p.channels = C;
      p.groups = 6;
      p.track_running_stats = ops[io] != SBN_OP_GROUPNORM;
      sbn_layer_t *l = tu_layer(&p, NULL);
      sbn_state_t s1 = {rm1, rv1, 0}, s2 = {rm2, rv2, 0};
      sbn_state_t *p1 = p.track_running_stats ? &s1 : NULL;
      sbn_state_t *p2 = p.track_running_stats ? &s2 : NULL;
      tu_run_t r1 = {
          SBN_MODE_TRAIN, &dc, x, w, b, dy, y1, dx1, dw1, db1, p1, 0};
      tu_run_t r2 = {
          SBN_MODE_TRAIN, &dh, xh, w, b, dyh, y2, dx2, dw2, db2, p2, 0};
      TU_ASSERT_RC(tu_run(l, &r1, NULL), 0);
      TU_ASSERT_RC(tu_run(l, &r2, NULL), 0);
      const char *on = sbn_op_name(ops[io]);
      tu_nhwc_to_nchw(&dc, y2, t);
      TU_ASSERT_REL(tu_rel_l2_ff(t, y1, n), 1e-6, "[%s] %s NHWC vs NCHW y",
                    sets[ks], on);
      tu_nhwc_to_nchw(&dc, dx2, t);
      TU_ASSERT_REL(tu_rel_l2_ff(t, dx1, n), 1e-5, "[%s] %s NHWC vs NCHW dx",
                    sets[ks], on);
      TU_ASSERT_REL(tu_rel_l2_ff(dw2, dw1, C), 1e-5, "[%s] %s dweight",
                    sets[ks], on);
      TU_ASSERT_REL(tu_rel_l2_ff(db2, db1, C), 1e-6, "[%s] %s dbias", sets[ks],
                    on);
      TU_ASSERT_REL(tu_rel_l2_ff(rm2, rm1, C), 1e-6, "[%s] %s running_mean",
                    sets[ks], on);
      TU_ASSERT_REL(tu_rel_l2_ff(rv2, rv1, C), 1e-6, "[%s] %s running_var",
                    sets[ks], on);
      sbn_layer_destroy(l);
      free(x), free(dy), free(xh), free(dyh), free(y1), free(dx1), free(y2);
      free(dx2), free(t);
    }
  }
  sbn_kernel_select("ref");
}

/* The record merge (sbn_rec_combine, run by every reduction) gives the
 * reference's bits in every set, on every length (a set takes eight
 * records at a time, then a tail), with a zero count on either side, a
 * count of 1, sum records, a mean near 1e4 and values that are not
 * finite; it leaves the records past n alone, and, on finite records,
 * combine(a, b) and combine(b, a) are the same bits. */
static void test_rec_combine_sets(void **state) {
  (void)state;
  enum { N = 75 };
  static sbn_rec_t a[N], b[N], r[N], s[N], t[N];
  const char *const *sets;
  int nsets = tu_kernel_sets(&sets), finite[N];
  uint64_t x = 88172645463325252ull;
  for (size_t i = 0; i < N; i++) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    int kind = (int)(x % 9);
    a[i].tag = b[i].tag = kind == 0 ? SBN_REC_SUM : SBN_REC_MOMENTS;
    a[i].v[0] = kind == 1 ? 0 : (double)(1 + x % 1000);
    b[i].v[0] = kind == 2 ? 0 : kind == 3 ? 1 : (double)(1 + (x >> 20) % 5000);
    a[i].v[1] = 1e4 + (double)(x % 977) / 7.0;
    b[i].v[1] = -3.0 + (double)((x >> 30) % 1013) / 11.0;
    a[i].v[2] = (double)((x >> 10) % 10007) / 3.0;
    b[i].v[2] = (double)((x >> 40) % 7919) * 1.7;
    a[i].v[1] = kind == 4 ? NAN : a[i].v[1];
    b[i].v[2] = kind == 5 ? INFINITY : b[i].v[2];
    finite[i] = kind != 4 && kind != 5;
  }
  for (int ks = 0; ks < nsets; ks++) {
    if (strcmp(sets[ks], "ref") == 0)
      continue;
    if (sbn_kernel_select(sets[ks]) == SBN_ENOTSUP)
      continue;
    for (size_t n = 0; n <= N; n++) {
      memcpy(r, b, sizeof b);
      memcpy(s, b, sizeof b);
      memcpy(t, a, sizeof a);
      assert_int_equal(sbn_kernel_select("ref"), 0);
      sbn_rec_combine(a, r, n);
      assert_int_equal(sbn_kernel_select(sets[ks]), 0);
      sbn_rec_combine(a, s, n);
      sbn_rec_combine(b, t, n);
      for (size_t i = 0; i < N; i++) {
        if (memcmp(&r[i], &s[i], sizeof r[i]) != 0 ||
            (i < n && finite[i] && memcmp(&s[i], &t[i], sizeof s[i]) != 0))
          fail_msg(
              "%s: record %zu of %zu differs (ref %.17g %.17g %.17g, "
              "set %.17g %.17g %.17g, swapped %.17g %.17g %.17g)",
              sets[ks], i, n, r[i].v[0], r[i].v[1], r[i].v[2], s[i].v[0],
              s[i].v[1], s[i].v[2], t[i].v[0], t[i].v[1], t[i].v[2]);
      }
    }
  }
  sbn_kernel_select("ref");
}

/* The values a normalization takes from reduced records, and the running
 * statistics' move, must be the reference's bits in every set (ranks of
 * the service may run different sets): every value, on every length
 * around the vector width, with counts of 0, 1 and 2, NaN and infinity. */
static void test_rec_stat_sets(void **state) {
  (void)state;
  enum { N = 75 };
  static sbn_rec_t r[N];
  static double o1[N + 1], o2[N + 1];
  static float m1[N], v1[N], m2[N], v2[N];
  const char *const *sets;
  int nsets = tu_kernel_sets(&sets);
  uint64_t x = 0x9e3779b97f4a7c15ull;
  for (size_t i = 0; i < N; i++) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    int kind = (int)(x % 11);
    r[i].tag = SBN_REC_MOMENTS;
    r[i].v[0] = kind == 0   ? 0
                : kind == 1 ? 1
                : kind == 2 ? 2
                : kind == 3 ? NAN
                            : (double)(3 + x % 100000);
    r[i].v[1] = 1e4 + (double)((x >> 8) % 9973) / 7.0;
    r[i].v[2] = kind == 4 ? INFINITY : (double)((x >> 24) % 1000003) / 3.0;
  }
  for (int ks = 0; ks < nsets; ks++) {
    if (strcmp(sets[ks], "ref") == 0 ||
        sbn_kernel_select(sets[ks]) == SBN_ENOTSUP)
      continue;
    for (size_t n = 0; n <= N; n++) {
      for (int w = SBN_STAT_COUNT; w <= SBN_STAT_INVSTD; w++) {
        /* A value past n must stay untouched. */
        o1[n] = o2[n] = -7.0;
        assert_int_equal(sbn_kernel_select("ref"), 0);
        sbn_rec_stat(r, n, (sbn_stat_t)w, 1e-5, o1);
        assert_int_equal(sbn_kernel_select(sets[ks]), 0);
        sbn_rec_stat(r, n, (sbn_stat_t)w, 1e-5, o2);
        if (memcmp(o1, o2, (n + 1) * sizeof *o1) != 0)
          fail_msg("%s: sbn_rec_stat(%d) of %zu records differs", sets[ks], w,
                   n);
      }
      for (size_t i = 0; i < N; i++) {
        m1[i] = m2[i] = 0.5f + (float)i;
        v1[i] = v2[i] = 2.0f - (float)i / 64.0f;
      }
      assert_int_equal(sbn_kernel_select("ref"), 0);
      sbn_rec_track(r, n, 0.1, m1, v1);
      assert_int_equal(sbn_kernel_select(sets[ks]), 0);
      sbn_rec_track(r, n, 0.1, m2, v2);
      if (memcmp(m1, m2, sizeof m1) != 0 || memcmp(v1, v2, sizeof v1) != 0)
        fail_msg("%s: sbn_rec_track of %zu records differs", sets[ks], n);
    }
  }
  sbn_kernel_select("ref");
  /* And the reference against the formulas, where they are plain. */
  sbn_rec_stat(r, N, SBN_STAT_INVSTD, 1e-5, o1);
  sbn_rec_stat(r, N, SBN_STAT_VAR_UNBIASED, 1e-5, o2);
  for (size_t i = 0; i < N; i++) {
    double n = r[i].v[0], q = n > 0 ? r[i].v[2] / n : 0;
    if (!isnan(n) && !isinf(r[i].v[2])) {
      assert_true(o1[i] == 1.0 / sqrt(q + 1e-5));
      assert_true(o2[i] == (n > 1 ? r[i].v[2] / (n - 1) : 0));
    }
  }
}

/* Records filled from per-channel arrays: every set writes the
 * reference's records and finds the same first refused channel, for
 * moments with one count or a count per channel and for sums, with one
 * bad value (NaN, an infinity, a negative count or M2, a mean beside a
 * zero count) put at every position in turn; -0 and a zero channel pass. */
static void test_rec_fill_sets(void **state) {
  (void)state;
  enum { N = 43 };
  static sbn_rec_t r1[N], r2[N];
  double cnt[N], a[N], b[N];
  const double bad[][3] = {{NAN, 1, 1}, {1, INFINITY, 1}, {1, 1, -INFINITY},
                           {-1, 1, 1},  {1, 1, -0.5},     {0, 1, 0},
                           {0, 0, 2}};
  const char *const *sets;
  int nsets = tu_kernel_sets(&sets);
  for (size_t i = 0; i < N; i++) {
    cnt[i] = (double)(i % 7 == 3 ? 0 : 1 + i);
    a[i] = i % 7 == 3 ? -0.0 : 1e4 + (double)i / 3.0;
    b[i] = i % 7 == 3 ? 0 : (double)i * 1.5;
  }
  for (int ks = 0; ks < nsets; ks++) {
    if (strcmp(sets[ks], "ref") == 0 ||
        sbn_kernel_select(sets[ks]) == SBN_ENOTSUP)
      continue;
    for (int kind = 0; kind < 3; kind++) /* counts, one count, sums */
      for (size_t n = 0; n <= N; n++)
        for (int at = -1; at < (int)n; at++)
          for (size_t v = 0; v < (at < 0 ? 1 : sizeof bad / sizeof *bad); v++) {
            double c2[N], a2[N], b2[N];
            const double *cp = kind == 2 ? NULL : c2;
            size_t cs = kind == 1 ? 0 : 1, e1, e2;
            memcpy(c2, cnt, sizeof c2);
            memcpy(a2, a, sizeof a2);
            memcpy(b2, b, sizeof b2);
            if (at >= 0) {
              c2[at] = bad[v][0], a2[at] = bad[v][1], b2[at] = bad[v][2];
              if (kind == 1)
                c2[0] = c2[at]; /* the one count is the bad one */
            }
            memset(r1, 0x5a, sizeof r1);
            memset(r2, 0x5a, sizeof r2);
            assert_int_equal(sbn_kernel_select("ref"), 0);
            e1 = sbn_rec_fill(r1, n, cp, cs, a2, b2);
            assert_int_equal(sbn_kernel_select(sets[ks]), 0);
            e2 = sbn_rec_fill(r2, n, cp, cs, a2, b2);
            if (e1 != e2 || (e1 == n && memcmp(r1, r2, sizeof r1) != 0))
              fail_msg(
                  "%s: sbn_rec_fill kind %d n %zu bad %zu at %d: %zu "
                  "vs %zu",
                  sets[ks], kind, n, v, at, e1, e2);
          }
  }
  sbn_kernel_select("ref");
  /* The reference against the rules themselves. */
  assert_int_equal(sbn_rec_fill(r1, N, cnt, 1, a, b), N);
  assert_true(r1[3].tag == SBN_REC_MOMENTS && r1[3].v[0] == 0 &&
              r1[5].v[1] == a[5] && r1[5].v[2] == b[5]);
  b[9] = -1;
  assert_int_equal(sbn_rec_fill(r1, N, cnt, 1, a, b), 9);
  assert_int_equal(sbn_rec_fill(r1, N, NULL, 0, a, b), N); /* sums */
  assert_true(r1[9].tag == SBN_REC_SUM && r1[9].v[1] == -1 && r1[9].v[2] == 0);
  a[11] = 5, cnt[11] = 0;
  assert_int_equal(sbn_rec_fill(r1, 12, cnt, 1, a, b), 9);
  b[9] = 1;
  assert_int_equal(sbn_rec_fill(r1, 12, cnt, 1, a, b), 11);
}

/* Dropout masks are integer functions of the counter, so every kernel set
 * must give exactly the reference's bits, on every length (the vector code
 * handles 32 elements at a time) and for p at the edges. */
static void test_dropout_sets(void **state) {
  (void)state;
  const char *const *sets;
  int nsets = tu_kernel_sets(&sets);
  /* 4099: many vector steps and a tail; (8 << 20) + 13: past 32 MiB, so
   * the output is streamed after a head the reference writes (tested at
   * p = 0.1 only, to keep the test short). */
  const size_t ns[] = {1,  3,  4,  5,   31,   32,   33,
                       63, 64, 65, 100, 1027, 4099, ((size_t)8 << 20) + 13};
  const double ps[] = {0.0, 1e-9, 0.1, 0.5, 0.999};
  for (int ks = 0; ks < nsets; ks++) {
    if (strcmp(sets[ks], "ref") == 0 || tu_kernel_use(sets[ks]) != 0)
      continue;
    for (size_t in = 0; in < sizeof ns / sizeof *ns; in++)
      for (size_t ip = 0; ip < sizeof ps / sizeof *ps; ip++) {
        size_t n = ns[in];
        if (n > ((size_t)1 << 20) && ps[ip] != 0.1)
          continue;
        sbn_layer_params_t p;
        sbn_layer_t *l;
        sbn_layer_params_default(&p, SBN_OP_DROPOUT);
        p.p = ps[ip];
        p.seed = 7 + (uint32_t)in;
        p.layer_id = 3;
        assert_int_equal(sbn_layer_create(&p, NULL, &l), 0);
        sbn_tensor_desc_t d = tu_desc(SBN_LAYOUT_NCHW, 1, n);
        float *x = tu_floats(n), *a = guarded(n), *b = guarded(n);
        for (size_t i = 0; i < n; i++)
          x[i] = 1.0f + (float)i;
        sbn_forward_args_t fa = {
            .mode = SBN_MODE_TRAIN, .x_desc = &d, .x = x, .step = 11};
        fa.y = a;
        assert_int_equal(sbn_kernel_select("ref"), 0);
        assert_int_equal(sbn_forward(l, &fa), 0);
        fa.y = b;
        assert_int_equal(sbn_kernel_select(sets[ks]), 0);
        assert_int_equal(sbn_forward(l, &fa), 0);
        if (memcmp(a, b, n * sizeof(float)) != 0)
          fail_msg("dropout %s n=%zu p=%g differs from ref", sets[ks], n,
                   ps[ip]);
        check_guard(b, n, "dropout y");
        sbn_layer_destroy(l);
        free(x), free(a), free(b);
      }
  }
  sbn_kernel_select("ref");
}

/* LayerNorm of R rows of D with set `set` (x, dy, y and dx `off` floats
 * off alignment) against ref at offset 0. */
static void ln_vs_ref(const char *set, size_t R, size_t D, size_t off) {
  char what[128];
  snprintf(what, sizeof what, "%s ln rows R=%zu D=%zu off=%zu", set, R, D, off);
  vs_ref(set, SBN_OP_LAYERNORM, "ln", SBN_LAYOUT_NCHW, R, D, 1, SBN_MODE_TRAIN,
         off, what);
}

/* The core's L2 as the library reads it (dispatch.c's sbn__l2_bytes):
 * the pipelined forward's groups of 4 rows end at rows of half of it, and
 * the backward takes rows one at a time up to rows of a 28th of it. */
static size_t l2_bytes(void) {
  long s = -1;
#ifdef _SC_LEVEL2_CACHE_SIZE
  s = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
  return s >= (128L << 10) && s <= (64L << 20) ? (size_t)s : (size_t)1 << 20;
}

/* LayerNorm rows (kernels_avx512_ln.c): rows one, two and four at a
 * time (R = 5, 6, 7: four rows and then one, two, or two and one), an
 * odd last row, rows of four at the longest length they take (32767,
 * 7 and 19 rows, with and without affine), more than one block of 16 rows
 * (float dweight/dbias sums folded into double), forward chunks of several rows
 * normalized block by block across them, row lengths around the vector width
 * and the 256-column block (31-33, 255-257, 1000, 4099), on pointers 0, 1 and 3
 * floats off alignment; and outputs large enough to stream (4 MiB and
 * more) with an odd row length, so that every row starts at another
 * offset within its cache line. The pipelined passes (rows of 4096 or
 * more forward, 1024 or more backward): groups of 4, 2 and 1 rows with
 * rows left over (R = 3, 5, 17, 36), blocks of 16 rows ending inside a
 * group sequence, and streamed outputs of whole-line rows 0, 1 and 3
 * floats off alignment (each row's head before its first line boundary
 * written apart), with and without affine. The backward's rows-at-a-time
 * form streams dx too (outputs of 4 MiB and more, whole-line rows): in
 * pairs (40 x 32768) and fours (37 x 30000: fours, and a single row after
 * the last four of the third block). Rows of 64k elements or more go
 * eight at a time where single rows do not serve: 17 x 131072 (two
 * eights in a block of 16, the second adding into the first's float
 * sums, then a single row),
 * 11 x 100000 (an eight, a pair and a single row) and 8 x 100352 without
 * affine (one eight), each also with SBN_WIDE_L2 at 1 and at 0. The
 * forward's groups of 4 rows on both sides of their limit (half the L2: 6 rows
 * of it, a group of 4 and one of 2, and 16 more, three groups of 2), and the
 * backward's single rows on both sides of their limit (7 rows of D floats
 * within the L2: 15 of the longest such whole-line rows, dx streamed with an L2
 * of 2 MiB, and 5 rows just over it, in pairs and a single row). */
static void test_ln_rows(void **state) {
  (void)state;
  const char *const *sets;
  int nsets = tu_kernel_sets(&sets);
  const size_t Ds[] = {1, 3, 17, 31, 32, 33, 255, 257, 1000, 4099};
  const size_t Rs[] = {1, 2, 3, 5, 6, 7, 17, 36};
  const size_t offs[] = {0, 1, 3};
  for (int ks = 0; ks < nsets; ks++) {
    if (strcmp(sets[ks], "ref") == 0 || tu_kernel_use(sets[ks]) != 0)
      continue;
    for (size_t id = 0; id < sizeof Ds / sizeof *Ds; id++)
      for (size_t ir = 0; ir < sizeof Rs / sizeof *Rs; ir++)
        ln_vs_ref(sets[ks], Rs[ir], Ds[id], offs[(id + ir) % 3]);
    for (size_t off = 0; off <= 1; off++) {
      ln_vs_ref(sets[ks], 3, 400003, off);
      ln_vs_ref(sets[ks], 17, 65537, off);
      no_affine = (int)off;
      ln_vs_ref(sets[ks], 7, 32767, off + 2);
      ln_vs_ref(sets[ks], 19, 20001, off);
      no_affine = 0;
    }
    static const struct {
      size_t R, D;
    } pipe[] = {{5, 262144},  {17, 131072}, {40, 32768},
                {2, 1048592}, {37, 30000},  {11, 100000}};
    /* Without affine only the first (these outputs are slow under the
     * sanitizers). */
    for (size_t ip = 0; ip < sizeof pipe / sizeof *pipe; ip++)
      for (int v = 0; v < (ip == 0 ? 2 : 1); v++) {
        no_affine = v;
        ln_vs_ref(sets[ks], pipe[ip].R, pipe[ip].D, offs[(ip + (size_t)v) % 3]);
        no_affine = 0;
      }
    /* Exactly one sweep of eight rows (ResNet-sized LayerNorm: 8 rows of
     * 100352), without affine. */
    no_affine = 1;
    ln_vs_ref(sets[ks], 8, 100352, 1);
    no_affine = 0;
    /* The eights run only on a core with 2 MiB of L2 or more
     * (kernels_avx512_ln.c): the rows that take them, with each side of
     * that choice forced, so that both forms are tested on any core. */
    static const char *const wide[] = {"1", "0"};
    for (int v = 0; v < 2; v++) {
      setenv("SBN_WIDE_L2", wide[v], 1);
      ln_vs_ref(sets[ks], 17, 131072, 1);
      ln_vs_ref(sets[ks], 11, 100000, 2);
      no_affine = 1;
      ln_vs_ref(sets[ks], 8, 100352, 0);
      no_affine = 0;
    }
    unsetenv("SBN_WIDE_L2");
    size_t g4 = l2_bytes() / 2 / sizeof(float);
    ln_vs_ref(sets[ks], 6, g4, 0);
    ln_vs_ref(sets[ks], 6, g4 + 16, 1);
    size_t one = l2_bytes() / 28 / 16 * 16;
    ln_vs_ref(sets[ks], 15, one, 0);
    ln_vs_ref(sets[ks], 5, l2_bytes() / 28 + 16, 3);
  }
  sbn_kernel_select("ref");
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_names),
      cmocka_unit_test(test_sets_vs_ref),
      cmocka_unit_test(test_wide_unaligned),
      cmocka_unit_test(test_channels_last_tiles),
      cmocka_unit_test(test_channels_last_sweeps),
      cmocka_unit_test(test_channels_last_stream_dx),
      cmocka_unit_test(test_channels_last_dx_l2),
      cmocka_unit_test(test_channels_last_stream_rows),
      cmocka_unit_test(test_channels_last_fused),
      cmocka_unit_test(test_channels_last_bwd_fused),
      cmocka_unit_test(test_layout_agreement),
      cmocka_unit_test(test_dropout_sets),
      cmocka_unit_test(test_rec_combine_sets),
      cmocka_unit_test(test_rec_stat_sets),
      cmocka_unit_test(test_rec_fill_sets),
      cmocka_unit_test(test_ln_rows),
  };
  return cmocka_run_group_tests(tests, NULL, kc_report);
}
