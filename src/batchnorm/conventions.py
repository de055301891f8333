"""Other frameworks' batch-norm conventions, brought in as the equivalent PyTorch-convention layer.

Keras (`keras.layers.BatchNormalization`) and Flax (`flax.linen.BatchNorm`) both write

    moving = momentum * moving + (1 - momentum) * batch        (momentum ~ 0.99)

with the *biased* batch variance, and evaluate (x - moving_mean) / sqrt(moving_var + eps).
Our layers keep PyTorch's convention (`m` = weight of the new batch), so the equivalent
layer has momentum = 1 - their momentum, their epsilon, and `unbiased_running_var=False`.
Weights and moving statistics come in as numpy arrays (or anything `torch.as_tensor` takes).
"""

from __future__ import annotations

from typing import Any

import torch

from .nn import BatchNorm1d, BatchNorm2d, BatchNorm3d

_BY_DIMS = {1: BatchNorm1d, 2: BatchNorm2d, 3: BatchNorm3d}


def _build(num_features, momentum, eps, affine_scale, affine_bias, spatial_dims, **extras):
    if spatial_dims not in _BY_DIMS:
        raise ValueError(f"spatial_dims must be 1 (sequences or vectors), 2 (images) or 3, got {spatial_dims}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1] (their convention, e.g. 0.99), got {momentum}")
    layer = _BY_DIMS[spatial_dims](
        num_features, eps=eps, momentum=1.0 - momentum, affine=affine_scale or affine_bias,
        bias=affine_bias, unbiased_running_var=False, **extras,
    )  # fmt: skip
    if layer.affine and not affine_scale:  # beta only: gamma fixed at 1
        layer.weight.requires_grad_(False)
    return layer


def _load(layer, arrays: dict[str, tuple[str, Any]]) -> None:
    """Copy per-channel arrays into the layer: {our attribute: (their name, array or None)}."""
    with torch.no_grad():
        for attribute, (name, value) in arrays.items():
            if value is None:
                continue
            target = getattr(layer, attribute)
            if target is None:
                raise ValueError(f"the layer has no {name} (check center/scale or use_bias/use_scale)")
            tensor = torch.as_tensor(value, dtype=target.dtype)
            if tensor.shape != target.shape:
                raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}")
            target.copy_(tensor)


def from_keras(
    num_features: int,
    *,
    momentum: float = 0.99,
    epsilon: float = 1e-3,
    center: bool = True,
    scale: bool = True,
    spatial_dims: int = 2,
    gamma=None,
    beta=None,
    moving_mean=None,
    moving_variance=None,
    **extras,
):
    """The layer equivalent to `keras.layers.BatchNormalization(momentum, epsilon, center, scale)`.

    Keras is channels-last: give our layer NCHW input (x.permute(0, 3, 1, 2)) or a
    channels_last tensor. Weights as from `layer.get_weights()`: gamma, beta, moving_mean,
    moving_variance (each (C,)).
    """
    layer = _build(num_features, momentum, epsilon, scale, center, spatial_dims, **extras)
    _load(layer, {
        "weight": ("gamma", gamma), "bias": ("beta", beta),
        "running_mean": ("moving_mean", moving_mean), "running_var": ("moving_variance", moving_variance),
    })  # fmt: skip
    return layer


def from_flax(
    num_features: int,
    *,
    momentum: float = 0.99,
    epsilon: float = 1e-5,
    use_bias: bool = True,
    use_scale: bool = True,
    spatial_dims: int = 2,
    params: dict | None = None,
    batch_stats: dict | None = None,
    **extras,
):
    """The layer equivalent to `flax.linen.BatchNorm(momentum, epsilon, use_bias, use_scale)`.

    `params` = {"scale": ..., "bias": ...} and `batch_stats` = {"mean": ..., "var": ...}, as in
    the Flax variables of that layer.
    """
    layer = _build(num_features, momentum, epsilon, use_scale, use_bias, spatial_dims, **extras)
    params, batch_stats = params or {}, batch_stats or {}
    _load(layer, {
        "weight": ("params['scale']", params.get("scale")), "bias": ("params['bias']", params.get("bias")),
        "running_mean": ("batch_stats['mean']", batch_stats.get("mean")),
        "running_var": ("batch_stats['var']", batch_stats.get("var")),
    })  # fmt: skip
    return layer
