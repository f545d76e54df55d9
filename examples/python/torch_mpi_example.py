#!/usr/bin/python3
"""Data-parallel PyTorch training on CPUs with SyncBatchNorm served by syncbnd.

    mpirun -np 2 build/bin/syncbnd --socket-dir /tmp/sbn &
    mpirun -np 2 /usr/bin/python3 examples/python/torch_mpi_example.py \\
        --socket-dir /tmp/sbn --master-port 29517

PyTorch's own torch.nn.SyncBatchNorm works only on CUDA tensors. Here each
trainer process talks to the syncbnd worker of its own rank
(DIR/rank-<r>.sock), whose `syncbatchnorm` layers reduce the batch
statistics across the workers' MPI job. The trainers average their
gradients with torch.distributed (gloo backend, TCP on MASTER_ADDR,
default 127.0.0.1), like DistributedDataParallel.

Each rank trains a small CNN on its own shard of every batch (uneven
shards: --counts), then prints the running statistics its worker holds
(`get_state`) and checks that
- they are bit-identical on every rank, and
- they equal, to 1e-6 relative, a single-process torch.nn.BatchNorm2d
  model trained on the whole (concatenated) batches from the same
  initial weights; the losses and an eval forward must agree too.
Each rank ends with one line `rank R: PASS` or `rank R: FAIL ...`; the
exit status is 0 when the rank passed.

Data: Fashion-MNIST from the idx files in --data (Debian package
dataset-fashion-mnist installs them in /usr/share/datasets/fashion-mnist),
else synthetic 28x28 images; the first line says which.
"""
import argparse
import datetime
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# The installed package, else the one in this checkout (src/python).
sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                             "..", "..", "src", "python"))
from syncbn.client import SyncbnClient  # noqa: E402
from torch_example import ServiceNorm  # noqa: E402
from train_fashion_mnist import load_data, shards  # noqa: E402

REL_TOL = 1e-6


