#!/usr/bin/python3
"""Trains the model and recipe of `syncbn train` with PyTorch and with
syncbn, and prints both runs' time and test accuracy.

Run with Debian's python (python3-torch; not part of CI):

    /usr/bin/python3 scripts/train_torch.py [--model mlp|cnn] [--epochs E]
        [--batch B] [--np P] [--syncbn build/bin/syncbn] [--data DIR]
        [--threads T]

PyTorch trains in one process on the global batch P*B with BatchNorm
(which equals SyncBN over P ranks of B each) on P x T threads, the cores
that syncbn's P ranks of T threads use; syncbn trains under `mpirun -np P` with --norm
syncbn. The recipe is the same: cross-entropy, SGD with momentum 0.9 and
weight decay 5e-4, OneCycleLR(max_lr = 0.05 sqrt(PB / 32), pct_start 0.3,
cos, div 25, final div 1e4, cycle_momentum False), inputs standardized by
the training set's moments, the last partial batch dropped, PyTorch's
default initialization. The random streams differ (weights, order), so
the accuracies agree statistically, not bit for bit.
"""
import argparse
import gzip
import math
import os
import re
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn as nn


def idx(path):
    with gzip.open(path, "rb") as f:
        b = f.read()
    ndim = b[3]
    dims = [int.from_bytes(b[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(b, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def model(kind):
    if kind == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 256),
                             nn.BatchNorm1d(256), nn.ReLU(),
                             nn.Linear(256, 256), nn.BatchNorm1d(256),
                             nn.ReLU(), nn.Linear(256, 10))
    layers, cin = [], 1
    for i, c in enumerate((16, 32, 64)):
        layers += [nn.Conv2d(cin, c, 3, padding=1), nn.BatchNorm2d(c),
                   nn.ReLU()]
        if i < 2:
            layers.append(nn.MaxPool2d(2))
        cin = c
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)]
    return nn.Sequential(*layers)


def fit(m, xtr, ytr, B, epochs, after_epoch=None):
    """The recipe: SGD (momentum 0.9, weight decay 5e-4) under
    OneCycleLR(max_lr = 0.05 sqrt(B / 32)), the last partial batch dropped;
    after_epoch(epoch, m) runs after each epoch's training."""
    steps = len(xtr) // B
    lr = 0.05 * math.sqrt(B / 32)
    opt = torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9,
                          weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * steps, cycle_momentum=False)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(epochs):
        m.train()
        perm = torch.randperm(len(xtr))
        for s in range(steps):
            i = perm[s * B:(s + 1) * B]
            opt.zero_grad()
            loss_fn(m(xtr[i]), ytr[i]).backward()
            opt.step()
            sched.step()
        if after_epoch is not None:
            after_epoch(epoch, m)


def accuracy(m, xte, yte):
    """Test accuracy in eval mode, in [0, 1]."""
    m.eval()
    with torch.no_grad():
        correct = sum((m(xte[j:j + 500]).argmax(1) == yte[j:j + 500])
                      .sum().item() for j in range(0, len(xte), 500))
    return correct / len(xte)


def load_data(data):
    """The training and test images standardized by the training set's
    moments, as (N, 1, 28, 28) float tensors, and their int64 labels."""
    xtr = idx(os.path.join(data, "train-images-idx3-ubyte.gz"))
    ytr = idx(os.path.join(data, "train-labels-idx1-ubyte.gz"))
    xte = idx(os.path.join(data, "t10k-images-idx3-ubyte.gz"))
    yte = idx(os.path.join(data, "t10k-labels-idx1-ubyte.gz"))
    scaled = xtr.astype(np.float64) / 255
    mean, std = scaled.mean(), scaled.std()
    prep = lambda x: torch.from_numpy(
        ((x.astype(np.float32) / 255 - mean) / std).astype(np.float32)
    ).unsqueeze(1)
    label = lambda y: torch.from_numpy(y.astype(np.int64))
    return prep(xtr), label(ytr), prep(xte), label(yte)


def torch_run(a):
    torch.manual_seed(0)
    torch.set_num_threads(a.np * a.threads)
    xtr, ytr, xte, yte = load_data(a.data)
    m = model(a.model)
    t0 = time.time()
    accs = []

    def report(epoch, m):
        accs.append(100.0 * accuracy(m, xte, yte))
        print("torch  epoch %d  test accuracy %.2f%%  %.1f s" %
              (epoch + 1, accs[-1], time.time() - t0), flush=True)

    fit(m, xtr, ytr, a.np * a.batch, a.epochs, report)
    return time.time() - t0, accs[-1]


def syncbn_run(a):
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_pml="ob1",
               OMPI_MCA_btl="self,vader,tcp")
    cmd = ["mpirun", "--oversubscribe", "--bind-to", "none", "-np",
           str(a.np), a.syncbn, "train", "--no-progress", "--model", a.model,
           "--norm", "syncbn", "--epochs", str(a.epochs), "--batch",
           str(a.batch), "--threads", str(a.threads), "--data", a.data]
    t0 = time.time()
    out = subprocess.run(cmd, env=env, check=True, capture_output=True,
                         text=True).stdout
    wall = time.time() - t0
    for line in out.splitlines():
        if line.startswith("epoch"):
            print("syncbn " + line, flush=True)
    acc = float(re.search(r"^test accuracy ([0-9.]+)%$", out, re.M).group(1))
    return wall, acc


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="mlp", choices=["mlp", "cnn"])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=64, help="per rank")
    p.add_argument("--np", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--syncbn", default="build/bin/syncbn")
    p.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    a = p.parse_args()
    st, sa = syncbn_run(a)
    tt, ta = torch_run(a)
    print("\n%-8s %10s %10s" % ("", "time (s)", "accuracy"))
    print("%-8s %10.1f %9.2f%%" % ("syncbn", st, sa))
    print("%-8s %10.1f %9.2f%%" % ("pytorch", tt, ta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
