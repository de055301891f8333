"""The `aten` backend: torch's own batch-norm kernels, composed with the extras.

The fallback for every device, dtype and layout. For plain batch norm in eager mode the op
layer calls `native_batch_norm` below, so its speed and autograd (double backward included)
are torch's; activation and residual are then applied with torch ops. Everything else (the
kernel contract, the whole-op `forward`/`backward` of base.py) runs the reference's torch
ops, except in `NativeStandIn`, the whole op on torch's own kernels, which a compiled
graph's op runs while the kernels of the backend it names still compile.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import activations, layout
from ..channel_params import acc_dtype, affine
from ..modes import Mode
from .base import CENTER, INVSTD, SCALE, SHIFT
from .reference import ReferenceBackend


class AtenBackend(ReferenceBackend):
    name = "aten"

    def preferred(self, x: Tensor, mode: Mode) -> bool:
        return True


class NativeStandIn(AtenBackend):
    """The whole op (base.py) on torch's own kernels, for fp32 and fp64 views: what a
    compiled graph's op runs in place of a backend whose kernels for the call are still
    compiling (ops.py's `_runnable`). The whole op it inherits runs the contract's torch
    ops, several passes more (docs/performance.md, the numba backend's "Cases"); it keeps
    that for the evaluation form's backward (one pass of d scale and two sums either way).
    Same (6, C) parameters, so either backend's backward takes the other's forward's."""

    def forward(self, x, weight, bias, residual, running_mean, running_var, eps, activation, training):
        if x.dtype not in (torch.float32, torch.float64):
            return super().forward(x, weight, bias, residual, running_mean, running_var, eps, activation, training)
        w, b = (None if t is None else t.detach().to(x.dtype) for t in (weight, bias))
        y, mean, unbiased_var = native_batch_norm(x, w, b, running_mean, running_var, eps, activation, residual, training)
        if training:
            n = layout.values_per_channel(x)
            var = unbiased_var * ((n - 1) / n)  # biased, as the parameters hold it
        else:
            mean, var = running_mean.detach().to(x.dtype), running_var.detach().to(x.dtype)
        invstd = torch.rsqrt(var + eps)
        scale, shift = affine(invstd, w, b)
        return y, torch.stack([mean, scale, shift, invstd, torch.zeros_like(mean), var])

    def backward(
        self, dy, x, residual, params, training, activation, needs, weight_dtype, bias_dtype, sums_to_means=None
    ):  # fmt: skip
        if not training or sums_to_means is not None or x.dtype not in (torch.float32, torch.float64):
            return super().backward(
                dy, x, residual, params, training, activation, needs, weight_dtype, bias_dtype, sums_to_means
            )  # fmt: skip
        need_x, need_w, need_b, need_r = needs
        d = dy
        if activation is not None:  # d = dy g'(u), u recomputed from x
            mean, scale, shift = (layout.per_channel(params[row], x) for row in (CENTER, SCALE, SHIFT))
            u = (x - mean) * scale + shift
            d = dy * activations.derivative(u if residual is None else u + residual, activation)
        gamma = params[SCALE] / params[INVSTD]  # the parameters hold gamma invstd
        dx, dw, db = torch.ops.aten.native_batch_norm_backward(
            d, x, gamma, None, None, params[CENTER], params[INVSTD], True, 0.0, [need_x, need_w, need_b]
        )  # fmt: skip
        return (
            dx if need_x else None, dw.to(weight_dtype) if need_w else None, db.to(bias_dtype) if need_b else None,
            d if need_r else None,
        )  # fmt: skip


def native_batch_norm(
    x, weight, bias, running_mean, running_var, eps, activation, residual, training, batch_stats=None, *,
    want_stats=True,
):  # fmt: skip
    """torch's own batch norm on the N-D input, with torch's autograd (double backward
    included), then the extras: (y, mean, unbiased_var).

    Training normalizes with the batch's statistics and also returns them, each (C,) in the
    accumulation dtype, exactly as torch computes them for its running update: its kernel
    writes them, with momentum 1, into `batch_stats`, a zeroed (mean, variance) pair of (C,)
    tensors, which the caller may hand in (allocated here otherwise), so that the op layer can fold them
    in under the guard's rule; the module's buffers are never handed to torch's kernel.
    Without `want_stats` there is no running update to feed: torch's kernel gets no rows to
    write (under torch.func's vmap, rows it would write in place must be batched too), and
    (y, None, None) comes back, as in evaluation, which normalizes with running_mean and
    running_var."""
    if not training or not want_stats:
        y = _native(x, weight, bias, running_mean, running_var, training, 0.0, eps)
        return _finish(y, activation, residual), None, None
    if batch_stats is None:  # two tensors: the rows of one (2, C) would cost an unbind more
        dtype = acc_dtype(x.dtype)
        batch_stats = x.new_zeros(x.shape[1], dtype=dtype), x.new_zeros(x.shape[1], dtype=dtype)
    mean, var = batch_stats
    y = _native(x, weight, bias, mean, var, True, 1.0, eps)
    return _finish(y, activation, residual), mean, var


def differentiable_grads(needs, dy, x, weight, bias, residual, running_mean, running_var, eps, activation):
    """Gradients of (x, weight, bias, residual) where `needs` says so (None elsewhere), through
    torch's differentiable batch norm: the fused backends' backward under create_graph=True,
    so that double backward works. Batch statistics when running_mean is None."""
    wanted = [t for t, need in zip((x, weight, bias, residual), needs) if need]
    training = running_mean is None
    y = native_batch_norm(x, weight, bias, running_mean, running_var, eps, activation, residual, training)[0]
    grads = iter(torch.autograd.grad(y, wanted, dy, create_graph=True, allow_unused=True))
    return [next(grads) if need else None for need in needs]


def _native(x, weight, bias, running_mean, running_var, training, factor, eps):
    if x.dtype in (torch.float16, torch.bfloat16):
        # torch keeps fp32 statistics for half input only on its mixed-dtype path, which it
        # takes when every per-channel tensor is fp32: give it fp32 identity parameters, and
        # fp32 copies of a half module's parameters and buffers (the casts are differentiable,
        # so the gradients reach the half parameters; the running update rounds into them).
        c = x.shape[1]
        weight = torch.ones(c, device=x.device) if weight is None else weight.float()
        bias = torch.zeros(c, device=x.device) if bias is None else bias.float()
        running_mean, running_var = (None if t is None else t.float() for t in (running_mean, running_var))
    # torch.batch_norm, as torch.nn.BatchNorm* calls it: on CUDA it picks cuDNN where cuDNN
    # applies (native_batch_norm never does), so the default path is exactly torch's there.
    return torch.batch_norm(x, weight, bias, running_mean, running_var, training, factor, eps, torch.backends.cudnn.enabled)


def _finish(y: Tensor, activation: str | None, residual: Tensor | None) -> Tensor:
    """The extras after torch's kernel: residual add, then the activation, ReLU and ReLU6 in
    place on that fresh tensor (as torchvision's ResNets apply theirs: batch norm's backward
    reads its input, not its output), which saves a new tensor's pages and a pass of writes
    (docs/performance.md, "Costs around the kernels")."""
    if activation is None and residual is None:
        return y
    if residual is not None:
        y = y + residual
    return activations.forward(y, activation, overwrite=True)
