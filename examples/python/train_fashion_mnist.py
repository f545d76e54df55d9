#!/usr/bin/python3
"""Data-parallel PyTorch training on CPUs with SyncBatchNorm, in one command:

    mpirun -np 2 syncbnd -- python3 examples/python/train_fashion_mnist.py

The model is the Fashion-MNIST CNN of `syncbn train --model cnn` (three
3x3 convolutions of 16, 32 and 64 channels, each followed by BatchNorm
and ReLU, 2x2 max pooling after the first two, global average pooling,
a linear layer), written with torch.nn.BatchNorm2d as usual and turned
into a synchronized model by one call:

    model = syncbn.torch.convert_sync_batchnorm(model)
    model = torch.nn.parallel.DistributedDataParallel(model)

syncbnd, started by mpirun, runs one worker per rank and starts this
script as each worker's child with SYNCBN_SOCKET (the worker),
SYNCBN_RANK/SYNCBN_SIZE and MASTER_ADDR/MASTER_PORT (for torch.distributed,
which averages the gradients over gloo) in the environment. Each rank
trains on its own shard of every batch; the shards may be uneven
(--counts, default 30,18).

With --check (the default) every rank also trains, from the same initial
weights, three single-process models with torch.nn.BatchNorm2d on the
whole (concatenated) batches: one in float64 (the reference), one in
float32, and one in float32 on the same batches with the samples in
another order. The synchronized model's relative error against the
float64 model must stay within ERR_FACTOR times the larger error of the
two float32 torch models (plus a floor of a few float32 ulps), for the
losses, the parameters and the running statistics, however many steps
run: syncbn may round differently from torch, not worse. (The difference
between the two float32 torch runs alone is no measure of float32 error:
on some CPUs torch reduces in an order that does not depend on the
samples' order, and the two agree to 1e-7 while both are 5e-5 from
float64.) The running statistics must also be bit-identical on every
rank. Each rank ends with `rank R: PASS` or `rank R: FAIL ...` and exit
status 0 or 1.

Data: the Fashion-MNIST idx files under --data (Debian package
dataset-fashion-mnist: /usr/share/datasets/fashion-mnist), else synthetic
images; the first line says which.
"""
import argparse
import copy
import glob
import gzip
import os
import sys

import numpy as np
import torch
import torch.distributed as dist

# The installed package, else the one in this checkout (src/python).
sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                             "..", "..", "src", "python"))
import syncbn.torch  # noqa: E402

ERR_FACTOR = 3.0
FLOOR = 1e-6  # relative; float32 ulps are 6e-8, a step adds a few


def make_model():
    """The CNN of `syncbn train --model cnn` (src/nn/model.c)."""
    layers, c = [], 1
    for i, w in enumerate((16, 32, 64)):
        layers += [torch.nn.Conv2d(c, w, 3, padding=1), torch.nn.BatchNorm2d(w),
                   torch.nn.ReLU()]
        if i < 2:
            layers.append(torch.nn.MaxPool2d(2))
        c = w
    layers += [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(c, 10)]
    return torch.nn.Sequential(*layers)


def _idx(path):
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        raw = f.read()
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(raw[3])]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * raw[3]).reshape(dims)


