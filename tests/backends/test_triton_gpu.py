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
from batchnorm import activations, backends, layout, modes, reference, stats  # noqa: E402
from batchnorm.backends import gpu_rule  # noqa: E402
from batchnorm.backends import triton_gpu as tg  # noqa: E402
from kernels.poison import poisoned_allocations  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
ACC_TOL = {torch.float32: 1e-5, torch.float64: 1e-12}  # compute error, per unit of the largest term
OUT_TOL = {torch.float32: 2**-22, torch.float16: 2**-10, torch.bfloat16: 2**-7, torch.float64: 2**-50}
KINKED = ("relu", "leaky_relu")  # g' jumps at u = 0
MAX_TILE_STEPS = 48  # tile iterations per launch, to keep the interpreter fast
EXAMPLES = settings(max_examples=12, deadline=None)
# The interpreter evaluates sigmoid's exp(-u) in numpy, which warns where it overflows to inf
# (the result, 1 / (1 + inf) = 0, is the right one). In the interpreter these tests are
# slow (`make check` leaves them out; `make test` runs them).
pytestmark = [pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")] + (
    [] if CUDA else [pytest.mark.slow]
)


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
        self.weight, self.bias = weight, bias  # fp64; the whole-op tests round them
        self.running = (torch.randn(c, generator=g, device=DEVICE, dtype=torch.float64),
                        torch.rand(c, generator=g, device=DEVICE, dtype=torch.float64) + 0.5)  # fmt: skip

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


def sums_bounds(case, activation, with_residual):
    """Error bounds (C,) of (sum_d, sum_d_xhat): a few ulps of each summed term, and where g'
    may have jumped, the whole |dy| (1 + |xhat|) term."""
    jump = torch.where(ambiguous(case, activation, with_residual), case.dy.double().abs(), 0.0)
    per_element = ACC_TOL[case.acc] * _d_size(case, activation, with_residual) + jump
    dims = layout.reduce_dims(case.x)
    return per_element.sum(dims), (per_element * (1 + _xhat_size(case))).sum(dims)


def check_backward_reduce(case, activation, with_residual):
    mean, invstd, scale, shift = case.vectors
    out = nans((2, case.x.shape[1]), case.acc)
    sums = tg.backward_reduce(
        case.dy, case.x, mean, invstd, scale, shift, activation, case.residual(with_residual),
        tiling=case.tiling, out=out,
    )
    assert sums is out
    (e_sum_d, e_sum_d_xhat), _, _ = _reference_backward(case, activation, with_residual, True)
    bound_d, bound_d_xhat = sums_bounds(case, activation, with_residual)
    assert_within(sums[0], e_sum_d, bound_d, "sum_d")
    assert_within(sums[1], e_sum_d_xhat, bound_d_xhat, "sum_d_xhat")


def assert_dx_within(case, activation, with_residual, dx, dres, expected, means, means_error=(0.0, 0.0)):
    """dx and dresidual against the reference's, at the rounding of dx = scale (d - mean_d -
    xhat mean_d_xhat)'s terms (not of the result), plus `means_error` (C,) when the kernel
    computed mean_d and mean_d_xhat itself; elements near a kink of g are skipped."""
    (e_dx, e_dres), (mean_d, mean_d_xhat) = expected, means
    scale = case.vectors[2]
    pc = lambda t: layout.per_channel(torch.as_tensor(t).double(), case.x)  # noqa: E731
    d_size = _d_size(case, activation, with_residual)
    terms = pc(scale).abs() * (d_size + pc(mean_d).abs() + _xhat_size(case) * pc(mean_d_xhat).abs())
    slack = pc(scale).abs() * (pc(means_error[0]) + _xhat_size(case) * pc(means_error[1]))
    keep = ~ambiguous(case, activation, with_residual)
    bound = ACC_TOL[case.acc] * terms + slack + out_rounding(e_dx, case.dtype)
    assert_within(dx[keep], e_dx[keep], bound[keep], f"dx {activation}")
    if with_residual:
        d_bound = ACC_TOL[case.acc] * d_size + out_rounding(e_dres, case.dtype)
        assert_within(dres[keep], e_dres[keep], d_bound[keep], f"dresidual {activation}")


