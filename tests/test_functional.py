"""The entry point's policy: errors, empty batches, the non-finite guard, backend choice."""

import warnings

import pytest
import torch

import batchnorm as bn
from batchnorm import backends
from batchnorm.functional import batch_norm


def test_wrong_channel_count():
    with pytest.raises(ValueError, match="expected 4 channels"):
        bn.BatchNorm2d(4)(torch.randn(2, 3, 5, 5))


def test_wrong_ndim_names_the_right_module():
    with pytest.raises(ValueError, match="BatchNorm2d expects 4-D input.*BatchNorm1d"):
        bn.BatchNorm2d(3)(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        batch_norm(torch.randn(5), None, None, training=True)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.uint8])
def test_integer_input_is_a_type_error(dtype):
    with pytest.raises(TypeError, match="floating-point"):
        bn.BatchNorm1d(3)(torch.ones(4, 3, dtype=dtype))


def test_not_a_tensor():
    with pytest.raises(TypeError, match="torch.Tensor"):
        bn.BatchNorm1d(3)([[1.0, 2.0, 3.0]])


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1), (1, 3, 1, 1)])
def test_one_value_per_channel_in_training_says_what_to_do(shape):
    m = {2: bn.BatchNorm1d, 3: bn.BatchNorm1d, 4: bn.BatchNorm2d}[len(shape)](3)
    with pytest.raises(ValueError, match="drop_last=True.*model.eval"):
        m(torch.randn(shape))
    m.eval()
    assert m(torch.randn(shape)).shape == shape  # evaluation uses the running statistics


def test_parameters_on_another_device_or_dtype():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="weight is on meta"):
        batch_norm(x, None, None, torch.ones(3, device="meta"), None, training=True)
    with pytest.raises(TypeError, match="running_mean is torch.float64"):
        batch_norm(x, torch.zeros(3, dtype=torch.float64), torch.ones(3), training=False)
    with pytest.raises(ValueError, match="bias has 4 elements"):
        batch_norm(x, None, None, None, torch.zeros(4), training=True)


def test_bad_residual_and_activation_and_momentum():
    m = bn.BatchNorm1d(3)
    with pytest.raises(ValueError, match="residual has shape"):
        m(torch.randn(4, 3), residual=torch.randn(4, 2))
    with pytest.raises(ValueError, match="activation='swish' is not supported"):
        bn.BatchNorm1d(3, activation="swish")
    with pytest.raises(ValueError, match="momentum must be in"):
        batch_norm(torch.randn(4, 3), torch.zeros(3), torch.ones(3), training=True, momentum=1.5)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_empty_batch_returns_empty_and_updates_nothing(momentum):
    m = bn.BatchNorm2d(3, momentum=momentum)
    m(torch.randn(4, 3, 2, 2))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(0, 3, 2, 2, requires_grad=True)
    y = m(x)
    assert y.shape == (0, 3, 2, 2)
    y.sum().backward()
    assert x.grad.shape == x.shape and m.weight.grad is not None
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_keeps_running_stats_finite(bad):
    m = bn.BatchNorm1d(3)
    m(torch.randn(8, 3))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(8, 3)
    x[3, 1] = bad
    with pytest.warns(RuntimeWarning, match="non-finite"):
        m(x)
    assert m.nonfinite_skips == 1
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, then only counted
        m(x)
    assert m.nonfinite_skips == 2
    m(torch.randn(8, 3))
    assert int(m.num_batches_tracked) == 2 and torch.isfinite(m.running_var).all()


def test_backend_registry_lists_and_forces():
    assert {"aten", "reference"} <= set(backends.available())
    x = torch.randn(6, 3, 4)
    assert backends.resolve("reference", x).backend.name == "reference"
    with pytest.raises(ValueError, match="unknown batch-norm backend 'nope'"):
        backends.resolve("nope", x)


def test_environment_variable_forces_a_backend(monkeypatch):
    x = torch.randn(6, 3, 4)
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    assert backends.resolve(None, x).backend.name == "reference"
    calls = []
    ref = backends.get("reference")
    monkeypatch.setattr(ref, "stats", lambda v, _orig=ref.stats: calls.append(1) or _orig(v))
    bn.BatchNorm1d(3, backend=None)(x)
    assert calls, "BATCHNORM_BACKEND=reference was not used"


def test_forced_backend_that_cannot_take_the_input_falls_back_to_aten(monkeypatch):
    ref = backends.get("reference")
    monkeypatch.setattr(ref, "unsupported", lambda x: "not today")
    choice = backends.resolve("reference", torch.randn(4, 3))
    assert choice.backend.name == "aten" and "not today" in choice.reason


@pytest.mark.parametrize("backend", ["aten", "reference"])
def test_backends_agree_through_the_module(backend):
    torch.manual_seed(0)
    x = torch.randn(6, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    r = torch.randn(6, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    ours = bn.BatchNorm2d(4, activation="tanh", backend=backend, dtype=torch.float64)
    ref = bn.BatchNorm2d(4, activation="tanh", backend="reference", dtype=torch.float64)
    ya, yb = ours(x, residual=r), ref(x, residual=r)
    torch.testing.assert_close(ya, yb)
    ga = torch.autograd.grad(ya.square().sum(), (x, r, ours.weight))
    gb = torch.autograd.grad(yb.square().sum(), (x, r, ref.weight))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(ours.running_var, ref.running_var)


def test_double_backward_through_the_kernel_contract_raises_instead_of_lying():
    # ghost batches run the four contract functions, whose backward is not differentiable
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    y = batch_norm(x, None, None, training=True, backend="reference", virtual_batch_size=3)
    (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|not have been used"):
        torch.autograd.grad(g.sum(), x)


@pytest.mark.parametrize("backend", ["reference", "numba"])
@pytest.mark.parametrize("training", [True, False])
def test_double_backward_of_the_whole_op_is_exact(backend, training):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, generator=g).add_(0.5).requires_grad_()
    rm, rv = torch.randn(3, dtype=torch.float64, generator=g), torch.rand(3, dtype=torch.float64, generator=g) + 0.5

    def f(x, w):
        return batch_norm(x, None if training else rm, None if training else rv, w, None,
                          training=training, backend=backend, activation="tanh")  # fmt: skip

    assert torch.autograd.gradgradcheck(f, (x, w))
