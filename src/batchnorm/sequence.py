"""`SequenceBatchNorm`: batch norm over the last dimension of (N, L, C) input (or any (*, C)).

Transformers and tabular models keep features last, (N, L, C), where torch's BatchNorm1d
wants (N, C, L): the user transposes twice, or, when L happens to equal C, gets a layer
that silently normalizes the positions. This module normalizes the last dimension:

    rows = x.reshape(N L, C)                              (a view: no copy for contiguous x)
    y    = g(gamma (rows - mu) / sqrt(var + eps) + beta + residual)    mu, var over the N L rows
    y.reshape(N, L, C)

The (N L, C) rows are the layout our kernels read channels-last, the (M, C) view, so it runs
at that path's speed with no transpose anywhere. The work is done by a `BatchNorm1d` of ours
held as `self.norm` (every argument and extra of `bn.BatchNorm1d` is passed to it), so that
the model tools (recalibrate, accumulate, check, freeze, replace_norm, SyncBatchNorm.convert,
revert) see an ordinary batch norm over (M, C) rows; state-dict keys gain `norm.`.
"""

from __future__ import annotations

import torch.fx
from torch import Tensor, nn

from . import validation
from .nn import BatchNorm1d


class SequenceBatchNorm(nn.Module):
    """Batch norm over the last dimension: input (N, L, C) or any (*, C) with C = num_features.

    forward(x, residual=None, mask=None, *, activation=None): residual of x's shape; mask
    (N, L) bool, x's shape without the last dimension, True at the positions whose values
    enter the statistics (padding tokens False); activation g, named as our layers take it
    (what `BatchNormAct(SequenceBatchNorm(C), g)` passes). Output: x's shape.
    """

    def __init__(self, num_features: int, *args, **kwargs) -> None:
        super().__init__()
        self.num_features = num_features  # also when a tool replaces `norm` (replace_norm)
        self.norm = BatchNorm1d(num_features, *args, **kwargs)

    def forward(
        self, input: Tensor, residual: Tensor | None = None, mask: Tensor | None = None, *, activation: str | None = None
    ) -> Tensor:
        c = self.num_features
        _check(input, residual, mask, c)
        # Only the arguments given are passed on, so that whatever a tool puts in `norm`'s
        # place (torch's BatchNorm1d, a folded ChannelAffine, a GroupNorm) takes the call.
        given = {}
        if residual is not None:
            given["residual"] = residual.reshape(-1, c)
        if mask is not None:
            given["mask"] = mask.reshape(-1)
        if activation is not None:
            given["activation"] = activation
        return self.norm(input.reshape(-1, c), **given).reshape(input.shape)


def _check(input: Tensor, residual: Tensor | None, mask: Tensor | None, c: int) -> None:
    """The input is (*, C), the residual its shape, the mask its shape without C."""
    validation.validate_input(input)
    if input.shape[-1] != c:
        raise ValueError(
            f"expected {c} features in the last dimension, got input of shape {tuple(input.shape)}; "
            "SequenceBatchNorm normalizes the last dimension (N, L, C); for (N, C, L) use BatchNorm1d"
        )
    validation.validate_residual(input, residual)
    if mask is not None and (not isinstance(mask, Tensor) or mask.shape != input.shape[:-1]):
        shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"mask must have the input's shape without the last dimension, "
                         f"{tuple(input.shape[:-1])}, got {shape}")  # fmt: skip


# torch.fx records a call to `_check` instead of tracing into it (its checks branch on
# shapes, which a trace cannot), so that the model tools can trace a model holding this layer.
torch.fx.wrap("_check")