def check_backward_apply(case, activation, with_residual, training):
    mean, invstd, scale, shift = case.vectors
    res = case.residual(with_residual)
    _, means, expected = _reference_backward(case, activation, with_residual, training)
    out = nans(case.x.shape, case.dtype)
    out_res = None if res is None else nans(case.x.shape, case.dtype)
    dx, dres = tg.backward_apply(
        case.dy, case.x, mean, invstd, scale, shift, *(m.to(case.acc) for m in means),
        activation, res, tiling=case.tiling, out=out, out_residual=out_res,
    )
    assert dx is out and dres is out_res
    assert_dx_within(case, activation, with_residual, dx, dres, expected, means)


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
@pytest.mark.slow
def test_deterministic_bitwise(dtype):
    case = Case((4, 3, 33), dtype, tg.Tiling(2, 8, 2), 1.0, 2.0, seed=11)
    mean, invstd, scale, shift = case.vectors
    first = tg.stats(case.x, tiling=case.tiling)
    second = tg.stats(case.x, tiling=case.tiling)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    args = (case.dy, case.x, mean, invstd, scale, shift, "silu", case.res)
    assert torch.equal(tg.backward_reduce(*args, tiling=case.tiling), tg.backward_reduce(*args, tiling=case.tiling))


# --- the whole op: fused finalize (tiled) and single-read paths --------------------------

# `single_read` limits for the small test shapes: 0 never takes the single-read path, 2**16
# always does (every drawn shape has N L <= 200 values per channel).
PATHS = {"tiled": 0, "single": 1 << 16}
EPS = 1e-5


def _param_dtype(case, mixed):
    """fp32 parameters and buffers (torch's mixed case for half x), or x's own dtype."""
    return torch.float32 if mixed else case.dtype


def forward_bound(case, with_residual, mean, invstd, scale):
    """Error bound of y, elementwise, from fp64 (mean, invstd, scale): the rounding of u's
    terms; mean off by ~eps |x|max (scaled by |scale|); invstd off by ~eps (1 + |x|max / std)
    relatively (check_stats' bound on m2), which scales the (x - mean) scale term. g's slope
    is at most 1.13 (gelu), so 1.2 carries u's bound to y."""
    x = case.x.double()
    xmax = float(x.abs().max())
    pc = lambda t: layout.per_channel(t, x)  # noqa: E731
    centered = (x - pc(mean)).abs() * pc(scale).abs()
    mean_term, invstd_term = pc(scale).abs() * xmax, centered * (1 + xmax * pc(invstd))
    return 1.2 * ACC_TOL[case.acc] * (u_magnitude(case, with_residual) + mean_term + invstd_term)


def check_whole_forward(case, activation, with_residual, mode, single_read, mixed, affine):
    """tg.forward against the reference: y, the vectors, and the running statistics left
    untouched (mode "train" or "eval"; the op layer updates them). Allocations are poisoned."""
    pdtype = _param_dtype(case, mixed)
    weight, bias = (t.to(pdtype) if affine else None for t in (case.weight, case.bias))
    running = [t.to(pdtype) for t in case.running]
    before = [t.clone() for t in running]
    res = case.residual(with_residual)
    with poisoned_allocations():
        f = tg.forward(
            case.x, weight, bias, *running, EPS, activation, res, training=mode != "eval",
            tiling=case.tiling, single_read=single_read,
        )  # fmt: skip
    x64 = case.x.double()
    w64, b64 = (None if t is None else t.double() for t in (weight, bias))
    r64 = [t.double() for t in before]
    if mode == "eval":
        mean, var = r64
    else:
        count, mean, m2 = reference.stats(x64)
        var = m2 / count
    invstd = torch.rsqrt(var + EPS)
    scale, shift = reference.affine(invstd, w64, b64)
    expected = reference.batch_norm(
        x64, w64, b64, running_mean=r64[0] if mode == "eval" else None,
        running_var=r64[1] if mode == "eval" else None, eps=EPS, activation=activation,
        residual=None if res is None else res.double(),
    )  # fmt: skip
    assert f.y.dtype == case.dtype and f.mean.dtype == case.acc
    bound = forward_bound(case, with_residual, mean, invstd, scale) + out_rounding(expected, case.dtype)
    assert_within(f.y, expected, bound, f"y {mode}")
    tol, xmax = ACC_TOL[case.acc], float(x64.abs().max())
    std = var.sqrt()
    assert_within(f.mean, mean, tol * xmax, "mean")
    invstd_bound = 2 * tol * invstd * (1 + xmax / (std + EPS**0.5))
    assert_within(f.invstd, invstd, invstd_bound, "invstd")
    assert_within(f.scale, scale, invstd_bound * (1 if w64 is None else w64.abs()), "scale")
    assert_within(f.shift, shift, 0.0, "shift")
    assert all(torch.equal(a, b) for a, b in zip(running, before)), "running statistics changed"


