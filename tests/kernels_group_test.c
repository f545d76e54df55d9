/* The NCHW GroupNorm and InstanceNorm kernels of the optimized sets
 * (gn_bwd_nchw, gn_fwd_nchw and the short planes' backward) and the
 * fused BatchNorm NCHW passes (bn_bwd_nchw, bn_fwd_nchw) against
 * "ref": runs around the vector width and the tiles' limits, groups of
 * every width the paths take or decline, unaligned and streamed outputs
 * (split from kernels_test.c, whose helpers kernels_cmp.h holds). */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "kernels_cmp.h"

/* The NCHW group backward of the optimized sets (gn_bwd_nchw): runs
 * longer than the short-run tiles and than one float chunk (S = 193,
 * 1025, 3001), groups of 1, 3, 5 and 17 channels (units of several small
 * groups, single-channel InstanceNorm groups, one group of odd width),
 * with and without affine weights, eval with running statistics, and
 * outputs streamed (passes of over 1 MiB: dx after a masked head) 1 and
 * 3 floats off alignment; GroupNorm(1) over 17 channels of 5000 values
 * (one group of 85000, which only a sample's single group may take) and
 * of 6000 (too large: the set declines). Units of long runs capped at
 * 32 Ki values (GN_BWD_UNIT): 15 channels of 3001 (InstanceNorm units of
 * 10 channels and 5, GroupNorm units of 2 groups of 5 channels and 1) and
 * 3 groups of 3 channels of 12000 (a group per unit, 36000 values). */
static void test_group_backward_nchw(void **state) {
  (void)state;
  const char *const *sets;
  int nsets = tu_kernel_sets(&sets);
  static const struct {
    size_t N, C, S;
  } sh[] = {{5, 9, 193},    {3, 15, 1025},  {4, 17, 3001}, {3, 3, 1025},
            {21, 17, 3001}, {130, 15, 547}, {2, 17, 5000}, {1, 17, 6000},
            {3, 15, 3001},  {2, 9, 12000}};
  const sbn_op_t ops[] = {SBN_OP_INSTANCENORM, SBN_OP_GROUPNORM};
  const char *opn[] = {"in", "gn"};
  for (int ks = 0; ks < nsets; ks++) {
    if (strcmp(sets[ks], "ref") == 0 || tu_kernel_use(sets[ks]) != 0)
      continue;
    for (size_t i = 0; i < sizeof sh / sizeof *sh; i++)
      for (int io = 0; io < 2; io++)
        for (int v = 0; v < 3; v++) {
          size_t N = sh[i].N, C = sh[i].C, S = sh[i].S, off = 1 + 2 * (i % 2);
          /* The outputs over 4 MiB (slow under the sanitizers) run once. */
          if (N * C * S > (1u << 20) && v > 0)
            continue;
          sbn_mode_t mode = v == 2 ? SBN_MODE_EVAL : SBN_MODE_TRAIN;
          char what[128];
          snprintf(what, sizeof what, "%s %s NCHW N=%zu C=%zu S=%zu off=%zu%s",
                   sets[ks], opn[io], N, C, S, off,
                   v == 1 ? " no affine" : (v == 2 ? " eval" : ""));
          no_affine = v == 1;
          vs_ref(sets[ks], ops[io], opn[io], SBN_LAYOUT_NCHW, N, C, S, mode,
                 off, what);
          no_affine = 0;
        }
  }
  sbn_kernel_select("ref");
}

/* The NCHW group backward's short planes (kernels_avx512_gnbwd.c): 16 to
 * 256 values per plane (16, 17, 49, 50, 196, 255, 256), and 1, 15 (3x5)
 * and 257, which it declines; groups of 1, 2, 4 and 8 channels taken as
 * tiles of 16 channels (C = 24, 40, 36, 34: a last tile of 8, 4 or 2
 * channels; C = 200 and 1000: several blocks of tiles, the last one
 * short) and groups of 16, 32 and 64 channels taken 16 at a time (C =
 * 512 / 32, 96 / 3, 192 / 3: several groups per block, or one); groups
 * of 3 and 12 channels, which it declines. Each with and without affine
 * weights, in eval, 0, 1 and 3 floats off alignment, and with outputs
 * large enough to stream dx (N = 4 and C = 512 or 1000). */
