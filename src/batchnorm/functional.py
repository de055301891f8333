"""`batch_norm`: the one entry point every module calls.

It validates the input, bundles the call (`Call`), names the path that computes it
(`plan`, a `Path`) and runs that path's function (`_PATHS`):

- `Path.EMPTY`: an empty batch, an empty output, nothing updated;
- `Path.OP`: plain batch norm (with the fused activation and residual) and every
  evaluation, through the op layer (ops.py), which picks the kernels by mode and backend;
- `Path.KERNELS`: ghost batches, batch renormalization and synchronization across
  processes: the same op, its statistics step done here (each chunk's statistics, made
  global across processes, renormalization's correction folded into weight and bias) and
  handed to it (`ops.batch_norm`'s `stats` and `sums_to_means`), eager or traced;
- `Path.TORCH_OPS`: masks, and ghost batches and renorm under torch.func transforms:
  differentiable torch ops;
- `Path.SYNC_OUTSIDE_GRAPH`: SyncBatchNorm while a graph is traced: eagerly, outside it.

Every path but `Path.EMPTY` then folds the batch into the running statistics once, in
`_update_running` (the op layer's `update_running_stats`: stats.update_running's rule).
An activation the backend does not fuse
(`Backend.fused_activations`) is applied after the path, as torch's own op. Policy lives
here; the backends only compute.
"""

from __future__ import annotations

import enum
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from . import activations, backends, layout, modes, validation, variants
from . import ops
from .backends.base import Backend
from .channel_params import acc_dtype, affine
from .stats import NonFiniteGuard, Stats, merge_all
from .variants import Renorm


class Synchronizer(Protocol):
    """What SyncBatchNorm plugs in: the two reductions across processes (distributed.py)."""

    def reduce_stats(self, local: Stats) -> Stats:
        """The global statistics from this process's (count, mean, m2), on every process."""

    def reduce_grads(self, sums: Tensor) -> Tensor:
        """The global (2, C) (sum_d, sum_d_xhat) from this process's."""


_DEFAULT_GUARD = NonFiniteGuard("batchnorm.functional.batch_norm")


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    activation: str | None = None,
    residual: Tensor | None = None,
    backend: str | None = "auto",
    num_batches_tracked: Tensor | None = None,
    guard: NonFiniteGuard | None = None,
    sync: Synchronizer | None = None,
    mask: Tensor | None = None,
    virtual_batch_size: int | None = None,
    renorm: Renorm | None = None,
    unbiased_running_var: bool = True,
) -> Tensor:
    """y = g(gamma * (x - mu) / sqrt(var + eps) + beta + residual), per channel.

    Shapes: input (N, C, *spatial); running_mean, running_var, weight, bias (C,) or None;
    residual like input (one that only broadcasts with it, or of another dtype, is added
    after the kernels, as `batch_norm(x) + residual` adds it); mask (N, *spatial) bool.
    Returns a tensor like input, in the input's dtype (statistics are computed in fp32 for
    fp16/bf16, fp64 for fp64), or shaped and typed as that sum for such a residual.

    As `torch.nn.functional.batch_norm`: the batch statistics normalize when `training`
    is true or no running statistics are given; in training the running statistics, when
    given, are updated in place with weight `momentum` for the new batch (None: the
    cumulative average over `num_batches_tracked`, which is then incremented too).
    Deviations from torch: an empty batch returns an empty output and updates nothing, and a
    batch with a non-finite mean or variance leaves the running statistics untouched
    (counted by `guard`, warned once).

    Training-only options (evaluation ignores them: it normalizes every position with the
    running statistics):
    - `mask`: statistics over the positions where mask is True; every position is
      normalized with them, and only valid positions' gradients reach the statistics.
    - `virtual_batch_size=k`: ghost batch norm, each chunk of k examples normalized with its
      own statistics; the running statistics see the merged statistics once per call.
    - `renorm`: batch renormalization (variants.Renorm), its schedule stepped by
      `num_batches_tracked`; needs running statistics.
    - `unbiased_running_var=False`: store the biased batch variance (Keras/Flax convention).
    - `sync`: reductions across processes (SyncBatchNorm); the batch is then the union of
      every process's batch (this process's part may be empty).

    `backend`: "auto", a name from `batchnorm.backends.available()`, or None to read the
    BATCHNORM_BACKEND environment variable.
    """
    x = validation.validate_input(input)
    validation.validate_arguments(x, weight, bias, running_mean, running_var, momentum, eps, activation)
    added_after = None  # a residual the kernels cannot take, added after them as torch adds it
    if residual is not None and not validation.residual_fuses(x, residual):
        added_after, residual = residual, None
    if weight is not None and weight.dim() != 1:  # torch's layer takes (C, 1)
        weight = weight.reshape(-1)
    if bias is not None and bias.dim() != 1:
        bias = bias.reshape(-1)
    if mask is not None:
        variants.validate_mask(x, mask)
    if virtual_batch_size is not None:
        variants.chunks(max(x.shape[0], 1), virtual_batch_size, 1)  # validates k
    if sync is not None and (mask is not None or virtual_batch_size is not None):
        raise ValueError("masks and ghost batches are not supported together with SyncBatchNorm")
    mode = modes.current(x)  # once: every layer below reads this answer
    be = backends.resolve(backend, x, activation, residual is not None, mode).backend  # once: every path and chunk runs it
    training = training or running_mean is None  # torch's rule: batch statistics without running ones
    call = Call(
        x=x, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias,
        training=training, momentum=momentum, eps=eps, activation=activation, residual=residual,
        backend=be, num_batches_tracked=num_batches_tracked, guard=guard or _DEFAULT_GUARD, sync=sync,
        mask=mask, virtual_batch_size=virtual_batch_size, renorm=renorm,
        unbiased_running_var=unbiased_running_var, mode=mode,
        update=training and running_mean is not None and running_var is not None and not mode.recomputing,
    )  # fmt: skip
    if added_after is not None or (activation is not None and activation not in be.fused_activations):
        # the activation after the residual added here, or after the kernels because this
        # backend's fused form of it is slower than torch's own op after them
        call = call._replace(activation=None)
        y = _PATHS[plan(call)](call)
        return activations.forward(y if added_after is None else y + added_after, activation)
    return _PATHS[plan(call)](call)


