"""Test-wide settings: hypothesis profiles ("ci" is what `make test` runs under CI)."""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("dev", max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

# `auto` runs torch's kernel while numba compiles a case in the background (numba_warmup.py);
# the suite compiles at first use instead, so that which backend runs a call does not depend
# on a race. tests/backends/test_numba_warmup.py tests the background mode.
os.environ.setdefault("BATCHNORM_COMPILE", "blocking")

# Without a GPU, the triton backend's kernels run in Triton's CPU interpreter. Triton reads
# TRITON_INTERPRET as it is imported (its own tl.* helpers are decorated then), so the
# variable is set here, before any test module can import triton.
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# Compiling the numba backend's kernels is most of what a first run of the suite costs: a
# case per dtype, rank, threads, residual and activation (numba_kernels.compiled), each
# seconds of one core, compiled one after another at first use in one process.
# When the whole suite (or its fast tier) runs, i.e. pytest is given no paths, they are
# compiled first into numba's cache by a few processes side by side, and each test (and each
# xdist worker) loads them from there: on a warm cache this costs the processes' start
# (about 4 s). BATCHNORM_TEST_PRECOMPILE=0 turns it off.
_PRECOMPILE = """
import sys
from batchnorm.backends import numba_cpu
for case in sys.argv[1:]:
    dtype, ndim, threads, has_res, kind = case.split(",")
    numba_cpu.compile_case(dtype, int(ndim), threads == "1", has_res == "1", kind)
"""


def _numba_cases() -> list[str]:
    """Every compiled case as "dtype,ndim,threads,has_res,kind" (each activation kind the
    kernels compile: numba_kernels.KINDS)."""
    import itertools

    from batchnorm.backends import numba_kernels

    if numba_kernels.MISSING:
        return []
    kinds = numba_kernels.KINDS
    return [
        f"{dtype},{ndim},{int(threads)},{int(res)},{kind}"
        for dtype, ndim, threads, res, kind in itertools.product(
            ("float32", "float64"), (3, 2), (False, True), (False, True), kinds
        )
    ]


def pytest_sessionstart(session):
    config = session.config
    if hasattr(config, "workerinput") or os.environ.get("BATCHNORM_TEST_PRECOMPILE", "1") == "0":
        return  # an xdist worker: the controller compiled them
    if config.args_source != config.ArgsSource.TESTPATHS or config.option.collectonly:
        return  # paths given: a few tests, which compile what they use
    import subprocess
    import sys
    import time

    cases = _numba_cases()
    procs = max(1, min(4, os.cpu_count() or 1))
    start = time.perf_counter()
    running = [
        subprocess.Popen([sys.executable, "-c", _PRECOMPILE, *cases[i::procs]], stderr=subprocess.PIPE, text=True)
        for i in range(procs)
        if cases[i::procs]
    ]
    failed = [err for proc in running for _, err in [proc.communicate()] if proc.returncode != 0]
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:  # on failure the tests compile in-process and fail with the error themselves
        reporter.write_line(
            f"numba kernels: {len(cases)} cases compiled or loaded in {time.perf_counter() - start:.1f} s "
            f"by {len(running)} processes" + "".join(f"; one failed: {err[-2000:]}" for err in failed)
        )
