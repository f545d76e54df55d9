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
All three start every rep from memory, not from cache: the bench
(mpi/cli/cli_bench_kernels.c) rotates through copies of x, y, dy and dx
that together pass 64 MiB (the L3 is 32 MiB; where it is larger, pass
--rotate-mib above it) and runs its floor kernel (a
memcpy forward, dx = x + dy backward) on the copy between two reps; the
peers here get the same number of copies of their tensors and the same
floor between reps. Timing one tensor over and over instead (--warm) keeps
everything under 32 MB in L3, which made PyTorch up to a third faster on
some rows than it is from memory, against syncbn's cold figures; --warm is
there only to show that difference (the bench has no warm mode, so its
ratios mix the two).
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
      [--batch 8] [--rounds 3] [--reps 10] [--quick] [--op OP]
      [--layout nchw|nhwc|both] [--warm] [--json FILE]
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


def configs(shapes, args):
    """(op, pass, layout, shape) of every configuration compared."""
    out = []
    lays = ("nchw", "nhwc") if args.layout == "both" else (args.layout,)
    for s in shapes:
        for op in ([args.op] if args.op else OPS):
            passes = ("train_fwd", "train_bwd") if op == "batchnorm" else \
                ("fwd", "bwd")
            for lay in lays:
                if op == "layernorm" and lay == "nhwc":
                    continue
                for p in passes:
                    out.append((op, p, lay, s))
    return out


def groups_of(c):
    # The group count `syncbn bench kernels` uses.
    return 32 if c % 32 == 0 else (8 if c % 8 == 0 else 1)


