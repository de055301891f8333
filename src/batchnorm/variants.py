"""The variants of batch norm people reach for, as per-channel changes to the same pipeline.

- Ghost batch norm (Hoffer et al. 2017): `chunks()` splits a training batch into groups of
  `virtual_batch_size` examples; each is normalized with its own statistics.
- Batch renormalization (Ioffe 2017): `Renorm` holds the limits and their schedule;
  `renorm_correction()` gives the per-channel r and d (no gradient) that turn
      z_hat = (z - mu_B) / sigma_B * r + d
  into a change of scale and shift only.
- Masked batch norm: `masked_stats()` and `masked_normalize()` take the statistics over
  the valid positions only (padded sequences, variable-size inputs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import activations, layout
from .channel_params import acc_dtype
from .stats import Stats


@dataclass(frozen=True)
class Renorm:
    """Batch renormalization limits, ramped over training steps.

    r = clip(sigma_B / sigma, 1/r_max, r_max) and d = clip((mu_B - mu) / sigma, -d_max, d_max)
    with sigma = sqrt(running_var + eps), mu = running_mean. The limits start at (1, 0)
    (plain batch norm) for `warmup_steps`, then grow linearly to (r_max, d_max) over
    `ramp_steps`. The step is the layer's `num_batches_tracked`, so the schedule is part of
    the state_dict and survives a checkpoint.
    """

    r_max: float = 3.0
    d_max: float = 5.0
    warmup_steps: int = 0
    ramp_steps: int = 0

    def __post_init__(self) -> None:
        if not self.r_max >= 1.0:
            raise ValueError(f"Renorm needs r_max >= 1 (1 is plain batch norm), got {self.r_max}")
        if not self.d_max >= 0.0:
            raise ValueError(f"Renorm needs d_max >= 0 (0 is plain batch norm), got {self.d_max}")
        if self.warmup_steps < 0 or self.ramp_steps < 0:
            raise ValueError("Renorm warmup_steps and ramp_steps must be >= 0")

    def limits(self, step):
        """(r_max, d_max) in force at training step `step` (0-based): ints or floats for an
        int step; 0-d tensors for a tensor step (num_batches_tracked, read with no host
        synchronization, so that a compiled graph can hold it)."""
        if isinstance(step, Tensor):
            done = step.to(torch.float64) - self.warmup_steps
            if self.ramp_steps == 0:
                t = (done >= 0).to(torch.float64)
            else:
                t = (done / self.ramp_steps).clamp(0.0, 1.0)
            return 1.0 + t * (self.r_max - 1.0), t * self.d_max
        if step < self.warmup_steps:
            return 1.0, 0.0
        if self.ramp_steps == 0:
            return self.r_max, self.d_max
        t = min(1.0, (step - self.warmup_steps) / self.ramp_steps)
        return 1.0 + t * (self.r_max - 1.0), t * self.d_max


def renorm_correction(
    batch: Stats, running_mean: Tensor, running_var: Tensor, eps: float, r_max: float, d_max: float
) -> tuple[Tensor, Tensor]:
    """Per-channel (r, d) of batch renormalization; constants for autograd."""
    sigma = torch.sqrt(running_var.to(batch.mean.dtype) + eps)
    sigma_b = torch.sqrt(batch.var + eps)
    if isinstance(r_max, Tensor):
        r_max, d_max = r_max.to(sigma.dtype), d_max.to(sigma.dtype)
    r = torch.clamp(sigma_b / sigma, 1.0 / r_max, r_max)
    d = torch.clamp((batch.mean - running_mean.to(batch.mean.dtype)) / sigma, -d_max, d_max)
    return r, d


def chunks(n: int, k: int, values_per_example: int) -> list[tuple[int, int]]:
    """(start, length) of the ghost batches of a batch of n examples, k per chunk.

    The last chunk is smaller when k does not divide n; a last chunk that would hold a
    single value per channel (no variance to estimate) joins the chunk before it.
    """
    if k < 2:
        raise ValueError(f"virtual_batch_size must be at least 2, got {k}")
    bounds = [(s, min(k, n - s)) for s in range(0, n, k)]
    if len(bounds) > 1 and bounds[-1][1] * values_per_example < 2:
        start, length = bounds[-2]
        bounds[-2:] = [(start, length + bounds[-1][1])]
    return bounds


def validate_mask(x: Tensor, mask: Tensor) -> Tensor:
    """A boolean mask over batch and spatial positions, shape (N, *spatial)."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"mask must be a torch.bool tensor (True = valid position), got {got}")
    want = (x.shape[0], *x.shape[2:])
    if tuple(mask.shape) != want:
        raise ValueError(
            f"mask has shape {tuple(mask.shape)} but the input {tuple(x.shape)} needs {want}: "
            "one entry per example and spatial position, no channel dimension"
        )
    if mask.device != x.device:
        raise ValueError(f"mask is on {mask.device} but the input is on {x.device}")
    return mask


def _mask_like(x: Tensor, mask: Tensor) -> Tensor:
    """The mask as (N, 1, *spatial) in the accumulation dtype, broadcasting over channels."""
    return mask.unsqueeze(1).to(acc_dtype(x.dtype))


def masked_stats(x: Tensor, mask: Tensor | None) -> Stats:
    """(count, mean, m2) over the valid positions only (every position when mask is None);
    differentiable in x."""
    dims = layout.reduce_dims(x)
    if mask is None:
        xa = x.to(acc_dtype(x.dtype))
        mean = xa.mean(dims)
        centred = xa - layout.per_channel(mean, x)
        count = torch.full_like(mean, x.numel() // x.shape[1])
        return Stats(count, mean, (centred * centred).sum(dims))
    m = _mask_like(x, mask)
    valid = mask.unsqueeze(1)
    # select, never multiply by the mask: a NaN or Inf at a masked-out position times 0 is NaN
    xa = torch.where(valid, x.to(m.dtype), 0.0)
    count = m.sum(dims).expand(x.shape[1])
    mean = xa.sum(dims) / count.clamp(min=1)
    centred = torch.where(valid, xa - layout.per_channel(mean, x), 0.0)
    return Stats(count, mean, (centred * centred).sum(dims))


def masked_normalize(
    x: Tensor,
    mask: Tensor | None,
    batch: Stats,
    eps: float,
    scale_of,
    shift: Tensor,
    activation: str | None,
    residual: Tensor | None,
) -> Tensor:
    """y = g((x - mu) * scale + shift + residual) at every position, mu and var from the valid
    ones (all of them when mask is None: then this is plain batch norm in differentiable torch
    ops, what torch.func's transforms run for ghost batches and renorm).

    `batch` is differentiable in x (masked_stats); `scale_of(invstd)` builds the per-channel
    scale. Outputs at masked positions use detached statistics, so their gradients reach x
    and the parameters but never the statistics.
    """
    invstd = torch.rsqrt(batch.var + eps)
    mean, scale = layout.per_channel(batch.mean, x), layout.per_channel(scale_of(invstd), x)
    if mask is not None:
        valid = mask.unsqueeze(1)
        mean = torch.where(valid, mean, layout.per_channel(batch.mean.detach(), x))
        scale = torch.where(valid, scale, layout.per_channel(scale_of(invstd.detach()), x))
    u = (x.to(mean.dtype) - mean) * scale + layout.per_channel(shift, x)
    if residual is not None:
        u = u + residual.to(u.dtype)
    return activations.forward(u, activation).to(x.dtype)


__all__ = ["Renorm", "chunks", "masked_normalize", "masked_stats", "renorm_correction", "validate_mask"]
