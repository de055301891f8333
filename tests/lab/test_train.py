"""`batchnorm train`: one process, two spawned processes with SyncBatchNorm, bad arguments."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from batchnorm_lab.cli import app
from batchnorm_lab.train import build_model, load_digits, torchrun_env

ARGS = ["train", "--steps", "12", "--batch-size", "64", "--seed", "1"]


def _run(*args: str):
    return CliRunner().invoke(app, [*ARGS, *args])


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    result = _run("--out", str(out))
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.slow
def test_single_process_reports_accuracy_and_saves_a_loadable_checkpoint(single):
    metrics = json.loads((single / "metrics.json").read_text())
    assert metrics["world_size"] == 1 and metrics["steps"] == 12 and metrics["step_ms_median"] > 0
    assert metrics["test_accuracy"] > 0.8  # 12 steps on standardized digits; chance is 0.1
    checkpoint = torch.load(single / "checkpoint.pt", weights_only=True)
    model = build_model(sync_bn=False)
    model.load_state_dict(checkpoint["model"])
    _, _, x_test, y_test = load_digits()
    with torch.no_grad():
        accuracy = float((model.eval()(x_test).argmax(1) == y_test).float().mean())
    assert accuracy == pytest.approx(metrics["test_accuracy"], abs=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_processes_with_sync_bn_follow_single_process_training(single, tmp_path):
    result = _run("--nproc", "2", "--sync-bn", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["sync_bn"] is True
    synced = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]
    alone = torch.load(single / "checkpoint.pt", weights_only=True)["model"]
    assert synced.keys() == alone.keys()  # the checkpoint of the synced model is a local model's
    for key, value in alone.items():
        torch.testing.assert_close(synced[key], value, rtol=1e-3, atol=1e-4)
    assert metrics["test_accuracy"] == pytest.approx(
        json.loads((single / "metrics.json").read_text())["test_accuracy"], abs=0.01
    )


@pytest.mark.parametrize("args, message", [
    (["--nproc", "0"], "--nproc must be at least 1"),
    (["--nproc", "2", "--batch-size", "3"], "too small for 2 processes"),
    (["--steps", "0"], "--steps must be at least 1"),
])
def test_bad_arguments_are_refused(args, message, tmp_path):
    result = _run(*args, "--out", str(tmp_path))
    assert result.exit_code != 0 and message in result.output.replace("\n", " ")
    assert not (tmp_path / "checkpoint.pt").exists()


def test_torchrun_environment_is_read_and_nproc_refused_under_it(monkeypatch, tmp_path):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert torchrun_env() is None
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert torchrun_env() == (1, 3)
    result = _run("--nproc", "2", "--out", str(tmp_path))
    assert result.exit_code != 0 and "already launched by torchrun" in result.output
