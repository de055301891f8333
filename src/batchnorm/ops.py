"""The op layer: plain batch norm (with the fused activation and residual) as one operation,
in eager mode, under `torch.compile` and `torch.export`, and under torch.func transforms;
and `update_running_stats`, the one running update every path calls.

    batch_norm(x, weight, bias, residual, running_mean, running_var, *, training, eps,
               activation, backend) -> (y, Batch or None)

The op only reads the running statistics (in evaluation); in training it returns the batch's
statistics (`Batch`), which functional.py folds into the running ones with
`update_running_stats` (stats.update_running's rule), once per call, whatever the path.

What runs, by mode and backend (`backends.resolve` picks the backend from x's device, dtype,
size and layout):

- eager, `aten`: torch's own kernel and autograd (`torch.batch_norm`, as torch's module), the
  extras in torch ops; the batch's statistics come back from its kernel.
- eager, a fused backend (numba, triton): `_BatchNormFunction`, an autograd Function over the
  backend's whole-op `forward`/`backward` (base.py). Under no_grad the kernels run without
  the Function.
- compiled or exported in training (`Mode.compiling`): the custom operators
  `batchnorm::batch_norm` and `batchnorm::batch_norm_backward` (torch.library), which call
  the very same backend functions, so Inductor sees one opaque op with a fake (meta)
  implementation and a registered autograd formula; `aten` stays torch's decomposable
  batch norm, which Inductor generates code for. On a CUDA machine the triton backend's
  kernels are traced instead (triton_ops.py: the same functions as `torch.library.triton_op`s,
  whose graphs hold the kernels themselves; `TRITON_OPS` says whether they are registered).
  The running update is an op there too on CPU, `batchnorm::update_running_stats` (one
  numba call per layer; `update_running_stats` says why), elsewhere `update_running`'s
  tensor ops traced into the graph; neither synchronizes with the host. Ghost batches and
  renorm call the same op with their statistics (`stats`), which its `given` argument marks.
- compiled or exported in evaluation, and under torch.func transforms and forward-mode AD
  (`Mode.transformed`: grad, vmap, jvp, dual tensors), at every size: torch's batch norm and
  the extras in standard aten ops, so that Inductor fuses evaluation's one affine pass into
  the ops around it, an exported program runs where this package is not installed, and the
  transforms see ops they know how to differentiate and batch.

A custom op costs more per eager call than an autograd Function, more than a small layer's
whole kernel (docs/performance.md): that is why eager calls do not go through the custom ops.
Both paths run the same kernels; the tests hold them equal.
"""
from __future__ import annotations

import functools
import warnings
from typing import Callable, NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor

from . import backends, layout, modes, variants
from .backends.aten import AtenBackend, NativeStandIn, differentiable_grads, native_batch_norm
from .backends.base import CENTER, N_PARAMS, VAR, Backend
from .channel_params import acc_dtype
from .stats import Stats, momentum_factor, update_running

try:
    from .backends.numba_kernels import fold_running as _fold_running_cpu
except ImportError:  # pragma: no cover - numba is a dependency; the torch rule serves without it
    _fold_running_cpu = None
from .backends import numba_warmup
from .backends.numba_cpu import DTYPE_NAMES


class Batch(NamedTuple):
    """A training batch's statistics, for the running update: each (C,) in the accumulation
    dtype, the mean and the unbiased variance (what torch's kernel gives and PyTorch stores),
    and `count`, the values per channel behind them."""

    mean: Tensor
    unbiased_var: Tensor
    count: int | Tensor


