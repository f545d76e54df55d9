#!/usr/bin/env bash
# End-to-end tests of `syncbn apply` and `syncbn bench`, run by ctest
# (tests/cli.cmake):
#   cli_test.sh --syncbn BIN --npygen BIN --npycmp BIN [--mpirun BIN] GROUP [NP]
#     [MODE]
# GROUP is basic (outputs and what they hold), errors (every refused input
# exits non-zero with one line naming the flag or file, and clobbers
# nothing), bench (bench kernels on tiny shapes, its records checked by
# bench_check.py, and bench's usage errors), benchmpi (bench MODE --quick
# at NP ranks, its records checked) or sync (NP ranks under mpirun equal
# one process).
set -uo pipefail

SYNCBN= NPYGEN= NPYCMP= MPIEXEC= RANKS=
CHECKER=$(dirname "$0")/bench_check.py
while [ $# -gt 0 ]; do
  case "$1" in
    --syncbn) SYNCBN=$2; shift 2 ;;
    --npygen) NPYGEN=$2; shift 2 ;;
    --npycmp) NPYCMP=$2; shift 2 ;;
    --mpirun) MPIEXEC=$2; shift 2 ;;
    *) break ;;
  esac
done
GROUP=${1:?usage: cli_test.sh --syncbn B --npygen B --npycmp B GROUP [NP]}
NP=${2:-1}

T=$(mktemp -d /tmp/sbn_cli_test.XXXXXX)
trap 'rm -rf "$T"' EXIT
fails=0
passes=0

ok() { passes=$((passes + 1)); echo "ok   $*"; }
bad() { fails=$((fails + 1)); echo "FAIL $*"; }

# check DESCRIPTION COMMAND...: the command must succeed.
check() {
  local d=$1
  shift
  if "$@" >"$T/check.out" 2>&1; then
    ok "$d"
  else
    bad "$d"
    sed 's/^/     /' "$T/check.out"
  fi
}

# expect_fail STATUS TOKEN ARGS...: `syncbn apply ARGS` (with --out-dir
# $T/never unless ARGS give one or NO_OUT_DIR is set) must exit with STATUS, print exactly one
# line on stderr containing TOKEN, and create nothing.
expect_fail() {
  local want=$1 token=$2 rc=0
  shift 2
  local args=("$@")
  case " $* " in
    *" --out-dir "*) ;;
    *) [ -n "${NO_OUT_DIR:-}" ] || args+=(--out-dir "$T/never") ;;
  esac
  "$SYNCBN" apply "${args[@]}" >"$T/out" 2>"$T/err" || rc=$?
  if [ "$rc" -ne "$want" ]; then
    bad "exit $rc, expected $want: apply $*"
    sed 's/^/     /' "$T/err"
  elif ! grep -qF -- "$token" "$T/err"; then
    bad "stderr does not contain '$token': apply $*"
    sed 's/^/     /' "$T/err"
  elif [ "$(wc -l <"$T/err")" -ne 1 ]; then
    bad "stderr is not one line: apply $*"
    sed 's/^/     /' "$T/err"
  elif [ -e "$T/never" ]; then
    bad "a failing run created its output directory: apply $*"
  else
    ok "apply $* -> exit $rc: $(cat "$T/err")"
  fi
  rm -rf "$T/never"
}

# refute DESCRIPTION COMMAND...: the check must run and say no (exit 1).
refute() {
  local d=$1 rc=0
  shift
  "$@" >"$T/check.out" 2>&1 || rc=$?
  if [ "$rc" -eq 1 ]; then
    ok "$d"
  else
    bad "$d (exit $rc)"
    sed 's/^/     /' "$T/check.out"
  fi
}

gen() { "$NPYGEN" "$@" || { echo "npygen $* failed"; exit 1; }; }

# Inputs shared by the groups: x with per-channel means 3 + 10c and standard
# deviations 2 (1 + c), its channels-last twin, gradients, affine parameters.
gen --seed 1 --mean 3 --std 2 --vary 1 "$T/x.npy" 12,4,5,6
gen --seed 1 --mean 3 --std 2 --vary 1 "$T/x5.npy" 5,4,5,6
gen --seed 1 --mean 3 --std 2 --vary 1 --f8 "$T/x64.npy" 12,4,5,6
gen --seed 2 --mean 3 --std 2 --vary 3 "$T/xh.npy" 12,5,6,4
gen --seed 3 "$T/dy.npy" 12,4,5,6
gen --seed 4 "$T/dyh.npy" 12,5,6,4
gen --seed 5 --mean 1 --std 0.5 "$T/w.npy" 4
gen --seed 6 "$T/b.npy" 4
gen --seed 7 --mean 1 "$T/wl.npy" 5,6
gen --seed 8 "$T/bl.npy" 5,6
gen --seed 9 "$T/x2.npy" 1,4

apply() { "$SYNCBN" apply "$@"; }

