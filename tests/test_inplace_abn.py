"""In-place activated batch norm (batchnorm/inplace_abn.py) against the float64 reference and
against torch's BatchNorm + LeakyReLU: outputs, the three gradients, the running statistics,
evaluation, the in-place contract, what is kept for backward, and what is refused."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from kernels.poison import poisoned_allocations

from batchnorm import reference
from batchnorm.inplace_abn import InPlaceABN, inplace_abn

EPS = 1e-5
# Relative to the largest magnitude of the compared quantity. The backward reconstructs the
# normalized input from y (the module docstring: its error grows with |beta| / |gamma|), so
# fp32 gets a little more room than a kernel compared to the reference.
TOL = {torch.float64: 1e-9, torch.float32: 1e-4}
TORCH_BN = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}


def conditioning(x: torch.Tensor) -> float:
    """max |x| / the smallest channel's standard deviation: x - mean loses that many ulps of
    x's dtype, in any implementation (torch's batch norm included)."""
    x = x.detach().double()
    dims = (0, *range(2, x.dim()))
    spread = float(x.var(dims, correction=0).sqrt().min()) if x.numel() else 1.0
    return float(x.abs().max()) / spread if spread > 0 else math.inf


def gradient_scales(x, weight, dy, running=None) -> dict[str, float]:
    """The size of the terms each gradient sums or cancels, which bounds its rounding error
    (a gradient near 0 is the difference of much larger terms): dbias = sum d, dweight =
    sum d xhat, dx = s (d - mean(d) - xhat mean(d xhat)) with s = gamma' invstd and |d| <= |dy|."""
    x, dy = x.detach().double(), dy.detach().double().abs()
    dims, shape = (0, *range(2, x.dim())), (1, -1) + (1,) * (x.dim() - 2)
    if running is None:
        mean, var = x.mean(dims), x.var(dims, correction=0)
    else:
        mean, var = (t.detach().double() for t in running)
    invstd = torch.rsqrt(var + EPS)
    xhat = ((x - mean.view(shape)) * invstd.view(shape)).abs()
    s = float(((weight.detach().double().abs() + EPS) * invstd).max())
    return {
        "dbias": float(dy.sum(dims).max()),
        "dweight": float((dy * xhat).sum(dims).max()),
        "dx": s * float(dy.max()) * (1 + float(xhat.max()) ** 2),
    }


def close(actual, expected, dtype: torch.dtype, what: str, cond: float = 1.0, scale: float = 0.0) -> None:
    """|actual - expected| <= tol * max(scale, |expected|_max, 1) everywhere, tol = TOL or, for an
    input of conditioning `cond`, 16 cond ulps if larger; a NaN (an element a poisoned
    allocation left unwritten) fails."""
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, what
    assert not torch.isnan(actual).any(), f"{what}: NaN (an element left unwritten?)"
    tol = max(TOL[dtype], 16 * torch.finfo(dtype).eps * cond)
    bound = tol * max(scale, float(expected.abs().max()) if expected.numel() else 0.0, 1.0)
    err = float((actual - expected).abs().max()) if actual.numel() else 0.0
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


def in_layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """x with the same values, its channels last in memory: (N, *S, C) for N-D input; for
    (N, C), column-major (a layout no kernel views without a copy)."""
    if not channels_last:
        return x.contiguous()
    if x.dim() == 2:
        return x.t().contiguous().t()
    order = (0, *range(2, x.dim()), 1)
    back = (0, x.dim() - 1, *range(1, x.dim() - 1))
    return x.permute(order).contiguous().permute(back)


@st.composite
def cases(draw):
    ndim = draw(st.integers(2, 5))
    c = draw(st.integers(1, 6))
    n = draw(st.integers(2, 6))
    spatial = [draw(st.integers(1, 4)) for _ in range(ndim - 2)]
    return dict(
        shape=(n, c, *spatial),
        dtype=draw(st.sampled_from([torch.float64, torch.float32])),
        channels_last=draw(st.booleans()),
        inplace=draw(st.booleans()),
        activation=draw(st.sampled_from([None, "leaky_relu"])),
        training=draw(st.booleans()),
        offset=draw(st.sampled_from([0.0, 2.0, -30.0])),
        spread=draw(st.sampled_from([1.0, 0.1, 5.0])),
        seed=draw(st.integers(0, 2**16)),
    )


