#!/usr/bin/python3
"""Cross-checks `syncbn apply` against PyTorch on random cases.

Run with Debian's python (it has torch and numpy):

    /usr/bin/python3 scripts/check_torch.py [--syncbn build/bin/syncbn]
        [--cases 30] [--seed S] [--mpi P] [--keep DIR]

This check is independent of the project's own tests: it draws random
layers (BatchNorm, LayerNorm, InstanceNorm, GroupNorm), shapes (including
C=1, odd spatial sizes and no spatial dims), layouts, eps, momentum or the
cumulative average, affine on or off, running statistics given, fresh or
absent, train or eval, and inputs centred at 1e4. For each case it writes
float32 .npy inputs, runs the `syncbn` program on them, and computes the
same forward and backward with torch's own modules on float64 copies of
the very same float32 values. Results are compared by relative L2 error:
y, dbias and running statistics within 1e-5, dx and dweight within 1e-4.

With --mpi P it instead runs `mpirun -np P syncbn apply --op batchnorm
--sync --counts ...` with uneven and empty shards and compares against
torch on the whole batch.

Exit status: 0 when every case passes, 1 otherwise, 2 on bad usage.
"""
import argparse
import math
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_SYNCBN = os.path.join(HERE, "..", "build", "bin", "syncbn")

TOL = {"y": 1e-5, "dbias": 1e-5, "running_mean": 1e-5, "running_var": 1e-5,
       "dx": 1e-4, "dweight": 1e-4}

MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
MPI_FLAGS = ["--oversubscribe", "--bind-to", "none", "--timeout", "120",
             "--mca", "pml", "ob1", "--mca", "btl", "self,vader,tcp"]


def rel_l2(got, ref):
    """Relative L2 error; plain RMS error when the reference is all zero."""
    got = np.asarray(got, dtype=np.float64).ravel()
    ref = np.asarray(ref, dtype=np.float64).ravel()
    if got.shape != ref.shape:
        return math.inf
    if got.size == 0:
        return 0.0
    if not np.all(np.isfinite(got)):
        return math.inf
    den = np.linalg.norm(ref)
    num = np.linalg.norm(got - ref)
    if den < 1e-30:
        return num / math.sqrt(ref.size)
    return num / den


def f32(a):
    return np.ascontiguousarray(np.asarray(a, dtype=np.float32))


# ---------------------------------------------------------------- cases


