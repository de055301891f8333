"""The modules against torch.nn.BatchNorm*: every argument combination, layout and dtype."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import batchnorm as bn
from batchnorm import activations, layout, reference

OURS = {2: bn.BatchNorm1d, 3: bn.BatchNorm1d, 4: bn.BatchNorm2d, 5: bn.BatchNorm3d}
THEIRS = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}
TOL = {
    torch.float64: dict(rtol=1e-9, atol=1e-9),
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
}


@st.composite
def cases(draw):
    ndim = draw(st.integers(2, 5))
    n = draw(st.integers(2, 16))
    c = draw(st.sampled_from([1, 3, 5, 7, 16]))
    spatial = [draw(st.integers(1, 5)) for _ in range(ndim - 2)]
    return dict(
        shape=(n, c, *spatial),
        layout=draw(st.sampled_from(["contiguous", "channels_last", "strided"])),
        dtype=draw(st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16])),
        momentum=draw(st.sampled_from([0.1, 0.5, None])),
        affine=draw(st.booleans()),
        bias=draw(st.booleans()),
        track=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def make_input(shape, layout_name, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    if layout_name == "strided":  # a view with gaps: every other element of the last axis
        big = torch.randn(*shape[:-1], shape[-1] * 2, generator=g, dtype=torch.float64) * 2 + 1
        return big[..., ::2].to(dtype)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1).to(dtype)
    if layout_name == "channels_last" and x.dim() == 4:
        x = x.to(memory_format=torch.channels_last)
    if layout_name == "channels_last" and x.dim() == 5:
        x = x.to(memory_format=torch.channels_last_3d)
    return x


def pair(case):
    """Our module and torch's, with identical random parameters; fp32 params for half input."""
    ndim = len(case["shape"])
    kwargs = dict(momentum=case["momentum"], affine=case["affine"], track_running_stats=case["track"], bias=case["bias"])
    param_dtype = torch.float64 if case["dtype"] == torch.float64 else torch.float32
    ours = OURS[ndim](case["shape"][1], dtype=param_dtype, **kwargs)
    theirs = THEIRS[ndim](case["shape"][1], dtype=param_dtype, **kwargs)
    g = torch.Generator().manual_seed(case["seed"] + 1)
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.rand(p.shape, generator=g, dtype=p.dtype) + 0.5)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


@given(case=cases())
def test_matches_torch_module(case):
    ours, theirs = pair(case)
    tol = TOL[case["dtype"]]
    # Without an fp32 parameter or buffer, torch keeps half input's statistics in half.
    half_stats_in_torch = case["dtype"] in (torch.float16, torch.bfloat16) and not case["affine"]
    for step, training in enumerate([True, True, False]):
        ours.train(training)
        theirs.train(training)
        x = make_input(case["shape"], case["layout"], case["dtype"], case["seed"] + step)
        xa = x.detach().clone().requires_grad_()
        xb = x.detach().clone().requires_grad_()
        ya, yb = ours(xa), theirs(xb)
        if half_stats_in_torch and (training or not case["track"]):
            # torch computes these statistics in half precision, ours in fp32 (guide.md), so
            # the float64 reference on the same input is the oracle here.
            xb = x.detach().double().requires_grad_()
            yb = torch.nn.functional.batch_norm(xb, None, None, training=True, eps=theirs.eps)
        assert ya.dtype == x.dtype and ya.shape == x.shape
        torch.testing.assert_close(ya.double(), yb.double(), **tol)
        dy = torch.randn(ya.shape, generator=torch.Generator().manual_seed(step), dtype=torch.float64).to(x.dtype)
        pa, pb = list(ours.parameters()), list(theirs.parameters())
        ga = torch.autograd.grad(ya, [xa, *pa], dy)
        gb = torch.autograd.grad(yb, [xb, *pb], dy.to(yb.dtype))
        for a, b in zip(ga, gb):
            scale = max(1.0, float(b.double().abs().max()))
            torch.testing.assert_close(a.double() / scale, b.double() / scale, **tol)
        for name, buf in theirs.named_buffers():
            mine = dict(ours.named_buffers())[name]
            if name == "num_batches_tracked":
                assert torch.equal(mine, buf)
            else:
                torch.testing.assert_close(mine, buf, **TOL[torch.float32 if case["dtype"] != torch.float64 else torch.float64])


