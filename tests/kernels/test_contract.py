"""Every available backend's kernel contract against the float64 reference.

Shapes are drawn by hypothesis for both canonical views; every allocation the kernels make
is poisoned with NaN first (poison.py), so an element a kernel forgets to write fails.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from batchnorm import activations, backends, reference

from .poison import poisoned_allocations

# Without a GPU, triton runs in Triton's CPU interpreter (slow): `make check` leaves it to
# tests/backends/test_triton_gpu.py, which tests the same four functions on tiny shapes.
_NAMES = [n for n in backends.available() if n != "reference"]


def _param(name, *values):
    return pytest.param(name, *values, marks=[pytest.mark.slow] if name == "triton" else [])


BACKENDS = [_param(n) for n in _NAMES]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# Triton's kernels compute in fp64 for fp64 input and in fp32 for every other dtype: an
# activation's arithmetic meets those two precisions, and the half dtypes differ from fp32
# only in the loads and stores around it. So in the interpreter (about a second a test),
# every fused activation runs at fp64 and fp32, and the half dtypes with the identity and one
# activation computed in fp32 and rounded on the store.
_HALF_ACTIVATIONS = (None, "silu")


def _kernel_cases():
    """(backend, activation, dtype) for the apply and backward contracts: each backend with the
    activations it fuses (Backend.fused_activations; functional.py applies any other after
    them, as torch's op), at every dtype; triton's half dtypes as `_HALF_ACTIVATIONS` says."""
    return [
        _param(name, activation, dtype)
        for name in _NAMES
        for activation in backends.get(name).fused_activations
        for dtype in DTYPES
        if name != "triton" or dtype in (torch.float64, torch.float32) or activation in _HALF_ACTIVATIONS
    ]


KERNEL_CASES = _kernel_cases()
# Tolerance relative to the size of the quantity, per input dtype: the kernels accumulate
# in fp32 (fp64 for fp64), so the output's own rounding dominates.
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


@st.composite
def views(draw):
    """A canonical view (N, C, L) or (M, C) with an odd mix of sizes."""
    kind = draw(st.sampled_from(["ncl", "mc"]))
    c = draw(st.integers(1, 13))
    if kind == "ncl":
        shape = (draw(st.integers(1, 7)), c, draw(st.integers(1, 37)))
    else:
        shape = (draw(st.integers(2, 97)), c)
    offset = draw(st.sampled_from([0.0, 3.0, -50.0]))
    spread = draw(st.sampled_from([1.0, 0.1, 4.0]))
    seed = draw(st.integers(0, 2**16))
    return shape, offset, spread, seed


def make(shape, offset, spread, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * spread + offset
    return x.to(dtype)


def backend_or_skip(name, x):
    be = backends.get(name)
    why = be.unsupported(x)
    if why is not None:
        pytest.skip(f"{name}: {why}")
    return be


def close(actual, expected, dtype, scale=None):
    """|actual - expected| <= tol * max(scale, |expected|_max, 1) everywhere, NaN fails."""
    actual, expected = actual.double(), expected.double()
    bound = TOL[dtype] * max(float(scale or 0), float(expected.abs().max()) if expected.numel() else 0, 1.0)
    err = (actual - expected).abs()
    assert not torch.isnan(actual).any(), "an output element is NaN (unwritten?)"
    assert float(err.max()) <= bound, f"max error {float(err.max()):.3g} > {bound:.3g}"


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@given(case=views())
def test_stats(name, dtype, case):
    x = make(*case, dtype)
    be = backend_or_skip(name, x)
    with poisoned_allocations():
        count, mean, m2 = be.stats(x)
    rcount, rmean, rm2 = reference.stats(x.double())
    assert torch.equal(count.double(), rcount)
    assert mean.dtype == reference.acc_dtype(dtype) and m2.dtype == mean.dtype
    close(mean, rmean, torch.float64 if dtype == torch.float64 else torch.float32, scale=x.double().abs().max())
    close(m2, rm2, torch.float64 if dtype == torch.float64 else torch.float32)


def _affine_for(x, seed):
    """Per-channel (mean, invstd, scale, shift) as the functional layer would pass them."""
    g = torch.Generator().manual_seed(seed + 1)
    acc = reference.acc_dtype(x.dtype)
    _, mean, m2 = reference.stats(x.double())
    n = x.numel() // x.shape[1]
    invstd = torch.rsqrt(m2 / n + 1e-5)
    weight = torch.randn(x.shape[1], generator=g, dtype=torch.float64) + 0.5
    bias = torch.randn(x.shape[1], generator=g, dtype=torch.float64)
    scale, shift = reference.affine(invstd, weight, bias)
    return [t.to(acc) for t in (mean, invstd, scale, shift)]


@pytest.mark.parametrize(("name", "activation", "dtype"), KERNEL_CASES, ids=str)
@given(case=views(), with_residual=st.booleans())
def test_apply(name, dtype, activation, case, with_residual):
    x = make(*case, dtype)
    be = backend_or_skip(name, x)
    residual = make(case[0], 0.0, 1.0, case[3] + 7, dtype) if with_residual else None
    mean, invstd, scale, shift = _affine_for(x, case[3])
    with poisoned_allocations():
        y = be.apply(x, mean, scale, shift, activation, residual)
    expected = reference.apply(
        x.double(), mean.double(), scale.double(), shift.double(), activation,
        None if residual is None else residual.double(),
    )
    assert y.shape == x.shape and y.dtype == x.dtype
    close(y, expected, dtype)


@pytest.mark.parametrize(("name", "activation", "dtype"), KERNEL_CASES, ids=str)
@given(case=views(), with_residual=st.booleans(), training=st.booleans())
def test_backward(name, dtype, activation, case, with_residual, training):
    x = make(*case, dtype)
    be = backend_or_skip(name, x)
    dy = make(case[0], 0.0, 1.0, case[3] + 3, dtype)
    residual = make(case[0], 0.0, 1.0, case[3] + 7, dtype) if with_residual else None
    mean, invstd, scale, shift = _affine_for(x, case[3])
    r64 = None if residual is None else residual.double()
    args64 = [t.double() for t in (mean, invstd, scale, shift)]

    with poisoned_allocations():
        sum_d, sum_d_xhat = be.backward_reduce(dy, x, mean, invstd, scale, shift, activation, residual)
    e_sum_d, e_sum_d_xhat = reference.backward_reduce(dy.double(), x.double(), *args64, activation, r64)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    n = x.numel() // x.shape[1]
    close(sum_d, e_sum_d, acc, scale=n)
    close(sum_d_xhat, e_sum_d_xhat, acc, scale=n)

    n_t = torch.tensor(float(n), dtype=torch.float64)
    mean_d = e_sum_d / n_t if training else torch.zeros_like(e_sum_d)
    mean_d_xhat = e_sum_d_xhat / n_t if training else torch.zeros_like(e_sum_d)
    with poisoned_allocations():
        dx, dres = be.backward_apply(
            dy, x, mean, invstd, scale, shift, mean_d.to(acc), mean_d_xhat.to(acc), activation, residual
        )
    e_dx, e_dres = reference.backward_apply(
        dy.double(), x.double(), *args64, mean_d, mean_d_xhat, activation, r64
    )
    assert dx.shape == x.shape and dx.dtype == x.dtype
    # dx = scale (d - mean_d - xhat mean_d_xhat) cancels: its rounding error scales with
    # the terms, scale * |d|, not with the (possibly tiny) result.
    close(dx, e_dx, dtype, scale=float(scale.abs().max() * dy.abs().max()))
    if residual is None:
        assert dres is None
    else:
        assert dres.shape == x.shape and dres.dtype == residual.dtype
        close(dres, e_dres, dtype)


def test_poison_fills_new_allocations_with_nan():
    with poisoned_allocations():
        t = torch.empty(3, 4)
        a = np.empty(5, dtype=np.float32)
    assert torch.isnan(t).all() and np.isnan(a).all()


# u at each piecewise activation's breakpoints (and beside them), where the slope's convention
# decides d = dy g'(u): relu's 0, relu6's 0 and 6, hardswish's -3 and 3.
_BREAKS = [-7.0, -3.0001, -3.0, -2.9999, -1.0, -0.0, 0.0, 1e-7, 1.0, 2.9999, 3.0, 3.0001, 5.9999, 6.0, 6.0001, 9.0]


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("activation", ["relu", "relu6", "hardswish"])
@pytest.mark.parametrize("view", ["ncl", "mc"])
def test_piecewise_activations_at_their_breakpoints_are_torchs(name, dtype, activation, view):
    """With mean 0, scale 1, shift 0, u = x exactly: y = g(x) and dx = dy g'(x) (evaluation:
    mean_d = mean_d_xhat = 0) are torch's module and its autograd, bitwise, breakpoints included."""
    u = torch.tensor(_BREAKS, dtype=dtype)
    x = u.view(2, 1, -1).expand(2, 3, -1).contiguous() if view == "ncl" else u.view(-1, 1).expand(-1, 3).contiguous()
    be = backend_or_skip(name, x)
    dy = torch.linspace(0.5, 2.0, x.numel(), dtype=dtype).view(x.shape)
    zeros, ones = torch.zeros(3, dtype=dtype), torch.ones(3, dtype=dtype)
    leaf = x.clone().requires_grad_()
    want_y = activations.module_for(activation)(leaf)
    (want_dx,) = torch.autograd.grad(want_y, leaf, dy)
    y = be.apply(x, zeros, ones, zeros, activation)
    dx, _ = be.backward_apply(dy, x, zeros, ones, ones, zeros, zeros, zeros, activation)
    torch.testing.assert_close(y, want_y.detach(), rtol=0, atol=0)
    torch.testing.assert_close(dx, want_dx, rtol=0, atol=0)
