"""`check`: a health check of every batch-norm layer of a model (`batchnorm check` runs it
from the command line, batchnorm_lab/cli.py).

    report = bn.check(model, batches)         # a few batches of the data it will see
    print(report)       # plain text; rich.print(report) or report.table() for a table
    report.ok; report.to_json("check.json")

Findings (kind: severity), each with its evidence and what to do:

- `train_mode_in_eval` (error): the model is in evaluation mode but the layer is in
  training mode, so its output depends on the batch and its statistics keep moving;
- `nonfinite_running_stats`, `negative_variance` (error): broken running statistics;
- `never_updated` (error): num_batches_tracked == 0 and the running statistics still at
  their initial values (mean 0, variance 1): the layer was never run in training mode;
- `stale_statistics` (error): the running statistics do not describe the data. Per channel,
  with mu, var the statistics of the layer's input over the given batches in evaluation
  mode: shift = |mu - running_mean| / sqrt(running_var + eps) and log ratio =
  log((var + eps) / (running_var + eps)). Flagged when the mean over channels of the shift
  exceeds max(shift_tol, 3 / sqrt(n)) or that of |log ratio| exceeds
  max(log(var_tol), 3 sqrt(2 / (n - 1))), n the values per channel seen (the second
  terms: three standard errors of the sampling noise);
- `train_eval_gap` (warning): the model's output with the batch-norm layers normalizing
  by batch statistics (training mode) differs from the output with running statistics by
  more than gap_tol, relatively: ||y_train - y_eval|| / ||y_eval|| over all batches;
- `small_batch` (warning): fewer than min_values values per channel in a batch;
- `dead_channels` (warning): |gamma| < dead_gamma;
- `bias_before_batchnorm` (info): a Linear/Conv with a bias feeds the layer; the mean
  subtraction cancels that bias, so its parameters are wasted;
- `no_running_stats`, `not_reached` (info).

`report.ok` is false when there is an error or a warning. The model is left exactly as it
was: modes, parameters, buffers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from ..stats import Stats, merge_all
from ._common import import_extra, input_stats_hook, leaves_no_trace
from ._patterns import pairs
from .freeze import frozen_stats

SEVERITIES = ("error", "warning", "info")


@dataclass(frozen=True)
class Finding:
    """One problem (or remark) about one layer ("" is the whole model)."""

    layer: str
    kind: str
    severity: str  # "error", "warning" or "info"
    message: str
    evidence: dict[str, Any]
    advice: str


@dataclass
class CheckReport:
    """The findings of `check`, worst first; `ok` when there is no error or warning."""

    findings: list[Finding] = field(default_factory=list)
    layers: int = 0  # batch-norm layers checked
    batches: int = 0  # batches run

    @property
    def ok(self) -> bool:
        return not any(f.severity in ("error", "warning") for f in self.findings)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "layers": self.layers,
            "batches": self.batches,
            "findings": [asdict(f) for f in self.findings],
        }

    def to_json(self, path: str | Path | None = None) -> str:
        """The report as a JSON document; also written to `path` when given."""
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text)
        return text

    def table(self):
        """A rich Table: one row per finding (rich comes with the `experiments` extra)."""
        Table = import_extra("rich.table", "CheckReport.table").Table
        verdict = "[green]ok[/green]" if self.ok else "[red]problems found[/red]"
        table = Table(
            title=f"batch-norm check: {self.layers} layers, {self.batches} batches: {verdict}", show_lines=True
        )
        for column in ("severity", "layer", "finding", "evidence", "advice"):
            table.add_column(column, overflow="fold")  # wrap long names, never cut them
        colour = {"error": "red", "warning": "yellow", "info": "cyan"}
        for f in self.findings:
            evidence = "\n".join(f"{k} = {_short(v)}" for k, v in f.evidence.items())
            severity = f"[{colour[f.severity]}]{f.severity}[/]"
            table.add_row(severity, f.layer or "(model)", f"{f.kind}: {f.message}", evidence, f.advice)
        return table

    def __rich__(self):
        return self.table()

    def __str__(self) -> str:
        """Plain text, one block per finding: what `print(report)` shows, without rich
        (the package does not need it; `table()` and rich.print give the coloured table)."""
        verdict = "ok" if self.ok else "problems found"
        lines = [f"batch-norm check: {self.layers} layers, {self.batches} batches: {verdict}"]
        for f in self.findings:
            lines.append(f"{f.severity}: {f.layer or '(model)'}: {f.kind}: {f.message}")
            if f.evidence:
                lines.append("    evidence: " + ", ".join(f"{k} = {_short(v)}" for k, v in f.evidence.items()))
            lines.append(f"    advice: {f.advice}")
        return "\n".join(lines)


def check(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    max_batches: int = 8,
    shift_tol: float = 0.5,
    var_tol: float = 2.0,
    gap_tol: float = 0.5,
    min_values: int = 32,
    dead_gamma: float = 1e-3,
) -> CheckReport:
    """Check every batch-norm layer of `model` on up to `max_batches` of `batches`.

    `batches`: an iterable of input tensors or (input, target, ...) tuples, such as a
    DataLoader, of the data and batch size the model will be used with (an empty iterable
    runs only the checks that need no data). The thresholds are described in the module
    docstring. Returns a `CheckReport`; the model is not changed.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"check expects a torch.nn.Module, got {type(model).__name__}")
    if max_batches < 1:
        raise ValueError(f"max_batches must be at least 1, got {max_batches}")
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm)]
    inputs = _inputs(batches, max_batches, _device(model))
    findings = []
    for name, m in layers:
        findings += _layer_findings(model, name, m, dead_gamma)
    findings += _bias_findings(model)
    if inputs and layers:
        findings += _data_findings(model, layers, inputs, shift_tol, var_tol, gap_tol, min_values)
    order = {s: i for i, s in enumerate(SEVERITIES)}
    position = {name: i for i, (name, _) in enumerate(model.named_modules())}
    findings.sort(key=lambda f: (order[f.severity], position.get(f.layer, 0)))
    return CheckReport(findings, len(layers), len(inputs))


