"""convert / revert: torch's batch norm <-> ours, and fuse=True (activation, residual add)."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import batchnorm as bn
from batchnorm import activations
from batchnorm.tools import convert, revert

from .models import Block, FrozenBatchNorm2d, ResNet, randomize
from .thirdparty import need


def _fused(m: nn.Module) -> str | None:
    """The activation a layer of the converted model fuses: a BatchNormAct's, None for a
    batch-norm layer alone."""
    return activations.name_of_module(m.act) if isinstance(m, bn.BatchNormAct) else None


def _mixed() -> nn.Module:
    """torch's 1d/2d/3d with every setting that maps, and one of ours already."""
    return nn.ModuleDict(
        {
            "a": nn.BatchNorm1d(5, eps=1e-3, momentum=None),
            "b": nn.BatchNorm2d(4, affine=False),
            "c": nn.BatchNorm3d(3, momentum=0.3, track_running_stats=False),
            "d": bn.BatchNorm2d(4),
            "e": nn.BatchNorm2d(4, dtype=torch.float64),
        }
    )


def _inputs():
    g = torch.Generator().manual_seed(1)
    return {
        "a": torch.randn(6, 5, generator=g),
        "b": torch.randn(3, 4, 5, 5, generator=g),
        "c": torch.randn(2, 3, 2, 3, 3, generator=g),
        "d": torch.randn(3, 4, 5, 5, generator=g),
        "e": torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64),
    }


def test_convert_keeps_everything_and_revert_undoes_it():
    model = randomize(_mixed())
    model["b"].train()
    model["a"].eval()
    before = {k: dict(m.state_dict()) for k, m in model.items()}
    params = {n: p for n, p in model.named_parameters()}
    ref = copy.deepcopy(model)
    out, changes = convert(model)
    assert out is model
    assert {p for p, _ in changes.changed} == {"a", "b", "c", "e"}
    for key, m in model.items():
        assert type(m).__module__ == "batchnorm.nn", key
        old = ref[key]
        assert (m.eps, m.momentum, m.affine, m.track_running_stats, m.training) == (
            old.eps, old.momentum, old.affine, old.track_running_stats, old.training
        )
        assert m.state_dict().keys() == before[key].keys()
        for name, value in before[key].items():
            assert torch.equal(m.state_dict()[name], value)
    assert model["e"].weight.dtype == torch.float64
    # The very same parameter tensors: an optimizer built before keeps working.
    assert all(p is params[n] for n, p in model.named_parameters())
    model.eval(), ref.eval()
    for key, x in _inputs().items():
        torch.testing.assert_close(model[key](x), ref[key](x), rtol=1e-6, atol=1e-6)
    back, changes = revert(model)
    assert {p for p, _ in changes.changed} == {"a", "b", "c", "d", "e"}
    assert [type(m) for m in back.values()] == [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.BatchNorm2d, nn.BatchNorm2d]


def test_convert_not_inplace_leaves_the_model():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    copy_, _ = convert(model, inplace=False)
    assert type(model[1]) is nn.BatchNorm2d and type(copy_[1]) is bn.BatchNorm2d


def test_convert_carries_hooks():
    model = nn.Sequential(nn.BatchNorm1d(3))
    seen = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(type(m)))
    convert(model)
    model(torch.randn(4, 3))
    assert seen == [bn.BatchNorm1d]


def test_sync_batchnorm_is_converted_or_skipped_with_a_reason():
    model = nn.Sequential(nn.SyncBatchNorm(3))
    _, changes = convert(model)
    try:
        from batchnorm.distributed import SyncBatchNorm
    except ImportError:
        assert type(model[0]) is nn.SyncBatchNorm
        assert changes.skipped and "SyncBatchNorm" in changes.skipped[0][1]
    else:
        assert type(model[0]) is SyncBatchNorm
        revert(model)
        assert type(model[0]) is nn.SyncBatchNorm


