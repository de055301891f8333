"""What our batch-norm modules add to torch's, written once for `BatchNorm1d/2d/3d`, their
Lazy versions (nn.py) and `SyncBatchNorm` (distributed.py).

Each module subclasses torch's class and takes torch's constructor arguments, in torch's
order (a model written for `torch.nn.BatchNorm2d` builds ours unchanged), then these
keyword-only extras, the fields of `Extras`:

- `backend=`: "auto" (default), or a name from `batchnorm.backends.available()`;
- `virtual_batch_size=k`: ghost batch norm (chunks of k examples in training);
- `renorm=Renorm(...)`: batch renormalization, scheduled by `num_batches_tracked`;
- `unbiased_running_var=False`: store the biased variance (Keras/Flax convention).

`BatchNormExtras` is the part every one of them mixes in before torch's class: the forward
`forward(x, residual=None, mask=None, *, activation=None)` (statistics over the positions
where the boolean mask (N, *spatial) is True; `g(bn(x) + residual)` with the activation g
named at the call, the fused call `norm_act.BatchNormAct` makes), and a guard that keeps
non-finite batch statistics out of the running statistics, its skips counted in
`nonfinite_skips`.

A module of these classes holds batch norm's state alone: an activation is asked for at
the call, never stored, because helpers written for torch's layers rebuild them from their
attributes and would drop it without a word (`norm_act.py`).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from typing import NoReturn

from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import functional as F
from . import validation
from .stats import NonFiniteGuard
from .variants import Renorm


@dataclass(frozen=True)
class Extras:
    """The keyword-only extras and their defaults; an extra at its default changes nothing."""

    backend: str | None = "auto"
    virtual_batch_size: int | None = None
    renorm: Renorm | None = None
    unbiased_running_var: bool = True


EXTRA_DEFAULTS: dict[str, object] = {f.name: f.default for f in fields(Extras)}


def changed_extras(module: nn.Module) -> dict[str, object]:
    """The extras of `module` that change what it computes: those not at their default,
    except `backend`, which only picks the kernels. Empty for torch's own modules."""
    return {
        name: getattr(module, name, default)
        for name, default in EXTRA_DEFAULTS.items()
        if name != "backend" and getattr(module, name, default) != default
    }


class BatchNormExtras:
    """Our modules' part, mixed in before torch's batch-norm class: the extras and the forward.

    `refused_extras` names the extras a class does not take, with the reason (SyncBatchNorm:
    ghost batches); the constructor raises TypeError with it.
    """

    _ndims: tuple[int, ...] = ()
    refused_extras: dict[str, str] = {}

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        **extras,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self._set_extras(extras)
        self._guard = NonFiniteGuard(type(self).__name__)

    @classmethod
    def accepted_extras(cls) -> tuple[str, ...]:
        """The names of the extras this class takes."""
        return tuple(name for name in EXTRA_DEFAULTS if name not in cls.refused_extras)

    def _set_extras(self, extras: dict[str, object]) -> None:
        """Validate and store the keyword-only extras (shared by the eager and Lazy modules),
        and eps, which every call would refuse: better at construction than at the first batch."""
        validation.validate_scalars(self.momentum, self.eps)
        layer = type(self).__name__
        for name in extras:
            if name in self.refused_extras:
                raise TypeError(f"{layer}() does not take {name}: {self.refused_extras[name]}")
            if name not in EXTRA_DEFAULTS:
                raise TypeError(f"{layer}() got an unexpected keyword argument {name!r}")
        chosen = Extras(**extras)
        k = chosen.virtual_batch_size
        if k is not None and (isinstance(k, bool) or k < 2):
            raise ValueError(f"virtual_batch_size must be an int >= 2 or None, got {k!r}")
        if chosen.renorm is not None:
            if not isinstance(chosen.renorm, Renorm):
                raise TypeError(f"renorm must be a batchnorm.Renorm, got {type(chosen.renorm).__name__}")
            if not self.track_running_stats:
                raise ValueError("batch renormalization needs running statistics: track_running_stats=True")
        self.backend = chosen.backend
        self.virtual_batch_size = chosen.virtual_batch_size
        self.renorm = chosen.renorm
        self.unbiased_running_var = chosen.unbiased_running_var

    @property
    def nonfinite_skips(self) -> int:
        """How many running-statistic updates were skipped for a non-finite batch statistic
        (inside torch.func transforms the update is refused the same way but not counted)."""
        return self._guard.count

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in self._ndims:
            validation.validate_ndim(input, self._ndims, type(self).__name__)

    def forward(
        self, input: Tensor, residual: Tensor | None = None, mask: Tensor | None = None, *, activation: str | None = None
    ) -> Tensor:
        """g(gamma * (x - mu) / sqrt(var + eps) + beta + residual); shapes as torch's module,
        mask (N, *spatial) bool, g the activation named (identity for None)."""
        if isinstance(input, fx.Proxy):
            return _traced_call(self, input, residual, mask, activation)
        validation.validate_input(input, None if self.num_features == 0 else self.num_features)
        self._check_input_dim(input)
        weight, bias, running_mean, running_var, num_batches_tracked = _tensors(self)
        update = self.training and self.track_running_stats
        # torch's rule: batch statistics in training, and in evaluation when there are no
        # running statistics; the buffers are passed only when they are read or updated.
        uses_buffers = not self.training or self.track_running_stats
        return F.batch_norm(
            input,
            running_mean if uses_buffers else None,
            running_var if uses_buffers else None,
            weight,
            bias,
            self.training or running_mean is None,
            self.momentum,
            self.eps,
            activation=activation,
            residual=residual,
            backend=self.backend,
            num_batches_tracked=num_batches_tracked if update else None,
            guard=self._guard,
            mask=mask,
            virtual_batch_size=self.virtual_batch_size,
            renorm=self.renorm,
            unbiased_running_var=self.unbiased_running_var,
            sync=self._synchronizer(),
        )

    def _synchronizer(self):
        """Reductions across processes for this call (SyncBatchNorm's); None: this process only."""
        return None

    def __prepare_scriptable__(self):
        """torch.jit.script asks each module this before compiling it: TorchScript cannot
        compile this forward (the kernels, the extras in Python), so it is refused with what
        works instead, rather than with TorchScript's complaint about the signature."""
        refuse_scripting(
            self, "Script the model after batchnorm.revert(model) (torch's own layers with the same parameters "
            "and buffers; layers using ghost batches, renorm or other extras stay ours), or use torch.compile "
            "or torch.export, which run these layers"
        )  # fmt: skip

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.backend not in ("auto", None):
            text += f", backend={self.backend!r}"
        if self.virtual_batch_size is not None:
            text += f", virtual_batch_size={self.virtual_batch_size}"
        if self.renorm is not None:
            text += f", renorm={self.renorm}"
        if not self.unbiased_running_var:
            text += ", unbiased_running_var=False"
        return text


