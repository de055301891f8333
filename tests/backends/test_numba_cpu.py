"""The `numba` backend's whole op (`forward`/`backward` through the op layer's autograd) against
the float64 reference, its numerics on a large-mean channel, thread-count determinism, and when `auto`
picks it. The four contract kernels are covered by tests/kernels/test_contract.py.

Every allocation the wrappers make is poisoned with NaN (kernels/poison.py), so an element a
kernel forgets to write fails the NaN check in `close`.
"""

from __future__ import annotations

import contextlib
import copy
import gc

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import batchnorm as bn
from batchnorm import activations, backends, layout
from batchnorm import functional as F
from batchnorm import ops
from batchnorm.backends import numba_cpu, numba_kernels
from batchnorm.backends.base import CENTER, INVSTD, VAR, XHAT_SHIFT

from kernels.poison import poisoned_allocations

pytestmark = pytest.mark.skipif(
    numba_cpu.NumbaBackend().unavailable() is not None, reason="numba is not importable"
)
numba = pytest.importorskip("numba")

BE = numba_cpu.NumbaBackend()
TOL = {torch.float64: 1e-9, torch.float32: 5e-5}
FORMATS = ["2d", "ncl", "nchw", "channels_last"]


def whole_op(x, weight, bias, running_mean, running_var, eps, activation, residual):
    """The numba whole op through the eager op layer's autograd: (y, mean, invstd) with the
    batch's statistics, or (y, None, None) normalized with the running statistics."""
    training = running_mean is None
    args = (x, weight, bias, residual, running_mean, running_var, eps, activation, training, backends.get("numba"))
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, residual)):
        y, params = ops._BatchNormFunction.apply(*args)
    else:
        y, params = ops.forward_kernels(*args)
    return (y, params[CENTER], params[INVSTD]) if training else (y, None, None)


def whole_op_updating(x, weight, bias, running_mean, running_var, tracked, factor, eps, activation, residual):
    """Training through the op layer on numba, then the one running update with weight
    `factor`: (y, whether the update was kept)."""
    y, batch = ops.batch_norm(x, weight, bias, residual, None, None, training=True, eps=eps, activation=activation,
                              backend="numba")  # fmt: skip
    return y, ops.update_running_stats(running_mean, running_var, tracked, batch.mean, batch.unbiased_var, factor)


def close(actual, expected, dtype, scale=1.0):
    """|actual - expected| <= tol * max(scale, |expected|_max, 1); any NaN fails."""
    assert actual.shape == expected.shape
    actual, expected = actual.detach().double(), expected.detach().double()
    assert not torch.isnan(actual).any(), "NaN in the output (an element left unwritten?)"
    bound = TOL[dtype] * max(scale, float(expected.abs().max()), 1.0)
    err = float((actual - expected).abs().max())
    assert err <= bound, f"max error {err:.3g} > {bound:.3g}"


def make_input(fmt, n, c, length, dtype, gen, offset=0.0):
    """An input of memory format `fmt`, values offset + N(0, 2)."""
    shape = {"2d": (n * length, c), "ncl": (n, c, length), "nchw": (n, c, length, 2)}.get(
        fmt, (n, c, length, 2)
    )
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + offset).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if fmt == "channels_last" else x


@contextlib.contextmanager
def kernels(parallel: bool):
    """Force the parallel (or the serial) kernels whatever the input's size."""
    before = numba_kernels.PARALLEL_NUMEL
    numba_kernels.PARALLEL_NUMEL = 0 if parallel else 1 << 62
    try:
        yield
    finally:
        numba_kernels.PARALLEL_NUMEL = before