@given(case=cases(), activation=st.sampled_from(activations.NAMES), with_residual=st.booleans())
def test_extras_match_reference_in_float64(case, activation, with_residual):
    case = dict(case, dtype=torch.float64, track=True)
    ours, _ = pair(case)
    x = make_input(case["shape"], case["layout"], torch.float64, case["seed"]).requires_grad_()
    r = torch.randn(case["shape"], dtype=torch.float64, requires_grad=True) if with_residual else None
    y = ours(x, residual=r, activation=activation)
    v = layout.canonical(x.detach())
    rv = None if r is None else layout.canonical(r.detach(), v.kind).data
    expected = reference.batch_norm(v.data, ours.weight, ours.bias, activation=activation, residual=rv)
    torch.testing.assert_close(y, layout.restore(expected, x, v.kind), rtol=1e-9, atol=1e-9)
    ours.eval()
    y = ours(x, residual=r, activation=activation)
    expected = reference.batch_norm(
        v.data, ours.weight, ours.bias, running_mean=ours.running_mean, running_var=ours.running_var,
        activation=activation, residual=rv,
    )
    torch.testing.assert_close(y, layout.restore(expected, x, v.kind), rtol=1e-9, atol=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["aten", "reference"])
@pytest.mark.parametrize("activation", [None, "relu", "gelu"])
def test_gradcheck_through_the_module(backend, activation):
    m = bn.BatchNorm2d(3, backend=backend, dtype=torch.float64)
    x = torch.randn(4, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    r = torch.randn(4, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, r: m(x, residual=r, activation=activation), (x, r))
    m.eval()
    assert torch.autograd.gradcheck(lambda x, r: m(x, residual=r, activation=activation), (x, r))


def test_double_backward_through_the_default_module():
    m = bn.BatchNorm1d(3, dtype=torch.float64)
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x: m(x), (x,))


@pytest.mark.parametrize("ndim", [2, 4, 5])
def test_state_dict_round_trips_both_ways(ndim):
    theirs = THEIRS[ndim](5, momentum=None)
    theirs.train()
    theirs(torch.randn(4, 5, *([3] * (ndim - 2))))
    ours = OURS[ndim](5, momentum=None)
    ours.load_state_dict(theirs.state_dict())
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    back = THEIRS[ndim](5, momentum=None)
    back.load_state_dict(ours.state_dict())
    for k, v in theirs.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)
    buf = io.BytesIO()
    torch.save(ours.state_dict(), buf)
    buf.seek(0)
    THEIRS[ndim](5).load_state_dict(torch.load(buf, weights_only=True))


def test_pickle_and_deepcopy_keep_extras_and_state():
    m = bn.BatchNormAct(bn.BatchNorm2d(4, momentum=None), "silu")
    m(torch.randn(3, 4, 2, 2))
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert type(clone.act) is torch.nn.SiLU and clone.bn.momentum is None
        for k, v in m.state_dict().items():
            assert torch.equal(clone.state_dict()[k], v)
        clone.eval()
        m.eval()
        x = torch.randn(2, 4, 2, 2)
        assert torch.equal(clone(x), m(x))
        m.train()


@pytest.mark.parametrize("lazy, eager, shape", [
    (bn.LazyBatchNorm1d, bn.BatchNorm1d, (4, 6)),
    (bn.LazyBatchNorm2d, bn.BatchNorm2d, (4, 6, 3, 3)),
    (bn.LazyBatchNorm3d, bn.BatchNorm3d, (4, 6, 2, 2, 2)),
])
def test_lazy_modules_become_ours(lazy, eager, shape):
    layer = bn.BatchNormAct(lazy(momentum=0.3), "relu")
    y = layer(torch.randn(shape))
    m = layer.bn
    assert type(m) is eager and m.num_features == 6 and type(layer.act) is torch.nn.ReLU
    assert (y >= 0).all() and m.running_mean.shape == (6,) and int(m.num_batches_tracked) == 1
    assert isinstance(m, torch.nn.modules.batchnorm._BatchNorm)


