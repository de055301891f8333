"""The experiment commands: `batchnorm demo`, `run`, `list` and `report` (registered in cli.py).

Each experiment runs under its own rich progress bar; records and plots are saved as each
one finishes, then the report is rebuilt from the folder and its path printed.
"""

from __future__ import annotations

import datetime
import multiprocessing
import traceback
from pathlib import Path
from typing import Annotated, Optional

import typer

Device = Annotated[str, typer.Option(help="torch device to train on: cpu, cuda, cuda:1, mps ...")]


def demo_command(
    out: Annotated[Optional[Path], typer.Option(help="results folder [default: results/demo-<timestamp>]")] = None,
    device: Device = "cpu",
) -> None:
    """Every experiment in a quick configuration, on digits and MNIST-1D (under 2 minutes on 2 cores)."""
    from .experiments import EXPERIMENTS, config_for

    out = out or Path("results") / f"demo-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    plan = [(name, config_for(name, quick=True, device=_device(device))) for name in EXPERIMENTS]
    _run_plan(plan, out, resume=False, title="quick demo")


def run_command(
    name: Annotated[str, typer.Argument(help="an experiment from `batchnorm list`, or 'all'")],
    dataset: Annotated[Optional[str], typer.Option(help="digits, mnist1d, teacher, npz:PATH or idx:DIR")] = None,
    seeds: Annotated[Optional[int], typer.Option(min=1, help="number of seeds (0, 1, ... n-1)")] = None,
    steps: Annotated[Optional[int], typer.Option(min=1, help="training steps per model")] = None,
    out: Annotated[Optional[Path], typer.Option(help="results folder [default: results/NAME]")] = None,
    device: Device = "cpu",
    quick: Annotated[bool, typer.Option(help="the demo's quick configuration instead of the full one")] = False,
    resume: Annotated[bool, typer.Option(help="skip experiments already saved in --out with this configuration")] = False,
    threads: Annotated[Optional[int], typer.Option(min=1, help="torch and numba threads [default: the experiment's, 1]")] = None,
) -> None:
    """Run one experiment (or all) at full size; save results, plots and the report."""
    from .experiments import EXPERIMENTS, config_for

    names = list(EXPERIMENTS) if name == "all" else [name]
    overrides = dict(dataset=dataset, steps=steps, seeds=list(range(seeds)) if seeds else None, device=_device(device),
                     threads=threads)
    try:
        plan = [(n, config_for(n, quick=quick, **overrides)) for n in names]
        if dataset is not None:
            from . import data

            data.load(dataset)  # fail now, with the loader's message, not inside the first experiment
    except (ValueError, TypeError) as error:
        raise typer.BadParameter(str(error)) from error
    datasets = sorted({config["dataset"] for _, config in plan})
    _run_plan(plan, out or Path("results") / name, resume=resume, title=f"{name} on {', '.join(datasets)}")


def list_command() -> None:
    """List the experiments: the claim each one tests and its full and quick sizes.

    In a terminal, a table that wraps the claims to its width; otherwise (a pipe, a file,
    CI) one tab-separated line per experiment, nothing wrapped or cut, under a header line.
    """
    from rich.console import Console
    from rich.table import Table

    from .experiments import EXPERIMENTS

    size = lambda c: f"{len(c['seeds'])} x {c['steps']}"  # noqa: E731
    header = ("experiment", "full: seeds x steps", "demo: seeds x steps", "claim")
    rows = [(name, size(m.FULL), size(m.QUICK), m.CLAIM) for name, m in EXPERIMENTS.items()]
    console = Console()
    if not console.is_terminal:
        for row in (header, *rows):
            typer.echo("\t".join(row))
        return
    table = Table(title="experiments")
    table.add_column(header[0], no_wrap=True)
    table.add_column(header[1], no_wrap=True)
    table.add_column(header[2], no_wrap=True)
    table.add_column(header[3], ratio=1)
    for row in rows:
        table.add_row(*row)
    console.print(table)


def report_command(
    folder: Annotated[Path, typer.Argument(help="a results folder written by demo or run")],
) -> None:
    """Rebuild report.html and summary.md from the results saved in FOLDER."""
    from .experiments import load_results
    from .report import render

    try:
        html, markdown = render(folder, load_results(folder))
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error
    typer.echo(f"report: {html}\nsummary: {markdown}")


