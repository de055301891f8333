"""The `numba` backend: fused CPU kernels for fp32 and fp64, in as few passes over memory as possible.

Two kernels per canonical view (`layout.py`), each a `parallel=True`, cached numba function,
compiled once per dtype, and the same functions compiled without threads for inputs under
`PARALLEL_NUMEL` elements (`_serial`; the same arithmetic, so the same bits):

- forward: per-channel statistics (optional) and y = g((x - m) a + b + residual);
- backward: the reductions (sum_d, sum_d_xhat) (optional) and
  dx = a (d - mean_d - xhat mean_d_xhat), dresidual = d, with d = dy g'(u) and
  xhat = (x - m) invstd + h recomputed from x.

Per channel the kernels take a center m (in x's dtype), a = gamma invstd, b and h. The
statistics are computed in float64 (`mean`); m is `mean` rounded to x's dtype and
e = mean - m the rounding, folded into b = beta - e a and h = -e invstd. So x - m is exact
(x and m are close) and nothing of the mean is lost even for a channel whose mean is 1e4
times its standard deviation. The kernel contract (base.py) passes a plain `mean`, `scale`
and `shift`: it maps onto the same kernels with m = mean, a = scale, b = shift, h = 0.

Layouts and the order of work (fixed by the shape, never by the thread count, so results
are bitwise the same with 1 or 2 threads):

- `(N, C, L)`: a channel is N rows of L contiguous values; one thread owns a channel (a
  group of consecutive channels when rows are short, `_ncl_group`, so that each example's
  part is one contiguous run for the prefetcher). Its statistics merge (Chan's formula, in order) blocks of about `_BLOCK` values (a piece of a
  long row, or several short rows), each summed in one pass as x - (the block's first
  value), rows shorter than `_LANES` into per-position lanes; in training the channel is
  normalized right after, while its slice is still in L2: forward reads x once from memory
  and writes y; backward reads x and dy once per pass (the second from cache when the
  slice fits) and writes dx.
- `(M, C)`: a channel is a strided column; rows are split into blocks of about `_MC_BLOCK`
  values, each reduced (per-channel lanes, one row after another) in parallel into
  partials, merged in block order (all channels at once, in float64), then applied.

Compiled with `fastmath={"reassoc", "contract"}` only: LLVM vectorizes the sums and fuses
multiply-adds, NaN and Inf still propagate. Each loop is compiled once per (residual,
activation) case that matters (`_specialized`): identity and ReLU get branch-free vector
loops; the smooth activations are computed in float64 and rounded once.

`NumbaBackend.forward` and `.backward` are the whole op (base.py) that the op layer (ops.py)
calls: one forward kernel call (which, given `fold`, also folds the batch into the running
statistics under the guard's rule: `_fold_running`), one backward kernel call. Large outputs
come from `OUTPUTS` (output_pool.py), which reuses their memory from step to step instead of
faulting in fresh pages.
"""

from __future__ import annotations

import math
import types

import numpy as np
import torch
from torch import Tensor

from .. import activations, layout, stats
from ..channel_params import acc_dtype
from .base import CENTER, INVSTD, N_PARAMS, SCALE, SHIFT, VAR, XHAT_SHIFT, Backend
from .output_pool import OutputPool

try:
    import numba
except ImportError as exc:  # the package imports without numba; the backend says why
    numba = None
    _MISSING = f"numba is not importable ({exc}); install it with `pip install numba`"
else:
    _MISSING = None

_BLOCK = 4096  # (N, C, L): values per statistics block (16 KiB of fp32, summed in one pass)
_LANES = 128  # (N, C, L): rows shorter than this are summed in per-position lanes (`_ncl_lanes`)
_GROUP_SPAN = 1024  # (N, C, L) short rows: contiguous values per example in a group of channels
_GROUP_BYTES = 1 << 19  # (N, C, L) short rows: a group's slab stays under this (L2 is 2 MiB)
_MC_BLOCK = 32768  # (M, C): values per row block (128 KiB of fp32, in L2)
_HUGE_BYTES = 1 << 25  # outputs from this size use numpy's allocator (`_empty_like`)
_SMALL_BYTES = 1 << 16  # outputs below this size also use numpy's (`_allocate`)
_FASTMATH = {"reassoc", "contract"}  # never nnan/ninf/afn: NaN and Inf must propagate
_ACT_CODE = {name: code for code, name in enumerate(activations.NAMES)}
_DTYPES = (torch.float32, torch.float64)
_TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}

#: Measured crossover (docs/benchmarks.md): on the
#: (N, 64, L) fp32 BN + ReLU forward + backward sweep, aten / numba was 0.69-0.84 from 4k to
#: 64k elements (our ~0.08 ms of fixed cost per call), 1.00 at 128k, 1.16 at 256k and
#: 1.8-3.1 above; `auto` takes numba from 256k elements.
CROSSOVER_NUMEL = 1 << 18
#: Below this many elements the kernels run on one thread (`_serial`): a parallel region's
#: start costs more than the second thread saves there (measured on 2 cores).
PARALLEL_NUMEL = 1 << 16