def draw_case(rng, idx):
    """One random case as a dict of parameters and float32 arrays."""
    op = ["batchnorm", "layernorm", "instancenorm", "groupnorm"][idx % 4]
    c = {"op": op}
    c["train"] = bool(rng.random() < 0.7)
    c["eps"] = float(rng.choice([1e-5, 1e-3, 0.1, 1e-8]))
    c["affine"] = bool(rng.random() < 0.7)
    c["layout"] = "nchw"
    big = rng.random() < 0.3  # inputs 1e4 + N(0,1) * std
    std = float(rng.choice([0.5, 1.0, 2.0])) if big else 1.0

    if op == "layernorm":
        nd = int(rng.integers(1, 5))
        shape = [int(rng.integers(1, 6)) for _ in range(nd)]
        k = int(rng.integers(1, nd + 1))
        # With one normalized value dx is exactly zero (x-hat is 0), so a
        # relative error would only measure rounding noise; give the rows at
        # least two values. Two values are kept on purpose: there dx is
        # about eps/var of its terms, the case fp32 evaluation gets wrong.
        if int(np.prod(shape[nd - k:])) < 2:
            shape[-1] = int(rng.integers(2, 7))
        c["norm_dims"] = k
        pshape = shape[nd - k:]
        mem_shape = shape
    else:
        ns = int(rng.integers(0, 4))
        if op == "instancenorm" and ns == 0:
            ns = 1
        n = int(rng.integers(1, 6))
        ch = int(rng.choice([1, 2, 3, 4, 6, 8]))
        sp = [int(rng.choice([1, 2, 3, 5, 7])) for _ in range(ns)]
        if op == "groupnorm":
            divs = [g for g in range(1, ch + 1) if ch % g == 0]
            c["groups"] = int(rng.choice(divs))
            if (ch // c["groups"]) * int(np.prod(sp)) < 2:
                sp = sp + [3] if ns < 3 else [3] + sp[1:]
        if op == "instancenorm" and int(np.prod(sp)) < 2:
            sp[0] = int(rng.choice([2, 3, 5]))
        if op == "batchnorm" and n * int(np.prod(sp)) < 2:
            # torch refuses 1 value per channel in train.
            n = int(rng.integers(2, 6))
        shape = [n, ch] + sp
        pshape = [ch]
        if len(sp) >= 1 and rng.random() < 0.4:
            c["layout"] = "nhwc"
        mem_shape = ([n] + sp + [ch]) if c["layout"] == "nhwc" else shape

    c["shape"] = shape  # logical
    x = rng.standard_normal(mem_shape) * std + (1e4 if big else 0.0)
    if not big:
        x = x * rng.uniform(0.5, 3.0) + rng.uniform(-2.0, 2.0)
    c["x"] = f32(x)
    c["dy"] = f32(rng.standard_normal(mem_shape))
    c["big"] = big
    if c["affine"]:
        c["weight"] = f32(rng.normal(1.0, 0.5, pshape))
        c["bias"] = f32(rng.normal(0.0, 1.0, pshape))

    if op in ("batchnorm", "instancenorm"):
        choices = ["given", "fresh", "none"] if op == "batchnorm" else ["given", "none"]
        c["stats"] = str(rng.choice(choices))
        c["cumulative"] = bool(op == "batchnorm" and c["stats"] != "none"
                               and rng.random() < 0.3)
        c["momentum"] = float(rng.choice([0.1, 0.0, 1.0, 0.37]))
        c["nbt"] = int(rng.integers(0, 5)) if c["cumulative"] else 0
        if c["stats"] == "given":
            ch = shape[1]
            c["rm"] = f32(rng.normal(0.0, 1.0, ch) + (1e4 if big and rng.random() < 0.5 else 0.0))
            c["rv"] = f32(rng.uniform(0.5, 2.0, ch))
    return c


def case_label(c):
    s = "%s %s %s %s" % (c["op"], "train" if c["train"] else "eval",
                         c["layout"], "x".join(map(str, c["shape"])))
    if c["op"] == "groupnorm":
        s += " G=%d" % c["groups"]
    if c["op"] == "layernorm":
        s += " K=%d" % c["norm_dims"]
    if "stats" in c:
        s += " rs=%s" % c["stats"]
        s += " cum(nbt=%d)" % c["nbt"] if c["cumulative"] else " m=%g" % c["momentum"]
    s += " eps=%g%s%s" % (c["eps"], " affine" if c["affine"] else "",
                          " 1e4" if c["big"] else "")
    return s


# ---------------------------------------------------------------- torch


def to_logical(a, layout):
    t = torch.from_numpy(np.asarray(a, dtype=np.float64))
    if layout == "nhwc":
        t = t.movedim(-1, 1)
    return t.contiguous()


def to_memory(t, layout):
    if layout == "nhwc":
        t = t.movedim(1, -1)
    return t.detach().contiguous().numpy()


def torch_module(c):
    op, shape = c["op"], c["shape"]
    ns = len(shape) - 2
    if op == "batchnorm":
        cls = [torch.nn.BatchNorm1d, torch.nn.BatchNorm1d, torch.nn.BatchNorm2d,
               torch.nn.BatchNorm3d][ns]
        track = c["stats"] != "none"
        m = cls(shape[1], eps=c["eps"],
                momentum=None if c["cumulative"] else c["momentum"],
                affine=c["affine"], track_running_stats=track)
    elif op == "instancenorm":
        cls = [None, torch.nn.InstanceNorm1d, torch.nn.InstanceNorm2d,
               torch.nn.InstanceNorm3d][ns]
        m = cls(shape[1], eps=c["eps"], momentum=c["momentum"],
                affine=c["affine"], track_running_stats=c["stats"] == "given")
    elif op == "groupnorm":
        m = torch.nn.GroupNorm(c["groups"], shape[1], eps=c["eps"],
                               affine=c["affine"])
    else:
        m = torch.nn.LayerNorm(shape[len(shape) - c["norm_dims"]:], eps=c["eps"],
                               elementwise_affine=c["affine"])
    m = m.double()
    with torch.no_grad():
        if c["affine"]:
            m.weight.copy_(torch.from_numpy(c["weight"].astype(np.float64)))
            m.bias.copy_(torch.from_numpy(c["bias"].astype(np.float64)))
        if c.get("stats") == "given":
            m.running_mean.copy_(torch.from_numpy(c["rm"].astype(np.float64)))
            m.running_var.copy_(torch.from_numpy(c["rv"].astype(np.float64)))
        if c["op"] == "batchnorm" and c["stats"] != "none":
            m.num_batches_tracked.fill_(c["nbt"])
    m.train(c["train"])
    return m


def torch_reference(c):
    """Expected outputs in memory order, as float64 numpy arrays."""
    m = torch_module(c)
    layout = c["layout"] if c["op"] != "layernorm" else "nchw"
    x = to_logical(c["x"], layout).requires_grad_(True)
    y = m(x)
    y.backward(to_logical(c["dy"], layout))
    ref = {"y": to_memory(y, layout), "dx": to_memory(x.grad, layout)}
    if c["affine"]:
        ref["dweight"] = m.weight.grad.detach().numpy().copy()
        ref["dbias"] = m.bias.grad.detach().numpy().copy()
    tracked = (c["op"] == "batchnorm" and c["stats"] != "none") or \
              (c["op"] == "instancenorm" and c["stats"] == "given")
    if tracked:
        ref["running_mean"] = m.running_mean.detach().numpy().copy()
        ref["running_var"] = m.running_var.detach().numpy().copy()
    return ref


# ---------------------------------------------------------------- syncbn


def syncbn_args(c, d):
    """Writes the case's inputs to d; returns the `syncbn apply` arguments."""
    def save(name, a):
        p = os.path.join(d, name + ".npy")
        np.save(p, a)
        return p

    out = os.path.join(d, "out")
    args = ["apply", "--op", c["op"], "--x", save("x", c["x"]),
            "--dy", save("dy", c["dy"]), "--out-dir", out,
            "--eps", repr(c["eps"])]
    if not c["train"]:
        args.append("--eval")
    if c["op"] in ("batchnorm", "instancenorm", "groupnorm"):
        args += ["--layout", c["layout"]]
    if c["affine"]:
        args += ["--weight", save("w", c["weight"]), "--bias", save("b", c["bias"])]
    if c["op"] == "groupnorm":
        args += ["--groups", str(c["groups"])]
    if c["op"] == "layernorm":
        args += ["--norm-dims", str(c["norm_dims"])]
    if "stats" in c:
        if c["stats"] == "given":
            args += ["--running-mean", save("rm", c["rm"]),
                     "--running-var", save("rv", c["rv"])]
        if c["stats"] == "none" and c["op"] == "batchnorm":
            args.append("--no-running-stats")
        if c["cumulative"]:
            args += ["--cumulative", "--num-batches-tracked", str(c["nbt"])]
        else:
            args += ["--momentum", repr(c["momentum"])]
    return args, out


def read_outputs(out, names):
    got = {}
    for k in names:
        p = os.path.join(out, k + ".npy")
        got[k] = np.load(p) if os.path.exists(p) else None
    return got


def compare(ref, got, out_dir):
    """Per-output errors; missing or unexpected files count as failures."""
    errs = {}
    ok = True
    for k, r in ref.items():
        g = got.get(k)
        e = math.inf if g is None else rel_l2(g, r)
        errs[k] = e
        if not e <= TOL[k]:
            ok = False
    for k in TOL:
        if k not in ref and os.path.exists(os.path.join(out_dir, k + ".npy")):
            errs[k] = math.inf  # written although the case has no such output
            ok = False
    return errs, ok


def fmt_err(errs, k):
    if k not in errs:
        return "       -"
    return "%8.1e" % errs[k]


# ---------------------------------------------------------------- modes


def run_single(a, root):
    rng = np.random.default_rng(a.seed)
    maxe = {k: 0.0 for k in TOL}
    fails = 0
    print("%3s %-4s %-8s %-8s %-8s %-8s %-8s %-8s  %s" % (
        "#", "ok", "y", "dx", "dweight", "dbias", "r_mean", "r_var", "case"))
    for i in range(a.cases):
        c = draw_case(rng, i)
        d = os.path.join(root, "case%03d" % i)
        os.makedirs(d)
        args, out = syncbn_args(c, d)
        ref = torch_reference(c)
        p = subprocess.run([a.syncbn] + args, capture_output=True, text=True,
                           timeout=60)
        if p.returncode != 0:
            errs, ok = {k: math.inf for k in ref}, False
            note = " | syncbn exit %d: %s" % (p.returncode, p.stderr.strip()[:300])
        else:
            errs, ok = compare(ref, read_outputs(out, TOL), out)
            note = ""
        for k, e in errs.items():
            maxe[k] = max(maxe[k], e)
        fails += not ok
        print("%3d %-4s %s %s %s %s %s %s  %s%s" % (
            i, "ok" if ok else "FAIL", fmt_err(errs, "y"), fmt_err(errs, "dx"),
            fmt_err(errs, "dweight"), fmt_err(errs, "dbias"),
            fmt_err(errs, "running_mean"), fmt_err(errs, "running_var"),
            case_label(c), note))
        if not ok:
            print("    command: %s %s" % (a.syncbn, " ".join(args)))
    return fails, maxe


def draw_counts(rng, n, p):
    """P non-negative shard sizes summing to n, with some empty shards."""
    kind = rng.integers(0, 3)
    if kind == 0:  # everything on one rank, the others empty
        counts = [0] * p
        counts[int(rng.integers(0, p))] = n
    else:
        cuts = sorted(int(v) for v in rng.integers(0, n + 1, p - 1))
        counts = [b - a_ for a_, b in zip([0] + cuts, cuts + [n])]
        if kind == 2 and p > 1:  # force at least one empty shard
            j = int(rng.integers(0, p))
            k = (j + 1) % p
            counts[k] += counts[j]
            counts[j] = 0
    return counts


def run_mpi(a, root):
    rng = np.random.default_rng(a.seed)
    maxe = {k: 0.0 for k in TOL}
    fails = 0
    env = dict(os.environ, **MPI_ENV)
    print("%3s %-4s %-8s %-8s %-8s %-8s %-8s %-8s  %s" % (
        "#", "ok", "y", "dx", "dweight", "dbias", "r_mean", "r_var", "case"))
    for i in range(a.cases):
        c = draw_case(rng, 0)  # batchnorm
        # The cross-rank reduction: train with tracked or batch statistics.
        c["train"] = bool(rng.random() < 0.85)
        n = c["shape"][0]
        if n < a.mpi and rng.random() < 0.7:
            # Grow the batch so that most splits give every rank something.
            extra = int(rng.integers(a.mpi, 3 * a.mpi))
            xs = [c["x"]] + [f32(rng.standard_normal(c["x"].shape[1:]) *
                                 (1.0 if not c["big"] else 1.0) +
                                 (1e4 if c["big"] else 0.0))[None]
                             for _ in range(extra)]
            c["x"] = f32(np.concatenate(xs))
            c["dy"] = f32(rng.standard_normal(c["x"].shape))
            c["shape"][0] = n = c["x"].shape[0]
        counts = draw_counts(rng, n, a.mpi)
        d = os.path.join(root, "mpi%03d" % i)
        os.makedirs(d)
        args, out = syncbn_args(c, d)
        args += ["--sync", "--counts", ",".join(map(str, counts))]
        ref = torch_reference(c)
        cmd = ["mpirun"] + MPI_FLAGS + ["-np", str(a.mpi), a.syncbn] + args
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=180,
                           env=env)
        if p.returncode != 0:
            errs, ok = {k: math.inf for k in ref}, False
            note = " | exit %d: %s" % (p.returncode, (p.stderr + p.stdout).strip()[-400:])
        else:
            errs, ok = compare(ref, read_outputs(out, TOL), out)
            note = ""
        for k, e in errs.items():
            maxe[k] = max(maxe[k], e)
        fails += not ok
        print("%3d %-4s %s %s %s %s %s %s  %s counts=%s%s" % (
            i, "ok" if ok else "FAIL", fmt_err(errs, "y"), fmt_err(errs, "dx"),
            fmt_err(errs, "dweight"), fmt_err(errs, "dbias"),
            fmt_err(errs, "running_mean"), fmt_err(errs, "running_var"),
            case_label(c), ",".join(map(str, counts)), note))
        if not ok:
            print("    command: %s" % " ".join(cmd))
    return fails, maxe


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--syncbn", default=DEFAULT_SYNCBN,
                    help="the syncbn program (default build/bin/syncbn)")
    ap.add_argument("--cases", type=int, default=30, help="random cases (30)")
    ap.add_argument("--seed", type=int, default=12345, help="random seed")
    ap.add_argument("--mpi", type=int, default=0, metavar="P",
                    help="run BatchNorm --sync under mpirun -np P instead")
    ap.add_argument("--keep", metavar="DIR",
                    help="write the cases under DIR and keep them")
    a = ap.parse_args()
    if not os.access(a.syncbn, os.X_OK):
        print("check_torch: no syncbn program at %s (use --syncbn)" % a.syncbn,
              file=sys.stderr)
        return 2
    if a.cases < 1 or a.mpi < 0:
        print("check_torch: --cases must be >= 1 and --mpi >= 0", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    if a.keep:
        os.makedirs(a.keep, exist_ok=True)
        root = tempfile.mkdtemp(prefix="check_torch-", dir=a.keep)
        fails, maxe = (run_mpi if a.mpi else run_single)(a, root)
    else:
        with tempfile.TemporaryDirectory(prefix="check_torch-") as root:
            fails, maxe = (run_mpi if a.mpi else run_single)(a, root)
    print("max relative L2 errors (limits: y, dbias, running stats 1e-5; "
          "dx, dweight 1e-4):")
    print("  " + "  ".join("%s %.2e" % (k, v) for k, v in maxe.items()))
    print("%d of %d cases failed (seed %d%s)" % (
        fails, a.cases, a.seed, ", mpirun -np %d" % a.mpi if a.mpi else ""))
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
