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

A pointer argument a launch does not use (no residual, no weight) is given a
tensor that launch only reads, never one it writes: a compiled graph (triton_ops.py) runs
each kernel on copies of the tensors it writes, and an output passed twice would reach the
kernel as two different tensors.

The whole op (`forward`, `backward`, which `TritonBackend.forward`/`.backward` hand to the op
layer, ops.py) runs with no torch op between its launches:

    forward, tiled     stats_partials -> merge_stats (finalizing: mean, invstd, scale, shift)
                       -> apply                                            2R + 1W of x
    forward, single    single_read_forward                                 1R + 1W
    evaluation         merge_stats (from the running statistics) -> apply  1R + 1W
    backward, tiled    grad_partials -> merge_sums (finalizing: dgamma, dbeta, mean_d,
                       mean_d_xhat) -> backward_apply                      4R + 1W (dy, x)
    backward, single   single_read_backward                                2R + 1W

The single-read path holds a channel block's whole N L values in registers; it runs when
`single_read_block` says they fit (SINGLE_READ_ELEMENTS). The kernels only read the running
statistics (in evaluation): the op layer folds the batch's statistics into them after the
op returns (ops.update_running_stats, the one running update of every backend).

The kernels module (and with it triton) is imported on the first launch, not with this
module, so `import batchnorm` works without triton. On CPU the kernels run in Triton's
interpreter when TRITON_INTERPRET=1 was set before triton was first imported (Triton reads
it then; tests/conftest.py sets it).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from .. import activations, layout
from ..channel_params import acc_dtype
from ..modes import Mode
from . import gpu_rule
from .base import CENTER, INVSTD, SCALE, SHIFT, Backend

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what `auto` may hand to triton
# Elements a program holds per tile: 16 values per thread at Triton's default 4 warps. 4096
# (32 per thread) compiled to 150-255 registers on sm_90, so at most 3 CTAs (12 warps) per SM;
# at 2048 the streaming kernels fit in 128 registers, 4+ CTAs, >= 25% occupancy
# (triton_compile's table, docs/gpu-notes.md).
TILE_ELEMENTS = 2048
# Elements per tile of a view whose contiguous rows are not a multiple of 16 long (L of an
# (N, C, L) view, e.g. 7 x 7 = 49; C of an (M, C) view, e.g. 100; Triton knows an int's
# divisibility by 16 only): its loads do not vectorize, so each value costs its own load and
# address registers, and a short (N, C, L) row spreads a thread's values over many channels,
# each with its own mean, scale, shift. 32 channels x 64 positions took 168-250 registers on
# sm_90; 8 x 64 (4 values per thread) takes 48-64. (64, 100) at 128 x 16 spilled with Triton 3.6.
UNALIGNED_TILE_ELEMENTS = 512
PROGRAMS_PER_SM = 8  # reduction programs per SM: a few waves, a small workspace
MERGE_BLOCK = (64, 32)  # (channels, partials) per step of the merge kernels
# The single-read path (`single_read_block`): values of x one program holds in registers,
# the narrowest channel block of an (M, C) view, and the values per thread (16 of x forward,
# 32 with dy backward: 16 warps at the largest block). 32 per thread (16384 values) needed
# 128+ registers and spilled at 16 warps, i.e. one 512-thread CTA per SM.
SINGLE_READ_ELEMENTS = 8192
SINGLE_READ_MIN_CHANNELS = 16
SINGLE_READ_PER_THREAD = 16
INT32_OFFSETS = 2**31  # the single-read kernels index a tensor below this many elements in int32


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
    """Tiles long along the contiguous axis, ~TILE_ELEMENTS each (UNALIGNED_TILE_ELEMENTS when
    that axis is not a multiple of 16 long), spread over ~`programs`."""
    aligned = (g.l if g.s_l == 1 else g.c) % 16 == 0
    tile = TILE_ELEMENTS if aligned else min(TILE_ELEMENTS, UNALIGNED_TILE_ELEMENTS)
    # min(next_pow2(n), cap) as next_pow2(min(n, cap)) (equal for a power-of-two cap): a
    # symbolic n is then only compared with the cap, not rounded up however large it is
    if g.s_l == 1:
        block_l = _next_pow2(min(g.l, 1024))
        block_c = _next_pow2(min(g.c, max(1, tile // block_l)))
    else:
        block_c = _next_pow2(min(g.c, 256))
        block_l = _next_pow2(min(g.l, max(1, tile // block_c)))
    channel_blocks = -(-g.c // block_c)
    total = g.n * -(-g.l // block_l)
    per_block = max(1, programs // channel_blocks)
    return Tiling(block_c, block_l, -(-total // per_block))


def _next_pow2(n) -> int:
    """The smallest power of two >= n (Triton block sizes must be powers of two).

    n may be a symbolic size (torch.compile with dynamic shapes): comparing it with powers
    of two records range guards (2^(k-1) < n <= 2^k), which a new batch size in the same
    range passes, where int(n) would specialize the graph to one size."""
    if isinstance(n, int):
        return 1 << max(0, (n - 1).bit_length())
    p = 1
    while p < n:
        p *= 2
    return p


def grid_of(g: Geometry, tiling: Tiling) -> Grid:
    lb = -(-g.l // tiling.block_l)
    t = g.n * lb
    # cdiv(T, tiles) programs: every program has at least one tile, so writes its row.
    return Grid(lb, t, -(-g.c // tiling.block_c), -(-t // tiling.tiles))


@functools.cache
def _kernel_module():
    from . import triton_kernels

    return triton_kernels


# Set while a triton_op's body runs (`traceable_launches`): launches then go through
# torch.library.wrap_triton, which torch traces into the graph as the kernel itself. Outside
# it they are Triton's own launches: wrap_triton's dispatch in eager mode costs more than a
# small layer's kernel.
_TRACEABLE = contextvars.ContextVar("batchnorm_traceable_triton_launches", default=False)


class _TraceableKernels:
    """The kernels module with each kernel wrapped by torch.library.wrap_triton."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name: str):
        return torch.library.wrap_triton(getattr(self._module, name))


def _kernels():
    """The kernels, as `traceable_launches` asks: plain, or wrapped for torch's tracing."""
    return _TraceableKernels(_kernel_module()) if _TRACEABLE.get() else _kernel_module()


@contextlib.contextmanager
def traceable_launches():
    """Within it, every launch goes through `torch.library.wrap_triton` (triton_ops.py's
    bodies: traced by torch.compile and torch.export, run directly in eager mode)."""
    token = _TRACEABLE.set(True)
    try:
        yield
    finally:
        _TRACEABLE.reset(token)


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _sms(x: Tensor) -> int:
    """Streaming multiprocessors of x's GPU (1 for the CPU interpreter)."""
    return _sm_count(x.device) if x.is_cuda else 1


def _prepare(x: Tensor, tiling: Tiling | None) -> tuple[Geometry, Tiling, Grid]:
    if not x.is_contiguous():
        raise ValueError(
            f"the triton backend needs a contiguous canonical view, got shape {tuple(x.shape)} "
            f"with strides {x.stride()}; pass x.contiguous()"
        )
    g = geometry(x)
    if tiling is None:
        tiling = tiling_for(g, PROGRAMS_PER_SM * _sms(x))
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


def _split(v: float) -> tuple[float, float]:
    """v as (hi, lo) = (fp32(v), fp32(v - hi)): Triton passes a Python float as fp32, and the
    kernels add the two back in their accumulation dtype (fp64 keeps ~48 bits of v)."""
    hi = float(np.float32(v))
    return hi, float(np.float32(v - hi))


def _flags(activation: str | None, residual: Tensor | None) -> dict:
    return dict(HAS_RES=residual is not None, ACT=_act_code(activation), LEAKY=activations.LEAKY_SLOPE)


# Launches, shared by the contract functions and the whole-op path ----------------------------


def _launch_stats_partials(x, g, tiling, grid, out) -> tuple[Tensor, Tensor, Tensor]:
    shape, acc = (grid.programs, g.c), acc_dtype(x.dtype)
    count, mean, m2 = (_out(o, x, shape, acc) for o in out)
    _kernels().stats_partials_kernel[(grid.channel_blocks, grid.programs)](
        x, count, mean, m2, g.c, g.l, grid.lb, grid.t, g.s_n, g.s_c, g.s_l, tiling.tiles,
        BLOCK_C=tiling.block_c, BLOCK_L=tiling.block_l,
    )
    return count, mean, m2


def _launch_apply(x, residual, mean, scale, shift, y, activation, g, tiling, grid) -> None:
    _kernels().apply_kernel[(grid.channel_blocks, grid.programs)](
        x, x if residual is None else residual, mean, scale, shift, y,
        g.c, g.l, grid.lb, grid.t, g.s_n, g.s_c, g.s_l, tiling.tiles,
        **_flags(activation, residual), BLOCK_C=tiling.block_c, BLOCK_L=tiling.block_l,
    )


def _launch_grad_partials(dy, x, residual, mean, invstd, scale, shift, activation, g, tiling, grid) -> Tensor:
    """The (2, P, C) workspace of per-program (sum d, sum d xhat)."""
    ws = torch.empty((2, grid.programs, g.c), dtype=mean.dtype, device=x.device)
    _kernels().grad_partials_kernel[(grid.channel_blocks, grid.programs)](
        dy, x, x if residual is None else residual, mean, invstd, scale, shift, ws,
        g.c, g.l, grid.lb, grid.t, g.s_n, g.s_c, g.s_l, tiling.tiles, grid.programs,
        **_flags(activation, residual), BLOCK_C=tiling.block_c, BLOCK_L=tiling.block_l,
    )
    return ws


def _launch_backward_apply(
    dy, x, residual, mean, invstd, scale, shift, mean_d, mean_d_xhat, dx, dres, activation, g, tiling, grid
) -> None:
    _kernels().backward_apply_kernel[(grid.channel_blocks, grid.programs)](
        dy, x, x if residual is None else residual, mean, invstd, scale, shift, mean_d, mean_d_xhat,
        dx, x if dres is None else dres,
        g.c, g.l, grid.lb, grid.t, g.s_n, g.s_c, g.s_l, tiling.tiles,
        **_flags(activation, residual), BLOCK_C=tiling.block_c, BLOCK_L=tiling.block_l,
    )


def _merge_grid(c: int) -> tuple[int]:
    return (-(-c // MERGE_BLOCK[0]),)


# The kernel contract ------------------------------------------------------------------------


def stats_partials(x: Tensor, *, tiling: Tiling | None = None, out=None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-program (count, mean, m2), each (P, C) in the accumulation dtype."""
    g, tiling, grid = _prepare(x, tiling)
    with _on_device(x):
        return _launch_stats_partials(x, g, tiling, grid, (None, None, None) if out is None else out)


def merge_stats(count: Tensor, mean: Tensor, m2: Tensor, *, out=None) -> tuple[Tensor, Tensor, Tensor]:
    """The (C,) statistics of (P, C) partials, merged in order 0..P-1 (stats.merge_stacked)."""
    p, c = mean.shape
    out = (None, None, None) if out is None else out
    results = tuple(_out(o, mean, (c,)) for o in out)
    block_c, block_p = MERGE_BLOCK
    with _on_device(mean):
        _kernels().merge_stats_kernel[_merge_grid(c)](
            count, mean, m2, *results, *(mean,) * 7,
            c, p, 0.0, 0.0,
            FINALIZE=False, RUNNING=False, HAS_W=False, HAS_B=False,
            BLOCK_C=block_c, BLOCK_P=block_p,
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
        _launch_apply(x, residual, mean, scale, shift, y, activation, g, tiling, grid)
    return y


def backward_reduce(
    dy, x, mean, invstd, scale, shift, activation=None, residual=None, *, tiling=None, out=None
) -> Tensor:
    """(2, C): row 0 = sum_d, row 1 = sum_d_xhat, in the accumulation dtype."""
    g, tiling, grid = _prepare(x, tiling)
    mean, invstd, scale, shift = _vectors(x, mean, invstd, scale, shift)
    dy, residual = _contiguous(dy), _contiguous(residual)
    sums = _out(out, mean, (2, g.c))
    with _on_device(x):
        ws = _launch_grad_partials(dy, x, residual, mean, invstd, scale, shift, activation, g, tiling, grid)
        _kernels().merge_sums_kernel[_merge_grid(g.c)](
            ws, sums, ws, ws, ws, ws, g.c, grid.programs, 0,
            FINALIZE=False, TRAIN=False, HAS_DW=False, HAS_DB=False,
            BLOCK_C=MERGE_BLOCK[0], BLOCK_P=MERGE_BLOCK[1],
        )
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
        _launch_backward_apply(
            dy, x, residual, mean, invstd, scale, shift, mean_d, mean_d_xhat, dx, dres, activation, g, tiling, grid
        )
    return dx, dres


# The whole op: fused finalize kernels, or the single-read path --------------------------------


def single_read_block(g: Geometry, limit: int | None = None, programs: int = 1) -> int | None:
    """Channels per program on the single-read path, or None when the tiled path must run.

    The rule: a program holds block_c channels x R = next_pow2(N L) positions in registers,
    block_c R <= `limit` (SINGLE_READ_ELEMENTS); block_c is a power of two, at least 1 for
    (N, C, L) (rows are contiguous) and SINGLE_READ_MIN_CHANNELS for (M, C) (a narrower
    column would read partial 32-byte sectors), then halved while that leaves fewer channel
    blocks than `programs` (one per SM), to spread small C over the GPU. It depends on the
    shape and the SM count only: deterministic.
    """
    limit = SINGLE_READ_ELEMENTS if limit is None else limit
    if g.n * g.l > limit:  # decided before rounding up: a symbolic N L is then only compared
        return None
    rows = _next_pow2(g.n * g.l)
    if limit < rows:
        return None
    least = 1 if g.s_l == 1 else min(_next_pow2(g.c), SINGLE_READ_MIN_CHANNELS)
    block_c = min(_next_pow2(g.c), 1 << ((limit // rows).bit_length() - 1))
    if block_c < least:
        return None
    while block_c > least and -(-g.c // block_c) < programs:
        block_c //= 2
    return block_c


def _single_read_sizes(g: Geometry, block_c: int) -> dict:
    """Block sizes and warps of a single-read launch: SINGLE_READ_PER_THREAD values per
    thread; 64-bit offsets (WIDE) only for a tensor of INT32_OFFSETS elements or more."""
    block_r = _next_pow2(g.n * g.l)
    warps = min(16, max(1, block_c * block_r // (32 * SINGLE_READ_PER_THREAD)))
    return dict(BLOCK_C=block_c, BLOCK_R=block_r, num_warps=warps, WIDE=g.n * g.c * g.l >= INT32_OFFSETS)


class Normalized(NamedTuple):
    """The whole-op forward: y (x's dtype and shape) and the per-channel vectors, each (C,) in
    the accumulation dtype, that the backward takes."""

    y: Tensor
    mean: Tensor
    invstd: Tensor
    scale: Tensor
    shift: Tensor

    @property
    def vectors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(mean, invstd, scale, shift): what `backward` takes after dy, x."""
        return self.mean, self.invstd, self.scale, self.shift


class Gradients(NamedTuple):
    """The whole-op backward: dx, dresidual (None without a residual), dweight, dbias (None
    when not asked for)."""

    dx: Tensor
    dresidual: Tensor | None
    dweight: Tensor | None
    dbias: Tensor | None


def _params(weight, bias, running_mean, running_var, dummy: Tensor) -> list[Tensor]:
    """weight, bias, running_mean, running_var as kernel pointers (`dummy`, never accessed,
    for None)."""
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (the kernels read it as a vector); pass {name}.contiguous()")
    w, b = (None if t is None else t.detach().contiguous() for t in (weight, bias))
    return [dummy if t is None else t for t in (w, b, running_mean, running_var)]


def forward(
    x, weight, bias, running_mean, running_var, eps, activation=None, residual=None, *,
    training=True, tiling=None, single_read=None,
) -> Normalized:
    """Whole-op batch norm of a canonical view x: y = g((x - mean) scale + shift + residual).

    training: the batch's statistics normalize; running_mean and running_var are not
    touched (the op layer folds the batch's statistics into them afterwards,
    ops.update_running_stats). Not training: the running statistics (C,) normalize.
    weight, bias (C,) or None, in any float dtype (fp32 with bf16 x is torch's mixed case).

    Launches: the single-read kernel alone when `single_read_block` allows (training only);
    otherwise stats_partials -> merge_stats (finalizing) -> apply in training, and merge_stats
    (from the running statistics) -> apply in evaluation. Nothing but allocations in between.
    `tiling` and `single_read` (the element limit of `single_read_block`) default to the sizes
    for x's device; the tests pass small ones to run both paths and every mask.
    """
    g, tiling, grid = _prepare(x, tiling)
    if not training and (running_mean is None or running_var is None):
        raise ValueError("evaluation normalizes with the running statistics: pass running_mean and running_var")
    acc = acc_dtype(x.dtype)
    residual = _contiguous(residual)
    y = torch.empty_like(x)
    vectors = [torch.empty(g.c, dtype=acc, device=x.device) for _ in range(4)]
    mean = vectors[0]
    w, b, rm, rv = _params(weight, bias, running_mean, running_var, x)
    scalars = _split(eps)
    params = dict(HAS_W=weight is not None, HAS_B=bias is not None)
    block_c = single_read_block(g, single_read, _sms(x)) if training else None
    k = _kernels()
    with _on_device(x):
        if block_c is not None:
            k.single_read_forward_kernel[(-(-g.c // block_c),)](
                x, x if residual is None else residual, w, b, y, *vectors,
                g.c, g.l, g.n * g.l, g.s_n, g.s_c, g.s_l, *scalars, **params, **_flags(activation, residual),
                **_single_read_sizes(g, block_c),
            )
            return Normalized(y, *vectors)
        if training:
            partials = _launch_stats_partials(x, g, tiling, grid, (None, None, None))
            stats_out = [torch.empty_like(mean) for _ in range(2)]
        else:
            partials, stats_out = (x, x, x), (x, x)
        k.merge_stats_kernel[_merge_grid(g.c)](
            *partials, stats_out[0], mean, stats_out[1], w, b, rm, rv, *vectors[1:],
            g.c, grid.programs if training else 0, *scalars,
            FINALIZE=True, RUNNING=not training, **params, BLOCK_C=MERGE_BLOCK[0], BLOCK_P=MERGE_BLOCK[1],
        )
        _launch_apply(x, residual, mean, vectors[2], vectors[3], y, activation, g, tiling, grid)
    return Normalized(y, *vectors)


def backward(
    dy, x, mean, invstd, scale, shift, activation=None, residual=None, *,
    training=True, weight_dtype=None, bias_dtype=None, need_dx=True, tiling=None, single_read=None,
) -> Gradients:
    """The gradients of `forward` from the vectors it returned: dx = scale (d - mean_d -
    xhat mean_d_xhat) (mean terms only in training), dresidual = d, dweight = sum d xhat in
    `weight_dtype`, dbias = sum d in `bias_dtype` (None: not computed).

    Launches: the single-read kernel alone when `single_read_block` allows (it always
    writes dx and dresidual); otherwise
    grad_partials -> merge_sums (finalizing) -> backward_apply, the reduction skipped in
    evaluation when no parameter gradient is asked, backward_apply when `need_dx` is false
    (then dx and dresidual are None).
    """
    g, tiling, grid = _prepare(x, tiling)
    dy, residual = _contiguous(dy), _contiguous(residual)
    dw, db = (None if t is None else torch.empty(g.c, dtype=t, device=x.device) for t in (weight_dtype, bias_dtype))
    block_c = single_read_block(g, single_read, _sms(x))
    k = _kernels()
    with _on_device(x):
        if block_c is not None:
            dx = torch.empty_like(x)
            dres = None if residual is None else torch.empty_like(residual)
            k.single_read_backward_kernel[(-(-g.c // block_c),)](
                dy, x, x if residual is None else residual, mean, invstd, scale, shift,
                dx, x if dres is None else dres, mean if dw is None else dw, mean if db is None else db,
                g.c, g.l, g.n * g.l, g.s_n, g.s_c, g.s_l, TRAIN=training, HAS_DW=dw is not None,
                HAS_DB=db is not None, **_flags(activation, residual),
                **_single_read_sizes(g, block_c),
            )
            return Gradients(dx, dres, dw, db)
        if training or dw is not None or db is not None:
            ws = _launch_grad_partials(dy, x, residual, mean, invstd, scale, shift, activation, g, tiling, grid)
            sums = torch.empty((2, g.c), dtype=mean.dtype, device=x.device)
            mean_d, mean_d_xhat = torch.empty_like(mean), torch.empty_like(mean)
            k.merge_sums_kernel[_merge_grid(g.c)](
                ws, sums, ws if dw is None else dw, ws if db is None else db, mean_d, mean_d_xhat,
                g.c, grid.programs, g.n * g.l, FINALIZE=True, TRAIN=training, HAS_DW=dw is not None,
                HAS_DB=db is not None, BLOCK_C=MERGE_BLOCK[0], BLOCK_P=MERGE_BLOCK[1],
            )
        else:
            mean_d = mean_d_xhat = torch.zeros_like(mean)
        if not need_dx:
            return Gradients(None, None, dw, db)
        dx = torch.empty_like(x)
        dres = None if residual is None else torch.empty_like(residual)
        _launch_backward_apply(
            dy, x, residual, mean, invstd, scale, shift, mean_d, mean_d_xhat, dx, dres, activation, g, tiling, grid
        )
    return Gradients(dx, dres, dw, db)


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
    """Fused Triton kernels; auto picks it for CUDA tensors in fp32, fp16 and bf16 of the
    shape classes where a recorded GPU benchmark has it at or above torch eager (gpu_rule)."""

    name = "triton"
    auto_devices = ("cuda",)  # on CPU only in Triton's interpreter, for tests: never chosen there

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

    def preferred(self, x: Tensor, mode: Mode) -> bool:
        # Measured, not assumed: a CUDA input goes to triton only where the recorded runs of
        # this GPU put its shape class (gpu_rule.json); elsewhere auto takes aten (cuDNN).
        return x.is_cuda and x.dtype in FAST_DTYPES and gpu_rule.prefers_triton(x)

    # The whole op (base.py) -------------------------------------------------------------
    def forward(self, x, weight, bias, residual, running_mean, running_var, eps, activation, training):
        """`forward` above (base.py's whole op): no torch op between its launches."""
        f = forward(x, weight, bias, running_mean, running_var, eps, activation, residual, training=training)
        var = f.invstd.pow(-2).sub_(eps).clamp_(min=0) if training else running_var.detach().to(f.mean.dtype)
        params = torch.stack([f.mean, f.scale, f.shift, f.invstd, torch.zeros_like(f.mean), var])
        return f.y, params

    def backward(
        self, dy, x, residual, params, training, activation, needs, weight_dtype, bias_dtype, sums_to_means=None
    ):  # fmt: skip
        """`backward` above (base.py's whole op); with `sums_to_means`, base.py's, whose two
        passes leave the sums between them."""
        if sums_to_means is not None:
            return super().backward(
                dy, x, residual, params, training, activation, needs, weight_dtype, bias_dtype, sums_to_means
            )
        need_x, need_w, need_b, need_r = needs
        grads = backward(
            dy, x, params[CENTER], params[INVSTD], params[SCALE], params[SHIFT], activation, residual,
            training=training, weight_dtype=weight_dtype if need_w else None,
            bias_dtype=bias_dtype if need_b else None, need_dx=need_x or need_r,
        )  # fmt: skip
        return (grads.dx if need_x else None), grads.dweight, grads.dbias, (grads.dresidual if need_r else None)

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
