#!/usr/bin/python3
"""A Python client for the syncbnd service (mpi/service/PROTOCOL.md,
protocol version 6).

Needs msgpack and numpy (Debian: python3-msgpack python3-numpy).

    c = SyncbnClient()       # $SYNCBN_SOCKET, as the launcher sets it
    c = SyncbnClient("/tmp/sbn/rank-0.sock")
    c = SyncbnClient(tcp="127.0.0.1:7000", token=b"...")
    c.hello()
    lid = c.register("bn1", "batchnorm", channels=8)
    y = c.forward(lid, step=0, train=True, x=x)
    dx, dw, db = c.backward(lid, step=0, dy=dy)
    c.bye()
"""
import array
import fcntl
import mmap
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

# Run as a script (the self-test), this file's directory comes first on
# sys.path, where syncbn/torch.py would hide the real torch: the package's
# parent directory replaces it.
_HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0] or ".") == _HERE:
    sys.path[0] = os.path.dirname(_HERE)
from syncbn._connect import ConnectError, open_socket  # noqa: E402,F401

try:
    import msgpack
    import numpy as np
except ImportError as e:  # the self-test reports it as a skip
    MISSING = str(e)
else:
    MISSING = None


class SyncbnError(Exception):
    """An error reply: .code is the stable code, .message the text."""

    def __init__(self, code, message):
        super().__init__("%s: %s" % (code, message))
        self.code = code
        self.message = message


def encode_tensor(a, layout="nchw"):
    """a is in memory order; for nhwc that is (N, d1.., C), and the
    protocol's shape is the logical (N, C, d1..)."""
    a = np.ascontiguousarray(a, dtype="<f4")
    shape = _logical_shape(a.shape, layout)
    return {"dtype": "f32", "shape": shape, "data": a.tobytes(),
            "layout": layout}


def decode_tensor(t):
    """Returns the array in memory order (channels last for nhwc); f64
    tensors (the stats replies) come back as float64."""
    dt = {"f32": "<f4", "f64": "<f8"}.get(t.get("dtype"))
    if dt is None:
        raise SyncbnError("BAD_TENSOR", "reply tensor dtype %r" % t.get("dtype"))
    shape = [int(d) for d in t["shape"]]
    if t.get("layout", "nchw") == "nhwc":
        shape = [shape[0]] + shape[2:] + [shape[1]]
    return np.frombuffer(t["data"], dtype=dt).reshape(shape).copy()


def encode_vec64(v):
    """A 1-D float64 tensor (stats and stats_backward inputs)."""
    v = np.ascontiguousarray(np.ravel(v), dtype="<f8")
    return {"dtype": "f64", "shape": [int(v.size)], "data": v.tobytes()}


def decode_vec64(t):
    return decode_tensor(t)


def _logical_shape(shape, layout):
    shape = [int(d) for d in shape]
    if layout == "nhwc":
        shape = [shape[0], shape[-1]] + shape[1:-1]
    return shape


def _shm_tensor(shape, layout, region, offset):
    return {"dtype": "f32", "shape": _logical_shape(shape, layout),
            "layout": layout, "region": int(region), "offset": int(offset)}


class ShmRegion:
    """A shared-memory region: .mm the local mapping, .region the id the
    worker gave it. The worker keeps its mapping until the connection
    closes."""

    def __init__(self, mm, size, region):
        self.mm, self.size, self.region = mm, size, region

    def array(self, offset, shape):
        """A float32 numpy view of the region at byte offset."""
        return np.ndarray(shape, dtype="<f4", buffer=self.mm, offset=offset)


