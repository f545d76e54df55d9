"""SyncBatchNorm for CPU tensors, synchronized by syncbnd.

torch.nn.SyncBatchNorm refuses CPU tensors. syncbn.torch.SyncBatchNorm
takes the same constructor arguments (process_group becomes group_size:
ranks per sync group, None for the whole job) and computes everything in
the trainer: only each channel's (count, mean, M2) goes to the worker of
this rank, which merges the records of its sync group (Chan's formula),
moves the running statistics and answers with the global mean and
inverse standard deviation; backward sends the two per-channel sums
(Σdy, Σdy·x̂) the same way. The tensors never travel, so a layer costs two
small round trips per step whatever its size.

running_mean, running_var and num_batches_tracked are ordinary buffers
that this module moves exactly as the worker moves its copy (the same
float64 update rounded to float32), so state_dict() saves them and they
equal the worker's bit for bit; load_state_dict() pushes them to the
worker. Eval mode normalizes with the buffers and never calls the worker.

    import syncbn.torch as sbt
    model = sbt.convert_sync_batchnorm(model)   # names from module paths
    # launched as: mpirun -np P syncbnd -- python3 train.py

GroupNorm, LayerNorm and InstanceNorm need no synchronization: use
torch's modules (re-exported here); convert_sync_batchnorm leaves them
alone.
"""
import itertools

import numpy as np
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from syncbn.client import SyncbnClient, decode_vec64, encode_vec64

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


class _SyncBNFunction(torch.autograd.Function):
    """Training forward and backward of SyncBatchNorm: local sums, the
    group's merge through the worker, local normalization."""

    @staticmethod
    def forward(ctx, x, weight, bias, mod):
        dims = [0] + list(range(2, x.dim()))
        C = x.shape[1]
        n_local = x.numel() // C if C > 0 else 0
        if n_local > 0:
            # torch's var_mean (Welford, in the input's type, as its own
            # BatchNorm) is one pass; the merge across ranks is in float64.
            var, mean = torch.var_mean(x.detach(), dims, unbiased=False)
            mean = mean.double()
            m2 = var.double() * n_local
        else:
            mean = m2 = torch.zeros(C, dtype=torch.float64)
        step = mod._next_step()
        client, layer = mod._attach()
        r = client.call("stats", layer=layer, step=step, count=int(n_local),
                        mean=encode_vec64(mean.numpy()),
                        m2=encode_vec64(m2.numpy()))
        count = decode_vec64(r["count"])
        gmean = decode_vec64(r["mean"])
        mod._move_running(count, gmean, decode_vec64(r["var_unbiased"]))
        shape = _bshape(x)
        mean_t = torch.from_numpy(gmean).to(x.dtype).view(shape)
        invstd_t = torch.from_numpy(decode_vec64(r["invstd"])).to(x.dtype).view(shape)
        xhat = (x - mean_t) * invstd_t
        y = xhat
        if weight is not None:
            y = torch.addcmul(bias.view(shape), xhat, weight.view(shape))
        ctx.save_for_backward(xhat, invstd_t, weight)
        ctx.mod, ctx.step = mod, step
        ctx.count = torch.from_numpy(np.maximum(count, 1.0)).view(shape)
        return y

    @staticmethod
    def backward(ctx, dy):
        xhat, invstd, weight = ctx.saved_tensors
        dims = [0] + list(range(2, dy.dim()))
        # Sums in the gradient's type (torch's cascade summation), sent
        # and merged in float64.
        sum_dy = dy.sum(dims).double()
        sum_dy_xhat = (dy * xhat).sum(dims).double()
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            # Every rank's model asks for the same input gradients, so the
            # group's ranks all submit this entry.
            client, layer = ctx.mod._attach()
            r = client.call("stats_backward", layer=layer, step=ctx.step,
                            sum_dy=encode_vec64(sum_dy.numpy()),
                            sum_dy_xhat=encode_vec64(sum_dy_xhat.numpy()))
            shape = _bshape(dy)
            g_dy = torch.from_numpy(decode_vec64(r["sum_dy"])).view(shape)
            g_dyx = torch.from_numpy(decode_vec64(r["sum_dy_xhat"])).view(shape)
            scale = invstd if weight is None else invstd * weight.view(shape)
            dx = torch.addcmul(dy - (g_dy / ctx.count).to(dy.dtype), xhat,
                               (g_dyx / ctx.count).to(dy.dtype), value=-1) * scale
        if weight is not None:
            # Local, as in torch.nn.SyncBatchNorm: the trainer averages
            # parameter gradients (DistributedDataParallel or all_reduce).
            dw = sum_dy_xhat.to(weight.dtype)
            db = sum_dy.to(weight.dtype)
        return dx, dw, db, None


class SyncBatchNorm(_BatchNorm):
    """torch.nn.SyncBatchNorm for CPU tensors (see the module docstring).

    num_features, eps, momentum (None: cumulative average), affine,
    track_running_stats, device, dtype: as torch.nn.SyncBatchNorm.
    group_size: ranks per sync group (group k holds ranks k*g..k*g+g-1);
    None or 0 synchronizes the whole job. name: the layer's name in the
    worker, the same on every rank; convert_sync_batchnorm and
    name_layers set it from the module path, otherwise it is
    "syncbatchnorm.<k>" in construction order. client: a SyncbnClient;
    None uses default_client()."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, group_size=None, device=None,
                 dtype=None, name=None, client=None):
        super().__init__(num_features, eps, momentum, affine,
                         track_running_stats, device=device, dtype=dtype)
        if group_size is not None and (not isinstance(group_size, int) or group_size < 0):
            raise ValueError("group_size: expected None or an int >= 0, got %r"
                             % (group_size,))
        self.group_size = group_size or 0
        self.layer_name = name if name is not None else "syncbatchnorm.%d" % next(_unnamed)
        self._client = client
        self._layer = None
        self._step = -1

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError("expected at least 2D input (got %dD input)" % x.dim())

    def _next_step(self):
        self._step += 1
        return self._step

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

    def forward(self, x):
        self._check_input_dim(x)
        bn_training = self.training or self.running_mean is None
        if not (bn_training and self.training):
            # Eval: the buffers (or, without running statistics, this
            # rank's batch, as torch.nn.SyncBatchNorm does) and no worker.
            return torch.nn.functional.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias,
                bn_training, 0.0, self.eps)
        return _SyncBNFunction.apply(x, self.weight, self.bias, self)

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


def _convert(module, path, group_size, client, prefix):
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm):
        p = module.weight if module.affine else module.running_mean
        out = SyncBatchNorm(module.num_features, module.eps, module.momentum,
                            module.affine, module.track_running_stats,
                            group_size=group_size,
                            device=p.device if p is not None else None,
                            dtype=p.dtype if p is not None else None,
                            name=prefix + (path or "bn"), client=client)
        _copy_bn(module, out)
        out._orig_cls = type(module)
    for n, child in module.named_children():
        out.add_module(n, _convert(child, path + "." + n if path else n,
                                   group_size, client, prefix))
    return out


def convert_sync_batchnorm(module, group_size=None, client=None, prefix=""):
    """Replaces every BatchNorm*d (any _BatchNorm but ours) in module with
    SyncBatchNorm, keeping its parameters, running statistics, train/eval
    mode and requires_grad; returns module (or the new layer when module
    itself is one). Layer names are prefix + the module path
    ("features.1"), so every rank that builds the same model names the
    same layers; give a prefix when one process trains several models
    against the same workers. GroupNorm, LayerNorm and InstanceNorm are
    left as they are: they do not synchronize."""
    return _convert(module, "", group_size, client, prefix)


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