def check_whole_backward(case, activation, with_residual, training, single_read, mixed):
    """tg.backward from the case's vectors against the reference: dweight, dbias in the
    parameters' dtype, dx and dresidual. Allocations are poisoned."""
    pdtype = _param_dtype(case, mixed)
    with poisoned_allocations():
        grads = tg.backward(
            case.dy, case.x, *case.vectors, activation, case.residual(with_residual), training=training,
            weight_dtype=pdtype, bias_dtype=pdtype, tiling=case.tiling, single_read=single_read,
        )  # fmt: skip
    (sum_d, sum_d_xhat), means, expected = _reference_backward(case, activation, with_residual, training)
    bound_d, bound_d_xhat = sums_bounds(case, activation, with_residual)
    assert grads.dweight.dtype == pdtype and grads.dbias.dtype == pdtype
    assert_within(grads.dbias, sum_d, bound_d + out_rounding(sum_d, pdtype), "dbias")
    assert_within(grads.dweight, sum_d_xhat, bound_d_xhat + out_rounding(sum_d_xhat, pdtype), "dweight")
    # The kernels compute mean_d, mean_d_xhat from their own sums: those sums' error / n.
    n = layout.values_per_channel(case.x)
    means_error = (bound_d / n, bound_d_xhat / n) if training else (0.0, 0.0)
    assert_dx_within(case, activation, with_residual, grads.dx, grads.dresidual, expected, means, means_error)


@EXAMPLES
@given(
    case=cases(),
    activation=st.sampled_from(activations.NAMES),
    with_residual=st.booleans(),
    mode=st.sampled_from(["train", "eval"]),
    path=st.sampled_from(sorted(PATHS)),
    mixed=st.booleans(),
    affine=st.booleans(),
)
def test_whole_op_forward_matches_reference(case, activation, with_residual, mode, path, mixed, affine):
    check_whole_forward(case, activation, with_residual, mode, PATHS[path], mixed, affine)


@EXAMPLES
@given(
    case=cases(),
    activation=st.sampled_from(activations.NAMES),
    with_residual=st.booleans(),
    training=st.booleans(),
    path=st.sampled_from(sorted(PATHS)),
    mixed=st.booleans(),
)
def test_whole_op_backward_matches_reference(case, activation, with_residual, training, path, mixed):
    check_whole_backward(case, activation, with_residual, training, PATHS[path], mixed)


@pytest.mark.parametrize("path", sorted(PATHS))
def test_whole_op_gradient_subsets(path):
    """Evaluation without parameter gradients skips the reduction; need_dx=False skips dx."""
    case = Case((3, 4, 9), torch.float32, tg.Tiling(2, 4, 2), 1.0, 1.0, seed=3)
    with poisoned_allocations():
        only_dx = tg.backward(case.dy, case.x, *case.vectors, "relu", case.res, training=False,
                              tiling=case.tiling, single_read=PATHS[path])  # fmt: skip
        only_params = tg.backward(case.dy, case.x, *case.vectors, "relu", case.res, weight_dtype=torch.float32,
                                  bias_dtype=torch.float32, need_dx=False, tiling=case.tiling,
                                  single_read=PATHS[path])  # fmt: skip
    (sum_d, sum_d_xhat), means, expected = _reference_backward(case, "relu", True, False)
    assert only_dx.dweight is None and only_dx.dbias is None
    assert_dx_within(case, "relu", True, only_dx.dx, only_dx.dresidual, expected, means)
    if path == "tiled":
        assert only_params.dx is None and only_params.dresidual is None
    bound_d, bound_d_xhat = sums_bounds(case, "relu", True)
    assert_within(only_params.dbias, sum_d, bound_d, "dbias")
    assert_within(only_params.dweight, sum_d_xhat, bound_d_xhat, "dweight")


