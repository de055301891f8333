"""In-place activated batch norm (Rota Bulò, Porzi and Kontschieder, CVPR 2018;
mapillary/inplace_abn): batch norm followed by the identity or a leaky ReLU, which keeps its
output for backward instead of its input, and can write that output over the input.

Batch norm followed by an activation usually keeps two activation-sized tensors for
backward: batch norm keeps its input x, the activation its input or output. Here only the
output y is kept (the next layer, a convolution, keeps it anyway, so it costs nothing more),
and backward recovers what it needs from y by inverting the activation and the affine map.
Per channel, over the n values of the batch:

    forward     xhat = (x - mu) * invstd,          invstd = 1 / sqrt(var + eps)
                z    = gamma' * xhat + beta,       gamma' = |gamma| + eps
                y    = act(z)                      act = identity, or leaky_relu(slope)
    backward    z    = act^-1(y)                   leaky_relu: z = y where y > 0, y / slope elsewhere
                xhat = (z - beta) / gamma'
                d    = dy * act'(z)                act'(z) = 1 where z > 0, slope elsewhere
                dbeta  = sum d
                dgamma = sum d * xhat * sign(gamma)        (sign(0) taken as +1)
                dx   = gamma' * invstd * (d - mean(d) - xhat * mean(d * xhat))

In evaluation (running statistics) mu and var are constants and the two mean terms drop
out, as in reference.py, whose backward this is with x replaced by its reconstruction.

What it cannot do, and what it does instead:

- ReLU is refused. It maps every negative z to 0, so xhat cannot be recovered there, and
  dx needs xhat at every position (the mean(d * xhat) term couples them). A leaky ReLU
  with a small slope (0.01, mapillary's default) is invertible and trains like ReLU.
- gamma = 0 would make the affine map non-invertible. As mapillary does, the layer scales by
  gamma' = |gamma| + eps, never 0, and its gradient carries sign(gamma). So it computes
  torch's batch norm with weight |gamma| + eps: a BatchNorm's state_dict loads unchanged,
  and gives the same outputs up to eps when its weights are positive; a negative weight
  acts as its absolute value.
- The reconstruction loses what y's rounding lost: the error of xhat is about
  eps_machine * (|z| + |beta|) / gamma', so the gradients are less exact than batch norm's
  when |beta| is much larger than gamma': dx's error grows with |beta| / gamma', where
  torch's batch norm's does not (docs/performance.md, "Accuracy: fp32 against float64", has
  the errors).
- Double backward (create_graph=True) is refused (once_differentiable): the input it would
  differentiate through is gone.

`inplace=True` writes y over x's storage (mapillary always does): then x is not allocated
twice even for an instant. x must not be needed afterwards; autograd's version counter
catches a layer before that kept x for its own backward (its backward raises), and a leaf
that requires grad cannot be overwritten. `inplace=False` returns a new tensor: the kept
memory is the same, y only, and x is freed when the caller drops it.

The module `InPlaceABN` takes any (N, C, *) input, as mapillary's does: the computation is the
same for every rank, and one class replaces BatchNorm1d/2d/3d. It is not a subclass of
torch's `_BatchNorm` (it computes more than batch norm: a tool that rebuilds a torch layer from
its attributes would drop the activation), but it has torch's parameter and buffer names,
so state_dicts load both ways, and torch's train/eval, momentum and eps semantics.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from . import activations, backends, layout, ops, validation
from .channel_params import acc_dtype
from .stats import NonFiniteGuard, Stats

ACTIVATIONS = (None, "leaky_relu")

_DEFAULT_GUARD = NonFiniteGuard("batchnorm.inplace_abn")


def inplace_abn(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    activation: str | None = "leaky_relu",
    negative_slope: float = activations.LEAKY_SLOPE,
    inplace: bool = False,
    num_batches_tracked: Tensor | None = None,
    guard: NonFiniteGuard | None = None,
) -> Tensor:
    """y = act((|gamma| + eps) * (x - mu) / sqrt(var + eps) + beta), keeping only y for backward.

    Shapes: input (N, C, *); running_mean, running_var, weight, bias (C,) or None. Returns y
    like input, in its dtype; with `inplace=True` y is `input` itself, overwritten.
    Arguments in torch.nn.functional.batch_norm's order and meaning: batch statistics when
    `training` or without running statistics; in training the running statistics, when
    given, are updated in place (momentum None: cumulative average over
    `num_batches_tracked`), under the non-finite guard of functional.batch_norm.
    `activation`: "leaky_relu" (slope `negative_slope` > 0) or None (identity); see the
    module docstring for why "relu" is refused.
    """
    x = _validate(input, running_mean, running_var, weight, bias, momentum, eps)
    slope = negative_slope_of(activation, negative_slope)
    batch_stats = training or running_mean is None
    if batch_stats:
        update = training and running_mean is not None and running_var is not None
        mean, invstd = _batch_statistics(
            x, eps, running_mean, running_var, momentum, num_batches_tracked, guard, update
        )
    else:
        acc = acc_dtype(x.dtype)
        mean, invstd = running_mean.detach().to(acc), torch.rsqrt(running_var.detach().to(acc) + eps)
    return InPlaceABNFunction.apply(x, weight, bias, mean, invstd, eps, slope, batch_stats, inplace)


def negative_slope_of(activation: str | None, negative_slope: float) -> float | None:
    """The leaky ReLU's slope, None for the identity; ValueError for an activation that
    cannot be inverted (relu, slope <= 0) or is not offered here."""
    activations.check(activation)  # an unknown name: the library's message
    if activation == "relu":
        raise ValueError(
            "InPlaceABN cannot use activation='relu': ReLU sets every negative value to 0, so "
            "backward cannot recover the normalized input there, and the input gradient needs it "
            "at every position. Use activation='leaky_relu' with a small negative_slope (0.01, "
            "as mapillary/inplace_abn does), or batchnorm.BatchNormAct(batchnorm.BatchNorm2d(C), 'relu'), "
            "which keeps its input instead"
        )
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"InPlaceABN takes activation=None (identity) or 'leaky_relu', got {activation!r}; "
            "use batchnorm.BatchNormAct(batchnorm.BatchNorm2d(C), ...) for the others"
        )
    if activation is None:
        return None
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, (int, float)):
        raise TypeError(f"negative_slope must be a number, got {negative_slope!r}")
    if not (0.0 < float(negative_slope) < math.inf):
        raise ValueError(
            f"negative_slope must be positive and finite for the leaky ReLU to be invertible, got "
            f"{negative_slope!r} (0 is ReLU); mapillary's default is 0.01"
        )
    return float(negative_slope)


def _validate(x, running_mean, running_var, weight, bias, momentum, eps) -> Tensor:
    """The library's checks (validation.py), and a rank of at least 2: (N, C, *)."""
    x = validation.validate_input(x)
    if x.dim() < 2:
        raise ValueError(f"InPlaceABN expects input of shape (N, C, *), got shape {tuple(x.shape)}")
    validation.validate_arguments(x, weight, bias, running_mean, running_var, momentum, eps)
    return x