group_basic() {
  local o
  check "syncbn --help" "$SYNCBN" --help
  check "syncbn apply --help" apply --help
  "$SYNCBN" apply --help >"$T/help"
  for f in op x dy weight bias running-mean running-var num-batches-tracked \
    no-running-stats eps momentum cumulative eval layout groups norm-dims \
    p seed layer step sync counts group-size ghost-batch out-dir; do
    check "apply --help documents --$f" grep -q -- "--$f" "$T/help"
  done
  local rc=0
  "$SYNCBN" frobnicate >/dev/null 2>"$T/err" || rc=$?
  check "syncbn frobnicate exits 2 with a usage" \
    test "$rc" -eq 2 -a -s "$T/err"
  rc=0
  "$SYNCBN" >/dev/null 2>&1 || rc=$?
  check "syncbn without a command exits 2" test "$rc" -eq 2

  # BatchNorm, training, affine, backward, fresh running statistics.
  o=$T/bn
  check "batchnorm train" apply --op batchnorm --x "$T/x.npy" --dy "$T/dy.npy" \
    --weight "$T/w.npy" --bias "$T/b.npy" --out-dir "$o/sub/dir"
  apply --op batchnorm --x "$T/x.npy" --out-dir "$o/plain" >"$T/sum" 2>&1
  check "batchnorm summary says MPI was not initialized" \
    grep -q "MPI not initialized" "$T/sum"
  check "batchnorm summary counts the batch" \
    grep -q "num_batches_tracked 0 -> 1" "$T/sum"
  for f in y dx; do
    check "bn $f shape" "$NPYCMP" --shape "$o/sub/dir/$f.npy" 12,4,5,6
  done
  for f in dweight dbias running_mean running_var; do
    check "bn $f shape" "$NPYCMP" --shape "$o/sub/dir/$f.npy" 4
  done
  check "bn y: per-channel mean 0, var 1" \
    "$NPYCMP" --moments "$o/plain/y.npy" 1 0 1 1e-3
  refute "x itself is not normalized (the check can fail)" \
    "$NPYCMP" --moments "$T/x.npy" 1 0 1 1e-3
  check "float64 input gives the same y" apply --op batchnorm \
    --x "$T/x64.npy" --out-dir "$o/f8"
  check "float64 y equals float32 y" \
    "$NPYCMP" "$o/f8/y.npy" "$o/plain/y.npy" 0
  check "no affine writes no dweight" test ! -e "$o/plain/dweight.npy"

  # Ghost batches: one sub-batch of the whole batch is plain BatchNorm; with
  # sub-batches of 5, 5 and 2 samples each is normalized on its own, so the
  # whole y still has per-channel mean 0 and variance 1 but differs from
  # the plain one.
  check "batchnorm --ghost-batch 12 (N = 12)" apply --op batchnorm \
    --x "$T/x.npy" --ghost-batch 12 --out-dir "$o/ghost12"
  check "--ghost-batch 12 equals plain BatchNorm bit for bit" \
    "$NPYCMP" "$o/ghost12/y.npy" "$o/plain/y.npy" 0
  apply --op batchnorm --x "$T/x.npy" --dy "$T/dy.npy" --ghost-batch 5 \
    --out-dir "$o/ghost5" >"$T/sum" 2>&1
  check "batchnorm --ghost-batch 5 summary names the ghost batches" \
    grep -q "statistics of each ghost batch of 5 samples" "$T/sum"
  check "ghost y: per-channel mean 0, var 1" \
    "$NPYCMP" --moments "$o/ghost5/y.npy" 1 0 1 1e-3
  refute "ghost y differs from plain y" \
    "$NPYCMP" "$o/ghost5/y.npy" "$o/plain/y.npy" 1e-3
  check "batchnorm --ghost-batch 0 is off" apply --op batchnorm \
    --x "$T/x.npy" --ghost-batch 0 --out-dir "$o/ghost0"
  check "--ghost-batch 0 equals plain BatchNorm" \
    "$NPYCMP" "$o/ghost0/y.npy" "$o/plain/y.npy" 0

  # Running statistics passed in: used in eval (unchanged), updated in train.
  apply --op batchnorm --x "$T/x.npy" --running-mean "$o/plain/running_mean.npy" \
    --running-var "$o/plain/running_var.npy" --num-batches-tracked 5 \
    --out-dir "$o/train2" >"$T/sum" 2>&1
  check "given num_batches_tracked is counted on" \
    grep -q "num_batches_tracked 5 -> 6" "$T/sum"
  refute "a second training step moves running_mean" \
    "$NPYCMP" "$o/train2/running_mean.npy" "$o/plain/running_mean.npy" 1e-3
  check "batchnorm eval" apply --op batchnorm --eval --x "$T/x.npy" \
    --running-mean "$o/plain/running_mean.npy" \
    --running-var "$o/plain/running_var.npy" --out-dir "$o/eval"
  check "eval leaves running_mean unchanged" \
    "$NPYCMP" "$o/eval/running_mean.npy" "$o/plain/running_mean.npy" 0
  check "eval leaves running_var unchanged" \
    "$NPYCMP" "$o/eval/running_var.npy" "$o/plain/running_var.npy" 0
  refute "eval with running stats does not normalize the batch" \
    "$NPYCMP" --moments "$o/eval/y.npy" 1 0 1 1e-2
  check "--no-running-stats" apply --op batchnorm --no-running-stats --eval \
    --x "$T/x.npy" --out-dir "$o/norun"
  check "--no-running-stats eval uses batch statistics" \
    "$NPYCMP" --moments "$o/norun/y.npy" 1 0 1 1e-3
  check "--no-running-stats writes no running stats" \
    test ! -e "$o/norun/running_mean.npy"
  # The cumulative factor is 1/(num_batches_tracked + 1): momentum 1 after
  # no batches, momentum 0.5 after one.
  local rs=(--running-mean "$o/plain/running_mean.npy"
    --running-var "$o/plain/running_var.npy")
  check "cumulative" apply --op batchnorm --cumulative --x "$T/x.npy" \
    --out-dir "$o/cum0"
  check "momentum 1" apply --op batchnorm --momentum 1 --x "$T/x.npy" \
    --out-dir "$o/mom1"
  check "cumulative after 1 batch" apply --op batchnorm --cumulative \
    --num-batches-tracked 1 "${rs[@]}" --x "$T/x.npy" --out-dir "$o/cum1"
  check "momentum 0.5" apply --op batchnorm --momentum 0.5 "${rs[@]}" \
    --x "$T/x.npy" --out-dir "$o/mom05"
  for f in running_mean running_var; do
    check "cumulative after 0 batches = momentum 1: $f" \
      "$NPYCMP" "$o/cum0/$f.npy" "$o/mom1/$f.npy" 0
    check "cumulative after 1 batch = momentum 0.5: $f" \
      "$NPYCMP" "$o/cum1/$f.npy" "$o/mom05/$f.npy" 0
  done
  refute "momentum 0.5 differs from momentum 1" \
    "$NPYCMP" "$o/mom05/running_mean.npy" "$o/mom1/running_mean.npy" 1e-3

  # Channels-last.
  check "batchnorm nhwc" apply --op batchnorm --layout nhwc --x "$T/xh.npy" \
    --dy "$T/dyh.npy" --weight "$T/w.npy" --bias "$T/b.npy" --out-dir "$o/nhwc"
  check "nhwc y keeps the file's shape" "$NPYCMP" --shape "$o/nhwc/y.npy" 12,5,6,4
  check "nhwc running_mean has C entries" \
    "$NPYCMP" --shape "$o/nhwc/running_mean.npy" 4
  check "batchnorm nhwc no affine" apply --op batchnorm --layout nhwc \
    --x "$T/xh.npy" --out-dir "$o/nhwc2"
  check "nhwc y: per-channel (last axis) mean 0, var 1" \
    "$NPYCMP" --moments "$o/nhwc2/y.npy" 3 0 1 1e-3

  # The other normalizations.
  o=$T/other
  check "layernorm over 2 dims" apply --op layernorm --norm-dims 2 \
    --x "$T/x.npy" --dy "$T/dy.npy" --weight "$T/wl.npy" --bias "$T/bl.npy" \
    --out-dir "$o/ln"
  check "layernorm dweight has the normalized shape" \
    "$NPYCMP" --shape "$o/ln/dweight.npy" 5,6
  check "layernorm no affine" apply --op layernorm --norm-dims 3 \
    --x "$T/x.npy" --out-dir "$o/ln3"
  check "layernorm y: per-row mean 0, var 1" \
    "$NPYCMP" --moments "$o/ln3/y.npy" 0 0 1 1e-3
  check "instancenorm" apply --op instancenorm --x "$T/x.npy" --out-dir "$o/in"
  check "instancenorm y: per-instance mean 0, var 1" \
    "$NPYCMP" --moments "$o/in/y.npy" 0,1 0 1 1e-3
  check "instancenorm tracks nothing by default" \
    test ! -e "$o/in/running_mean.npy"
  check "instancenorm with running stats" apply --op instancenorm \
    --x "$T/x.npy" --running-mean "$T/bn/plain/running_mean.npy" \
    --running-var "$T/bn/plain/running_var.npy" --out-dir "$o/in2"
  check "instancenorm writes running stats when given" \
    "$NPYCMP" --shape "$o/in2/running_var.npy" 4
  check "instancenorm nhwc" apply --op instancenorm --layout nhwc \
    --x "$T/xh.npy" --out-dir "$o/inh"
  check "instancenorm nhwc y: per-instance mean 0, var 1" \
    "$NPYCMP" --moments "$o/inh/y.npy" 0,3 0 1 1e-3
  check "groupnorm 1 group" apply --op groupnorm --groups 1 --x "$T/x.npy" \
    --out-dir "$o/gn1"
  check "groupnorm 1 group y: per-sample mean 0, var 1" \
    "$NPYCMP" --moments "$o/gn1/y.npy" 0 0 1 1e-3
  check "groupnorm 4 groups = instancenorm" apply --op groupnorm --groups 4 \
    --x "$T/x.npy" --dy "$T/dy.npy" --weight "$T/w.npy" --bias "$T/b.npy" \
    --out-dir "$o/gn4"
  check "instancenorm affine" apply --op instancenorm --x "$T/x.npy" \
    --dy "$T/dy.npy" --weight "$T/w.npy" --bias "$T/b.npy" --out-dir "$o/ina"
  for f in y dx dweight dbias; do
    check "groupnorm(G=C) $f equals instancenorm $f" \
      "$NPYCMP" "$o/gn4/$f.npy" "$o/ina/$f.npy" 1e-6
  done
  check "dropout" apply --op dropout --p 0.3 --seed 7 --layer 2 --step 9 \
    --x "$T/x.npy" --dy "$T/dy.npy" --out-dir "$o/dr"
  check "dropout y is 0 or x/(1-p), about p zeroed" \
    "$NPYCMP" --dropout "$T/x.npy" "$o/dr/y.npy" 0.3 1e-6
  check "dropout dx uses the same mask" \
    "$NPYCMP" --dropout "$T/dy.npy" "$o/dr/dx.npy" 0.3 1e-6
  check "dropout again, another step" apply --op dropout --p 0.3 --seed 7 \
    --layer 2 --step 10 --x "$T/x.npy" --out-dir "$o/dr2"
  refute "dropout mask changes with --step" \
    "$NPYCMP" "$o/dr2/y.npy" "$o/dr/y.npy" 1e-3
  check "dropout eval is the identity" apply --op dropout --eval --x "$T/x.npy" \
    --out-dir "$o/dre"
  check "dropout eval y equals x" "$NPYCMP" "$o/dre/y.npy" "$T/x.npy" 0
}