def test_frozen_style_becomes_a_frozen_batchnorm_with_the_same_outputs():
    frozen = randomize(FrozenBatchNorm2d(4))
    model = nn.Sequential(nn.Conv2d(2, 4, 3), frozen)
    x = torch.randn(3, 2, 5, 5)
    expected = model(x)
    convert(model)
    assert type(model[1]) is bn.BatchNorm2d
    model.train()  # a frozen layer stays in evaluation mode
    assert not model[1].training and not model[1].weight.requires_grad
    torch.testing.assert_close(model(x), expected)
    revert(model)
    model.train()
    assert type(model[1]) is nn.BatchNorm2d and not model[1].training
    torch.testing.assert_close(model(x), expected)


def test_unknown_subclass_and_lazy_layers_are_skipped():
    class Mine(nn.BatchNorm2d):
        pass

    model = nn.Sequential(Mine(3), nn.LazyBatchNorm2d())
    _, changes = convert(model)
    assert type(model[0]) is Mine and type(model[1]) is nn.LazyBatchNorm2d
    assert [p for p, _ in changes.skipped] == ["0", "1"]


def test_timm_norm_act_layers_become_ours_with_the_activation_or_are_left_with_a_reason():
    need("timm")
    from timm.layers import BatchNormAct2d, FrozenBatchNormAct2d

    model = randomize(nn.Sequential(
        BatchNormAct2d(4, act_layer=nn.SiLU),
        BatchNormAct2d(4, act_layer=nn.Hardswish),
        FrozenBatchNormAct2d(4, act_layer=nn.ReLU),
        BatchNormAct2d(4, apply_act=False),
        BatchNormAct2d(4, act_layer=nn.ReLU, drop_layer=nn.Tanh),  # a deterministic stand-in for drop-block
    ), seed=4)  # fmt: skip
    ref = copy.deepcopy(model)
    keys = ref.state_dict().keys()
    _, changes = convert(model)
    assert [p for p, _ in changes.changed] == ["0", "1", "2", "3"]
    assert changes.skipped == [("4", "BatchNormAct2d applies drop = Tanh after normalizing, which a "
                                     "BatchNormAct does not; left as it is")]  # fmt: skip
    assert [type(m) for m in model] == [bn.BatchNormAct] * 3 + [bn.BatchNorm2d, BatchNormAct2d]
    assert [type(model[i].bn) for i in range(3)] == [bn.BatchNorm2d] * 3
    assert [_fused(model[i]) for i in (0, 1, 2, 3)] == ["silu", "hardswish", "relu", None]
    assert not model[2].bn.training and not model[2].bn.weight.requires_grad  # frozen, as timm's was
    assert model.state_dict().keys() == keys | {"2.num_batches_tracked"}  # a frozen-style layer has none
    _compare(model, ref, torch.randn(3, 4, 5, 5))


def test_no_batchnorm_is_an_error():
    with pytest.raises(ValueError, match="no batch-norm layer"):
        convert(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        convert("model")


def _compare(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    for mode in (False, True):
        a.train(mode), b.train(mode)
        torch.testing.assert_close(a(x), b(x), rtol=1e-5, atol=1e-6)


def test_fuse_sequential_in_place_keeps_the_class():
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.SiLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.GELU("tanh")))
    ref = copy.deepcopy(model)
    fused, changes = convert(model, fuse=True)
    assert type(fused) is nn.Sequential
    assert _fused(fused[1]) == "silu" and isinstance(fused[2], nn.Identity)
    assert _fused(fused[4]) is None and isinstance(fused[5], nn.GELU)  # tanh-GELU is not ours
    _compare(fused, ref, torch.randn(4, 3, 6, 6))


def test_fuse_resnet_residual_and_shared_relu():
    model = randomize(ResNet(), seed=3)
    ref = copy.deepcopy(model)
    fused, changes = convert(model, fuse=True)
    assert isinstance(fused, fx.GraphModule)
    assert _fused(fused.get_submodule("layer1.bn2")) == "relu"
    residual_calls = [n for n in fused.graph.nodes if n.op == "call_module" and len(n.args) == 2]
    assert {n.target for n in residual_calls} == {"layer1.bn2", "layer2.bn2"}
    assert not any(n.op == "call_function" and "add" in str(n.target) for n in fused.graph.nodes)
    assert fused.state_dict().keys() == ref.state_dict().keys()
    _compare(fused, ref, torch.randn(3, 3, 8, 8))