static void test_group_backward_short(void **state) {
  (void)state;
  const char *const *sets;
  int nsets = tu_kernel_sets(&sets);
  static const struct {
    size_t C, G;
  } cg[] = {{24, 3},   {40, 5}, {36, 9},  {34, 17}, {200, 25}, {1000, 1000},
            {512, 32}, {96, 3}, {192, 3}, {36, 12}, {36, 3}};
  static const size_t Ss[] = {1, 15, 16, 17, 49, 50, 196, 255, 256, 257};
  for (int ks = 0; ks < nsets; ks++) {
    if (strcmp(sets[ks], "ref") == 0 || tu_kernel_use(sets[ks]) != 0)
      continue;
    for (size_t ic = 0; ic < sizeof cg / sizeof *cg; ic++)
      for (size_t is = 0; is < sizeof Ss / sizeof *Ss; is++) {
        size_t C = cg[ic].C, S = Ss[is], off = (ic + is) % 4;
        int v = (int)((ic + is) % 3);
        size_t N = C * S > 60000 ? 1 : 3;
        off = off == 2 ? 3 : off;
        /* The streamed outputs (over 1 MiB moved) at 7x7 and 14x14. */
        if ((S == 49 || S == 196) && (C == 512 || C == 1000))
          N = 4;
        sbn_mode_t mode = v == 2 ? SBN_MODE_EVAL : SBN_MODE_TRAIN;
        char what[128];
        snprintf(what, sizeof what,
                 "%s gn NCHW short N=%zu C=%zu G=%zu S=%zu off=%zu%s", sets[ks],
                 N, C, cg[ic].G, S, off,
                 v == 1 ? " no affine" : (v == 2 ? " eval" : ""));
        n_groups = cg[ic].G;
        no_affine = v == 1;
        vs_ref(sets[ks], SBN_OP_GROUPNORM, "gn", SBN_LAYOUT_NCHW, N, C, S, mode,
               off, what);
        no_affine = 0;
        n_groups = 0;
      }
    /* InstanceNorm's tiles with a short last one (C = 1000, 17) and the
     * same planes. */
    static const size_t Cin[] = {17, 1000};
    for (size_t ic = 0; ic < 2; ic++)
      for (size_t is = 2; is < sizeof Ss / sizeof *Ss - 1; is++) {
        size_t C = Cin[ic], S = Ss[is], off = is % 2 ? 1 : 3;
        int v = (int)((ic + is) % 3);
        size_t N = C == 1000 && (S == 49 || S == 196) ? 4 : 2;
        sbn_mode_t mode = v == 2 ? SBN_MODE_EVAL : SBN_MODE_TRAIN;
        char what[128];
        snprintf(what, sizeof what,
                 "%s in NCHW short N=%zu C=%zu S=%zu off=%zu%s", sets[ks], N, C,
                 S, off, v == 1 ? " no affine" : (v == 2 ? " eval" : ""));
        no_affine = v == 1;
        vs_ref(sets[ks], SBN_OP_INSTANCENORM, "in", SBN_LAYOUT_NCHW, N, C, S,
               mode, off, what);
        no_affine = 0;
      }
  }
  sbn_kernel_select("ref");
}

