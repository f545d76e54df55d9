#!/usr/bin/python3
"""Convert syncbn checkpoints to and from PyTorch state_dicts.

Run with a python that has torch and numpy (on Debian: /usr/bin/python3):

    state_torch.py to-torch CKPT OUT.pt [--prefix P] [--group G]
    state_torch.py from-torch IN.pt CKPT [--prefix P] [--eps E]
                   [--momentum M | --cumulative]
    state_torch.py show CKPT
    state_torch.py check --tool STATE_TEST     (the self-test ctest runs)

The checkpoint format is the one in src/sbn_state.h (version 1); this file
reads and writes it with struct, numpy and zlib only, and validates what it
reads as strictly as the C library does for everything that is not a rule
of sbn_layer_create() (the C loader applies those too).

to-torch writes, per layer, `<P><name>.weight` and `.bias` (affine layers;
LayerNorm weights get the normalized shape) and `.running_mean`,
`.running_var`, `.num_batches_tracked` (layers with running statistics).
Running statistics exist per sync group; a checkpoint whose layers hold
several groups needs --group G to say which group's statistics to export.
Dropout layers have no tensors and are skipped.

from-torch makes one BatchNorm layer for every `<P><name>.running_mean` key
of the state_dict (keys not starting with P are ignored, P is stripped). A
state_dict does not record eps, momentum, or whether a layer was
BatchNorm or InstanceNorm, nor does it list BatchNorm layers without running
statistics; the options give eps and momentum (PyTorch's defaults 1e-5 and
0.1), and the layers become job-wide (group_size 0) BatchNorm layers with one
group, index 0. A file holding {"state_dict": {...}} is accepted too.
Tensors are converted to float32 (with a warning if they were not).

Exit status: 0 on success, 1 on an error (message on stderr), 2 for a usage
error; `check` exits 77 (skipped) when torch cannot be imported.
"""
import argparse
import os
import struct
import subprocess
import sys
import tempfile
import zlib

try:
    import numpy as np
except ImportError as _np_error:  # reported by main(): check skips, others fail
    np = None
    NUMPY_ERROR = _np_error

MAGIC = b"SBNCKPT\0"
VERSION = 1
HEADER = struct.Struct("<8sIIIIQ")  # magic version flags count reserved len
LAYER_FIXED = struct.Struct("<IQQI8QddIIIdIIIIQQ")
GROUP_FIXED = struct.Struct("<IIq")
assert HEADER.size == 32 and LAYER_FIXED.size == 156 and GROUP_FIXED.size == 16

OPS = ["batchnorm", "layernorm", "instancenorm", "groupnorm", "dropout"]
BN, LN, IN, GN, DROPOUT = range(5)
MAX_LAYERS = 65536
MAX_NAME = 255
MAX_GROUPS = 65536
MAX_ELEMS = 1 << 26
MAX_FILE = 1 << 30


class FormatError(Exception):
    """A file that is not a valid checkpoint, or data that cannot be one."""


def lengths(layer):
    """(affine_len, stats_len) implied by a layer's parameters, as
    sbn_ckpt_lengths() computes them."""
    op = layer["op"]
    if op in (BN, IN, GN):
        a = layer["channels"] if layer["affine"] else 0
        s = layer["channels"] if op != GN and layer["track"] else 0
        if layer["channels"] > MAX_ELEMS:
            raise FormatError("%s: %d channels exceed the cap of %d"
                              % (layer["name"], layer["channels"], MAX_ELEMS))
        return a, s
    if op == LN:
        d = 1
        for v in layer["norm_shape"][:layer["norm_ndim"]]:
            d *= v
        if d > MAX_ELEMS:
            raise FormatError("%s: %d elements exceed the cap of %d"
                              % (layer["name"], d, MAX_ELEMS))
        return (d if layer["affine"] else 0), 0
    return 0, 0


