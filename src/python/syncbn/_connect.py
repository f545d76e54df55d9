"""Opening the connection to a syncbnd worker: its Unix socket (by default
the one the launcher names in SYNCBN_SOCKET) or TCP, waiting for a worker
that is still starting."""
import os
import socket
import time


class ConnectError(ConnectionError):
    """No worker answered at the address within the wait; the message
    names the address and what to do."""


def socket_path(path=None):
    """The Unix socket to use: path, else $SYNCBN_SOCKET. A directory
    means the socket of this process's rank in it (rank-<r>.sock, r from
    SYNCBN_RANK or the MPI launcher's rank variables)."""
    if path is None:
        path = os.environ.get("SYNCBN_SOCKET")
    if not path:
        raise ConnectError(
            "no syncbnd socket given: pass path= or set SYNCBN_SOCKET "
            "(`mpirun -np P syncbnd -- COMMAND` sets it for COMMAND)")
    if os.path.isdir(path):
        path = os.path.join(path, "rank-%d.sock" % local_rank_hint())
    return path


def local_rank_hint():
    """This process's rank as launchers say it, 0 when none does."""
    for k in ("SYNCBN_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK",
              "RANK"):
        v = os.environ.get(k)
        if v is not None and v.isdigit():
            return int(v)
    return 0


def split_hostport(tcp):
    """'HOST:PORT' or '[IPV6]:PORT' -> (host, port)."""
    if tcp.startswith("["):
        host, sep, port = tcp[1:].partition("]:")
    else:
        host, sep, port = tcp.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("tcp: expected HOST:PORT or [IPV6]:PORT, got %r" % tcp)
    return host, int(port)


def open_socket(path=None, tcp=None, timeout=60.0, wait=30.0):
    """A connected socket with `timeout` for each operation. A worker that
    is not there yet (no socket file, or nothing listening) is retried
    until `wait` seconds have passed; then ConnectError names the
    address."""
    if tcp is not None:
        host, port = split_hostport(tcp)
        where = "tcp %s" % tcp

        def attempt():
            return socket.create_connection((host, port), timeout=timeout)
    else:
        path = socket_path(path)
        where = "Unix socket %s" % path

        def attempt():
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(timeout)
            try:
                s.connect(path)
            except BaseException:
                s.close()
                raise
            return s
    deadline = time.monotonic() + max(0.0, wait)
    delay = 0.01
    while True:
        try:
            return attempt()
        except (FileNotFoundError, ConnectionRefusedError) as e:
            if time.monotonic() >= deadline:
                raise ConnectError(
                    "no syncbnd worker at %s after waiting %.1f s (%s); start "
                    "it with `mpirun -np P syncbnd -- COMMAND` or point "
                    "SYNCBN_SOCKET at its socket" % (where, wait, e.strerror)
                ) from None
            time.sleep(delay)
            delay = min(delay * 2, 0.2)
