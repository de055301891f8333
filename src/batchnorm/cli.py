"""The `batchnorm` command line. Each command lives with the code it drives; this file
only gathers them."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="batchnorm",
    help="Batch normalization for PyTorch: layers, tools, benchmarks and experiments.",
    no_args_is_help=True,
    add_completion=False,
)


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
