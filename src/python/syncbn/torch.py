"""SyncBatchNorm for CPU tensors, synchronized by syncbnd.

torch.nn.SyncBatchNorm refuses CPU tensors. syncbn.torch.SyncBatchNorm
takes the same constructor arguments (process_group becomes group_size:
ranks per sync group, None for the whole job) and has two ways to run a
training step, the same mathematics (equal to float rounding):

- "stats": everything is computed in the trainer and only each channel's
  (count, mean, M2) goes to the worker of this rank, which merges the
  records of its sync group (Chan's formula), moves the running
  statistics and answers with the global mean and inverse standard
  deviation; backward sends the two per-channel sums (Σdy, Σdy·x̂) the
  same way. The tensors never travel: two small round trips per step.
- "shm": the whole tensors go to the worker through a shared-memory
  region (protocol 6: a sealed memfd, the socket carries only offsets),
  and the worker's C kernels normalize; the trainer copies x in and y
  out. Where a region cannot be had for a step (a tensor larger than the
  worker's memory budget allows) that step's tensors travel inline on
  the socket instead, with the same result.

path= picks one: "stats", "shm", or "auto" (the default), which measures
both on the layer's first training steps (AUTO_WARMUP + AUTO_ROUNDS steps
of each, alternating in the same run, forward + backward) and keeps the
one whose fastest measured step was faster. The ranks of the sync group
choose together (a vote through the worker, as a `stats` entry of a
small helper layer), so every rank takes the same path at every step, as
the worker requires.
"shm" and "auto" fall back to "stats" when any rank of the group cannot
use shared memory: a TCP connection, a worker older than protocol 6, a
refused region, or a dtype other than float32 ("shm" then warns).

running_mean, running_var and num_batches_tracked are ordinary buffers
kept equal to the worker's copy bit for bit: the stats path moves them
exactly as the worker does (the same float64 update rounded to float32),
the shm path reads the worker's (a get_state pipelined behind the
forward, so it costs no extra round trip). state_dict() saves them;
load_state_dict() pushes them to the worker. Eval mode normalizes with
the buffers and never calls the worker.

    import syncbn.torch as sbt
    model = sbt.convert_sync_batchnorm(model)   # names from module paths
    # launched as: mpirun -np P syncbnd -- python3 train.py

GroupNorm, LayerNorm and InstanceNorm need no synchronization: use
torch's modules (re-exported here); convert_sync_batchnorm leaves them
alone.
"""
import itertools
import socket
import time
import warnings
import weakref

import numpy as np
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from syncbn.client import (SyncbnClient, SyncbnError, _shm_tensor, decode_tensor,
                           decode_vec64, encode_tensor, encode_vec64)

PATHS = ("auto", "stats", "shm")
# path="auto": the steps of each path run before measuring (registration,
# the region's first mapping), then the measured steps of each; the
# paths alternate, stats first.
AUTO_WARMUP = 1
AUTO_ROUNDS = 4

GroupNorm = torch.nn.GroupNorm
LayerNorm = torch.nn.LayerNorm
InstanceNorm1d = torch.nn.InstanceNorm1d
InstanceNorm2d = torch.nn.InstanceNorm2d
InstanceNorm3d = torch.nn.InstanceNorm3d

_default_client = None
_unnamed = itertools.count()


def default_client():
    """The process-wide client the modules use when given none: one
    connection to $SYNCBN_SOCKET, opened (and greeted) on first use."""
    global _default_client
    if _default_client is None:
        c = SyncbnClient()
        c.hello()
        _default_client = c
    return _default_client


def set_default_client(client):
    """Makes client (a SyncbnClient, or None to reconnect lazily) the one
    modules without their own use."""
    global _default_client
    _default_client = client


def _bshape(x):
    return [1, x.shape[1]] + [1] * (x.dim() - 2)