def test_fuse_functional_activations():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 6)
            self.bn = nn.BatchNorm1d(6)
            self.fc2 = nn.Linear(6, 6)
            self.bn2 = nn.BatchNorm1d(6)

        def forward(self, x):
            y = F.leaky_relu(self.bn(self.fc(x)))
            return self.bn2(self.fc2(y)).sigmoid()

    model = randomize(Net())
    ref = copy.deepcopy(model)
    fused, _ = convert(model, fuse=True)
    assert (_fused(fused.bn), _fused(fused.bn2)) == ("leaky_relu", "sigmoid")
    _compare(fused, ref, torch.randn(5, 4))


def test_fuse_relu6_and_hardswish_but_not_hardtanh():
    """MobileNet's activations: nn.ReLU6, F.relu6 (inplace given positionally), F.hardswish;
    F.hardtanh(x, 0, 6) computes ReLU6 too but is not fused (only torch's own ReLU6 is)."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = nn.ModuleList(nn.Conv2d(3, 3, 1) for _ in range(4))
            self.bns = nn.ModuleList(nn.BatchNorm2d(3) for _ in range(4))
            self.act = nn.ReLU6(inplace=True)

        def forward(self, x):
            x = self.act(self.bns[0](self.convs[0](x)))
            x = F.relu6(self.bns[1](self.convs[1](x)), True)
            x = F.hardswish(self.bns[2](self.convs[2](x)))
            return F.hardtanh(self.bns[3](self.convs[3](x)), 0.0, 6.0)

    model = randomize(Net())
    ref = copy.deepcopy(model)
    fused, _ = convert(model, fuse=True)
    assert [_fused(fused.get_submodule(f"bns.{i}")) for i in range(4)] == ["relu6", "relu6", "hardswish", None]
    _compare(fused, ref, torch.randn(2, 3, 6, 6) * 4)


def test_fuse_leaves_a_bn_whose_output_is_used_twice():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(3)

        def forward(self, x):
            y = self.bn(x)
            return torch.relu(y) + y

    model, changes = convert(Net(), fuse=True)
    assert _fused(model.bn) is None
    assert not isinstance(model, fx.GraphModule)


def test_fuse_untraceable_model_uses_sequential_order():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU())

        def forward(self, x):
            if x.sum() > 0:  # data-dependent: fx cannot trace it
                return self.body(x)
            return self.body(-x)

    model = randomize(Net())
    ref = copy.deepcopy(model)
    fused, changes = convert(model, fuse=True)
    assert _fused(fused.body[1]) == "relu"
    assert any("could not trace" in why for _, why in changes.skipped)
    _compare(fused, ref, torch.randn(6, 3))


class _TrainingBranches(nn.Module):
    """GoogLeNet's shape: an auxiliary head only in training, and an activation applied in
    one mode only."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.act = nn.ReLU()
        self.block = Block(8, 8)
        self.aux = nn.Linear(8, 2)

    def forward(self, x):
        y = self.stem(x)
        y = self.block(self.act(y) if self.training else y)
        pooled = y.mean((2, 3))
        if self.training:
            return pooled, self.aux(pooled)
        return pooled


@pytest.mark.parametrize("training", [False, True], ids=["converted in eval", "converted in train"])
def test_fuse_keeps_what_the_model_does_in_each_mode_whatever_mode_it_was_converted_in(training):
    model = randomize(_TrainingBranches(), seed=6).train(training)
    ref = copy.deepcopy(model)
    fused, changes = convert(model, fuse=True)
    assert type(fused) is _TrainingBranches and isinstance(fused.block, fx.GraphModule)
    assert _fused(fused.block.bn2) == "relu" and _fused(fused.stem[1]) is None
    assert ("block", "Block became a torch.fx.GraphModule (graph rewritten to fuse)") in changes.changed
    _compare(fused, ref, torch.randn(3, 3, 6, 6))


