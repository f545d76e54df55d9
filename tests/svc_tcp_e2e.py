#!/usr/bin/python3
"""syncbnd over TCP with a token (mpi/service/PROTOCOL.md, section "TCP").

    svc_tcp_e2e.py --mpirun MPIRUN --syncbnd SYNCBND

1. `mpirun -np 2 syncbnd --tcp 127.0.0.1:PORT --token-file F` (F mode
   0600): each rank prints its ready line and then listens on PORT + rank.
   On every rank's port:
   - the right token (as bin and as str) gets the normal hello reply, and
     then register + forward work, including a frame larger than the
     pre-authentication cap;
   - a wrong token, a token of another length, a hello without a token and
     a first request that is not hello each get UNAUTHORIZED and then EOF;
   - a frame header above 4096 bytes before authentication gets
     FRAME_TOO_LARGE and then EOF;
   and the Unix socket still serves without a token. A loopback bind
   prints no warning.
2. A token file with mode 0644 makes the job fail with a message naming
   the file; --tcp without --token-file is a usage error (exit 2).
3. Binding 0.0.0.0 prints the warning about unencrypted traffic.

Every wait has a deadline and every job is stopped (SIGTERM, then SIGKILL
to its process group) on every path. Exit 77 (skip) without msgpack.
"""
import argparse
import math
import os
import queue
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

try:
    import msgpack
except ImportError:
    print("svc_tcp_e2e: msgpack missing; skipping")
    sys.exit(77)

MPI_FLAGS = ["--oversubscribe", "--bind-to", "none", "--mca", "pml", "ob1",
             "--mca", "btl", "self,vader,tcp"]
MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
READY = re.compile(r"^syncbnd: rank (\d+) ready on (.+)$")
LISTEN = re.compile(r"^syncbnd: rank (\d+) listening on tcp (.+):(\d+)$")
# ASCII, so that it can also be sent as a msgpack str.
TOKEN = b"s3cret token: 0123456789abcdef/+=~"
PREAUTH_MAX = 4096
IO_TIMEOUT = 10.0


class Fail(Exception):
    pass


def check(cond, what):
    if not cond:
        raise Fail(what)


class Job:
    """`mpirun -np P syncbnd ...`, stdout read on a thread, stderr to a
    file."""

    def __init__(self, a, tmp, name, np, args, mpi_timeout=60):
        self.lines = queue.Queue()
        self.errpath = os.path.join(tmp, name + ".stderr")
        self.err = open(self.errpath, "w")
        cmd = ([a.mpirun] + MPI_FLAGS +
               ["--timeout", str(mpi_timeout), "-np", str(np), a.syncbnd] +
               args)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                     stderr=self.err, text=True,
                                     env=dict(os.environ, **MPI_ENV),
                                     start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def stderr_text(self):
        if not self.err.closed:
            self.err.flush()
        with open(self.errpath, errors="replace") as f:
            return f.read()

    def wait_lines(self, np, timeout):
        """Returns ({rank: socket path}, {rank: (host, port)}) once every
        rank printed its ready and listening lines, checking their order."""
        ready, tcp = {}, {}
        deadline = time.monotonic() + timeout
        while len(ready) < np or len(tcp) < np:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Fail("ready %s, listening %s after %gs; stderr:\n%s" %
                           (sorted(ready), sorted(tcp), timeout,
                            self.stderr_text()))
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise Fail("syncbnd exited (status %s) before every rank was "
                           "ready; stderr:\n%s" %
                           (self.proc.wait(timeout=15), self.stderr_text()))
            m = READY.match(line)
            if m:
                ready[int(m.group(1))] = m.group(2)
                continue
            m = LISTEN.match(line)
            if m:
                r = int(m.group(1))
                check(r in ready, "rank %d: listening line before its ready "
                      "line" % r)
                tcp[r] = (m.group(2), int(m.group(3)))
        return ready, tcp

    def stop(self):
        """SIGTERM to mpirun (which stops every worker), then SIGKILL to the
        whole process group."""
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)
        if not self.err.closed:
            self.err.close()
        return self.proc.returncode


# ---------------------------------------------------------------- wire


def send_frame(s, body, declared=None):
    n = len(body) if declared is None else declared
    s.sendall(struct.pack(">I", n) + body)