class _StatsBNFunction(torch.autograd.Function):
    """The stats path's training forward and backward: local sums, the
    group's merge through the worker, local normalization. Every pass over
    the tensors is one of torch's fused BatchNorm kernels: the local
    moments from native_batch_norm in training mode with eps 0 (so its
    inverse standard deviation gives the variance back), the normalization
    and both halves of backward from its eval mode fed with the global
    statistics, which subtracts the mean before it scales."""

    @staticmethod
    def forward(ctx, x, weight, bias, mod, step):
        C = x.shape[1]
        n_local = x.numel() // C if C > 0 else 0
        xd = x.detach()
        if n_local > 0:
            # Welford in the input's type, as torch's own BatchNorm; the
            # merge across ranks is in float64. A constant channel has an
            # infinite inverse and so a zero variance.
            _, mean, inv = torch.native_batch_norm(xd, None, None, None, None,
                                                   True, 0.0, 0.0)
            mean = mean.double()
            m2 = n_local / inv.double().square()
        else:
            mean = m2 = torch.zeros(C, dtype=torch.float64)
        client, layer = mod._attach()
        # want: the four vectors used here, not invstd (a worker that
        # predates the key ignores it and sends all five).
        r = client.call("stats", layer=layer, step=step, count=int(n_local),
                        mean=encode_vec64(mean.numpy()),
                        m2=encode_vec64(m2.numpy()),
                        want=["count", "mean", "var", "var_unbiased"])
        count = decode_vec64(r["count"])
        gmean = decode_vec64(r["mean"])
        mod._move_running(count, gmean, decode_vec64(r["var_unbiased"]))
        gmean_t = torch.from_numpy(gmean).to(x.dtype)
        gvar_t = torch.from_numpy(decode_vec64(r["var"])).to(x.dtype)
        y = torch.batch_norm(xd, weight, bias, gmean_t, gvar_t, False, 0.0,
                             mod.eps, False)
        ctx.save_for_backward(xd, weight, gmean_t, gvar_t)
        ctx.mod, ctx.step = mod, step
        ctx.count = torch.from_numpy(np.maximum(count, 1.0))
        return y

    @staticmethod
    def backward(ctx, dy):
        t0 = time.perf_counter()
        x, weight, mean, var = ctx.saved_tensors
        eps = ctx.mod.eps
        dy = dy.contiguous(memory_format=_memory_format(x))
        # Σdy and Σdy·x̂ over this rank's batch, x̂ from the global
        # statistics (eval-mode backward: grad_bias and grad_weight; torch
        # 1.13's kernel divides by zero on an empty batch).
        if x.numel() > 0:
            _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
                dy, x, weight, mean, var, None, None, False, eps, [False, True, True])
        else:
            sum_dy_xhat = sum_dy = torch.zeros(x.shape[1], dtype=x.dtype)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            # Every rank's model asks for the same input gradients, so the
            # group's ranks all submit this entry.
            client, layer = ctx.mod._attach()
            r = client.call("stats_backward", layer=layer, step=ctx.step,
                            sum_dy=encode_vec64(sum_dy.double().numpy()),
                            sum_dy_xhat=encode_vec64(sum_dy_xhat.double().numpy()))
            g_dy = torch.from_numpy(decode_vec64(r["sum_dy"])) / ctx.count
            g_dyx = torch.from_numpy(decode_vec64(r["sum_dy_xhat"])) / ctx.count
            # dx = w·invstd·(dy − Σdy/n − x̂·Σdy·x̂/n): the x̂ terms are one
            # more eval-mode normalization (x̂·a + b, the mean subtracted
            # first), the dy term one addcmul.
            scale = torch.rsqrt(var.double() + eps)
            if weight is not None:
                scale = scale * weight.double()
            t = torch.batch_norm(x, (-scale * g_dyx).to(x.dtype),
                                 (-scale * g_dy).to(x.dtype), mean, var, False,
                                 0.0, eps, False)
            dx = torch.addcmul(t, dy, scale.to(x.dtype).view(_bshape(x)))
        if weight is not None:
            # Local, as in torch.nn.SyncBatchNorm: the trainer averages
            # parameter gradients (DistributedDataParallel or all_reduce).
            dw = sum_dy_xhat.to(weight.dtype)
            db = sum_dy.to(weight.dtype)
        ctx.mod._timed(ctx.step, time.perf_counter() - t0)
        return dx, dw, db, None, None


