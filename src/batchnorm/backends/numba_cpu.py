"""The `numba` backend: fused CPU kernels for fp32 and fp64, in as few passes over memory as possible.

Two kernels per canonical view (`layout.py`), each a `parallel=True`, cached numba function,
compiled once per dtype:

- forward: per-channel statistics (optional) and y = g(((x - s) - d) a + b + residual);
- backward: the reductions (sum_d, sum_d_xhat) (optional) and
  dx = a (d - mean_d - xhat mean_d_xhat), dresidual = d, with d = dy g'(u) recomputed from x.

The per-channel statistics are kept *shifted*: s is the channel's first value, d the mean of
x - s, so mean = s + d and t = (x - s) - d is exact to a rounding even when the mean is 1e4
times the standard deviation (x - s is exact in floating point when x and s are close). The
kernel contract (base.py) passes a plain `mean`, `scale` and `shift`: it maps onto the same
kernels with s = mean, d = 0, a = scale, b = shift.

Layouts and the order of work (fixed by the shape, never by the thread count, so results
are bitwise the same with 1 or 2 threads):

- `(N, C, L)`: a channel is N contiguous rows; one thread owns a channel. Its statistics
  merge (Chan's formula, in order) blocks of about `_BLOCK` values (a piece of a long row,
  or several short rows), each summarized in one pass from sums of x - (the block's first
  value); in training the channel is normalized right after, while its slice is still in
  L2: forward reads x once from memory and writes y; backward reads x and dy once per pass
  (the second from cache when the slice fits) and writes dx.
- `(M, C)`: a channel is a strided column; rows are split into blocks of about `_MC_BLOCK`
  values, reduced in parallel into per-block partials, merged in block order, then applied.

Activations (activations.py) are chosen once per block (identity and ReLU loops vectorize;
the others are computed in float64 and rounded on store). Sums accumulate in the input's
dtype (fp32 for fp32) in `_LANES` independent partial sums, folded in a fixed order.

`normalize` is the whole-op hook (base.py): one forward kernel call, one backward kernel
call, its own autograd; double backward goes through torch's differentiable ops (aten).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .. import activations, layout
from ..reference import acc_dtype
from .aten import AtenBackend
from .base import Backend

try:
    import numba
except ImportError as exc:  # the package imports without numba; the backend says why
    numba = None
    _MISSING = f"numba is not importable ({exc}); install it with `pip install numba`"
else:
    _MISSING = None

_BLOCK = 1024  # (N, C, L): values per reduction block (two 4 KiB scratch rows in L1)
_MC_BLOCK = 32768  # (M, C): values per row block (128 KiB of fp32, in L2)
_LANES = 64  # independent partial sums of a reduction (4 AVX-512 registers of fp32)
_ACT_CODE = {name: code for code, name in enumerate(activations.NAMES)}
_DTYPES = (torch.float32, torch.float64)

#: Measured crossover (docs/benchmarks.md): torch's own kernels were faster than these
#: below about 4M elements (fp32 forward + backward: 0.5-0.7x on the 1.6M-3.2M rows in
#: (N, C, L), 0.66-0.71x on the (N, 64, 64) sweep up to 4M), so `auto` keeps aten there.
CROSSOVER_NUMEL = 1 << 22


def _jit(parallel: bool = False, inline: bool = False):
    """numba.njit with the project's settings (no fastmath: IEEE results, NaN kept)."""
    if numba is None:
        return lambda fn: fn
    if inline:
        return numba.njit(inline="always", error_model="numpy", cache=True)
    return numba.njit(parallel=parallel, error_model="numpy", cache=True, nogil=True)


_prange = range if numba is None else numba.prange


# Activations, in float64 (`activations.py` has the equations) -----------------------------
@_jit(inline=True)
def _act(u, code):
    """g(u) for the activation `code` (index in activations.NAMES)."""
    v = float(u)
    if code == 1:
        return v if not v <= 0.0 else 0.0  # NaN stays NaN
    if code == 2:
        return v if not v <= 0.0 else v * activations.LEAKY_SLOPE
    if code == 3:
        return 1.0 / (1.0 + math.exp(-v))
    if code == 4:
        return math.tanh(v)
    if code == 5:
        return v / (1.0 + math.exp(-v))
    if code == 6:
        return 0.5 * v * (1.0 + math.erf(v * 0.7071067811865476))
    return v


