"""Canonical views of a batch-norm input: `(N, C, L)` channels-first or `(M, C)` channels-last.

Every kernel sees one of these two shapes and nothing else. A view is taken without a
copy whenever the memory allows it:

- 2-D input `(N, C)`, and contiguous `(N, C, 1, ...)` -> `(M=N, C)`   kind "mc"
- contiguous `(N, C, *S)`                         -> `(N, C, L=prod S)` kind "ncl"
- channels-last `(N, *S, C)` in memory            -> `(M=N*prod S, C)` kind "mc"

Anything else (a strided slice, say) is not viewable; `canonical(..., copy=True)` then
makes a contiguous copy and the backends that need a view say they cannot take it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from torch import Tensor


class View(NamedTuple):
    """A canonical view and how to go back to the input's shape."""

    data: Tensor  # (N, C, L) or (M, C)
    kind: str  # "ncl" or "mc"


def _channels_last_order(x: Tensor) -> Tensor:
    """x permuted to (N, *S, C)."""
    return x.permute(0, *range(2, x.dim()), 1)


def _one_per_row(x: Tensor) -> bool:
    """(N, C, 1, ...): one value per example and channel, the memory of (N, C) when dense."""
    return x.dim() > 2 and math.prod(x.shape[2:]) == 1


def kind_of(x: Tensor) -> str | None:
    """"ncl", "mc", or None when `x` cannot be viewed without a copy. Contiguous input with
    one value per row ((N, C, 1, 1), after a global pooling) is "mc": the same memory as
    (N, C), and an "ncl" view's rows of one value would leave the kernels' row loops
    nothing to vectorize."""
    if x.dim() == 2:
        return "mc" if x.stride(1) == 1 or x.shape[1] == 1 else None
    if x.is_contiguous():
        return "mc" if _one_per_row(x) else "ncl"
    if _channels_last_order(x).is_contiguous():
        return "mc"
    return None


def canonical(x: Tensor, kind: str | None = None) -> View:
    """The canonical view of `x`, of the given kind if one is asked (copying when needed)."""
    want = kind or kind_of(x) or "ncl"
    if x.dim() == 2:
        return View(x if x.stride(1) == 1 else x.contiguous(), "mc")
    c = x.shape[1]
    if want == "ncl":
        return View(x.contiguous().view(x.shape[0], c, math.prod(x.shape[2:])), "ncl")
    return View(_channels_last_order(x).contiguous().view(-1, c), "mc")


def restore(data: Tensor, like: Tensor, kind: str, traced: bool = False) -> Tensor:
    """Undo `canonical`: a tensor shaped like `like`, in the memory format of `kind`.

    The result shares `data`'s memory but is a tensor of its own, not an autograd view of
    `data`: outputs of autograd Functions and custom ops are restored here, and autograd
    refuses in-place ops (`y += r`, `relu_()`, the ResNet block's) on a view made inside a
    Function. `detach()` gives that (a tensor on the same memory that autograd does not
    count as a view) at a sixth of the cost of a new tensor set to the storage. `traced`:
    torch is tracing the caller (a triton_op's body while a graph is built): there is no
    autograd view to escape, so the view itself is returned."""
    # the sizes as ints: view() parses a torch.Size argument at twice the cost
    if like.dim() == 2 or kind != "mc" or _one_per_row(like):  # contiguous strides, as torch gives
        shaped = data.view(*like.shape)
    else:
        n, c = like.shape[0], like.shape[1]
        spatial = like.shape[2:]
        shaped = data.view(n, *spatial, c).permute(0, like.dim() - 1, *range(1, like.dim() - 1))
    return shaped if traced else shaped.detach()


def empty_output(x: Tensor) -> Tensor:
    """An uninitialized tensor shaped like x with the strides `restore` gives x's output
    (what the custom operators' fake implementations return)."""
    return restore(x.new_empty(x.numel()), x, kind_of(x), traced=True)


def reduce_dims(v: Tensor) -> tuple[int, ...]:
    """The dimensions a per-channel reduction runs over in `v`, (N, C, *): every one but C
    ((0, 2) for the canonical (N, C, L) view, (0,) for (M, C))."""
    return (0, *range(2, v.dim()))


def per_channel(t: Tensor, v: Tensor) -> Tensor:
    """A per-channel vector `(C,)` shaped (1, C, 1, ...) to broadcast against `v`, (N, C, *)."""
    return t.view((1, -1) + (1,) * (v.dim() - 2))


def values_per_channel(x: Tensor) -> int:
    """How many values each channel has in `x`: N * prod(spatial)."""
    return x.numel() // x.shape[1] if x.shape[1] else 0
