"""fold: evaluation-mode batch norm merged into the layer before it, outputs unchanged."""


import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import batchnorm as bn
from batchnorm.tools import Activation, ChannelAffine, convert, fold

from .models import FrozenBatchNorm2d, ResNet, randomize
from .thirdparty import need

_LAYERS = {
    "linear": (nn.Linear, bn.BatchNorm1d, 0),
    "conv1d": (nn.Conv1d, bn.BatchNorm1d, 1),
    "conv2d": (nn.Conv2d, bn.BatchNorm2d, 2),
    "conv3d": (nn.Conv3d, bn.BatchNorm3d, 3),
    "convt1d": (nn.ConvTranspose1d, bn.BatchNorm1d, 1),
    "convt2d": (nn.ConvTranspose2d, bn.BatchNorm2d, 2),
    "convt3d": (nn.ConvTranspose3d, nn.BatchNorm3d, 3),
}


@settings(max_examples=25, deadline=None)
@given(
    kind=st.sampled_from(sorted(_LAYERS)),
    groups=st.sampled_from([1, 2, 3]),
    per_group=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    bias=st.booleans(),
    activation=st.sampled_from([None, "relu", "tanh"]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_fold_matches_the_eval_model(kind, groups, per_group, bias, activation, dtype, seed):
    layer_class, norm_class, spatial = _LAYERS[kind]
    torch.manual_seed(seed)
    cin, cout = per_group[0] * groups, per_group[1] * groups
    if layer_class is nn.Linear:
        layer = nn.Linear(cin, cout, bias=bias)
    else:
        layer = layer_class(cin, cout, 3, groups=groups, bias=bias, padding=1)
    if norm_class.__module__ != "batchnorm.nn":  # torch's layer (convt3d): no fused activation
        activation = None
    norm = norm_class(cout) if activation is None else bn.BatchNormAct(norm_class(cout), activation)
    model = randomize(nn.Sequential(layer, norm), seed).to(dtype).eval()
    x = torch.randn(4, cin, *([5] * spatial), dtype=dtype)
    expected = model(x)
    folded, changes = fold(model, inplace=False)
    path = "1" if activation is None else "1.bn"
    assert changes.changed == [(path, "folded into 0")]
    assert not any(isinstance(m, _BatchNorm) for m in folded.modules())
    assert folded[0].bias is not None and isinstance(folded.get_submodule(path), Activation)
    if activation is not None:  # the activation stays where it was
        assert isinstance(folded[1], bn.BatchNormAct) and type(folded[1].act) is type(model[1].act)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(folded(x), expected, **tol)


def test_fold_resnet_with_fused_residual():
    model = randomize(ResNet(), seed=5)
    fused, _ = convert(model, fuse=True, inplace=False)
    fused.eval()
    x = torch.randn(2, 3, 8, 8)
    expected = fused(x)
    folded, changes = fold(fused)
    assert len(changes.changed) == 6 and not changes.skipped
    assert not any(isinstance(m, _BatchNorm) for m in folded.modules())
    torch.testing.assert_close(folded(x), expected, rtol=1e-5, atol=1e-5)


def test_nothing_to_fold_into_becomes_channel_affine():
    model = randomize(nn.Sequential(nn.Conv2d(2, 3, 1), nn.ReLU(), nn.BatchNorm2d(3), FrozenBatchNorm2d(3))).eval()
    x = torch.randn(2, 2, 4, 4)
    expected = model(x)
    fold(model)
    assert isinstance(model[2], ChannelAffine) and isinstance(model[3], ChannelAffine)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


def test_training_mode_is_an_error_and_nothing_changes():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match="evaluation mode.*model.eval"):
        fold(model)
    assert isinstance(model[1], nn.BatchNorm1d)


def test_channel_mismatch_is_a_recorded_skip():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(5)).eval()
    weight = model[0].weight.clone()
    _, changes = fold(model)
    assert isinstance(model[1], nn.BatchNorm1d) and torch.equal(model[0].weight, weight)
    assert changes.skipped == [("1", "has 5 channels but 0 produces 4; not folded")]


def test_without_running_stats_is_skipped():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False)).eval()
    _, changes = fold(model)
    assert isinstance(model[1], nn.BatchNorm1d) and changes.skipped


def test_shared_conv_is_not_folded():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1)
            self.bn = nn.BatchNorm2d(2)

        def forward(self, x):
            return self.bn(self.conv(x)) + self.conv(x)

    model = randomize(Net()).eval()
    x = torch.randn(2, 2, 3, 3)
    expected = model(x)
    fold(model)
    assert isinstance(model.bn, ChannelAffine)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


def test_channel_affine_checks_its_input():
    with pytest.raises(ValueError, match="expected 3 channels"):
        ChannelAffine(torch.ones(3), torch.zeros(3))(torch.randn(2, 4))


