"""`batchnorm` and `python -m batchnorm_lab`: the command line (cli.py).

The library needs torch, numpy and numba only; the command line also needs the
`experiments` extra (typer and rich, and for the experiments and reports scikit-learn,
mnist1d, matplotlib and jinja2). Without it this says so in one line and exits 2, instead
of a traceback.
"""

from __future__ import annotations

import os
import sys

#: The top-level modules of the `experiments` extra (click comes with typer).
EXTRA_MODULES = frozenset({"typer", "click", "rich", "sklearn", "mnist1d", "matplotlib", "jinja2"})
NEEDS_EXTRA = "the command line needs the experiments extra: pip install 'batchnorm[experiments]'"


def main() -> None:
    # The lab times our kernels in steady state after untimed warm-up steps: there the numba
    # kernels compile at the first call that needs them, not in the background while torch's
    # kernel stands in (the library's default for users, numba_warmup.py), so that a timed
    # step never runs the stand-in. A caller's own setting wins.
    os.environ.setdefault("BATCHNORM_COMPILE", "blocking")
    try:
        from .cli import app

        app()
    except ModuleNotFoundError as error:
        missing = (error.name or "").partition(".")[0]
        if missing not in EXTRA_MODULES:
            raise
        print(f"batchnorm: {NEEDS_EXTRA} (no module named {missing!r})", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
