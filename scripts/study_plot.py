#!/usr/bin/env python3
"""Draws the PNGs of `syncbn study --out DIR` from its JSON files (Debian:
python3-matplotlib; run with /usr/bin/python3):

  sweep1_stats.json       error of the set mean and variance vs |S|, log-log,
                          beside 1/sqrt(|S|)          -> sweep1_stats.png
  sweep2_norm_batch.json  test accuracy per normalization at global batch 64,
                          bars with the sd over seeds -> sweep2_norm_batch.png
  sweep3_per_rank.json    test accuracy vs images per rank, one line per
                          norm (the GroupNorm paper's Figure 1)
                                                      -> sweep3_per_rank.png
  precise_bn.json         EMA vs precise statistics per normalization batch
                                                      -> precise_bn.png

Files that are missing are skipped. Several DIRs (say, one study run per
model) are drawn together, their rows merged. Usage:
study_plot.py DIR [DIR...] [--out DIR]
"""
import argparse
import collections
import json
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

NORM_ORDER = ["bn", "syncbn", "gn", "ln", "in"]
NORM_LABEL = {"bn": "BatchNorm", "syncbn": "SyncBN", "gn": "GroupNorm",
              "ln": "LayerNorm", "in": "InstanceNorm"}


def load(path):
    with open(path) as f:
        return json.load(f)


def mean_sd(values):
    """Mean and sample sd (0 for one value), as the study's tables."""
    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, 0.0
    return m, math.sqrt(max(0.0, sum((v - m) ** 2 for v in values) / (n - 1)))


def by_point(rows, key, field="test_accuracy"):
    """{(model, norm, key value): [field over the seeds]}."""
    acc = collections.OrderedDict()
    for r in rows:
        acc.setdefault((r["model"], r["norm"], r[key]), []).append(
            100 * r[field])
    return acc


def plot_stats(doc, out):
    rows = doc["rows"]
    sources = [s for s in ("pixels", "conv1") if any(
        r["source"] == s for r in rows)]
    fig, axes = plt.subplots(1, len(sources), figsize=(6 * len(sources), 4.5),
                             squeeze=False)
    for ax, src in zip(axes[0], sources):
        rs = [r for r in rows if r["source"] == src]
        for k in sorted({r["ranks"] for r in rs}):
            pts = sorted((r["set_values"], r["mean_error"], r["var_error"])
                         for r in rs if r["ranks"] == k)
            x = [p[0] for p in pts]
            ax.plot(x, [p[1] for p in pts], "o-", label="mean, k=%d" % k)
            ax.plot(x, [p[2] for p in pts], "s--", label="variance, k=%d" % k)
        xs = sorted({r["set_values"] for r in rs})
        ax.plot(xs, [1 / math.sqrt(x) for x in xs], "k:", lw=2,
                label="1/sqrt(|S|)")
        ax.plot(xs, [math.sqrt(2 * x - 1) / x for x in xs], "k-.", lw=1,
                label="sqrt(2|S|-1)/|S| (Gaussian var)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("|S| (values per statistic: k ranks x b samples%s)" %
                      (" x 784" if src == "conv1" else ""))
        ax.set_ylabel("rms relative error")
        ax.set_title({"pixels": "Fashion-MNIST pixels (BatchNorm1d view)",
                      "conv1": "CNN first conv, per channel (BatchNorm2d)"}
                     [src])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle("Sweep 1: batch statistics vs population (%d real ranks)" %
                 doc["real_ranks"])
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def label_norm(r):
    if r["norm"] in ("bn",) or (r["norm"] == "syncbn" and
                                r["norm_batch"] > 1):
        return "%s %d" % (r["norm"], r["norm_batch"])
    return r["norm"]


