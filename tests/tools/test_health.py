"""bn.check, the health check: every finding planted in a small model is found, a healthy
trained model raises no alarm, and checking never changes the model. The command line
(`batchnorm check`) is tested in tests/test_cli.py."""

from __future__ import annotations

import copy
import json
import textwrap

import pytest
import torch
from rich.console import Console
from torch import nn

from batchnorm_lab import data
from batchnorm_lab.cli import data_batches
from batchnorm.tools.health import CheckReport, check

FACTORY = '''
import torch
from torch import nn
import batchnorm as bn


def build():
    """The healthy MLP of the tests: two batch-norm layers, one with a fused ReLU."""
    return nn.Sequential(
        nn.Linear(64, 32, bias=False), bn.BatchNormAct(bn.BatchNorm1d(32), "relu"),
        nn.Linear(32, 32, bias=False), bn.BatchNorm1d(32), nn.ReLU(),
        nn.Linear(32, 10),
    )
'''


@pytest.fixture(scope="module")
def factory(tmp_path_factory):
    """A factory module `check_factory_mlp` importable from a temporary directory."""
    folder = tmp_path_factory.mktemp("factory")
    (folder / "check_factory_mlp.py").write_text(textwrap.dedent(FACTORY))
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(folder))
        import check_factory_mlp

        yield check_factory_mlp


