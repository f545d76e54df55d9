/* Optional OpenMP threading of the ops: a kernel table with the active
 * set's entries wrapped so that each call splits its (A, C, S) view over
 * threads. Built only with -DSBN_OPENMP=ON, and even then one thread until
 * sbn_set_threads() asks for more: one rank per core is the MPI norm, and
 * a rank that also threads would fight its neighbours for cores.
 *
 * The split keeps every element's arithmetic that of one thread:
 *   - elementwise entries (normalize, bwd_apply, dropout) split the rows
 *     (a) or, with fewer rows than threads, the channels; any split gives
 *     the same bits.
 *   - reductions (moments, bwd_reduce) split the channels, a thread
 *     adding its channels' sums as one thread would, when a row holds
 *     runs of S > 1 or more than SBN__PAR_MAX_PARTIAL channels (with the
 *     reference kernels, bit for bit; a vector set may round a channel
 *     differently where it moves between a vector body and a tail).
 *     Narrower channels-last rows split the rows instead, each thread
 *     summing into its own zeroed partials, which are then added in
 *     thread order: the same bits for a given thread count, and rounding
 *     against one thread. */
#include "ops/sbn_ops.h"

#ifdef SBN_HAVE_OPENMP
#include <omp.h>
#include <pthread.h>
#endif

/* The requested thread count (1 without OpenMP). */
static int sbn__threads = 1;

int sbn_set_threads(int n) {
  if (n < 1)
    return sbn_set_error(SBN_EINVAL, "threads: %d, expected at least 1", n);
#ifdef SBN_HAVE_OPENMP
  __atomic_store_n(&sbn__threads, n, __ATOMIC_RELAXED);
  return 0;
#else
  if (n > 1)
    return sbn_set_error(SBN_ENOTSUP,
                         "threads: %d, but libsyncbn was built without "
                         "OpenMP (configure with -DSBN_OPENMP=ON)",
                         n);
  return 0;
#endif
}

int sbn_threads(void) {
  return __atomic_load_n(&sbn__threads, __ATOMIC_RELAXED);
}

#ifdef SBN_HAVE_OPENMP

/* The most channels whose per-thread partials live on a thread's stack
 * (2 x 8 KiB). Channels-last reductions up to that width split their
 * rows: a channel split calls the kernel once per row segment, which
 * measured 1.6 to 3 times slower than one thread for 128-channel
 * segments. Wider rows split the channels, in segments of at least 2 KiB
 * per call at 2 threads. */
#define SBN__PAR_MAX_PARTIAL 1024

/* Thread t's share [lo, hi) of n items. */
static void share(size_t n, int T, int t, size_t *lo, size_t *hi) {
  *lo = n * (size_t)t / (size_t)T;
  *hi = n * (size_t)(t + 1) / (size_t)T;
}

/* Reductions split over channels: per row a, the run of channels
 * [c0, c1) is the view (1, c1 - c0, S). */
static int split_channels(size_t C, size_t S) {
  return S > 1 || C > SBN__PAR_MAX_PARTIAL;
}

static void par_moments(const float *x, size_t A, size_t C, size_t S,
                        const float *k, double *s1, double *s2) {
  const sbn__kernels_t *kt = sbn__kernels();
  int T = sbn_threads();
  if (split_channels(C, S)) {
#pragma omp parallel num_threads(T)
    {
      size_t c0, c1;
      share(C, omp_get_num_threads(), omp_get_thread_num(), &c0, &c1);
      for (size_t a = 0; a < A && c1 > c0; a++)
        kt->moments(x + (a * C + c0) * S, 1, c1 - c0, S, k + c0, s1 + c0,
                    s2 + c0);
    }
    return;
  }
#pragma omp parallel num_threads(T)
  {
    int t = omp_get_thread_num(), n = omp_get_num_threads();
    double p1[SBN__PAR_MAX_PARTIAL], p2[SBN__PAR_MAX_PARTIAL];
    size_t a0, a1;
    share(A, n, t, &a0, &a1);
    for (size_t c = 0; c < C; c++)
      p1[c] = p2[c] = 0;
    if (a1 > a0)
      kt->moments(x + a0 * C, a1 - a0, C, 1, k, p1, p2);
    /* Added in thread order, so a thread count always gives one result. */
    for (int u = 0; u < n; u++) {
#pragma omp barrier
      if (u == t)
        for (size_t c = 0; c < C; c++) {
          s1[c] += p1[c];
          s2[c] += p2[c];
        }
    }
  }
}

static void par_bwd_reduce(const float *x, const float *dy, size_t A, size_t C,
                           size_t S, const double *mean, const double *istd,
                           double *sdy, double *sdyx) {
  const sbn__kernels_t *kt = sbn__kernels();
  int T = sbn_threads();
  if (split_channels(C, S)) {
#pragma omp parallel num_threads(T)
    {
      size_t c0, c1;
      share(C, omp_get_num_threads(), omp_get_thread_num(), &c0, &c1);
      for (size_t a = 0; a < A && c1 > c0; a++) {
        size_t off = (a * C + c0) * S;
        kt->bwd_reduce(x + off, dy + off, 1, c1 - c0, S, mean + c0, istd + c0,
                       sdy + c0, sdyx + c0);
      }
    }
    return;
  }
#pragma omp parallel num_threads(T)
  {
    int t = omp_get_thread_num(), n = omp_get_num_threads();
    double p1[SBN__PAR_MAX_PARTIAL], p2[SBN__PAR_MAX_PARTIAL];
    size_t a0, a1;
    share(A, n, t, &a0, &a1);
    for (size_t c = 0; c < C; c++)
      p1[c] = p2[c] = 0;
    if (a1 > a0)
      kt->bwd_reduce(x + a0 * C, dy + a0 * C, a1 - a0, C, 1, mean, istd, p1,
                     p2);
    for (int u = 0; u < n; u++) {
#pragma omp barrier
      if (u == t)
        for (size_t c = 0; c < C; c++) {
          sdy[c] += p1[c];
          sdyx[c] += p2[c];
        }
    }
  }
}

