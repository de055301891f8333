"""The `batchnorm` command line. Each command lives with the code it drives (bench.py,
bench_train.py, bench_accuracy.py, experiments/commands.py, train.py); this file gathers
them, and holds `batchnorm check`, which loads a model, its weights and data for the health
check (`batchnorm.tools.health`).

It needs the `experiments` extra (typer, rich, and the datasets): `batchnorm` itself
starts in `__main__.py`, which says so in one line when it is missing.
"""

from __future__ import annotations

import importlib
import os
import pickle
import sys
from pathlib import Path
from typing import NoReturn

import torch
import typer
from torch import Tensor, nn

from .bench import bench_app
from .bench_accuracy import accuracy_command
from .bench_first_use import first_use_command
from .bench_memory import memory_command
from .bench_step import step_command
from .bench_train import train_bench_command
from .experiment_commands import demo_command, list_command, report_command, run_command
from batchnorm.tools import health
from .train import train_command

app = typer.Typer(
    name="batchnorm",
    help="Batch normalization for PyTorch: layers, tools, benchmarks and experiments.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """Batch normalization for PyTorch: layers, tools, benchmarks and experiments."""


# -- batchnorm check --------------------------------------------------------------------


def load_state_dict(path: Path) -> dict[str, Tensor]:
    """A state dict read with torch.load(weights_only=True): tensors and plain containers
    only, never arbitrary pickled objects. A {"state_dict": ...} checkpoint is unwrapped.
    ValueError, naming the file, for anything that is not a readable state dict (missing,
    empty, truncated or corrupt file, or one that needs arbitrary unpickling)."""
    if path.is_dir():
        raise ValueError(f"{path}: a directory, not a checkpoint file")
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: the file is empty; expected a checkpoint saved with torch.save")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "global" not in str(error).lower():  # not a refused class: a damaged pickle stream
            raise ValueError(f"{path}: not a readable checkpoint (truncated or corrupt)") from None
        raise ValueError(
            f"{path}: refusing to load it: it needs arbitrary unpickling (objects other than "
            "tensors), which could run any code. Save only the weights, "
            "torch.save(model.state_dict(), path)."
        ) from None
    except Exception as error:  # torch.load raises many kinds for a damaged file
        raise ValueError(
            f"{path}: not a readable checkpoint, truncated or corrupt ({type(error).__name__}: {_first_line(error)})"
        ) from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict (names to tensors), got {type(state).__name__}")
    return state


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""


def build(target: str) -> nn.Module:
    """Call the factory named 'package.module:function' (the current directory is importable)."""
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{target!r}: expected package.module:factory, e.g. mymodels:build_mlp")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    factory = getattr(importlib.import_module(module_name), attr, None)
    if not callable(factory):
        raise ValueError(f"{target!r}: {module_name} has no callable {attr!r}")
    model = factory()
    if not isinstance(model, nn.Module):
        raise ValueError(f"{target!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def data_batches(spec: str, batch_size: int, count: int) -> list[Tensor]:
    """`count` batches of the standardized test split of dataset `spec` (batchnorm_lab.data)."""
    from . import data as datasets  # scikit-learn loads only when data is asked for

    ds = datasets.standardize(datasets.load(spec))
    x = torch.from_numpy(ds.x_test)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return [x[order[i : i + batch_size]] for i in range(0, count * batch_size, batch_size) if i < len(x)]


def _cannot_load(error: Exception) -> str:
    """One line saying why loading failed: our ValueErrors' text, else the type too."""
    text = " ".join(str(error).split())  # torch's messages span lines; stderr gets one
    if isinstance(error, (ValueError, ImportError)):
        return text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def check_command(
    target: str = typer.Argument(..., help="package.module:factory, a function returning the model"),
    weights: Path = typer.Option(None, "--weights", help="a state dict saved with torch.save"),
    data: str = typer.Option("digits", "--data", help="dataset whose test split is used (batchnorm_lab.data)"),
    batch_size: int = typer.Option(60, "--batch-size", min=1, help="examples per batch"),
    batches: int = typer.Option(4, "--batches", min=1, help="how many batches to run"),
    json_path: Path = typer.Option(None, "--json", help="also write the report here as JSON"),
) -> None:
    """Check a model's batch-norm layers: exit code 0 healthy, 1 a problem, 2 not checkable.

    Exit code 1: an error or a warning found; 2: the model, weights or data cannot be loaded, or the model fails on the data (stderr says why)."""
    from rich.console import Console

    def cannot_check(why: str) -> NoReturn:
        Console(stderr=True, soft_wrap=True, highlight=False).print(f"error: {why}", markup=False, style="red")
        raise typer.Exit(2)

    # Whatever stops the model or data from loading (the factory is user code), or the model
    # from running on the data, is exit 2, never 1: a CI gate must not read it as findings.
    try:
        model = build(target)
        if weights is not None:
            model.load_state_dict(load_state_dict(weights))
        inputs = data_batches(data, batch_size, batches)
    except Exception as error:
        cannot_check(_cannot_load(error))
    model.eval()
    try:
        report = health.check(model, inputs, max_batches=batches)
    except Exception as error:
        shape = tuple(inputs[0].shape) if inputs else ()
        cannot_check(f"the model fails on --data {data} (batches of shape {shape}): {_cannot_load(error)}")
    Console().print(report)
    if json_path is not None:
        report.to_json(json_path)
    raise typer.Exit(0 if report.ok else 1)


bench_app.command("train")(train_bench_command)
bench_app.command("accuracy")(accuracy_command)
bench_app.command("memory")(memory_command)
bench_app.command("first-use")(first_use_command)
bench_app.command("step")(step_command)
app.add_typer(bench_app, name="bench")
app.command("check")(check_command)
app.command("train")(train_command)
app.command("demo")(demo_command)
app.command("run")(run_command)
app.command("list")(list_command)
app.command("report")(report_command)


@app.command("backends")
def backends_command() -> None:
    """List the batch-norm backends and whether this machine can run them."""
    from rich.console import Console
    from rich.table import Table

    from batchnorm import backends

    table = Table("backend", "available here", title="batch-norm backends")
    for name in backends.names():
        why_not = backends.get(name).unavailable()
        table.add_row(name, "yes" if why_not is None else f"no: {why_not}")
    Console().print(table)


if __name__ == "__main__":  # python -m batchnorm_lab.cli (scripts/gpu_check.sh)
    app()