def plot_norm(doc, out):
    rows = doc["rows"]
    models = [m for m in ("mlp", "cnn") if any(r["model"] == m for r in rows)]
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5),
                             squeeze=False)
    for ax, model in zip(axes[0], models):
        groups = collections.OrderedDict()
        for r in rows:
            if r["model"] == model:
                groups.setdefault(label_norm(r), []).append(
                    100 * r["test_accuracy"])
        labels = list(groups)
        stats = [mean_sd(groups[k]) for k in labels]
        colors = ["C0" if lb.startswith("bn") else "C1" if
                  lb.startswith("syncbn") else "C2" for lb in labels]
        ax.bar(range(len(labels)), [s[0] for s in stats],
               yerr=[s[1] for s in stats], capsize=4, color=colors)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=30)
        lo = min(s[0] - s[1] for s in stats)
        ax.set_ylim(max(0, lo - 5), 100)
        ax.set_ylabel("test accuracy (%)")
        seeds = len({r["seed"] for r in rows if r["model"] == model})
        ax.set_title("%s, global batch 64, %d seed%s" %
                     (model.upper(), seeds, "s" if seeds > 1 else ""))
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle("Sweep 2: accuracy per normalization (batch), mean +- sd "
                 "over seeds")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_rank(doc, out):
    rows = doc["rows"]
    models = [m for m in ("mlp", "cnn") if any(r["model"] == m for r in rows)]
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5),
                             squeeze=False)
    pts = by_point(rows, "per_rank")
    for ax, model in zip(axes[0], models):
        for norm in NORM_ORDER:
            xs = sorted(b for (m, n, b) in pts if m == model and n == norm)
            if not xs:
                continue
            st = [mean_sd(pts[(model, norm, b)]) for b in xs]
            ax.errorbar(xs, [100 - s[0] for s in st], yerr=[s[1] for s in st],
                        marker="o", capsize=3, label=NORM_LABEL[norm])
        ax.set_xscale("log", base=2)
        ticks = sorted({b for (m, n, b) in pts if m == model})
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(x) for x in ticks])
        ax.invert_xaxis()
        ax.set_xlabel("images per rank (%d ranks)" % rows[0]["ranks"])
        ax.set_ylabel("test error (%)")
        ax.set_title(model.upper())
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Sweep 3: error vs images per rank (GN paper, Figure 1)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_precise(doc, out):
    rows = doc["rows"]
    models = [m for m in ("mlp", "cnn") if any(r["model"] == m for r in rows)]
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5),
                             squeeze=False)
    ema = by_point(rows, "norm_batch")
    pre = by_point(rows, "norm_batch", "precise_accuracy")
    for ax, model in zip(axes[0], models):
        keys = [k for k in ema if k[0] == model]
        xs = [k[2] for k in keys]
        for data, lab in ((ema, "EMA running stats"), (pre, "PreciseBN")):
            st = [mean_sd(data[k]) for k in keys]
            ax.errorbar(xs, [s[0] for s in st], yerr=[s[1] for s in st],
                        marker="o", capsize=3, label=lab)
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs)
        ax.set_xticklabels([str(x) for x in xs])
        ax.set_xlabel("normalization batch")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(model.upper())
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("PreciseBN: running (EMA) vs exact population statistics")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dir", nargs="+", help="the --out DIR of syncbn study")
    ap.add_argument("--out", help="where the PNGs go (default: the first "
                    "DIR)")
    a = ap.parse_args()
    out = a.out or a.dir[0]
    os.makedirs(out, exist_ok=True)
    plots = [("sweep1_stats", plot_stats), ("sweep2_norm_batch", plot_norm),
             ("sweep3_per_rank", plot_rank), ("precise_bn", plot_precise)]
    made = 0
    for name, fn in plots:
        docs = [load(os.path.join(d, name + ".json")) for d in a.dir
                if os.path.exists(os.path.join(d, name + ".json"))]
        if not docs:
            continue
        doc = dict(docs[0])
        doc["rows"] = [r for d in docs for r in d["rows"]]
        if not doc["rows"]:
            continue
        png = os.path.join(out, name + ".png")
        fn(doc, png)
        print("wrote", png)
        made += 1
    if made == 0:
        print("study_plot.py: no study JSON files in %s" % " ".join(a.dir),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
