"""The op layer: plain batch norm (with the fused activation and residual) as one operation,
in eager mode, under `torch.compile` and under `torch.export`, and the one place where a
training call folds its batch into the running statistics.

    batch_norm(x, weight, bias, residual, running_mean, running_var, num_batches_tracked,
               training, momentum, eps, activation, backend, unbiased) -> (y, accepted)

What runs, by mode and backend (`backends.resolve` picks the backend from x's device, dtype,
size and layout):

- eager, `aten`: torch's own kernel and autograd (`torch.batch_norm`, as torch's module), the extras in
  torch ops; the batch's statistics come back from it and are folded in by the rule.
- eager, a fused backend (numba, triton): `_BatchNormFunction`, an autograd Function over the
  backend's whole-op `forward`/`backward` (base.py); a backend that `folds_running` (numba)
  folds the batch in inside its kernel. Under no_grad the kernels run without the Function.
- compiled or exported (`modes.compiling()`): the custom operators
  `batchnorm::batch_norm` and `batchnorm::batch_norm_backward` (torch.library), which call
  the very same backend functions, so Inductor sees one opaque op with a fake (meta)
  implementation and a registered autograd formula; `aten` stays torch's decomposable
  batch norm, which Inductor generates code for. On a CUDA machine the triton backend's
  kernels are traced instead (triton_ops.py: the same functions as `torch.library.triton_op`s,
  whose graphs hold the kernels themselves; `TRITON_OPS` says whether they are registered).
  The running update is `update_running`'s tensor ops there, traced into the graph, with no
  host synchronization.
- exported in evaluation, and under torch.func transforms (`modes.transformed()`: grad,
  vmap, jvp), at every size: torch's batch norm and the extras in standard aten ops, so an
  exported program runs where this package is not installed and the transforms see ops
  they know how to differentiate and batch.

The rule of the running update is `stats.update_running` (the numba kernels and
`numba_kernels.fold_running` apply the same per-channel `stats.blend` and the same test); it
returns whether the update was kept, which the caller counts.

A custom op costs ~35 us per eager call where an autograd Function costs ~8 us, more than a
small layer's whole kernel: that is why eager calls do not go through the custom ops. Both
paths run the same kernels and the same rule; the tests hold them equal.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor

from . import backends, layout, modes, variants
from .backends.aten import AtenBackend, differentiable_grads, native_batch_norm
from .backends.base import CENTER, N_PARAMS, VAR, Backend
from .channel_params import acc_dtype
from .stats import Stats, momentum_factor, update_running

try:
    from .backends.numba_kernels import fold_running as _fold_running_cpu
except ImportError:  # pragma: no cover - numba is a dependency; the torch rule serves without it
    _fold_running_cpu = None
from .backends import numba_warmup


class Fold(NamedTuple):
    """What a backend that `folds_running` needs to update the running statistics itself:
    the two buffers (C,), the weight of the new batch, and whether the stored variance is
    unbiased (m2 / (n - 1), PyTorch's) or biased (m2 / n, Keras' and Flax's)."""

    running_mean: Tensor
    running_var: Tensor
    factor: float
    unbiased: bool


def batch_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    training: bool,
    momentum: float | None,
    eps: float,
    activation: str | None,
    backend: str | Backend | None,
    unbiased: bool = True,
) -> tuple[Tensor, bool | Tensor | None]:
    """y = g(gamma (x - mu) / sqrt(var + eps) + beta + residual) and whether the running
    update was kept (None when there was none to make).

    Shapes: x (N, C, *spatial); weight, bias, running_mean, running_var (C,) or None;
    residual like x. Training normalizes with the batch's statistics and, when both running
    buffers are given, folds the batch into them (weight `momentum`; None: the cumulative
    average over num_batches_tracked, which counts kept updates). Evaluation normalizes with
    the running statistics. Inputs are checked by the caller (functional.py).
    """
    be = backends.backend_for(backend, x)
    updating = training and running_mean is not None and running_var is not None
    if modes.traced():
        return _traced(x, weight, bias, residual, running_mean, running_var, num_batches_tracked,
                       training, momentum, eps, activation, be, unbiased, updating)  # fmt: skip
    plain_evaluation = not training and activation is None and residual is None
    if isinstance(be, AtenBackend) or (plain_evaluation and not be.takes_plain_evaluation(x)):
        scratch, arrays = _batch_scratch(x, running_mean, running_var) if updating else (None, None)
        y, mean, var = native_batch_norm(
            x, weight, bias, None if training else running_mean, None if training else running_var,
            eps, activation, residual, training, scratch,
        )  # fmt: skip
        if not updating:
            return y, None
        if arrays is not None:  # the rule in one numba call on the scratch's own memory
            if not unbiased:
                arrays[1] *= _bias_correction(x)
            return y, _fold_cpu(running_mean, running_var, num_batches_tracked, *arrays, momentum)
        stored = var if unbiased else var * _bias_correction(x)
        return y, update_running(running_mean, running_var, mean, stored, momentum, num_batches_tracked)
    fold = None
    if updating and be.folds_running:
        fold = Fold(running_mean, running_var, momentum_factor(momentum, num_batches_tracked), unbiased)
    args = (x, weight, bias, residual, running_mean, running_var, eps, activation, training, be.name, fold)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, residual)):
        y, params, accepted = _BatchNormFunction.apply(*args)
    else:  # nothing to differentiate: a Function would only cost time
        y, params, accepted = forward_kernels(*args)
    if fold is not None:
        if accepted and num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        return y, accepted
    if not updating:
        return y, None
    with torch.no_grad():
        return y, _commit(running_mean, running_var, num_batches_tracked, params[CENTER],
                          _stored_var(params[VAR], x, unbiased), momentum)  # fmt: skip