def _jit(parallel: bool = False, inline: bool = False):
    """numba.njit with the project's settings. `reassoc` lets LLVM reorder sums, but the same
    way at every call: with a block partition fixed by the shape, results stay deterministic."""
    if numba is None:
        return lambda fn: fn
    if inline:
        return numba.njit(inline="always", fastmath=_FASTMATH, error_model="numpy", cache=True)
    return numba.njit(
        parallel=parallel, fastmath=_FASTMATH, error_model="numpy", cache=True, nogil=True
    )


_prange = range if numba is None else numba.prange


# Activations (`activations.py` has the equations) ---------------------------------------
@_jit(inline=True)
def _act(u, code, f):
    """g(u) as dtype `f` for the activation `code` (index in activations.NAMES)."""
    if code == 0:
        return u
    if code == 1:
        return u if not u <= 0 else f(0)  # NaN stays NaN
    v = float(u)
    if code == 2:
        return u if not u <= 0 else f(v * activations.LEAKY_SLOPE)
    if code == 3:
        return f(1.0 / (1.0 + math.exp(-v)))
    if code == 4:
        return f(math.tanh(v))
    if code == 5:
        return f(v / (1.0 + math.exp(-v)))
    return f(0.5 * v * (1.0 + math.erf(v * 0.7071067811865476)))


@_jit(inline=True)
def _grad(dy, u, code, f):
    """d = dy g'(u) as dtype `f`."""
    if code == 0:
        return dy
    if code == 1:
        return dy if u > 0 else f(0)
    v = float(u)
    if code == 2:
        return dy if u > 0 else f(dy * activations.LEAKY_SLOPE)
    if code == 3:
        sg = 1.0 / (1.0 + math.exp(-v))
        return f(dy * (sg * (1.0 - sg)))
    if code == 4:
        th = math.tanh(v)
        return f(dy * (1.0 - th * th))
    if code == 5:
        sg = 1.0 / (1.0 + math.exp(-v))
        return f(dy * (sg * (1.0 + v * (1.0 - sg))))
    cdf = 0.5 * (1.0 + math.erf(v * 0.7071067811865476))
    return f(dy * (cdf + v * math.exp(-0.5 * v * v) * 0.3989422804014327))


@_jit(inline=True)
def _d(dy, t, a, b, res, has_res, code, f):
    """d = dy g'(u), the activation's slope at u = t a + b (+ res) recomputed from t = x - m
    (the backward's two passes both need it; nothing the size of x is saved)."""
    u = t * a + b
    if has_res:
        u += res
    return _grad(dy, u, code, f)


@_jit(inline=True)
def _dx(d, t, a, inv, h, mean_d, mean_dxh):
    """dx = a (d - mean_d - xhat mean_dxh), xhat = t inv + h."""
    return a * (d - mean_d - (t * inv + h) * mean_dxh)


@_jit(inline=True)
def _specialized(loop, args, has_res, code):
    """loop(args, has_res, code) with `has_res` made a constant, and `code` too for identity
    and ReLU: each compiles to its own loops with no call and no residual test inside
    (which vectorize); the smooth activations share one loop per `has_res`."""
    if has_res:
        return _by_code(loop, args, True, code)
    return _by_code(loop, args, False, code)


@_jit(inline=True)
def _by_code(loop, args, has_res, code):
    """`_specialized`'s second half: `code` a constant for identity and ReLU."""
    if code == 0:
        return loop(args, has_res, 0)
    if code == 1:
        return loop(args, has_res, 1)
    return loop(args, has_res, code)


# Statistics ---------------------------------------------------------------------------
@_jit(inline=True)
def _chan(count, mean, m2, size, s1, s2, shift):
    """Merge a block of `size` values, given s1 = sum t, s2 = sum t^2 with t = x - shift
    (shift a value of the block), into (count, mean, m2), in float64 (Chan's formula)."""
    bmean = float(s1) / size
    bm2 = max(float(s2) - float(s1) * bmean, 0.0)
    total = count + size
    delta = (float(shift) + bmean) - mean
    return total, mean + delta * (size / total), m2 + bm2 + delta * delta * (count * size / total)


@_jit(inline=True)
def _set_params(c, mean, m2c, count, eps, gamma, beta, m, a, b, inv, h, m2):
    """Channel c's kernel parameters from its float64 (mean, m2) (module docstring)."""
    f = m.dtype.type
    mc = f(mean)
    e = mean - float(mc)  # what rounding the mean to x's dtype lost
    ic = 1.0 / math.sqrt(m2c / count + eps)
    ac = float(gamma[c]) * ic
    m[c], inv[c], m2[c] = mc, ic, m2c
    a[c], b[c], h[c] = ac, float(beta[c]) - e * ac, -e * ic


# The rule's arithmetic without fastmath: a fused multiply-add would round differently from
# the tensor ops of stats.update_running, and the two must give the same bits. fastmath=False
# is spelled out: numba compiles a callee that leaves it unset with its caller's flags, and
# the kernels that call this one contract multiply-adds.
_blend = stats.blend if numba is None else numba.njit(fastmath=False, error_model="numpy", cache=True)(stats.blend)


