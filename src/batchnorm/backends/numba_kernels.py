"""The numba backend's kernels: fused batch norm over the canonical views of layout.py.

Two kernels per view, written once as Python functions and compiled, on first use, once per
case: threads or not (without for inputs under `PARALLEL_NUMEL` elements and when the caller
wants one thread, `threads`: the same arithmetic, so the same bits), residual or not, and
the activation's kind (a clamp to bounds given at run time: identity, ReLU and ReLU6; or
Hardswish), each for the dtypes it meets (numba caches the machine code on disk).
`kernel(name, threads, has_res, activation, dtype)` picks one and gives the activation's
bounds.

- forward: per-channel statistics (optional), then y = g((x - center) scale + shift + residual)
  (the running update is made once per call above the kernels, ops.update_running_stats,
  whose CPU form is `fold_running` below);
- backward: the reductions (sum_d, sum_d_xhat) (optional), then
  dx = scale (d - mean_d - xhat mean_d_xhat) and dresidual = d, with d = dy g'(u) and
  xhat = (x - center) invstd + xhat_shift recomputed from x (nothing the size of x is saved).

The per-channel parameters, each a (C,) array (base.py names their rows in `params`):
`center` is the batch mean (float64) rounded to x's dtype, and e = mean - center what the
rounding lost; `scale` = gamma invstd; `shift` = beta - e scale; `xhat_shift` = -e invstd.
So x - center is exact (x and center are close) and nothing of the mean is lost even for a
channel whose mean is 1e4 times its standard deviation. With a plain mean (the kernel
contract, base.py) center = mean and xhat_shift = 0.

Layouts and the order of work (fixed by the shape, never by the thread count, so results
are bitwise the same with 1 or 2 threads):

- `(N, C, L)`: a channel is N rows of L contiguous values; one thread owns a channel (a
  group of consecutive channels when rows are short, `_ncl_group`, so that each example's
  part is one contiguous run for the prefetcher). Its statistics merge (Chan's formula, in
  order) blocks of about `_BLOCK` values (a piece of a long row, or several short rows),
  each summed in one pass as x - (the block's first value, its pivot), rows shorter than
  `LANES` into per-position lanes, all in float64 (`_ncl_stats` says why); in training the
  channel is normalized right after, while its slice is still in L2: forward reads x once
  from memory and writes y; backward reads x and dy once per pass (the second from cache
  when the slice fits) and writes dx.
- `(M, C)`: a channel is a strided column; rows are split into blocks of about `_MC_BLOCK`
  values (at most `_MC_ROWS` rows), each reduced (per-channel lanes, one row after
  another) in parallel into partials, merged in block order (all channels at once, in
  float64), then applied.

Compiled with `fastmath={"reassoc", "contract"}` only: LLVM vectorizes the sums and fuses
multiply-adds, NaN and Inf still propagate. In a case's compiled kernel, the residual flag
and the activation's kind (compares, selects and multiplies, in x's dtype) are fixed
(`_case_loop`: the kind's own functions): each loop compiles to branch-free vector code
with no call inside. Compiling per case is what keeps a first call short: a kernel holding
all four cases compiles all of their loops, where a model needs one or two cases
(docs/performance.md, "The `numba` backend (CPU)", Cases, has the compile times).
"""

from __future__ import annotations

import functools
import math
import os
import threading
import types

import numpy as np
import torch

from .. import stats
from . import numba_cache

try:
    import numba
except ImportError as exc:  # the package imports without numba; the backend says why
    numba = None
    MISSING = f"numba is not importable ({exc}); install it with `pip install numba`"
else:
    MISSING = None

_BLOCK = 4096  # (N, C, L): values per statistics block (16 KiB of fp32, summed in one pass)
LANES = 128  # (N, C, L): rows shorter than this are summed in per-position lanes (float64 scratch from the caller)
_GROUP_SPAN = 1024  # (N, C, L) short rows: contiguous values per example in a group of channels
_GROUP_BYTES = 1 << 19  # (N, C, L) short rows: a group's slab stays under this (L2 is 2 MiB)
_SWEEP_SPAN = 16384  # (N, C, L) sweeps in memory order: contiguous values per piece (64 KiB of fp32)
_MC_BLOCK = 32768  # (M, C): values per row block (128 KiB of fp32, in L2)
# (M, C): rows per block at most. Each channel's block sum is a sequential sum in x's dtype
# (the vector lanes run across channels), merged with the other blocks in float64: with few
# channels, 32768 / C rows in one fp32 sum lost enough of the variance to show in the
# normalized output. At 512 rows the fp32 mean is off float64 by less than torch's 2-D and
# channels-last kernels' is, while float64 block sums would cost a large part of this
# statistics sweep on data in cache, so they stay in x's dtype (docs/performance.md, "The
# `numba` backend (CPU)", Statistics in float64, has the errors and the cost).
_MC_ROWS = 512
_FASTMATH = {"reassoc", "contract"}  # never nnan/ninf/afn: NaN and Inf must propagate

