"""`accumulate`: one running-statistics update per optimizer step under gradient accumulation.

With k micro-batches per optimizer step, a batch-norm layer in training mode updates its
running statistics k times, each from a small batch: the running average then spans k times
fewer optimizer steps than the momentum says, and each update carries the noise of a small
batch. Inside `with accumulate(model):` the layers normalize each micro-batch as usual
(with that micro-batch's statistics: this does not change), but their running statistics
stay put; on leaving the block each layer gets ONE update from the exact statistics of
everything it saw, the Chan merge of the micro-batches' (count, mean, m2):

    n  = sum_j n_j
    mu = sum_j n_j mu_j / n
    m2 = sum_j m2_j + sum_j n_j (mu_j - mu)^2
    running <- running + momentum (batch - running),   batch = (mu, m2 / (n - 1))

through `stats.update_running`, the rule every path obeys (unbiased variance, or m2 / n for
a layer with `unbiased_running_var=False`); `num_batches_tracked` counts it once. For the
first batch-norm layer this is exactly the update one forward of the concatenated batch
would make; a deeper layer's input depends on the normalization before it, which used the
micro-batches' statistics, so there it is the exact update from the inputs it did see.

A forward that activation checkpointing recomputes in backward is not collected again, so a
checkpointed model gets the same update as without checkpointing (torch's layer, outside
the block, updates twice). A micro-batch whose input to a layer holds a NaN or an infinity
is left out of that layer's merge (the layer's own guard counts and warns about it as it always does); a layer that
saw no finite micro-batch is not updated. A block left by an exception updates nothing.
Works on torch's layers and ours; frozen layers, layers in evaluation mode and layers
without running statistics are left alone. A SyncBatchNorm layer, whose every update is
from the statistics of all processes, gets the merge over its processes of their merged
micro-batches (one all_gather per process group for the whole model, on exit): every
process must leave the block together, as it runs the layer's forwards together.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import modes
from ..distributed import SyncBatchNorm, active_group
from ..stats import Stats, merge_all, merge_stacked, update_running
from ._common import Changes, input_stats_hook, require_batchnorm
from .freeze import frozen_stats, is_frozen
from .rank_stats import gather


@contextlib.contextmanager
def accumulate(model: nn.Module) -> Iterator[Changes]:
    """`with accumulate(model) as changes:` run one optimizer step's micro-batches (forward
    and backward); on exit every batch-norm layer that ran in training mode updates its
    running statistics once, from the merged statistics of all its micro-batches.

    Yields a `Changes` record, filled on exit: per layer, how many micro-batches (and values
    per channel) went into its update, or why it was not updated.
    """
    changes = Changes()
    layers = [
        (path, m)
        for path, m in require_batchnorm(model, "accumulate")
        if isinstance(m, _BatchNorm) and m.track_running_stats and not is_frozen(m)
    ]
    seen: dict[str, list[Stats]] = {path: [] for path, _ in layers}
    hooks = [m.register_forward_pre_hook(_training_inputs(seen[path]), with_kwargs=True) for path, m in layers]
    try:
        with frozen_stats(model):  # momentum 0 inside, buffers restored bitwise on exit
            yield changes
    finally:
        for hook in hooks:
            hook.remove()
    local = {path: _merge_finite(seen[path]) for path, _ in layers}
    _merge_across_processes(layers, local)
    for path, m in layers:
        _update_once(m, path, local[path], changes)


def _training_inputs(into: list[Stats]):
    """A forward pre-hook collecting the statistics of the layer's input in the calls that
    would update its running statistics (training mode; not a forward that activation
    checkpointing recomputes in backward, whose batch was collected once already), in
    float64."""
    collect = input_stats_hook(into)

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if module.training and not modes.recomputing():
            # Without autograd: a graph behind the kept statistics would hold every
            # micro-batch's input until the block ends (and checkpointing compares the
            # tensors a forward saves with those its recomputation saves).
            with torch.no_grad():
                collect(module, args, kwargs)

    return hook


class _Merged(NamedTuple):
    stats: Stats | None  # the merge of the kept micro-batches (None: none kept)
    kept: int
    seen: int


def _merge_finite(micro: list[Stats]) -> _Merged:
    """The merge of the micro-batches whose statistics are finite (they are left out else,
    as the layer's own guard leaves such a batch out)."""
    finite = [s for s in micro if bool(torch.isfinite(s.mean).all() and torch.isfinite(s.m2).all())]
    return _Merged(merge_all(finite) if finite else None, len(finite), len(micro))


def _merge_across_processes(layers, local: dict[str, _Merged]) -> None:
    """Replace the statistics of every synchronized layer (a SyncBatchNorm in a group of two
    processes or more) by their merge over the processes: one all_gather per group of the
    flat (count, mean, m2) of all its layers (zeros for a layer with nothing kept), merged in
    process order, so every process gets the same statistics."""
    groups: dict[int, tuple[object, list]] = {}  # by id: in the layers' order, the same everywhere
    for path, m in layers:
        group = active_group(m.process_group) if isinstance(m, (SyncBatchNorm, nn.SyncBatchNorm)) else None
        if group is not None:
            groups.setdefault(id(group), (group, []))[1].append((path, m))
    for group, members in groups.values():
        device = members[0][1].running_mean.device
        parts = []
        for path, m in members:
            zeros = torch.zeros(m.num_features, dtype=torch.float64, device=device)
            parts += local[path].stats or Stats(zeros, zeros, zeros)
        every, offset = gather(torch.cat([p.to(device, torch.float64) for p in parts]), group), 0
        for path, m in members:
            c = m.num_features
            count, mean, m2 = (every[:, offset + k * c : offset + (k + 1) * c] for k in range(3))
            offset += 3 * c
            merged = merge_stacked(count, mean, m2) if count.sum() > 0 else None
            local[path] = local[path]._replace(stats=merged)


@torch.no_grad()
def _update_once(m: _BatchNorm, path: str, local: _Merged, changes: Changes) -> None:
    """Fold the merged micro-batch statistics into the running statistics."""
    if local.stats is None:
        why = "every micro-batch had non-finite values" if local.seen else "not run in training mode inside the block"
        changes.skip(path, why + "; running statistics unchanged")
        return
    merged = local.stats
    var = merged.unbiased_var if getattr(m, "unbiased_running_var", True) else merged.var
    accepted = update_running(m.running_mean, m.running_var, merged.mean, var, m.momentum, m.num_batches_tracked)
    if not bool(accepted):
        changes.skip(path, "the merged statistics overflow the buffers' dtype; running statistics unchanged")
        return
    what = f"one update from {local.kept} micro-batches ({int(merged.count[0])} values per channel)"
    if local.kept < local.seen:
        what += f"; {local.seen - local.kept} left out (non-finite values)"
    changes.change(path, what)
