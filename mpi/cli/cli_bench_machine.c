/* `syncbn bench`: what the tables are headed by, so that a number can be
 * told apart from one measured elsewhere: the CPU model and cores, the MPI
 * library and the date. */
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cli_bench.h"

void sbn__bench_cpu(char *buf, size_t n) {
  char line[512], model[256] = "unknown CPU";
  FILE *f = fopen("/proc/cpuinfo", "r");
  while (f != NULL && fgets(line, sizeof line, f) != NULL) {
    char *colon = strchr(line, ':');
    if (strncmp(line, "model name", 10) == 0 && colon != NULL) {
      snprintf(model, sizeof model, "%s", colon + 2);
      model[strcspn(model, "\n")] = '\0';
      break;
    }
  }
  if (f != NULL)
    fclose(f);
  snprintf(buf, n, "%s (%ld cores)", model, sysconf(_SC_NPROCESSORS_ONLN));
}

void sbn__bench_mpi_version(char *buf, size_t n) {
  char v[MPI_MAX_LIBRARY_VERSION_STRING];
  int len = 0;
  /* MPI_Get_library_version may be called before MPI_Init, so `kernels`
   * (which runs without MPI) names the library too. */
  if (MPI_Get_library_version(v, &len) != MPI_SUCCESS)
    snprintf(v, sizeof v, "unknown MPI");
  v[strcspn(v, ",\n")] = '\0';
  snprintf(buf, n, "%s", v);
}

void sbn__bench_date(char *buf, size_t n) {
  time_t t = time(NULL);
  struct tm tm;
  gmtime_r(&t, &tm);
  strftime(buf, n, "%Y-%m-%dT%H:%M:%SZ", &tm);
}
