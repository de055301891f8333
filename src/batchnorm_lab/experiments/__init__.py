"""The experiments: one module per claim about batch norm, and how to run one into a folder.

Every experiment module has `NAME`, `CLAIM`, `SETUP` (a format string over its config),
`FULL` and `QUICK` (its settings at full size and for `batchnorm demo`),
`run(config, progress) -> {"numbers", "checks", "held", "result", "headline"}` (`result`:
the outcome in a sentence; `headline`: its key number in a few words, for the terminal)
and `plot(record) -> {key: matplotlib Figure}`.

The verdict is `common.judge` of the checks under the config: a config may name checks it is
too short to power (`unpowered`, the demo's quick ones), which are then "inconclusive at
this length" rather than held or not (`verdict` in the record; `held` when it is "held").

An experiment with networks without batch norm has `inits` in its config (keys of
`common.INITS`): it initializes those networks by the first, and `run_into` reruns it with
each other one and saves that outcome (without plots) under `other_inits`, beside the
verdict's. The rerun reuses every training the init does not change (the networks with
batch norm; `common.reusing_training`).

`run_into(name, config, out)` runs one and writes `out/NAME.json` (the record: claim,
exact config, numbers, verdict, versions, machine) and `out/NAME-KEY.png`, each file
atomically (written aside, then renamed), the JSON last, so a folder never holds half a
result and an interrupted run keeps every experiment that finished.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from . import (
    batch_size,
    bn_position,
    cnn_depth,
    cnn_learning_rate,
    cnn_speed,
    cnn_wallclock,
    covariate_shift,
    distributions,
    input_normalization,
    learning_rate,
    noise,
    small_batch_norms,
    speed,
    test_time,
)
from ..files import write_atomic
from . import common
from .common import Progress, no_progress

EXPERIMENTS = {
    m.NAME: m
    for m in (speed, distributions, learning_rate, noise, batch_size, test_time, covariate_shift,
              input_normalization, cnn_speed, cnn_learning_rate, cnn_depth, bn_position, small_batch_norms,
              cnn_wallclock)
}
# threads: torch's and numba's threads while an experiment runs. These networks are tiny,
# and several threads on busy cores spin against each other: torch's training steps and the
# numba backend's calls alike ran many times slower with 2 threads than with 1 on 2 loaded
# cores (docs/performance.md, "Costs around the kernels").
BASE = {"dataset": "digits", "device": "cpu", "threads": 1}


def get(name: str):
    """The experiment module called `name`."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}: choose one of {', '.join(EXPERIMENTS)}")
    return EXPERIMENTS[name]


def config_for(name: str, quick: bool = False, **overrides) -> dict:
    """The experiment's full (or quick) config, with `overrides` (None values ignored)."""
    module = get(name)
    config = {**BASE, **(module.QUICK if quick else module.FULL)}
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in config:
            raise ValueError(f"{name} has no setting {key!r}; its settings are {', '.join(config)}")
        config[key] = value
    if not config["seeds"] or config["steps"] < 1:
        raise ValueError(f"{name}: give at least one seed and one step")
    return config


def run_into(name: str, config: dict, out: Path, progress: Progress = no_progress) -> dict:
    """Run experiment `name` with `config`; write its JSON record and plots under `out`."""
    module = get(name)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    clock = time.perf_counter()
    progress = accumulating(progress)
    others_to_run = config.get("inits", [])[1:]
    # A rerun with another init of the baseline reuses the trainings that init does not change.
    with threads(config["threads"]), common.reusing_training() if others_to_run else contextlib.nullcontext():
        outcome = module.run(config, progress)
        others = {init: module.run({**config, "inits": [init]}, progress) for init in others_to_run}
    verdict = common.judge(outcome["checks"], config)
    record = {
        "experiment": name,
        "claim": module.CLAIM,
        "setup": module.SETUP.format(**config),
        "config": config,
        **outcome,
        "verdict": verdict,
        "held": verdict == common.HELD,
        "started": started.isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - clock, 2),
        "environment": environment(config["device"]),
    }
    record.setdefault("headline", outcome["result"])
    if others:
        record["other_inits"] = {}
        for init, other in others.items():
            other_verdict = common.judge(other["checks"], config)
            record["other_inits"][init] = {"verdict": other_verdict, "held": other_verdict == common.HELD,
                                           **{key: other.get(key) for key in ("result", "headline", "checks", "numbers")}}
    record["plots"] = save_plots(module, record, out)
    write_atomic(out / f"{name}.json", json.dumps(record, indent=1, allow_nan=False).encode())
    return record


def accumulating(progress: Progress) -> Progress:
    """`progress` for several runs in a row: each run announces its own total once, at its
    start, and the bar's total becomes the sum of the totals announced so far."""
    announced = [0]

    def chained(advance: int = 0, *, total: int | None = None) -> None:
        if total is not None:
            announced[0] += total
            progress(total=announced[0])
        if advance:
            progress(advance)

    return chained


@contextlib.contextmanager
def threads(n: int):
    """Run with n threads in torch (the numba kernels follow torch's count), then put it back."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def save_plots(module, record: dict, out: Path) -> list[str]:
    """Render the experiment's figures to out/NAME-KEY.png; the file names, in order."""
    import matplotlib.pyplot as plt

    names = []
    for key, fig in module.plot(record).items():
        path = out / f"{record['experiment']}-{key}.png"
        tmp = path.with_name(f".{path.name}.tmp")
        fig.savefig(tmp, format="png", dpi=110)
        plt.close(fig)
        os.replace(tmp, path)
        names.append(path.name)
    return names


def finished(out: Path, name: str, config: dict | None = None) -> dict | None:
    """The saved record of `name` in `out`, if one is there (and ran with `config`, if given)."""
    path = Path(out) / f"{name}.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if config is not None and record.get("config") != config:
        return None
    return record


def load_results(out: Path) -> list[dict]:
    """Every saved record in `out`, in the registry's order."""
    return [r for r in (finished(out, name) for name in EXPERIMENTS) if r is not None]


def environment(device: str) -> dict:
    """The versions and the machine a result came from."""
    from batchnorm import __version__

    env = {
        "batchnorm": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or "unknown",
        "cpu_count": os.cpu_count(),
        "device": str(device),
        "argv": sys.argv[1:],
    }
    if str(device).startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env
