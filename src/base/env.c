/* Switches read from the environment: the library's comparisons of one
 * path against another (benchmarks and tests flip them; a user never needs
 * to). */
#include <stdlib.h>

#include "base/sbn_base.h"

int sbn__env_bit(const char *name) {
  const char *e = getenv(name);
  if (e != NULL && (e[0] == '0' || e[0] == '1') && e[1] == '\0')
    return e[0] - '0';
  return -1;
}
