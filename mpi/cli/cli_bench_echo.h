/* The Unix-socket echo of `bench service` (cli_bench_echo.c). */
#ifndef SBN_CLI_BENCH_ECHO_H
#define SBN_CLI_BENCH_ECHO_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

/* A thread that sends every frame back. start: SBN_ENOMEM, SBN_EIO; echo sends
 * len bytes of out and receives them into in. */
typedef struct sbn_bench_echo_s {
  int fd[2];
  pthread_t thread;
  int running;
  uint8_t *buf;
  size_t cap;
} sbn_bench_echo_t;
int sbn__bench_echo_start(sbn_bench_echo_t *e, size_t max_bytes);
int sbn__bench_echo(sbn_bench_echo_t *e, const void *out, size_t len, void *in);
void sbn__bench_echo_stop(sbn_bench_echo_t *e);

#endif /* SBN_CLI_BENCH_ECHO_H */
