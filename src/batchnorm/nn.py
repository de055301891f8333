"""Drop-in batch-norm modules: `BatchNorm1d/2d/3d` and their Lazy versions.

Each subclasses the matching `torch.nn.BatchNorm*` (so `isinstance(m, nn.BatchNorm2d)`
holds, and the constructor arguments, parameters, buffers and state_dict keys are
torch's) and adds what `extras.py` defines: keyword-only extras (`backend=`,
`virtual_batch_size=`, `renorm=`, `unbiased_running_var=`), a forward with `residual=`,
`mask=` and `activation=`, and the non-finite guard (`nonfinite_skips`). A layer with
its activation is a `BatchNormAct` around one of these (`norm_act.py`).
"""

from __future__ import annotations

import torch
from torch.nn.modules.batchnorm import _LazyNormBase

from .extras import BatchNormExtras, spell_out_extras


class BatchNorm1d(BatchNormExtras, torch.nn.BatchNorm1d):
    """Batch norm over (N, C) or (N, C, L) input; a drop-in for torch.nn.BatchNorm1d."""

    _ndims = (2, 3)


class BatchNorm2d(BatchNormExtras, torch.nn.BatchNorm2d):
    """Batch norm over (N, C, H, W) input; a drop-in for torch.nn.BatchNorm2d."""

    _ndims = (4,)


class BatchNorm3d(BatchNormExtras, torch.nn.BatchNorm3d):
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
        **extras,
    ) -> None:
        super().__init__(eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self._set_extras(extras)

    def initialize_parameters(self, input, *call_args, **call_kwargs) -> None:
        """torch's lazy hook hands over every argument of the first call (`residual=`,
        `mask=`, `activation=`); the channel count comes from the input alone."""
        super().initialize_parameters(input)


spell_out_extras(_Lazy.__init__)


class LazyBatchNorm1d(_Lazy, BatchNorm1d):
    cls_to_become = BatchNorm1d


class LazyBatchNorm2d(_Lazy, BatchNorm2d):
    cls_to_become = BatchNorm2d


class LazyBatchNorm3d(_Lazy, BatchNorm3d):
    cls_to_become = BatchNorm3d
