#!/usr/bin/env python3
"""Turns the records of `syncbn bench MODE --json FILE` (or --csv FILE)
into PNGs (Debian: python3-matplotlib). Several files of one mode (say np 2
and np 4) are drawn together; each file's mode picks its plot:

  layer    overhead_pct vs channels, one line per per-rank N and rank count
           (NCHW solid, NHWC dashed)          -> layer_overhead.png
  network  total step time per variant, with % over local BN
                                              -> network.png
  sizes    latency vs message size, one curve per variant and rank count
                                              -> sizes.png
  service  the service hop: service vs in-process time per shape
                                              -> service.png
  kernels  floor_ratio and stream_floor_ratio per op and pass, and
           their Markdown summary on stdout -> kernels.png

Usage: bench_plot.py [--out DIR] FILE [FILE...]
"""
import argparse
import collections
import csv
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load(path):
    """(mode, machine line, records) of a JSON or CSV file."""
    if path.endswith(".csv"):
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        recs = []
        for r in rows:
            d = {}
            for k, v in r.items():
                if k == "shape":
                    d[k] = [int(x) for x in v.split("x")]
                elif k in ("mode", "variant", "op", "pass", "layout"):
                    d[k] = v
                else:
                    d[k] = float(v) if v != "" else None
            recs.append(d)
        mode = recs[0]["mode"] if recs else "?"
        return mode, "", recs
    with open(path) as f:
        doc = json.load(f)
    m = doc["machine"]
    line = "%s, %s, kernels %s" % (m["cpu"], m["mpi"], m["kernels"])
    return doc["mode"], line, doc["records"]


def plot_layer(recs, out, note):
    """One panel per layout; x: the layer shapes ordered by channels (two
    ResNet-50 shapes share C = 64, so the axis names C and H x W)."""
    sync = [r for r in recs if r["variant"] == "sync"]
    layouts = sorted({r["layout"] for r in sync})
    shapes = sorted({tuple(r["shape"][1:]) for r in sync},
                    key=lambda s: (s[0], -s[1]))
    fig, axes = plt.subplots(1, len(layouts), figsize=(6 * len(layouts), 5),
                             sharey=True, squeeze=False)
    for ax, layout in zip(axes[0], layouts):
        lines = collections.defaultdict(dict)
        for r in sync:
            if r["layout"] == layout:
                lines[(int(r["ranks"]), r["shape"][0])][
                    tuple(r["shape"][1:])] = r["overhead_pct"]
        for (ranks, n), pts in sorted(lines.items()):
            xs = [i for i, s in enumerate(shapes) if s in pts]
            ax.plot(xs, [pts[shapes[i]] for i in xs],
                    "-o" if ranks == 2 else "--s", markersize=4,
                    label="np %d, N=%d per rank" % (ranks, n))
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(["%d\n%sx%s" % (s[0], s[1], s[2]) if len(s) == 3
                            else str(s[0]) for s in shapes], fontsize=7)
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.set_xlabel("channels C (and H x W) of the BatchNorm layer")
        ax.set_title("%s" % layout.upper())
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("SyncBN overhead, % of the SyncBN step (median)")
    fig.suptitle("What SyncBN adds to BatchNorm forward+backward")
    finish(fig, out, "layer_overhead.png", note)


def plot_network(recs, out, note):
    fig, ax = plt.subplots(figsize=(8, 5))
    steps = [r for r in recs if r["pass"] == "step"]
    ranks = sorted({int(r["ranks"]) for r in steps})
    variants = ["local", "unfused", "fused", "groupnorm"]
    w = 0.8 / max(1, len(ranks))
    for i, p in enumerate(ranks):
        ys, labels = [], []
        for v in variants:
            rr = [r for r in steps if r["variant"] == v and
                  int(r["ranks"]) == p]
            ys.append(rr[0]["median_us"] / 1e3 if rr else 0)
            pct = rr[0]["overhead_pct"] if rr else None
            labels.append("" if pct is None else "%+.1f%%" % pct)
        xs = [j + i * w for j in range(len(variants))]
        bars = ax.bar(xs, ys, w, label="np %d (N=%d per rank)" %
                      (p, steps[0]["shape"][0]))
        for b, t in zip(bars, labels):
            ax.text(b.get_x() + b.get_width() / 2, b.get_height(), t,
                    ha="center", va="bottom", fontsize=7)
    ax.set_xticks([j + w * (len(ranks) - 1) / 2 for j in range(len(variants))])
    ax.set_xticklabels(["local BN", "SyncBN unfused", "SyncBN fused",
                        "GroupNorm(32)"])
    ax.set_ylabel("ms per step (53 layers, forward + backward)")
    ax.set_title("ResNet-50's BatchNorm layers: one training step")
    ax.legend(fontsize=8)
    finish(fig, out, "network.png", note)