def recv_exact(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise Fail("connection closed after %d of %d bytes" %
                       (len(buf), n))
        buf += chunk
    return buf


def recv_reply(s):
    n = struct.unpack(">I", recv_exact(s, 4))[0]
    return msgpack.unpackb(recv_exact(s, n), raw=False)


def expect_eof(s, what):
    """The server must close the connection (after its reply)."""
    try:
        rest = s.recv(1)
    except ConnectionResetError:
        return
    except socket.timeout:
        raise Fail("%s: connection still open %gs after the error" %
                   (what, IO_TIMEOUT))
    check(rest == b"", "%s: bytes after the error reply: %r" % (what, rest))


def connect_tcp(port):
    s = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
    s.settimeout(IO_TIMEOUT)
    return s


def call(s, req):
    send_frame(s, msgpack.packb(req, use_bin_type=True))
    return recv_reply(s)


def expect_error(rep, code, what, contains=None):
    err = rep.get("error") if isinstance(rep, dict) else None
    check(err is not None, "%s: expected %s, got %r" % (what, code, rep))
    check(err.get("code") == code, "%s: expected %s, got %r" %
          (what, code, err))
    if contains is not None:
        check(contains in err.get("message", ""),
              "%s: message %r lacks %r" % (what, err.get("message"), contains))


def hello(token=None, rid=1):
    req = {"op": "hello", "id": rid, "version": 2}
    if token is not None:
        req["token"] = token
    return req


def tensor(shape, values):
    return {"dtype": "f32", "shape": list(shape), "layout": "nchw",
            "data": struct.pack("<%df" % len(values), *values)}


def floats(t):
    return struct.unpack("<%df" % (len(t["data"]) // 4), t["data"])


def bn_train_ref(x, n, c, hw, eps):
    """BatchNorm training output (weight 1, bias 0) in float64."""
    y = [0.0] * len(x)
    for ch in range(c):
        idx = [(i * c + ch) * hw + j for i in range(n) for j in range(hw)]
        mean = math.fsum(x[k] for k in idx) / len(idx)
        var = math.fsum((x[k] - mean) ** 2 for k in idx) / len(idx)
        inv = 1.0 / math.sqrt(var + eps)
        for k in idx:
            y[k] = (x[k] - mean) * inv
    return y


# ---------------------------------------------------------------- checks


def check_authorized(port, rank, np, token, tag):
    """The right token, then register and a forward whose frame is larger
    than the pre-authentication cap."""
    s = connect_tcp(port)
    try:
        rep = call(s, hello(token, rid=11))
        check("error" not in rep, "%s: hello refused: %r" % (tag, rep))
        check(rep.get("id") == 11 and rep.get("server") == "syncbnd" and
              isinstance(rep.get("protocol"), int) and
              rep.get("rank") == rank and rep.get("size") == np,
              "%s: unexpected hello reply %r" % (tag, rep))
        hello_reply = rep
        rep = call(s, {"op": "register", "id": 12, "name": "tcp_bn_" + tag,
                       "kind": "batchnorm", "channels": 2})
        check("error" not in rep and isinstance(rep.get("layer"), int),
              "%s: register: %r" % (tag, rep))
        layer = rep["layer"]
        n, c, hw = 4, 2, 160  # 1280 floats: a 5 KiB frame, above the cap
        x = [math.sin(0.37 * i + rank) * (1 + i % 7) for i in range(n * c * hw)]
        x = list(struct.unpack("<%df" % len(x), struct.pack("<%df" % len(x),
                                                            *x)))
        req = {"op": "forward", "id": 13, "layer": layer, "step": 1,
               "train": True, "x": tensor((n, c, hw), x)}
        body = msgpack.packb(req, use_bin_type=True)
        check(len(body) > PREAUTH_MAX, "%s: test frame too small" % tag)
        rep = call(s, req)
        check("error" not in rep, "%s: forward: %r" % (tag, rep))
        y = floats(rep["y"])
        ref = bn_train_ref(x, n, c, hw, 1e-5)
        err = max(abs(a - b) for a, b in zip(y, ref))
        check(len(y) == len(ref) and err < 1e-5,
              "%s: forward differs from the reference by %g" % (tag, err))
        rep = call(s, {"op": "bye", "id": 14})
        check(rep.get("id") == 14 and "error" not in rep,
              "%s: bye: %r" % (tag, rep))
        expect_eof(s, tag + " after bye")
    finally:
        s.close()
    return hello_reply


def check_refused(port, tag, send, code, contains):
    s = connect_tcp(port)
    try:
        send(s)
        rep = recv_reply(s)
        expect_error(rep, code, tag, contains)
        expect_eof(s, tag)
    finally:
        s.close()


def packed(req):
    return lambda s: send_frame(s, msgpack.packb(req, use_bin_type=True))


def check_rank(port, rank, np):
    """Returns (TCP connections made, UNAUTHORIZED and FRAME_TOO_LARGE
    refusals expected, the hello reply after authentication)."""
    tag = "rank %d" % rank
    authorized = [TOKEN, TOKEN.decode("ascii")]
    for i, tok in enumerate(authorized):
        hello_reply = check_authorized(port, rank, np, tok,
                                       "r%d_%d" % (rank, i))
    wrong = bytearray(TOKEN)
    wrong[-1] ^= 1
    refused = [
        ("wrong token", packed(hello(bytes(wrong))), "UNAUTHORIZED",
         "wrong token"),
        ("token prefix", packed(hello(TOKEN[:-1])), "UNAUTHORIZED",
         "wrong token"),
        ("token plus a byte", packed(hello(TOKEN + b"x")), "UNAUTHORIZED",
         "wrong token"),
        ("wrong str token", packed(hello(TOKEN.decode("ascii").upper())),
         "UNAUTHORIZED", "wrong token"),
        ("missing token", packed(hello(None)), "UNAUTHORIZED",
         "without a token"),
        ("register first", packed({"op": "register", "id": 3, "name": "x",
                                   "kind": "batchnorm", "channels": 1}),
         "UNAUTHORIZED", "must be"),
        ("garbage first", lambda s: send_frame(s, b"\xc1\xc1"),
         "UNAUTHORIZED", "must be"),
        ("big pre-auth header",
         lambda s: send_frame(s, b"", declared=PREAUTH_MAX + 1),
         "FRAME_TOO_LARGE", "before authentication"),
    ]
    for what, send, code, contains in refused:
        check_refused(port, "%s %s" % (tag, what), send, code, contains)
    codes = [r[2] for r in refused]
    return (len(authorized) + len(refused), codes.count("UNAUTHORIZED"),
            codes.count("FRAME_TOO_LARGE"), hello_reply)


def check_unix(path, rank, tcp_conns, unauthorized, too_large, tcp_hello):
    """The Unix socket needs no token and its hello reply is the one TCP
    got; its metrics count the TCP refusals that the server made (this
    connection is accepted one more)."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(IO_TIMEOUT)
    try:
        s.connect(path)
        rep = call(s, hello(None, rid=11))
        check(rep == tcp_hello, "rank %d: hello over Unix %r differs from "
              "hello over TCP %r" % (rank, rep, tcp_hello))
        m = call(s, {"op": "metrics", "id": 22})
        check("error" not in m, "rank %d: metrics: %r" % (rank, m))
        got = (m.get("connections"), m.get("auth_failures"),
               m.get("errors", {}).get("UNAUTHORIZED"),
               m.get("errors", {}).get("FRAME_TOO_LARGE"))
        want = (tcp_conns + 1, unauthorized, unauthorized, too_large)
        check(got == want, "rank %d: metrics (connections, auth_failures, "
              "UNAUTHORIZED, FRAME_TOO_LARGE) = %r, expected %r" %
              (rank, got, want))
        # Complete frames: hello, register, forward, bye per authorized
        # connection, one per refused hello, and hello + metrics here (the
        # oversized header is not a frame).
        frames = 2 * 4 + unauthorized + 2  # two authorized connections
        check(m.get("frames_in") == frames and
              m.get("bytes_in", 0) > 2 * PREAUTH_MAX,
              "rank %d: frames_in %r (expected %d), bytes_in %r" %
              (rank, m.get("frames_in"), frames, m.get("bytes_in")))
    finally:
        s.close()


def no_sanitizer_report(job):
    """Under the sanitizer build, a worker's error or leak report fails the
    test even if the replies looked right."""
    err = job.stderr_text()
    check("Sanitizer" not in err, "sanitizer report:\n" + err)


def free_port_pair():
    """A port P with P and P + 1 free on 127.0.0.1 (a race with other
    programs remains; the caller retries a job whose bind failed)."""
    for _ in range(50):
        a = socket.socket()
        b = socket.socket()
        try:
            a.bind(("127.0.0.1", 0))
            p = a.getsockname()[1]
            if p + 1 > 65535:
                continue
            try:
                b.bind(("127.0.0.1", p + 1))
            except OSError:
                continue
            return p
        finally:
            a.close()
            b.close()
    raise Fail("no free pair of ports")


def write_token(path, data, mode):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mpirun", default="mpirun")
    ap.add_argument("--syncbnd", required=True)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="svctcp-")
    jobs = []
    np = 2
    try:
        tokfile = os.path.join(tmp, "token")
        # One trailing newline is not part of the token.
        write_token(tokfile, TOKEN + b"\n", 0o600)

        # 1. Two ranks on loopback, PORT + rank.
        for attempt in range(3):
            port = free_port_pair()
            sockdir = os.path.join(tmp, "sock%d" % attempt)
            job = Job(a, tmp, "np2_%d" % attempt, np,
                      ["--socket-dir", sockdir, "--tcp", "127.0.0.1:%d" % port,
                       "--token-file", tokfile])
            jobs.append(job)
            try:
                paths, tcp = job.wait_lines(np, timeout=40)
                break
            except Fail:
                job.stop()
                if ("address already in use" in job.stderr_text().lower()
                        and attempt < 2):
                    continue
                raise
        for r in range(np):
            check(tcp[r] == ("127.0.0.1", port + r),
                  "rank %d listens on %r, expected 127.0.0.1:%d" %
                  (r, tcp[r], port + r))
        for r in range(np):
            conns, unauthorized, too_large, h = check_rank(port + r, r, np)
            check_unix(paths[r], r, conns, unauthorized, too_large, h)
        check(job.proc.poll() is None, "syncbnd died during the checks")
        job.stop()
        check("WARNING" not in job.stderr_text(),
              "a loopback bind printed a warning:\n" + job.stderr_text())
        no_sanitizer_report(job)
        print("svc_tcp_e2e: right/wrong/missing token, non-hello, pre-auth "
              "cap: ok on %d ranks" % np)

        # 2. A token file open to others is refused; the message names it.
        loose = os.path.join(tmp, "loose-token")
        write_token(loose, TOKEN, 0o644)
        job = Job(a, tmp, "loose", 1,
                  ["--socket-dir", os.path.join(tmp, "sockL"), "--tcp",
                   "127.0.0.1:0", "--token-file", loose], mpi_timeout=20)
        jobs.append(job)
        try:
            rc = job.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            raise Fail("syncbnd with a 0644 token file did not exit")
        err = job.stderr_text()
        check(rc != 0, "syncbnd with a 0644 token file exited 0")
        check(loose in err and "group or others" in err,
              "no message naming %s:\n%s" % (loose, err))
        out = subprocess.run([a.syncbnd, "--tcp", "127.0.0.1:1"],
                             capture_output=True, text=True, timeout=30,
                             env=dict(os.environ, **MPI_ENV))
        check(out.returncode == 2 and "--token-file" in out.stderr,
              "--tcp without --token-file: status %d, %r" %
              (out.returncode, out.stderr))
        print("svc_tcp_e2e: loose token file and missing --token-file "
              "refused")

        # 3. A non-loopback bind warns (port 0: any free port).
        job = Job(a, tmp, "any", 1,
                  ["--socket-dir", os.path.join(tmp, "sockA"), "--tcp",
                   "0.0.0.0:0", "--token-file", tokfile])
        jobs.append(job)
        _, tcp = job.wait_lines(1, timeout=40)
        check(tcp[0][0] == "0.0.0.0" and tcp[0][1] > 0,
              "0.0.0.0: unexpected listening line %r" % (tcp[0],))
        deadline = time.monotonic() + 10
        while ("WARNING" not in job.stderr_text() and
               time.monotonic() < deadline):
            time.sleep(0.1)
        err = job.stderr_text()
        check("WARNING" in err and "0.0.0.0" in err and
              "unencrypted" in err and "try tokens" in err,
              "0.0.0.0: no warning naming the risk:\n" + err)
        job.stop()
        no_sanitizer_report(job)
        print("svc_tcp_e2e: non-loopback bind warns")

        # 4. Without the token nobody holds a client slot for long: an
        # unauthenticated connection gets TIMEOUT at the authentication
        # deadline (min(10 s, frame_timeout)), silent or trickling.
        job = Job(a, tmp, "deadline", 1,
                  ["--socket-dir", os.path.join(tmp, "sockD"), "--tcp",
                   "127.0.0.1:0", "--token-file", tokfile,
                   "--frame-timeout", "1", "--idle-timeout", "300"])
        jobs.append(job)
        _, tcp = job.wait_lines(1, timeout=40)
        for trickle in (False, True):
            s = connect_tcp(tcp[0][1])
            t0 = time.monotonic()
            if trickle:
                # A header, then one body byte every 0.2 s until the worker
                # answers: partial frames do not extend the deadline.
                body = msgpack.packb(hello(TOKEN), use_bin_type=True)
                s.sendall(struct.pack(">I", len(body)))
                for i in range(len(body) - 1):
                    if select.select([s], [], [], 0.2)[0]:
                        break
                    try:
                        s.sendall(body[i:i + 1])
                    except OSError:
                        break
            rep = recv_reply(s)
            waited = time.monotonic() - t0
            expect_error(rep, "TIMEOUT", "unauthenticated client (trickle %s)"
                         % trickle)
            check(waited < 5, "unauthenticated client (trickle %s) closed "
                  "after %.1f s, deadline 1 s" % (trickle, waited))
            expect_eof(s, "unauthenticated client after TIMEOUT")
            s.close()
        job.stop()
        no_sanitizer_report(job)
        print("svc_tcp_e2e: unauthenticated connections time out at the "
              "authentication deadline")
    except Fail as e:
        print("svc_tcp_e2e: FAIL: %s" % e)
        return 1
    finally:
        for job in jobs:
            try:
                job.stop()
            except Exception as e:  # keep cleaning up the others
                print("svc_tcp_e2e: stopping a job: %s" % e)
        shutil.rmtree(tmp, ignore_errors=True)
    print("svc_tcp_e2e: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
