"""The `batchnorm` command line. Each command lives with the code it drives; this file
only gathers them."""

from __future__ import annotations

import typer

from .bench import bench_app
from .bench_train import train_bench_command
from .experiments.commands import demo_command, list_command, report_command, run_command
from .tools.check import check_command
from .train import train_command

app = typer.Typer(
    name="batchnorm",
    help="Batch normalization for PyTorch: layers, tools, benchmarks and experiments.",
    no_args_is_help=True,
    add_completion=False,
)


bench_app.command("train")(train_bench_command)
app.add_typer(bench_app, name="bench")
app.command("check")(check_command)
app.command("train")(train_command)
app.command("demo")(demo_command)
app.command("run")(run_command)
app.command("list")(list_command)
app.command("report")(report_command)


@app.callback()
def _root() -> None:
    """Batch normalization for PyTorch: layers, tools, benchmarks and experiments."""


@app.command("backends")
def backends_command() -> None:
    """List the batch-norm backends and whether this machine can run them."""
    from rich.console import Console
    from rich.table import Table

    from . import backends

    table = Table("backend", "available here", title="batch-norm backends")
    for name in backends.names():
        why_not = backends.get(name).unavailable()
        table.add_row(name, "yes" if why_not is None else f"no: {why_not}")
    Console().print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
