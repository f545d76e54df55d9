#!/usr/bin/python3
"""syncbnd across ranks, part 2 and 3: batches, fusion, the stats path,
sync groups, registration mismatches, ghost batches and checkpoints.

    svc_cross_rank.py --np P --mpirun MPIRUN --syncbnd SYNCBND

Starts `mpirun -np P syncbnd` (P = 2 or 3) and drives it with one client
per rank, each in its own thread (clients block, and the ranks must submit
concurrently). Every result is checked against a float64 numpy reference
of BatchNorm over the global (or the group's) batch. Exit 0 on success, 1
on a failed check, 77 when msgpack or numpy is missing.
"""
import argparse
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "examples", "python"))

try:
    import numpy as np
    import syncbn_client as sc
    if sc.MISSING:
        raise ImportError(sc.MISSING)
except ImportError as e:
    print("svc_cross_rank: skipped: %s" % e)
    sys.exit(77)

C = 3
S = 4
EPS = 1e-5


def fail(msg):
    raise AssertionError(msg)


def check(cond, msg):
    if not cond:
        fail(msg)


class Job:
    """One `mpirun -np P syncbnd` job and a client per rank."""

    def __init__(self, mpirun, syncbnd, np_, sockdir, statedir, extra=(),
                 connect=True):
        self.np = np_
        cmd = [mpirun, "--oversubscribe", "--bind-to", "none", "--timeout",
               "100", "--mca", "pml", "ob1", "--mca", "btl", "self,vader,tcp",
               "-np", str(np_), syncbnd, "--socket-dir", sockdir,
               "--state-dir", statedir, "--stall-timeout", "2",
               "--cycle-us", "1000"] + list(extra)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        self.paths = {}
        self.tcp = {}  # rank -> (host, port) with --tcp
        want_tcp = "--tcp" in extra
        deadline = time.time() + 60
        while len(self.paths) < np_ or (want_tcp and len(self.tcp) < np_):
            if time.time() > deadline:
                self.stop()
                fail("syncbnd did not get ready within 60 s")
            line = self.proc.stdout.readline()
            if not line:
                self.stop()
                fail("syncbnd ended before it was ready: %s" %
                     self.proc.stderr.read())
            parts = line.split()
            if line.startswith("syncbnd: rank") and "ready" in parts:
                self.paths[int(parts[2])] = parts[-1]
            elif line.startswith("syncbnd: rank") and "tcp" in parts:
                host, port = parts[-1].rsplit(":", 1)
                self.tcp[int(parts[2])] = (host.strip("[]"), int(port))
        self.c = [sc.SyncbnClient(self.paths[r])
                  for r in range(np_)] if connect else []

    def par(self, fn):
        """Runs fn(rank, client) on every rank at once; returns the results
        in rank order and re-raises the first exception."""
        out = [None] * self.np
        errs = [None] * self.np

        def run(r):
            try:
                out[r] = fn(r, self.c[r])
            except BaseException as e:  # noqa: B902 (re-raised below)
                errs[r] = e

        ts = [threading.Thread(target=run, args=(r,)) for r in range(self.np)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
            check(not t.is_alive(), "a rank's client hung for 60 s")
        for e in errs:
            if e is not None:
                raise e
        return out

    def stop(self):
        if getattr(self, "stopped", False):
            return
        self.stopped = True
        for c in getattr(self, "c", []):
            try:
                c.sock.close()
            except OSError:
                pass
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        # Under the sanitizers a worker's report goes to its stderr: that
        # is a failure even when every reply was right.
        err = self.proc.stderr.read() if self.proc.stderr else ""
        for mark in ("AddressSanitizer", "LeakSanitizer", "runtime error:"):
            check(mark not in err, "syncbnd reported:\n" + err[-4000:])


def bn_ref(x, w, b):
    """float64 BatchNorm on NCHW x (N, C, S): y, mean, biased var."""
    x = x.astype(np.float64)
    mean = x.mean(axis=(0, 2))
    var = x.var(axis=(0, 2))
    xhat = (x - mean[None, :, None]) / np.sqrt(var[None, :, None] + EPS)
    return xhat * w[None, :, None] + b[None, :, None], mean, var, xhat


def bn_bwd_ref(x, dy, w):
    _, mean, var, xhat = bn_ref(x, np.ones(C), np.zeros(C))
    dy = dy.astype(np.float64)
    n = x.shape[0] * x.shape[2]
    db = dy.sum(axis=(0, 2))
    dw = (dy * xhat).sum(axis=(0, 2))
    istd = 1 / np.sqrt(var + EPS)
    dx = (w * istd)[None, :, None] * (dy - db[None, :, None] / n -
                                      xhat * dw[None, :, None] / n)
    return dx, dw, db


def close(a, b, tol, what):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    err = np.max(np.abs(a - b) / (np.abs(b) + 1.0)) if a.size else 0.0
    check(a.shape == b.shape, "%s: shape %s vs %s" % (what, a.shape, b.shape))
    check(err <= tol, "%s: error %.3g above %.3g" % (what, err, tol))
    return err


def data(np_, seed, counts=None):
    """Per-rank NCHW batches (uneven: rank r has r + 1 samples, unless
    counts says otherwise)."""
    rng = np.random.default_rng(seed)
    counts = counts or [r + 1 for r in range(np_)]
    xs = [(rng.standard_normal((n, C, S)) * 2 + 3).astype(np.float32)
          for n in counts]
    dys = [rng.standard_normal((n, C, S)).astype(np.float32) for n in counts]
    return xs, dys


def metric(c, key):
    return c.metrics()[key]


def test_batch_fusion(job):
    """A batch of 8 layers' forwards, then of their backwards: one fused
    allreduce each, whatever the timing, with correct results."""
    P = job.np
    names = ["fuse%d" % i for i in range(8)]
    ids = job.par(lambda r, c: [c.register(n, "syncbatchnorm", channels=C)
                                for n in names])
    xs, dys = data(P, 1)
    w = np.linspace(0.5, 1.5, C).astype(np.float32)
    b = np.linspace(-1, 1, C).astype(np.float32)
    before = job.par(lambda r, c: metric(c, "allreduces"))

    def fwd(r, c):
        # Each layer sees a scaled copy of the rank's batch.
        subs = [c.forward_request(ids[r][i], 0, True, xs[r] * (i + 1), w, b)
                for i in range(8)]
        if r == 1:
            time.sleep(0.05)  # the ranks' batches arrive at different times
        return c.batch(subs)

    ys = job.par(fwd)
    after = job.par(lambda r, c: metric(c, "allreduces"))
    for r in range(P):
        check(after[r] - before[r] == 1,
              "rank %d: 8 forwards in a batch took %d allreduces, not 1" %
              (r, after[r] - before[r]))
    X = np.concatenate(xs)
    off = np.cumsum([0] + [x.shape[0] for x in xs])
    for i in range(8):
        y_ref = bn_ref(X * (i + 1), w, b)[0]
        for r in range(P):
            close(ys[r][i]["y"], y_ref[off[r]:off[r + 1]], 2e-6,
                  "batch forward layer %d rank %d" % (i, r))

    def bwd(r, c):
        return c.batch([c.backward_request(ids[r][i], 0, dys[r])
                        for i in range(8)])

    before = after
    outs = job.par(bwd)
    after = job.par(lambda r, c: metric(c, "allreduces"))
    hist = job.par(lambda r, c: metric(c, "fused_per_allreduce"))
    for r in range(P):
        check(after[r] - before[r] == 1,
              "rank %d: 8 backwards in a batch took %d allreduces" %
              (r, after[r] - before[r]))
        check(hist[r].get("5-8", 0) >= 2,
              "rank %d: fused_per_allreduce %r lacks two 5-8 entries" %
              (r, hist[r]))
    DY = np.concatenate(dys)
    for i in range(8):
        dx_ref, dw_ref, db_ref = bn_bwd_ref(X * (i + 1), DY, w)
        dw_sum = sum(outs[r][i]["dweight"] for r in range(P))
        db_sum = sum(outs[r][i]["dbias"] for r in range(P))
        for r in range(P):
            close(outs[r][i]["dx"], dx_ref[off[r]:off[r + 1]], 2e-6,
                  "batch backward dx layer %d rank %d" % (i, r))
        close(dw_sum, dw_ref, 2e-6, "dweight layer %d" % i)
        close(db_sum, db_ref, 2e-6, "dbias layer %d" % i)
    print("batch of 8: one allreduce forward, one backward; results match")


def test_big_batch(job):
    """128 layers, queued in opposite orders on alternate ranks: more than
    one round lists (64), so each rank lists its smallest keys and the
    ranks agree; everything completes in two allreduces, nothing stalls."""
    P = job.np
    names = ["big%03d" % i for i in range(128)]
    ids = job.par(lambda r, c: [c.register(n, "syncbatchnorm", channels=1)
                                for n in names])
    rng = np.random.default_rng(9)
    xs = [rng.standard_normal((2, 1, 3)).astype(np.float32) for _ in range(P)]
    before = job.par(lambda r, c: metric(c, "allreduces"))

    def go(r, c):
        order = range(128) if r % 2 == 0 else reversed(range(128))
        return c.batch([c.forward_request(ids[r][i], 0, True, xs[r] + i)
                        for i in order])

    out = job.par(go)
    after = job.par(lambda r, c: metric(c, "allreduces"))
    X = np.concatenate(xs)
    for r in range(P):
        check(after[r] - before[r] == 2,
              "rank %d: 128 entries took %d allreduces, expected 2" %
              (r, after[r] - before[r]))
        for j, res in enumerate(out[r]):
            check(not isinstance(res, Exception), "rank %d: %s" % (r, res))
            i = j if r % 2 == 0 else 127 - j
            y_ref = bn_ref(X + i, np.ones(1), np.zeros(1))[0]
            close(res["y"], y_ref[2 * r:2 * r + 2], 2e-6,
                  "big batch layer %d rank %d" % (i, r))
    print("batch of 128 in opposite orders: two allreduces, no stall")


def moments(x):
    x = x.astype(np.float64)
    n = x.shape[0] * x.shape[2]
    if n == 0:
        return 0, np.zeros(C), np.zeros(C)
    mean = x.mean(axis=(0, 2))
    m2 = ((x - mean[None, :, None]) ** 2).sum(axis=(0, 2))
    return n, mean, m2


def test_stats_path(job):
    """stats and stats_backward: global moments and sums, running stats
    moved as a forward moves them, fused with a forward of another layer."""
    P = job.np
    counts = [2, 0, 3][:P] if P == 3 else [3, 1]
    xs, dys = data(P, 2, counts)
    X = np.concatenate(xs)
    st = job.par(lambda r, c: c.register("stats", "syncbatchnorm", channels=C))
    fw = job.par(lambda r, c: c.register("statsfw", "syncbatchnorm",
                                         channels=C))
    before = job.par(lambda r, c: metric(c, "allreduces"))

    def go(r, c):
        n, mean, m2 = moments(xs[r])
        subs = [{"op": "stats", "id": 1000 + r, "layer": st[r], "step": 0,
                 "count": n, "mean": sc.encode_vec64(mean),
                 "m2": sc.encode_vec64(m2)},
                c.forward_request(fw[r], 0, True, xs[r])]
        return c.batch(subs)

    out = job.par(go)
    after = job.par(lambda r, c: metric(c, "allreduces"))
    _, mean_ref, var_ref, _ = bn_ref(X, np.ones(C), np.zeros(C))
    n = X.shape[0] * S
    for r in range(P):
        check(after[r] - before[r] == 1,
              "rank %d: stats + forward took %d allreduces" %
              (r, after[r] - before[r]))
        s = out[r][0]
        close(s["count"], np.full(C, n), 0, "stats count")
        close(s["mean"], mean_ref, 1e-12, "stats mean rank %d" % r)
        close(s["var"], var_ref, 1e-12, "stats var rank %d" % r)
        close(s["var_unbiased"], var_ref * n / (n - 1), 1e-12,
              "stats unbiased var rank %d" % r)
        close(s["invstd"], 1 / np.sqrt(var_ref + EPS), 1e-12, "stats invstd")
    # The stats path moved the running statistics as the forward did.
    a = job.par(lambda r, c: c.get_state(st[r]))
    b = job.par(lambda r, c: c.get_state(fw[r]))
    for r in range(P):
        close(a[r]["running_mean"], b[r]["running_mean"], 2e-7,
              "stats vs forward running_mean rank %d" % r)
        close(a[r]["running_var"], b[r]["running_var"], 2e-7,
              "stats vs forward running_var rank %d" % r)
        check(a[r]["num_batches_tracked"] == 1, "stats: num_batches_tracked")
    # stats_backward: the global sums.
    sdy = [dys[r].astype(np.float64).sum(axis=(0, 2)) for r in range(P)]
    sdx = [(dys[r].astype(np.float64) * (xs[r] - 1.0)).sum(axis=(0, 2))
           for r in range(P)]
    out = job.par(lambda r, c: c.call(
        "stats_backward", layer=st[r], step=0,
        sum_dy=sc.encode_vec64(sdy[r]), sum_dy_xhat=sc.encode_vec64(sdx[r])))
    for r in range(P):
        close(sc.decode_vec64(out[r]["sum_dy"]), sum(sdy), 1e-12,
              "stats_backward sum_dy")
        close(sc.decode_vec64(out[r]["sum_dy_xhat"]), sum(sdx), 1e-12,
              "stats_backward sum_dy_xhat")
    # Malformed stats are refused locally, before any collective.
    try:
        job.c[0].call("stats", layer=st[0], step=5, count=3,
                      mean=sc.encode_vec64(np.zeros(C + 1)),
                      m2=sc.encode_vec64(np.zeros(C + 1)))
        fail("stats with C+1 values was accepted")
    except sc.SyncbnError as e:
        check(e.code == "SHAPE", "stats with C+1 values: %s" % e)
    print("stats path: global moments exact, running stats as forward, "
          "fused with a forward")


def test_mismatch(job):
    """The same name registered with different eps on rank 0: every rank's
    forward fails with LAYER_MISMATCH."""
    ids = job.par(lambda r, c: c.register(
        "mismatch", "syncbatchnorm", channels=C, eps=1e-5 if r == 0 else 1e-3))
    xs, _ = data(job.np, 3)

    def go(r, c):
        try:
            c.forward(ids[r], 0, True, xs[r])
        except sc.SyncbnError as e:
            return e.code, e.message
        return None, None

    out = job.par(go)
    for r, (code, msg) in enumerate(out):
        check(code == "LAYER_MISMATCH",
              "rank %d: mismatched registration gave %r" % (r, code))
        check("mismatch" in msg, "rank %d: message lacks the layer" % r)
    print("registration mismatch: LAYER_MISMATCH on every rank")


def test_ghost(job):
    """Ghost batches on syncbatchnorm: each rank normalizes its own
    sub-batches of g samples (nothing merged across ranks), backward is
    each sub-batch's own; a rank that registered another ghost_batch (or
    none) makes the step LAYER_MISMATCH on every rank."""
    g = 2
    for other in (3, 0):
        ids = job.par(lambda r, c: c.register(
            "ghostmm%d" % other, "syncbatchnorm", channels=C,
            ghost_batch=g if r == 0 else other))
        xs, _ = data(job.np, 4)

        def go(r, c):
            try:
                c.forward(ids[r], 0, True, xs[r])
            except sc.SyncbnError as e:
                return e.code
            return None

        for r, code in enumerate(job.par(go)):
            check(code == "LAYER_MISMATCH",
                  "rank %d: ghost_batch %d vs %d gave %r" % (r, g, other, code))
    ids = job.par(lambda r, c: c.register("ghost", "syncbatchnorm", channels=C,
                                          ghost_batch=g))
    xs, dys = data(job.np, 5, [5 + r for r in range(job.np)])

    def step(r, c):
        y = c.forward(ids[r], 0, True, xs[r])
        dx, dw, db = c.backward(ids[r], 0, dys[r])
        return y, dx, dw, db

    out = job.par(step)
    for r, (y, dx, dw, db) in enumerate(out):
        for j in range(0, xs[r].shape[0], g):
            xj, dyj = xs[r][j:j + g], dys[r][j:j + g]
            yr = bn_ref(xj, np.ones(C), np.zeros(C))[0]
            dxr = bn_bwd_ref(xj, dyj, np.ones(C))[0]
            close(y[j:j + g], yr, 1e-5, "rank %d ghost y[%d:]" % (r, j))
            close(dx[j:j + g], dxr, 1e-4, "rank %d ghost dx[%d:]" % (r, j))
    print("ghost batches: per-rank sub-batches of %d, LAYER_MISMATCH on "
          "another ghost_batch" % g)


def test_groups(job):
    """Sync groups smaller than the job: np 2 with groups of 1, np 3 with
    groups {0, 1} and {2}. Each group normalizes over its own batch and
    keeps its own running statistics."""
    P = job.np
    G = 1 if P == 2 else 2
    ids = job.par(lambda r, c: c.register("grouped", "syncbatchnorm",
                                          channels=C, group_size=G))
    xs, dys = data(P, 4, [2, 3, 2][:P])
    ys = job.par(lambda r, c: c.forward(ids[r], 0, True, xs[r]))
    st = job.par(lambda r, c: c.get_state(ids[r]))
    for r in range(P):
        lo = (r // G) * G
        grp = list(range(lo, min(lo + G, P)))
        Xg = np.concatenate([xs[k] for k in grp])
        y_ref, mean, var, _ = bn_ref(Xg, np.ones(C), np.zeros(C))
        off = sum(xs[k].shape[0] for k in grp if k < r)
        close(ys[r], y_ref[off:off + xs[r].shape[0]], 2e-6,
              "group forward rank %d" % r)
        n = Xg.shape[0] * S
        close(st[r]["running_mean"], 0.1 * mean, 2e-7,
              "group running_mean rank %d" % r)
        close(st[r]["running_var"], 0.9 + 0.1 * var * n / (n - 1), 2e-7,
              "group running_var rank %d" % r)
    dxs = job.par(lambda r, c: c.backward(ids[r], 0, dys[r]))
    for r in range(P):
        lo = (r // G) * G
        grp = list(range(lo, min(lo + G, P)))
        dx_ref = bn_bwd_ref(np.concatenate([xs[k] for k in grp]),
                            np.concatenate([dys[k] for k in grp]),
                            np.ones(C))[0]
        off = sum(xs[k].shape[0] for k in grp if k < r)
        close(dxs[r][0], dx_ref[off:off + xs[r].shape[0]], 2e-6,
              "group backward rank %d" % r)
    check(not np.array_equal(st[0]["running_mean"], st[P - 1]["running_mean"]),
          "groups: the first and last group have the same statistics")
    try:
        job.c[0].register("toolarge", "syncbatchnorm", channels=C,
                          group_size=P + 1)
        fail("group_size above the job size was accepted")
    except sc.SyncbnError as e:
        check(e.code == "BAD_PARAMS", "group_size > size: %s" % e)
    print("sync groups of %d in a job of %d: per-group results and stats" %
          (G, P))


CK_LAYERS = [("ck_sync", "syncbatchnorm", {"channels": C}),
             ("ck_bn", "batchnorm", {"channels": C}),
             ("ck_ln", "layernorm", {"normalized_shape": [C, S]}),
             ("ck_drop", "dropout", {"p": 0.25})]


def register_ck(job, group_size=0):
    def go(r, c):
        ids = []
        for name, kind, params in CK_LAYERS:
            if kind == "syncbatchnorm":
                params = dict(params, group_size=group_size)
            ids.append(c.register(name, kind, **params))
        return ids
    return job.par(go)


def state_of(job, ids):
    return job.par(lambda r, c: [c.get_state(i) for i in ids[r][:3]])


def same_state(a, b, what):
    for r in range(len(a)):
        for i in range(len(a[r])):
            for k, v in a[r][i].items():
                if isinstance(v, np.ndarray):
                    check(v.tobytes() == b[r][i][k].tobytes(),
                          "%s: rank %d layer %d %s differs" % (what, r, i, k))
                else:
                    check(v == b[r][i][k], "%s: rank %d layer %d %s: %r vs %r"
                          % (what, r, i, k, v, b[r][i][k]))


def train_ck(job, ids, steps, start=0):
    xs, _ = data(job.np, 5)
    for step in range(start, start + steps):
        def go(r, c):
            c.forward(ids[r][0], step, True, xs[r] + step)
            c.forward(ids[r][1], step, True, xs[r] * (r + 1))
        job.par(go)


def expect_error(job, op, name, code, what):
    out = job.par(lambda r, c: _err(lambda: c.call(op, name=name)))
    for r, (got, msg) in enumerate(out):
        check(got == code, "%s: rank %d got %r (%s), expected %s" %
              (what, r, got, msg, code))
    return out


def _err(fn):
    try:
        fn()
    except sc.SyncbnError as e:
        return e.code, e.message
    return None, None


def test_checkpoints(args, tmp):
    """Save, change, load; a restarted job loads the file; corrupt,
    truncated and wrong-version files and bad names are refused."""
    P = args.np
    G = 0 if P == 2 else 2
    sock, state = os.path.join(tmp, "ck-sock"), os.path.join(tmp, "ck-state")
    job = Job(args.mpirun, args.syncbnd, P, sock, state)
    try:
        ids = register_ck(job, G)
        # Distinct affine parameters, so that their round trip shows.
        job.par(lambda r, c: c.set_state(
            ids[r][2], weight=np.arange(C * S, dtype=np.float32).reshape(C, S),
            bias=-np.ones((C, S), dtype=np.float32)))
        train_ck(job, ids, 3)
        saved = state_of(job, ids)
        out = job.par(lambda r, c: c.checkpoint_save("ck1"))
        check(all(o.get("saved") for o in out), "checkpoint_save: %r" % out)
        path = os.path.join(state, "ck1")
        check(os.path.exists(path), "no checkpoint file at %s" % path)
        check(os.stat(path).st_mode & 0o077 == 0, "checkpoint readable by "
              "group or others")
        train_ck(job, ids, 2, 3)  # the state moves on
        moved = state_of(job, ids)
        check(not np.array_equal(moved[0][0]["running_mean"],
                                 saved[0][0]["running_mean"]),
              "training after the save did not move the state")
        job.par(lambda r, c: c.checkpoint_load("ck1"))
        same_state(state_of(job, ids), saved, "load after save")
        for bad in ("../x", "a/b", "..", ".hidden", ""):
            out = job.par(lambda r, c: _err(lambda: c.call(
                "checkpoint_save", name=bad)))
            check(all(o[0] == "BAD_PARAMS" for o in out),
                  "name %r: %r" % (bad, out))
        check(sorted(os.listdir(state)) == ["ck1"],
              "files after refused names: %r" % os.listdir(state))
        # Damaged copies: a flipped bit, a truncation, another version
        # (with a correct checksum, so that the version check is what
        # refuses it).
        raw = open(path, "rb").read()
        flip = bytearray(raw)
        flip[len(raw) // 2] ^= 0x10
        ver = bytearray(raw)
        ver[8:12] = struct.pack("<I", 2)
        ver[-4:] = struct.pack("<I", zlib.crc32(bytes(ver[:-4])) & 0xffffffff)
        for name, content, word in (("flip", flip, "checksum"),
                                    ("trunc", raw[:-7], ""),
                                    ("ver", ver, "version")):
            with open(os.path.join(state, name), "wb") as f:
                f.write(bytes(content))
            out = expect_error(job, "checkpoint_load", name, "CHECKPOINT",
                               "damaged checkpoint " + name)
            check(word in out[0][1].lower(),
                  "damaged %s: rank 0 says %r" % (name, out[0][1]))
        expect_error(job, "checkpoint_load", "missing", "CHECKPOINT",
                     "missing checkpoint")
        same_state(state_of(job, ids), saved, "state after refused loads")
        # A job with other layers cannot load it.
        job.par(lambda r, c: c.register("extra", "batchnorm", channels=2))
        expect_error(job, "checkpoint_load", "ck1", "CHECKPOINT",
                     "checkpoint with fewer layers")
    finally:
        job.stop()
    # A restarted job: same layers, fresh state, then the file's.
    job = Job(args.mpirun, args.syncbnd, P, sock, state)
    try:
        ids = register_ck(job, G)
        fresh = state_of(job, ids)
        check(fresh[0][0]["num_batches_tracked"] == 0, "restart: not fresh")
        job.par(lambda r, c: c.checkpoint_load("ck1"))
        same_state(state_of(job, ids), saved, "load after restart")
        m = job.c[0].metrics()
        check(m["requests"]["checkpoint_load"] == 1, "metrics: loads %r" %
              m["requests"])
    finally:
        job.stop()
    print("checkpoints: round trip, restart, damaged files and bad names")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--np", type=int, default=2)
    ap.add_argument("--mpirun", default="mpirun")
    ap.add_argument("--syncbnd", required=True)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="svc_cross_rank-")
    os.chmod(tmp, 0o700)
    job = None
    try:
        job = Job(args.mpirun, args.syncbnd, args.np,
                  os.path.join(tmp, "sock"), os.path.join(tmp, "state"))
        test_batch_fusion(job)
        test_big_batch(job)
        test_stats_path(job)
        test_mismatch(job)
        test_ghost(job)
        test_groups(job)
        job.stop()
        job = None
        test_checkpoints(args, tmp)
    except AssertionError as e:
        print("svc_cross_rank: FAILED: %s" % e)
        return 1
    finally:
        if job is not None:
            job.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print("svc_cross_rank np=%d: all checks passed" % args.np)
    return 0


if __name__ == "__main__":
    sys.exit(main())
