#!/usr/bin/env bash
# End-to-end tests of `syncbn train`, run by ctest (tests/train.cmake):
#   train_test.sh --syncbn BIN --mpirun BIN --data DIR GROUP
# GROUP is learns (a tiny MLP and CNN run at np 2 learn), equal (1 rank
# with batch 2B equals 2 ranks with B each, and uneven or empty shards, to
# rounding), repeat (two runs give identical numbers; a run stopped after
# an epoch and resumed from its checkpoint ends with the numbers of an
# uninterrupted one) or errors (bad arguments, missing and corrupt data,
# corrupt checkpoints: clear messages and the right exit status).
set -uo pipefail

SYNCBN= MPIEXEC= DATA=
while [ $# -gt 0 ]; do
  case "$1" in
    --syncbn) SYNCBN=$2; shift 2 ;;
    --mpirun) MPIEXEC=$2; shift 2 ;;
    --data) DATA=$2; shift 2 ;;
    *) break ;;
  esac
done
GROUP=${1:?usage: train_test.sh --syncbn B --mpirun B --data DIR GROUP}

T=$(mktemp -d /tmp/sbn_train_test.XXXXXX)
trap 'rm -rf "$T"' EXIT
fails=0
passes=0
ok() { passes=$((passes + 1)); echo "ok   $*"; }
bad() { fails=$((fails + 1)); echo "FAIL $*"; }

# run NP ARGS...: `syncbn train` under mpirun with NP ranks on a small
# subset, output in $T/out.
# NP 0 runs the program without mpirun (as one process), which is quicker
# for the errors found before any training.
run() {
  local np=$1
  shift
  if [ "$np" -eq 0 ]; then
    "$SYNCBN" train --no-progress --data "$DATA" "$@" >"$T/out" 2>&1
    return
  fi
  "$MPIEXEC" --oversubscribe --bind-to none --timeout 200 -np "$np" \
    "$SYNCBN" train --no-progress --data "$DATA" "$@" >"$T/out" 2>&1
}

# The epochs' train loss, test loss and test accuracy of a --csv file.
numbers() { cut -d, -f1-4 "$1"; }

# close A B TOL: every number of two --csv files within TOL (relative).
close() {
  paste -d, <(numbers "$1") <(numbers "$2") | awk -F, -v tol="$3" '
    NR == 1 { next }
    { for (i = 2; i <= 4; i++) { a = $i; b = $(i + 4); d = a - b;
        if (d < 0) d = -d; m = (a < 0 ? -a : a) + 1e-12;
        if (d > tol * m) { print "differ:", a, b; bad = 1 } } }
    END { exit bad }'
}

learns() {
  if run 2 --train-subset 2000 --epochs 2 --test-subset 5000 --json "$T/mlp.json" \
    --csv "$T/mlp.csv"; then
    acc=$(sed -n 's/^test accuracy \([0-9.]*\)%$/\1/p' "$T/out")
    first=$(sed -n 2p "$T/mlp.csv" | cut -d, -f2)
    last=$(sed -n 3p "$T/mlp.csv" | cut -d, -f2)
    if [ -n "$acc" ] && awk -v a="$acc" -v f="$first" -v l="$last" \
      'BEGIN { exit !(a > 65 && l < f) }'; then
      ok "mlp at np 2 learns: loss $first -> $last, accuracy $acc%"
    else
      bad "mlp at np 2 does not learn (accuracy '$acc', loss $first -> $last)"
      cat "$T/out"
    fi
    grep -q '"test_accuracy"' "$T/mlp.json" && ok "--json written" ||
      bad "--json has no test_accuracy"
  else
    bad "mlp run failed"
    cat "$T/out"
  fi
  if run 2 --model cnn --train-subset 2000 --batch 32 --lr 0.3 --epochs 2 \
    --test-subset 2000; then
    acc=$(sed -n 's/^test accuracy \([0-9.]*\)%$/\1/p' "$T/out")
    if [ -n "$acc" ] && awk -v a="$acc" 'BEGIN { exit !(a > 50) }'; then
      ok "cnn at np 2 learns: accuracy $acc%"
    else
      bad "cnn at np 2 does not learn (accuracy '$acc')"
      cat "$T/out"
    fi
  else
    bad "cnn run failed"
    cat "$T/out"
  fi
}

