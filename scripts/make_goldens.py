#!/usr/bin/python3
"""Golden vectors for the normalization kernels, computed by PyTorch.

Run with Debian's python (it has torch):  /usr/bin/python3 scripts/make_goldens.py
It rewrites tests/data/golden/ (one file per case plus MANIFEST), which
tests/golden_test.c replays through libsyncbn.

Every input is drawn in float32 and then converted to float64, and torch
computes forward and backward in float64, so the goldens are the exact
answer for the float32 inputs the C test feeds the library.

File format (".sbg", version 1), chosen so that C reads it with fgets and
fread and nothing else:

    SBNGOLD 1\n
    <key> <value...>\n        text header lines, one key per line
    ...
    array <name> <count>\n    one line per array, in data order
    end\n
    <arrays>                  raw little-endian IEEE float64, concatenated
                              in the order of the "array" lines

Keys: op (batchnorm|layernorm|instancenorm|groupnorm), mode (train|eval),
layout (nchw|nhwc), dims (logical N C spatial..., or the plain array shape
for layernorm), channels, groups, norm_shape, eps, momentum, cumulative
(0|1: PyTorch momentum=None), affine (0|1), track (0|1), nbt_in, nbt_out,
ghost_batch (batchnorm with ghost batches of that many samples; absent: 0).
PyTorch has no ghost batches: they are made by applying one copy of the
BatchNorm module (the same start state) to each chunk of x.split(g), as
ceil(N/g) data-parallel ranks of g samples would, with dweight/dbias the
sum of the copies' gradients and the running statistics the mean of the
copies' (syncbn's documented rule).
Arrays: x, dy (in the layout's memory order), weight, bias,
running_mean_in, running_var_in (inputs), y, dx (memory order), dweight,
dbias, running_mean_out, running_var_out (expected outputs). Arrays that do
not apply are absent.
"""
import copy
import os
import struct
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "tests", "data", "golden")


def f32(a):
    """Rounds to float32 and back, so C sees exactly these values."""
    return np.asarray(a, dtype=np.float32).astype(np.float64)


def to_memory(t, layout):
    """Logical (N, C, spatial...) tensor -> flat array in memory order."""
    a = t.detach().numpy()
    if layout == "nhwc" and a.ndim > 2:
        a = np.moveaxis(a, 1, -1)
    return np.ascontiguousarray(a).reshape(-1)


def bn_module(ndim, C, **kw):
    cls = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d,
           4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}[ndim]
    return cls(C, **kw)


def ghost_bn(m, xt, dyt, g):
    """BatchNorm m applied by its own copy to each chunk of xt.split(g);
    leaves in m the summed gradients and the mean of the copies' running
    statistics, and returns the concatenated y."""
    chunks = xt.split(g)
    copies = [copy.deepcopy(m) for _ in chunks]
    y = torch.cat([c(xc) for c, xc in zip(copies, chunks)])
    y.backward(dyt)
    with torch.no_grad():
        if m.affine:
            m.weight.grad = sum(c.weight.grad for c in copies)
            m.bias.grad = sum(c.bias.grad for c in copies)
        if m.track_running_stats and m.training:
            m.running_mean.copy_(
                torch.stack([c.running_mean for c in copies]).mean(0))
            m.running_var.copy_(
                torch.stack([c.running_var for c in copies]).mean(0))
            m.num_batches_tracked.copy_(copies[0].num_batches_tracked)
    return y


def in_module(ndim, C, **kw):
    cls = {3: torch.nn.InstanceNorm1d, 4: torch.nn.InstanceNorm2d,
           5: torch.nn.InstanceNorm3d}[ndim]
    return cls(C, **kw)


