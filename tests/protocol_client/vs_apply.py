#!/usr/bin/python3
"""SyncBN through syncbnd, driven by a client written from PROTOCOL.md alone,
checked against `mpirun -np P syncbn apply --sync` and a float64 reference.

    vs_apply.py --np P --mpirun MPIRUN --syncbnd SYNCBND --syncbn SYNCBN

It starts `mpirun -np P syncbnd --socket-dir TMP/sock`, waits for every
rank's ready line, and runs one client thread per rank (rank r talks to
rank-<r>.sock). Two syncbatchnorm layers are trained for a few steps with
uneven per-rank batches (at np >= 3 one rank has an EMPTY batch in every
step): one NCHW with momentum 0.1, one NHWC with the cumulative average
(momentum nil). Every forward passes its own affine weight and bias.
After the training steps each rank reads its layers' state (get_state) and
runs an eval forward, which uses the running statistics its worker kept.

For every step and layer it then runs `mpirun -np P syncbn apply --op
batchnorm --sync --counts ...` on the same global batch, the same weight
and bias and the running statistics of the previous apply, and compares:

  (a) service vs apply: y and dx of every rank against apply's rows of that
      rank, dweight and dbias summed over ranks against apply's sums, every
      rank's running statistics (get_state) against apply's after the last
      step, and the eval y against `syncbn apply --eval` with those. Both
      run the same library, so they must agree to a few float32 ulps
      (TOL_ULPS, in units of FLT_EPSILON times the largest magnitude
      involved); only the order of the cross-rank sums differs.
  (b) service vs a float64 numpy BatchNorm on the global batch (biased
      variance in the normalization, unbiased in the running variance, the
      standard backward), within TOL_REF (max error over max magnitude).

It also checks a few error replies (UNSUPPORTED_VERSION keeps the
connection; LAYER_MISMATCH; NO_FORWARD; DUPLICATE_STEP) as exceptions with
their code.

Exit status: 0 pass, 1 a check failed, 2 bad usage, 77 msgpack or numpy
missing (skip).
"""
import argparse
import concurrent.futures
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
try:
    import numpy as np
    import pclient  # needs msgpack
except ImportError as e:
    print("vs_apply: skipped, %s" % e)
    sys.exit(77)

FLT_EPS = float(np.finfo(np.float32).eps)
# Service vs apply, in FLT_EPSILON units of the largest magnitude involved.
TOL_ULPS = 4.0
# Service vs float64, as max |got - ref| / max |ref|.
# The outputs are float32, so a few FLT_EPSILON (1.2e-7) is what rounding
# explains; the runs seen so far stayed below 1.2e-7.
TOL_REF = {k: 1e-6 for k in ("y", "dx", "dweight", "dbias", "running_mean",
                              "running_var", "eval_y")}

MPI_FLAGS = ["--oversubscribe", "--bind-to", "none", "--mca", "pml", "ob1",
             "--mca", "btl", "self,vader,tcp"]
MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}

C, SPATIAL = 3, (2, 3)
STEPS = 3
# The two layers: name suffix, layout, eps, momentum (None = cumulative).
LAYERS = [("nchw", "nchw", 1e-5, 0.1), ("nhwc", "nhwc", 1e-3, None)]
READY = re.compile(r"^syncbnd: rank (\d+) ready on (.+)$")
# syncbnd's stderr lines that are no news: the workers' shutdown and, in the
# sanitizer build, LeakSanitizer's summary of suppressed (Open MPI) leaks.
EXPECTED = re.compile(r"^(syncbnd: rank \d+: signal \d+, shutting down|-+|"
                      r"Suppressions used:|\s*count\s+bytes\s+template|"
                      r"\s*\d+\s+\d+\s+\S+|\s*)$")


def step_counts(p, rng):
    """Per-step shard sizes: uneven, and with an empty rank at p >= 3."""
    table = {1: [[4], [5], [3]],
             2: [[3, 1], [1, 4], [5, 2]],
             3: [[2, 0, 3], [0, 4, 1], [3, 1, 0]]}
    if p in table:
        return table[p]
    out = []
    for s in range(STEPS):
        c = [int(v) for v in rng.integers(1, 5, p)]
        c[s % p] = 0
        out.append(c)
    return out


