"""BatchNormAct: act(bn(x) + residual), fused when it can be, the same when it cannot."""

import copy
import io
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import batchnorm as bn
from batchnorm import activations
from batchnorm.norm_act import fuses

# Each fusable activation as a torch module, and modules our kernels do not compute.
FUSABLE = {name: activations.module_for(name) for name in activations.NAMES}
# nn.Hardtanh(0, 6) computes ReLU6 but is not nn.ReLU6 (matched by type): run after our layer
UNFUSABLE = [nn.Hardsigmoid(), nn.LeakyReLU(0.2), nn.GELU("tanh"), nn.Hardtanh(0.0, 6.0)]
TOL = dict(rtol=1e-10, atol=1e-10)


def _pair(act: nn.Module, c: int, seed: int) -> tuple[bn.BatchNormAct, nn.BatchNorm2d]:
    """Ours (float64) and torch's layer with the same random gamma, beta and statistics."""
    g = torch.Generator().manual_seed(seed)
    theirs = nn.BatchNorm2d(c, dtype=torch.float64)
    with torch.no_grad():
        theirs.weight.copy_(torch.randn(c, generator=g, dtype=torch.float64))
        theirs.bias.copy_(torch.randn(c, generator=g, dtype=torch.float64))
        theirs.running_mean.copy_(torch.randn(c, generator=g, dtype=torch.float64))
        theirs.running_var.copy_(torch.rand(c, generator=g, dtype=torch.float64) + 0.5)
    ours = bn.BatchNormAct(bn.BatchNorm2d(c, dtype=torch.float64), copy.deepcopy(act))
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


@settings(max_examples=30, deadline=None)
@given(
    act=st.sampled_from([*FUSABLE.values(), *UNFUSABLE]),
    shape=st.tuples(st.integers(2, 5), st.integers(1, 6), st.integers(1, 5), st.integers(1, 5)),
    with_residual=st.booleans(),
    training=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_equals_torchs_layer_then_the_activation(act, shape, with_residual, training, seed):
    ours, theirs = _pair(act, shape[1], seed)
    ours.train(training), theirs.train(training)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    r = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True) if with_residual else None
    y = ours(x, r)
    z = theirs(x)
    expected = act(z if r is None else z + r)
    torch.testing.assert_close(y, expected, **TOL)
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    inputs = [x, ours.bn.weight, ours.bn.bias] + ([] if r is None else [r])
    got = torch.autograd.grad(y, inputs, dy)
    want = torch.autograd.grad(expected, [x, theirs.weight, theirs.bias] + ([] if r is None else [r]), dy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)
    torch.testing.assert_close(ours.bn.running_mean, theirs.running_mean, **TOL)
    torch.testing.assert_close(ours.bn.running_var, theirs.running_var, **TOL)


def test_one_call_of_our_layer_when_fusable_else_the_layer_then_the_activation():
    """Which path runs: with a fusable activation the activation module is never called
    (the kernel applied it), with another one it is."""
    x = torch.randn(4, 3, 5, 5)
    for act, called in ((nn.ReLU(), False), (nn.Hardswish(), False), (nn.Hardsigmoid(), True)):
        layer = bn.BatchNormAct(bn.BatchNorm2d(3), act)
        seen = []
        layer.act.register_forward_hook(lambda *_: seen.append(True))
        layer(x)
        assert bool(seen) is called
    assert fuses(bn.BatchNorm2d(3)) and fuses(bn.SequenceBatchNorm(3)) and fuses(bn.SyncBatchNorm(3))

    class Overriding(bn.BatchNorm2d):  # a subclass whose forward may not take activation=
        def forward(self, x):
            return super().forward(x) * 2

    assert not fuses(nn.BatchNorm2d(3)) and not fuses(Overriding(3))
    layer = bn.BatchNormAct(Overriding(3, affine=False), "relu").eval()
    torch.testing.assert_close(layer(x), torch.relu(2 * x / (1 + 1e-5) ** 0.5))


def test_names_and_modules_and_none():
    assert isinstance(bn.BatchNormAct(bn.BatchNorm1d(2)).act, nn.Identity)
    assert isinstance(bn.BatchNormAct(bn.BatchNorm1d(2), "leaky_relu").act, nn.LeakyReLU)
    with pytest.raises(ValueError, match="activation='swish' is not supported"):
        bn.BatchNormAct(bn.BatchNorm1d(2), "swish")
    assert repr(bn.BatchNormAct(bn.BatchNorm1d(2), "relu")).startswith("BatchNormAct(\n  (bn): BatchNorm1d(2")


def test_state_dict_keys_are_the_layers_own_both_ways():
    theirs = nn.BatchNorm2d(4)
    theirs.train()(torch.randn(3, 4, 2, 2))
    ours = bn.BatchNormAct(bn.BatchNorm2d(4), "relu")
    ours.load_state_dict(theirs.state_dict())  # strict: every key found
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value)
    back = nn.BatchNorm2d(4)
    back.load_state_dict(ours.state_dict())
    model = nn.Sequential(nn.Conv2d(3, 4, 1), bn.BatchNormAct(bn.BatchNorm2d(4), "relu"), nn.Conv2d(4, 2, 1))
    assert list(model.state_dict()) == list(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1)).state_dict())
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    model.load_state_dict(torch.load(buffer, weights_only=True))
    with pytest.raises(RuntimeError, match="Unexpected key"):
        ours.load_state_dict({**theirs.state_dict(), "extra": torch.zeros(1)})
    assert [name for name, _ in ours.named_parameters()] == ["bn.weight", "bn.bias"]  # the modules' own names


def test_pickle_and_deepcopy_keep_the_activation():
    layer = bn.BatchNormAct(bn.BatchNorm2d(4, momentum=None), "silu")
    layer(torch.randn(3, 4, 2, 2))
    x = torch.randn(2, 4, 2, 2)
    layer.eval()
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert isinstance(clone.act, nn.SiLU) and clone.bn.momentum is None
        assert torch.equal(clone(x), layer(x))
        assert list(clone.state_dict()) == list(layer.state_dict())


def test_fx_sees_the_batch_norm_and_the_activation():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), bn.BatchNormAct(bn.BatchNorm2d(4), "relu"))
    traced = torch.fx.symbolic_trace(model)
    targets = [n.target for n in traced.graph.nodes if n.op == "call_module"]
    assert targets == ["0", "1.bn", "1.act"]
    x = torch.randn(2, 3, 4, 4)
    model.eval(), traced.eval()
    torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)


@pytest.mark.slow
def test_compiles_without_graph_breaks():
    layer = bn.BatchNormAct(bn.BatchNorm2d(8), "relu")
    x = torch.randn(4, 8, 5, 5)
    explanation = torch._dynamo.explain(layer)(x, x)
    assert explanation.graph_break_count == 0
    torch.testing.assert_close(torch.compile(layer, backend="eager")(x, x), layer(x, x))