def _batch_statistics(x, eps, running_mean, running_var, momentum, num_batches_tracked, guard, update):
    """(mean, invstd), each (C,) in the accumulation dtype, of the batch, and the running
    statistics updated when `update` (ops.update_running_stats: the library's one rule). An
    empty batch normalizes nothing and updates nothing (as functional.batch_norm)."""
    acc = acc_dtype(x.dtype)
    if x.numel() == 0:
        c = x.shape[1]
        return torch.zeros(c, dtype=acc, device=x.device), torch.ones(c, dtype=acc, device=x.device)
    validation.validate_training_batch(x)
    with torch.no_grad():
        # the backends' statistics (count, mean, m2) of the canonical view, as functional.py
        # takes them: a channels-last input is read as it lies
        batch = Stats(*backends.resolve(None, x).backend.stats(layout.canonical(x).data))
        if update:
            accepted = ops.update_running_stats(
                running_mean, running_var, num_batches_tracked, batch.mean, batch.unbiased_var, momentum
            )  # fmt: skip
            (guard or _DEFAULT_GUARD).record(accepted)
        return batch.mean, torch.rsqrt(batch.var + eps)


def effective_affine(weight: Tensor | None, bias: Tensor | None, eps: float, like: Tensor) -> tuple[Tensor, Tensor]:
    """(gamma', beta), (C,) in `like`'s dtype: gamma' = |gamma| + eps (1 without a weight), never 0,
    so that the affine map can be inverted; beta = 0 without a bias."""
    gamma = torch.ones_like(like) if weight is None else weight.detach().to(like.dtype).abs() + eps
    beta = torch.zeros_like(like) if bias is None else bias.detach().to(like.dtype)
    return gamma, beta