equal() {
  local model
  for model in mlp cnn; do
    local sub=1024
    [ "$model" = cnn ] && sub=256
    local small=(--model "$model" --train-subset $sub --test-subset 1000)
    run 1 "${small[@]}" --batch 64 --csv "$T/one.csv" ||
      { bad "$model np 1 failed"; cat "$T/out"; continue; }
    run 2 "${small[@]}" --batch 32 --csv "$T/two.csv" ||
      { bad "$model np 2 failed"; cat "$T/out"; continue; }
    close "$T/one.csv" "$T/two.csv" 1e-4 &&
      ok "$model syncbn: 1 rank x 64 = 2 ranks x 32" ||
      bad "$model syncbn: 1 rank x 64 != 2 ranks x 32"
    run 2 "${small[@]}" --counts 40,24 \
      --csv "$T/uneven.csv" && close "$T/one.csv" "$T/uneven.csv" 1e-4 &&
      ok "$model syncbn: --counts 40,24 = 1 rank x 64" ||
      bad "$model syncbn: --counts 40,24 differs"
    run 2 "${small[@]}" --counts 0,64 \
      --csv "$T/empty.csv" && close "$T/one.csv" "$T/empty.csv" 1e-4 &&
      ok "$model syncbn: --counts 0,64 (an empty shard) = 1 rank x 64" ||
      bad "$model syncbn: --counts 0,64 differs"
  done
  # Ghost batches: a sub-batch as large as the rank's batch is that rank's
  # own BatchNorm, bit for bit; one rank of 64 in ghost batches of 32
  # trains exactly as two ranks of 32 with per-rank BatchNorm (the train
  # loss; their running statistics differ by design, see README).
  local g=(--train-subset 1024 --test-subset 1000)
  run 2 "${g[@]}" --norm bn --batch 32 --csv "$T/bn.csv" &&
    run 2 "${g[@]}" --norm syncbn --ghost-batch 32 --batch 32 \
      --csv "$T/gh.csv" && cmp -s <(numbers "$T/bn.csv") <(numbers "$T/gh.csv") &&
    ok "--ghost-batch 32 of 32 per rank = --norm bn, bit for bit" ||
    bad "--ghost-batch 32 of 32 differs from --norm bn"
  run 1 "${g[@]}" --norm bn --ghost-batch 32 --batch 64 --csv "$T/gh1.csv" &&
    paste -d, <(cut -d, -f2 "$T/bn.csv") <(cut -d, -f2 "$T/gh1.csv") |
    awk -F, 'NR > 1 { d = $1 - $2; if (d < 0) d = -d;
      if (d > 1e-4 * ($1 < 0 ? -$1 : $1)) bad = 1 } END { exit bad }' &&
    ok "1 rank x 64 in ghost batches of 32 trains as 2 ranks x 32 (bn)" ||
    bad "1 rank x 64 in ghost batches of 32 differs from 2 ranks x 32"
  run 2 --model cnn --train-subset 256 --batch 32 --test-subset 1000 \
    --csv "$T/nchw.csv" &&
    run 2 --model cnn --train-subset 256 --batch 32 --test-subset 1000 \
      --layout nhwc --csv "$T/nhwc.csv" &&
    close "$T/nchw.csv" "$T/nhwc.csv" 1e-4 &&
    ok "cnn --layout nhwc = nchw" || bad "cnn --layout nhwc differs from nchw"
}

repeat() {
  local args=(--train-subset 1024 --batch 32 --epochs 3 --dropout 0.1
    --test-subset 2000)
  run 2 "${args[@]}" --csv "$T/a.csv" && run 2 "${args[@]}" --csv "$T/b.csv"
  if cmp -s <(numbers "$T/a.csv") <(numbers "$T/b.csv"); then
    ok "two runs give bit-identical numbers"
  else
    bad "two runs differ"
    paste "$T/a.csv" "$T/b.csv"
  fi
  run 2 "${args[@]}" --stop-after 1 --checkpoint "$T/ck" ||
    { bad "stopped run failed"; cat "$T/out"; }
  [ "$(grep -c '^epoch' "$T/out")" = 1 ] && ok "--stop-after 1 ran 1 epoch" ||
    bad "--stop-after 1 did not stop"
  run 2 "${args[@]}" --resume "$T/ck" --checkpoint "$T/ck" --csv "$T/c.csv" ||
    { bad "resumed run failed"; cat "$T/out"; }
  if cmp -s <(numbers "$T/a.csv") <(numbers "$T/c.csv"); then
    ok "resumed run equals the uninterrupted one"
  else
    bad "resumed run differs"
    paste "$T/a.csv" "$T/c.csv"
  fi
  run 2 "${args[@]}" --overlap --csv "$T/o.csv" &&
    cmp -s <(numbers "$T/a.csv") <(numbers "$T/o.csv") &&
    ok "--overlap: bit-identical to one allreduce after backward" ||
    bad "--overlap differs"
  run 2 --model cnn --train-subset 256 --batch 32 --epochs 1 \
    --test-subset 500 --csv "$T/co1.csv" &&
    run 2 --model cnn --train-subset 256 --batch 32 --epochs 1 \
      --test-subset 500 --overlap --csv "$T/co2.csv" &&
    cmp -s <(numbers "$T/co1.csv") <(numbers "$T/co2.csv") &&
    ok "cnn --overlap: bit-identical" || bad "cnn --overlap differs"
  run 2 "${args[@]}" --precise-bn 512 --csv "$T/p1.csv" &&
    run 2 "${args[@]}" --precise-bn 512 --csv "$T/p2.csv" &&
    cmp -s <(numbers "$T/p1.csv") <(numbers "$T/p2.csv") &&
    cmp -s <(cut -d, -f2 "$T/a.csv") <(cut -d, -f2 "$T/p1.csv") &&
    ! cmp -s <(cut -d, -f3 "$T/a.csv") <(cut -d, -f3 "$T/p1.csv") &&
    ok "--precise-bn: repeatable, same training, other test numbers" ||
    bad "--precise-bn: not repeatable or changes training"
  run 2 --model cnn --norm gn --train-subset 256 --batch 32 --epochs 2 \
    --test-subset 500 \
    --csv "$T/g1.csv" &&
    run 2 --model cnn --norm gn --train-subset 256 --batch 32 --epochs 2 \
    --test-subset 500 \
      --stop-after 1 --checkpoint "$T/ck2" &&
    run 2 --model cnn --norm gn --train-subset 256 --batch 32 --epochs 2 \
    --test-subset 500 \
      --resume "$T/ck2" --csv "$T/g2.csv" &&
    cmp -s <(numbers "$T/g1.csv") <(numbers "$T/g2.csv") &&
    ok "cnn gn: resumed run equals the uninterrupted one" ||
    bad "cnn gn: resume differs"
}

