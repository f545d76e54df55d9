#!/usr/bin/env python3
"""Checks the files and tables of `syncbn study --out DIR` (tests/study_test.sh).

  study_check.py runs DIR --seeds S --ranks R --real P --norms LIST --stdout F
                [--need FILES]
      sweeps 2, 3 and PreciseBN: the schema, CSV == JSON, the emulated rank
      counts, the seeds of every point, the norms, the tables on stdout
  study_check.py stats DIR --real P --stdout F
      sweep 1: the schema, CSV == JSON, which k were real, the real SyncBN
      merge equal to local statistics, errors that fall with |S|

Only the standard library: run with /usr/bin/python3 or any python3.
"""
import argparse
import csv
import json
import os
import re
import sys

RUN_COLS = ["sweep", "model", "norm", "norm_batch", "per_rank", "ranks",
            "real_ranks", "emulated_per_real", "ghost_batch", "group_size",
            "local_batch", "global_batch", "seed", "train_subset", "epochs",
            "set_values", "test_accuracy", "precise_accuracy", "train_loss",
            "test_loss", "wall_s"]
STAT_COLS = ["source", "per_rank", "ranks", "ranks_kind", "set_values",
             "mean_error", "var_error", "inv_sqrt_set", "gaussian_var_error",
             "channels"]
problems = []


def need(cond, what):
    if not cond:
        problems.append(what)


def value(cell):
    if cell == "null":
        return None
    try:
        return float(cell)
    except ValueError:
        return cell


def load(d, name, cols):
    """The JSON rows, after checking that the CSV holds the same."""
    with open(os.path.join(d, name + ".csv"), newline="") as f:
        rd = csv.reader(f)
        header = next(rd)
        body = list(rd)
    with open(os.path.join(d, name + ".json")) as f:
        doc = json.load(f)
    need(header == cols, "%s.csv: columns %s" % (name, header))
    need(doc["sweep"] == name, "%s.json: sweep %r" % (name, doc["sweep"]))
    rows = doc["rows"]
    need(len(rows) == len(body), "%s: %d JSON rows, %d CSV rows" %
         (name, len(rows), len(body)))
    for i, (r, c) in enumerate(zip(rows, body)):
        need(list(r) == cols, "%s.json row %d: keys %s" % (name, i, list(r)))
        for k, cell in zip(cols, c):
            a, b = r.get(k), value(cell)
            if isinstance(a, (int, float)) and isinstance(b, float):
                need(float(a) == b, "%s row %d %s: JSON %r CSV %r" %
                     (name, i, k, a, b))
            else:
                need(a == b, "%s row %d %s: JSON %r CSV %r" % (name, i, k, a, b))
    return doc, rows


