"""The kernel contract every backend implements (docs/architecture.md shows where it sits).

A backend computes; it holds no batch-norm policy (running statistics, synchronization,
ghost batches, guards live above it). All tensors are canonical views (`layout.py`):
x, dy, residual are `(N, C, L)` or `(M, C)`; per-channel vectors are `(C,)` in the
accumulation dtype (fp64 for fp64 input, fp32 otherwise).

    stats(x)                                      -> (count, mean, m2)
    apply(x, mean, scale, shift, activation, residual)
                                                  -> y = g((x - mean) scale + shift + residual)
    backward_reduce(dy, x, mean, invstd, scale, shift, activation, residual)
                                                  -> (sum_d, sum_d_xhat)
    backward_apply(dy, x, mean, invstd, scale, shift, mean_d, mean_d_xhat,
                   activation, residual)          -> (dx, dresidual or None)

with d = dy * g'(u), u = (x - mean) scale + shift + residual, xhat = (x - mean) invstd,
and dx = scale (d - mean_d - xhat mean_d_xhat). scale = gamma invstd and shift = beta:
the mean is always subtracted from x first (never folded into the shift), which keeps fp32
exact enough for a channel with mean 1e4 and spread 1e-2. `reference.py` states each
equation. g is one of the backend's `fused_activations` (functional.py applies any other
after the kernels, as torch's op).

The op layer (ops.py) calls only the whole op (`forward`, `backward`, below); the four
functions are its default here, and `stats` is also the statistics step of ghost batches,
renormalization and SyncBatchNorm (functional.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import activations
from ..channel_params import acc_dtype, affine
from ..modes import Mode


#: Rows of the (6, C) per-channel parameters that the whole-op `forward` returns and
#: `backward` takes, in the accumulation dtype: y = g((x - center) scale + shift + residual),
#: xhat = (x - center) invstd + xhat_shift, and the variance that normalized (the batch's,
#: biased, in training; the running one in evaluation). A backend whose center is the mean
#: rounded to x's dtype keeps what the rounding lost in shift and xhat_shift (numba); the
#: others have xhat_shift = 0.
CENTER, SCALE, SHIFT, INVSTD, XHAT_SHIFT, VAR = range(6)
N_PARAMS = 6


class Backend:
    """One implementation of the kernel contract. Subclasses override what they provide."""

    name: str = ""
    #: The activations this backend's kernels take (the whole op and the contract
    #: functions): those worth fusing. For any other, functional.py runs the kernel without
    #: it and applies torch's own op after.
    fused_activations: tuple[str | None, ...] = activations.NAMES
    #: The device types (torch.device.type) whose inputs `auto` may give this backend; None:
    #: every device. A forced backend is asked `unsupported` instead.
    auto_devices: tuple[str, ...] | None = None

    def unavailable(self) -> str | None:
        """Why this backend cannot run on this machine at all, or None when it can."""
        return None

    def unsupported(self, x: Tensor) -> str | None:
        """Why this backend cannot take input `x` (device, dtype, layout), or None."""
        return None

    def preferred(self, x: Tensor, mode: Mode) -> bool:
        """Whether `auto` should choose this backend for `x` in `mode` (e.g. above a measured size)."""
        return False

    def ready(self, x: Tensor, activation: str | None, has_residual: bool) -> bool:
        """Whether this backend can run such an eager call now without waiting (a compiler's
        first use); `auto` takes another backend meanwhile. May start that work in the
        background. (A traced call is not asked: the graph's op asks when it runs, ops.py.)"""
        return True

    def prepare(self, x: Tensor, activation: str | None, has_residual: bool) -> None:
        """A graph that calls this backend's kernels for such input is being compiled: start
        compiling them in the background now, so that they are ready, or nearly, when the
        graph first runs (until then its op runs torch's kernels, ops.py's `_runnable`)."""

    def takes_plain_evaluation(self, x: Tensor) -> bool:
        """Whether evaluation with nothing fused (no activation, no residual), one affine pass,
        should run here rather than in torch's kernel (cheaper to call) for input x."""
        return True

    # The kernel contract ------------------------------------------------------------
    def stats(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def apply(self, x, mean, scale, shift, activation=None, residual=None) -> Tensor:
        raise NotImplementedError

    def backward_reduce(self, dy, x, mean, invstd, scale, shift, activation=None, residual=None):
        raise NotImplementedError

    def backward_apply(
        self, dy, x, mean, invstd, scale, shift, mean_d, mean_d_xhat, activation=None, residual=None
    ):
        raise NotImplementedError

    # The whole op: what the op layer (ops.py) calls ----------------------------------------
    def forward(self, x, weight, bias, residual, running_mean, running_var, eps, activation, training):
        """Whole-op batch norm of a canonical view x: (y, params).

        y = g((x - mean) gamma invstd + beta + residual) like x; params (6, C) as the rows
        above; in training the batch's statistics normalize, otherwise running_mean and
        running_var (C,), which are only read (the op layer makes the running update).
        Here: the four contract functions (stats, apply); fused backends override it."""
        acc = acc_dtype(x.dtype)
        if training:
            count, mean, m2 = self.stats(x)
            var = m2 / count
        else:
            mean, var = running_mean.detach().to(acc), running_var.detach().to(acc)
        invstd = torch.rsqrt(var + eps)
        scale, shift = affine(invstd, None if weight is None else weight.detach(), None if bias is None else bias.detach())
        y = self.apply(x, mean, scale, shift, activation, residual)
        return y, torch.stack([mean, scale, shift, invstd, torch.zeros_like(mean), var])

    def backward(
        self, dy, x, residual, params, training, activation, needs, weight_dtype, bias_dtype, sums_to_means=None
    ):  # fmt: skip
        """The gradients of `forward`: (dx, dweight, dbias, dresidual), each None unless
        `needs` (four bools, in that order) asks for it. dx = scale (d - mean_d - xhat
        mean_d_xhat), the mean terms in training only; dweight = sum d xhat, dbias = sum d.
        (mean_d, mean_d_xhat) = `sums_to_means((sum d, sum d xhat))`, the stacked (2, C)
        sums made means over the batch behind the statistics (SyncBatchNorm: all processes'
        batches, an all_reduce between the backward's two passes); by default this view's
        sums over its own values per channel.
        Here: the contract's two backward functions; fused backends override it."""
        need_x, need_w, need_b, need_r = needs
        mean, scale, shift, invstd = params[CENTER], params[SCALE], params[SHIFT], params[INVSTD]
        need_input = need_x or need_r
        sums = dx = dres = None
        if need_w or need_b or (training and need_input):
            sums = self.backward_reduce(dy, x, mean, invstd, scale, shift, activation, residual)
        if need_input:
            if training:
                stacked = torch.stack(sums)
                means = stacked / (x.numel() // x.shape[1]) if sums_to_means is None else sums_to_means(stacked)
                mean_d, mean_dxh = means
            else:  # the statistics are constants: no mean terms
                mean_d = mean_dxh = torch.zeros_like(mean)
            dx, dres = self.backward_apply(dy, x, mean, invstd, scale, shift, mean_d, mean_dxh, activation, residual)
        dweight = sums[1].to(weight_dtype) if need_w else None
        dbias = sums[0].to(bias_dtype) if need_b else None
        return (dx if need_x else None), dweight, dbias, (dres if need_r else None)

    def __repr__(self) -> str:
        return f"<batchnorm backend {self.name!r}>"