/* The NCHW group forward of the optimized sets (gn_fwd_nchw): planes of
 * 1 and 7 values (which it declines), 16, 49, 50, 196, 257 and 784 values
 * (one and several vectors, with and without a tail; groups under and
 * over the 16-group tiles' 256 values), odd channel counts (1, 3, 17,
 * 1000) and groups of 1, 3, 16 and 17 channels (C = 9, 48, 51 take 3
 * groups), 0, 1 and 3 floats off alignment, with and without affine
 * weights, eval (running statistics for InstanceNorm, batch statistics
 * for GroupNorm), and outputs streamed (over 512 KiB) aligned and not,
 * with runs of whole vectors (S = 2000) and not. */
static void test_group_forward_nchw(void **state) {
  (void)state;
  const char *const *sets;
  int nsets = tu_kernel_sets(&sets);
  static const size_t Cs[] = {1, 3, 9, 17, 48, 51, 1000};
  static const size_t Ss[] = {1, 7, 16, 49, 50, 196, 257, 784};
  static const struct {
    size_t N, C, S, off;
  } big[] = {{6, 1000, 49, 0},  {4, 17, 4001, 0}, {3, 51, 2000, 3},
             {2, 1000, 196, 1}, {3, 17, 3001, 3}, {2, 48, 2500, 1}};
  const sbn_op_t ops[] = {SBN_OP_INSTANCENORM, SBN_OP_GROUPNORM};
  const char *opn[] = {"in", "gn"};
  for (int ks = 0; ks < nsets; ks++) {
    if (strcmp(sets[ks], "ref") == 0 || tu_kernel_use(sets[ks]) != 0)
      continue;
    for (size_t ic = 0; ic < sizeof Cs / sizeof *Cs; ic++)
      for (size_t is = 0; is < sizeof Ss / sizeof *Ss; is++)
        for (int io = 0; io < 2; io++) {
          size_t C = Cs[ic], S = Ss[is], N = C * S > 20000 ? 1 : 3;
          size_t off = (ic + is) % 3 == 2 ? 3 : (ic + is) % 3;
          int v = (int)((ic + is + (size_t)io) % 3);
          /* InstanceNorm cannot train on planes of one value. */
          if (io == 0 && S == 1)
            v = 2;
          sbn_mode_t mode = v == 2 ? SBN_MODE_EVAL : SBN_MODE_TRAIN;
          char what[128];
          snprintf(what, sizeof what,
                   "%s %s NCHW fwd N=%zu C=%zu S=%zu off=%zu%s", sets[ks],
                   opn[io], N, C, S, off,
                   v == 1 ? " no affine" : (v == 2 ? " eval" : ""));
          no_affine = v == 1;
          vs_ref(sets[ks], ops[io], opn[io], SBN_LAYOUT_NCHW, N, C, S, mode,
                 off, what);
          no_affine = 0;
        }
    for (size_t i = 0; i < sizeof big / sizeof *big; i++)
      for (int io = 0; io < 2; io++) {
        char what[128];
        snprintf(what, sizeof what, "%s %s NCHW fwd N=%zu C=%zu S=%zu off=%zu",
                 sets[ks], opn[io], big[i].N, big[i].C, big[i].S, big[i].off);
        vs_ref(sets[ks], ops[io], opn[io], SBN_LAYOUT_NCHW, big[i].N, big[i].C,
               big[i].S, SBN_MODE_TRAIN, big[i].off, what);
      }
  }
  sbn_kernel_select("ref");
}

/* The fused BatchNorm NCHW passes of the optimized sets (bn_bwd_nchw and,
 * in training, bn_fwd_nchw, kernels_avx512_bnfuse.c): planes of 16 (with N
 * = 1: a statistic of 16 values, which they decline, and N = 2: 32, which
 * they take), 49, 196, 784 and 1000 values (runs with and without a tail,
 * short and long), and 15 (shorter than a vector: declined); 1, 3, 17 and
 * 1000 channels (backward groups of up to 16 channels and forward groups of
 * 16 channels or a multiple, with a short last group, and several groups of
 * long planes); a channel of 40000 values in 2 samples (640 KiB of x and
 * dy, more than a group's share of any L2 up to 4 MiB, and 320 KiB of x,
 * more than the forward's up to 2 MiB: in a group of its own from an L2
 * of 1 MiB up) and one of 220000 (3.36 MiB of x and dy, more than four
 * fifths of any L2 up to 4 MiB: the backward declines); outputs of
 * 6.25 MiB (2x100x8192: fused, beyond the 4 MiB at which the unfused
 * normalize streams) and 7.5 MiB (2x120x8192: above the fused forward's 7
 * MiB, declined); with and without affine weights, in eval (running
 * statistics: dx is dy scaled), 0, 1 and 3 floats off alignment.
 * SBN_BN_FUSED=1 puts the fused passes on whatever the core's L2 (by
 * default they run only from 2 MiB, ops/batchnorm_overlap.c). */
