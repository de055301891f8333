"""insert: batch norm between every Linear/Conv and the activation it feeds."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import batchnorm as bn
from batchnorm.tools import insert

from .models import mlp


def test_mlp_gets_batchnorm_before_each_activation_and_trains():
    torch.manual_seed(0)
    model = mlp(features=8, hidden=32, classes=3)
    _, changes = insert(model)
    assert [p for p, _ in changes.changed] == ["0", "2"]
    for i in (0, 2):
        assert isinstance(model[i], nn.Sequential)
        assert model[i][0].bias is None and type(model[i][1]) is bn.BatchNorm1d
    assert model[4].bias is not None  # the output layer feeds no activation
    x = torch.randn(256, 8)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_traced_custom_module_with_functional_activations():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv1d(2, 4, 3)
            self.c2 = nn.Conv2d(2, 5, 3)
            self.c3 = nn.Conv3d(2, 6, 1)
            self.skip = nn.Linear(5, 3)

        def forward(self, a, b, c):
            return F.gelu(self.c1(a)), self.c2(b).relu(), torch.sigmoid(self.c3(c)), self.skip(a)

    model = Net()
    _, changes = insert(model)
    assert [p for p, _ in changes.changed] == ["c1", "c2", "c3"]
    assert [type(getattr(model, n)[1]) for n in ("c1", "c2", "c3")] == [bn.BatchNorm1d, bn.BatchNorm2d, bn.BatchNorm3d]
    outs = model(torch.randn(4, 2, 5), torch.randn(4, 2, 5, 5), torch.randn(4, 2, 2, 2, 2))
    assert outs[1].shape == (4, 5, 3, 3)


def test_existing_batchnorm_is_left_alone():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),  # already normalized
        nn.Conv2d(4, 4, 3), nn.ReLU(), nn.BatchNorm2d(4),  # normalized after the activation
    )  # fmt: skip
    _, changes = insert(model)
    assert not changes.changed
    assert changes.skipped == [("3", "its activation already feeds the batch norm 5")]
    assert sum(isinstance(m, _BatchNorm) for m in model.modules()) == 2


def test_untraceable_model_falls_back_to_sequential_order():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))

        def forward(self, x):
            return self.body(x) if x.sum() > 0 else -self.body(x)

    model = Net()
    ref = insert(model, inplace=False)[0]
    assert isinstance(model.body[0], nn.Linear)  # inplace=False left it alone
    assert type(ref.body[0][1]) is bn.BatchNorm1d
    assert ref.body[0][1].training


def test_dtype_and_device_follow_the_layer():
    model = nn.Sequential(nn.Linear(3, 4).double(), nn.Tanh()).eval()
    insert(model)
    norm = model[0][1]
    assert norm.running_mean.dtype == torch.float64 and not norm.training


def test_after_the_activation_keeps_the_bias_and_normalizes_the_activation_output():
    torch.manual_seed(0)
    model = mlp(features=8, hidden=16, classes=3)
    before = insert(model, inplace=False)[0]
    _, changes = insert(model, position="after")
    assert changes.changed == [
        ("1", "now nn.Sequential(ReLU, BatchNorm1d(16))"),
        ("3", "now nn.Sequential(Tanh, BatchNorm1d(16))"),
    ]
    assert model[0].bias is not None and before[0][0].bias is None
    x = torch.randn(64, 8)
    a = model[1][1](torch.relu(model[0](x)))  # BN(relu(W x + b)): zero mean, unit variance per unit
    torch.testing.assert_close(a.mean(0), torch.zeros(16), atol=1e-5, rtol=0)
    torch.testing.assert_close(a.var(0, correction=0), torch.ones(16), atol=1e-3, rtol=0)
    expected = model[4](model[3][1](torch.tanh(model[2](a))))
    torch.testing.assert_close(model(x), expected)


def test_after_a_functional_activation_is_skipped_and_a_bad_position_refused():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 4)

        def forward(self, x):
            return F.relu(self.fc(x))

    model = Net()
    _, changes = insert(model, position="after")
    assert not changes.changed and isinstance(model.fc, nn.Linear)
    assert changes.skipped[0][0] == "fc" and "function call (relu)" in changes.skipped[0][1]
    with pytest.raises(ValueError, match="position must be"):
        insert(model, position="middle")