group_errors() {
  local x=$T/x.npy
  expect_fail 2 "--x: required" --op batchnorm
  expect_fail 2 "--op: required" --x "$x"
  NO_OUT_DIR=1 expect_fail 2 "--out-dir: required" --op batchnorm --x "$x"
  expect_fail 2 "--out-dir: missing value" --op batchnorm --x "$x" --out-dir
  expect_fail 2 "--op: unknown op 'batchnrom'" --op batchnrom --x "$x"
  expect_fail 2 "--layout" --op layernorm --layout nhwc --x "$x"
  expect_fail 2 "--layout" --op dropout --layout nhwc --x "$x"
  expect_fail 2 "--layout: 'nwhc'" --op batchnorm --layout nwhc --x "$x"
  expect_fail 1 "--groups: 3 does not divide 4 channels" --op groupnorm \
    --groups 3 --x "$x"
  expect_fail 2 "--groups: required" --op groupnorm --x "$x"
  expect_fail 2 "--groups: '0'" --op groupnorm --groups 0 --x "$x"
  expect_fail 2 "--groups: does not apply to --op batchnorm" --op batchnorm \
    --groups 2 --x "$x"
  expect_fail 2 "--running-mean: given without --running-var" --op batchnorm \
    --running-mean "$T/w.npy" --x "$x"
  expect_fail 2 "--running-var: given without --running-mean" --op batchnorm \
    --running-var "$T/w.npy" --x "$x"
  expect_fail 2 "--weight: given without --bias" --op batchnorm \
    --weight "$T/w.npy" --x "$x"
  expect_fail 2 "--momentum: '2'" --op batchnorm --momentum 2 --x "$x"
  expect_fail 2 "--momentum: '-0.1'" --op batchnorm --momentum -0.1 --x "$x"
  expect_fail 2 "--momentum: 'nan'" --op batchnorm --momentum nan --x "$x"
  expect_fail 2 "--eps: '0'" --op batchnorm --eps 0 --x "$x"
  expect_fail 2 "--eps: 'nan'" --op layernorm --eps nan --x "$x"
  expect_fail 2 "--eps: 'inf'" --op layernorm --eps inf --x "$x"
  expect_fail 2 "--eps: '1e-5x'" --op layernorm --eps 1e-5x --x "$x"
  expect_fail 2 "--eps: ''" --op layernorm --eps "" --x "$x"
  expect_fail 2 "--eps: '-1e-5'" --op groupnorm --groups 2 --eps -1e-5 --x "$x"
  expect_fail 2 "--eps: does not apply to --op dropout" --op dropout \
    --eps 1e-3 --x "$x"
  expect_fail 2 "--p: '1.5'" --op dropout --p 1.5 --x "$x"
  expect_fail 2 "--p: does not apply to --op batchnorm" --op batchnorm \
    --p 0.5 --x "$x"
  expect_fail 2 "--seed: '-1'" --op dropout --seed -1 --x "$x"
  expect_fail 2 "--seed: '4294967296'" --op dropout --seed 4294967296 --x "$x"
  expect_fail 2 "--step: '18446744073709551616'" --op dropout \
    --step 18446744073709551616 --x "$x"
  expect_fail 2 "--layer: '1.0'" --op dropout --layer 1.0 --x "$x"
  expect_fail 2 "--layer: '4294967296'" --op dropout --layer 4294967296 \
    --x "$x"
  expect_fail 2 "--step: '-1'" --op dropout --step -1 --x "$x"
  expect_fail 2 "--p: 'half'" --op dropout --p half --x "$x"
  expect_fail 2 "--norm-dims: '0'" --op layernorm --norm-dims 0 --x "$x"
  expect_fail 2 "--groups: 'two'" --op groupnorm --groups two --x "$x"
  expect_fail 2 "--group-size: '0'" --op batchnorm --sync --group-size 0 \
    --x "$x"
  expect_fail 2 "--counts: ''" --op batchnorm --sync --counts "" --x "$x"
  expect_fail 2 "--counts: '6,6,'" --op batchnorm --sync --counts 6,6, --x "$x"
  expect_fail 2 "--op: given more than once" --op batchnorm --op layernorm \
    --x "$x"
  expect_fail 2 "--eval: given more than once" --op batchnorm --eval --eval \
    --x "$x"
  expect_fail 2 "--out-dir: empty path" --op batchnorm --x "$x" --out-dir ""
  expect_fail 2 "--num-batches-tracked: '-1'" --op batchnorm \
    --num-batches-tracked -1 --x "$x"
  expect_fail 2 "--num-batches-tracked: does not apply to --op instancenorm" \
    --op instancenorm --num-batches-tracked 1 --x "$x"
  expect_fail 2 "--norm-dims: '9'" --op layernorm --norm-dims 9 --x "$x"
  expect_fail 1 "--norm-dims: 5 exceeds the 4 dims" --op layernorm \
    --norm-dims 5 --x "$x"
  expect_fail 2 "--norm-dims: does not apply to --op batchnorm" \
    --op batchnorm --norm-dims 1 --x "$x"
  expect_fail 2 "--cumulative: conflicts with --momentum" --op batchnorm \
    --cumulative --momentum 0.5 --x "$x"
  expect_fail 2 "--cumulative: does not apply to --op instancenorm" \
    --op instancenorm --cumulative --x "$x"
  expect_fail 2 "--no-running-stats: conflicts" --op batchnorm \
    --no-running-stats --running-mean "$T/w.npy" --running-var "$T/w.npy" \
    --x "$x"
  expect_fail 2 "--counts: needs --sync" --op batchnorm --counts 6,6 --x "$x"
  expect_fail 2 "--group-size: needs --sync" --op batchnorm --group-size 1 \
    --x "$x"
  expect_fail 2 "--counts: '6,,6'" --op batchnorm --sync --counts 6,,6 --x "$x"
  expect_fail 2 "--counts: '6,-1'" --op batchnorm --sync --counts 6,-1 --x "$x"
  expect_fail 2 "--group-size: does not apply to --op layernorm" \
    --op layernorm --sync --group-size 2 --x "$x"
  expect_fail 2 "--ghost-batch: does not apply to --op layernorm" \
    --op layernorm --ghost-batch 2 --x "$x"
  expect_fail 2 "--ghost-batch: does not apply to --op groupnorm" \
    --op groupnorm --groups 2 --ghost-batch 2 --x "$x"
  expect_fail 2 "--ghost-batch: '-1'" --op batchnorm --ghost-batch -1 --x "$x"
  expect_fail 2 "--ghost-batch: 'two'" --op batchnorm --ghost-batch two \
    --x "$x"
  expect_fail 2 "unknown option '--frobnicate'" --op batchnorm --frobnicate \
    --x "$x"
  expect_fail 2 "unexpected argument 'extra'" --op batchnorm --x "$x" extra
  expect_fail 2 "--x: given more than once" --op batchnorm --x "$x" --x "$x"
  expect_fail 2 "--momentum: missing value" --op batchnorm --x "$x" \
    --out-dir "$T/never" --momentum

  # Files: missing, malformed, and shapes that do not fit.
  local d=$T/bad
  mkdir -p "$d"
  printf 'this is not a npy file' >"$d/magic.npy"
  "$NPYGEN" --raw "{'descr': '<f4', 'fortran_order': True, 'shape': (12, 4), }" 192 "$d/fortran.npy"
  "$NPYGEN" --raw "{'descr': '<i4', 'fortran_order': False, 'shape': (12, 4), }" 192 "$d/i4.npy"
  "$NPYGEN" --raw "{'descr': '>f4', 'fortran_order': False, 'shape': (12, 4), }" 192 "$d/be.npy"
  "$NPYGEN" --raw "{'descr': '<f4', 'fortran_order': False, 'shape': (12, 4), }" 191 "$d/short.npy"
  "$NPYGEN" --raw "{'descr': '<f4', 'fortran_order': False, 'shape': (12, 4), }" 200 "$d/long.npy"
  "$NPYGEN" --raw "{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296, 4), }" 0 "$d/overflow.npy"
  "$NPYGEN" --raw "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 1, 1, 1, 1, 1, 1, 1, 1), }" 4 "$d/ndim9.npy"
  expect_fail 1 "--x: SBN_EIO: $d/nonexistent.npy: No such file" \
    --op batchnorm --x "$d/nonexistent.npy"
  expect_fail 1 "--x: SBN_EFORMAT: $d/magic.npy: not a .npy file" \
    --op batchnorm --x "$d/magic.npy"
  expect_fail 1 "$d/fortran.npy: Fortran-order" --op batchnorm --x "$d/fortran.npy"
  expect_fail 1 "$d/i4.npy: dtype '<i4'" --op batchnorm --x "$d/i4.npy"
  expect_fail 1 "$d/be.npy: dtype '>f4' is big-endian" --op batchnorm \
    --x "$d/be.npy"
  expect_fail 1 "$d/short.npy: the header declares 192 data bytes but the file holds 191" \
    --op batchnorm --x "$d/short.npy"
  expect_fail 1 "$d/long.npy: the header declares 192 data bytes but the file holds 200" \
    --op batchnorm --x "$d/long.npy"
  expect_fail 1 "$d/overflow.npy: shape: the size overflows" --op batchnorm \
    --x "$d/overflow.npy"
  expect_fail 1 "$d/ndim9.npy: shape: more than 8 dims" --op batchnorm \
    --x "$d/ndim9.npy"
  expect_fail 1 "--dy: SBN_EFORMAT: $d/i4.npy" --op batchnorm --x "$x" \
    --dy "$d/i4.npy"
  expect_fail 1 "--weight: SBN_EIO: $d/nonexistent.npy" --op batchnorm \
    --x "$x" --weight "$d/nonexistent.npy" --bias "$T/b.npy"
  expect_fail 1 "--running-var: SBN_EFORMAT: $d/be.npy" --op batchnorm \
    --x "$x" --running-mean "$T/w.npy" --running-var "$d/be.npy"
  expect_fail 1 "--dy: $T/dyh.npy has shape (12, 5, 6, 4), expected (12, 4, 5, 6)" \
    --op batchnorm --x "$x" --dy "$T/dyh.npy"
  expect_fail 1 "--weight: $T/wl.npy has shape (5, 6), expected (4,)" \
    --op batchnorm --x "$x" --weight "$T/wl.npy" --bias "$T/bl.npy"
  expect_fail 1 "--bias: $T/b.npy has shape (4,), expected (5, 6)" \
    --op layernorm --norm-dims 2 --x "$x" --weight "$T/wl.npy" --bias "$T/b.npy"
  expect_fail 1 "--running-mean: $T/wl.npy has shape (5, 6), expected (4,)" \
    --op instancenorm --x "$x" --running-mean "$T/wl.npy" \
    --running-var "$T/w.npy"
  expect_fail 1 "--x: $T/w.npy has shape (4,); groupnorm needs (N, C, ...)" \
    --op groupnorm --groups 2 --x "$T/w.npy"
  expect_fail 1 "forward: SBN_ESMALLBATCH" --op batchnorm --x "$T/x2.npy"

  # A failing run leaves an earlier run's outputs alone.
  local o=$T/keep
  check "first run" apply --op batchnorm --x "$x" --out-dir "$o"
  cp "$o/y.npy" "$T/y.before"
  cp "$o/running_mean.npy" "$T/rm.before"
  expect_fail 1 "--dy" --op batchnorm --x "$x" --dy "$T/dyh.npy" --out-dir "$o"
  expect_fail 1 "SBN_ESMALLBATCH" --op batchnorm --x "$T/x2.npy" --out-dir "$o"
  expect_fail 2 "--eps" --op batchnorm --x "$x" --eps 0 --out-dir "$o"
  check "y.npy not clobbered by failing runs" cmp "$o/y.npy" "$T/y.before"
  check "running_mean.npy not clobbered" cmp "$o/running_mean.npy" "$T/rm.before"
  check "no dx.npy from a failing run" test ! -e "$o/dx.npy"
  : >"$T/afile"
  expect_fail 1 "--out-dir: $T/afile" --op batchnorm --x "$x" \
    --out-dir "$T/afile"
}

