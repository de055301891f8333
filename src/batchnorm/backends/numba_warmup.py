"""numba compiles each kernel case on its first use (seconds each); no call should wait for it.

Under `backend="auto"`, a call whose numba kernels are not compiled yet in this process
runs torch's kernel instead, and the kernels are compiled (or loaded from numba's on-disk
cache) in the background; later calls take numba once they are ready. Both give the same
results up to fp32 rounding and follow the same running-statistics rule, so the swap is
invisible to a training run. A backend named explicitly (`backend="numba"`) compiles at
once in eager calls: the caller asked for those kernels. A compiled graph holds our op
whichever way numba was chosen, and the op asks the same question when it runs: until its
kernels are ready it runs torch's kernels (aten.NativeStandIn), so a compiled model's first
steps wait for Inductor only.

Where the background is: numba's compiler is Python code, which holds the interpreter lock
while it runs, and it takes a core from torch's own threads, which slow down far more than
in proportion when one of them waits for a core. A case that says how to compile it
elsewhere (`ahead`) is compiled instead in a helper process (one per process that needs it,
started at the first such case) at the lowest scheduling priority (`_LOWEST_PRIORITY`), which
writes the machine code to numba's disk cache; this process then only loads it from there.
So the training steps keep torch's speed, and the kernels arrive when the machine has a
core to spare (on a machine kept busy, later; and a later process finds them on disk).
docs/performance.md (the numba backend, "Cases") has the measurements. Anything else
compiles in a thread.

The environment variable BATCHNORM_COMPILE chooses: "background" (the default) or
"blocking" (compile at the first call that needs a kernel, the old behaviour, which the test
suite uses so that `auto` is deterministic). `wait()` blocks until every compilation started
so far has finished (for benchmarks that must time the kernels themselves).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable, Hashable

ENV_VAR = "BATCHNORM_COMPILE"
# The helper process's first statements: the lowest scheduling priority, before it imports
# anything. Under Linux's SCHED_IDLE it runs only on a core nothing else wants, and a waking
# thread of torch's takes the core back at once; niceness 10 (the fallback where there is no
# SCHED_IDLE) still took enough from torch's threads to slow the first training steps
# (docs/performance.md, the numba backend's "Cases", has both). Set by the child itself,
# not by a preexec_fn: that forces a fork of this (large) process, whose pages then copy on
# every write until the child has started.
_LOWEST_PRIORITY = """
import os
try:
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
except (AttributeError, OSError):
    os.nice(10)
"""

_ready: set[Hashable] = set()
_running: dict[Hashable, threading.Thread] = {}
_lock = threading.Lock()


def blocking() -> bool:
    """Whether kernels compile at the call that first needs them (BATCHNORM_COMPILE=blocking)."""
    mode = os.environ.get(ENV_VAR, "background")
    if mode not in ("background", "blocking"):
        raise ValueError(f"{ENV_VAR} must be 'background' or 'blocking', got {mode!r}")
    return mode == "blocking"


def ready(key: Hashable, compile: Callable[[], None], ahead: tuple[str, str, list] | None = None) -> bool:
    """Whether the kernels named by `key` are compiled in this process. If not, they are
    compiled in the background, once per key, and the answer is False until they are; with
    BATCHNORM_COMPILE=blocking `compile` runs here and the answer is True.

    compile: compiles the kernels in this process (or loads them from numba's disk cache).
    ahead: (module, function, JSON-able arguments) whose call compiles the same kernels in
        another process, into the disk cache; None: a thread runs `compile`."""
    if key in _ready:
        return True
    if blocking():
        compile()
        _ready.add(key)
        return True
    with _lock:
        if key not in _running:
            thread = threading.Thread(
                target=_compile, args=(key, compile, ahead), name=f"batchnorm-compile-{key}", daemon=True
            )
            _running[key] = thread
            thread.start()
    return False


def _compile(key: Hashable, compile: Callable[[], None], ahead: tuple[str, str, list] | None) -> None:
    try:
        if ahead is not None:
            _HELPER.run(ahead)  # then `compile` below loads what it wrote to the disk cache
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


class _Helper:
    """The helper process: one JSON request per line on its stdin, (module, function, args),
    answered by one line on its stdout, "ok" or the error. Requests are served one at a time
    (a lock), in the order the threads ask. A failed helper (it could not start, or died) is
    not retried: the threads' `compile` then compiles in this process."""

    def __init__(self) -> None:
        self._process: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def run(self, request: tuple[str, str, list]) -> None:
        with self._lock:
            try:
                process = self._start()
                process.stdin.write(json.dumps(request) + "\n")
                process.stdin.flush()
                answer = process.stdout.readline().strip()
            except OSError as error:
                answer = f"helper process unavailable: {error!r}"
        if answer != "ok":
            warnings.warn(f"batchnorm: the numba compile helper failed ({answer or 'it exited'}); "
                          "compiling in this process", RuntimeWarning, stacklevel=1)  # fmt: skip

    def _start(self) -> subprocess.Popen:
        if self._process is None:
            self._process = subprocess.Popen(
                [sys.executable, "-c", _LOWEST_PRIORITY + f"import {__name__} as helper; helper._serve()"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
        return self._process

    def forget(self) -> None:
        """In a forked child: the parent's helper and lock are the parent's."""
        self._process, self._lock = None, threading.Lock()


_HELPER = _Helper()
os.register_at_fork(after_in_child=_HELPER.forget)


def _serve() -> None:
    """The helper's loop: compile what each request names until stdin closes (the parent
    exited). Only the answers go to stdout."""
    answers, sys.stdout = sys.stdout, sys.stderr
    for line in sys.stdin:
        module, function, args = json.loads(line)
        try:
            getattr(importlib.import_module(module), function)(*args)
            answer = "ok"
        except Exception as error:  # noqa: BLE001 - reported to the parent, which compiles itself
            answer = repr(error).replace("\n", " ")
        try:
            answers.write(answer + "\n")
            answers.flush()
        except BrokenPipeError:  # the parent exited meanwhile; what was compiled is on disk
            return