def test_linear_over_tokens_then_batch_norm_over_the_tokens_is_not_silently_wrong():
    # Linear(4 -> 5) on (N, 5 tokens, 4 features): BatchNorm1d(5) normalizes dim 1, the
    # tokens, while folding would scale the Linear's 5 output features (the last dim).
    model = randomize(nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5)), seed=1).eval()
    x = torch.randn(3, 5, 4)
    expected = model(x)

    blind, _ = fold(model, inplace=False)  # the rank is unknown: checked at each call
    with pytest.raises(ValueError, match=r"2-D input.*got 3 dimensions.*example_input="):
        blind(x)

    seen, changes = fold(model, inplace=False, example_input=x)
    assert isinstance(seen[1], nn.BatchNorm1d) and not changes.changed
    assert changes.skipped == [("1", "normalizes dim 1 of the (3, 5, 5) output of Linear 0, not its features "
                                     "(the last dim); folding would scale the wrong axis: not folded")]
    torch.testing.assert_close(seen(x), expected)


def test_an_example_input_the_model_rejects_is_a_clear_error():
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5)).eval()
    with pytest.raises(ValueError, match=r"fold: the model failed on example_input \(RuntimeError"):
        fold(model, example_input=torch.randn(3, 7))
    assert isinstance(model[1], nn.BatchNorm1d)


def test_linear_on_2d_input_folds_when_the_example_shows_it():
    model = randomize(nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5)), seed=2).eval()
    x = torch.randn(3, 4)
    expected = model(x)
    folded, changes = fold(model, example_input=x)
    assert changes.changed == [("1", "folded into 0")] and isinstance(folded[1], Activation)
    torch.testing.assert_close(folded(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tied", ["weight", "bias"])
def test_a_conv_whose_parameter_is_tied_to_another_layer_is_not_folded(tied):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1)
            self.bn = nn.BatchNorm2d(2)
            self.other = nn.Conv2d(2, 2, 1)
            setattr(self.other, tied, getattr(self.conv, tied))

        def forward(self, x):
            return self.bn(self.conv(x)) + self.other(x)

    model = randomize(Net()).eval()
    x = torch.randn(2, 2, 3, 3)
    expected, other = model(x), model.other(x)
    _, changes = fold(model)
    assert isinstance(model.bn, nn.BatchNorm2d) and not changes.changed
    assert changes.skipped == [("bn", f"not folded into conv: its {tied} is shared with other "
                                      "(tied parameters), which folding would change too")]
    torch.testing.assert_close(model.other(x), other)
    torch.testing.assert_close(model(x), expected)


def test_linear_then_batch_norm_2d_is_refused_without_an_example():
    # BatchNorm2d takes only 4-D input, so the Linear's features can never be its channels.
    model = randomize(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm2d(3)), seed=3).eval()
    x = torch.randn(2, 3, 2, 4)
    expected = model(x)
    _, changes = fold(model)
    assert isinstance(model[1], nn.BatchNorm2d) and not changes.changed
    assert changes.skipped == [("1", "BatchNorm2d normalizes dim 1 of 4-D or 5-D input, not the features of "
                                     "Linear 0 (the last dim); folding would scale the wrong axis: not folded")]
    torch.testing.assert_close(model(x), expected)


class _Doubled(nn.BatchNorm2d):
    """A batch norm whose own forward does more than batch norm."""

    def forward(self, x):
        return 2 * super().forward(x)


class _FrozenThenClamp(FrozenBatchNorm2d):
    """A frozen-style module with a child its forward applies."""

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.clamp = nn.Hardtanh(-0.1, 0.1)

    def forward(self, x):
        return self.clamp(super().forward(x))


def test_a_batch_norm_whose_forward_does_more_is_left_alone():
    model = randomize(nn.Sequential(nn.Conv2d(2, 3, 1), _Doubled(3), nn.Conv2d(3, 3, 1), _FrozenThenClamp(3))).eval()
    x = torch.randn(2, 2, 4, 4)
    expected = model(x)
    _, changes = fold(model)
    assert type(model[1]) is _Doubled and type(model[3]) is _FrozenThenClamp and not changes.changed
    assert [path for path, _ in changes.skipped] == ["1", "3"]
    assert all("overrides the forward of batch norm" in why for _, why in changes.skipped)
    torch.testing.assert_close(model(x), expected)


def test_timm_norm_act_layers_fold_keeping_their_drop_and_activation():
    need("timm")
    from timm.layers import BatchNormAct2d, DropBlock2d, FrozenBatchNormAct2d

    model = nn.Sequential(
        nn.Conv2d(2, 4, 3),
        BatchNormAct2d(4, act_layer=nn.SiLU),
        nn.Conv2d(4, 4, 1),
        BatchNormAct2d(4, act_layer=nn.Hardswish, drop_layer=lambda: DropBlock2d(0.5, 3)),
        FrozenBatchNormAct2d(4, act_layer=nn.ReLU),
    )
    model = randomize(model, seed=2).eval()
    acts = [model[i].act for i in (1, 3, 4)]
    x = torch.randn(2, 2, 6, 6)
    expected = model(x)
    _, changes = fold(model)
    assert changes.changed == [
        ("1", "folded into 0 (drop, act kept)"),
        ("3", "folded into 2 (drop, act kept)"),
        ("4", "nothing to fold into: now a per-channel ChannelAffine"),
    ]
    assert [model[i].act for i in (1, 3, 4)] == acts
    assert not any(isinstance(m, _BatchNorm) for m in model.modules())
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


