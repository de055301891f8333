"""The kernel contract every backend implements (DESIGN.md, "How data flows").

A backend computes; it holds no batch-norm policy (running statistics, synchronization,
ghost batches, guards live above it). All tensors are canonical views (`layout.py`):
x, dy, residual are `(N, C, L)` or `(M, C)`; per-channel vectors are `(C,)` in the
accumulation dtype (fp64 for fp64 input, fp32 otherwise).

    stats(x)                                      -> (count, mean, m2)
    apply(x, mean, scale, shift, activation, residual)
                                                  -> y = g((x - mean) scale + shift + residual)
    backward_reduce(dy, x, mean, invstd, scale, shift, activation, residual)
                                                  -> (sum_d, sum_d_xhat)
    backward_apply(dy, x, mean, invstd, scale, shift, mean_d, mean_d_xhat,
                   activation, residual)          -> (dx, dresidual or None)

with d = dy * g'(u), u = (x - mean) scale + shift + residual, xhat = (x - mean) invstd,
and dx = scale (d - mean_d - xhat mean_d_xhat). scale = gamma invstd and shift = beta:
the mean is always subtracted from x first (never folded into the shift), which keeps fp32
exact enough for a channel with mean 1e4 and spread 1e-2. `reference.py` states each
equation.
"""

from __future__ import annotations

from torch import Tensor


class Backend:
    """One implementation of the kernel contract. Subclasses override what they provide."""

    name: str = ""

    #: Optional whole-op path, `normalize(x, weight, bias, running_mean, running_var, eps,
    #: activation, residual) -> (y, mean, invstd)` on the N-D input with its own autograd,
    #: used for plain batch norm when no policy needs the statistics apart (see aten.py).
    normalize = None
    #: Optional: `normalize_updating(x, weight, bias, running_mean, running_var,
    #: num_batches_tracked, factor, eps, activation, residual) -> (y, accepted)`, training
    #: batch norm that also folds the batch into the running statistics in place (weight
    #: `factor`, unbiased variance) and counts it in num_batches_tracked (may be None), unless
    #: a batch statistic is not finite: then nothing changes and `accepted` is false (a bool,
    #: or a 0-d bool tensor on an accelerator, as stats.RunningUpdate.commit returns).
    normalize_updating = None

    def unavailable(self) -> str | None:
        """Why this backend cannot run on this machine at all, or None when it can."""
        return None

    def unsupported(self, x: Tensor) -> str | None:
        """Why this backend cannot take input `x` (device, dtype, layout), or None."""
        return None

    def preferred(self, x: Tensor) -> bool:
        """Whether `auto` should choose this backend for `x` (e.g. above a measured size)."""
        return False

    # The kernel contract ------------------------------------------------------------
    def stats(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def apply(self, x, mean, scale, shift, activation=None, residual=None) -> Tensor:
        raise NotImplementedError

    def backward_reduce(self, dy, x, mean, invstd, scale, shift, activation=None, residual=None):
        raise NotImplementedError

    def backward_apply(
        self, dy, x, mean, invstd, scale, shift, mean_d, mean_d_xhat, activation=None, residual=None
    ):
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<batchnorm backend {self.name!r}>"
