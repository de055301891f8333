"""numba's on-disk cache as users meet it (backends/numba_cache.py): kernels compiled by
different processes into one cache folder, a damaged cache file, and no writable folder.

The first test is the scenario that gave silently wrong results: kernel cases (`CASES`)
each compiled alone in its own process into one shared cache, then all loaded in one
process and compared with the float64 reference, in two orders. Each process compiles its case's kernels in the
same order, so without unique names two cases' loops got one symbol.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import pytest

numba = pytest.importorskip("numba")

# Four cases that between them take both activation kinds, each residual flag and each size
# class, every two of them different: without unique names any two cases compiled apart
# collide. (That every one of the 32 compiled cases has a cache entry of its own is
# test_numba_cpu.py's test_every_compiled_case_has_its_own_cache_entry.)
CASES = [
    {"activation": None, "residual": False, "parallel": False},
    {"activation": "relu", "residual": True, "parallel": False},
    {"activation": "hardswish", "residual": False, "parallel": True},
    {"activation": "relu", "residual": False, "parallel": True},
]

# One case through the numba backend's whole op (forward, backward), compared with the
# reference in float64; prints the largest errors as JSON. The input shape picks the kernel
# that runs serially (under PARALLEL_NUMEL elements) or with threads.
_RUN_CASES = textwrap.dedent(
    """
    import json, sys
    import torch
    from batchnorm import reference
    from batchnorm.backends import numba_cpu, numba_kernels

    be = numba_cpu.NumbaBackend()
    errors = []
    for case in json.loads(sys.argv[1]):
        torch.manual_seed(0)
        n = 2 * numba_kernels.PARALLEL_NUMEL // (8 * 64) if case["parallel"] else 4
        x = torch.randn(n, 8, 64, dtype=torch.float64)
        w, b = torch.rand(8, dtype=torch.float64) + 0.5, torch.randn(8, dtype=torch.float64)
        res = torch.randn_like(x) if case["residual"] else None
        dy = torch.randn_like(x)
        act = case["activation"]
        y, params = be.forward(x, w, b, res, None, None, 1e-5, act, True)
        dx, dw, db, dres = be.backward(dy, x, res, params, True, act, (True, True, True, res is not None),
                                       torch.float64, torch.float64)
        xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
        rr = None if res is None else res.clone().requires_grad_()
        yr = reference.batch_norm(xr, wr, br, activation=act, residual=rr)
        yr.backward(dy)
        pairs = [(y, yr), (dx, xr.grad), (dw, wr.grad), (db, br.grad)] + ([(dres, rr.grad)] if res is not None else [])
        errors.append(max(float((a - r).abs().max()) for a, r in pairs))
    print(json.dumps(errors))
    """
)


def _python(cache_dir, cases, extra_env=None):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir), **(extra_env or {}))
    done = subprocess.run(
        [sys.executable, "-c", _RUN_CASES, json.dumps(cases)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


@pytest.mark.slow
def test_kernels_compiled_by_different_processes_share_one_cache(tmp_path):
    with ThreadPoolExecutor(max_workers=2) as pool:  # one process per case, each alone in its cache
        list(pool.map(lambda case: _python(tmp_path, [case]), CASES))
    for order in (CASES, CASES[::-1]):
        errors, _ = _python(tmp_path, order)
        wrong = [(case, err) for case, err in zip(order, errors) if not err < 1e-9]
        assert not wrong, f"cases whose cached kernels give wrong results: {wrong}"


@pytest.mark.slow
def test_a_damaged_cache_file_is_recompiled_with_one_warning(tmp_path):
    case = [{"activation": "relu", "residual": False, "parallel": False}]
    (errors,), _ = _python(tmp_path, case)
    assert errors < 1e-9
    damaged = list(tmp_path.rglob("*.nbi")) + list(tmp_path.rglob("*.nbc"))
    assert damaged, "the first run left no cache files"
    for path in damaged:
        path.write_bytes(path.read_bytes()[:17])  # truncated: what a killed writer leaves
    (errors,), stderr = _python(tmp_path, case)
    assert errors < 1e-9
    assert stderr.count("damaged numba cache file") == 1, stderr[-3000:]
    (errors,), stderr = _python(tmp_path, case)  # the files were replaced: no warning now
    assert errors < 1e-9 and "damaged" not in stderr, stderr[-3000:]


def test_unique_name_refuses_a_name_given_twice():
    from batchnorm.backends import numba_cache

    def f():
        return 1

    def g():
        return 2

    numba_cache.unique_name(f, "test_unique_name_refuses_once")
    assert f.__qualname__ == "test_unique_name_refuses_once"
    with pytest.raises(RuntimeError, match="collide"):
        numba_cache.unique_name(g, "test_unique_name_refuses_once")
