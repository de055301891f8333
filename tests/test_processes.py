"""The layer in the processes users run it in: DataLoader workers forked from a process whose
kernels ran threads, threads making a model's first calls at once, and installs where nothing
next to the package (nor HOME) is writable."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import batchnorm as bn
from batchnorm.backends import numba_kernels

pytestmark = pytest.mark.skipif(numba_kernels.MISSING is not None, reason="numba is not importable")


class _Normalized(torch.utils.data.Dataset):
    """Each item runs the layer in the worker, at a size whose kernel runs threads."""

    def __init__(self, layer):
        self.layer = layer

    def __len__(self):
        return 4

    def __getitem__(self, i):
        torch.manual_seed(i)
        with torch.no_grad():
            return self.layer(torch.randn(16, 16, 16, 16)).std()


def test_forked_dataloader_workers_run_the_layer_after_the_parent_trained():
    layer = bn.BatchNorm2d(16, backend="numba")
    x = torch.randn(16, 16, 16, 16, requires_grad=True)
    assert x.numel() >= numba_kernels.PARALLEL_NUMEL  # the parent starts OpenMP threads
    layer(x).sum().backward()
    loader = torch.utils.data.DataLoader(
        _Normalized(layer), num_workers=2, batch_size=2, multiprocessing_context="fork"
    )
    in_workers = torch.cat(list(loader))
    in_parent = torch.stack([_Normalized(layer)[i] for i in range(4)])
    assert torch.equal(in_workers, in_parent)  # serial kernels in the children: the same bits


# A process in which no folder can be written except, when ALLOW is set, the folders under it:
# numba checks a cache folder by creating a temporary file there.
_READ_ONLY = textwrap.dedent(
    """
    import os, tempfile, warnings
    allowed, real = os.environ.get("ALLOW"), tempfile.TemporaryFile
    def read_only(*args, dir=None, **kwargs):
        if allowed and dir and os.path.realpath(dir).startswith(os.path.realpath(allowed)):
            return real(*args, dir=dir, **kwargs)
        raise PermissionError(13, "Read-only file system", dir)
    tempfile.TemporaryFile = read_only
    warnings.simplefilter("always")
    import torch, batchnorm as bn
    x = torch.randn(8, 4, 5)
    for backend in ("aten", "numba"):
        y = bn.functional.batch_norm(x, None, None, training=True, backend=backend)
        assert torch.allclose(y, torch.nn.functional.batch_norm(x, None, None, training=True), atol=1e-5)
    print("ran")
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("temp_writable", [True, False], ids=["temp-dir-writable", "nothing-writable"])
def test_a_read_only_install_imports_and_runs(tmp_path, temp_writable):
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env.update(HOME=str(tmp_path / "home"), TMPDIR=str(temp))
    if temp_writable:
        env["ALLOW"] = str(temp)
    done = subprocess.run([sys.executable, "-c", _READ_ONLY], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "ran" in done.stdout, done.stderr[-3000:]
    if temp_writable:
        assert done.stderr.count("the kernels are cached in") == 1, done.stderr[-3000:]
        assert any(temp.glob("batchnorm-numba-cache-*/**/*.nbi"))
    else:
        assert done.stderr.count("no writable folder for numba's cache") == 1, done.stderr[-3000:]


# A fresh process (no kernel built in it yet) whose threads all make their first call of a
# layer at once, with the kernels compiled at first use: each thread asks for the same kernel
# case at the same moment.
_FIRST_CALLS_AT_ONCE = textwrap.dedent(
    """
    import os, threading
    os.environ["BATCHNORM_COMPILE"] = "blocking"
    import torch, batchnorm as bn
    layer = bn.BatchNorm2d(16, backend="numba")
    x = torch.randn(16, 16, 16, 16)  # the threaded kernel's size
    start, outputs, errors = threading.Barrier(8), [None] * 8, []

    def first_call(i):
        start.wait()
        try:
            with torch.no_grad():
                outputs[i] = layer(x)
        except Exception as error:
            errors.append(repr(error))

    threads = [threading.Thread(target=first_call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    with torch.no_grad():
        alone = layer(x)
    assert all(torch.equal(y, alone) for y in outputs)
    assert int(layer.num_batches_tracked) == 9
    print("ran")
    """
)


@pytest.mark.slow
def test_threads_making_their_first_calls_at_once_each_get_the_kernel():
    """Each kernel case is built once per process, whichever thread asks first: the others
    wait for it (built twice, the second would have been refused, and that thread's call
    failed)."""
    done = subprocess.run([sys.executable, "-c", _FIRST_CALLS_AT_ONCE], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "ran" in done.stdout, done.stderr[-3000:]


# A fresh process whose torch runs one thread (as each of several processes sharing a machine
# should): the kernels start no thread of their own, and give the bits they give on two.
_ONE_THREAD = textwrap.dedent(
    """
    import os
    os.environ["BATCHNORM_COMPILE"] = "blocking"
    import numba, torch, batchnorm as bn
    torch.set_num_threads(1)
    layer = bn.BatchNorm2d(16, backend="numba")
    x = torch.randn(16, 16, 16, 16, requires_grad=True)  # the threaded kernel's size

    def step():
        x.grad = None
        y = layer(x)
        y.backward(torch.ones_like(y))
        return y.detach(), x.grad

    y1, dx1 = step()
    try:
        numba.threading_layer()
    except ValueError:  # "not initialized": no parallel region ran
        pass
    else:
        raise AssertionError("a kernel started numba's threads under torch.set_num_threads(1)")
    torch.set_num_threads(2)
    y2, dx2 = step()
    # numba's pool is larger (NUMBA_NUM_THREADS=3): starting it left torch's count alone
    assert numba.get_num_threads() == torch.get_num_threads() == 2
    assert torch.equal(y1, y2) and torch.equal(dx1, dx2)
    print("ran")
    """
)


@pytest.mark.slow
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two cores")
def test_the_kernels_run_on_as_many_threads_as_torch():
    """Processes sharing a machine each give torch one thread (or a few): the kernels follow
    torch.get_num_threads() (on two processes of one thread each, ignoring it made a
    (32, 64, 32, 32) training step 16 ms, five times its time alone and slower than torch's
    kernel), and the thread count does not change the result. numba's pool is made larger
    than torch's count: starting it set OpenMP's count, torch's too, to the pool's (a process
    given 2 threads on a 16-core machine then ran torch's kernels on 16)."""
    env = dict(os.environ, NUMBA_NUM_THREADS="3")
    done = subprocess.run([sys.executable, "-c", _ONE_THREAD], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "ran" in done.stdout, done.stderr[-3000:]