def batch_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    *,
    training: bool,
    eps: float,
    activation: str | None,
    backend: str | Backend | None,
    want_stats: bool = True,
    mode: modes.Mode | None = None,
    stats: Tensor | None = None,
    sums_to_means: Callable[[Tensor], Tensor] | None = None,
    batch_rows: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Batch | None]:
    """y = g(gamma (x - mu) / sqrt(var + eps) + beta + residual), and in training the batch's
    statistics for the caller's running update (None in evaluation, or when not `want_stats`).

    Shapes: x (N, C, *spatial); weight, bias, running_mean, running_var (C,) or None;
    residual like x. Training normalizes with the batch's statistics; evaluation with the
    running statistics, which are only read here. Inputs are checked by the caller
    (functional.py), which also makes the running update (`update_running_stats`). `mode`:
    the caller's `modes.Mode` for this call (None: asked here).

    The statistics step, for the callers that compute it themselves (functional.py's ghost
    batches, batch renormalization and SyncBatchNorm): `stats`, a (2, C)
    tensor (mean, biased variance) that normalizes in training instead of the batch's own,
    still differentiated as the batch's statistics (functions of x); `sums_to_means`, the
    backward's hook between its two passes (backends/base.py), for statistics over more
    than x (SyncBatchNorm's all_reduce; eager only, as a graph's op has no such hook).
    Neither returns statistics: the caller has them.

    `batch_rows`: the (mean, variance) tensors, each (C,) in the accumulation dtype, into
    which torch's kernel writes a training batch's statistics (fresh zeros by default). Under
    torch.func's vmap, tensors written in place must be batched where the input is, so the
    caller makes these like the running statistics it will update: batched exactly when
    those are (a model ensemble's stacked buffers).
    """
    mode = modes.current() if mode is None else mode
    be = backend if isinstance(backend, Backend) else backends.resolve(backend, x, mode=mode).backend
    if mode.traced and stats is not None:
        return _graph_op(be)(x, weight, bias, residual, stats[0], stats[1], eps, activation, training, be.name, True)[0], None
    if mode.traced:
        return _traced(
            x, weight, bias, residual, running_mean, running_var, training, eps, activation, be, want_stats, mode,
            batch_rows,
        )  # fmt: skip
    # whether autograd records this call (else a Function would only cost time)
    differentiated = torch.is_grad_enabled() and (
        x.requires_grad
        or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
        or (residual is not None and residual.requires_grad)
    )
    if stats is not None:
        args = (x, weight, bias, residual, stats[0], stats[1], eps, activation, training, be)
        if differentiated:
            return _BatchNormFunction.apply(*args, True, sums_to_means)[0], None
        return forward_kernels(*args, given=True)[0], None
    plain_evaluation = not training and activation is None and residual is None
    if isinstance(be, AtenBackend) or (plain_evaluation and not be.takes_plain_evaluation(x)):
        return _native(x, weight, bias, residual, running_mean, running_var, training, eps, activation, want_stats)
    args = (x, weight, bias, residual, running_mean, running_var, eps, activation, training, be)
    if differentiated:
        y, params = _BatchNormFunction.apply(*args)
    else:
        y, params = forward_kernels(*args)
    return y, (_from_params(params, x) if training and want_stats else None)


def _traced(
    x, weight, bias, residual, running_mean, running_var, training, eps, activation, be, want_stats, mode, batch_rows
):  # fmt: skip
    """`batch_norm` while torch.compile or torch.export traces it, a torch.func transform or
    forward-mode AD runs it, or a Python dispatch mode sees it (`Mode.traced`): only ops a
    graph can hold. Evaluation in a graph (compiled or exported) is torch's batch norm,
    whatever the backend: Inductor fuses its one affine pass into the ops around it (the
    activation, the residual add, a pooling after it; with freezing, the convolution's
    weights), which an opaque op would prevent."""
    if isinstance(be, AtenBackend) or mode.transformed or (not training and mode.compiling):
        return _native(
            x, weight, bias, residual, running_mean, running_var, training, eps, activation, want_stats, batch_rows
        )  # fmt: skip
    y, params = _graph_op(be)(x, weight, bias, residual, running_mean, running_var, eps, activation, training, be.name)
    return y, (_from_params(params.detach(), x) if training and want_stats else None)


def _graph_op(be: Backend):
    """The forward op a graph holds for backend `be`: triton's traceable ops where they are
    registered (`TRITON_OPS`), else the opaque batchnorm::batch_norm."""
    return torch.ops.batchnorm.triton_batch_norm if be.name == "triton" and TRITON_OPS else torch.ops.batchnorm.batch_norm


