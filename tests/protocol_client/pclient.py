"""A minimal syncbnd client written from mpi/service/PROTOCOL.md alone.

It was written without looking at the project's own clients or the server
code, to show that the protocol document is enough to talk to `syncbnd`.
It needs only msgpack and numpy.

    c = Client("/path/to/rank-0.sock")
    c.hello()
    lid = c.register("bn1", "syncbatchnorm", channels=4)
    y = c.forward(lid, step=0, train=True, x=x, weight=w, bias=b)
    dx, dw, db = c.backward(lid, step=0, dy=dy)
    st = c.get_state(lid)       # running_mean, running_var, ...
    c.bye()

Tensors are numpy arrays in memory order; for channels-last BatchNorm pass
the (N, d1..dk, C) array with layout="nhwc". Error replies raise
ProtocolError, whose `code` is the stable error code of the document.
"""
import socket
import struct

import msgpack
import numpy as np

# The version this client speaks: 3 (syncbatchnorm training is 2, get_state 3).
PROTOCOL_VERSION = 3


class ProtocolError(Exception):
    """An error reply: `code` is stable, `message` is for people."""

    def __init__(self, code, message, req_id=None):
        super().__init__("%s: %s" % (code, message))
        self.code = code
        self.message = message
        self.req_id = req_id


class ConnectionClosed(Exception):
    """The worker closed the connection before a whole reply arrived."""


def encode_tensor(a, layout=None):
    """A float32 tensor map: the array's shape and its bytes in C order.

    For layout "nhwc" the array is given in memory order (N, d1..dk, C); the
    protocol's `shape` is the logical (N, C, d1..dk), so the channel axis is
    moved to position 1 in `shape` while `data` keeps the memory order.
    """
    a = np.ascontiguousarray(a, dtype="<f4")
    mem_shape = list(a.shape)
    if layout == "nhwc":
        if len(mem_shape) < 2:
            raise ValueError("nhwc needs at least 2 dims")
        shape = [mem_shape[0], mem_shape[-1]] + mem_shape[1:-1]
    else:
        shape = mem_shape
    t = {"dtype": "f32", "shape": [int(d) for d in shape], "data": a.tobytes()}
    if layout is not None:
        t["layout"] = layout
    return t


def decode_tensor(t):
    """Returns (array in memory order, layout) from a tensor map."""
    if not isinstance(t, dict):
        raise ValueError("tensor is not a map: %r" % type(t))
    if t.get("dtype") != "f32":
        raise ValueError("unexpected dtype %r" % t.get("dtype"))
    shape = [int(d) for d in t["shape"]]
    layout = t.get("layout", "nchw")
    if layout == "nhwc":
        mem_shape = [shape[0]] + shape[2:] + [shape[1]]
    elif layout == "nchw":
        mem_shape = shape
    else:
        raise ValueError("unexpected layout %r" % layout)
    data = t["data"]
    n = int(np.prod(mem_shape, dtype=np.int64))
    if len(data) != 4 * n:
        raise ValueError("tensor data is %d bytes, shape %s needs %d" %
                         (len(data), shape, 4 * n))
    a = np.frombuffer(data, dtype="<f4").reshape(mem_shape).copy()
    return a, layout


class Client:
    """One connection to one worker. Not thread-safe: use one per thread."""

    def __init__(self, path, timeout=60.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except BaseException:
            self.sock.close()
            raise
        self.next_id = 1

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------ framing

    def _recv_exact(self, n):
        """Reads exactly n bytes; short reads are retried, EOF raises."""
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionClosed("worker closed the connection after "
                                       "%d of %d bytes" % (len(buf), n))
            buf += chunk
        return bytes(buf)

    def send_frame(self, body):
        self.sock.sendall(struct.pack(">I", len(body)) + body)

    def recv_frame(self):
        (n,) = struct.unpack(">I", self._recv_exact(4))
        return self._recv_exact(n)

    def call(self, op, **keys):
        """Sends one request and returns its reply map, or raises."""
        req_id = self.next_id
        self.next_id += 1
        req = {"op": op, "id": req_id}
        req.update(keys)
        self.send_frame(msgpack.packb(req, use_bin_type=True))
        rep = msgpack.unpackb(self.recv_frame(), raw=False,
                              strict_map_key=False)
        if not isinstance(rep, dict):
            raise ValueError("reply is not a map")
        if "error" in rep:
            err = rep["error"]
            raise ProtocolError(err.get("code"), err.get("message"),
                                rep.get("id"))
        if rep.get("id") != req_id:
            raise ValueError("reply id %r for request %d" % (rep.get("id"),
                                                             req_id))
        return rep

    # ------------------------------------------------------------ ops

    def hello(self, version=PROTOCOL_VERSION):
        return self.call("hello", version=version)

    def register(self, name, kind, **params):
        """Returns the layer id; params are the document's register keys
        (channels, eps, momentum (None = cumulative), affine, ...)."""
        rep = self.call("register", name=name, kind=kind, **params)
        return int(rep["layer"])

    def forward(self, layer, step, train, x, layout=None, weight=None,
                bias=None):
        keys = {"layer": layer, "step": step, "train": bool(train),
                "x": encode_tensor(x, layout)}
        if weight is not None:
            keys["weight"] = encode_tensor(weight)
        if bias is not None:
            keys["bias"] = encode_tensor(bias)
        rep = self.call("forward", **keys)
        y, y_layout = decode_tensor(rep["y"])
        if y_layout != (layout or "nchw"):
            raise ValueError("y came back in layout %s" % y_layout)
        return y

    def backward(self, layer, step, dy, layout=None):
        """Returns (dx, dweight, dbias); the last two are None when the
        layer is not affine."""
        rep = self.call("backward", layer=layer, step=step,
                        dy=encode_tensor(dy, layout))
        dx, dx_layout = decode_tensor(rep["dx"])
        if dx_layout != (layout or "nchw"):
            raise ValueError("dx came back in layout %s" % dx_layout)
        dw = decode_tensor(rep["dweight"])[0] if "dweight" in rep else None
        db = decode_tensor(rep["dbias"])[0] if "dbias" in rep else None
        return dx, dw, db

    def get_state(self, layer):
        """The layer's kept state: a dict with `kind` and, where the layer
        keeps them, numpy arrays running_mean, running_var, weight, bias
        and the int num_batches_tracked."""
        rep = self.call("get_state", layer=layer)
        out = {"kind": rep["kind"]}
        for k in ("running_mean", "running_var", "weight", "bias"):
            if k in rep:
                out[k] = decode_tensor(rep[k])[0]
        if "num_batches_tracked" in rep:
            out["num_batches_tracked"] = int(rep["num_batches_tracked"])
        return out

    def bye(self):
        """Says goodbye and waits for the worker to close the connection."""
        self.call("bye")
        try:
            rest = self.sock.recv(1)
        except OSError:
            rest = b""
        self.close()
        if rest:
            raise ValueError("bytes after the reply to bye")