#: Below this many elements the kernels run on one thread (`serial`): a parallel region's
#: start costs more than the second thread saves there (measured on 2 cores).
PARALLEL_NUMEL = 1 << 16


def _jit(parallel: bool = False, inline: bool = False):
    """numba.njit with the project's settings. `reassoc` lets LLVM reorder sums, but the same
    way at every call: with a block partition fixed by the shape, results stay deterministic."""
    if numba is None:
        return lambda fn: fn
    if inline:  # compiled into each caller, never on its own: nothing to cache
        return numba_cache.jit(cache=False, inline="always", fastmath=_FASTMATH, error_model="numpy")
    return numba_cache.jit(parallel=parallel, fastmath=_FASTMATH, error_model="numpy", nogil=True)


_prange = range if numba is None else numba.prange


# Activations (`activations.py` has the equations) ---------------------------------------
# Two kinds, each a pair of functions, value and slope, in x's dtype `f`; the loops call
# `_act` and `_d` (which calls `_grad`), and `_case_loop` binds the case's pair there. The
# kind is compiled into a case, the bounds (lo, hi) are arguments: identity, ReLU and ReLU6
# are one compiled case, a clamp to [lo, hi] where a NaN bound is no bound (every compare
# with NaN is false), so that a model's layers share the case their residual flag picks.
# numba copies an inlined function's whole body into every call site, and types it: one
# pair holding both kinds would be copied whole into each case before the constant kind
# folded the other away (docs/performance.md, "The `numba` backend (CPU)", Cases, has the
# times).
@_jit(inline=True)
def _clamp(u, lo, hi, f):
    """u clamped to [lo, hi] (a NaN bound is none); NaN stays NaN (both tests are false for it)."""
    r = u if not u <= lo else lo
    return r if not r >= hi else hi


@_jit(inline=True)
def _clamp_grad(dy, u, lo, hi, f):
    # torch's slopes at the breakpoints: 0 at u = lo and u = hi. At a NaN u, 0 where there
    # is a bound (as activations.derivative) and dy without (the identity's). The tests of
    # a NaN bound (lo != lo) do not depend on u: LLVM hoists them out of the loop.
    return dy if (u > lo or lo != lo) and (u < hi or hi != hi) else f(0)


@_jit(inline=True)
def _hardswish(u, lo, hi, f):
    return u * _clamp(u + f(3), f(0), f(6), f) / f(6)  # in x's dtype, as torch's hardswish rounds it


@_jit(inline=True)
def _hardswish_grad(dy, u, lo, hi, f):
    # 0 at u = -3 and 1 at u = 3, as torch's hardswish_backward
    return f(0) if u <= -3 else (dy * (u / f(3) + f(0.5)) if u < 3 else dy)


_act, _grad = _clamp, _clamp_grad  # what the loops call; `_case_loop` binds the case's pair


@_jit(inline=True)
def _d(dy, t, scale, shift, res, has_res, lo, hi, f):
    """d = dy g'(u), the activation's slope at u = t scale + shift (+ res) recomputed from t = x - center
    (the backward's two passes both need it; nothing the size of x is saved)."""
    u = t * scale + shift
    if has_res:
        u += res
    return _grad(dy, u, lo, hi, f)


@_jit(inline=True)
def _dx(d, t, scale, invstd, xhat_shift, mean_d, mean_dxh):
    """dx = scale (d - mean_d - xhat mean_dxh), xhat = t invstd + xhat_shift."""
    return scale * (d - mean_d - (t * invstd + xhat_shift) * mean_dxh)


# The activations the kernels fuse: the piecewise ones only, compares, selects and
# multiplies in x's dtype, which LLVM vectorizes. The others cost a scalar libm call per value
# here, slower fused than torch's vectorized op after our identity kernel, so the backend
# does not fuse them (numba_cpu.NumbaBackend.fused_activations; docs/performance.md, "The
# `numba` backend (CPU)", Smooth activations are not fused).
_PAIRS = {"clamp": (_clamp, _clamp_grad), "hardswish": (_hardswish, _hardswish_grad)}
KINDS = tuple(_PAIRS)  # the compiled kinds, by the names the kernels carry
NO_BOUND = math.nan
#: Each fused activation (activations.NAMES) as (kind, lo, hi): its compiled kind and the
#: bounds its loops take.
FUSED = {
    None: ("clamp", NO_BOUND, NO_BOUND), "relu": ("clamp", 0.0, NO_BOUND), "relu6": ("clamp", 0.0, 6.0),
    "hardswish": ("hardswish", NO_BOUND, NO_BOUND),
}  # fmt: skip
#: An activation of each kind (the first FUSED lists): what a call that compiles the kind's
#: case passes.
ACTIVATION_OF_KIND = {kind: activation for activation, (kind, _, _) in reversed(FUSED.items())}


