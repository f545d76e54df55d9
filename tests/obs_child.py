#!/usr/bin/python3
"""The trainer side of tests/obs_test.sh, one per rank under
`syncbnd --log-level info --timeline ... -- python3 obs_child.py SYNCBN TOKEN_FILE`:
three synchronized `stats` steps (allreduces and per-layer work on the
timeline), a layer registered with other channels on rank 1 (a
LAYER_MISMATCH on both ranks), a step only rank 0 submits (a STALL after
the worker's --stall-timeout), a TCP hello with a wrong token (an
authentication failure) and one with the token file (served), `syncbn metrics --json` on this rank's socket and
the table for the socket directory, then bye."""
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "..", "src", "python"))
import numpy as np  # noqa: E402
import syncbn  # noqa: E402
from syncbn.client import encode_vec64  # noqa: E402


def stats(c, lid, step, C):
    return c.call("stats", layer=lid, step=step, count=4,
                  mean=encode_vec64(np.arange(C, dtype=float)),
                  m2=encode_vec64(np.ones(C)))


def main():
    syncbn_cli, token_file = sys.argv[1], sys.argv[2]
    tcp = os.environ["SYNCBN_TCP"]  # this rank's listener, set by syncbnd
    rank = int(os.environ["SYNCBN_RANK"])
    c = syncbn.Client()
    c.hello()
    ok = c.register("obs.ok", "syncbatchnorm", channels=3)
    for step in range(3):
        stats(c, ok, step, 3)
    mm = c.register("obs.mm", "syncbatchnorm", channels=3 + rank)
    try:
        stats(c, mm, 0, 3 + rank)
        print("rank %d: FAIL: no LAYER_MISMATCH" % rank)
        return 1
    except syncbn.SyncbnError as e:
        if e.code != "LAYER_MISMATCH":
            raise
    st = c.register("obs.st", "syncbatchnorm", channels=2)
    if rank == 0:
        try:
            stats(c, st, 0, 2)
            print("rank 0: FAIL: no STALL")
            return 1
        except syncbn.SyncbnError as e:
            if e.code != "STALL":
                raise
    else:
        time.sleep(2.5)  # past rank 0's stall
    try:
        syncbn.Client(tcp=tcp, token=b"wrong", wait=5)
        print("rank %d: FAIL: a wrong token was accepted" % rank)
        return 1
    except syncbn.SyncbnError as e:
        if e.code != "UNAUTHORIZED":
            raise
    t = syncbn.Client(tcp=tcp, token_file=token_file)
    assert t.info["rank"] == rank, t.info  # the hello TCP requires, with the token
    t.bye()
    m = json.loads(subprocess.run([syncbn_cli, "metrics", "--json"], check=True,
                                  capture_output=True, text=True).stdout)
    assert m["rank"] == rank and m["requests"]["stats"] >= 4, m
    assert m["auth_failures"] == 1 and m["mismatches"] >= 1, m
    table = subprocess.run([syncbn_cli, "metrics", "--socket",
                            os.path.dirname(os.environ["SYNCBN_SOCKET"])],
                           check=True, capture_output=True, text=True).stdout
    assert "rank 0 of 2" in table and "rank 1 of 2" in table, table
    print("rank %d: metrics ok (stats %d, auth failures %d)"
          % (rank, m["requests"]["stats"], m["auth_failures"]))
    c.bye()
    return 0


if __name__ == "__main__":
    sys.exit(main())
