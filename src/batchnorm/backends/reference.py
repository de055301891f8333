"""The `reference` backend: the oracle's equations (`batchnorm.reference`), never chosen by auto."""

from __future__ import annotations

from .. import reference
from .base import Backend


class ReferenceBackend(Backend):
    """Plain torch ops in the accumulation dtype; any device, any layout (copies if needed)."""

    name = "reference"

    def stats(self, x):
        return reference.stats(x)

    def apply(self, x, mean, scale, shift, activation=None, residual=None):
        return reference.apply(x, mean, scale, shift, activation, residual)

    def backward_reduce(self, dy, x, mean, invstd, scale, shift, activation=None, residual=None):
        return reference.backward_reduce(dy, x, mean, invstd, scale, shift, activation, residual)

    def backward_apply(
        self, dy, x, mean, invstd, scale, shift, mean_d, mean_d_xhat, activation=None, residual=None
    ):
        return reference.backward_apply(
            dy, x, mean, invstd, scale, shift, mean_d, mean_d_xhat, activation, residual
        )
