#!/bin/sh
# The Python package installs offline into a fresh virtual environment and
# works from another directory:
#   python_pkg_test.sh PYTHON SRC_PYTHON_DIR
# `PYTHON -m venv --system-site-packages` (numpy and msgpack come from the
# system), `pip install --no-build-isolation --no-index` of a copy of the
# package (the build leaves nothing in the source tree), then imports from
# /: syncbn comes from the venv, syncbn.torch imports when torch is there,
# and a client without a worker fails with ConnectError naming the path.
# Exit 77 (skip) without the venv module or pip (Debian: python3-venv).
set -u
PY=$1 SRC=$2
if ! "$PY" -c 'import ensurepip, venv' 2>/dev/null; then
  echo "SKIP: $PY has no venv/ensurepip (install python3-venv)"
  exit 77
fi
tmp=$(mktemp -d /tmp/sbn-pypkg-XXXXXX) || exit 1
trap 'rm -rf "$tmp"' EXIT
cp -r "$SRC" "$tmp/src"
rm -rf "$tmp/src/build" "$tmp/src"/*.egg-info
"$PY" -m venv --system-site-packages "$tmp/venv" || exit 1
if ! "$tmp/venv/bin/python" -m pip --version >/dev/null 2>&1; then
  echo "SKIP: the venv has no pip (install python3-pip)"
  exit 77
fi
"$tmp/venv/bin/python" -m pip install -q --no-build-isolation --no-index \
  "$tmp/src" || {
  echo "FAIL: pip install --no-build-isolation --no-index"
  exit 1
}
cd / || exit 1
SYNCBN_SOCKET=$tmp/none.sock "$tmp/venv/bin/python" - "$tmp/venv" <<'PYEOF'
import os, sys
import syncbn
venv = os.path.realpath(sys.argv[1])
where = os.path.realpath(syncbn.__file__)
assert where.startswith(venv + os.sep), "syncbn imported from %s, not the venv" % where
print("ok: syncbn %s from %s" % (syncbn.__version__, where))
try:
    syncbn.Client(wait=0.3)
except syncbn.ConnectError as e:
    assert os.environ["SYNCBN_SOCKET"] in str(e), str(e)
    print("ok: no worker: %s" % e)
else:
    raise SystemExit("FAIL: connected to a socket that does not exist")
os.environ.pop("SYNCBN_SOCKET")
try:
    syncbn.Client()
except syncbn.ConnectError as e:
    assert "SYNCBN_SOCKET" in str(e), str(e)
    print("ok: no socket given: %s" % e)
try:
    import torch  # noqa: F401
except ImportError:
    print("torch missing: syncbn.torch not imported")
else:
    import syncbn.torch as sbt
    m = sbt.convert_sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(3)))
    assert isinstance(m[0], sbt.SyncBatchNorm)
    print("ok: syncbn.torch from the venv converts a model")
print("PASS")
PYEOF
