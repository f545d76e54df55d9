#!/usr/bin/python3
"""An outside check of `syncbn bench service`: the syncbnd hop measured
with nothing of the project's client code, only Python's socket module and
msgpack, against a Unix-socket echo of the same bytes timed in the same
run.

It starts `mpirun -np 2 syncbnd` in a temporary directory, connects to both
ranks' sockets, registers one syncbatchnorm layer on both, and times
- a `stats` entry (the fast path: C per-channel records, no tensor) on
  both ranks, request sent to each and both replies read, per rep;
- a full-tensor training `forward` + `backward` of an N x C x H x W f32
  tensor (default 8x64x56x56, 6.4 MB) on both ranks;
- the copy floor of the second: per rank, the same request frames
  through a Unix socket pair to an echo thread that answers each with a
  frame of the worker's reply size, both ranks at once, x and dy out, y
  and dx back;
- the collectives an idle job runs: `metrics` before and after 2 s with no
  request (negotiations, gathers, allreduces must not move).

Request frames are packed before the clock starts; replies are read as raw
frames inside the timing and decoded afterwards (and checked: y of the
training forward has mean ~0 and variance ~1 per channel over both ranks,
every stats reply has the merged mean). Usage:

  /usr/bin/python3 scripts/svc_hop_check.py [--syncbnd build/bin/syncbnd]
      [--shape 8,64,56,56] [--reps 20] [--no-speculate]

Prints medians in microseconds and the ratios a reader compares with the
bench's service_stats1 / allreduce1 and service_full / unix_echo rows.
"""
import argparse
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

import msgpack
import numpy as np


def frame(obj):
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def recv_exact(s, n):
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = s.recv_into(view[got:], n - got)
        if k == 0:
            raise RuntimeError("connection closed")
        got += k
    return buf


def recv_frame(s):
    (n,) = struct.unpack(">I", recv_exact(s, 4))
    return recv_exact(s, n)


def call(s, obj):
    s.sendall(frame(obj))
    r = msgpack.unpackb(bytes(recv_frame(s)), raw=False)
    if "error" in r:
        raise RuntimeError("%s: %s" % (obj.get("op"), r["error"]))
    return r


def tensor(a):
    return {"dtype": "f32", "shape": list(a.shape), "data": a.tobytes()}


