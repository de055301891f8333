"""Under what a call runs: eager, or traced/transformed by torch. Asked here, in one place.

The fast kernels read tensor memory directly (numpy views, raw pointers), and the eager
autograd Functions keep Python state: neither can run on the tensors torch passes while it
traces or transforms a function. `Mode.traced` is true for all of those:

- torch.compile and torch.export (Dynamo traces with fake tensors);
- torch.func transforms (grad, vmap, jvp, jacrev, functional_call inside them), whose
  tensors are wrappers without storage, forward-mode AD (`torch.autograd.forward_ad`),
  whose dual tensors need ops with forward derivatives, and torch.jit.trace, which records
  only torch's ops (`Mode.transformed` for all three);
- a Python dispatch mode (FakeTensorMode, which memory estimators and shape propagation run
  a model under; a logging or counting mode), or an input that is a tensor subclass with a
  dispatch of its own (DTensor, a logging tensor): a tensor's memory cannot be read from
  Python there (`.numpy()` refuses), and every op should reach the mode or the subclass.

A traced call takes only ops a graph can hold (ops.py says which), so that every feature
works the same at every input size.

`Mode.recomputing` tells a forward that activation checkpointing (torch.utils.checkpoint, either
mode) runs again during backward, which must not fold its batch into the running statistics
a second time.

`current()` asks all of it at once, as a `Mode`: `functional.batch_norm` asks once per call
and hands the answer down (the backends' choice, the op layer, the running update), so that
no layer below decides it again. `compiling()` and `recomputing()` serve code reached
without a call's Mode (the triton ops' bodies, which torch calls, and the tools).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.autograd import forward_ad


class Mode(NamedTuple):
    """How torch runs the current call: traced by torch.compile / torch.export (`compiling`,
    and `exporting` for torch.export), inside a torch.func transform, a forward-AD level or
    torch.jit.trace (`transformed`: torch's own ops, which carry the transforms' rules and
    which a trace records), or recomputed by activation checkpointing (`recomputing`, never
    while compiled or transformed); `traced`: compiling, transformed or under a Python
    dispatch mode, so only graph-safe torch ops may run; `wrapped`: the tensors are
    torch.func's wrappers or FakeTensorMode's fakes, whose values cannot be kept past the
    call."""

    compiling: bool
    exporting: bool
    transformed: bool
    recomputing: bool
    traced: bool
    wrapped: bool


EAGER = Mode(compiling=False, exporting=False, transformed=False, recomputing=False, traced=False, wrapped=False)
_RECOMPUTING = EAGER._replace(recomputing=True)
_PLAIN_DISPATCH = torch.Tensor.__torch_dispatch__


def current(x: torch.Tensor | None = None) -> Mode:
    """The Mode of the call being made now; `x`, the call's input where there is one."""
    compiling, functorch = torch.compiler.is_compiling(), torch._C._are_functorch_transforms_active()
    transformed = functorch or forward_ad._current_level >= 0 or torch._C._get_tracing_state() is not None
    dispatched = not compiling and (
        torch._C._len_torch_dispatch_stack() > 0
        # x, a tensor subclass that dispatches its ops itself (`__torch_dispatch__`; torch's
        # own tensors and Parameters do not)
        or (x is not None and type(x) is not torch.Tensor and type(x).__torch_dispatch__ is not _PLAIN_DISPATCH)
    )
    # a dispatch mode runs eagerly, and may run during a recompute (selective checkpointing's)
    recomputing = not (compiling or transformed) and torch._C._current_graph_task_id() != -1
    if not (compiling or transformed or dispatched):  # plain eager, nearly every call: no new Mode
        return _RECOMPUTING if recomputing else EAGER
    fake = dispatched and torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None
    return Mode(
        compiling=compiling,
        exporting=compiling and torch.compiler.is_exporting(),
        transformed=transformed,
        recomputing=recomputing,
        traced=True,
        wrapped=functorch or fake,
    )


def compiling() -> bool:
    """torch.compile or torch.export is tracing this call."""
    return torch.compiler.is_compiling()


def recomputing() -> bool:
    """An eager forward running inside a backward pass: activation checkpointing recomputing
    it (reentrant or not). Never true while traced (a compiled graph recomputes nothing
    through this package's Python)."""
    return current().recomputing
