"""numba compiles each kernel case on its first use (seconds each); no call should wait for it.

Under `backend="auto"`, a call whose numba kernels are not compiled yet in this process
runs torch's own kernel instead, and the kernels are compiled (or loaded from numba's
on-disk cache) in a background thread; later calls take numba once they are ready. Both
give the same results up to fp32 rounding and follow the same running-statistics rule, so
the swap is invisible to a training run. A backend named explicitly (`backend="numba"`) and
a traced call compile at once, as before: the caller asked for those kernels.

The environment variable BATCHNORM_COMPILE chooses: "background" (the default) or
"blocking" (compile at the first call that needs a kernel, the old behaviour, which the test
suite uses so that `auto` is deterministic). `wait()` blocks until every compilation started
so far has finished (for benchmarks that must time the kernels themselves).
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable, Hashable

ENV_VAR = "BATCHNORM_COMPILE"

_ready: set[Hashable] = set()
_running: dict[Hashable, threading.Thread] = {}
_lock = threading.Lock()


def blocking() -> bool:
    """Whether kernels compile at the call that first needs them (BATCHNORM_COMPILE=blocking)."""
    mode = os.environ.get(ENV_VAR, "background")
    if mode not in ("background", "blocking"):
        raise ValueError(f"{ENV_VAR} must be 'background' or 'blocking', got {mode!r}")
    return mode == "blocking"


def ready(key: Hashable, compile: Callable[[], None]) -> bool:
    """Whether the kernels named by `key` are compiled in this process. If not, `compile` (which
    compiles them) starts in a background thread, once per key, and the answer is False until
    it has finished; with BATCHNORM_COMPILE=blocking it runs here and the answer is True."""
    if key in _ready:
        return True
    if blocking():
        compile()
        _ready.add(key)
        return True
    with _lock:
        if key not in _running:
            thread = threading.Thread(target=_compile, args=(key, compile), name=f"batchnorm-compile-{key}", daemon=True)
            _running[key] = thread
            thread.start()
    return False


def _compile(key: Hashable, compile: Callable[[], None]) -> None:
    try:
        compile()
    except Exception as error:  # noqa: BLE001 - a kernel that cannot compile leaves torch's kernel in use
        warnings.warn(f"batchnorm: compiling the numba kernels for {key} failed ({error!r}); torch's kernel "
                      "runs those calls instead", RuntimeWarning, stacklevel=1)  # fmt: skip
        return
    _ready.add(key)


def wait(timeout: float | None = None) -> None:
    """Block until every compilation started so far has finished."""
    for thread in list(_running.values()):
        thread.join(timeout)
