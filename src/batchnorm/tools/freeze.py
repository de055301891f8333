"""Fixing batch-norm statistics: `freeze`/`unfreeze`, `frozen_stats`, `stats_snapshot`/`stats_restore`.

A frozen layer normalizes with its running statistics (evaluation mode) even when the
model is in training mode, never updates them, and, with `parameters=True`, does not
train gamma and beta either: the behaviour of torchvision's FrozenBatchNorm2d, kept in the
same module (same class, parameters and state_dict), so `unfreeze` undoes it exactly.

It works by giving the layer its own `train` method, which `model.train()` calls on every
child, that keeps it in evaluation mode; `layer.training` is therefore always truthful.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ._common import Changes, batchnorm_layers, is_frozen_style, prepare, require_batchnorm

_FROZEN = "_batchnorm_frozen"  # on a frozen layer: {parameter name: requires_grad before}
_STATS = ("running_mean", "running_var", "num_batches_tracked")


def _stay_in_eval(module: nn.Module, mode: bool = True) -> nn.Module:
    """A frozen layer's `train`: whatever mode is asked, evaluation."""
    return nn.Module.train(module, False)


def is_frozen(module: nn.Module) -> bool:
    """Frozen by `freeze`, or a FrozenBatchNorm-style module (frozen by construction)."""
    return hasattr(module, _FROZEN) or is_frozen_style(module)


def pin_eval(module: nn.Module, requires_grad: dict[str, bool]) -> None:
    """Mark `module` frozen, remembering its parameters' `requires_grad` from before."""
    setattr(module, _FROZEN, dict(requires_grad))
    module.train = functools.partial(_stay_in_eval, module)
    nn.Module.train(module, False)


def frozen_state(module: nn.Module) -> dict[str, bool] | None:
    """What `pin_eval` remembered for a frozen layer; None when it is not frozen by `freeze`."""
    return getattr(module, _FROZEN, None)


def freeze(model: nn.Module, *, parameters: bool = True, inplace: bool = True) -> tuple[nn.Module, Changes]:
    """Freeze every batch-norm layer: running statistics fixed and used, in any mode.

    parameters: also stop training gamma and beta (`requires_grad=False`), as
        FrozenBatchNorm2d does; False keeps them trainable (an affine on fixed statistics).
    Returns (model, changes). Layers without running statistics (track_running_stats=False)
    have nothing to freeze and are skipped, as are layers already frozen.
    """
    model = prepare(model, inplace)
    changes = Changes()
    for path, m in require_batchnorm(model, "freeze"):
        if is_frozen(m):
            changes.skip(path, "already frozen")
        elif getattr(m, "running_mean", None) is None:
            changes.skip(path, "no running statistics (track_running_stats=False): nothing to freeze")
        else:
            pin_eval(m, {name: p.requires_grad for name, p in m.named_parameters(recurse=False)})
            if parameters:
                for p in m.parameters(recurse=False):
                    p.requires_grad_(False)
            changes.change(path, "frozen" + (", gamma and beta not trained" if parameters else ""))
    return model, changes


def unfreeze(model: nn.Module, *, inplace: bool = True) -> tuple[nn.Module, Changes]:
    """Undo `freeze`: parameters' `requires_grad` as before, and the layer follows the
    model's mode again (set to the model's current mode). Returns (model, changes)."""
    model = prepare(model, inplace)
    changes = Changes()
    for path, m in require_batchnorm(model, "unfreeze"):
        before = frozen_state(m)
        if before is None:
            why = "FrozenBatchNorm-style module: frozen by construction" if is_frozen_style(m) else "not frozen"
            changes.skip(path, why)
            continue
        for name, p in m.named_parameters(recurse=False):
            p.requires_grad_(before.get(name, True))
        del m.train
        delattr(m, _FROZEN)
        m.train(model.training)
        changes.change(path, f"unfrozen (now in {'training' if model.training else 'evaluation'} mode)")
    return model, changes


def layers_with_running_stats(model: nn.Module, tool: str, changes: Changes, frozen_advice: str = ""):
    """The batch-norm layers of `model` whose running statistics `tool` may replace, as
    (path, module); frozen layers and layers without running statistics are left out and
    recorded in `changes.skipped` (`frozen_advice` is added to the frozen layers' reason)."""
    layers = []
    for path, m in require_batchnorm(model, tool):
        if is_frozen(m):
            changes.skip(path, "frozen: its statistics are fixed" + frozen_advice)
        elif not isinstance(m, _BatchNorm) or m.running_mean is None:
            changes.skip(path, "no running statistics (track_running_stats=False)")
        else:
            layers.append((path, m))
    return layers


def stats_snapshot(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """A copy of every batch-norm layer's running statistics: {path: {buffer name: tensor}}.

    Buffers: running_mean, running_var and num_batches_tracked, where present.
    """
    snapshot = {}
    for path, m in require_batchnorm(model, "stats_snapshot"):
        saved = {name: getattr(m, name).detach().clone() for name in _STATS if getattr(m, name, None) is not None}
        if saved:
            snapshot[path] = saved
    return snapshot


def stats_restore(
    model: nn.Module, snapshot: dict[str, dict[str, Any]], *, inplace: bool = True
) -> tuple[nn.Module, Changes]:
    """Copy a `stats_snapshot` back into the model's buffers. Returns (model, changes).

    Every layer and buffer of the snapshot must exist in the model with the same shape
    (ValueError naming the mismatches otherwise, before anything is written); layers of the
    model that the snapshot does not cover are skipped and recorded.
    """
    model = prepare(model, inplace)
    if not isinstance(snapshot, dict):
        raise TypeError(f"expected a snapshot from stats_snapshot (a dict), got {type(snapshot).__name__}")
    layers = dict(batchnorm_layers(model))
    problems = []
    for path, saved in snapshot.items():
        m = layers.get(path)
        if m is None:
            problems.append(f"{path!r} is not a batch-norm layer of this model")
            continue
        for name, value in saved.items():
            buffer = getattr(m, name, None)
            if not isinstance(buffer, torch.Tensor) or buffer.shape != value.shape:
                have = "missing" if not isinstance(buffer, torch.Tensor) else f"shape {tuple(buffer.shape)}"
                problems.append(f"{path}.{name}: snapshot has shape {tuple(value.shape)}, model has {have}")
    if problems:
        raise ValueError("the snapshot does not fit this model: " + "; ".join(problems))
    changes = Changes()
    with torch.no_grad():
        for path, saved in snapshot.items():
            for name, value in saved.items():
                getattr(layers[path], name).copy_(value)
            changes.change(path, "restored " + ", ".join(saved))
    for path in layers.keys() - snapshot.keys():
        changes.skip(path, "not in the snapshot")
    return model, changes


@contextlib.contextmanager
def frozen_stats(model: nn.Module) -> Iterator[nn.Module]:
    """`with frozen_stats(model):` forwards in training mode leave every running statistic alone.

    Inside, layers still normalize with their batch statistics (training mode is not
    changed), but their momentum is 0, so the running statistics do not move; on exit the
    momenta are put back and every running buffer (num_batches_tracked included) is
    restored bitwise to its value on entry.
    """
    layers = [m for _, m in require_batchnorm(model, "frozen_stats") if isinstance(m, _BatchNorm)]
    snapshot = stats_snapshot(model)
    momenta = [m.momentum for m in layers]
    try:
        for m in layers:
            m.momentum = 0.0
        yield model
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        stats_restore(model, snapshot)
