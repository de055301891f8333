"""`batch_norm`: the one entry point every module calls.

It validates the input, picks a backend (`backends.resolve`), computes the statistics,
normalizes, and updates the running statistics (`stats.update_running`, with the
non-finite guard). Policy lives here (ghost batches, masks, batch renormalization,
synchronization across processes); the backends only compute.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from . import activations, backends, layout, validation, variants
from . import ops
from .autograd import BatchNormFunction
from .channel_params import acc_dtype, affine
from .stats import NonFiniteGuard, Stats, merge_all, update_running
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
    residual like input; mask (N, *spatial) bool. Returns a tensor like input, in the
    input's dtype (statistics are computed in fp32 for fp16/bf16, fp64 for fp64).

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
    validation.validate_per_channel(
        x, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var
    )
    validation.validate_residual(x, residual)
    validation.validate_activation(activation)
    validation.validate_momentum(momentum)
    validation.validate_eps(eps)
    if mask is not None:
        variants.validate_mask(x, mask)
    if virtual_batch_size is not None:
        variants.chunks(max(x.shape[0], 1), virtual_batch_size, 1)  # validates k
    if sync is not None and (mask is not None or virtual_batch_size is not None):
        raise ValueError("masks and ghost batches are not supported together with SyncBatchNorm")
    use_batch_stats = training or running_mean is None
    if x.numel() == 0 and not (use_batch_stats and sync is not None):
        return _empty(x, weight, bias, activation, residual)
    plain = sync is None and mask is None and virtual_batch_size is None and renorm is None
    if plain or not use_batch_stats:
        # the extras are training-only: evaluation is plain batch norm with the running statistics
        if use_batch_stats:
            validation.validate_training_batch(x)
        y, accepted = ops.batch_norm(
            x, weight, bias, residual, running_mean, running_var, num_batches_tracked,
            use_batch_stats, momentum, eps, activation, backend, unbiased_running_var,
        )  # fmt: skip
        if accepted is not None:
            (guard or _DEFAULT_GUARD).record(accepted)
        return y

    if sync is not None and torch.compiler.is_compiling():
        return _outside_the_graph(
            x, running_mean, running_var, weight, bias, momentum, eps, activation, residual, backend,
            num_batches_tracked, guard, sync, mask, virtual_batch_size, renorm, unbiased_running_var,
        )  # fmt: skip
    # Policy paths (ghost batches, masks, renorm, sync) run the kernel contract; while a graph
    # is traced they run differentiable torch ops instead (`_normalize_masked`).
    be = backends.resolve(backend, x).backend
    limits = None
    if renorm is not None:
        if running_mean is None or running_var is None:
            raise ValueError("batch renormalization needs running statistics: track_running_stats=True")
        limits = renorm.limits(0 if num_batches_tracked is None else num_batches_tracked)
    y, batch = _normalize_chunks(
        x, weight, bias, eps, activation, residual, be, sync, mask, virtual_batch_size,
        limits, running_mean, running_var,
    )  # fmt: skip
    if running_mean is not None and running_var is not None:
        with torch.no_grad():
            stored_var = batch.unbiased_var if unbiased_running_var else batch.var
            accepted = update_running(
                running_mean, running_var, batch.mean, stored_var, momentum, num_batches_tracked
            )
        (guard or _DEFAULT_GUARD).record(accepted)
    return y


# torch.compiler.disable imports torch._dynamo (2 s, half of `import batchnorm`) when the
# decorator runs; torch's own lazy form of it imports dynamo at the first call instead.
@torch._disable_dynamo
def _outside_the_graph(x, running_mean, running_var, weight, bias, momentum, eps, activation, residual,
                       backend, num_batches_tracked, guard, sync, mask, virtual_batch_size, renorm,
                       unbiased_running_var):  # fmt: skip
    """SyncBatchNorm in a compiled model runs eagerly, a graph break per layer (so
    fullgraph=True refuses it): its two reductions are collectives between the forward's
    statistics and the backward's sums, which a traced graph would drop."""
    return batch_norm(
        x, running_mean, running_var, weight, bias, True, momentum, eps, activation=activation,
        residual=residual, backend=backend, num_batches_tracked=num_batches_tracked, guard=guard,
        sync=sync, mask=mask, virtual_batch_size=virtual_batch_size, renorm=renorm,
        unbiased_running_var=unbiased_running_var,
    )  # fmt: skip


