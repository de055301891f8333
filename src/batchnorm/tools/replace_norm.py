"""`replace_norm`: replace every batch norm by a normalization that does not depend on the batch.

At batch sizes of 1 or 2 per device (segmentation, detection, differential privacy where
per-example gradients forbid batch statistics) batch statistics are noise, and training and
evaluation normalize differently. The usual answer is another normalization:

- "group": GroupNorm (Wu & He 2018): each example normalized over (C / G channels x all
  positions) per group, G = the largest divisor of C up to `groups` (32: the paper's);
- "layer": GroupNorm with one group, i.e. layer norm over (C, *spatial) of each example as
  Wu & He define it; on (N, C) input it is `nn.LayerNorm(C)`;
- "frozen": the batch norm kept, with its running statistics fixed and used in every mode
  and gamma, beta not trained (`freeze(model, parameters=True)`: FrozenBatchNorm2d's
  behaviour, reversible with `unfreeze`), for fine-tuning a pretrained model.

    y = gamma * (x - mu_group) / sqrt(var_group + eps) + beta      (per example, per group)

GroupNorm's per-channel weight and bias mean what gamma and beta mean (a per-channel scale
and shift after the normalization), so they are carried over: the same Parameter tensors,
so an optimizer built before keeps training them. eps is kept; the running statistics have
no counterpart and are dropped. A layer of ours becomes a `GroupNormAct` (a GroupNorm that
also takes our layers' call, `residual=` and `activation=`), so its callers keep working; torch's layers become `nn.GroupNorm`. State-dict keys of gamma and beta stay.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from .. import activations
from ..extras import BatchNormExtras
from ._common import Changes, prepare, replace, require_batchnorm
from .freeze import freeze, is_frozen

KINDS = ("group", "layer", "frozen")


class GroupNormAct(nn.GroupNorm):
    """nn.GroupNorm with the call of our batch-norm layers: g(GN(x) + residual).

    x: (N, C, *spatial); residual: x's shape; activation: a name our layers fuse (or None).
    A mask is refused: GroupNorm takes each example's statistics over all its positions.
    """

    def forward(
        self, input: Tensor, residual: Tensor | None = None, mask: Tensor | None = None, *, activation: str | None = None
    ) -> Tensor:
        if mask is not None:
            raise ValueError(
                "GroupNormAct takes no mask: each example is normalized over all its positions; "
                "zero the padding, or keep batch norm where masks are needed"
            )
        out = super().forward(input)
        if residual is not None:
            out = out + residual
        return activations.forward(out, activations.check(activation))


def replace_norm(model: nn.Module, kind: str, *, groups: int = 32, inplace: bool = True) -> tuple[nn.Module, Changes]:
    """Replace every batch-norm layer by GroupNorm ("group", `groups` groups at most), layer
    norm ("layer") or a frozen batch norm ("frozen"). Returns (model, changes).

    Frozen layers (by `freeze`, or FrozenBatchNorm-style modules) already do not depend on
    the batch and are skipped, as are layers without a channel count (an uninitialized
    Lazy module: run one forward first).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(map(repr, KINDS))}, got {kind!r}")
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    if kind == "frozen":
        return freeze(model, parameters=True, inplace=inplace)
    model = prepare(model, inplace)
    changes = Changes()
    for path, m in require_batchnorm(model, "replace_norm"):
        if is_frozen(m):
            changes.skip(path, "frozen: it already normalizes independently of the batch")
        elif not isinstance(m, _BatchNorm) or isinstance(m, LazyModuleMixin):
            changes.skip(path, "an uninitialized Lazy module: run one forward first")
        else:
            norm = _group_norm(m, 1 if kind == "layer" else _groups(m.num_features, groups))
            model = replace(model, path, norm)
            what = f"{type(m).__name__}({m.num_features}) -> {type(norm).__name__}({norm.num_groups} groups)"
            changes.change(path, what + (", gamma and beta carried over" if m.affine else ""))
    return model, changes


def _groups(channels: int, most: int) -> int:
    """The largest divisor of `channels` not above `most` (GroupNorm needs one)."""
    return max(g for g in range(1, min(channels, most) + 1) if channels % g == 0)


def _group_norm(m: _BatchNorm, groups: int) -> nn.GroupNorm:
    """A GroupNorm in place of `m`, sharing its gamma and beta."""
    like = m.weight if m.weight is not None else m.running_mean
    options = dict(eps=m.eps, affine=m.affine, device=like.device if like is not None else None,
                   dtype=like.dtype if like is not None else None)  # fmt: skip
    if isinstance(m, BatchNormExtras):
        norm = GroupNormAct(groups, m.num_features, **options)
    else:
        norm = nn.GroupNorm(groups, m.num_features, **options)
    if m.affine:
        norm.weight = m.weight
        norm.bias = m.bias  # None for a layer built with bias=False
    norm.train(m.training)
    return norm
