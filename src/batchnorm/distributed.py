"""`SyncBatchNorm`: batch norm whose batch is the union of every process's batch.

In data-parallel training each process sees a slice of the global batch. This module
normalizes with the statistics of the whole global batch, over any torch.distributed
backend (gloo on CPU, nccl on CUDA), with one `all_reduce` per layer in each direction:

forward, a (3, C) tensor per layer, summed over the processes r:

    row 0:  n_r                                  (values per channel on process r)
    row 1:  n_r (mu_r - s)
    row 2:  m2_r + n_r (mu_r - s)^2

with s a shift common to every process; then, with n = sum n_r,

    mu = s + sum n_r (mu_r - s) / n
    m2 = sum [m2_r + n_r (mu_r - s)^2] - n (mu - s)^2

exact for any s, and free of cancellation when s is close to mu. The shift is this layer's
global mean from its previous call: the output of an all_reduce, so bitwise the same on
every process, and close to the current mean. (The running mean would do as well, but it
is common only as long as nobody loads different buffers on different processes.)

backward, the (2, C) tensor (sum_d, sum_d_xhat) between the backward's two passes
(`ops.batch_norm`'s `sums_to_means` hook), summed over processes;
the gradients of gamma and beta stay local (DDP averages them with every other gradient).

The first call of each layer does two more reductions, once: a handshake that checks
that every process has the same channel count and statistics dtype (a mismatch would
otherwise hang or corrupt the sum), and a (2, C) sum of (n_r, n_r mu_r) that gives the
first shift, the exact global mean.

An empty local batch takes part with zero statistics; the check for two values per
channel reads the global count (one scalar, on the host), so every process raises the same
error. Without an initialized process group, or in a group of one, the layer is exactly
`batchnorm.BatchNorm*`.
"""

from __future__ import annotations

import inspect

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parallel import DistributedDataParallel

from .extras import EXTRA_DEFAULTS, BatchNormExtras, changed_extras, plain_forward, spell_out_extras
from .stats import Stats


def active_group(process_group=None):
    """The group to synchronize over, or None when there is no one to synchronize with."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = dist.group.WORLD if process_group is None else process_group
    return group if dist.get_world_size(group) > 1 else None


def no_buffer_broadcast() -> dict:
    """DistributedDataParallel keywords that turn off its broadcast of rank 0's buffers before
    every forward, which SyncBatchNorm makes unnecessary: `forward_sync_buffers=False` where
    torch has it (buffers are still synchronized once, at construction), else
    `broadcast_buffers=False` (deprecated in torch 2.13, where it also skips that first sync)."""
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


class GroupSync:
    """A `functional.Synchronizer` over one process group, owned by one layer.

    Every process must call `reduce_stats` and `reduce_grads` the same number of times in
    the same order (true when they all run the same model): each is a collective.
    """

    def __init__(self, group, layer: str = "SyncBatchNorm") -> None:
        self.group = group
        self.layer = layer
        self._shift: Tensor | None = None  # previous global mean; None before the first call

    def reduce_stats(self, local: Stats) -> Stats:
        """Global (count, mean, m2), each (C,), from this process's; equal on every process."""
        if self._shift is None:
            self._first_call(local)
        s = self._shift
        d = local.mean - s
        packed = torch.stack((local.count, local.count * d, local.m2 + local.count * d * d))
        self._all_reduce(packed, "batch statistics")
        n, n_d, sq = packed.unbind(0)
        dmu = n_d / n.clamp(min=1)  # n counts values: 0 only for an empty global batch
        # Rounding can take the difference a hair below zero when every value is equal.
        glob = Stats(n, s + dmu, (sq - n * dmu * dmu).clamp(min=0))
        self._shift = _finite(glob.mean)
        return glob

    def reduce_grads(self, sums: Tensor) -> Tensor:
        """Global (2, C) (sum_d, sum_d_xhat); `sums` itself is left as it is (the caller
        still reads its local rows for dgamma and dbeta)."""
        total = sums.clone()
        self._all_reduce(total, "gradient sums")
        return total

    def _first_call(self, local: Stats) -> None:
        """Check channel count and dtype agree across processes, then set the first shift."""
        c, size = local.mean.numel(), local.mean.element_size()
        probe = torch.tensor([c, -c, size, -size], dtype=torch.int64, device=local.mean.device)
        self._all_reduce(probe, "channel-count check", dist.ReduceOp.MAX)
        most_c, least_c, most_size, least_size = probe.tolist()  # host read: first call only
        if most_c != -least_c:
            raise ValueError(
                f"{self.layer}: the processes disagree on the number of channels (from {-least_c} "
                f"to {most_c}; this one has {c}). Every process must build the same model "
                "(num_features) and feed it inputs with the same channel count"
            )
        if most_size != -least_size:
            raise TypeError(
                f"{self.layer}: the processes compute statistics in different dtypes (float64 "
                "input on some, lower precision on others); give every process the same dtype"
            )
        sums = torch.stack((local.count, local.count * local.mean))
        self._all_reduce(sums, "first batch mean")
        self._shift = _finite(sums[1] / sums[0].clamp(min=1))

    def _all_reduce(self, tensor: Tensor, what: str, op=dist.ReduceOp.SUM) -> None:
        try:
            dist.all_reduce(tensor, op=op, group=self.group)
        except RuntimeError as err:  # gloo and nccl: a peer failed, exited or timed out
            raise RuntimeError(
                f"{self.layer}: the all_reduce of {what} across processes failed. Another "
                "process probably raised an error or stopped before reaching this layer: every "
                "process must run every SyncBatchNorm forward and backward, in the same order. "
                f"Cause: {err}"
            ) from err