def plot_sizes(recs, out, note):
    fig, ax = plt.subplots(figsize=(8, 5))
    curves = collections.defaultdict(list)
    for r in recs:
        curves[(r["variant"], int(r["ranks"]))].append(
            (r["shape"][0], r["avg_us"]))
    names = {"records": "Chan-merge records (32 B/channel)",
             "records_nonblocking": "records, non-blocking (polled)",
             "records_merge": "the merge alone, no message",
             "sum_same_bytes": "MPI_SUM, same bytes",
             "sum_2c1": "MPI_SUM, 2C+1 floats"}
    for (v, p), pts in sorted(curves.items()):
        pts.sort()
        ax.plot([q[0] for q in pts], [q[1] for q in pts], "-o", markersize=3,
                label="%s, np %d" % (names.get(v, v), p))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("channels C")
    ax.set_ylabel("allreduce latency, us (OSU avg)")
    ax.set_title("The record allreduce vs MPI_SUM")
    ax.legend(fontsize=7)
    finish(fig, out, "sizes.png", note)


def plot_service(recs, out, note):
    fig, ax = plt.subplots(figsize=(9, 5))
    pairs = [("service_full", "sync"), ("service_stats", "inproc_stats")]
    keys = sorted({(int(r["ranks"]), tuple(r["shape"]), r["layout"])
                   for r in recs}, key=lambda k: (k[0], k[1][1], k[1][0]))
    by = {(r["variant"], int(r["ranks"]), tuple(r["shape"]), r["layout"]): r
          for r in recs}
    w = 0.2
    for i, (sv, ip) in enumerate(pairs):
        for j, v in enumerate((sv, ip)):
            ys = [by[(v,) + k]["median_us"] / 1e3 if (v,) + k in by else 0
                  for k in keys]
            ax.bar([x + (2 * i + j) * w for x in range(len(keys))], ys, w,
                   label=v)
    ax.set_xticks([x + 1.5 * w for x in range(len(keys))])
    ax.set_xticklabels(["np%d\n%s" % (k[0], "x".join(map(str, k[1])))
                        for k in keys], fontsize=6)
    ax.set_yscale("log")
    ax.set_ylabel("ms per forward+backward (median)")
    ax.set_title("The service hop: through syncbnd vs in process")
    ax.legend(fontsize=8)
    finish(fig, out, "service.png", note)


def median(v):
    v = sorted(v)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def plot_kernels(recs, out, note):
    """Bars of the median floor_ratio and stream_floor_ratio per op, pass
    and layout; the same as a Markdown table on stdout (median and worst
    over the shapes)."""
    groups = collections.defaultdict(list)
    for r in recs:
        groups[(r["op"], r["pass"], r["layout"])].append(r)
    keys = sorted(groups)
    cols = [("floor_ratio", "floor (through the cache)"),
            ("stream_floor_ratio", "streaming floor")]
    print("| op | pass | layout | shapes | floor_ratio: median | worst | "
          "stream_floor_ratio: median | worst |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for k in keys:
        cells = []
        for c, _ in cols:
            v = [r[c] for r in groups[k] if r.get(c) is not None]
            cells += ["%.2f" % median(v), "%.2f" % max(v)] if v else ["-", "-"]
        print("| %s | %s | %s | %d | %s |" % (k + (len(groups[k]),) +
                                             (" | ".join(cells),)))
    fig, ax = plt.subplots(figsize=(10, 5))
    x = range(len(keys))
    for i, (c, label) in enumerate(cols):
        ys = [median([r[c] for r in groups[k] if r.get(c) is not None] or [0])
              for k in keys]
        ax.bar([j + (i - 0.5) * 0.4 for j in x], ys, width=0.4, label=label)
    ax.set_xticks(list(x))
    ax.set_xticklabels(["%s %s %s" % k for k in keys], rotation=70,
                       ha="right", fontsize=7)
    ax.axhline(1, color="grey", linewidth=0.5)
    ax.set_ylabel("time / floor time (median over shapes)")
    ax.set_title("Kernels against same-run floors moving the same bytes")
    ax.legend(fontsize=8)
    finish(fig, out, "kernels.png", note)


def finish(fig, out, name, note):
    if note:
        fig.text(0.01, 0.005, note, fontsize=6, color="grey")
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    path = os.path.join(out, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(path)


PLOTS = {"layer": plot_layer, "network": plot_network, "sizes": plot_sizes,
         "service": plot_service, "kernels": plot_kernels}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=".", help="directory of the PNGs")
    ap.add_argument("files", nargs="+")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    by_mode = collections.defaultdict(list)
    notes = {}
    for f in a.files:
        mode, note, recs = load(f)
        if mode not in PLOTS:
            print("bench_plot: %s: unknown mode %r" % (f, mode),
                  file=sys.stderr)
            return 2
        by_mode[mode] += recs
        notes[mode] = note
    for mode, recs in by_mode.items():
        PLOTS[mode](recs, a.out, notes[mode])
    return 0


if __name__ == "__main__":
    sys.exit(main())