def _scale_shift(weight, bias, invstd, correction=None) -> tuple[Tensor, Tensor]:
    """Per-channel (scale, shift), differentiable in weight and bias; with batch
    renormalization's (r, d): scale = gamma r invstd, shift = beta + gamma d."""
    if correction is None:
        return affine(invstd, weight, bias)
    r, d = correction
    scale, shift = affine(invstd * r, weight, bias)
    return scale, shift + (d if weight is None else weight.to(d.dtype) * d)


def _normalize_chunks(
    x, weight, bias, eps, activation, residual, be, sync, mask, virtual_batch_size, limits,
    running_mean, running_var,
) -> tuple[Tensor, Stats]:  # fmt: skip
    """Normalize each ghost chunk (the whole batch when there are none) with its own
    statistics; return y and the statistics of the whole batch (Chan-merged)."""
    values_per_example = layout.values_per_channel(x[:1]) if x.shape[0] else 1
    bounds = (
        [(0, x.shape[0])]
        if virtual_batch_size is None
        else variants.chunks(x.shape[0], virtual_batch_size, values_per_example)
    )
    outputs, parts = [], []
    for start, length in bounds:
        xs = x.narrow(0, start, length)
        rs = None if residual is None else residual.narrow(0, start, length)
        if mask is None and not torch.compiler.is_compiling():
            y, batch = _normalize_one(xs, weight, bias, eps, activation, rs, be, sync, limits, running_mean, running_var)
        else:  # torch ops autograd differentiates: what a traced graph can hold
            ms = None if mask is None else mask.narrow(0, start, length)
            y, batch = _normalize_masked(xs, ms, weight, bias, eps, activation, rs, limits, running_mean, running_var)
        outputs.append(y)
        parts.append(batch)
    if len(parts) == 1:
        return outputs[0], parts[0]
    return torch.cat(outputs, 0), merge_all(parts)


def _normalize_one(x, weight, bias, eps, activation, residual, be, sync, limits, running_mean, running_var):
    """One batch (or ghost chunk) through the backend's kernels and BatchNormFunction."""
    if sync is None:
        validation.validate_training_batch(x)
    with torch.no_grad():
        batch = _local_stats(x, be)
        if sync is not None:
            batch = sync.reduce_stats(batch)
            # Every process holds the same global count, so all raise together.
            validation.validate_global_count(int(batch.count[0]) if batch.count.numel() else 0, x.shape)
        invstd = torch.rsqrt(batch.var + eps)
        correction = None
        if limits is not None:
            correction = variants.renorm_correction(batch, running_mean, running_var, eps, *limits)
    scale, shift = _scale_shift(weight, bias, invstd, correction)
    grad_reducer = None if sync is None else sync.reduce_grads
    y = BatchNormFunction.apply(
        x, scale, shift, residual, batch.mean, invstd, batch.count, be, activation, True, grad_reducer
    )
    return y, batch


def _normalize_masked(x, mask, weight, bias, eps, activation, residual, limits, running_mean, running_var):
    """Masked batch norm in torch ops (no backend has a masked kernel): autograd differentiates
    the statistics, which see only the valid positions (all of them when mask is None)."""
    batch = variants.masked_stats(x, mask)
    if not torch.compiler.is_compiling():  # a graph cannot raise on a value it computes
        validation.validate_training_batch_count(int(batch.count[0]) if batch.count.numel() else 0, x.shape, masked=True)
    correction = None
    if limits is not None:
        detached = Stats(*(t.detach() for t in batch))
        correction = ops.renorm_correction(detached, running_mean, running_var, eps, *limits)
    shift = _scale_shift(weight, bias, torch.ones_like(batch.mean), correction)[1]
    y = variants.masked_normalize(
        x, mask, batch, eps, lambda invstd: _scale_shift(weight, None, invstd, correction)[0],
        shift, activation, residual,
    )  # fmt: skip
    return y, Stats(*(t.detach() for t in batch))


def _local_stats(x: Tensor, be) -> Stats:
    """This process's (count, mean, m2); zeros for an empty batch (a Chan-merge identity)."""
    if x.numel() == 0:
        zeros = torch.zeros(x.shape[1], dtype=acc_dtype(x.dtype), device=x.device)
        return Stats(zeros, zeros.clone(), zeros.clone())
    return Stats(*be.stats(layout.canonical(x).data))


def _empty(x, weight, bias, activation, residual) -> Tensor:
    """An empty batch: an empty output still connected to the graph, and nothing updated."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    y = x if weight is None else x * weight.view(shape)
    y = y if bias is None else y + bias.view(shape)
    y = y if residual is None else y + residual
    return activations.forward(y, activation).to(x.dtype)
