#!/usr/bin/python3
"""syncbn.torch against torch itself, run by the one-command launch:

    mpirun -np 2 syncbnd -- python3 tests/torch_module_test.py

Every rank checks, and prints one line per check (exit 1 if any fails,
77 without torch):
- convert_sync_batchnorm replaces the BatchNorms (names from module
  paths) and leaves InstanceNorm/GroupNorm/LayerNorm alone;
  revert_sync_batchnorm restores the original classes and values;
- for each path (path="stats", "shm", and "auto", which measures both
  over its first 10 steps and must pick the same path on every rank):
  one layer's output, input gradient and parameter gradients equal
  torch.nn.BatchNorm2d's on the concatenated shards, and training with
  uneven shards (7 and 3 samples), gradients summed with
  torch.distributed (env:// from the launcher's MASTER_ADDR/MASTER_PORT),
  equals a single-process model with torch.nn.BatchNorm2d/1d trained on
  the concatenated batches: losses, parameters and running statistics;
  the steps were taken by the path asked for;
- the running statistics buffers equal the worker's (get_state) bit for
  bit, and are bit-identical on every rank;
- the shm path's region grows when a larger tensor comes;
- path="shm" falls back to stats on every rank, with a warning, when one
  rank cannot attach shared memory, and so does a float64 layer;
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
import warnings

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


def check_layer(path, rank, lo, hi):
    """Two training steps of one layer against torch.nn.BatchNorm2d on the
    whole batch: y, dx, dweight (summed over the ranks), running stats."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(10, 3, 4, 5, generator=g) * 2 + 3
    dy = torch.randn(10, 3, 4, 5, generator=g)
    ref = torch.nn.BatchNorm2d(3)
    m = sbt.SyncBatchNorm(3, name="layer." + path, path=path)
    with torch.no_grad():
        for p in (ref.weight, m.weight):
            p.copy_(torch.tensor([0.5, 1.0, 2.0]))
    errs = []
    for k in range(2):  # "auto" measures: both of its first two steps
        xr = x.clone().requires_grad_()
        ref.zero_grad()
        ref(xr).backward(dy)
        # The second step's input is channels-last, as a model converted
        # with .to(memory_format=torch.channels_last) gives it.
        xs = x[lo:hi].clone()
        if k == 1:
            xs = xs.contiguous(memory_format=torch.channels_last)
        xs.requires_grad_()
        m.zero_grad()
        y = m(xs)
        y.backward(dy[lo:hi])
        dw = m.weight.grad.clone()
        dist.all_reduce(dw)
        with torch.no_grad():
            errs.append(max(rel(xs.grad, xr.grad[lo:hi]), rel(dw, ref.weight.grad),
                            rel(m.running_var, ref.running_var),
                            rel(m.running_mean, ref.running_mean)))
            errs.append(rel(y, torch.nn.functional.batch_norm(
                x, None, None, ref.weight, ref.bias, True, 0.0, ref.eps)[lo:hi]))
    e = max(errs)
    check(e <= 1e-5, "path=%s: a layer's y, dx, dweight, running stats equal "
          "torch.nn.BatchNorm2d's (rel %.1e)" % (path, e))


def train_check(path, steps, rank, size, lo, hi):
    """Trains make_model() converted with path= against torch on the
    concatenated batches; returns the model and its reference."""
    torch.manual_seed(0)
    ref = make_model()
    model = sbt.convert_sync_batchnorm(copy.deepcopy(ref), prefix="tr.%s." % path,
                                       path=path)
    o_ref = torch.optim.SGD(ref.parameters(), lr=0.2)
    o_mod = torch.optim.SGD(model.parameters(), lr=0.2)
    batch = sum(COUNTS)
    g = torch.Generator().manual_seed(11)
    worst = 0.0
    for s in range(steps):
        x = torch.randn(batch, 1, 11, 11, generator=g) * 3 + 1
        t = torch.randint(0, 3, (batch,), generator=g)
        lm = step(model, o_mod, x[lo:hi], t[lo:hi], batch, True)
        lr = step(ref, o_ref, x, t, batch, False)
        worst = max(worst, rel(lm, lr))
    tol = TOL_PER_STEP * steps
    check(worst <= tol, "path=%s: losses equal single-process torch (worst rel %.1e)"
          % (path, worst))
    # All parameters as one vector: a bias whose gradient is nearly zero
    # (GroupNorm's, whose shift InstanceNorm removes) has no relative
    # error of its own worth bounding.
    e = rel(torch.cat([p.detach().ravel() for p in model.parameters()]),
            torch.cat([p.detach().ravel() for p in ref.parameters()]))
    check(e <= tol, "path=%s: parameters equal single-process torch (rel %.1e)" % (path, e))
    syncs = [m for m in model.modules() if isinstance(m, sbt.SyncBatchNorm)]
    taken = [m.sync_path for m in syncs]
    every = [None] * size
    dist.all_gather_object(every, taken)
    if path == "auto":
        ok = all(p in ("stats", "shm") for p in taken) and all(
            m.path_steps["stats"] > sbt.AUTO_ROUNDS and m.path_steps["shm"] > sbt.AUTO_ROUNDS for m in syncs)
    else:
        ok = taken == [path] * len(syncs) and all(
            m.path_steps[path] == steps for m in syncs)
    check(ok and all(v == taken for v in every),
          "path=%s: the steps took the path asked for, the same on every rank "
          "(%s)" % (path, ",".join(taken)))
    for (n, m), (_, r) in zip(
            [(n, m) for n, m in model.named_modules() if isinstance(m, sbt.SyncBatchNorm)],
            [(n, m) for n, m in ref.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]):
        e = max(rel(m.running_mean, r.running_mean), rel(m.running_var, r.running_var))
        check(e <= tol and int(m.num_batches_tracked) == int(r.num_batches_tracked) == steps,
              "path=%s: %s running statistics equal torch (rel %.1e)" % (path, n, e))
        st = sbt.default_client().get_state(m._layer[1])
        check(np.array_equal(bits(st["running_mean"]), bits(m.running_mean))
              and np.array_equal(bits(st["running_var"]), bits(m.running_var))
              and st["num_batches_tracked"] == int(m.num_batches_tracked),
              "path=%s: %s buffers equal the worker's bit for bit" % (path, n))
        both = torch.cat([m.running_mean, m.running_var])
        every = [torch.empty_like(both) for _ in range(size)]
        dist.all_gather(every, both)
        check(all(torch.equal(v, both) for v in every),
              "path=%s: %s buffers equal on every rank" % (path, n))
    return model, ref, g


