"""`batchnorm` / `python -m batchnorm_lab` without the `experiments` extra: one line saying what
to install, exit code 2, no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from batchnorm_lab.__main__ import NEEDS_EXTRA

# Runs the console script's main() with `module` made unimportable (None in sys.modules).
SCRIPT = "import sys; sys.modules[{module!r}] = None; sys.argv = ['batchnorm', 'list']; from batchnorm_lab.__main__ import main; main()"


@pytest.mark.slow
@pytest.mark.parametrize("module", ["typer", "rich"])
def test_without_the_extra_one_line_and_exit_2(module):
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(module=module)], capture_output=True, text=True, timeout=300
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and NEEDS_EXTRA in lines[0] and module in lines[0], done.stderr
    assert "Traceback" not in done.stderr