def load_data(data_dir, n):
    """n images (N x 1 x 28 x 28, normalized) and labels, and a description."""
    imgs = sorted(glob.glob(os.path.join(data_dir, "**", "train-images-idx3-ubyte*"),
                            recursive=True))
    labs = sorted(glob.glob(os.path.join(data_dir, "**", "train-labels-idx1-ubyte*"),
                            recursive=True))
    if imgs and labs:
        x = (_idx(imgs[0])[:n].astype(np.float32) / 255.0 - 0.2860) / 0.3530
        y = _idx(labs[0])[:n].astype(np.int64)
        return (torch.from_numpy(x).reshape(-1, 1, 28, 28), torch.from_numpy(y),
                "Fashion-MNIST (%s)" % imgs[0])
    g = torch.Generator().manual_seed(1234)
    templates = torch.randn(10, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    x = templates[y] + 0.5 * torch.randn(n, 1, 28, 28, generator=g)
    return x, y, "synthetic (no Fashion-MNIST idx files under %s)" % data_dir


def shards(spec, rank, size):
    """--counts "c0,c1,...": (counts, batch, lo, hi), this rank's samples
    being [lo, hi) of each batch; None (after a message) when spec does
    not give `size` non-negative counts adding up to 2 or more."""
    counts = [int(c) for c in spec.split(",")]
    if len(counts) != size or min(counts) < 0 or sum(counts) < 2:
        print("rank %d: --counts needs %d non-negative numbers" % (rank, size))
        return None
    return counts, sum(counts), sum(counts[:rank]), sum(counts[:rank + 1])


def rel(a, b):
    a = torch.as_tensor(a, dtype=torch.float64).ravel()
    b = torch.as_tensor(b, dtype=torch.float64).ravel()
    return float((a - b).norm() / max(float(b.norm()), 1e-30))


def flat(tensors):
    return torch.cat([t.detach().double().ravel() for t in tensors])


def bn_buffers(model):
    return [b for n, b in model.named_buffers() if "running_" in n]


def train_step(model, opt, x, t, scale):
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x), t, reduction="sum") * scale
    loss.backward()
    opt.step()
    return loss.detach()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--counts", default="30,18",
                    help="samples per rank in each batch (comma-separated)")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--no-check", dest="check", action="store_false",
                    help="train only, without the single-process references")
    a = ap.parse_args()

    rank, size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    sh = shards(a.counts, rank, size)
    if sh is None:
        return 2
    counts, batch, lo, hi = sh
    torch.set_num_threads(1)
    if os.environ.get("MASTER_ADDR") == "127.0.0.1":
        # Gloo binds the interface of the host name unless told; on one host
        # the loopback interface is the one that works.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method="env://")

    x_all, t_all, what = load_data(a.data, batch * a.steps)
    if rank == 0:
        print("data: %s; %d steps, batch %d split %s" % (what, a.steps, batch, counts),
              flush=True)
    torch.manual_seed(0)
    ref = make_model()
    model = syncbn.torch.convert_sync_batchnorm(copy.deepcopy(ref))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=a.lr, momentum=0.9)
    if a.check:
        other = copy.deepcopy(ref)
        r64 = copy.deepcopy(ref).double()
        o_64 = torch.optim.SGD(r64.parameters(), lr=a.lr, momentum=0.9)
        o_ref = torch.optim.SGD(ref.parameters(), lr=a.lr, momentum=0.9)
        o_other = torch.optim.SGD(other.parameters(), lr=a.lr, momentum=0.9)
    perm = torch.randperm(batch, generator=torch.Generator().manual_seed(5))
    worst = {"loss": 0.0, "torch": 0.0}
    for s in range(a.steps):
        xb, tb = x_all[s * batch:(s + 1) * batch], t_all[s * batch:(s + 1) * batch]
        # The mean loss over the whole batch: DDP averages over the ranks,
        # hence the factor size / batch, also with uneven shards.
        loss = train_step(ddp, opt, xb[lo:hi], tb[lo:hi], size / batch)
        total = loss.clone()
        dist.all_reduce(total)
        total /= size
        if a.check:
            lr_ = train_step(ref, o_ref, xb, tb, 1.0 / batch)
            lo_ = train_step(other, o_other, xb[perm], tb[perm], 1.0 / batch)
            l64 = train_step(r64, o_64, xb.double(), tb, 1.0 / batch)
            worst["loss"] = max(worst["loss"], rel(total, l64))
            worst["torch"] = max(worst["torch"], rel(lr_, l64), rel(lo_, l64))
        if rank == 0 and (s % 5 == 0 or s == a.steps - 1):
            print("step %d: loss %.5f" % (s, float(total)) +
                  (" (torch single process %.5f)" % float(lr_) if a.check else ""),
                  flush=True)

    failures, lines = [], []
    # path="auto" (convert_sync_batchnorm's default) measured both ways of
    # synchronizing each layer on its first steps; the ranks chose together.
    lines.append("paths: " + " ".join(
        "%s=%s" % (m.layer_name, m.sync_path) for m in model.modules()
        if isinstance(m, syncbn.torch.SyncBatchNorm)))
    mine = flat(bn_buffers(model)).float()
    every = [torch.empty_like(mine) for _ in range(size)]
    dist.all_gather(every, mine)
    same = all(torch.equal(v, mine) for v in every)
    lines.append("running statistics bit-identical on all %d ranks: %s"
                 % (size, "yes" if same else "NO"))
    if not same:
        failures.append("running statistics differ between ranks")
    if a.check:
        for what_, f in (("loss", lambda m: None),
                         ("parameters", lambda m: flat(m.parameters())),
                         ("running statistics", lambda m: flat(bn_buffers(m)))):
            if what_ == "loss":
                e, e32 = worst["loss"], worst["torch"]
            else:
                e = rel(f(model), f(r64))
                e32 = max(rel(f(ref), f(r64)), rel(f(other), f(r64)))
            bound = ERR_FACTOR * e32 + FLOOR
            ok = e <= bound
            lines.append("%s: rel error against float64 torch %.1e, float32 "
                         "torch.nn.BatchNorm2d's %.1e, bound %.1e: %s"
                         % (what_, e, e32, bound, "ok" if ok else "FAIL"))
            if not ok:
                failures.append("%s: error %.1e against float64 (bound %.1e)"
                                % (what_, e, bound))
    lines.append("%s" % ("PASS" if not failures else "FAIL " + "; ".join(failures)))
    for r in range(size):
        if r == rank:
            print("\n".join("rank %d: %s" % (rank, line) for line in lines), flush=True)
        dist.barrier()
    dist.destroy_process_group()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