# ---------------------------------------------------------------- data


def to_logical(a, layout):
    a = np.asarray(a, dtype=np.float64)
    return np.moveaxis(a, -1, 1) if layout == "nhwc" else a


def to_memory(a, layout):
    return np.ascontiguousarray(np.moveaxis(a, 1, -1) if layout == "nhwc" else a)


def mem_shape(n, layout):
    return (n,) + SPATIAL + (C,) if layout == "nhwc" else (n, C) + SPATIAL


def make_data(p, seed):
    """Global float32 batches per (layer, step), plus eval batches."""
    rng = np.random.default_rng(seed)
    counts = step_counts(p, rng)
    data = {}
    for li, (_, layout, _, _) in enumerate(LAYERS):
        for s in range(STEPS):
            n = sum(counts[s])
            # Per-channel offsets and scales so that the statistics matter.
            mu = rng.uniform(-3.0, 5.0, C)
            sd = rng.uniform(0.5, 3.0, C)
            xl = rng.standard_normal((n, C) + SPATIAL) * \
                sd[None, :, None, None] + mu[None, :, None, None]
            data[li, s] = {
                "x": to_memory(xl, layout).astype(np.float32),
                "dy": rng.standard_normal(mem_shape(n, layout)).astype(np.float32),
                "w": rng.normal(1.0, 0.5, C).astype(np.float32),
                "b": rng.normal(0.0, 1.0, C).astype(np.float32)}
        # Eval: each rank gets as many samples as in the last step.
        n = sum(counts[-1])
        data[li, "eval"] = {
            "x": (rng.standard_normal(mem_shape(n, layout)) * 2.0 + 1.0).astype(np.float32),
            "w": rng.normal(1.0, 0.5, C).astype(np.float32),
            "b": rng.normal(0.0, 1.0, C).astype(np.float32)}
    return counts, data


def shard(a, counts, r):
    lo = sum(counts[:r])
    return a[lo:lo + counts[r]]


# ---------------------------------------------------------------- reference


def ref_train(x, dy, w, b, eps, layout):
    """float64 BatchNorm forward+backward on the global batch."""
    x, dy = to_logical(x, layout), to_logical(dy, layout)
    w64 = w.astype(np.float64)[None, :, None, None]
    b64 = b.astype(np.float64)[None, :, None, None]
    axes = (0, 2, 3)
    m = x.shape[0] * int(np.prod(SPATIAL))
    mean = x.mean(axis=axes)
    var = ((x - mean[None, :, None, None]) ** 2).mean(axis=axes)
    invstd = 1.0 / np.sqrt(var + eps)
    xhat = (x - mean[None, :, None, None]) * invstd[None, :, None, None]
    y = xhat * w64 + b64
    dbias = dy.sum(axis=axes)
    dweight = (dy * xhat).sum(axis=axes)
    dx = (w64 * invstd[None, :, None, None] / m) * (
        m * dy - dbias[None, :, None, None] - xhat * dweight[None, :, None, None])
    return {"y": to_memory(y, layout), "dx": to_memory(dx, layout),
            "dweight": dweight, "dbias": dbias, "mean": mean,
            "var_unbiased": var * m / (m - 1)}


def ref_eval(x, w, b, rm, rv, eps, layout):
    x = to_logical(x, layout)
    y = (x - rm[None, :, None, None]) / np.sqrt(rv[None, :, None, None] + eps)
    y = y * w.astype(np.float64)[None, :, None, None] + \
        b.astype(np.float64)[None, :, None, None]
    return to_memory(y, layout)


# ---------------------------------------------------------------- service


