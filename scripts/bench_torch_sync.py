#!/usr/bin/python3
"""What a synchronized BatchNorm step costs a CPU trainer, by path:

    mpirun -np 2 build/bin/syncbnd -- /usr/bin/python3 scripts/bench_torch_sync.py

For each shape (per-rank N, C, H, W) every rank times, alternating the
three in every round so that they share the machine's state:
- local:  torch.nn.BatchNorm2d forward + backward (no synchronization:
          the baseline);
- stats:  syncbn.torch.SyncBatchNorm forward + backward (local compute,
          per-channel statistics through the worker: `stats` and
          `stats_backward`);
- tensor: the same step with the whole tensors sent to the worker, which
          normalizes (`forward`/`backward` of a `syncbatchnorm` layer).
Rank 0 prints the medians and the ratios stats/local and tensor/local,
and tensor/stats: how much the statistics-only path saves.
"""
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                             "..", "src", "python"))
import syncbn.torch as sbt  # noqa: E402

SHAPES = [(8, 64, 56, 56), (8, 256, 14, 14), (8, 2048, 7, 7), (32, 16, 8, 8)]
ROUNDS = 15


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main():
    rank = int(os.environ.get("SYNCBN_RANK", 0))
    torch.set_num_threads(1)
    client = sbt.default_client()
    # The same on every rank of this job, new for each job.
    tag = "bench%s" % os.environ.get("MASTER_PORT", "0")
    if rank == 0:
        print("%-18s %10s %10s %10s %12s %13s %13s" % (
            "N,C,H,W per rank", "local ms", "stats ms", "tensor ms",
            "stats/local", "tensor/local", "tensor/stats"), flush=True)
    for i, (n, c, h, w) in enumerate(SHAPES):
        g = torch.Generator().manual_seed(i)
        x = torch.randn(n, c, h, w, generator=g)
        dy = torch.randn(n, c, h, w, generator=g)
        local = torch.nn.BatchNorm2d(c)
        sync = sbt.SyncBatchNorm(c, name="%s.s%d" % (tag, i))
        lid = client.register("%s.t%d" % (tag, i), "syncbatchnorm", channels=c)
        wt, bs = np.ones(c, np.float32), np.zeros(c, np.float32)
        step = [0]

        def run_local():
            xr = x.clone().requires_grad_()
            local(xr).backward(dy)

        def run_stats():
            xr = x.clone().requires_grad_()
            sync(xr).backward(dy)

        def run_tensor():
            client.forward(lid, step[0], True, x.numpy(), wt, bs)
            client.backward(lid, step[0], dy.numpy())
            step[0] += 1

        times = {"local": [], "stats": [], "tensor": []}
        for r in range(ROUNDS + 1):
            for name, fn in (("local", run_local), ("stats", run_stats),
                             ("tensor", run_tensor)):
                t = timed(fn)
                if r > 0:  # the first round warms up
                    times[name].append(t)
        med = {k: statistics.median(v) for k, v in times.items()}
        if rank == 0:
            print("%-18s %10.3f %10.3f %10.3f %12.2f %13.2f %13.2f" % (
                "%d,%d,%d,%d" % (n, c, h, w), med["local"] * 1e3,
                med["stats"] * 1e3, med["tensor"] * 1e3,
                med["stats"] / med["local"], med["tensor"] / med["local"],
                med["tensor"] / med["stats"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
