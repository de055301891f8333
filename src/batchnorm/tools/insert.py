"""`insert`: put a batch-norm layer next to the activation every Linear/Conv feeds.

    z = W x + b;  a = g(z)        becomes        z = W x;  a = g(BN(z))       position="before"
                                  or             z = W x + b;  a = BN(g(z))   position="after"

Before the activation (the paper's place, the default) the bias b goes: in training BN
subtracts the batch mean, so b would cancel exactly, and beta takes its place. After the
activation the bias stays (g does not pass a constant shift through), and the batch norm
normalizes what the next layer receives; which works better is an empirical question, and
this lets a user (or an experiment) compare the two on the same model.

The layer is matched to the producer: BatchNorm1d after Linear and Conv1d, BatchNorm2d
after Conv2d, BatchNorm3d after Conv3d (ours, `batchnorm.nn`). A Linear is assumed to see
(N, features) input; for (N, L, features) input BatchNorm1d would take L as the channels,
and the first forward then fails with a channel-count error.

Where: a producer module called once whose output goes only to an activation (module,
function or tensor method; see `_patterns`), found by torch.fx tracing, else by
nn.Sequential order. Before: the producer `p` is replaced in its parent by
`nn.Sequential(p, bn)`, so the model keeps its class and its forward; state_dict keys of
the producer gain a ".0" (`fc.weight` -> `fc.0.weight`). After: the activation module `g`
becomes `nn.Sequential(g, bn)` in the same way; an activation written as a function call
(`F.relu(z)`) has no module to put the batch norm next to, and its producer is skipped.
Existing batch-norm layers are left alone: a producer whose activation already feeds a
batch norm is skipped.
"""

from __future__ import annotations

from torch import nn

from .. import nn as ours
from ._common import Changes, is_batchnorm, prepare, replace
from ._patterns import is_activation, pairs

_NORM_FOR = {
    nn.Linear: ours.BatchNorm1d,
    nn.Conv1d: ours.BatchNorm1d,
    nn.Conv2d: ours.BatchNorm2d,
    nn.Conv3d: ours.BatchNorm3d,
}


def insert(model: nn.Module, *, position: str = "before", inplace: bool = True) -> tuple[nn.Module, Changes]:
    """Insert batch norm before (or, with position="after", after) every activation fed by
    a Linear or Conv{1,2,3}d.

    Returns (model, changes); `changes.skipped` says when tracing failed (and the
    nn.Sequential fallback was used) and which producers were left alone.
    """
    if position not in ("before", "after"):
        raise ValueError(f'position must be "before" or "after" (the activation), got {position!r}')
    model = prepare(model, inplace)
    changes = Changes()
    found, why = pairs(model)
    if why is not None:
        changes.skip("", why)
    for pair in found:
        layer = model.get_submodule(pair.producer)
        norm_class = _NORM_FOR.get(type(layer))
        if norm_class is None or not is_activation(pair.consumer):
            continue
        after = pair.after
        if after is not None and isinstance(after.op, nn.Module) and is_batchnorm(after.op):
            changes.skip(pair.producer, f"its activation already feeds the batch norm {after.path}")
            continue
        channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        norm = norm_class(channels, device=layer.weight.device, dtype=layer.weight.dtype)
        norm.train(layer.training)
        if position == "after":
            model = _after(model, pair, norm, changes)
            continue
        dropped = layer.bias is not None
        layer.bias = None
        model = replace(model, pair.producer, nn.Sequential(layer, norm))
        what = f"now nn.Sequential({type(layer).__name__}, {norm_class.__name__}({channels}))"
        changes.change(pair.producer, what + (", bias dropped" if dropped else ""))
    return model, changes


def _after(model: nn.Module, pair, norm: nn.Module, changes: Changes) -> nn.Module:
    """Put `norm` after the activation module of `pair` (its producer keeps its bias)."""
    act = pair.consumer
    if act.path is None:
        name = getattr(act.op, "__name__", act.op)
        why = f"its activation is a function call ({name}), not a module to put the batch norm after"
        changes.skip(pair.producer, why + "; write it as a module (nn.ReLU()) or use position='before'")
        return model
    model = replace(model, act.path, nn.Sequential(act.op, norm))
    changes.change(act.path, f"now nn.Sequential({type(act.op).__name__}, {type(norm).__name__}({norm.num_features}))")
    return model
