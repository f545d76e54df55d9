#!/usr/bin/env python3
"""Checks the records of `syncbn bench MODE --json FILE [--csv FILE]`:
the schema (the top-level keys, the column list, every record holding
every column with the right type), that the CSV has the same columns and
values as the JSON, and that every derived column equals its definition
on the emitted records. No timing is judged: only that times are positive.

Usage: bench_check.py MODE JSON [CSV] [--ranks P] [--min-records N]
"""
import csv
import json
import math
import sys

COLUMNS = ["mode", "variant", "op", "pass", "layout", "shape", "ranks",
           "group_size", "median_us", "p90_us", "best_us", "floor_us", "floor_ratio",
           "stream_floor_us", "stream_floor_ratio", "gbps", "overhead_us", "overhead_pct", "overhead_per_allreduce",
           "mpi_us", "bytes", "avg_us", "min_us", "max_us", "iterations", "hop_us",
           "hop_ratio", "target_us", "target_ratio", "agree_bytes_round"]
STRINGS = {"mode", "variant", "op", "pass", "layout"}
INTS = {"ranks", "group_size"}
# The variants of each mode, and the numbers each variant must carry.
VARIANTS = {
    "kernels": {"kernel": ["floor_us", "floor_ratio", "stream_floor_us",
                          "stream_floor_ratio", "gbps", "bytes"]},
    "layer": {"local": [], "bare_allreduce": ["bytes"],
              "sync": ["overhead_us", "overhead_pct",
                       "overhead_per_allreduce", "mpi_us", "bytes"],
              "sync_unchunked": ["overhead_us", "overhead_pct",
                                 "overhead_per_allreduce", "mpi_us",
                                 "bytes"]},
    "network": {"local": [], "unfused": ["overhead_us", "overhead_pct"],
                "fused": ["overhead_us", "overhead_pct"],
                "groupnorm": ["overhead_us", "overhead_pct"]},
    "sizes": {v: ["bytes", "avg_us", "min_us", "max_us", "iterations"]
              for v in ("records", "records_nonblocking", "records_merge",
                        "sum_same_bytes", "sum_2c1")},
    "service": {"service_full": ["hop_us", "hop_ratio", "floor_us",
                                 "floor_ratio"], "sync": [],
                "service_stats": ["hop_us", "hop_ratio", "agree_bytes_round"],
                "inproc_stats": [],
                "service_stats1": ["hop_us", "hop_ratio", "target_us",
                                   "target_ratio", "agree_bytes_round"],
                "allreduce1": [], "unix_echo": [],
                "service_shm": ["hop_us", "hop_ratio", "target_us",
                                "target_ratio"]},
}

problems = []


def bad(msg):
    problems.append(msg)


def close(a, b, what):
    if not math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6):
        bad("%s: %r != %r" % (what, a, b))


def key(r):
    return (r["op"] if r["mode"] != "network" else "", r["pass"],
            r["layout"], tuple(r["shape"]))


def check_schema(doc, mode, ranks):
    for k in ("mode", "machine", "columns", "records"):
        if k not in doc:
            bad("top level lacks %r" % k)
    if doc.get("mode") != mode:
        bad("mode %r, expected %r" % (doc.get("mode"), mode))
    for k in ("cpu", "mpi", "kernels", "ranks", "date"):
        if k not in doc.get("machine", {}):
            bad("machine lacks %r" % k)
    if doc.get("columns") != COLUMNS:
        bad("columns %r" % doc.get("columns"))
    for i, r in enumerate(doc["records"]):
        if list(r.keys()) != COLUMNS:
            bad("record %d keys %r" % (i, list(r.keys())))
            continue
        for c in COLUMNS:
            v = r[c]
            if c in STRINGS:
                ok = isinstance(v, str)
            elif c in INTS:
                ok = isinstance(v, int)
            elif c == "shape":
                ok = isinstance(v, list) and all(
                    isinstance(d, int) and d > 0 for d in v) and v
            else:
                ok = v is None or isinstance(v, (int, float))
            if not ok:
                bad("record %d: %s = %r has the wrong type" % (i, c, v))
        if r["mode"] != mode:
            bad("record %d: mode %r" % (i, r["mode"]))
        if ranks is not None and r["ranks"] != ranks and mode != "kernels":
            bad("record %d: ranks %r, expected %d" % (i, r["ranks"], ranks))
        want = VARIANTS[mode].get(r["variant"])
        if want is None:
            bad("record %d: variant %r in mode %s" % (i, r["variant"], mode))
            continue
        for c in ["median_us", "p90_us"] + want:
            if r[c] is None:
                bad("record %d (%s): %s is null" % (i, r["variant"], c))
        if r["median_us"] is not None and r["median_us"] <= 0:
            bad("record %d: median_us %r" % (i, r["median_us"]))
        if r["median_us"] is not None and r["p90_us"] is not None and \
                r["p90_us"] < r["median_us"]:
            bad("record %d: p90 below the median" % i)
        if r["best_us"] is None or r["median_us"] is None or \
                r["best_us"] > r["median_us"]:
            bad("record %d: best_us %r not at most the median" %
                (i, r["best_us"]))


