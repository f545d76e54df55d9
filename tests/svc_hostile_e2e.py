#!/usr/bin/python3
"""Hostile clients against a real `mpirun -np 2 syncbnd` (issue 17), every
case bounded in time, traffic only over Unix sockets and loopback:

    svc_hostile_e2e.py --mpirun MPIRUN --syncbnd SYNCBND [--only NAME]

bombs, slow-loris, slow reader, desync, reset during a collective, kill -9
of a rank, kill -9 during checkpoint_save, another uid. Each case prints
one line "figure: CASE | what happened | the figure measured", which
scripts/reliability collects for README's Reliability section. Exit 0 on
success, 1 on a failed check, 77 without msgpack/numpy.
"""
import os
import pwd
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import svc_cross_rank as xr  # noqa: E402 (skips with 77 without numpy)
import svc_rely_e2e as rl  # noqa: E402

np = xr.np
sc = xr.sc
check = xr.check


def figure(case, what, fig):
    print("figure: %s | %s | %s" % (case, what, fig), flush=True)


def unix(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    return s


def closed_with(s, timeout=10.0):
    """(error code or None, seconds) until the worker closed s."""
    t0 = time.time()
    code = None
    while time.time() - t0 < timeout:
        r = rl.recv_frame(s, timeout)
        if r is None:
            return code, time.time() - t0
        code = code or rl.err_code(r)
    fail("connection still open after %g s" % timeout)


def fail(msg):
    raise AssertionError(msg)


def hello_latency(c, n=50):
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        c.hello()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[n // 2]


def case_bombs(job):
    bombs = {
        "depth 37": struct.pack(">I", 40) + b"\x81\xa1a" + b"\x91" * 37,
        "map of 2^32-1 pairs": struct.pack(">I", 6) + b"\xdf\xff\xff\xff\xff\xa1",
        "str of 4 GiB": struct.pack(">I", 8) + b"\x81\xa1a\xdb\xff\xff\xff\xf0",
        "frame of 4 GiB": struct.pack(">I", 0xFFFFFFF0),
        "shape 2^62 x 4": None,
    }
    x = {"dtype": "f32", "shape": [2 ** 62, 4], "data": b"\0" * 16}
    body = rl.msgpack.packb({"op": "forward", "id": 1, "layer": 0, "step": 0,
                             "train": False, "x": x}, use_bin_type=True)
    bombs["shape 2^62 x 4"] = struct.pack(">I", len(body)) + body
    worst = 0.0
    codes = []
    for name, raw in bombs.items():
        s = unix(job.paths[0])
        s.sendall(raw)
        if name.startswith("shape"):
            r = rl.recv_frame(s)
            code, took = rl.err_code(r), 0.0
            s.close()
        else:
            code, took = closed_with(s)
        check(code is not None, "bomb %s: no error" % name)
        codes.append("%s: %s" % (name, code))
        worst = max(worst, took)
    job.c[0].hello()
    figure("msgpack and shape bombs", "; ".join(codes) + "; worker serves on",
           "closed within %.0f ms" % (worst * 1000))


def case_slowloris(args, tmp):
    job = xr.Job(args.mpirun, args.syncbnd, 2, os.path.join(tmp, "sl-sock"),
                 os.path.join(tmp, "sl-state"),
                 ["--frame-timeout", "2", "--max-clients", "256"])
    try:
        c = job.c[0]
        idle = hello_latency(c)
        slow = []
        for _ in range(200):
            s = unix(job.paths[0])
            s.sendall(b"\x00\x00")  # half a header, then nothing
            slow.append(s)
        t0 = time.time()
        during = hello_latency(c)
        left = len(slow)
        while left and time.time() - t0 < 10:
            time.sleep(0.1)
            left = sum(1 for s in slow if not rl.readable(s))
        took = time.time() - t0
        check(left == 0, "%d slow-loris connections still open" % left)
        check(during <= 2 * idle + 0.002, "latency %.3f ms during vs %.3f ms "
              "idle" % (during * 1e3, idle * 1e3))
        for s in slow:
            s.close()
        figure("200 slow-loris connections (--frame-timeout 2)",
               "all closed with TIMEOUT; a normal client served meanwhile",
               "closed %.1f s after they stalled; hello %.3f ms vs %.3f ms idle"
               % (took, during * 1e3, idle * 1e3))
    finally:
        job.stop()


def case_slow_reader(args, tmp):
    cap = 4 << 20
    job = xr.Job(args.mpirun, args.syncbnd, 2, os.path.join(tmp, "sr-sock"),
                 os.path.join(tmp, "sr-state"), ["--max-output", str(cap)])
    try:
        c = job.c[0]
        lid = c.register("sr_bn", "batchnorm", channels=4)
        pids = rl.worker_pids(job)
        base = max(rl.rss_kib(p) for p in pids)
        x = np.ones((64, 4, 1024), dtype=np.float32)
        req = {"op": "forward", "layer": lid, "step": 0, "train": False,
               "x": sc.encode_tensor(x)}
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(job.paths[0])
        t0 = time.time()
        sent = 0
        try:
            for k in range(64):
                req["id"] = k + 1
                rl.send_frame(s, req)
                sent += 1
        except OSError:
            pass
        peak = max(rl.rss_kib(p) for p in pids)
        while time.time() - t0 < 10 and not rl.readable(s):
            time.sleep(0.05)
        # Reading now shows the replies, then the close.
        n = 0
        while rl.recv_frame(s, 5) is not None:
            n += 1
        took = time.time() - t0
        check(n < sent, "all %d replies arrived: not dropped" % sent)
        growth = (peak - base) / 1024.0
        check(growth < 3 * cap / 2 ** 20 + 32, "worker grew %.0f MiB" % growth)
        c.hello()
        figure("slow reader (--max-output 4 MiB, 1 MiB replies, never reads)",
               "closed by the worker after %d requests (%d replies read "
               "later); other clients served" % (sent, n),
               "worker RSS +%.0f MiB; closed %.1f s after its first request"
               % (growth, took))
    finally:
        job.stop()


def case_desync(job):
    other = sc.SyncbnClient(job.paths[0], timeout=10)
    other.hello()
    s = unix(job.paths[0])
    rl.send_frame(s, {"op": "hello", "id": 1, "version": 1})
    rl.recv_frame(s)
    s.sendall(b"\x00\x00\x00\x05\xc1\xc1\xc1\xc1\xc1")  # a bad msgpack body
    code, took = closed_with(s)
    check(code == "MALFORMED", "desync: %r" % code)
    other.hello()
    other.sock.close()
    figure("protocol desync (a frame of invalid msgpack)",
           "MALFORMED, that connection closed; another client on the worker "
           "unaffected", "closed in %.1f ms" % (took * 1e3))


def case_reset(job):
    lid = job.par(lambda r, c: c.register("rs_sbn", "syncbatchnorm",
                                          channels=3))[0]
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    s = unix(job.paths[0])
    rl.send_frame(s, {"op": "forward", "id": 1, "layer": lid, "step": 0,
                      "train": True, "x": sc.encode_tensor(x)})
    time.sleep(0.2)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()  # a reset with the forward pending on rank 0 only
    t0 = time.time()
    job.par(lambda r, c: c.forward(lid, 1, True, x))
    took = time.time() - t0
    figure("client reset during a pending syncbatchnorm forward",
           "its entry withdrawn; the next step of both ranks completes",
           "next step in %.0f ms" % (took * 1e3))


def procs_with(mark):
    out = subprocess.run(["pgrep", "-f", mark], capture_output=True,
                         text=True).stdout.split()
    return [int(p) for p in out if int(p) != os.getpid()]


def rank_pid(job, rank):
    """The pid of the worker of rank (from the environment mpirun gave it)."""
    for p in rl.worker_pids(job):
        with open("/proc/%d/environ" % p, "rb") as f:
            env = f.read().split(b"\0")
        if ("OMPI_COMM_WORLD_RANK=%d" % rank).encode() in env:
            return p
    fail("no worker of rank %d" % rank)


def case_kill_rank(args, tmp):
    sock = os.path.join(tmp, "kr-sock")
    job = xr.Job(args.mpirun, args.syncbnd, 2, sock,
                 os.path.join(tmp, "kr-state"))
    try:
        lid = job.c[1].register("kr_sbn", "syncbatchnorm", channels=3)
        job.c[0].register("kr_sbn", "syncbatchnorm", channels=3)
        x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
        s = job.c[1].sock
        rl.send_frame(s, {"op": "forward", "id": 7, "layer": lid, "step": 0,
                          "train": True, "x": sc.encode_tensor(x)})
        time.sleep(0.2)  # rank 1 waits for rank 0
        victim = rank_pid(job, 0)
        t0 = time.time()
        os.kill(victim, signal.SIGKILL)
        r = rl.recv_frame(s, 30)
        seen = time.time() - t0
        rc = job.proc.wait(30)
        took = time.time() - t0
        check(rc != 0, "mpirun exited 0 after a kill -9")
        time.sleep(0.5)
        left = procs_with(sock)
        check(not left, "orphans after kill -9: %r" % left)
        what = "closed" if r is None else rl.err_code(r)
        figure("kill -9 of one rank (the other waits in a collective)",
               "mpirun exit %d; the other rank's client: %s; no orphans"
               % (rc, what), "client told in %.1f s, mpirun exited in %.1f s"
               % (seen, took))
    finally:
        job.stop()


def case_kill_save(args, tmp):
    sock, state = os.path.join(tmp, "ks-sock"), os.path.join(tmp, "ks-state")
    job = xr.Job(args.mpirun, args.syncbnd, 2, sock, state)
    layers = 4
    try:
        for i in range(layers):
            job.par(lambda r, c: c.register("big%d" % i, "batchnorm",
                                            channels=1 << 18))
        job.par(lambda r, c: c.checkpoint_save("ck"))
        good = open(os.path.join(state, "ck"), "rb").read()
        for c in job.c:
            rl.send_frame(c.sock, {"op": "checkpoint_save", "id": 9,
                                   "name": "ck"})
        # Kill as soon as rank 0 has its temporary file open.
        deadline = time.time() + 20
        while time.time() < deadline and not any(
                f.startswith(".sbntmp-") for f in os.listdir(state)):
            time.sleep(0.001)
        for p in rl.worker_pids(job):
            os.kill(p, signal.SIGKILL)
        job.proc.wait(30)
    finally:
        job.stop()
    tmps = [f for f in os.listdir(state) if f.startswith(".sbntmp-")]
    job = xr.Job(args.mpirun, args.syncbnd, 2, sock, state)
    try:
        for i in range(layers):
            job.par(lambda r, c: c.register("big%d" % i, "batchnorm",
                                            channels=1 << 18))
        t0 = time.time()
        job.par(lambda r, c: c.checkpoint_load("ck"))
        took = time.time() - t0
        same = open(os.path.join(state, "ck"), "rb").read() == good
        left = [f for f in os.listdir(state) if f.startswith(".sbntmp-")]
        check(not left, "temporaries after restart: %r" % left)
        figure("kill -9 of both ranks during checkpoint_save (%.0f MiB)"
               % (len(good) / 2 ** 20),
               "%d temporary left by the kill, removed at restart; the %s "
               "checkpoint loads" % (len(tmps), "previous" if same else "new"),
               "load in %.2f s" % took)
    finally:
        job.stop()


def case_other_uid(job):
    if os.geteuid() != 0 or shutil.which("useradd") is None:
        print("SKIPPED other uid: needs root and useradd")
        figure("connection from another uid", "skipped (no root/useradd)",
               "-")
        return
    name = "sbnrely%d" % os.getpid()
    subprocess.run(["useradd", "-M", "-s", "/usr/sbin/nologin", name],
                   check=True, capture_output=True)
    try:
        uid = pwd.getpwnam(name).pw_uid
        code = ("import socket,sys\n"
                "s=socket.socket(socket.AF_UNIX)\n"
                "try:\n s.connect(sys.argv[1])\n"
                " s.sendall(b'\\x00\\x00\\x00\\x01\\x80')\n"
                " print('reply', s.recv(200))\n"
                "except OSError as e:\n print('refused', e.errno)\n")
        out = subprocess.run(
            [sys.executable, "-c", code, job.paths[0]],
            preexec_fn=lambda: (os.setgid(uid), os.setuid(uid)),
            capture_output=True, text=True, timeout=20).stdout.strip()
        check(out.startswith("refused") or b"FORBIDDEN" in out.encode(),
              "another uid: %r" % out)
        job.c[0].hello()
        what = ("connect() fails with errno %s (the socket directory is "
                "0700)" % out.split()[1] if out.startswith("refused")
                else "FORBIDDEN from the peer-uid check")
        figure("connection from another uid (throwaway user)", what,
               "worker serves on")
    finally:
        subprocess.run(["userdel", name], capture_output=True)


def main():
    return rl.run_suite("svc_hostile_e2e", rl.parse_args(),
                        [case_bombs, case_desync, case_reset, case_other_uid],
                        [case_slowloris, case_slow_reader, case_kill_rank,
                         case_kill_save])


if __name__ == "__main__":
    sys.exit(main())
