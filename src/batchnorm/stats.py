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

import math
import warnings
from typing import NamedTuple

import numpy as np
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


def momentum_factor(momentum: float | None, num_batches_tracked: Tensor | None) -> float:
    """The weight of the new batch: `momentum`, or 1 / (batches so far + 1) when it is None."""
    if momentum is not None:
        return momentum
    if num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    return 1.0 / (float(num_batches_tracked) + 1.0)


_NUMPY_DTYPES = (torch.float32, torch.float64)


def _numpy_viewable(t: Tensor) -> bool:
    """Whether `t.numpy()` is a view of t's memory we may write (CPU, fp32/fp64, no autograd)."""
    return t.is_cpu and not t.requires_grad and t.dtype in _NUMPY_DTYPES


class RunningUpdate:
    """The non-finite guard around an in-place update of the running statistics.

    Created before the update (it snapshots the two (C,) buffers), `commit()` after it:
    the update stays when every running value is still finite, and `num_batches_tracked`
    counts it; otherwise the buffers get their old values back, exactly. Only per-channel
    statistics are looked at, never the input. Whoever updates in between (our lerp, or
    torch's own kernel) needs to know nothing of the guard.

    On the CPU (fp32/fp64 buffers) the snapshot and the check go through numpy views of the
    buffers: on (C,) vectors a numpy call costs a fraction of a torch op's dispatch, and this
    runs on every training step (design notes, step 24).
    """

    __slots__ = ("running_mean", "running_var", "num_batches_tracked", "old_mean", "old_var", "views")

    def __init__(self, running_mean: Tensor, running_var: Tensor, num_batches_tracked: Tensor | None):
        self.running_mean, self.running_var = running_mean, running_var
        self.num_batches_tracked = num_batches_tracked
        if _numpy_viewable(running_mean) and _numpy_viewable(running_var):
            self.views = (running_mean.numpy(), running_var.numpy())
            self.old_mean, self.old_var = self.views[0].copy(), self.views[1].copy()
        else:
            self.views = None
            self.old_mean, self.old_var = running_mean.clone(), running_var.clone()

    def commit(self) -> bool | Tensor:
        """True (a 0-d bool tensor on an accelerator) when the update was kept."""
        # One reduction decides: a sum is finite exactly when every value is (short of an
        # overflow of the sum itself, at values no running statistic should take anyway).
        if self.views is not None:
            accepted = math.isfinite(np.add.reduce(self.views[0]) + np.add.reduce(self.views[1]))
        else:
            total = self.running_mean.sum() + self.running_var.sum()
            if total.device.type != "cpu":
                return self._commit_on_device(total)
            accepted = math.isfinite(float(total))  # deciding on the host costs nothing here
        if not accepted:
            if self.views is not None:
                np.copyto(self.views[0], self.old_mean)
                np.copyto(self.views[1], self.old_var)
            else:
                self.running_mean.copy_(self.old_mean)
                self.running_var.copy_(self.old_var)
        elif self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        return accepted

    def _commit_on_device(self, total: Tensor) -> Tensor:
        """On an accelerator, decide on the device: no host synchronization in the step."""
        accepted = torch.isfinite(total)
        self.running_mean.copy_(torch.where(accepted, self.running_mean, self.old_mean))
        self.running_var.copy_(torch.where(accepted, self.running_var, self.old_var))
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(accepted.to(self.num_batches_tracked.dtype))
        return accepted


def update_running(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    var: Tensor,
    momentum: float | None,
    num_batches_tracked: Tensor | None,
) -> bool | Tensor:
    """Fold one batch's mean and variance (unbiased, as stored) into the running ones, in
    place, unless that would leave a non-finite value (then nothing changes).

    Returns whether the update was kept (see `RunningUpdate.commit`).
    """
    factor = momentum_factor(momentum, num_batches_tracked)
    update = RunningUpdate(running_mean, running_var, num_batches_tracked)
    running_mean.lerp_(mean.to(running_mean.dtype), factor)
    running_var.lerp_(var.to(running_var.dtype), factor)
    return update.commit()


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

    def record(self, accepted: bool | Tensor) -> None:
        """Count one update: `accepted` as `RunningUpdate.commit` returns it."""
        if isinstance(accepted, bool) or accepted.device.type == "cpu":
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