class Path(enum.Enum):
    """The code that computes a call (the module docstring says what each one runs)."""

    EMPTY = "empty"
    OP = "op"
    KERNELS = "kernels"
    TORCH_OPS = "torch-ops"
    SYNC_OUTSIDE_GRAPH = "sync-outside-graph"


class Call(NamedTuple):
    """One call of `batch_norm`, validated: torch's arguments (`training`: whether the
    batch's statistics normalize, torch's rule), the extras, and what a module plugs in."""

    x: Tensor
    running_mean: Tensor | None
    running_var: Tensor | None
    weight: Tensor | None
    bias: Tensor | None
    training: bool
    momentum: float | None
    eps: float
    activation: str | None = None
    residual: Tensor | None = None
    backend: Backend | str | None = "auto"  # batch_norm stores the Backend it resolved for x
    num_batches_tracked: Tensor | None = None
    guard: NonFiniteGuard = _DEFAULT_GUARD
    sync: Synchronizer | None = None
    mask: Tensor | None = None
    virtual_batch_size: int | None = None
    renorm: Renorm | None = None
    unbiased_running_var: bool = True
    mode: modes.Mode = modes.EAGER  # how torch runs the call (traced, transformed, recomputed)
    # whether this call folds its batch into the running statistics: in training, with both
    # buffers given, and not when activation checkpointing recomputes a forward in backward
    # (the batch was counted when the forward first ran)
    update: bool = False


def plan(call: Call) -> Path:
    """Which path computes `call`: by its extras, whether batch statistics normalize (the
    extras are training-only: evaluation is plain batch norm with the running statistics)
    and whether a graph is being traced."""
    if call.x.numel() == 0 and not (call.training and call.sync is not None):
        return Path.EMPTY  # SyncBatchNorm's empty part still joins the other processes' reductions
    policy = call.sync is not None or call.mask is not None or call.virtual_batch_size is not None
    if not call.training or not (policy or call.renorm is not None):
        return Path.OP
    if call.sync is not None and call.mode.traced:
        return Path.SYNC_OUTSIDE_GRAPH
    # torch.func's transforms cannot run the op's kernels on their tensors
    return Path.TORCH_OPS if call.mask is not None or call.mode.transformed else Path.KERNELS


def _op(call: Call) -> Tensor:
    """`Path.OP`: the op layer; then the batch folded into the running statistics."""
    if call.training:
        validation.validate_training_batch(call.x)
    reads_running = not call.training  # evaluation normalizes with them; training only updates them
    tracked = call.running_mean is not None and call.running_var is not None
    want_stats = call.training and tracked
    y, batch = ops.batch_norm(
        call.x, call.weight, call.bias, call.residual,
        call.running_mean if reads_running else None, call.running_var if reads_running else None,
        training=call.training, eps=call.eps, activation=call.activation, backend=call.backend, mode=call.mode,
        # whether the statistics are tracked, not `update`: a forward that checkpointing
        # recomputes must run (and save for backward) exactly what the first one did
        want_stats=want_stats,
        batch_rows=_rows_like(call) if want_stats and call.mode.transformed else None,
    )  # fmt: skip
    if call.update:
        _update_running(call, batch)
    return y


