"""Two small per-channel helpers: the dtype statistics accumulate in, and the map (scale,
shift) that gamma and beta give. The kernels, the policy code and the oracle (reference.py)
all use them; they live here so that production code never imports the test oracle."""

from __future__ import annotations

import torch
from torch import Tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are accumulated in fp64 for fp64 input, fp32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def affine(invstd: Tensor, weight: Tensor | None, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """(scale, shift) of z' = (z - mu) * scale + shift: scale = gamma * invstd, shift = beta."""
    scale = invstd if weight is None else weight.to(invstd.dtype) * invstd
    shift = torch.zeros_like(invstd) if bias is None else bias.to(invstd.dtype)
    return scale, shift