def _device(name: str) -> str:
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise typer.BadParameter(f"--device {name!r}: {error}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise typer.BadParameter(f"--device {name!r}: CUDA is not available on this machine; use cpu")
    return str(device)


def _run_plan(plan: list[tuple[str, dict]], out: Path, *, resume: bool, title: str) -> None:
    """Run each (name, config) into `out` under its own progress bar, then the summary and report."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from .report import render
    from .experiments import finished, load_results, run_into

    console = Console()
    console.print(f"[bold]{title}[/]: {len(plan)} experiment(s) into {out}")
    rows, failed = [], []
    columns = (TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    compiling = compile_ahead(plan[1:])
    with Progress(*columns, console=console) as bars:
        for name, config in plan:
            if name in compiling:
                compiling.pop(name).join()
            saved = finished(out, name, config) if resume else None
            if saved is not None:
                bars.add_task(f"{name} (saved)", total=1, completed=1)
                rows.append(saved)
                continue
            task = bars.add_task(name, total=None)

            def progress(advance: int = 0, *, total: int | None = None, task=task) -> None:
                if total is not None:
                    bars.update(task, total=total)
                if advance:
                    bars.advance(task, advance)

            try:
                rows.append(run_into(name, config, out, progress))
            except Exception as error:  # one broken experiment must not cost the others' results
                console.print(f"[red]{name} failed[/]: {type(error).__name__}: {error}")
                console.print(traceback.format_exc(), markup=False, highlight=False)
                failed.append(name)
    console.print(summary_table(rows, failed))
    for line in why_lines(rows) + other_init_notes(rows):
        console.print(line, highlight=False)
    if rows:
        html, markdown = render(out, load_results(out), title=title)
        console.print(f"claims, criteria, numbers and plots: {html}\nsummary: {markdown}")
    if failed:
        raise typer.Exit(code=1)


def compile_ahead(plan: list[tuple[str, dict]]) -> dict[str, multiprocessing.Process]:
    """A process per experiment of `plan` that has `compile_kernels`, started now: it compiles
    that experiment's numba kernels into numba's on-disk cache while the experiments before
    it run (single-threaded: the second core is idle), so that its first steps load them
    instead of compiling on a cold cache (docs/performance.md, "Costs around the kernels").
    Join one before its experiment starts; if it failed, the experiment compiles for itself."""
    from .experiments import EXPERIMENTS

    spawn = multiprocessing.get_context("spawn")  # a clean process: no forked torch threads
    started = {}
    for name, config in plan:
        compile_kernels = getattr(EXPERIMENTS[name], "compile_kernels", None)
        if compile_kernels is not None:
            started[name] = spawn.Process(target=compile_kernels, args=(config,), daemon=True)
            started[name].start()
    return started


def summary_table(records: list[dict], failed: list[str] = ()):
    """The verdicts as a table that fits 80 columns: experiment (never cut), verdict, the
    key number (`headline`) and the time; the claims' text is in the report."""
    from rich.table import Table

    table = Table(title="claims", title_justify="left")
    table.add_column("experiment", no_wrap=True)
    table.add_column("verdict", no_wrap=True)
    table.add_column("key number", ratio=1)
    table.add_column("time", justify="right", no_wrap=True)
    for record in records:
        table.add_row(record["experiment"], VERDICT_CELLS[_verdict(record)], record.get("headline") or record["result"],
                      f"{record['seconds']:.0f} s")
    for name in failed:
        table.add_row(name, "[red]failed[/]", "see the error above", "")
    return table


# A verdict in a word or two, for the terminal; in the table, coloured.
SHORT = {"held": "held", "did not hold": "not held", "inconclusive at this length": "inconclusive"}
VERDICT_CELLS = {verdict: f"[{colour}]{SHORT[verdict]}[/]"
                 for verdict, colour in zip(SHORT, ("green", "red", "yellow"))}


def _verdict(judged: dict) -> str:
    """A record's verdict, or a check's status (what was saved before there were three
    values has only `held`)."""
    return judged.get("verdict") or judged.get("status") or ("held" if judged["held"] else "did not hold")


def why_lines(records: list[dict]) -> list[str]:
    """Why each claim that did not hold did not (one line per failed check: the check and
    its numbers), and how to settle one that is inconclusive at this length (run it fully)."""
    lines = []
    for record in records:
        name = record["experiment"]
        if _verdict(record) == "did not hold":
            lines += [f"{name} - {c['name']}: {c['why']}" if c.get("why") else f"{name} - {c['name']}"
                      for c in record["checks"] if _verdict(c) == "did not hold"]
        elif _verdict(record).startswith("inconclusive"):
            lines.append(f"{name} inconclusive, run fully: batchnorm run {name}")
    return lines


def other_init_notes(records: list[dict]) -> list[str]:
    """One line per experiment whose verdict changes with the initialization of its networks
    without batch norm (those rerun with another one, `other_inits`)."""
    notes = []
    for record in records:
        for init, other in record.get("other_inits", {}).items():
            if _verdict(other) != _verdict(record):
                notes.append(f"{record['experiment']}: {SHORT[_verdict(other)]} with the '{init}' initialization of "
                             f"the networks without batch norm ({other['headline']})")
    return notes
