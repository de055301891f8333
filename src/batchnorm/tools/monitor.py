"""`monitor`: watch the inputs to a network's nonlinearities while it trains.

    with bn.monitor(model) as mon:                # records every 10th training step
        for x, y in loader:
            ...                                   # an ordinary training loop
    mon.save("history.json"); mon.plot("bands.png")

At every `every`-th training forward of `model` (counted from 0 by a pre-hook on the model
itself; forwards in eval mode are not counted), hooks record for each monitored layer the
pre-activation u: the values that reach the layer's nonlinearity. From it come, per record:

- `percentiles`: the 15th, 50th and 85th percentiles (`torch.quantile`, linear) of u for a
  few chosen units (channels; for conv layers over batch and positions), the curves of
  Ioffe & Szegedy (2015), Figure 1 (b, c);
- `mean`, `std`: per-channel mean and (biased) standard deviation of u, each (C,);
- `saturated` (sigmoid, tanh): the fraction of values with |u| > SATURATION[g], where the
  derivative is below 7% of its peak (sigmoid: |u| > 4, tanh: |u| > 2);
- `dead` (relu, relu6): the fraction of channels with u <= 0 for the whole batch;
- `mean_drift`, `var_drift` (batch-norm layers with running statistics): how far the
  running statistics moved since the previous record (the first record: since `start`),
  the mean over channels of |d running_mean| / sqrt(running_var_before + eps) and of
  |log((running_var + eps) / (running_var_before + eps))|.

What u is, per layer:

- a batch-norm layer: its output (the input of the nonlinearity that follows it); for our
  layers called with a fused `activation=` (in a `BatchNormAct`), the pre-activation
  gamma * z_hat + beta (+ residual), recomputed from the layer's input with
  `torch.nn.functional.batch_norm`;
- any other module (an activation): its first positional input, taken before it runs (so
  an in-place activation cannot overwrite it).

Default layers: every batch-norm layer, and every activation module whose predecessor in
module order (`model.named_modules()`, leaves only) is a Linear or Conv layer. The
nonlinearity of a batch-norm layer is the activation module that follows it in module order
(in a `BatchNormAct`: its `act`). Activations applied as functions (torch.relu in a forward)
are not seen: a batch-norm layer before one is still monitored (with no saturated or dead
fraction, its nonlinearity being unknown); after a Linear/Conv, use an activation module.

Cost: between recorded steps only the model's pre-hook runs (the layers are hooked for the
recorded forwards alone); a recorded forward copies u and the running statistics, and the
statistics are computed later for many records at once, on u's device, when the copies
reach FLUSH_BYTES or the history is read, with one transfer to the host per field.
`batchnorm bench monitor` (batchnorm_lab.bench.monitor_overhead) measures the cost on the
experiments' MLP.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from ._common import import_extra

PERCENTILES = (0.15, 0.50, 0.85)
SATURATION = {"sigmoid": 4.0, "tanh": 2.0}
DEAD = ("relu", "relu6")
EVERY = 10  # the default: cheap enough to leave on (`batchnorm bench monitor`)
FLUSH_BYTES = 64 * 2**20  # copies of u kept on the device before their statistics are taken
FIELDS = ("step", "percentiles", "mean", "std", "saturated", "dead", "mean_drift", "var_drift")

_ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
    nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish,
    nn.Softplus, nn.Softsign, nn.LogSigmoid, nn.Tanhshrink,
)  # fmt: skip
_WEIGHTED = (nn.Linear, _ConvNd)
_STACK_BYTES = 2**20  # records whose statistics are computed together
_QUANTILE_MAX = 2**24  # the most elements torch.quantile takes at once


def nonlinearity_of(module: nn.Module | None) -> str | None:
    """"relu", "sigmoid", ... for an activation module, else None."""
    if isinstance(module, nn.ReLU6):
        return "relu6"
    if isinstance(module, _ACTIVATIONS):
        return type(module).__name__.lower()
    return None


@dataclass
class _Layer:
    """One monitored module, its queued copies of u and its computed history."""

    name: str
    module: nn.Module
    nonlinearity: str | None
    units: Tensor | None = None  # (k,) channel indices, chosen at the first record
    running: Tensor | None = None  # (2, C) running mean and var at the previous record
    pending: list[tuple[int, Tensor, Tensor | None]] = field(default_factory=list)
    chunks: list[dict[str, np.ndarray]] = field(default_factory=list)


class Monitor:
    """Records what reaches each monitored layer's nonlinearity during training.

    `layers`: None (the defaults above), or names from `model.named_modules()` or the
    modules themselves (leaves). `every`: record at training forwards 0, every, 2 every...
    (default EVERY = 10: recording costs a sizable part of a training step of the
    experiments' small MLP on CPU, so recording every step would slow its training down by
    that much; docs/performance.md, "Costs around the kernels").
    `units`: how many channels to take percentiles of (evenly spaced), or their indices.

    Use as a context manager, or call `start()` and `stop()`; hooks are removed on exit,
    also when the block raises. The history: `records()` (a list of dicts, one per step
    and layer, JSON-ready), `arrays()` ({layer: {field: numpy array over records}}),
    `save(path)` and `plot(path)`.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Iterable[str | nn.Module] | None = None,
        every: int = EVERY,
        units: int | Sequence[int] = 3,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"monitor expects a torch.nn.Module, got {type(model).__name__}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer (record every n-th step), got {every!r}")
        self.model = model
        self.every = every
        self.units = _check_units(units)
        self.layers = _select(model, layers)
        self._root = None  # the model's pre-hook, which counts steps
        self._hooks: list = []  # the layers' hooks, there only during recorded forwards
        self._step = -1  # training forwards seen since start(); the first is step 0
        self._done: set[str] = set()  # layers recorded in the current forward
        self._pending_bytes = 0

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> Monitor:
        """Hook the model; the running statistics now are the base of the first drift."""
        if self._root is not None:
            raise RuntimeError("this monitor is already started; call stop() first")
        for layer in self.layers:
            layer.running = _running(layer.module)
        self._root = self.model.register_forward_pre_hook(self._on_forward)
        return self

    def stop(self) -> None:
        """Remove every hook (safe to call twice) and compute what is still queued."""
        self._detach()
        if self._root is not None:
            self._root.remove()
            self._root = None
        self._flush()

    def __enter__(self) -> Monitor:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- hot path ----------------------------------------------------------------------

    def _on_forward(self, module: nn.Module, args: tuple) -> None:
        """Before each forward of the model: hook the layers for a recorded training step,
        unhook them otherwise (so steps in between pay for this one hook only)."""
        record = False
        if module.training:
            self._step += 1
            record = self._step % self.every == 0
        if record:
            self._done.clear()
            if not self._hooks:
                self._attach()
        else:
            self._detach()

    def _attach(self) -> None:
        for layer in self.layers:
            if isinstance(layer.module, _BatchNorm):
                hook = layer.module.register_forward_hook(self._output_hook(layer), with_kwargs=True)
            else:
                hook = layer.module.register_forward_pre_hook(self._input_hook(layer))
            self._hooks.append(hook)

    def _detach(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def _wanted(self, layer: _Layer) -> bool:
        # A module called twice in one forward is recorded once, at its first call.
        if layer.name in self._done:
            return False
        self._done.add(layer.name)
        return True

    def _input_hook(self, layer: _Layer):
        def hook(module, args):
            if self._wanted(layer):
                self._queue(layer, args[0].detach().clone())

        return hook

    def _output_hook(self, layer: _Layer):
        def hook(module, args, kwargs, output):
            if self._wanted(layer):
                with torch.no_grad():
                    self._queue(layer, _batchnorm_pre_activation(module, args, kwargs, output))

        return hook

    def _queue(self, layer: _Layer, u: Tensor) -> None:
        """Keep a private copy of u (N, C, ...) and the running statistics, on the device."""
        if layer.units is None:
            layer.units = _resolve_units(self.units, layer.name, u)
        layer.pending.append((self._step, u, _running(layer.module)))
        self._pending_bytes += u.numel() * u.element_size()
        if self._pending_bytes >= FLUSH_BYTES:
            self._flush()

    # -- history -------------------------------------------------------------------------

    def _flush(self) -> None:
        """Compute the statistics of every queued copy and free them."""
        for layer in self.layers:
            if layer.pending:
                layer.chunks.append(_summarize(layer))
        self._pending_bytes = 0

    def arrays(self) -> dict[str, dict[str, np.ndarray]]:
        """{layer: {field: array}} over that layer's T records, in step order: step (T,),
        percentiles (T, k, 3), mean and std (T, C), saturated, dead, mean_drift, var_drift
        (T,), NaN where a field does not apply. Layers with no record are left out."""
        self._flush()
        out = {}
        for layer in self.layers:
            if layer.chunks:
                columns = {key: np.concatenate([c[key] for c in layer.chunks]) for key in FIELDS}
                order = np.argsort(columns["step"], kind="stable")
                out[layer.name] = {key: value[order] for key, value in columns.items()}
        return out

    def records(self) -> list[dict]:
        """One dict per (recorded step, layer), by step then layer: a tidy, JSON-ready table.

        Keys: step, layer, nonlinearity, units (k,), percentiles (k lists of the 15/50/85th),
        mean (C,), std (C,), saturated, dead, mean_drift, var_drift (None where they do not
        apply).
        """
        rows = []
        arrays = self.arrays()
        for layer in self.layers:
            history = arrays.get(layer.name)
            for i in range(0 if history is None else len(history["step"])):
                row = {"step": int(history["step"][i]), "layer": layer.name}
                row["nonlinearity"] = layer.nonlinearity
                row["units"] = layer.units.tolist()
                for key in ("percentiles", "mean", "std"):
                    row[key] = history[key][i].tolist()
                for key in ("saturated", "dead", "mean_drift", "var_drift"):
                    value = float(history[key][i])
                    row[key] = None if np.isnan(value) else value
                rows.append(row)
        rows.sort(key=lambda r: r["step"])  # stable: layers keep their order within a step
        return rows

    def save(self, path: str | Path) -> Path:
        """Write the settings and the records as JSON; returns the path."""
        path = Path(path)
        document = {
            "every": self.every,
            "percentiles": list(PERCENTILES),
            "saturation_threshold": SATURATION,
            "layers": {layer.name: {"nonlinearity": layer.nonlinearity} for layer in self.layers},
            "records": self.records(),
        }
        path.write_text(json.dumps(document))
        return path

    def plot(self, path: str | Path | None = None, layers: Sequence[str] | None = None):
        """Percentile bands over steps, one panel per layer (Ioffe & Szegedy, Figure 1 b/c):
        for each chosen unit the median as a line and the 15th-85th percentiles as a band.
        Returns the matplotlib Figure (drawn with the Agg canvas, no display needed);
        saved to `path` when given."""
        Figure = import_extra("matplotlib.figure", "Monitor.plot").Figure
        history = self.arrays()
        names = list(history) if layers is None else list(layers)
        missing = [n for n in names if n not in history]
        if missing:
            raise ValueError(f"no records for layers {missing}; recorded: {list(history)}")
        if not names:
            raise ValueError("nothing recorded yet: run training forwards inside the monitor first")
        units = {layer.name: layer.units for layer in self.layers}
        fig = Figure(figsize=(4.0 * len(names), 3.2), layout="constrained")
        for ax, name in zip(fig.subplots(1, len(names), squeeze=False)[0], names):
            steps, pct = history[name]["step"], history[name]["percentiles"]
            for j, unit in enumerate(units[name].tolist()):
                line = ax.plot(steps, pct[:, j, 1], lw=1.2, label=f"unit {unit}")[0]
                ax.fill_between(steps, pct[:, j, 0], pct[:, j, 2], color=line.get_color(), alpha=0.25)
            ax.set_title(f"{name or '(model)'}: input to the nonlinearity", fontsize=9)
            ax.set_xlabel("training step")
            ax.set_ylabel("15th / 50th / 85th percentile")
            ax.legend(fontsize=7)
        if path is not None:
            fig.savefig(path, dpi=120)
        return fig


def monitor(
    model: nn.Module,
    layers: Iterable[str | nn.Module] | None = None,
    every: int = EVERY,
    units: int | Sequence[int] = 3,
) -> Monitor:
    """A `Monitor` of `model` (see `Monitor`); use it with `with` or call start()/stop()."""
    return Monitor(model, layers, every, units)


def statistics(u: Tensor, units: Tensor, nonlinearity: str | None) -> dict[str, np.ndarray]:
    """The statistics of R stacked pre-activations u, (R, N, C, *spatial), as numpy arrays:
    percentiles (R, k, 3) of the channels `units` (k,), mean and std (R, C), saturated and
    dead (R,) (NaN when the nonlinearity has no such notion)."""
    u = u.float() if u.dtype in (torch.float16, torch.bfloat16) else u
    r, k = u.shape[0], units.numel()
    dims = (1, *range(3, u.dim()))
    # two passes (torch.var_mean is many times slower on CPU for these reductions), in a
    # scratch buffer that the saturation reuses: one temporary as large as u, not three
    mean = u.mean(dims, keepdim=True)
    scratch = torch.sub(u, mean)
    var = scratch.square_().mean(dims)
    mean = mean.flatten(1)
    rows = u.index_select(2, units).movedim(2, 1).reshape(r * k, -1)  # (R k, n)
    if rows.shape[1] > _QUANTILE_MAX:  # huge maps: an even subsample, as quantile cannot take them
        rows = rows[:, :: -(-rows.shape[1] // _QUANTILE_MAX)]
    q = torch.tensor(PERCENTILES, dtype=u.dtype, device=u.device)
    per_call = max(1, _QUANTILE_MAX // rows.shape[1])
    percentiles = torch.cat([torch.quantile(part, q, dim=1).T for part in rows.split(per_call)])
    nan = torch.full((r,), float("nan"), device=u.device)
    if nonlinearity in SATURATION:
        # sign(max(|u| - t, 0)) is 1 exactly where |u| > t: float ops, several times faster
        # on CPU than a comparison (whose boolean output takes a slow path)
        torch.abs(u, out=scratch).sub_(SATURATION[nonlinearity]).clamp_(min=0).sign_()
        saturated = scratch.flatten(1).mean(1)
    else:
        saturated = nan
    dead = (u.amax(dims) <= 0).float().mean(1) if nonlinearity in DEAD else nan
    out = {
        "percentiles": percentiles.reshape(r, k, 3),
        "mean": mean,
        "std": var.sqrt(),
        "saturated": saturated,
        "dead": dead,
    }
    return {key: value.double().cpu().numpy() for key, value in out.items()}


def _summarize(layer: _Layer) -> dict[str, np.ndarray]:
    """The history rows of a layer's queued records (which are freed)."""
    pending, layer.pending = layer.pending, []
    out: dict[str, np.ndarray] = {"step": np.array([step for step, _, _ in pending], dtype=np.int64)}
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, (_, u, _) in enumerate(pending):
        by_shape.setdefault(tuple(u.shape), []).append(i)
    for same_shape in by_shape.values():
        # a few records stacked at a time: few torch calls, and the stack stays in cache
        per_stack = max(1, _STACK_BYTES // (pending[same_shape[0]][1].numel() * 4))
        for start in range(0, len(same_shape), per_stack):
            index = same_shape[start : start + per_stack]
            u = torch.stack([pending[i][1] for i in index])
            for key, value in statistics(u, layer.units, layer.nonlinearity).items():
                out.setdefault(key, np.empty((len(pending), *value.shape[1:])))[index] = value
    out["mean_drift"] = out["var_drift"] = np.full(len(pending), np.nan)
    if layer.running is not None:
        eps = layer.module.eps
        running = torch.stack([layer.running] + [r for _, _, r in pending]).double().cpu().numpy()
        mean, var = running[:, 0], running[:, 1] + eps  # (R + 1, C)
        out["mean_drift"] = np.mean(np.abs(np.diff(mean, axis=0)) / np.sqrt(var[:-1]), axis=1)
        out["var_drift"] = np.mean(np.abs(np.diff(np.log(var), axis=0)), axis=1)
        layer.running = pending[-1][2]
    return out


def _batchnorm_pre_activation(module: _BatchNorm, args: tuple, kwargs: dict, output: Tensor) -> Tensor:
    """A private copy of the input of a batch-norm layer's nonlinearity (see the module doc)."""
    if kwargs.get("activation") is None:
        return output.detach().clone()
    batch = module.training or module.running_mean is None
    u = nn.functional.batch_norm(
        args[0].detach(),
        None if batch else module.running_mean,
        None if batch else module.running_var,
        module.weight,
        module.bias,
        batch,
        0.0,
        module.eps,
    )
    residual = args[1] if len(args) > 1 else kwargs.get("residual")
    return u if residual is None else u + residual.detach()


def _layers_in_order(model: nn.Module) -> list[tuple[str, nn.Module, str | None, bool]]:
    """(name, module, nonlinearity, monitored by default) for every leaf module, in order."""
    leaves = [(n, m) for n, m in model.named_modules() if next(m.children(), None) is None]
    out = []
    for i, (name, module) in enumerate(leaves):
        before = leaves[i - 1][1] if i > 0 else None
        after = leaves[i + 1][1] if i + 1 < len(leaves) else None
        if isinstance(module, _BatchNorm):
            out.append((name, module, nonlinearity_of(after), True))
        else:
            default = isinstance(module, _ACTIVATIONS) and isinstance(before, _WEIGHTED)
            out.append((name, module, nonlinearity_of(module), default))
    return out


def _check_units(units: int | Sequence[int]) -> int | tuple[int, ...]:
    if isinstance(units, bool):
        raise TypeError("units must be a number of units or a sequence of channel indices, got a bool")
    if isinstance(units, int):
        if units < 1:
            raise ValueError(f"units must be at least 1, got {units}")
        return units
    chosen = tuple(int(u) for u in units)
    if not chosen or any(u < 0 for u in chosen):
        raise ValueError(f"units must be non-empty, non-negative channel indices, got {list(units)}")
    return chosen


def _select(model: nn.Module, layers: Iterable[str | nn.Module] | None) -> list[_Layer]:
    known = _layers_in_order(model)
    if layers is None:
        chosen = [_Layer(name, m, g) for name, m, g, default in known if default]
        if not chosen:
            raise ValueError(
                "the model has no batch-norm layer and no activation module after a Linear/Conv; "
                "pass the modules to monitor with layers=[...]"
            )
        return chosen
    by_name = {name: (m, g) for name, m, g, _ in known}
    by_id = {id(m): name for name, m, _, _ in known}
    chosen = []
    for item in layers:
        if isinstance(item, nn.Module):
            if id(item) not in by_id:
                raise ValueError(f"layers: {type(item).__name__} is not a leaf module of this model")
            item = by_id[id(item)]
        if item not in by_name:
            raise ValueError(f"layers: no leaf module named {item!r}; leaf modules: {list(by_name)}")
        chosen.append(_Layer(item, *by_name[item]))
    return chosen


def _resolve_units(units: int | tuple[int, ...], name: str, u: Tensor) -> Tensor:
    """The channel indices to take percentiles of, for an input u of shape (N, C, ...)."""
    if u.dim() < 2:
        raise ValueError(f"layer {name!r} got input of shape {tuple(u.shape)}; expected (N, C, ...)")
    c = u.shape[1]
    if isinstance(units, int):
        chosen = np.unique(np.linspace(0, c - 1, min(units, c)).round().astype(np.int64))
    else:
        if max(units) >= c:
            raise ValueError(f"units={list(units)} but layer {name!r} has {c} channels")
        chosen = np.asarray(units, dtype=np.int64)
    return torch.as_tensor(chosen, device=u.device)


def _running(module: nn.Module) -> Tensor | None:
    """(2, C) copy of a batch-norm layer's running mean and variance, or None."""
    if isinstance(module, _BatchNorm) and module.running_mean is not None:
        return torch.stack([module.running_mean, module.running_var]).detach()
    return None
