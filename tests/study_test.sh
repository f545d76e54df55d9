#!/usr/bin/env bash
# End-to-end tests of `syncbn study`, run by ctest (tests/study.cmake):
#   study_test.sh --syncbn BIN --mpirun BIN --data DIR --check PY GROUP
# GROUP is bookkeeping (sweeps 2, 3 and PreciseBN on a tiny subset at np 2:
# the emulated rank counts, seeds, the CSV/JSON schema, CSV == JSON, the
# tables), stats (sweep 1 at np 2: the real SyncBN merge equals local
# statistics, the errors fall as |S| grows) or errors (bad options and
# job shapes: clear messages and the right exit status).
set -uo pipefail

SYNCBN= MPIEXEC= DATA= CHECK=
while [ $# -gt 0 ]; do
  case "$1" in
    --syncbn) SYNCBN=$2; shift 2 ;;
    --mpirun) MPIEXEC=$2; shift 2 ;;
    --data) DATA=$2; shift 2 ;;
    --check) CHECK=$2; shift 2 ;;
    *) break ;;
  esac
done
GROUP=${1:?usage: study_test.sh --syncbn B --mpirun B --data D --check PY GROUP}
PY=/usr/bin/python3

T=$(mktemp -d /tmp/sbn_study_test.XXXXXX)
trap 'rm -rf "$T"' EXIT
fails=0
passes=0
ok() { passes=$((passes + 1)); echo "ok   $*"; }
bad() { fails=$((fails + 1)); echo "FAIL $*"; }

# run NP ARGS...: `syncbn study` (NP 0: without mpirun), output in $T/out.
run() {
  local np=$1
  shift
  if [ "$np" -eq 0 ]; then
    "$SYNCBN" study --no-progress --data "$DATA" "$@" >"$T/out" 2>&1
    return
  fi
  "$MPIEXEC" --oversubscribe --bind-to none --timeout 250 -np "$np" \
    "$SYNCBN" study --no-progress --data "$DATA" "$@" >"$T/out" 2>&1
}

# expect STATUS TEXT NP ARGS...: the run exits STATUS and says TEXT.
expect() {
  local want=$1 text=$2 np=$3
  shift 3
  run "$np" "$@"
  local rc=$?
  if [ "$rc" -eq "$want" ] && grep -qF -- "$text" "$T/out"; then
    ok "exit $want '$text': $*"
  else
    bad "wanted exit $want and '$text', got $rc: $*"
    cat "$T/out"
  fi
}

tiny=(--train-subset 256 --test-subset 100 --epochs 1)

bookkeeping() {
  if run 2 "${tiny[@]}" --sweeps norm,rank,precise --seeds 2 \
    --models mlp,cnn --norms bn,syncbn,gn,in --ranks 4 --out "$T/o"; then
    ok "tiny study ran"
  else
    bad "tiny study failed"
    cat "$T/out"
    return
  fi
  if "$PY" "$CHECK" runs "$T/o" --seeds 2 --ranks 4 --real 2 \
    --norms bn,syncbn,gn,in --stdout "$T/out"; then
    ok "sweeps 2, 3 and PreciseBN: bookkeeping, schema, CSV == JSON"
  else
    bad "the files or tables of sweeps 2, 3 and PreciseBN"
  fi
  # One rank: every rank count above 1 is emulated, the shards are 64.
  if run 1 "${tiny[@]}" --sweeps norm --models mlp --norms bn,syncbn --seeds 1 \
    --out "$T/o1" && "$PY" "$CHECK" runs "$T/o1" --seeds 1 --ranks 8 \
    --real 1 --norms bn,syncbn --need sweep2_norm_batch --stdout "$T/out"
  then
    ok "one rank: emulated counts"
  else
    bad "one rank"
    cat "$T/out"
  fi
}

stats() {
  if run 2 --sweeps stats --trials 20 --out "$T/s" &&
    "$PY" "$CHECK" stats "$T/s" --real 2 --stdout "$T/out"; then
    ok "sweep 1: real merge == local, errors fall with |S|"
  else
    bad "sweep 1"
    cat "$T/out"
  fi
}

errors() {
  expect 2 "--sweeps" 0 --sweeps 4
  expect 2 "--sweeps" 0 --sweeps stats,bogus
  expect 2 "--models" 0 --models resnet
  expect 2 "--norms" 0 --norms none
  expect 2 "--norms" 0 --norms bn,
  expect 2 "--seeds" 0 --seeds 0
  expect 2 "--epochs" 0 --epochs x
  expect 2 "--train-subset" 0 --train-subset 100
  expect 2 "--precise-bn" 0 --train-subset 1000 --precise-bn 2000
  expect 2 "--trials" 0 --trials
  expect 2 "--bogus" 0 --bogus
  expect 2 "unexpected argument" 0 extra
  expect 2 "global batch of 64" 3 --sweeps norm
  expect 2 "--ranks" 2 --sweeps rank --ranks 3
  expect 1 "dataset-fashion-mnist" 0 --data "$T/nothing" --sweeps norm
  touch "$T/file"
  expect 1 "--out" 0 "${tiny[@]}" --sweeps norm --models mlp \
    --norms gn --out "$T/file/sub"
  run 0 --help && grep -q "Sweeps" "$T/out" && ok "--help" || bad "--help"
}

case "$GROUP" in
  bookkeeping | stats | errors) "$GROUP" ;;
  *) echo "unknown group $GROUP" >&2; exit 2 ;;
esac
echo "$passes passed, $fails failed"
[ "$fails" -eq 0 ] && [ "$passes" -gt 0 ]