def make_case(rng, name, op, dims, mode="train", layout="nchw", affine=True,
              track=True, momentum=0.1, cumulative=False, eps=1e-5, groups=1,
              norm_ndim=1, xmean=0.5, xstd=2.0, nbt_in=3, ghost=0):
    dims = list(dims)
    x = f32(xmean + xstd * rng.standard_normal(dims))
    dy = f32(rng.standard_normal(dims))
    header = [("op", op), ("mode", mode), ("layout", layout),
              ("dims", " ".join(str(d) for d in dims)), ("eps", repr(eps)),
              ("affine", int(affine))]
    arrays = []
    if op == "layernorm":
        shape = dims[len(dims) - norm_ndim:]
        header.append(("norm_shape", " ".join(str(d) for d in shape)))
        m = torch.nn.LayerNorm(shape, eps=eps, elementwise_affine=affine)
        pshape = shape
    else:
        C = dims[1]
        header.append(("channels", C))
        pshape = [C]
        if op == "batchnorm":
            m = bn_module(len(dims), C, eps=eps,
                          momentum=None if cumulative else momentum,
                          affine=affine, track_running_stats=track)
            header += [("momentum", repr(momentum)),
                       ("cumulative", int(cumulative)), ("track", int(track))]
            if ghost:
                header.append(("ghost_batch", ghost))
        elif op == "instancenorm":
            m = in_module(len(dims), C, eps=eps, momentum=momentum,
                          affine=affine, track_running_stats=track)
            header += [("momentum", repr(momentum)), ("track", int(track))]
        elif op == "groupnorm":
            m = torch.nn.GroupNorm(groups, C, eps=eps, affine=affine)
            header.append(("groups", groups))
        else:
            raise ValueError(op)
    m = m.double()
    w = f32(1.0 + 0.5 * rng.standard_normal(pshape))
    b = f32(0.5 * rng.standard_normal(pshape))
    with torch.no_grad():
        if affine:
            m.weight.copy_(torch.from_numpy(w))
            m.bias.copy_(torch.from_numpy(b))
    has_running = op in ("batchnorm", "instancenorm") and track
    if has_running:
        rm = f32(0.3 * rng.standard_normal(pshape))
        rv = f32(0.5 + rng.random(pshape))
        with torch.no_grad():
            m.running_mean.copy_(torch.from_numpy(rm))
            m.running_var.copy_(torch.from_numpy(rv))
            if op == "batchnorm":
                m.num_batches_tracked.fill_(nbt_in)
    m.train(mode == "train")
    xt = torch.from_numpy(x).requires_grad_(True)
    if ghost and (mode == "train" or not track):
        y = ghost_bn(m, xt, torch.from_numpy(dy), ghost)
    else:
        y = m(xt)
        y.backward(torch.from_numpy(dy))

    # Logical -> memory order only for the layouts that have channels.
    lay = layout if op != "layernorm" else "nchw"
    arrays.append(("x", to_memory(torch.from_numpy(x), lay)))
    arrays.append(("dy", to_memory(torch.from_numpy(dy), lay)))
    if affine:
        arrays.append(("weight", w.reshape(-1)))
        arrays.append(("bias", b.reshape(-1)))
    if has_running:
        arrays.append(("running_mean_in", rm.reshape(-1)))
        arrays.append(("running_var_in", rv.reshape(-1)))
    arrays.append(("y", to_memory(y, lay)))
    arrays.append(("dx", to_memory(xt.grad, lay)))
    if affine:
        arrays.append(("dweight", m.weight.grad.numpy().reshape(-1)))
        arrays.append(("dbias", m.bias.grad.numpy().reshape(-1)))
    if has_running:
        arrays.append(("running_mean_out", m.running_mean.numpy().reshape(-1)))
        arrays.append(("running_var_out", m.running_var.numpy().reshape(-1)))
        if op == "batchnorm":
            header.append(("nbt_in", nbt_in))
            header.append(("nbt_out", int(m.num_batches_tracked.item())))

    text = "SBNGOLD 1\n"
    for k, v in header:
        text += "%s %s\n" % (k, v)
    for k, a in arrays:
        text += "array %s %d\n" % (k, a.size)
    text += "end\n"
    data = b"".join(np.asarray(a, dtype="<f8").tobytes() for _, a in arrays)
    path = os.path.join(OUT, name + ".sbg")
    with open(path, "wb") as f:
        f.write(text.encode("ascii"))
        f.write(data)
    return name + ".sbg"


