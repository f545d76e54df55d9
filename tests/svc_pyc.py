#!/usr/bin/python3
"""Python client == C client, bit for bit.

    svc_pyc.py --mpirun MPIRUN --syncbnd SYNCBND --driver SVC_PYC_DRIVER

tests/svc_pyc_driver.c runs a fixed script (one layer of each kind:
batchnorm NCHW and NHWC, layernorm, groupnorm, instancenorm, dropout,
syncbatchnorm; three training steps with forward and backward, one eval
forward) through the C client library and writes its inputs and outputs
as raw float32 files. This test replays the same script with the same
inputs through src/python/syncbn/client.py and requires every output
to be byte-identical, twice: one request at a time, and with each step's
forwards (then backwards) of all layers in one `batch` request. After the
first replay every layer's `get_state` is copied into a fresh layer with
`set_state`, must read back bit for bit, and the copy's eval forward must
equal the C driver's; `metrics` must count the forwards and backwards.

Each client gets a fresh `mpirun -np 1 syncbnd`: Dropout's mask counter
holds the worker-assigned layer id (PROTOCOL.md, `register`), so two
clients sharing one worker would get different ids and different masks.
With a fresh worker each, the same registration order gives the same ids
(the layer names still differ: PREFIX.<case>). Exit 77 (skip) without
msgpack or numpy.
"""
import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src", "python"))
from syncbn.client import MISSING, SyncbnClient, SyncbnError  # noqa: E402

if not MISSING:
    import numpy as np

TRAIN_STEPS = 3

# The same table as pyc_cases in svc_pyc_driver.c: kind, logical shape,
# layout, register parameters, number of affine parameters.
CASES = [
    ("batchnorm", (4, 3, 5), "nchw", dict(channels=3, eps=1e-5, momentum=0.1,
                                          affine=True, track_running_stats=True), 3),
    ("batchnorm", (3, 4, 2, 5), "nhwc", dict(channels=4, eps=1e-5, momentum=None,
                                             affine=True, track_running_stats=True), 4),
    ("layernorm", (4, 3, 5), "nchw", dict(normalized_shape=[3, 5], eps=1e-5,
                                          affine=True), 15),
    ("groupnorm", (2, 6, 7), "nchw", dict(channels=6, groups=3, eps=1e-5,
                                          affine=True), 6),
    ("instancenorm", (2, 3, 9), "nchw", dict(channels=3, eps=1e-5, momentum=0.1,
                                             affine=True, track_running_stats=True), 3),
    ("dropout", (4, 3, 5), "nchw", dict(p=0.3, seed=11), 0),
    ("syncbatchnorm", (5, 4, 3), "nchw", dict(channels=4, eps=1e-5, momentum=0.1,
                                              affine=True, track_running_stats=True,
                                              group_size=0), 4),
    ("batchnorm", (7, 3, 4), "nchw", dict(channels=3, eps=1e-5, momentum=0.1,
                                          affine=True, track_running_stats=True,
                                          ghost_batch=3), 3),
    ("syncbatchnorm", (6, 4, 2, 2), "nhwc", dict(channels=4, eps=1e-5,
                                                 momentum=0.1, affine=True,
                                                 track_running_stats=True,
                                                 group_size=0, ghost_batch=2), 4),
]


def start_job(mpirun, syncbnd, sockdir):
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    job = subprocess.Popen([mpirun, "--oversubscribe", "--bind-to", "none",
                            "--timeout", "50", "--mca", "pml", "ob1", "--mca",
                            "btl", "self,vader,tcp", "-np", "1", syncbnd,
                            "--socket-dir", sockdir], stdout=subprocess.PIPE,
                           env=env, text=True, start_new_session=True)
    line = job.stdout.readline()
    if "ready on" not in line:
        stop_job(job)
        raise RuntimeError("syncbnd did not get ready: %r" % line)
    return job, line.strip().split("ready on ", 1)[1]