class SyncbnClient:
    """One connection to a worker. path: its Unix socket (default
    $SYNCBN_SOCKET; a directory means rank-<r>.sock in it); tcp:
    "HOST:PORT" instead, with token (bytes or str) or token_file, sent by
    hello() as TCP requires. timeout bounds each socket operation; wait is
    how long to retry a worker that is not listening yet before
    ConnectError names the address."""

    PROTOCOL = 6

    def __init__(self, path=None, timeout=60.0, tcp=None, token=None,
                 token_file=None, wait=30.0):
        if token_file is not None:
            with open(token_file, "rb") as f:
                token = f.read()
            if token.endswith(b"\n"):
                token = token[:-1]
        self.token = token
        self.sock = open_socket(path, tcp, timeout, wait)
        self.next_id = 1
        self.info = None
        if tcp is not None:
            self.hello()

    def _recv_exact(self, n):
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("syncbnd closed the connection")
            buf += chunk
        return bytes(buf)

    def call(self, op, **keys):
        """Sends one request and returns its reply; raises SyncbnError."""
        return self._call_fd(op, None, **keys)

    def _call_fd(self, op, fd, **keys):
        """call(), with the descriptor fd (if not None) passed with
        SCM_RIGHTS on the frame's bytes (shm_attach)."""
        rid, frame = self._frame(op, keys)
        if fd is not None:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                    array.array("i", [fd]).tobytes())]
            sent = self.sock.sendmsg([frame], anc)
            frame = frame[sent:]
        self.sock.sendall(frame)
        return self._reply(rid)

    def calls(self, requests):
        """Pipelines requests, a list of (op, keys) pairs: sends them all in
        one write, then reads their replies, which come in order (a request
        waits behind a deferred one, so a get_state sent behind a
        syncbatchnorm forward sees the statistics that forward moved).
        Returns the replies; after reading them all, raises the first
        error reply as SyncbnError."""
        sent = [self._frame(op, keys) for op, keys in requests]
        self.sock.sendall(b"".join(f for _, f in sent))
        out, err = [], None
        for rid, _ in sent:
            try:
                out.append(self._reply(rid))
            except SyncbnError as e:
                err = err or e
                out.append(None)
        if err is not None:
            raise err
        return out

    def _frame(self, op, keys):
        rid = self.next_id
        self.next_id += 1
        body = msgpack.packb(dict(keys, op=op, id=rid), use_bin_type=True)
        return rid, struct.pack(">I", len(body)) + body

    def _reply(self, rid):
        n = struct.unpack(">I", self._recv_exact(4))[0]
        reply = msgpack.unpackb(self._recv_exact(n), raw=False)
        if "error" in reply:
            e = reply["error"]
            raise SyncbnError(e.get("code"), e.get("message"))
        if reply.get("id") != rid:
            raise SyncbnError("INTERNAL", "reply id %r for request %d" % (reply.get("id"), rid))
        return reply

    def hello(self):
        """The worker's rank, size and protocol (also kept in .info)."""
        keys = {"version": self.PROTOCOL}
        if self.token is not None:
            keys["token"] = self.token
        self.info = self.call("hello", **keys)
        return self.info

    def register(self, name, kind, ghost_batch=None, **params):
        """Registers a layer; params are the register keys of PROTOCOL.md.
        ghost_batch=g (batchnorm and syncbatchnorm, protocol >= 4)
        normalizes each run of g consecutive samples with its own
        statistics; None or 0 leaves ghost batches off."""
        if ghost_batch:
            params["ghost_batch"] = int(ghost_batch)
        r = self.call("register", name=name, kind=kind, **params)
        return int(r["layer"])

    def forward(self, layer, step, train, x, weight=None, bias=None, layout="nchw"):
        keys = {"layer": layer, "step": step, "train": bool(train),
                "x": encode_tensor(x, layout)}
        if weight is not None:
            keys["weight"] = encode_tensor(np.ravel(weight))
            keys["bias"] = encode_tensor(np.ravel(bias))
        return decode_tensor(self.call("forward", **keys)["y"])

    def backward(self, layer, step, dy, layout="nchw"):
        """Returns (dx, dweight, dbias); the last two are None if not affine."""
        r = self.call("backward", layer=layer, step=step, dy=encode_tensor(dy, layout))
        dw = decode_tensor(r["dweight"]) if "dweight" in r else None
        db = decode_tensor(r["dbias"]) if "dbias" in r else None
        return decode_tensor(r["dx"]), dw, db

    # Zero-copy shared memory (protocol 6, Unix socket only): a sealed
    # memfd mapped here and in the worker; forwards and backwards name
    # tensors by byte offset in it, and the socket carries no tensor bytes.
    def shm_attach(self, size):
        """Creates, seals and hands over a region of size bytes; returns a
        ShmRegion whose .array(offset, shape) views it as float32."""
        fd = os.memfd_create("syncbn-shm", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK |
                        fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            mm = mmap.mmap(fd, size)
            r = self._call_fd("shm_attach", fd, size=size)
        finally:
            os.close(fd)
        return ShmRegion(mm, size, int(r["region"]))

    def shm_attach_fd(self, fd, size):
        """Hands over a descriptor made by the caller, as it is (the worker
        checks seals and size); returns the region id."""
        return int(self._call_fd("shm_attach", fd, size=size)["region"])

    def shm_forward(self, layer, step, train, region, x_off, y_off, shape,
                    layout="nchw", x_stays=False):
        """x is read at x_off of the region, y written at y_off; shape is
        in memory order as for forward(). x_stays=True promises that x
        stays unchanged at x_off until this step's backward: a training
        forward then keeps a reference to it instead of a copy
        (PROTOCOL.md, "Shared memory")."""
        extra = {"x_stays": True} if x_stays else {}
        self.call("forward", layer=layer, step=step, train=bool(train),
                  x=_shm_tensor(shape, layout, region, x_off),
                  y_at={"region": region, "offset": y_off}, **extra)

    def shm_backward(self, layer, step, region, dy_off, dx_off, shape,
                     layout="nchw"):
        """dy at dy_off, dx written at dx_off; returns (dweight, dbias)."""
        r = self.call("backward", layer=layer, step=step,
                      dy=_shm_tensor(shape, layout, region, dy_off),
                      dx_at={"region": region, "offset": dx_off})
        dw = decode_tensor(r["dweight"]) if "dweight" in r else None
        db = decode_tensor(r["dbias"]) if "dbias" in r else None
        return dw, db

    # State, metrics, batches and checkpoints. get_state returns the keys
    # the worker sent: kind, running_mean/running_var (absent without
    # running statistics), weight/bias (absent when not affine) as float32
    # arrays, num_batches_tracked as an int. set_state sends only the keys
    # given (tensors in the shapes get_state returns).
    _STATE_TENSORS = ("running_mean", "running_var", "weight", "bias")

    def get_state(self, layer):
        r = self.call("get_state", layer=layer)
        out = {k: decode_tensor(r[k]) for k in self._STATE_TENSORS if k in r}
        if "kind" in r:
            out["kind"] = r["kind"]
        if "num_batches_tracked" in r:
            out["num_batches_tracked"] = int(r["num_batches_tracked"])
        return out

    def set_state(self, layer, **state):
        keys = {"layer": layer}
        for k, v in state.items():
            if k in self._STATE_TENSORS:
                # The worker wants the parameter's shape (normalized_shape
                # for LayerNorm), as get_state returns it.
                keys[k] = encode_tensor(v)
            elif k == "num_batches_tracked":
                keys[k] = int(v)
            else:
                raise TypeError("set_state: unknown key %r" % k)
        self.call("set_state", **keys)

    def metrics(self):
        """The worker's counters, as the dict it sent (without the id)."""
        r = self.call("metrics")
        r.pop("id", None)
        return r

    def forward_request(self, layer, step, train, x, weight=None, bias=None,
                        layout="nchw"):
        """A forward sub-request for batch()."""
        keys = {"op": "forward", "layer": layer, "step": step,
                "train": bool(train), "x": encode_tensor(x, layout)}
        if weight is not None:
            keys["weight"] = encode_tensor(np.ravel(weight))
            keys["bias"] = encode_tensor(np.ravel(bias))
        return keys

    def backward_request(self, layer, step, dy, layout="nchw"):
        """A backward sub-request for batch()."""
        return {"op": "backward", "layer": layer, "step": step,
                "dy": encode_tensor(dy, layout)}

    def batch(self, subs):
        """Sends sub-requests (forward_request/backward_request maps) as one
        `batch` request. Returns one item per sub-request, in order: a dict
        with the decoded tensors (y; dx, dweight, dbias) or a SyncbnError
        (a failed sub-request does not fail the others)."""
        reqs = []
        for s in subs:
            reqs.append(dict(s, id=self.next_id))
            self.next_id += 1
        r = self.call("batch", requests=reqs)
        replies = r.get("replies")
        if not isinstance(replies, list) or len(replies) != len(reqs):
            raise SyncbnError("INTERNAL", "batch: %d replies for %d requests"
                              % (len(replies or []), len(reqs)))
        out = []
        for q, a in zip(reqs, replies):
            if "error" in a:
                out.append(SyncbnError(a["error"].get("code"),
                                       a["error"].get("message")))
            elif a.get("id") != q["id"]:
                raise SyncbnError("INTERNAL", "batch: reply id %r for %d"
                                  % (a.get("id"), q["id"]))
            else:
                out.append({k: decode_tensor(v) for k, v in a.items()
                            if isinstance(v, dict) and "dtype" in v})
        return out

    def checkpoint_save(self, name):
        """Collective: every rank's client must send it. Returns the reply
        ({name, layers, saved})."""
        return self.call("checkpoint_save", name=name)

    def checkpoint_load(self, name):
        """Collective: every rank's client must send it. Returns the reply
        ({name, layers, loaded})."""
        return self.call("checkpoint_load", name=name)

    def bye(self):
        try:
            self.call("bye")
        finally:
            self.sock.close()


# ---------------------------------------------------------------- self-test
#
# python3 src/python/syncbn/client.py --mpirun MPIRUN --syncbnd SYNCBND --syncbn SYNCBN
# starts `mpirun -np 1 syncbnd` in a fresh socket directory, waits for its
# ready line, runs layers through this client, compares every output with
# `syncbn apply` (the C library) on the same .npy inputs, and stops the job.
# Exit 77 (skip) when msgpack or numpy is missing.


def _apply(syncbn, d, op, x, dy, w, b, extra):
    for n, a in (("x", x), ("dy", dy), ("w", w), ("b", b)):
        np.save(os.path.join(d, n + ".npy"), a)
    out = os.path.join(d, "out-" + op)
    subprocess.run([syncbn, "apply", "--op", op, "--x", d + "/x.npy", "--dy",
                    d + "/dy.npy", "--weight", d + "/w.npy", "--bias",
                    d + "/b.npy", "--out-dir", out] + extra, check=True,
                   capture_output=True, timeout=30)
    return {k: np.load(os.path.join(out, k + ".npy"))
            for k in ("y", "dx", "dweight", "dbias")}


def _rel(a, b):
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _shm_selftest(c):
    """Protocol 6: a batchnorm step through a region equals the socket
    path bit for bit; an unsealed memfd and an out-of-range offset are
    refused and the connection goes on."""
    bad = 0
    rng = np.random.default_rng(11)
    shape = (4, 3, 5)
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    a = c.register("shm_a", "batchnorm", channels=3)
    b = c.register("shm_b", "batchnorm", channels=3)
    m = c.shm_attach(1 << 16)
    m.array(0, shape)[...] = x
    m.array(4096, shape)[...] = dy
    c.shm_forward(a, 0, True, m.region, 0, 8192, shape)
    dw, db = c.shm_backward(a, 0, m.region, 4096, 12288, shape)
    y = c.forward(b, 0, True, x)
    dx, dw2, db2 = c.backward(b, 0, dy)
    same = (np.array_equal(m.array(8192, shape), y) and
            np.array_equal(m.array(12288, shape), dx) and
            np.array_equal(dw, dw2) and np.array_equal(db, db2))
    print("shm batchnorm bit for bit: %s" % ("ok" if same else "FAIL"))
    bad += not same
    # x_stays: the step keeps x where it is (16384) until its backward.
    k = c.register("shm_k", "batchnorm", channels=3)
    m.array(16384, shape)[...] = x
    copies = c.metrics().get("tensor_copies")
    c.shm_forward(k, 0, True, m.region, 16384, 20480, shape, x_stays=True)
    dwk, dbk = c.shm_backward(k, 0, m.region, 4096, 24576, shape)
    same = (c.metrics().get("tensor_copies") == copies and
            np.array_equal(m.array(20480, shape), y) and
            np.array_equal(m.array(24576, shape), dx) and
            np.array_equal(dwk, dw2) and np.array_equal(dbk, db2))
    print("shm x_stays bit for bit: %s" % ("ok" if same else "FAIL"))
    bad += not same
    fd = os.memfd_create("unsealed", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 4096)
    for what, fn, code in (
            ("unsealed memfd", lambda: c.shm_attach_fd(fd, 4096), "BAD_PARAMS"),
            ("offset past the end", lambda: c.shm_forward(
                a, 1, True, m.region, (1 << 16) - 8, 8192, shape), "BAD_TENSOR"),
            ("overlapping output", lambda: c.shm_forward(
                a, 1, True, m.region, 0, 4, shape), "BAD_TENSOR")):
        try:
            fn()
            print("shm %s accepted: FAIL" % what)
            bad += 1
        except SyncbnError as e:
            print("shm %s: %s" % (what, e.code))
            bad += e.code != code
    os.close(fd)
    return bad


def _selftest(mpirun, syncbnd, syncbn):
    d = tempfile.mkdtemp(prefix="sbn-py-")
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    job = subprocess.Popen([mpirun, "--oversubscribe", "--bind-to", "none",
                            "--timeout", "50", "--mca", "pml", "ob1", "--mca",
                            "btl", "self,vader,tcp", "-np", "1", syncbnd,
                            "--socket-dir", d + "/s"], stdout=subprocess.PIPE,
                           env=env, text=True, start_new_session=True)
    bad = 0
    try:
        line = job.stdout.readline()
        print(line.strip())
        if "ready on" not in line:
            print("syncbnd did not get ready")
            return 1
        c = SyncbnClient(line.strip().split("ready on ", 1)[1])
        h = c.hello()
        # The worker answers with the newest protocol it speaks; version 1
        # requests stay valid in later versions.
        print("hello: protocol %s, rank %s of %s" % (h["protocol"], h["rank"], h["size"]))
        assert h["protocol"] >= 1 and h["rank"] == 0 and h["size"] == 1, h
        rng = np.random.default_rng(7)
        cases = [
            ("batchnorm", dict(channels=3), (4, 3, 5), "nchw", ["--momentum", "0.1"]),
            ("batchnorm", dict(channels=4), (3, 2, 5, 4), "nhwc", ["--layout", "nhwc"]),
            ("groupnorm", dict(channels=6, groups=3), (2, 6, 7), "nchw", ["--groups", "3"]),
            ("layernorm", dict(normalized_shape=[5]), (4, 3, 5), "nchw", ["--norm-dims", "1"]),
            ("instancenorm", dict(channels=3), (2, 3, 9), "nchw", []),
        ]
        for i, (kind, params, shape, layout, extra) in enumerate(cases):
            x = (rng.standard_normal(shape) * 2 + 1e4 * (i == 0)).astype(np.float32)
            dy = rng.standard_normal(shape).astype(np.float32)
            ps = params.get("normalized_shape") or [params["channels"]]
            w = rng.normal(1, 0.3, ps).astype(np.float32)
            b = rng.normal(0, 1, ps).astype(np.float32)
            lid = c.register("t%d" % i, kind, **params)
            assert c.register("t%d" % i, kind, **params) == lid
            y = c.forward(lid, 0, True, x, w, b, layout)
            dx, dw, db = c.backward(lid, 0, dy, layout)
            ref = _apply(syncbn, d, kind, x, dy, w, b, extra)
            errs = [_rel(y, ref["y"]), _rel(dx, ref["dx"]),
                    _rel(dw, ref["dweight"]), _rel(db, ref["dbias"])]
            ok = max(errs[0], errs[3]) <= 1e-5 and max(errs[1], errs[2]) <= 1e-4
            bad += not ok
            print("%-12s %-4s %s y %.1e dx %.1e dw %.1e db %.1e %s" % (
                kind, layout, "x".join(map(str, shape)), *errs, "ok" if ok else "FAIL"))
        bad += _shm_selftest(c)
        try:  # an error reply keeps the connection usable
            c.backward(0, 99, np.zeros((4, 3, 5), np.float32))
            print("backward without forward succeeded: FAIL")
            bad += 1
        except SyncbnError as e:
            print("expected error: %s" % e.code)
            bad += e.code != "NO_FORWARD"
        c.bye()
        try:
            import torch  # noqa: F401
        except ImportError:
            print("torch missing: the torch example is not run")
        else:
            here = os.path.dirname(os.path.abspath(__file__))
            sys.path.insert(0, os.path.join(here, "..", "..", "..", "examples",
                                            "python"))
            import torch_example
            c = SyncbnClient(line.strip().split("ready on ", 1)[1])
            for kind in ("batchnorm", "groupnorm", "layernorm"):
                e = torch_example.run(kind, c)
                print("torch %-10s %.2e %s" % (kind, e, "ok" if e <= 1e-5 else "FAIL"))
                bad += e > 1e-5
            c.bye()
    finally:
        os.killpg(job.pid, signal.SIGTERM)
        try:
            job.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
        shutil.rmtree(d, ignore_errors=True)
    print("%s" % ("FAILED" if bad else "all ok"))
    return 1 if bad else 0


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="syncbnd client self-test")
    ap.add_argument("--mpirun", default="mpirun")
    ap.add_argument("--syncbnd", required=True)
    ap.add_argument("--syncbn", required=True)
    a = ap.parse_args()
    if MISSING:
        print("SKIP: %s (install python3-msgpack python3-numpy)" % MISSING)
        sys.exit(77)
    sys.exit(_selftest(a.mpirun, a.syncbnd, a.syncbn))