@_jit(inline=True)
def _dact(u, code):
    """g'(u) for the activation `code`."""
    v = float(u)
    if code == 1:
        return 1.0 if v > 0.0 else 0.0
    if code == 2:
        return 1.0 if v > 0.0 else activations.LEAKY_SLOPE
    if code == 3:
        sg = 1.0 / (1.0 + math.exp(-v))
        return sg * (1.0 - sg)
    if code == 4:
        th = math.tanh(v)
        return 1.0 - th * th
    if code == 5:
        sg = 1.0 / (1.0 + math.exp(-v))
        return sg * (1.0 + v * (1.0 - sg))
    if code == 6:
        cdf = 0.5 * (1.0 + math.erf(v * 0.7071067811865476))
        return cdf + v * math.exp(-0.5 * v * v) * 0.3989422804014327
    return 1.0


@_jit(inline=True)
def _activate_block(u, n, code):
    """u[:n] <- g(u[:n]) in place; the activation is chosen once per block, so the identity
    and ReLU loops vectorize (the others call exp/tanh/erf per value)."""
    if code == 1:
        zero = u.dtype.type(0)
        for j in range(n):
            v = u[j]
            u[j] = v if not v <= zero else zero  # NaN stays NaN
    elif code != 0:
        for j in range(n):
            u[j] = _act(u[j], code)


@_jit(inline=True)
def _slope_block(u, g, n, code):
    """g[:n] <- g[:n] g'(u[:n]) in place (d = dy g'(u)), chosen once per block."""
    if code == 1:
        zero = g.dtype.type(0)
        for j in range(n):
            g[j] = g[j] if u[j] > zero else zero
    elif code != 0:
        for j in range(n):
            g[j] = g[j] * _dact(u[j], code)


@_jit(inline=True)
def _lanes_add(acc, acc2, p, q, lo, n, shift, square):
    """acc[j] += p[lo + i] - shift, acc2[j] += (that)^2 if `square` else q[lo + i], j = i mod _LANES.

    Sums kept as _LANES independent partial sums (vertical adds, so they vectorize without
    fastmath and their order is fixed); `_lanes_total` folds them at the end.
    """
    for i0 in range(0, n, _LANES):
        w = min(_LANES, n - i0)
        if square:
            for j in range(w):
                t = p[lo + i0 + j] - shift
                acc[j] += t
                acc2[j] += t * t
        else:
            for j in range(w):
                acc[j] += p[lo + i0 + j]
                acc2[j] += q[lo + i0 + j]


@_jit(inline=True)
def _lanes_total(acc):
    """sum(acc) in a fixed pairwise order, and acc reset to zero."""
    width = _LANES
    while width > 1:
        width //= 2
        for j in range(width):
            acc[j] += acc[j + width]
    total = acc[0]
    acc[:] = 0
    return total