def _with_globals(fn, **names):
    """A copy of the Python function `fn` whose global `names` are bound to other objects
    (numba compiles a function with the globals it finds when it compiles it)."""
    return types.FunctionType(fn.__code__, dict(fn.__globals__, **names), fn.__name__, fn.__defaults__, fn.__closure__)


def _once(build):
    """`build`, memoized like functools.cache (a hit is that cache's C lookup), but each key
    built only once even when threads ask for it at the same moment (a model's first calls
    from several threads): a second build would register its kernel's name again, which
    numba_cache.unique_name refuses."""
    built, lock = {}, threading.Lock()

    @functools.wraps(build)
    def build_once(*key):
        with lock:
            if key not in built:
                built[key] = build(*key)
            return built[key]

    return functools.cache(build_once)


def _rebound(dispatcher, **names):
    """An inlined function like `dispatcher`'s, with its global `names` bound to other
    functions (`_with_globals`: numba reads an inlined function's globals when it copies its
    body into a caller)."""
    return _jit(inline=True)(_with_globals(dispatcher.py_func, **names))


@_once
def _case_loop(loop, has_res: bool, kind: str):
    """`loop(args, has_res)` (one of `_LOOPS`) compiled for one case: `has_res` is a constant
    there (numba folds a closure's values), and the loop calls the kind's own pair
    (`_PAIRS`), so its machine code holds that case's loop only.
    A function of its own, not inlined: the serial and the parallel kernel of a case share
    one compilation, and numba's parallel passes, slow on large loop bodies, see only a call.
    Not cached on disk itself: a kernel's cached machine code includes it, under this
    case's own name (numba_cache.unique_name: under a name shared by the cases, two
    processes could give two cases one symbol, and a third that loads both kernels from
    the cache would run one kernel with the other's loop)."""
    act, grad = _PAIRS[kind]
    body = _rebound(loop, _act=act, _d=_rebound(_d, _grad=grad))

    def case(args, _has_res):
        return body(args, has_res)

    name = f"{loop.__name__}_{'residual' if has_res else 'plain'}_{kind}"
    return numba.njit(fastmath=_FASTMATH, error_model="numpy", nogil=True)(numba_cache.unique_name(case, name))


# Statistics ---------------------------------------------------------------------------
@_jit(inline=True)
def _chan(count, mean, m2, size, s1, s2, pivot):
    """Merge a block of `size` values, given s1 = sum t, s2 = sum t^2 with t = x - shift
    (shift a value of the block), into (count, mean, m2), in float64 (Chan's formula)."""
    bmean = float(s1) / size
    bm2 = max(float(s2) - float(s1) * bmean, 0.0)
    total = count + size
    delta = (float(pivot) + bmean) - mean
    return total, mean + delta * (size / total), m2 + bm2 + delta * delta * (count * size / total)


@_jit(inline=True)
def _set_params(c, mean, m2c, count, eps, gamma, beta, center, scale, shift, invstd, xhat_shift, m2):
    """Channel c's parameters from its float64 (mean, m2): center, scale, shift, invstd,
    xhat_shift as the module docstring defines them, and m2 rounded to x's dtype."""
    f = center.dtype.type
    mc = f(mean)
    e = mean - float(mc)  # what rounding the mean to x's dtype lost
    ic = 1.0 / math.sqrt(m2c / count + eps)
    ac = float(gamma[c]) * ic
    center[c], invstd[c], m2[c] = mc, ic, m2c
    scale[c], shift[c], xhat_shift[c] = ac, float(beta[c]) - e * ac, -e * ic


# The rule's arithmetic without fastmath: a fused multiply-add would round differently from
# the tensor ops of stats.update_running, and the two must give the same bits. fastmath=False
# is spelled out: numba compiles a callee that leaves it unset with its caller's flags, and
# the kernels that call this one contract multiply-adds.
_blend = stats.blend if numba is None else numba_cache.jit(stats.blend, fastmath=False, error_model="numpy")


@_jit(inline=True)
def _fold(mean, var, factor, running_mean, running_var):
    """The guard's rule (stats.update_running) on numpy arrays: each channel's new running
    value is `stats.blend(old, batch, factor)` in float64, rounded to the buffer's dtype; when
    every one is finite, they are all written, otherwise none. Returns whether they were all
    finite. The decision comes before any write, so no thread ever sees a non-finite value
    in the buffers."""
    fm, fv = running_mean.dtype.type, running_var.dtype.type
    finite = True
    for c in range(mean.shape[0]):
        # np.float64, not float(): numba's float() keeps a float32 a float32
        rounded_mean = fm(_blend(np.float64(running_mean[c]), np.float64(mean[c]), factor))
        rounded_var = fv(_blend(np.float64(running_var[c]), np.float64(var[c]), factor))
        finite = finite and math.isfinite(rounded_mean) and math.isfinite(rounded_var)
    if finite:
        for c in range(mean.shape[0]):
            running_mean[c] = _blend(np.float64(running_mean[c]), np.float64(mean[c]), factor)
            running_var[c] = _blend(np.float64(running_var[c]), np.float64(var[c]), factor)
    return finite