# bench_fail STATUS TOKEN ARGS...: `syncbn bench ARGS` must exit with
# STATUS and print a line containing TOKEN on stderr.
bench_fail() {
  local want=$1 token=$2 rc=0
  shift 2
  "$SYNCBN" bench "$@" >"$T/out" 2>"$T/err" || rc=$?
  if [ "$rc" -ne "$want" ]; then
    bad "exit $rc, expected $want: bench $*"
    sed 's/^/     /' "$T/err"
  elif ! grep -qF -- "$token" "$T/err"; then
    bad "stderr does not contain '$token': bench $*"
    sed 's/^/     /' "$T/err"
  else
    ok "bench $* -> exit $rc: $(head -1 "$T/err")"
  fi
}

# bench_json MODE NAME ARGS...: runs `syncbn bench MODE ARGS --json
# $T/NAME.json --csv $T/NAME.csv` (ARGS may start with an mpirun command
# line, see group_benchmpi) and checks the records with bench_check.py.
bench_json() {
  local mode=$1 name=$2
  shift 2
  if "$@" --json "$T/$name.json" --csv "$T/$name.csv" >"$T/$name.out" \
      2>&1; then
    ok "bench $mode: $(head -1 "$T/$name.out" | cut -c1-60)..."
  else
    bad "bench $mode exited non-zero: $*"
    sed 's/^/     /' "$T/$name.out" | tail -20
    return
  fi
  check "bench $mode: JSON and CSV records" /usr/bin/python3 \
    "$CHECKER" "$mode" "$T/$name.json" "$T/$name.csv" ${RANKS:+--ranks $RANKS}
}

