"""Poisoned allocations: every tensor or array a kernel wrapper allocates starts as NaN.

A kernel that forgets to write an element then leaves a NaN behind, which the comparison
against the reference catches. Patches torch.empty/empty_like/empty_strided/new_empty and
numpy.empty/empty_like for the duration of the `with` block.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import numpy as np
import torch

_torch_empty = torch.empty
_torch_empty_like = torch.empty_like
_torch_empty_strided = torch.empty_strided
_np_empty = np.empty
_np_empty_like = np.empty_like


def _fill(t):
    if isinstance(t, torch.Tensor):
        if t.is_floating_point():
            t.fill_(float("nan"))
    elif np.issubdtype(t.dtype, np.floating):
        t.fill(np.nan)
    return t


@contextlib.contextmanager
def poisoned_allocations():
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch("torch.empty", lambda *a, **k: _fill(_torch_empty(*a, **k))))
        stack.enter_context(mock.patch("torch.empty_like", lambda *a, **k: _fill(_torch_empty_like(*a, **k))))
        stack.enter_context(
            mock.patch("torch.empty_strided", lambda *a, **k: _fill(_torch_empty_strided(*a, **k)))
        )
        stack.enter_context(mock.patch("numpy.empty", lambda *a, **k: _fill(_np_empty(*a, **k))))
        stack.enter_context(mock.patch("numpy.empty_like", lambda *a, **k: _fill(_np_empty_like(*a, **k))))
        yield