def _rows_like(call: Call) -> tuple[Tensor, Tensor]:
    """Zeroed (C,) rows for the batch's statistics, made like the running statistics (so that
    under torch.func's vmap they are batched exactly when those are: ops.batch_norm's
    `batch_rows`)."""
    dtype = acc_dtype(call.x.dtype)
    return torch.zeros_like(call.running_mean, dtype=dtype), torch.zeros_like(call.running_var, dtype=dtype)


def _update_running(call: Call, batch: ops.Batch) -> None:
    """The one place a call folds its batch into the running statistics (every path comes
    here once per call, ghost chunks merged first), and the guard counts a refused update."""
    var = batch.unbiased_var
    if not call.unbiased_running_var:  # Keras' and Flax's convention: the biased variance
        var = var * ((batch.count - 1) / batch.count)
    accepted = ops.update_running_stats(
        call.running_mean, call.running_var, call.num_batches_tracked, batch.mean, var, call.momentum, mode=call.mode
    )
    if not call.mode.wrapped:  # a wrapped or fake flag is no value to keep past the call
        call.guard.record(accepted)


def _policy(call: Call, normalize) -> Tensor:
    """`Path.KERNELS` and `Path.TORCH_OPS`: each ghost chunk (the whole batch when there are
    none) normalized by `normalize` (`_normalize_one` or `_normalize_masked`) with its own
    statistics, then the whole batch's statistics (Chan-merged) folded into the running ones."""
    x = call.x
    be = backends.backend_for(call.backend, x)
    limits = None
    if call.renorm is not None:
        if call.running_mean is None or call.running_var is None:
            raise ValueError("batch renormalization needs running statistics: track_running_stats=True")
        limits = call.renorm.limits(0 if call.num_batches_tracked is None else call.num_batches_tracked)
    values_per_example = layout.values_per_channel(x[:1]) if x.shape[0] else 1
    bounds = (
        [(0, x.shape[0])]
        if call.virtual_batch_size is None
        else variants.chunks(x.shape[0], call.virtual_batch_size, values_per_example)
    )
    outputs, parts = [], []
    for start, length in bounds:
        part = call._replace(
            x=x.narrow(0, start, length),
            residual=None if call.residual is None else call.residual.narrow(0, start, length),
            mask=None if call.mask is None else call.mask.narrow(0, start, length),
        )
        y, batch = normalize(part, limits, be)
        outputs.append(y)
        parts.append(batch)
    y, batch = (outputs[0], parts[0]) if len(parts) == 1 else (torch.cat(outputs, 0), merge_all(parts))
    if call.update:
        _update_running(call, ops.Batch(batch.mean, batch.unbiased_var, batch.count))
    return y


# torch.compiler.disable imports torch._dynamo (much of `import batchnorm`'s time:
# docs/performance.md, "Costs around the kernels") when the decorator runs; torch's own lazy
# form of it imports dynamo at the first call instead.
@torch._disable_dynamo
def _outside_the_graph(call: Call) -> Tensor:
    """`Path.SYNC_OUTSIDE_GRAPH`: SyncBatchNorm in a compiled model runs eagerly, a graph
    break per layer (so fullgraph=True refuses it): its two reductions are collectives
    between the forward's statistics and the backward's sums, which a traced graph would drop.
    The call's Mode was asked while tracing; here, outside the graph, it runs as eager."""
    return _policy(call._replace(mode=modes.current(call.x)), _normalize_one)


def _renormalized(weight, bias, correction) -> tuple[Tensor | None, Tensor | None]:
    """(weight, bias) with batch renormalization's (r, d) folded in, differentiable in weight
    and bias: gamma (xhat r + d) + beta = (gamma r) xhat + (beta + gamma d); unchanged
    without a correction."""
    if correction is None:
        return weight, bias
    r, d = correction
    if weight is None:
        return r, d if bias is None else bias.to(d.dtype) + d
    shift = weight.to(d.dtype) * d
    return weight.to(r.dtype) * r, shift if bias is None else bias.to(d.dtype) + shift