def _finite(mean: Tensor) -> Tensor:
    """The shift for the next call: a non-finite batch must not poison every later one."""
    return torch.nan_to_num(mean, nan=0.0, posinf=0.0, neginf=0.0)


class SyncBatchNorm(BatchNormExtras, _BatchNorm):
    """Batch norm over the global batch of every process in `process_group` (None: all).

    Input (N, C, *spatial) with any number of spatial dimensions, as torch's SyncBatchNorm;
    the arguments, parameters, buffers and state_dict keys are torch's, and the extras
    are those of `batchnorm.BatchNorm2d` (extras.py) but `virtual_batch_size`
    (`refused_extras` says why; masks are refused for the same reason).
    It subclasses torch's `_BatchNorm`, not `torch.nn.SyncBatchNorm`: DistributedDataParallel
    refuses any `torch.nn.SyncBatchNorm` in a CPU model.

    Batch statistics are synchronized whenever they normalize: in training, and in
    evaluation when the layer keeps no running statistics (unlike torch, which then uses
    each process's own batch); every process must then call forward together. Evaluation
    with running statistics is local (an affine map). The running statistics are updated
    from the global statistics, so they stay identical on every process and DDP needs no
    buffer broadcast: wrap with `DistributedDataParallel(model, **no_buffer_broadcast())`.
    """

    # functional.batch_norm refuses masks and ghost batches together with synchronization; a
    # mask is a forward argument (refused there), a ghost batch size a constructor one (here).
    refused_extras = {
        "virtual_batch_size": "ghost batches, like masks, are not supported together with "
        "SyncBatchNorm (their statistics are not synchronized across processes)",
    }

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        **extras,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias, **extras
        )
        self.process_group = process_group
        self._sync: GroupSync | None = None

    def _check_input_dim(self, input: Tensor) -> None:
        """Any (N, C, *spatial): `validation.validate_input` has already asked for 2 dimensions."""

    def _synchronizer(self) -> GroupSync | None:
        """This layer's GroupSync when batch statistics normalize and others share them."""
        if not (self.training or self.running_mean is None):
            return None
        group = active_group(self.process_group)
        if group is None:
            return None
        if self._sync is None or self._sync.group is not group:
            self._sync = GroupSync(group, type(self).__name__)
        return self._sync

    def __getstate__(self):
        # A process group cannot be copied or pickled; the copy makes its own GroupSync.
        state = super().__getstate__()
        state["_sync"] = None
        return state

    @classmethod
    def convert(cls, module: torch.nn.Module, process_group=None) -> torch.nn.Module:
        """Replace every BatchNorm1d/2d/3d in `module` (torch's or ours) by a SyncBatchNorm.

        Parameters are shared (an optimizer built before still holds them), buffers and the
        training flag are kept, and so are our modules' extras that SyncBatchNorm has
        (`backend`, `renorm`, `unbiased_running_var`); the original class is
        remembered for `revert`. Returns the converted module (a new object when `module`
        itself is a batch norm). ValueError, with `module` left unchanged, for a layer that
        cannot be synchronized: a Lazy module that has not seen an input, or one with
        `virtual_batch_size` (ghost batches, like masks, are not synchronized).
        """

        def target(m: torch.nn.Module, path: str) -> type | None:
            if not isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
                return None
            if not plain_forward(m):
                raise ValueError(
                    f"{type(m).__name__} at {path or 'the top level'} does more in its forward than batch "
                    "norm (timm's BatchNormAct2d applies its drop and act after normalizing), which a "
                    "SyncBatchNorm would drop; convert it with bn.convert first, or with its library's own "
                    "tool (timm.layers.convert_sync_batchnorm)"
                )
            _check_materialized(m, path)
            return cls

        def to_sync(m: torch.nn.Module, path: str) -> torch.nn.Module:
            if target(m, path) is None:
                return m
            new = _rebuild(m, cls, path)
            new.process_group = process_group
            new._reverts_to = type(m)
            return new

        _check_rebuilds(module, target)
        return _map_modules(module, to_sync)

    #: torch.nn.SyncBatchNorm's name for `convert`, so that a script written against torch's
    #: class runs with this one. (torch's own `convert_sync_batchnorm` replaces this package's
    #: layers too, by torch's SyncBatchNorm: our kernels and extras would be gone.)
    convert_sync_batchnorm = convert

    @classmethod
    def revert(cls, module: torch.nn.Module, default: type | None = None) -> torch.nn.Module:
        """Replace every SyncBatchNorm in `module` by the class it was converted from.

        A SyncBatchNorm built directly becomes `default` (e.g. `batchnorm.BatchNorm2d`);
        without one, ValueError. State and every extra are kept as in `convert`; ValueError,
        with `module` left unchanged, when the original class cannot hold an extra set since
        (torch's BatchNorm2d has no `renorm`, say).
        """

        def target(m: torch.nn.Module, path: str) -> type | None:
            if not isinstance(m, cls):
                return None
            original = getattr(m, "_reverts_to", None) or default
            if original is None:
                raise ValueError(
                    f"SyncBatchNorm at {path or 'the top level'} was not made by convert, so its "
                    "original class is unknown; pass default=, e.g. default=batchnorm.BatchNorm2d"
                )
            return original

        def to_local(m: torch.nn.Module, path: str) -> torch.nn.Module:
            original = target(m, path)
            return m if original is None else _rebuild(m, original, path)

        _check_rebuilds(module, target)
        return _map_modules(module, to_local)


