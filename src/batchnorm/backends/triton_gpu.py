"""The `triton` backend: fused GPU kernels for the kernel contract (kernels in triton_kernels.py).

Inputs are the canonical views `(N, C, L)` and `(M, C)` in fp32, fp16, bf16 or fp64,
contiguous. Each contract function is one or two kernel launches:

    stats            stats_partials (grid: channel blocks x P)  ->  merge_stats (channel blocks)
    apply            apply (one pass: read x [, residual], write y)
    backward_reduce  grad_partials (channel blocks x P)         ->  merge_sums
    backward_apply   backward_apply (read dy, x [, residual], write dx [, dresidual])

`Tiling` says how the reduction is cut: tiles of `block_c` channels x `block_l` positions,
`tiles` tiles per program; `tiling_for` sizes it to fill the GPU. Every launch helper takes
an optional `tiling=` and `out=` (the tests pass small tilings to exercise every mask and
merge, and NaN-filled outputs to catch unwritten elements).

The kernels module (and with it triton) is imported on the first launch, not with this
module, so `import batchnorm` works without triton. On CPU the kernels run in Triton's
interpreter when TRITON_INTERPRET=1 was set before triton was first imported (Triton reads
it then; tests/conftest.py sets it).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from typing import NamedTuple

import torch
from torch import Tensor

from .. import activations, layout
from ..reference import acc_dtype
from .base import Backend

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what `auto` hands to triton
TILE_ELEMENTS = 4096  # elements a program holds per tile: enough loads in flight per SM
PROGRAMS_PER_SM = 8  # reduction programs per SM: a few waves, a small workspace
MERGE_BLOCK = (64, 32)  # (channels, partials) per step of the merge kernels


class Geometry(NamedTuple):
    """A canonical view as the kernels see it: a strided (N, C, L) array."""

    n: int
    c: int
    l: int
    s_n: int
    s_c: int
    s_l: int


class Tiling(NamedTuple):
    """Tiles of block_c channels x block_l positions; `tiles` consecutive tiles per program."""

    block_c: int
    block_l: int
    tiles: int


class Grid(NamedTuple):
    """A tiling applied to a geometry: LB tiles along L, T tiles per channel block, P programs."""

    lb: int
    t: int
    channel_blocks: int
    programs: int


def geometry(v: Tensor) -> Geometry:
    """(N, C, L) contiguous -> strides (C L, L, 1); (M, C) -> N = 1, L = M, strides (0, 1, C).

    An (N, C, 1) view is the same memory as (N, C), and is taken as such so its loads run
    along C.
    """
    if v.dim() == 3 and v.shape[2] != 1:
        n, c, l = v.shape
        return Geometry(n, c, l, c * l, l, 1)
    m, c = v.shape[0], v.shape[1]
    return Geometry(1, c, m, 0, 1, c)


def tiling_for(g: Geometry, programs: int) -> Tiling:
    """Tiles long along the contiguous axis, ~TILE_ELEMENTS each, spread over ~`programs`."""
    if g.s_l == 1:
        block_l = min(_next_pow2(g.l), 1024)
        block_c = max(1, min(_next_pow2(g.c), TILE_ELEMENTS // block_l))
    else:
        block_c = min(_next_pow2(g.c), 256)
        block_l = max(1, min(_next_pow2(g.l), TILE_ELEMENTS // block_c))
    channel_blocks = -(-g.c // block_c)
    total = g.n * -(-g.l // block_l)
    per_block = max(1, programs // channel_blocks)
    return Tiling(block_c, block_l, -(-total // per_block))


def _next_pow2(n: int) -> int:
    """The smallest power of two >= n (Triton block sizes must be powers of two)."""
    return 1 << max(0, (n - 1).bit_length())


def grid_of(g: Geometry, tiling: Tiling) -> Grid:
    lb = -(-g.l // tiling.block_l)
    t = g.n * lb
    # cdiv(T, tiles) programs: every program has at least one tile, so writes its row.
    return Grid(lb, t, -(-g.c // tiling.block_c), -(-t // tiling.tiles))


@functools.cache
def _kernels():
    from . import triton_kernels

    return triton_kernels


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _prepare(x: Tensor, tiling: Tiling | None) -> tuple[Geometry, Tiling, Grid]:
    if not x.is_contiguous():
        raise ValueError(
            f"the triton backend needs a contiguous canonical view, got shape {tuple(x.shape)} "
            f"with strides {x.stride()}; pass x.contiguous()"
        )
    g = geometry(x)
    if tiling is None:
        sms = _sm_count(x.device) if x.is_cuda else 1
        tiling = tiling_for(g, PROGRAMS_PER_SM * sms)
    return g, tiling, grid_of(g, tiling)


def _on_device(x: Tensor):
    """Launch on x's GPU (Triton launches on the current device)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _vectors(x: Tensor, *vs: Tensor) -> list[Tensor]:
    """Per-channel vectors as contiguous (C,) tensors in the accumulation dtype."""
    return [v.to(acc_dtype(x.dtype)).contiguous() for v in vs]