# ---------------------------------------------------------------- syncbn
def run_syncbn(args, shapes):
    cmd = [args.syncbn, "bench", "kernels", "--json", "-",
           "--reps", str(args.reps), "--layout", args.layout,
           "--rotate-mib", str(args.rotate_mib)]
    if args.op:
        cmd += ["--op", args.op]
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
def copies_of(n, rotate_mib):
    """The copies `syncbn bench kernels` rotates through for a tensor of n
    floats (sbn__bench_copies of its x, y, dy, dx): rotate_mib MiB in
    all (--rotate-mib, 64 by default)."""
    target, nbytes = rotate_mib << 20, n * 16
    return max(1, min(4096, -(-target // nbytes)))


def median_time(floor, fn, copies, reps):
    """Median us of fn(c), and of floor(c), over reps after warm-up (at
    least 3 calls and 50 ms), alternating them on successive copies the
    way cli_bench_kernels.c does: the floor on copy c, the pass on c + 1,
    the floor on c + 2, ..."""
    tp, tf = [], []
    t0 = time.perf_counter()
    c, w = 0, 0
    while len(tp) < reps:
        s = time.perf_counter()
        floor(c)
        m = time.perf_counter()
        c = (c + 1) % copies
        fn(c)
        e = time.perf_counter()
        c = (c + 1) % copies
        if w < 3 or e - t0 < 0.05:
            w += 1
            continue
        tf.append(m - s)
        tp.append(e - m)
    return statistics.median(tp) * 1e6, statistics.median(tf) * 1e6


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


def torch_one(torch, args, op, p, lay, s):
    """(pass us, floor us) of one configuration on rotated copies, so that
    PyTorch, like syncbn in its bench, starts each rep from memory."""
    n = 1
    for v in s:
        n *= v
    copies = 1 if args.warm else copies_of(n, args.rotate_mib)
    xs, dys, outs, runs = [], [], [], []
    for _ in range(copies):
        x = torch.randn(*s) * 2 + 3
        if lay == "nhwc":
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        xs.append(x)
        outs.append(torch.empty_like(x, requires_grad=False))
        fwd, params = torch_forward(torch, op, x, s[1])
        if p.endswith("fwd"):
            runs.append(fwd)
            continue
        y = fwd()
        dy = torch.randn_like(y)
        dys.append(dy)
        runs.append(lambda y=y, i=(x,) + params, dy=dy:
                    torch.autograd.grad(y, i, dy, retain_graph=True))
    def floor(c):
        with torch.no_grad():
            if p.endswith("fwd"):
                outs[c].copy_(xs[c])
            else:
                torch.add(xs[c], dys[c], out=outs[c])

    if p.endswith("fwd"):
        with torch.no_grad():
            return median_time(floor, lambda c: runs[c](), copies, args.reps)
    return median_time(floor, lambda c: runs[c](), copies, args.reps)


def run_torch(torch, args, confs):
    got, floors = {}, {}
    for k in confs:
        got[k], floors[k] = torch_one(torch, args, *k)
    return got, floors


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
    cmd = [exe, str(args.reps), "--rotate-mib", str(args.rotate_mib)]
    if args.warm:
        cmd.append("--warm")
    for s in shapes:
        for lay in ("nchw", "nhwc") if args.layout == "both" else \
                (args.layout,):
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


def report(confs, rounds, machine, torch_ver, dnnl_on, warm, out):
    rows = []
    for k in confs:
        sb = med([r["syncbn"].get(k) for r in rounds])
        fl = med([r["floor"].get(k) for r in rounds])
        pt = med([r["torch"].get(k) for r in rounds])
        dn = med([r["dnnl"].get(k) for r in rounds])
        pf = med([r["torch_floor"].get(k) for r in rounds])
        rows.append(dict(op=k[0], pass_=k[1], layout=k[2], shape=list(k[3]),
                         syncbn_us=sb, floor_ratio=sb / fl if sb and fl
                         else None, torch_us=pt, dnnl_us=dn,
                         torch_floor_us=pf,
                         torch_floor_ratio=pt / pf if pt and pf else None,
                         torch_ratio=pt / sb if pt and sb else None,
                         dnnl_ratio=dn / sb if dn and sb else None))
    print("# compare_peers: %s, kernels %s; torch %s, oneDNN %s; %d rounds"
          % (machine.get("cpu"), machine.get("kernels"), torch_ver,
             "on" if dnnl_on else "absent", len(rounds)))
    print("# ratios are peer time / syncbn time (above 1: syncbn faster);"
          " floor = memcpy or 2-read-1-write stream of the same bytes;"
          " tfloor = PyTorch's time / the floor timed beside it")
    print("# peers %s" % ("WARM: the same tensors every call (syncbn stays"
                          " cold; not a fair comparison)" if warm else
                          "cold: rotated copies over %d MiB, as syncbn"
                          % machine.get("rotate_mib", 64)))
    hdr = "%-12s %-9s %-6s %-14s %10s %6s %10s %7s %6s %10s %7s" % (
        "op", "pass", "layout", "shape", "syncbn_us", "floor",
        "torch_us", "torch/x", "tfloor", "dnnl_us", "dnnl/x")
    print(hdr)
    for r in rows:
        print("%-12s %-9s %-6s %-14s %10s %6s %10s %7s %6s %10s %7s" % (
            r["op"], r["pass_"], r["layout"],
            "x".join(map(str, r["shape"])), fmt(r["syncbn_us"]),
            fmt(r["floor_ratio"], "%.2f"), fmt(r["torch_us"]),
            fmt(r["torch_ratio"], "%.2f"),
            fmt(r["torch_floor_ratio"], "%.2f"), fmt(r["dnnl_us"]),
            fmt(r["dnnl_ratio"], "%.2f")))
    if out:
        with open(out, "w") as f:
            json.dump({"machine": machine, "torch": torch_ver,
                       "peers_warm": warm,
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
    ap.add_argument("--op", choices=OPS, help="one op only")
    ap.add_argument("--layout", choices=("nchw", "nhwc", "both"),
                    default="both")
    ap.add_argument("--warm", action="store_true",
                    help="peers on the same tensors every call (warm "
                    "cache below 32 MB; syncbn's bench stays cold, so this "
                    "only shows what the cache is worth)")
    ap.add_argument("--rotate-mib", type=int, default=64,
                    help="the copies every configuration rotates through "
                    "add up to this many MiB, in syncbn's bench and for "
                    "the peers (default 64; above the last-level cache, "
                    "every rep starts from memory)")
    ap.add_argument("--json", help="write the rows as JSON here")
    args = ap.parse_args()
    if not 1 <= args.rotate_mib <= 65536:
        ap.error("--rotate-mib: %d is not in [1, 65536]" % args.rotate_mib)
    mem = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if args.rotate_mib << 20 > mem // 2:
        ap.error("--rotate-mib: %d MiB is more than half of this machine's "
                 "memory" % args.rotate_mib)
    shapes = shapes_of(args)
    confs = configs(shapes, args)
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
            rnd = {"syncbn": got, "floor": floors, "torch": {}, "dnnl": {},
                   "torch_floor": {}}
            if torch is not None:
                rnd["torch"], rnd["torch_floor"] = run_torch(torch, args,
                                                             confs)
            if exe is not None and args.op in (None, "batchnorm"):
                rnd["dnnl"] = run_dnnl(exe, args, shapes)
            rounds.append(rnd)
    report(confs, rounds, machine,
           torch.__version__ if torch is not None else "absent",
           exe is not None, args.warm, args.json)


if __name__ == "__main__":
    main()
