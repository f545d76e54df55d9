#!/bin/bash
# Speculative agreement rounds on and off, alternately, in one locked run:
#   scripts/service_spec_ab.sh OUTDIR [RUNS] [bench service options...]
# Each run starts `mpirun -np 2 syncbnd` twice, once as is and once with
# --no-speculate, and points `syncbn bench service --socket-dir` at it;
# OUTDIR gets spec-K.json / nospec-K.json (and .txt) for K = 1 .. RUNS
# (default 2), and a summary of the stats entry's target_ratio per run on
# stdout. Run it under the measurement lock and scripts/measure_alone.sh
# when other work shares the machine. Not used by CI.
set -u
out=${1:?usage: service_spec_ab.sh OUTDIR [RUNS] [bench options...]}
runs=${2:-2}
shift $(($# >= 2 ? 2 : 1))
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${SBN_BIN:-$here/build/bin}
mkdir -p "$out"
export OMPI_ALLOW_RUN_AS_ROOT=${OMPI_ALLOW_RUN_AS_ROOT:-1}
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=${OMPI_ALLOW_RUN_AS_ROOT_CONFIRM:-1}
export OMPI_MCA_pml=${OMPI_MCA_pml:-ob1} OMPI_MCA_btl=${OMPI_MCA_btl:-self,vader,tcp}
MPI="mpirun --oversubscribe --bind-to none"
for i in $(seq "$runs"); do
  for v in spec nospec; do
    sock=$(mktemp -d /tmp/sbn-ab-XXXXXX)
    opt=()
    [ "$v" = nospec ] && opt=(--no-speculate)
    $MPI -np 2 "$bin/syncbnd" --socket-dir "$sock/s" "${opt[@]}" >"$out/job-$v-$i.log" 2>&1 &
    job=$!
    for _ in $(seq 200); do
      n=$(grep -c 'ready on' "$out/job-$v-$i.log" 2>/dev/null)
      [ "${n:-0}" -ge 2 ] && break
      sleep 0.1
    done
    $MPI --timeout 300 -np 2 "$bin/syncbn" bench service --socket-dir "$sock/s" \
      "$@" --json "$out/$v-$i.json" >"$out/$v-$i.txt" 2>&1
    rc=$?
    kill -TERM "$job"
    wait "$job"
    rm -rf "$sock"
    [ $rc -eq 0 ] || { echo "service_spec_ab: bench ($v, run $i) exited $rc; see $out/$v-$i.txt" >&2; exit 1; }
    /usr/bin/python3 - "$out/$v-$i.json" "$v" "$i" <<'P'
import json, statistics, sys
d = json.load(open(sys.argv[1]))
r = d["records"] if isinstance(d, dict) else d
st = [x for x in r if x["variant"] == "service_stats1"]
ar = {tuple(x["shape"]): x for x in r if x["variant"] == "allreduce1"}
tr = [x["target_ratio"] for x in st]
print("%-6s run %s: stats entry target_ratio median %.2f, max %.2f, met %d of %d" % (
    sys.argv[2], sys.argv[3], statistics.median(tr), max(tr), sum(t <= 1 for t in tr), len(tr)))
for x in st:
    a = ar[tuple(x["shape"])]
    print("    %-14s entry %6.0f us (best %5.0f)  bare %6.0f us (best %5.0f)  target_ratio %.2f" % (
        "x".join(map(str, x["shape"])), x["median_us"], x["best_us"], a["median_us"], a["best_us"], x["target_ratio"]))
P
  done
done
