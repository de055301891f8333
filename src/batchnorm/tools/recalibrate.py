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
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from rich.progress import Progress
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import backends, layout
from ..stats import Stats, merge_stacked
from ..variants import check_mask, masked_stats
from ._common import Changes, prepare, require_batchnorm
from .freeze import frozen_stats, is_frozen, stats_snapshot


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
    progress: show a rich progress bar.
    Returns (model, changes); `changes.previous` holds the statistics before
    (`stats_restore(model, changes.previous)` switches back). Frozen layers and layers
    without running statistics are skipped and recorded.
    """
    if num_batches is not None and (not isinstance(num_batches, int) or num_batches < 1):
        raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}")
    model = prepare(model, inplace)
    changes = Changes(previous=stats_snapshot(model))
    layers = []
    for path, m in require_batchnorm(model, "recalibrate"):
        if is_frozen(m):
            changes.skip(path, "frozen: its statistics are fixed (unfreeze it to recalibrate)")
        elif not isinstance(m, _BatchNorm) or m.running_mean is None:
            changes.skip(path, "no running statistics (track_running_stats=False)")
        else:
            layers.append((path, m))
    if not layers:
        raise ValueError("recalibrate: no batch-norm layer with running statistics to recompute")

    captured: dict[str, list[Stats]] = {path: [] for path, _ in layers}
    count = _run(model, layers, batches, num_batches, captured, progress)
    total = torch.tensor(float(count))
    merged = {path: _merge(stats) for path, stats in captured.items() if stats}
    if dist.is_available() and dist.is_initialized():
        merged, total = _merge_across_ranks(layers, merged, total)
    with torch.no_grad():
        for path, m in layers:
            stats = merged.get(path)
            if stats is None:
                changes.skip(path, "never called during the passes (unused branch?); statistics unchanged")
                continue
            m.running_mean.copy_(stats.mean)
            # As the layer stores it: unbiased (torch), or biased (unbiased_running_var=False).
            m.running_var.copy_(stats.unbiased_var if getattr(m, "unbiased_running_var", True) else stats.var)
            if m.num_batches_tracked is not None:
                m.num_batches_tracked.fill_(int(total))
            changes.change(path, f"population statistics over {int(stats.count[0])} values per channel")
    return model, changes


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


def _run(model, layers, batches, num_batches, captured, progress) -> int:
    """Forward every batch with the layers in training mode; return how many batches ran."""
    modes = {m: m.training for m in model.modules()}
    hooks = [m.register_forward_pre_hook(_capture(captured[path]), with_kwargs=True) for path, m in layers]
    model.eval()
    for _, m in layers:
        m.train()
    count = 0
    try:
        with torch.no_grad(), frozen_stats(model), Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task("recalibrating batch norm", total=num_batches)
            for batch in batches:
                if num_batches is not None and count >= num_batches:
                    break
                _forward(model, batch, count)
                count += 1
                bar.advance(task)
    finally:
        for hook in hooks:
            hook.remove()
        for m, training in modes.items():
            m.training = training
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


def _capture(into: list[Stats]):
    """A forward pre-hook appending the (count, mean, m2) of the layer's input, in float64
    (over the valid positions only when the call passes our layers' `mask=`)."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs.get("input")
        mask = args[2] if len(args) > 2 else kwargs.get("mask")
        if not isinstance(x, Tensor) or x.dim() < 2 or x.numel() == 0:
            return  # the layer's own checks report a bad input
        if mask is not None:
            stats = masked_stats(x, check_mask(x, mask))
        else:
            backend = backends.resolve(getattr(module, "backend", "auto"), x).backend
            stats = backend.stats(layout.canonical(x).data)
        into.append(Stats(*(t.double() for t in stats)))

    return hook


def _merge(stats: list[Stats]) -> Stats:
    return merge_stacked(*(torch.stack(column) for column in zip(*stats)))


def _merge_across_ranks(layers, merged: dict[str, Stats], total: Tensor) -> tuple[dict[str, Stats], Tensor]:
    """Every rank's per-layer statistics, merged in rank order (the same result on every rank).

    One all_gather of a flat float64 tensor: for each layer (count, mean, m2) of C values
    (zeros, Chan's identity, for a layer a rank never called), then the batch count.
    """
    device = layers[0][1].running_mean.device
    parts = []
    for path, m in layers:
        zeros = torch.zeros(m.num_features, dtype=torch.float64, device=device)
        parts += list(merged.get(path, Stats(zeros, zeros, zeros)))
    flat = torch.cat([p.to(device) for p in parts] + [total.double().to(device).view(1)])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    every = torch.stack(gathered)  # (ranks, 3 * sum C + 1)
    result, offset = {}, 0
    for path, m in layers:
        c = m.num_features
        count, mean, m2 = (every[:, offset + k * c : offset + (k + 1) * c] for k in range(3))
        offset += 3 * c
        if count.sum() > 0:
            result[path] = merge_stacked(count, mean, m2)
    return result, every[:, -1].sum()