@_jit()
def fold_running(mean, var, factor, running_mean, running_var):
    """`_fold` as a call from Python (numpy arrays, all (C,); mean and var as stored): the
    running update of every CPU path (ops.update_running_stats) at the cost of one call."""
    return _fold(mean, var, factor, running_mean, running_var)


# (N, C, L) -----------------------------------------------------------------------------
@_jit(inline=True)
def _lanes_total(lanes):
    """The sum of a lane buffer in float64, in lane order."""
    total = 0.0
    for j in range(lanes.shape[0]):
        total += float(lanes[j])
    return total


@_jit(inline=True)
def _ncl_group(rows, channels, length, itemsize):
    """Channels per work item of the (N, C, L) kernels, fixed by the shape. Rows of LANES
    values or more: one. Shorter rows: enough consecutive channels that each example's part
    of the group is about _GROUP_SPAN contiguous values (the hardware prefetcher follows one
    contiguous run; one channel alone is N runs of L values, a whole channel stride apart),
    while the group's slab stays within _GROUP_BYTES (in L2 for the second pass) and there
    are at least 4 groups to share among the threads. Each channel's arithmetic is the
    same whatever the group size, so results do not depend on it."""
    if length >= LANES:
        return 1
    per = (_GROUP_SPAN + length - 1) // length
    per = min(per, _GROUP_BYTES // max(1, rows * length * itemsize), channels // 4)
    return max(1, per)


@_jit(inline=True)
def _ncl_piece(channels, length):
    """Channels per piece of a sweep in memory order (the kernels' evaluation form): about
    `_SWEEP_SPAN` contiguous values, so that a piece's loop overhead is small against its
    values and a single example still splits across threads."""
    return min(channels, max(1, (_SWEEP_SPAN + length - 1) // length))


@_jit()
def _ncl_stats(x, c0, c1, lanes, acc):
    """(mean, m2) in float64 of channels c0:c1 into acc[0, c], acc[1, c]: blocks of about
    _BLOCK values per channel (whole short rows or a piece of a long row), each summed in one
    pass as t = x - (its first value), merged in order (Chan). Rows shorter than LANES are
    summed in the lanes lanes[c] (one per position of the row, added to row after row; a row
    of 49 values would otherwise leave 17 of them to a serial scalar add chain after LLVM's
    32-wide vector loop), example by example across the group's channels (memory order).

    t and its sums are float64 whatever x's dtype (x is converted before the subtraction,
    so t is exact). Summed in fp32 the mean was several times further from the float64 mean
    than torch's kernel's, which is correctly rounded: a lane summed every row of its block
    and a long row's piece its _BLOCK values in one fp32 sum each, and an fp32 x - pivot
    rounds the same way for every x on a coarser grid than the pivot's (up to half an ulp of
    t each, one sign per block, an error that float64 sums of an fp32 t still kept). The
    cost is more arithmetic per value on data in cache: nothing on the shortest rows, some
    on longer rows, none on a sweep from memory (docs/performance.md, "The `numba` backend
    (CPU)", Statistics in float64, has the errors before and after and the timings)."""
    n_rows, _, length = x.shape
    rows_per = max(1, _BLOCK // length)
    for c in range(c0, c1):
        acc[0, c], acc[1, c] = 0.0, 0.0
    count = 0.0  # the same for every channel
    for n0 in range(0, n_rows, rows_per):
        n1 = min(n_rows, n0 + rows_per)
        for lo in range(0, length, _BLOCK):
            hi = min(length, lo + _BLOCK)
            size = float((n1 - n0) * (hi - lo))
            if length < LANES:
                for c in range(c0, c1):
                    lanes[c, 0, :] = 0
                    lanes[c, 1, :] = 0
                for n in range(n0, n1):
                    for c in range(c0, c1):
                        xr, l1, l2, pivot = x[n, c], lanes[c, 0], lanes[c, 1], np.float64(x[n0, c, lo])
                        for j in range(length):
                            t = np.float64(xr[j]) - pivot
                            l1[j] += t
                            l2[j] += t * t
                for c in range(c0, c1):
                    s1l, s2l = _lanes_total(lanes[c, 0]), _lanes_total(lanes[c, 1])
                    _, acc[0, c], acc[1, c] = _chan(count, acc[0, c], acc[1, c], size, s1l, s2l, x[n0, c, lo])
            else:
                for c in range(c0, c1):
                    pivot, s1, s2 = np.float64(x[n0, c, lo]), 0.0, 0.0
                    for n in range(n0, n1):
                        xr = x[n, c, lo:hi]
                        for j in range(hi - lo):
                            t = np.float64(xr[j]) - pivot
                            s1 += t
                            s2 += t * t
                    _, acc[0, c], acc[1, c] = _chan(count, acc[0, c], acc[1, c], size, s1, s2, pivot)
            count += size


@_jit(inline=True)
def _ncl_normalize(args, has_res):
    """y[n, c] = g((x[n, c] - center) scale + shift (+ res[n, c])) for the rows n0:n1 and
    the channels c0:c1."""
    x, res, y, n0, n1, c0, c1, center, scale, shift, lo, hi = args
    f = x.dtype.type
    for n in range(n1 - 1, n0 - 1, -1):  # last rows first: the statistics read them last
        for c in range(c0, c1):
            xr, rr, yr, mc, ac, bc = x[n, c], res[n, c], y[n, c], center[c], scale[c], shift[c]
            for j in range(xr.shape[0]):
                u = (xr[j] - mc) * ac + bc
                if has_res:
                    u += rr[j]
                yr[j] = _act(u, lo, hi, f)


def ncl_forward(
    x, res, has_res, lo, hi, training, write, gamma, beta, eps, center, scale, shift, invstd, xhat_shift, m2, y,
    lanes, acc,
):  # fmt: skip
    """Per group of channels (`_ncl_group`): statistics when `training` (into center, scale,
    shift, invstd, xhat_shift and m2, see `_set_params`), then, when `write`,
    y = g((x - center) scale + shift + res) while the group is still in cache (in
    evaluation, one sweep over x in memory order). `lanes`:
    (C, 2, L) float64 scratch for rows shorter than LANES ((C, 2, 0) otherwise); `acc`:
    float64 (2, C) scratch."""
    n_rows, channels, length = x.shape
    # Training: a task per group of channels, whose slice stays in cache from the statistics
    # to the normalization. Evaluation: nothing to keep between passes, so a task per piece
    # of one sweep in memory order, a row's pieces one after another, which the prefetcher
    # streams (channel by channel jumps across memory at every row; docs/performance.md,
    # "The `numba` backend (CPU)", Evaluation, has the times). One parallel loop for both:
    # numba lowers and compiles each prange on its own.
    per = _ncl_group(n_rows, channels, length, x.itemsize) if training else _ncl_piece(channels, length)
    groups = (channels + per - 1) // per
    tasks = groups * (1 if training else n_rows)
    for k in _prange(tasks):
        g, n0, n1 = k % groups, k // groups, k // groups + 1  # training: g = k, one task per group
        if training:
            n0, n1 = 0, n_rows
        c0, c1 = g * per, min(channels, (g + 1) * per)
        if training:
            _ncl_stats(x, c0, c1, lanes, acc)
            for c in range(c0, c1):
                _set_params(c, acc[0, c], acc[1, c], n_rows * length, eps, gamma, beta,
                            center, scale, shift, invstd, xhat_shift, m2)  # fmt: skip
        if write:
            _ncl_normalize((x, res, y, n0, n1, c0, c1, center, scale, shift, lo, hi), has_res)


@_jit(inline=True)
def _ncl_grad_sums(args, has_res):
    """(sum d, sum d xhat) of channels c0:c1 in float64 into acc[0, c], acc[1, c] (each row
    summed in x's dtype, rows added in order)."""
    dy, x, res, c0, c1, center, scale, shift, invstd, xhat_shift, acc, lo, hi = args
    f = x.dtype.type
    for c in range(c0, c1):
        acc[0, c], acc[1, c] = 0.0, 0.0
    for n in range(x.shape[0]):
        for c in range(c0, c1):
            xr, dyr, rr = x[n, c], dy[n, c], res[n, c]
            mc, ac, bc, ic, hc = center[c], scale[c], shift[c], invstd[c], xhat_shift[c]
            s1, s2 = f(0), f(0)
            for j in range(xr.shape[0]):
                t = xr[j] - mc
                g = _d(dyr[j], t, ac, bc, rr[j], has_res, lo, hi, f)
                s1 += g
                s2 += g * (t * ic + hc)
            acc[0, c] += float(s1)
            acc[1, c] += float(s2)


@_jit(inline=True)
def _ncl_grad_apply(args, has_res):
    """dx[n, c] = scale (d - mean_d - xhat mean_dxh), dres[n, c] = d, for the rows n0:n1 and
    the channels c0:c1."""
    dy, x, res, dx, dres, n0, n1, c0, c1, center, scale, shift, invstd, xhat_shift, mean_d, mean_dxh, lo, hi = args
    f = x.dtype.type
    for n in range(n1 - 1, n0 - 1, -1):  # last rows first: the reduction read them last
        for c in range(c0, c1):
            xr, dyr, rr, dxr, drr = x[n, c], dy[n, c], res[n, c], dx[n, c], dres[n, c]
            mc, ac, bc, ic, hc = center[c], scale[c], shift[c], invstd[c], xhat_shift[c]
            mdc, mdxc = mean_d[c], mean_dxh[c]
            if has_res and xr.shape[0] >= LANES:  # see `_mc_grad_apply`
                for j in range(xr.shape[0]):
                    drr[j] = _d(dyr[j], xr[j] - mc, ac, bc, rr[j], True, lo, hi, f)
                for j in range(xr.shape[0]):
                    dxr[j] = _dx(drr[j], xr[j] - mc, ac, ic, hc, mdc, mdxc)
            else:
                for j in range(xr.shape[0]):
                    t = xr[j] - mc
                    g = _d(dyr[j], t, ac, bc, rr[j], has_res, lo, hi, f)
                    dxr[j] = _dx(g, t, ac, ic, hc, mdc, mdxc)
                    if has_res:
                        drr[j] = g


def ncl_backward(
    dy, x, res, has_res, lo, hi, center, scale, shift, invstd, xhat_shift, reduce, write, local_means,
    sum_d, sum_dxh, mean_d, mean_dxh, dx, dres, acc,
):  # fmt: skip
    """Per group of channels (`_ncl_group`): when `reduce`, sum_d = sum d, sum_dxh = sum d
    xhat (and, with `local_means`, mean_d, mean_dxh = those / n, n this input's values per
    channel: the training form's means when no other process shares the batch); then, when
    `write`, dx = scale (d - mean_d - xhat mean_dxh) and dres = d (without `reduce`, one
    sweep in memory order, as `ncl_forward`'s evaluation); d = dy g'(u),
    xhat = (x - center) invstd + xhat_shift. `acc`: float64 (2, C) scratch."""
    n_rows, channels, length = x.shape
    # per group of channels with the sums, a sweep in memory order without (as ncl_forward)
    per = _ncl_group(n_rows, channels, length, x.itemsize) if reduce else _ncl_piece(channels, length)
    groups = (channels + per - 1) // per
    tasks = groups * (1 if reduce else n_rows)
    for k in _prange(tasks):
        g, n0, n1 = k % groups, k // groups, k // groups + 1  # with the sums: g = k, one task per group
        if reduce:
            n0, n1 = 0, n_rows
        c0, c1 = g * per, min(channels, (g + 1) * per)
        if reduce:
            args = (dy, x, res, c0, c1, center, scale, shift, invstd, xhat_shift, acc, lo, hi)
            _ncl_grad_sums(args, has_res)
            for c in range(c0, c1):
                sum_d[c], sum_dxh[c] = acc[0, c], acc[1, c]
                if local_means:
                    mean_d[c], mean_dxh[c] = acc[0, c] / (n_rows * length), acc[1, c] / (n_rows * length)
        if write:
            args = (dy, x, res, dx, dres, n0, n1, c0, c1, center, scale, shift, invstd, xhat_shift, mean_d,
                    mean_dxh, lo, hi)  # fmt: skip
            _ncl_grad_apply(args, has_res)


# (M, C) --------------------------------------------------------------------------------
@_jit(inline=True)
def mc_blocks(rows, channels):
    """(rows per block, number of blocks): a partition fixed by the shape alone."""
    per = max(1, min(_MC_ROWS, _MC_BLOCK // channels))
    return per, (rows + per - 1) // per


@_jit(inline=True)
def _mc_normalize(args, has_res):
    """y[r0:r1] = g((x[r0:r1] - center) scale + shift (+ res[r0:r1])), per channel."""
    x, res, y, r0, r1, center, scale, shift, lo, hi = args
    f = x.dtype.type
    for r in range(r0, r1):
        xr, rr, yr = x[r], res[r], y[r]
        for c in range(xr.shape[0]):
            u = (xr[c] - center[c]) * scale[c] + shift[c]
            if has_res:
                u += rr[c]
            yr[c] = _act(u, lo, hi, f)


def mc_forward(
    x, res, has_res, lo, hi, training, write, gamma, beta, eps, center, scale, shift, invstd, xhat_shift, m2, y,
    s1, s2, merged,
):  # fmt: skip
    """`ncl_forward` for (M, C): per-block sums of x - x[0] in parallel (into the zeroed
    (blocks, C) scratch s1, s2), merged in block order into the float64 (2, C) scratch
    `merged` (mean, m2 of the blocks so far); blocks outer and channels inner, so that the
    merge (blocks x C Chan updates) vectorizes across channels."""
    rows, channels = x.shape
    per, blocks = mc_blocks(rows, channels)
    if training:
        pivot = x[0]
        for k in _prange(blocks):
            s1k, s2k = s1[k], s2[k]
            r0, r1 = k * per, min(rows, (k + 1) * per)
            # Four rows a step: the sums are a row of C values in memory, not registers, and
            # loading and storing them for every value cost more than reading x
            # (docs/performance.md, "The `numba` backend (CPU)", the `(M, C)` item).
            for r in range(r0, r1 - 3, 4):
                x0, x1, x2, x3 = x[r], x[r + 1], x[r + 2], x[r + 3]
                for c in range(channels):
                    p = pivot[c]
                    t0, t1, t2, t3 = x0[c] - p, x1[c] - p, x2[c] - p, x3[c] - p
                    s1k[c] += (t0 + t1) + (t2 + t3)
                    s2k[c] += (t0 * t0 + t1 * t1) + (t2 * t2 + t3 * t3)
            for r in range(r1 - (r1 - r0) % 4, r1):
                xr = x[r]
                for c in range(channels):
                    t = xr[c] - pivot[c]
                    s1k[c] += t
                    s2k[c] += t * t
        mean, m2c = merged[0], merged[1]
        count = 0.0  # the same for every channel
        for k in range(blocks):
            size = float(min(rows, (k + 1) * per) - k * per)
            s1k, s2k = s1[k], s2[k]
            for c in range(channels):
                _, mean[c], m2c[c] = _chan(count, mean[c], m2c[c], size, s1k[c], s2k[c], pivot[c])
            count += size
        for c in range(channels):
            _set_params(c, mean[c], m2c[c], rows, eps, gamma, beta, center, scale, shift, invstd, xhat_shift,
                        m2)  # fmt: skip
    if write:
        for k in _prange(blocks):
            args = (x, res, y, k * per, min(rows, (k + 1) * per), center, scale, shift, lo, hi)
            _mc_normalize(args, has_res)


@_jit(inline=True)
def _mc_grad_sums(args, has_res):
    """s1 += d, s2 += d xhat over rows r0:r1, per channel (vectors of x's dtype)."""
    dy, x, res, r0, r1, center, scale, shift, invstd, xhat_shift, s1, s2, lo, hi = args
    f = x.dtype.type
    for r in range(r0, r1):
        xr, dyr, rr = x[r], dy[r], res[r]
        for c in range(xr.shape[0]):
            t = xr[c] - center[c]
            g = _d(dyr[c], t, scale[c], shift[c], rr[c], has_res, lo, hi, f)
            s1[c] += g
            s2[c] += g * (t * invstd[c] + xhat_shift[c])


@_jit(inline=True)
def _mc_grad_apply(args, has_res):
    """dx = scale (d - mean_d - xhat mean_dxh), dres = d over rows r0:r1."""
    dy, x, res, dx, dres, r0, r1, center, scale, shift, invstd, xhat_shift, mean_d, mean_dxh, lo, hi = args
    f = x.dtype.type
    for r in range(r0, r1):
        xr, dyr, rr, dxr, drr = x[r], dy[r], res[r], dx[r], dres[r]
        if has_res and xr.shape[0] >= LANES:
            # With a residual the fused loop loads five arrays and stores two: LLVM gives up
            # vectorizing it (too many runtime alias checks), several times slower per value.
            # Two loops (d into dres; dx from it while the row is in L1) each vectorize; on rows
            # shorter than LANES the second loop's overhead outweighs it (docs/performance.md,
            # "The `numba` backend (CPU)", the `(M, C)` item).
            for c in range(xr.shape[0]):
                drr[c] = _d(dyr[c], xr[c] - center[c], scale[c], shift[c], rr[c], True, lo, hi, f)
            for c in range(xr.shape[0]):
                t = xr[c] - center[c]
                dxr[c] = _dx(drr[c], t, scale[c], invstd[c], xhat_shift[c], mean_d[c], mean_dxh[c])
        else:
            for c in range(xr.shape[0]):
                t = xr[c] - center[c]
                g = _d(dyr[c], t, scale[c], shift[c], rr[c], has_res, lo, hi, f)
                dxr[c] = _dx(g, t, scale[c], invstd[c], xhat_shift[c], mean_d[c], mean_dxh[c])
                if has_res:
                    drr[c] = g


def mc_backward(
    dy, x, res, has_res, lo, hi, center, scale, shift, invstd, xhat_shift, reduce, write, local_means,
    sum_d, sum_dxh, mean_d, mean_dxh, dx, dres, s1, s2, merged,
):  # fmt: skip
    """`ncl_backward` for (M, C): per-block partial sums in parallel (into the zeroed
    (blocks, C) scratch s1, s2), added in block order into the zeroed float64 (2, C) scratch
    `merged` (blocks outer, channels inner: the adds vectorize across channels)."""
    rows, channels = x.shape
    per, blocks = mc_blocks(rows, channels)
    if reduce:
        for k in _prange(blocks):
            args = (dy, x, res, k * per, min(rows, (k + 1) * per), center, scale, shift, invstd, xhat_shift,
                    s1[k], s2[k], lo, hi)  # fmt: skip
            _mc_grad_sums(args, has_res)
        sd, sdx = merged[0], merged[1]
        for k in range(blocks):
            s1k, s2k = s1[k], s2[k]
            for c in range(channels):
                sd[c] += float(s1k[c])
                sdx[c] += float(s2k[c])
        for c in range(channels):
            sum_d[c], sum_dxh[c] = sd[c], sdx[c]
            if local_means:
                mean_d[c], mean_dxh[c] = sd[c] / rows, sdx[c] / rows
    if write:
        for k in _prange(blocks):
            args = (dy, x, res, dx, dres, k * per, min(rows, (k + 1) * per), center, scale, shift, invstd,
                    xhat_shift, mean_d, mean_dxh, lo, hi)  # fmt: skip
            _mc_grad_apply(args, has_res)


_TEMPLATES = {k.__name__: k for k in (ncl_forward, mc_forward, ncl_backward, mc_backward)}
# The kernels' loops over values that depend on the case (the residual, the activation).
_LOOPS = (_ncl_normalize, _ncl_grad_sums, _ncl_grad_apply, _mc_normalize, _mc_grad_sums, _mc_grad_apply)


@_once
def compiled(name: str, parallel: bool, has_res: bool, kind: str):
    """The kernel `name` for one case: a copy of its function whose loops are the case's
    (`_case_loop`), under its own name (numba keys its on-disk cache by name and line, not by
    what a global is bound to, nor by `parallel`: under a shared name one case would load
    another's machine code). Without threads (prange runs as range) for small inputs, where
    a parallel region costs more than it saves and, on a loaded machine, waits for a
    descheduled thread (milliseconds). Compiles on its first call."""
    fn = _TEMPLATES[name]
    loops = {loop.__name__: _case_loop(loop, has_res, kind) for loop in _LOOPS}
    copy = _with_globals(fn, **loops)
    threads = "parallel" if parallel else "serial"
    name = f"{fn.__qualname__}_{threads}_{'residual' if has_res else 'plain'}_{kind}"
    return _jit(parallel=parallel)(numba_cache.unique_name(copy, name))


# A process forked from one whose kernels ran threads (DataLoader workers, fork-based
# multiprocessing) must not start a parallel region: GNU OpenMP, numba's threading layer here,
# aborts the child ("fork() called from a process already using GNU OpenMP"). Forked children
# run the serial kernels, which give the same bits.
_forked = False


def _mark_forked() -> None:
    global _forked
    _forked = True


os.register_at_fork(after_in_child=_mark_forked)


def threads(size: int, wanted: int | None = None) -> int:
    """How many threads a call on `size` elements runs: `wanted`, by default as many as
    torch's own kernels would (torch.get_num_threads(), e.g. one per process when several
    share the machine: more would make them wait on each other), at most numba's pool, from
    PARALLEL_NUMEL elements on; 1 (the serial kernel) below that, for one wanted, and in a
    forked child."""
    if wanted is None:
        wanted = torch.get_num_threads()
    if size < PARALLEL_NUMEL or wanted < 2 or _forked:
        return 1
    return min(wanted, numba.config.NUMBA_NUM_THREADS)


# The thread count this Python thread last gave numba (numba keeps one per thread; asking
# numba for it costs far more than this lookup, docs/performance.md, Thread count). A count
# given to numba.set_num_threads elsewhere in between stays until torch's count changes.
_given = threading.local()


def kernel(name: str, threads: int, has_res: bool, activation: str | None, dtype: np.dtype):
    """(the compiled kernel, lo, hi) for a call on `threads` threads (`threads()`: the serial
    kernel for 1, the threaded one on that many otherwise), with a residual or not, and the
    `activation`: its kind's case and the bounds that case takes (`FUSED`), as scalars of
    x's `dtype` (so that the loops compare in it). ValueError naming the fused activations
    for any other."""
    try:
        kind, lo, hi = FUSED[activation]
    except KeyError:
        raise ValueError(
            f"the numba kernels fuse {', '.join(a or 'identity' for a in FUSED)} only, "
            f"not {activation}: apply it after (functional.py does)"
        ) from None
    if threads > 1 and getattr(_given, "threads", None) != threads:
        torch_threads = torch.get_num_threads()
        numba.set_num_threads(threads)
        if torch.get_num_threads() != torch_threads:
            # numba's threading layer started just now and set OpenMP's thread count to its
            # pool's, which torch's own kernels then take for theirs (numba's parallel
            # regions pass their count explicitly, so torch's does not change them)
            torch.set_num_threads(torch_threads)
        _given.threads = threads
    return compiled(name, threads > 1, has_res, kind), dtype.type(lo), dtype.type(hi)
