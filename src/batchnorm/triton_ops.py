"""The triton backend's whole op as `torch.library.triton_op`s, which compiled graphs on CUDA
call for the triton backend:

    batchnorm::triton_batch_norm           -> (y, params)                      like batchnorm::batch_norm
    batchnorm::triton_batch_norm_backward  -> (dx, dweight, dbias, dresidual)  like batchnorm::batch_norm_backward

They take the opaque ops' arguments (ops.py; `backend` is "triton") and run the same backend
functions with the same autograd formula, but torch traces their bodies: every launch goes
through `torch.library.wrap_triton` (`triton_gpu.traceable_launches`), so a compiled graph
holds the Triton kernels themselves instead of an opaque call. Inductor launches them from
its generated code without a custom-op dispatch per call and plans the buffers around them,
and AOTInductor can compile them into its artifact. In eager mode a triton_op runs its body
directly (torch turns wrap_triton off there).

ops.py imports this module where CUDA and triton are both present and Triton is not
interpreting (importing triton is slow, and a CPU run has no use for it: docs/performance.md,
"Costs around the kernels"). Triton's CPU interpreter cannot be traced:
wrap_triton hands back the interpreted function, which would run on the tracer's fake tensors;
there the compiled triton path stays the opaque op.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import backends, modes
from .backends.triton_gpu import traceable_launches
from .ops import backward_formula, backward_kernels, forward_kernels, setup_context

_TRITON = backends.get("triton")


# The two signatures are batchnorm::batch_norm's and batchnorm::batch_norm_backward's (both ops
# share one autograd formula), written out: torch 2.13's triton_op infers the schema from the
# annotations and ignores a `schema=` string.
@torch.library.triton_op("batchnorm::triton_batch_norm", mutates_args=())
def triton_batch_norm(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    residual: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    eps: float,
    activation: Optional[str],
    training: bool,
    backend: str,
    given: bool = False,
) -> tuple[Tensor, Tensor]:
    """(y, params): the triton backend's whole-op forward; the running statistics are only
    read (in evaluation), as in batchnorm::batch_norm. Its body is also its fake implementation,
    which torch traces while it compiles a graph holding the op."""
    with traceable_launches():
        return forward_kernels(
            x, weight, bias, residual, running_mean, running_var, eps, activation, training, _TRITON, given,
            traced=modes.compiling(),
        )  # fmt: skip


@torch.library.triton_op("batchnorm::triton_batch_norm_backward", mutates_args=())
def triton_batch_norm_backward(
    dy: Tensor,
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    residual: Optional[Tensor],
    params: Tensor,
    training: bool,
    activation: Optional[str],
    backend: str,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias, dresidual): the triton backend's whole-op backward; a gradient that
    `needs` does not ask for is an empty tensor. The triton backend allocates every gradient
    (none aliases an input, as an op's outputs must not)."""
    with traceable_launches():
        grads = backward_kernels(
            dy, x, weight, bias, residual, params, training, activation, _TRITON, needs, traced=modes.compiling()
        )  # fmt: skip
    return tuple(x.new_empty(0) if g is None else g for g in grads)


triton_batch_norm.register_autograd(
    backward_formula(torch.ops.batchnorm.triton_batch_norm_backward), setup_context=setup_context
)