def _traced(x, weight, bias, residual, running_mean, running_var, num_batches_tracked,
            training, momentum, eps, activation, be, unbiased, updating):  # fmt: skip
    """`batch_norm` while torch.compile or torch.export traces it: only ops a graph can hold."""
    if isinstance(be, AtenBackend) or modes.transformed() or (not training and modes.exporting()):
        y, mean, var = native_batch_norm(
            x, weight, bias, None if training else running_mean, None if training else running_var,
            eps, activation, residual, training, want_stats=updating,
        )  # fmt: skip
        stored = None if not updating else (var if unbiased else var * _bias_correction(x))
    else:
        traced_triton = be.name == "triton" and TRITON_OPS
        op = torch.ops.batchnorm.triton_batch_norm if traced_triton else torch.ops.batchnorm.batch_norm
        y, params = op(x, weight, bias, residual, running_mean, running_var, eps, activation, training, be.name)
        mean, stored = params[CENTER], (_stored_var(params[VAR], x, unbiased) if updating else None)
    if not updating:
        return y, None
    with torch.no_grad():
        return y, update_running(running_mean, running_var, mean.detach(), stored.detach(), momentum, num_batches_tracked)


def _bias_correction(x: Tensor) -> float:
    """(n - 1) / n: turns the unbiased variance of x's batch into the biased one."""
    n = layout.values_per_channel(x)
    return (n - 1) / n


def _stored_var(var: Tensor, x: Tensor, unbiased: bool) -> Tensor:
    """The batch's biased variance as the running statistics store it."""
    if not unbiased:
        return var
    n = layout.values_per_channel(x)
    return var * (n / (n - 1))


def _commit(running_mean, running_var, num_batches_tracked, mean, var, momentum) -> bool | Tensor:
    """The rule (`update_running`) in eager mode: for fp32/fp64 buffers on the CPU one numba
    call on numpy views (a few microseconds where the tensor ops cost tens), else tensor ops."""
    if _numpy_viewable(running_mean, running_var, mean, var) and _numba_rule_ready(mean.dtype, running_mean):
        return _fold_cpu(running_mean, running_var, num_batches_tracked, mean.numpy(), var.numpy(), momentum)
    return update_running(running_mean, running_var, mean, var, momentum, num_batches_tracked)


