"""The oracle itself: against torch's batch norm, and its backward against finite differences
(gradcheck) and second order (gradgradcheck), in float64."""

import pytest
import torch

from batchnorm import activations, reference


def _inputs(shape=(5, 3, 4), seed=0, residual=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(shape[1], generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(shape[1], generator=g, dtype=torch.float64, requires_grad=True)
    r = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True) if residual else None
    return x, w, b, r


@pytest.mark.parametrize("view", [(6, 3, 5), (9, 4)])
def test_matches_torch_in_training_and_eval(view):
    x, w, b, _ = _inputs(view)
    y = reference.batch_norm(x, w, b, eps=1e-5)
    expected = torch.nn.functional.batch_norm(x, None, None, w, b, training=True, eps=1e-5)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    rm, rv = torch.randn(view[1], dtype=torch.float64), torch.rand(view[1], dtype=torch.float64) + 0.1
    y = reference.batch_norm(x, w, b, running_mean=rm, running_var=rv)
    expected = torch.nn.functional.batch_norm(x, rm, rv, w, b, training=False)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


def test_gradients_match_torch():
    x, w, b, _ = _inputs((7, 3, 6))
    dy = torch.randn(7, 3, 6, dtype=torch.float64)
    ours = torch.autograd.grad(reference.batch_norm(x, w, b), (x, w, b), dy)
    theirs = torch.autograd.grad(torch.nn.functional.batch_norm(x, None, None, w, b, True), (x, w, b), dy)
    for a, e in zip(ours, theirs):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("activation", activations.NAMES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("residual", [False, True])
def test_gradcheck_and_gradgradcheck(activation, training, residual):
    x, w, b, r = _inputs((4, 2, 3), residual=residual)
    with torch.no_grad():  # keep every u away from relu's kink, where finite differences lie
        x += 0.05 * torch.sign(x)
    stats = {} if training else {"running_mean": torch.zeros(2, dtype=torch.float64) + 0.1,
                                 "running_var": torch.ones(2, dtype=torch.float64) * 1.5}

    def f(x, w, b, *rest):
        return reference.batch_norm(x, w, b, activation=activation, residual=rest[0] if rest else None, **stats)

    args = (x, w, b) + ((r,) if residual else ())
    assert torch.autograd.gradcheck(f, args)
    if activation not in ("relu", "leaky_relu", "relu6"):  # piecewise linear: second derivative 0 a.e.
        assert torch.autograd.gradgradcheck(f, args)


# Each piecewise activation's breakpoints, and points either side and far off: where torch's
# own slope convention (relu6's hardtanh_backward, hardswish_backward) decides the value.
_BREAKPOINTS = [-1e30, -7.0, -3.0001, -3.0, -2.9999, -1.0, -1e-7, -0.0, 0.0, 1e-7, 1.0, 2.9999, 3.0, 3.0001,
                5.9999, 6.0, 6.0001, 9.0, 1e30, float("inf"), -float("inf"), float("nan")]


@pytest.mark.parametrize("activation", activations.NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_forward_and_derivative_are_torchs_modules_bitwise(activation, dtype):
    """g and g' against torch's module and its autograd, at the breakpoints 0, 6, -3, 3 and
    beside them, at +-inf and NaN (g only: torch's slope at NaN differs between its vector
    and scalar loops), and on random values. Bitwise for the piecewise ones; the smooth
    ones' g' is our formula, torch's own backward may round differently."""
    u = torch.cat([torch.tensor(_BREAKPOINTS, dtype=torch.float64), torch.randn(200, dtype=torch.float64) * 4])
    u = u.to(dtype).requires_grad_()
    y = activations.module_for(activation)(u)
    (slope,) = torch.autograd.grad(y.sum(), u)
    u = u.detach()
    ours = activations.derivative(u, activation)
    ours = torch.ones_like(u) if ours is None else ours
    torch.testing.assert_close(activations.forward(u, activation), y.detach(), rtol=0, atol=0, equal_nan=True)
    piecewise = activation in (None, "relu", "leaky_relu", "relu6", "hardswish")
    kept = u.isfinite() if piecewise else u.abs() < 1e3  # the smooth ones' slope at +-1e30: NaN or 0
    exact = dict(rtol=0, atol=0) if piecewise else {}
    torch.testing.assert_close(ours[kept], slope[kept], equal_nan=True, **exact)


@pytest.mark.parametrize("activation", ["relu6", "hardswish"])
def test_piecewise_slopes_at_the_breakpoints_are_torchs_convention(activation):
    """Stated outright: relu6' = 0 at 0 and 6; hardswish' = 0 at -3 and 1 at 3 (not the
    middle piece's -1/2 and 3/2), 1/2 at 0."""
    u = torch.tensor([-3.0, 0.0, 3.0, 6.0], dtype=torch.float64)
    want = {"relu6": [0.0, 0.0, 1.0, 0.0], "hardswish": [0.0, 0.5, 1.0, 1.0]}[activation]
    assert activations.derivative(u, activation).tolist() == want


def test_gradgradcheck_piecewise_linear_activation():
    """relu's second derivative is zero away from the kink; what remains is batch norm's own."""
    x, w, b, _ = _inputs((5, 2, 3), seed=3)
    with torch.no_grad():
        x += 0.05 * torch.sign(x)
    assert torch.autograd.gradgradcheck(lambda x, w, b: reference.batch_norm(x, w, b, activation="relu"), (x, w, b))


def test_stats_count_mean_m2():
    x = torch.arange(24, dtype=torch.float64).view(2, 3, 4)
    count, mean, m2 = reference.stats(x)
    xs = x.transpose(0, 1).reshape(3, -1)
    assert torch.equal(count, torch.full((3,), 8.0, dtype=torch.float64))
    torch.testing.assert_close(mean, xs.mean(1))
    torch.testing.assert_close(m2, ((xs - xs.mean(1, keepdim=True)) ** 2).sum(1))
