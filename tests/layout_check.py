#!/usr/bin/env python3
"""Checks the rules of the source layout that a reader relies on
(README, "What is where"):

- src/ never includes mpi.h: only mpi/ talks MPI;
- no production file (src/, mpi/) is over MAX_FILE lines;
- no function is over MAX_FUNC lines, unless the comment right above it
  says why it is long (it must contain "honestly linear");
- a room includes only headers of its own room, of rooms below it, or the
  public headers in src/ (see ALLOWED): arrows point one way.

Functions are found the way clang-format lays them out: a line at column 0
that opens a body with "{" and is not a type or data definition, closed by
the next "}" at column 0. Usage: layout_check.py [SOURCE_DIR]
"""
import os
import re
import sys

MAX_FILE = 800
MAX_FUNC = 100

# For each room, the rooms whose headers it may include (besides its own
# and the public headers at the top of src/ and mpi/).
ALLOWED = {
    "src/base": [],
    "src/kernels": ["src/base"],
    "src/ops": ["src/kernels", "src/base"],
    "src/io": ["src/base"],
    "src/nn": [],
    "src": ["src/ops", "src/kernels", "src/base"],
    "src/svc/proto": [],
    "src/svc/worker": ["src/svc/proto"],
    "src/svc/server": ["src/svc/worker", "src/svc/proto"],
    "src/client": ["src/svc/proto"],
    "mpi": [],
    "mpi/cli": ["mpi", "src/nn", "src/client"],
    "mpi/service": ["mpi", "src/svc/server", "src/svc/worker",
                    "src/svc/proto"],
}
PUBLIC = ("src", "mpi")  # their top-level headers are public

# A function definition starts at column 0 with its return type and name.
SIG_START = re.compile(r"^[A-Za-z_][\w \*]*\b\w+\s*\(")
NOT_FUNC = re.compile(r"^(typedef|return|else|if|for|while|switch)\b")


def production_files(root):
    for top in ("src", "mpi"):
        for d, _, files in os.walk(os.path.join(root, top)):
            for f in sorted(files):
                if f.endswith((".c", ".h")):
                    yield os.path.relpath(os.path.join(d, f), root)


def long_functions(lines):
    """(line, name, length) of each function body longer than MAX_FUNC."""
    out = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if not SIG_START.match(line) or NOT_FUNC.match(line):
            i += 1
            continue
        # Follow the signature (it may wrap) to its "{" or its ";".
        j = i
        while j < len(lines) and not lines[j].rstrip().endswith(("{", ";")):
            j += 1
        if j >= len(lines) or lines[j].rstrip().endswith(";"):
            i = j + 1
            continue
        k = j + 1
        while k < len(lines) and not lines[k].startswith("}"):
            k += 1
        n = k - i + 1
        if n > MAX_FUNC:
            above = "\n".join(lines[max(0, i - 8):i])
            if "honestly linear" not in above:
                name = re.findall(r"(\w+)\s*\(", line)
                out.append((i + 1, name[0] if name else "?", n))
        i = k + 1
    return out


def room_of(path):
    return os.path.dirname(path)


def header_room(root, path, inc):
    """The room of the file that #include "inc" in path names, or None."""
    here = os.path.join(root, os.path.dirname(path), inc)
    if os.path.exists(here):
        return room_of(os.path.relpath(os.path.normpath(here), root))
    base = os.path.basename(inc)
    for p in production_files(root):
        if os.path.basename(p) == base:
            return room_of(p)
    return None


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else \
        os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    problems = []
    nfiles = 0
    for path in production_files(root):
        nfiles += 1
        with open(os.path.join(root, path), encoding="utf-8") as f:
            lines = f.read().split("\n")
        room = room_of(path)
        if path.startswith("src/") and any(
                re.match(r'#\s*include\s*[<"]mpi\.h[>"]', l) for l in lines):
            problems.append("%s: src/ includes mpi.h" % path)
        if len(lines) > MAX_FILE:
            problems.append("%s: %d lines (over %d)" %
                            (path, len(lines), MAX_FILE))
        for line_no, name, n in long_functions(lines):
            problems.append("%s:%d: %s is %d lines (over %d, and no "
                            "'honestly linear' comment says why)" %
                            (path, line_no, name, n, MAX_FUNC))
        for l in lines:
            m = re.match(r'#\s*include\s*"([^"]+)"', l)
            if not m:
                continue
            hr = header_room(root, path, m.group(1))
            if hr is None or hr == room or hr in PUBLIC:
                continue
            if room not in ALLOWED:
                problems.append("%s: room %s is not in the layout table" %
                                (path, room))
                break
            if hr not in ALLOWED[room]:
                problems.append('%s: includes "%s" of %s, which %s may not '
                                'use' % (path, m.group(1), hr, room))
    for p in problems:
        print("layout_check: " + p)
    print("layout_check: %d production files, %d problems" %
          (nfiles, len(problems)))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