@st.composite
def cases(draw):
    return dict(
        fmt=draw(st.sampled_from(FORMATS)),
        n=draw(st.integers(1, 5)),
        c=draw(st.integers(1, 9)),
        length=draw(st.integers(1, 1300)),  # > _BLOCK sometimes: multi-block channels
        dtype=draw(st.sampled_from([torch.float64, torch.float32])),
        activation=draw(st.sampled_from(BE.fused_activations)),
        residual=draw(st.booleans()),
        affine=draw(st.booleans()),
        training=draw(st.booleans()),
        offset=draw(st.sampled_from([0.0, 30.0])),
        parallel=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


# The first test to run the kernels compiles every one of their specializations (both
# dtypes, both views, serial and parallel, forward and backward) when numba's on-disk cache
# is cold, as in a fresh clone: minutes on 2 cores, more than the suite's per-test limit
# when other work shares the machine.
@pytest.mark.slow
@pytest.mark.timeout(1800)
@settings(max_examples=40, deadline=None)
@given(case=cases())
# few channels, many rows, channels-last: one fp32 block sum per channel over 5,200 rows
# was 5.2e-5 off; blocks now have at most _MC_ROWS rows
@example(case={"fmt": "channels_last", "n": 2, "c": 3, "length": 1300, "dtype": torch.float32,
               "activation": "hardswish", "residual": True, "affine": False, "training": True,
               "offset": 0.0, "parallel": True, "seed": 8697})  # fmt: skip
def test_normalize_and_gradients_match_reference(case):
    check_against_reference(case)


@pytest.mark.parametrize("activation", list(numba_kernels.FUSED))
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "threads"])
@pytest.mark.parametrize("fmt", ["ncl", "channels_last"])  # the (N, C, L) and the (M, C) kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_compiled_case_matches_reference(dtype, fmt, parallel, residual, activation):
    """Each compiled case (numba_kernels.compiled: dtype, view, threads, residual, activation
    kind) with each fused activation's bounds, forward and backward at least once, whatever
    the random draws above pick."""
    assert {kind for kind, _, _ in numba_kernels.FUSED.values()} == set(numba_kernels.KINDS)
    check_against_reference(dict(fmt=fmt, n=3, c=5, length=37, dtype=dtype, activation=activation,
                                 residual=residual, affine=True, training=True, offset=30.0,
                                 parallel=parallel, seed=7))  # fmt: skip


def check_against_reference(case):
    """The whole op on `case`'s input (the keys of `cases`) in training or evaluation, forward
    and gradients, against the float64 reference, with every allocation poisoned."""
    gen = torch.Generator().manual_seed(case["seed"])
    dtype, c = case["dtype"], case["c"]
    x = make_input(case["fmt"], case["n"], c, case["length"], dtype, gen, case["offset"])
    if case["training"] and x.numel() // c < 2:
        x = torch.cat([x, x + 1])
    if BE.unsupported(x) is not None:  # a (N*L, 1) 2-D view is still a contiguous view
        pytest.fail(f"numba refused a contiguous input: {BE.unsupported(x)}")
    leaf = lambda t: None if t is None else t.detach().clone().requires_grad_()  # noqa: E731
    weight = leaf(torch.rand(c, generator=gen, dtype=dtype) + 0.5) if case["affine"] else None
    bias = leaf(torch.randn(c, generator=gen, dtype=dtype)) if case["affine"] else None
    residual = leaf(torch.randn(x.shape, generator=gen, dtype=dtype)) if case["residual"] else None
    rmean = None if case["training"] else torch.randn(c, generator=gen, dtype=dtype) + case["offset"]
    rvar = None if case["training"] else torch.rand(c, generator=gen, dtype=dtype) + 0.5
    xg = leaf(x)
    dy = torch.randn(x.shape, generator=gen, dtype=dtype)

    with poisoned_allocations(), kernels(case["parallel"]):
        y, mean, invstd = whole_op(xg, weight, bias, rmean, rvar, 1e-5, case["activation"], residual)
        inputs = [t for t in (xg, weight, bias, residual) if t is not None]
        grads = torch.autograd.grad(y, inputs, dy)

    d64 = lambda t: None if t is None else t.detach().double().requires_grad_()  # noqa: E731
    ref_inputs = [d64(t) for t in (xg, weight, bias, residual)]
    r_rmean = None if rmean is None else rmean.double()
    r_rvar = None if rvar is None else rvar.double()
    y_ref = F.batch_norm(
        ref_inputs[0], r_rmean, r_rvar, ref_inputs[1], ref_inputs[2], case["training"],
        activation=case["activation"], residual=ref_inputs[3], backend="reference",
    )  # fmt: skip
    ref_grads = torch.autograd.grad(y_ref, [t for t in ref_inputs if t is not None], dy.double())

    assert y.dtype == dtype and y.stride() == x.stride()
    close(y, y_ref, dtype)
    if case["training"]:
        x64 = x.double().transpose(0, 1).reshape(c, -1)
        close(mean, x64.mean(1), dtype, scale=float(x64.abs().max()))
        close(invstd, torch.rsqrt(x64.var(1, unbiased=False) + 1e-5), dtype)
    else:
        assert mean is None and invstd is None
    # dx cancels (d - mean(d) - xhat mean(d xhat)): its error scales with its terms,
    # scale |dy| |xhat|; the parameter gradients are sums over the n values of a channel.
    used_invstd = invstd if case["training"] else torch.rsqrt(rvar + 1e-5)
    gain = used_invstd.abs() * (1.0 if weight is None else weight.detach().abs())
    term = float(dy.abs().max()) * float(gain.max()) * 4
    n = x.numel() // c
    scales = {"x": term, "weight": n * float(dy.abs().max()) * 4, "bias": n * float(dy.abs().max())}
    names = [k for k, t in zip(("x", "weight", "bias", "residual"), (xg, weight, bias, residual)) if t is not None]
    for name, got, want in zip(names, grads, ref_grads):
        close(got, want, dtype, scale=scales.get(name, 1.0))

