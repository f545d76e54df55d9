/* GroupNorm and InstanceNorm backward over NCHW samples (the table's
 * gn_bwd_nchw; compiled with the AVX-512 flags like kernels_avx512.c).
 *
 * In NCHW a group of a sample is one contiguous block of cpg * S floats,
 * so the whole backward can run group by group: the per-channel sums of
 * dy and dy * xhat, the group's dx coefficients, then dx, while the
 * group's x and dy are still in L1 or L2. The general path (the op's
 * bwd_reduce_ld, bookkeeping, bwd_apply_ld over blocks of groups) writes
 * nine per-channel arrays between its passes and forms dx in double; with
 * 7x7 planes that per-channel work cost as much as the data. Here the
 * coefficients stay in registers and dx is formed in float from x - h (h
 * the float part of the mean), like the position views' dx_params_f,
 * whose terms are all of dx's own magnitude.
 *
 * Groups of fewer than 16 channels (InstanceNorm's single channels) are
 * taken 16 channels or more at a time, a unit of whole groups, so that
 * the short-run sums can reduce 16 channels with one transposing tree.
 * While a unit's dx is written, the next unit's x and dy are prefetched,
 * so memory is read while the cached unit is computed, instead of the
 * loads of each unit's sums starting from memory after its dx. */
#include "kernels/sbn_kernels.h"

#ifdef SBN__HAVE_AVX512
#include "kernels/avx512_inl.h"

/* Runs up to this long are summed 16 channels at a time (at most 12
 * values per lane, and 4 tree levels: 16 float additions deep, as the
 * long runs' chunks). */
#define GN_SHORT_S 192
/* The most values per group taken here: a group's x and dy (512 KiB)
 * then stay in the 1 MiB L2 from the sums to dx, beside the next
 * group's prefetched lines. Larger groups decline, and the op's blocked
 * path reads them twice. */
#define GN_MAX_GROUP (64u * 1024u)
/* Units closer than this (bytes of x) are prefetched further ahead: the
 * hardware prefetcher already runs that far ahead of a stream. */
#define GN_PF_MIN 4096u

/* One step of run_sums: adds dy and dy * (x - h) of 16 values. */
#define GN_ACC(a, b, off)                                                      \
  do {                                                                         \
    __m512 g_ = _mm512_loadu_ps(q + s + (off));                                \
    a = _mm512_add_ps(a, g_);                                                  \
    b = _mm512_fmadd_ps(g_, _mm512_sub_ps(_mm512_loadu_ps(p + s + (off)), vh), \
                        b);                                                    \
  } while (0)

/* Sums of dy and of dy * (x - h) over one run of n values: float over
 * CHUNKs, folded into double (as kernels_avx512.c's run_bwd_reduce). The
 * four accumulator pairs are named variables: as arrays indexed in a
 * loop, GCC kept them in memory (a store and a reload per vector). */
static void run_sums(const float *p, const float *q, size_t n, float h,
                     double *t1, double *t2) {
  __m512 vh = _mm512_set1_ps(h);
  __m512d s1l = _mm512_setzero_pd(), s1h = s1l, s2l = s1l, s2h = s1l;
  for (size_t s = 0; s < n;) {
    size_t e = n - s > CHUNK ? s + CHUNK : n;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    __m512 b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    for (; s + 64 <= e; s += 64) {
      GN_ACC(a0, b0, 0);
      GN_ACC(a1, b1, 16);
      GN_ACC(a2, b2, 32);
      GN_ACC(a3, b3, 48);
    }
    /* Masked lanes load dy = 0 and add nothing. */
    for (; s < e; s += 16) {
      __mmask16 m = tail_mask(e - s);
      __m512 g = load16(m, q + s);
      a0 = _mm512_add_ps(a0, g);
      b0 = _mm512_fmadd_ps(g, _mm512_sub_ps(load16(m, p + s), vh), b0);
    }
    fold16(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)), &s1l,
           &s1h);
    fold16(_mm512_add_ps(_mm512_add_ps(b0, b1), _mm512_add_ps(b2, b3)), &s2l,
           &s2h);
  }
  *t1 += _mm512_reduce_add_pd(_mm512_add_pd(s1l, s1h));
  *t2 += _mm512_reduce_add_pd(_mm512_add_pd(s2l, s2h));
}

/* The same sums for nc <= 16 runs of 16 <= S <= GN_SHORT_S values,
 * channel j shifted by ph[j], reduced together by the tree. */