/* Elementwise entries: rows when there are enough of them, channels
 * otherwise. */
static void par_normalize(const float *x, float *y, size_t A, size_t C,
                          size_t S, const float *mh, const float *ml,
                          const float *scale, const float *shift) {
  const sbn__kernels_t *kt = sbn__kernels();
  int T = sbn_threads();
#pragma omp parallel num_threads(T)
  {
    int t = omp_get_thread_num(), n = omp_get_num_threads();
    size_t lo, hi;
    if (A >= (size_t)n) {
      share(A, n, t, &lo, &hi);
      if (hi > lo)
        kt->normalize(x + lo * C * S, y + lo * C * S, hi - lo, C, S, mh, ml,
                      scale, shift);
    } else {
      share(C, n, t, &lo, &hi);
      for (size_t a = 0; a < A && hi > lo; a++) {
        size_t off = (a * C + lo) * S;
        kt->normalize(x + off, y + off, 1, hi - lo, S, mh + lo, ml + lo,
                      scale + lo, shift + lo);
      }
    }
  }
}

static void par_bwd_apply(const float *x, const float *dy, float *dx, size_t A,
                          size_t C, size_t S, const double *mean,
                          const double *istd, const double *k1,
                          const double *k2, const double *k3) {
  const sbn__kernels_t *kt = sbn__kernels();
  int T = sbn_threads();
#pragma omp parallel num_threads(T)
  {
    int t = omp_get_thread_num(), n = omp_get_num_threads();
    size_t lo, hi;
    if (A >= (size_t)n) {
      share(A, n, t, &lo, &hi);
      size_t off = lo * C * S;
      if (hi > lo)
        kt->bwd_apply(x + off, dy + off, dx + off, hi - lo, C, S, mean, istd,
                      k1, k2, k3);
    } else {
      share(C, n, t, &lo, &hi);
      for (size_t a = 0; a < A && hi > lo; a++) {
        size_t off = (a * C + lo) * S;
        kt->bwd_apply(x + off, dy + off, dx + off, 1, hi - lo, S, mean + lo,
                      istd + lo, k1 + lo, k2 + lo, k3 + lo);
      }
    }
  }
}

/* Dropout splits at multiples of 4 elements, where a Philox block
 * starts, so each thread's `first` is a valid one. */
static void par_dropout(const float *in, float *out, size_t n, uint64_t first,
                        const uint32_t key[2], uint32_t step, uint32_t layer,
                        uint32_t thr, float scale) {
  const sbn__kernels_t *kt = sbn__kernels();
  int T = sbn_threads();
#pragma omp parallel num_threads(T)
  {
    size_t lo, hi, blocks = (n + 3) / 4;
    share(blocks, omp_get_num_threads(), omp_get_thread_num(), &lo, &hi);
    lo *= 4;
    hi = hi * 4 < n ? hi * 4 : n;
    if (hi > lo)
      kt->dropout(in + lo, out + lo, hi - lo, first + lo, key, step, layer, thr,
                  scale);
  }
}

/* The threaded table: a copy of the active set with the split entries
 * replaced, so entries that stay on one thread (LayerNorm's) and any
 * entry a set adds later come through unchanged. It is rebuilt when the
 * active set changes; the lock only orders builders, since
 * sbn_kernel_select() and sbn_set_threads() may not run concurrently
 * with computation anyway. */
static sbn__kernels_t sbn__par_table;
static const sbn__kernels_t *sbn__par_from;
static pthread_mutex_t sbn__par_lock = PTHREAD_MUTEX_INITIALIZER;

const sbn__kernels_t *sbn__kt(void) {
  const sbn__kernels_t *kt = sbn__kernels();
  if (sbn_threads() <= 1)
    return kt;
  if (__atomic_load_n(&sbn__par_from, __ATOMIC_ACQUIRE) != kt) {
    pthread_mutex_lock(&sbn__par_lock);
    if (sbn__par_from != kt) {
      sbn__par_table = *kt;
      sbn__par_table.moments = par_moments;
      sbn__par_table.normalize = par_normalize;
      sbn__par_table.bwd_reduce = par_bwd_reduce;
      sbn__par_table.bwd_apply = par_bwd_apply;
      sbn__par_table.dropout = par_dropout;
      __atomic_store_n(&sbn__par_from, kt, __ATOMIC_RELEASE);
    }
    pthread_mutex_unlock(&sbn__par_lock);
  }
  return &sbn__par_table;
}

#else

const sbn__kernels_t *sbn__kt(void) {
  return sbn__kernels();
}

#endif