def _layer_findings(model: nn.Module, name: str, m: _BatchNorm, dead_gamma: float) -> list[Finding]:
    """What can be seen without data: modes, running statistics, gamma."""
    found = []
    if not model.training and m.training:
        found.append(Finding(
            name, "train_mode_in_eval", "error",
            "the model is in evaluation mode but this layer is in training mode",
            {"model.training": False, "layer.training": True},
            "call model.eval() after any code that sets submodules' modes (or use "
            "batchnorm.tools.freeze for layers meant to stay fixed)",
        ))  # fmt: skip
    if m.running_mean is None:
        found.append(Finding(
            name, "no_running_stats", "info",
            "track_running_stats=False: evaluation normalizes with each batch's own statistics",
            {}, "fine when batches are large and alike; otherwise track running statistics",
        ))  # fmt: skip
    else:
        mean, var = m.running_mean.detach().double(), m.running_var.detach().double()
        bad = (~torch.isfinite(mean)) | (~torch.isfinite(var))
        if bad.any():
            found.append(Finding(
                name, "nonfinite_running_stats", "error",
                f"{int(bad.sum())} of {bad.numel()} channels have a non-finite running mean or variance",
                {"channels": _first(bad)},
                "recompute them: batchnorm.tools.recalibrate(model, train_batches), after finding "
                "the cause (a diverged step, an fp16 overflow)",
            ))  # fmt: skip
        negative = var < 0
        if negative.any():
            found.append(Finding(
                name, "negative_variance", "error",
                f"{int(negative.sum())} channels have a negative running variance",
                {"channels": _first(negative), "min_running_var": float(var.min())},
                "the checkpoint is corrupt or was converted wrongly; recalibrate the statistics",
            ))  # fmt: skip
        tracked = m.num_batches_tracked
        initial = bool((mean == 0).all() and (var == 1).all())
        if tracked is not None and int(tracked) == 0 and initial:
            found.append(Finding(
                name, "never_updated", "error",
                "num_batches_tracked is 0 and the running statistics are still mean 0, variance 1",
                {"num_batches_tracked": 0},
                "the layer never ran in training mode (or its statistics were not saved): "
                "batchnorm.tools.recalibrate(model, train_batches)",
            ))  # fmt: skip
    if m.weight is not None:
        dead = m.weight.detach().abs() < dead_gamma
        if dead.any():
            found.append(Finding(
                name, "dead_channels", "warning",
                f"{int(dead.sum())} of {dead.numel()} channels have |gamma| < {dead_gamma}: "
                "their output is the constant beta",
                {"channels": _first(dead), "fraction": float(dead.double().mean())},
                "expected after channel pruning (then remove them); otherwise lower the "
                "weight decay on gamma or re-initialize those channels",
            ))  # fmt: skip
    return found


def _bias_findings(model: nn.Module) -> list[Finding]:
    """A Linear/Conv with a bias whose output goes only to a batch-norm layer."""
    found = []
    for pair in pairs(model)[0]:
        producer = model.get_submodule(pair.producer)
        if (
            isinstance(pair.consumer.op, _BatchNorm)
            and isinstance(producer, (nn.Linear, _ConvNd))
            and producer.bias is not None
        ):
            found.append(Finding(
                pair.consumer.path, "bias_before_batchnorm", "info",
                f"{pair.producer} ({type(producer).__name__}) has a bias, cancelled by the mean subtraction",
                {"producer": pair.producer, "wasted_parameters": producer.bias.numel()},
                f"construct {pair.producer} with bias=False (beta plays its part)",
            ))  # fmt: skip
    return found


