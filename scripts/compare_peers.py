#!/usr/bin/python3
"""syncbn against PyTorch and oneDNN, measured alternately in one run.

For every shape (the nine ResNet-50 BatchNorm shapes at --batch and the
design note's (32, 64, 32, 32)) and every round, this runs in turn:
  - syncbn: `syncbn bench kernels --json -` on all the shapes (its own
    warm-up, median over --reps, and a memcpy floor of the same bytes);
  - PyTorch (1 thread, torch.set_num_threads(1)): the same passes in NCHW
    and channels_last, timed here the same way (warm-up of at least 3
    calls and 50 ms, median over --reps);
  - oneDNN (OMP_NUM_THREADS=1): BatchNorm training forward and backward in
    NCHW and NHWC through scripts/peers/dnnl_bn.c, compiled here when
    oneDNN's header and library are found (Debian: libdnnl-dev).
so a slow moment of the machine hits every library in the same round. Each
library's time per configuration is the median over rounds of its
per-round medians; the table gives the ratios peer / syncbn (above 1:
syncbn is faster). Passes: BatchNorm train_fwd and train_bwd (backward
alone, from a retained graph in PyTorch), LayerNorm over (C, H, W) (NCHW
only, as syncbn has it), GroupNorm (32 groups where C allows) and
InstanceNorm, fwd and bwd, all with affine parameters.

Optional peers: without torch (run it with /usr/bin/python3, Debian's
python3-torch) or without oneDNN their columns are "-". Not run in CI.

  /usr/bin/python3 scripts/compare_peers.py [--syncbn build/bin/syncbn]
      [--batch 8] [--rounds 3] [--reps 10] [--quick] [--json FILE]
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

RESNET = [(64, 112, 112), (64, 56, 56), (256, 56, 56), (128, 28, 28),
          (512, 28, 28), (256, 14, 14), (1024, 14, 14), (512, 7, 7),
          (2048, 7, 7)]
OPS = ("batchnorm", "layernorm", "groupnorm", "instancenorm")
HERE = os.path.dirname(os.path.abspath(__file__))


def shapes_of(args):
    shapes = [(args.batch,) + chw for chw in RESNET] + [(32, 64, 32, 32)]
    if args.quick:
        shapes = [shapes[1], shapes[4], shapes[-1]]
    return shapes


def configs(shapes):
    """(op, pass, layout, shape) of every configuration compared."""
    out = []
    for s in shapes:
        for op in OPS:
            passes = ("train_fwd", "train_bwd") if op == "batchnorm" else \
                ("fwd", "bwd")
            for lay in (("nchw",) if op == "layernorm" else ("nchw", "nhwc")):
                for p in passes:
                    out.append((op, p, lay, s))
    return out


def groups_of(c):
    # The group count `syncbn bench kernels` uses.
    return 32 if c % 32 == 0 else (8 if c % 8 == 0 else 1)


# ---------------------------------------------------------------- syncbn
def run_syncbn(args, shapes):
    cmd = [args.syncbn, "bench", "kernels", "--json", "-",
           "--reps", str(args.reps)]
    for s in shapes:
        cmd += ["--shape", ",".join(map(str, s))]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env,
                         check=True)
    doc = json.loads(res.stdout)
    got, floors = {}, {}
    for r in doc["records"]:
        k = (r["op"], r["pass"], r["layout"], tuple(r["shape"]))
        got[k] = r["median_us"]
        floors[k] = r["floor_us"]
    return got, floors, doc["machine"]


# ---------------------------------------------------------------- torch
def median_time(fn, reps):
    t0 = time.perf_counter()
    w = 0
    while w < 3 or time.perf_counter() - t0 < 0.05:
        fn()
        w += 1
    ts = []
    for _ in range(reps):
        s = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - s)
    return statistics.median(ts) * 1e6


def torch_forward(torch, op, x, c):
    F = torch.nn.functional
    shape = x.shape
    if op == "batchnorm":
        w = torch.ones(c, requires_grad=True)
        b = torch.zeros(c, requires_grad=True)
        rm, rv = torch.zeros(c), torch.ones(c)
        return (lambda: F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)), \
            (w, b)
    if op == "layernorm":
        w = torch.ones(shape[1:], requires_grad=True)
        b = torch.zeros(shape[1:], requires_grad=True)
        return (lambda: F.layer_norm(x, shape[1:], w, b, 1e-5)), (w, b)
    w = torch.ones(c, requires_grad=True)
    b = torch.zeros(c, requires_grad=True)
    if op == "groupnorm":
        g = groups_of(c)
        return (lambda: F.group_norm(x, g, w, b, 1e-5)), (w, b)
    return (lambda: F.instance_norm(x, None, None, w, b, True, 0.1,
                                    1e-5)), (w, b)


def run_torch(torch, args, confs):
    got = {}
    for op, p, lay, s in confs:
        x = torch.randn(*s) * 2 + 3
        if lay == "nhwc":
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        fwd, params = torch_forward(torch, op, x, s[1])
        if p.endswith("fwd"):
            with torch.no_grad():
                got[(op, p, lay, s)] = median_time(fwd, args.reps)
            continue
        y = fwd()
        dy = torch.randn_like(y)
        inputs = (x,) + params
        got[(op, p, lay, s)] = median_time(
            lambda: torch.autograd.grad(y, inputs, dy, retain_graph=True),
            args.reps)
    return got


# ---------------------------------------------------------------- oneDNN
def build_dnnl(tmp):
    src = os.path.join(HERE, "peers", "dnnl_bn.c")
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not (os.path.exists("/usr/include/dnnl.h") or
                          os.path.exists("/usr/include/oneapi/dnnl/dnnl.h")):
        return None
    exe = os.path.join(tmp, "dnnl_bn")
    res = subprocess.run([cc, "-O2", "-o", exe, src, "-ldnnl"],
                         capture_output=True, text=True)
    if res.returncode != 0:
        print("compare_peers: oneDNN driver did not build:\n" + res.stderr,
              file=sys.stderr)
        return None
    return exe


def run_dnnl(exe, args, shapes):
    cmd = [exe, str(args.reps)]
    for s in shapes:
        for lay in ("nchw", "nhwc"):
            cmd.append(",".join(map(str, s)) + "," + lay)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env,
                         check=True)
    got = {}
    for line in res.stdout.splitlines():
        r = json.loads(line)
        got[(r["op"], r["pass"], r["layout"], tuple(r["shape"]))] = \
            r["median_us"]
    return got


# ---------------------------------------------------------------- report
def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def fmt(v, spec="%.1f"):
    return "-" if v is None else spec % v


def report(confs, rounds, machine, torch_ver, dnnl_on, out):
    rows = []
    for k in confs:
        sb = med([r["syncbn"].get(k) for r in rounds])
        fl = med([r["floor"].get(k) for r in rounds])
        pt = med([r["torch"].get(k) for r in rounds])
        dn = med([r["dnnl"].get(k) for r in rounds])
        rows.append(dict(op=k[0], pass_=k[1], layout=k[2], shape=list(k[3]),
                         syncbn_us=sb, floor_ratio=sb / fl if sb and fl
                         else None, torch_us=pt, dnnl_us=dn,
                         torch_ratio=pt / sb if pt and sb else None,
                         dnnl_ratio=dn / sb if dn and sb else None))
    print("# compare_peers: %s, kernels %s; torch %s, oneDNN %s; %d rounds"
          % (machine.get("cpu"), machine.get("kernels"), torch_ver,
             "on" if dnnl_on else "absent", len(rounds)))
    print("# ratios are peer time / syncbn time (above 1: syncbn faster);"
          " floor = memcpy or 2-read-1-write stream of the same bytes")
    hdr = "%-12s %-9s %-6s %-14s %10s %6s %10s %7s %10s %7s" % (
        "op", "pass", "layout", "shape", "syncbn_us", "floor",
        "torch_us", "torch/x", "dnnl_us", "dnnl/x")
    print(hdr)
    for r in rows:
        print("%-12s %-9s %-6s %-14s %10s %6s %10s %7s %10s %7s" % (
            r["op"], r["pass_"], r["layout"],
            "x".join(map(str, r["shape"])), fmt(r["syncbn_us"]),
            fmt(r["floor_ratio"], "%.2f"), fmt(r["torch_us"]),
            fmt(r["torch_ratio"], "%.2f"), fmt(r["dnnl_us"]),
            fmt(r["dnnl_ratio"], "%.2f")))
    if out:
        with open(out, "w") as f:
            json.dump({"machine": machine, "torch": torch_ver,
                       "rounds": len(rounds), "rows": rows}, f, indent=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--syncbn", default=os.path.join(
        HERE, "..", "build", "bin", "syncbn"))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--quick", action="store_true",
                    help="three shapes only")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-dnnl", action="store_true")
    ap.add_argument("--json", help="write the rows as JSON here")
    args = ap.parse_args()
    shapes = shapes_of(args)
    confs = configs(shapes)
    torch = None
    if not args.no_torch:
        try:
            import torch as torch_mod
            torch = torch_mod
            torch.set_num_threads(1)
        except ImportError:
            print("compare_peers: no torch here (use /usr/bin/python3);"
                  " its columns stay empty", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        exe = None if args.no_dnnl else build_dnnl(tmp)
        rounds, machine = [], {}
        for i in range(args.rounds):
            print("compare_peers: round %d/%d" % (i + 1, args.rounds),
                  file=sys.stderr)
            got, floors, machine = run_syncbn(args, shapes)
            rnd = {"syncbn": got, "floor": floors, "torch": {}, "dnnl": {}}
            if torch is not None:
                rnd["torch"] = run_torch(torch, args, confs)
            if exe is not None:
                rnd["dnnl"] = run_dnnl(exe, args, shapes)
            rounds.append(rnd)
    report(confs, rounds, machine,
           torch.__version__ if torch is not None else "absent",
           exe is not None, args.json)


if __name__ == "__main__":
    main()
