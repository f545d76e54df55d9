#!/bin/bash
# Two builds of syncbnd and `syncbn bench service` alternately, each job
# with --timeline, so that a change to the worker shows both end to end
# (the bench's stats entry) and in the worker's own spans:
#   scripts/service_builds_ab.sh OUTDIR BIN_A BIN_B [RUNS] [bench options...]
# BIN_A and BIN_B are build/bin directories (syncbnd and syncbn of each
# build). OUTDIR gets a-K / b-K .json and .txt (the bench), a-K.rank-R.json
# (the timelines) and a-K.spans.txt (scripts/timeline_summary.py) for K =
# 1 .. RUNS (default 2); stdout gets, per run, the stats entry's median
# target_ratio over the shapes and the stats compute span's median. The
# timeline's writes slow every entry down; SBN_AB_TIMELINE=0 runs the jobs
# without it (the bench's figures only). Run it
# under the measurement lock and scripts/measure_alone.sh when other work
# shares the machine. Not used by CI.
set -u
out=${1:?usage: service_builds_ab.sh OUTDIR BIN_A BIN_B [RUNS] [bench options...]}
A=${2:?BIN_A}
B=${3:?BIN_B}
runs=${4:-2}
shift $(($# >= 4 ? 4 : 3))
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
export OMPI_ALLOW_RUN_AS_ROOT=${OMPI_ALLOW_RUN_AS_ROOT:-1}
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=${OMPI_ALLOW_RUN_AS_ROOT_CONFIRM:-1}
export OMPI_MCA_pml=${OMPI_MCA_pml:-ob1} OMPI_MCA_btl=${OMPI_MCA_btl:-self,vader,tcp}
MPI="mpirun --oversubscribe --bind-to none"
for i in $(seq "$runs"); do
  for v in a b; do
    bin=$A
    [ "$v" = b ] && bin=$B
    sock=$(mktemp -d /tmp/sbn-ab-XXXXXX)
    tl=()
    [ "${SBN_AB_TIMELINE:-1}" = 0 ] || tl=(--timeline "$out/$v-$i-tl.json")
    $MPI -np 2 "$bin/syncbnd" --socket-dir "$sock/s" "${tl[@]}" >"$out/job-$v-$i.log" 2>&1 &
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
    [ $rc -eq 0 ] || { echo "service_builds_ab: bench ($v, run $i) exited $rc; see $out/$v-$i.txt" >&2; exit 1; }
    : >"$out/$v-$i.spans.txt"
    [ ${#tl[@]} -eq 0 ] ||
      /usr/bin/python3 "$here/timeline_summary.py" "$out/$v-$i"-tl.rank-*.json >"$out/$v-$i.spans.txt"
    /usr/bin/python3 - "$out/$v-$i.json" "$out/$v-$i.spans.txt" "$v" "$i" <<'P'
import json, statistics, sys
d = json.load(open(sys.argv[1]))
r = d["records"] if isinstance(d, dict) else d
tr = [x["target_ratio"] for x in r if x["variant"] == "service_stats1"]
spans = [l.split() for l in open(sys.argv[2]) if " compute " in l and l.split()[2] == "stats"]
med = ", ".join("%s" % s[4] for s in spans) or "(no timeline)"
print("%s run %s: stats entry target_ratio median %.2f (max %.2f, met %d of %d); "
      "stats compute span median per rank %s us" % (
          sys.argv[3], sys.argv[4], statistics.median(tr), max(tr),
          sum(t <= 1 for t in tr), len(tr), med))
P
  done
done
