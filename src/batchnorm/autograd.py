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

Double backward is not supported on this path (it raises): plain batch norm on the `aten`
backend keeps torch's double backward, and `reference.batch_norm` is the differentiable
oracle.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import layout
from .backends.base import Backend


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
        ctx.kind = view.kind
        ctx.backend, ctx.activation = backend, activation
        ctx.batch_stats, ctx.grad_reducer = batch_stats, grad_reducer
        return layout.restore(y, x, view.kind)

    @staticmethod
    @once_differentiable  # the kernels are not differentiable: double backward raises, never lies
    def backward(ctx, dy: Tensor):
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
        return dx, dscale, dshift, dres, None, None, None, None, None, None, None