def test_parametrized_weight_is_read_through_the_parametrization():
    """The module reads its tensors from nn.Module's tables for speed; a parametrized weight is
    not in them and must still be used (and trained) as torch's module uses it."""
    from torch.nn.utils import parametrize

    class Doubled(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    ours, theirs = bn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    for m in (ours, theirs):
        parametrize.register_parametrization(m, "weight", Doubled())
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(0)) * 3 + 1
    ya, yb = ours(x), theirs(x)
    torch.testing.assert_close(ya, yb)
    torch.testing.assert_close(ya, 2 * (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-5))
    dy = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    (ya * dy).sum().backward()
    (yb * dy).sum().backward()
    grad = ours.parametrizations.weight.original.grad
    torch.testing.assert_close(grad, theirs.parametrizations.weight.original.grad)


def test_functional_call_uses_the_tensors_it_is_given():
    """torch.func.functional_call swaps tensors into the module's tables; the forward must use
    (and update) those, as torch's module does."""
    from torch.func import functional_call

    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(2)) * 2 + 1
    results = []
    for module in (bn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)):
        tensors = {
            "weight": torch.full((3,), 2.0), "bias": torch.full((3,), -1.0),
            "running_mean": torch.zeros(3), "running_var": torch.ones(3), "num_batches_tracked": torch.tensor(0),
        }  # fmt: skip
        y = functional_call(module, tensors, (x,))
        assert torch.equal(module.weight, torch.ones(3)) and torch.equal(module.running_mean, torch.zeros(3))
        results.append((y, tensors["running_mean"], tensors["running_var"], tensors["num_batches_tracked"]))
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs)
    assert int(results[0][3]) == 1


def test_isinstance_of_torch_classes():
    assert isinstance(bn.BatchNorm2d(3), torch.nn.BatchNorm2d)
    assert isinstance(bn.BatchNorm1d(3), torch.nn.BatchNorm1d)


class _Block(torch.nn.Module):
    def __init__(self, bn_cls, c):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = bn_cls(c)
        self.conv2 = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = bn_cls(c)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + x)


def _resnet(bn_cls):
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), bn_cls(8), torch.nn.ReLU(),
        _Block(bn_cls, 8), _Block(bn_cls, 8),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4),
    )


def test_torch_trained_resnet_checkpoint_gives_the_same_eval_outputs():
    torch.manual_seed(0)
    teacher = _resnet(torch.nn.BatchNorm2d)
    opt = torch.optim.SGD(teacher.parameters(), lr=0.05)
    for _ in range(5):
        x = torch.randn(8, 3, 8, 8)
        loss = teacher(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    buf = io.BytesIO()
    torch.save(teacher.state_dict(), buf)
    buf.seek(0)
    student = _resnet(bn.BatchNorm2d)
    student.load_state_dict(torch.load(buf, weights_only=True))
    teacher.eval()
    student.eval()
    x = torch.randn(5, 3, 8, 8)
    torch.testing.assert_close(student(x), teacher(x), rtol=1e-5, atol=1e-6)
    x_cl = x.to(memory_format=torch.channels_last)
    torch.testing.assert_close(student(x_cl), teacher(x_cl), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("eps", [0.0, -1e-5, float("nan")])
def test_a_bad_eps_is_refused_at_construction(eps):
    with pytest.raises(ValueError, match="eps must be positive"):
        bn.BatchNorm2d(4, eps=eps)
    with pytest.raises(ValueError, match="eps must be positive"):
        bn.LazyBatchNorm1d(eps=eps)


def test_torchscript_is_refused_with_what_works_instead():
    """torch.jit.script cannot compile our layers: it is refused with the way that works (the
    model reverted to torch's layers scripts and gives the same outputs), not with
    TorchScript's complaint about the forward's signature."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), bn.BatchNorm2d(8), torch.nn.ReLU()).eval()
    with pytest.raises(TypeError, match=r"cannot compile batchnorm's BatchNorm2d.*batchnorm\.revert\(model\)"):
        torch.jit.script(model)
    with pytest.raises(TypeError, match="cannot compile batchnorm's BatchNormAct"):
        torch.jit.script(bn.BatchNormAct(torch.nn.BatchNorm2d(8), "relu"))
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    reverted, _ = bn.revert(model)
    torch.testing.assert_close(torch.jit.script(reverted)(x), expected)
