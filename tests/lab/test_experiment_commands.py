"""The experiment commands through the CLI: list, run (and --resume), report, and bad input;
and the numba kernels they compile ahead."""

import json

import pytest
from typer.testing import CliRunner

from batchnorm_lab.cli import app
from batchnorm_lab.experiment_commands import compile_ahead
from batchnorm_lab.experiments import config_for

runner = CliRunner()


def test_list_names_every_experiment():
    from batchnorm_lab.experiments import EXPERIMENTS

    result = runner.invoke(app, ["list"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for name in EXPERIMENTS:
        assert name in result.output


def test_list_keeps_whole_names_at_80_columns_in_a_pipe():
    from batchnorm_lab.experiments import EXPERIMENTS

    result = runner.invoke(app, ["list"], env={"COLUMNS": "80"})
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0].split("\t")[0] == "experiment"
    assert [line.split("\t")[0] for line in lines[1:]] == list(EXPERIMENTS)  # whole names, pasteable into `run`
    assert all(len(line.split("\t")) == 4 for line in lines)


def test_summary_table_fits_80_columns():
    from rich.console import Console

    from batchnorm_lab.experiments import EXPERIMENTS
    from batchnorm_lab.experiment_commands import other_init_notes, summary_table

    records = [{"experiment": name, "held": i % 2 == 0, "headline": "4.1x time, BN part 1.5x", "seconds": 12.3,
                "claim": "a long claim " * 20, "result": "a long result " * 20}
               for i, name in enumerate(EXPERIMENTS)]
    records[0]["other_inits"] = {"torch": {"held": False, "headline": "lr 3 vs None"}}
    console = Console(width=80, record=True, color_system=None)
    console.print(summary_table(records, ["broken"]))
    text = console.export_text()
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert len(lines) <= 2 * len(records) + 8  # one row per experiment, nothing wrapped into a tall table
    for name in EXPERIMENTS:
        assert name in text  # never cut with an ellipsis
    assert "a long claim" not in text  # the claims are in the report
    assert other_init_notes(records) == [f"{records[0]['experiment']}: not held with the 'torch' initialization of "
                                         "the networks without batch norm (lr 3 vs None)"]



def test_why_lines_name_each_failed_check_and_how_to_settle_an_inconclusive_claim():
    from rich.console import Console

    from batchnorm_lab.experiment_commands import summary_table, why_lines

    def check(name, status, why):
        return {"name": name, "held": status == "held", "status": status, "why": why}

    records = [
        {"experiment": "cnn-depth", "verdict": "did not hold", "held": False, "headline": "x", "seconds": 1,
         "checks": [check("trains with batch norm", "did not hold", "train 78.2%, needs >= 90.0%"),
                    check("trains poorly without", "held", "-65.4 pts without BN")]},
        {"experiment": "batch-size", "verdict": "inconclusive at this length", "held": False, "headline": "x",
         "seconds": 1, "checks": [check("tiny batches hurt", "held", "36.0% vs best 97.7%"),
                                  check("ghost batches help large batches", "inconclusive at this length", "a")]},
        {"experiment": "speed", "verdict": "held", "held": True, "headline": "x", "seconds": 1,
         "checks": [check("fewer steps to the target", "held", "50 vs 350")]},
        # saved before verdicts had three values: only `held`
        {"experiment": "noise", "held": False, "headline": "x", "seconds": 1,
         "checks": [{"name": "noisy batch norm beats no batch norm", "held": False}]},
    ]
    assert why_lines(records) == [
        "cnn-depth - trains with batch norm: train 78.2%, needs >= 90.0%",
        "batch-size inconclusive, run fully: batchnorm run batch-size",
        "noise - noisy batch norm beats no batch norm",
    ]
    console = Console(width=80, record=True, color_system=None)
    console.print(summary_table(records))
    rows = {line.split()[1]: line for line in console.export_text().splitlines() if line.startswith("│ ")}
    assert "not held" in rows["cnn-depth"] and "inconclusive" in rows["batch-size"] and "held" in rows["speed"]

def test_run_resume_and_report(tmp_path):
    args = ["run", "covariate-shift", "--quick", "--steps", "5", "--seeds", "1", "--out", str(tmp_path)]
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "covariate-shift.json").read_text())
    assert record["config"]["steps"] == 5 and record["config"]["seeds"] == [0]
    assert (tmp_path / "report.html").is_file() and (tmp_path / "summary.md").is_file()
    started = record["started"]
    result = runner.invoke(app, [*args, "--resume"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "(saved)" in result.output
    assert json.loads((tmp_path / "covariate-shift.json").read_text())["started"] == started  # not rerun
    (tmp_path / "report.html").unlink()
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 0 and (tmp_path / "report.html").is_file()


def test_bad_input_is_refused(tmp_path):
    for args, message in [
        (["run", "nope"], "unknown experiment"),
        (["run", "speed", "--dataset", "npz:/nonexistent.npz"], "no file"),
        (["run", "speed", "--device", "cuda:0"] if not __import__("torch").cuda.is_available() else ["run", "speed", "--device", "bogus"], "device"),
        (["report", str(tmp_path)], "no experiment results"),
    ]:
        result = runner.invoke(app, args, env={"COLUMNS": "200"})
        assert result.exit_code != 0, args
        assert message in result.output, (args, result.output)


@pytest.mark.slow
def test_compile_ahead_fills_numba_cache_with_the_kernels_cnn_wallclock_runs(tmp_path, monkeypatch):
    """The background process (one per experiment that has `compile_kernels`) leaves on disk
    the kernels the run's layers call: the (N, C, L) forward and backward of BN + ReLU and of
    BN + add + ReLU (the clamp kind's cases), serial on the run's one thread (a cold cache of
    its own here: the process compiles them)."""
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    plan = [(name, config_for(name, quick=True)) for name in ("speed", "cnn-wallclock")]
    assert plan[1][1]["threads"] == 1
    started = compile_ahead(plan)
    assert list(started) == ["cnn-wallclock"]
    started["cnn-wallclock"].join(timeout=600)
    assert started["cnn-wallclock"].exitcode == 0
    cached = {path.name.split("-")[0] for path in tmp_path.rglob("*.nbi")}
    for name in ("ncl_forward", "ncl_backward"):
        for case in ("plain_clamp", "residual_clamp"):
            assert f"numba_kernels.{name}_serial_{case}" in cached, sorted(cached)
