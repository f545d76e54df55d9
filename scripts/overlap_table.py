#!/usr/bin/env python3
"""Tables of `syncbn bench layer --vs-unchunked --json` runs.

    overlap_table.py [--label L] RUN.json [RUN.json ...] [-- ...]

Each group of runs (groups separated by "--", each optionally led by
"--label NAME") is one build. For every (layout, shape, pass) it prints the
overhead_per_allreduce of the chunked SyncBN (`sync`) and of the one-
reduction SyncBN (`sync_unchunked`), each the median over the group's runs,
and the bare allreduce's median and best time, so that a reader sees what
the ratio divides by. Where the runs carry mpi_us (the time inside the
communicator's MPI calls), it adds mpi_us over the same bare allreduces
for both variants: the part of the reductions that was not hidden. Then
a summary: the median and the largest ratio over the configurations,
all of them and those over 32 MB per rank. Not run in CI.
"""
import json
import statistics
import sys


def groups(argv):
    out, cur, label = [], [], None
    for a in argv + ["--"]:
        if a == "--":
            if cur:
                out.append((label or "run %d" % (len(out) + 1), cur))
            cur, label = [], None
        elif a.startswith("--label="):
            label = a.split("=", 1)[1]
        else:
            cur.append(a)
    return out


def load(paths):
    """{(layout, shape, pass): {variant: [records]}} over the runs."""
    by = {}
    for p in paths:
        with open(p) as f:
            doc = json.load(f)
        for r in doc["records"]:
            if r["variant"] == "bare_allreduce":
                for ps in ("fwd", "bwd", "fwd+bwd"):
                    k = (r["layout"], tuple(r["shape"]), ps)
                    by.setdefault(k, {}).setdefault("bare", []).append(r)
                continue
            k = (r["layout"], tuple(r["shape"]), r["pass"])
            by.setdefault(k, {}).setdefault(r["variant"], []).append(r)
    return by


def has_mpi(by):
    return all(r.get("mpi_us") is not None for v in by.values()
               for r in v.get("sync", []))


def med(rs, col):
    return statistics.median(r[col] for r in rs)


def main():
    gs = groups(sys.argv[1:])
    if not gs:
        print(__doc__)
        return 2
    data = [(lab, load(ps)) for lab, ps in gs]
    keys = sorted(data[0][1], key=lambda k: (k[2], k[0], k[1]))
    head = "| pass | layout | shape | MB/rank |"
    for lab, _ in data:
        head += " %s: local ms | chunked | unchunked |" % lab
    mpi = [lab for lab, by in data if has_mpi(by)]
    for lab in mpi:
        head += " %s: in MPI, chunked | unchunked |" % lab
    head += " bare allreduce median / best (us) |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    summ = {lab: {"all": ([], [], [], []), "big": ([], [], [], [])}
            for lab, _ in data}
    for k in keys:
        mb = 4 * 1e-6
        for d in k[1]:
            mb *= d
        row = "| %s | %s | %s | %.1f |" % (k[2], k[0], "x".join(map(str, k[1])),
                                           mb)
        bare = None
        for lab, by in data:
            v = by.get(k, {})
            if "sync" not in v or "local" not in v:
                row += " - | - | - |"
                continue
            s = med(v["sync"], "overhead_per_allreduce")
            u = med(v["sync_unchunked"], "overhead_per_allreduce") \
                if "sync_unchunked" in v else float("nan")
            row += " %.2f | %.2f | %.2f |" % (med(v["local"], "median_us") /
                                             1e3, s, u)
            for w in ("all",) + (("big",) if mb > 32 else ()):
                summ[lab][w][0].append(s)
                summ[lab][w][1].append(u)
            bare = v["bare"]
        for lab, by in data:
            if lab not in mpi:
                continue
            v = by.get(k, {})
            n_ar = 2 if k[2] == "fwd+bwd" else 1
            b = n_ar * med(v["bare"], "median_us")
            s = med(v["sync"], "mpi_us") / b
            u = med(v["sync_unchunked"], "mpi_us") / b
            row += " %.2f | %.2f |" % (s, u)
            for w in ("all",) + (("big",) if mb > 32 else ()):
                summ[lab][w][2].append(s)
                summ[lab][w][3].append(u)
        row += " %.0f / %.0f |" % (med(bare, "median_us"), med(bare, "best_us"))
        print(row)
    print()
    print("| build | tensors | configurations | chunked median (max) | "
          "unchunked median (max) | in MPI: chunked | unchunked |")
    print("|---|---|---:|---|---|---|---|")
    for lab, _ in data:
        for w, name in (("all", "all"), ("big", "over 32 MB")):
            s, u, ms, mu = summ[lab][w]
            if not s:
                continue
            extra = " - | - |"
            if ms:
                extra = " %.2f (%.2f) | %.2f (%.2f) |" % (
                    statistics.median(ms), max(ms), statistics.median(mu),
                    max(mu))
            print("| %s | %s | %d | %.2f (%.2f) | %.2f (%.2f) |%s" % (
                lab, name, len(s), statistics.median(s), max(s),
                statistics.median(u), max(u), extra))
    return 0


if __name__ == "__main__":
    sys.exit(main())