@pytest.mark.slow
@pytest.mark.parametrize(
    "shape, fmt",
    [
        ((16, 3, 400, 1), "ncl"),
        ((200, 3, 7, 7), "ncl"),  # rows shorter than _LANES, in several blocks of rows
        ((16, 3, 400, 1), "channels_last"),
        ((64, 3, 20, 20), "channels_last"),  # several (M, C) row blocks, merged
    ],
)
def test_large_mean_channel_normalizes_like_float64(shape, fmt):
    """mean 1e4, std 1e-2 in fp32: relative error < 1e-3 (E[x^2] - E[x]^2 would give garbage)."""
    gen = torch.Generator().manual_seed(0)
    x64 = 1e4 + 1e-2 * torch.randn(shape, generator=gen, dtype=torch.float64)
    x = x64.float()
    if fmt == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    y, mean, invstd = whole_op(x, None, None, None, None, 1e-8, None, None)
    xq = x.double()  # the reference sees the same fp32-rounded values
    y_ref = F.batch_norm(xq, None, None, training=True, eps=1e-8, backend="reference")
    rel = float((y.double() - y_ref).abs().max() / y_ref.abs().max())
    assert rel < 1e-3, f"relative error {rel:.3g}"
    dy = torch.randn(x.shape, generator=gen)
    xg, xr = x.clone().requires_grad_(), xq.clone().requires_grad_()
    (dx,) = torch.autograd.grad(whole_op(xg, None, None, None, None, 1e-8, "relu", None)[0], xg, dy)
    yr = F.batch_norm(xr, None, None, training=True, eps=1e-8, activation="relu", backend="reference")
    (dx_ref,) = torch.autograd.grad(yr, xr, dy.double())
    rel = float((dx.double() - dx_ref).abs().max() / dx_ref.abs().max())
    assert rel < 1e-3, f"gradient relative error {rel:.3g}"


