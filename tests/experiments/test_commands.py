"""The experiment commands through the CLI: list, run (and --resume), report, and bad input."""

import json

from typer.testing import CliRunner

from batchnorm.cli import app

runner = CliRunner()


def test_list_names_every_experiment():
    from batchnorm.experiments import EXPERIMENTS

    result = runner.invoke(app, ["list"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for name in EXPERIMENTS:
        assert name in result.output


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