def _memory_format(x):
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
            and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


class _Arena:
    """One shared-memory region per connection, shared by all its layers
    (a connection may hold only 16 regions): the input at offset 0, the
    output at half the size. The requests on a connection run one at a
    time and the outputs are copied out before the next, so one region
    serves them all; it is replaced by one twice as large when a tensor
    outgrows it (the worker keeps the old mapping until the connection
    closes, within its memory budget)."""

    def __init__(self, client):
        self.client, self.region, self.failed = client, None, None

    def get(self, nbytes):
        """The region and its half size for a tensor of nbytes, or None
        when no region can be had (self.failed says why)."""
        half = -(-max(nbytes, 1) // 4096) * 4096
        r = self.region
        if r is not None and r.size // 2 >= half:
            return r, r.size // 2
        if self.failed is not None:
            return None
        size = 2 * max(half, r.size if r is not None else 0)
        try:
            new = self.client.shm_attach(size)
        except (SyncbnError, OSError, AttributeError) as e:
            # A refused region (RESOURCE: the budget or the 16 regions)
            # leaves the steps inline; the first refusal is final, so a
            # large layer does not retry every step.
            self.failed = str(e)
            return None
        if r is not None:
            try:
                r.mm.close()
            except BufferError:
                pass  # a view of it is still alive: the GC unmaps it later
        self.region = new
        return new, new.size // 2


_arenas = weakref.WeakKeyDictionary()


def _arena(client):
    a = _arenas.get(client)
    if a is None:
        a = _arenas[client] = _Arena(client)
    return a


def _shm_usable(client):
    """Why this connection cannot carry shared memory, or None when it
    can: a Unix socket to a worker of protocol 6 or later."""
    sock = getattr(client, "sock", None)
    if sock is None or sock.family != socket.AF_UNIX:
        return "not a Unix socket connection (TCP)"
    if client.info is None:
        client.hello()
    if int(client.info.get("protocol", 0)) < 6:
        return "the worker speaks protocol %s (< 6)" % client.info.get("protocol")
    return None


def _io(client, arena, shape, src, op, keys, in_key, out_key, extra):
    """Runs a forward or backward of the shm path: src into the region (or
    inline when there is none), op pipelined with the extra requests.
    Returns the output as a new tensor and the replies."""
    n = src.numel() * 4
    got = arena.get(n) if n > 0 else None
    if got is None:
        keys[in_key] = encode_tensor(src.numpy())
    else:
        region, half = got
        torch.from_numpy(region.array(0, shape)).copy_(src)
        keys[in_key] = _shm_tensor(shape, "nchw", region.region, 0)
        keys[out_key + "_at"] = {"region": region.region, "offset": half}
    replies = client.calls([(op, keys)] + extra)
    if got is None:
        out = torch.from_numpy(decode_tensor(replies[0][out_key]))
    else:
        out = torch.from_numpy(got[0].array(got[1], shape)).clone()
    return out.view(shape), replies


class _ShmBNFunction(torch.autograd.Function):
    """The shm path: the worker's forward and backward of the layer, with
    the tensors in the connection's region."""

    @staticmethod
    def forward(ctx, x, weight, bias, mod, step):
        client, layer = mod._attach()
        xc = x.detach().contiguous()
        keys = {"layer": layer, "step": step, "train": True}
        if weight is not None:
            keys["weight"] = encode_tensor(weight.detach().numpy())
            keys["bias"] = encode_tensor(bias.detach().numpy())
        extra = [("get_state", {"layer": layer})] if mod.track_running_stats else []
        y, replies = _io(client, _arena(client), tuple(xc.shape), xc,
                         "forward", keys, "x", "y", extra)
        if extra:
            mod._take_running(replies[1])
        ctx.mod, ctx.step, ctx.affine = mod, step, weight is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        t0 = time.perf_counter()
        client, layer = ctx.mod._attach()
        dyc = dy.contiguous()
        keys = {"layer": layer, "step": ctx.step}
        dx, replies = _io(client, _arena(client), tuple(dyc.shape), dyc,
                          "backward", keys, "dy", "dx", [])
        dw = db = None
        if ctx.affine:
            dw = torch.from_numpy(decode_tensor(replies[0]["dweight"])).view(-1)
            db = torch.from_numpy(decode_tensor(replies[0]["dbias"])).view(-1)
        ctx.mod._timed(ctx.step, time.perf_counter() - t0)
        return dx if ctx.needs_input_grad[0] else None, dw, db, None, None


_FUNCTIONS = {"stats": _StatsBNFunction, "shm": _ShmBNFunction}


class SyncBatchNorm(_BatchNorm):
    """torch.nn.SyncBatchNorm for CPU tensors (see the module docstring).

    num_features, eps, momentum (None: cumulative average), affine,
    track_running_stats, device, dtype: as torch.nn.SyncBatchNorm.
    group_size: ranks per sync group (group k holds ranks k*g..k*g+g-1);
    None or 0 synchronizes the whole job. name: the layer's name in the
    worker, the same on every rank; convert_sync_batchnorm and
    name_layers set it from the module path, otherwise it is
    "syncbatchnorm.<k>" in construction order. client: a SyncbnClient;
    None uses default_client(). path: "auto", "stats" or "shm" (see the
    module docstring); .sync_path is the path taken once decided (None
    before), the same on every rank of the group."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, group_size=None, device=None,
                 dtype=None, name=None, client=None, path="auto"):
        super().__init__(num_features, eps, momentum, affine,
                         track_running_stats, device=device, dtype=dtype)
        if group_size is not None and (not isinstance(group_size, int) or group_size < 0):
            raise ValueError("group_size: expected None or an int >= 0, got %r"
                             % (group_size,))
        if path not in PATHS:
            raise ValueError("path: expected one of %s, got %r" % (", ".join(PATHS), path))
        self.group_size = group_size or 0
        self.layer_name = name if name is not None else "syncbatchnorm.%d" % next(_unnamed)
        self.path = path
        self.sync_path = "stats" if path == "stats" else None
        # Steps taken by each path, and for "auto" each measured step's
        # path and seconds (forward + backward).
        self.path_steps = {"stats": 0, "shm": 0}
        self._times = {}
        self._client = client
        self._layer = None
        self._vote_layer = None
        self._vote_step = 0
        self._step = -1

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError("expected at least 2D input (got %dD input)" % x.dim())

    def _step_path(self, step, x):
        """The path of this training step: the decided one, or, while
        deciding, the vote on shared memory (step 0) and the measuring
        schedule of "auto" (stats at even steps, shm at odd ones), then
        the vote on the times."""
        if self.sync_path is not None:
            return self.sync_path
        if step == 0:
            why = self._shm_unusable(x)
            agreed = self._vote([0.0 if why else 1.0, 0.0])[0]
            if agreed < 1.0:
                if self.path == "shm":
                    warnings.warn("syncbn.torch: layer %r takes the stats path: "
                                  "shared memory is not usable on %s" % (
                                      self.layer_name, why or "another rank"))
                self.sync_path = "stats"
                return "stats"
            if self.path == "shm":
                self.sync_path = "shm"
                return "shm"
        if step < 2 * (AUTO_WARMUP + AUTO_ROUNDS):
            return ("stats", "shm")[step % 2]
        self.sync_path = self._decide()
        self._times = {}
        return self.sync_path

    def _shm_unusable(self, x):
        if x.dtype != torch.float32:
            return "a %s input (shm carries float32)" % x.dtype
        client, _ = self._attach()
        why = _shm_usable(client)
        if why is None and _arena(client).get(x.numel() * 4) is None:
            why = "this connection (shm_attach: %s)" % _arena(client).failed
        return why

    def _decide(self):
        """The group's vote on the measured steps: the mean over the ranks
        of (fastest shm step - fastest stats step); shm when negative. The
        fastest rather than the median, because a step that the scheduler
        or a late rank slowed says nothing about the path."""
        best = {}
        for p in ("stats", "shm"):
            t = [v[1] for k, v in sorted(self._times.items())
                 if v[0] == p and k >= 2 * AUTO_WARMUP]
            best[p] = min(t) if t else 0.0
        d = self._vote([1.0, best["shm"] - best["stats"]])[1]
        return "shm" if d < 0 else "stats"

    def _vote(self, values):
        """The mean over the group's ranks of values (finite floats): a
        `stats` entry of the helper layer "<name>#path", to which every
        rank contributes a count of 2 (a group of one rank must not make
        a global count of 1)."""
        client, _ = self._attach()
        if self._vote_layer is None:
            self._vote_layer = client.register(
                self.layer_name + "#path", "syncbatchnorm", channels=len(values),
                affine=False, track_running_stats=False, group_size=self.group_size)
        step = self._vote_step
        self._vote_step += 1
        r = client.call("stats", layer=self._vote_layer, step=step, count=2,
                        mean=encode_vec64(np.asarray(values, np.float64)),
                        m2=encode_vec64(np.zeros(len(values))))
        return decode_vec64(r["mean"])

    def _timed(self, step, seconds):
        """Adds a backward's seconds to its step's measurement."""
        if step in self._times:
            self._times[step][1] += seconds

    def _attach(self):
        """Registers the layer with the worker once, and gives the worker
        this module's running statistics, so that the two start equal
        whatever the worker held under that name."""
        if self._layer is None:
            client = self._client if self._client is not None else default_client()
            lid = client.register(self.layer_name, "syncbatchnorm",
                                  channels=self.num_features, eps=float(self.eps),
                                  momentum=None if self.momentum is None else float(self.momentum),
                                  affine=bool(self.affine),
                                  track_running_stats=bool(self.track_running_stats),
                                  group_size=self.group_size)
            self._layer = (client, lid)
            self._push_state()
        return self._layer

    def _push_state(self):
        if self._layer is None or not self.track_running_stats:
            return
        client, lid = self._layer
        client.set_state(lid,
                         running_mean=self.running_mean.detach().float().numpy(),
                         running_var=self.running_var.detach().float().numpy(),
                         num_batches_tracked=int(self.num_batches_tracked))

    def _move_running(self, count, mean, var_unbiased):
        """The worker's update (svc_cmd_step.c, stats): float64 arithmetic
        on the float32 values, rounded to float32; channels without
        values keep theirs; nothing moves when the batch was empty."""
        if not self.track_running_stats or not (count > 0).any():
            return
        if self.momentum is None:
            f = 1.0 / (float(self.num_batches_tracked) + 1.0)
        else:
            f = float(self.momentum)
        has = count > 0
        with torch.no_grad():
            for buf, v in ((self.running_mean, mean), (self.running_var, var_unbiased)):
                old = buf.detach().float().numpy().astype(np.float64)
                new = np.where(has, (1 - f) * old + f * v, old).astype(np.float32)
                buf.copy_(torch.from_numpy(new))
            self.num_batches_tracked.add_(1)

    def _take_running(self, st):
        """The worker's running statistics (a get_state reply), bit for bit."""
        with torch.no_grad():
            for k in ("running_mean", "running_var"):
                getattr(self, k).copy_(torch.from_numpy(decode_tensor(st[k])))
            self.num_batches_tracked.fill_(int(st["num_batches_tracked"]))

    def forward(self, x):
        self._check_input_dim(x)
        bn_training = self.training or self.running_mean is None
        if not (bn_training and self.training):
            # Eval: the buffers (or, without running statistics, this
            # rank's batch, as torch.nn.SyncBatchNorm does) and no worker.
            return torch.nn.functional.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias,
                bn_training, 0.0, self.eps)
        self._step += 1
        step = self._step
        path = self._step_path(step, x)
        self.path_steps[path] += 1
        t0 = time.perf_counter()
        y = _FUNCTIONS[path].apply(x, self.weight, self.bias, self, step)
        if self.sync_path is None:
            self._times[step] = [path, time.perf_counter() - t0]
        return y

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._push_state()

    def extra_repr(self):
        return super().extra_repr() + ", group_size=%d, name=%r" % (
            self.group_size, self.layer_name)

    def __getstate__(self):
        # A copy (deepcopy, pickle) gets no connection: it registers its
        # own layer when first trained.
        d = dict(self.__dict__)
        d["_client"] = None
        d["_layer"] = None
        d["_vote_layer"] = None
        return d