# `syncbn bench`: the kernels mode on tiny shapes (no MPI), the table's
# head, stdout JSON, and the usage errors of every flag.
group_bench() {
  check "syncbn bench --help" "$SYNCBN" bench --help
  bench_json kernels kq "$SYNCBN" bench kernels --quick
  bench_json kernels k1 "$SYNCBN" bench kernels --shape 2,8,3,3 --reps 2
  check "kernels: 11 passes NCHW + 7 NHWC" /usr/bin/python3 -c \
    "import json,sys; d=json.load(open(sys.argv[1])); \
sys.exit(len(d['records']) != 18)" "$T/k1.json"
  "$SYNCBN" bench kernels --shape 2,8,3,3 --reps 1 >"$T/bench" 2>&1
  check "the table is headed by the machine" \
    grep -q "^# syncbn bench kernels: .* cores), 1 rank, .*, kernels " \
    "$T/bench"
  "$SYNCBN" bench kernels --op groupnorm --layout nhwc --shape 2,8,3 \
    --reps 1 --json - >"$T/k2.json" 2>"$T/k2.err"
  check "kernels --json - writes JSON on stdout, the table on stderr" \
    /usr/bin/python3 -c "import json,sys; d=json.load(open(sys.argv[1])); \
sys.exit(len(d['records']) != 2 or \
any(r['op'] != 'groupnorm' or r['layout'] != 'nhwc' for r in d['records']))" \
    "$T/k2.json"
  check "kernels --json -: the table went to stderr" grep -q "^variant" \
    "$T/k2.err"
  bench_json kernels k3 "$SYNCBN" bench kernels --shape 2,8,3 --kernels ref \
    --op dropout --reps 1
  check "kernels --kernels ref is named in the JSON" grep -q '"kernels": "ref"' \
    "$T/k3.json"
  check "kernels: the default rotation (64 MiB) is in the machine block" \
    grep -q '"rotate_mib": 64' "$T/k3.json"
  bench_json kernels k4 "$SYNCBN" bench kernels --shape 2,8,3 --op dropout \
    --reps 1 --rotate-mib 3
  check "kernels --rotate-mib 3: in the machine block" \
    grep -q '"rotate_mib": 3' "$T/k4.json"
  check "kernels --rotate-mib 3: in the table's header" \
    grep -q "copies over 3 MiB" "$T/k4.out"
  bench_fail 2 "unknown mode 'kernel'" kernel
  bench_fail 2 "--shape: '2'" kernels --shape 2
  bench_fail 2 "--shape: '2,0,3'" kernels --shape 2,0,3
  bench_fail 2 "--shape: '2,,3'" --shape 2,,3
  bench_fail 2 "--shape: '1,2,3,4,5,6,7,8,9'" --shape 1,2,3,4,5,6,7,8,9
  bench_fail 2 "--layout: 'nwhc'" kernels --layout nwhc
  bench_fail 2 "--reps: '0'" kernels --reps 0
  bench_fail 2 "--reps: '100001'" --reps 100001
  bench_fail 2 "--reps: '5x'" --reps 5x
  bench_fail 2 "--warmup: '1001'" --warmup 1001
  bench_fail 2 "--batch: '0'" --batch 0
  bench_fail 2 "--batch: '2,,8'" --batch 2,,8
  bench_fail 2 "--group-size: '0'" --group-size 0
  bench_fail 2 "--op: unknown op 'batchnrom'" kernels --op batchnrom
  bench_fail 2 "--op: only the kernels mode" layer --op batchnorm
  bench_fail 2 "--socket-dir: only the service mode" sizes --socket-dir /tmp
  bench_fail 2 "--gap-us: only the service mode" layer --gap-us 100
  bench_fail 2 "--gap-us: '1000001'" service --gap-us 1000001
  bench_fail 2 "--gap-us: '-5'" service --gap-us -5
  bench_fail 2 "--rotate-mib: '0' is not in [1, 65536]" kernels --rotate-mib 0
  bench_fail 2 "--rotate-mib: '65537'" kernels --rotate-mib 65537
  # 64 GiB of copies: more than half of a machine under 128 GiB.
  if [ "$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)" -lt 134000000 ]; then
    bench_fail 2 "--rotate-mib: 65536 MiB is more than half of this machine's memory" \
      kernels --rotate-mib 65536
  else
    ok "128 GiB of memory or more: the --rotate-mib memory check skipped"
  fi
  bench_fail 2 "--kernels:" kernels --kernels frobnicate
  bench_fail 2 "cannot both be stdout" kernels --json - --csv -
  bench_fail 2 "unexpected argument 'extra'" kernels extra
  bench_fail 2 "usage: syncbn bench" --frobnicate
  bench_fail 2 "--chunk: 'many'" layer --chunk many
  bench_fail 2 "--chunk: '0'" layer --chunk 0
  bench_fail 2 "only the layer mode takes them" kernels --chunk 4
  bench_fail 2 "only the layer mode takes them" sizes --vs-unchunked
  bench_fail 2 "--threads: '0'" kernels --threads 0
  bench_fail 2 "usage: syncbn bench" --sync
  bench_fail 1 "--json $T/no/such/dir/x.json: cannot open" kernels \
    --shape 2,8,3 --reps 1 --op dropout --json "$T/no/such/dir/x.json"
}

