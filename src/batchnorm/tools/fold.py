"""`fold`: merge evaluation-mode batch norm into the Linear / Conv / ConvTranspose before it.

In evaluation mode a batch norm is a per-channel affine map (DESIGN.md),

    BN(z) = s * z + t,   s = gamma / sqrt(running_var + eps),   t = beta - running_mean * s

so after a layer z = W x + b (W's output channel o scaled as a whole):

    W'[o] = s[o] * W[o],   b' = s * b + t        (b = 0 when the layer had no bias)

Output channels sit in dimension 0 of a Linear's or Conv's weight (out, in/groups, *k) and,
for ConvTranspose, in dimension 1 of each group's block of (in, out/groups, *k). The
arithmetic runs in float64 and is written back in the layer's dtype.

The batch norm is then replaced in its parent by `Activation(bn.activation)` (identity
when it fused none; it still takes the `residual=` our layers accept). A batch norm with
nothing to fold into (no Linear/Conv producing its input alone) becomes a
`ChannelAffine(s, t, activation)`. A channel-count mismatch leaves the layer alone and is
recorded; a layer in training mode is an error (its output depends on the batch).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import activations, checks
from ..reference import affine
from ._common import Changes, is_batchnorm, prepare, replace, require_batchnorm
from ._patterns import pairs

_FOLDABLE = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
)  # fmt: skip


class Activation(nn.Module):
    """y = g(x + residual): what remains of a folded batch norm (g = identity for None)."""

    def __init__(self, activation: str | None = None) -> None:
        super().__init__()
        self.activation = checks.check_activation(activation)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        checks.check_residual(x, residual)
        return activations.forward(x if residual is None else x + residual, self.activation)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


class ChannelAffine(Activation):
    """y = g(scale * x + shift + residual), scale and shift (C,) over dimension 1 of (N, C, *)."""

    def __init__(self, scale: Tensor, shift: Tensor, activation: str | None = None) -> None:
        super().__init__(activation)
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        checks.check_input(x, self.scale.numel())
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return super().forward(x * self.scale.view(shape) + self.shift.view(shape), residual)

    def extra_repr(self) -> str:
        return f"{self.scale.numel()}, " + super().extra_repr()


def fold(model: nn.Module, *, inplace: bool = True) -> tuple[nn.Module, Changes]:
    """Fold every evaluation-mode batch norm into the layer before it. Returns (model, changes).

    Outputs match the unfolded model in evaluation mode to floating-point rounding.
    """
    model = prepare(model, inplace)
    layers = require_batchnorm(model, "fold")
    training = [path or "<model>" for path, m in layers if m.training]
    if training:
        raise ValueError(
            f"fold needs batch norm in evaluation mode, but {', '.join(training)} "
            "is in training mode (it would normalize with each batch's own statistics); call model.eval() first"
        )
    changes = Changes()
    found, why = pairs(model)
    if why is not None:
        changes.skip("", why)
    producer_of = {
        p.consumer.path: p.producer
        for p in found
        if p.consumer.path is not None and is_batchnorm(p.consumer.op)
        and isinstance(model.get_submodule(p.producer), _FOLDABLE)
    }  # fmt: skip
    for path, bn in layers:
        if getattr(bn, "running_mean", None) is None:
            changes.skip(path, "no running statistics (track_running_stats=False): it normalizes with batch statistics")
            continue
        scale, shift = _as_affine(bn)
        activation = getattr(bn, "activation", None)
        source = producer_of.get(path)
        if source is None:
            dtype = bn.running_mean.dtype
            model = replace(model, path, ChannelAffine(scale.to(dtype), shift.to(dtype), activation))
            changes.change(path, "nothing to fold into: now a per-channel ChannelAffine")
            continue
        layer = model.get_submodule(source)
        channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        if channels != scale.numel():
            changes.skip(path, f"has {scale.numel()} channels but {source} produces {channels}; not folded")
            continue
        _fold_into(layer, scale, shift)
        model = replace(model, path, Activation(activation))
        changes.change(path, f"folded into {source}" + (f" (activation {activation} kept)" if activation else ""))
    return model, changes


def _as_affine(bn: nn.Module) -> tuple[Tensor, Tensor]:
    """(s, t) in float64, the evaluation-mode map of `bn`."""
    invstd = torch.rsqrt(bn.running_var.detach().double() + bn.eps)
    weight = None if bn.weight is None else bn.weight.detach().double()
    bias = None if bn.bias is None else bn.bias.detach().double()
    scale, beta = affine(invstd, weight, bias)
    return scale, beta - bn.running_mean.detach().double() * scale


@torch.no_grad()
def _fold_into(layer: nn.Module, scale: Tensor, shift: Tensor) -> None:
    """W' = s W per output channel, b' = s b + t, in place (a bias is created when missing)."""
    weight = layer.weight.double()
    if isinstance(layer, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        g = layer.groups
        blocks = weight.view(g, weight.shape[0] // g, weight.shape[1], *weight.shape[2:])
        folded = blocks * scale.view(g, 1, -1, *([1] * (weight.dim() - 2)))
    else:
        folded = weight * scale.view(-1, *([1] * (weight.dim() - 1)))
    layer.weight.copy_(folded.view_as(weight))
    bias = shift if layer.bias is None else layer.bias.double() * scale + shift
    if layer.bias is None:
        layer.bias = nn.Parameter(bias.to(layer.weight.dtype), requires_grad=layer.weight.requires_grad)
    else:
        layer.bias.copy_(bias)
