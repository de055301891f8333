"""A model converted with fuse=True, handed to helpers written for torch's layers (timm's and
torch's frozen-BN and SyncBatchNorm conversions, torch's conv + bn folding): each does to it
what it does to torch's model, or fails loudly; never a model that silently lost its
activation or residual."""

import copy

import pytest
import torch
from torch import fx, nn

import batchnorm as bn
from batchnorm.tools import convert

from .models import ResNet, randomize
from .thirdparty import need


def _fused_resnet() -> tuple[nn.Module, nn.Module]:
    """(torch's ResNet, the same converted with fuse=True: BatchNormActs, residuals fused)."""
    theirs = randomize(ResNet(), seed=3)
    ours, _ = convert(copy.deepcopy(theirs), fuse=True)
    assert isinstance(ours, fx.GraphModule)
    assert sum(isinstance(m, bn.BatchNormAct) for m in ours.modules()) >= 4
    return theirs, ours


def _same_in_both_modes(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    for training in (False, True):
        a.train(training), b.train(training)
        torch.testing.assert_close(a(x), b(x), rtol=1e-5, atol=1e-5)


def _timm():
    """timm's norm + activation module, where its batch-norm helpers live."""
    need("timm")
    from timm.layers import norm_act

    return norm_act


def test_timm_freeze_batch_norm_2d():
    """Before: the fused ReLUs were dropped (2.73 off) and the fused residuals raised
    "forward() takes 2 positional arguments but 3 were given"."""
    theirs, ours = _fused_resnet()
    timm = _timm()
    frozen_theirs, frozen_ours = timm.freeze_batch_norm_2d(theirs), timm.freeze_batch_norm_2d(ours)
    layers = [m for m in frozen_ours.modules() if isinstance(m, bn.BatchNormAct)]
    assert layers and all(isinstance(m.bn, timm.FrozenBatchNorm2d) for m in layers)
    _same_in_both_modes(frozen_ours, frozen_theirs, torch.randn(3, 3, 8, 8))
    back = timm.unfreeze_batch_norm_2d(frozen_ours)
    assert all(type(m.bn) is nn.BatchNorm2d for m in back.modules() if isinstance(m, bn.BatchNormAct))


@pytest.mark.parametrize("helper", ["timm", "torch"])
def test_convert_sync_batchnorm(helper):
    """Outside a process group torch's SyncBatchNorm normalizes like BatchNorm2d, so the
    converted models agree in both modes with torch's model converted the same way."""
    theirs, ours = _fused_resnet()
    convert_sync = _timm().convert_sync_batchnorm if helper == "timm" else nn.SyncBatchNorm.convert_sync_batchnorm
    synced_theirs, synced_ours = convert_sync(theirs), convert_sync(ours)
    layers = [m for m in synced_ours.modules() if isinstance(m, bn.BatchNormAct)]
    assert layers and all(type(m.bn) is nn.SyncBatchNorm for m in layers)
    _same_in_both_modes(synced_ours, synced_theirs, torch.randn(3, 3, 8, 8))


def test_fuse_conv_bn_eval_refuses_a_batchnorm_act_and_folds_its_layer():
    conv = randomize(nn.Conv2d(3, 4, 3)).eval()
    layer = randomize(bn.BatchNormAct(bn.BatchNorm2d(4), "relu")).eval()
    with pytest.raises(AttributeError, match="running_mean"):
        torch.nn.utils.fusion.fuse_conv_bn_eval(conv, layer)
    folded = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, layer.bn)  # the batch norm alone
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(layer.act(folded(x)), layer(conv(x)), rtol=1e-5, atol=1e-5)


def test_torch_fx_fuse_leaves_the_model_right():
    """torch.fx.experimental.optimization.fuse folds (Conv2d, BatchNorm2d) by exact type: our
    layers are not folded, and nothing else changes."""
    from torch.fx.experimental.optimization import fuse

    theirs, ours = _fused_resnet()
    x = torch.randn(3, 3, 8, 8)
    fused = fuse(ours.eval())
    torch.testing.assert_close(fused(x), theirs.eval()(x), rtol=1e-5, atol=1e-5)


def test_our_tools_find_the_batch_norm_in_a_batchnorm_act():
    """fold, check and insert see `<path>.bn` after the convolution, as they see a batch
    norm alone: folded, its bias reported, no second batch norm inserted."""
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), bn.BatchNormAct(bn.BatchNorm2d(4), "relu"), nn.Conv2d(4, 2, 1)))
    x = torch.randn(2, 3, 6, 6)
    report = bn.check(model.eval(), [x])
    assert [(f.layer, f.kind) for f in report.findings if f.kind == "bias_before_batchnorm"] == [("1.bn", "bias_before_batchnorm")]
    expected = model(x)
    folded, changes = bn.fold(copy.deepcopy(model))
    assert changes.changed == [("1.bn", "folded into 0")]
    torch.testing.assert_close(folded(x), expected, rtol=1e-5, atol=1e-5)
    _, changes = bn.insert(model)
    assert not changes.changed