def draw_tensors(case):
    """x (float64), weight with random signs and |weight| in [0.3, 3], bias, dy, running statistics."""
    g = torch.Generator().manual_seed(case["seed"])
    shape, c = case["shape"], case["shape"][1]
    x = torch.randn(shape, generator=g, dtype=torch.float64) * case["spread"] + case["offset"]
    sign = torch.where(torch.rand(c, generator=g) < 0.3, -1.0, 1.0).double()
    weight = sign * (0.3 + 2.7 * torch.rand(c, generator=g, dtype=torch.float64))
    bias = torch.rand(c, generator=g, dtype=torch.float64) * 2 - 1
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    running_mean = torch.randn(c, generator=g, dtype=torch.float64) * case["spread"] + case["offset"]
    running_var = (0.5 + torch.rand(c, generator=g, dtype=torch.float64)) * case["spread"] ** 2
    return x, weight, bias, dy, running_mean, running_var


def reference_run(x, weight, bias, dy, running, activation):
    """y, dx, dweight, dbias of the float64 oracle on the (N, C, L) view, the weight entering
    as |weight| + eps (what the layer computes; autograd gives dweight its sign)."""
    n, c = x.shape[:2]
    xv = x.double().reshape(n, c, -1).clone().requires_grad_()
    w = weight.double().clone().requires_grad_()
    b = bias.double().clone().requires_grad_()
    rm, rv = (None, None) if running is None else (t.double() for t in running)
    y = reference.batch_norm(xv, w.abs() + EPS, b, running_mean=rm, running_var=rv, eps=EPS, activation=activation)
    dx, dw, db = torch.autograd.grad(y, (xv, w, b), dy.double().reshape(n, c, -1))
    return y.reshape(x.shape), dx.reshape(x.shape), dw, db


@given(case=cases())
def test_outputs_and_gradients_match_the_float64_reference(case):
    dtype = case["dtype"]
    x64, weight, bias, dy, running_mean, running_var = draw_tensors(case)
    leaf = in_layout(x64.to(dtype), case["channels_last"]).requires_grad_()
    x = leaf.clone() if case["inplace"] else leaf  # an in-place layer cannot overwrite a leaf
    w, b = weight.to(dtype).requires_grad_(), bias.to(dtype).requires_grad_()
    rm, rv = running_mean.to(dtype), running_var.to(dtype)
    running = None if case["training"] else (rm, rv)
    with poisoned_allocations():
        y = inplace_abn(
            x, None if running is None else rm, None if running is None else rv, w, b, training=case["training"],
            eps=EPS, activation=case["activation"], inplace=case["inplace"],
        )  # fmt: skip
        y.backward(in_layout(dy.to(dtype), case["channels_last"]))
    assert y.dtype == dtype and y.stride() == leaf.stride()
    assert (y is x) == case["inplace"] and (y.data_ptr() == x.data_ptr()) == case["inplace"]
    ey, edx, edw, edb = reference_run(leaf.detach(), w.detach(), b.detach(), dy, running, case["activation"])
    cond, scale = conditioning(leaf), gradient_scales(leaf, w, dy, running)
    close(y, ey, dtype, "y", cond)
    close(leaf.grad, edx, dtype, "dx", cond, scale["dx"])
    close(w.grad, edw, dtype, "dweight", cond, scale["dweight"])
    close(b.grad, edb, dtype, "dbias", cond, scale["dbias"])


