"""Reusable memory for the CPU kernels' large outputs (y, dx, dresidual).

A training step allocates the same outputs as the step before. glibc hands a large freed
block back to the OS (above its mmap or trim threshold), so the next step's first write to a
new one faults in every 4 KiB page, for each of the three outputs of a batch norm +
residual + ReLU step (docs/performance.md, "The `numba` backend (CPU)", Outputs, has the
faults and their cost).
The pool keeps freed buffers, by size, up to a byte budget, and
hands them out again. A buffer goes back to the pool only when the array built on it is
gone, which happens when nothing refers to it any more (a torch tensor made with
`torch.from_numpy` keeps its array alive, views included), so a live output is never reused.

Outputs smaller than `MIN_BYTES` are not pooled (the allocator's own free lists serve them).
`clear()` gives the idle buffers back.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Callable

import numpy as np

MIN_BYTES = 1 << 20  # smaller outputs come straight from the allocator
BUDGET_BYTES = 1 << 29  # at most this much memory is kept idle in the pool


class OutputPool:
    """Free buffers by (dtype, size); `empty(shape, dtype)` an uninitialized array on one of
    them, or on a new one."""

    def __init__(
        self,
        allocate: Callable[[int, np.dtype], np.ndarray],
        budget: int = BUDGET_BYTES,
        min_bytes: int = MIN_BYTES,
    ):
        """`allocate(count, dtype)` gives a new 1-D array; `budget` bounds the idle bytes kept."""
        self._allocate = allocate
        self.budget, self.min_bytes = budget, min_bytes
        self._free: dict[tuple[np.dtype, int], list[np.ndarray]] = {}
        self._idle = 0
        # Reentrant: a finalizer may run (an array dying) on this thread inside a locked region.
        self._lock = threading.RLock()

    @property
    def idle_bytes(self) -> int:
        """Bytes held in free buffers now."""
        return self._idle

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """An uninitialized C-contiguous array of `shape` and `dtype`."""
        dtype = np.dtype(dtype)
        count = math.prod(shape)
        if count * dtype.itemsize < self.min_bytes:
            return self._allocate(count, dtype).reshape(shape)
        key = (dtype, count)
        with self._lock:
            free = self._free.get(key)
            raw = free.pop() if free else None
            if raw is not None:
                self._idle -= raw.nbytes
        if raw is None:
            raw = self._allocate(count, dtype)
        array = raw.reshape(shape)  # a view: the only object handed out
        # When `array` dies (nothing refers to it any more), raw is free again.
        weakref.finalize(array, self._release, key, raw).atexit = False
        return array

    def _release(self, key: tuple[np.dtype, int], raw: np.ndarray) -> None:
        with self._lock:
            if self._idle + raw.nbytes <= self.budget:
                self._free.setdefault(key, []).append(raw)
                self._idle += raw.nbytes

    def clear(self) -> None:
        """Give every idle buffer back to the allocator."""
        with self._lock:
            self._free.clear()
            self._idle = 0
