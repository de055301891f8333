"""bn.monitor: what it records equals the statistics computed directly from the inputs of
the nonlinearities; hooks come and go cleanly."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import batchnorm as bn
from batchnorm.tools.monitor import PERCENTILES, SATURATION, Monitor, monitor

monitor_module = importlib.import_module("batchnorm.tools.monitor")  # the name `monitor` is the function
Q = torch.tensor(PERCENTILES, dtype=torch.float64)


def _direct(u: torch.Tensor, units: list[int]) -> dict[str, np.ndarray]:
    """The expected statistics of one pre-activation u (N, C, ...), in float64."""
    u = u.double()
    dims = (0, *range(2, u.dim()))
    cols = u[:, units].movedim(1, 0).reshape(len(units), -1)
    return {
        "percentiles": torch.quantile(cols, Q, dim=1).T.numpy(),
        "mean": u.mean(dims).numpy(),
        "std": u.std(dims, correction=0).numpy(),
    }


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@settings(max_examples=8, deadline=None)
@given(
    n=st.integers(2, 9),
    c=st.integers(1, 7),
    length=st.sampled_from([None, 1, 5]),
    steps=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_percentiles_mean_std_saturation_equal_direct_computation(n, c, length, steps, seed):
    torch.manual_seed(seed)
    conv = length is not None
    first = nn.Conv1d(3, c, 1) if conv else nn.Linear(3, c)
    model = nn.Sequential(first, nn.Sigmoid())
    inputs = [torch.randn(n, 3, length) * 4 if conv else torch.randn(n, 3) * 4 for _ in range(steps)]
    with monitor(model, units=2, every=1) as mon:
        for x in inputs:
            model(x)
    records = mon.records()
    assert [r["step"] for r in records] == list(range(steps))
    units = sorted({0, c - 1})
    for record, x in zip(records, inputs):
        u = first(x).detach()
        want = _direct(u, units)
        assert record["layer"] == "1" and record["units"] == units
        np.testing.assert_allclose(record["percentiles"], want["percentiles"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(record["mean"], want["mean"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(record["std"], want["std"], rtol=1e-4, atol=1e-5)
        saturated = (u.abs() > SATURATION["sigmoid"]).double().mean().item()
        assert record["saturated"] == pytest.approx(saturated, rel=1e-6)  # a float32 mean of 0s and 1s
        assert record["dead"] is None and record["mean_drift"] is None


def test_fused_batchnorm_records_its_pre_activation_with_residual():
    torch.manual_seed(0)

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = bn.BatchNormAct(bn.BatchNorm1d(4), "relu")

        def forward(self, x):
            return self.bn(x, residual=x.flip(0))

    model = Residual()
    plain = nn.BatchNorm1d(4)  # the same layer without the activation, to compute u directly
    x = torch.randn(16, 4) * 3 + 1
    with monitor(model, units=[1, 3], every=1) as mon:
        model(x)
    record = mon.records()[0]
    u = (plain(x) + x.flip(0)).detach()
    want = _direct(u, [1, 3])
    np.testing.assert_allclose(record["percentiles"], want["percentiles"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(record["mean"], want["mean"], atol=1e-5)
    assert record["nonlinearity"] == "relu"
    assert record["dead"] == pytest.approx(float((u.amax(0) <= 0).double().mean()))
    # the running statistics moved by momentum * (batch mean - 0) from mean 0, variance 1
    moved = 0.1 * x.mean(0).abs().double().mean().item()
    assert record["mean_drift"] == pytest.approx(moved, rel=1e-4)


def test_inplace_relu_input_is_taken_before_it_runs():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(inplace=True))
    x = torch.randn(20, 5)
    with monitor(model, units=6, every=1) as mon:
        model(x)
    u = model[0](x).detach()
    record = mon.records()[0]
    np.testing.assert_allclose(record["percentiles"], _direct(u, list(range(6)))["percentiles"], rtol=1e-5, atol=1e-6)
    assert min(p[0] for p in record["percentiles"]) < 0  # not the rectified values
    assert record["dead"] == pytest.approx(float((u.amax(0) <= 0).double().mean()))


def test_default_layers_every_and_eval_forwards():
    model = nn.Sequential(
        nn.Linear(4, 8, bias=False), nn.BatchNorm1d(8), nn.Tanh(),  # BN monitored, Tanh not
        nn.Linear(8, 8), nn.ReLU(),  # ReLU after a Linear: monitored
        nn.Linear(8, 2),
    )  # fmt: skip
    assert Monitor(model).every == 10  # the default: cheap enough to leave on
    mon = Monitor(model, every=3)
    assert [(layer.name, layer.nonlinearity) for layer in mon.layers] == [("1", "tanh"), ("4", "relu")]
    with mon:
        for _ in range(7):
            model(torch.randn(10, 4))
        model.eval()
        model(torch.randn(10, 4))  # not a training step: neither counted nor recorded
        model.train()
        model(torch.randn(10, 4))  # step 7
    arrays = mon.arrays()
    assert list(arrays) == ["1", "4"]
    np.testing.assert_array_equal(arrays["1"]["step"], [0, 3, 6])
    assert arrays["1"]["percentiles"].shape == (3, 3, 3)
    assert arrays["1"]["mean"].shape == (3, 8)
    assert np.isnan(arrays["4"]["mean_drift"]).all() and np.isfinite(arrays["1"]["var_drift"]).all()


def test_drift_between_records_is_the_change_of_running_statistics():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    layer = model[1]
    snapshots = [torch.stack([layer.running_mean, layer.running_var]).clone()]
    with monitor(model, every=2) as mon:
        for step in range(5):
            model(torch.randn(12, 3) * (step + 1))
            if step % 2 == 0:
                snapshots.append(torch.stack([layer.running_mean, layer.running_var]).clone())
    history = mon.arrays()["1"]
    for i, (before, after) in enumerate(zip(snapshots, snapshots[1:])):
        var = before[1].double() + layer.eps
        mean_drift = ((after[0] - before[0]).double().abs() / var.sqrt()).mean()
        var_drift = ((after[1].double() + layer.eps) / var).log().abs().mean()
        assert history["mean_drift"][i] == pytest.approx(float(mean_drift), rel=1e-6)
        assert history["var_drift"][i] == pytest.approx(float(var_drift), rel=1e-6)


def test_small_flushes_and_changing_batch_sizes_keep_records_in_order(monkeypatch):
    monkeypatch.setattr(monitor_module, "FLUSH_BYTES", 1)  # compute after every record
    monkeypatch.setattr(monitor_module, "_STACK_BYTES", 300)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
    inputs = [torch.randn(n, 3) for n in (8, 8, 5, 8, 3, 3)]
    with monitor(model, every=1) as mon:
        for x in inputs:
            model(x)
    history = mon.arrays()["1"]
    np.testing.assert_array_equal(history["step"], range(6))
    for i, x in enumerate(inputs):
        want = _direct(model[0](x).detach(), [0, 2, 3])
        np.testing.assert_allclose(history["percentiles"][i], want["percentiles"], rtol=1e-5, atol=1e-6)


def test_hooks_removed_on_exit_and_after_an_exception():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU())
    before = _hooks(model)
    with monitor(model, every=2) as mon:
        assert _hooks(model) == before + 1  # the model's step counter
        model(torch.randn(6, 3))
        assert _hooks(model) == before + 2  # and, during a recorded step, the batch-norm layer's
        model(torch.randn(6, 3))
        assert _hooks(model) == before + 1  # not recorded: unhooked
    assert _hooks(model) == before and len(mon.records()) == 1
    with pytest.raises(RuntimeError, match="boom"):
        with monitor(model):
            model(torch.randn(6, 3))
            raise RuntimeError("boom")
    assert _hooks(model) == before
    mon = monitor(model).start()
    with pytest.raises(RuntimeError, match="already started"):
        mon.start()
    mon.stop()
    mon.stop()
    assert _hooks(model) == before


def test_save_json_and_plot(tmp_path):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 6, bias=False), bn.BatchNormAct(bn.BatchNorm1d(6), "sigmoid"), nn.Linear(6, 2))
    with monitor(model, every=1) as mon:
        for _ in range(4):
            model(torch.randn(10, 4))
    saved = json.loads(mon.save(tmp_path / "history.json").read_text())
    assert saved["records"] == mon.records() and saved["layers"] == {"1.bn": {"nonlinearity": "sigmoid"}}
    figure = mon.plot(tmp_path / "bands.png")
    assert len(figure.axes) == 1 and (tmp_path / "bands.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="no records"):
        mon.plot(layers=["0"])


def test_bad_arguments():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    with pytest.raises(TypeError, match="nn.Module"):
        monitor("model")
    with pytest.raises(ValueError, match="every"):
        monitor(model, every=0)
    with pytest.raises(ValueError, match="no leaf module named 'nope'"):
        monitor(model, layers=["nope"])
    with pytest.raises(ValueError, match="no batch-norm layer"):
        monitor(nn.Sequential(nn.Linear(3, 4)))
    with pytest.raises(ValueError, match="units"):
        monitor(model, units=0)
    with monitor(model, units=[7]):
        with pytest.raises(ValueError, match="units=\\[7\\] but layer '1' has 4 channels"):
            model(torch.randn(2, 3))
    assert _hooks(model) == 0  # removed although a hook raised
    assert monitor(model, layers=[model[1]]).layers[0].name == "1"