@st.composite
def module_cases(draw):
    ndim = draw(st.integers(2, 5))
    c = draw(st.integers(1, 5))
    spatial = [draw(st.integers(1, 4)) for _ in range(ndim - 2)]
    return dict(
        shape=(draw(st.integers(2, 6)), c, *spatial),
        dtype=draw(st.sampled_from([torch.float64, torch.float32])),
        channels_last=draw(st.booleans()),
        inplace=draw(st.booleans()),
        activation=draw(st.sampled_from([None, "leaky_relu"])),
        slope=draw(st.sampled_from([0.01, 0.2, 1.5])),
        momentum=draw(st.sampled_from([0.1, 0.7, None])),
        seed=draw(st.integers(0, 2**16)),
    )


def torch_pair(case):
    """Our layer and torch's BatchNorm (+ LeakyReLU), torch's weight set to |gamma| + eps."""
    c, dtype = case["shape"][1], case["dtype"]
    ours = InPlaceABN(
        c, eps=EPS, momentum=case["momentum"], dtype=dtype, activation=case["activation"],
        negative_slope=case["slope"], inplace=case["inplace"],
    )  # fmt: skip
    bn = TORCH_BN[len(case["shape"])](c, eps=EPS, momentum=case["momentum"], dtype=dtype)
    g = torch.Generator().manual_seed(case["seed"] + 1)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(c, generator=g, dtype=torch.float64) * 2)
        ours.bias.copy_(torch.randn(c, generator=g, dtype=torch.float64))
        bn.weight.copy_(ours.weight.abs() + EPS)
        bn.bias.copy_(ours.bias)
    act = torch.nn.Identity() if case["activation"] is None else torch.nn.LeakyReLU(case["slope"])
    return ours, torch.nn.Sequential(bn, act)


def step(layer, x, dy, inplace):
    """One forward and backward: (y, dx)."""
    leaf = x.clone().requires_grad_()
    y = layer(leaf.clone() if inplace else leaf)
    y.backward(dy)
    return y.detach(), leaf.grad


@given(case=module_cases())
def test_the_module_matches_torch_batchnorm_and_leaky_relu_in_training_and_evaluation(case):
    """Three training steps (outputs, gradients, running statistics and their count, with
    momentum None the cumulative average), then evaluation with the running statistics."""
    ours, theirs = torch_pair(case)
    dtype, g = case["dtype"], torch.Generator().manual_seed(case["seed"])
    sign = torch.where(ours.weight.detach() < 0, -1.0, 1.0).to(dtype)
    for mode in ("train", "train", "train", "eval"):
        ours.train(mode == "train"), theirs.train(mode == "train")
        x = torch.randn(case["shape"], generator=g, dtype=torch.float64).mul(3).add(1)
        x = in_layout(x.to(dtype), case["channels_last"])
        dy = torch.randn(case["shape"], generator=g, dtype=torch.float64).to(dtype)
        ours.zero_grad(), theirs.zero_grad()
        y, dx = step(ours, x, dy, case["inplace"])
        ey, edx = step(theirs, x, dy, False)
        running = None if mode == "train" else (ours.running_mean, ours.running_var)
        cond, scale = conditioning(x), gradient_scales(x, ours.weight, dy, running)
        close(y, ey, dtype, f"{mode} y", cond)
        close(dx, edx, dtype, f"{mode} dx", cond, scale["dx"])
        close(ours.weight.grad, theirs[0].weight.grad * sign, dtype, f"{mode} dweight", cond, scale["dweight"])
        close(ours.bias.grad, theirs[0].bias.grad, dtype, f"{mode} dbias", cond, scale["dbias"])
        close(ours.running_mean, theirs[0].running_mean, dtype, f"{mode} running_mean")
        close(ours.running_var, theirs[0].running_var, dtype, f"{mode} running_var")
        assert int(ours.num_batches_tracked) == int(theirs[0].num_batches_tracked)
    assert int(ours.num_batches_tracked) == 3


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", [None, "leaky_relu"])
@pytest.mark.parametrize("inplace", [False, True])
def test_gradcheck_in_float64(training, activation, inplace):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 2, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.tensor([0.7, -1.3], dtype=torch.float64, requires_grad=True)
    bias = torch.tensor([0.2, -0.4], dtype=torch.float64, requires_grad=True)
    running = (torch.tensor([0.1, -0.2], dtype=torch.float64), torch.tensor([0.8, 1.5], dtype=torch.float64))

    def f(x, w, b):
        rm, rv = (None, None) if training else running
        return inplace_abn(x.clone() if inplace else x, rm, rv, w, b, training, activation=activation,
                           negative_slope=0.3, inplace=inplace)  # fmt: skip

    assert torch.autograd.gradcheck(f, (x, weight, bias))


