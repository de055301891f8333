"""`fold`: merge evaluation-mode batch norm into the Linear / Conv / ConvTranspose before it.

In evaluation mode a batch norm is a per-channel affine map,

    BN(z) = s * z + t,   s = gamma / sqrt(running_var + eps),   t = beta - running_mean * s

so after a layer z = W x + b (W's output channel o scaled as a whole):

    W'[o] = s[o] * W[o],   b' = s * b + t        (b = 0 when the layer had no bias)

Output channels sit in dimension 0 of a Linear's or Conv's weight (out, in/groups, *k) and,
for ConvTranspose, in dimension 1 of each group's block of (in, out/groups, *k). The
arithmetic runs in float64 and is written back in the layer's dtype.

The batch norm is then replaced in its parent by an `Activation` (an identity that still
takes the call of our layers, `residual=` and `activation=`; in a `BatchNormAct` the
activation stays in its `act`). A batch norm with nothing to fold into (no Linear/Conv
producing its input alone) becomes a `ChannelAffine(s, t)`. Either keeps the modules the
layer's own forward applies after normalizing, under their names (timm's BatchNormAct2d:
`drop`, then `act`).
A layer in training mode is an error (its output depends on the batch).

Folding is refused (the batch norm left alone, the reason recorded) where it would change
what the model computes:
- a class whose forward is not known to be batch norm (alone or followed by known
  children): folding would drop the rest of it;
- a channel-count mismatch;
- a producer whose weight or bias is also another module's (tied parameters): scaling it
  would change that module too;
- a producer whose weight or bias is computed at each call from other tensors (a
  parametrization such as weight_norm or spectral_norm, the older torch.nn.utils.weight_norm,
  pruning): the fold written into it would be undone, or scaled by the parametrization;
- a Linear whose output is not 2-D. A Linear's features are the last dim of its output,
  a batch norm's channels are dim 1: they coincide only for (N, features). With
  `example_input` fold sees each batch norm's input shape; without, a BatchNorm2d/3d or
  frozen-style layer (4-D and 5-D input) is refused, and a fold into a Linear before any
  other batch norm leaves an `Activation` that refuses anything but 2-D input.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import activations, layout, validation
from ..channel_params import affine
from ._common import (
    Changes, is_batchnorm, is_frozen_style, prepare, replace, require_batchnorm, rest_of_forward, run_example,
)  # fmt: skip
from ._patterns import is_plain_layer, pairs

class Activation(nn.Module):
    """y = then(g(x + residual)): what remains of a folded batch norm, called as our layers
    are (g: the `activation=` named at the call, identity for None).

    `ndim`: the number of input dimensions the fold was right for (2 after a Linear whose
    input rank fold could not see); other input is a ValueError. None: any.
    `then`: {name: module} applied in order after g, kept as children under those names
    (the rest of the folded layer's forward, e.g. timm's `drop` and `act`).
    """

    def __init__(self, *, ndim: int | None = None, then: dict[str, nn.Module] | None = None) -> None:
        super().__init__()
        self.ndim = ndim
        for name, module in (then or {}).items():
            self.add_module(name, module)

    def forward(self, x: Tensor, residual: Tensor | None = None, *, activation: str | None = None) -> Tensor:
        if self.ndim is not None and x.dim() != self.ndim:
            raise ValueError(
                f"this layer is a batch norm folded into the Linear before it, which is right only "
                f"for {self.ndim}-D input (N, features); got {x.dim()} dimensions {tuple(x.shape)}, "
                "where the batch norm normalized dim 1, not the Linear's features. Fold the "
                "unfolded model with fold(model, example_input=x) so fold sees the shapes"
            )
        if residual is not None:
            validation.residual_fuses(x, residual)  # raises for what batch norm's call refuses
        y = activations.forward(x if residual is None else x + residual, activations.check(activation))
        for module in self.children():
            y = module(y)
        return y

    def extra_repr(self) -> str:
        return "" if self.ndim is None else f"ndim={self.ndim}"


class ChannelAffine(Activation):
    """y = g(scale * x + shift + residual), scale and shift (C,) over dimension 1 of (N, C, *)."""

    def __init__(self, scale: Tensor, shift: Tensor, *, then: dict[str, nn.Module] | None = None) -> None:
        super().__init__(then=then)
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)

    def forward(self, x: Tensor, residual: Tensor | None = None, *, activation: str | None = None) -> Tensor:
        validation.validate_input(x, self.scale.numel())
        scale, shift = layout.per_channel(self.scale, x), layout.per_channel(self.shift, x)
        return super().forward(x * scale + shift, residual, activation=activation)

    def extra_repr(self) -> str:
        return str(self.scale.numel())


def fold(model: nn.Module, *, inplace: bool = True, example_input=None) -> tuple[nn.Module, Changes]:
    """Fold every evaluation-mode batch norm into the layer before it. Returns (model, changes).

    Outputs match the unfolded model in evaluation mode to floating-point rounding; where a
    fold would not (see the module docstring) the batch norm is left alone and the reason
    recorded in `changes.skipped`. `example_input`: a tensor (or tuple of forward arguments)
    the model is run on, without gradients, so fold sees the rank of each batch norm's
    input (it decides whether a Linear's output features are the batch norm's channels)
    and, where torch.fx cannot trace the model, which layer feeds which batch norm.
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
    producer_of = _producers(model, changes, example_input)
    shapes = {} if example_input is None else _input_shapes(model, layers, example_input)
    owners = _parameter_owners(model)
    for path, bn in layers:
        if getattr(bn, "running_mean", None) is None:
            changes.skip(path, "no running statistics (track_running_stats=False): it normalizes with batch statistics")
            continue
        rest = rest_of_forward(bn)
        if rest is None:
            changes.skip(path, f"{type(bn).__name__} overrides the forward of batch norm; folding would "
                               "drop whatever else its forward does: not folded")  # fmt: skip
            continue
        then = {name: bn.get_submodule(name) for name in rest}
        scale, shift = _as_affine(bn)
        source = producer_of.get(path)
        if source is None:
            dtype = bn.running_mean.dtype
            model = replace(model, path, ChannelAffine(scale.to(dtype), shift.to(dtype), then=then))
            changes.change(path, "nothing to fold into: now a per-channel ChannelAffine")
            continue
        layer = model.get_submodule(source)
        why = _refusal(bn, scale.numel(), source, layer, shapes.get(path), owners)
        if why is not None:
            changes.skip(path, why)
            continue
        _fold_into(layer, scale, shift)
        # A Linear's features are channels only for 2-D output: unseen, that is checked per call.
        unseen_linear = isinstance(layer, nn.Linear) and path not in shapes
        model = replace(model, path, Activation(ndim=2 if unseen_linear else None, then=then))
        changes.change(path, f"folded into {source}" + (f" ({', '.join(rest)} kept)" if rest else ""))
    return model, changes