class InPlaceABNFunction(torch.autograd.Function):
    """y = act(gamma' * (x - mean) * invstd + beta) with a backward that reads y alone.

    forward(x (N, C, *), weight, bias (C,) or None, mean, invstd (C,) in the accumulation dtype,
    eps, slope (None: identity), batch_stats (whether mean and invstd are x's, so that dx
    carries their dependence on x), inplace) -> y like x. mean and invstd come in as
    constants, computed by the caller (`inplace_abn`).
    """

    @staticmethod
    def forward(x, weight, bias, mean, invstd, eps, slope, batch_stats, inplace):
        gamma, beta = effective_affine(weight, bias, eps, invstd)
        out = x if inplace else torch.empty_like(x)
        # the mean is subtracted first, never folded into the shift (reference.py: precision
        # for a channel with a large mean and a small spread)
        torch.sub(x, layout.per_channel(mean, x), out=out)
        out.mul_(layout.per_channel(gamma * invstd, x)).add_(layout.per_channel(beta, x))
        if slope is not None:
            torch.nn.functional.leaky_relu_(out, slope)
        return out

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, _mean, invstd, eps, slope, batch_stats, inplace = inputs
        if inplace:
            # x now holds y: bumps its version, so that a backward that kept x raises
            ctx.mark_dirty(x)
        ctx.save_for_backward(output, weight, bias, invstd)
        ctx.eps, ctx.slope, ctx.batch_stats = eps, slope, batch_stats

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        y, weight, bias, invstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gamma, beta = effective_affine(weight, bias, ctx.eps, invstd)
        xhat = reconstruct_xhat(y, gamma, beta, ctx.slope)
        d = _grad_before_activation(dy, y, ctx.slope, invstd.dtype)
        dims = layout.reduce_dims(y)
        sum_d, sum_d_xhat = d.sum(dims), (d * xhat).sum(dims)
        dx = _input_grad(d, xhat, sum_d, sum_d_xhat, gamma * invstd, ctx.batch_stats).to(y.dtype) if need_x else None
        dweight = dbias = None
        if need_w and weight is not None:
            # d gamma' / d gamma = sign(gamma), +1 at 0 (mapillary's), so a zero weight still learns
            sign = torch.where(weight.detach() < 0, -1.0, 1.0).to(sum_d_xhat.dtype)
            dweight = (sum_d_xhat * sign).to(weight.dtype).view_as(weight)
        if need_b and bias is not None:
            dbias = sum_d.to(bias.dtype).view_as(bias)
        return dx, dweight, dbias, None, None, None, None, None, None


def reconstruct_xhat(y: Tensor, gamma: Tensor, beta: Tensor, slope: float | None) -> Tensor:
    """xhat = (act^-1(y) - beta) / gamma', like y in the dtype of gamma (the accumulation dtype).

    act^-1 of the leaky ReLU: y where y > 0, y / slope elsewhere (a slope > 0 keeps the sign)."""
    z = y if slope is None else torch.where(y > 0, y, y / slope)
    return torch.sub(z, layout.per_channel(beta, y)).div_(layout.per_channel(gamma, y))