def test_a_zero_weight_is_scaled_by_eps_and_still_learns():
    """gamma = 0 acts as gamma' = eps (the affine stays invertible): the outputs and gradients
    are the reference's with weight eps, and d gamma'/d gamma is taken as +1 at 0."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(8, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.5, 0.0, -0.5], dtype=torch.float64, requires_grad=True)
    dy = torch.randn(8, 3, 4, generator=g, dtype=torch.float64)
    y = inplace_abn(x, None, None, w, b, training=True)
    y.backward(dy)
    w_ref = torch.tensor([EPS, 1.0 + EPS, 2.0 + EPS], dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    b_ref = b.detach().clone().requires_grad_()
    y_ref = reference.batch_norm(x_ref, w_ref, b_ref, eps=EPS, activation="leaky_relu")
    y_ref.backward(dy)
    close(y, y_ref, torch.float64, "y")
    close(x.grad, x_ref.grad, torch.float64, "dx")
    close(w.grad, w_ref.grad * torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64), torch.float64, "dweight")
    assert w.grad[0] != 0


def test_relu_is_refused_with_the_way_out():
    with pytest.raises(ValueError, match="relu.*cannot recover.*leaky_relu.*0.01"):
        InPlaceABN(4, activation="relu")
    with pytest.raises(ValueError, match="relu.*leaky_relu"):
        inplace_abn(torch.randn(4, 3), None, None, training=True, activation="relu")


@pytest.mark.parametrize("slope", [0.0, -0.1, float("inf"), float("nan")])
def test_a_leaky_relu_that_cannot_be_inverted_is_refused(slope):
    with pytest.raises(ValueError, match="negative_slope must be positive"):
        InPlaceABN(4, negative_slope=slope)


def test_other_activations_are_refused():
    with pytest.raises(ValueError, match="activation=None.*'leaky_relu'"):
        InPlaceABN(4, activation="sigmoid")
    with pytest.raises(ValueError, match="not supported"):
        InPlaceABN(4, activation="swish")


def test_inplace_overwrites_the_input_and_bumps_its_version():
    x = torch.randn(4, 3, 5)
    before, version = x.clone(), x._version
    y = InPlaceABN(3, inplace=True)(x)
    assert y is x and x._version > version and not torch.equal(x, before)
    x2 = before.clone()
    y2 = InPlaceABN(3, inplace=False)(x2)
    assert torch.equal(x2, before) and y2.data_ptr() != x2.data_ptr()
    assert torch.equal(y2, y)


def test_overwriting_an_input_that_an_earlier_layer_kept_fails_at_backward():
    """exp keeps its output for backward; writing over it must not give silent garbage."""
    a = torch.randn(4, 3, 5, requires_grad=True)
    y = InPlaceABN(3, inplace=True)(a.exp())
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_overwriting_a_leaf_that_requires_grad_is_refused():
    with pytest.raises(RuntimeError, match="leaf"):
        InPlaceABN(3, inplace=True)(torch.randn(4, 3, requires_grad=True))


def test_double_backward_is_refused():
    x = torch.randn(4, 3, 5, requires_grad=True)
    y = InPlaceABN(3)(x)
    (dx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        dx.sum().backward()


@pytest.mark.parametrize("inplace", [False, True])
def test_only_the_output_is_kept_for_backward(inplace):
    """Of the tensors saved for backward, the only activation-sized one is the output
    (torch's BatchNorm keeps its input, and the activation its own)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(6, 4, 3, 3)
    layer = InPlaceABN(4, inplace=inplace)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x.requires_grad_().clone() if inplace else x)
    big = {t.untyped_storage().data_ptr() for t in saved if t.numel() == x.numel()}
    assert big == {y.untyped_storage().data_ptr()}
    assert sum(t.numel() for t in saved if t.numel() != x.numel()) <= 4 * 3  # weight, bias, invstd

    saved.clear()
    torch_layers = torch.nn.Sequential(torch.nn.BatchNorm2d(4), torch.nn.LeakyReLU(0.01))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        torch_layers(x.detach().requires_grad_())
    assert len({t.untyped_storage().data_ptr() for t in saved if t.numel() == x.numel()}) == 2  # what it saves


