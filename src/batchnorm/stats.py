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
import os
import sys
import warnings
from collections.abc import Sequence
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


def merge_all(sets: Sequence[Stats]) -> Stats:
    """Merge a list of statistics (each (C,) tensors), in order: `merge_stacked` of them stacked."""
    return merge_stacked(*(torch.stack(column) for column in zip(*sets)))


def momentum_factor(momentum: float | None, num_batches_tracked: Tensor | None) -> float:
    """The weight of the new batch: `momentum`, or 1 / (batches so far + 1) when it is None."""
    if momentum is not None:
        return momentum
    if num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    return 1.0 / (float(num_batches_tracked) + 1.0)


def blend(old: float, new: float, factor: float) -> float:
    """One running value after a batch, the rule for a single channel (plain floats; the
    numba kernels inline this very function): old + factor (new - old), or the batch's value
    when the running one is not finite (a corrupt checkpoint carries no information, and
    blending would keep it non-finite forever)."""
    return old + factor * (new - old) if math.isfinite(old) else new


def update_running(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    var: Tensor,
    momentum: float | None,
    num_batches_tracked: Tensor | None,
) -> Tensor:
    """Fold one batch's mean and variance (as stored: unbiased by PyTorch's convention) into
    the running statistics, in place, under the guard rule. Returns a 0-d bool tensor on the
    buffers' device: whether the update was kept.

    The rule, the one every path obeys (the numba kernels apply the same `blend` and test
    inside the kernel): every channel's new value is `blend(old, batch, factor)`, computed in
    float64 and rounded to the buffer's dtype; the update is kept only when every new mean
    and variance is finite after that rounding (so a batch whose variance overflows fp32 is
    refused like a NaN batch), and then `num_batches_tracked` counts it. Otherwise nothing
    changes. Written in tensor ops with no host synchronization, so that it runs on any
    device and inside a compiled graph.
    """
    wide = torch.float32 if running_mean.device.type == "mps" else torch.float64
    if momentum is None:
        if num_batches_tracked is None:
            raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
        factor = 1.0 / (num_batches_tracked.to(wide) + 1.0)
    else:
        factor = float(momentum)
    new_mean = _blend_tensor(running_mean, mean, factor, wide)
    new_var = _blend_tensor(running_var, var, factor, wide)
    accepted = torch.isfinite(new_mean).all() & torch.isfinite(new_var).all()
    running_mean.copy_(torch.where(accepted, new_mean, running_mean))
    running_var.copy_(torch.where(accepted, new_var, running_var))
    if num_batches_tracked is not None:
        num_batches_tracked.add_(accepted.to(num_batches_tracked.dtype))
    return accepted


def _blend_tensor(old: Tensor, new: Tensor, factor, wide: torch.dtype) -> Tensor:
    """`blend` on (C,) tensors, in `wide` precision, rounded to old's dtype."""
    o, n = old.to(wide), new.to(wide)
    return torch.where(torch.isfinite(o), o + factor * (n - o), n).to(old.dtype)


# Where the guard's warning does not point: this package's frames and torch's (a module's
# call machinery), so that it names the line of the user's code that made the call.
_LIBRARY_DIRS = tuple(os.path.dirname(f) + os.sep for f in (__file__, torch.__file__))


def _first_frame_outside(prefixes: tuple[str, ...]) -> int:
    """warnings.warn's `stacklevel` (1: the function calling warn, which calls this) of the
    first frame up the stack whose file is not under one of `prefixes`."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(prefixes):
        frame, level = frame.f_back, level + 1
    return level


class NonFiniteGuard:
    """Counts running-statistic updates skipped because a batch statistic was not finite.

    A plain object (kept as a module attribute, not a buffer, so state_dict keys stay
    torch's). In eager mode on CPU the count is exact at once and the first skip warns; on
    an accelerator and in compiled graphs the flags stay on the device until `count` is
    read, so training never waits on a host synchronization.
    """

    def __init__(self, name: str = "batch norm") -> None:
        self.name = name
        self._count = 0
        # Always a 0-d tensor (on the device of the last flags added): a compiled graph that
        # found None here and left a tensor would be recompiled on its second call.
        self._pending: Tensor = torch.zeros((), dtype=torch.int64)
        self._warned = False

    def record(self, accepted: bool | Tensor) -> None:
        """Count one update: `accepted` as `ops.update_running_stats` returns it: a bool is
        counted at once; a tensor (on an accelerator, or inside a compiled graph) is kept on
        its device until `count` is read; one on the meta device (a run for shapes only) has
        no value, and is not counted."""
        if isinstance(accepted, bool):
            if not accepted:
                self._add(1)
            return
        if accepted.device.type == "meta":
            return
        self._pending = self._pending + (~accepted).to(torch.int64)

    @property
    def count(self) -> int:
        """How many updates were skipped so far."""
        pending = int(self._pending)
        if pending:
            self._pending = torch.zeros_like(self._pending)
            self._add(pending)
        return self._count

    def _add(self, skipped: int) -> None:
        if skipped and not self._warned:
            warnings.warn(
                f"{self.name}: a batch gave a non-finite mean or variance; the running "
                "statistics were left unchanged (further skips are counted, not warned)",
                RuntimeWarning,
                stacklevel=_first_frame_outside(_LIBRARY_DIRS),
            )
            self._warned = True
        self._count += skipped
