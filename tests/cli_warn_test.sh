#!/bin/sh
# Messages for rank counts and option values that do not do what was meant:
#   cli_warn_test.sh MPIRUN SYNCBND SYNCBN
# - syncbnd --max-clients 0 / --cycle-us 0 / --cache-slots 0 and a
#   --poll-us out of range or not a number exit 2
#   naming the option, ranks started with different --cache-slots (or
#   --no-speculate on some only) exit 1 naming them;
#   syncbnd --version prints the version and the protocol;
# - `mpirun -np 2 syncbn apply` without --sync warns that every rank writes
#   the same outputs, once; `apply --sync` at one rank warns; a
#   single-process apply prints no warning.
set -u
abs() { case $1 in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
MPIRUN=$1 SYNCBND=$(abs "$2") SYNCBN=$(abs "$3")
MPI="$MPIRUN --oversubscribe --bind-to none --mca pml ob1 --mca btl self,vader,tcp --timeout 60"
tmp=$(mktemp -d /tmp/sbn-warn-XXXXXX) || exit 1
trap 'rm -rf "$tmp"' EXIT
fail=0
bad() {
  echo "FAIL: $*"
  fail=1
}
expect() { # expect RC PATTERN COMMAND...
  want=$1 pat=$2
  shift 2
  "$@" >"$tmp/out" 2>&1
  rc=$?
  if [ "$rc" -ne "$want" ] || ! grep -q -- "$pat" "$tmp/out"; then
    bad "$* exited $rc (want $want) without '$pat':"
    cat "$tmp/out"
  else
    echo "ok: $* -> $rc: $(grep -m1 -- "$pat" "$tmp/out")"
  fi
}
expect 2 "max-clients: must be at least 1" "$SYNCBND" --max-clients 0
expect 2 "cycle-us: must be at least 1" "$SYNCBND" --cycle-us 0
expect 0 "^syncbnd [0-9.]* (protocol [0-9]*)" "$SYNCBND" --version
expect 2 "cache-slots: must be at least 1" "$SYNCBND" --cache-slots 0
expect 2 "poll-us: '2000000' is not in \\[0, 1000000\\]" "$SYNCBND" --poll-us 2000000
expect 2 "poll-us: expected a number, got 'x'" "$SYNCBND" --poll-us x
# Ranks with different cache sizes would evict different slots: refused
# before anything is served.
# shellcheck disable=SC2086
expect 1 "cache-slots differs between the ranks (4 to 8)" \
  $MPI -np 1 "$SYNCBND" --socket-dir "$tmp/cs" --cache-slots 4 : \
  -np 1 "$SYNCBND" --socket-dir "$tmp/cs" --cache-slots 8
# Ranks of which only some speculate would run different collectives.
# shellcheck disable=SC2086
expect 1 "no-speculate is given to some ranks only" \
  $MPI -np 1 "$SYNCBND" --socket-dir "$tmp/sp" --no-speculate : \
  -np 1 "$SYNCBND" --socket-dir "$tmp/sp"

cd "$tmp" || exit 1
# An input for apply: 4 x 3 values of a batchnorm.
printf '\223NUMPY\001\000v\000' >x.npy
printf "{'descr': '<f4', 'fortran_order': False, 'shape': (4, 3), }" >>x.npy
n=$(wc -c <x.npy)
while [ $(((n + 1) % 64)) -ne 0 ]; do
  printf ' ' >>x.npy
  n=$((n + 1))
done
printf '\n' >>x.npy
i=0
while [ $i -lt 12 ]; do # 1.0, 2.0, 3.0 (float32, little-endian) in turn
  case $((i % 3)) in
  0) printf '\000\000\200\077' ;;
  1) printf '\000\000\000\100' ;;
  2) printf '\000\000\100\100' ;;
  esac >>x.npy
  i=$((i + 1))
done
# shellcheck disable=SC2086
expect 0 "2 ranks without --sync: every rank runs the whole batch" \
  $MPI -np 2 "$SYNCBN" apply --op batchnorm --x x.npy --out-dir o1
[ "$(grep -c 'ranks without --sync' "$tmp/out")" -eq 1 ] ||
  bad "the warning is printed more than once"
# shellcheck disable=SC2086
expect 0 "sync with one MPI rank" \
  $MPI -np 1 "$SYNCBN" apply --op batchnorm --sync --x x.npy --out-dir o2
"$SYNCBN" apply --op batchnorm --x x.npy --out-dir o3 >"$tmp/out" 2>&1 ||
  bad "single-process apply failed: $(cat "$tmp/out")"
! grep -q warning "$tmp/out" || bad "single-process apply warns: $(cat "$tmp/out")"
[ "$fail" -eq 0 ] && echo "PASS: option and rank-count messages"
exit "$fail"
