"""The Triton kernels of the `triton` backend (the glue that launches them is triton_gpu.py).

Every kernel sees its tensor as a strided `(N, C, L)` array, which covers both canonical
views: `(N, C, L)` channels-first has strides `(C L, L, 1)`, and `(M, C)` channels-last is
taken as `N = 1, L = M` with strides `(0, 1, C)`. Triton specializes an integer argument
equal to 1, so whichever stride is 1 becomes a compile-time constant and the loads are
coalesced along that axis.

The work is cut into tiles of `BLOCK_C` channels x `BLOCK_L` positions of one n; tile t of
a channel block covers n = t // LB, positions (t % LB) BLOCK_L ..., with LB = cdiv(L,
BLOCK_L), so a channel block has T = N LB tiles. The grid is (channel blocks, P) and
program p walks tiles [p TILES, (p + 1) TILES): never one program per channel, so a small
C or a large L still fills the machine.

Reductions write one partial per program and channel to an fp32 (fp64) workspace `(P, C)`
and a second small kernel merges the P partials in a fixed order: no atomics, the same
input gives bitwise the same result.

    stats:     per tile, mean_t = sum x / n_t and m2_t = sum (x - mean_t)^2 (two passes over
               registers), folded into the program's running (n, mean, m2) with Chan's
               formula; merged over programs as stats.merge_stacked does:
               n = sum n_k, mu = sum n_k mu_k / n, m2 = sum m2_k + sum n_k (mu_k - mu)^2
    gradients: per program sum d and sum d xhat; merged by a fixed-order sum.

The elementwise kernels (apply, backward apply) walk the tiles in the reverse order of the
reductions, so the first tiles they re-read are the last ones the reduction read, the
ones most likely still in L2.

Activation codes are positions in `activations.NAMES`:
0 none, 1 relu, 2 leaky_relu, 3 sigmoid, 4 tanh, 5 silu, 6 gelu (exact, erf).
All arithmetic is in the accumulation dtype, read from the workspace or per-channel
pointer's element type (fp32, fp64 for fp64 input).
"""

from __future__ import annotations

import triton
import triton.language as tl

_INV_SQRT2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


@triton.jit
def _tile(t, cb, LB, C, L, s_n, s_c, s_l, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """Offsets and mask ([BLOCK_C, BLOCK_L]) of tile t of channel block cb, and its length."""
    n = t // LB
    l0 = (t - n * LB) * BLOCK_L
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    pos = l0 + tl.arange(0, BLOCK_L)
    # 64-bit offsets: a channels-last (M, C) view reaches M C, beyond 2^31 on large tensors.
    offs = (
        n.to(tl.int64) * s_n
        + c[:, None].to(tl.int64) * s_c
        + pos[None, :].to(tl.int64) * s_l
    )
    mask = (c[:, None] < C) & (pos[None, :] < L)
    return offs, mask, tl.minimum(L - l0, BLOCK_L)


@triton.jit
def _activation(u, ACT: tl.constexpr, LEAKY: tl.constexpr):
    """g(u) for the activation code ACT."""
    y = u
    if ACT == 1:
        y = tl.where(u > 0, u, 0.0)
    elif ACT == 2:
        y = tl.where(u > 0, u, u * LEAKY)
    elif ACT == 3:
        y = tl.sigmoid(u)
    elif ACT == 4:
        y = 2.0 * tl.sigmoid(2.0 * u) - 1.0  # tanh, from the long-stable sigmoid
    elif ACT == 5:
        y = u * tl.sigmoid(u)
    elif ACT == 6:
        y = 0.5 * u * (1.0 + tl.erf(u * _INV_SQRT2))
    return y


@triton.jit
def _activation_slope(u, ACT: tl.constexpr, LEAKY: tl.constexpr):
    """g'(u) for ACT > 0 (the caller skips the multiply for ACT == 0)."""
    if ACT == 1:
        slope = tl.where(u > 0, 1.0, 0.0)
    elif ACT == 2:
        # the slope as a constant of u's dtype (a bare literal would be rounded to fp32)
        slope = tl.where(u > 0, 1.0, tl.full(u.shape, LEAKY, u.dtype))
    elif ACT == 3:
        s = tl.sigmoid(u)
        slope = s * (1.0 - s)
    elif ACT == 4:
        th = 2.0 * tl.sigmoid(2.0 * u) - 1.0
        slope = 1.0 - th * th
    elif ACT == 5:
        s = tl.sigmoid(u)
        slope = s * (1.0 + u * (1.0 - s))
    else:
        cdf = 0.5 * (1.0 + tl.erf(u * _INV_SQRT2))
        slope = cdf + u * tl.exp(-0.5 * u * u) * _INV_SQRT_2PI
    return slope


@triton.jit
def _centered_and_d(dy_ptr, x_ptr, res_ptr, offs, mask, mean, scale, shift,
                    HAS_RES: tl.constexpr, ACT: tl.constexpr, LEAKY: tl.constexpr):
    """(x - mean, d) of one tile: d = dy g'(u), u = (x - mean) scale + shift (+ residual)."""
    acc = scale.dtype
    centered = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc) - mean
    d = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(acc)
    if ACT != 0:
        u = centered * scale + shift
        if HAS_RES:
            u += tl.load(res_ptr + offs, mask=mask, other=0.0).to(acc)
        d = d * _activation_slope(u, ACT, LEAKY)
    return centered, d