@_jit(inline=True)
def _fold_running(acc, count, update, factor, unbiased, running_mean, running_var):
    """The guarded running update from the kernel's float64 statistics: mean acc[0] and m2
    acc[1] (turned into the stored variance in place: m2 / (count - 1), or m2 / count when
    not `unbiased`); see `_fold`. One value per channel (no variance; functional refuses it
    earlier) is never folded in."""
    if count < 2:
        return False
    spread = 1.0 / (count - 1.0) if unbiased else 1.0 / count
    for c in range(acc.shape[1]):
        acc[1, c] *= spread
    return _fold(acc[0], acc[1], factor, update, running_mean, running_var)


@_jit(inline=True)
def _fold(mean, var, factor, update, running_mean, running_var):
    """The guard's rule (stats.update_running) on numpy arrays: each channel's new running
    value is `stats.blend(old, batch, factor)` in float64, rounded to the buffer's dtype; when
    every one is finite and `update`, they are all written, otherwise none. Returns whether
    they were all finite. The decision comes before any write, so no thread ever sees a
    non-finite value in the buffers."""
    fm, fv = running_mean.dtype.type, running_var.dtype.type
    finite = True
    for c in range(mean.shape[0]):
        # np.float64, not float(): numba's float() keeps a float32 a float32
        rounded_mean = fm(_blend(np.float64(running_mean[c]), np.float64(mean[c]), factor))
        rounded_var = fv(_blend(np.float64(running_var[c]), np.float64(var[c]), factor))
        finite = finite and math.isfinite(rounded_mean) and math.isfinite(rounded_var)
    if finite and update:
        for c in range(mean.shape[0]):
            running_mean[c] = _blend(np.float64(running_mean[c]), np.float64(mean[c]), factor)
            running_var[c] = _blend(np.float64(running_var[c]), np.float64(var[c]), factor)
    return finite


