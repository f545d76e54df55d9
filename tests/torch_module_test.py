#!/usr/bin/python3
"""syncbn.torch against torch itself, run by the one-command launch:

    mpirun -np 2 syncbnd -- python3 tests/torch_module_test.py

Every rank checks, and prints one line per check (exit 1 if any fails,
77 without torch):
- convert_sync_batchnorm replaces the BatchNorms (names from module
  paths) and leaves InstanceNorm/GroupNorm/LayerNorm alone;
  revert_sync_batchnorm restores the original classes and values;
- training with uneven shards (7 and 3 samples), gradients summed with
  torch.distributed (env:// from the launcher's MASTER_ADDR/MASTER_PORT),
  equals a single-process model with torch.nn.BatchNorm2d/1d trained on
  the concatenated batches: losses, parameters and running statistics;
- the running statistics buffers equal the worker's (get_state) bit for
  bit, and are bit-identical on every rank;
- eval sends nothing to the worker;
- state_dict() round trip: a fresh model loaded from it starts its worker
  layers from those buffers and then trains bit-identically; load into an
  attached module pushes the values to the worker.

Tolerances: float32 forward/backward in a different order from torch's
(the cross-rank merge here in float64) differs by
a few ulps per step, amplified by normalizing 3-sample shards and by SGD
at lr 0.2, and grows with the steps; the bound is TOL_PER_STEP per step.
Measured after 4 steps: losses 4.2e-7, parameters 6.8e-7, running
statistics <= 4.2e-7, eval output 2.7e-6 (bound 4e-5); a wrong formula
(biased variance, a missing reduction, a local mean) is off by 1e-2 or
more.
"""
import copy
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "..", "src", "python"))
try:
    import numpy as np
    import torch
    import torch.distributed as dist
except ImportError as e:
    print("SKIP: %s (install python3-torch)" % e)
    sys.exit(77)
import syncbn  # noqa: E402
import syncbn.torch as sbt  # noqa: E402

TOL_PER_STEP = 1e-5
COUNTS = [7, 3]
STEPS = 4
failures = []


def check(ok, what):
    print("rank %s: %s: %s" % (os.environ.get("SYNCBN_RANK"), what,
                               "ok" if ok else "FAIL"), flush=True)
    if not ok:
        failures.append(what)


def rel(a, b):
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / max(float(b.norm()), 1e-30))


def make_model():
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Conv2d(4, 6, 3, stride=2), torch.nn.BatchNorm2d(6, momentum=None),
        torch.nn.ReLU(), torch.nn.GroupNorm(2, 6), torch.nn.InstanceNorm2d(6),
        torch.nn.Flatten(), torch.nn.Linear(6 * 4 * 4, 5),
        torch.nn.BatchNorm1d(5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))


def bits(t):
    return np.ascontiguousarray(np.asarray(t, dtype=np.float32)).view(np.int32)


def check_convert():
    torch.manual_seed(3)
    m = make_model()
    m[1].running_mean.uniform_()
    c = sbt.convert_sync_batchnorm(copy.deepcopy(m), prefix="cv.")
    syncs = [(n, x) for n, x in c.named_modules() if isinstance(x, sbt.SyncBatchNorm)]
    check([n for n, _ in syncs] == ["1", "4", "10"] and
          [x.layer_name for _, x in syncs] == ["cv.1", "cv.4", "cv.10"],
          "convert: the three BatchNorms, named from their paths")
    check(type(c[6]) is torch.nn.GroupNorm and type(c[7]) is torch.nn.InstanceNorm2d
          and type(c[11]) is torch.nn.LayerNorm, "convert leaves GroupNorm/InstanceNorm/LayerNorm")
    check(c[4].momentum is None and torch.equal(c[1].running_mean, m[1].running_mean),
          "convert keeps momentum and running statistics")
    r = sbt.revert_sync_batchnorm(c)
    check(type(r[1]) is torch.nn.BatchNorm2d and type(r[10]) is torch.nn.BatchNorm1d
          and all(torch.equal(a, b) for a, b in zip(r.state_dict().values(),
                                                    m.state_dict().values())),
          "revert restores the classes and every value")


def step(model, opt, x, t, batch, distributed):
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x), t, reduction="sum") / batch
    loss.backward()
    if distributed:
        for p in model.parameters():
            dist.all_reduce(p.grad)
    opt.step()
    total = loss.detach().clone()
    if distributed:
        dist.all_reduce(total)
    return float(total)


