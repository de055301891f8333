"""Our CPU kernels' fp32 results stay near float64 where a channel's mean is large against
its spread: the case torch's CPU kernels lose precision on (docs/performance.md,
"Accuracy: fp32 against float64").

Why ours keeps it: the statistics are summed in float64 from x - (a value of the block), and
x - mean is formed before scaling (the mean is never folded into the shift), so
(x - mean) is exact for values near the mean. torch's fp32 kernels give errors growing with
|mean| / std: 1e-6 to 3e-6 at 100 + N(0, 1) and 1e-4 to 5e-3 at 1e4 + N(0, 1) (torch
2.13 CPU, `batchnorm bench accuracy`).

Error of a result = max |fp32 - float64| / max |float64|, the float64 result computed by
torch's layer from the same fp32 inputs and weights (so only arithmetic is measured).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import batchnorm as bn
from batchnorm import backends

pytestmark = pytest.mark.skipif(
    backends.get("numba").unavailable() is not None, reason="the numba backend is not available here"
)


def _results(layer: nn.Module, x, dy, weight, bias, dtype) -> dict[str, torch.Tensor]:
    """y, dx, dweight, dbias of `layer` (training mode) in `dtype`, as float64."""
    layer = layer.to(dtype).train()
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    x = x.to(dtype).clone().requires_grad_()
    y = layer(x)
    y.backward(dy.to(dtype))
    return {k: t.detach().double() for k, t in
            dict(y=y, dx=x.grad, dweight=layer.weight.grad, dbias=layer.bias.grad).items()}  # fmt: skip


def _errors(shape, offset: float, seed: int) -> dict[str, float]:
    """Each result's error for our fp32 numba layer on offset + N(0, 1) of `shape`."""
    gen = torch.Generator().manual_seed(seed)
    c = shape[1]
    x, dy = torch.randn(shape, generator=gen) + offset, torch.randn(shape, generator=gen)
    weight, bias = 1 + 0.1 * torch.randn(c, generator=gen), 0.1 * torch.randn(c, generator=gen)
    torch_cls, ours_cls = (nn.BatchNorm2d, bn.BatchNorm2d) if len(shape) == 4 else (nn.BatchNorm1d, bn.BatchNorm1d)
    truth = _results(torch_cls(c), x, dy, weight, bias, torch.float64)
    ours = _results(ours_cls(c, backend="numba"), x, dy, weight, bias, torch.float32)
    return {k: ((ours[k] - truth[k]).abs().max() / truth[k].abs().max()).item() for k in truth}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("offset", [100.0, 1e4])
def test_channels_first_stays_at_rounding_for_a_large_mean(offset, seed):
    # Measured: every result of ours 5e-8 - 1.3e-7, on (4, 8, 16, 16) up to (8, 64, 48, 48).
    # torch fp32 on the same inputs: y 1e-6 / 1.5e-4, dweight 3e-6 / 3e-4 (offset 100 / 1e4).
    errors = _errors((4, 16, 32, 32), offset, seed)
    assert max(errors.values()) < 5e-7, errors


@pytest.mark.parametrize("offset", [100.0, 1e4])
def test_two_dimensional_input_keeps_the_mean_for_a_large_mean(offset):
    # (M, C): the block sums are in fp32 (numba_kernels._MC_BLOCK says why), so ours is
    # further from float64 than channels-first, but the mean is still not folded into the
    # shift. Measured: ours 4e-7 / 2.2e-6 (offset 100 / 1e4) on (4096, 64); torch fp32
    # y 2.4e-5 / 2.7e-3, dweight 6.7e-5 / 5e-3.
    errors = _errors((4096, 64), offset, seed=0)
    assert max(errors.values()) < 2e-5, errors
