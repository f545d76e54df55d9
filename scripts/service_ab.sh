#!/bin/bash
# Variants of the syncbnd job, alternately, each serving one
# `syncbn bench service --socket-dir` run:
#   scripts/service_ab.sh OUTDIR RUNS NAME=BINDIR[,SYNCBND_OPTION...]... -- [bench options...]
# A variant is a build's bin directory (its syncbnd and syncbn) and the
# options its syncbnd starts with, e.g. before=/tmp/old/build/bin
# after=build/bin, or spec=build/bin nospec=build/bin,--no-speculate.
# An option mpi:ARG goes to the job's mpirun instead (default --bind-to
# none), e.g. bound=build/bin,mpi:--bind-to,mpi:core pins each worker to
# a core of its own.
# OUTDIR gets NAME-K.json and .txt (the bench) for K = 1 .. RUNS, and with
# SBN_AB_TIMELINE=1 the jobs' timelines (NAME-K-tl.rank-R.json) and their
# spans (NAME-K.spans.txt, scripts/timeline_summary.py; the timeline's
# writes slow every entry down). SBN_AB_NP sets the ranks (default 2).
# stdout gets, per variant and run, the
# stats entry's target_ratio over the shapes and, per shape, the entry
# against the bare allreduce. Run it under the measurement lock and
# scripts/measure_alone.sh when other work shares the machine. Not used by
# CI.
set -u
usage="usage: service_ab.sh OUTDIR RUNS NAME=BINDIR[,OPTION...]... -- [bench options...]"
out=${1:?$usage}
runs=${2:?$usage}
shift 2
variants=()
while [ $# -gt 0 ] && [ "$1" != -- ]; do
  variants+=("$1")
  shift
done
[ $# -gt 0 ] && shift
[ ${#variants[@]} -gt 0 ] || { echo "$usage" >&2; exit 2; }
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
export OMPI_ALLOW_RUN_AS_ROOT=${OMPI_ALLOW_RUN_AS_ROOT:-1}
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=${OMPI_ALLOW_RUN_AS_ROOT_CONFIRM:-1}
export OMPI_MCA_pml=${OMPI_MCA_pml:-ob1} OMPI_MCA_btl=${OMPI_MCA_btl:-self,vader,tcp}
MPI="mpirun --oversubscribe --bind-to none"
np=${SBN_AB_NP:-2}
for i in $(seq "$runs"); do
  for spec in "${variants[@]}"; do
    v=${spec%%=*}
    IFS=, read -r -a parts <<<"${spec#*=}"
    bin=${parts[0]}
    opt=()
    jobmpi=()
    for o in "${parts[@]:1}"; do
      case $o in
        mpi:*) jobmpi+=("${o#mpi:}") ;;
        *) opt+=("$o") ;;
      esac
    done
    [ ${#jobmpi[@]} -gt 0 ] || jobmpi=(--bind-to none)
    sock=$(mktemp -d /tmp/sbn-ab-XXXXXX)
    [ "${SBN_AB_TIMELINE:-0}" = 1 ] && opt+=(--timeline "$out/$v-$i-tl.json")
    mpirun --oversubscribe "${jobmpi[@]}" -np "$np" "$bin/syncbnd" --socket-dir "$sock/s" "${opt[@]}" >"$out/job-$v-$i.log" 2>&1 &
    job=$!
    for _ in $(seq 200); do
      n=$(grep -c 'ready on' "$out/job-$v-$i.log" 2>/dev/null)
      [ "${n:-0}" -ge "$np" ] && break
      sleep 0.1
    done
    $MPI --timeout 300 -np "$np" "$bin/syncbn" bench service --socket-dir "$sock/s" \
      "$@" --json "$out/$v-$i.json" >"$out/$v-$i.txt" 2>&1
    rc=$?
    kill -TERM "$job"
    wait "$job"
    rm -rf "$sock" "$out/job-$v-$i.log"
    [ $rc -eq 0 ] || { echo "service_ab: bench ($v, run $i) exited $rc; see $out/$v-$i.txt" >&2; exit 1; }
    spans=/dev/null
    if [ "${SBN_AB_TIMELINE:-0}" = 1 ]; then
      spans=$out/$v-$i.spans.txt
      /usr/bin/python3 "$here/timeline_summary.py" "$out/$v-$i"-tl.rank-*.json >"$spans"
    fi
    /usr/bin/python3 - "$out/$v-$i.json" "$v" "$i" "$spans" <<'P'
import json, statistics, sys
d = json.load(open(sys.argv[1]))
r = d["records"] if isinstance(d, dict) else d
st = [x for x in r if x["variant"] == "service_stats1"]
ar = {tuple(x["shape"]): x for x in r if x["variant"] == "allreduce1"}
tr = [x["target_ratio"] for x in st]
spans = [l.split() for l in open(sys.argv[4]) if " compute " in l]
comp = ", ".join(s[4] for s in spans if s[2] == "stats")
print("%-6s run %s: stats entry target_ratio median %.2f, max %.2f, met %d of %d%s" % (
    sys.argv[2], sys.argv[3], statistics.median(tr), max(tr), sum(t <= 1 for t in tr), len(tr),
    "; stats compute span median per rank %s us" % comp if comp else ""))
for x in st:
    a = ar[tuple(x["shape"])]
    print("    %-14s entry %6.0f us (best %5.0f)  bare %6.0f us (best %5.0f)  target_ratio %.2f" % (
        "x".join(map(str, x["shape"])), x["median_us"], x["best_us"], a["median_us"], a["best_us"], x["target_ratio"]))
P
  done
done
