#!/bin/bash
# The two-process exchange (mpi/comm_mpi.c) against Open MPI's
# MPI_Iallreduce (SBN_MPI_PAIR=0), alternately: `syncbn bench sizes` at
# np 2 twice each; prints the records_nonblocking avg/best µs per channel
# count (and keeps OUTDIR/{pair,nopair}-K.json). Not used by CI.
#   scripts/mpi_pair_ab.sh OUTDIR
set -u
out=${1:?usage: mpi_pair_ab.sh OUTDIR}
here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
export OMPI_ALLOW_RUN_AS_ROOT=${OMPI_ALLOW_RUN_AS_ROOT:-1}
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=${OMPI_ALLOW_RUN_AS_ROOT_CONFIRM:-1}
export OMPI_MCA_pml=${OMPI_MCA_pml:-ob1} OMPI_MCA_btl=${OMPI_MCA_btl:-self,vader,tcp}
for i in 1 2; do
  for v in pair nopair; do
    if [ "$v" = nopair ]; then export SBN_MPI_PAIR=0; else unset SBN_MPI_PAIR; fi
    mpirun --oversubscribe --bind-to none -np 2 "$here/build/bin/syncbn" bench sizes \
      --json "$out/$v-$i.json" >/dev/null 2>&1 || { echo "mpi_pair_ab: bench sizes ($v) failed" >&2; exit 1; }
    /usr/bin/python3 - "$out/$v-$i.json" "$v" <<'P'
import json, sys
d = json.load(open(sys.argv[1]))
print("%-6s" % sys.argv[2], " ".join("%d:%.1f/%.1f" % (r["shape"][0], r["avg_us"], r["best_us"])
      for r in d["records"] if r["variant"] == "records_nonblocking" and r["shape"][0] >= 256))
P
  done
done
