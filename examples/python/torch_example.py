#!/usr/bin/python3
"""Normalization layers served by syncbnd, used as torch modules.

    mpirun -np 1 build/bin/syncbnd --socket-dir /tmp/sbn &
    /usr/bin/python3 examples/python/torch_example.py /tmp/sbn/rank-0.sock

Trains a tiny model (Linear -> norm -> Linear) for a few steps twice, once
with each norm layer computed by the service and once with torch's own
module, from the same initial weights and data, and checks that the
outputs and the losses agree to 1e-5 (relative). Exit 0 when they do.
"""
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# The installed package, else the one in this checkout (src/python).
sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                             "..", "..", "src", "python"))
from syncbn.client import SyncbnClient  # noqa: E402


class _ServiceNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, mod):
        mod.step += 1
        step = mod.step
        y = mod.client.forward(mod.layer, step, mod.training,
                               x.detach().float().numpy(),
                               weight.detach().float().numpy(),
                               bias.detach().float().numpy())
        ctx.mod, ctx.step, ctx.train = mod, step, mod.training
        return torch.from_numpy(y).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        if not ctx.train:
            raise RuntimeError("backward of an eval forward is not kept")
        dx, dw, db = ctx.mod.client.backward(ctx.mod.layer, ctx.step,
                                             dy.detach().float().numpy())
        return (torch.from_numpy(dx), torch.from_numpy(dw).reshape(ctx.mod.weight.shape),
                torch.from_numpy(db).reshape(ctx.mod.bias.shape), None)


class ServiceNorm(torch.nn.Module):
    """An affine norm layer whose forward and backward run in syncbnd.

    Running statistics live in the worker; weight and bias are torch
    parameters passed with every forward."""

    def __init__(self, client, name, kind, pshape, **params):
        super().__init__()
        self.client = client
        self.layer = client.register(name, kind, **params)
        self.weight = torch.nn.Parameter(torch.ones(pshape))
        self.bias = torch.nn.Parameter(torch.zeros(pshape))
        self.step = -1

    def forward(self, x):
        return _ServiceNorm.apply(x, self.weight, self.bias, self)


def make_norm(kind, client, tag):
    if kind == "batchnorm":
        ref = torch.nn.BatchNorm1d(16)
        svc = client and ServiceNorm(client, "bn-" + tag, "batchnorm", (16,), channels=16)
    elif kind == "groupnorm":
        ref = torch.nn.GroupNorm(4, 16)
        svc = client and ServiceNorm(client, "gn-" + tag, "groupnorm", (16,), channels=16, groups=4)
    else:
        ref = torch.nn.LayerNorm(16)
        svc = client and ServiceNorm(client, "ln-" + tag, "layernorm", (16,), normalized_shape=[16])
    return ref, svc


def rel(a, b):
    return float((a - b).norm() / max(float(b.norm()), 1e-30))


def run(kind, client, steps=5):
    torch.manual_seed(1)
    ref_norm, svc_norm = make_norm(kind, client, "%d" % os.getpid())
    lin1, lin2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 1)
    init = [p.detach().clone() for p in (*lin1.parameters(), *lin2.parameters())]

    def model(norm):
        a, b = torch.nn.Linear(8, 16), torch.nn.Linear(16, 1)
        with torch.no_grad():
            for p, v in zip((*a.parameters(), *b.parameters()), init):
                p.copy_(v)
        return torch.nn.Sequential(a, norm, torch.nn.ReLU(), b)

    m_ref, m_svc = model(ref_norm), model(svc_norm)
    o_ref = torch.optim.SGD(m_ref.parameters(), lr=0.1)
    o_svc = torch.optim.SGD(m_svc.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(2)
    worst = 0.0
    for _ in range(steps):
        x, t = torch.randn(12, 8, generator=g), torch.randn(12, 1, generator=g)
        outs = []
        for m, o in ((m_ref, o_ref), (m_svc, o_svc)):
            o.zero_grad()
            y = m(x)
            loss = ((y - t) ** 2).mean()
            loss.backward()
            o.step()
            outs.append(y.detach())
        worst = max(worst, rel(outs[1], outs[0]))
    m_ref.eval()
    m_svc.eval()
    with torch.no_grad():
        x = torch.randn(5, 8, generator=g)
        worst = max(worst, rel(m_svc(x), m_ref(x)))
    return worst


def main():
    if len(sys.argv) != 2:
        print("usage: torch_example.py SOCKET", file=sys.stderr)
        return 2
    client = SyncbnClient(sys.argv[1])
    client.hello()
    bad = 0
    for kind in ("batchnorm", "groupnorm", "layernorm"):
        e = run(kind, client)
        ok = e <= 1e-5
        bad += not ok
        print("%-10s max relative difference to torch %.2e %s" % (kind, e, "ok" if ok else "FAIL"))
    client.bye()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
