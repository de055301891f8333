"""Input validation: every bad input gets a ValueError or TypeError that names the problem
and says what to do, before any kernel runs.

Where torch's own layer raises a RuntimeError for the same input (a per-channel tensor of the
wrong size, shape, device or dtype; non-float input), ours raises `InputError` or
`InputTypeError`: a ValueError or TypeError that is also a RuntimeError, so that code written
for torch (`except RuntimeError`) and code written for us both catch it."""

from __future__ import annotations

import torch
from torch import Tensor

from . import activations

_HALF = (torch.float16, torch.bfloat16)


class InputError(ValueError, RuntimeError):
    """Bad input that torch's layer rejects with a RuntimeError: catchable as either."""


class InputTypeError(TypeError, RuntimeError):
    """An input of the wrong dtype, which torch's layer rejects with a RuntimeError."""

_SMALL_BATCH_HINT = (
    "batch norm needs at least two values per channel to estimate a variance in training. "
    "Use drop_last=True in the DataLoader (a last batch of one example), call model.eval() "
    "to normalize with the running statistics, or train with a larger batch"
)


def validate_input(x: object, num_features: int | None = None) -> Tensor:
    """A floating-point tensor of shape (N, C, *spatial), C = num_features if given; as for
    torch's function, an empty 1-D tensor is accepted too (an empty batch)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"batch norm expects a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise InputTypeError(
            f"batch norm needs floating-point input, got {x.dtype}; convert it first, e.g. x.float()"
        )
    if x.dim() < 2 and not (x.dim() == 1 and x.numel() == 0):
        raise ValueError(
            f"batch norm expects input of shape (N, C, ...) with at least 2 dimensions, got shape "
            f"{tuple(x.shape)}; add a batch dimension with x.unsqueeze(0)"
        )
    if num_features is not None and x.shape[1] != num_features:
        raise ValueError(
            f"expected {num_features} channels in dimension 1, got input of shape {tuple(x.shape)} "
            f"with {x.shape[1]}; channels must come second (N, C, ...): for channels-last data "
            "use x.permute(...) or the memory format torch.channels_last, not a different shape"
        )
    return x


def validate_ndim(x: Tensor, allowed: tuple[int, ...], layer: str) -> None:
    """A module's rank check (BatchNorm2d takes 4-D input, ...)."""
    if x.dim() not in allowed:
        want = " or ".join(f"{d}-D" for d in allowed)
        raise ValueError(
            f"{layer} expects {want} input, got {x.dim()}-D input of shape {tuple(x.shape)}; "
            "use BatchNorm1d for (N, C) or (N, C, L), BatchNorm2d for (N, C, H, W), "
            "BatchNorm3d for (N, C, D, H, W)"
        )


def validate_residual(x: Tensor, residual: Tensor | None) -> None:
    """A residual that must go into the kernels as it is (SequenceBatchNorm reshapes it with
    its input): x's shape, dtype and device (`residual_fuses`)."""
    if residual is not None and not residual_fuses(x, residual):
        raise ValueError(
            f"residual is {residual.dtype} of shape {tuple(residual.shape)} but the input is {x.dtype} of shape "
            f"{tuple(x.shape)}; here the residual is added elementwise and must match (residual.to(x) for the dtype)"
        )


def residual_fuses(x: Tensor, residual: Tensor) -> bool:
    """Whether `residual` can be added inside batch norm's kernels: it has x's shape, dtype
    and device. Otherwise it must be one that `batch_norm(x) + residual` takes (a shape that
    broadcasts with x's, any dtype, x's device or a 0-d tensor), which is then how it is added;
    ValueError for any other."""
    if not isinstance(residual, Tensor):
        raise TypeError(f"residual must be a Tensor, got {type(residual).__name__}")
    if residual.shape == x.shape and residual.dtype == x.dtype and residual.device == x.device:
        return True
    try:
        torch.broadcast_shapes(x.shape, residual.shape)
    except RuntimeError:
        raise ValueError(
            f"residual has shape {tuple(residual.shape)} but the input has {tuple(x.shape)}; "
            "the residual is added to the normalized input before the activation, and these do not broadcast"
        ) from None
    if residual.device != x.device and residual.dim() > 0:
        raise ValueError(f"residual is on {residual.device} but the input is on {x.device}; move it with residual.to(x)")
    return False


