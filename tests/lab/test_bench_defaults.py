"""Where the bench commands write when given no --out: a `results/` folder of the current
directory, said on the console. Run from a user's own project they used to write into its
`docs/` (kernels, train, compile) and `bench gpu-rule` into the installed package; this
project's own pages are regenerated with an explicit --out (Makefile, scripts/gpu_check.sh).

The measurements themselves are replaced by the recorded runs in docs/bench: only where
the files go is under test here (test_bench.py runs the commands end to end).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from batchnorm.backends import gpu_rule
from batchnorm_lab import bench, bench_train
from batchnorm_lab.cli import app

RECORDED = Path(__file__).resolve().parents[2] / "docs" / "bench"


def _recorded(name: str):
    result = json.loads((RECORDED / f"{name}.json").read_text())
    return lambda *args, **kwargs: result


@pytest.mark.parametrize(
    "command,patch,written",
    [
        (["bench", "kernels"], (bench, "run", "kernels-cpu"), ["kernels-cpu.json", "benchmarks.md"]),
        (["bench", "compile"], (bench, "compile_crossover", "compile-cpu"), ["compile-cpu.json", "bench-compile.md"]),
        (["bench", "train"], (bench_train, "run", "train-cpu"), ["train-cpu.json", "bench-train.md"]),
    ],
)
def test_bench_commands_write_to_results_by_default_and_say_so(tmp_path, monkeypatch, command, patch, written):
    module, name, recorded = patch
    monkeypatch.setattr(module, name, _recorded(recorded))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == sorted(written)
    assert [p.name for p in tmp_path.iterdir()] == ["results"]  # no docs/ in the user's project
    for name in written:
        assert str(Path("results") / name) in result.output


def test_gpu_rule_writes_to_results_by_default_not_into_the_package(tmp_path, monkeypatch):
    before = gpu_rule.RULE_PATH.read_bytes() if gpu_rule.RULE_PATH.exists() else None
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["bench", "gpu-rule"])
    assert result.exit_code == 0, result.output
    assert (gpu_rule.RULE_PATH.read_bytes() if gpu_rule.RULE_PATH.exists() else None) == before
    assert json.loads((tmp_path / "results" / "gpu_rule.json").read_text())["devices"] == {}
    assert str(Path("results") / "gpu_rule.json") in result.output