# expect STATUS TOKEN NP ARGS...: the run exits STATUS and its output
# names TOKEN.
expect() {
  local want=$1 token=$2 np=$3 rc=0
  shift 3
  run "$np" "$@" || rc=$?
  if [ "$rc" -ne "$want" ]; then
    bad "exit $rc, expected $want: train $*"
    cat "$T/out"
  elif ! grep -qF -- "$token" "$T/out"; then
    bad "output does not name '$token': train $*"
    cat "$T/out"
  else
    ok "exit $want naming '$token': train $*"
  fi
}

errors() {
  expect 2 "--model" 0 --model resnet
  expect 2 "--batch" 0 --batch 0
  expect 2 "--batch" 0 --batch 1 --train-subset 100
  expect 2 "--counts" 0 --counts 0 --norm none --train-subset 100
  expect 2 "--lr" 0 --lr -1
  expect 2 "--dropout" 0 --dropout 1
  expect 2 "--norm" 0 --norm in
  expect 2 "--norm" 0 --norm batch
  expect 2 "--groups" 0 --groups 4
  expect 2 "--ghost-batch" 0 --norm gn --ghost-batch 8
  expect 2 "--ghost-batch" 0 --ghost-batch 0
  expect 2 "--layout" 0 --layout nhwc
  expect 2 "--layout" 0 --model cnn --norm ln --layout nhwc
  expect 2 "--layout" 0 --model cnn --layout chw
  expect 2 "--precise-bn" 0 --norm gn --precise-bn 100
  expect 2 "--precise-bn" 0 --train-subset 256 --precise-bn 1000
  expect 2 "--counts" 2 --counts 8,8,8 --test-subset 100
  expect 2 "--counts" 0 --counts 1,x
  expect 2 "--epochs" 0 --epochs
  expect 2 "--stop-after" 0 --epochs 2 --stop-after 3
  expect 2 "--bogus" 0 --bogus
  expect 2 "--batch" 0 --train-subset 10 --batch 64
  expect 1 "dataset-fashion-mnist" 0 --data "$T/nothing"
  mkdir -p "$T/bad"
  for f in train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz \
    t10k-images-idx3-ubyte.gz; do
    ln -sf "$DATA/$f" "$T/bad/$f"
  done
  printf '\0\0\10\2\0\0\47\20' | gzip >"$T/bad/t10k-labels-idx1-ubyte.gz"
  expect 1 "t10k-labels-idx1-ubyte.gz: magic" 0 --data "$T/bad"
  head -c 5000 "$DATA/t10k-labels-idx1-ubyte.gz" \
    >"$T/bad/t10k-labels-idx1-ubyte.gz"
  expect 1 "t10k-labels-idx1-ubyte.gz" 0 --data "$T/bad"
  printf '\0\0\10\1\0\0\0\2\1\12' | gzip >"$T/bad/t10k-labels-idx1-ubyte.gz"
  expect 1 "t10k-labels-idx1-ubyte.gz" 0 --data "$T/bad"
  local args=(--train-subset 256 --batch 32 --epochs 2 --test-subset 100)
  run 1 "${args[@]}" --stop-after 1 --checkpoint "$T/ck" ||
    bad "checkpoint run failed"
  expect 1 "other options" 0 "${args[@]}" --seed 9 --resume "$T/ck"
  cp "$T/ck" "$T/ck.bad"
  printf '\377' | dd of="$T/ck.bad" bs=1 seek=100 conv=notrunc 2>/dev/null
  expect 1 "checksum" 0 "${args[@]}" --resume "$T/ck.bad"
  head -c 50 "$T/ck" >"$T/ck.short"
  expect 1 "ck.short" 0 "${args[@]}" --resume "$T/ck.short"
  expect 1 "cannot open" 0 "${args[@]}" --resume "$T/none"
}

case "$GROUP" in
  learns | equal | repeat | errors) "$GROUP" ;;
  *) echo "unknown group $GROUP" >&2; exit 2 ;;
esac
echo "$passes passed, $fails failed"
[ "$fails" -eq 0 ]