@pytest.mark.parametrize(
    "shape, fmt",
    [
        ((10486, 5, 5), "ncl"),  # short rows: 819 rows per block, 13 blocks
        ((512, 64, 8), "ncl"),  # short rows: one block per channel
        ((16, 4, 4096), "ncl"),  # long rows: a row per block
        ((256, 4, 200), "ncl"),  # rows of LANES values and more: 20 rows per block
        ((64, 16, 8, 8), "channels_last"),  # (M, C): blocks of 512 rows
    ],
)
def test_fp32_statistics_are_as_accurate_as_torchs(shape, fmt):
    """x = 3 randn + 1 in fp32: the batch mean the forward works with (center - xhat_shift /
    invstd, from its params) no further from the float64 mean than torch's own kernel's,
    which is the float64 mean correctly rounded to fp32 on contiguous input. The variance:
    on (N, C, L) within the two fp32 roundings of m2 / n (2^-23 relative; the statistics are
    float64 sums), on (M, C), whose block sums are fp32, no further than torch's."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen) * 3 + 1
    if fmt == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    dims = [d for d in range(x.dim()) if d != 1]
    mean64, var64 = x.double().mean(dims), x.double().var(dims, unbiased=False)
    p = ops.forward_kernels(x, None, None, None, None, None, 1e-5, None, True, backends.get("numba"))[1].double()
    mean = p[CENTER] - p[XHAT_SHIFT] / p[INVSTD]
    _, torch_mean, torch_invstd = torch.native_batch_norm(x, None, None, None, None, True, 0.0, 1e-5)
    ours, theirs = float((mean - mean64).abs().max()), float((torch_mean.double() - mean64).abs().max())
    assert ours <= theirs, f"mean {ours:.3g} off float64, torch's {theirs:.3g}"
    var_error = float(((p[VAR] - var64) / var64).abs().max())
    if fmt == "ncl":
        assert var_error <= 2.0**-23, f"variance {var_error:.3g} off float64 (relative)"
    else:
        torch_var = 1 / torch_invstd.double() ** 2 - 1e-5
        theirs = float(((torch_var - var64) / var64).abs().max())
        assert var_error <= theirs, f"variance {var_error:.3g} off float64 (relative), torch's {theirs:.3g}"


@pytest.mark.slow
@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="one numba thread only")
@pytest.mark.parametrize(
    "shape, fmt",
    [
        ((3, 5, 3000), "ncl"),
        ((300, 5, 7, 7), "ncl"),  # rows shorter than _LANES, several blocks of rows
        ((2100, 40), "2d"),
        ((9, 40, 30, 10), "channels_last"),
    ],
)
def test_bitwise_same_result_with_one_or_two_threads(shape, fmt):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen) * 3 + 7
    if fmt == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.rand(shape[1], generator=gen) + 0.5
    r = torch.randn(x.shape, generator=gen)
    dy = torch.randn(x.shape, generator=gen)

    def run():
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        y, mean, invstd = whole_op(xg, wg, None, None, None, 1e-5, "relu", r)
        return (y, mean, invstd, *torch.autograd.grad(y, (xg, wg), dy), *BE.stats(x.view(shape[0], shape[1], -1)))

    before = torch.get_num_threads()
    try:
        with kernels(parallel=True):  # the threaded kernel from any size, on torch's thread count
            torch.set_num_threads(1)
            one = run()  # one thread: the serial kernel
            torch.set_num_threads(2)
            two = run()
    finally:
        torch.set_num_threads(before)
    with kernels(parallel=False):
        serial = run()
    for a, b, c in zip(one, two, serial):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.slow
@settings(max_examples=25, deadline=None)
@given(case=cases(), activation=st.sampled_from([None, "relu"]))
def test_serial_and_parallel_kernels_agree_bitwise(case, activation):
    """The serial kernels (small inputs) are the parallel ones compiled without threads: the
    same arithmetic per channel, so every contract call gives the same bits either way (the
    contract tests check the serial ones against the reference on their small shapes)."""
    gen = torch.Generator().manual_seed(case["seed"])
    x = make_input(case["fmt"], case["n"], case["c"], case["length"], case["dtype"], gen, case["offset"])
    v = x.transpose(1, -1).reshape(-1, x.shape[1]) if case["fmt"] == "channels_last" else x.reshape(x.shape[0], x.shape[1], -1)
    if case["fmt"] == "2d":
        v = x
    r = torch.randn(v.shape, generator=gen, dtype=v.dtype) if case["residual"] else None
    dy = torch.randn(v.shape, generator=gen, dtype=v.dtype)

    def run():
        count, mean, m2 = BE.stats(v)
        invstd = torch.rsqrt(m2 / count + 1e-5)
        scale, shift = invstd * 1.5, torch.full_like(invstd, 0.25)
        y = BE.apply(v, mean, scale, shift, activation, r)
        sums = BE.backward_reduce(dy, v, mean, invstd, scale, shift, activation, r)
        dx, dres = BE.backward_apply(dy, v, mean, invstd, scale, shift, sums[0] / count, sums[1] / count, activation, r)
        return [t for t in (mean, m2, y, *sums, dx, dres) if t is not None]

    with kernels(parallel=True):
        parallel = run()
    with kernels(parallel=False):
        serial = run()
    for a, b in zip(parallel, serial):
        assert torch.equal(a, b)


def _expected_running(x, rmean, rvar, factor):
    """torch's update in float64: r <- r + factor (batch - r), the variance unbiased."""
    x64 = x.double().transpose(0, 1).reshape(x.shape[1], -1)
    mean, var = x64.mean(1), x64.var(1, unbiased=True)
    return rmean.double() + factor * (mean - rmean.double()), rvar.double() + factor * (var - rvar.double())


@pytest.mark.slow
@settings(max_examples=30, deadline=None)
@given(case=cases(), factor=st.sampled_from([0.1, 0.5, 1.0]), nbt=st.booleans())
def test_normalize_updating_folds_the_batch_into_the_running_statistics(case, factor, nbt):
    gen = torch.Generator().manual_seed(case["seed"])
    dtype, c = case["dtype"], case["c"]
    x = make_input(case["fmt"], case["n"], c, case["length"], dtype, gen, case["offset"])
    if x.numel() // c < 2:
        x = torch.cat([x, x + 1])
    rmean = torch.randn(c, generator=gen, dtype=dtype)
    rvar = torch.rand(c, generator=gen, dtype=dtype) + 0.5
    want_mean, want_var = _expected_running(x, rmean, rvar, factor)
    tracked = torch.tensor(4) if nbt else None
    with poisoned_allocations(), kernels(case["parallel"]):
        y, accepted = whole_op_updating(x, None, None, rmean, rvar, tracked, factor, 1e-5, case["activation"], None)
    y_ref = F.batch_norm(x.double(), None, None, training=True, activation=case["activation"], backend="reference")
    assert accepted is True
    close(y, y_ref, dtype)
    close(rmean, want_mean, dtype, scale=float(x.abs().max()))
    close(rvar, want_var, dtype, scale=float(want_var.abs().max()))
    assert tracked is None or int(tracked) == 5


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("fmt", ["ncl", "channels_last"])
def test_normalize_updating_leaves_the_running_statistics_for_a_non_finite_batch(fmt, parallel):
    gen = torch.Generator().manual_seed(4)
    x = make_input(fmt, 4, 3, 50, torch.float32, gen)
    x[1, 2, 5] = float("inf")
    rmean, rvar, tracked = torch.randn(3, generator=gen), torch.rand(3, generator=gen) + 0.5, torch.tensor(7)
    before = rmean.clone(), rvar.clone()
    with kernels(parallel):
        y, accepted = whole_op_updating(x, None, None, rmean, rvar, tracked, 0.1, 1e-5, None, None)
    assert accepted is False and int(tracked) == 7
    assert torch.equal(rmean, before[0]) and torch.equal(rvar, before[1])
    assert torch.isfinite(y[:, :2]).all() and not torch.isfinite(y[:, 2]).any()