def _grad_before_activation(dy: Tensor, y: Tensor, slope: float | None, acc: torch.dtype) -> Tensor:
    """d = dy * act'(z): z and y have the same sign, so act' = 1 where y > 0, slope elsewhere
    (torch's leaky_relu takes the slope at 0 too)."""
    d = dy.to(acc)
    return d if slope is None else torch.where(y > 0, d, d * slope)


def _input_grad(d, xhat, sum_d, sum_d_xhat, scale, batch_stats) -> Tensor:
    """dx = scale * (d - mean(d) - xhat * mean(d * xhat)); scale * d in evaluation. `xhat` is
    this backward's own buffer and is overwritten."""
    if not batch_stats:
        return d * layout.per_channel(scale, d)
    n = layout.values_per_channel(d)
    correction = xhat.mul_(layout.per_channel(sum_d_xhat / n, d)).add_(layout.per_channel(sum_d / n, d))
    return (d - correction).mul_(layout.per_channel(scale, d))


class InPlaceABN(nn.Module):
    """Batch norm + identity or leaky ReLU over (N, C, *) input, keeping only its output for
    backward (module docstring: the equations, what is refused and why).

    Constructor: torch.nn.BatchNorm2d's arguments (num_features, eps, momentum, affine,
    track_running_stats, device, dtype), then `activation` ("leaky_relu", the default, or None),
    `negative_slope` (> 0; 0.01) and `inplace` (write y over the input; False). Parameters and
    buffers as torch's layer: weight, bias (C,) when affine; running_mean, running_var (C,) and
    num_batches_tracked () when track_running_stats. A BatchNorm1d/2d/3d's state_dict loads.
    """

    _version = 2  # torch's _NormBase's state_dict version: num_batches_tracked is present

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
        activation: str | None = "leaky_relu",
        negative_slope: float = activations.LEAKY_SLOPE,
        inplace: bool = False,
    ) -> None:
        super().__init__()
        validation.validate_scalars(momentum, eps)
        negative_slope_of(activation, negative_slope)  # refuses relu at construction, not at the first batch
        factory = {"device": device, "dtype": dtype}
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        self.activation, self.negative_slope, self.inplace = activation, negative_slope, inplace
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, **factory))
            self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                self.register_buffer(name, None)
        self._guard = NonFiniteGuard(type(self).__name__)

    def reset_running_stats(self) -> None:
        """running_mean 0, running_var 1, num_batches_tracked 0, as torch's layer."""
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """The running statistics reset, weight 1 and bias 0, as torch's layer."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    @property
    def nonfinite_skips(self) -> int:
        """How many running-statistic updates were skipped for a non-finite batch statistic."""
        return self._guard.count

    def forward(self, input: Tensor) -> Tensor:
        """act((|gamma| + eps) * (x - mu) / sqrt(var + eps) + beta): (N, C, *) -> (N, C, *)."""
        validation.validate_input(input, None if self.num_features == 0 else self.num_features)
        update = self.training and self.track_running_stats
        # torch's rule (as BatchNormExtras.forward): batch statistics in training, and in
        # evaluation when there are no running statistics
        uses_buffers = not self.training or self.track_running_stats
        return inplace_abn(
            input,
            self.running_mean if uses_buffers else None,
            self.running_var if uses_buffers else None,
            self.weight,
            self.bias,
            self.training or self.running_mean is None,
            self.momentum,
            self.eps,
            activation=self.activation,
            negative_slope=self.negative_slope,
            inplace=self.inplace,
            num_batches_tracked=self.num_batches_tracked if update else None,
            guard=self._guard,
        )

    def extra_repr(self) -> str:
        text = (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}, activation={self.activation!r}"
        )
        if self.activation is not None:
            text += f", negative_slope={self.negative_slope}"
        return text + (", inplace=True" if self.inplace else "")


__all__ = ["ACTIVATIONS", "InPlaceABN", "InPlaceABNFunction", "inplace_abn", "reconstruct_xhat"]