def _native(
    x, weight, bias, residual, running_mean, running_var, training, eps, activation, want_stats, batch_rows=None
):  # fmt: skip
    """torch's kernel (backends/aten.py), its batch statistics handed on as they come (written
    into `batch_rows`, (mean, variance) each (C,), where the caller gives them)."""
    y, mean, var = native_batch_norm(
        x, weight, bias, None if training else running_mean, None if training else running_var,
        eps, activation, residual, training, batch_rows, want_stats=want_stats,
    )  # fmt: skip
    return y, (None if mean is None else Batch(mean, var, layout.values_per_channel(x)))


def _from_params(params: Tensor, x: Tensor) -> Batch:
    """The batch's statistics from a fused backend's (6, C) params (the biased variance that
    normalized, made unbiased as torch's kernel gives it; with one value per channel it has
    none, NaN, which the rule refuses)."""
    n = x.numel() // x.shape[1]  # values per channel
    return Batch(params[CENTER], params[VAR] * (n / (n - 1) if n > 1 else float("nan")), n)


def update_running_stats(
    running_mean: Tensor, running_var: Tensor, num_batches_tracked: Tensor | None, mean: Tensor, var: Tensor,
    momentum: float | None, *, mode: modes.Mode | None = None,
) -> bool | Tensor:  # fmt: skip
    """The one running update of every path: `stats.update_running`'s rule folds a batch's
    mean and variance (as the buffers store it: the unbiased one by PyTorch's convention),
    each (C,), into the running statistics in place; returns whether the batch was kept.
    `mode`: the caller's `modes.Mode` (None: asked here).

    Eager, the rule runs at once, and a bool comes back on CPU, a 0-d bool tensor on an
    accelerator (reading it would synchronize): on CPU with fp32/fp64 buffers as one numba
    call on numpy views (numba_kernels.fold_running: the same arithmetic and bits in one
    call, where the tensor ops are a dispatch each), otherwise as the tensor ops. Traced, a
    0-d bool tensor comes back, with no host synchronization: on CPU while torch.compile or
    torch.export traces, the op batchnorm::update_running_stats, which runs this function
    eagerly where the graph runs; otherwise (torch.func's transforms, other devices) the
    tensor ops, traced into the graph."""
    mode = modes.current() if mode is None else mode
    if not mode.traced and _numba_rule_serves(running_mean, running_var, mean, var):
        factor = momentum_factor(momentum, num_batches_tracked)
        accepted = bool(_fold_running_cpu(mean.numpy(), var.numpy(), factor, running_mean.numpy(), running_var.numpy()))
        if accepted and num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        return accepted
    with torch.no_grad():
        mean, var = mean.detach(), var.detach()
        if mode.compiling and running_mean.is_cpu:
            # Inductor would generate a C++ kernel for the rule's tensor ops, the updates of
            # every layer fused into one whose compile outlasts the rest of a small model's
            # forward graph (docs/performance.md, "Compile time"); as an op, the graph calls it.
            return torch.ops.batchnorm.update_running_stats(
                running_mean, running_var, num_batches_tracked, mean, var, momentum
            )  # fmt: skip
        accepted = update_running(running_mean, running_var, mean, var, momentum, num_batches_tracked)
        return bool(accepted) if not mode.traced and accepted.device.type == "cpu" else accepted


def _numba_rule_serves(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor) -> bool:
    """Whether the eager update runs as numba's one call: it reads numpy views, each tensor's
    own memory, so only of CPU, fp32/fp64, contiguous tensors without grad (so nothing for
    autograd to keep out either); and only once the rule is compiled (numba_warmup.py: it
    compiles in the helper process meanwhile, where numba's compiler does not hold the
    interpreter lock from the training loop for a second, and the tensor ops serve)."""
    if _fold_running_cpu is None:
        return False
    for t in (running_mean, running_var, mean, var):
        if not (t.is_cpu and t.dtype in DTYPE_NAMES and t.is_contiguous() and not t.requires_grad):
            return False
    return numba_warmup.ready(_rule_request(mean.dtype, running_mean.dtype))