static void test_bn_fused(void **state) {
  (void)state;
  const char *const *sets;
  int nsets = tu_kernel_sets(&sets);
  setenv("SBN_BN_FUSED", "1", 1);
  static const struct {
    size_t N, S;
  } ns[] = {{1, 16}, {2, 16}, {3, 49}, {8, 196}, {8, 784}, {3, 1000}, {4, 15}};
  static const size_t Cs[] = {1, 3, 17, 1000};
  for (int ks = 0; ks < nsets; ks++) {
    if (strcmp(sets[ks], "ref") == 0 || tu_kernel_use(sets[ks]) != 0)
      continue;
    for (size_t i = 0; i < sizeof ns / sizeof *ns; i++)
      for (size_t ic = 0; ic < sizeof Cs / sizeof *Cs; ic++) {
        size_t N = ns[i].N, C = Cs[ic], S = ns[i].S;
        /* The widest tensors run once per plane: 1000 channels of 784. */
        if (C == 1000 && S >= 784)
          N = 2;
        size_t off = (i + ic) % 3 == 2 ? 3 : (i + ic) % 3;
        int v = (int)((i + ic) % 3);
        sbn_mode_t mode = v == 2 ? SBN_MODE_EVAL : SBN_MODE_TRAIN;
        char what[128];
        snprintf(what, sizeof what,
                 "%s bn NCHW fused N=%zu C=%zu S=%zu off=%zu%s", sets[ks], N, C,
                 S, off, v == 1 ? " no affine" : (v == 2 ? " eval" : ""));
        no_affine = v == 1;
        vs_ref(sets[ks], SBN_OP_BATCHNORM, "bn", SBN_LAYOUT_NCHW, N, C, S, mode,
               off, what);
        no_affine = 0;
      }
    vs_ref(sets[ks], SBN_OP_BATCHNORM, "bn", SBN_LAYOUT_NCHW, 2, 3, 40000,
           SBN_MODE_TRAIN, 1, "bn NCHW fused, a channel alone: 2x3x40000");
    vs_ref(sets[ks], SBN_OP_BATCHNORM, "bn", SBN_LAYOUT_NCHW, 2, 2, 220000,
           SBN_MODE_TRAIN, 2, "bn NCHW fused declined: 2x2x220000");
    vs_ref(sets[ks], SBN_OP_BATCHNORM, "bn", SBN_LAYOUT_NCHW, 2, 100, 8192,
           SBN_MODE_TRAIN, 3, "bn NCHW fused, 6.25 MiB: 2x100x8192");
    vs_ref(sets[ks], SBN_OP_BATCHNORM, "bn", SBN_LAYOUT_NCHW, 2, 120, 8192,
           SBN_MODE_TRAIN, 3, "bn NCHW fused declined, 7.5 MiB: 2x120x8192");
  }
  unsetenv("SBN_BN_FUSED");
  sbn_kernel_select("ref");
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_group_backward_nchw),
      cmocka_unit_test(test_group_backward_short),
      cmocka_unit_test(test_group_forward_nchw),
      cmocka_unit_test(test_bn_fused),
  };
  return cmocka_run_group_tests(tests, NULL, kc_report);
}