@pytest.mark.parametrize("fmt", ["ncl", "channels_last"])
def test_without_autograd_the_kernel_runs_without_a_function_and_gives_the_same_bits(fmt):
    """Under no_grad (or with nothing requiring grad) the forward skips the autograd.Function
    (~10 us a call); the kernels and so the bits are the same."""
    gen = torch.Generator().manual_seed(6)
    x = make_input(fmt, 5, 4, 40, torch.float32, gen, 2.0)
    weight = (torch.rand(4, generator=gen) + 0.5).requires_grad_()
    bias = torch.randn(4, generator=gen).requires_grad_()
    results = []
    for grad in (True, False):
        rmean, rvar = torch.zeros(4), torch.ones(4)
        with torch.set_grad_enabled(grad):
            y, accepted = whole_op_updating(x, weight, bias, rmean, rvar, None, 0.2, 1e-5, "relu", None)
            y_eval = whole_op(x, weight, bias, rmean, rvar, 1e-5, "relu", None)[0]
        assert accepted is True
        assert (y.grad_fn is not None) == grad and (y_eval.grad_fn is not None) == grad
        results.append((y.detach(), y_eval.detach(), rmean, rvar))
    for with_graph, without in zip(*results):
        assert torch.equal(with_graph, without)


def test_normalize_updating_writes_back_buffers_of_another_dtype():
    """fp64 input, fp32 running statistics: the kernel updates fp64 copies, copied back."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 4, 30, generator=gen, dtype=torch.float64) + 3
    rmean, rvar = torch.zeros(4), torch.ones(4)
    want_mean, want_var = _expected_running(x, rmean, rvar, 0.3)
    whole_op_updating(x, None, None, rmean, rvar, None, 0.3, 1e-5, None, None)
    assert rmean.dtype == torch.float32
    torch.testing.assert_close(rmean.double(), want_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rvar.double(), want_var, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("channels_last", [False, True])
def test_module_trains_like_torch_through_numba(momentum, channels_last):
    """bn.BatchNorm2d(backend="numba") against torch.nn.BatchNorm2d over three training steps
    and an evaluation: outputs, gradients, running statistics, num_batches_tracked."""
    gen = torch.Generator().manual_seed(6)
    ours = bn.BatchNorm2d(5, momentum=momentum, backend="numba")
    theirs = torch.nn.BatchNorm2d(5, momentum=momentum)
    with torch.no_grad():
        for m in (ours, theirs):
            m.weight.copy_(torch.linspace(0.5, 1.5, 5))
            m.bias.copy_(torch.linspace(-1, 1, 5))
    for step in range(3):
        x = torch.randn(4, 5, 6, 7, generator=gen) * (step + 1) + step
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        dy = torch.randn(x.shape, generator=gen)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), theirs(xb)
        ga = torch.autograd.grad(ya, (xa, ours.weight, ours.bias), dy)
        gb = torch.autograd.grad(yb, (xb, theirs.weight, theirs.bias), dy)
        torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 3
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_double_backward_goes_through_differentiable_ops():
    """create_graph=True: the backward is torch's differentiable batch norm (gradgradcheck)."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.rand(2, generator=gen, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert backends.resolve("numba", x).reason == "forced"

    def f(x, w, r):
        return F.batch_norm(x, None, None, w, None, True, activation="tanh", residual=r, backend="numba")

    assert torch.autograd.gradgradcheck(f, (x, w, r))


