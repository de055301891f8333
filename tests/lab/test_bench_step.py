"""bench_step: a training step's time by op category, with the ceiling (batch norm free)."""

import json
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from batchnorm_lab import bench_step, models
from batchnorm_lab.cli import app
from batchnorm.tools._common import batchnorm_layers


def _event(*names):
    """A profiler-like event nested in scopes `names` (outermost first)."""
    event = None
    for name in names:
        event = SimpleNamespace(name=name, cpu_parent=event)
    return event


def test_an_op_counts_in_its_outermost_scope_with_a_category():
    assert bench_step.category("aten::mkldnn_convolution") == "convolution"
    assert bench_step.category("autograd::engine::evaluate_function: NativeBatchNormBackward0") == "batch norm, activation, add"
    assert bench_step.category("aten::view") is None
    assert bench_step._category_of(_event("Optimizer.step#SGD.step", "aten::add_")) == "optimizer"
    assert bench_step._category_of(_event("aten::conv2d", "aten::empty")) == "convolution"
    assert bench_step._category_of(_event(bench_step._SCOPE, "aten::empty")) == "batch norm, activation, add"
    assert bench_step._category_of(_event("Torch-Compiled Region", "aten::convolution")) == "convolution"
    assert bench_step._category_of(_event("aten::max_pool2d")) == "other ops"


def test_the_ceiling_has_no_batch_norm():
    net = models.resnet20()
    assert not batchnorm_layers(bench_step._without_batchnorm(net)) and len(batchnorm_layers(net)) == 21


@pytest.mark.slow
def test_the_command_writes_every_arm_and_category(tmp_path):
    args = ["bench", "step", "--model", "resnet20", "--batch", "4", "--repeats", "1", "--no-compile", "--out", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (row,) = json.loads((tmp_path / "step-cpu.json").read_text())["rows"]
    assert list(row["arms"]) == ["torch eager", "ours eager", "ceiling"]
    for arm in row["arms"].values():
        assert arm["ms"] > 0 and list(arm["categories"]) == list(bench_step.CATEGORIES)
        assert all(ms >= 0 for ms in arm["categories"].values()) and arm["categories"]["convolution"] > 0
    for arm in ("torch eager", "ours eager"):  # our kernels' forward is scoped: not lost to "python"
        assert row["arms"][arm]["categories"]["batch norm, activation, add"] > 0
    assert (tmp_path / "bench-step.md").read_text().startswith("# Where a training step's time goes")
    bad = CliRunner().invoke(app, ["bench", "step", "--model", "vgg", "--out", str(tmp_path)])
    assert bad.exit_code != 0 and "unknown model 'vgg'" in bad.output
