#!/usr/bin/python3
"""Checks one point of `syncbn study`'s sweep 2 against PyTorch: the model
trained with the study's recipe at global batch 64, BatchNorm over
normalization batches of g samples (ghost batches: g-sample slices of
the batch, each normalized by its own statistics), against the syncbn
numbers in a study's --out DIR (sweep2_norm_batch.json).

Run with Debian's python (python3-torch; not part of CI):

    /usr/bin/python3 scripts/study_torch.py DIR [--model mlp|cnn]
        [--norm-batch G] [--seeds S] [--threads T] [--data DIR]

The recipe is `syncbn train`'s, the one scripts/train_torch.py uses (its
model and data loading are imported from there): SGD with momentum 0.9 and
weight decay 5e-4, OneCycleLR(max_lr = 0.05 sqrt(64 / 32)), the first
--train-subset images for the study's epochs, evaluated on the first
--test-subset test images. The running statistics are those of the first
real rank, as the study evaluates rank 0's: one update per step from the
mean over that rank's ghost batches of their means and unbiased
variances. The random streams differ from syncbn's, so the accuracies
agree statistically (mean +- sd over seeds), not bit for bit.
"""
import argparse
import json
import math
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_torch  # noqa: E402


class GhostBN(nn.Module):
    """BatchNorm over g-sample slices; running stats from the first
    `local` samples' slices (rank 0's), one update per step."""

    def __init__(self, bn, g, local):
        super().__init__()
        self.bn, self.g, self.local = bn, g, local

    def forward(self, x):
        bn = self.bn
        if not self.training:
            return bn(x)
        n, c = x.shape[0], x.shape[1]
        g = self.g
        # (n / g, g, C, ...): statistics over each slice's samples and
        # spatial positions.
        xs = x.view(n // g, g, *x.shape[1:])
        red = [1] + [d + 1 for d in range(2, x.dim())]
        mean = xs.mean(dim=red, keepdim=True)
        var = xs.var(dim=red, unbiased=False, keepdim=True)
        shape = [1, 1, c] + [1] * (x.dim() - 2)
        y = (xs - mean) / torch.sqrt(var + bn.eps)
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
        with torch.no_grad():
            k = self.local // g
            cnt = g * (x[0, 0].numel())
            m0 = mean[:k].reshape(k, c).mean(0)
            v0 = (var[:k].reshape(k, c) * cnt / (cnt - 1)).mean(0)
            f = bn.momentum
            bn.running_mean.mul_(1 - f).add_(f * m0)
            bn.running_var.mul_(1 - f).add_(f * v0)
        return y.view_as(x)


def ghosted(m, g, local):
    for name, child in m.named_children():
        if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)):
            setattr(m, name, GhostBN(child, g, local))
        else:
            ghosted(child, g, local)
    return m


def run(a, seed, xtr, ytr, xte, yte):
    torch.manual_seed(seed)
    m = train_torch.model(a.model)
    if a.norm_batch < 64:
        ghosted(m, a.norm_batch, a.local)
    train_torch.fit(m, xtr, ytr, 64, a.epochs)
    return train_torch.accuracy(m, xte, yte)


def mean_sd(v):
    m = sum(v) / len(v)
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 \
        else 0.0
    return 100 * m, 100 * sd


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dir", help="a syncbn study --out DIR with sweep 2")
    p.add_argument("--model", default="mlp", choices=["mlp", "cnn"])
    p.add_argument("--norm-batch", type=int, default=2)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    a = p.parse_args()
    with open(os.path.join(a.dir, "sweep2_norm_batch.json")) as f:
        doc = json.load(f)
    a.epochs = doc["epochs"]
    a.local = 64 // doc["real_ranks"]
    norm = "bn" if a.norm_batch <= a.local else "syncbn"
    ours = [r["test_accuracy"] for r in doc["rows"] if r["model"] == a.model
            and r["norm"] == norm and r["norm_batch"] == a.norm_batch]
    if not ours:
        print("study_torch.py: no syncbn %s %s %d rows in %s; PyTorch only" %
              (a.model, norm, a.norm_batch, a.dir), file=sys.stderr)
    torch.set_num_threads(a.threads)
    xtr, ytr, xte, yte = load(a, doc)
    accs = []
    for seed in range(a.seeds):
        accs.append(run(a, seed, xtr, ytr, xte, yte))
        print("torch  seed %d  test accuracy %.2f%%" % (seed, 100 * accs[-1]),
              flush=True)
    print("%s, global batch 64, normalization batch %d, %d epochs on %d "
          "images, test %d" % (a.model, a.norm_batch, a.epochs,
                               doc["train_subset"], doc["test_subset"]))
    if ours:
        print("syncbn   %.2f +- %.2f %%  (%d seeds)" % (mean_sd(ours) +
                                                        (len(ours),)))
    print("pytorch  %.2f +- %.2f %%  (%d seeds)" % (mean_sd(accs) +
                                                    (len(accs),)))


def load(a, doc):
    """The study's subsets, standardized by the whole training set's
    moments as syncbn does."""
    xtr, ytr, xte, yte = train_torch.load_data(a.data)
    n, t = doc["train_subset"], doc["test_subset"]
    return xtr[:n], ytr[:n], xte[:t], yte[:t]


if __name__ == "__main__":
    main()
