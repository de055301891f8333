"""bench_first_use: the first training steps on empty caches, ours against torch's layers."""

import json

import pytest
from typer.testing import CliRunner

from batchnorm_lab import bench_first_use
from batchnorm_lab.cli import app


def test_totals_medians_and_ratios_come_from_the_runs(monkeypatch):
    """With the runs stubbed (each arm's step times given), the summary is their arithmetic:
    totals per run, the median total per arm, and ours / torch overall and per round."""
    times = {"ours": iter([[3.0, 1.0], [2.0, 1.0], [5.0, 1.0]]), "torch": iter([[1.0, 1.0], [2.0, 2.0], [1.5, 1.0]])}
    calls = []

    def fake_run_once(arm, compiled, steps, batch, size):
        calls.append((arm, compiled, steps, batch, size))
        return next(times[arm])

    monkeypatch.setattr(bench_first_use, "run_once", fake_run_once)
    result = bench_first_use.run(3, 2, ("eager",), 8, 16, echo=lambda line: None)
    assert [c[0] for c in calls] == ["ours", "torch"] * 3  # alternating rounds
    assert all(c[1:] == (False, 2, 8, 16) for c in calls)
    mode = result["modes"]["eager"]
    assert mode["totals"] == {"ours": [4.0, 3.0, 6.0], "torch": [2.0, 4.0, 2.5]}
    assert mode["median"] == {"ours": 4.0, "torch": 2.5} and mode["ratio"] == pytest.approx(1.6)
    assert mode["round_ratios"] == pytest.approx([2.0, 0.75, 2.4])
    table = bench_first_use.render(result)
    assert "| eager | 3.00-6.00 s, median 4.00 s | 2.00-4.00 s, median 2.50 s | 3.00 / 1.50 s | **1.60x** |" in table


@pytest.mark.slow
def test_the_command_runs_both_arms_in_fresh_processes_and_writes_them(tmp_path):
    args = ["bench", "first-use", "--rounds", "1", "--steps", "2", "--no-compile", "--batch", "4", "--size", "8"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "first-use-cpu.json").read_text())
    eager = written["modes"]["eager"]
    for arm in ("ours", "torch"):
        [steps] = eager["runs"][arm]
        assert len(steps) == 2 and all(t > 0 for t in steps)
    assert eager["ratio"] == pytest.approx(sum(eager["runs"]["ours"][0]) / sum(eager["runs"]["torch"][0]))
    assert bench_first_use.render(written) in result.output