def _producers(model: nn.Module, changes: Changes, example_input) -> dict[str, str]:
    """{batch norm path: path of the Linear/Conv whose output alone it takes}; a note in
    `changes` when tracing failed and a forward of `example_input` or the Sequential order
    was used instead."""
    found, why = pairs(model, example_input=example_input)
    if why is not None:
        changes.skip("", why)
    return {
        p.consumer.path: p.producer
        for p in found
        if p.consumer.path is not None and is_batchnorm(p.consumer.op)
        and is_plain_layer(model.get_submodule(p.producer))
    }  # fmt: skip


@torch.no_grad()
def _input_shapes(model: nn.Module, layers: list, example_input) -> dict[str, tuple[int, ...]]:
    """{batch norm path: the shape of its input} over one forward of `example_input`; for a
    layer called more than once, the first shape that is not 2-D (the one that matters)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def recorder(path: str):
        def hook(module, args) -> None:
            if args and isinstance(args[0], Tensor) and (path not in shapes or len(shapes[path]) == 2):
                shapes[path] = tuple(args[0].shape)

        return hook

    handles = [m.register_forward_pre_hook(recorder(path)) for path, m in layers]
    try:
        run_example(model, example_input, "fold")
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def _parameter_owners(model: nn.Module) -> dict[int, list[str]]:
    """{id(parameter): the path of every module holding it}: more than one means tied."""
    owners: dict[int, list[str]] = {}
    for path, m in model.named_modules(remove_duplicate=False):
        for _, p in m.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(path)
    return owners


def _refusal(bn, channels, source, layer, shape, owners) -> str | None:
    """Why folding `bn` (with `channels` channels and input `shape`, None when not seen)
    into `layer` at path `source` would change the model's output; None when it would not."""
    produced = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if produced != channels:
        return f"has {channels} channels but {source} produces {produced}; not folded"
    computed = [n for n in ("weight", "bias") if getattr(layer, n) is not None and n not in layer._parameters]
    if computed:
        return (f"not folded into {source}: its {' and '.join(computed)} is computed from other tensors at "
                "every call (a parametrization such as weight_norm or spectral_norm, torch.nn.utils."
                "weight_norm, or pruning), which would undo or distort the fold; remove that first")  # fmt: skip
    for name in ("weight", "bias"):
        others = [o for o in owners.get(id(getattr(layer, name)), []) if o != source]
        if others:
            return (f"not folded into {source}: its {name} is shared with {', '.join(others)} "
                    "(tied parameters), which folding would change too")  # fmt: skip
    if isinstance(layer, nn.Linear):
        return _linear_axis_refusal(bn, source, shape)
    return None


def _linear_axis_refusal(bn, source, shape) -> str | None:
    """Why the Linear's features (last dim of its output) are not `bn`'s channels (dim 1),
    or None when they are or may be (2-D input, seen or possible)."""
    if shape is not None and len(shape) != 2:
        return (f"normalizes dim 1 of the {shape} output of Linear {source}, not its features "
                "(the last dim); folding would scale the wrong axis: not folded")  # fmt: skip
    if shape is None and (isinstance(bn, (nn.BatchNorm2d, nn.BatchNorm3d)) or is_frozen_style(bn)):
        return (f"{type(bn).__name__} normalizes dim 1 of 4-D or 5-D input, not the features of "
                f"Linear {source} (the last dim); folding would scale the wrong axis: not folded")  # fmt: skip
    return None


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