def test_fuse_where_fx_cannot_trace_finds_the_activations_in_forwards_of_the_example():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.bn, self.act = nn.Linear(3, 4), nn.BatchNorm1d(4), nn.SiLU()
            self.bn2, self.act2 = nn.BatchNorm1d(4), nn.ReLU()

        def forward(self, x):
            if x.sum() > 0:  # data-dependent: fx cannot trace it
                x = -x
            y = self.act(self.bn(self.fc(x)))
            z = self.bn2(y)
            return self.act2(z) + z  # bn2's output is read twice: not fusable

    model = randomize(Net())
    ref = copy.deepcopy(model)
    x = torch.randn(6, 3)
    fused, changes = convert(model, fuse=True, example_input=x)
    assert _fused(fused.bn) == "silu" and isinstance(fused.act, nn.Identity)
    assert _fused(fused.bn2) is None and isinstance(fused.act2, nn.ReLU)
    assert torch.equal(fused.bn.bn.running_mean, ref.bn.running_mean)  # the forwards left no trace
    _compare(fused, ref, x)


@pytest.mark.parametrize("traceable", [True, False])
def test_fuse_looks_through_an_identity_between_batch_norm_and_activation(traceable):
    class Block(nn.Module):
        """timm's blocks: an identity drop-block between batch norm and activation."""

        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.drop, self.act = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Identity(), nn.ReLU()

        def forward(self, x):
            if not traceable and x.sum() > 0:
                x = -x
            return self.act(self.drop(self.bn(self.conv(x))))

    model = randomize(Block())
    ref = copy.deepcopy(model)
    x = torch.randn(2, 3, 4, 4)
    fused, _ = convert(model, fuse=True, example_input=x)
    assert _fused(fused.bn) == "relu" and isinstance(fused.act, nn.Identity)
    _compare(fused, ref, x)


def test_revert_turns_fused_layers_into_torchs_layer_and_activation():
    """revert after convert(fuse=True): every fused layer becomes torch's layer, then its
    activation module, the residual added between them; outputs, parameters and running
    statistics as the fused model's, in both modes."""
    model = randomize(ResNet(), seed=3)
    x = torch.randn(4, 3, 8, 8)
    fused, _ = convert(model, fuse=True)
    ref = copy.deepcopy(fused)
    back, changes = revert(fused)
    assert not changes.skipped
    assert not [m for m in back.modules() if type(m).__module__ == "batchnorm.nn"]
    block = back.get_submodule("layer1.bn2")  # took the residual
    assert type(block.bn) is nn.BatchNorm2d and type(block.act) is nn.ReLU
    assert type(back.get_submodule("stem.1").act) is nn.ReLU
    _compare(back, ref, x)  # ends with a training forward in each: running statistics move alike
    assert back.state_dict().keys() == ref.state_dict().keys()
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], value)


@pytest.mark.parametrize("activation,module", [("leaky_relu", nn.LeakyReLU), ("gelu", nn.GELU), ("silu", nn.SiLU)])
def test_revert_gives_the_activation_module(activation, module):
    layer = randomize(nn.Sequential(bn.BatchNormAct(bn.BatchNorm1d(3), activation)))
    ref = copy.deepcopy(layer)
    revert(layer)
    assert type(layer[0].bn) is nn.BatchNorm1d and type(layer[0].act) is module
    _compare(layer, ref, torch.randn(8, 3))


def test_revert_keeps_layers_torch_cannot_express():
    model = nn.Sequential(bn.BatchNorm1d(3, virtual_batch_size=4), bn.BatchNorm1d(3, unbiased_running_var=False))
    _, changes = revert(model)
    assert [type(m) for m in model] == [bn.BatchNorm1d, bn.BatchNorm1d]
    assert [p for p, _ in changes.skipped] == ["0", "1"]
    assert "virtual_batch_size=4" in changes.skipped[0][1]


