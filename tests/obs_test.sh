#!/bin/sh
# What a worker says it does: obs_test.sh MPIRUN SYNCBND SYNCBN PYTHON
# runs `mpirun -np 2 syncbnd --log-level info --timeline T --tcp ...
# -- PYTHON tests/obs_child.py` (see there) and checks
# - stderr: one line per event with the rank (and the layer and step):
#   connects, LAYER_MISMATCH on both ranks, STALL on rank 0, the refused
#   token, clients leaving;
# - each rank's timeline is valid JSON (Chrome trace events) with
#   negotiation, allreduce and compute events of that rank;
# - `syncbn metrics` (checked by the child) and `--log-level bogus` (exit 2).
# Exit 77 (skip) without numpy/msgpack.
set -u
MPIRUN=$1 SYNCBND=$2 SYNCBN=$3 PY=$4
HERE=$(cd "$(dirname "$0")" && pwd)
"$PY" -c 'import numpy, msgpack' 2>/dev/null || {
  echo "SKIP: $PY lacks numpy or msgpack"
  exit 77
}
tmp=$(mktemp -d /tmp/sbn-obs-XXXXXX) || exit 1
trap 'rm -rf "$tmp"' EXIT
fail=0
bad() {
  echo "FAIL: $*"
  fail=1
}
"$SYNCBND" --log-level bogus >"$tmp/o" 2>&1
[ $? -eq 2 ] && grep -q "log-level: expected error, warn, info or debug" "$tmp/o" ||
  bad "--log-level bogus: $(cat "$tmp/o")"
head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$tmp/token"
chmod 600 "$tmp/token"
# Port 0: each rank's listener gets a free port from the system (a port
# picked here, plus the rank, could be taken by then) and the child reads
# it from SYNCBN_TCP.
"$MPIRUN" --oversubscribe --bind-to none --mca pml ob1 --mca btl self,vader,tcp \
  --timeout 90 -np 2 "$SYNCBND" --log-level info --timeline "$tmp/tl.json" \
  --stall-timeout 1 --tcp "127.0.0.1:0" --token-file "$tmp/token" \
  -- "$PY" "$HERE/obs_child.py" "$SYNCBN" "$tmp/token" >"$tmp/out" 2>"$tmp/err"
rc=$?
cat "$tmp/out" "$tmp/err"
[ $rc -eq 0 ] || bad "the job exited $rc"
for r in 0 1; do
  grep -q "^syncbnd: rank $r: info: client connected" "$tmp/err" ||
    bad "rank $r: no connect line"
  grep -q "^syncbnd: rank $r: warn: step 0: LAYER_MISMATCH: layer 'obs.mm' step 0" "$tmp/err" ||
    bad "rank $r: no mismatch line naming the layer and step"
  grep -q "^syncbnd: rank $r: warn: client refused: UNAUTHORIZED" "$tmp/err" ||
    bad "rank $r: no authentication failure line"
  grep -q "^syncbnd: rank $r: info: client left (bye)" "$tmp/err" &&
    grep -q "^syncbnd: rank $r: info: client disconnected" "$tmp/err" ||
    bad "rank $r: no leave line"
  grep -q "^rank $r: metrics ok" "$tmp/out" || bad "rank $r: metrics"
done
grep -q "^syncbnd: rank 0: warn: step 0: STALL: layer 'obs.st' step 0 .*ranks 1 did not submit" "$tmp/err" ||
  bad "rank 0: no stall line naming the layer, step and missing rank"
"$PY" - "$tmp" <<'PYEOF' || fail=1
import json, sys
d = sys.argv[1]
for r in (0, 1):
    ev = json.load(open("%s/tl.rank-%d.json" % (d, r)))
    cats = {e.get("cat") for e in ev if e.get("ph") == "X"}
    pids = {e["pid"] for e in ev}
    names = {e["name"] for e in ev if e.get("cat") == "compute"}
    ok = {"negotiation", "allreduce", "compute"} <= cats and pids == {r} and \
        any("obs.ok" in n for n in names)
    print("rank %d timeline: %d events, %s: %s" % (r, len(ev), sorted(c for c in cats if c),
                                                  "ok" if ok else "FAIL"))
    if not ok:
        sys.exit(1)
PYEOF
[ "$fail" -eq 0 ] && echo "PASS: logs, timelines and metrics"
exit "$fail"