def main():
    rank, size = int(os.environ["SYNCBN_RANK"]), int(os.environ["SYNCBN_SIZE"])
    if size != len(COUNTS):
        print("run me with -np %d" % len(COUNTS))
        return 2
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method="env://")
    torch.set_num_threads(1)
    check_convert()

    torch.manual_seed(0)
    ref = make_model()
    model = sbt.convert_sync_batchnorm(copy.deepcopy(ref), prefix="tr.")
    o_ref = torch.optim.SGD(ref.parameters(), lr=0.2)
    o_mod = torch.optim.SGD(model.parameters(), lr=0.2)
    batch = sum(COUNTS)
    lo, hi = sum(COUNTS[:rank]), sum(COUNTS[:rank + 1])
    g = torch.Generator().manual_seed(11)
    worst = 0.0
    for s in range(STEPS):
        x = torch.randn(batch, 1, 11, 11, generator=g) * 3 + 1
        t = torch.randint(0, 3, (batch,), generator=g)
        lm = step(model, o_mod, x[lo:hi], t[lo:hi], batch, True)
        lr = step(ref, o_ref, x, t, batch, False)
        worst = max(worst, rel(lm, lr))
    tol = TOL_PER_STEP * STEPS
    check(worst <= tol, "losses equal single-process torch (worst rel %.1e)" % worst)
    # All parameters as one vector: a bias whose gradient is nearly zero
    # (GroupNorm's, whose shift InstanceNorm removes) has no relative
    # error of its own worth bounding.
    e = rel(torch.cat([p.detach().ravel() for p in model.parameters()]),
            torch.cat([p.detach().ravel() for p in ref.parameters()]))
    check(e <= tol, "parameters equal single-process torch (rel %.1e)" % e)
    client = sbt.default_client()
    for (n, m), (_, r) in zip(
            [(n, m) for n, m in model.named_modules() if isinstance(m, sbt.SyncBatchNorm)],
            [(n, m) for n, m in ref.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]):
        e = max(rel(m.running_mean, r.running_mean), rel(m.running_var, r.running_var))
        check(e <= tol and int(m.num_batches_tracked) == int(r.num_batches_tracked) == STEPS,
              "%s running statistics equal torch (rel %.1e)" % (n, e))
        st = client.get_state(m._layer[1])
        check(np.array_equal(bits(st["running_mean"]), bits(m.running_mean))
              and np.array_equal(bits(st["running_var"]), bits(m.running_var))
              and st["num_batches_tracked"] == int(m.num_batches_tracked),
              "%s buffers equal the worker's bit for bit" % n)
        both = torch.cat([m.running_mean, m.running_var])
        every = [torch.empty_like(both) for _ in range(size)]
        dist.all_gather(every, both)
        check(all(torch.equal(v, both) for v in every), "%s buffers equal on every rank" % n)

    # Eval: no request reaches the worker but the metrics calls themselves.
    model.eval()
    ref.eval()
    xe = torch.randn(5, 1, 11, 11, generator=g)
    f0 = client.metrics()["frames_in"]
    with torch.no_grad():
        e = rel(model(xe), ref(xe))
    f1 = client.metrics()["frames_in"]
    check(f1 - f0 == 1, "eval sends nothing to the worker (%d frames)" % (f1 - f0 - 1))
    check(e <= tol, "eval output equals torch (rel %.1e)" % e)

    # state_dict round trip into a fresh model with its own layers.
    sd = model.state_dict()
    fresh = sbt.convert_sync_batchnorm(make_model(), prefix="sd.")
    fresh.load_state_dict(sd)
    check(all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), sd.values())),
          "load_state_dict fills the buffers")
    model.train()
    fresh.train()
    x = torch.randn(batch, 1, 11, 11, generator=g)
    with torch.no_grad():
        model(x[lo:hi])
        fresh(x[lo:hi])
    same = all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(),
                                                 model.state_dict().values()))
    check(same, "a model loaded from state_dict trains bit-identically")
    sd2 = {k: v * 2 if k.endswith("running_mean") else v for k, v in sd.items()}
    fresh.load_state_dict(sd2)
    st = client.get_state(fresh[1]._layer[1])
    check(np.array_equal(bits(st["running_mean"]), bits(sd2["1.running_mean"])),
          "load_state_dict pushes the buffers to an attached worker layer")

    try:
        syncbn.Client("/nonexistent/sbn.sock", wait=0.2)
        check(False, "a missing socket raises ConnectError")
    except syncbn.ConnectError as e:
        check("/nonexistent/sbn.sock" in str(e), "a missing socket's error names it")
    dist.destroy_process_group()
    print("rank %d: %s" % (rank, "PASS" if not failures else "FAIL: " + "; ".join(failures)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