class _Untraceable(nn.Module):
    """A model fx cannot rewrite (data-dependent control flow), as third-party code often is:
    fuse=True then converts its layers without fusing, and the blocks' own in-place ReLU and
    `out += shortcut` run on our layer's output."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        if float(x.mean()) > 1e9:  # never true; fx cannot trace a branch on a value
            return x
        return self.net(x)


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("wrap", [False, True])
@pytest.mark.slow
def test_torchvision_style_blocks_train_like_torch_on_the_fast_path(fuse, wrap):
    """The torchvision ResNet block pattern (ReLU(inplace=True) after bn1, `out += identity`
    after bn2) at sizes where our layer runs its fused kernels: several SGD steps give torch's
    losses and weights."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                        Block(64, 64), Block(64, 64))  # fmt: skip
    reference = _Untraceable(copy.deepcopy(net)) if wrap else copy.deepcopy(net)
    ours, record = convert(_Untraceable(net) if wrap else net, fuse=fuse)
    x = torch.randn(16, 3, 16, 16)  # 16 x 64 x 16 x 16 = 2^18 values per layer
    assert bn.backends.resolve("auto", torch.empty(16, 64, 16, 16)).backend.name == "numba"
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.1)
    opt_ref = torch.optim.SGD(reference.parameters(), lr=0.1)
    for _ in range(3):
        losses = []
        for model, opt in ((ours, opt_ours), (reference, opt_ref)):
            opt.zero_grad()
            loss = model(x).square().mean()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-5)
    for (name, a), b in zip(ours.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("qat", [False, True])
def test_torch_ao_fuse_modules_fuses_our_plain_layers_as_torchs(qat):
    conv = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), bn.BatchNorm2d(4), nn.ReLU())).train(qat)
    linear = randomize(nn.Sequential(nn.Linear(3, 4), bn.BatchNorm1d(4))).train(qat)
    fuse = torch.ao.quantization.fuse_modules_qat if qat else torch.ao.quantization.fuse_modules
    for model, names, x in ((conv, ["0", "1", "2"], torch.randn(5, 3, 4, 4)), (linear, ["0", "1"], torch.randn(5, 3))):
        fused = fuse(model, [names])
        assert all(isinstance(fused[int(name)], nn.Identity) for name in names[1:])
        with torch.no_grad():
            torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)


def test_torch_ao_fuse_modules_refuses_a_layer_with_extras_and_a_batchnorm_act():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), bn.BatchNorm2d(4, virtual_batch_size=2)).eval()
    with pytest.raises(NotImplementedError, match="uses virtual_batch_size=2, which torch's BatchNorm2d cannot express"):
        torch.ao.quantization.fuse_modules(model, [["0", "1"]])
    fused = nn.Sequential(nn.Conv2d(3, 4, 3), bn.BatchNormAct(bn.BatchNorm2d(4), "silu")).eval()
    with pytest.raises(AssertionError, match="did not find fuser method"):
        torch.ao.quantization.fuse_modules(fused, [["0", "1"]])


def test_torch_ao_prepare_fx_takes_a_model_with_our_layers():
    model, _ = convert(randomize(ResNet()).eval(), fuse=True)
    x = torch.randn(2, 3, 8, 8)
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_fx

    with pytest.warns(DeprecationWarning), pytest.warns(UserWarning, match="stays a float layer"):
        prepared = prepare_fx(model, get_default_qconfig_mapping(), (x,))
    torch.testing.assert_close(prepared(x), model(x))


