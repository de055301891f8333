"""The `triton` backend against the float64 reference.

Without CUDA the kernels run in Triton's CPU interpreter: tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports triton (Triton reads it at import). The
interpreter is slow, so shapes are tiny but odd, and the tilings drawn by hypothesis are
small enough that every mask, every multi-tile program and every multi-program merge runs.
With CUDA the same tests run on the GPU, plus the full-size ResNet-50 / MLP rows.

Outputs are poisoned: each kernel writes into NaN-filled `out=` tensors, so an element it
forgets stays NaN and fails. Error bounds follow from the arithmetic: kernels compute in
fp32 (fp64 for fp64 input), so an error is at most a few ulps of the largest term that
entered the computation (ACC_TOL), plus the rounding of the output to its dtype (OUT_TOL).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

import batchnorm as bn  # noqa: E402
from batchnorm import activations, backends, layout, reference, stats  # noqa: E402
from batchnorm.backends import triton_gpu as tg  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
ACC_TOL = {torch.float32: 1e-5, torch.float64: 1e-12}  # compute error, per unit of the largest term
OUT_TOL = {torch.float32: 2**-22, torch.float16: 2**-10, torch.bfloat16: 2**-7, torch.float64: 2**-50}
KINKED = ("relu", "leaky_relu")  # g' jumps at u = 0
MAX_TILE_STEPS = 48  # tile iterations per launch, to keep the interpreter fast
EXAMPLES = settings(max_examples=12, deadline=None)
# The interpreter evaluates sigmoid's exp(-u) in numpy, which warns where it overflows to inf
# (the result, 1 / (1 + inf) = 0, is the right one).
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


if not CUDA and not tg.interpreting():
    pytest.skip(
        "no GPU and TRITON_INTERPRET is not set: run through tests/conftest.py, which sets it "
        "before triton is imported",
        allow_module_level=True,
    )


# --- inputs ------------------------------------------------------------------------------


class Case:
    """A canonical view x, its tiling, and per-channel statistics as functional would pass."""

    def __init__(self, shape, dtype, tiling, offset, spread, seed):
        g = torch.Generator(device=DEVICE).manual_seed(seed)
        self.dtype, self.acc, self.tiling = dtype, reference.acc_dtype(dtype), tiling

        def rand(spread=1.0, offset=0.0):
            return (torch.randn(shape, generator=g, device=DEVICE) * spread + offset).to(dtype)

        self.x = rand(spread, offset)
        self.dy = rand()
        self.res = rand()
        _, mean, m2 = reference.stats(self.x.double())
        invstd = torch.rsqrt(m2 / layout.values_per_channel(self.x) + 1e-5)
        c = shape[1]
        weight = torch.randn(c, generator=g, device=DEVICE, dtype=torch.float64) + 0.5
        bias = torch.randn(c, generator=g, device=DEVICE, dtype=torch.float64)
        scale, shift = reference.affine(invstd, weight, bias)
        self.vectors = [t.to(self.acc) for t in (mean, invstd, scale, shift)]

    def residual(self, with_residual):
        return self.res if with_residual else None

    def __repr__(self):
        return f"Case({tuple(self.x.shape)}, {self.dtype}, {self.tiling})"


@st.composite
def cases(draw, dtypes=DTYPES):
    """An (N, C, L) or (M, C) view with odd sizes, and a small tiling of it (or the default)."""
    c = draw(st.integers(1, 6))
    if draw(st.booleans()):
        shape = (draw(st.integers(1, 5)), c, draw(st.integers(1, 40)))
    else:
        shape = (draw(st.integers(2, 40)), c)
    tiling = None
    if draw(st.booleans()):
        block_c, block_l = draw(st.sampled_from([1, 2, 4, 8])), draw(st.sampled_from([1, 2, 4, 8, 16, 32]))
        tiles = draw(st.integers(1, 4))
        g = tg.geometry(torch.empty(shape))
        while block_c * block_l < 64 and _steps(g, tg.Tiling(block_c, block_l, tiles)) > MAX_TILE_STEPS:
            block_c, block_l = 2 * block_c, 2 * block_l
        tiling = tg.Tiling(block_c, block_l, tiles)
    offset = draw(st.sampled_from([0.0, 3.0, -50.0]))
    spread = draw(st.sampled_from([1.0, 0.1, 4.0]))
    return Case(shape, draw(st.sampled_from(dtypes)), tiling, offset, spread, draw(st.integers(0, 2**16)))


def _steps(g, tiling):
    grid = tg.grid_of(g, tiling)
    return grid.channel_blocks * grid.t


def nans(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


# --- comparisons -------------------------------------------------------------------------


def out_rounding(expected, dtype):
    """The rounding of an output to `dtype`: relative, with an absolute floor where the
    output is subnormal (fp16's subnormals are 2**-24 apart)."""
    return OUT_TOL[dtype] * (expected.abs() + torch.finfo(dtype).tiny)


def assert_within(actual, expected, bound, what):
    """|actual - expected| <= bound elementwise (bound broadcasts); NaN always fails."""
    actual, expected = actual.double(), expected.double()
    assert not torch.isnan(actual).any(), f"{what}: NaN in the output (an element left unwritten?)"
    excess = (actual - expected).abs() - bound
    assert float(excess.max()) <= 0, f"{what}: error above the bound by {float(excess.max()):.3g}"


def _u_terms(case, with_residual):
    """The terms summed into u = (x - mean) scale + shift (+ residual), elementwise."""
    x = case.x.double()
    mean, _, scale, shift = (layout.per_channel(v.double(), x) for v in case.vectors)
    terms = [(x - mean) * scale, shift.expand_as(x)]
    return terms + [case.res.double()] if with_residual else terms


def u_magnitude(case, with_residual):
    """|(x - mean) scale| + |shift| (+ |residual|): the scale of u's rounding, elementwise."""
    return sum(t.abs() for t in _u_terms(case, with_residual))


def ambiguous(case, activation, with_residual):
    """Elements whose u lies within rounding of the kink of relu / leaky relu (g' may differ)."""
    if activation not in KINKED:
        return torch.zeros_like(case.x, dtype=torch.bool)
    u = sum(_u_terms(case, with_residual))
    return u.abs() <= 4 * ACC_TOL[case.acc] * u_magnitude(case, with_residual)


# --- the contract ------------------------------------------------------------------------


def check_stats(case):
    c = case.x.shape[1]
    out = tuple(nans((c,), case.acc) for _ in range(3))
    count, mean, m2 = tg.stats(case.x, tiling=case.tiling, out=out)
    assert all(a is b for a, b in zip((count, mean, m2), out))
    rcount, rmean, rm2 = reference.stats(case.x.double())
    assert torch.equal(count.double(), rcount)
    xmax = float(case.x.double().abs().max())
    tol = ACC_TOL[case.acc]
    assert_within(mean, rmean, tol * xmax, "mean")
    # Each deviation is off by ~eps |x|, so each squared term by ~2 eps |x - mu| |x|.
    n = layout.values_per_channel(case.x)
    assert_within(m2, rm2, tol * (rm2 + n * (rm2 / n).sqrt() * xmax), "m2")


def check_apply(case, activation, with_residual):
    res = case.residual(with_residual)
    mean, _, scale, shift = case.vectors
    out = nans(case.x.shape, case.dtype)
    y = tg.apply(case.x, mean, scale, shift, activation, res, tiling=case.tiling, out=out)
    assert y is out
    expected = reference.apply(
        case.x.double(), *(v.double() for v in (mean, scale, shift)), activation,
        None if res is None else res.double(),
    )
    bound = ACC_TOL[case.acc] * u_magnitude(case, with_residual).clamp(min=1) + out_rounding(expected, case.dtype)
    assert_within(y, expected, bound, f"apply {activation}")


def _reference_backward(case, activation, with_residual, training):
    """The reference's (sum_d, sum_d_xhat), (mean_d, mean_d_xhat) and (dx, dres) in fp64."""
    args = [v.double() for v in case.vectors]
    res = case.residual(with_residual)
    res = None if res is None else res.double()
    sums = reference.backward_reduce(case.dy.double(), case.x.double(), *args, activation, res)
    n = layout.values_per_channel(case.x)
    means = [s / n if training else torch.zeros_like(s) for s in sums]
    grads = reference.backward_apply(case.dy.double(), case.x.double(), *args, *means, activation, res)
    return sums, means, grads


def _d_size(case, activation, with_residual):
    """The scale of d = dy g'(u)'s rounding: |dy| (1 + the |u| terms) when g' is recomputed."""
    grow = 1.0 if activation is None else 1.0 + u_magnitude(case, with_residual)
    return case.dy.double().abs() * grow


def _xhat_size(case):
    """The scale of xhat = (x - mean) invstd's rounding: (|x - mean| + |x|) invstd."""
    x = case.x.double()
    mean, invstd = (layout.per_channel(v.double(), x) for v in case.vectors[:2])
    return ((x - mean).abs() + x.abs()) * invstd


def check_backward_reduce(case, activation, with_residual):
    mean, invstd, scale, shift = case.vectors
    out = nans((2, case.x.shape[1]), case.acc)
    sums = tg.backward_reduce(
        case.dy, case.x, mean, invstd, scale, shift, activation, case.residual(with_residual),
        tiling=case.tiling, out=out,
    )
    assert sums is out
    (e_sum_d, e_sum_d_xhat), _, _ = _reference_backward(case, activation, with_residual, True)
    # Where g' may have jumped, the whole |dy| (1 + |xhat|) term may differ.
    jump = torch.where(ambiguous(case, activation, with_residual), case.dy.double().abs(), 0.0)
    per_element = ACC_TOL[case.acc] * _d_size(case, activation, with_residual) + jump
    dims = layout.reduce_dims(case.x)
    assert_within(sums[0], e_sum_d, per_element.sum(dims), "sum_d")
    assert_within(sums[1], e_sum_d_xhat, (per_element * (1 + _xhat_size(case))).sum(dims), "sum_d_xhat")


def check_backward_apply(case, activation, with_residual, training):
    mean, invstd, scale, shift = case.vectors
    res = case.residual(with_residual)
    _, (mean_d, mean_d_xhat), (e_dx, e_dres) = _reference_backward(case, activation, with_residual, training)
    out = nans(case.x.shape, case.dtype)
    out_res = None if res is None else nans(case.x.shape, case.dtype)
    dx, dres = tg.backward_apply(
        case.dy, case.x, mean, invstd, scale, shift, mean_d.to(case.acc), mean_d_xhat.to(case.acc),
        activation, res, tiling=case.tiling, out=out, out_residual=out_res,
    )
    assert dx is out and dres is out_res
    pc = lambda t: layout.per_channel(t.double(), case.x)  # noqa: E731
    d_size = _d_size(case, activation, with_residual)
    # dx = scale (d - mean_d - xhat mean_d_xhat): the terms, not the result, set the rounding.
    terms = pc(scale).abs() * (d_size + pc(mean_d).abs() + _xhat_size(case) * pc(mean_d_xhat).abs())
    keep = ~ambiguous(case, activation, with_residual)
    bound = ACC_TOL[case.acc] * terms + out_rounding(e_dx, case.dtype)
    assert_within(dx[keep], e_dx[keep], bound[keep], f"dx {activation}")
    if res is not None:
        d_bound = ACC_TOL[case.acc] * d_size + out_rounding(e_dres, case.dtype)
        assert_within(dres[keep], e_dres[keep], d_bound[keep], f"dresidual {activation}")


@EXAMPLES
@given(case=cases())
def test_stats_matches_reference(case):
    check_stats(case)


@EXAMPLES
@given(case=cases(), activation=st.sampled_from(activations.NAMES), with_residual=st.booleans())
def test_apply_matches_reference(case, activation, with_residual):
    check_apply(case, activation, with_residual)


@EXAMPLES
@given(case=cases(), activation=st.sampled_from(activations.NAMES), with_residual=st.booleans())
def test_backward_reduce_matches_reference(case, activation, with_residual):
    check_backward_reduce(case, activation, with_residual)


@EXAMPLES
@given(
    case=cases(),
    activation=st.sampled_from(activations.NAMES),
    with_residual=st.booleans(),
    training=st.booleans(),
)
def test_backward_apply_matches_reference(case, activation, with_residual, training):
    check_backward_apply(case, activation, with_residual, training)


# --- the workspace and its merge ---------------------------------------------------------


def _program_regions(x, tiling):
    """For each program p of the reduction grid, the (n, l) positions its tiles cover."""
    g = tg.geometry(x)
    grid = tg.grid_of(g, tiling)
    regions = []
    for p in range(grid.programs):
        cells = []
        for t in range(p * tiling.tiles, min((p + 1) * tiling.tiles, grid.t)):
            n, lb = divmod(t, grid.lb)
            cells += [(n, l) for l in range(lb * tiling.block_l, min((lb + 1) * tiling.block_l, g.l))]
        regions.append(cells)
    return regions


def _as_ncl(x):
    """The (N, C, L) array the kernels index: (M, C) is N = 1, L = M."""
    g = tg.geometry(x)
    return x.reshape(g.n, g.l, g.c).transpose(1, 2) if g.s_c == 1 else x


@pytest.mark.parametrize("shape, tiling", [((3, 5, 37), tg.Tiling(2, 8, 3)), ((29, 6), tg.Tiling(4, 4, 2))])
def test_workspace_rows_are_program_regions_merged_in_order(shape, tiling):
    case = Case(shape, torch.float32, tiling, 3.0, 1.0, seed=5)
    grid = tg.grid_of(tg.geometry(case.x), tiling)
    assert grid.programs > 2 and tiling.tiles > 1  # several programs, several tiles each
    parts = tg.stats_partials(case.x, tiling=tiling, out=tuple(nans((grid.programs, shape[1]), torch.float32) for _ in range(3)))
    ncl = _as_ncl(case.x.double())
    for p, cells in enumerate(_program_regions(case.x, tiling)):
        values = torch.stack([ncl[n, :, l] for n, l in cells])  # (cells, C): an (M, C) view
        count, mean, m2 = reference.stats(values)
        assert torch.equal(parts[0][p].double(), count)
        assert_within(parts[1][p], mean, 1e-5 * float(values.abs().max()), f"mean of program {p}")
        assert_within(parts[2][p], m2, 1e-5 * (m2 + 1), f"m2 of program {p}")
    merged = tg.merge_stats(*parts, out=tuple(nans((shape[1],), torch.float32) for _ in range(3)))
    expected = stats.merge_stacked(*(t.double() for t in parts))
    folded = stats.Stats(*(t[0].double() for t in parts))
    for k in range(1, grid.programs):
        folded = stats.merge(folded, stats.Stats(*(t[k].double() for t in parts)))
    for got, want, again in zip(merged, expected, folded):
        assert_within(got, want, 1e-5 * (want.abs() + 1), "merged statistics")
        assert_within(want, again, 1e-9 * (want.abs() + 1), "stacked merge vs sequential merge")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic_bitwise(dtype):
    case = Case((4, 3, 33), dtype, tg.Tiling(2, 8, 2), 1.0, 2.0, seed=11)
    mean, invstd, scale, shift = case.vectors
    first = tg.stats(case.x, tiling=case.tiling)
    second = tg.stats(case.x, tiling=case.tiling)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    args = (case.dy, case.x, mean, invstd, scale, shift, "silu", case.res)
    assert torch.equal(tg.backward_reduce(*args, tiling=case.tiling), tg.backward_reduce(*args, tiling=case.tiling))


# --- what the backend takes, and how it is chosen ----------------------------------------


def test_availability_and_support(monkeypatch):
    be = backends.get("triton")
    assert be.unavailable() is None
    x = torch.randn(2, 3, 4, 5, device=DEVICE)
    assert be.unsupported(x) is None
    assert be.unsupported(x.to(memory_format=torch.channels_last)) is None
    assert "strided" in be.unsupported(x[:, :, ::2])
    assert "strided" in be.unsupported(torch.randn(4, 6, device=DEVICE)[:, :3])
    assert "empty" in be.unsupported(x[:0])
    assert "dtype" in be.unsupported(x.to(torch.int32))
    assert be.preferred(x) == CUDA
    assert be.preferred(x.double()) is False
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "CPU" in be.unsupported(torch.randn(2, 3))
    assert be.preferred(torch.randn(2, 3)) is False


def test_bad_arguments_raise_clear_errors():
    x = torch.randn(3, 4, 6, device=DEVICE)
    zeros, ones = torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE)
    with pytest.raises(ValueError, match="contiguous"):
        tg.stats(x[:, :, ::2])
    with pytest.raises(ValueError, match="out must be"):
        tg.apply(x, zeros, ones, zeros, out=torch.empty(3, 4, 5, device=DEVICE))
    with pytest.raises(ValueError, match="activation"):
        tg.apply(x, zeros, ones, zeros, "swish")


