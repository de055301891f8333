"""Per-channel statistics as (count, mean, m2), their merge, and the running-statistic update.

Statistics travel as three (C,) tensors: the count n, the mean mu and m2 = sum (z - mu)^2.
Two sets merge exactly with Chan et al.'s formula, so ghost batches, synchronization
across processes and recalibration over many batches all use `merge` and nothing else:

    n  = n_a + n_b
    mu = mu_a + (mu_b - mu_a) n_b / n
    m2 = m2_a + m2_b + (mu_b - mu_a)^2 n_a n_b / n

The running statistics follow PyTorch's convention (momentum is the weight of the new
batch; the stored variance is unbiased):

    running_mean <- (1 - m) running_mean + m mu
    running_var  <- (1 - m) running_var  + m m2 / (n - 1)
    m = 1 / num_batches_tracked when momentum is None (a cumulative average)
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
from torch import Tensor


class Stats(NamedTuple):
    """Per-channel count, mean and sum of squared deviations, each (C,)."""

    count: Tensor
    mean: Tensor
    m2: Tensor

    @property
    def var(self) -> Tensor:
        """Biased variance m2 / n, the one that normalizes."""
        return self.m2 / self.count

    @property
    def unbiased_var(self) -> Tensor:
        """m2 / (n - 1), the one PyTorch stores as running_var."""
        return self.m2 / (self.count - 1)


def merge(a: Stats, b: Stats) -> Stats:
    """Chan's exact merge of two sets of statistics (either may have count 0)."""
    n = a.count + b.count
    safe_n = torch.where(n > 0, n, torch.ones_like(n))
    delta = b.mean - a.mean
    mean = a.mean + delta * (b.count / safe_n)
    m2 = a.m2 + b.m2 + delta * delta * (a.count * b.count / safe_n)
    return Stats(n, mean, m2)


def merge_stacked(count: Tensor, mean: Tensor, m2: Tensor) -> Stats:
    """Merge K sets stacked along dim 0 (each (K, C)) in one step, in a fixed order.

    Equal to folding `merge` over the K sets: n = sum n_k, mu = sum n_k mu_k / n,
    m2 = sum m2_k + sum n_k (mu_k - mu)^2.
    """
    n = count.sum(0)
    safe_n = torch.where(n > 0, n, torch.ones_like(n))
    mu = (count * mean).sum(0) / safe_n
    m2_total = m2.sum(0) + (count * (mean - mu) ** 2).sum(0)
    return Stats(n, mu, m2_total)


def update_running(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    var: Tensor,
    momentum: float | None,
    num_batches_tracked: Tensor | None,
) -> Tensor:
    """Fold one batch's mean and variance (unbiased, as stored) into the running ones, in place,
    unless any is non-finite.

    Returns a 0-d bool tensor: True when the update was applied. A skipped update leaves the
    running statistics and `num_batches_tracked` exactly as they were.
    """
    mean = mean.to(running_mean.dtype)
    unbiased = var.to(running_var.dtype)
    # One reduction decides: the sum is finite exactly when every value is (short of an
    # overflow of the sum itself, at values no running statistic should take anyway).
    accepted = torch.isfinite(mean.sum() + unbiased.sum())
    if momentum is None and num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    if accepted.device.type == "cpu":
        # On the host the decision costs nothing: skip, or two in-place lerps.
        if accepted:
            if num_batches_tracked is not None:
                num_batches_tracked.add_(1)
            factor = momentum if momentum is not None else 1.0 / float(num_batches_tracked)
            running_mean.lerp_(mean, factor)
            running_var.lerp_(unbiased, factor)
        return accepted
    # On an accelerator, decide on the device: no host synchronization in the training step.
    if num_batches_tracked is not None:
        num_batches_tracked.add_(accepted.to(num_batches_tracked.dtype))
    if momentum is None:
        factor = 1.0 / num_batches_tracked.clamp(min=1).to(running_mean.dtype)
    else:
        factor = torch.full((), momentum, dtype=running_mean.dtype, device=running_mean.device)
    factor = torch.where(accepted, factor, torch.zeros_like(factor))
    # where() rather than a multiply: 0 * inf would still poison the buffers.
    running_mean.lerp_(torch.where(accepted, mean, running_mean), factor)
    running_var.lerp_(torch.where(accepted, unbiased, running_var), factor)
    return accepted


class NonFiniteGuard:
    """Counts running-statistic updates skipped because a batch statistic was not finite.

    A plain object (kept as a module attribute, not a buffer, so state_dict keys stay
    torch's). On CPU the count is exact at once and the first skip warns; on an
    accelerator the flags stay on the device until `count` is read, so training never
    waits on a host synchronization.
    """

    def __init__(self, name: str = "batch norm") -> None:
        self.name = name
        self._count = 0
        self._pending: Tensor | None = None
        self._warned = False

    def record(self, accepted: Tensor) -> None:
        if accepted.device.type == "cpu":
            if not accepted:
                self._add(1)
            return
        skipped = (~accepted).to(torch.int64)
        self._pending = skipped if self._pending is None else self._pending + skipped

    @property
    def count(self) -> int:
        """How many updates were skipped so far."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._add(int(pending))
        return self._count

    def _add(self, skipped: int) -> None:
        if skipped and not self._warned:
            warnings.warn(
                f"{self.name}: a batch gave a non-finite mean or variance; the running "
                "statistics were left unchanged (further skips are counted, not warned)",
                RuntimeWarning,
                stacklevel=4,
            )
            self._warned = True
        self._count += skipped
