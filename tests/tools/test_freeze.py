"""freeze / unfreeze, frozen_stats, stats_snapshot / stats_restore."""

import copy
import pickle

import pytest
import torch
from torch import nn

import batchnorm as bn
from batchnorm.tools import freeze, frozen_stats, stats_restore, stats_snapshot, unfreeze

from .models import FrozenBatchNorm2d, randomize


def _model():
    return randomize(nn.Sequential(nn.Conv2d(3, 4, 3), bn.BatchNormAct(bn.BatchNorm2d(4), "relu"), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2)))


def _buffers(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_frozen_model_trains_with_fixed_statistics_and_unfreeze_undoes_it():
    model = _model()
    x = torch.randn(4, 3, 6, 6)
    expected = copy.deepcopy(model).eval()(x)
    before = _buffers(model)
    _, changes = freeze(model)
    assert [p for p, _ in changes.changed] == ["1.bn", "3"]
    model.train()
    assert not model[1].bn.training and model[0].training
    out = model(x)
    torch.testing.assert_close(out, expected)
    assert _same(_buffers(model), before)
    assert not any(p.requires_grad for m in (model[1], model[3]) for p in m.parameters())
    out.sum().backward()  # gradients still reach the layers before
    assert model[0].weight.grad is not None and model[1].bn.weight.grad is None
    # a frozen model survives deepcopy and pickling
    clone = pickle.loads(pickle.dumps(copy.deepcopy(model)))
    clone.train()
    assert not clone[1].bn.training

    _, changes = unfreeze(model)
    assert [p for p, _ in changes.changed] == ["1.bn", "3"]
    assert model[1].bn.training and all(p.requires_grad for p in model.parameters())
    model(x)
    assert not _same(_buffers(model), before)
    model.eval()
    assert not model[1].bn.training


def test_freeze_statistics_only_keeps_gamma_beta_trainable():
    model = _model()
    freeze(model, parameters=False)
    assert all(p.requires_grad for p in model.parameters())
    model.train()
    assert not model[3].training
    _, changes = freeze(model)
    assert [why for _, why in changes.skipped] == ["already frozen", "already frozen"]


def test_freeze_skips_what_it_cannot_freeze():
    model = nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False), FrozenBatchNorm2d(3))
    _, changes = freeze(model)
    assert not changes.changed and len(changes.skipped) == 2
    _, changes = unfreeze(model)
    assert "frozen by construction" in changes.skipped[1][1]
    with pytest.raises(ValueError, match="no batch-norm layer"):
        freeze(nn.Linear(2, 2))


def test_frozen_stats_trains_without_touching_statistics():
    model = _model().train()
    free = copy.deepcopy(model)
    x = torch.randn(4, 3, 6, 6)
    before = _buffers(model)
    momenta = [model[1].bn.momentum, model[3].momentum]
    with frozen_stats(model):
        out = model(x)
        inside = {k: v for k, v in _buffers(model).items() if "running" in k}
        assert _same(inside, {k: v for k, v in before.items() if "running" in k})  # even inside
    assert _same(_buffers(model), before)
    assert [model[1].bn.momentum, model[3].momentum] == momenta
    torch.testing.assert_close(out, free(x))  # still normalized by the batch statistics
    assert not _same(_buffers(free), before)


def test_frozen_stats_restores_after_an_error():
    model = _model().train()
    before = _buffers(model)
    with pytest.raises(RuntimeError), frozen_stats(model):
        model(torch.randn(4, 3, 6, 6))
        raise RuntimeError("boom")
    assert _same(_buffers(model), before) and model[1].bn.momentum == 0.1


def test_snapshot_restore_round_trip_and_mismatch():
    model = _model()
    snap = stats_snapshot(model)
    before = _buffers(model)
    model.train()(torch.randn(4, 3, 6, 6))
    _, changes = stats_restore(model, snap)
    assert _same(_buffers(model), before) and len(changes.changed) == 2
    other = nn.Sequential(nn.Conv2d(3, 4, 3), bn.BatchNormAct(bn.BatchNorm2d(5), "relu"))
    with pytest.raises(ValueError, match=r"1.bn.running_mean: snapshot has shape \(4,\), model has shape \(5,\)"):
        stats_restore(other, snap)
    with pytest.raises(ValueError, match="'3' is not a batch-norm layer"):
        stats_restore(other, snap)
    with pytest.raises(TypeError, match="stats_snapshot"):
        stats_restore(model, [1, 2])