class _BatchNormXd(_BatchNorm):
    """BatchNorm for any input rank, what revert_sync_batchnorm gives when
    the original class is not known."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError("expected at least 2D input (got %dD input)" % x.dim())


def _copy_bn(src, dst):
    with torch.no_grad():
        if src.affine:
            dst.weight.copy_(src.weight)
            dst.bias.copy_(src.bias)
            dst.weight.requires_grad_(src.weight.requires_grad)
            dst.bias.requires_grad_(src.bias.requires_grad)
        if src.track_running_stats:
            dst.running_mean.copy_(src.running_mean)
            dst.running_var.copy_(src.running_var)
            dst.num_batches_tracked.copy_(src.num_batches_tracked)
    if hasattr(src, "qconfig"):
        dst.qconfig = src.qconfig
    dst.train(src.training)


def _convert(module, path, group_size, client, prefix, sync_path):
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm):
        p = module.weight if module.affine else module.running_mean
        out = SyncBatchNorm(module.num_features, module.eps, module.momentum,
                            module.affine, module.track_running_stats,
                            group_size=group_size,
                            device=p.device if p is not None else None,
                            dtype=p.dtype if p is not None else None,
                            name=prefix + (path or "bn"), client=client,
                            path=sync_path)
        _copy_bn(module, out)
        out._orig_cls = type(module)
    for n, child in module.named_children():
        out.add_module(n, _convert(child, path + "." + n if path else n,
                                   group_size, client, prefix, sync_path))
    return out


def convert_sync_batchnorm(module, group_size=None, client=None, prefix="",
                           path="auto"):
    """Replaces every BatchNorm*d (any _BatchNorm but ours) in module with
    SyncBatchNorm, keeping its parameters, running statistics, train/eval
    mode and requires_grad; returns module (or the new layer when module
    itself is one). Layer names are prefix + the module path
    ("features.1"), so every rank that builds the same model names the
    same layers; give a prefix when one process trains several models
    against the same workers. GroupNorm, LayerNorm and InstanceNorm are
    left as they are: they do not synchronize. path: every new layer's
    path= ("auto", "stats" or "shm")."""
    if path not in PATHS:
        raise ValueError("path: expected one of %s, got %r" % (", ".join(PATHS), path))
    return _convert(module, "", group_size, client, prefix, path)


def revert_sync_batchnorm(module):
    """The inverse: every SyncBatchNorm becomes the class it was converted
    from (BatchNormXd for any input rank when it was built directly), with
    its parameters and running statistics."""
    out = module
    if isinstance(module, SyncBatchNorm):
        cls = getattr(module, "_orig_cls", _BatchNormXd)
        p = module.weight if module.affine else module.running_mean
        out = cls(module.num_features, module.eps, module.momentum,
                  module.affine, module.track_running_stats,
                  device=p.device if p is not None else None,
                  dtype=p.dtype if p is not None else None)
        _copy_bn(module, out)
    for n, child in module.named_children():
        out.add_module(n, revert_sync_batchnorm(child))
    return out


def name_layers(module, prefix=""):
    """Names every SyncBatchNorm in module after its path (prefix +
    "layer1.0.bn1"), for models built with SyncBatchNorm directly. Call it
    before the first training step."""
    for path, m in module.named_modules():
        if isinstance(m, SyncBatchNorm):
            if m._layer is not None:
                raise RuntimeError("name_layers: %s is already registered as %r"
                                   % (path or "the module", m.layer_name))
            m.layer_name = prefix + (path or "bn")
    return module


__all__ = ["SyncBatchNorm", "convert_sync_batchnorm", "revert_sync_batchnorm",
           "name_layers", "default_client", "set_default_client", "GroupNorm",
           "LayerNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"]