def check_derived(recs, mode):
    by = {}
    for r in recs:
        by[(r["variant"],) + key(r)] = r
    for r in recs:
        v = r["variant"]
        if mode == "kernels":
            close(r["floor_ratio"], r["median_us"] / r["floor_us"],
                  "floor_ratio of %s %s" % (r["op"], r["pass"]))
            close(r["stream_floor_ratio"],
                  r["median_us"] / r["stream_floor_us"],
                  "stream_floor_ratio of %s %s" % (r["op"], r["pass"]))
            close(r["gbps"], r["bytes"] / (r["median_us"] * 1e-6) / 1e9,
                  "gbps of %s %s" % (r["op"], r["pass"]))
            n = math.prod(r["shape"])
            want = 4 * n * (3 if r["pass"].endswith("bwd") and
                            r["op"] != "dropout" else 2)
            close(r["bytes"], want, "bytes of %s %s" % (r["op"], r["pass"]))
        elif mode == "layer" and v in ("sync", "sync_unchunked"):
            k = key(r)
            loc = by.get(("local",) + k)
            bare = by.get(("bare_allreduce", "allreduce", "sum") + k[2:])
            if loc is None or bare is None:
                bad("sync %r without its local or bare records" % (k,))
                continue
            o = r["median_us"] - loc["median_us"]
            close(r["overhead_us"], o, "overhead_us %r" % (k,))
            close(r["overhead_pct"], 100 * o / r["median_us"],
                  "overhead_pct %r" % (k,))
            # One bare allreduce per pass: two for fwd+bwd.
            n_ar = 2 if r["pass"] == "fwd+bwd" else 1
            close(r["overhead_per_allreduce"], o / (n_ar * bare["median_us"]),
                  "overhead_per_allreduce %r" % (k,))
            close(bare["bytes"], 32 * r["shape"][1], "bare bytes %r" % (k,))
            close(r["bytes"], n_ar * bare["bytes"], "sync bytes %r" % (k,))
            # Time inside MPI is part of the pass, and a pass over a group
            # of more than one process reduces (a group of 1 calls no MPI).
            lo = 0 if r["group_size"] == 1 else 1e-9
            if not lo <= r["mpi_us"] <= r["p90_us"] * (1 + 1e-9):
                bad("mpi_us %r of %r not in [%g, p90]" % (r["mpi_us"], k, lo))
        elif mode == "network" and v != "local":
            loc = by.get(("local",) + key(r))
            if loc is None:
                bad("network %s without local" % v)
                continue
            o = r["median_us"] - loc["median_us"]
            close(r["overhead_us"], o, "network %s %s overhead_us" %
                  (v, r["pass"]))
            close(r["overhead_pct"], 100 * o / r["median_us"],
                  "network %s %s overhead_pct" % (v, r["pass"]))
        elif mode == "sizes":
            if not r["min_us"] <= r["avg_us"] * (1 + 1e-9) or \
                    not r["avg_us"] <= r["max_us"] * (1 + 1e-9):
                bad("sizes %s C=%r: not min <= avg <= max" % (v, r["shape"]))
            c = r["shape"][0]
            close(r["bytes"], 4 * (2 * c + 1) if v == "sum_2c1" else 32 * c,
                  "sizes bytes")
        elif mode == "service" and v.startswith("service_"):
            base = {"service_full": "sync", "service_stats": "inproc_stats",
                    "service_stats1": "allreduce1",
                    "service_shm": "sync"}[v]

            def same(name):
                return [x for x in recs if x["variant"] == name and
                        tuple(x["shape"]) == tuple(r["shape"]) and
                        x["layout"] == r["layout"]]
            other = same(base)
            if len(other) != 1:
                bad("service %s without its in-process record" % v)
                continue
            close(r["hop_us"], r["median_us"] - other[0]["median_us"],
                  "hop_us")
            close(r["hop_ratio"], r["median_us"] / other[0]["median_us"],
                  "hop_ratio")
            if v == "service_stats1":
                close(r["target_us"], 1.5 * other[0]["median_us"] + 50,
                      "target_us")
                close(r["target_ratio"], r["median_us"] / r["target_us"],
                      "target_ratio")
            if v == "service_shm":
                close(r["target_us"], 1.3 * other[0]["median_us"],
                      "target_us")
                close(r["target_ratio"], r["median_us"] / r["target_us"],
                      "target_ratio")
            if v == "service_full":
                echo = same("unix_echo")
                if len(echo) != 1:
                    bad("service_full without its unix_echo record")
                    continue
                close(r["floor_us"], other[0]["median_us"] +
                      echo[0]["median_us"], "floor_us")
                close(r["floor_ratio"], r["median_us"] / r["floor_us"],
                      "floor_ratio")


def check_csv(path, recs):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if rows[0] != COLUMNS:
        bad("CSV header %r" % rows[0])
        return
    if len(rows) - 1 != len(recs):
        bad("CSV has %d rows, JSON %d records" % (len(rows) - 1, len(recs)))
        return
    for row, r in zip(rows[1:], recs):
        for c, cell in zip(COLUMNS, row):
            v = r[c]
            if c == "shape":
                same = cell == "x".join(str(d) for d in v)
            elif v is None:
                same = cell == ""
            elif c in STRINGS:
                same = cell == v
            else:
                same = math.isclose(float(cell), float(v), rel_tol=1e-9)
            if not same:
                bad("CSV %s %r != JSON %r" % (c, cell, v))


def main():
    args = sys.argv[1:]
    ranks, min_records = None, 1
    if "--ranks" in args:
        i = args.index("--ranks")
        ranks = int(args[i + 1])
        del args[i:i + 2]
    if "--min-records" in args:
        i = args.index("--min-records")
        min_records = int(args[i + 1])
        del args[i:i + 2]
    mode, jpath = args[0], args[1]
    with open(jpath) as f:
        doc = json.load(f)
    check_schema(doc, mode, ranks)
    recs = doc.get("records", [])
    if len(recs) < min_records:
        bad("%d records, expected at least %d" % (len(recs), min_records))
    if not problems:
        check_derived(recs, mode)
    if len(args) > 2:
        check_csv(args[2], recs)
    for p in problems:
        print("bench_check: " + p)
    print("bench_check %s: %d records, %d problems" %
          (mode, len(recs), len(problems)))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
