"""accumulate: one running-statistics update per optimizer step from the merged micro-batches.

Each test shows the problem with torch's layer (k updates from k small batches) and the
fix. `accuracy_experiment` is the experiment of the docs (python -m tests.tools.test_accumulate
prints its table); `test_accumulated_statistics_are_closer_to_the_population` runs a short
version of it.
"""

import contextlib
import copy
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import batchnorm as bn
from batchnorm.tools import accumulate, recalibrate

from . import processes
from .models import ResNet


def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(p, m) for p, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _micro_step(model: nn.Module, micro: list[torch.Tensor]) -> None:
    """One optimizer step's forwards and backwards (no optimizer: the weights stay fixed)."""
    for x in micro:
        model(x).square().mean().backward()


def _inputs_per_layer(model: nn.Module, micro: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """What each batch-norm layer receives in `_micro_step`, concatenated over the
    micro-batches as (values, C) in float64 (on a copy: the model is not touched)."""
    probe = copy.deepcopy(model)
    seen = {path: [] for path, _ in _layers(probe)}
    for path, m in _layers(probe):
        m.register_forward_pre_hook(lambda mod, args, p=path: seen[p].append(args[0].detach()))
    _micro_step(probe, micro)
    rows = {p: [z.transpose(0, 1).reshape(z.shape[1], -1) for z in zs] for p, zs in seen.items()}
    return {p: torch.cat(r, 1).T.double() for p, r in rows.items()}


@pytest.mark.parametrize("ours", [False, True])
def test_resnet_four_micro_batches_update_once_from_the_merged_statistics(ours):
    torch.manual_seed(0)
    model = ResNet()
    if ours:
        model = bn.convert(model)[0]
        model.layer1.bn2.unbiased_running_var = False  # the Keras convention: m2 / n
    x = torch.randn(32, 3, 8, 8) * 2 + 1
    micro = list(x.chunk(4))

    large = copy.deepcopy(model)
    large(x)  # one forward of the whole batch: what the running statistics should get
    plain = copy.deepcopy(model)
    _micro_step(plain, micro)  # the problem: four updates from four batches of 8
    accumulated = copy.deepcopy(model)
    with accumulate(accumulated) as changes:
        _micro_step(accumulated, micro)

    # The first layer's input does not depend on any normalization: one update from the
    # merged micro-batches is the large batch's update.
    stem = ("stem.1", lambda m: m.stem[1])
    get = stem[1]
    torch.testing.assert_close(get(accumulated).running_mean, get(large).running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(get(accumulated).running_var, get(large).running_var, rtol=1e-5, atol=1e-6)
    gap = (get(plain).running_mean - get(large).running_mean).abs().max()
    assert gap > 100 * (get(accumulated).running_mean - get(large).running_mean).abs().max()

    # Every layer: one update (momentum 0.1 from mean 0, variance 1) from the exact statistics
    # of the inputs it received over the four micro-batches.
    inputs = _inputs_per_layer(model, micro)
    for (path, m), (_, p) in zip(_layers(accumulated), _layers(plain)):
        z = inputs[path]
        var = z.var(0, correction=1 if getattr(m, "unbiased_running_var", True) else 0)
        torch.testing.assert_close(m.running_mean, (0.1 * z.mean(0)).float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m.running_var, (0.9 + 0.1 * var).float(), rtol=1e-5, atol=1e-6)
        assert int(m.num_batches_tracked) == 1 and int(p.num_batches_tracked) == 4
    assert [p for p, _ in changes.changed] == [p for p, _ in _layers(model)]
    assert changes.changed[0][1] == "one update from 4 micro-batches (2048 values per channel)"

    # Normalization and gradients are those of plain micro-batch training.
    for a, b in zip(accumulated.parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_momentum_none_counts_one_batch_per_step():
    torch.manual_seed(1)
    layer = nn.BatchNorm1d(3, momentum=None)
    steps = [list((torch.randn(12, 3) * s).chunk(3)) for s in (1.0, 4.0)]
    for micro in steps:
        with accumulate(layer):
            for x in micro:
                layer(x)
    assert int(layer.num_batches_tracked) == 2
    var = [torch.cat(m).var(0) for m in steps]
    torch.testing.assert_close(layer.running_var, (var[0] + var[1]) / 2)  # a cumulative average of the steps


def test_a_non_finite_micro_batch_is_left_out():
    torch.manual_seed(2)
    micro = [torch.randn(8, 3), torch.randn(8, 3), torch.randn(8, 3)]
    micro[1][0, 0] = float("nan")
    poisoned = nn.BatchNorm1d(3)
    for x in micro:
        poisoned(x)
    assert poisoned.running_mean.isnan().any()  # the problem: torch's layer keeps the NaN

    for layer in (nn.BatchNorm1d(3), bn.BatchNorm1d(3)):
        with warnings.catch_warnings(record=True), accumulate(layer) as changes:
            for x in micro:
                layer(x)
        kept = torch.cat([micro[0], micro[2]]).double()
        torch.testing.assert_close(layer.running_mean, (0.1 * kept.mean(0)).float())
        torch.testing.assert_close(layer.running_var, (0.9 + 0.1 * kept.var(0)).float())
        what = "one update from 2 micro-batches (16 values per channel); 1 left out (non-finite values)"
        assert changes.changed == [("", what)]
        assert int(layer.num_batches_tracked) == 1


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_merges_each_micro_batch_once(reentrant):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    micro = [torch.randn(8, 3, requires_grad=True) for _ in range(2)]
    plain, checkpointed = copy.deepcopy(model), copy.deepcopy(model)
    with accumulate(plain):
        _micro_step(plain, micro)
    with accumulate(checkpointed) as changes:
        for x in micro:  # torch's layer alone would update in the forward and again in backward
            checkpoint(checkpointed, x, use_reentrant=reentrant).square().mean().backward()
    assert changes.changed == [("1", "one update from 2 micro-batches (16 values per channel)")]
    for a, b in zip(checkpointed.state_dict().values(), plain.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_the_statistics_kept_hold_no_micro_batch_alive():
    layer = nn.BatchNorm1d(3)
    with accumulate(layer):
        x = torch.randn(8, 3, requires_grad=True)
        layer(x).sum().backward()
        alive = weakref.ref(x)
        del x
        assert alive() is None


def test_an_exception_or_evaluation_mode_updates_nothing():
    layer = nn.BatchNorm1d(3)
    before = copy.deepcopy(layer.state_dict())
    with pytest.raises(RuntimeError, match="boom"), accumulate(layer):
        layer(torch.randn(8, 3))
        raise RuntimeError("boom")
    layer.eval()
    with accumulate(layer) as changes:
        layer(torch.randn(8, 3))
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())
    assert changes.skipped == [("", "not run in training mode inside the block; running statistics unchanged")]
    assert layer._forward_pre_hooks == {}


@pytest.mark.slow
def test_a_compiled_model_gets_the_same_updates():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), bn.BatchNorm2d(4))
    eager = copy.deepcopy(model)
    compiled = torch.compile(model)
    for step in range(2):
        micro = list(torch.randn(16, 3, 8, 8).chunk(4))
        for m in (compiled, eager):
            with accumulate(m):
                _micro_step(m, micro)
    for (k, a), b in zip(model.state_dict().items(), eager.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)
    assert int(model[1].num_batches_tracked) == 2


def _synchronized_step(rank: int, world: int) -> dict:
    """In each of 2 processes: 3 micro-batches of uneven sizes through SyncBatchNorm layers,
    without and with accumulate."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    model = bn.SyncBatchNorm.convert(net)
    g = torch.Generator().manual_seed(rank)
    micro = [torch.randn(n, 3, 6, 6, generator=g) + 2 * rank for n in ((2, 3, 4), (5, 2, 3))[rank]]
    plain = copy.deepcopy(model)
    _micro_step(plain, micro)
    with accumulate(model) as changes:
        _micro_step(model, micro)
    return {"micro": micro, "conv": model[0], "state": model.state_dict(), "plain": plain.state_dict(),
            "changes": changes.changed}  # fmt: skip


@pytest.mark.slow
def test_synchronized_layers_update_once_from_every_process(tmp_path):
    results = processes.run(_synchronized_step, 2, tmp_path)
    conv = results[0]["conv"]
    with torch.no_grad():
        z = torch.cat([conv(x) for r in results for x in r["micro"]]).double()
    var, mean = torch.var_mean(z, dim=(0, 2, 3), correction=1)
    for r in results:
        torch.testing.assert_close(r["state"]["1.running_mean"], (0.1 * mean).float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["state"]["1.running_var"], (0.9 + 0.1 * var).float(), rtol=1e-5, atol=1e-6)
        assert all(torch.equal(v, results[0]["state"][k]) for k, v in r["state"].items())
        assert int(r["state"]["4.num_batches_tracked"]) == 1 and int(r["plain"]["4.num_batches_tracked"]) == 3
    assert results[0]["changes"][0] == ("1", "one update from 3 micro-batches (304 values per channel)")


# --- the experiment: test accuracy with small micro-batches ---------------------------------


def _digits():
    """scikit-learn's 8x8 digits (bundled, no download), standardized, as a fixed split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


def _cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip


def accuracy_experiment(micro: int = 2, k: int = 8, steps: int = 300, seed: int = 0, lr: float = 0.05) -> dict:
    """Train the CNN on digits with k micro-batches of `micro` examples per SGD step, the
    running statistics updated per micro-batch (torch's way) or once per step (accumulate),
    same seed, same data order. Returns, per way, the test accuracy in evaluation mode and
    the mean over layers and channels of |running_mean - population mean| / population std,
    the population being the precise statistics of the final weights (recalibrate)."""
    (x, y), (xt, yt) = _digits()
    out = {}
    for way in ("per_micro_batch", "accumulate"):
        torch.manual_seed(seed)
        model = _cnn()
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        order = torch.randint(0, len(y), (steps, k * micro), generator=torch.Generator().manual_seed(seed))
        for rows in order:
            opt.zero_grad()
            block = accumulate(model) if way == "accumulate" else contextlib.nullcontext()
            with block:
                for part in rows.chunk(k):
                    (F.cross_entropy(model(x[part]), y[part]) / k).backward()
            opt.step()
            schedule.step()
        model.eval()
        with torch.no_grad():
            out[f"{way}_accuracy"] = float((model(xt).argmax(1) == yt).float().mean())
            running = {p: (m.running_mean.clone(), m.running_var.clone()) for p, m in _layers(model)}
            precise = recalibrate(copy.deepcopy(model).train(), list(x.split(k * micro)), progress=False)[0]
            shift, ratio = [], []
            for p, m in _layers(precise):
                shift.append(((running[p][0] - m.running_mean).abs() / m.running_var.sqrt()).mean())
                ratio.append((running[p][1] / m.running_var).log().mean())
            out[f"{way}_mean_error_in_std"] = float(torch.stack(shift).mean())
            out[f"{way}_variance_ratio"] = float(torch.stack(ratio).mean().exp())
            out[f"{way}_precise_accuracy"] = float((precise.eval()(xt).argmax(1) == yt).float().mean())
    return out


@pytest.mark.slow
def test_accumulated_statistics_are_closer_to_the_population():
    result = accuracy_experiment(micro=2, k=8, steps=60)  # same weights both ways (same gradients)
    assert result["accumulate_precise_accuracy"] == result["per_micro_batch_precise_accuracy"]
    assert result["accumulate_mean_error_in_std"] < result["per_micro_batch_mean_error_in_std"]


if __name__ == "__main__":
    torch.set_num_threads(1)
    for seed in range(3):
        print(seed, accuracy_experiment(seed=seed))