def check_name(raw):
    """Decodes and checks a layer name (UTF-8, no control characters)."""
    if not 1 <= len(raw) <= MAX_NAME:
        raise FormatError("layer name length %d is outside [1, %d]"
                          % (len(raw), MAX_NAME))
    try:
        name = raw.decode("utf-8", errors="strict")
    except UnicodeDecodeError:
        raise FormatError("layer name %r is not valid UTF-8" % raw) from None
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise FormatError("layer name %r contains a control character" % name)
    # Python's codec accepts no surrogates and nothing above U+10FFFF in
    # strict mode, as the C decoder.
    return name


def decode(buf):
    """Parses and validates a checkpoint; returns a list of layer dicts."""
    n = len(buf)
    if n < HEADER.size + 4:
        raise FormatError("truncated: %d bytes, shorter than the header and "
                          "trailer" % n)
    if n > MAX_FILE:
        raise FormatError("%d bytes exceed the cap of %d" % (n, MAX_FILE))
    magic, version, flags, count, reserved, file_len = HEADER.unpack_from(buf)
    if magic != MAGIC:
        raise FormatError("bad magic (not a syncbn checkpoint)")
    if version != VERSION:
        raise FormatError("unsupported version %d (this script reads "
                          "version %d)" % (version, VERSION))
    if flags != 0:
        raise FormatError("unknown flags 0x%x" % flags)
    if reserved != 0:
        raise FormatError("reserved header field is not 0")
    if file_len != n:
        raise FormatError("%s: the header says %d bytes, got %d"
                          % ("truncated" if file_len > n else "wrong length",
                             file_len, n))
    (want,) = struct.unpack_from("<I", buf, n - 4)
    got = zlib.crc32(memoryview(buf)[:n - 4]) & 0xFFFFFFFF
    if want != got:
        raise FormatError("checksum mismatch (stored 0x%08x, computed "
                          "0x%08x): the data is corrupt" % (want, got))
    if count > MAX_LAYERS:
        raise FormatError("%d layers exceed the cap of %d" % (count, MAX_LAYERS))
    end = n - 4
    off = HEADER.size
    layers = []
    seen = set()

    def take(size, what, li):
        nonlocal off
        if size > end - off:
            raise FormatError("layer %d: %s runs past the end of the layer "
                              "records" % (li, what))
        p = off
        off += size
        return p

    def floats(count_, what, li):
        p = take(4 * count_, what, li)
        return np.frombuffer(buf, dtype="<f4", count=count_,
                             offset=p).astype(np.float32)

    for li in range(count):
        (nlen,) = struct.unpack_from("<I", buf, take(4, "the name length", li))
        if not 1 <= nlen <= MAX_NAME:
            raise FormatError("layer %d: name length %d is outside [1, %d]"
                              % (li, nlen, MAX_NAME))
        p = take(nlen, "the name", li)
        name = check_name(bytes(buf[p:p + nlen]))
        if name in seen:
            raise FormatError("layer name %r appears twice" % name)
        seen.add(name)
        f = LAYER_FIXED.unpack_from(buf, take(LAYER_FIXED.size,
                                              "the parameters", li))
        (op, channels, groups, norm_ndim) = f[0:4]
        norm_shape = list(f[4:12])
        (eps, momentum, cumulative, affine, track, p_drop, seed, layer_id,
         group_size, num_groups, alen, slen) = f[12:24]
        if op >= len(OPS):
            raise FormatError("layer %r: unknown op %d" % (name, op))
        if norm_ndim > 8:
            raise FormatError("layer %r: norm_ndim %d is outside [0, 8]"
                              % (name, norm_ndim))
        for fname, v in (("cumulative", cumulative), ("affine", affine),
                         ("track_running_stats", track)):
            if v > 1:
                raise FormatError("layer %r: %s is %d, not 0 or 1"
                                  % (name, fname, v))
        layer = dict(name=name, op=op, channels=channels, groups=groups,
                     norm_ndim=norm_ndim, norm_shape=norm_shape, eps=eps,
                     momentum=momentum, cumulative=cumulative, affine=affine,
                     track=track, p=p_drop, seed=seed, layer_id=layer_id,
                     group_size=group_size)
        if (alen, slen) != lengths(layer):
            raise FormatError("layer %r: array lengths (affine %d, stats %d) "
                              "differ from what its parameters imply %r"
                              % (name, alen, slen, lengths(layer)))
        if num_groups > MAX_GROUPS:
            raise FormatError("layer %r: %d groups exceed the cap of %d"
                              % (name, num_groups, MAX_GROUPS))
        if num_groups and not slen:
            raise FormatError("layer %r: %d groups, but the layer keeps no "
                              "running statistics" % (name, num_groups))
        need = 8 * alen + num_groups * (GROUP_FIXED.size + 8 * slen)
        if need > end - off:
            raise FormatError("layer %r: its arrays need %d bytes but only %d "
                              "remain" % (name, need, end - off))
        layer["weight"] = floats(alen, "weight", li) if alen else None
        layer["bias"] = floats(alen, "bias", li) if alen else None
        layer["groups_state"] = []
        prev = None
        for _ in range(num_groups):
            index, res, nbt = GROUP_FIXED.unpack_from(
                buf, take(GROUP_FIXED.size, "a group", li))
            if prev is not None and index <= prev:
                raise FormatError("layer %r: group index %d follows %d "
                                  "(indices must increase)"
                                  % (name, index, prev))
            if res != 0:
                raise FormatError("layer %r: group %d: reserved field is not 0"
                                  % (name, index))
            if nbt < 0:
                raise FormatError("layer %r: group %d: num_batches_tracked %d "
                                  "is negative" % (name, index, nbt))
            prev = index
            mean = floats(slen, "running_mean", li)
            var = floats(slen, "running_var", li)
            layer["groups_state"].append((index, nbt, mean, var))
        layers.append(layer)
    if off != end:
        raise FormatError("%d stray bytes after the last layer" % (end - off))
    return layers


