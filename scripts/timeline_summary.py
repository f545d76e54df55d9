#!/usr/bin/env python3
"""Summarizes the spans of syncbnd's --timeline files: per rank and kind
(negotiation, allreduce, compute by op), how many there were and their
duration's median, 90th percentile and best, in microseconds.

  scripts/timeline_summary.py TIMELINE.rank-0.json [TIMELINE.rank-1.json ...]
  scripts/timeline_summary.py --csv out.csv TIMELINE.rank-*.json

A compute span is named "layer '<name>' step <k> <op>" by the worker; it is
grouped by its op (stats, stats_backward, forward, backward, ...). A file
the worker did not close (a killed job) is read up to its last whole
event. Needs only the Python standard library."""
import argparse
import csv
import json
import sys


def load(path):
    text = open(path, encoding="utf-8").read().rstrip()
    # A job killed before its worker closed the array leaves a trailing
    # comma or a cut event: keep the whole events before it.
    if not text.endswith("]"):
        cut = text.rfind("}")
        text = text[: cut + 1].rstrip().rstrip(",") + "\n]"
    return [e for e in json.loads(text) if e.get("ph") == "X"]


def group_of(event):
    if event.get("cat") != "compute":
        return event.get("cat", "?")
    words = event.get("name", "").split()
    return "compute " + (words[-1] if words else "?")


def quantile(v, p):
    pos = p * (len(v) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (pos - lo) * (v[hi] - v[lo])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", help="the .rank-R.json files")
    ap.add_argument("--csv", help="also write the table to this CSV file")
    a = ap.parse_args()
    rows = []
    for path in a.files:
        try:
            events = load(path)
        except (OSError, ValueError) as e:
            sys.exit("timeline_summary: %s: %s" % (path, e))
        groups = {}
        for e in events:
            groups.setdefault(group_of(e), []).append(float(e.get("dur", 0)))
        for g in sorted(groups):
            d = sorted(groups[g])
            rows.append((path, g, len(d), quantile(d, 0.5), quantile(d, 0.9),
                         d[0]))
    print("%-40s %-24s %8s %10s %10s %10s" %
          ("file", "span", "count", "median_us", "p90_us", "best_us"))
    for r in rows:
        print("%-40s %-24s %8d %10.1f %10.1f %10.1f" % r)
    if a.csv:
        with open(a.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["file", "span", "count", "median_us", "p90_us",
                        "best_us"])
            for r in rows:
                w.writerow([r[0], r[1], r[2]] + ["%.3f" % x for x in r[3:]])


if __name__ == "__main__":
    main()
