"""The backend registry: which implementations of the kernel contract exist, and which runs.

`available()` lists the backends this machine can run. `resolve(name, x)` picks one for an
input: an explicit name (or the environment variable BATCHNORM_BACKEND) forces it, and
when the forced backend cannot take the input it falls back to `aten` (the dispatcher says
so with `reason`); "auto" asks the registered backends in priority order and takes the
first that is available, is meant for the input's device (`Backend.auto_devices`), supports
the input, prefers it and is ready for it, except while torch.export traces: then "auto" is
`aten` (torch's standard ops, so that the program runs without this package and no size
decision pins a dynamic dimension).
"""

from __future__ import annotations

import os
from typing import NamedTuple

from torch import Tensor

from .. import modes
from ..modes import Mode
from .aten import AtenBackend
from .base import Backend
from .numba_cpu import NumbaBackend  # imports without numba; unavailable() then says why
from .reference import ReferenceBackend
from .triton_gpu import TritonBackend  # imports without triton; unavailable() then says why

ENV_VAR = "BATCHNORM_BACKEND"

_REGISTRY: dict[str, Backend] = {}
_PRIORITY: dict[str, int] = {}  # backends auto may choose, lower asked first
# Per device type, the backends auto asks for its inputs, in order: those that run on that
# device and are available on this machine (neither changes while the process runs, so it is
# asked once per device type, not at every call).
_AUTO_ORDER: dict[str, tuple[Backend, ...]] = {}


def register(backend: Backend, *, auto_priority: int | None = None) -> None:
    """Add a backend; `auto_priority` (lower first) lets `auto` consider it."""
    _REGISTRY[backend.name] = backend
    if auto_priority is not None:
        _PRIORITY[backend.name] = auto_priority
    _AUTO_ORDER.clear()


def _auto_order(device_type: str) -> tuple[Backend, ...]:
    """The backends `auto` asks for an input on `device_type`, lower priority first (kept in
    _AUTO_ORDER)."""
    ranked = (_REGISTRY[n] for n in sorted(_PRIORITY, key=_PRIORITY.__getitem__))
    order = _AUTO_ORDER[device_type] = tuple(
        b for b in ranked if (b.auto_devices is None or device_type in b.auto_devices) and b.unavailable() is None
    )
    return order


def get(name: str) -> Backend:
    """The backend called `name`; ValueError listing the known names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown batch-norm backend {name!r}; known: {', '.join(sorted(_REGISTRY))} or 'auto'"
        ) from None


def names() -> list[str]:
    """Every registered backend, available here or not."""
    return sorted(_REGISTRY)


def available() -> list[str]:
    """The registered backends that can run on this machine."""
    return [n for n, b in sorted(_REGISTRY.items()) if b.unavailable() is None]


class Choice(NamedTuple):
    backend: Backend
    reason: str  # why this one: "forced", "auto", or the fallback's cause


def resolve(
    name: str | None, x: Tensor, activation: str | None = None, has_residual: bool = False, mode: Mode | None = None
) -> Choice:
    """The backend that will run `x` for a request of `name` ("auto", a name, or None = env),
    with that activation and residual, in `mode` (functional.batch_norm passes its call's;
    None: asked here): "auto" skips a backend not `ready` for the call yet."""
    mode = modes.current() if mode is None else mode
    requested = name or os.environ.get(ENV_VAR) or "auto"
    fallback = _REGISTRY["aten"]
    if requested != "auto":
        backend = get(requested)
        why_not = backend.unavailable() or backend.unsupported(x)
        if why_not is None:
            return Choice(backend, "forced")
        return Choice(fallback, f"{requested} cannot run this input ({why_not}); fell back to aten")
    if mode.exporting:
        # An exported program is meant to run where this package is not installed, and a
        # choice by size would pin a dynamic batch dimension to one side of a crossover.
        return Choice(fallback, "export: torch's standard ops")
    # (aten takes every device: an order is never empty)
    for backend in _AUTO_ORDER.get(x.device.type) or _auto_order(x.device.type):
        # preferred() first: it is the cheap question, and usually the deciding one
        if (
            backend.preferred(x, mode)
            and backend.unsupported(x) is None
            # traced, the graph's op asks when it runs (ops.py's `_runnable`)
            and (mode.traced or backend.ready(x, activation, has_residual))
        ):
            return Choice(backend, "auto")
    return Choice(fallback, "auto")


def backend_for(spec: str | Backend | None, x: Tensor) -> Backend:
    """The backend that runs x: `spec` itself when the caller has resolved it already (a
    Backend), else `resolve(spec, x)`'s choice."""
    return spec if isinstance(spec, Backend) else resolve(spec, x).backend


register(ReferenceBackend())
register(AtenBackend(), auto_priority=100)
register(NumbaBackend(), auto_priority=10)
register(TritonBackend(), auto_priority=5)

__all__ = ["Backend", "Choice", "ENV_VAR", "available", "get", "names", "register", "resolve"]
