#!/usr/bin/python3
"""syncbnd's regressions found by hostile testing (issue 17), against a
real `mpirun -np 2 syncbnd`:

    svc_rely_e2e.py --mpirun MPIRUN --syncbnd SYNCBND

- a checkpoint request that only one rank sends stalls, and later saves
  and loads that both ranks send still match;
- a step near 2^64 is refused, and normal steps go on afterwards;
- a registration too large for a frame names the argument that sized it.

Exit 0 on success, 1 on a failed check, 77 when msgpack or numpy is
missing. Every wait is bounded (the clients time out after 60 s).
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import svc_cross_rank as xr  # noqa: E402 (skips with 77 without numpy)

np = xr.np
sc = xr.sc
check = xr.check


def test_lone_checkpoint(job):
    """Issue 17, defect 1: a lone checkpoint_save on rank 1 (the other
    rank's trainer died before its save) stalls, and never shifts the keys
    of the saves and loads both ranks send afterwards."""
    job.par(lambda r, c: c.register("ck_bn", "batchnorm", channels=3))
    out = job.par(lambda r, c: c.checkpoint_save("a"))
    check(all(o.get("saved") for o in out), "first save: %r" % out)
    t0 = time.time()
    code, msg = xr._err(lambda: job.c[1].checkpoint_save("b"))
    check(code == "STALL", "lone save on rank 1: %r %r" % (code, msg))
    print("lone checkpoint_save on rank 1: STALL after %.1f s" %
          (time.time() - t0))
    for i in range(3):
        out = job.par(lambda r, c: xr._err(lambda: c.checkpoint_save("a")))
        check(all(o == (None, None) for o in out),
              "save %d after the lone one: %r" % (i, out))
    out = job.par(lambda r, c: xr._err(lambda: c.checkpoint_load("a")))
    check(all(o == (None, None) for o in out), "load after it: %r" % out)
    # The lone request may also carry a name both ranks use later.
    code, _ = xr._err(lambda: job.c[0].checkpoint_save("a"))
    check(code == "STALL", "lone save of 'a' on rank 0: %r" % code)
    # Rank 1 learns of the stall in the same agreement round, a cycle
    # later at most; a request of the same name that reached it before
    # that would be failed by the stall itself (PROTOCOL.md).
    time.sleep(0.3)
    out = job.par(lambda r, c: xr._err(lambda: c.checkpoint_save("a")))
    check(all(o == (None, None) for o in out), "save after lone 'a': %r" %
          out)
    print("checkpoints after lone requests: 5 saves and a load matched")


def test_huge_step(job):
    """Issue 17, defect 3: after step 5, step 2^64 - 3 is refused (steps
    stop at 2^63 - 1) and step 6 still trains."""
    x = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    c = job.c[0]
    lid = c.register("step_bn", "batchnorm", channels=3)
    c.forward(lid, 5, True, x)
    for bad in (2 ** 64 - 3, 2 ** 63):
        code, msg = xr._err(lambda: c.forward(lid, bad, True, x))
        check(code == "BAD_REQUEST" and msg.startswith("step:"),
              "step %d: %r %r" % (bad, code, msg))
    c.forward(lid, 6, True, x)
    c.forward(lid, 2 ** 63 - 1, True, x)  # the largest step trains
    code, _ = xr._err(lambda: c.forward(lid, 7, True, x))
    check(code == "STALE_STEP", "step 7 after 2^63 - 1: %r" % code)
    print("step 2^64 - 3 refused, later steps train")


def test_size_names(job):
    """Issue 17, defect 7: a batchnorm of 2^28 channels is refused naming
    channels, a layernorm naming normalized_shape."""
    c = job.c[0]
    code, msg = xr._err(lambda: c.register("huge_bn", "batchnorm",
                                           channels=2 ** 28))
    check(code == "BAD_PARAMS" and msg.startswith("channels:"),
          "batchnorm of 2^28 channels: %r %r" % (code, msg))
    code, msg = xr._err(lambda: c.register(
        "huge_ln", "layernorm", normalized_shape=[2 ** 14, 2 ** 14]))
    check(code == "BAD_PARAMS" and msg.startswith("normalized_shape:"),
          "layernorm of 2^28 values: %r %r" % (code, msg))
    print("size errors name channels / normalized_shape")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mpirun", default="mpirun")
    ap.add_argument("--syncbnd", required=True)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="svc_rely-")
    os.chmod(tmp, 0o700)
    job = None
    try:
        job = xr.Job(args.mpirun, args.syncbnd, 2, os.path.join(tmp, "sock"),
                     os.path.join(tmp, "state"))
        test_lone_checkpoint(job)
        test_huge_step(job)
        test_size_names(job)
    except AssertionError as e:
        print("svc_rely_e2e: FAILED: %s" % e)
        return 1
    finally:
        if job is not None:
            job.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print("svc_rely_e2e: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