static void tile_sums(const float *x, const float *dy, size_t nc, size_t S,
                      const float *ph, double *t1, double *t2) {
  __m512 va[16], vb[16];
  size_t full = S & ~(size_t)15;
  __mmask16 tm = tail_mask(S - full);
  for (size_t j = 0; j < 16; j++) {
    __m512 a = _mm512_setzero_ps(), b = a;
    if (j < nc)
      short_run(1, x + j * S, dy + j * S, full, tm, _mm512_set1_ps(ph[j]), &a,
                &b);
    va[j] = a;
    vb[j] = b;
  }
  fold_first(tree16(va), nc, t1);
  fold_first(tree16(vb), nc, t2);
}

/* Per-channel sums of groups [g0, g1) into sdy and sdyx (channels from
 * g0 * cpg on): float sums of dy and dy * (x - h), h the float part of the
 * group's mean, then sum dy * xhat = istd * (sum dy (x - h) - l sum dy)
 * in double (l = mean - h), one parameter per run instead of three. */
static void unit_sums(const float *x, const float *dy, size_t g0, size_t g1,
                      size_t cpg, size_t S, const double *mean,
                      const double *istd, double *sdy, double *sdyx) {
  size_t c0 = g0 * cpg, c1 = g1 * cpg;
  for (size_t c = c0; c < c1; c++)
    sdy[c] = sdyx[c] = 0;
  size_t g = g0, k = 0;
  for (size_t c = c0; c < c1; c += 16) {
    size_t nc = c1 - c < 16 ? c1 - c : 16;
    float ph[16];
    for (size_t j = 0; j < nc; j++) {
      ph[j] = (float)mean[g];
      if (++k == cpg)
        k = 0, g++;
    }
    if (S <= GN_SHORT_S) {
      tile_sums(x + c * S, dy + c * S, nc, S, ph, sdy + c, sdyx + c);
      continue;
    }
    for (size_t j = 0; j < nc; j++)
      run_sums(x + (c + j) * S, dy + (c + j) * S, S, ph[j], &sdy[c + j],
               &sdyx[c + j]);
  }
  for (g = g0; g < g1; g++) {
    double l = mean[g] - (double)(float)mean[g], is = istd[g];
    for (size_t c = g * cpg; c < (g + 1) * cpg; c++)
      sdyx[c] = is * (sdyx[c] - l * sdy[c]);
  }
}

/* The dx parameters of one channel as vectors: k1 = istd * w[c], and its
 * group's q, h and r (dx = k1 * dy + (q * (x - h) + r)). */
typedef struct {
  __m512 k, q, h, r;
} gn_vpar_t;

/* A group's float q, h, r and istd. */
typedef struct {
  float q, h, r;
  double is;
} gn_gpar_t;

static inline gn_vpar_t vpar(const gn_gpar_t *gp, const float *w, size_t c) {
  gn_vpar_t v;
  v.k = _mm512_set1_ps((float)(w != NULL ? gp->is * w[c] : gp->is));
  v.q = _mm512_set1_ps(gp->q);
  v.h = _mm512_set1_ps(gp->h);
  v.r = _mm512_set1_ps(gp->r);
  return v;
}

/* dx of 16 values (the lanes of m). */
static inline __m512 dx16f(const float *p, const float *d, __mmask16 m,
                           gn_vpar_t v) {
  __m512 t = _mm512_fmadd_ps(v.q, _mm512_sub_ps(load16(m, p), v.h), v.r);
  return _mm512_fmadd_ps(v.k, load16(m, d), t);
}

/* Lanes of m take b's parameters, the others a's. */
static inline gn_vpar_t vblend(gn_vpar_t a, gn_vpar_t b, __mmask16 m) {
  gn_vpar_t v;
  v.k = _mm512_mask_mov_ps(a.k, m, b.k);
  v.q = _mm512_mask_mov_ps(a.q, m, b.q);
  v.h = _mm512_mask_mov_ps(a.h, m, b.h);
  v.r = _mm512_mask_mov_ps(a.r, m, b.r);
  return v;
}

/* dx over a unit of nch channels (whole groups of cpg, parameters gp[]),
 * S values each, as one flat stream (S >= 16, so a vector meets at most
 * one channel boundary, where its upper lanes take the next channel's
 * parameters): whole vectors inside a channel run without a test, then
 * the one that straddles its end. One stream per unit rather than per
 * group keeps InstanceNorm's 14x14 channels from each starting and ending
 * on a part line, which a streaming pass writes with plain stores. With
 * nt the stores stream after a masked head up to dx's first line
 * boundary (within channel 0: it is under 16 values). Prefetches the
 * lines pf floats ahead of x and dy (pf = 0: none). w is the unit's
 * first channel's weight, or NULL. */