class _LaunchCounter:
    """Stands in for the kernels module: counts each kernel's launches."""

    def __init__(self, kernels):
        self.kernels, self.launches = kernels, []

    def __getattr__(self, name):
        kernel = getattr(self.kernels, name)
        counter = self

        class Launcher:
            def __getitem__(self, grid):
                counter.launches.append(name)
                return kernel[grid]

        return Launcher()


@pytest.mark.parametrize("path, forward_launches, backward_launches", [
    ("tiled", ["stats_partials_kernel", "merge_stats_kernel", "apply_kernel"],
     ["grad_partials_kernel", "merge_sums_kernel", "backward_apply_kernel"]),
    ("single", ["single_read_forward_kernel"], ["single_read_backward_kernel"]),
])  # fmt: skip
def test_whole_op_launches(monkeypatch, path, forward_launches, backward_launches):
    """Three launches (two on evaluation) on the tiled path, one on the single-read path."""
    counter = _LaunchCounter(tg._kernels())
    monkeypatch.setattr(tg, "_kernels", lambda: counter)
    case = Case((13, 5), torch.bfloat16, tg.Tiling(2, 4, 2), 2.0, 1.0, seed=4)
    running = [t.float() for t in case.running]
    weight = case.weight.float()
    f = tg.forward(case.x, weight, None, *running, EPS, "relu", None, tiling=case.tiling, single_read=PATHS[path])
    assert counter.launches == forward_launches
    counter.launches.clear()
    tg.backward(case.dy, case.x, *f.vectors, "relu", weight_dtype=torch.float32, tiling=case.tiling,
                single_read=PATHS[path])  # fmt: skip
    assert counter.launches == backward_launches
    counter.launches.clear()
    tg.forward(case.x, weight, None, *running, EPS, training=False, tiling=case.tiling, single_read=PATHS[path])
    assert counter.launches == ["merge_stats_kernel", "apply_kernel"]


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.slow
def test_whole_op_deterministic_bitwise(path):
    case = Case((4, 3, 33), torch.bfloat16, tg.Tiling(2, 8, 2), 1.0, 2.0, seed=12)
    runs = []
    for _ in range(2):
        running = [t.float() for t in case.running]
        f = tg.forward(case.x, case.weight.float(), case.bias.float(), *running, EPS, "silu", case.res,
                       tiling=case.tiling, single_read=PATHS[path])  # fmt: skip
        g = tg.backward(case.dy, case.x, *f.vectors, "silu", case.res, weight_dtype=torch.float32,
                        bias_dtype=torch.float32, tiling=case.tiling, single_read=PATHS[path])  # fmt: skip
        runs.append([*f, *g])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("shape", [(3, 4, 9), (29, 6)], ids=str)
@pytest.mark.parametrize("wide", [False, True], ids=["int32", "int64"])
def test_single_read_offsets(monkeypatch, shape, wide):
    """The single-read kernels index in int32 below INT32_OFFSETS elements and in int64 from
    there (WIDE): both against the reference, both views."""
    monkeypatch.setattr(tg, "INT32_OFFSETS", 0 if wide else 2**31)
    assert tg._single_read_sizes(tg.geometry(torch.empty(shape)), 2)["WIDE"] is wide
    case = Case(shape, torch.float32, None, 1.0, 1.0, seed=7)
    check_whole_forward(case, "relu", True, "train", PATHS["single"], True, True)
    check_whole_backward(case, "relu", True, True, PATHS["single"], True)