class Job:
    """`mpirun -np P syncbnd`, with its ready lines read on a thread."""

    def __init__(self, a, sockdir, p):
        self.lines = queue.Queue()
        self.errpath = sockdir + ".stderr"
        self.err = open(self.errpath, "w")
        cmd = [a.mpirun] + MPI_FLAGS + ["--timeout", "110", "-np", str(p),
                                        a.syncbnd, "--socket-dir", sockdir,
                                        "--stall-timeout", "20"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                     stderr=self.err, text=True,
                                     env=dict(os.environ, **MPI_ENV),
                                     start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_ready(self, p, sockdir, timeout):
        """Returns {rank: socket path} once every rank printed its line."""
        paths = {}
        deadline = time.monotonic() + timeout
        while len(paths) < p:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError("syncbnd: only ranks %s ready after %gs" %
                                   (sorted(paths), timeout))
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise RuntimeError("syncbnd exited (status %s) before every "
                                   "rank was ready" % self.proc.poll())
            mt = READY.match(line)
            if mt:
                r, path = int(mt.group(1)), mt.group(2)
                want = os.path.join(sockdir, "rank-%d.sock" % r)
                if os.path.realpath(path) != os.path.realpath(want):
                    raise RuntimeError("rank %d ready on %s, expected %s" %
                                       (r, path, want))
                paths[r] = path
        return paths

    def stop(self):
        """SIGTERM to mpirun (which stops every worker), then SIGKILL."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)
        self.err.close()
        return self.proc.returncode


def expect_error(code, fn, *args, **kw):
    try:
        fn(*args, **kw)
    except pclient.ProtocolError as e:
        if e.code != code:
            raise AssertionError("expected %s, got %s" % (code, e)) from e
        return
    raise AssertionError("expected %s, got a reply" % code)


def rank_client(path, r, p, counts, data, out):
    """Everything rank r does; results go into out[r]."""
    res = {}
    with pclient.Client(path, timeout=60.0) as c:
        h = c.hello()
        # Version 2 brought syncbatchnorm training, 3 get_state.
        assert h["protocol"] >= 3 and h["server"] == "syncbnd", h
        assert h["rank"] == r and h["size"] == p, (h, r, p)
        # A wrong version is refused but the connection stays usable.
        expect_error("UNSUPPORTED_VERSION", c.hello, version=99)
        ids = []
        for suffix, layout, eps, mom in LAYERS:
            ids.append(c.register("pclient_" + suffix, "syncbatchnorm",
                                  channels=C, eps=eps, momentum=mom,
                                  affine=True))
        # Registering again with the same parameters finds the layer.
        rep = c.call("register", name="pclient_nchw", kind="syncbatchnorm",
                     channels=C, eps=LAYERS[0][2], momentum=LAYERS[0][3])
        assert rep["layer"] == ids[0] and rep["created"] is False, rep
        expect_error("LAYER_MISMATCH", c.register, "pclient_nchw",
                     "syncbatchnorm", channels=C + 1)
        expect_error("NO_FORWARD", c.backward, ids[0], 0,
                     np.zeros(mem_shape(counts[0][r], "nchw"), np.float32))

        for s in range(STEPS):
            # Every rank submits in the same order: forwards of both
            # layers, then the backwards in reverse, as a network would.
            for li, (_, layout, _, _) in enumerate(LAYERS):
                d = data[li, s]
                res["y", li, s] = c.forward(
                    ids[li], s, True, shard(d["x"], counts[s], r),
                    layout=layout, weight=d["w"], bias=d["b"])
            for li in reversed(range(len(LAYERS))):
                layout = LAYERS[li][1]
                d = data[li, s]
                dx, dw, db = c.backward(ids[li], s,
                                        shard(d["dy"], counts[s], r),
                                        layout=layout)
                res["dx", li, s], res["dw", li, s], res["db", li, s] = dx, dw, db
        last = STEPS - 1
        # Local checks that need no other rank.
        expect_error("DUPLICATE_STEP", c.forward, ids[0], last, True,
                     shard(data[0, last]["x"], counts[last], r),
                     weight=data[0, last]["w"], bias=data[0, last]["b"])
        expect_error("NO_FORWARD", c.backward, ids[0], last,
                     shard(data[0, last]["dy"], counts[last], r))
        # The state each worker kept: every rank's running statistics
        # must be the global ones, the empty rank's included.
        for li in range(len(LAYERS)):
            res["state", li] = c.get_state(ids[li])
        # Eval uses the running statistics kept by this rank's worker.
        for li, (_, layout, _, _) in enumerate(LAYERS):
            d = data[li, "eval"]
            res["eval_y", li] = c.forward(
                ids[li], STEPS, False, shard(d["x"], counts[-1], r),
                layout=layout, weight=d["w"], bias=d["b"])
        c.bye()
    out[r] = res


def run_service(a, root, p, counts, data):
    sockdir = os.path.join(root, "sock")
    job = Job(a, sockdir, p)
    try:
        paths = job.wait_ready(p, sockdir, timeout=40)
        out, errors = {}, {}

        def worker(r):
            try:
                rank_client(paths[r], r, p, counts, data, out)
            except BaseException as e:  # reported by the main thread
                errors[r] = e

        threads = [threading.Thread(target=worker, args=(r,), daemon=True)
                   for r in range(p)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 70
        for t in threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        hung = [r for r, t in enumerate(threads) if t.is_alive()]
        if hung:
            raise RuntimeError("clients of ranks %s did not finish in time" % hung)
        if errors:
            msg = "; ".join("rank %d: %s: %s" % (r, type(e).__name__, e)
                            for r, e in sorted(errors.items()))
            raise RuntimeError(msg)
    finally:
        job.stop()
        # The workers' shutdown lines are expected; anything else is shown.
        with open(job.errpath) as f:
            err = [l for l in f.read().splitlines() if not EXPECTED.match(l)]
        if err:
            print("syncbnd stderr:\n" + "\n".join(err[-40:]))
    # In the sanitizer build a worker's report (a leak at exit, say) does
    # not reach any client, so it is looked for here.
    if any("Sanitizer" in l or "runtime error:" in l for l in err):
        raise RuntimeError("syncbnd printed a sanitizer report")
    return out


# ---------------------------------------------------------------- apply


def run_apply(a, d, p, args):
    """Runs `syncbn apply` (under mpirun when p > 0); returns its outputs."""
    out = os.path.join(d, "out")
    cmd = [a.syncbn, "apply", "--op", "batchnorm", "--out-dir", out] + args
    if p:
        cmd = [a.mpirun] + MPI_FLAGS + ["--timeout", "60", "-np", str(p)] + cmd
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=90,
                       env=dict(os.environ, **MPI_ENV))
    if r.returncode != 0:
        raise RuntimeError("%s\nexit %d: %s" % (" ".join(cmd), r.returncode,
                                                (r.stderr + r.stdout)[-1500:]))
    got = {}
    for k in ("y", "dx", "dweight", "dbias", "running_mean", "running_var"):
        path = os.path.join(out, k + ".npy")
        if os.path.exists(path):
            got[k] = np.load(path)
    return got


def run_applies(a, root, p, counts, data):
    """apply for every (layer, step), chaining the running statistics; the
    layers' chains run side by side since each mpirun mostly waits on its
    start-up (seconds each in the sanitizer build)."""
    res = {}
    with concurrent.futures.ThreadPoolExecutor(len(LAYERS)) as pool:
        futs = [pool.submit(apply_layer, a, root, p, counts, data, li, res)
                for li in range(len(LAYERS))]
        for f in futs:
            f.result(timeout=100)
    return res


def apply_layer(a, root, p, counts, data, li, res):
    """One layer's steps (each from the previous running statistics), then
    an eval run with the final ones; the outputs go into res."""
    suffix, layout, eps, mom = LAYERS[li]
    rm = np.zeros(C, np.float32)
    rv = np.ones(C, np.float32)
    for s in range(STEPS):
        d = os.path.join(root, "apply-%s-%d" % (suffix, s))
        os.makedirs(d)
        files = dict(data[li, s], rm=rm, rv=rv)
        for k, v in files.items():
            np.save(os.path.join(d, k + ".npy"), v)
        f = {k: os.path.join(d, k + ".npy") for k in files}
        args = ["--x", f["x"], "--dy", f["dy"], "--weight", f["w"],
                "--bias", f["b"], "--running-mean", f["rm"],
                "--running-var", f["rv"], "--layout", layout,
                "--eps", repr(eps), "--sync",
                "--counts", ",".join(map(str, counts[s]))]
        if mom is None:
            args += ["--cumulative", "--num-batches-tracked", str(s)]
        else:
            args += ["--momentum", repr(mom)]
        got = run_apply(a, d, p, args)
        for k in ("y", "dx", "dweight", "dbias", "running_mean", "running_var"):
            if k not in got:
                raise RuntimeError("apply wrote no %s.npy in %s" % (k, d))
            res[k, li, s] = got[k]
        rm, rv = got["running_mean"], got["running_var"]
    d = os.path.join(root, "apply-%s-eval" % suffix)
    os.makedirs(d)
    e = data[li, "eval"]
    files = {"x": e["x"], "w": e["w"], "b": e["b"], "rm": rm, "rv": rv}
    for k, v in files.items():
        np.save(os.path.join(d, k + ".npy"), v)
    f = {k: os.path.join(d, k + ".npy") for k in files}
    got = run_apply(a, d, 0, [
        "--x", f["x"], "--weight", f["w"], "--bias", f["b"],
        "--running-mean", f["rm"], "--running-var", f["rv"], "--eval",
        "--layout", layout, "--eps", repr(eps)])
    res["eval_y", li] = got["y"]


# ---------------------------------------------------------------- compare


class Checker:
    def __init__(self):
        self.fails = 0
        self.max_ulps = {}
        self.max_ref = {}

    def ulps(self, what, got, ref, scale=None):
        """|got - ref| in FLT_EPSILON units of the largest magnitude."""
        got = np.asarray(got, np.float64)
        ref = np.asarray(ref, np.float64)
        if got.shape != ref.shape:
            self._fail("%s: shape %s vs apply %s" % (what, got.shape, ref.shape))
            return
        if got.size == 0:
            return
        if scale is None:
            scale = np.abs(ref).max()
        e = np.abs(got - ref).max() / (max(scale, 1e-30) * FLT_EPS)
        key = what.split()[0]
        self.max_ulps[key] = max(self.max_ulps.get(key, 0.0), e)
        if not e <= TOL_ULPS:
            self._fail("%s: %.2f ulps from apply (limit %g)" % (what, e, TOL_ULPS))

    def rel(self, what, got, ref):
        got = np.asarray(got, np.float64)
        ref = np.asarray(ref, np.float64)
        key = what.split()[0]
        if got.shape != ref.shape:
            self._fail("%s: shape %s vs reference %s" % (what, got.shape, ref.shape))
            return
        if got.size == 0:
            return
        e = np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30)
        self.max_ref[key] = max(self.max_ref.get(key, 0.0), e)
        if not e <= TOL_REF[key]:
            self._fail("%s: %.2e from float64 (limit %g)" % (what, e, TOL_REF[key]))

    def _fail(self, msg):
        self.fails += 1
        print("FAIL " + msg)


def compare(p, counts, data, svc, app):
    ck = Checker()
    for li, (suffix, layout, eps, mom) in enumerate(LAYERS):
        rm = np.zeros(C)
        rv = np.ones(C)
        for s in range(STEPS):
            tag = "%s step %d" % (suffix, s)
            d = data[li, s]
            ref = ref_train(d["x"], d["dy"], d["w"], d["b"], eps, layout)
            for r in range(p):
                for k, key in (("y", "y"), ("dx", "dx")):
                    got = svc[r][key, li, s]
                    ck.ulps("%s %s rank %d" % (k, tag, r), got,
                            shard(app[k, li, s], counts[s], r))
                    ck.rel("%s %s rank %d" % (k, tag, r), got,
                           shard(ref[k], counts[s], r))
            for k, key in (("dweight", "dw"), ("dbias", "db")):
                parts = [svc[r][key, li, s].astype(np.float64) for r in range(p)]
                for r, part in enumerate(parts):
                    if part.shape != (C,):
                        ck._fail("%s %s rank %d: shape %s" % (k, tag, r, part.shape))
                        break
                else:
                    # The sum of P float32 shares rounds on the scale of the
                    # shares, which may be larger than the sum.
                    scale = max(np.abs(np.array(parts)).max(),
                                np.abs(app[k, li, s]).max())
                    total = np.sum(parts, axis=0)
                    ck.ulps("%s %s (sum over ranks)" % (k, tag), total,
                            app[k, li, s], scale=p * scale)
                    ck.rel("%s %s (sum over ranks)" % (k, tag), total, ref[k])
            # The float64 running statistics, PyTorch's update rule.
            f = (1.0 / (s + 1)) if mom is None else mom
            rm = (1 - f) * rm + f * ref["mean"]
            rv = (1 - f) * rv + f * ref["var_unbiased"]
            ck.rel("running_mean %s (apply)" % tag, app["running_mean", li, s], rm)
            ck.rel("running_var %s (apply)" % tag, app["running_var", li, s], rv)
        for r in range(p):
            st = svc[r]["state", li]
            tag = "%s rank %d (get_state)" % (suffix, r)
            if st.get("kind") != "syncbatchnorm":
                ck._fail("%s: kind %r" % (tag, st.get("kind")))
            if st.get("num_batches_tracked") != STEPS:
                ck._fail("%s: num_batches_tracked %r, expected %d" % (
                    tag, st.get("num_batches_tracked"), STEPS))
            for k, want in (("running_mean", rm), ("running_var", rv)):
                if k not in st:
                    ck._fail("%s: no %s" % (tag, k))
                    continue
                ck.ulps("%s %s" % (k, tag), st[k], app[k, li, STEPS - 1])
                ck.rel("%s %s" % (k, tag), st[k], want)
            # The forwards passed their own weight and bias "instead of the
            # worker's parameters", so those stay as registered.
            for k, want in (("weight", np.ones(C)), ("bias", np.zeros(C))):
                if k not in st or not np.array_equal(st[k], want):
                    ck._fail("%s: %s is %r, expected %r" % (tag, k, st.get(k), want))
        e = data[li, "eval"]
        ref_y = ref_eval(e["x"], e["w"], e["b"], rm, rv, eps, layout)
        for r in range(p):
            got = svc[r]["eval_y", li]
            tag = "%s rank %d (running statistics)" % (suffix, r)
            ck.ulps("eval_y " + tag, got, shard(app["eval_y", li], counts[-1], r))
            ck.rel("eval_y " + tag, got, shard(ref_y, counts[-1], r))
    return ck


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--np", type=int, required=True, dest="p")
    ap.add_argument("--mpirun", default="mpirun")
    ap.add_argument("--syncbnd", required=True)
    ap.add_argument("--syncbn", required=True)
    ap.add_argument("--seed", type=int, default=2024)
    a = ap.parse_args()
    for prog in (a.syncbnd, a.syncbn):
        if not os.access(prog, os.X_OK):
            print("vs_apply: %s is not executable" % prog, file=sys.stderr)
            return 2
    if a.p < 1:
        print("vs_apply: --np must be >= 1", file=sys.stderr)
        return 2
    counts, data = make_data(a.p, a.seed + a.p)
    root = tempfile.mkdtemp(prefix="pclient-")
    try:
        t0 = time.monotonic()
        svc = run_service(a, root, a.p, counts, data)
        t1 = time.monotonic()
        app = run_applies(a, root, a.p, counts, data)
        t2 = time.monotonic()
        ck = compare(a.p, counts, data, svc, app)
    except (RuntimeError, AssertionError, pclient.ProtocolError,
            pclient.ConnectionClosed, OSError, subprocess.TimeoutExpired) as e:
        print("FAIL %s: %s" % (type(e).__name__, e))
        return 1
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("np=%d, counts per step %s, layers %s, %d steps "
          "(service %.1fs, apply %.1fs)" % (
              a.p, counts, [l[0] for l in LAYERS], STEPS, t1 - t0, t2 - t1))
    print("max service-vs-apply error, FLT_EPSILON units of the magnitude "
          "(limit %g): %s" % (TOL_ULPS, ", ".join(
              "%s %.2f" % kv for kv in sorted(ck.max_ulps.items()))))
    print("max error vs float64, relative to max |ref|: %s" % ", ".join(
        "%s %.1e (limit %g)" % (k, v, TOL_REF[k])
        for k, v in sorted(ck.max_ref.items())))
    if ck.fails:
        print("vs_apply: %d checks failed" % ck.fails)
        return 1
    print("vs_apply: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
