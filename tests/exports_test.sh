#!/usr/bin/env bash
# Checks what each shared library exports: every dynamic symbol it defines
# must be a public sbn_ name declared (with SBN_API) in an installed header,
# and no internal sbn__ helper may leak out.
# Usage: exports_test.sh HEADER_DIR... -- LIB...
set -euo pipefail
hdrs=()
while [ "$1" != "--" ]; do hdrs+=("$1"); shift; done
shift
files=()
for d in "${hdrs[@]}"; do files+=("$d"/*.h); done
declared=$(cat "${files[@]}" | tr '\n' ' ' |
  grep -oE 'SBN_API[^(]*\bsbn_[a-z0-9_]+\s*\(' | grep -oE 'sbn_[a-z0-9_]+' | sort -u)
fail=0
for lib in "$@"; do
  syms=$(nm -D --defined-only "$lib" | awk '{print $3}' | sort -u)
  n=0
  for s in $syms; do
    n=$((n + 1))
    case "$s" in
      sbn__*) echo "$lib: internal symbol $s is exported"; fail=1 ;;
      sbn_*)
        if ! grep -qx "$s" <<<"$declared"; then
          echo "$lib: $s is exported but no public header declares it"; fail=1
        fi ;;
      *) echo "$lib: foreign symbol $s is exported"; fail=1 ;;
    esac
  done
  echo "$lib: $n exported symbols"
  [ "$n" -gt 0 ] || { echo "$lib: exports nothing"; fail=1; }
done
exit $fail