def check_grow(lo, hi):
    """The shm path's region grows with the tensors: a small step, then
    one 64x larger, both equal to torch's."""
    m = sbt.SyncBatchNorm(3, name="grow", path="shm")
    ref = torch.nn.BatchNorm1d(3)
    errs, sizes = [], []
    for n, l in ((10, 16), (10, 1024)):
        g = torch.Generator().manual_seed(n * l)
        x = torch.randn(n, 3, l, generator=g)
        xs = x[lo:hi].clone().requires_grad_()
        y = m(xs)
        y.sum().backward()
        xr = x.clone().requires_grad_()
        yr = ref(xr)
        yr.sum().backward()
        errs.append(max(rel(y, yr[lo:hi]), rel(m.running_var, ref.running_var)))
        sizes.append(sbt._arena(sbt.default_client()).region.size)
    check(max(errs) <= 1e-5 and sizes[1] > sizes[0] and m.path_steps["shm"] == 2,
          "path=shm: the region grows from %d to %d bytes, results equal torch "
          "(rel %.1e)" % (sizes[0], sizes[1], max(errs)))


def check_fallback(rank):
    """path="shm" where rank 1 cannot attach shared memory (as against an
    old worker): both ranks take the stats path, rank 1 says why; a
    float64 layer takes it too."""
    c = syncbn.Client()
    c.hello()
    if rank == 1:
        def refuse(size):
            raise syncbn.SyncbnError("UNKNOWN_OP", "shm_attach (simulated old worker)")
        c.shm_attach = refuse
    m = sbt.SyncBatchNorm(2, name="fallback", client=c, path="shm")
    d = sbt.SyncBatchNorm(2, name="fallback64", client=c, path="auto").double()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        m(torch.randn(4, 2, 3)).sum().backward()
        d(torch.randn(4, 2, 3, dtype=torch.float64)).sum().backward()
    said = [str(x.message) for x in w]
    check(m.sync_path == "stats" and d.sync_path == "stats" and len(said) == 1
          and ("UNKNOWN_OP" if rank == 1 else "another rank") in said[0],
          "path=shm falls back to stats on every rank when one cannot attach "
          "(%s)" % (said[0] if said else "no warning"))
    c.bye()


def main():
    rank, size = int(os.environ["SYNCBN_RANK"]), int(os.environ["SYNCBN_SIZE"])
    if size != len(COUNTS):
        print("run me with -np %d" % len(COUNTS))
        return 2
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method="env://")
    torch.set_num_threads(1)
    check_convert()

    lo, hi = sum(COUNTS[:rank]), sum(COUNTS[:rank + 1])
    batch = sum(COUNTS)
    tol = TOL_PER_STEP * STEPS
    for path in ("stats", "shm", "auto"):
        check_layer(path, rank, lo, hi)
    for path in ("shm", "auto"):
        # "auto" decides after 2 * (AUTO_WARMUP + AUTO_ROUNDS) steps.
        train_check(path, STEPS if path != "auto" else
                    2 * (sbt.AUTO_WARMUP + sbt.AUTO_ROUNDS) + 2, rank, size, lo, hi)
    check_grow(lo, hi)
    check_fallback(rank)
    model, ref, g = train_check("stats", STEPS, rank, size, lo, hi)
    client = sbt.default_client()

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
    fresh = sbt.convert_sync_batchnorm(make_model(), prefix="sd.", path="stats")
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