static void unit_run(const float *p, const float *d, float *o, size_t nch,
                     size_t cpg, size_t S, const gn_gpar_t *gp, const float *w,
                     int nt, size_t pf) {
  size_t n = nch * S, s = head_elems(o, n, nt), gi = 0, kk = 0;
  gn_vpar_t cur = vpar(gp, w, 0);
  if (s > 0)
    _mm512_mask_storeu_ps(o, tail_mask(s), dx16f(p, d, tail_mask(s), cur));
  /* An output that is not even 4-byte aligned has no head and never
   * streams (a streaming store needs an aligned line). */
  if (((uintptr_t)(o + s) & 63) != 0)
    nt = 0;
  for (size_t c = 0, end = S; c < nch; c++, end += S) {
    for (; s + 16 <= end; s += 16) {
      if (pf != 0) {
        _mm_prefetch((const char *)(p + s + pf), _MM_HINT_T0);
        _mm_prefetch((const char *)(d + s + pf), _MM_HINT_T0);
      }
      __m512 v = dx16f(p + s, d + s, 0xFFFF, cur);
      if (nt)
        _mm512_stream_ps(o + s, v);
      else
        _mm512_storeu_ps(o + s, v);
    }
    if (++kk == cpg)
      kk = 0, gi++;
    gn_vpar_t nxt = c + 1 < nch ? vpar(gp + gi, w, c + 1) : cur;
    if (s < end) {
      /* The last channel's straddling vector is a tail. */
      size_t len = n - s < 16 ? n - s : 16;
      __mmask16 m = tail_mask(len);
      gn_vpar_t v = vblend(cur, nxt, (__mmask16)~tail_mask(end - s));
      store16(o + s, dx16f(p + s, d + s, m, v), m, nt);
      s += len;
    }
    cur = nxt;
  }
}

/* Group g's dx parameters from its channels' sums (which are added into
 * dw and db). */
static gn_gpar_t group_par(size_t g, size_t cpg, size_t S, const double *mean,
                           const double *istd, const float *w, int stats,
                           const double *sdy, const double *sdyx, double *dw,
                           double *db) {
  size_t c0 = g * cpg, c1 = c0 + cpg;
  double is = istd[g], mu = mean[g], sg = 0, sgx = 0;
  for (size_t c = c0; c < c1; c++) {
    double wc = w != NULL ? w[c] : 1.0;
    sg += wc * sdy[c];
    sgx += wc * sdyx[c];
    db[c] += sdy[c];
    dw[c] += sdyx[c];
  }
  double m = (double)cpg * (double)S;
  double q = stats ? -is * is * sgx / m : 0, k3 = stats ? -is * sg / m : 0;
  float h = (float)mu;
  gn_gpar_t gp = {(float)q, h, (float)(k3 - q * (mu - (double)h)), is};
  return gp;
}

/* The table's gn_bwd_nchw. */
int sbn__avx512_gn_bwd_nchw(const float *x, const float *dy, float *dx,
                            size_t G, size_t cpg, size_t S, const double *mean,
                            const double *istd, const float *w, int stats,
                            double *sdy, double *sdyx, double *dw, double *db,
                            size_t total) {
  /* Short runs go to the position view; statistics of few values keep
   * the reference's double dx (see SMALL_STAT). */
  if (S < 16 || cpg * S < SMALL_STAT || cpg * S > GN_MAX_GROUP)
    return 0;
  size_t gpu = cpg >= 16 ? 1 : (16 + cpg - 1) / cpg;
  /* dx streams when the whole output is large (see NT_BYTES): written
   * with plain stores, each line of dx is first read from memory, and the
   * pass moves 16 bytes per element instead of 12. Unlike the position
   * views' dx (apply_nt), this measured faster streamed: 0.89-1.36 of the
   * two-read-one-write floor against 1.25-1.58 with plain stores (bench
   * kernels, GroupNorm NCHW backward, the seven default shapes of 4 MiB
   * and more, two runs each). */
  int nt = total >= NT_BYTES / sizeof(float);
  for (size_t g0 = 0; g0 < G; g0 += gpu) {
    size_t g1 = G - g0 < gpu ? G : g0 + gpu;
    /* The next unit starts (g1 - g0) * cpg * S floats on: prefetch that
     * far ahead (at least GN_PF_MIN bytes), except in the last unit. */
    size_t ue = (g1 - g0) * cpg * S;
    size_t pf = g1 < G ? (ue * 4 < GN_PF_MIN ? GN_PF_MIN / 4 : ue) : 0;
    unit_sums(x, dy, g0, g1, cpg, S, mean, istd, sdy, sdyx);
    gn_gpar_t gp[16];
    for (size_t g = g0; g < g1; g++)
      gp[g - g0] =
          group_par(g, cpg, S, mean, istd, w, stats, sdy, sdyx, dw, db);
    size_t o = g0 * cpg * S;
    unit_run(x + o, dy + o, dx + o, (g1 - g0) * cpg, cpg, S, gp,
             w != NULL ? w + g0 * cpg : NULL, nt, pf);
  }
  _mm256_zeroupper();
  return 1;
}
#endif /* SBN__HAVE_AVX512 */
