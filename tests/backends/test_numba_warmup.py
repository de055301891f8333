"""No call waits for numba (backends/numba_warmup.py): under `auto`, a call whose kernels are
not compiled runs torch's kernel while they compile in the background, then numba takes over,
with the same results and the same running statistics.

Run in a fresh process on an empty numba cache, as a user's first training steps are."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest

pytest.importorskip("numba")

_FIRST_STEPS = textwrap.dedent(
    """
    import torch, batchnorm as bn
    from batchnorm import backends
    from batchnorm.backends import numba_warmup

    torch.manual_seed(0)
    x = torch.randn(64, 16, 16, 16)
    ours, theirs = bn.BatchNormAct(bn.BatchNorm2d(16), "relu"), torch.nn.BatchNorm2d(16)
    before = backends.resolve("auto", x, "relu", False).backend.name
    ys = [ours(x.requires_grad_()) for _ in range(3)]  # first calls: nothing compiled yet
    ys[0].sum().backward()
    numba_warmup.wait()
    after = backends.resolve("auto", x, "relu", False).backend.name
    y_numba = ours(x)
    y_numba.sum().backward()
    for _ in range(4):
        y_torch = torch.relu(theirs(x))
    print(before, after, ours.bn.num_batches_tracked.item(),
          float((ys[0] - y_torch).abs().max()), float((y_numba - y_torch).abs().max()),
          float((ours.bn.running_var - theirs.running_var).abs().max()),
          numba_warmup._HELPER._process is not None)
    """
)


@pytest.mark.slow
def test_first_calls_run_torchs_kernel_until_numba_has_compiled(tmp_path):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path), BATCHNORM_COMPILE="background")
    done = subprocess.run([sys.executable, "-c", _FIRST_STEPS], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    before, after, count, first_error, numba_error, running_error, helper = done.stdout.split()
    assert (before, after) == ("aten", "numba") and helper == "True"  # compiled by the helper process
    assert int(count) == 4  # every call folded in once, on either side of the swap
    assert float(first_error) < 1e-5 and float(numba_error) < 1e-5 and float(running_error) < 1e-6


def test_blocking_mode_compiles_at_the_first_call(monkeypatch):
    from batchnorm.backends import numba_warmup

    monkeypatch.setenv(numba_warmup.ENV_VAR, "blocking")
    compiled = []
    assert numba_warmup.ready(("test", "blocking"), lambda: compiled.append(1))
    assert compiled == [1] and numba_warmup.ready(("test", "blocking"), lambda: compiled.append(2))
    assert compiled == [1]


def test_a_bad_mode_is_named(monkeypatch):
    from batchnorm.backends import numba_warmup

    monkeypatch.setenv(numba_warmup.ENV_VAR, "eager")
    with pytest.raises(ValueError, match="BATCHNORM_COMPILE must be"):
        numba_warmup.ready(("test", "mode"), lambda: None)


@pytest.mark.slow
def test_the_helper_process_runs_each_request_and_reports_failures():
    """A request names a function by module and name; a failure is reported back (the thread
    then compiles in this process) and the helper goes on serving."""
    from batchnorm.backends import numba_warmup

    helper = numba_warmup._Helper()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # "ok": nothing to say
            helper.run(("math", "sqrt", [4.0]))
        with pytest.warns(RuntimeWarning, match="compile helper failed.*TypeError"):
            helper.run(("math", "sqrt", ["four"]))
        helper.run(("math", "sqrt", [9.0]))
        assert helper._process.poll() is None  # still serving
    finally:
        helper._process.stdin.close()
        helper._process.wait(timeout=60)
    assert helper._process.returncode == 0