# bench service --socket-dir: twice against one syncbnd job that the test
# starts (the second run must not collide with the first run's layers).
bench_socket_dir() {
  local sbnd
  sbnd=$(dirname "$SYNCBN")/syncbnd
  [ -x "$sbnd" ] || { ok "no syncbnd beside $SYNCBN: --socket-dir skipped"; return; }
  "$MPIEXEC" --oversubscribe --bind-to none --timeout 100 --mca pml ob1 \
    --mca btl self,vader,tcp -np "$NP" "$sbnd" --socket-dir "$T/sock" \
    >"$T/sbnd.out" 2>&1 &
  local jp=$! i
  for i in $(seq 1 300); do
    [ "$(grep -c 'ready on' "$T/sbnd.out")" -ge "$NP" ] && break
    sleep 0.1
  done
  for i in 1 2; do
    RANKS=$NP bench_json service "ext$i" "${MPIRUN[@]}" "$SYNCBN" bench \
      service --socket-dir "$T/sock" --shape 2,8,4,4 --reps 2
  done
  # A gap before every call (the worker's poll has ended by then): the
  # JSON says so and every record is there.
  RANKS=$NP bench_json service ext_gap "${MPIRUN[@]}" "$SYNCBN" bench \
    service --socket-dir "$T/sock" --shape 2,8,4,4 --reps 2 --gap-us 400
  check "service --gap-us 400: gap_us in the machine block, 8 records" \
    /usr/bin/python3 -c "import json,sys; d=json.load(open(sys.argv[1])); \
sys.exit(not (d['machine'].get('gap_us') == 400 and len(d['records']) == 8))" \
    "$T/ext_gap.json"
  kill "$jp"
  wait "$jp" 2>/dev/null
}