def refuse_scripting(module: nn.Module, instead: str) -> NoReturn:
    """Raise torch.jit.script's error for one of our modules, saying what works `instead`."""
    raise TypeError(f"torch.jit.script cannot compile batchnorm's {type(module).__name__}. {instead}")


def plain_forward(module: nn.Module) -> bool:
    """Whether `module`'s forward is batch norm alone (torch's layers' and ours), not a
    subclass's that does more with the result (timm's BatchNormAct2d: drop, then act), which
    a tool replacing the layer would silently drop."""
    return type(module).forward in (_BatchNorm.forward, nn.SyncBatchNorm.forward, BatchNormExtras.forward)


def _traced_call(module: nn.Module, input: fx.Proxy, residual, mask, activation) -> fx.Proxy:
    """Under torch.fx symbolic tracing (symbolic_trace, quantization's prepare_fx,
    torchvision's create_feature_extractor): the layer as one call of the module, the node
    fx records for torch's own layers, which it keeps as leaves. Tracing through our forward
    would fail on the Proxy, and would freeze `self.training` and the extras into the graph;
    the module called when the graph runs follows `.train()` / `.eval()` and keeps all of it."""
    tracer = input.tracer
    path = tracer.path_of_module(module)
    if not path:
        raise TypeError(
            f"torch.fx cannot trace a {type(module).__name__} on its own: trace a model that holds it "
            "(its call is then one node of the graph)"
        )
    if _quantization_tracer(tracer):
        warnings.warn(
            f"torch.ao's FX quantization knows torch's own batch-norm classes only: this "
            f"{type(module).__name__} is not fused into the convolution or linear layer before it "
            "and stays a float layer in the quantized model. Call batchnorm.revert(model) before "
            "prepare_fx / prepare_qat_fx (torch's layers holding the same tensors).",
            UserWarning,
            stacklevel=2,
        )
    args = (input,) if residual is None else (input, residual)
    kwargs = {name: value for name, value in (("mask", mask), ("activation", activation)) if value is not None}
    return tracer.create_proxy("call_module", path, args, kwargs)


def _quantization_tracer(tracer: fx.Tracer) -> bool:
    """Whether `tracer` is torch.ao's prepare_fx / prepare_qat_fx tracer, whose fusion and
    quantization patterns match modules by exact class (imported here: only tracing gets here)."""
    try:
        from torch.ao.quantization.fx.tracer import QuantizationTracer
    except ImportError:  # pragma: no cover - a torch without torch.ao's FX quantization
        return False
    return isinstance(tracer, QuantizationTracer)


def _tensors(module) -> tuple[Tensor | None, ...]:
    """(weight, bias, running_mean, running_var, num_batches_tracked), read from the module's
    parameter and buffer tables: they are not instance attributes, so an ordinary read goes
    through nn.Module.__getattr__, a Python call that is a sizable part of what a small
    layer's call costs beyond torch's kernel (docs/performance.md, "Where the numbers stand
    (CPU, 2 cores)", Small layers). A name not in its table (a parametrized weight, say) is
    read the ordinary way."""
    params, buffers = module._parameters, module._buffers
    return (
        params["weight"] if "weight" in params else module.weight,
        params["bias"] if "bias" in params else module.bias,
        buffers["running_mean"] if "running_mean" in buffers else module.running_mean,
        buffers["running_var"] if "running_var" in buffers else module.running_var,
        buffers["num_batches_tracked"] if "num_batches_tracked" in buffers else module.num_batches_tracked,
    )


def spell_out_extras(init, refused: Iterable[str] = ()):
    """`init`, a constructor ending in `**extras`, with a signature (what help() and inspect
    show) that lists the extras it takes, all but `refused`, as keyword-only parameters.
    Returns `init`."""
    signature = inspect.signature(init)
    params = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    params += [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
        for f in fields(Extras)
        if f.name not in refused
    ]
    init.__signature__ = signature.replace(parameters=params)
    return init


spell_out_extras(BatchNormExtras.__init__)


@contextlib.contextmanager
def nonfinite_skips_kept(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Inside, forwards of `modules` (those of ours) leave their `nonfinite_skips` count, and
    its warn-once state, as they were on entry: for a tool's passes over a model, which
    must leave no trace."""
    saved = {m: copy.copy(m._guard) for m in modules if isinstance(m, BatchNormExtras)}
    try:
        yield
    finally:
        for m, guard in saved.items():
            m._guard = guard
