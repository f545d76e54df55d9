/* The position view shared by the optimized sets (kernels_avx512.c,
 * kernels_avx2.c): an (A, C, S) array seen as rows of L positions whose
 * channels repeat, so that channels-last passes (S small) stream whole
 * vectors with per-position parameters laid out once in small arrays. Plain
 * C; included by kernel files only. */
#ifndef SBN_KERNELS_GEO_INL_H
#define SBN_KERNELS_GEO_INL_H

#include <stddef.h>

/* Positions per row of the position view: bounds the per-position
 * parameter arrays on the stack (a few KiB each, in L1). */
#define PMAX 1024

/* The position view: rows of L positions, `stride` floats apart, position
 * j of every row in channel ((j0 + j) / S) % C. */

typedef struct geo_s {
  size_t rows, stride, L, j0;
} geo_t;

static inline size_t geo_chan(const geo_t *g, size_t j, size_t C, size_t S) {
  return ((g->j0 + j) / S) % C;
}

static inline size_t gcd(size_t a, size_t b) {
  while (b != 0) {
    size_t t = a % b;
    a = b;
    b = t;
  }
  return a;
}

/* Piece i of the position view of (A, C, S) with rows lda floats apart
 * and its offset into the array; 0 when there is no piece i. Periodic: whole
 * periods of lcm(C*S, 16) positions, repeated to at least 8 vectors so that
 * each position's accumulator is touched only every 8 vectors, then the rest
 * (whole rows of C*S) as a last short row; only for lda = C*S, when the
 * rows are one flat array. Tiled: PMAX positions of every row at a
 * time. geo_piece_p repeats periods while shorter than minP and not
 * longer than maxP after doubling, and takes maxP for PMAX (geo_piece:
 * 128 and PMAX; kernels_avx512_nhwc.c wants periods of one register tile
 * and rows of up to 2048 positions). */
static inline int geo_piece_p(size_t A, size_t C, size_t S, size_t lda,
                              size_t i, size_t minP, size_t maxP, geo_t *g,
                              size_t *off) {
  size_t cs = C * S, n = A * cs;
  if (n == 0)
    return 0;
  size_t P = cs / gcd(cs, 16) * 16;
  if (P <= maxP && lda == cs) {
    while (P < minP && 2 * P <= maxP)
      P *= 2;
    size_t rows = n / P;
    if (i == 0 && rows > 0) {
      *g = (geo_t){rows, P, P, 0};
      *off = 0;
      return 1;
    }
    if (i == (rows > 0 ? 1u : 0u) && n > rows * P) {
      *g = (geo_t){1, P, n - rows * P, 0};
      *off = rows * P;
      return 1;
    }
    return 0;
  }
  size_t j0 = i * maxP;
  if (j0 >= cs)
    return 0;
  *g = (geo_t){A, lda, cs - j0 < maxP ? cs - j0 : maxP, j0};
  *off = j0;
  return 1;
}

static inline int geo_piece(size_t A, size_t C, size_t S, size_t lda, size_t i,
                            geo_t *g, size_t *off) {
  return geo_piece_p(A, C, S, lda, i, 128, PMAX, g, off);
}

#endif /* SBN_KERNELS_GEO_INL_H */