# `syncbn bench MODE --quick` at NP ranks under mpirun: the records of
# each MPI mode (no timing is judged).
group_benchmpi() {
  local mode=$BMODE
  local -a MPIRUN=("$MPIEXEC" --oversubscribe --bind-to none --timeout 100
    --mca pml ob1 --mca btl self,vader,tcp -np "$NP")
  # The service bench makes its socket tree under $TMPDIR: a directory of
  # this test's own, so that the check below sees only this run's leftovers.
  mkdir -p "$T/tmpdir"
  TMPDIR=$T/tmpdir RANKS=$NP bench_json "$mode" "m_$mode" "${MPIRUN[@]}" \
    "$SYNCBN" bench "$mode" --quick
  if [ "$mode" = layer ]; then
    RANKS=$NP bench_json layer m_group "${MPIRUN[@]}" "$SYNCBN" bench layer \
      --shape 2,8,3,3 --reps 2 --group-size 1 --layout nhwc
    check "layer --group-size 1: group_size 1 in every record" \
      /usr/bin/python3 -c "import json,sys; d=json.load(open(sys.argv[1])); \
sys.exit(any(r['group_size'] != 1 for r in d['records']))" "$T/m_group.json"
    # Chunked SyncBN (3 channels per chunk of 8) beside the unchunked one.
    RANKS=$NP bench_json layer m_chunk "${MPIRUN[@]}" "$SYNCBN" bench layer \
      --shape 2,8,5,5 --reps 2 --chunk 3 --vs-unchunked
    check "layer --vs-unchunked: a sync_unchunked record per sync record" \
      /usr/bin/python3 -c "import json,sys; d=json.load(open(sys.argv[1])); \
v=[r['variant'] for r in d['records']]; \
sys.exit(not (v.count('sync') == v.count('sync_unchunked') > 0))" \
      "$T/m_chunk.json"
  fi
  if [ "$mode" = service ]; then
    check "service: no syncbnd left running from this bench" \
      bash -c "! ls -d '$T'/tmpdir/syncbn-bench-* 2>/dev/null | grep -q ."
    bench_socket_dir
  fi
}

