"""The activations a batch-norm layer can fuse, in plain torch ops.

Every backend implements the same set; these torch versions serve the `reference` and
`aten` backends and define what the fast kernels must match.

For an activation g applied to u = z' (+ residual):

    relu        g(u) = max(u, 0)                  g'(u) = [u > 0]
    leaky_relu  g(u) = u if u > 0 else 0.01 u     g'(u) = 1 if u > 0 else 0.01
    sigmoid     g(u) = 1 / (1 + exp(-u))          g'(u) = g(u) (1 - g(u))
    tanh        g(u) = tanh(u)                    g'(u) = 1 - tanh(u)^2
    silu        g(u) = u sigmoid(u)               g'(u) = s (1 + u (1 - s)),  s = sigmoid(u)
    gelu        g(u) = u Phi(u)  (exact, erf)     g'(u) = Phi(u) + u phi(u)
    relu6       g(u) = min(max(u, 0), 6)          g'(u) = [0 < u < 6]
    hardswish   g(u) = u relu6(u + 3) / 6         g'(u) = 0 if u <= -3, 1 if u >= 3, else u / 3 + 1/2

The two piecewise ones take torch's slopes at their breakpoints (relu6's hardtanh_backward
and hardswish_backward): 0 at u = 0 and u = 6; 0 at u = -3 and 1 at u = 3 (where
u / 3 + 1/2 would say -1/2 and 3/2). At a NaN u no slope is torch's (its vector and scalar
loops give different ones); a NaN u comes from a NaN x, whose xhat makes dx NaN anyway.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

NAMES = (None, "relu", "leaky_relu", "sigmoid", "tanh", "silu", "gelu", "relu6", "hardswish")

LEAKY_SLOPE = 0.01
_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


# The torch modules computing each activation, matched by exact type (a subclass may compute
# something else); LeakyReLU and GELU also need their argument to be ours (slope, exact erf).
_MODULES: dict[type, str | None] = {
    nn.Identity: None,
    nn.ReLU: "relu",
    nn.LeakyReLU: "leaky_relu",
    nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh",
    nn.SiLU: "silu",
    nn.GELU: "gelu",
    nn.ReLU6: "relu6",  # a subclass of nn.Hardtanh: an nn.Hardtanh(0, 6) is not matched (type, not isinstance)
    nn.Hardswish: "hardswish",
}
NOT_FUSABLE = "not fusable"  # what name_of_module says of any other module


def name_of_module(module: nn.Module) -> str | None:
    """The name of the activation `module` computes (None for nn.Identity), or NOT_FUSABLE."""
    name = _MODULES.get(type(module), NOT_FUSABLE)
    if name == "leaky_relu" and not math.isclose(module.negative_slope, LEAKY_SLOPE):
        return NOT_FUSABLE
    if name == "gelu" and module.approximate != "none":
        return NOT_FUSABLE
    return name


def module_for(name: str | None) -> nn.Module:
    """The torch module computing `name` (nn.Identity for None)."""
    check(name)
    if name == "leaky_relu":
        return nn.LeakyReLU(LEAKY_SLOPE)
    return next(cls for cls, known in _MODULES.items() if known == name)()


def check(name: str | None) -> str | None:
    """Return `name` if it is a supported activation, else raise ValueError."""
    if name not in NAMES:
        raise ValueError(
            f"activation={name!r} is not supported; choose one of {', '.join(map(repr, NAMES))}"
        )
    return name


def forward(u: Tensor, name: str | None, *, overwrite: bool = False) -> Tensor:
    """g(u), elementwise. `overwrite`: u is the caller's own fresh tensor, which ReLU and ReLU6
    may overwrite (their backward reads their output, never u); the others make a new one."""
    if name is None:
        return u
    if name == "relu":
        return torch.relu_(u) if overwrite else torch.relu(u)
    if name == "leaky_relu":
        return torch.nn.functional.leaky_relu(u, LEAKY_SLOPE)
    if name == "sigmoid":
        return torch.sigmoid(u)
    if name == "tanh":
        return torch.tanh(u)
    if name == "silu":
        return torch.nn.functional.silu(u)
    if name == "gelu":
        return torch.nn.functional.gelu(u)
    if name == "relu6":
        return torch.nn.functional.relu6(u, inplace=overwrite)
    if name == "hardswish":
        return torch.nn.functional.hardswish(u)
    raise AssertionError(name)


def derivative(u: Tensor, name: str | None) -> Tensor | None:
    """g'(u), elementwise, in differentiable torch ops (double backward goes through it).

    Returns None for the identity, so callers can skip the multiply.
    """
    if name is None:
        return None
    if name == "relu":
        return (u > 0).to(u.dtype)
    if name == "leaky_relu":
        # full_like keeps the slope in u's dtype (a Python scalar would round it to fp32)
        return torch.where(u > 0, torch.ones_like(u), torch.full_like(u, LEAKY_SLOPE))
    if name == "sigmoid":
        s = torch.sigmoid(u)
        return s * (1 - s)
    if name == "tanh":
        t = torch.tanh(u)
        return 1 - t * t
    if name == "silu":
        s = torch.sigmoid(u)
        return s * (1 + u * (1 - s))
    if name == "gelu":
        cdf = 0.5 * (1 + torch.erf(u * _INV_SQRT2))
        pdf = torch.exp(-0.5 * u * u) * _INV_SQRT_2PI
        return cdf + u * pdf
    if name == "relu6":
        return ((u > 0) & (u < 6)).to(u.dtype)
    if name == "hardswish":
        return _hardswish_slope(u)
    raise AssertionError(name)


def _hardswish_slope(u: Tensor) -> Tensor:
    """g'(u) = 0 for u <= -3, u / 3 + 1/2 for -3 < u < 3, 1 for u >= 3, as torch's
    hardswish_backward; the middle piece stays differentiable (second derivative 1/3)."""
    middle = torch.where(u < 3, u / 3 + 0.5, torch.ones_like(u))
    return torch.where(u <= -3, torch.zeros_like(u), middle)
