"""`merge_rank_stats`: one set of running statistics for every process of a data-parallel run.

Data-parallel training with local batch norm (no SyncBatchNorm) leaves every process with
running statistics of its own shard. At the end of an epoch (before evaluating or saving)
this replaces them, on every process, by the exact merge over the processes: each process
r holds a per-channel mean mu_r and variance v_r (its running statistics) describing w_r
examples (`count`: what it saw, 1 each by default), and the merge is the mean and variance
of the union (the law of total variance, `stats.merge_stacked` with m2_r = w_r v_r):

    w  = sum_r w_r
    mu = sum_r w_r mu_r / w
    v  = sum_r w_r v_r / w + sum_r w_r (mu_r - mu)^2 / w

The second term, the spread of the processes' means, is what averaging the variances
(timm's `distribute_bn`) leaves out. `num_batches_tracked` becomes the largest over the
processes. A process whose statistics of a layer are not finite is left out of that
layer's merge. Or, with `source=r`, every process takes process r's statistics.

One collective for the whole model: an all_gather of every layer's statistics (merged in
float64 in process order, so every process computes the same result), or one broadcast.
Every process must call it, with the same model.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..distributed import active_group
from ..stats import merge_stacked
from ._common import Changes, prepare
from .freeze import layers_with_running_stats, stats_snapshot


def merge_rank_stats(
    model: nn.Module,
    count: float | None = None,
    *,
    source: int | None = None,
    group=None,
    inplace: bool = True,
) -> tuple[nn.Module, Changes]:
    """Give every process the same running statistics: the count-weighted merge over the
    processes of `group` (the default group when None), or process `source`'s.

    count: how many examples this process's statistics describe (e.g. its shard's size);
        None weighs every process the same. Ignored with `source`.
    Returns (model, changes); `changes.previous` holds this process's statistics before
    (`stats_restore(model, changes.previous)` switches back). Frozen layers and layers
    without running statistics are skipped; without a process group of two processes or
    more nothing changes.
    """
    if count is not None and not (isinstance(count, (int, float)) and count >= 0 and count != float("inf")):
        raise ValueError(f"count must be a finite number >= 0 (the examples this process saw), got {count!r}")
    model = prepare(model, inplace)
    changes = Changes(previous=stats_snapshot(model))
    layers = layers_with_running_stats(model, "merge_rank_stats", changes)
    pg = active_group(group)
    if pg is None or not layers:
        changes.skip("", "no process group of two processes or more" if layers else "no running statistics to merge")
        return model, changes
    with torch.no_grad():
        if source is not None:
            _broadcast(layers, source, pg, changes)
        else:
            _merge(layers, 1.0 if count is None else float(count), pg, changes)
    return model, changes


def _flat(layers, weight: float) -> Tensor:
    """This process's row: weight, then per layer num_batches_tracked, mean (C), variance (C)."""
    device = layers[0][1].running_mean.device
    parts = [torch.tensor([weight], dtype=torch.float64, device=device)]
    for _, m in layers:
        tracked = m.num_batches_tracked if m.num_batches_tracked is not None else torch.zeros(())
        parts += [tracked.reshape(1).to(device, torch.float64), m.running_mean.double(), m.running_var.double()]
    return torch.cat(parts)


def gather(row: Tensor, group) -> Tensor:
    """Every process's `row` (a 1-D tensor of the same size everywhere), stacked in process
    order: (processes, len(row)), the same on every process. One all_gather."""
    rows = [torch.empty_like(row) for _ in range(dist.get_world_size(group))]
    dist.all_gather(rows, row, group=group)
    return torch.stack(rows)


def _merge(layers, weight: float, pg, changes: Changes) -> None:
    every = gather(_flat(layers, weight), pg)  # (processes, 1 + sum (2 C + 1))
    weights, offset = every[:, 0], 1
    if not weights.sum() > 0:
        raise ValueError(f"merge_rank_stats: every process passed count=0 ({weights.tolist()}); nothing to merge")
    for path, m in layers:
        c = m.num_features
        tracked = every[:, offset]
        mean, var = every[:, offset + 1 : offset + 1 + c], every[:, offset + 1 + c : offset + 1 + 2 * c]
        offset += 1 + 2 * c
        # A process whose statistics are not finite (a diverged step) takes no part.
        finite = torch.isfinite(mean).all(1) & torch.isfinite(var).all(1)
        w = torch.where(finite, weights, torch.zeros_like(weights))
        if not w.sum() > 0:
            changes.skip(path, "no process with finite statistics and count > 0; statistics unchanged")
            continue
        n = w[:, None].expand_as(mean)
        merged = merge_stacked(n, torch.where(n > 0, mean, 0.0), torch.where(n > 0, var, 0.0) * n)
        m.running_mean.copy_(merged.mean)
        m.running_var.copy_(merged.var)
        if m.num_batches_tracked is not None:
            m.num_batches_tracked.fill_(int(tracked[finite].max()))
        what = f"merged over {len(w)} processes (weights {_numbers(w)})"
        changes.change(path, what + ("" if bool(finite.all()) else f"; {int((~finite).sum())} left out (non-finite)"))


def _broadcast(layers, source: int, pg, changes: Changes) -> None:
    row = _flat(layers, 0.0)
    dist.broadcast(row, src=source, group=pg)
    offset = 1
    for path, m in layers:
        c = m.num_features
        if m.num_batches_tracked is not None:
            m.num_batches_tracked.fill_(int(row[offset]))
        m.running_mean.copy_(row[offset + 1 : offset + 1 + c])
        m.running_var.copy_(row[offset + 1 + c : offset + 1 + 2 * c])
        offset += 1 + 2 * c
        changes.change(path, f"statistics of process {source}")


def _numbers(t: Tensor) -> str:
    return ", ".join(f"{v:g}" for v in t.tolist())