group_sync() {
  local np=$NP o=$T/sync
  local -a MPIRUN=("$MPIEXEC" --oversubscribe --bind-to none --timeout 60
    --mca pml ob1 --mca btl self,vader,tcp -np "$np")
  local bnargs=(--op batchnorm --x "$T/x.npy" --dy "$T/dy.npy"
    --weight "$T/w.npy" --bias "$T/b.npy")
  apply "${bnargs[@]}" --out-dir "$o/ref" >/dev/null ||
    bad "single-process reference run"

  # The even split, then uneven ones with empty shards.
  local counts_list
  case $np in
    1) counts_list="12" ;;
    2) counts_list="0,12 11,1 5,7" ;;
    3) counts_list="5,0,7 0,0,12 1,1,10" ;;
  esac
  "${MPIRUN[@]}" "$SYNCBN" apply --sync "${bnargs[@]}" --out-dir "$o/even" \
    >"$T/sum" 2>"$T/err" || { bad "sync even split"; cat "$T/err"; }
  check "sync summary printed once (rank 0)" \
    test "$(grep -c '^syncbn apply: batchnorm' "$T/sum")" -eq 1
  check "sync summary reports $np processes" grep -q "processes: $np (MPI)" \
    "$T/sum"
  for f in y dx dweight dbias running_mean running_var; do
    check "np=$np even split: $f equals one process" \
      "$NPYCMP" "$o/even/$f.npy" "$o/ref/$f.npy" 1e-5
  done
  for c in $counts_list; do
    "${MPIRUN[@]}" "$SYNCBN" apply --sync --counts "$c" "${bnargs[@]}" \
      --out-dir "$o/c$c" >/dev/null 2>"$T/err" ||
      { bad "sync --counts $c"; cat "$T/err"; }
    for f in y dx dweight dbias running_mean running_var; do
      check "np=$np --counts $c: $f equals one process" \
        "$NPYCMP" "$o/c$c/$f.npy" "$o/ref/$f.npy" 1e-5
    done
  done
  check "np=$np --group-size $np equals the default" \
    "${MPIRUN[@]}" "$SYNCBN" apply --sync --group-size "$np" "${bnargs[@]}" \
    --out-dir "$o/g"
  check "np=$np group-size run y" "$NPYCMP" "$o/g/y.npy" "$o/ref/y.npy" 1e-5

  # Ghost batches replace the reduction: with shards that are multiples of
  # g (12 = 12, 6+6, 4+4+4), P ranks cut the same sub-batches as one
  # process, so y, dx and the summed dweight/dbias agree.
  apply --ghost-batch 2 "${bnargs[@]}" --out-dir "$o/ghostref" >/dev/null ||
    bad "single-process --ghost-batch run"
  check "np=$np --ghost-batch 2 --sync" "${MPIRUN[@]}" "$SYNCBN" apply --sync \
    --ghost-batch 2 "${bnargs[@]}" --out-dir "$o/ghost"
  for f in y dx dweight dbias; do
    check "np=$np --ghost-batch 2: $f equals one process" \
      "$NPYCMP" "$o/ghost/$f.npy" "$o/ghostref/$f.npy" 1e-5
  done

  # Local BatchNorm: with groups of one rank, rank 0's running statistics
  # are those of its shard alone (the first 5 samples, which x5.npy holds).
  if [ "$np" -ge 2 ]; then
    local c5="5,7"
    [ "$np" -eq 3 ] && c5="5,3,4"
    apply --op batchnorm --x "$T/x5.npy" --out-dir "$o/ref5" >/dev/null
    check "np=$np --group-size 1" "${MPIRUN[@]}" "$SYNCBN" apply --sync \
      --group-size 1 --counts "$c5" --op batchnorm --x "$T/x.npy" \
      --out-dir "$o/g1"
    check "np=$np --group-size 1: running_mean is rank 0's shard's" \
      "$NPYCMP" "$o/g1/running_mean.npy" "$o/ref5/running_mean.npy" 1e-6
    refute "np=$np --group-size 1: differs from the synchronized one" \
      "$NPYCMP" "$o/g1/running_mean.npy" "$o/ref/running_mean.npy" 1e-4
  fi

  # NHWC SyncBN and the per-sample ops.
  apply --op batchnorm --layout nhwc --x "$T/xh.npy" --dy "$T/dyh.npy" \
    --out-dir "$o/refh" >/dev/null
  check "np=$np nhwc sync" "${MPIRUN[@]}" "$SYNCBN" apply --sync --op batchnorm \
    --layout nhwc --x "$T/xh.npy" --dy "$T/dyh.npy" --out-dir "$o/h"
  for f in y dx running_var; do
    check "np=$np nhwc: $f equals one process" \
      "$NPYCMP" "$o/h/$f.npy" "$o/refh/$f.npy" 1e-5
  done
  local op
  for op in "layernorm --norm-dims 2 --weight $T/wl.npy --bias $T/bl.npy" \
    "instancenorm --weight $T/w.npy --bias $T/b.npy" \
    "groupnorm --groups 2 --weight $T/w.npy --bias $T/b.npy"; do
    local name=${op%% *}
    # shellcheck disable=SC2086
    apply --op $op --x "$T/x.npy" --dy "$T/dy.npy" --out-dir "$o/r$name" \
      >/dev/null
    # shellcheck disable=SC2086
    check "np=$np $name sync" "${MPIRUN[@]}" "$SYNCBN" apply --sync --op $op \
      --x "$T/x.npy" --dy "$T/dy.npy" --out-dir "$o/s$name"
    for f in y dx dweight dbias; do
      check "np=$np $name: $f equals one process" \
        "$NPYCMP" "$o/s$name/$f.npy" "$o/r$name/$f.npy" 1e-5
    done
  done
  check "np=$np dropout sync" "${MPIRUN[@]}" "$SYNCBN" apply --sync \
    --op dropout --p 0.25 --seed 3 --x "$T/x.npy" --out-dir "$o/dr"
  check "np=$np dropout: gathered y is 0 or x/(1-p)" \
    "$NPYCMP" --dropout "$T/x.npy" "$o/dr/y.npy" 0.25 1e-6

  # Errors under mpirun: every rank exits non-zero, none hangs, one line
  # names the problem.
  sync_fail() {
    local token=$1 rc=0 t0 t1
    shift
    t0=$(date +%s)
    "${MPIRUN[@]}" "$SYNCBN" apply --sync "$@" >"$T/out" 2>"$T/err" || rc=$?
    t1=$(date +%s)
    if [ "$rc" -eq 0 ]; then
      bad "np=$np sync $*: exit 0"
    elif ! grep -qF -- "$token" "$T/err"; then
      bad "np=$np sync $*: stderr lacks '$token'"
      sed 's/^/     /' "$T/err"
    elif [ $((t1 - t0)) -ge 50 ]; then
      bad "np=$np sync $*: took $((t1 - t0)) s (hung until the timeout?)"
    elif [ "$(grep -c '^syncbn apply' "$T/err")" -ne 1 ]; then
      bad "np=$np sync $*: not exactly one message"
      sed 's/^/     /' "$T/err"
    elif [ -e "$o/never" ]; then
      bad "np=$np sync $*: created the output directory"
    else
      ok "np=$np sync $* -> exit $rc: $(grep '^syncbn apply' "$T/err")"
    fi
  }
  local wrong
  wrong=$(seq -s, 1 "$np")
  sync_fail "--counts: the counts sum to" --op batchnorm --counts "$wrong" \
    --x "$T/x.npy" --out-dir "$o/never"
  sync_fail "--counts: $((np + 1)) numbers for $np ranks" --op batchnorm \
    --counts "$(seq -s, 1 $((np + 1)))" --x "$T/x.npy" --out-dir "$o/never"
  sync_fail "$T/none.npy: No such file" --op batchnorm --x "$T/none.npy" \
    --out-dir "$o/never"
  sync_fail "--dy: $T/dyh.npy has shape" --op batchnorm --x "$T/x.npy" \
    --dy "$T/dyh.npy" --out-dir "$o/never"
  sync_fail "SBN_ESMALLBATCH" --op batchnorm --x "$T/x2.npy" --out-dir "$o/never"
}

case $GROUP in
  basic) group_basic ;;
  errors) group_errors ;;
  bench) group_bench ;;
  benchmpi)
    [ -n "$MPIEXEC" ] || { echo "benchmpi needs --mpirun"; exit 2; }
    BMODE=${3:?benchmpi NP MODE}
    group_benchmpi
    ;;
  sync)
    [ -n "$MPIEXEC" ] || { echo "sync needs --mpirun"; exit 2; }
    group_sync
    ;;
  *) echo "unknown group $GROUP"; exit 2 ;;
esac
echo "cli_test $GROUP${2:+ np=$NP}: $passes passed, $fails failed"
[ "$fails" -eq 0 ]