def check_row(r, a, sweep):
    p = a.real
    need(r["real_ranks"] == p, "real_ranks %r" % r)
    emu = r["ranks"] // p if r["ranks"] > p else 1
    need(r["emulated_per_real"] == emu, "emulated_per_real %r" % r)
    need(0 <= r["test_accuracy"] <= 1, "accuracy %r" % r)
    need(r["norm"] != "in" or r["model"] == "cnn", "in on the MLP %r" % r)
    if sweep == "sweep2_norm_batch":
        need(r["global_batch"] == 64 and r["local_batch"] == 64 // p,
             "sweep 2 batch %r" % r)
        if r["norm"] == "bn":
            nb = r["norm_batch"]
            need(r["ranks"] == 64 // nb, "sweep 2 bn ranks %r" % r)
            need(r["ghost_batch"] == (nb if nb < 64 // p else 0),
                 "sweep 2 ghost %r" % r)
    else:
        b, R = r["per_rank"], a.ranks
        need(r["global_batch"] == R * b, "sweep 3 global %r" % r)
        need(r["local_batch"] == R // p * b, "sweep 3 local %r" % r)
        if r["norm"] == "bn":
            need(r["ranks"] == R and r["norm_batch"] == b and
                 r["ghost_batch"] == (b if R > p else 0), "sweep 3 bn %r" % r)
        if r["norm"] == "syncbn":
            need(r["norm_batch"] == R * b, "sweep 3 syncbn %r" % r)
        # Every point takes sweep 2's number of steps (epochs x subset / 64).
        steps = r["epochs"] * (r["train_subset"] // r["global_batch"])
        want = a.epochs * (a.subset // 64)
        need(abs(steps - want) <= want // 4, "sweep 3 steps %d, wanted %d: %r" %
             (steps, want, r))


def runs(a):
    norms = set(a.norms.split(","))
    for name in a.need.split(","):
        doc, rows = load(a.dir, name, RUN_COLS)
        need(doc["real_ranks"] == a.real, "%s: real_ranks" % name)
        need(len(rows) > 0, "%s: no rows" % name)
        points = {}
        for r in rows:
            sweep = r["sweep"]
            need(sweep in ("sweep2_norm_batch", "sweep3_per_rank") and
                 (sweep == name or name == "precise_bn"), "sweep %r" % r)
            check_row(r, a, sweep)
            key = (r["model"], r["norm"], r["norm_batch"], r["per_rank"])
            points.setdefault(key, []).append(r["seed"])
            if name == "precise_bn":
                need(r["norm"] in ("bn", "syncbn") and
                     r["precise_accuracy"] is not None, "precise %r" % r)
        for key, seeds in points.items():
            need(sorted(seeds) == list(range(a.seeds)),
                 "%s %s: seeds %s" % (name, key, seeds))
        if name != "precise_bn":
            got = {r["norm"] for r in rows}
            need(got == norms, "%s: norms %s, wanted %s" % (name, got, norms))
    out = open(a.stdout).read()
    for text in ("|S_i|", "Sweep 2", "real x", "emulated"):
        need(text in out or (text == "real x" and a.real == 1),
             "stdout lacks %r" % text)


def stats(a):
    doc, rows = load(a.dir, "sweep1_stats", STAT_COLS)
    for src in ("pixels", "conv1"):
        rs = [r for r in rows if r["source"] == src]
        need(len(rs) > 10, "%s: %d rows" % (src, len(rs)))
        for r in rs:
            need((r["ranks_kind"] == "real") == (r["ranks"] == a.real),
                 "ranks_kind %r" % r)
            per = 784 if src == "conv1" else 1
            need(r["set_values"] == r["per_rank"] * r["ranks"] * per,
                 "|S| %r" % r)
        small = min(rs, key=lambda r: r["set_values"])
        large = max(rs, key=lambda r: r["set_values"])
        need(large["mean_error"] < small["mean_error"] / 4 and
             large["var_error"] < small["var_error"] / 4,
             "%s: errors do not fall with |S|" % src)
        if src == "pixels":
            for r in rs:
                need(abs(r["mean_error"] / r["inv_sqrt_set"] - 1) < 0.25,
                     "pixels: mean error far from 1/sqrt(|S|) %r" % r)
    out = open(a.stdout).read()
    m = re.search(r"equals local BatchNorm over k\*b samples to ([0-9.e+-]+)",
                  out)
    need(m is not None and float(m.group(1)) < 1e-6,
         "the real SyncBN merge differs from local statistics")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["runs", "stats"])
    ap.add_argument("dir")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--real", type=int, required=True)
    ap.add_argument("--norms", default="bn,syncbn,gn,ln,in")
    ap.add_argument("--subset", type=int, default=256,
                    help="the study's --train-subset")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--stdout", required=True)
    ap.add_argument("--need", default="sweep2_norm_batch,sweep3_per_rank,"
                    "precise_bn", help="the files that must be there")
    a = ap.parse_args()
    (runs if a.what == "runs" else stats)(a)
    for p in problems[:20]:
        print("study_check:", p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