# (N, C, L) -----------------------------------------------------------------------------
@_jit(inline=True)
def _ncl_channel_stats(x, c):
    """(s, d, m2) of channel c: s = x[0, c, 0], d = mean(x - s), m2 = sum (x - s - d)^2.

    The channel is cut into blocks of about _BLOCK values (a piece of a long row, or whole
    short rows); each block's (mean, m2) comes from sums of t = x - x_first_of_block in one
    pass, and the blocks are merged with Chan's formula in order, in shifted coordinates.
    """
    n_rows, _, length = x.shape
    f = x.dtype.type
    s = x[0, c, 0]
    count = 0.0
    mean = f(0)
    m2 = f(0)
    rows_per = max(1, _BLOCK // length)
    acc = np.zeros(_LANES, x.dtype)
    acc2 = np.zeros(_LANES, x.dtype)
    for n0 in range(0, n_rows, rows_per):
        n1 = min(n_rows, n0 + rows_per)
        for lo in range(0, length, _BLOCK):
            nb = min(_BLOCK, length - lo)
            sh = x[n0, c, lo]
            for n in range(n0, n1):
                row = x[n, c]
                _lanes_add(acc, acc2, row, row, lo, nb, sh, True)
            bs, bq = _lanes_total(acc), _lanes_total(acc2)
            size = nb * (n1 - n0)
            bmean = bs / f(size)
            bm2 = max(bq - bs * bmean, f(0))  # sums of x - sh: sh is a value of the block
            total = count + size
            delta = (sh - s) + bmean - mean
            mean += delta * f(size / total)
            m2 += bm2 + delta * delta * f(count * size / total)
            count = total
    return s, mean, m2


@_jit(parallel=True)
def _ncl_forward(x, res, has_res, code, train, write, gamma, beta, eps, s, d, m2, invstd, a, b, y):
    """Per channel: statistics when `train` (into s, d, m2, invstd, a = gamma invstd, b = beta),
    then, when `write`, y = g(((x - s) - d) a + b + res)."""
    n_rows, channels, length = x.shape
    f = x.dtype.type
    for c in _prange(channels):
        if train:
            sc, dc, m2c = _ncl_channel_stats(x, c)
            inv = f(1.0 / math.sqrt(m2c / (n_rows * length) + eps))
            s[c], d[c], m2[c], invstd[c] = sc, dc, m2c, inv
            a[c], b[c] = gamma[c] * inv, beta[c]
        if write:
            sc, dc, ac, bc = s[c], d[c], a[c], b[c]
            for n in range(n_rows):
                xr, yr, rr = x[n, c], y[n, c], res[n, c]
                for j in range(length):
                    yr[j] = ((xr[j] - sc) - dc) * ac + bc
                if has_res:
                    for j in range(length):
                        yr[j] += rr[j]
                _activate_block(yr, length, code)


@_jit(inline=True)
def _ncl_grad_block(xr, dyr, rr, has_res, lo, nb, code, sc, dc, ac, bc, ubuf, gbuf):
    """gbuf[:nb] = d = dy g'(u) for xr[lo:lo + nb], u = ((x - s) - d) a + b (+ res)."""
    for j in range(nb):
        ubuf[j] = ((xr[lo + j] - sc) - dc) * ac + bc
        gbuf[j] = dyr[lo + j]
    if has_res:
        for j in range(nb):
            ubuf[j] += rr[lo + j]
    _slope_block(ubuf, gbuf, nb, code)


@_jit(parallel=True)
def _ncl_backward(
    dy, x, res, has_res, code, s, d, invstd, a, b, reduce, write, batch_stats,
    sum_d, sum_dxh, mean_d, mean_dxh, dx, dres,
):  # fmt: skip
    """Per channel: when `reduce`, sum_d = sum g, sum_dxh = sum g xhat (and, with
    `batch_stats`, mean_d, mean_dxh = those / n); then, when `write`,
    dx = a (g - mean_d - xhat mean_dxh) and dres = g; g = dy g'(u), xhat = ((x - s) - d) invstd."""
    n_rows, channels, length = x.shape
    f = x.dtype.type
    for c in _prange(channels):
        sc, dc, ic, ac, bc = s[c], d[c], invstd[c], a[c], b[c]
        ubuf = np.empty(_BLOCK, x.dtype)
        gbuf = np.empty(_BLOCK, x.dtype)
        if reduce:
            acc = np.zeros(_LANES, x.dtype)
            acc2 = np.zeros(_LANES, x.dtype)
            for n in range(n_rows):
                xr, dyr, rr = x[n, c], dy[n, c], res[n, c]
                for lo in range(0, length, _BLOCK):
                    nb = min(_BLOCK, length - lo)
                    _ncl_grad_block(xr, dyr, rr, has_res, lo, nb, code, sc, dc, ac, bc, ubuf, gbuf)
                    for j in range(nb):
                        ubuf[j] = gbuf[j] * (((xr[lo + j] - sc) - dc) * ic)
                    _lanes_add(acc, acc2, gbuf, ubuf, 0, nb, f(0), False)
            sd, sdx = _lanes_total(acc), _lanes_total(acc2)
            sum_d[c], sum_dxh[c] = sd, sdx
            if batch_stats:
                mean_d[c] = sd / f(n_rows * length)
                mean_dxh[c] = sdx / f(n_rows * length)
        if write:
            md, mdx = mean_d[c], mean_dxh[c]
            for n in range(n_rows):
                xr, dyr, rr, dxr, drr = x[n, c], dy[n, c], res[n, c], dx[n, c], dres[n, c]
                for lo in range(0, length, _BLOCK):
                    nb = min(_BLOCK, length - lo)
                    _ncl_grad_block(xr, dyr, rr, has_res, lo, nb, code, sc, dc, ac, bc, ubuf, gbuf)
                    for j in range(nb):
                        dxr[lo + j] = ac * (gbuf[j] - md - (((xr[lo + j] - sc) - dc) * ic) * mdx)
                    if has_res:
                        for j in range(nb):
                            drr[lo + j] = gbuf[j]


# (M, C) --------------------------------------------------------------------------------
@_jit(inline=True)
def _mc_blocks(rows, channels):
    """(rows per block, number of blocks): a partition fixed by the shape alone."""
    per = max(1, _MC_BLOCK // channels)
    return per, (rows + per - 1) // per


@_jit(parallel=True)
def _mc_forward(x, res, has_res, code, train, write, gamma, beta, eps, s, d, m2, invstd, a, b, y):
    """`_ncl_forward` for (M, C): per-block (mean of x - s, m2) in parallel, merged in block order."""
    rows, channels = x.shape
    f = x.dtype.type
    per, blocks = _mc_blocks(rows, channels)
    if train:
        for c in range(channels):
            s[c] = x[0, c]
        bmean = np.zeros((blocks, channels), x.dtype)
        bm2 = np.zeros((blocks, channels), x.dtype)
        for k in _prange(blocks):
            lo, hi = k * per, min(rows, (k + 1) * per)
            mk, qk = bmean[k], bm2[k]
            for m in range(lo, hi):
                for c in range(channels):
                    mk[c] += x[m, c] - s[c]
            for c in range(channels):
                mk[c] /= f(hi - lo)
            for m in range(lo, hi):
                for c in range(channels):
                    t = (x[m, c] - s[c]) - mk[c]
                    qk[c] += t * t
        count = 0.0
        d[:] = 0
        m2[:] = 0
        for k in range(blocks):
            nb = min(rows, (k + 1) * per) - k * per
            total = count + nb
            w_mean, w_m2 = f(nb / total), f(count * nb / total)
            for c in range(channels):
                delta = bmean[k, c] - d[c]
                d[c] += delta * w_mean
                m2[c] += bm2[k, c] + delta * delta * w_m2
            count = total
        for c in range(channels):
            inv = f(1.0 / math.sqrt(m2[c] / rows + eps))
            invstd[c] = inv
            a[c], b[c] = gamma[c] * inv, beta[c]
    if write:
        for k in _prange(blocks):
            for m in range(k * per, min(rows, (k + 1) * per)):
                xr, yr, rr = x[m], y[m], res[m]
                for c in range(channels):
                    yr[c] = ((xr[c] - s[c]) - d[c]) * a[c] + b[c]
                if has_res:
                    for c in range(channels):
                        yr[c] += rr[c]
                _activate_block(yr, channels, code)


@_jit(inline=True)
def _mc_grad_row(xr, dyr, rr, has_res, code, s, d, a, b, ubuf, gbuf):
    """gbuf = d = dy g'(u) for one row of (M, C), u = ((x - s) - d) a + b (+ res)."""
    channels = xr.shape[0]
    for c in range(channels):
        ubuf[c] = ((xr[c] - s[c]) - d[c]) * a[c] + b[c]
        gbuf[c] = dyr[c]
    if has_res:
        for c in range(channels):
            ubuf[c] += rr[c]
    _slope_block(ubuf, gbuf, channels, code)


@_jit(parallel=True)
def _mc_backward(
    dy, x, res, has_res, code, s, d, invstd, a, b, reduce, write, batch_stats,
    sum_d, sum_dxh, mean_d, mean_dxh, dx, dres,
):  # fmt: skip
    """`_ncl_backward` for (M, C): per-block partial sums in parallel, added in block order."""
    rows, channels = x.shape
    f = x.dtype.type
    per, blocks = _mc_blocks(rows, channels)
    if reduce:
        psum = np.zeros((blocks, channels), x.dtype)
        psumx = np.zeros((blocks, channels), x.dtype)
        for k in _prange(blocks):
            pk, qk = psum[k], psumx[k]
            ubuf = np.empty(channels, x.dtype)
            gbuf = np.empty(channels, x.dtype)
            for m in range(k * per, min(rows, (k + 1) * per)):
                xr = x[m]
                _mc_grad_row(xr, dy[m], res[m], has_res, code, s, d, a, b, ubuf, gbuf)
                for c in range(channels):
                    pk[c] += gbuf[c]
                    qk[c] += gbuf[c] * (((xr[c] - s[c]) - d[c]) * invstd[c])
        sum_d[:] = 0
        sum_dxh[:] = 0
        for k in range(blocks):
            for c in range(channels):
                sum_d[c] += psum[k, c]
                sum_dxh[c] += psumx[k, c]
        if batch_stats:
            for c in range(channels):
                mean_d[c] = sum_d[c] / f(rows)
                mean_dxh[c] = sum_dxh[c] / f(rows)
    if write:
        for k in _prange(blocks):
            ubuf = np.empty(channels, x.dtype)
            gbuf = np.empty(channels, x.dtype)
            for m in range(k * per, min(rows, (k + 1) * per)):
                xr, dxr, drr = x[m], dx[m], dres[m]
                _mc_grad_row(xr, dy[m], res[m], has_res, code, s, d, a, b, ubuf, gbuf)
                for c in range(channels):
                    dxr[c] = a[c] * (gbuf[c] - mean_d[c] - (((xr[c] - s[c]) - d[c]) * invstd[c]) * mean_dxh[c])
                if has_res:
                    for c in range(channels):
                        drr[c] = gbuf[c]


# Python side ---------------------------------------------------------------------------
def _np(t: Tensor) -> np.ndarray:
    """A contiguous numpy view (a copy only when `t` is not contiguous)."""
    return t.detach().contiguous().numpy()


def _vec(t: Tensor | None, channels: int, dtype: torch.dtype, fill: float) -> np.ndarray:
    """A per-channel (C,) numpy array in the accumulation dtype; `fill` when t is None."""
    if t is None:
        return np.full(channels, fill, dtype=np.float64 if dtype == torch.float64 else np.float32)
    return _np(t.detach().to(dtype))


def _forward(xv: np.ndarray, rv, code, train, write, gamma, beta, eps, s, d, a, b):
    """Run the forward kernel of xv's view; returns (y or None, m2, invstd) as numpy."""
    channels = xv.shape[1]
    m2, invstd = np.empty(channels, xv.dtype), np.empty(channels, xv.dtype)
    y = np.empty_like(xv) if write else xv  # never written when not `write`
    kernel = _ncl_forward if xv.ndim == 3 else _mc_forward
    kernel(xv, xv if rv is None else rv, rv is not None, code, train, write, gamma, beta, eps,
           s, d, m2, invstd, a, b, y)  # fmt: skip
    return (y if write else None), m2, invstd


def _backward(dyv, xv, rv, code, s, d, invstd, a, b, reduce, write, batch_stats, mean_d, mean_dxh):
    """Run the backward kernel; returns (sum_d, sum_dxh, dx or None, dres or None) as numpy."""
    channels = xv.shape[1]
    sum_d, sum_dxh = np.zeros(channels, xv.dtype), np.zeros(channels, xv.dtype)
    dx = np.empty_like(xv) if write else xv  # never written when not `write`
    dres = np.empty_like(xv) if write and rv is not None else dx
    kernel = _ncl_backward if xv.ndim == 3 else _mc_backward
    kernel(dyv, xv, xv if rv is None else rv, rv is not None, code, s, d, invstd, a, b,
           reduce, write, batch_stats, sum_d, sum_dxh, mean_d, mean_dxh, dx, dres)  # fmt: skip
    return sum_d, sum_dxh, (dx if write else None), (dres if write and rv is not None else None)


class _FusedBatchNorm(torch.autograd.Function):
    """Whole-op batch norm: one forward kernel, one backward kernel (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, running_mean, running_var, eps, activation):
        view = layout.canonical(x)
        xv = _np(view.data)
        rv = None if residual is None else _np(layout.canonical(residual, view.kind).data)
        acc = acc_dtype(x.dtype)
        channels = xv.shape[1]
        gamma, beta = _vec(weight, channels, acc, 1.0), _vec(bias, channels, acc, 0.0)
        code = _ACT_CODE[activation]
        train = running_mean is None
        if train:
            s, d = np.empty_like(gamma), np.empty_like(gamma)
            a, b = np.empty_like(gamma), np.empty_like(gamma)
            y, _, invstd = _forward(xv, rv, code, True, True, gamma, beta, eps, s, d, a, b)
        else:  # evaluation: s = running mean, d = 0
            s, d = _vec(running_mean, channels, acc, 0.0).copy(), np.zeros_like(gamma)
            invstd = _vec(torch.rsqrt(running_var.detach().to(acc) + eps), channels, acc, 0.0)
            a, b = gamma * invstd, beta.copy()
            y = _forward(xv, rv, code, False, True, gamma, beta, eps, s, d, a, b)[0]
        params = [torch.from_numpy(p) for p in (s, d, invstd, a, b)]
        ctx.save_for_backward(x, weight, bias, residual, running_mean, running_var, *params)
        ctx.kind, ctx.eps, ctx.activation, ctx.train = view.kind, eps, activation, train
        mean = torch.from_numpy(s + d)
        ctx.mark_non_differentiable(params[2], mean)
        return layout.restore(torch.from_numpy(y), x, view.kind), mean, params[2]

    @staticmethod
    def backward(ctx, dy, _dmean, _dinvstd):
        x, weight, bias, residual, running_mean, running_var, *params = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiable ops for double backward
            return _aten_grads(ctx, dy, x, weight, bias, residual, running_mean, running_var)
        kind = ctx.kind
        need_x, need_w, need_b, need_r = ctx.needs_input_grad[:4]
        xv = _np(layout.canonical(x, kind).data)
        dyv = _np(layout.canonical(dy, kind).data)
        rv = None if residual is None else _np(layout.canonical(residual, kind).data)
        s, d, invstd, a, b = (p.numpy() for p in params)
        zeros = np.zeros_like(s)
        mean_d, mean_dxh = (np.empty_like(s), np.empty_like(s)) if ctx.train else (zeros, zeros)
        write = need_x or need_r
        reduce = need_w or need_b or (ctx.train and write)
        sum_d, sum_dxh, dxv, dresv = _backward(
            dyv, xv, rv, _ACT_CODE[ctx.activation], s, d, invstd, a, b,
            reduce, write, ctx.train, mean_d, mean_dxh,
        )  # fmt: skip
        dx = layout.restore(torch.from_numpy(dxv), x, kind) if need_x else None
        dres = layout.restore(torch.from_numpy(dresv), residual, kind) if need_r else None
        dweight = torch.from_numpy(sum_dxh).to(weight.dtype) if need_w else None
        dbias = torch.from_numpy(sum_d).to(bias.dtype) if need_b else None
        return dx, dweight, dbias, dres, None, None, None, None


def _aten_grads(ctx, dy, x, weight, bias, residual, running_mean, running_var):
    """The gradients through torch's own differentiable batch norm (for create_graph=True)."""
    inputs = (x, weight, bias, residual)
    wanted = [t for t, need in zip(inputs, ctx.needs_input_grad[:4]) if need]
    y = AtenBackend.normalize(
        x, weight, bias, running_mean, running_var, ctx.eps, ctx.activation, residual
    )[0]
    grads = iter(torch.autograd.grad(y, wanted, dy, create_graph=True, allow_unused=True))
    out = [next(grads) if need else None for need in ctx.needs_input_grad[:4]]
    return (*out, None, None, None, None)


class NumbaBackend(Backend):
    """Fused numba kernels on CPU for contiguous fp32/fp64 views; aten takes everything else."""

    name = "numba"

    def unavailable(self) -> str | None:
        return _MISSING

    def unsupported(self, x: Tensor) -> str | None:
        if x.device.type != "cpu":
            return f"numba runs on the CPU only, the input is on {x.device}"
        if x.dtype not in _DTYPES:
            return f"numba kernels take float32 and float64, the input is {x.dtype}"
        if x.numel() == 0:
            return "the input is empty"
        kind = layout.kind_of(x)
        if kind is None or not layout.canonical(x, kind).data.is_contiguous():
            return "the input is neither contiguous nor channels-last (a strided view)"
        return None

    def preferred(self, x: Tensor) -> bool:
        return x.numel() >= CROSSOVER_NUMEL

    @staticmethod
    def normalize(x, weight, bias, running_mean, running_var, eps, activation, residual):
        """Whole-op batch norm (base.py): (y, mean, invstd), or (y, None, None) with running stats."""
        y, mean, invstd = _FusedBatchNorm.apply(
            x, weight, bias, residual, running_mean, running_var, eps, activation
        )
        return (y, mean, invstd) if running_mean is None else (y, None, None)

    # The kernel contract (base.py) ----------------------------------------------------
    def stats(self, x):
        xv = _np(x)
        channels = xv.shape[1]
        s, d, a, b = (np.empty(channels, xv.dtype) for _ in range(4))
        ones, zeros = np.ones_like(s), np.zeros_like(s)
        _, m2, _ = _forward(xv, None, 0, True, False, ones, zeros, 0.0, s, d, a, b)
        mean = torch.from_numpy(s + d)
        return torch.full_like(mean, layout.values_per_channel(x)), mean, torch.from_numpy(m2)

    def apply(self, x, mean, scale, shift, activation=None, residual=None):
        xv = _np(x)
        zeros = np.zeros(xv.shape[1], xv.dtype)
        rv = None if residual is None else _np(residual)
        y = _forward(xv, rv, _ACT_CODE[activation], False, True, zeros, zeros, 0.0,
                     _np(mean), zeros, _np(scale), _np(shift))[0]  # fmt: skip
        return torch.from_numpy(y)

    def backward_reduce(self, dy, x, mean, invstd, scale, shift, activation=None, residual=None):
        zeros = np.zeros(x.shape[1], _np(mean).dtype)
        sum_d, sum_dxh, _, _ = _backward(
            _np(dy), _np(x), None if residual is None else _np(residual), _ACT_CODE[activation],
            _np(mean), zeros, _np(invstd), _np(scale), _np(shift), True, False, False, zeros, zeros,
        )  # fmt: skip
        return torch.from_numpy(sum_d), torch.from_numpy(sum_dxh)

    def backward_apply(
        self, dy, x, mean, invstd, scale, shift, mean_d, mean_d_xhat, activation=None, residual=None
    ):
        zeros = np.zeros(x.shape[1], _np(mean).dtype)
        _, _, dx, dres = _backward(
            _np(dy), _np(x), None if residual is None else _np(residual), _ACT_CODE[activation],
            _np(mean), zeros, _np(invstd), _np(scale), _np(shift), False, True, False,
            _np(mean_d), _np(mean_d_xhat),
        )  # fmt: skip
        return torch.from_numpy(dx), None if dres is None else torch.from_numpy(dres)
