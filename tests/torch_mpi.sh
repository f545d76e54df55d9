#!/bin/sh
# PyTorch CPU data parallelism through syncbnd:
#   torch_mpi.sh MPIRUN SYNCBND PYTHON EXAMPLE
# starts `mpirun -np 2 syncbnd`, waits for both ready lines, runs
# `mpirun -np 2 PYTHON EXAMPLE` (examples/python/torch_mpi_example.py) with
# uneven shards, and requires both ranks to report PASS: running statistics
# bit-identical across ranks and equal to torch.nn.BatchNorm2d on the whole
# batch. The job and the temporary directory are removed on every path.
# Exit 77 (skip) when PYTHON lacks torch (with gloo), numpy or msgpack.
set -u
MPIRUN=$1 SYNCBND=$2 PY=$3 EXAMPLE=$4
MPIFLAGS="--oversubscribe --bind-to none --mca pml ob1 --mca btl self,vader,tcp"

if ! "$PY" -c 'import msgpack, numpy, torch, torch.distributed as d
assert d.is_available() and d.is_gloo_available()' 2>/dev/null; then
  echo "SKIP: $PY lacks torch with gloo, numpy or msgpack (python3-torch python3-numpy python3-msgpack)"
  exit 77
fi

dir=$(mktemp -d /tmp/sbn-torchmpi-XXXXXX) || exit 1
job=
cleanup() {
  if [ -n "$job" ]; then
    kill -TERM "$job" 2>/dev/null
    i=0
    while kill -0 "$job" 2>/dev/null && [ $i -lt 50 ]; do
      sleep 0.2
      i=$((i + 1))
    done
    kill -KILL "$job" 2>/dev/null
    wait "$job" 2>/dev/null
  fi
  rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 1' INT TERM HUP PIPE

# mpirun's own --timeout ends the workers even if this script is killed.
# shellcheck disable=SC2086
"$MPIRUN" $MPIFLAGS --timeout 170 -np 2 "$SYNCBND" --socket-dir "$dir/s" \
  >"$dir/syncbnd.out" 2>&1 &
job=$!
i=0
while [ "$(grep -c 'ready on' "$dir/syncbnd.out")" -lt 2 ]; do
  if ! kill -0 "$job" 2>/dev/null || [ $i -ge 300 ]; then
    echo "FAIL: syncbnd did not get ready:"
    cat "$dir/syncbnd.out"
    exit 1
  fi
  sleep 0.2
  i=$((i + 1))
done
cat "$dir/syncbnd.out"


# One training job: train COUNTS STEPS. Both ranks must report PASS, all
# four running statistics equal across ranks, and every relative
# difference to torch.nn.BatchNorm2d at most 1e-6 (checked here again from
# the printed numbers).
train() {
  echo "== training, shards $1, $2 steps =="
  # A free TCP port for torch.distributed's rendezvous (the kernel picks
  # it; it is closed again before the trainers bind it).
  port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  # shellcheck disable=SC2086
  "$MPIRUN" $MPIFLAGS --timeout 120 -np 2 "$PY" "$EXAMPLE" \
    --socket-dir "$dir/s" --master-port "$port" --counts "$1" --steps "$2" \
    >"$dir/train.out" 2>&1
  rc=$?
  cat "$dir/train.out"
  if [ $rc -ne 0 ]; then
    echo "FAIL: the training job (shards $1) exited with $rc"
    exit 1
  fi
  for r in 0 1; do
    if ! grep -q "^rank $r: PASS$" "$dir/train.out"; then
      echo "FAIL: rank $r did not report PASS (shards $1)"
      exit 1
    fi
    n=$(grep -c "^rank $r: bn[01] running_[a-z]* *equal on all 2 ranks: yes; rel diff" "$dir/train.out")
    if [ "$n" -ne 4 ]; then
      echo "FAIL: rank $r reported $n of 4 running statistics equal across ranks"
      exit 1
    fi
    if ! awk -v r="$r" '$1 == "rank" && $2 == r":" && /rel diff to torch\.nn\.BatchNorm2d/ {
           n++; if ($NF + 0 > 1e-6) bad++ }
         END { exit !(n == 4 && bad == 0) }' "$dir/train.out"; then
      echo "FAIL: rank $r: a running statistic differs from torch by more than 1e-6"
      exit 1
    fi
  done
}

# Uneven shards, then an empty shard on rank 0 (fresh layers, same workers).
train 11,5 5
train 0,9 2
echo "PASS: 2 trainers through 2 syncbnd workers equal torch.nn.BatchNorm2d on the whole batch"
exit 0