def _normalize_one(call: Call, limits, be) -> tuple[Tensor, Stats]:
    """`Path.KERNELS`: one batch (or ghost chunk) through the op, its statistics step done
    here: this chunk's statistics, made global across processes with `sync`, and batch
    renormalization's correction from them; returns y and those statistics. `limits`:
    batch renormalization's (r_max, d_max) or None."""
    x, sync = call.x, call.sync
    if sync is None:
        validation.validate_training_batch(x)
    with torch.no_grad():
        # traced, the statistics are the reference's torch ops, which a graph can hold
        batch = _local_stats(x, backends.get("reference") if call.mode.traced else be)
        if sync is not None:
            batch = sync.reduce_stats(batch)
            # Every process holds the same global count, so all raise together.
            validation.validate_global_count(int(batch.count[0]) if batch.count.numel() else 0, x.shape)
        correction = None
        if limits is not None:
            correction = ops.renorm_correction(
                batch, call.running_mean, call.running_var, call.eps, *limits, compiling=call.mode.compiling
            )  # fmt: skip
    weight, bias = _renormalized(call.weight, call.bias, correction)
    y, _ = ops.batch_norm(
        x, weight, bias, call.residual, None, None, training=True, eps=call.eps, activation=call.activation,
        backend=be, mode=call.mode, stats=torch.stack([batch.mean, batch.var]),
        sums_to_means=None if sync is None else _GlobalMeans(sync, batch.count),
    )  # fmt: skip
    return y, batch


class _GlobalMeans(NamedTuple):
    """SyncBatchNorm's backward hook: this process's (2, C) gradient sums made means over
    every process's batch (`count` values per channel)."""

    sync: Synchronizer
    count: Tensor

    def __call__(self, sums: Tensor) -> Tensor:
        return self.sync.reduce_grads(sums) / self.count


def _normalize_masked(call: Call, limits, _be) -> tuple[Tensor, Stats]:
    """`Path.TORCH_OPS`: `_normalize_one` in torch ops, whatever the backend (no backend has a
    masked kernel; mask None: every position is valid); autograd differentiates the
    statistics, which see only the valid positions."""
    x, mask = call.x, call.mask
    batch = variants.masked_stats(x, mask)
    if not call.mode.traced:  # a graph cannot raise on a value it computes
        validation.validate_training_batch_count(int(batch.count[0]) if batch.count.numel() else 0, x.shape, masked=True)
    correction = None
    if limits is not None:
        detached = Stats(*(t.detach() for t in batch))
        correction = ops.renorm_correction(
            detached, call.running_mean, call.running_var, call.eps, *limits, compiling=call.mode.compiling
        )  # fmt: skip
    weight, bias = _renormalized(call.weight, call.bias, correction)
    shift = affine(torch.ones_like(batch.mean), None, bias)[1]
    y = variants.masked_normalize(
        x, mask, batch, call.eps, lambda invstd: affine(invstd, weight, None)[0], shift, call.activation, call.residual,
    )  # fmt: skip
    return y, Stats(*(t.detach() for t in batch))


def _local_stats(x: Tensor, be) -> Stats:
    """This process's (count, mean, m2); zeros for an empty batch (a Chan-merge identity)."""
    if x.numel() == 0:
        zeros = torch.zeros(x.shape[1], dtype=acc_dtype(x.dtype), device=x.device)
        return Stats(zeros, zeros.clone(), zeros.clone())
    return Stats(*be.stats(layout.canonical(x).data))


def _empty(call: Call) -> Tensor:
    """`Path.EMPTY`: an empty output still connected to the graph, and nothing updated."""
    x, weight, bias = call.x, call.weight, call.bias
    if x.dim() < 2:  # torch's empty 1-D batch: no channel dimension, so nothing to scale
        weight = bias = None
    y = x if weight is None else x * layout.per_channel(weight, x)
    y = y if bias is None else y + layout.per_channel(bias, x)
    y = y if call.residual is None else y + call.residual
    return activations.forward(y, call.activation).to(x.dtype)


def _kernels(call: Call) -> Tensor:
    """`Path.KERNELS`."""
    return _policy(call, _normalize_one)


def _torch_ops(call: Call) -> Tensor:
    """`Path.TORCH_OPS`."""
    return _policy(call, _normalize_masked)


#: The code that computes each path.
_PATHS = {
    Path.EMPTY: _empty, Path.OP: _op, Path.KERNELS: _kernels, Path.TORCH_OPS: _torch_ops,
    Path.SYNC_OUTSIDE_GRAPH: _outside_the_graph,
}  # fmt: skip
