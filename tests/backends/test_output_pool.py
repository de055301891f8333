"""The output pool hands a buffer out again only once nothing refers to it, within its budget;
and the numba backend's outputs stay correct while their memory is reused."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from batchnorm import ops
from batchnorm.backends import numba_cpu
from batchnorm.backends.output_pool import OutputPool


def new_pool(**kwargs) -> tuple[OutputPool, list[int]]:
    """A pool over numpy allocations, and the list of the sizes it allocated."""
    allocated = []

    def allocate(count, dtype):
        allocated.append(count)
        return np.empty(count, dtype)

    return OutputPool(allocate, **kwargs), allocated


def address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def test_a_freed_buffer_is_handed_out_again():
    pool, allocated = new_pool(min_bytes=0)
    a = pool.empty((4, 5), np.float32)
    first = address(a)
    del a
    gc.collect()
    assert pool.idle_bytes == 80
    b = pool.empty((5, 4), np.float32)  # same dtype and size, another shape
    assert address(b) == first and b.shape == (5, 4) and allocated == [20]
    assert pool.idle_bytes == 0


def test_a_buffer_in_use_is_never_handed_out():
    pool, allocated = new_pool(min_bytes=0)
    a = pool.empty((10,), np.float64)
    view = torch.from_numpy(a)[3:]  # a tensor view keeps the array, so the buffer, alive
    first = address(a)
    del a
    gc.collect()
    b = pool.empty((10,), np.float64)
    assert address(b) != first and allocated == [10, 10]
    assert pool.idle_bytes == 0
    del view
    gc.collect()
    assert pool.idle_bytes == 80
    assert address(pool.empty((10,), np.float64)) == first


def test_the_dtype_is_part_of_the_key():
    pool, allocated = new_pool(min_bytes=0)
    a = pool.empty((10,), np.float32)
    del a
    gc.collect()
    b = pool.empty((5,), np.float64)  # same bytes, another dtype: a new buffer
    assert allocated == [10, 5] and pool.idle_bytes == 40 and b.dtype == np.float64


def test_idle_memory_stays_within_the_budget_and_clear_gives_it_back():
    pool, _ = new_pool(min_bytes=0, budget=100)
    arrays = [pool.empty((20,), np.float32) for _ in range(3)]  # 80 bytes each
    del arrays
    gc.collect()
    assert pool.idle_bytes == 80  # one kept, two over the budget dropped
    pool.clear()
    assert pool.idle_bytes == 0


def test_small_outputs_are_not_pooled():
    pool, allocated = new_pool(min_bytes=1000)
    a = pool.empty((10,), np.float32)
    del a
    gc.collect()
    pool.empty((10,), np.float32)
    assert pool.idle_bytes == 0 and allocated == [10, 10]


@pytest.mark.skipif(numba_cpu.NumbaBackend().unavailable() is not None, reason="numba is not importable")
@pytest.mark.slow
def test_numba_outputs_stay_correct_while_their_memory_is_reused():
    """Three steps of an input above the pool's threshold: each step's outputs equal a fresh
    computation, and a step's output kept alive is not overwritten by the next step."""
    gen = torch.Generator().manual_seed(0)
    shape = (8, 4, numba_cpu.OUTPUTS.min_bytes // 4 // 32 + 1)  # > min_bytes per output
    xs = [torch.randn(shape, generator=gen) + k for k in range(3)]
    r = torch.randn(shape, generator=gen)
    dy = torch.randn(shape, generator=gen)

    def step(x):
        xg, rg = x.clone().requires_grad_(), r.clone().requires_grad_()
        y = ops.batch_norm(xg, None, None, rg, None, None, training=True, eps=1e-5, activation="relu", backend="numba")[0]
        return (y.detach(), *torch.autograd.grad(y, (xg, rg), dy))

    kept = step(xs[0])
    snapshot = [t.clone() for t in kept]
    numba_cpu.OUTPUTS.clear()
    for x in xs:
        first = step(x)
        gc.collect()  # the outputs of `first` are alive: the next step must use other memory
        again = step(x)
        for a, b in zip(first, again):
            assert torch.equal(a, b)
    for a, b in zip(kept, snapshot):
        assert torch.equal(a, b)
    assert numba_cpu.OUTPUTS.idle_bytes > 0  # the freed outputs went back to the pool