def encode(layers):
    """Serializes layer dicts (as decode() returns them) into bytes."""
    if len(layers) > MAX_LAYERS:
        raise FormatError("%d layers exceed the cap of %d"
                          % (len(layers), MAX_LAYERS))
    parts = []
    seen = set()
    for L in layers:
        raw = L["name"].encode("utf-8")
        check_name(raw)
        if L["name"] in seen:
            raise FormatError("layer name %r appears twice" % L["name"])
        seen.add(L["name"])
        alen, slen = lengths(L)
        groups = L.get("groups_state", [])
        if groups and not slen:
            raise FormatError("%s: groups given, but the layer keeps no "
                              "running statistics" % L["name"])
        parts.append(struct.pack("<I", len(raw)) + raw)
        parts.append(LAYER_FIXED.pack(
            L["op"], L["channels"], L["groups"], L["norm_ndim"],
            *L["norm_shape"], L["eps"], L["momentum"], L["cumulative"],
            L["affine"], L["track"], L["p"], L["seed"], L["layer_id"],
            L["group_size"], len(groups), alen, slen))
        for key in ("weight", "bias"):
            a = L.get(key)
            a = np.zeros(0, "<f4") if a is None else np.asarray(a)
            if a.dtype != np.float32 or a.size != alen:
                raise FormatError("%s: %s must be %d float32 values"
                                  % (L["name"], key, alen))
            parts.append(a.astype("<f4").tobytes())
        prev = None
        for index, nbt, mean, var in groups:
            if prev is not None and index <= prev:
                raise FormatError("%s: group indices must increase"
                                  % L["name"])
            if nbt < 0:
                raise FormatError("%s: negative num_batches_tracked"
                                  % L["name"])
            prev = index
            parts.append(GROUP_FIXED.pack(index, 0, nbt))
            for a in (mean, var):
                a = np.asarray(a)
                if a.dtype != np.float32 or a.size != slen:
                    raise FormatError("%s: running statistics must be %d "
                                      "float32 values" % (L["name"], slen))
                parts.append(a.astype("<f4").tobytes())
    body = b"".join(parts)
    total = HEADER.size + len(body) + 4
    if total > MAX_FILE:
        raise FormatError("%d bytes exceed the cap of %d" % (total, MAX_FILE))
    head = HEADER.pack(MAGIC, VERSION, 0, len(layers), 0, total)
    crc = zlib.crc32(body, zlib.crc32(head)) & 0xFFFFFFFF
    return head + body + struct.pack("<I", crc)