def stop_job(job):
    try:
        os.killpg(job.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        job.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()


def memory_shape(shape, layout):
    return (shape[0],) + tuple(shape[2:]) + (shape[1],) if layout == "nhwc" else shape


def load_inputs(indir, cs, step, mshape, wb):
    def load(name, shape):
        a = np.fromfile(os.path.join(indir, "in-%d-s%d-%s.f32" % (cs, step, name)),
                        dtype="<f4")
        return a.reshape(shape)
    return load("x", mshape), load("dy", mshape), load("w", (wb,)), load("b", (wb,))


def f32(a):
    return b"" if a is None else np.asarray(a, "<f4").tobytes()


def run_python(c, indir, prefix, use_batch):
    """Replays the driver's script through client c, one request at a time,
    or (use_batch) with each step's forwards of all layers in one `batch`
    request and then their backwards in another (the same per-layer
    sequence, so the same results); returns ({file name: bytes},
    [layer ids])."""
    out, layers = {}, []
    for cs, (kind, shape, layout, params, wb) in enumerate(CASES):
        layers.append(c.register("%s.%d" % (prefix, cs), kind, **params))
    for step in range(TRAIN_STEPS + 1):
        train = step < TRAIN_STEPS
        fwd, bwd = [], []
        for cs, (kind, shape, layout, params, wb) in enumerate(CASES):
            given = wb > 0 and step != 1
            x, dy, w, b = load_inputs(indir, cs, step, memory_shape(shape, layout), wb)
            w, b = (w, b) if given else (None, None)
            fwd.append((cs, (layers[cs], step, train, x, w, b, layout)))
            bwd.append((cs, (layers[cs], step, dy, layout)))
        if not use_batch:
            # Forward then backward of each layer, as the C driver does.
            for (cs, fa), (_, ba) in zip(fwd, bwd):
                out["out-%d-s%d-y.f32" % (cs, step)] = f32(c.forward(*fa))
                if train:
                    dx, dw, db = c.backward(*ba)
                    out["out-%d-s%d-dx.f32" % (cs, step)] = f32(dx)
                    out["out-%d-s%d-dw.f32" % (cs, step)] = f32(dw)
                    out["out-%d-s%d-db.f32" % (cs, step)] = f32(db)
            continue
        for (cs, _), r in zip(fwd, c.batch([c.forward_request(*fa) for _, fa in fwd])):
            if isinstance(r, SyncbnError):
                raise r
            out["out-%d-s%d-y.f32" % (cs, step)] = f32(r["y"])
        if not train:
            continue
        for (cs, _), r in zip(bwd, c.batch([c.backward_request(*ba) for _, ba in bwd])):
            if isinstance(r, SyncbnError):
                raise r
            out["out-%d-s%d-dx.f32" % (cs, step)] = f32(r["dx"])
            out["out-%d-s%d-dw.f32" % (cs, step)] = f32(r.get("dweight"))
            out["out-%d-s%d-db.f32" % (cs, step)] = f32(r.get("dbias"))
    return out, layers


def compare(cdir, py, what):
    """Number of output files of the C driver that py does not reproduce
    byte for byte (a missing or extra file counts too)."""
    cfiles = sorted(f for f in os.listdir(cdir) if f.startswith("out-"))
    bad = 0
    if cfiles != sorted(py):
        print("FAIL: %s: output sets differ: C only %s, Python only %s" % (
            what, sorted(set(cfiles) - set(py)), sorted(set(py) - set(cfiles))))
        bad += 1
    nbytes = 0
    for f in cfiles:
        with open(os.path.join(cdir, f), "rb") as fh:
            cb = fh.read()
        pb = py.get(f)
        if pb is None:
            continue
        nbytes += len(cb)
        if cb != pb:
            ca, pa = np.frombuffer(cb, "<f4"), np.frombuffer(pb, "<f4")
            diff = (int(np.count_nonzero(ca.view("<u4") != pa.view("<u4")))
                    if ca.shape == pa.shape else "shape %s vs %s" % (ca.shape, pa.shape))
            print("FAIL: %s: %s differs (%s elements)" % (what, f, diff))
            bad += 1
    kinds = ", ".join(sorted(set(k for k, *_ in CASES)))
    print("%s: %d output files (%d bytes) from %d layers (%s): %s" % (
        what, len(cfiles), nbytes, len(CASES), kinds,
        "bit-identical to the C client" if not bad else "%d differ" % bad), flush=True)
    return bad


def check_state(c, cdir, layers, prefix):
    """get_state/set_state round trip: every layer's state copied into a
    fresh layer reads back bit for bit, and the copy's eval forward equals
    the C driver's eval output of the original. Also the metrics counters
    of this worker's forward and backward requests."""
    bad = 0
    for cs, (kind, shape, layout, params, wb) in enumerate(CASES):
        st = c.get_state(layers[cs])
        copy = c.register("%s.copy%d" % (prefix, cs), kind, **params)
        keys = {k: v for k, v in st.items() if k != "kind"}
        if keys:
            c.set_state(copy, **keys)
        back = c.get_state(copy)
        same = sorted(back) == sorted(st) and all(
            f32(back[k]) == f32(v) if isinstance(v, np.ndarray) else back[k] == v
            for k, v in st.items())
        x, _, w, b = load_inputs(cdir, cs, TRAIN_STEPS, memory_shape(shape, layout), wb)
        y = c.forward(copy, TRAIN_STEPS, False, x, w if wb else None,
                      b if wb else None, layout)
        with open(os.path.join(cdir, "out-%d-s%d-y.f32" % (cs, TRAIN_STEPS)), "rb") as fh:
            same_y = fh.read() == f32(y)
        ok = same and same_y
        bad += not ok
        print("state %-13s keys %-60s round trip %s, eval of the copy %s" % (
            kind, ",".join(sorted(st)), "same" if same else "DIFFERS",
            "equals C" if same_y else "DIFFERS"))
    m = c.metrics()
    req = m.get("requests")
    if not isinstance(req, dict):
        print("FAIL: metrics has no requests map: %s" % sorted(m))
        return bad + 1
    # The replay made 4 forwards and 3 backwards per layer, the check above
    # one eval forward per layer.
    want_f = len(CASES) * (TRAIN_STEPS + 2)
    want_b = len(CASES) * TRAIN_STEPS
    ok = req.get("forward") == want_f and req.get("backward") == want_b
    bad += not ok
    print("metrics: forward %s (want %d), backward %s (want %d) %s" % (
        req.get("forward"), want_f, req.get("backward"), want_b,
        "ok" if ok else "FAIL"))
    return bad


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mpirun", default="mpirun")
    ap.add_argument("--syncbnd", required=True)
    ap.add_argument("--driver", required=True)
    a = ap.parse_args()
    if MISSING:
        print("SKIP: %s (install python3-msgpack python3-numpy)" % MISSING)
        return 77
    d = tempfile.mkdtemp(prefix="sbn-pyc-")
    cdir = os.path.join(d, "c")
    os.mkdir(cdir)
    job = None
    try:
        job, sock = start_job(a.mpirun, a.syncbnd, os.path.join(d, "s1"))
        r = subprocess.run([a.driver, sock, "pyc-c", cdir], timeout=60)
        if r.returncode != 0:
            print("FAIL: the C driver exited with %d" % r.returncode)
            return 1
        stop_job(job)
        bad = 0
        # A fresh worker for each replay (see the docstring): one request at
        # a time, then through `batch`.
        for n, use_batch in enumerate((False, True)):
            job, sock = start_job(a.mpirun, a.syncbnd, os.path.join(d, "s%d" % (n + 2)))
            what = "python client, %s" % ("batch requests" if use_batch else "one request at a time")
            c = SyncbnClient(sock, timeout=30)
            try:
                py, layers = run_python(c, cdir, "pyc-py%d" % n, use_batch)
                bad += compare(cdir, py, what)
                if not use_batch:
                    bad += check_state(c, cdir, layers, "pyc-py%d" % n)
                c.bye()
            except SyncbnError as e:
                print("FAIL: %s: %s" % (what, e))
                bad += 1
            stop_job(job)
            job = None
        print("FAILED" if bad else "all ok")
        return 1 if bad else 0
    finally:
        if job is not None:
            stop_job(job)
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
