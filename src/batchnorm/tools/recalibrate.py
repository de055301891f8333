"""Precise batch norm (`recalibrate`) and test-time adaptation (`adapt`, AdaBN).

During training the running statistics are an exponential average over batches seen while
the weights were still moving. `recalibrate` recomputes them with the weights fixed, as a
true population average over the given batches:

    for every layer, over all B batches and all positions i (n values in total):
    running_mean = (1/n) sum_i z_i
    running_var  = (1/(n-1)) sum_i (z_i - running_mean)^2        (unbiased, as torch stores it;
                   1/n for a layer of ours with unbiased_running_var=False)
    num_batches_tracked = B

Each batch's (count, mean, m2) is captured by a forward pre-hook on the layer's input and
the batches are merged with Chan's formula (`stats.merge_stacked`), in float64, so unequal
batch sizes are weighted correctly; under torch.distributed every rank's merged statistics
are gathered and merged again, so all ranks end with the statistics of all the data.

What "exact" means. A layer's input depends on the layers before it. During the passes
the batch-norm layers run in training mode (each batch normalized by its own statistics,
as in training; the running buffers are left alone until the end) and every other module
in evaluation mode (no dropout). So the first batch-norm layer gets exactly the population
statistics of its input over the data; a deeper layer gets the exact population
statistics of its input *as produced in training mode*, the standard precise-BN
definition (fvcore's `update_bn_stats` estimates the same quantity). Parameters are
never changed, and every module's mode is restored afterwards.

Non-finite values. A batch whose input to a layer holds a NaN or an infinity (in any call
of that layer during the batch) is left out of that layer's statistics, which are then
over the other batches (num_batches_tracked counts only those): one such value would
otherwise make the whole population NaN. Each left-out batch is warned about and counted
in `changes`; a layer that every batch it saw was left out of keeps its statistics.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..stats import Stats, merge_all, merge_stacked
from ._common import Changes, input_stats_hook, leaves_no_trace, prepare, progress_bar
from .freeze import frozen_stats, layers_with_running_stats, stats_snapshot


def recalibrate(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int | None = None,
    *,
    inplace: bool = True,
    progress: bool = True,
) -> tuple[nn.Module, Changes]:
    """Recompute every batch-norm layer's running statistics over `batches` (precise BN).

    batches: any iterable of input tensors or of (input, target, ...) tuples/lists (the
        first element is the input; the model is called as model(input)).
    num_batches: use at most this many batches (all when None).
    progress: show a progress bar (when rich, from the `experiments` extra, is installed).
    Returns (model, changes); `changes.previous` holds the statistics before
    (`stats_restore(model, changes.previous)` switches back). Frozen layers and layers
    without running statistics are skipped and recorded. A batch with non-finite values in
    a layer's input is left out of that layer's statistics, with a RuntimeWarning; the
    count is in the layer's `changes.changed` entry, and a layer left with no batch keeps
    its statistics (recorded in `changes.skipped`).
    """
    if num_batches is not None and (not isinstance(num_batches, int) or num_batches < 1):
        raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}")
    model = prepare(model, inplace)
    changes = Changes(previous=stats_snapshot(model))
    layers = layers_with_running_stats(model, "recalibrate", changes, " (unfreeze it to recalibrate)")
    if not layers:
        raise ValueError("recalibrate: no batch-norm layer with running statistics to recompute")

    captures = {path: _LayerCapture() for path, _ in layers}
    total = _run(model, layers, batches, num_batches, captures, progress)
    _warn_left_out(captures)
    merged = {path: merge_all(c.stats) for path, c in captures.items() if c.stats}
    left_out = {path: len(c.left_out) for path, c in captures.items()}
    if dist.is_available() and dist.is_initialized():
        merged, left_out, total = _merge_across_ranks(layers, merged, left_out, total)
    for path, m in layers:
        _store(m, path, merged.get(path), total, left_out[path], changes)
    return model, changes


@torch.no_grad()
def _store(m: nn.Module, path: str, stats: Stats | None, total: int, left_out: int, changes: Changes) -> None:
    """Write one layer's population statistics over `total - left_out` batches (or record
    why there are none) into its running buffers."""
    if stats is None and left_out:
        changes.skip(path, "every batch it saw had non-finite values (NaN or inf) in its input "
                           f"({left_out} of {total} left out); statistics unchanged")  # fmt: skip
        return
    if stats is None:
        changes.skip(path, "never called during the passes (unused branch?); statistics unchanged")
        return
    m.running_mean.copy_(stats.mean)
    # As the layer stores it: unbiased (torch), or biased (unbiased_running_var=False).
    m.running_var.copy_(stats.unbiased_var if getattr(m, "unbiased_running_var", True) else stats.var)
    if m.num_batches_tracked is not None:
        m.num_batches_tracked.fill_(total - left_out)
    what = f"population statistics over {int(stats.count[0])} values per channel"
    if left_out:
        what += f"; {left_out} of {total} batches left out (non-finite values)"
    changes.change(path, what)


def _warn_left_out(captures: dict[str, _LayerCapture]) -> None:
    """One RuntimeWarning naming, per layer, the batches (this process's) left out."""
    lines = [f"{path}: batch {', '.join(map(str, c.left_out))}" for path, c in captures.items() if c.left_out]
    if lines:
        warnings.warn(
            "recalibrate: batches with non-finite values (NaN or inf) in a layer's input were left "
            f"out of that layer's statistics: {'; '.join(lines)}",
            RuntimeWarning,
            stacklevel=3,
        )


def adapt(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int | None = None,
    *,
    inplace: bool = True,
    progress: bool = True,
) -> tuple[nn.Module, Changes]:
    """AdaBN (Li et al. 2016): adapt to a shifted input distribution by replacing every
    batch-norm layer's statistics with those of unlabeled target-domain `batches`.

    The same computation as `recalibrate` (see it for the arguments), run on target data;
    `changes.previous` holds the source-domain statistics, so
    `stats_restore(model, changes.previous)` switches back.
    """
    return recalibrate(model, batches, num_batches, inplace=inplace, progress=progress)


def _run(model, layers, batches, num_batches, captures, progress) -> int:
    """Forward every batch with the layers in training mode; return how many batches ran."""
    hooks = [m.register_forward_pre_hook(captures[path].hook, with_kwargs=True) for path, m in layers]
    count = 0
    try:
        with leaves_no_trace(model, layers):
            model.eval()
            for _, m in layers:
                m.train()
            bar = progress_bar("recalibrating batch norm", num_batches, progress)
            with torch.no_grad(), frozen_stats(model), bar as advance:
                for batch in batches:
                    if num_batches is not None and count >= num_batches:
                        break
                    _forward(model, batch, count)
                    for capture in captures.values():
                        capture.end_batch(count)
                    count += 1
                    advance()
    finally:
        for hook in hooks:
            hook.remove()
    if count == 0:
        raise ValueError("recalibrate: the batches iterable yielded nothing; pass a non-empty iterable of inputs")
    return count


def _forward(model: nn.Module, batch: Any, index: int) -> None:
    x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    if not isinstance(x, Tensor):
        raise TypeError(
            f"batch {index}: expected a tensor or an (input, target) pair, got {type(batch).__name__}"
            + ("" if x is batch else f" whose first element is {type(x).__name__}")
        )
    try:
        model(x)
    except Exception as error:
        raise ValueError(
            f"batch {index}: the model failed on input of shape {tuple(x.shape)} ({type(error).__name__}: "
            f"{error}); every batch must have the shape and dtype the model takes"
        ) from error


class _LayerCapture:
    """One layer's input statistics, batch by batch: `stats` (float64 (count, mean, m2), one
    per call) of the batches kept, and `left_out`, the indices of batches in which a call
    saw a non-finite statistic. `hook` is its forward pre-hook."""

    def __init__(self) -> None:
        self.stats: list[Stats] = []
        self.left_out: list[int] = []
        self._batch: list[Stats] = []
        self.hook = input_stats_hook(self._batch)

    def end_batch(self, index: int) -> None:
        """Keep this batch's statistics, or leave them all out if one is not finite."""
        if all(bool(torch.isfinite(s.mean).all() and torch.isfinite(s.m2).all()) for s in self._batch):
            self.stats += self._batch
        else:
            self.left_out.append(index)
        self._batch.clear()


def _merge_across_ranks(
    layers, merged: dict[str, Stats], left_out: dict[str, int], total: int
) -> tuple[dict[str, Stats], dict[str, int], int]:
    """Every rank's per-layer statistics, merged in rank order (the same result on every
    rank), with the left-out and total batch counts summed over the ranks.

    One all_gather of a flat float64 tensor: for each layer (count, mean, m2) of C values
    (zeros, Chan's identity, for a layer a rank never called) and its left-out count, then
    the batch count.
    """
    device = layers[0][1].running_mean.device
    parts = []
    for path, m in layers:
        zeros = torch.zeros(m.num_features, dtype=torch.float64)
        parts += [*merged.get(path, Stats(zeros, zeros, zeros)), torch.tensor([float(left_out[path])])]
    flat = torch.cat([p.to(device, torch.float64) for p in parts] + [torch.tensor([float(total)], device=device)])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    every = torch.stack(gathered)  # (ranks, sum (3 C + 1) + 1)
    result, skipped, offset = {}, {}, 0
    for path, m in layers:
        c = m.num_features
        count, mean, m2 = (every[:, offset + k * c : offset + (k + 1) * c] for k in range(3))
        skipped[path] = int(every[:, offset + 3 * c].sum())
        offset += 3 * c + 1
        if count.sum() > 0:
            result[path] = merge_stacked(count, mean, m2)
    return result, skipped, int(every[:, -1].sum())