def read_file(path):
    with open(path, "rb") as f:
        data = f.read()
    try:
        return decode(data)
    except FormatError as e:
        raise FormatError("%s: %s" % (path, e)) from None


def write_atomic(path, data):
    """Writes data to path as sbn_ckpt_save() does: temporary file in the
    same directory, fsync, rename, fsync of the directory."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".sbnckpt-", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dfd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def import_torch():
    try:
        import torch
    except ImportError as e:
        raise FormatError("%s cannot import torch (%s)" % (sys.executable, e))
    return torch


def torch_load(torch, path):
    # weights_only refuses arbitrary pickled code where this torch has it.
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except TypeError:
        obj = torch.load(path, map_location="cpu")
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise FormatError("%s: not a state_dict (got %s)"
                          % (path, type(obj).__name__))
    return obj


def to_torch(args):
    torch = import_torch()
    from collections import OrderedDict
    layers = read_file(args.ckpt)
    out = OrderedDict()
    for L in layers:
        key = args.prefix + L["name"]
        if L["weight"] is not None:
            shape = ([L["channels"]] if L["op"] != LN
                     else L["norm_shape"][:L["norm_ndim"]])
            out[key + ".weight"] = torch.from_numpy(L["weight"].reshape(shape))
            out[key + ".bias"] = torch.from_numpy(L["bias"].reshape(shape))
        groups = L["groups_state"]
        if not groups:
            continue
        if args.group is None:
            if len(groups) > 1:
                raise FormatError(
                    "layer %r holds the statistics of %d sync groups (%s); "
                    "choose one with --group" % (
                        L["name"], len(groups),
                        ", ".join(str(g[0]) for g in groups)))
            g = groups[0]
        else:
            match = [g for g in groups if g[0] == args.group]
            if not match:
                raise FormatError(
                    "layer %r has no group %d (it has %s)" % (
                        L["name"], args.group,
                        ", ".join(str(g[0]) for g in groups)))
            g = match[0]
        out[key + ".running_mean"] = torch.from_numpy(g[2])
        out[key + ".running_var"] = torch.from_numpy(g[3])
        out[key + ".num_batches_tracked"] = torch.tensor(g[1],
                                                         dtype=torch.long)
    torch.save(out, args.out)
    print("%s: %d tensors from %d layers" % (args.out, len(out), len(layers)))


def as_f32(torch, t, key):
    if not isinstance(t, torch.Tensor):
        raise FormatError("%s is not a tensor" % key)
    if t.dtype != torch.float32:
        print("state_torch.py: warning: %s is %s, converted to float32"
              % (key, t.dtype), file=sys.stderr)
    return t.detach().to(torch.float32).contiguous().cpu().numpy().copy()


def from_torch(args):
    torch = import_torch()
    sd = torch_load(torch, args.state_dict)
    suffix = ".running_mean"
    layers = []
    for key in sd:
        if not key.startswith(args.prefix) or not key.endswith(suffix):
            continue
        name = key[len(args.prefix):-len(suffix)]
        base = args.prefix + name
        mean = as_f32(torch, sd[key], key)
        if mean.ndim != 1:
            raise FormatError("%s has shape %s, not (C,)" % (key, mean.shape))
        C = mean.size
        if base + ".running_var" not in sd:
            raise FormatError("%s has no matching .running_var" % key)
        var = as_f32(torch, sd[base + ".running_var"], base + ".running_var")
        if var.shape != (C,):
            raise FormatError("%s.running_var has shape %s, not (%d,)"
                              % (base, var.shape, C))
        nbt = 0
        if base + ".num_batches_tracked" in sd:
            nbt = int(sd[base + ".num_batches_tracked"])
        has_w = base + ".weight" in sd
        if has_w != (base + ".bias" in sd):
            raise FormatError("%s: weight and bias must both be present or "
                              "both absent" % base)
        w = b = None
        if has_w:
            w = as_f32(torch, sd[base + ".weight"], base + ".weight")
            b = as_f32(torch, sd[base + ".bias"], base + ".bias")
            if w.shape != (C,) or b.shape != (C,):
                raise FormatError("%s: weight and bias must have shape (%d,)"
                                  % (base, C))
        if not name:
            raise FormatError("%s: empty layer name after removing the "
                              "prefix" % key)
        layers.append(dict(
            name=name, op=BN, channels=C, groups=1, norm_ndim=0,
            norm_shape=[0] * 8, eps=args.eps,
            momentum=args.momentum, cumulative=int(args.cumulative),
            affine=int(has_w), track=1, p=0.5, seed=0, layer_id=0,
            group_size=0, weight=w, bias=b,
            groups_state=[(0, nbt, mean, var)]))
    if not layers:
        raise FormatError("%s: no '%s*%s' keys: no BatchNorm layers with "
                          "running statistics" % (args.state_dict, args.prefix,
                                                  suffix))
    write_atomic(args.ckpt, encode(layers))
    print("%s: %d BatchNorm layers" % (args.ckpt, len(layers)))


def show(args):
    # The same lines as `state_test --list`, so the two readers can be
    # compared.
    for L in read_file(args.ckpt):
        alen, slen = lengths(L)
        print("%s %s channels=%d affine=%d stats=%d groups=%d"
              % (L["name"], OPS[L["op"]], L["channels"], alen, slen,
                 len(L["groups_state"])))


# ----------------------------------------------------------------------
# Self-test

def check(args):
    try:
        import torch
    except ImportError as e:
        print("SKIP: %s cannot import torch (%s)" % (sys.executable, e))
        return 77
    me = [sys.executable, os.path.abspath(__file__)]
    work = tempfile.mkdtemp(prefix="sbn_state_torch.")
    failures = []

    def run(cmd, ok=True):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if ok and r.returncode != 0:
            raise AssertionError("%s failed (%d): %s%s" % (
                " ".join(cmd), r.returncode, r.stdout, r.stderr))
        if not ok and r.returncode == 0:
            raise AssertionError("%s succeeded, expected a failure"
                                 % " ".join(cmd))
        return r

    def expect(cond, what):
        if not cond:
            failures.append(what)
            print("FAIL: " + what)

    def same_bits(t, a):
        t = t.detach().contiguous().numpy()
        return (t.dtype == np.float32 and t.shape == a.shape
                and np.array_equal(t.view(np.uint32), a.view(np.uint32)))

    def p(name):
        return os.path.join(work, name)

    # 1. A file written by C -> state_dict -> file: the same bytes, and the
    # C loader sees the sample it wrote.
    run([args.tool, "--write-sample", work])
    run(me + ["to-torch", p("sample.sbn"), p("sample.pt")])
    sd = torch.load(p("sample.pt"))
    layers = read_file(p("sample.sbn"))
    want_keys = []
    for L in layers:
        n = L["name"]
        if L["weight"] is not None:
            want_keys += [n + ".weight", n + ".bias"]
            expect(same_bits(sd[n + ".weight"], L["weight"]), n + ".weight bits")
            expect(same_bits(sd[n + ".bias"], L["bias"]), n + ".bias bits")
        _, nbt, mean, var = L["groups_state"][0]
        want_keys += [n + ".running_mean", n + ".running_var",
                      n + ".num_batches_tracked"]
        expect(same_bits(sd[n + ".running_mean"], mean), n + " mean bits")
        expect(same_bits(sd[n + ".running_var"], var), n + " var bits")
        t = sd[n + ".num_batches_tracked"]
        expect(t.dtype == torch.long and t.dim() == 0 and int(t) == nbt,
               n + " num_batches_tracked")
    expect(sorted(sd.keys()) == sorted(want_keys),
           "state_dict keys %s" % sorted(sd.keys()))
    run(me + ["from-torch", p("sample.pt"), p("back.sbn")])
    with open(p("sample.sbn"), "rb") as f:
        a = f.read()
    with open(p("back.sbn"), "rb") as f:
        b = f.read()
    expect(a == b, "sample.sbn -> torch -> back.sbn is not byte-identical")
    run([args.tool, "--check-sample", p("back.sbn")])

    # 2. Both readers agree on a file with every layer kind and several
    # sync groups; exporting it needs --group, and a group that a layer
    # lacks (bn_noaffine holds only group 0) is an error naming the layer.
    c_list = run([args.tool, "--list", p("groups.sbn")]).stdout
    py_list = run(me + ["show", p("groups.sbn")]).stdout
    expect(c_list == py_list and c_list.count("\n") == 9,
           "C and Python list groups.sbn differently:\n%s---\n%s"
           % (c_list, py_list))
    r = run(me + ["to-torch", p("groups.sbn"), p("g.pt")], ok=False)
    expect("--group" in r.stderr, "no --group hint: " + r.stderr)
    r = run(me + ["to-torch", p("groups.sbn"), p("g.pt"), "--group", "1"],
            ok=False)
    expect("has no group 1" in r.stderr and "bn_" in r.stderr,
           "missing group not named: " + r.stderr)

    # A Python-written file with two groups per layer, read back by C.
    rng = np.random.default_rng(0)

    def bn(name, C, groups):
        return dict(name=name, op=BN, channels=C, groups=1, norm_ndim=0,
                    norm_shape=[0] * 8, eps=1e-5, momentum=0.1, cumulative=0,
                    affine=1, track=1, p=0.5, seed=0, layer_id=0,
                    group_size=2,
                    weight=rng.standard_normal(C).astype(np.float32),
                    bias=rng.standard_normal(C).astype(np.float32),
                    groups_state=[(g, 10 + g,
                                   rng.standard_normal(C).astype(np.float32),
                                   rng.random(C).astype(np.float32))
                                  for g in groups])
    two = [bn("a", 4, [0, 1]), bn("b", 2, [0, 1])]
    write_atomic(p("two.sbn"), encode(two))
    c_list = run([args.tool, "--list", p("two.sbn")]).stdout
    expect(c_list == "a batchnorm channels=4 affine=4 stats=4 groups=2\n"
           "b batchnorm channels=2 affine=2 stats=2 groups=2\n",
           "C lists two.sbn as:\n" + c_list)
    run(me + ["to-torch", p("two.sbn"), p("two.pt"), "--group", "1"])
    sd = torch.load(p("two.pt"))
    for L in two:
        _, nbt, mean, var = L["groups_state"][1]
        expect(same_bits(sd[L["name"] + ".running_mean"], mean)
               and same_bits(sd[L["name"] + ".running_var"], var)
               and int(sd[L["name"] + ".num_batches_tracked"]) == nbt,
               L["name"] + ": --group 1 exported the wrong statistics")

    # 3. A real model's state_dict (trained a few steps, saved the way a
    # DistributedDataParallel model saves it) -> checkpoint -> state_dict.
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 4, 1), torch.nn.BatchNorm2d(4, affine=False),
        torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 5),
        torch.nn.BatchNorm1d(5))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(6, 3, 8, 8)).square().mean().backward()
        opt.step()
    orig = {"module." + k: v for k, v in model.state_dict().items()}
    torch.save({"state_dict": orig, "epoch": 3}, p("model.pt"))
    run(me + ["from-torch", p("model.pt"), p("model.sbn"), "--prefix",
              "module."])
    c_list = run([args.tool, "--list", p("model.sbn")]).stdout
    expect(c_list == "1 batchnorm channels=8 affine=8 stats=8 groups=1\n"
           "4 batchnorm channels=4 affine=0 stats=4 groups=1\n"
           "7 batchnorm channels=5 affine=5 stats=5 groups=1\n",
           "C lists model.sbn as:\n" + c_list)
    run(me + ["to-torch", p("model.sbn"), p("model2.pt"), "--prefix",
              "module."])
    back = torch.load(p("model2.pt"))
    bn_keys = [k for k in orig if k.split(".")[1] in ("1", "4", "7")]
    expect(sorted(back.keys()) == sorted(bn_keys),
           "round-tripped keys %s" % sorted(back.keys()))
    for k in bn_keys:
        expect(k in back and back[k].dtype == orig[k].dtype
               and torch.equal(back[k], orig[k]), k + " changed")
    res = model.load_state_dict(
        {k[len("module."):]: v for k, v in back.items()}, strict=False)
    expect(not res.unexpected_keys and all(
        k.split(".")[0] in ("0", "3", "6") for k in res.missing_keys),
        "load_state_dict: %s" % (res,))

    # 4. Damaged files are refused with a reason.
    with open(p("sample.sbn"), "rb") as f:
        good = bytearray(f.read())
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0x10
    with open(p("bad.sbn"), "wb") as f:
        f.write(bad)
    r = run(me + ["to-torch", p("bad.sbn"), p("bad.pt")], ok=False)
    expect("checksum" in r.stderr, "bit flip: " + r.stderr)
    with open(p("short.sbn"), "wb") as f:
        f.write(good[:-7])
    r = run(me + ["to-torch", p("short.sbn"), p("bad.pt")], ok=False)
    expect("truncated" in r.stderr, "truncation: " + r.stderr)
    r = run(me + ["from-torch", p("model.pt"), p("none.sbn"), "--prefix",
                  "nothing."], ok=False)
    expect("no " in r.stderr and not os.path.exists(p("none.sbn")),
           "empty selection: " + r.stderr)

    if failures:
        print("%d check(s) failed; files kept in %s" % (len(failures), work))
        return 1
    for name in os.listdir(work):
        os.unlink(p(name))
    os.rmdir(work)
    print("state_torch.py check: all passed")
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(
        description="Convert syncbn checkpoints to and from PyTorch "
        "state_dicts.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("to-torch", help="checkpoint -> state_dict (.pt)")
    a.add_argument("ckpt")
    a.add_argument("out")
    a.add_argument("--prefix", default="", help="prepended to every key")
    a.add_argument("--group", type=int, default=None,
                   help="the sync group whose running statistics to export")
    a = sub.add_parser("from-torch", help="state_dict (.pt) -> checkpoint")
    a.add_argument("state_dict")
    a.add_argument("ckpt")
    a.add_argument("--prefix", default="",
                   help="only keys starting with this; removed from names")
    a.add_argument("--eps", type=float, default=1e-5)
    m = a.add_mutually_exclusive_group()
    m.add_argument("--momentum", type=float, default=0.1)
    m.add_argument("--cumulative", action="store_true",
                   help="the layers used momentum=None")
    a = sub.add_parser("show", help="one line per layer")
    a.add_argument("ckpt")
    a = sub.add_parser("check", help="self-test (used by ctest)")
    a.add_argument("--tool", required=True,
                   help="the state_test program (C side of the round trip)")
    args = ap.parse_args(argv)
    if np is None:
        if args.cmd == "check":
            print("SKIP: %s cannot import numpy (%s)"
                  % (sys.executable, NUMPY_ERROR))
            return 77
        print("state_torch.py: error: %s cannot import numpy (%s)"
              % (sys.executable, NUMPY_ERROR), file=sys.stderr)
        return 1
    try:
        if args.cmd == "to-torch":
            to_torch(args)
        elif args.cmd == "from-torch":
            from_torch(args)
        elif args.cmd == "show":
            show(args)
        else:
            return check(args)
    except (FormatError, OSError) as e:
        print("state_torch.py: error: %s" % e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