class _Untraceable(nn.Module):
    """Data-dependent control flow (fx cannot trace it), a conv whose output batch norm
    alone reads, and one whose output is read outside its batch norm too."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        if x.sum() > 0:
            x = -x
        y = self.bn1(self.conv1(x))
        z = self.conv2(y)
        return self.bn2(z) + z.mean()


def test_where_fx_cannot_trace_a_forward_of_the_example_finds_what_to_fold():
    model = randomize(_Untraceable(), seed=7).eval()
    x = torch.randn(2, 3, 5, 5)
    expected = model(x)
    _, changes = fold(model, example_input=x)
    assert ("bn1", "folded into conv1") in changes.changed
    assert ("bn2", "nothing to fold into: now a per-channel ChannelAffine") in changes.changed  # z is read twice
    assert any(path == "" and "found the pairs in a forward of example_input" in why for path, why in changes.skipped)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


class _ReturnsTheConvOutput(nn.Module):
    """Untraceable; the conv's output is read by its batch norm alone, but also returned."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        if x.sum() > 0:
            x = -x
        y = self.conv(x)
        return self.bn(y), y


def test_where_fx_cannot_trace_an_output_the_model_returns_is_not_folded_into():
    model = randomize(_ReturnsTheConvOutput(), seed=9).eval()
    x = torch.randn(2, 3, 4, 4)
    expected = model(x)
    _, changes = fold(model, example_input=x)
    assert ("bn", "nothing to fold into: now a per-channel ChannelAffine") in changes.changed
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


class _SubConv(nn.Conv3d):
    """torchvision's Conv3DSimple: a Conv3d subclass computing a Conv3d."""

    @staticmethod
    def stride_of() -> int:
        return 1


class _StandardizedConv(nn.Conv2d):
    """A weight-standardized conv (timm's StdConv2d): scaling its weight changes nothing."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


def test_subclasses_of_conv_fold_unless_they_override_the_forward():
    layers = (_SubConv(2, 3, 1), nn.BatchNorm3d(3), nn.Flatten(1, 2), _StandardizedConv(6, 4, 1), nn.BatchNorm2d(4))
    model = randomize(nn.Sequential(*layers), seed=8).eval()
    x = torch.randn(2, 2, 2, 3, 3)
    expected = model(x)
    _, changes = fold(model)
    assert changes.changed == [("1", "folded into 0"), ("4", "nothing to fold into: now a per-channel ChannelAffine")]
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "wrap, attribute",
    [(lambda m: torch.compile(m, backend="eager"), "_orig_mod"), (nn.DataParallel, "module")],
    ids=["torch.compile", "DataParallel"],
)
def test_a_wrapped_model_folds_as_the_model_it_runs(wrap, attribute):
    """torch.fx traces neither wrapper: fold works on the module it runs."""
    torch.manual_seed(0)
    model = randomize(ResNet()).eval()
    x = torch.randn(2, 3, 8, 8)
    expected, expected_changes = fold(copy.deepcopy(model))
    got, changes = fold(wrap(copy.deepcopy(model)))
    assert [path for path, _ in changes.changed] == [f"{attribute}.{path}" for path, _ in expected_changes.changed]
    assert not changes.skipped, changes
    with torch.no_grad():
        torch.testing.assert_close(got(x), model(x), rtol=1e-5, atol=1e-6)


def _weight_norm(m):
    torch.nn.utils.parametrizations.weight_norm(m[0])


def _spectral_norm(m):
    torch.nn.utils.parametrizations.spectral_norm(m[0])


def _hook_weight_norm(m):  # the older form: weight_g and weight_v, the weight made by a pre-hook
    with pytest.warns(FutureWarning):
        torch.nn.utils.weight_norm(m[0])


def _pruned_bias(m):
    from torch.nn.utils import prune

    prune.l1_unstructured(m[0], "bias", 0.5)


@pytest.mark.parametrize("compute", [_weight_norm, _spectral_norm, _hook_weight_norm, _pruned_bias])
def test_a_layer_whose_weight_or_bias_is_computed_is_not_folded_into(compute):
    """Folding writes into the layer's weight and bias: where each call computes them from
    other tensors, the write is undone (pruning, the hook weight norm) or rescaled (a
    parametrization), and the fold left the model computing something else."""
    torch.manual_seed(0)
    model = randomize(nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 1), nn.BatchNorm2d(4)))
    compute(model)
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
    folded, changes = fold(model)
    assert changes.skipped == [("1", changes.skipped[0][1])] and "computed from other tensors" in changes.skipped[0][1]
    assert changes.changed == [("4", "folded into 3")]
    with torch.no_grad():
        torch.testing.assert_close(folded(x), expected, rtol=1e-5, atol=1e-6)
