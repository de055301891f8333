"""The oracle: batch normalization written as its equations, in plain torch ops.

Read this file first. It is slow and it is exact (run it in float64); every other backend
is tested against it. The four kernel-contract functions below work on a canonical view
(`layout.py`): `(N, C, L)` or `(M, C)`, a reduction over every axis but C.

Forward, per channel c, over the n values z_i of the mini-batch:

    mu      = mean_i z_i                                    -> stats()
    var     = mean_i (z_i - mu)^2             (biased)
    z_hat_i = (z_i - mu) / sqrt(var + eps)
    z'_i    = gamma * z_hat_i + beta            = (z_i - mu) * scale + shift   -> apply()
              (scale = gamma / sqrt(var + eps), shift = beta: the mean is subtracted
              first, never folded into the shift, so a channel with a large mean and a
              small spread keeps its precision in fp32)
    a_i     = g(z'_i + residual_i)

Backward, with d_i = dL/da_i * g'(u_i), u_i = z'_i + residual_i:

    dbeta   = sum_i d_i                                     -> backward_reduce()
    dgamma  = sum_i d_i * z_hat_i
    dz_i    = gamma / sqrt(var + eps) * (d_i - mean(d) - z_hat_i * mean(d * z_hat))
                                                            -> backward_apply()
    dresidual_i = d_i

In evaluation mode mu and var are constants, so mean(d) and mean(d * z_hat) drop out
(the caller passes zeros for them).

`batch_norm()` puts the four together behind a hand-written backward that is itself made
of differentiable torch ops on the saved inputs, so double backward works.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import activations
from .layout import per_channel, reduce_dims
from .channel_params import acc_dtype, affine


def stats(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel (count, mean, m2) of a canonical view; m2 = sum_i (z_i - mu)^2.

    Shapes: x (N, C, L) or (M, C) -> three (C,) tensors in the accumulation dtype.
    """
    xa = x.to(acc_dtype(x.dtype))
    dims = reduce_dims(x)
    n = xa.numel() // xa.shape[1]
    mean = xa.mean(dims)
    m2 = ((xa - per_channel(mean, xa)) ** 2).sum(dims)
    count = torch.full_like(mean, float(n))
    return count, mean, m2


def _pre_activation(x, mean, scale, shift, residual) -> Tensor:
    """u = (z - mu) * scale + shift (+ residual), in the accumulation dtype."""
    u = (x.to(scale.dtype) - per_channel(mean, x)) * per_channel(scale, x) + per_channel(shift, x)
    if residual is not None:
        u = u + residual.to(u.dtype)
    return u


def apply(
    x: Tensor,
    mean: Tensor,
    scale: Tensor,
    shift: Tensor,
    activation: str | None = None,
    residual: Tensor | None = None,
) -> Tensor:
    """y = g((x - mean) * scale + shift + residual), per channel; output in x's dtype and shape."""
    return activations.forward(_pre_activation(x, mean, scale, shift, residual), activation).to(x.dtype)


def _grad_before_activation(dy, x, mean, scale, shift, activation, residual) -> Tensor:
    """d = dy * g'(u), recomputing u from the saved input."""
    d = dy.to(scale.dtype)
    slope = activations.derivative(_pre_activation(x, mean, scale, shift, residual), activation)
    return d if slope is None else d * slope


def backward_reduce(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    scale: Tensor,
    shift: Tensor,
    activation: str | None = None,
    residual: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-channel (sum_d, sum_d_xhat), the gradients of beta and gamma."""
    d = _grad_before_activation(dy, x, mean, scale, shift, activation, residual)
    xhat = (x.to(mean.dtype) - per_channel(mean, x)) * per_channel(invstd, x)
    dims = reduce_dims(x)
    return d.sum(dims), (d * xhat).sum(dims)


def backward_apply(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    scale: Tensor,
    shift: Tensor,
    mean_d: Tensor,
    mean_d_xhat: Tensor,
    activation: str | None = None,
    residual: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """dx = scale * (d - mean_d - xhat * mean_d_xhat), and dresidual = d when there is one.

    `scale` is gamma / sqrt(var + eps); `mean_d`, `mean_d_xhat` are sum_d / n and
    sum_d_xhat / n in training, zeros in evaluation. Outputs in x's (residual's) dtype.
    """
    d = _grad_before_activation(dy, x, mean, scale, shift, activation, residual)
    xhat = (x.to(mean.dtype) - per_channel(mean, x)) * per_channel(invstd, x)
    dx = per_channel(scale, x) * (d - per_channel(mean_d, x) - xhat * per_channel(mean_d_xhat, x))
    dres = None if residual is None else d.to(residual.dtype)
    return dx.to(x.dtype), dres


class _BatchNorm(torch.autograd.Function):
    """Batch norm on a canonical view with the hand-written backward of the module docstring."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, running_mean, running_var, eps, activation):
        ctx.eps, ctx.activation = eps, activation
        ctx.save_for_backward(x, weight, bias, residual, running_mean, running_var)
        mean, invstd = _statistics(x, running_mean, running_var, eps)
        scale, shift = affine(invstd, weight, bias)
        return apply(x, mean, scale, shift, activation, residual)

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, residual, running_mean, running_var = ctx.saved_tensors
        # Recomputed from the saved inputs with differentiable ops: double backward sees
        # how mu and var depend on x.
        mean, invstd = _statistics(x, running_mean, running_var, ctx.eps)
        scale, shift = affine(invstd, weight, bias)
        sum_d, sum_d_xhat = backward_reduce(dy, x, mean, invstd, scale, shift, ctx.activation, residual)
        if running_mean is None:  # batch statistics: the mean terms of the chain rule
            n = x.numel() // x.shape[1]
            mean_d, mean_d_xhat = sum_d / n, sum_d_xhat / n
        else:
            mean_d = mean_d_xhat = torch.zeros_like(sum_d)
        dx, dres = backward_apply(dy, x, mean, invstd, scale, shift, mean_d, mean_d_xhat, ctx.activation, residual)
        dweight = None if weight is None else sum_d_xhat.to(weight.dtype)
        dbias = None if bias is None else sum_d.to(bias.dtype)
        return dx, dweight, dbias, dres, None, None, None, None


def _statistics(x, running_mean, running_var, eps):
    """(mean, invstd): from the batch when no running statistics are given."""
    if running_mean is None:
        count, mean, m2 = stats(x)
        var = m2 / count
    else:
        mean, var = running_mean.to(acc_dtype(x.dtype)), running_var.to(acc_dtype(x.dtype))
    return mean, torch.rsqrt(var + eps)


def batch_norm(
    x: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    eps: float = 1e-5,
    activation: str | None = None,
    residual: Tensor | None = None,
) -> Tensor:
    """Batch norm of a canonical view; batch statistics unless running ones are given.

    Shapes: x (N, C, L) or (M, C); weight, bias, running_mean, running_var (C,);
    residual like x. Returns y like x. Running statistics are read, never updated.
    """
    return _BatchNorm.apply(x, weight, bias, residual, running_mean, running_var, eps, activation)