def rank_and_size():
    """The launcher's rank and size: Open MPI, MPICH/Hydra (PMI) or
    torchrun-style variables, in that order."""
    for r, s in (("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
                 ("PMI_RANK", "PMI_SIZE"), ("PMIX_RANK", "OMPI_COMM_WORLD_SIZE"),
                 ("RANK", "WORLD_SIZE")):
        if r in os.environ and s in os.environ:
            return int(os.environ[r]), int(os.environ[s])
    return 0, 1


class SyncBatchNorm(ServiceNorm):
    """torch.nn.SyncBatchNorm for CPU tensors: forward and backward run in
    the syncbnd worker as a `syncbatchnorm` layer (torch_example's
    autograd.Function); weight and bias are this module's parameters,
    the running statistics live in the worker."""

    def __init__(self, client, name, num_features, eps=1e-5, momentum=0.1):
        super().__init__(client, name, "syncbatchnorm", (num_features,),
                         channels=num_features, eps=eps, momentum=momentum)

    def running_stats(self):
        return self.client.get_state(self.layer)


def make_model(norm):
    """A small CNN for 1x28x28 images; norm(C) gives the normalization."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 6, 5, stride=2), norm(6), torch.nn.ReLU(),
        torch.nn.Conv2d(6, 8, 3, stride=2), norm(8), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(8, 10))


def rel(a, b):
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / max(float(b.norm()), 1e-30))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--socket-dir", required=True)
    ap.add_argument("--master-addr", default=os.environ.get("MASTER_ADDR", "127.0.0.1"))
    ap.add_argument("--master-port", type=int,
                    default=int(os.environ.get("MASTER_PORT", "29517")))
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--counts", default="11,5",
                    help="samples per rank in each batch (comma-separated)")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--timeout", type=float, default=60.0)
    a = ap.parse_args()

    rank, size = rank_and_size()
    sh = shards(a.counts, rank, size)
    if sh is None:
        return 2
    counts, batch, lo, hi = sh
    torch.set_num_threads(1)

    # Gloo listens on the interface that resolves the host name unless told;
    # for a job on one host the loopback interface is the one that works.
    if a.master_addr == "127.0.0.1":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method="tcp://%s:%d" % (a.master_addr, a.master_port),
                            rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=a.timeout))
    # Layer names are per job: rank 0 chooses them, so that reruns against
    # the same workers start fresh layers.
    tag = ["mpiex-%d-%d" % (os.getpid(), int(time.time()))]
    dist.broadcast_object_list(tag, src=0)

    client = SyncbnClient(os.path.join(a.socket_dir, "rank-%d.sock" % rank),
                          timeout=a.timeout)
    h = client.hello()
    if h["rank"] != rank or h["size"] != size:
        print("rank %d: the worker is rank %s of %s, this job has %d ranks"
              % (rank, h["rank"], h["size"], size))
        return 1

    x_all, t_all, what = load_data(a.data, batch * (a.steps + 1))
    if rank == 0:
        print("data: %s; %d steps, batch %d split %s; gradients averaged with "
              "torch.distributed (gloo)" % (what, a.steps, batch, counts), flush=True)

    torch.manual_seed(0)
    ref = make_model(torch.nn.BatchNorm2d)
    names = iter(["%s.bn%d" % (tag[0], i) for i in range(2)])
    svc = make_model(lambda c: SyncBatchNorm(client, next(names), c))
    # Same initial weights: the convolutions and the linear layer come from
    # the reference; both BatchNorms start at weight 1, bias 0.
    with torch.no_grad():
        for (_, p), (_, q) in zip(ref.named_parameters(), svc.named_parameters()):
            q.copy_(p)
    o_ref = torch.optim.SGD(ref.parameters(), lr=a.lr)
    o_svc = torch.optim.SGD(svc.parameters(), lr=a.lr)
    loss_fn = torch.nn.CrossEntropyLoss(reduction="sum")
    worst_loss = 0.0
    for step in range(a.steps):
        xb, tb = x_all[step * batch:(step + 1) * batch], t_all[step * batch:(step + 1) * batch]
        # This rank's share of the mean loss over the whole batch: summed
        # over ranks (all_reduce SUM) the gradients are those of the mean,
        # also with uneven shards.
        o_svc.zero_grad()
        loss = loss_fn(svc(xb[lo:hi]), tb[lo:hi]) / batch
        loss.backward()
        for p in svc.parameters():
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        o_svc.step()
        total = loss.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        # The reference: one process, the whole batch, torch's BatchNorm2d.
        o_ref.zero_grad()
        rloss = loss_fn(ref(xb), tb) / batch
        rloss.backward()
        o_ref.step()
        e = rel(total, rloss.detach())
        worst_loss = max(worst_loss, e)
        if rank == 0:
            print("step %d: loss %.6f (torch single process %.6f, rel diff %.1e)"
                  % (step, float(total), float(rloss), e), flush=True)

    # Eval: the workers normalize with their running statistics.
    ref.eval()
    svc.eval()
    with torch.no_grad():
        xe = x_all[a.steps * batch:(a.steps + 1) * batch]
        eval_err = rel(svc(xe), ref(xe))

    failures = []
    if worst_loss > 1e-5:
        failures.append("loss differs from torch by %.1e" % worst_loss)
    if eval_err > 1e-5:
        failures.append("eval output differs from torch by %.1e" % eval_err)
    bn_svc = [m for m in svc if isinstance(m, SyncBatchNorm)]
    bn_ref = [m for m in ref if isinstance(m, torch.nn.BatchNorm2d)]
    lines = []
    for i, (ms, mr) in enumerate(zip(bn_svc, bn_ref)):
        st = ms.running_stats()
        for key in ("running_mean", "running_var"):
            mine = torch.from_numpy(st[key])
            # Every rank's values, bit for bit: gather and compare the
            # float32 bit patterns.
            every = [torch.empty_like(mine) for _ in range(size)]
            dist.all_gather(every, mine)
            same = all(torch.equal(v.view(torch.int32), mine.view(torch.int32))
                       for v in every)
            e = rel(mine, getattr(mr, key))
            lines.append("rank %d: bn%d %-12s %s" % (
                rank, i, key, " ".join("%.6f" % v for v in mine.tolist())))
            lines.append("rank %d: bn%d %-12s equal on all %d ranks: %s; "
                         "rel diff to torch.nn.BatchNorm2d %.1e" % (
                             rank, i, key, size, "yes" if same else "NO", e))
            if not same:
                failures.append("bn%d %s differs between ranks" % (i, key))
            if e > REL_TOL:
                failures.append("bn%d %s differs from torch by %.1e" % (i, key, e))
        nbt = st.get("num_batches_tracked")
        if nbt != a.steps:
            failures.append("bn%d num_batches_tracked %s, want %d" % (i, nbt, a.steps))
    lines.append("rank %d: eval output rel diff to torch %.1e, worst loss rel diff %.1e"
                 % (rank, eval_err, worst_loss))
    lines.append("rank %d: %s" % (rank, "PASS" if not failures else
                                  "FAIL " + "; ".join(failures)))
    # One rank after the other, and in one write (print writes the end of
    # line apart, and mpirun may forward another rank's lines in between),
    # so that the lines do not interleave.
    for r in range(size):
        if r == rank:
            sys.stdout.write("\n".join(lines) + "\n")
            sys.stdout.flush()
        dist.barrier()
    client.bye()
    dist.destroy_process_group()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