def _contiguous(t: Tensor | None) -> Tensor | None:
    """dy or residual with the contiguous x's strides (autograd may hand over others)."""
    return None if t is None else t.contiguous()


def _out(out: Tensor | None, like: Tensor, shape=None, dtype=None) -> Tensor:
    """`out` after checking it, or a new tensor."""
    shape = tuple(like.shape) if shape is None else shape
    dtype = like.dtype if dtype is None else dtype
    if out is None:
        return torch.empty(shape, dtype=dtype, device=like.device)
    if tuple(out.shape) != shape or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {dtype} tensor of shape {shape}, got {out.dtype} {tuple(out.shape)}")
    return out


def _act_code(activation: str | None) -> int:
    return activations.NAMES.index(activations.check(activation))


def stats_partials(x: Tensor, *, tiling: Tiling | None = None, out=None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-program (count, mean, m2), each (P, C) in the accumulation dtype."""
    g, tiling, grid = _prepare(x, tiling)
    shape, acc = (grid.programs, g.c), acc_dtype(x.dtype)
    out = (None, None, None) if out is None else out
    count, mean, m2 = (_out(o, x, shape, acc) for o in out)
    with _on_device(x):
        _kernels().stats_partials_kernel[(grid.channel_blocks, grid.programs)](
            x, count, mean, m2, g.c, g.l, grid.lb, grid.t, g.s_n, g.s_c, g.s_l, tiling.tiles,
            BLOCK_C=tiling.block_c, BLOCK_L=tiling.block_l,
        )
    return count, mean, m2


def merge_stats(count: Tensor, mean: Tensor, m2: Tensor, *, out=None) -> tuple[Tensor, Tensor, Tensor]:
    """The (C,) statistics of (P, C) partials, merged in order 0..P-1 (stats.merge_stacked)."""
    p, c = mean.shape
    out = (None, None, None) if out is None else out
    results = tuple(_out(o, mean, (c,)) for o in out)
    block_c, block_p = MERGE_BLOCK
    with _on_device(mean):
        _kernels().merge_stats_kernel[(-(-c // block_c),)](
            count, mean, m2, *results, c, p, BLOCK_C=block_c, BLOCK_P=block_p
        )
    return results


def stats(x: Tensor, *, tiling: Tiling | None = None, out=None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel (count, mean, m2) of a canonical view, each (C,) in the accumulation dtype."""
    return merge_stats(*stats_partials(x, tiling=tiling), out=out)


def apply(x, mean, scale, shift, activation=None, residual=None, *, tiling=None, out=None) -> Tensor:
    """y = g((x - mean) scale + shift + residual) per channel, in x's dtype and shape."""
    g, tiling, grid = _prepare(x, tiling)
    mean, scale, shift = _vectors(x, mean, scale, shift)
    residual = _contiguous(residual)
    y = _out(out, x)
    with _on_device(x):
        _kernels().apply_kernel[(grid.channel_blocks, grid.programs)](
            x, x if residual is None else residual, mean, scale, shift, y,
            g.c, g.l, grid.lb, grid.t, g.s_n, g.s_c, g.s_l, tiling.tiles,
            HAS_RES=residual is not None, ACT=_act_code(activation), LEAKY=activations.LEAKY_SLOPE,
            BLOCK_C=tiling.block_c, BLOCK_L=tiling.block_l,
        )
    return y


def backward_reduce(
    dy, x, mean, invstd, scale, shift, activation=None, residual=None, *, tiling=None, out=None
) -> Tensor:
    """(2, C): row 0 = sum_d, row 1 = sum_d_xhat, in the accumulation dtype."""
    g, tiling, grid = _prepare(x, tiling)
    mean, invstd, scale, shift = _vectors(x, mean, invstd, scale, shift)
    dy, residual = _contiguous(dy), _contiguous(residual)
    ws = torch.empty((2, grid.programs, g.c), dtype=mean.dtype, device=x.device)
    sums = _out(out, mean, (2, g.c))
    block_c, block_p = MERGE_BLOCK
    with _on_device(x):
        k = _kernels()
        k.grad_partials_kernel[(grid.channel_blocks, grid.programs)](
            dy, x, x if residual is None else residual, mean, invstd, scale, shift, ws,
            g.c, g.l, grid.lb, grid.t, g.s_n, g.s_c, g.s_l, tiling.tiles, grid.programs,
            HAS_RES=residual is not None, ACT=_act_code(activation), LEAKY=activations.LEAKY_SLOPE,
            BLOCK_C=tiling.block_c, BLOCK_L=tiling.block_l,
        )
        k.merge_sums_kernel[(-(-g.c // block_c), 2)](ws, sums, g.c, grid.programs, BLOCK_C=block_c, BLOCK_P=block_p)
    return sums


def backward_apply(
    dy, x, mean, invstd, scale, shift, mean_d, mean_d_xhat, activation=None, residual=None,
    *, tiling=None, out=None, out_residual=None,
) -> tuple[Tensor, Tensor | None]:
    """dx = scale (d - mean_d - xhat mean_d_xhat) in x's dtype, and dresidual = d (or None)."""
    g, tiling, grid = _prepare(x, tiling)
    mean, invstd, scale, shift, mean_d, mean_d_xhat = _vectors(x, mean, invstd, scale, shift, mean_d, mean_d_xhat)
    dy, residual = _contiguous(dy), _contiguous(residual)
    dx = _out(out, x)
    dres = None if residual is None else _out(out_residual, residual)
    with _on_device(x):
        _kernels().backward_apply_kernel[(grid.channel_blocks, grid.programs)](
            dy, x, x if residual is None else residual, mean, invstd, scale, shift, mean_d, mean_d_xhat,
            dx, dx if dres is None else dres,
            g.c, g.l, grid.lb, grid.t, g.s_n, g.s_c, g.s_l, tiling.tiles,
            HAS_RES=residual is not None, ACT=_act_code(activation), LEAKY=activations.LEAKY_SLOPE,
            BLOCK_C=tiling.block_c, BLOCK_L=tiling.block_l,
        )
    return dx, dres


def interpreting() -> bool:
    """Whether Triton runs its CPU interpreter (TRITON_INTERPRET, as Triton reads it)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.cache
def _missing() -> str | None:
    """Why triton cannot be used here, looked up once (the search of sys.path is not free)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'batchnorm[gpu]')"
    return None


class TritonBackend(Backend):
    """Fused Triton kernels; auto picks it for CUDA tensors in fp32, fp16 and bf16."""

    name = "triton"

    def unavailable(self) -> str | None:
        return _missing()

    def unsupported(self, x: Tensor) -> str | None:
        if x.device.type == "cpu" and not interpreting():
            return "a CPU tensor: triton runs on CUDA, or on CPU under TRITON_INTERPRET=1"
        if x.device.type not in ("cpu", "cuda"):
            return f"a {x.device.type} tensor: triton runs on CUDA"
        if x.dtype not in DTYPES:
            return f"dtype {x.dtype}: triton takes float32, float16, bfloat16 and float64"
        if x.numel() == 0:
            return "an empty tensor"
        if layout.kind_of(x) is None or (x.dim() == 2 and not x.is_contiguous()):
            return "a strided view: triton takes contiguous or channels-last memory"
        return None

    def preferred(self, x: Tensor) -> bool:
        return x.device.type == "cuda" and x.dtype in FAST_DTYPES

    def stats(self, x):
        return stats(x)

    def apply(self, x, mean, scale, shift, activation=None, residual=None):
        return apply(x, mean, scale, shift, activation, residual)

    def backward_reduce(self, dy, x, mean, invstd, scale, shift, activation=None, residual=None):
        sums = backward_reduce(dy, x, mean, invstd, scale, shift, activation, residual)
        return sums[0], sums[1]

    def backward_apply(
        self, dy, x, mean, invstd, scale, shift, mean_d, mean_d_xhat, activation=None, residual=None
    ):
        return backward_apply(dy, x, mean, invstd, scale, shift, mean_d, mean_d_xhat, activation, residual)