spell_out_extras(SyncBatchNorm.__init__, SyncBatchNorm.refused_extras)


def _check_rebuilds(module: torch.nn.Module, target) -> None:
    """Raise what converting any layer would raise, before the first one is replaced;
    target(m, path) is the class `m` becomes, or None to keep it."""
    for path, m in module.named_modules():
        cls = target(m, path)
        if cls is not None:
            _extras_for(m, cls, path)


def _map_modules(module: torch.nn.Module, fn, path: str = "") -> torch.nn.Module:
    """fn(m, path) applied to `module` and, recursively, to its children (replacing them)."""
    out = fn(module, path)
    for name, child in module.named_children():
        out.add_module(name, _map_modules(child, fn, f"{path}.{name}" if path else name))
    return out


def _check_materialized(m: torch.nn.Module, path: str) -> None:
    if isinstance(m, LazyModuleMixin) and m.has_uninitialized_params():
        raise ValueError(
            f"{type(m).__name__} at {path or 'the top level'} has not seen an input yet, so its "
            "number of features is unknown; run one forward pass (model(example_batch)) "
            "before converting"
        )


def _rebuild(old: torch.nn.Module, cls: type, path: str = "") -> torch.nn.Module:
    """A `cls` batch norm with `old`'s configuration, extras, parameters (shared), buffers and
    mode; ValueError, before anything changes, for an extra that `cls` cannot hold."""
    new = cls(
        old.num_features, old.eps, old.momentum, old.affine, old.track_running_stats,
        bias=old.bias is not None, **_extras_for(old, cls, path),
    )
    if old.affine:
        new.weight, new.bias = old.weight, old.bias
    new.running_mean, new.running_var = old.running_mean, old.running_var
    new.num_batches_tracked = old.num_batches_tracked
    new.training = old.training
    if hasattr(old, "qconfig"):
        new.qconfig = old.qconfig
    return new


def _extras_for(old: torch.nn.Module, cls: type, path: str) -> dict:
    """The extras of `old` as keywords for `cls`: those `cls` accepts (none, for torch's
    classes). One it lacks is dropped if it changes nothing (at its default, or `backend`,
    which only picks kernels); otherwise ValueError."""
    accepted = cls.accepted_extras() if issubclass(cls, BatchNormExtras) else ()
    extras = {name: getattr(old, name) for name in accepted if hasattr(old, name)}
    for name, value in changed_extras(old).items():
        if name not in accepted:
            default = EXTRA_DEFAULTS[name]
            why = getattr(cls, "refused_extras", {}).get(name)
            if why:
                hint = f"{why}; set {name}={default!r} first"
            else:
                hint = f"set {name}={default!r} first, or use a batchnorm module, which has it"
            raise ValueError(
                f"{type(old).__name__} at {path or 'the top level'} has {name}={value!r}, which "
                f"{cls.__name__} does not support: {hint}"
            )
    return extras
