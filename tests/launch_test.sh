#!/bin/sh
# The one-command launch, `mpirun -np P syncbnd -- COMMAND`:
#   launch_test.sh MPIRUN SYNCBND
# - the job's exit status is the worst child status (0; 5 from one rank;
#   128 + 9 for a child killed by SIGKILL; 127 for a missing command);
# - the children see SYNCBN_SOCKET (a live socket of their own rank),
#   SYNCBN_RANK/SIZE/LOCAL_RANK, MASTER_ADDR/MASTER_PORT, RANK/WORLD_SIZE;
# - SIGTERM to mpirun stops workers and children within seconds;
# - the socket and state directories the job created are removed on exit,
#   kept with --keep; `--` without a command is a usage error (2).
set -u
MPIRUN=$1 SYNCBND=$2
MPI="$MPIRUN --oversubscribe --bind-to none --mca pml ob1 --mca btl self,vader,tcp --timeout 60"
tmp=$(mktemp -d /tmp/sbn-launch-XXXXXX) || exit 1
job=
cleanup() {
  [ -n "$job" ] && kill -KILL "$job" 2>/dev/null
  rm -rf "$tmp"
}
trap cleanup EXIT
fail=0
bad() {
  echo "FAIL: $*"
  fail=1
}

# One job in its own TMPDIR-like socket parent, so that its default
# directories can be looked for afterwards: XDG_RUNTIME_DIR is where the
# default socket directory goes.
run() { # run EXPECTED NP ARGS...
  want=$1 np=$2
  shift 2
  # shellcheck disable=SC2086
  XDG_RUNTIME_DIR=$tmp/xdg $MPI -np "$np" "$SYNCBND" "$@" >"$tmp/out" 2>&1
  rc=$?
  if [ "$rc" -ne "$want" ]; then
    bad "syncbnd $* at np $np exited $rc, want $want"
    cat "$tmp/out"
  else
    echo "ok: np $np syncbnd $* -> $rc"
  fi
}
mkdir -m 700 "$tmp/xdg"

run 0 2 -- true
run 5 2 -- sh -c 'exit $((SYNCBN_RANK * 5))'
run 137 2 -- sh -c '[ "$SYNCBN_RANK" = 1 ] && kill -9 $$; exit 0'
run 127 2 -- /nonexistent/command
grep -q "cannot run /nonexistent/command" "$tmp/out" ||
  bad "a missing command is not named"
run 2 1 --
left=$(ls "$tmp/xdg")
[ -z "$left" ] || bad "directories left behind: $left"

# The environment, and a live socket of the child's own rank.
run 0 2 -- sh -c 'test -S "$SYNCBN_SOCKET" &&
  case "$SYNCBN_SOCKET" in */rank-"$SYNCBN_RANK".sock) ;; *) exit 9 ;; esac &&
  echo "env $SYNCBN_RANK $SYNCBN_SIZE $SYNCBN_LOCAL_RANK $RANK $WORLD_SIZE $MASTER_ADDR $MASTER_PORT"'
for r in 0 1; do
  grep -Eq "^env $r 2 $r $r 2 127\.0\.0\.1 [0-9]+$" "$tmp/out" ||
    bad "rank $r's child environment: $(grep '^env' "$tmp/out")"
done

# --keep keeps the directories (and says where they are).
run 0 1 --keep -- true
kept=$(ls "$tmp/xdg")
[ -n "$kept" ] || bad "--keep removed the directories"
grep -q "socket directory $tmp/xdg/syncbnd-" "$tmp/out" ||
  bad "the socket directory is not printed"
rm -rf "${tmp:?}"/xdg/*

# SIGTERM to mpirun: the workers stop and take their children with them.
# shellcheck disable=SC2086
XDG_RUNTIME_DIR=$tmp/xdg $MPI -np 2 "$SYNCBND" -- sh -c \
  "echo \$\$ > $tmp/pid.\$SYNCBN_RANK; exec sleep 60" >"$tmp/out" 2>&1 &
job=$!
i=0
while [ "$(ls "$tmp"/pid.* 2>/dev/null | wc -l)" -lt 2 ] && [ $i -lt 300 ]; do
  sleep 0.1
  i=$((i + 1))
done
kill -TERM "$job"
i=0
while kill -0 "$job" 2>/dev/null && [ $i -lt 150 ]; do
  sleep 0.1
  i=$((i + 1))
done
if kill -0 "$job" 2>/dev/null; then
  bad "mpirun still runs 15 s after SIGTERM"
else
  wait "$job"
  rc=$?
  job=
  [ "$rc" -ne 0 ] || bad "a job stopped by SIGTERM exited 0"
  echo "ok: SIGTERM ended the job (exit $rc)"
fi
# A child gets its SIGTERM as its worker goes; give it a moment to leave
# (a zombie waiting for init counts as gone).
alive() {
  st=$(ps -o stat= -p "$1" 2>/dev/null) && [ -n "$st" ] && [ "${st#Z}" = "$st" ]
}
for f in "$tmp"/pid.*; do
  p=$(cat "$f")
  i=0
  while alive "$p" && [ $i -lt 50 ]; do
    sleep 0.1
    i=$((i + 1))
  done
  if alive "$p"; then
    bad "child $p outlived its worker"
    kill -KILL "$p"
  fi
done
[ "$fail" -eq 0 ] && echo "PASS: launcher exit codes, environment, directories, signals"
exit "$fail"
