/* The rooms of `syncbn bench`, shared by its files: the options every mode
 * reads, the one record that every mode emits and every writer prints, the
 * timing and statistics helpers, and one entry per mode.
 *
 *   cli_bench.c          the subcommand: options, mode table, MPI set-up
 *   cli_bench_stats.c    clocks, median/p90, the max over ranks of a rep
 *   cli_bench_out.c      the column list; table, JSON and CSV writers
 *   cli_bench_machine.c  CPU model, cores, MPI library, kernel set, date
 *   cli_bench_kernels.c  `kernels`: every op and pass against a floor
 *   cli_bench_layer.c    `layer`: BN vs SyncBN vs a bare allreduce
 *   cli_bench_network.c  `network`: ResNet-50's 53 BatchNorm layers
 *   cli_bench_sizes.c    `sizes`: an OSU-style allreduce latency table
 *   cli_bench_service.c  `service`: the layer measurement through syncbnd
 *   cli_bench_job.c      the syncbnd job that `service` starts
 *   cli_bench_echo.c     `service`'s copy floor: a Unix-socket echo
 */
#ifndef SBN_CLI_BENCH_H
#define SBN_CLI_BENCH_H

#include <mpi.h>
#include <stddef.h>
#include <stdio.h>

#include "syncbn.h"

/* Shapes given on the command line or by a mode's defaults. */
#define SBN_BENCH_MAX_SHAPES 64

typedef struct sbn_bench_opts_s {
  const char *mode;
  sbn_tensor_desc_t shapes[SBN_BENCH_MAX_SHAPES]; /* --shape, NCHW dims */
  int nshapes;
  size_t batches[16]; /* --batch: per-rank N values */
  int nbatches;
  int layouts;            /* bit 0 NCHW, bit 1 NHWC; 0 = the mode's default */
  const char *op;         /* --op, NULL for all */
  const char *kern;       /* --kernels */
  int reps, warmup;       /* 0 = the mode's default */
  int group_size;         /* --group-size, 0 = all ranks */
  int quick;              /* --quick */
  const char *json;       /* --json FILE or "-" */
  const char *csv;        /* --csv FILE or "-" */
  const char *socket_dir; /* service: an existing job's sockets */
  const char *self_exe;   /* argv[0] of the subcommand's process */
  int rank, size;         /* MPI_COMM_WORLD, 0 and 1 without MPI */
  int progress;           /* stderr is a terminal */
  size_t chunk;           /* layer: --chunk, SyncBN's params.reduce_chunk */
  int vs_unchunked;       /* layer: --vs-unchunked adds sync_unchunked */
  int threads;            /* --threads, 0 when not given */
  int gap_us;             /* service: --gap-us, the spin before each call */
  int rotate_mib;         /* --rotate-mib, 0 = SBN_BENCH_ROTATE_MIB */
} sbn_bench_opts_t;

/* What the copies a configuration rotates through add up to by default
 * (sbn__bench_copies). */
#define SBN_BENCH_ROTATE_MIB 64

/* One measured configuration. Numbers that do not apply to a record's mode
 * are NaN (JSON null, an empty CSV field, "-" in the table). */
typedef struct sbn_bench_rec_s {
  char mode[16], variant[24], op[16], pass[24], layout[8];
  sbn_tensor_desc_t shape;
  int ranks, group_size;
  double median_us, p90_us, best_us;
  double floor_us, floor_ratio, gbps;
  /* kernels: the same floor written with streaming stores, and the median
   * over it (cli_bench_floor.c). */
  double stream_floor_us, stream_floor_ratio;
  double overhead_us, overhead_pct, overhead_per_allreduce;
  /* layer: the median over reps of the time SyncBN spent inside its
   * reductions' MPI calls (the rank that spent most; sbn_mpi_comm_seconds). */
  double mpi_us;
  double bytes, avg_us, min_us, max_us, iterations;
  double hop_us, hop_ratio;
  /* service: a stats entry's target (1.5 x the bare allreduce + 50 us),
   * the entry's time over it, and the agreement bytes per rank and round
   * (the bit sets and gathered lists, not the records). */
  double target_us, target_ratio, agree_bytes_round;
} sbn_bench_rec_t;

