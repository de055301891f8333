"""`import batchnorm`: the layer, functional and tools load with torch, numpy and numba alone,
none of the `experiments` extra (which only the command line and the experiments need), and
not torch's compiler either (torch._dynamo takes 2 s to import; only compiling needs it)."""

from __future__ import annotations

import subprocess
import sys

import pytest

EXTRA = ("rich", "typer", "click", "sklearn", "mnist1d", "matplotlib", "jinja2", "torch._dynamo")


@pytest.mark.slow
def test_import_batchnorm_loads_neither_the_experiments_extra_nor_the_compiler():
    code = (
        "import sys, batchnorm; "
        f"print(' '.join(sorted(n for n in {EXTRA!r} if n in sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"import batchnorm loaded {done.stdout.strip()}"
