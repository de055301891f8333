"""The autograd Function that runs any backend's kernel contract (backends/base.py).

The statistics (mean, invstd, count) are computed above, by the functional layer, so that
policy (running statistics, merges across ghost chunks or processes) stays out of here;
this Function only normalizes and differentiates, treating the statistics as functions of
x in training mode (the mean_d / mean_d_xhat terms) and as constants in evaluation.

`grad_reducer`, when given, turns the local per-channel (sum_d, sum_d_xhat), stacked as a
(2, C) tensor, into the global ones (SyncBatchNorm's one all_reduce in backward); the
gradients of gamma and beta stay local, since data-parallel training sums those itself.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from . import layout, reference
from .backends.base import Backend


class BatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        residual: Tensor | None,
        mean: Tensor,
        invstd: Tensor,
        count: Tensor,
        backend: Backend,
        activation: str | None,
        batch_stats: bool,
        grad_reducer: Callable[[Tensor], Tensor] | None,
    ) -> Tensor:
        view = layout.canonical(x)
        res_view = None if residual is None else layout.canonical(residual, view.kind).data
        scale, shift = reference.affine(invstd, weight, bias)
        y = backend.apply(view.data, mean, scale, shift, activation, res_view)
        ctx.save_for_backward(x, residual, mean, invstd, scale, shift, count)
        ctx.kind = view.kind
        ctx.backend, ctx.activation = backend, activation
        ctx.batch_stats, ctx.grad_reducer = batch_stats, grad_reducer
        ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
        ctx.param_dtype = (weight if weight is not None else bias if bias is not None else mean).dtype
        return layout.restore(y, x, view.kind)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, residual, mean, invstd, scale, shift, count = ctx.saved_tensors
        kind, backend, activation = ctx.kind, ctx.backend, ctx.activation
        xv = layout.canonical(x, kind).data
        dyv = layout.canonical(dy, kind).data
        rv = None if residual is None else layout.canonical(residual, kind).data
        need_x, need_w, need_b, need_r = ctx.needs_input_grad[:4]

        sums = None
        if (ctx.batch_stats and need_x) or need_w or need_b:
            sums = torch.stack(backend.backward_reduce(dyv, xv, mean, invstd, scale, shift, activation, rv))
        dx = dres = None
        if need_x or need_r:
            if ctx.batch_stats:
                total = sums if ctx.grad_reducer is None else ctx.grad_reducer(sums)
                mean_d, mean_d_xhat = total / count
            else:
                mean_d = mean_d_xhat = torch.zeros_like(mean)
            dxv, dresv = backend.backward_apply(
                dyv, xv, mean, invstd, scale, shift, mean_d, mean_d_xhat, activation, rv
            )
            dx = layout.restore(dxv, x, kind) if need_x else None
            dres = layout.restore(dresv, residual, kind) if need_r else None
        dweight = sums[1].to(ctx.param_dtype) if need_w else None
        dbias = sums[0].to(ctx.param_dtype) if need_b else None
        return dx, dweight, dbias, dres, None, None, None, None, None, None, None