@pytest.fixture(scope="module")
def trained(factory):
    """The MLP trained on digits for 300 steps (batch 60), in evaluation mode."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ds = data.standardize(data.load("digits"))
    x, y = torch.from_numpy(ds.x_train), torch.from_numpy(ds.y_train)
    torch.manual_seed(0)
    model = factory.build()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        index = torch.randint(0, len(x), (60,), generator=generator)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[index]), y[index]).backward()
        optimizer.step()
    torch.set_num_threads(threads)
    model.eval()
    accuracy = (model(torch.from_numpy(ds.x_test)).argmax(1) == torch.from_numpy(ds.y_test)).float().mean()
    assert accuracy > 0.9  # a healthy model to begin with
    return model


@pytest.fixture
def batches():
    return data_batches("digits", 60, 4)


def _state(model: nn.Module) -> dict:
    return {
        "tensors": {k: v.clone() for k, v in model.state_dict().items()},
        "modes": [m.training for m in model.modules()],
        "skips": [getattr(m, "nonfinite_skips", None) for m in model.modules()],
    }


def _assert_unchanged(model: nn.Module, before: dict) -> None:
    after = _state(model)
    assert after["modes"] == before["modes"] and after["skips"] == before["skips"]
    for key, value in before["tensors"].items():
        torch.testing.assert_close(after["tensors"][key], value, rtol=0, atol=0, equal_nan=True, msg=key)


def _kinds(report: CheckReport) -> set[tuple[str, str, str]]:
    return {(f.layer, f.kind, f.severity) for f in report.findings}


def test_healthy_trained_model_raises_no_alarm(trained, batches):
    before = _state(trained)
    report = check(trained, batches)
    assert report.ok, report.to_json()
    assert report.findings == [] and report.layers == 2 and report.batches == 4
    _assert_unchanged(trained, before)


def test_stale_statistics_after_a_weight_change(trained, batches):
    model = copy.deepcopy(trained)
    with torch.no_grad():
        model[0].weight.mul_(2.0)  # as after fine-tuning without updating the statistics
    before = _state(model)
    report = check(model, batches)
    assert not report.ok
    assert ("1.bn", "stale_statistics", "error") in _kinds(report)
    stale = next(f for f in report.findings if f.layer == "1.bn")
    assert stale.evidence["variance_ratio_geomean"] == pytest.approx(4.0, rel=0.25)
    _assert_unchanged(model, before)


def test_train_eval_gap_is_the_relative_output_difference(trained, batches):
    report = check(trained, batches, gap_tol=0.0)
    gap = next(f for f in report.findings if f.kind == "train_eval_gap")
    with_batch_stats = copy.deepcopy(trained)
    with_batch_stats[1].bn.train()
    with_batch_stats[3].train()
    with torch.no_grad():
        y_train = torch.cat([with_batch_stats(x) for x in batches]).double()
        y_eval = torch.cat([trained(x) for x in batches]).double()
    want = float((y_train - y_eval).norm() / y_eval.norm())
    assert gap.layer == "" and gap.severity == "warning"
    assert gap.evidence["relative_difference"] == pytest.approx(want, rel=1e-5)
    assert check(trained, batches, gap_tol=want * 1.01).ok


def test_stale_running_mean(trained, batches):
    model = copy.deepcopy(trained)
    with torch.no_grad():
        model[3].running_mean.add_(model[3].running_var.sqrt())  # one standard deviation off
    report = check(model, batches)
    stale = [f for f in report.findings if f.kind == "stale_statistics"]
    assert [f.layer for f in stale] == ["3"]
    assert stale[0].evidence["mean_shift_in_std"] == pytest.approx(1.0, abs=0.2)


def test_broken_running_statistics(trained, batches):
    model = copy.deepcopy(trained)
    with torch.no_grad():
        model[1].bn.running_var[2] = float("nan")
        model[3].running_var[[0, 5]] = -1.0
    before = _state(model)
    report = check(model, batches)
    kinds = _kinds(report)
    assert ("1.bn", "nonfinite_running_stats", "error") in kinds
    assert ("3", "negative_variance", "error") in kinds
    nonfinite = next(f for f in report.findings if f.kind == "nonfinite_running_stats")
    negative = next(f for f in report.findings if f.kind == "negative_variance")
    assert nonfinite.evidence["channels"] == [2] and negative.evidence["channels"] == [0, 5]
    _assert_unchanged(model, before)


def test_never_updated(factory, batches):
    model = factory.build().eval()
    report = check(model, [])  # needs no data
    assert {(f.layer, f.kind) for f in report.findings} == {("1.bn", "never_updated"), ("3", "never_updated")}
    assert not report.ok and report.batches == 0


def test_small_batch_with_suggestions(trained):
    report = check(trained, data_batches("digits", 8, 2))
    small = [f for f in report.findings if f.kind == "small_batch"]
    assert {f.layer for f in small} == {"1.bn", "3"} and small[0].severity == "warning"
    assert small[0].evidence["values_per_channel"] == 8
    words = ("SyncBatchNorm", "renormalization", "frozen", "ghost", "replace_norm(model, 'group')")
    assert all(word in small[0].advice for word in words)


def test_bias_before_batchnorm_is_reported_as_wasted_parameters(batches):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16, momentum=None), nn.ReLU(), nn.Linear(16, 3))
    model.train()
    for x in batches:
        model(x)  # running statistics: the average over these batches
    model.eval()
    report = check(model, batches)
    found = [f for f in report.findings if f.kind == "bias_before_batchnorm"]
    assert [(f.layer, f.severity, f.evidence["wasted_parameters"]) for f in found] == [("1", "info", 16)]
    assert report.ok  # wasted, not wrong


def test_dead_channels(trained, batches):
    model = copy.deepcopy(trained)
    with torch.no_grad():
        model[3].weight[[4, 7, 9]] = 0.0
    report = check(model, batches)
    dead = [f for f in report.findings if f.kind == "dead_channels"]
    assert [(f.layer, f.evidence["channels"]) for f in dead] == [("3", [4, 7, 9])]
    assert dead[0].evidence["fraction"] == pytest.approx(3 / 32)


def test_layer_in_train_mode_during_evaluation_and_modes_restored(trained, batches):
    model = copy.deepcopy(trained)
    model[3].train()
    before = _state(model)
    report = check(model, batches)
    assert ("3", "train_mode_in_eval", "error") in _kinds(report)
    assert not any(f.kind == "train_mode_in_eval" and f.layer == "1.bn" for f in report.findings)
    _assert_unchanged(model, before)
    assert model[3].training and not model[1].bn.training


def test_report_json_and_table(trained, batches):
    model = copy.deepcopy(trained)
    with torch.no_grad():
        model[1].bn.weight[0] = 0.0
    report = check(model, batches)
    document = json.loads(report.to_json())
    assert document["ok"] is False and document["layers"] == 2
    assert document["findings"][0]["kind"] == "dead_channels"
    console = Console(record=True, width=200)
    console.print(report)
    assert "dead_channels" in console.export_text()


def test_print_report_gives_readable_text(trained, batches):
    """print(report) shows the findings, not an object's repr (table() is a rich Table)."""
    model = copy.deepcopy(trained)
    with torch.no_grad():
        model[1].bn.weight[0] = 0.0
    report = check(model, batches)
    text = str(report)
    assert "object at" not in text
    assert text.splitlines()[0] == "batch-norm check: 2 layers, %d batches: problems found" % report.batches
    assert "warning: 1.bn: dead_channels: " in text and "advice: " in text


def test_bad_input(trained):
    with pytest.raises(TypeError, match="nn.Module"):
        check("model", [])
    with pytest.raises(TypeError, match="batch 0"):
        check(trained, [["not a tensor"]])