/* The records of one run, in the order measured. */
typedef struct sbn_bench_out_s {
  sbn_bench_rec_t *recs;
  size_t n, cap;
} sbn_bench_out_t;

/* A record with every number NaN and the common fields set. */
sbn_bench_rec_t sbn__bench_rec(const sbn_bench_opts_t *o, const char *variant,
                               const char *op, const char *pass,
                               const sbn_tensor_desc_t *shape);
/* Appends r; SBN_ENOMEM. */
int sbn__bench_push(sbn_bench_out_t *out, const sbn_bench_rec_t *r);
/* Writes the table on f (headed by the machine) and the --json and --csv
 * files; 0 or SBN_EIO naming the file. Only rank 0 calls it. */
int sbn__bench_write(const sbn_bench_opts_t *o, const sbn_bench_out_t *out,
                     FILE *table);

/* Fills buf with "CPU model (N cores)", and the MPI library's first line. */
void sbn__bench_cpu(char *buf, size_t n);
void sbn__bench_mpi_version(char *buf, size_t n);
/* The UTC date and time, ISO 8601. */
void sbn__bench_date(char *buf, size_t n);

/* Seconds on the monotonic clock. */
double sbn__bench_now(void);
/* The floor kernels of `bench kernels` (cli_bench_floor.c): c = a + b, or
 * a copy of a when b is NULL, over n floats; with stream set, written with
 * non-temporal stores (the streaming floor), else through the cache (a
 * copy then is memcpy). */
void sbn__bench_floor(const float *a, const float *b, float *c, size_t n,
                      int stream);
/* Least warm-up time of a configuration, in seconds. The first
 * configuration of a run times its first milliseconds of work 3 to 4
 * times slower than later (seen here: local BatchNorm 1.7 ms against
 * 0.45 ms a few reps later, with 3 warm-up reps; a 0.3 s memory stream
 * before it did not help, 20 ms of its own reps did), which made the
 * first configuration's variants disagree for no reason of theirs. */
#define SBN__BENCH_MIN_WARM_S 0.05
/* Whether warm-up may end after w reps begun at t0: w >= warmup and the
 * slowest rank has warmed up for SBN__BENCH_MIN_WARM_S. A collective over
 * MPI_COMM_WORLD (without MPI, the local answer), so every rank runs the
 * same number of warm-up reps. */
int sbn__bench_warm_done(double t0, int w, int warmup);
/* Median and 90th percentile of v[0..n) (sorted in place). */
void sbn__bench_quantiles(double *v, int n, double *median, double *p90);
/* Replaces every v[i] by its maximum over the ranks of comm (one
 * MPI_Allreduce(MAX) of the whole vector after the reps, so that the reps
 * themselves are not slowed); a no-op for MPI_COMM_NULL. */
int sbn__bench_max_over_ranks(MPI_Comm comm, double *v, int n);
/* A barrier on MPI_COMM_WORLD that sleeps while it waits (MPI_Ibarrier,
 * tested every 50 us), for the service mode: a rank spinning in
 * MPI_Barrier would take a core from the syncbnd workers whose answer
 * the other rank is waiting for. A spinning MPI_Barrier follows it, so
 * that the ranks start the timed call together (the skew it spins away
 * is at most a sleep). */
int sbn__bench_quiet_barrier(void);
/* Sets r->median_us, r->p90_us and r->best_us (the fastest rep, the
 * number least disturbed by other work on the machine) from t[0..n)
 * seconds. */
void sbn__bench_set_times(sbn_bench_rec_t *r, double *t, int n);
/* "8x64x56x56". */
void sbn__bench_shape_str(const sbn_tensor_desc_t *d, char *buf, size_t n);
/* A progress line on stderr (only when it is a terminal, rank 0). */
void sbn__bench_progress(const sbn_bench_opts_t *o, const char *what,
                         const sbn_bench_rec_t *r);
/* The number of elements of d. */
size_t sbn__bench_numel(const sbn_tensor_desc_t *d);
/* Fills n floats with fixed, varied values (every run times the same
 * work). */
