"""What a user's first training steps cost: ours against torch's, on caches nothing has filled.

    batchnorm bench first-use [--rounds 5] [--steps 10] [--compile/--no-compile] [--out results]

Each run is a process of its own, started with an empty numba cache and an empty Inductor
cache (fresh temporary folders in NUMBA_CACHE_DIR and TORCHINDUCTOR_CACHE_DIR) and the
library's default first-use behaviour (BATCHNORM_COMPILE=background: until a kernel case is
compiled, in a helper process, calls run torch's kernel; backends/numba_warmup.py). It trains
a CIFAR ResNet-20 (batch 64, 32x32, SGD with momentum) for `steps` steps, torch's layers or
the same network converted to ours (`bn.tools.convert(fuse=True)`), eagerly or under
torch.compile, and reports the wall time of those steps from the first forward on (the
imports, building the model and converting it are not counted: torch's layers need those
too). Rounds alternate ours and torch's, so that a change of the host's load between rounds
falls on both; the host's load average is recorded before and after.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import typer

from .files import RESULTS, write_atomic
from .timing import load_average

ARMS = ("ours", "torch")
BATCH, SIZE = 64, 32

# The child: one run, its step times as JSON on its last line of output.
_CHILD = """
import json, sys, time
import torch
import batchnorm as bn
from batchnorm_lab.models import resnet20

arm, compiled, steps, batch, size = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.manual_seed(0)
model = resnet20()
if arm == "ours":
    model, _ = bn.tools.convert(model, fuse=True, example_input=torch.randn(2, 3, size, size))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
forward = torch.compile(model) if compiled else model
x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
times = []
for _ in range(steps):
    start = time.perf_counter()
    loss = torch.nn.functional.cross_entropy(forward(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    times.append(time.perf_counter() - start)
print(json.dumps(times))
"""


def run_once(arm: str, compiled: bool, steps: int, batch: int = BATCH, size: int = SIZE) -> list[float]:
    """One run in a fresh process on empty caches: the seconds each of its `steps` steps took."""
    with tempfile.TemporaryDirectory(prefix="bn-first-use-") as caches:
        env = dict(
            os.environ,
            BATCHNORM_COMPILE="background",
            NUMBA_CACHE_DIR=os.path.join(caches, "numba"),
            TORCHINDUCTOR_CACHE_DIR=os.path.join(caches, "inductor"),
        )
        args = [arm, str(int(compiled)), str(steps), str(batch), str(size)]
        done = subprocess.run([sys.executable, "-c", _CHILD, *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the {arm} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(rounds: int, steps: int, modes: tuple[str, ...], batch: int = BATCH, size: int = SIZE, echo=print) -> dict:
    """`rounds` alternating runs of each arm per mode ("eager", "compiled"). Returns the step
    times of every run and, per mode, the medians of the runs' totals and their ratio."""
    load_before, started = load_average(), time.perf_counter()
    result = {"batch": batch, "size": size, "steps": steps, "rounds": rounds, "modes": {}}
    for mode in modes:
        runs = {arm: [] for arm in ARMS}
        for r in range(rounds):
            for arm in ARMS:
                times = run_once(arm, mode == "compiled", steps, batch, size)
                runs[arm].append(times)
                echo(f"{mode} round {r + 1}/{rounds} {arm}: {sum(times):.2f} s ({steps} steps, first {times[0]:.2f} s)")
        totals = {arm: [sum(t) for t in runs[arm]] for arm in ARMS}
        medians = {arm: statistics.median(totals[arm]) for arm in ARMS}
        result["modes"][mode] = {
            "runs": runs,
            "totals": totals,
            "median": medians,
            "ratio": medians["ours"] / medians["torch"],
            "round_ratios": [o / t for o, t in zip(totals["ours"], totals["torch"])],
        }
    result.update(load_before=load_before, load_after=load_average(), seconds=time.perf_counter() - started)
    return result


def render(result: dict) -> str:
    """A markdown table of `run`'s result."""
    steps = result["steps"]
    lines = [
        f"First {steps} training steps of ResNet-20 (batch {result['batch']}, {result['size']}x{result['size']}), "
        f"each run a fresh process on empty numba and Inductor caches, {result['rounds']} alternating rounds, "
        f"load average {_fmt_load(result['load_before'])} before, {_fmt_load(result['load_after'])} after.",
        "",
        f"| mode | {steps} steps, ours | {steps} steps, torch | first step, ours / torch | ours / torch (median) | per round |",
        "|---|---|---|---|---|---|",
    ]
    for mode, m in result["modes"].items():
        ours, theirs = m["totals"]["ours"], m["totals"]["torch"]
        firsts = [statistics.median(t[0] for t in m["runs"][arm]) for arm in ARMS]
        lines.append(
            f"| {mode} | {_span(ours)}, median {m['median']['ours']:.2f} s | {_span(theirs)}, median "
            f"{m['median']['torch']:.2f} s | {firsts[0]:.2f} / {firsts[1]:.2f} s | **{m['ratio']:.2f}x** | "
            + ", ".join(f"{r:.2f}" for r in m["round_ratios"])
            + " |"
        )
    return "\n".join(lines)


def _span(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f} s"


def _fmt_load(load: list[float] | None) -> str:
    return "unknown" if load is None else " / ".join(f"{v:.1f}" for v in load)


def first_use_command(
    rounds: int = typer.Option(5, min=1, help="Alternating runs of each arm per mode."),
    steps: int = typer.Option(10, min=1, help="Training steps per run."),
    with_compile: bool = typer.Option(True, "--compile/--no-compile", help="Also time torch.compile'd runs."),
    batch: int = typer.Option(BATCH, min=2, help="Batch size."),
    size: int = typer.Option(SIZE, min=4, help="Image height and width."),
    out: Path = typer.Option(RESULTS, help="Folder for first-use-cpu.json (this project's: --out docs/bench)."),
) -> None:
    """First training steps of ResNet-20 on empty kernel caches: ours against torch's layers."""
    modes = ("eager", "compiled") if with_compile else ("eager",)
    result = run(rounds, steps, modes, batch, size, echo=typer.echo)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "first-use-cpu.json"
    write_atomic(path, (json.dumps(result, indent=1) + "\n").encode())
    typer.echo(render(result))
    typer.echo(f"wrote {path}")
