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

The whole op adds no pass of its own: the merge kernels optionally finalize (merge_stats:
invstd = 1 / sqrt(var + eps), scale = gamma invstd, shift = beta; merge_sums: dgamma, dbeta,
mean_d, mean_d_xhat), and the single-read kernels do a whole channel block's reduction and
elementwise work on one load of x (and dy), for channel blocks whose N L values fit in
registers: positions r = n L + l of `_column`. No kernel touches the running statistics
but to read them in evaluation: the op layer updates them (ops.update_running_stats).

The elementwise kernels (apply, backward apply) walk the tiles in the reverse order of the
reductions, so the first tiles they re-read are the last ones the reduction read, the
ones most likely still in L2.

Activation codes are positions in `activations.NAMES`:
0 none, 1 relu, 2 leaky_relu, 3 sigmoid, 4 tanh, 5 silu, 6 gelu (exact, erf), 7 relu6,
8 hardswish.
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
    elif ACT == 7:
        y = _relu6(u)
    elif ACT == 8:
        y = u * _relu6(u + 3.0) / 6.0
    return y


@triton.jit
def _relu6(u):
    """min(max(u, 0), 6), NaN kept (both tests are false for it, as in torch's clamp)."""
    return tl.where(u <= 0, 0.0, tl.where(u >= 6, 6.0, u))


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
    elif ACT == 7:
        # torch's slopes at the breakpoints (activations.py): 0 at u = 0 and u = 6
        slope = tl.where((u > 0) & (u < 6), 1.0, 0.0)
    elif ACT == 8:
        # 0 at u = -3, 1 at u = 3 (torch's hardswish_backward)
        slope = tl.where(u <= -3, 0.0, tl.where(u < 3, u / 3.0 + 0.5, 1.0))
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
def _store_grads(dx_ptr, dres_ptr, offs, mask, centered, d, invstd, scale, mean_d, mean_d_xhat,
                 HAS_RES: tl.constexpr):
    """Store dx = scale (d - mean_d - xhat mean_d_xhat) and dresidual = d of one tile."""
    dx = scale * (d - mean_d - centered * invstd * mean_d_xhat)
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if HAS_RES:
        tl.store(dres_ptr + offs, d.to(dres_ptr.dtype.element_ty), mask=mask)


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
def _scalar(hi, lo, acc: tl.constexpr):
    """hi + lo in the accumulation dtype: Triton passes Python floats as fp32, so a float
    reaches an fp64 kernel as the pair (fp32(v), fp32(v - fp32(v))) (triton_gpu._split)."""
    return tl.zeros([], acc) + hi + lo  # added to an acc zero: computed in acc, fp32 scalar or not


@triton.jit
def _finalize_stats(
    c, cmask, mean, var, w_ptr, b_ptr, mean_out, invstd_out, scale_out, shift_out, eps_hi, eps_lo,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr,
):
    """From a channel block's (mean, var): invstd = 1 / sqrt(var + eps), scale = gamma invstd,
    shift = beta, stored with the mean. Returns (invstd, scale, shift), each [BLOCK_C]."""
    invstd, scale, shift = _normalizer(c, cmask, var, w_ptr, b_ptr, eps_hi, eps_lo, HAS_W, HAS_B)
    tl.store(mean_out + c, mean, mask=cmask)
    tl.store(invstd_out + c, invstd, mask=cmask)
    tl.store(scale_out + c, scale, mask=cmask)
    tl.store(shift_out + c, shift, mask=cmask)
    return invstd, scale, shift