def _data_findings(model, layers, inputs, shift_tol, var_tol, gap_tol, min_values) -> list[Finding]:
    """Run the batches in evaluation mode (statistics of each layer's input, outputs), then
    with the batch-norm layers normalizing by batch statistics; put the model back."""
    captured: dict[str, list[Stats]] = {name: [] for name, _ in layers}  # one per batch
    hooks = [m.register_forward_pre_hook(input_stats_hook(captured[name]), with_kwargs=True) for name, m in layers]
    try:
        with leaves_no_trace(model, layers), torch.no_grad():
            model.eval()
            eval_out = [_flat(model(x)) for x in inputs]
            for h in hooks:
                h.remove()
            for _, m in layers:
                m.train()
            try:
                with frozen_stats(model):
                    train_out = [_flat(model(x)) for x in inputs]
            except ValueError:  # one value per channel: the small-batch finding says so
                train_out = None
    finally:
        for h in hooks:
            h.remove()

    found = []
    for name, m in layers:
        if not captured[name]:
            found.append(Finding(
                name, "not_reached", "info", "the batches never reached this layer", {}, "nothing to do if intended",
            ))  # fmt: skip
            continue
        smallest = int(min(float(stats.count[0]) for stats in captured[name]))
        if smallest < min_values:
            found.append(Finding(
                name, "small_batch", "warning",
                f"{smallest} values per channel per batch: batch statistics this noisy make "
                "training unstable and the running statistics unreliable",
                {"values_per_channel": smallest, "min_values": min_values},
                "use larger batches, SyncBatchNorm across devices (batchnorm.distributed), "
                "batch renormalization (batchnorm.Renorm), frozen statistics "
                "(batchnorm.tools.freeze) when fine-tuning, or a normalization that does not "
                "depend on the batch (batchnorm.replace_norm(model, 'group')); "
                "ghost batches only help with batches that are too large",
            ))  # fmt: skip
        if m.running_mean is not None:
            found += _stale(name, m, merge_all(captured[name]), shift_tol, var_tol)
    if train_out is not None:
        diff = math.sqrt(sum(float((a - b).double().square().sum()) for a, b in zip(train_out, eval_out)))
        norm = math.sqrt(sum(float(b.double().square().sum()) for b in eval_out))
        gap = diff / max(norm, 1e-12)
        if not math.isfinite(gap) or gap > gap_tol:
            found.append(Finding(
                "", "train_eval_gap", "warning",
                f"the output with batch statistics differs from the output with running "
                f"statistics by {gap:.3g} (relative)",
                {"relative_difference": gap, "gap_tol": gap_tol},
                "see the stale_statistics and small_batch findings; recalibrate the statistics "
                "on training data (batchnorm.tools.recalibrate) or adapt them to this data "
                "(batchnorm.tools.adapt)",
            ))  # fmt: skip
    return found


def _stale(name: str, m: _BatchNorm, data: Stats, shift_tol: float, var_tol: float) -> list[Finding]:
    """Compare the running statistics with the data's (see the module docstring)."""
    eps = m.eps
    running_mean, running_var = m.running_mean.double(), m.running_var.double().clamp(min=0)
    shift = ((data.mean - running_mean).abs() / (running_var + eps).sqrt()).mean()
    log_ratio = ((data.var + eps) / (running_var + eps)).log()
    n = float(data.count[0])
    shift_limit = max(shift_tol, 3 / math.sqrt(n))
    ratio_limit = max(math.log(var_tol), 3 * math.sqrt(2 / max(n - 1, 1)))
    mean_log_ratio = float(log_ratio.abs().mean())
    if not (float(shift) > shift_limit or mean_log_ratio > ratio_limit):
        return []
    return [Finding(
        name, "stale_statistics", "error",
        "the running statistics do not match the statistics of the data reaching this layer",
        {
            "mean_shift_in_std": float(shift),
            "shift_limit": shift_limit,
            "variance_ratio_geomean": math.exp(float(log_ratio.mean())),
            "mean_abs_log_variance_ratio": mean_log_ratio,
            "log_ratio_limit": ratio_limit,
            "values_per_channel_seen": int(n),
        },
        "after fine-tuning, weight averaging or pruning: batchnorm.tools.recalibrate(model, "
        "train_batches); for a new input domain: batchnorm.tools.adapt(model, target_batches)",
    )]  # fmt: skip


def _inputs(batches: Iterable[Any], max_batches: int, device: torch.device | None) -> list[Tensor]:
    out = []
    for i, batch in enumerate(batches):
        if i >= max_batches:
            break
        x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
        if not isinstance(x, Tensor):
            raise TypeError(f"batch {i}: expected a tensor or an (input, target) pair, got {type(batch).__name__}")
        out.append(x if device is None else x.to(device))
    return out


def _device(model: nn.Module) -> torch.device | None:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return None


def _flat(output: Any) -> Tensor:
    """Every tensor in a model's output (a tensor, or a tuple/list/dict of them) as one vector."""
    if isinstance(output, Tensor):
        return output.detach().flatten()
    values = output.values() if isinstance(output, dict) else output
    return torch.cat([_flat(v) for v in values if isinstance(v, (Tensor, tuple, list, dict))])


def _first(mask: Tensor, limit: int = 10) -> list[int]:
    """The indices where mask is true, at most `limit` of them."""
    return mask.nonzero().flatten()[:limit].tolist()


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