def start_job(syncbnd, root, extra=()):
    env = dict(os.environ)
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_pml="ob1", OMPI_MCA_btl="self,vader,tcp")
    sock = os.path.join(root, "s")
    p = subprocess.Popen(["mpirun", "--oversubscribe", "--bind-to", "none",
                          "-np", "2", syncbnd, "--socket-dir", sock]
                         + list(extra),
                         env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    paths = [os.path.join(sock, "rank-%d.sock" % r) for r in range(2)]
    conns = []
    t0 = time.time()
    for path in paths:
        while True:
            try:
                c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                c.connect(path)
                break
            except OSError:
                c.close()
                if time.time() - t0 > 60 or p.poll() is not None:
                    p.kill()
                    sys.exit("syncbnd did not start")
                time.sleep(0.1)
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            c.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
        conns.append(c)
    return p, conns


def stats_frames(lid, step, C):
    """Both ranks' `stats` requests of one step: 4 values per channel on
    each rank, mean r + 1 on rank r and M2 1, so the merged mean is
    1.5."""
    return [frame({"op": "stats", "id": step, "layer": lid, "step": step,
                   "count": 4,
                   "mean": {"dtype": "f64", "shape": [C],
                            "data": np.full(C, r + 1.0).tobytes()},
                   "m2": {"dtype": "f64", "shape": [C],
                          "data": np.ones(C).tobytes()}})
            for r in range(2)]


def exchange(socks, frames):
    """Writes frames[i] to socks[i] and reads one reply frame from each,
    one thread per socket (blocking calls release the GIL), as separate
    client processes would: no socket waits for another's transfer."""
    res = [None] * len(socks)

    def run(i):
        socks[i].sendall(frames[i])
        res[i] = recv_frame(socks[i])

    th = [threading.Thread(target=run, args=(i,)) for i in range(len(socks))]
    for t in th:
        t.start()
    for t in th:
        t.join()
    return res


def sequential(conns, frames):
    """Small requests: sent to each rank, then both replies read."""
    for c, f in zip(conns, frames):
        c.sendall(f)
    return [recv_frame(c) for c in conns]


def both(conns, frames):
    """Sends frames[r] to rank r's worker and reads both replies."""
    return exchange(conns, frames)


def echo_floor(frames, replies, reps):
    """The copy floor: per rank, its request frames through a Unix socket
    pair to an echo thread that answers each with a frame of the size of
    the worker's reply; both ranks at once, as in both()."""
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
             for _ in frames[0]]
    for pr in pairs:
        for s in pr:
            for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                s.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)

    def echo(r):
        b = pairs[r][1]
        backs = [struct.pack(">I", n - 4) + bytes(n - 4)
                 for n in (replies[k][r] for k in range(len(frames)))]
        for _ in range(reps):
            for k in range(len(frames)):
                recv_frame(b)
                b.sendall(backs[k])

    th = [threading.Thread(target=echo, args=(r,)) for r in range(len(pairs))]
    for t in th:
        t.start()
    times = []
    socks = [pr[0] for pr in pairs]
    for _ in range(reps):
        t0 = time.perf_counter()
        for k in range(len(frames)):
            exchange(socks, frames[k])
        times.append(time.perf_counter() - t0)
    for t in th:
        t.join()
    for pr in pairs:
        for s in pr:
            s.close()
    return times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--syncbnd", default="build/bin/syncbnd")
    ap.add_argument("--shape", default="8,64,56,56")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--no-speculate", action="store_true",
                    help="start syncbnd with --no-speculate (every round "
                         "negotiates before it reduces)")
    o = ap.parse_args()
    shape = tuple(int(v) for v in o.shape.split(","))
    C = shape[1]
    root = tempfile.mkdtemp(prefix="sbn-hop-")
    job, conns = start_job(o.syncbnd, root,
                           ["--no-speculate"] if o.no_speculate else [])
    try:
        for r, c in enumerate(conns):
            call(c, {"op": "hello", "id": 1, "version": 6})
            lid = call(c, {"op": "register", "id": 2, "name": "chk",
                           "kind": "syncbatchnorm", "channels": C})["layer"]
        rng = np.random.default_rng(1)
        xs = [rng.standard_normal(shape, dtype=np.float32) * (1 + r)
              for r in range(2)]
        dys = [rng.standard_normal(shape, dtype=np.float32) for r in range(2)]

        # stats entries: warm-up 5, then reps.
        st_times = []
        for i in range(5 + o.reps):
            step = 1 + i
            fr = stats_frames(lid, step, C)
            t0 = time.perf_counter()
            rep = sequential(conns, fr)
            dt = time.perf_counter() - t0
            for b in rep:
                m = msgpack.unpackb(bytes(b), raw=False)
                mean = np.frombuffer(m["mean"]["data"], dtype=np.float64)
                assert np.allclose(mean, 1.5), m
            if i >= 5:
                st_times.append(dt)

        # full-tensor forward + backward: warm-up 3, then reps.
        full = []
        last = None
        for i in range(3 + o.reps):
            step = 1000 + i
            fw = [frame({"op": "forward", "id": 1, "layer": lid, "step": step,
                         "train": True, "x": tensor(xs[r])})
                  for r in range(2)]
            bw = [frame({"op": "backward", "id": 2, "layer": lid,
                         "step": step, "dy": tensor(dys[r])})
                  for r in range(2)]
            t0 = time.perf_counter()
            y = both(conns, fw)
            dx = both(conns, bw)
            dt = time.perf_counter() - t0
            if i >= 3:
                full.append(dt)
            last = (y, dx)
        y0 = msgpack.unpackb(bytes(last[0][0]), raw=False)
        y1 = msgpack.unpackb(bytes(last[0][1]), raw=False)
        ya = np.concatenate([np.frombuffer(v["y"]["data"], dtype=np.float32)
                             .reshape(shape) for v in (y0, y1)])
        ch = ya.transpose(1, 0, 2, 3).reshape(C, -1)
        assert np.allclose(ch.mean(axis=1), 0, atol=1e-4)
        assert np.allclose(ch.var(axis=1), 1, atol=1e-3)
        replies = [[len(b) + 4 for b in last[k]] for k in range(2)]
        floor = echo_floor([fw, bw], replies, o.reps)

        # idle: no collective in 2 s.
        keys = ("negotiations", "gathers", "allreduces")
        m0 = [call(c, {"op": "metrics", "id": 3}) for c in conns]
        time.sleep(2.0)
        m1 = [call(c, {"op": "metrics", "id": 4}) for c in conns]
        idle = sum(m1[r][k] - m0[r][k] for r in range(2) for k in keys)
        # the two metrics requests themselves run no collective either.
        zc = [m1[r]["zero_copy_replies"] for r in range(2)]
        cp = [m1[r]["tensor_copies"] for r in range(2)]
        for c in conns:
            call(c, {"op": "bye", "id": 5})
    finally:
        for c in conns:
            c.close()
        job.terminate()
        try:
            job.wait(timeout=30)
        except subprocess.TimeoutExpired:
            job.kill()
        shutil.rmtree(root, ignore_errors=True)

    us = 1e6
    med_st = statistics.median(st_times) * us
    med_full = statistics.median(full) * us
    med_floor = statistics.median(floor) * us
    print("svc_hop_check: np 2, shape %s (%.1f MB per tensor), %d reps, "
          "Python socket + msgpack" %
          ("x".join(map(str, shape)), np.prod(shape) * 4 / 1e6, o.reps))
    print("  stats entry (both ranks)      median %9.1f us  best %9.1f us" %
          (med_st, min(st_times) * us))
    print("  full fwd+bwd (both ranks)     median %9.1f us  best %9.1f us" %
          (med_full, min(full) * us))
    print("  unix echo of the same bytes   median %9.1f us  best %9.1f us" %
          (med_floor, min(floor) * us))
    print("  full / echo                   %.2f (the bench's floor adds the "
          "in-process SyncBN step)" % (med_full / med_floor))
    print("  idle 2 s: %d collectives (negotiations + gathers + allreduces, "
          "both ranks)" % idle)
    print("  worker counters: zero_copy_replies %s, tensor_copies %s" %
          (zc, cp))
    return 0 if idle == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
