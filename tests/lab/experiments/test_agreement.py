"""The demo's quick verdicts against the full configuration's, on recorded runs of both
(docs/verdicts.json, written by `python -m batchnorm_lab.experiments.recorded`):
each configuration's verdict logic applied to its own run's checks, and every quick verdict
equal to the full one or inconclusive at the demo's length."""

import json
from pathlib import Path

import pytest

from batchnorm_lab import experiments
from batchnorm_lab.experiments import common

RECORDED = json.loads((Path(__file__).resolve().parents[3] / "docs" / "verdicts.json").read_text())
NAMES = list(experiments.EXPERIMENTS)


def _judged(run: str, name: str) -> tuple[str, dict[str, str]]:
    """(verdict, {check: status}) of the recorded `run` ("quick" or "full") of `name`, judged
    under today's configuration of that run."""
    checks = [dict(c) for c in RECORDED[run][name]["checks"]]
    verdict = common.judge(checks, experiments.config_for(name, quick=run == "quick"))
    return verdict, {c["name"]: c["status"] for c in checks}


def _settings(config: dict) -> dict:
    """What a run ran with: its configuration without the names of the checks it does not judge."""
    return {k: v for k, v in config.items() if k != "unpowered"}


def test_every_experiment_has_a_recorded_quick_and_full_run():
    assert sorted(RECORDED["quick"]) == sorted(NAMES) and sorted(RECORDED["full"]) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_the_recorded_runs_ran_todays_configurations(name):
    """A changed configuration needs new recordings: these would no longer say what it gives."""
    for run in ("quick", "full"):
        assert _settings(RECORDED[run][name]["config"]) == _settings(experiments.config_for(name, quick=run == "quick"))


@pytest.mark.parametrize("name", NAMES)
def test_quick_verdict_equals_the_full_one_or_is_inconclusive(name):
    quick, quick_checks = _judged("quick", name)
    full, full_checks = _judged("full", name)
    assert quick in (full, common.INCONCLUSIVE), (quick, full)
    assert quick_checks.keys() == full_checks.keys()
    for check, status in quick_checks.items():
        assert status in (full_checks[check], common.INCONCLUSIVE), (check, status, full_checks[check])


def test_the_full_configurations_judge_every_check():
    assert all("unpowered" not in experiments.config_for(name) for name in NAMES)