def test_auto_picks_numba_above_the_crossover_and_aten_elsewhere():
    big = torch.randn(8, 16, numba_cpu.CROSSOVER_NUMEL // 64)
    assert backends.resolve("auto", big).backend.name == "numba"
    assert backends.resolve("auto", big.double()).backend.name == "numba"
    # channels-last input has a crossover of its own, higher: torch's kernel is faster there
    assert numba_cpu.CROSSOVER_NUMEL < numba_cpu.CROSSOVER_NUMEL_CHANNELS_LAST
    for numel, want in ((numba_cpu.CROSSOVER_NUMEL, "aten"), (numba_cpu.CROSSOVER_NUMEL_CHANNELS_LAST, "numba")):
        cl = torch.empty(numel // 1024, 16, 8, 8).contiguous(memory_format=torch.channels_last)
        assert backends.resolve("auto", cl).backend.name == want
        assert backends.resolve("auto", cl.contiguous()).backend.name == "numba"
    assert backends.resolve("auto", torch.empty(numba_cpu.CROSSOVER_NUMEL // 64, 64)).backend.name == "numba"  # 2-D
    # contiguous rows shorter than SHORT_ROW values have a lower crossover: torch's kernel is slow there
    assert numba_cpu.CROSSOVER_NUMEL_SHORT_ROWS < numba_cpu.CROSSOVER_NUMEL
    for length, want in ((numba_cpu.SHORT_ROW - 1, "numba"), (numba_cpu.SHORT_ROW, "aten"), (1, "aten")):
        rows = torch.empty(numba_cpu.CROSSOVER_NUMEL_SHORT_ROWS // (64 * length) + 1, 64, length)
        assert numba_cpu.CROSSOVER_NUMEL_SHORT_ROWS <= rows.numel() < numba_cpu.CROSSOVER_NUMEL
        assert backends.resolve("auto", rows).backend.name == want, length
    two_by_two = torch.empty(numba_cpu.CROSSOVER_NUMEL_SHORT_ROWS // (64 * 4), 64, 2, 2)
    assert backends.resolve("auto", two_by_two).backend.name == "numba"
    assert backends.resolve("auto", two_by_two[:-1]).backend.name == "aten"  # below the short-row crossover
    small = torch.randn(4, 3, 5)
    assert backends.resolve("auto", small).backend.name == "aten"
    for other in (big.bfloat16(), big[:, :, ::2], big[:0]):
        assert backends.resolve("auto", other).backend.name == "aten"
        forced = backends.resolve("numba", other)
        assert forced.backend.name == "aten" and "numba cannot run this input" in forced.reason


def test_unsupported_inputs_say_why():
    x = torch.randn(4, 3, 8)
    assert "float32 and float64" in BE.unsupported(x.half())
    assert "empty" in BE.unsupported(x[:0])
    assert "strided" in BE.unsupported(x[:, :, ::2])
    assert "strided" in BE.unsupported(torch.randn(5, 8)[:, :3])
    assert BE.unsupported(x) is None and BE.unavailable() is None


@pytest.mark.parametrize("fmt", ["ncl", "channels_last"])
def test_non_finite_values_propagate(fmt):
    """fastmath is reassoc + contract only: a NaN poisons its channel's statistics (training),
    and in evaluation an Inf input gives an Inf output where the reference does."""
    gen = torch.Generator().manual_seed(3)
    x = make_input(fmt, 4, 3, 50, torch.float32, gen)
    at, at2 = (1, 0, 7), (2, 1, 3)  # (n, c, l): one value, or two of a 4-D input
    x[at] = float("nan")
    y, mean, _ = whole_op(x, None, None, None, None, 1e-5, "relu", None)
    assert torch.isnan(mean[0]) and torch.isfinite(mean[1:]).all()
    assert torch.isnan(y[:, 0]).all() and torch.isfinite(y[:, 1:]).all()
    x[at], x[at2] = float("inf"), -float("inf")
    rmean, rvar = torch.zeros(3), torch.ones(3)
    y = whole_op(x, None, None, rmean, rvar, 1e-5, "relu", None)[0]
    y_ref = F.batch_norm(x, rmean, rvar, training=False, activation="relu", backend="reference")
    assert (y[at] == float("inf")).all() and (y[at2] == 0).all()
    assert torch.equal(torch.isfinite(y), torch.isfinite(y_ref))


def test_normalize_updating_refuses_one_value_per_channel():
    """No unbiased variance from one value: nothing is updated (functional raises before)."""
    x = torch.randn(1, 3, 1)
    rmean, rvar = torch.zeros(3), torch.ones(3)
    _, accepted = whole_op_updating(x, None, None, rmean, rvar, None, 0.1, 1e-5, None, None)
    assert accepted is False and torch.equal(rmean, torch.zeros(3)) and torch.equal(rvar, torch.ones(3))


def test_plain_evaluation_runs_where_it_is_faster():
    """Below _HUGE_BYTES plain evaluation is torch's own pass (bitwise aten's); above, the
    numba kernel, whose output comes from the pool (checked against the float64 formula)."""
    gen = torch.Generator().manual_seed(8)
    rmean, rvar, w, b = torch.randn(4, generator=gen), torch.rand(4, generator=gen) + 0.5, torch.rand(4) + 0.5, torch.randn(4)
    small = torch.randn(2, 4, 100, generator=gen)
    evaluate = lambda x: ops.batch_norm(x, w, b, None, rmean, rvar, training=False, eps=1e-5, activation=None, backend="numba")[0]  # noqa: E731
    y = evaluate(small)
    assert torch.equal(y, torch.nn.functional.batch_norm(small, rmean, rvar, w, b, False, 0.0, 1e-5))
    big = torch.randn(2, 4, numba_cpu._HUGE_BYTES // 32 + 1, generator=gen)
    with torch.no_grad():
        y = evaluate(big)
    scale, shift = (w / torch.sqrt(rvar + 1e-5)).double(), b.double()
    want = (big.double() - rmean.double()[:, None]) * scale[:, None] + shift[:, None]
    close(y, want, torch.float32)
    idle = numba_cpu.OUTPUTS.idle_bytes
    del y
    gc.collect()
    assert numba_cpu.OUTPUTS.idle_bytes == idle + big.numel() * 4  # it was the pool's: numba ran


def test_every_compiled_case_has_its_own_cache_entry():
    """numba keys its on-disk cache by name and line, not by `parallel` nor by the case's
    constants: a shared entry would make one case load another's machine code (the parallel
    kernel the serial one's, or a ReLU kernel the identity's) whenever that was compiled first."""
    cases = [
        numba_kernels.compiled(name, parallel, has_res, kind)
        for name in ("ncl_forward", "mc_forward", "ncl_backward", "mc_backward")
        for parallel in (True, False)
        for has_res in (True, False)
        for kind in numba_kernels.KINDS
    ]
    paths = {case._cache._cache_file._index_path for case in cases}
    assert len(paths) == len(cases) == 32


def test_a_call_compiles_only_its_own_case():
    """The activation's kind and the residual pick the compiled case: identity, ReLU and
    ReLU6 share the clamp case (their bounds are arguments), Hardswish has its own, each with
    and without a residual."""
    pick = lambda activation, has_res: numba_kernels.kernel(  # noqa: E731
        "ncl_forward", 2, has_res, activation, np.dtype(np.float32)
    )[0]
    assert len({pick(a, has_res) for a in numba_kernels.FUSED for has_res in (True, False)}) == 4
    assert pick(None, False) is pick("relu", False) is pick("relu6", False)
    assert pick("relu6", False) is not pick("hardswish", False)
    assert pick("relu", False) is not pick("relu", True)


@pytest.mark.parametrize("activation", list(numba_kernels.FUSED))
@pytest.mark.parametrize("shape", [(4, 3, 50), (200, 3)], ids=["ncl", "mc"])
def test_a_nan_before_the_activation_gets_the_references_slope(shape, activation):
    """A NaN residual value makes u NaN there (y is NaN at that position only): the slope
    there is the reference's for each activation sharing the clamp case (0 for ReLU and
    ReLU6, whose bounds are numbers; 1 for the identity, whose bounds are NaN), and for
    Hardswish, so dresidual there is 0 or dy as the reference's and the channel's other
    gradients stay finite."""
    gen = torch.Generator().manual_seed(5)
    x, residual, dy = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3))
    residual[1, 1] = float("nan")  # a whole row of L values for (N, C, L), one value for (M, C)
    grads = {}
    for backend in ("numba", "reference"):
        xs, rs = x.clone().requires_grad_(), residual.clone().requires_grad_()
        with poisoned_allocations():
            y = F.batch_norm(xs, None, None, training=True, activation=activation, residual=rs, backend=backend)
        grads[backend] = (y, *torch.autograd.grad(y, (xs, rs), dy))
    for ours, theirs in zip(grads["numba"], grads["reference"]):
        torch.testing.assert_close(ours, theirs, equal_nan=True)
    y, dx, dres = grads["numba"]
    assert y.isnan().sum() == residual.isnan().sum() and dx.isfinite().all()
    passed = activation in (None, "hardswish")
    torch.testing.assert_close(dres[1, 1], dy[1, 1] if passed else torch.zeros_like(dy[1, 1]))


@pytest.mark.parametrize("activation", ["leaky_relu", "sigmoid", "tanh", "silu", "gelu"])
def test_the_kernels_refuse_an_activation_they_do_not_fuse(activation):
    """The kernels have no case for the smooth activations (nor leaky ReLU): asked for one,
    they say which they fuse, instead of running another's. The custom op called directly
    with one and numba runs torch's kernels (functional.py never hands one over)."""
    assert activation not in BE.fused_activations
    x = torch.randn(4, 3, 8)
    with pytest.raises(ValueError, match="fuse identity, relu, relu6, hardswish only, not " + activation):
        BE.forward(x, None, None, None, None, None, 1e-5, activation, True)
    y, _ = torch.ops.batchnorm.batch_norm(x, None, None, None, None, None, 1e-5, activation, True, "numba")
    expected = activations.forward(torch.nn.functional.batch_norm(x, None, None, training=True), activation)
    torch.testing.assert_close(y, expected)


@pytest.mark.parametrize("activation", [None, "relu", "hardswish"])
@pytest.mark.parametrize("training", [True, False], ids=["training", "evaluation"])
@pytest.mark.parametrize("shape", [(4, 6, 50), (300, 6)], ids=["ncl", "mc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_stand_in_matches_numba_and_each_takes_the_others_parameters(dtype, shape, training, activation):
    """A compiled graph's op runs torch's kernels (aten.NativeStandIn) while numba's compile
    (ops._runnable), and its backward may find them ready: the stand-in's forward and
    backward equal numba's, and numba's backward on the stand-in's (6, C) parameters equals
    numba's on its own (and the other way round)."""
    from batchnorm.backends.aten import NativeStandIn

    gen = torch.Generator().manual_seed(3)
    x, dy, residual = ((torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 5).to(dtype) for _ in range(3))
    c = shape[1]
    weight, bias = torch.rand(c, dtype=dtype) + 0.5, torch.randn(c, dtype=dtype)
    running = (None, None) if training else (torch.randn(c, dtype=dtype) + 5, torch.rand(c, dtype=dtype) + 0.5)
    stand_in, numba_be = NativeStandIn(), backends.get("numba")
    needs = (True, True, True, True)
    with poisoned_allocations():
        y_in, params_in = stand_in.forward(x, weight, bias, residual, *running, 1e-5, activation, training)
        y_nb, params_nb = numba_be.forward(x, weight, bias, residual, *running, 1e-5, activation, training)
        grads = [be.backward(dy, x, residual, p, training, activation, needs, dtype, dtype)
                 for be in (stand_in, numba_be) for p in (params_in, params_nb)]  # fmt: skip
    close(y_in, y_nb, dtype)
    for row in (CENTER, VAR, INVSTD):
        close(params_in[row], params_nb[row], dtype, scale=10.0)
    n = x.numel() // c
    for other in grads[:3]:
        for name, got, want in zip(("x", "weight", "bias", "residual"), other, grads[3]):
            close(got, want, dtype, scale={"weight": 4 * n, "bias": n}.get(name, 8.0))


def test_a_call_runs_on_torchs_thread_count_within_numbas_pool():
    pool, big = numba.config.NUMBA_NUM_THREADS, numba_kernels.PARALLEL_NUMEL
    assert numba_kernels.threads(big - 1, pool) == 1  # below the threaded size: serial
    assert numba_kernels.threads(big, 1) == 1  # torch on one thread: serial
    assert numba_kernels.threads(big, 2) == min(2, pool)
    assert numba_kernels.threads(big, pool + 5) == pool  # never more than numba's pool


@pytest.mark.parametrize("shape", [(64, 32, 1, 1), (64, 32, 1)])
def test_one_value_per_row_runs_the_mc_kernels_with_torchs_strides(shape):
    """(N, C, 1, ...) input (a batch norm after a global pooling) is viewed as (M, C), the
    same memory, whose kernels vectorize across channels; outputs, gradients and strides are
    torch's, eager and compiled."""
    assert layout.kind_of(torch.empty(shape)) == "mc"
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    make = (lambda c: torch.nn.BatchNorm2d(c)) if len(shape) == 4 else (lambda c: torch.nn.BatchNorm1d(c))
    ours = (bn.BatchNorm2d if len(shape) == 4 else bn.BatchNorm1d)(32, backend="numba").double()
    theirs = make(32).double()
    compiled = torch.compile(copy.deepcopy(ours), backend="aot_eager", fullgraph=True)
    results = []
    for module in (theirs, ours, compiled):
        xi = x.clone().requires_grad_()
        y = module(xi)
        y.backward(dy)
        results.append((y, xi.grad, module.running_mean, module.running_var))
    want = results[0]
    for got in results[1:]:
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
            assert a.stride() == b.stride()