@_jit()
def fold_running(mean, var, factor, running_mean, running_var):
    """`_fold` as a call from Python (numpy arrays, all (C,); mean and var as stored), for
    the paths whose kernel does not fold (torch's, on CPU): the rule at the cost of one call."""
    return _fold(mean, var, factor, True, running_mean, running_var)


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
    """Channels per work item of the (N, C, L) kernels, fixed by the shape. Rows of _LANES
    values or more: one. Shorter rows: enough consecutive channels that each example's part
    of the group is about _GROUP_SPAN contiguous values (the hardware prefetcher follows one
    contiguous run; one channel alone is N runs of L values, a whole channel stride apart),
    while the group's slab stays within _GROUP_BYTES (in L2 for the second pass) and there
    are at least 4 groups to share among the threads. Each channel's arithmetic is the
    same whatever the group size, so results do not depend on it."""
    if length >= _LANES:
        return 1
    per = (_GROUP_SPAN + length - 1) // length
    per = min(per, _GROUP_BYTES // max(1, rows * length * itemsize), channels // 4)
    return max(1, per)


@_jit(inline=True)
def _ncl_stats(x, c0, c1, lanes, acc):
    """(mean, m2) in float64 of channels c0:c1 into acc[0, c], acc[1, c]: blocks of about
    _BLOCK values per channel (whole short rows or a piece of a long row), each summed in one
    pass as t = x - (its first value), merged in order (Chan). Rows shorter than _LANES are
    summed in the lanes lanes[c] (one per position of the row, added to row after row; a row
    of 49 values would otherwise leave 17 of them to a serial scalar add chain after LLVM's
    32-wide vector loop), example by example across the group's channels (memory order)."""
    n_rows, _, length = x.shape
    f = x.dtype.type
    rows_per = max(1, _BLOCK // length)
    for c in range(c0, c1):
        acc[0, c], acc[1, c] = 0.0, 0.0
    count = 0.0  # the same for every channel
    for n0 in range(0, n_rows, rows_per):
        n1 = min(n_rows, n0 + rows_per)
        for lo in range(0, length, _BLOCK):
            hi = min(length, lo + _BLOCK)
            size = float((n1 - n0) * (hi - lo))
            if length < _LANES:
                for c in range(c0, c1):
                    lanes[c, 0, :] = 0
                    lanes[c, 1, :] = 0
                for n in range(n0, n1):
                    for c in range(c0, c1):
                        xr, l1, l2, shift = x[n, c], lanes[c, 0], lanes[c, 1], x[n0, c, lo]
                        for j in range(length):
                            t = xr[j] - shift
                            l1[j] += t
                            l2[j] += t * t
                for c in range(c0, c1):
                    s1l, s2l = _lanes_total(lanes[c, 0]), _lanes_total(lanes[c, 1])
                    _, acc[0, c], acc[1, c] = _chan(count, acc[0, c], acc[1, c], size, s1l, s2l, x[n0, c, lo])
            else:
                for c in range(c0, c1):
                    shift, s1, s2 = x[n0, c, lo], f(0), f(0)
                    for n in range(n0, n1):
                        xr = x[n, c, lo:hi]
                        for j in range(hi - lo):
                            t = xr[j] - shift
                            s1 += t
                            s2 += t * t
                    _, acc[0, c], acc[1, c] = _chan(count, acc[0, c], acc[1, c], size, s1, s2, shift)
            count += size


@_jit(inline=True)
def _ncl_normalize(args, has_res, code):
    """y[:, c] = g((x[:, c] - m) a + b (+ res[:, c])) for the channels c0:c1."""
    x, res, y, c0, c1, m, a, b = args
    f = x.dtype.type
    for n in range(x.shape[0] - 1, -1, -1):  # last rows first: the statistics read them last
        for c in range(c0, c1):
            xr, rr, yr, mc, ac, bc = x[n, c], res[n, c], y[n, c], m[c], a[c], b[c]
            for j in range(xr.shape[0]):
                u = (xr[j] - mc) * ac + bc
                if has_res:
                    u += rr[j]
                yr[j] = _act(u, code, f)


@_jit(parallel=True)
def _ncl_forward(
    x, res, has_res, code, train, write, gamma, beta, eps, m, a, b, inv, h, m2, y,
    update, factor, unbiased, running_mean, running_var, lanes, acc,
):  # fmt: skip
    """Per group of channels (`_ncl_group`): statistics when `train` (into m, a, b, inv, h,
    m2, see `_set_params`), then, when `write`, y = g((x - m) a + b + res) while the group is
    still in cache. Then, in training, the guarded running update (`_fold_running`); returns
    whether the batch statistics were finite (True in evaluation). `lanes`: scratch from
    `_ncl_lanes`; `acc`: float64 (2, C) scratch."""
    n_rows, channels, length = x.shape
    per = _ncl_group(n_rows, channels, length, x.itemsize)
    for k in _prange((channels + per - 1) // per):
        c0, c1 = k * per, min(channels, (k + 1) * per)
        if train:
            _ncl_stats(x, c0, c1, lanes, acc)
            for c in range(c0, c1):
                _set_params(c, acc[0, c], acc[1, c], n_rows * length, eps, gamma, beta, m, a, b, inv, h, m2)
        if write:
            _specialized(_ncl_normalize, (x, res, y, c0, c1, m, a, b), has_res, code)
    if train:
        return _fold_running(acc, n_rows * length, update, factor, unbiased, running_mean, running_var)
    return True


@_jit(inline=True)
def _ncl_grad_sums(args, has_res, code):
    """(sum d, sum d xhat) of channels c0:c1 in float64 into acc[0, c], acc[1, c] (each row
    summed in x's dtype, rows added in order)."""
    dy, x, res, c0, c1, m, a, b, inv, h, acc = args
    f = x.dtype.type
    for c in range(c0, c1):
        acc[0, c], acc[1, c] = 0.0, 0.0
    for n in range(x.shape[0]):
        for c in range(c0, c1):
            xr, dyr, rr = x[n, c], dy[n, c], res[n, c]
            mc, ac, bc, ic, hc = m[c], a[c], b[c], inv[c], h[c]
            s1, s2 = f(0), f(0)
            for j in range(xr.shape[0]):
                t = xr[j] - mc
                g = _d(dyr[j], t, ac, bc, rr[j], has_res, code, f)
                s1 += g
                s2 += g * (t * ic + hc)
            acc[0, c] += float(s1)
            acc[1, c] += float(s2)


@_jit(inline=True)
def _ncl_grad_apply(args, has_res, code):
    """dx[:, c] = a (d - mean_d - xhat mean_dxh), dres[:, c] = d, for the channels c0:c1."""
    dy, x, res, dx, dres, c0, c1, m, a, b, inv, h, md, mdx = args
    f = x.dtype.type
    for n in range(x.shape[0] - 1, -1, -1):  # last rows first: the reduction read them last
        for c in range(c0, c1):
            xr, dyr, rr, dxr, drr = x[n, c], dy[n, c], res[n, c], dx[n, c], dres[n, c]
            mc, ac, bc, ic, hc, mdc, mdxc = m[c], a[c], b[c], inv[c], h[c], md[c], mdx[c]
            if has_res and xr.shape[0] >= _LANES:  # see `_mc_grad_apply`
                for j in range(xr.shape[0]):
                    drr[j] = _d(dyr[j], xr[j] - mc, ac, bc, rr[j], True, code, f)
                for j in range(xr.shape[0]):
                    dxr[j] = _dx(drr[j], xr[j] - mc, ac, ic, hc, mdc, mdxc)
            else:
                for j in range(xr.shape[0]):
                    t = xr[j] - mc
                    g = _d(dyr[j], t, ac, bc, rr[j], has_res, code, f)
                    dxr[j] = _dx(g, t, ac, ic, hc, mdc, mdxc)
                    if has_res:
                        drr[j] = g


@_jit(parallel=True)
def _ncl_backward(
    dy, x, res, has_res, code, m, a, b, inv, h, reduce, write, batch_stats,
    sum_d, sum_dxh, mean_d, mean_dxh, dx, dres, acc,
):  # fmt: skip
    """Per group of channels (`_ncl_group`): when `reduce`, sum_d = sum d, sum_dxh = sum d
    xhat (and, with `batch_stats`, mean_d, mean_dxh = those / n); then, when `write`,
    dx = a (d - mean_d - xhat mean_dxh) and dres = d; d = dy g'(u), xhat = (x - m) inv + h.
    `acc`: float64 (2, C) scratch."""
    n_rows, channels, length = x.shape
    per = _ncl_group(n_rows, channels, length, x.itemsize)
    for k in _prange((channels + per - 1) // per):
        c0, c1 = k * per, min(channels, (k + 1) * per)
        if reduce:
            _specialized(_ncl_grad_sums, (dy, x, res, c0, c1, m, a, b, inv, h, acc), has_res, code)
            for c in range(c0, c1):
                sum_d[c], sum_dxh[c] = acc[0, c], acc[1, c]
                if batch_stats:
                    mean_d[c], mean_dxh[c] = acc[0, c] / (n_rows * length), acc[1, c] / (n_rows * length)
        if write:
            args = (dy, x, res, dx, dres, c0, c1, m, a, b, inv, h, mean_d, mean_dxh)
            _specialized(_ncl_grad_apply, args, has_res, code)


# (M, C) --------------------------------------------------------------------------------
@_jit(inline=True)
def _mc_blocks(rows, channels):
    """(rows per block, number of blocks): a partition fixed by the shape alone."""
    per = max(1, _MC_BLOCK // channels)
    return per, (rows + per - 1) // per


@_jit(inline=True)
def _mc_normalize(args, has_res, code):
    """y[lo:hi] = g((x[lo:hi] - m) a + b (+ res[lo:hi])), per-channel vectors m, a, b."""
    x, res, y, lo, hi, m, a, b = args
    f = x.dtype.type
    for r in range(lo, hi):
        xr, rr, yr = x[r], res[r], y[r]
        for c in range(xr.shape[0]):
            u = (xr[c] - m[c]) * a[c] + b[c]
            if has_res:
                u += rr[c]
            yr[c] = _act(u, code, f)


@_jit(parallel=True)
def _mc_forward(
    x, res, has_res, code, train, write, gamma, beta, eps, m, a, b, inv, h, m2, y,
    update, factor, unbiased, running_mean, running_var, s1, s2, merged,
):  # fmt: skip
    """`_ncl_forward` for (M, C): per-block sums of x - x[0] in parallel (into the zeroed
    (blocks, C) scratch s1, s2), merged in block order into the float64 (2, C) scratch
    `merged` (mean, m2 of the blocks so far); blocks outer and channels inner, so that the
    merge (blocks x C Chan updates) vectorizes across channels."""
    rows, channels = x.shape
    per, blocks = _mc_blocks(rows, channels)
    if train:
        shift = x[0]
        for k in _prange(blocks):
            s1k, s2k = s1[k], s2[k]
            for r in range(k * per, min(rows, (k + 1) * per)):
                xr = x[r]
                for c in range(channels):
                    t = xr[c] - shift[c]
                    s1k[c] += t
                    s2k[c] += t * t
        mean, m2c = merged[0], merged[1]
        count = 0.0  # the same for every channel
        for k in range(blocks):
            size = float(min(rows, (k + 1) * per) - k * per)
            s1k, s2k = s1[k], s2[k]
            for c in range(channels):
                _, mean[c], m2c[c] = _chan(count, mean[c], m2c[c], size, s1k[c], s2k[c], shift[c])
            count += size
        for c in range(channels):
            _set_params(c, mean[c], m2c[c], rows, eps, gamma, beta, m, a, b, inv, h, m2)
    if write:
        for k in _prange(blocks):
            args = (x, res, y, k * per, min(rows, (k + 1) * per), m, a, b)
            _specialized(_mc_normalize, args, has_res, code)
    if train:
        return _fold_running(merged, rows, update, factor, unbiased, running_mean, running_var)
    return True


@_jit(inline=True)
def _mc_grad_sums(args, has_res, code):
    """s1 += d, s2 += d xhat over rows lo:hi, per channel (vectors of x's dtype)."""
    dy, x, res, lo, hi, m, a, b, inv, h, s1, s2 = args
    f = x.dtype.type
    for r in range(lo, hi):
        xr, dyr, rr = x[r], dy[r], res[r]
        for c in range(xr.shape[0]):
            t = xr[c] - m[c]
            g = _d(dyr[c], t, a[c], b[c], rr[c], has_res, code, f)
            s1[c] += g
            s2[c] += g * (t * inv[c] + h[c])


@_jit(inline=True)
def _mc_grad_apply(args, has_res, code):
    """dx = a (d - mean_d - xhat mean_dxh), dres = d over rows lo:hi."""
    dy, x, res, dx, dres, lo, hi, m, a, b, inv, h, md, mdx = args
    f = x.dtype.type
    for r in range(lo, hi):
        xr, dyr, rr, dxr, drr = x[r], dy[r], res[r], dx[r], dres[r]
        if has_res and xr.shape[0] >= _LANES:
            # With a residual the fused loop loads five arrays and stores two: LLVM gives up
            # vectorizing it (too many runtime alias checks), 2-3x slower per value. Two loops
            # (d into dres; dx from it while the row is in L1) each vectorize; on rows shorter
            # than _LANES the second loop's overhead outweighs it (measured).
            for c in range(xr.shape[0]):
                drr[c] = _d(dyr[c], xr[c] - m[c], a[c], b[c], rr[c], True, code, f)
            for c in range(xr.shape[0]):
                dxr[c] = _dx(drr[c], xr[c] - m[c], a[c], inv[c], h[c], md[c], mdx[c])
        else:
            for c in range(xr.shape[0]):
                t = xr[c] - m[c]
                g = _d(dyr[c], t, a[c], b[c], rr[c], has_res, code, f)
                dxr[c] = _dx(g, t, a[c], inv[c], h[c], md[c], mdx[c])
                if has_res:
                    drr[c] = g


@_jit(parallel=True)
def _mc_backward(
    dy, x, res, has_res, code, m, a, b, inv, h, reduce, write, batch_stats,
    sum_d, sum_dxh, mean_d, mean_dxh, dx, dres, s1, s2, merged,
):  # fmt: skip
    """`_ncl_backward` for (M, C): per-block partial sums in parallel (into the zeroed
    (blocks, C) scratch s1, s2), added in block order into the zeroed float64 (2, C) scratch
    `merged` (blocks outer, channels inner: the adds vectorize across channels)."""
    rows, channels = x.shape
    per, blocks = _mc_blocks(rows, channels)
    if reduce:
        for k in _prange(blocks):
            args = (dy, x, res, k * per, min(rows, (k + 1) * per), m, a, b, inv, h, s1[k], s2[k])
            _specialized(_mc_grad_sums, args, has_res, code)
        sd, sdx = merged[0], merged[1]
        for k in range(blocks):
            s1k, s2k = s1[k], s2[k]
            for c in range(channels):
                sd[c] += float(s1k[c])
                sdx[c] += float(s2k[c])
        for c in range(channels):
            sum_d[c], sum_dxh[c] = sd[c], sdx[c]
            if batch_stats:
                mean_d[c], mean_dxh[c] = sd[c] / rows, sdx[c] / rows
    if write:
        for k in _prange(blocks):
            lo, hi = k * per, min(rows, (k + 1) * per)
            args = (dy, x, res, dx, dres, lo, hi, m, a, b, inv, h, mean_d, mean_dxh)
            _specialized(_mc_grad_apply, args, has_res, code)


# Python side ---------------------------------------------------------------------------
def _serial(kernel):
    """The same kernel compiled without threads (prange runs as range): for small inputs, where
    a parallel region costs more than it saves and, on a loaded machine, waits for a
    descheduled thread (milliseconds)."""
    if numba is None:
        return kernel
    fn = kernel.py_func
    copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial", fn.__defaults__, fn.__closure__)
    # numba's on-disk cache is keyed by qualified name and line, not by `parallel`: under the
    # same name the parallel dispatcher would load the serial machine code (and run on one
    # thread) whenever the serial one was compiled first.
    copy.__qualname__ = fn.__qualname__ + "_serial"
    return _jit()(copy)


#: (parallel, serial) versions of each kernel; `_kernel` picks one by size.
_KERNELS = {k.__name__: (k, _serial(k)) for k in (_ncl_forward, _mc_forward, _ncl_backward, _mc_backward)}


def _kernel(name: str, size: int):
    """The parallel kernel from PARALLEL_NUMEL elements on, the serial one below."""
    return _KERNELS[name][size < PARALLEL_NUMEL]


def _np(t: Tensor) -> np.ndarray:
    """A contiguous numpy view (a copy only when `t` is not contiguous)."""
    return t.detach().contiguous().numpy()


def _vec(t: Tensor | None, channels: int, dtype: torch.dtype, fill: float) -> np.ndarray:
    """A per-channel (C,) numpy array in the accumulation dtype (t's memory when it can be);
    `fill` when t is None."""
    if t is None:
        return np.full(channels, fill, dtype=np.float64 if dtype == torch.float64 else np.float32)
    return _writable(t, dtype)[0]


def _allocate(count: int, dtype: np.dtype) -> np.ndarray:
    """A new 1-D array. numpy asks the OS for huge pages on large arrays (madvise); below
    glibc's largest mmap threshold (32 MiB) that memory is often reused heap where
    first-touching it cost ~20 ms per 16 MB here, so those come from torch's allocator;
    above, numpy's fresh huge-page mappings fault 10x less.
    Small arrays come from numpy too: the heap's free lists serve them, and np.empty costs
    ~0.3 us where torch.empty(...).numpy() costs ~2.5."""
    nbytes = count * dtype.itemsize
    if _SMALL_BYTES <= nbytes < _HUGE_BYTES:
        return torch.empty(count, dtype=_TORCH_DTYPES[dtype]).numpy()
    return np.empty(count, dtype)


#: Our large outputs are reused from step to step (output_pool.py says why).
OUTPUTS = OutputPool(_allocate)


def _empty_like(a: np.ndarray) -> np.ndarray:
    """An uninitialized array like `a` (C-contiguous), from the output pool."""
    return OUTPUTS.empty(a.shape, a.dtype)


def _mc_scratch(xv: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Zeroed scratch for the (M, C) kernels: per-block partial sums s1, s2 (blocks, C) in x's
    dtype and their float64 (2, C) merge (allocated here, not in the kernels, so that
    compiling them needs no numpy allocation function)."""
    rows, channels = xv.shape
    s1, s2 = np.zeros((2, _mc_blocks.py_func(rows, channels)[1], channels), xv.dtype)
    return s1, s2, np.zeros((2, channels))


def _ncl_lanes(xv: np.ndarray) -> np.ndarray:
    """(C, 2, L) lane scratch for `_ncl_stats` on rows shorter than _LANES (the kernel zeroes
    what it uses), (C, 2, 0) for longer rows."""
    _, channels, length = xv.shape
    return np.empty((channels, 2, length if length < _LANES else 0), xv.dtype)


def _forward(xv, rv, code, train, write, gamma, beta, eps, m, a, b, inv, h, running=None):
    """Run the forward kernel of xv's view (train: fills m, a, b, inv, h; `running` =
    (running_mean, running_var, factor, unbiased), the buffers as numpy arrays, to fold the
    batch into under the guard's rule). Returns (y or None, m2, whether the batch statistics
    were finite, so folded in)."""
    m2 = np.empty(xv.shape[1], xv.dtype)
    y = _empty_like(xv) if write else xv  # never written when not `write`
    update = running is not None
    running_mean, running_var, factor, unbiased = running if update else (m, m, 0.0, True)
    args = (xv, xv if rv is None else rv, rv is not None, code, train, write, gamma, beta, eps,
            m, a, b, inv, h, m2, y, update, factor, unbiased, running_mean, running_var)  # fmt: skip
    if xv.ndim == 3:
        finite = _kernel("_ncl_forward", xv.size)(*args, _ncl_lanes(xv), np.empty((2, xv.shape[1])))
    else:
        finite = _kernel("_mc_forward", xv.size)(*args, *_mc_scratch(xv))
    return (y if write else None), m2, finite


def _backward(dyv, xv, rv, code, m, a, b, inv, h, reduce, write, batch_stats, mean_d, mean_dxh):
    """Run the backward kernel; returns (sum_d, sum_dxh, dx or None, dres or None) as numpy."""
    channels = xv.shape[1]
    sum_d, sum_dxh = np.zeros((2, channels), xv.dtype)
    dx = _empty_like(xv) if write else xv  # never written when not `write`
    dres = _empty_like(xv) if write and rv is not None else dx
    args = (dyv, xv, xv if rv is None else rv, rv is not None, code, m, a, b, inv, h,
            reduce, write, batch_stats, sum_d, sum_dxh, mean_d, mean_dxh, dx, dres)  # fmt: skip
    if xv.ndim == 3:
        _kernel("_ncl_backward", xv.size)(*args, np.empty((2, channels)))
    else:
        _kernel("_mc_backward", xv.size)(*args, *_mc_scratch(xv))
    return sum_d, sum_dxh, (dx if write else None), (dres if write and rv is not None else None)


def _writable(t: Tensor, dtype: torch.dtype) -> tuple[np.ndarray, bool]:
    """A (C,) tensor (a parameter, or a running-statistic buffer the kernel updates) as a
    numpy array of `dtype`, and whether it is a copy (then an updated buffer is `copy_`-ed
    back): the tensor's own memory when it can be."""
    if t.dtype == dtype and t.is_contiguous():
        return t.detach().numpy(), False
    return t.detach().to(dtype).contiguous().numpy(), True


class NumbaBackend(Backend):
    """Fused numba kernels on CPU for contiguous fp32/fp64 views; aten takes everything else."""

    name = "numba"
    folds_running = True

    def unavailable(self) -> str | None:
        return _MISSING

    def unsupported(self, x: Tensor) -> str | None:
        if x.device.type != "cpu":
            return f"numba runs on the CPU only, the input is on {x.device}"
        if x.dtype not in _DTYPES:
            return f"numba kernels take float32 and float64, the input is {x.dtype}"
        if x.numel() == 0:
            return "the input is empty"
        # kind_of checks the memory order of 3-D and wider input; (N, C) must be contiguous too
        kind = layout.kind_of(x)
        if kind is None or (x.dim() == 2 and not x.is_contiguous()):
            return "the input is neither contiguous nor channels-last (a strided view)"
        return None

    def preferred(self, x: Tensor) -> bool:
        return x.numel() >= CROSSOVER_NUMEL

    def takes_plain_evaluation(self, x: Tensor) -> bool:
        """Plain evaluation is one affine pass with nothing to fuse: below _HUGE_BYTES torch's
        own pass is as fast and costs less to call; above, every fresh output is a new mapping
        that torch's pass faults in page by page, and ours, from the output pool, does not."""
        return x.numel() * x.element_size() >= _HUGE_BYTES

    # The whole op (base.py) -------------------------------------------------------------
    def forward(self, x, weight, bias, residual, running_mean, running_var, eps, activation, training, fold=None):
        """One forward kernel call (base.py): statistics, normalization, activation and
        residual, and with `fold` the guarded running update, all in the kernel."""
        xv = _np(x)
        rv = None if residual is None else _np(residual)
        acc = acc_dtype(x.dtype)
        channels = xv.shape[1]
        gamma, beta = _vec(weight, channels, acc, 1.0), _vec(bias, channels, acc, 0.0)
        params = np.empty((N_PARAMS, channels), xv.dtype)
        if not training:  # center = running mean, xhat_shift = 0
            params[CENTER] = _vec(running_mean, channels, acc, 0.0)
            params[VAR] = _vec(running_var, channels, acc, 0.0)
            params[INVSTD] = 1.0 / np.sqrt(params[VAR] + eps)
            params[SCALE], params[SHIFT], params[XHAT_SHIFT] = gamma * params[INVSTD], beta, 0.0
        buffers = running = None
        if fold is not None:
            # each buffer on its own: they may differ in dtype or layout
            buffers = (_writable(fold.running_mean, acc), _writable(fold.running_var, acc))
            running = (buffers[0][0], buffers[1][0], fold.factor, fold.unbiased)
        rows = params[[CENTER, SCALE, SHIFT, INVSTD, XHAT_SHIFT]]
        y, m2, finite = _forward(xv, rv, _ACT_CODE[activation], training, True, gamma, beta, eps, *rows, running)
        if training:
            params[[CENTER, SCALE, SHIFT, INVSTD, XHAT_SHIFT]] = rows
            params[VAR] = m2 / layout.values_per_channel(x)
        if buffers is not None:
            for (array, copied), target in zip(buffers, (fold.running_mean, fold.running_var)):
                if copied:
                    target.copy_(torch.from_numpy(array))
        return torch.from_numpy(y), torch.from_numpy(params), (finite if fold is not None else None)

    def backward(self, dy, x, residual, params, training, activation, needs, weight_dtype, bias_dtype):
        """One backward kernel call (base.py): the reductions and dx, dresidual together."""
        need_x, need_w, need_b, need_r = needs
        xv, dyv, p = _np(x), _np(dy), _np(params)
        rv = None if residual is None else _np(residual)
        # the kernel writes (mean_d, mean_dxh) from the batch statistics; evaluation's are 0
        mean_d, mean_dxh = np.zeros((2, xv.shape[1]), xv.dtype)
        write = need_x or need_r
        reduce = need_w or need_b or (training and write)
        sum_d, sum_dxh, dxv, dresv = _backward(
            dyv, xv, rv, _ACT_CODE[activation], p[CENTER], p[SCALE], p[SHIFT], p[INVSTD], p[XHAT_SHIFT],
            reduce, write, training, mean_d, mean_dxh,
        )  # fmt: skip
        return (
            torch.from_numpy(dxv) if need_x else None,
            torch.from_numpy(sum_dxh).to(weight_dtype) if need_w else None,
            torch.from_numpy(sum_d).to(bias_dtype) if need_b else None,
            torch.from_numpy(dresv) if need_r else None,
        )

    # The kernel contract (base.py) ----------------------------------------------------
    def stats(self, x):
        xv = _np(x)
        m, a, b, inv, h = (np.empty(xv.shape[1], xv.dtype) for _ in range(5))
        ones, zeros = np.ones_like(m), np.zeros_like(m)
        _, m2, _ = _forward(xv, None, 0, True, False, ones, zeros, 0.0, m, a, b, inv, h)
        mean = torch.from_numpy(m)
        return torch.full_like(mean, layout.values_per_channel(x)), mean, torch.from_numpy(m2)

    def apply(self, x, mean, scale, shift, activation=None, residual=None):
        xv = _np(x)
        zeros = np.zeros(xv.shape[1], xv.dtype)
        rv = None if residual is None else _np(residual)
        y = _forward(xv, rv, _ACT_CODE[activation], False, True, zeros, zeros, 0.0,
                     _np(mean), _np(scale), _np(shift), zeros, zeros)[0]  # fmt: skip
        return torch.from_numpy(y)

    def backward_reduce(self, dy, x, mean, invstd, scale, shift, activation=None, residual=None):
        zeros = np.zeros(x.shape[1], _np(mean).dtype)
        sum_d, sum_dxh, _, _ = _backward(
            _np(dy), _np(x), None if residual is None else _np(residual), _ACT_CODE[activation],
            _np(mean), _np(scale), _np(shift), _np(invstd), zeros, True, False, False, zeros, zeros,
        )  # fmt: skip
        return torch.from_numpy(sum_d), torch.from_numpy(sum_dxh)

    def backward_apply(
        self, dy, x, mean, invstd, scale, shift, mean_d, mean_d_xhat, activation=None, residual=None
    ):
        zeros = np.zeros(x.shape[1], _np(mean).dtype)
        _, _, dx, dres = _backward(
            _np(dy), _np(x), None if residual is None else _np(residual), _ACT_CODE[activation],
            _np(mean), _np(scale), _np(shift), _np(invstd), zeros, False, True, False,
            _np(mean_d), _np(mean_d_xhat),
        )  # fmt: skip
        return torch.from_numpy(dx), None if dres is None else torch.from_numpy(dres)