def test_state_dict_loads_from_torch_batchnorm_and_back():
    bn = torch.nn.BatchNorm2d(5)
    bn(torch.randn(4, 5, 3, 3) * 2 + 1)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0), bn.bias.normal_()
    ours = InPlaceABN(5, activation=None)
    ours.load_state_dict(bn.state_dict())  # strict: the same keys
    assert list(ours.state_dict()) == list(bn.state_dict())
    back = torch.nn.BatchNorm2d(5)
    back.load_state_dict(ours.state_dict())
    for k, v in bn.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    ours.eval(), bn.eval()
    x = torch.randn(3, 5, 4, 4)
    # torch's function with |gamma| + eps for gamma: with positive weights, within eps * |xhat|
    torch.testing.assert_close(ours(x), bn(x), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        bn.weight.add_(EPS)
    torch.testing.assert_close(ours(x), bn(x))


def test_without_running_statistics_evaluation_uses_the_batch():
    ours = InPlaceABN(3, track_running_stats=False, activation=None)
    bn = torch.nn.BatchNorm1d(3, track_running_stats=False)
    assert ours.running_mean is None and set(ours.state_dict()) == set(bn.state_dict())
    x = torch.randn(8, 3) * 3 + 2
    ours.eval(), bn.eval()
    torch.testing.assert_close(ours(x), bn(x), rtol=1e-4, atol=1e-4)


def test_evaluation_reads_the_running_statistics_and_leaves_them():
    layer = InPlaceABN(3, activation=None)
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([1.0, -2.0, 0.5]))
        layer.running_var.copy_(torch.tensor([4.0, 0.25, 1.0]))
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.eval()
    x = torch.randn(5, 3, 2)
    expected = (x - layer.running_mean.view(1, 3, 1)) / torch.sqrt(layer.running_var.view(1, 3, 1) + EPS) * (1 + EPS)
    torch.testing.assert_close(layer(x), expected)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_an_empty_batch_updates_nothing():
    layer = InPlaceABN(3)
    x = torch.randn(0, 3, 4, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.shape == x.shape and int(layer.num_batches_tracked) == 0
    assert torch.equal(layer.weight.grad, torch.zeros(3))


def test_a_non_finite_batch_leaves_the_running_statistics_and_is_counted():
    layer = InPlaceABN(3)
    layer(torch.randn(8, 3))
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(8, 3)
    x[2, 1] = math.nan
    with pytest.warns(RuntimeWarning, match="non-finite"):
        layer(x)
    assert layer.nonfinite_skips == 1
    for k, v in layer.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_one_value_per_channel_in_training_is_refused():
    with pytest.raises(ValueError, match="drop_last"):
        InPlaceABN(3)(torch.randn(1, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert InPlaceABN(3).eval()(torch.randn(1, 3)).shape == (1, 3)


def test_half_precision_input_is_normalized_with_fp32_statistics():
    g = torch.Generator().manual_seed(9)
    x = (torch.randn(16, 4, 8, generator=g) * 2 + 100).to(torch.bfloat16)
    layer = InPlaceABN(4)
    y = layer(x.clone().requires_grad_())
    weight, bias = torch.full((4,), 1 + EPS, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    y_ref = reference.batch_norm(x.double(), weight, bias, eps=EPS, activation="leaky_relu")
    assert y.dtype == torch.bfloat16
    assert float((y.detach().double() - y_ref.detach()).abs().max()) < 0.05