@triton.jit
def _normalizer(c, cmask, var, w_ptr, b_ptr, eps_hi, eps_lo, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """(invstd, scale, shift), each [BLOCK_C], of a channel block's biased variance."""
    acc = var.dtype
    invstd = 1.0 / tl.sqrt(var + _scalar(eps_hi, eps_lo, acc))
    scale = invstd
    if HAS_W:
        scale = invstd * tl.load(w_ptr + c, mask=cmask, other=0.0).to(acc)
    shift = tl.zeros(var.shape, acc)
    if HAS_B:
        shift = tl.load(b_ptr + c, mask=cmask, other=0.0).to(acc)
    return invstd, scale, shift


@triton.jit
def merge_stats_kernel(
    count_ptr, mean_ptr, m2_ptr, count_out, mean_out, m2_out,
    w_ptr, b_ptr, rm_ptr, rv_ptr, invstd_out, scale_out, shift_out,
    C, P, eps_hi, eps_lo,
    FINALIZE: tl.constexpr, RUNNING: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Merge the (P, C) partials into (C,) statistics, partials taken in order 0..P-1.

    Two passes over the partials: the mean first, then m2 around it (exact and stable).
    Writes (count, mean, m2). With FINALIZE, also the normalization's per-channel vectors
    (`_finalize_stats`: mean, invstd, scale, shift), so that the forward needs no torch op
    between its launches. With RUNNING (evaluation) there are no partials: mean and var are
    the running statistics, and only the vectors are written.
    """
    acc = mean_out.dtype.element_ty
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    if RUNNING:
        mu = tl.load(rm_ptr + c, mask=cmask, other=0.0).to(acc)
        var = tl.load(rv_ptr + c, mask=cmask, other=0.0).to(acc)
        _finalize_stats(
            c, cmask, mu, var, w_ptr, b_ptr, mean_out, invstd_out, scale_out, shift_out, eps_hi, eps_lo,
            HAS_W, HAS_B,
        )
    else:
        n = tl.zeros([BLOCK_C], acc)
        weighted = tl.zeros([BLOCK_C], acc)
        for p0 in range(0, P, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            offs = p[:, None] * C + c[None, :]
            mask = (p[:, None] < P) & cmask[None, :]
            n_k = tl.load(count_ptr + offs, mask=mask, other=0.0)
            n += tl.sum(n_k, axis=0)
            weighted += tl.sum(n_k * tl.load(mean_ptr + offs, mask=mask, other=0.0), axis=0)
        mu = weighted / tl.where(n > 0, n, 1.0)
        m2 = tl.zeros([BLOCK_C], acc)
        for p0 in range(0, P, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            offs = p[:, None] * C + c[None, :]
            mask = (p[:, None] < P) & cmask[None, :]
            n_k = tl.load(count_ptr + offs, mask=mask, other=0.0)
            dev = tl.load(mean_ptr + offs, mask=mask, other=0.0) - mu[None, :]
            m2 += tl.sum(tl.load(m2_ptr + offs, mask=mask, other=0.0) + n_k * dev * dev, axis=0)
        tl.store(count_out + c, n, mask=cmask)
        tl.store(mean_out + c, mu, mask=cmask)
        tl.store(m2_out + c, m2, mask=cmask)
        if FINALIZE:
            n = tl.where(cmask, n, 2.0)  # lanes past C: not 0 / 0 (numpy would warn in the interpreter)
            _finalize_stats(
                c, cmask, mu, m2 / n, w_ptr, b_ptr, mean_out, invstd_out, scale_out, shift_out,
                eps_hi, eps_lo, HAS_W, HAS_B,
            )


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
def _sum_rows(ws_ptr, r, c, C, P, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """The sum over p = 0..P-1, in that order of blocks, of row r of a (R, P, C) workspace."""
    total = tl.zeros([BLOCK_C], ws_ptr.dtype.element_ty)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = (p[:, None] < P) & (c[None, :] < C)
        total += tl.sum(tl.load(ws_ptr + (r * P + p[:, None]) * C + c[None, :], mask=mask, other=0.0), axis=0)
    return total


@triton.jit
def _finalize_grads(
    c, cmask, sum_d, sum_d_xhat, count, dw_ptr, db_ptr,
    TRAIN: tl.constexpr, HAS_DW: tl.constexpr, HAS_DB: tl.constexpr,
):
    """Store dgamma = sum d xhat and dbeta = sum d (in their pointers' dtypes) and return
    (mean_d, mean_d_xhat): the sums / count in training, zeros in evaluation."""
    if HAS_DW:
        tl.store(dw_ptr + c, sum_d_xhat.to(dw_ptr.dtype.element_ty), mask=cmask)
    if HAS_DB:
        tl.store(db_ptr + c, sum_d.to(db_ptr.dtype.element_ty), mask=cmask)
    mean_d = tl.zeros_like(sum_d)
    mean_d_xhat = tl.zeros_like(sum_d)
    if TRAIN:
        mean_d = sum_d / count
        mean_d_xhat = sum_d_xhat / count
    return mean_d, mean_d_xhat


@triton.jit
def merge_sums_kernel(
    ws_ptr, out_ptr, dw_ptr, db_ptr, mean_d_out, mean_dx_out, C, P, NL,
    FINALIZE: tl.constexpr, TRAIN: tl.constexpr, HAS_DW: tl.constexpr, HAS_DB: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """out (2, C) = the (2, P, C) workspace summed over p in order: (sum_d, sum_d_xhat).

    With FINALIZE, also dgamma, dbeta and (mean_d, mean_d_xhat) over NL values per channel
    (`_finalize_grads`): the backward needs no torch op between its launches."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    sum_d = _sum_rows(ws_ptr, 0, c, C, P, BLOCK_C, BLOCK_P)
    sum_d_xhat = _sum_rows(ws_ptr, 1, c, C, P, BLOCK_C, BLOCK_P)
    tl.store(out_ptr + c, sum_d, mask=cmask)
    tl.store(out_ptr + C + c, sum_d_xhat, mask=cmask)
    if FINALIZE:
        count = tl.zeros_like(sum_d) + NL
        mean_d, mean_d_xhat = _finalize_grads(c, cmask, sum_d, sum_d_xhat, count, dw_ptr, db_ptr, TRAIN, HAS_DW, HAS_DB)
        tl.store(mean_d_out + c, mean_d, mask=cmask)
        tl.store(mean_dx_out + c, mean_d_xhat, mask=cmask)


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
        _store_grads(dx_ptr, dres_ptr, offs, mask, centered, d, invstd, scale, mean_d, mean_d_xhat, HAS_RES)


# --- the single-read path: a channel block's whole reduction in one program ---------------


@triton.jit
def _column(cb, C, L, NL, s_n, s_c, s_l, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, WIDE: tl.constexpr):
    """Offsets and mask ([BLOCK_C, BLOCK_R]) of all N L positions r = n L + l of channel block
    cb. The offsets are int64 with WIDE, else int32 (the launch sets WIDE when the tensor has
    2^31 elements or more): they stay live from the loads to the stores, and 32-bit ones
    take half the registers."""
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    r = tl.arange(0, BLOCK_R)
    n = r // L
    if WIDE:
        offs = (
            n.to(tl.int64)[None, :] * s_n
            + c[:, None].to(tl.int64) * s_c
            + (r - n * L).to(tl.int64)[None, :] * s_l
        )
    else:
        offs = n[None, :] * s_n + c[:, None] * s_c + (r - n * L)[None, :] * s_l
    return c, offs, (c[:, None] < C) & (r[None, :] < NL)


@triton.jit
def single_read_forward_kernel(
    x_ptr, res_ptr, w_ptr, b_ptr, y_ptr, mean_out, invstd_out, scale_out, shift_out,
    C, L, NL, s_n, s_c, s_l, eps_hi, eps_lo,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    HAS_RES: tl.constexpr, ACT: tl.constexpr, LEAKY: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, WIDE: tl.constexpr,
):
    """Training forward of BLOCK_C channels whose NL values all fit in registers: x is read
    once, mean and m2 computed around the mean in registers (exact two-pass arithmetic, one
    memory pass), the vectors finalized (`_finalize_stats`), y written. Grid: channel blocks."""
    acc = mean_out.dtype.element_ty
    c, offs, mask = _column(tl.program_id(0), C, L, NL, s_n, s_c, s_l, BLOCK_C, BLOCK_R, WIDE)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc)
    n = tl.zeros([BLOCK_C], acc) + NL
    mean = tl.sum(x, axis=1) / n
    centered = tl.where(mask, x - mean[:, None], 0.0)
    m2 = tl.sum(centered * centered, axis=1)
    # The per-channel vectors are stored before y is computed: mean and invstd are dead then.
    _, scale, shift = _finalize_stats(
        c, c < C, mean, m2 / n, w_ptr, b_ptr, mean_out, invstd_out, scale_out, shift_out, eps_hi, eps_lo,
        HAS_W, HAS_B,
    )
    u = centered * scale[:, None] + shift[:, None]
    if HAS_RES:
        u += tl.load(res_ptr + offs, mask=mask, other=0.0).to(acc)
    tl.store(y_ptr + offs, _activation(u, ACT, LEAKY).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def single_read_backward_kernel(
    dy_ptr, x_ptr, res_ptr, mean_ptr, invstd_ptr, scale_ptr, shift_ptr, dx_ptr, dres_ptr, dw_ptr, db_ptr,
    C, L, NL, s_n, s_c, s_l,
    TRAIN: tl.constexpr, HAS_DW: tl.constexpr, HAS_DB: tl.constexpr,
    HAS_RES: tl.constexpr, ACT: tl.constexpr, LEAKY: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, WIDE: tl.constexpr,
):
    """Backward of BLOCK_C channels held in registers: dy and x (and the residual when an
    activation needs u) read once, the sums reduced in registers, dgamma and dbeta stored
    (`_finalize_grads`), dx (and dresidual) written. Grid: channel blocks."""
    c, offs, mask = _column(tl.program_id(0), C, L, NL, s_n, s_c, s_l, BLOCK_C, BLOCK_R, WIDE)
    cmask = c < C
    mean = tl.load(mean_ptr + c, mask=cmask, other=0.0)[:, None]
    invstd = tl.load(invstd_ptr + c, mask=cmask, other=0.0)
    scale = tl.load(scale_ptr + c, mask=cmask, other=0.0)[:, None]
    shift = tl.load(shift_ptr + c, mask=cmask, other=0.0)[:, None]
    centered, d = _centered_and_d(dy_ptr, x_ptr, res_ptr, offs, mask, mean, scale, shift, HAS_RES, ACT, LEAKY)
    sum_d = tl.sum(d, axis=1)  # masked lanes loaded dy = 0, so d = 0 there
    sum_d_xhat = tl.sum(d * centered, axis=1) * invstd
    count = tl.zeros_like(sum_d) + NL
    mean_d, mean_d_xhat = _finalize_grads(c, cmask, sum_d, sum_d_xhat, count, dw_ptr, db_ptr, TRAIN, HAS_DW, HAS_DB)
    _store_grads(
        dx_ptr, dres_ptr, offs, mask, centered, d, invstd[:, None], scale, mean_d[:, None],
        mean_d_xhat[:, None], HAS_RES,
    )
