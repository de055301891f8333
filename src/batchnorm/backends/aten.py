"""The `aten` backend: torch's own batch-norm kernels, composed with the extras.

The fallback for every device, dtype and layout. For plain batch norm (no policy that
needs the statistics apart from the normalization) it calls `torch.native_batch_norm`,
so its speed and autograd (double backward included) are torch's; activation and
residual are then applied with torch ops. For everything else it runs the kernel
contract with the reference's torch ops.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import activations
from ..stats import RunningUpdate
from .reference import ReferenceBackend


class AtenBackend(ReferenceBackend):
    name = "aten"

    def preferred(self, x: Tensor) -> bool:
        return True

    @staticmethod
    def normalize(
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        eps: float,
        activation: str | None,
        residual: Tensor | None,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Whole-op batch norm on the N-D input through torch's autograd.

        With running statistics given, normalizes with them (evaluation) and returns
        (y, None, None). Without, normalizes with the batch statistics and returns
        (y, mean, invstd), each (C,) in the accumulation dtype, for the running update.
        """
        training = running_mean is None
        y, mean, invstd = _native(x, weight, bias, running_mean, running_var, training, 0.0, eps)
        y = _finish(y, activation, residual)
        return (y, mean, invstd) if training else (y, None, None)

    @staticmethod
    def normalize_updating(
        x, weight, bias, running_mean, running_var, num_batches_tracked, factor, eps, activation, residual
    ) -> tuple[Tensor, bool | Tensor]:
        """Training batch norm that also folds the batch into the running statistics, in
        torch's own kernel (weight `factor` for the new batch, unbiased variance): the
        cheapest path for plain batch norm. Guarded by a snapshot (stats.RunningUpdate):
        returns (y, whether the update was kept)."""
        update = RunningUpdate(running_mean, running_var, num_batches_tracked)
        y = _native(x, weight, bias, running_mean, running_var, True, factor, eps)[0]
        return _finish(y, activation, residual), update.commit()


def differentiable_grads(needs, dy, x, weight, bias, residual, running_mean, running_var, eps, activation):
    """Gradients of (x, weight, bias, residual) where `needs` says so (None elsewhere), through
    torch's differentiable batch norm: the fused backends' backward under create_graph=True,
    so that double backward works. Batch statistics when running_mean is None."""
    wanted = [t for t, need in zip((x, weight, bias, residual), needs) if need]
    y = AtenBackend.normalize(x, weight, bias, running_mean, running_var, eps, activation, residual)[0]
    grads = iter(torch.autograd.grad(y, wanted, dy, create_graph=True, allow_unused=True))
    return [next(grads) if need else None for need in needs]


def _native(x, weight, bias, running_mean, running_var, training, factor, eps):
    if x.dtype in (torch.float16, torch.bfloat16):
        # torch keeps fp32 statistics for half input only on its mixed-dtype path, which
        # it takes when the parameters are fp32: give it fp32 identity parameters.
        c = x.shape[1]
        weight = torch.ones(c, device=x.device) if weight is None else weight
        bias = torch.zeros(c, device=x.device) if bias is None else bias
    return torch.native_batch_norm(x, weight, bias, running_mean, running_var, training, factor, eps)


def _finish(y: Tensor, activation: str | None, residual: Tensor | None) -> Tensor:
    """The extras after torch's kernel: residual add, then the activation."""
    if activation is None and residual is None:
        return y
    if residual is not None:
        y = y + residual
    return activations.forward(y, activation)