def test_torch_ao_fx_quantization_says_to_revert_first_and_then_quantizes_as_torchs():
    """prepare_fx matches batch norms by exact class, so it leaves ours unfused and in float:
    it warns; after revert it fuses conv + bn + relu and the quantized model is torch's."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torchs = randomize(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))).eval()
    ours, _ = convert(copy.deepcopy(torchs), fuse=True)
    x = torch.randn(4, 3, 10, 10)
    with pytest.warns(UserWarning, match=r"batchnorm.revert\(model\) before prepare_fx"):
        prepare_fx(copy.deepcopy(ours), get_default_qconfig_mapping(), (x,))
    with warnings.catch_warnings(record=True) as caught:  # tracing for anything else says nothing
        warnings.simplefilter("always")
        fx.symbolic_trace(ours)
    assert not caught, [str(w.message) for w in caught]

    quantized = []
    for model in (revert(ours)[0], torchs):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            prepared = prepare_fx(model, get_default_qconfig_mapping(), (x,))
        assert not [w for w in caught if "batchnorm.revert" in str(w.message)]
        prepared(x)  # calibration
        quantized.append(convert_fx(prepared))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in quantized[0].modules())
    torch.testing.assert_close(quantized[0](x), quantized[1](x), rtol=0, atol=0)


def test_torchvision_create_feature_extractor_takes_a_model_with_our_layers():
    need("torchvision")
    from torchvision.models.feature_extraction import create_feature_extractor

    ref = randomize(ResNet())
    model, _ = convert(copy.deepcopy(ref), fuse=True)
    nodes = {"layer1": "features", "head": "logits"}
    extractor, expected = create_feature_extractor(model, nodes), create_feature_extractor(ref, nodes)
    x = torch.randn(2, 3, 8, 8)
    for training in (True, False):  # its layers follow the mode as torch's do
        extractor.train(training), expected.train(training)
        torch.testing.assert_close(extractor(x), expected(x), rtol=1e-5, atol=1e-6)


def _under_orig_mod(changed: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """A model's changes as the same tool reports them for its torch.compile wrapper, the
    paths in the descriptions taken out again: every path under the wrapper's `_orig_mod`."""
    return [(f"_orig_mod.{path}" if path else "_orig_mod", what) for path, what in changed]


def _without_orig_mod(changed: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(path, what.replace("_orig_mod.", "")) for path, what in changed]


def test_a_compiled_model_is_converted_through_its_wrapper_and_runs_the_fused_graph():
    """torch.fx cannot trace torch.compile's wrapper, and the wrapper is bound to the module it
    was made with: the tools work on what it runs, and a model whose graph is rewritten comes
    back as a wrapper of the new module, with the same compile options."""
    torch.manual_seed(0)
    model = randomize(ResNet())
    expected, expected_changes = convert(copy.deepcopy(model), fuse=True)
    compiled = torch.compile(copy.deepcopy(model), backend="eager")
    wrapped = compiled._orig_mod
    got, changes = convert(compiled, fuse=True)
    assert _without_orig_mod(changes.changed) == _under_orig_mod(expected_changes.changed), changes
    assert not changes.skipped, changes  # fx traced what the wrapper runs
    assert type(got) is type(compiled) and got.dynamo_ctx is compiled.dynamo_ctx
    assert isinstance(got._orig_mod, fx.GraphModule)

    def unfused(*args, **kwargs):
        raise AssertionError("the wrapper ran the module it was made with, not the fused graph")

    wrapped.forward = unfused
    x = torch.randn(2, 3, 8, 8)
    for training in (True, False):
        torch.testing.assert_close(got.train(training)(x), expected.train(training)(x), rtol=1e-5, atol=1e-6)


class _BroadcastAdd(nn.Module):
    """relu(bn(conv(x)) + a per-example scalar): an add whose other operand broadcasts."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)) + x.mean((1, 2, 3), keepdim=True))


def test_a_fused_add_whose_operand_broadcasts_computes_what_the_model_did():
    """The graph does not say the add's other operand has the layer's shape: fused, a
    broadcasting one is added after the kernels (functional.batch_norm), as the model added it."""
    torch.manual_seed(0)
    model = randomize(_BroadcastAdd())
    fused, changes = convert(copy.deepcopy(model), fuse=True)
    assert ("bn", "fused the activation relu and the residual add of mean") in changes.changed
    x = torch.randn(4, 3, 6, 6)
    for training in (True, False):
        torch.testing.assert_close(fused.train(training)(x), model.train(training)(x), rtol=1e-5, atol=1e-6)
