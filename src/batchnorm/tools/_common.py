"""What every whole-model tool shares: the record of changes, the copy-or-not rule, and
which modules count as batch norm.

Convention: every tool takes the model first and returns `(model, changes)`. The model is
changed in place unless `inplace=False`, which deep-copies it first (the caller's model is
then untouched). `changes` lists, per module path, what was changed and what was skipped
and why, so nothing is altered or left out silently.

Batch-norm layers are recognized as:

- any `torch.nn.modules.batchnorm._BatchNorm` (torch's BatchNorm1d/2d/3d, SyncBatchNorm,
  ours, and user subclasses);
- "frozen" style modules such as torchvision's or detectron2's `FrozenBatchNorm2d`, by duck
  typing (torchvision is not a dependency): a module whose buffers include `weight`,
  `bias`, `running_mean` and `running_var`, with no parameters and no `momentum`
  attribute. Their output is `(x - running_mean) / sqrt(running_var + eps) * weight + bias`.

A tool that replaces a batch-norm layer's computation (fold, convert) must know all of its
forward. `rest_of_forward` says what that forward does after normalizing: nothing for
torch's, ours and frozen-style modules; `drop` then `act` for timm's norm + activation
layers (BatchNormAct2d, SyncBatchNormAct, FrozenBatchNormAct2d); unknown (None) for any
other class that overrides the forward, which those tools then leave alone.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import backends, layout
from ..extras import nonfinite_skips_kept, plain_forward
from ..stats import Stats
from ..variants import masked_stats, validate_mask

_FROZEN_BUFFERS = ("weight", "bias", "running_mean", "running_var")


@dataclass
class Changes:
    """What a tool did to a model.

    changed: (module path, what changed) per change, in model order ("" is the root).
    skipped: (module path, why it was left alone).
    previous: for tools that overwrite running statistics (recalibrate, adapt), the
        statistics before, as `stats_snapshot` returns them: `stats_restore(model,
        changes.previous)` switches back.
    """

    changed: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    previous: dict[str, dict[str, Any]] | None = None

    def change(self, path: str, what: str) -> None:
        self.changed.append((path, what))

    def skip(self, path: str, why: str) -> None:
        self.skipped.append((path, why))

    def __str__(self) -> str:
        lines = [f"{len(self.changed)} changed, {len(self.skipped)} skipped"]
        lines += [f"  changed {path or '<model>'}: {what}" for path, what in self.changed]
        lines += [f"  skipped {path or '<model>'}: {why}" for path, why in self.skipped]
        return "\n".join(lines)


def prepare(model: nn.Module, inplace: bool) -> nn.Module:
    """The model to work on: itself, or a deep copy when `inplace` is false."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    return model if inplace else copy.deepcopy(model)


def is_frozen_style(module: nn.Module) -> bool:
    """A FrozenBatchNorm2d-like module (see the module docstring)."""
    buffers = dict(module.named_buffers(recurse=False))
    return (
        all(name in buffers for name in _FROZEN_BUFFERS)
        and next(module.parameters(recurse=False), None) is None
        and not hasattr(module, "momentum")
    )


# The forwards that are batch norm and nothing else (subclasses inheriting them included).
# timm's norm + activation layers: batch norm, then their `drop` and `act` children.
_TIMM_NORM_ACT = ("BatchNormAct2d", "SyncBatchNormAct", "FrozenBatchNormAct2d")


def rest_of_forward(module: nn.Module) -> tuple[str, ...] | None:
    """The names of the children a batch-norm layer's forward applies, in order, to the
    normalized tensor: () when it is batch norm alone, ("drop", "act") for timm's norm +
    activation layers, None when the forward is not known (a class overriding it)."""
    forward = type(module).forward
    # A frozen-style module's forward is the formula above when it has no children
    # (torchvision's and detectron2's FrozenBatchNorm2d have none).
    if plain_forward(module) or (is_frozen_style(module) and next(module.children(), None) is None):
        return ()
    # timm is imported wherever a model holds its layers; it is not a dependency of ours.
    norm_act = sys.modules.get("timm.layers.norm_act")
    if norm_act is not None and any(forward is getattr(norm_act, name).forward for name in _TIMM_NORM_ACT):
        return tuple(name for name in ("drop", "act") if name in module._modules)  # SyncBatchNormAct may lack them
    return None


def is_batchnorm(module: nn.Module) -> bool:
    """Any batch-norm layer: torch's, ours, a subclass, or a frozen-style module."""
    return isinstance(module, _BatchNorm) or is_frozen_style(module)


def batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every batch-norm layer of `model` as (path, module), in model order."""
    return [(path, m) for path, m in model.named_modules() if is_batchnorm(m)]


def require_batchnorm(model: nn.Module, tool: str) -> list[tuple[str, nn.Module]]:
    """The batch-norm layers, or a ValueError saying there are none."""
    layers = batchnorm_layers(model)
    if not layers:
        raise ValueError(
            f"{tool}: the model ({type(model).__name__}) has no batch-norm layer; "
            "add some with batchnorm.insert(model) first"
        )
    return layers


def replace(model: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """Put `new` at `path` ("" replaces the root: the new module is returned as the model).

    The module a `torch.compile` wrapper runs (its `_orig_mod`) is replaced by a new wrapper
    of `new` under the same compile options: the wrapper's forward is bound to the module it
    was made with, so a `new` merely set in its place would never run."""
    if path == "":
        return new
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    if name == "_orig_mod" and compiled_module(parent) is not None:
        return replace(model, parent_path, parent.dynamo_ctx(new))  # what torch.compile does with a module
    model.set_submodule(path, new)
    return model


def wrapped_module(module: nn.Module) -> tuple[str, nn.Module] | None:
    """(attribute, module) of the module that `module` runs when it is a wrapper torch.fx
    cannot trace: torch.compile's (`_orig_mod`), DataParallel's and
    DistributedDataParallel's (`module`); else None."""
    inner = compiled_module(module)
    if inner is not None:
        return "_orig_mod", inner
    if isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return "module", module.module
    return None


def compiled_module(module: nn.Module) -> nn.Module | None:
    """The module that `module` runs compiled when it is torch.compile's wrapper
    (OptimizedModule), else None. torch's compiler is looked up, not imported: a wrapper
    exists only where it was imported already."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    if eval_frame is not None and isinstance(module, eval_frame.OptimizedModule):
        return module._orig_mod
    return None


@contextlib.contextmanager
def progress_bar(description: str, total: int | None, enabled: bool) -> Iterator[Callable[[], None]]:
    """Yields `advance()`, one step done: a transient rich progress bar when `enabled` and
    rich is installed (it comes with the `experiments` extra), else nothing is shown. The
    tools themselves need only torch."""
    if enabled:
        try:
            from rich.progress import Progress
        except ImportError:
            enabled = False
    if not enabled:
        yield lambda: None
        return
    with Progress(transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)


def import_extra(name: str, what: str) -> Any:
    """The module `name` of the `experiments` extra (matplotlib, rich, ...), or ImportError
    saying that `what` needs it and how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise ImportError(f"{what} needs {name.partition('.')[0]}: pip install 'batchnorm[experiments]'") from error


def run_example(model: nn.Module, example_input: Any, tool: str) -> Any:
    """`model(*example_input)` for a tuple, else `model(example_input)`; a failure is a
    ValueError naming `tool` and what to pass."""
    try:
        return model(*example_input) if isinstance(example_input, tuple) else model(example_input)
    except Exception as error:
        raise ValueError(
            f"{tool}: the model failed on example_input ({type(error).__name__}: {error}); pass an "
            "input the model takes (a tensor, or a tuple of its forward arguments)"
        ) from error


@contextlib.contextmanager
def leaves_no_trace(model: nn.Module, layers: list[tuple[str, nn.Module]]) -> Iterator[None]:
    """Inside, passes over `model` that must leave it as it was (check, recalibrate): on exit
    every module's training flag is back, and so is the count of skipped non-finite updates
    of each of `layers` (batch-norm layers of ours). The running statistics are another
    matter: `frozen_stats` keeps them."""
    modes = {m: m.training for m in model.modules()}
    try:
        with nonfinite_skips_kept(m for _, m in layers):
            yield
    finally:
        for m, training in modes.items():
            m.training = training


def input_stats_hook(into: list[Stats]):
    """A forward pre-hook (register it `with_kwargs=True`) appending the (count, mean, m2) of
    the layer's input to `into`, in float64 (over the valid positions only when the call
    passes our layers' `mask=`)."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs.get("input")
        mask = args[2] if len(args) > 2 else kwargs.get("mask")
        if not isinstance(x, Tensor) or x.dim() < 2 or x.numel() == 0:
            return  # the layer's own validation reports a bad input
        if mask is not None:
            stats = masked_stats(x, validate_mask(x, mask))
        else:
            backend = backends.resolve(getattr(module, "backend", "auto"), x).backend
            stats = backend.stats(layout.canonical(x).data)
        into.append(Stats(*(t.double() for t in stats)))

    return hook
