#!/bin/sh
# The installed tree works from another directory, without the build:
#   install_test.sh CMAKE BUILD_DIR MPIRUN PYTHON
# cmake --install into a temporary prefix, then from /:
# - syncbnd and syncbn run (RPATH $ORIGIN/../lib finds the libraries);
# - PROTOCOL.md, the C client header, the man pages and syncbn-mpi.pc are
#   installed, and a program built with `pkg-config syncbn-mpi` links and
#   runs;
# - `mpirun -np 1 syncbnd -- PYTHON` reaches the worker through the
#   installed Python package.
set -u
CMAKE=$1 BUILD=$2 MPIRUN=$3 PY=$4
tmp=$(mktemp -d /tmp/sbn-install-XXXXXX) || exit 1
trap 'rm -rf "$tmp"' EXIT
fail=0
bad() {
  echo "FAIL: $*"
  fail=1
}
"$CMAKE" --install "$BUILD" --prefix "$tmp/p" >"$tmp/install.log" 2>&1 || {
  cat "$tmp/install.log"
  echo "FAIL: cmake --install"
  exit 1
}
cd / || exit 1
unset LD_LIBRARY_PATH
P=$tmp/p
"$P/bin/syncbnd" --version | grep -q "^syncbnd [0-9.]* (protocol [0-9]*)$" ||
  bad "installed syncbnd --version"
"$P/bin/syncbn" --version >/dev/null || bad "installed syncbn --version"
readelf -d "$P/bin/syncbnd" | grep -q 'R.*PATH.*\$ORIGIN/\.\./lib' ||
  bad "syncbnd has no \$ORIGIN-relative RPATH"
for f in share/doc/syncbn/PROTOCOL.md include/syncbn/client.h \
  share/man/man1/syncbn.1 share/man/man1/syncbnd.1; do
  [ -f "$P/$f" ] || bad "$f is not installed"
done
pc=$(ls -d "$P"/lib*/pkgconfig | head -1)
if command -v pkg-config >/dev/null && command -v cc >/dev/null; then
  cat >"$tmp/t.c" <<'CEOF'
#include <mpi.h>
#include <stdio.h>
#include "syncbn_mpi.h"
int main(int argc, char **argv) {
  sbn_layer_params_t p;
  sbn_comm_t *c = NULL;
  MPI_Init(&argc, &argv);
  sbn_layer_params_default(&p, SBN_OP_BATCHNORM);
  int rc = sbn_mpi_comm_create(MPI_COMM_WORLD, 0, &p, &c);
  sbn_comm_destroy(c);
  MPI_Finalize();
  printf("comm %d\n", rc);
  return rc != 0;
}
CEOF
  # shellcheck disable=SC2046
  cc -o "$tmp/t" "$tmp/t.c" $(PKG_CONFIG_PATH=$pc pkg-config --cflags --libs syncbn-mpi) ||
    bad "a program built with pkg-config syncbn-mpi"
  LD_LIBRARY_PATH=$(dirname "$pc") "$tmp/t" | grep -q "comm 0" ||
    bad "the pkg-config syncbn-mpi program did not run"
fi
site=$(ls -d "$P"/lib/python3*/dist-packages 2>/dev/null | head -1)
if [ -z "$site" ] || [ ! -f "$site/syncbn/torch.py" ]; then
  bad "the Python package is not installed"
elif "$PY" -c 'import msgpack, numpy' 2>/dev/null; then
  PYTHONPATH=$site "$MPIRUN" --oversubscribe --bind-to none --mca pml ob1 \
    --mca btl self,vader,tcp --timeout 60 -np 1 "$P/bin/syncbnd" -- "$PY" -c '
import os, syncbn
assert syncbn.__file__.startswith(os.environ["PYTHONPATH"]), syncbn.__file__
h = syncbn.Client().hello()
print("hello rank %d of %d, protocol %d" % (h["rank"], h["size"], h["protocol"]))
' >"$tmp/py.out" 2>&1
  grep -q "hello rank 0 of 1" "$tmp/py.out" || {
    cat "$tmp/py.out"
    bad "the installed package through the installed syncbnd"
  }
fi
[ "$fail" -eq 0 ] && echo "PASS: the installed tree works from /"
exit "$fail"