def _fold_cpu(running_mean, running_var, num_batches_tracked, mean, var, momentum) -> bool:
    """The rule by numba on the batch's (mean, stored var) as numpy arrays (C,)."""
    factor = momentum_factor(momentum, num_batches_tracked)
    accepted = bool(_fold_running_cpu(mean, var, factor, running_mean.numpy(), running_var.numpy()))
    if accepted and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    return accepted


def _numpy_viewable(*tensors: Tensor) -> bool:
    """Whether each tensor's numpy view is its own memory: CPU, fp32/fp64, contiguous, no grad."""
    return all(
        t.is_cpu and t.dtype in (torch.float32, torch.float64) and t.is_contiguous() and not t.requires_grad
        for t in tensors
    )


def _numba_rule_ready(stats_dtype: torch.dtype, running: Tensor) -> bool:
    """Whether the rule's numba form is compiled for these dtypes (numba_warmup.py: it compiles
    in the background meanwhile, and the tensor ops of update_running serve)."""
    if _fold_running_cpu is None:
        return False
    key = ("fold_running", stats_dtype, running.dtype)

    def compile_rule():
        a, b = (np.float64 if t == torch.float64 else np.float32 for t in (stats_dtype, running.dtype))
        _fold_running_cpu(np.zeros(1, a), np.ones(1, a), 0.1, np.zeros(1, b), np.ones(1, b))

    return numba_warmup.ready(key, compile_rule)


def _batch_scratch(x: Tensor, running_mean: Tensor, running_var: Tensor) -> tuple[Tensor | None, np.ndarray | None]:
    """The (2, C) rows torch's kernel writes the batch's (mean, unbiased var) into. When the
    rule can run in numba (CPU, numpy-viewable buffers) they are allocated by numpy and
    shared with torch, so that the fold reads them without a conversion (a fresh tensor's
    `.numpy()` costs microseconds, as much as the fold itself); (None, None) otherwise, and
    native_batch_norm allocates them."""
    if not (x.is_cpu and _numpy_viewable(running_mean, running_var)):
        return None, None
    if not _numba_rule_ready(acc_dtype(x.dtype), running_mean):
        return None, None
    arrays = np.zeros((2, x.shape[1]), dtype=np.float64 if x.dtype == torch.float64 else np.float32)
    return torch.from_numpy(arrays), arrays


# The kernels, as both paths call them -----------------------------------------------------
def forward_kernels(x, weight, bias, residual, running_mean, running_var, eps, activation, training, backend, fold=None):
    """The backend's whole-op forward on x's canonical view: (y like x, params (6, C), accepted)."""
    view = layout.canonical(x)
    res = None if residual is None else layout.canonical(residual, view.kind).data
    y, params, accepted = backends.get(backend).forward(
        view.data, weight, bias, res, running_mean, running_var, eps, activation, training, fold
    )
    return layout.restore(y, x, view.kind), params, accepted


def backward_kernels(dy, x, weight, bias, residual, params, training, activation, backend, needs):
    """The backend's whole-op backward: (dx, dweight, dbias, dresidual), None where not needed."""
    view = layout.canonical(x)
    kind = view.kind
    res = None if residual is None else layout.canonical(residual, kind).data
    dx, dw, db, dres = backends.get(backend).backward(
        layout.canonical(dy, kind).data, view.data, res, params, training, activation, needs,
        None if weight is None else weight.dtype, None if bias is None else bias.dtype,
    )  # fmt: skip
    dx = None if dx is None else layout.restore(dx, x, kind)
    dres = None if dres is None else layout.restore(dres, residual, kind)
    return dx, dw, db, dres


def _save(ctx, x, weight, bias, residual, running_mean, running_var, params, eps, activation, training, backend):
    """What the backward of either path keeps. Evaluation's double backward needs the running
    statistics; training's must not see them (they were just updated)."""
    running = (None, None) if training else (running_mean, running_var)
    ctx.save_for_backward(x, weight, bias, residual, *running, params)
    ctx.eps, ctx.activation, ctx.training, ctx.backend = eps, activation, training, backend


