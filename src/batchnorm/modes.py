"""Under what a call runs: eager, or traced/transformed by torch. Asked here, in one place.

The fast kernels read tensor memory directly (numpy views, raw pointers), and the eager
autograd Functions keep Python state: neither can run on the tensors torch passes while it
traces or transforms a function. `Mode.traced` is true for all of those:

- torch.compile and torch.export (Dynamo traces with fake tensors);
- torch.func transforms (grad, vmap, jvp, jacrev, functional_call inside them), whose
  tensors are wrappers without storage.

A traced call takes only ops a graph can hold (ops.py says which), so that every feature
works the same at every input size.

`Mode.recomputing` tells a forward that activation checkpointing (torch.utils.checkpoint, either
mode) runs again during backward, which must not fold its batch into the running statistics
a second time.

`current()` asks all of it at once, as a `Mode`: `functional.batch_norm` asks once per call
and hands the answer down (the backends' choice, the op layer, the running update), so that
no layer below decides it again. `compiling()` and `recomputing()` serve code reached
without a call's Mode (layout.restore, the custom ops' helpers, the tools).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Mode(NamedTuple):
    """How torch runs the current call: traced by torch.compile / torch.export (`compiling`,
    and `exporting` for torch.export), inside a torch.func transform (`transformed`), or
    recomputed by activation checkpointing (`recomputing`, never while traced); `traced`:
    compiling or transformed, so only graph-safe torch ops may run."""

    compiling: bool
    exporting: bool
    transformed: bool
    recomputing: bool
    traced: bool


EAGER = Mode(compiling=False, exporting=False, transformed=False, recomputing=False, traced=False)


def current() -> Mode:
    """The Mode of the call being made now."""
    compiling, transformed = torch.compiler.is_compiling(), torch._C._are_functorch_transforms_active()
    traced = compiling or transformed
    return Mode(
        compiling=compiling,
        exporting=compiling and torch.compiler.is_exporting(),
        transformed=transformed,
        recomputing=not traced and torch._C._current_graph_task_id() != -1,
        traced=traced,
    )


def compiling() -> bool:
    """torch.compile or torch.export is tracing this call."""
    return torch.compiler.is_compiling()


def recomputing() -> bool:
    """An eager forward running inside a backward pass: activation checkpointing recomputing
    it (reentrant or not). Never true while traced (a compiled graph recomputes nothing
    through this package's Python)."""
    return current().recomputing