@triton.jit
def stats_partials_kernel(
    x_ptr, count_ptr, mean_ptr, m2_ptr,
    C, L, LB, T, s_n, s_c, s_l, TILES,
    BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """Workspace row p = (count, mean, m2) per channel over program p's tiles; each (P, C)."""
    acc = mean_ptr.dtype.element_ty
    cb = tl.program_id(0)
    p = tl.program_id(1)
    t0 = p * TILES
    t1 = tl.minimum(t0 + TILES, T)
    n = tl.zeros([BLOCK_C], acc)
    mean = tl.zeros([BLOCK_C], acc)
    m2 = tl.zeros([BLOCK_C], acc)
    for t in range(t0, t1):
        offs, mask, length = _tile(t, cb, LB, C, L, s_n, s_c, s_l, BLOCK_C, BLOCK_L)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc)
        n_t = length.to(acc)
        mean_t = tl.sum(x, axis=1) / n_t
        dev = tl.where(mask, x - mean_t[:, None], 0.0)
        m2_t = tl.sum(dev * dev, axis=1)
        # Chan's merge of (n, mean, m2) with the tile's (n_t, mean_t, m2_t).
        total = n + n_t
        delta = mean_t - mean
        mean += delta * (n_t / total)
        m2 += m2_t + delta * delta * (n * n_t / total)
        n = total
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    row = p * C + c
    tl.store(count_ptr + row, n, mask=c < C)
    tl.store(mean_ptr + row, mean, mask=c < C)
    tl.store(m2_ptr + row, m2, mask=c < C)


