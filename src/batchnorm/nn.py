"""Drop-in batch-norm modules: `BatchNorm1d/2d/3d` and their Lazy versions.

Each subclasses the matching `torch.nn.BatchNorm*` (so `isinstance(m, nn.BatchNorm2d)`
holds, and the constructor arguments, parameters, buffers and state_dict keys are
torch's) and adds keyword-only extras:

- `activation=`: None, "relu", "leaky_relu", "sigmoid", "tanh", "silu" or "gelu", applied
  after gamma and beta (fused by the fast backends);
- `forward(x, residual=None)`: residual added before the activation,
  `g(bn(x) + residual)`, the ResNet pattern;
- `backend=`: "auto" (default), or a name from `batchnorm.backends.available()`;
- `virtual_batch_size=k`: ghost batch norm (chunks of k examples in training);
- `renorm=Renorm(...)`: batch renormalization, scheduled by `num_batches_tracked`;
- `forward(x, residual=None, mask=None)`: statistics over the positions where the boolean
  mask (N, *spatial) is True;
- `unbiased_running_var=False`: store the biased variance (Keras/Flax convention);
- a guard that keeps non-finite batch statistics out of the running statistics; skips
  are counted in `nonfinite_skips`.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _LazyNormBase

from . import validation
from . import functional as F
from .stats import NonFiniteGuard
from .variants import Renorm


class _Extras:
    """What our modules add to torch's: the keyword-only extras and the forward that uses them."""

    _ndims: tuple[int, ...] = ()

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
        activation: str | None = None,
        backend: str | None = "auto",
        virtual_batch_size: int | None = None,
        renorm: Renorm | None = None,
        unbiased_running_var: bool = True,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias
        )
        _set_extras(self, activation, backend, virtual_batch_size, renorm, unbiased_running_var)
        self._guard = NonFiniteGuard(type(self).__name__)

    @property
    def nonfinite_skips(self) -> int:
        """How many running-statistic updates were skipped for a non-finite batch statistic."""
        return self._guard.count

    def _check_input_dim(self, input: Tensor) -> None:
        validation.validate_ndim(input, self._ndims, type(self).__name__)

    def forward(self, input: Tensor, residual: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """g(gamma * (x - mu) / sqrt(var + eps) + beta + residual); shapes as torch's module,
        mask (N, *spatial) bool."""
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
            activation=self.activation,
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

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.activation is not None:
            text += f", activation={self.activation!r}"
        if self.backend not in ("auto", None):
            text += f", backend={self.backend!r}"
        if self.virtual_batch_size is not None:
            text += f", virtual_batch_size={self.virtual_batch_size}"
        if self.renorm is not None:
            text += f", renorm={self.renorm}"
        if not self.unbiased_running_var:
            text += ", unbiased_running_var=False"
        return text


def _tensors(module) -> tuple[Tensor | None, ...]:
    """(weight, bias, running_mean, running_var, num_batches_tracked), read from the module's
    parameter and buffer tables: nn.Module.__getattr__ costs ~0.7 us a read, a fifth of what a
    small layer's call costs beyond torch's kernel. A name not in its
    table (a parametrized weight, say) is read the ordinary way."""
    params, buffers = module._parameters, module._buffers
    return (
        params["weight"] if "weight" in params else module.weight,
        params["bias"] if "bias" in params else module.bias,
        buffers["running_mean"] if "running_mean" in buffers else module.running_mean,
        buffers["running_var"] if "running_var" in buffers else module.running_var,
        buffers["num_batches_tracked"] if "num_batches_tracked" in buffers else module.num_batches_tracked,
    )


def _set_extras(module, activation, backend, virtual_batch_size, renorm, unbiased_running_var) -> None:
    """Validate and store the keyword-only extras (shared by the eager and Lazy modules)."""
    if virtual_batch_size is not None and (isinstance(virtual_batch_size, bool) or virtual_batch_size < 2):
        raise ValueError(f"virtual_batch_size must be an int >= 2 or None, got {virtual_batch_size!r}")
    if renorm is not None:
        if not isinstance(renorm, Renorm):
            raise TypeError(f"renorm must be a batchnorm.Renorm, got {type(renorm).__name__}")
        if not module.track_running_stats:
            raise ValueError("batch renormalization needs running statistics: track_running_stats=True")
    module.activation = validation.validate_activation(activation)
    module.backend = backend
    module.virtual_batch_size = virtual_batch_size
    module.renorm = renorm
    module.unbiased_running_var = unbiased_running_var


class BatchNorm1d(_Extras, torch.nn.BatchNorm1d):
    """Batch norm over (N, C) or (N, C, L) input; a drop-in for torch.nn.BatchNorm1d."""

    _ndims = (2, 3)


class BatchNorm2d(_Extras, torch.nn.BatchNorm2d):
    """Batch norm over (N, C, H, W) input; a drop-in for torch.nn.BatchNorm2d."""

    _ndims = (4,)


class BatchNorm3d(_Extras, torch.nn.BatchNorm3d):
    """Batch norm over (N, C, D, H, W) input; a drop-in for torch.nn.BatchNorm3d."""

    _ndims = (5,)


class _Lazy(_LazyNormBase):
    """num_features inferred from the first input's dimension 1, as torch's Lazy modules."""

    def __init__(
        self,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        activation: str | None = None,
        backend: str | None = "auto",
        virtual_batch_size: int | None = None,
        renorm: Renorm | None = None,
        unbiased_running_var: bool = True,
    ) -> None:
        super().__init__(eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        _set_extras(self, activation, backend, virtual_batch_size, renorm, unbiased_running_var)


class LazyBatchNorm1d(_Lazy, BatchNorm1d):
    cls_to_become = BatchNorm1d


class LazyBatchNorm2d(_Lazy, BatchNorm2d):
    cls_to_become = BatchNorm2d


class LazyBatchNorm3d(_Lazy, BatchNorm3d):
    cls_to_become = BatchNorm3d
