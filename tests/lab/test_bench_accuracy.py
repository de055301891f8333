"""`batchnorm bench accuracy`: the benchmark measures what it says (a result perturbed by a
known amount shows that error; activation decisions are pinned and counted as claimed;
batch norm computes in the dtype an arm names), and the command writes its JSON and page.

No accuracy of torch's or our layers is asserted here: tests/test_accuracy.py holds the
bound our kernels keep.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from batchnorm_lab import bench_accuracy as acc
from batchnorm_lab.cli import app


def test_relative_error_is_the_largest_error_over_the_largest_truth():
    truth = torch.tensor([[1.0, -4.0], [2.0, 0.5]], dtype=torch.float64)
    result = truth.clone()
    result[1, 1] += 0.02  # the only error; the largest |truth| is 4
    assert acc.relative_error(result, truth) == pytest.approx(0.02 / 4, rel=1e-12)
    assert acc.relative_error(truth.float(), truth) == 0.0  # these values are exact in fp32
    assert acc.relative_error(torch.full((3,), 1e-3), torch.zeros(3)) == pytest.approx(1e-3)  # no scale: absolute


def test_layer_inputs_are_seeded_and_offset():
    a, b = acc.layer_inputs((4, 3, 8, 8), 100.0, seed=1), acc.layer_inputs((4, 3, 8, 8), 100.0, seed=1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["x"].dtype == torch.float32 and a["weight"].shape == (3,)
    mean, std = a["x"].mean().item(), a["x"].std().item()
    assert abs(mean - 100) < 0.2 and 0.8 < std < 1.2


def test_a_layer_off_by_a_known_bias_shows_that_error(monkeypatch):
    """An arm whose output is its bias + 1e-3 off: y's error is 1e-3 / max |y|, and the
    gradients, which the bias does not change, stay at rounding."""
    shape, shift = (4, 3, 8, 8), 1e-3
    real = acc._layer

    def shifted(arm, dim, c):
        layer = real("truth", dim, c)
        if arm == "torch":
            layer.register_forward_hook(lambda m, i, y: y + shift)
        return layer

    monkeypatch.setattr(acc, "_layer", shifted)
    row = acc.layer_row("test", shape, 0.0, seed=0)
    inputs = acc.layer_inputs(shape, 0.0, seed=0)
    y = acc.layer_results(real("truth", 4, 3), inputs, torch.float64)["y"]
    err = row["errors"]["torch"]
    assert err["y"] == pytest.approx(shift / y.abs().max().item(), rel=1e-3)
    assert max(err["dx"], err["dweight"], err["dbias"]) < 1e-5
    assert row["errors"]["ours_numba"]["y"] < 1e-5  # the other arms untouched


def test_layer_results_gradients_are_each_arms_own():
    """Two arms fed the same inputs do not gather each other's dx (x.to(fp32) is x itself)."""
    inputs = acc.layer_inputs((2, 3, 4, 4), 0.0, seed=0)
    first = acc.layer_results(nn.BatchNorm2d(3), inputs, torch.float32)
    second = acc.layer_results(nn.BatchNorm2d(3), inputs, torch.float32)
    assert torch.equal(first["dx"], second["dx"])


def _book() -> dict:
    return dict(mode="record", decisions=[], call=0, flips=0)


@pytest.mark.parametrize("act", [nn.ReLU(), nn.ReLU6()])
def test_pinned_activation_replays_and_counts_decisions(act):
    """Recorded on x, then run on x', whose element 0 crossed 0 and element 2 crossed 6:
    "count" runs the activation as written and counts the 1 (ReLU) or 2 (ReLU6) changed
    decisions; "replay" takes the recorded ones (gradient 1 only where x passed)."""
    book = _book()
    model = acc.pin_activations(nn.Sequential(act), book)
    x = torch.tensor([1e-7, -1.0, 5.9999, 3.0])
    x_other = torch.tensor([-1e-7, -1.0, 6.0001, 3.0])
    assert torch.equal(model(x), act(x))
    book.update(mode="count", call=0)
    assert torch.equal(model(x_other), act(x_other))
    assert book["flips"] == (2 if isinstance(act, nn.ReLU6) else 1)
    book.update(mode="replay", call=0)
    leaf = x_other.clone().requires_grad_()
    y = model(leaf)
    y.sum().backward()
    assert y.tolist() == pytest.approx([-1e-7, 0.0, 6.0001, 3.0], rel=1e-6)
    assert leaf.grad.tolist() == [1.0, 0.0, 1.0, 1.0]


def test_batch_norms_in_another_dtype_keep_names_and_the_models_dtype():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    names = [n for n, _ in model.named_parameters()]
    mixed = acc.batch_norms_in(model, torch.float64)
    assert mixed[1].inner.weight.dtype == torch.float64
    logits, grads = acc.model_gradients(nn.Sequential(mixed, nn.Flatten(), nn.LazyLinear(2)), torch.randn(2, 3, 6, 6), torch.float32)
    assert logits.shape == (2, 2)
    assert [n.removeprefix("0.") for n in grads if n.startswith("0.")] == names


@pytest.mark.slow
def test_model_row_on_a_small_resnet():
    """Every arm of a small ResNet-20, free and pinned; pinned decisions leave rounding
    (under 1e-4 here), and the float64 model with only its BN in fp32 is the closest."""
    row = acc.model_row("lab ResNet-20", seed=0, quick=True)
    assert set(row["arms"]) == set(acc.MODEL_ARMS) and row["batch_norms"] == 21
    for arm, e in row["arms"].items():
        assert e["free"]["flips"] >= 0
        assert e["pinned"]["grad_median"] <= e["pinned"]["grad_max"] < 1e-4, arm
        assert "." in e["pinned"]["grad_worst"]
    fp32 = row["arms"]["torch"]["pinned"]["grad_max"]
    assert row["arms"]["f64_torch_bn32"]["pinned"]["grad_max"] <= fp32


@pytest.mark.slow
def test_quick_accuracy_bench_writes_json_and_markdown(tmp_path):
    md = tmp_path / "bench-accuracy.md"
    result = CliRunner().invoke(app, ["bench", "accuracy", "--quick", "--no-models", "--out", str(tmp_path),
                                      "--markdown", str(md)])  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "accuracy-quick.json").read_text())
    assert data["quick"] is True and data["models"] == []
    assert len(data["layers"]) == len(acc.QUICK_LAYER_SHAPES) * len(acc.OFFSETS)
    for row in data["layers"]:
        assert set(row["errors"]) == set(acc.LAYER_ARMS) and row["auto_backend"] in ("aten", "numba")
        for errors in row["errors"].values():
            assert set(errors) == set(acc.LAYER_RESULTS)
            assert all(math.isfinite(v) and v >= 0 for v in errors.values())
    text = md.read_text()
    assert text.startswith("# Accuracy: fp32 against float64") and text == acc.render(data)
    assert "| small CNN layer | 4x8x16x16 | 100 + N(0,1) | ours numba |" in text