def _gradients(ctx, dy, kernels):
    """The four input gradients of either path; `kernels` runs the backend's backward."""
    x, weight, bias, residual, running_mean, running_var, params = ctx.saved_tensors
    needs = tuple(ctx.needs_input_grad[:4])
    if torch.is_grad_enabled():  # create_graph=True: differentiable ops for double backward
        return differentiable_grads(
            needs, dy, x, weight, bias, residual, running_mean, running_var, ctx.eps, ctx.activation
        )
    return kernels(dy, x, weight, bias, residual, params, ctx.training, ctx.activation, ctx.backend, needs)


class _BatchNormFunction(torch.autograd.Function):
    """The eager path's autograd node: (y, params, accepted) from `forward_kernels`."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, running_mean, running_var, eps, activation, training, backend, fold):
        y, params, accepted = forward_kernels(
            x, weight, bias, residual, running_mean, running_var, eps, activation, training, backend, fold
        )
        _save(ctx, x, weight, bias, residual, running_mean, running_var, params, eps, activation, training, backend)
        ctx.mark_non_differentiable(params)
        return y, params, accepted

    @staticmethod
    def backward(ctx, dy, _dparams, _daccepted):
        grads = _gradients(ctx, dy, backward_kernels)
        return (*grads, None, None, None, None, None, None, None)


# The custom operators ------------------------------------------------------------------
# Both ops take x and the residual in either memory format (layout.canonical) and give
# outputs in x's (layout.empty_output says which): `flexible_layout` lets Inductor hand over
# its convolutions' channels-last outputs as they are. Without the tag it restores the
# traced (contiguous) strides, a transposing copy of every activation on the way in and
# out of every layer, forward and backward.
_LAYOUT = (torch.Tag.flexible_layout,)


@torch.library.custom_op("batchnorm::batch_norm", mutates_args=(), tags=_LAYOUT)
def _batch_norm_op(
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
) -> tuple[Tensor, Tensor]:
    """(y, params): the backend's whole-op forward; the running statistics are only read
    (in evaluation): the update is traced apart, so that this op is functional."""
    y, params, _ = forward_kernels(x, weight, bias, residual, running_mean, running_var, eps, activation, training, backend)
    return y, params


@_batch_norm_op.register_fake
def _batch_norm_fake(x, weight, bias, residual, running_mean, running_var, eps, activation, training, backend):
    return layout.empty_output(x), x.new_empty((N_PARAMS, x.shape[1]), dtype=acc_dtype(x.dtype))


@torch.library.custom_op("batchnorm::batch_norm_backward", mutates_args=(), tags=_LAYOUT)
def _batch_norm_backward_op(
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
    """(dx, dweight, dbias, dresidual): the backend's whole-op backward; a gradient that
    `needs` does not ask for is an empty tensor (an op returns tensors, never None)."""
    grads = backward_kernels(dy, x, weight, bias, residual, params, training, activation, backend, needs)
    inputs = (dy, x, weight, bias, residual, params)
    return tuple(_own(g, inputs) if g is not None else x.new_empty(0) for g in grads)


@_batch_norm_backward_op.register_fake
def _batch_norm_backward_fake(dy, x, weight, bias, residual, params, training, activation, backend, needs):
    # dx and dresidual both come back in x's memory format (the residual is read in x's)
    like = (layout.empty_output(x), torch.empty_like(weight) if needs[1] else None,
            torch.empty_like(bias) if needs[2] else None, layout.empty_output(x))  # fmt: skip
    return tuple(t if need else x.new_empty(0) for t, need in zip(like, needs))


def _own(t: Tensor, inputs) -> Tensor:
    """t, or a copy of it when it shares memory with an input (a custom op's outputs may not
    alias its inputs; a backend may hand dy back as dresidual for identity activations)."""
    ptr = t.untyped_storage().data_ptr()
    if any(i is not None and i.numel() and i.untyped_storage().data_ptr() == ptr for i in inputs):
        return t.clone()
    return t


def setup_context(ctx, inputs, output):
    """The autograd context of a forward op (this module's or triton_ops.py's)."""
    x, weight, bias, residual, running_mean, running_var, eps, activation, training, backend = inputs
    _save(ctx, x, weight, bias, residual, running_mean, running_var, output[1], eps, activation, training, backend)


def backward_formula(backward_op):
    """The autograd formula of a forward op whose backward is `backward_op` (an op with
    batchnorm::batch_norm_backward's schema): the four input gradients, None for the rest."""

    def kernels(dy, x, weight, bias, residual, params, training, activation, backend, needs):
        grads = backward_op(dy, x, weight, bias, residual, params, training, activation, backend, list(needs))
        return tuple(g if need else None for g, need in zip(grads, needs))

    def backward(ctx, dy, _dparams):
        return (*_gradients(ctx, dy, kernels), None, None, None, None, None, None)

    return backward


_batch_norm_op.register_autograd(
    backward_formula(torch.ops.batchnorm.batch_norm_backward), setup_context=setup_context
)


# Batch renormalization's correction, for compiled graphs ---------------------------------
def renorm_correction(batch: Stats, running_mean, running_var, eps, r_max, d_max) -> tuple[Tensor, Tensor]:
    """variants.renorm_correction's (r, d), each (C,); while a graph is traced, as the opaque
    op `batchnorm::renorm_correction`. Why an op: (r, d) read the running statistics, which
    the same forward then updates in place; as plain tensor ops, AOTAutograd's partitioner
    may recompute them in the backward from the buffers, already updated, and the gradients
    come out wrong. An opaque op's outputs are saved for the backward, never recomputed."""
    if not modes.compiling():
        return variants.renorm_correction(batch, running_mean, running_var, eps, r_max, d_max)
    acc = batch.mean.dtype
    limits = [torch.as_tensor(v, dtype=acc, device=batch.mean.device) for v in (r_max, d_max)]
    return torch.ops.batchnorm.renorm_correction(batch.mean, batch.var, running_mean, running_var, eps, *limits)


@torch.library.custom_op("batchnorm::renorm_correction", mutates_args=())
def _renorm_correction_op(
    mean: Tensor, var: Tensor, running_mean: Tensor, running_var: Tensor, eps: float, r_max: Tensor, d_max: Tensor
) -> tuple[Tensor, Tensor]:
    """(r, d) from the batch's mean and biased variance and the running statistics, all (C,)."""
    batch = Stats(torch.ones_like(mean), mean, var)  # var = m2 / count with count 1
    return variants.renorm_correction(batch, running_mean, running_var, eps, r_max, d_max)  # new tensors: clamp's


@_renorm_correction_op.register_fake
def _renorm_correction_fake(mean, var, running_mean, running_var, eps, r_max, d_max):
    return torch.empty_like(mean), torch.empty_like(mean)


# The triton backend's traceable ops ------------------------------------------------------
def _triton_ops_wanted() -> bool:
    """Whether compiled graphs can run triton's kernels traced (triton_ops.py): a CUDA device,
    triton installed, and Triton not interpreting (an interpreted kernel cannot be traced)."""
    from .backends import triton_gpu

    if not torch.cuda.is_available() or triton_gpu.interpreting():
        return False
    return triton_gpu.TritonBackend().unavailable() is None


def _register_triton_ops() -> bool:
    """Import triton_ops.py (which registers the ops; it imports this module, so it comes last)
    where `_triton_ops_wanted`. A torch or triton that refuses them costs speed, not the
    package: compiled graphs keep the opaque op, and a warning says why."""
    if not _triton_ops_wanted():
        return False
    try:
        from . import triton_ops  # noqa: F401
    except Exception as error:  # noqa: BLE001 - any failure to register leaves the opaque op working
        warnings.warn(f"batchnorm: the triton backend's traceable ops are not registered ({error!r}); "
                      "compiled graphs call its kernels through the opaque batchnorm::batch_norm", stacklevel=2)  # fmt: skip
        return False
    return True


TRITON_OPS = _register_triton_ops()