void sbn__bench_fill(float *v, size_t n, unsigned salt);
/* How many copies of a buffer of `bytes` to rotate through so that the
 * copies together pass rotate_mib MiB (0: SBN_BENCH_ROTATE_MIB), which
 * should exceed the last-level cache. */
int sbn__bench_copies(size_t bytes, int rotate_mib);

/* Rotating copies of one configuration's tensors: copy k of x is x + k*n.
 * x and dy hold fixed data; y and dx are written. The parameters have C
 * values (all ones and zeros), ws and saved the layer's sizes. */
/* Copy k of a tensor starts at k * stride floats (n rounded up to whole
 * 64-byte lines), and every buffer at a 64-byte boundary, as PyTorch's
 * CPU allocator and oneDNN place theirs: a bench on malloc's 16-byte
 * offset from the line measured split loads the peers never see. */
typedef struct sbn_bench_bufs_s {
  size_t n, c, stride;
  int copies;
  float *x, *y, *dy, *dx;
  float *w, *b, *dw, *db, *rm, *rv;
  void *ws, *saved;
  size_t ws_bytes, saved_bytes;
} sbn_bench_bufs_t;

/* Allocates for shape d (C = dims[1]) and the workspace and saved sizes
 * of layer (NULL: none), with the copies of o's --rotate-mib; SBN_ENOMEM
 * naming the bytes. */
int sbn__bench_bufs_alloc(sbn_bench_bufs_t *u, const sbn_bench_opts_t *o,
                          const sbn_tensor_desc_t *d, const sbn_layer_t *layer);
/* Grows ws and saved to the sizes of another layer on the same shape. */
int sbn__bench_bufs_fit(sbn_bench_bufs_t *u, const sbn_tensor_desc_t *d,
                        const sbn_layer_t *layer);
void sbn__bench_bufs_free(sbn_bench_bufs_t *u);
/* Runs a training forward and backward of layer on copy k. */
int sbn__bench_fwd_bwd(sbn_layer_t *layer, const sbn_tensor_desc_t *d,
                       sbn_bench_bufs_t *u, int k, uint64_t step);
/* Its two halves: the training forward, and the backward that uses the
 * saved state the forward of the same copy k left. */
int sbn__bench_fwd(sbn_layer_t *layer, const sbn_tensor_desc_t *d,
                   sbn_bench_bufs_t *u, int k, uint64_t step);
int sbn__bench_bwd(sbn_layer_t *layer, const sbn_tensor_desc_t *d,
                   sbn_bench_bufs_t *u, int k, uint64_t step);

/* The ResNet-50 BatchNorm layer shapes (C, H, W) of the `layer` mode, and
 * the 53 layers of the network in order. */
extern const size_t sbn__bench_resnet_shapes[9][3];
extern const size_t sbn__bench_resnet_layers[53][3];

/* The shapes of the layer and service modes: --shape, else the ResNet-50
 * shapes at each per-rank N (--batch, default 2, 8, 32; --quick: three
 * shapes at N = 2), each in every layout asked for (layouts: the mode's
 * default bits). Returns the count (at most max). */
int sbn__bench_layer_shapes(const sbn_bench_opts_t *o, int layouts,
                            sbn_tensor_desc_t *out, int max);
/* The reps of a mode: --reps, else def (--quick: quick). */
int sbn__bench_reps(const sbn_bench_opts_t *o, int def, int quick);

/* The modes. Each measures, pushes its records and returns 0 or a
 * negative code with sbn_last_error() set; MPI is initialized for all but
 * kernels. */
int sbn__bench_kernels(const sbn_bench_opts_t *o, sbn_bench_out_t *out);
int sbn__bench_layer(const sbn_bench_opts_t *o, sbn_bench_out_t *out);
int sbn__bench_network(const sbn_bench_opts_t *o, sbn_bench_out_t *out);
int sbn__bench_sizes(const sbn_bench_opts_t *o, sbn_bench_out_t *out);
int sbn__bench_service(const sbn_bench_opts_t *o, sbn_bench_out_t *out);

#endif /* SBN_CLI_BENCH_H */