def test_single_read_rule():
    """On a 132-SM GPU: MLP activations that fit take the single-read path, wide enough to
    read whole sectors and spread over the SMs; so does (128, 512, 7, 7) as (N, C, L) (N L =
    6272 values per channel, one channel per program); ResNet-50's (256, 2048, 7, 7) (12544,
    over SINGLE_READ_ELEMENTS since 16 values per thread keep the kernels at 25% occupancy),
    the larger rows and tall (M, C) views take the tiled path."""
    sms = 132
    mlp = tg.geometry(torch.empty(256, 4096))
    block_c = tg.single_read_block(mlp, programs=sms)
    assert block_c is not None and block_c >= tg.SINGLE_READ_MIN_CHANNELS
    assert block_c * 256 <= tg.SINGLE_READ_ELEMENTS and -(-4096 // block_c) >= sms
    assert tg.single_read_block(tg.geometry(torch.empty(8192, 1024)), programs=sms) is None
    assert tg.single_read_block(tg.Geometry(128, 512, 49, 512 * 49, 49, 1), programs=sms) == 1
    assert tg.single_read_block(tg.Geometry(256, 2048, 49, 2048 * 49, 49, 1), programs=sms) is None
    assert tg.single_read_block(tg.Geometry(256, 1024, 196, 1024 * 196, 196, 1), programs=sms) is None
    # The same 7 x 7 row channels-last: a 16-channel column of 12544 rows does not fit.
    assert tg.single_read_block(tg.geometry(torch.empty(256 * 49, 2048)), programs=sms) is None
    # Too narrow a column of an (M, C) view to read whole sectors: tiled.
    assert tg.single_read_block(tg.geometry(torch.empty(4096, 64)), programs=sms) is None


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
    # auto takes triton on CUDA where the recorded runs put x's shape class, nowhere else
    monkeypatch.setattr(gpu_rule, "prefers_triton", lambda x: True)
    assert be.preferred(x, modes.EAGER) == CUDA
    assert be.preferred(x.double(), modes.EAGER) is False
    monkeypatch.setattr(gpu_rule, "prefers_triton", lambda x: False)
    assert be.preferred(x, modes.EAGER) is False
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "CPU" in be.unsupported(torch.randn(2, 3))
    assert be.preferred(torch.randn(2, 3), modes.EAGER) is False


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


def test_tile_sizes():
    """TILE_ELEMENTS per tile (16 values per thread) where the contiguous axis is a multiple
    of 16 long, UNALIGNED_TILE_ELEMENTS (4 per thread) where its loads cannot vectorize."""
    programs = tg.PROGRAMS_PER_SM * 132

    def elements(g):
        tiling = tg.tiling_for(g, programs)
        return tiling.block_c * tiling.block_l

    ncl = lambda n, c, l: tg.Geometry(n, c, l, c * l, l, 1)  # noqa: E731
    mc = lambda m, c: tg.geometry(torch.empty(m, c, device="meta"))  # noqa: E731
    assert elements(ncl(256, 64, 112 * 112)) == elements(ncl(256, 512, 28 * 28)) == tg.TILE_ELEMENTS
    assert elements(ncl(256, 2048, 7 * 7)) == elements(ncl(256, 1024, 14 * 14)) == tg.UNALIGNED_TILE_ELEMENTS
    assert elements(mc(256 * 49, 2048)) == elements(mc(4096, 1024)) == tg.TILE_ELEMENTS
    assert elements(mc(64, 100)) == tg.UNALIGNED_TILE_ELEMENTS


# --- end to end through the module -------------------------------------------------------


@pytest.fixture(params=sorted(PATHS))
def path(request, monkeypatch):
    """The module-level path: single-read, or tiled with small tiles spread over several
    programs (so the fused merge sees several partials)."""
    monkeypatch.setattr(tg, "SINGLE_READ_ELEMENTS", PATHS[request.param])
    monkeypatch.setattr(tg, "TILE_ELEMENTS", 8)
    monkeypatch.setattr(tg, "PROGRAMS_PER_SM", 64)
    return request.param


TORCH_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.mark.slow
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_functional_update_matches_torch(path, dtype, memory_format):
    """bn.functional.batch_norm (training, running statistics: normalize_updating) against
    torch.nn.functional.batch_norm in float64 on the same rounded values: y, the running
    statistics (momentum, unbiased variance), and the gradients of x, weight, bias, residual,
    with our allocations poisoned. Half inputs take fp32 parameters and buffers (torch's
    mixed case)."""
    torch.manual_seed(2)
    pdtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    x = (torch.randn(3, 5, 4, 3, device=DEVICE) * 2 + 1).to(dtype).to(memory_format=memory_format)
    res = torch.randn_like(x)
    dy = torch.randn_like(x)
    params = [torch.linspace(0.5, 1.5, 5, device=DEVICE).to(pdtype), torch.linspace(-1, 1, 5, device=DEVICE).to(pdtype)]
    running = [torch.randn(5, device=DEVICE).to(pdtype), torch.rand(5, device=DEVICE).to(pdtype) + 0.5]
    assert backends.resolve("triton", x).reason == "forced"
    results = {}
    for name in ("ours", "torch"):
        cast = (lambda t: t.clone()) if name == "ours" else (lambda t: t.double())  # noqa: E731
        xs, rs, w, b = (cast(t).requires_grad_() for t in (x, res, *params))
        rm, rv = (cast(t) for t in running)
        if name == "ours":
            with poisoned_allocations():
                y = bn.functional.batch_norm(
                    xs, rm, rv, w, b, True, 0.1, EPS, activation="relu", residual=rs, backend="triton"
                )
                y.backward(cast(dy))
        else:
            y = torch.relu(torch.nn.functional.batch_norm(xs, rm, rv, w, b, True, 0.1, EPS) + rs)
            y.backward(cast(dy))
        results[name] = (y, rm, rv, xs.grad, rs.grad, w.grad, b.grad)
    tol = TORCH_TOL[dtype]
    names = ("y", "running_mean", "running_var", "dx", "dresidual", "dweight", "dbias")
    for what, got, want in zip(names, results["ours"], results["torch"]):
        assert not torch.isnan(got).any(), what
        rtol = tol if got.dtype == dtype else TORCH_TOL[pdtype]
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=rtol, msg=lambda m: f"{what}: {m}")
    assert results["ours"][0].is_contiguous(memory_format=memory_format)