def validate_training_batch(x: Tensor) -> None:
    """Training needs two values per channel or more (an empty batch is handled apart)."""
    count = x.numel() // x.shape[1]
    if count <= 1:
        validate_training_batch_count(count, x.shape)


def validate_training_batch_count(count: int, shape: tuple[int, ...], masked: bool = False) -> None:
    """`count` values per channel (the valid ones, with a mask) must be two or more."""
    if count == 0 and masked:
        raise ValueError(
            f"every position of the input of shape {tuple(shape)} is masked out: there are no "
            "values to compute batch statistics from in training mode; keep at least two valid "
            "positions per batch, or call model.eval()"
        )
    if count <= 1:
        what = "valid value" if masked else "value"
        raise ValueError(
            f"got input of shape {tuple(shape)}: {count} {what} per channel in training mode. "
            + _SMALL_BATCH_HINT
        )


def validate_global_count(count: int, local_shape: tuple[int, ...]) -> None:
    """The synchronized batch (all processes together) needs two values per channel or more."""
    if count <= 1:
        raise ValueError(
            f"the global batch across all processes has {count} value(s) per channel (this "
            f"process's part has shape {tuple(local_shape)}). " + _SMALL_BATCH_HINT
        )


def validate_scalars(momentum: float | None, eps: float) -> None:
    """eps keeps the division finite for a constant channel: a positive number. momentum: a
    real number or None (cumulative average); as torch, any value is taken: the running
    update `old + momentum (batch - old)` is defined for all of them (torch's tests use -1.2)."""
    if not (isinstance(eps, (int, float)) and 0.0 < float(eps) < float("inf")):
        raise ValueError(f"eps must be positive and finite, got {eps!r}; torch's default is 1e-5")
    if momentum is not None and not isinstance(momentum, (int, float)):
        raise TypeError(f"momentum must be a number or None (cumulative average), got {momentum!r}")


def validate_arguments(x: Tensor, weight, bias, running_mean, running_var, momentum, eps, activation=None) -> None:
    """Every argument of a batch-norm call but the input itself (`validate_input`), the
    residual and the extras: momentum, eps, the activation, and the per-channel tensors.
    Each given per-channel tensor has C elements, a floating dtype usable with x, and x's
    device. The running statistics must be 1-D (C,), as torch's kernels require; a weight or
    bias of C elements in another shape (torch's layer takes (C, 1)) is read as (C,)."""
    validate_scalars(momentum, eps)
    if activation not in activations.NAMES:  # the usual case costs one lookup, no call
        activations.check(activation)
    c, dtype, device = (x.shape[1] if x.dim() > 1 else 0), x.dtype, x.device  # C; 0 for torch's empty 1-D batch
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        if t is None:
            continue
        if t.numel() != c:
            raise InputError(f"{name} has {t.numel()} elements but the input has {c} channels")
        if name.startswith("running") and t.dim() != 1:
            raise InputError(
                f"{name} has shape {tuple(t.shape)}; running statistics must be 1-D with one value per "
                f"channel ({c},), as torch's layer requires; reshape the buffer with .view(-1)"
            )
        if t.device != device:
            raise InputError(
                f"{name} is on {t.device} but the input is on {device}; move the module "
                f"with .to({str(device)!r}) or the input with .to({str(t.device)!r})"
            )
        if t.dtype is dtype or (t.dtype is torch.float32 and dtype in _HALF):  # decided at once
            continue
        if not t.is_floating_point():
            raise InputTypeError(f"{name} must be floating point, got {t.dtype}")
        raise InputTypeError(
            f"{name} is {t.dtype} but the input is {dtype}; parameters and buffers must "
            "match the input's dtype (convert the module with .to(x.dtype) or the input with "
            f".to({t.dtype})), or be float32 for float16/bfloat16 input"
        )