def test_tiling_never_one_program_per_channel():
    # (256, 64, 112, 112) and (256, 2048, 7, 7) as the kernels see them, for a 132-SM GPU.
    for g in (tg.Geometry(256, 64, 12544, 64 * 12544, 12544, 1), tg.Geometry(256, 2048, 49, 2048 * 49, 49, 1)):
        tiling = tg.tiling_for(g, tg.PROGRAMS_PER_SM * 132)
        grid = tg.grid_of(g, tiling)
        assert grid.channel_blocks * grid.programs >= 2 * 132 > g.c * 0  # fills the GPU
        assert grid.programs > 1 and tiling.block_c * tiling.block_l <= tg.TILE_ELEMENTS


# --- end to end through the module -------------------------------------------------------


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_batchnorm2d_matches_torch(memory_format):
    torch.manual_seed(0)
    ours = bn.BatchNorm2d(5, backend="triton").to(DEVICE)
    theirs = torch.nn.BatchNorm2d(5).to(DEVICE)
    with torch.no_grad():
        for m in (ours, theirs):
            m.weight.copy_(torch.linspace(0.5, 1.5, 5))
            m.bias.copy_(torch.linspace(-1, 1, 5))
    for step in range(2):
        x = (torch.randn(3, 5, 6, 7, device=DEVICE) * 2 + step).to(memory_format=memory_format)
        assert backends.resolve("triton", x).reason == "forced"
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), theirs(xb)
        torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
        grad = torch.randn_like(ya)
        ya.backward(grad)
        yb.backward(grad)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.bias.grad, theirs.bias.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    ours.eval(), theirs.eval()
    x = torch.randn(2, 5, 3, 3, device=DEVICE).to(memory_format=memory_format)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_fused_residual_and_activation_match_reference_backend():
    torch.manual_seed(1)
    x = torch.randn(4, 3, 5, 5, device=DEVICE, dtype=torch.float64)
    res = torch.randn_like(x)
    grads = {}
    for name in ("triton", "reference"):
        layer = bn.BatchNorm2d(3, activation="gelu", backend=name).to(DEVICE, torch.float64)
        xs, rs = x.clone().requires_grad_(), res.clone().requires_grad_()
        y = layer(xs, residual=rs)
        y.backward(torch.cos(y))
        grads[name] = (y, xs.grad, rs.grad, layer.weight.grad, layer.bias.grad, layer.running_var)
    for got, want in zip(grads["triton"], grads["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


# --- full size, on a GPU only (scripts/gpu_check.sh) -------------------------------------

# ResNet-50's batch-norm inputs at batch 256 as (N, C, H W) and as channels-last (N H W, C)
# views, and MLP activations (M, C).
RESNET50 = [(256, 64, 112 * 112), (256, 256, 56 * 56), (256, 512, 28 * 28), (256, 1024, 14 * 14), (256, 2048, 7 * 7)]
VIEWS = RESNET50 + [(n * l, c) for n, c, l in RESNET50] + [(256, 4096), (8192, 1024)]


@pytest.mark.skipif(not CUDA, reason="full-size shapes need a GPU")
@pytest.mark.parametrize("shape", VIEWS, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_full_size(shape, dtype):
    case = Case(shape, dtype, None, 0.5, 2.0, seed=0)
    check_stats(case)
    check_apply(case, "relu", True)
    check_backward_reduce(case, "relu", True)
    check_backward_apply(case, "relu", True, True)