@pytest.mark.slow
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_batchnorm2d_train_steps_match_torch(path, memory_format):
    """Two SGD steps of bn.BatchNorm2d(backend="triton") against torch's, then evaluation."""
    torch.manual_seed(0)
    ours = bn.BatchNorm2d(5, backend="triton").to(DEVICE)
    theirs = torch.nn.BatchNorm2d(5).to(DEVICE)
    with torch.no_grad():
        for m in (ours, theirs):
            m.weight.copy_(torch.linspace(0.5, 1.5, 5))
            m.bias.copy_(torch.linspace(-1, 1, 5))
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ours, theirs)]
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
        for opt in optimizers:
            opt.step()
            opt.zero_grad()
    torch.testing.assert_close(ours.weight, theirs.weight)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    assert int(ours.num_batches_tracked) == 2
    ours.eval(), theirs.eval()
    x = torch.randn(2, 5, 3, 3, device=DEVICE).to(memory_format=memory_format)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_double_backward_matches_aten():
    """create_graph=True through the whole-op Function: torch's differentiable ops take over."""
    torch.manual_seed(3)
    x = torch.randn(4, 3, 5, device=DEVICE, dtype=torch.float64)
    weight = torch.linspace(0.5, 1.5, 3, device=DEVICE, dtype=torch.float64)
    dy = torch.randn_like(x)
    grads = {}
    for name in ("triton", "aten"):
        xs, w = x.clone().requires_grad_(), weight.clone().requires_grad_()
        y = bn.functional.batch_norm(xs, None, None, w, None, True, activation="tanh", backend=name)
        gx, gw = torch.autograd.grad((y * dy).sum(), (xs, w), create_graph=True)
        grads[name] = (gx, gw, *torch.autograd.grad(gx.pow(2).sum() + gw.sum(), (xs, w)))
    for got, want in zip(grads["triton"], grads["aten"]):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_fused_residual_and_activation_match_reference_backend():
    torch.manual_seed(1)
    x = torch.randn(4, 3, 5, 5, device=DEVICE, dtype=torch.float64)
    res = torch.randn_like(x)
    grads = {}
    for name in ("triton", "reference"):
        layer = bn.BatchNorm2d(3, backend=name).to(DEVICE, torch.float64)
        xs, rs = x.clone().requires_grad_(), res.clone().requires_grad_()
        y = layer(xs, residual=rs, activation="gelu")
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


@pytest.mark.skipif(not CUDA, reason="full-size shapes need a GPU")
@pytest.mark.parametrize("shape", VIEWS, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_full_size_whole_op(shape, dtype):
    """The whole op at full size, on the path the size rule picks (single-read for
    (256, 2048, 49) and the small MLP rows, tiled for the rest), fp32 parameters."""
    case = Case(shape, dtype, None, 0.5, 2.0, seed=0)
    check_whole_forward(case, "relu", True, "train", None, True, True)
    check_whole_backward(case, "relu", True, True, None, True)
