"""SequenceBatchNorm: batch norm over the last dimension of (N, L, C), the (M, C) path, no copy."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import batchnorm as bn
from batchnorm import functional, layout


class Block(nn.Module):
    """A transformer-style pre-norm MLP block over (N, L, C): x + W2 gelu(W1 norm(x))."""

    def __init__(self, c: int, norm: nn.Module) -> None:
        super().__init__()
        self.norm, self.fc1, self.fc2 = norm, nn.Linear(c, 4 * c), nn.Linear(4 * c, c)

    def forward(self, x, mask=None):
        h = self.norm(x) if mask is None else self.norm(x, mask=mask)
        return x + self.fc2(F.gelu(self.fc1(h)))


class TransposedTorchBN(nn.Module):
    """What users write today: torch's BatchNorm1d between two transposes."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(c)

    def forward(self, x):
        return self.bn(x.transpose(1, 2)).transpose(1, 2)


def test_transformer_block_equals_torch_with_transposes_over_training_steps():
    torch.manual_seed(0)
    c = 8
    ours = Block(c, bn.SequenceBatchNorm(c))
    theirs = Block(c, TransposedTorchBN(c))
    theirs.load_state_dict({k.replace("norm.norm.", "norm.bn."): v for k, v in ours.state_dict().items()})
    for model in (ours, theirs):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        torch.manual_seed(1)
        for _ in range(3):
            x = torch.randn(4, 6, c) * 3 + 1
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for (k, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=k)
    x = torch.randn(2, 5, c)
    torch.testing.assert_close(ours.eval()(x), theirs.eval()(x), rtol=1e-5, atol=1e-5)


def test_torchs_batchnorm1d_on_n_l_c_normalizes_the_wrong_axis():
    torch.manual_seed(2)
    x = torch.randn(4, 8, 8) + torch.arange(8.0)  # feature j has mean j; L == C == 8
    wrong = nn.BatchNorm1d(8)(x)  # accepted: dimension 1 (the positions) taken as channels
    right = bn.SequenceBatchNorm(8)(x)
    assert wrong.mean((0, 1)).abs().max() > 1.0  # the features' means are not removed
    torch.testing.assert_close(right.mean((0, 1)), torch.zeros(8), atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError):
        nn.BatchNorm1d(8)(torch.randn(4, 6, 8))  # L != C: refused


def test_rows_reach_the_kernels_as_a_channels_last_view_of_the_input(monkeypatch):
    seen = []
    real = functional.batch_norm

    def spy(x, *args, **kwargs):
        seen.append(x)
        return real(x, *args, **kwargs)

    monkeypatch.setattr(functional, "batch_norm", spy)
    x, r = torch.randn(4, 6, 8), torch.randn(4, 6, 8)
    y = bn.BatchNormAct(bn.SequenceBatchNorm(8), "relu")(x, residual=r)
    (rows,) = seen
    assert rows.shape == (24, 8) and rows.data_ptr() == x.data_ptr()  # a view: no copy
    assert layout.kind_of(rows) == "mc"
    assert y.shape == x.shape and y.is_contiguous()
    expected = torch.relu(F.batch_norm(x.reshape(24, 8), None, None, training=True) + r.reshape(24, 8))
    torch.testing.assert_close(y, expected.reshape(4, 6, 8))


def test_padding_mask_takes_statistics_over_the_valid_tokens():
    torch.manual_seed(3)
    x = torch.randn(3, 5, 4)
    valid = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    x[~valid] = 1e6  # padding values: they must not reach the statistics
    layer = bn.SequenceBatchNorm(4, momentum=1.0)
    y = layer(x, mask=valid)
    var, mean = torch.var_mean(x[valid], dim=0, correction=0)
    torch.testing.assert_close(y[valid], (x[valid] - mean) / torch.sqrt(var + 1e-5))
    torch.testing.assert_close(layer.norm.running_mean, mean)
    with pytest.raises(ValueError, match="mask must have"):
        layer(x, mask=valid[:, :4])
    with pytest.raises(ValueError, match="last dimension"):
        layer(torch.randn(3, 4, 5))


def test_tools_see_an_ordinary_batch_norm_over_rows():
    torch.manual_seed(4)
    model = Block(6, bn.SequenceBatchNorm(6))
    batches = [torch.randn(4, 5, 6) * 2 + 1 for _ in range(3)]
    bn.recalibrate(model, batches, progress=False)
    var, mean = torch.var_mean(torch.cat(batches).reshape(-1, 6), dim=0)
    torch.testing.assert_close(model.norm.norm.running_mean, mean)
    torch.testing.assert_close(model.norm.norm.running_var, var)
    micro = [torch.randn(4, 5, 6) * 3 for _ in range(2)]
    with bn.accumulate(model):
        for b in micro:
            model(b)
    step_var = torch.cat(micro).reshape(-1, 6).double().var(0)
    torch.testing.assert_close(model.norm.norm.running_var, (0.9 * var + 0.1 * step_var).float())  # one merged update
    assert int(model.norm.norm.num_batches_tracked) == 4
    synced = bn.SyncBatchNorm.convert(copy.deepcopy(model))
    assert isinstance(synced.norm.norm, bn.SyncBatchNorm)
    torch.testing.assert_close(synced(batches[0]), model(batches[0]))  # no process group: plain
    per_token, _ = bn.replace_norm(copy.deepcopy(model), "layer")  # per token over its C features
    x = torch.randn(2, 5, 6)
    h = F.layer_norm(x, (6,), model.norm.norm.weight, model.norm.norm.bias)
    torch.testing.assert_close(per_token(x), x + model.fc2(F.gelu(model.fc1(h))))


@pytest.mark.slow
def test_a_model_holding_it_traces_folds_reverts_compiles_and_exports():
    torch.manual_seed(5)
    model = Block(8, bn.SequenceBatchNorm(8))
    for _ in range(2):
        model(torch.randn(4, 6, 8))
    model.eval()
    x = torch.randn(2, 6, 8)
    expected = model(x)
    folded, changes = bn.fold(copy.deepcopy(model))
    assert changes.skipped == []  # traced by torch.fx (the shape checks are one recorded call)
    torch.testing.assert_close(folded(x), expected)
    reverted, _ = bn.revert(copy.deepcopy(model))
    assert type(reverted.norm.norm) is nn.BatchNorm1d
    torch.testing.assert_close(reverted(x), expected)
    program = torch.export.export(model, (x,))
    torch.testing.assert_close(program.module()(x), expected)
    eager, compiled = copy.deepcopy(model).train(), torch.compile(copy.deepcopy(model).train(), fullgraph=True)
    torch.testing.assert_close(compiled(x), eager(x))
    torch.testing.assert_close(compiled.norm.norm.running_var, eager.norm.norm.running_var)
