#!/usr/bin/python3
"""Two builds' runs side by side, as a Markdown table.

    scripts/ab_table.py --base b1.json b2.json --new n1.json n2.json

Each --base and --new file is the --json output of one run of
`compare_peers.py` or of `syncbn bench kernels` (measure the two builds
alternately, base then new, in one command, so that both see the same
machine). Per op, pass, layout and shape, the table gives the lowest and
highest of the runs (one value where there was one run) of syncbn's
floor_ratio and, from compare_peers.py, PyTorch's and oneDNN's time over
syncbn's and PyTorch's own floor ratio in the new runs.
"""
import argparse
import json
import sys


def load(paths):
    """Per file, its rows with the pass under "pass_" (compare_peers.py's
    name; the bench's records call it "pass")."""
    runs = []
    for p in paths:
        try:
            with open(p) as f:
                d = json.load(f)
            rows = d["rows"] if "rows" in d else d["records"]
            for r in rows:
                if "pass_" not in r:
                    r["pass_"] = r["pass"]
            runs.append(rows)
        except (OSError, ValueError, KeyError, TypeError) as e:
            sys.exit(f"ab_table: {p}: {e}")
    return runs


def values(runs, key, field):
    out = []
    for rows in runs:
        for r in rows:
            if (r["op"], r["pass_"], r["layout"], tuple(r["shape"])) == key:
                v = r.get(field)
                if v is not None:
                    out.append(v)
    return out


def span(v):
    if not v:
        return "–"
    if len(v) == 1:
        return f"{v[0]:.2f}"
    return f"{min(v):.2f}/{max(v):.2f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", nargs="+", required=True)
    ap.add_argument("--new", nargs="+", required=True)
    a = ap.parse_args()
    base, new = load(a.base), load(a.new)
    keys = []
    for r in new[0]:
        k = (r["op"], r["pass_"], r["layout"], tuple(r["shape"]))
        if k not in keys:
            keys.append(k)
    # Grouped by op, pass and layout in the order they first appear.
    first = {}
    for i, k in enumerate(keys):
        first.setdefault(k[:3], i)
    keys.sort(key=lambda k: first[k[:3]])
    peers = any("torch_ratio" in r for rows in new for r in rows)
    head = "| op | pass | layout | shape | floor_ratio, base → new |"
    fields = ["floor_ratio"]
    if peers:
        head += (" PyTorch ÷ syncbn, base → new | oneDNN ÷ syncbn, base → new"
                 " | PyTorch's floor ratio |")
        fields += ["torch_ratio", "dnnl_ratio"]
    print(head)
    print("|---" * head.count(" | ") + "|---|")
    for k in keys:
        cols = []
        for field in fields:
            cols.append(f"{span(values(base, k, field))} → "
                        f"{span(values(new, k, field))}")
        if peers:
            cols.append(span(values(new, k, "torch_floor_ratio")))
        shape = "x".join(str(s) for s in k[3])
        print(f"| {k[0]} | {k[1]} | {k[2]} | {shape} | " + " | ".join(cols) +
              " |")


if __name__ == "__main__":
    main()