@triton.jit
def merge_stats_kernel(
    count_ptr, mean_ptr, m2_ptr, count_out, mean_out, m2_out,
    C, P,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Merge the (P, C) partials into (C,) statistics, partials taken in order 0..P-1.

    Two passes over the partials: the mean first, then m2 around it (exact and stable).
    """
    acc = mean_ptr.dtype.element_ty
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    n = tl.zeros([BLOCK_C], acc)
    weighted = tl.zeros([BLOCK_C], acc)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        offs = p[:, None] * C + c[None, :]
        mask = (p[:, None] < P) & (c[None, :] < C)
        n_k = tl.load(count_ptr + offs, mask=mask, other=0.0)
        n += tl.sum(n_k, axis=0)
        weighted += tl.sum(n_k * tl.load(mean_ptr + offs, mask=mask, other=0.0), axis=0)
    mu = weighted / tl.where(n > 0, n, 1.0)
    m2 = tl.zeros([BLOCK_C], acc)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        offs = p[:, None] * C + c[None, :]
        mask = (p[:, None] < P) & (c[None, :] < C)
        n_k = tl.load(count_ptr + offs, mask=mask, other=0.0)
        dev = tl.load(mean_ptr + offs, mask=mask, other=0.0) - mu[None, :]
        m2 += tl.sum(tl.load(m2_ptr + offs, mask=mask, other=0.0) + n_k * dev * dev, axis=0)
    tl.store(count_out + c, n, mask=c < C)
    tl.store(mean_out + c, mu, mask=c < C)
    tl.store(m2_out + c, m2, mask=c < C)


@triton.jit
def grad_partials_kernel(
    dy_ptr, x_ptr, res_ptr, mean_ptr, invstd_ptr, scale_ptr, shift_ptr, ws_ptr,
    C, L, LB, T, s_n, s_c, s_l, TILES, P,
    HAS_RES: tl.constexpr, ACT: tl.constexpr, LEAKY: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """Workspace (2, P, C): [0, p] = sum d, [1, p] = sum d xhat over program p's tiles."""
    cb = tl.program_id(0)
    p = tl.program_id(1)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    mean = tl.load(mean_ptr + c, mask=cmask, other=0.0)[:, None]
    scale = tl.load(scale_ptr + c, mask=cmask, other=0.0)[:, None]
    shift = tl.load(shift_ptr + c, mask=cmask, other=0.0)[:, None]
    acc = scale.dtype
    sum_d = tl.zeros([BLOCK_C], acc)
    sum_d_xhat = tl.zeros([BLOCK_C], acc)
    t0 = p * TILES
    for t in range(t0, tl.minimum(t0 + TILES, T)):
        offs, mask, _ = _tile(t, cb, LB, C, L, s_n, s_c, s_l, BLOCK_C, BLOCK_L)
        centered, d = _centered_and_d(dy_ptr, x_ptr, res_ptr, offs, mask, mean, scale, shift, HAS_RES, ACT, LEAKY)
        sum_d += tl.sum(d, axis=1)  # masked lanes loaded dy = 0, so d = 0 there
        sum_d_xhat += tl.sum(d * centered, axis=1)
    # xhat = (x - mean) invstd: invstd is constant per channel, so it multiplies the sum once.
    invstd = tl.load(invstd_ptr + c, mask=cmask, other=0.0)
    tl.store(ws_ptr + p * C + c, sum_d, mask=cmask)
    tl.store(ws_ptr + (P + p) * C + c, sum_d_xhat * invstd, mask=cmask)


@triton.jit
def merge_sums_kernel(ws_ptr, out_ptr, C, P, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """out[r] = sum over p = 0..P-1 of ws[r, p], for the row r = program_id(1) of (R, P, C)."""
    acc = ws_ptr.dtype.element_ty
    r = tl.program_id(1)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    total = tl.zeros([BLOCK_C], acc)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = (p[:, None] < P) & (c[None, :] < C)
        total += tl.sum(tl.load(ws_ptr + (r * P + p[:, None]) * C + c[None, :], mask=mask, other=0.0), axis=0)
    tl.store(out_ptr + r * C + c, total, mask=c < C)


@triton.jit
def apply_kernel(
    x_ptr, res_ptr, mean_ptr, scale_ptr, shift_ptr, y_ptr,
    C, L, LB, T, s_n, s_c, s_l, TILES,
    HAS_RES: tl.constexpr, ACT: tl.constexpr, LEAKY: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """y = g((x - mean) scale + shift (+ residual)), stored in y's dtype; tiles in reverse order."""
    cb = tl.num_programs(0) - 1 - tl.program_id(0)
    p = tl.num_programs(1) - 1 - tl.program_id(1)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    mean = tl.load(mean_ptr + c, mask=c < C, other=0.0)[:, None]
    scale = tl.load(scale_ptr + c, mask=c < C, other=0.0)[:, None]
    shift = tl.load(shift_ptr + c, mask=c < C, other=0.0)[:, None]
    acc = scale.dtype
    t0 = p * TILES
    t1 = tl.minimum(t0 + TILES, T)
    for i in range(t0, t1):
        offs, mask, _ = _tile(t0 + t1 - 1 - i, cb, LB, C, L, s_n, s_c, s_l, BLOCK_C, BLOCK_L)
        u = (tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc) - mean) * scale + shift
        if HAS_RES:
            u += tl.load(res_ptr + offs, mask=mask, other=0.0).to(acc)
        y = _activation(u, ACT, LEAKY)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def backward_apply_kernel(
    dy_ptr, x_ptr, res_ptr, mean_ptr, invstd_ptr, scale_ptr, shift_ptr, mean_d_ptr, mean_dx_ptr,
    dx_ptr, dres_ptr,
    C, L, LB, T, s_n, s_c, s_l, TILES,
    HAS_RES: tl.constexpr, ACT: tl.constexpr, LEAKY: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """dx = scale (d - mean_d - xhat mean_d_xhat) and dresidual = d; tiles in reverse order."""
    cb = tl.num_programs(0) - 1 - tl.program_id(0)
    p = tl.num_programs(1) - 1 - tl.program_id(1)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    mean = tl.load(mean_ptr + c, mask=cmask, other=0.0)[:, None]
    invstd = tl.load(invstd_ptr + c, mask=cmask, other=0.0)[:, None]
    scale = tl.load(scale_ptr + c, mask=cmask, other=0.0)[:, None]
    shift = tl.load(shift_ptr + c, mask=cmask, other=0.0)[:, None]
    mean_d = tl.load(mean_d_ptr + c, mask=cmask, other=0.0)[:, None]
    mean_d_xhat = tl.load(mean_dx_ptr + c, mask=cmask, other=0.0)[:, None]
    t0 = p * TILES
    t1 = tl.minimum(t0 + TILES, T)
    for i in range(t0, t1):
        offs, mask, _ = _tile(t0 + t1 - 1 - i, cb, LB, C, L, s_n, s_c, s_l, BLOCK_C, BLOCK_L)
        centered, d = _centered_and_d(dy_ptr, x_ptr, res_ptr, offs, mask, mean, scale, shift, HAS_RES, ACT, LEAKY)
        dx = scale * (d - mean_d - centered * invstd * mean_d_xhat)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if HAS_RES:
            tl.store(dres_ptr + offs, d.to(dres_ptr.dtype.element_ty), mask=mask)