def cases():
    """(name, kwargs) for every case; small shapes keep the set < 1 MB."""
    c = []
    bn = "batchnorm"
    for layout in ("nchw", "nhwc"):
        c += [
            ("bn_train_%s" % layout, dict(op=bn, dims=(4, 3, 5, 6), layout=layout)),
            ("bn_eval_track_%s" % layout,
             dict(op=bn, dims=(2, 3, 4, 5), mode="eval", layout=layout)),
            ("bn_train_noaffine_notrack_%s" % layout,
             dict(op=bn, dims=(3, 17, 7), layout=layout, affine=False, track=False)),
            ("bn_eval_notrack_%s" % layout,
             dict(op=bn, dims=(2, 4, 3, 3), mode="eval", layout=layout, track=False)),
            ("bn_train_cumulative_%s" % layout,
             dict(op=bn, dims=(4, 3, 5), layout=layout, cumulative=True, nbt_in=3)),
            ("bn_train_3d_%s" % layout,
             dict(op=bn, dims=(2, 3, 3, 4, 5), layout=layout)),
            ("bn_train_largemean_%s" % layout,
             dict(op=bn, dims=(8, 4, 16), layout=layout, xmean=1e4, xstd=1.0)),
            ("bn_train_largemean_std2_mom1_%s" % layout,
             dict(op=bn, dims=(6, 5, 9), layout=layout, xmean=1e4, xstd=2.0,
                  momentum=1.0)),
            ("in_train_track_%s" % layout,
             dict(op="instancenorm", dims=(3, 4, 5, 6), layout=layout)),
            ("in_eval_track_%s" % layout,
             dict(op="instancenorm", dims=(2, 5, 7), mode="eval", layout=layout)),
            ("in_train_notrack_%s" % layout,
             dict(op="instancenorm", dims=(2, 3, 3, 4, 3), layout=layout,
                  track=False)),
            ("in_eval_notrack_noaffine_%s" % layout,
             dict(op="instancenorm", dims=(2, 3, 11), layout=layout, mode="eval",
                  track=False, affine=False)),
            ("gn_g3_%s" % layout,
             dict(op="groupnorm", dims=(2, 6, 4, 5), groups=3, layout=layout)),
            ("gn_g4_noaffine_%s" % layout,
             dict(op="groupnorm", dims=(3, 8, 3, 3), groups=4, layout=layout,
                  affine=False)),
            ("gn_g1_%s" % layout,
             dict(op="groupnorm", dims=(2, 5, 7), groups=1, layout=layout)),
            ("gn_gc_%s" % layout,
             dict(op="groupnorm", dims=(2, 5, 7), groups=5, layout=layout)),
        ]
    c += [
        ("bn_train_2d_input", dict(op=bn, dims=(16, 5))),
        ("bn_train_momentum0_37", dict(op=bn, dims=(5, 3, 8), momentum=0.37)),
        ("bn_eval_cumulative", dict(op=bn, dims=(3, 4, 6), mode="eval",
                                    cumulative=True)),
        ("gn_largemean", dict(op="groupnorm", dims=(2, 6, 10), groups=2,
                              xmean=1e4, xstd=1.0)),
        ("in_train_largemean", dict(op="instancenorm", dims=(2, 3, 40),
                                    xmean=1e4, xstd=2.0, momentum=1.0)),
        ("ln_1dim", dict(op="layernorm", dims=(4, 6, 10), norm_ndim=1)),
        ("ln_3dims", dict(op="layernorm", dims=(2, 3, 4, 5), norm_ndim=3)),
        ("ln_2dims_noaffine", dict(op="layernorm", dims=(3, 5, 7), norm_ndim=2,
                                   affine=False)),
        ("ln_odd_row", dict(op="layernorm", dims=(5, 17), norm_ndim=1)),
        ("ln_largemean", dict(op="layernorm", dims=(3, 33), norm_ndim=1,
                              xmean=1e4, xstd=1.0)),
        ("ln_eps1e-3", dict(op="layernorm", dims=(4, 9), norm_ndim=1, eps=1e-3)),
        ("bn_eps1e-3", dict(op=bn, dims=(4, 3, 5), eps=1e-3)),
        ("bn_ghost_train_nchw", dict(op=bn, dims=(7, 3, 4, 5), ghost=3)),
        ("bn_ghost_train_nhwc", dict(op=bn, dims=(7, 3, 4, 5), ghost=3,
                                     layout="nhwc")),
        ("bn_ghost_cumulative", dict(op=bn, dims=(6, 4, 5), ghost=2,
                                     cumulative=True)),
        ("bn_ghost_eval_notrack", dict(op=bn, dims=(5, 3, 6), ghost=2,
                                       mode="eval", track=False)),
        ("bn_ghost_largemean", dict(op=bn, dims=(8, 4, 16), ghost=4,
                                    xmean=1e4, xstd=1.0)),
        ("bn_ghost_g1_spatial", dict(op=bn, dims=(3, 2, 5), ghost=1)),
    ]
    return c


def main():
    torch.set_grad_enabled(True)
    os.makedirs(OUT, exist_ok=True)
    for f in os.listdir(OUT):
        if f.endswith(".sbg") or f == "MANIFEST":
            os.remove(os.path.join(OUT, f))
    # One generator seeded per case name, so adding a case changes no other.
    names = []
    for name, kw in cases():
        seed = sum(ord(ch) * (i + 1) for i, ch in enumerate(name))
        rng = np.random.default_rng(seed)
        names.append(make_case(rng, name, **kw))
    with open(os.path.join(OUT, "MANIFEST"), "w") as f:
        f.write("".join(n + "\n" for n in names))
    total = sum(os.path.getsize(os.path.join(OUT, n)) for n in names)
    print("wrote %d cases, %d bytes, to %s" % (len(names), total, OUT))
    if total >= 1 << 20:
        sys.exit("goldens exceed 1 MB")


if __name__ == "__main__":
    main()
