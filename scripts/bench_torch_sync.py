#!/usr/bin/python3
"""What a synchronized BatchNorm step costs a CPU trainer, by path:

    mpirun -np 2 build/bin/syncbnd -- /usr/bin/python3 scripts/bench_torch_sync.py

For each shape (per-rank N, C, H, W) every rank times, alternating the
three in every round so that they share the machine's state:
- local: torch.nn.BatchNorm2d forward + backward (no synchronization:
         the baseline);
- stats: syncbn.torch.SyncBatchNorm(path="stats") forward + backward
         (local compute, per-channel statistics through the worker:
         `stats` and `stats_backward`);
- shm:   SyncBatchNorm(path="shm"): the whole tensors through a
         shared-memory region to the worker, which normalizes
         (`forward`/`backward` of a `syncbatchnorm` layer, plus the
         pipelined `get_state` that keeps the buffers equal).
Rank 0 prints the medians, the ratios stats/local, shm/local and
shm/stats, and the path that a path="auto" layer of the same shape
picked (it measures both over its first steps, see syncbn/torch.py).
"""
import os
import statistics
import sys
import time

import torch

sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                             "..", "src", "python"))
import syncbn.torch as sbt  # noqa: E402

# A small layer, the CNN's first and third layers of `syncbn train --model
# cnn` at batch 30 per rank, a 6.4 MB tensor, a wide late layer.
SHAPES = [(32, 16, 8, 8), (30, 16, 28, 28), (30, 64, 7, 7), (8, 64, 56, 56),
          (8, 256, 14, 14)]
ROUNDS = 15


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def auto_pick(name, x, dy):
    """The path a path="auto" layer picks for this shape."""
    m = sbt.SyncBatchNorm(x.shape[1], name=name, path="auto")
    while m.sync_path is None:
        m(x.clone().requires_grad_()).backward(dy)
    return m.sync_path


def main():
    rank = int(os.environ.get("SYNCBN_RANK", 0))
    torch.set_num_threads(1)
    sbt.default_client()
    # The same on every rank of this job, new for each job.
    tag = "bench%s" % os.environ.get("MASTER_PORT", "0")
    if rank == 0:
        print("%-18s %9s %9s %9s %12s %10s %10s  %s" % (
            "N,C,H,W per rank", "local ms", "stats ms", "shm ms",
            "stats/local", "shm/local", "shm/stats", "auto picks"), flush=True)
    for i, (n, c, h, w) in enumerate(SHAPES):
        g = torch.Generator().manual_seed(i)
        x = torch.randn(n, c, h, w, generator=g)
        dy = torch.randn(n, c, h, w, generator=g)
        mods = {"local": torch.nn.BatchNorm2d(c),
                "stats": sbt.SyncBatchNorm(c, name="%s.s%d" % (tag, i), path="stats"),
                "shm": sbt.SyncBatchNorm(c, name="%s.m%d" % (tag, i), path="shm")}

        def run(m):
            xr = x.clone().requires_grad_()
            m(xr).backward(dy)

        times = {k: [] for k in mods}
        for r in range(ROUNDS + 1):
            for name, m in mods.items():
                t = timed(lambda: run(m))
                if r > 0:  # the first round warms up
                    times[name].append(t)
        pick = auto_pick("%s.a%d" % (tag, i), x, dy)
        med = {k: statistics.median(v) for k, v in times.items()}
        if rank == 0:
            print("%-18s %9.3f %9.3f %9.3f %12.2f %10.2f %10.2f  %s" % (
                "%d,%d,%d,%d" % (n, c, h, w), med["local"] * 1e3,
                med["stats"] * 1e3, med["shm"] * 1e3,
                med["stats"] / med["local"], med["shm"] / med["local"],
                med["shm"] / med["stats"], pick), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
