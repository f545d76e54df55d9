#!/bin/bash
# Speculative agreement rounds on and off, alternately, in one locked run:
#   scripts/service_spec_ab.sh OUTDIR [RUNS] [bench service options...]
# Each run starts `mpirun -np 2 syncbnd` twice, once as is and once with
# --no-speculate, and points `syncbn bench service --socket-dir` at it
# (scripts/service_ab.sh); OUTDIR gets spec-K.json / nospec-K.json (and
# .txt) for K = 1 .. RUNS (default 2), and a summary of the stats entry's
# target_ratio per run on stdout. Run it under the measurement lock and
# scripts/measure_alone.sh when other work shares the machine. Not used by
# CI.
set -u
out=${1:?usage: service_spec_ab.sh OUTDIR [RUNS] [bench options...]}
runs=${2:-2}
shift $(($# >= 2 ? 2 : 1))
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${SBN_BIN:-$here/build/bin}
exec "$here/scripts/service_ab.sh" "$out" "$runs" "spec=$bin" \
  "nospec=$bin,--no-speculate" -- "$@"
