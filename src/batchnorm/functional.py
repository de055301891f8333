"""`batch_norm`: the one entry point every module calls.

It checks the input, picks a backend (`backends.resolve`), computes the statistics,
normalizes, and updates the running statistics (`stats.update_running`, with the
non-finite guard). Policy lives here; the backends only compute.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from . import activations, backends, checks, layout
from .autograd import BatchNormFunction
from .reference import acc_dtype
from .stats import NonFiniteGuard, Stats, update_running


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
) -> Tensor:
    """y = g(gamma * (x - mu) / sqrt(var + eps) + beta + residual), per channel.

    Shapes: input (N, C, *spatial); running_mean, running_var, weight, bias (C,) or None;
    residual like input. Returns a tensor like input, in the input's dtype (statistics are
    computed in fp32 for fp16/bf16, fp64 for fp64).

    As `torch.nn.functional.batch_norm`: the batch statistics normalize when `training`
    is true or no running statistics are given; in training the running statistics, when
    given, are updated in place with weight `momentum` for the new batch (None: the
    cumulative average over `num_batches_tracked`, which is then incremented too).
    Deviations from torch: an empty batch returns an empty output and updates nothing, and a
    batch with a non-finite mean or variance leaves the running statistics untouched
    (counted by `guard`, warned once).

    `backend`: "auto", a name from `batchnorm.backends.available()`, or None to read the
    BATCHNORM_BACKEND environment variable. `sync`: reductions across processes, for
    SyncBatchNorm; the batch is then the union of every process's batch (this process's
    part may be empty).
    """
    x = checks.check_input(input)
    checks.check_per_channel(
        x, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var
    )
    checks.check_residual(x, residual)
    checks.check_activation(activation)
    checks.check_momentum(momentum)
    use_batch_stats = training or running_mean is None
    if x.numel() == 0 and not (use_batch_stats and sync is not None):
        return _empty(x, weight, bias, activation, residual)
    be = backends.resolve(backend, x).backend
    if not use_batch_stats:
        return _normalize_eval(x, weight, bias, running_mean, running_var, eps, activation, residual, be)

    y, batch = _normalize_batch(x, weight, bias, eps, activation, residual, be, sync)
    if training and running_mean is not None and running_var is not None:
        with torch.no_grad():
            accepted = update_running(running_mean, running_var, batch, momentum, num_batches_tracked)
        (guard or _DEFAULT_GUARD).record(accepted)
    return y


def _normalize_batch(x, weight, bias, eps, activation, residual, be, sync=None) -> tuple[Tensor, Stats]:
    """Normalize with the batch's own statistics; return y and those statistics."""
    if sync is None:
        checks.check_training_batch(x)
    if be.normalize is not None and sync is None:
        y, mean, invstd = be.normalize(x, weight, bias, None, None, eps, activation, residual)
        count = torch.full_like(mean, layout.values_per_channel(x))
        # The whole-op kernel returns invstd; var is recovered for the running update
        # (clamped: rounding can push a zero variance a hair below zero).
        var = (invstd.double().pow(-2) - eps).clamp(min=0).to(mean.dtype)
        return y, Stats(count, mean.detach(), (var * count).detach())
    with torch.no_grad():
        batch = _local_stats(x, be)
        if sync is not None:
            batch = sync.reduce_stats(batch)
            # Every process holds the same global count, so all raise together.
            checks.check_global_count(int(batch.count[0]) if batch.count.numel() else 0, x.shape)
        invstd = torch.rsqrt(batch.var + eps)
    grad_reducer = None if sync is None else sync.reduce_grads
    y = BatchNormFunction.apply(
        x, weight, bias, residual, batch.mean, invstd, batch.count, be, activation, True, grad_reducer
    )
    return y, batch


def _local_stats(x: Tensor, be) -> Stats:
    """This process's (count, mean, m2); zeros for an empty batch (a Chan-merge identity)."""
    if x.numel() == 0:
        zeros = torch.zeros(x.shape[1], dtype=acc_dtype(x.dtype), device=x.device)
        return Stats(zeros, zeros.clone(), zeros.clone())
    return Stats(*be.stats(layout.canonical(x).data))


def _normalize_eval(x, weight, bias, running_mean, running_var, eps, activation, residual, be) -> Tensor:
    """Normalize with the running statistics (an affine map per channel)."""
    if be.normalize is not None:
        return be.normalize(x, weight, bias, running_mean, running_var, eps, activation, residual)[0]
    acc = acc_dtype(x.dtype)
    mean = running_mean.detach().to(acc)
    invstd = torch.rsqrt(running_var.detach().to(acc) + eps)
    return BatchNormFunction.apply(
        x, weight, bias, residual, mean, invstd, None, be, activation, False, None
    )


def _empty(x, weight, bias, activation, residual) -> Tensor:
    """An empty batch: an empty output still connected to the graph, and nothing updated."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    y = x if weight is None else x * weight.view(shape)
    y = y if bias is None else y + bias.view(shape)
    y = y if residual is None else y + residual
    return activations.forward(y, activation).to(x.dtype)
