#!/usr/bin/python3
"""What syncbnd's poll window (--poll-us) costs the processes beside it,
and what it saves the stats entry.

Starts `mpirun -np 2 syncbnd --poll-us US` (the two workers), and a
client thread that sends a `stats` entry to both ranks every --period-us
microseconds, sleeping in between, as a trainer's SyncBN layers call
while it computes. Meanwhile two compute processes (one per core of a
2-core machine; `syncbn bench kernels`, BatchNorm NCHW at --shape) stand
for the trainers' own work. It prints the compute processes' training-
forward medians, and the stats entries' median and p90, per variant:
`none` (no syncbnd job: the compute alone) and each --poll value,
alternated --rounds times. Usage:

  /usr/bin/python3 scripts/svc_poll_cost.py [--bin build/bin]
      [--poll 200,2000] [--period-us 1000] [--rounds 3] [--json F]

Not run by CI. A poll window longer than the period keeps both workers
spinning (yielding the core at every poll) for the whole run.
"""
import argparse
import importlib.util
import json
import os
import shutil
import statistics
import sys
import subprocess
import tempfile
import threading
import time

here = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location(
    "hop", os.path.join(here, "svc_hop_check.py"))
hop = importlib.util.module_from_spec(spec)
spec.loader.exec_module(hop)


def compute(binary, shape, reps):
    """Two bench processes at once; their train_fwd medians (us)."""
    cmd = [binary, "bench", "kernels", "--op", "batchnorm", "--layout",
           "nchw", "--shape", shape, "--reps", str(reps)]
    ps = [subprocess.Popen(cmd, stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True)
          for _ in range(2)]
    out = []
    for p in ps:
        text, _ = p.communicate()
        for line in text.splitlines():
            f = line.split()
            if len(f) > 6 and f[0] == "kernel" and f[2] == "train_fwd":
                out.append(float(f[6]))
    if len(out) != 2:
        raise SystemExit("svc_poll_cost: the compute bench printed no row")
    return out


def stats_loop(conns, lid, C, period, stop, times):
    step = 0
    while not stop.is_set():
        step += 1
        fr = hop.stats_frames(lid, step, C)
        t0 = time.perf_counter()
        hop.sequential(conns, fr)
        times.append(time.perf_counter() - t0)
        time.sleep(period)


def variant(o, poll):
    if poll is None:
        return {"compute_us": compute(o.syncbn, o.shape, o.reps)}
    root = tempfile.mkdtemp(prefix="sbn-poll-")
    job, conns = hop.start_job(o.syncbnd, root, ["--poll-us", str(poll)])
    C = int(o.shape.split(",")[1])
    try:
        for c in conns:
            hop.call(c, {"op": "hello", "id": 1, "version": 6})
            lid = hop.call(c, {"op": "register", "id": 2, "name": "poll",
                               "kind": "syncbatchnorm",
                               "channels": C})["layer"]
        stop, times = threading.Event(), []
        th = threading.Thread(target=stats_loop,
                              args=(conns, lid, C, o.period_us * 1e-6, stop,
                                    times))
        th.start()
        try:
            us = compute(o.syncbn, o.shape, o.reps)
        finally:
            stop.set()
            th.join()
        for c in conns:
            hop.call(c, {"op": "bye", "id": 5})
        ts = sorted(t * 1e6 for t in times[5:])
        return {"compute_us": us, "entries": len(ts),
                "entry_p50_us": statistics.median(ts),
                "entry_p90_us": ts[int(0.9 * (len(ts) - 1))]}
    finally:
        for c in conns:
            c.close()
        job.terminate()
        job.wait()
        shutil.rmtree(root, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="build/bin")
    ap.add_argument("--poll", default="200,2000")
    ap.add_argument("--period-us", type=int, default=1000)
    ap.add_argument("--shape", default="8,256,14,14")
    ap.add_argument("--reps", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json")
    o = ap.parse_args()
    o.syncbn = os.path.join(o.bin, "syncbn")
    o.syncbnd = os.path.join(o.bin, "syncbnd")
    names = ["none"] + ["poll%s" % p for p in o.poll.split(",")]
    polls = [None] + [int(p) for p in o.poll.split(",")]
    rows = []
    for k in range(o.rounds):
        for name, poll in zip(names, polls):
            print("svc_poll_cost: round %d/%d, %s" % (k + 1, o.rounds, name),
                  file=sys.stderr, flush=True)
            r = variant(o, poll)
            r.update(variant=name, round=k + 1)
            rows.append(r)
    print("variant   round  compute train_fwd us (2 procs)  entry p50 us  "
          "p90 us  entries")
    for r in rows:
        print("%-9s %5d  %12.1f %12.1f   %11s %7s %8s" % (
            r["variant"], r["round"], r["compute_us"][0], r["compute_us"][1],
            "%.1f" % r["entry_p50_us"] if "entry_p50_us" in r else "-",
            "%.1f" % r["entry_p90_us"] if "entry_p90_us" in r else "-",
            r.get("entries", "-")))
    if o.json:
        with open(o.json, "w") as f:
            json.dump({"period_us": o.period_us, "shape": o.shape,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
