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

A micro-batch whose input to a layer holds a NaN or an infinity is left out of that layer's
merge (the layer's own guard counts and warns about it as it always does); a layer that
saw no finite micro-batch is not updated. A block left by an exception updates nothing.
Works on torch's layers and ours; frozen layers, layers in evaluation mode and layers
without running statistics are left alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..stats import Stats, merge_all, update_running
from ._common import Changes, input_stats_hook, require_batchnorm
from .freeze import frozen_stats, is_frozen


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
    for path, m in layers:
        _update_once(m, path, seen[path], changes)


def _training_inputs(into: list[Stats]):
    """A forward pre-hook collecting the statistics of the layer's input in the calls that
    would update its running statistics (training mode), in float64."""
    collect = input_stats_hook(into)

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if module.training:
            collect(module, args, kwargs)

    return hook


@torch.no_grad()
def _update_once(m: _BatchNorm, path: str, micro: list[Stats], changes: Changes) -> None:
    """Fold the merge of the finite micro-batch statistics into the running statistics."""
    finite = [s for s in micro if bool(torch.isfinite(s.mean).all() and torch.isfinite(s.m2).all())]
    if not finite:
        why = "not run in training mode inside the block" if not micro else "every micro-batch had non-finite values"
        changes.skip(path, why + "; running statistics unchanged")
        return
    merged = merge_all(finite)
    var = merged.unbiased_var if getattr(m, "unbiased_running_var", True) else merged.var
    accepted = update_running(m.running_mean, m.running_var, merged.mean, var, m.momentum, m.num_batches_tracked)
    if not bool(accepted):
        changes.skip(path, "the merged statistics overflow the buffers' dtype; running statistics unchanged")
        return
    what = f"one update from {len(finite)} micro-batches ({int(merged.count[0])} values per channel)"
    if len(finite) < len(micro):
        what += f"; {len(micro) - len(finite)} left out (non-finite values)"
    changes.change(path, what)
