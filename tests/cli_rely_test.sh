#!/usr/bin/env bash
# Reliability of `syncbn apply` (issue 17), run by ctest (tests/cli.cmake):
#   cli_rely_test.sh --syncbn BIN --npygen BIN
# - outputs are replaced all together or not at all: with dx.npy a
#   directory, or an old dx.npy that cannot be replaced (immutable, where
#   chattr works), the run fails, the old outputs stay byte for byte, no
#   new output appears and no temporary is left;
# - a FIFO given as --x is refused at once instead of blocking;
# - an --eps below the smallest normal float is refused naming --eps.
set -uo pipefail

SYNCBN= NPYGEN=
while [ $# -gt 0 ]; do
  case "$1" in
    --syncbn) SYNCBN=$2; shift 2 ;;
    --npygen) NPYGEN=$2; shift 2 ;;
    *) echo "cli_rely_test.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

T=$(mktemp -d /tmp/sbn_cli_rely.XXXXXX)
trap 'chattr -i "$T"/*/* 2>/dev/null; rm -rf "$T"' EXIT
fails=0
ok() { echo "ok   $*"; }
bad() { fails=$((fails + 1)); echo "FAIL $*"; }

"$NPYGEN" --seed 1 "$T/x.npy" 4,3,5 >/dev/null
"$NPYGEN" --seed 2 "$T/x2.npy" 4,3,5 >/dev/null
"$NPYGEN" --seed 3 "$T/dy.npy" 4,3,5 >/dev/null
run() { timeout 60 "$SYNCBN" apply --op batchnorm --dy "$T/dy.npy" "$@"; }

# snapshot DIR: names and checksums of everything in DIR (hidden too).
snapshot() { (cd "$1" && find . -type f -exec md5sum {} + | sort; ls -A) ; }

# A directory where dx.npy goes: nothing written, y.npy not created.
mkdir -p "$T/o1/dx.npy"
if run --x "$T/x.npy" --out-dir "$T/o1" >"$T/out" 2>"$T/err"; then
  bad "apply succeeded with dx.npy a directory"
elif [ -e "$T/o1/y.npy" ] || ls -A "$T/o1" | grep -q sbn; then
  bad "dx.npy a directory: left $(ls -A "$T/o1" | tr '\n' ' ')"
elif ! grep -q "dx.npy" "$T/err"; then
  bad "dx.npy a directory: message does not name it: $(cat "$T/err")"
else
  ok "dx.npy a directory: refused, nothing written ($(cat "$T/err"))"
fi

# An old output set, then a run that cannot replace running_var.npy: the
# old set stays as it was.
run --x "$T/x.npy" --out-dir "$T/o2" >/dev/null 2>&1 || bad "first run"
before=$(snapshot "$T/o2")
rm -f "$T/o2/running_var.npy"
mkdir "$T/o2/running_var.npy"
before=$(snapshot "$T/o2")
if run --x "$T/x2.npy" --out-dir "$T/o2" >/dev/null 2>"$T/err"; then
  bad "apply succeeded with running_var.npy a directory"
elif [ "$(snapshot "$T/o2")" != "$before" ]; then
  bad "old set changed: $(snapshot "$T/o2" | tr '\n' ' ')"
else
  ok "old outputs kept byte for byte when the last cannot be replaced"
fi

# An immutable old dx.npy (needs root and a file system with chattr).
run --x "$T/x.npy" --out-dir "$T/o3" >/dev/null 2>&1 || bad "first run"
if chattr +i "$T/o3/dx.npy" 2>/dev/null; then
  before=$(snapshot "$T/o3")
  if run --x "$T/x2.npy" --out-dir "$T/o3" >/dev/null 2>"$T/err"; then
    bad "apply succeeded with an immutable dx.npy"
  elif [ "$(snapshot "$T/o3")" != "$before" ]; then
    bad "immutable dx.npy: the set changed"
  else
    ok "immutable dx.npy: refused, old set kept ($(cat "$T/err"))"
  fi
  chattr -i "$T/o3/dx.npy"
else
  echo "skip immutable dx.npy: chattr +i is not available here"
fi

# A FIFO as --x: refused at once (a blocking open would wait for ever).
mkfifo "$T/fifo.npy"
start=$(date +%s)
if timeout 20 "$SYNCBN" apply --op batchnorm --x "$T/fifo.npy" \
    --out-dir "$T/o4" >/dev/null 2>"$T/err"; then
  bad "FIFO as --x accepted"
elif [ $(($(date +%s) - start)) -ge 15 ]; then
  bad "FIFO as --x blocked"
elif ! grep -q "not a regular file" "$T/err"; then
  bad "FIFO as --x: $(cat "$T/err")"
else
  ok "FIFO as --x refused at once: $(cat "$T/err")"
fi

# An eps so small that 1/sqrt(var + eps) would overflow float32.
"$NPYGEN" --seed 4 --std 1e-30 "$T/tiny.npy" 4,3,5 >/dev/null
if timeout 60 "$SYNCBN" apply --op batchnorm --x "$T/tiny.npy" --eps 1e-300 \
    --out-dir "$T/o5" >/dev/null 2>"$T/err"; then
  bad "--eps 1e-300 accepted"
elif ! grep -q -- "--eps" "$T/err"; then
  bad "--eps 1e-300: message does not name --eps: $(cat "$T/err")"
else
  ok "--eps 1e-300 refused: $(cat "$T/err")"
fi

[ "$fails" -eq 0 ] || { echo "cli_rely_test: $fails failed"; exit 1; }
echo "cli_rely_test: all passed"