# The rule as an op of compiled CPU graphs. Declared with torch.library's schema API rather
# than custom_op, whose Python autograd and view-tracking layers run at every call, more than
# twice this op's whole cost (docs/performance.md, "Compile time"): the update has no
# gradient and mutates buffers only. The Library object must live as long as the op.
_LIBRARY = torch.library.Library("batchnorm", "FRAGMENT")
_LIBRARY.define(
    "update_running_stats(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor(c!)? num_batches_tracked, "
    "Tensor mean, Tensor var, float? momentum) -> Tensor"
)


def _update_running_kernel(running_mean, running_var, num_batches_tracked, mean, var, momentum):
    """batchnorm::update_running_stats on CPU: `update_running_stats` run eagerly, the buffers
    updated in place, and whether the batch was kept as a 0-d bool tensor."""
    kept = update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, momentum, mode=modes.EAGER)
    return torch.tensor(kept)


def _update_running_fake(running_mean, running_var, num_batches_tracked, mean, var, momentum):
    return running_mean.new_empty((), dtype=torch.bool)


_LIBRARY.impl("update_running_stats", _update_running_kernel, "CPU")
torch.library.register_fake("batchnorm::update_running_stats", _update_running_fake, lib=_LIBRARY)


@functools.cache
def _rule_request(stats_dtype: torch.dtype, running_dtype: torch.dtype) -> numba_warmup.Request:
    """numba_warmup's request that compiles the rule for these dtypes (built once per pair:
    the running update asks it at every call)."""
    return numba_warmup.Request(__name__, "compile_rule", (DTYPE_NAMES[stats_dtype], DTYPE_NAMES[running_dtype]))


def compile_rule(stats_dtype: str, running_dtype: str) -> None:
    """Compile the rule's numba form (numba_kernels.fold_running) for these dtypes
    ("float32" or "float64"), or load it from numba's disk cache."""
    a, b = (np.dtype(name) for name in (stats_dtype, running_dtype))
    _fold_running_cpu(np.zeros(1, a), np.ones(1, a), 0.1, np.zeros(1, b), np.ones(1, b))


# The kernels, as both paths call them -----------------------------------------------------
def forward_kernels(
    x, weight, bias, residual, running_mean, running_var, eps, activation, training, backend, given=False, traced=False
):  # fmt: skip
    """The Backend `backend`'s whole-op forward on x's canonical view: (y like x, params (6, C)).
    `given`: running_mean and running_var are the statistics step's (mean, variance), which
    normalize in place of the batch's own (the backend's evaluation form); `traced`: torch
    traces the caller (layout.restore)."""
    view = layout.canonical(x)
    res = None if residual is None else layout.canonical(residual, view.kind).data
    batch_stats = training and not given
    y, params = backend.forward(view.data, weight, bias, res, running_mean, running_var, eps, activation, batch_stats)
    return layout.restore(y, x, view.kind, traced), params


