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

What to compile is a `Request`: a function named by its module and name, and the plain
(JSON-able) arguments of its call, which compiles the kernels or loads them from numba's
disk cache. The request is also the key under which they are ready.

Where the background is: numba's compiler is Python code, which holds the interpreter lock
while it runs, and it takes a core from torch's own threads, which slow down far more than
in proportion when one of them waits for a core. So a request runs first in a helper
process (one per process that needs it, started at the first request) at the lowest
scheduling priority (`_LOWEST_PRIORITY`), which writes the machine code to numba's disk
cache; a thread of this process then runs the same request, which only loads it from there.
So the training steps keep torch's speed, and the kernels arrive when the machine has a
core to spare (on a machine kept busy, later; and a later process finds them on disk).
docs/performance.md (the numba backend, "Cases") has the measurements.

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
from typing import NamedTuple

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


class Request(NamedTuple):
    """`module.function(*args)`: compiles kernels in the process that runs it, or loads them
    from numba's disk cache. `args` are plain values (a tuple, so that the request can be a
    key; the helper receives them as JSON)."""

    module: str
    function: str
    args: tuple

    def run(self) -> None:
        getattr(importlib.import_module(self.module), self.function)(*self.args)


_ready: set[Request] = set()
_running: dict[Request, threading.Thread] = {}
_lock = threading.Lock()


def blocking() -> bool:
    """Whether kernels compile at the call that first needs them (BATCHNORM_COMPILE=blocking)."""
    mode = os.environ.get(ENV_VAR, "background")
    if mode not in ("background", "blocking"):
        raise ValueError(f"{ENV_VAR} must be 'background' or 'blocking', got {mode!r}")
    return mode == "blocking"


def ready(request: Request) -> bool:
    """Whether the kernels `request` compiles are compiled in this process. If not, they are
    compiled in the background (the helper process, then a load here), once per request,
    and the answer is False until they are; with BATCHNORM_COMPILE=blocking the request
    runs here and the answer is True."""
    if request in _ready:
        return True
    if blocking():
        request.run()
        _ready.add(request)
        return True
    with _lock:
        if request not in _running:
            thread = threading.Thread(target=_compile, args=(request,), name=f"batchnorm-compile-{request}", daemon=True)
            _running[request] = thread
            thread.start()
    return False


def _compile(request: Request) -> None:
    try:
        _HELPER.run(request)  # then request.run() below loads what it wrote to the disk cache
        request.run()
    except Exception as error:  # noqa: BLE001 - a kernel that cannot compile leaves torch's kernel in use
        warnings.warn(f"batchnorm: compiling the numba kernels for {request} failed ({error!r}); torch's kernel "
                      "runs those calls instead", RuntimeWarning, stacklevel=1)  # fmt: skip
        return
    _ready.add(request)


def wait(timeout: float | None = None) -> None:
    """Block until every compilation started so far has finished."""
    for thread in list(_running.values()):
        thread.join(timeout)


class _Helper:
    """The helper process: one JSON request per line on its stdin, [module, function, args],
    answered by one line on its stdout, "ok" or the error. Requests are served one at a time
    (a lock), in the order the threads ask. A failed helper (it could not start, or died) is
    not retried: the threads' `request.run()` then compiles in this process."""

    def __init__(self) -> None:
        self._process: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def run(self, request: Request) -> None:
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


def _forget_the_parents_threads() -> None:
    """A forked child (a DataLoader worker, say, forked while the first steps' kernels still
    compile) has none of the parent's threads: a compilation running in the parent is not
    running here (left in `_running`, its request would never be ready in the child), and a
    lock one of them held would never be released."""
    global _lock
    _lock = threading.Lock()
    _running.clear()
    _HELPER.forget()


os.register_at_fork(after_in_child=_forget_the_parents_threads)


def _serve() -> None:
    """The helper's loop: compile what each request names until stdin closes (the parent
    exited). Only the answers go to stdout."""
    answers, sys.stdout = sys.stdout, sys.stderr
    for line in sys.stdin:
        module, function, args = json.loads(line)
        try:
            Request(module, function, tuple(args)).run()
            answer = "ok"
        except Exception as error:  # noqa: BLE001 - reported to the parent, which compiles itself
            answer = repr(error).replace("\n", " ")
        try:
            answers.write(answer + "\n")
            answers.flush()
        except BrokenPipeError:  # the parent exited meanwhile; what was compiled is on disk
            return
