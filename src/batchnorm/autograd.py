"""The autograd Function that runs any backend's kernel contract (backends/base.py).

The statistics (mean, invstd, count) and the per-channel map (scale, shift) are computed
above, by the functional layer, so that policy (running statistics, merges across ghost
chunks or processes, batch renormalization) stays out of here. This Function normalizes

    y = g((x - mean) * scale + shift + residual)

and differentiates it, treating mean and invstd as functions of x in training mode (the
mean_d / mean_d_xhat terms of reference.py) and as constants in evaluation. scale and
shift are ordinary differentiable inputs: dL/dscale = sum_i d_i (x_i - mean) =
sum_d_xhat / invstd and dL/dshift = sum_d, and autograd carries those on to gamma and beta
through however the caller built scale and shift.

`grad_reducer`, when given, turns the local per-channel (sum_d, sum_d_xhat), stacked as a
(2, C) tensor, into the global ones (SyncBatchNorm's one all_reduce in backward); the
gradients of scale and shift stay local, since data-parallel training sums those itself.

Double backward (`create_graph=True`, e.g. a gradient penalty): the backward then runs as
differentiable torch ops, recomputing the statistics from x (`eps` is kept for that), so the
second-order gradients are exact for ghost batches and batch renormalization (whose r, d stay
constants, as in the first order). Across processes (SyncBatchNorm) the statistics depend
on the other processes' inputs, which this process cannot differentiate: that raises.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from . import activations, layout
from .backends.base import Backend
from .channel_params import acc_dtype


class BatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        scale: Tensor,
        shift: Tensor,
        residual: Tensor | None,
        mean: Tensor,
        invstd: Tensor,
        eps: float,
        count: Tensor | None,
        backend: Backend,
        activation: str | None,
        batch_stats: bool,
        grad_reducer: Callable[[Tensor], Tensor] | None,
    ) -> Tensor:
        view = layout.canonical(x)
        res_view = None if residual is None else layout.canonical(residual, view.kind).data
        y = backend.apply(view.data, mean, scale, shift, activation, res_view)
        ctx.save_for_backward(x, residual, mean, invstd, scale, shift, count)
        ctx.kind, ctx.eps = view.kind, eps
        ctx.backend, ctx.activation = backend, activation
        ctx.batch_stats, ctx.grad_reducer = batch_stats, grad_reducer
        return layout.restore(y, x, view.kind)

    @staticmethod
    def backward(ctx, dy: Tensor):
        if torch.is_grad_enabled():  # create_graph=True: the kernels are not differentiable
            return _differentiable_backward(ctx, dy)
        x, residual, mean, invstd, scale, shift, count = ctx.saved_tensors
        kind, backend, activation = ctx.kind, ctx.backend, ctx.activation
        xv = layout.canonical(x, kind).data
        dyv = layout.canonical(dy, kind).data
        rv = None if residual is None else layout.canonical(residual, kind).data
        need_x, need_scale, need_shift, need_r = ctx.needs_input_grad[:4]
        sums, dxv, dresv = backend.contract_gradients(
            dyv, xv, mean, invstd, scale, shift, activation, rv, batch_stats=ctx.batch_stats,
            need_sums=need_scale or need_shift, need_input=need_x or need_r, count=count, reduce=ctx.grad_reducer,
        )  # fmt: skip
        dx = layout.restore(dxv, x, kind) if need_x else None
        dres = layout.restore(dresv, residual, kind) if need_r else None
        dscale = sums[1] / invstd if need_scale else None
        dshift = sums[0] if need_shift else None
        return dx, dscale, dshift, dres, None, None, None, None, None, None, None, None


def _differentiable_backward(ctx, dy: Tensor):
    """The gradients of the forward as torch ops that autograd can differentiate again. In
    training, y = g((x - mean(x)) (invstd(x) / invstd) scale + shift + residual): the same
    value as the forward's (the factor is 1 at this x), with the dependence of the batch's
    statistics on x that the first-order formula also carries."""
    if ctx.grad_reducer is not None:
        raise RuntimeError(
            "double backward (create_graph=True) through SyncBatchNorm is not supported: the "
            "statistics depend on every process's input; use torch.nn.SyncBatchNorm's eval mode "
            "or a per-process BatchNorm for a gradient penalty"
        )
    x, residual, mean, invstd, scale, shift, _ = ctx.saved_tensors
    inputs = (x, scale, shift, residual)
    wanted = [t for t, need in zip(inputs, ctx.needs_input_grad[:4]) if need]
    shape = (1, -1) + (1,) * (x.dim() - 2)
    with torch.enable_grad():
        xa = x.to(acc_dtype(x.dtype))
        if ctx.batch_stats:
            dims = [d for d in range(x.dim()) if d != 1]
            center = xa.mean(dims)
            factor = torch.rsqrt(xa.var(dims, correction=0) + ctx.eps) / invstd
        else:
            center, factor = mean, torch.ones_like(invstd)
        u = (xa - center.view(shape)) * (factor * scale).view(shape) + shift.view(shape)
        if residual is not None:
            u = u + residual
        y = activations.forward(u, ctx.activation).to(x.dtype)
        grads = iter(torch.autograd.grad(y, wanted, dy, create_graph=True, allow_unused=True))
    return (*(next(grads) if need else None for need in ctx.needs_input_grad[:4]), *([None] * 8))