def backward_kernels(
    dy, x, weight, bias, residual, params, training, activation, backend, needs, sums_to_means=None, traced=False
):  # fmt: skip
    """The Backend `backend`'s whole-op backward: (dx, dweight, dbias, dresidual), None where
    not needed; `traced` as in forward_kernels."""
    view = layout.canonical(x)
    kind = view.kind
    res = None if residual is None else layout.canonical(residual, kind).data
    dx, dw, db, dres = backend.backward(
        layout.canonical(dy, kind).data, view.data, res, params, training, activation, needs,
        None if weight is None else weight.dtype, None if bias is None else bias.dtype, sums_to_means,
    )  # fmt: skip
    dx = None if dx is None else layout.restore(dx, x, kind, traced)
    dres = None if dres is None else layout.restore(dres, residual, kind, traced)
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
    """The eager autograd node of every path: (y, params) from `forward_kernels`, with the
    statistics step's `given` statistics and `sums_to_means` hook (`batch_norm`'s `stats`
    and `sums_to_means`) where the caller has one."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, running_mean, running_var, eps, activation, training, backend,
                given=False, sums_to_means=None):  # fmt: skip
        y, params = forward_kernels(
            x, weight, bias, residual, running_mean, running_var, eps, activation, training, backend, given
        )  # fmt: skip
        _save(ctx, x, weight, bias, residual, running_mean, running_var, params, eps, activation, training, backend)
        ctx.sums_to_means = sums_to_means
        ctx.mark_non_differentiable(params)
        return y, params

    @staticmethod
    def backward(ctx, dy, _dparams):
        if ctx.sums_to_means is not None and torch.is_grad_enabled():
            raise RuntimeError(
                "double backward (create_graph=True) through SyncBatchNorm is not supported: the "
                "statistics depend on every process's input; use torch.nn.SyncBatchNorm's eval mode "
                "or a per-process BatchNorm for a gradient penalty"
            )
        grads = _gradients(ctx, dy, functools.partial(backward_kernels, sums_to_means=ctx.sums_to_means))
        return (*grads, *([None] * 8))


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
    given: bool = False,
) -> tuple[Tensor, Tensor]:
    """(y, params): the backend's whole-op forward; the running statistics are only read
    (in evaluation): the update is traced apart, so that this op is functional. `backend`:
    a name, as a schema holds it; `given`: running_mean and running_var are the statistics
    step's (`batch_norm`'s `stats`), as in forward_kernels."""
    be = _runnable(backend, x, activation, residual)
    return forward_kernels(x, weight, bias, residual, running_mean, running_var, eps, activation, training, be, given)


_STAND_IN = NativeStandIn()


def _runnable(name: str, x: Tensor, activation: str | None, residual: Tensor | None) -> Backend:
    """The backend a graph's op names, or torch's own kernels (aten.NativeStandIn) while that
    backend's kernels for this call are not compiled yet (numba_warmup.py: they compile in
    the background meanwhile, or here with BATCHNORM_COMPILE=blocking). The whole op's
    (6, C) parameters mean the same for every backend, so a backward may run kernels that
    became ready on the parameters of a forward that ran the stand-in. The stand-in also
    takes an activation the backend does not fuse (functional.py never hands one over; the
    op called directly may)."""
    be = backends.get(name)
    if activation not in be.fused_activations:
        return _STAND_IN
    return be if be.ready(x, activation, residual is not None) else _STAND_IN


@_batch_norm_op.register_fake
def _batch_norm_fake(x, weight, bias, residual, running_mean, running_var, eps, activation, training, backend, given=False):
    # run as plain Python while a graph holding the op is built (Dynamo's own tracing of this
    # package's code cannot start a compilation without a graph break)
    backends.get(backend).prepare(x, activation, residual is not None)
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
    be = _runnable(backend, x, activation, residual)
    grads = backward_kernels(dy, x, weight, bias, residual, params, training, activation, be, needs)
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
    x, weight, bias, residual, running_mean, running_var, eps, activation, training, backend = inputs[:10]
    _save(ctx, x, weight, bias, residual, running_mean, running_var, output[1], eps, activation, training, backend)


def backward_formula(backward_op):
    """The autograd formula of a forward op whose backward is `backward_op` (an op with
    batchnorm::batch_norm_backward's schema): the four input gradients, None for the rest."""

    def kernels(dy, x, weight, bias, residual, params, training, activation, backend, needs):
        grads = backward_op(dy, x, weight, bias, residual, params, training, activation, backend, list(needs))
        return tuple(g if need else None for g, need in zip(grads, needs))

    def backward(ctx, dy, _dparams):
        return (*_gradients(ctx, dy, kernels), None, None, None, None, None, None, None)

    return backward


_batch_norm_op.register_autograd(
    backward_formula(torch.ops.batchnorm.batch_norm_backward), setup_context=setup_context
)


# Batch renormalization's correction, for compiled graphs ---------------------------------
def renorm_correction(
    batch: Stats, running_mean, running_var, eps, r_max, d_max, compiling: bool
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """variants.renorm_correction's (r, d), each (C,); while a graph is compiled (`compiling`:
    the call's Mode says so), as the opaque op `batchnorm::renorm_correction`. Why an op:
    (r, d) read the running statistics, which the same forward then updates in place; as
    plain tensor ops, AOTAutograd's partitioner may recompute them in the backward from the
    buffers, already updated, and the gradients come out wrong. An opaque op's outputs are
    saved for the backward, never recomputed."""
    if not compiling:
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
