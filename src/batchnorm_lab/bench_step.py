"""Where a training step's time goes: `batchnorm bench step`.

For each model of `bench train` (bench_train.MODELS) at one batch and memory format, each
arm's training step (forward, cross-entropy, backward, SGD) is timed and then profiled
(torch.profiler, CPU), and the self time of every op the step runs is put in a category:

- `convolution`: the convolutions and linear layers, forward and backward;
- `batch norm, activation, add`: batch norm, forward and backward, whoever computes it
  (torch's kernels, ours, their autograd nodes), and the activations and residual adds
  (torch's arms run them as ops of their own, ours fuse some into the batch norm);
- `copies and layout`: copies, layout and dtype conversions, allocations of new tensors;
- `optimizer`: the SGD step (everything under `Optimizer.step`) and zeroing the gradients;
- `other ops`: every other op (pooling, the loss, views, a compiled graph's own kernels);
- `python and dispatch`: the step's wall time that no op accounts for (the autograd
  engine's and the modules' Python, the dispatcher, the profiler's own cost).

Next to the arms, `ceiling`: torch's model with every batch norm replaced by an identity,
what a step would cost if batch norm were free; no batch-norm code can make a step faster.

The categories come from one profiled run of `PROFILED_STEPS` steps (self CPU time of the
calling thread, so an op's multithreaded work counts once, as its wall time); the step time
is the median of `repeats` unprofiled steps, interleaved across the arms (bench.time_medians).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import typer
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

from batchnorm.norm_act import BatchNormAct
from batchnorm.tools._common import batchnorm_layers, is_batchnorm

from . import bench_train
from .files import RESULTS, write_atomic
from .timing import machine_info, time_medians

CATEGORIES = ("convolution", "batch norm, activation, add", "copies and layout", "optimizer", "other ops", "python and dispatch")
ARMS = ("torch eager", "ours eager", "torch compiled", "ours compiled", "ceiling")
PROFILED_STEPS = 3

# Profiler event names (lower case) by category. An op counts in the category of its
# outermost categorized scope: the optimizer's adds are the optimizer's, an allocation inside
# a convolution is the convolution's, a backward node's ops are its forward op's.
_MATCHES = (
    ("optimizer", ("optimizer.", "_foreach_")),
    ("batch norm, activation, add", ("batch_norm", "batchnorm", "batch norm", "relu", "hardtanh", "hardswish", "silu", "aten::add",
                    "addbackward")),
    ("convolution", ("convolution", "conv2d", "addmm", "linear", "aten::mm", "mmbackward")),
    ("copies and layout", ("copy_", "clone", "contiguous", "_to_copy", "aten::to", "empty", "zeros", "ones")),
)  # fmt: skip
_SCOPE = "batch norm forward"  # what `_instrument` names a batch-norm module's forward


def category(name: str) -> str | None:
    """The category of a profiler event named `name`, None when its name says nothing."""
    name = name.lower()
    for cat, needles in _MATCHES:
        if any(needle in name for needle in needles):
            return cat
    return None


def _category_of(event) -> str:
    """The category of the outermost scope around `event` (itself included) that has one."""
    names = []
    while event is not None:
        names.append(event.name)
        event = event.cpu_parent
    return next((c for c in map(category, reversed(names)) if c is not None), "other ops")


def _without_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of `model` with every batch-norm layer replaced by nn.Identity."""
    model = copy.deepcopy(model)
    for path, _ in batchnorm_layers(model):
        model.set_submodule(path, nn.Identity())
    return model


def _instrument(model: nn.Module) -> nn.Module:
    """Each batch-norm module's forward (torch's, ours, a BatchNormAct) inside a profiler
    scope: our kernels are no torch ops, so without it their forward time would show as
    Python. Backward needs none: the autograd node's event holds it."""
    for m in model.modules():
        if is_batchnorm(m) or isinstance(m, BatchNormAct):
            m.forward = _scoped(m.forward)
    return model


def _scoped(forward):
    def run(*args, **kwargs):
        with record_function(_SCOPE):
            return forward(*args, **kwargs)

    return run


def _arm(arm: str, base: nn.Module) -> nn.Module:
    if arm == "ceiling":
        return _without_batchnorm(base)
    model = bench_train._arm_model(arm, base)[0]
    # a compiled graph's kernels carry the names of what they compute; a scope would break it
    return model if arm.endswith("compiled") else _instrument(model)


def _profile(step, steps: int) -> dict[str, float]:
    """ms per step of each op category over `steps` profiled steps (python and dispatch excluded)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    totals = dict.fromkeys(CATEGORIES[:-1], 0.0)
    for event in prof.events():
        totals[_category_of(event)] += event.self_cpu_time_total
    return {cat: us / 1e3 / steps for cat, us in totals.items()}


def account(model: str, batch: int, fmt: str, repeats: int, arms=ARMS) -> dict:
    """One model's row: per arm the median step ms and the ms of each category. Inductor's
    C++ kernels are compiled with a profiler scope each (named after the ops they fuse),
    without which a compiled graph's whole time would be one opaque event."""
    import torch._inductor.config  # here: importing Inductor takes seconds, which every command would wait for

    with torch._inductor.config.patch({"cpp.enable_kernel_profile": True}):
        return _account(model, batch, fmt, repeats, arms)


def _account(model: str, batch: int, fmt: str, repeats: int, arms) -> dict:
    cfg = dict(model=model, batch=batch, format=fmt, dtype="fp32")
    build = bench_train.MODELS[model][0]
    torch.compiler.reset()
    torch.manual_seed(0)
    base = build()
    if fmt == "channels_last":
        base = base.to(memory_format=torch.channels_last)
    batches = bench_train._batches(cfg, "cpu")
    steps = {}
    for arm in arms:
        step = bench_train._Step(_arm(arm, base), batches, "cpu", None)
        for _ in range(bench_train.WARMUP_STEPS):
            step()
        steps[arm] = step
    times = time_medians(steps, repeats, "cpu")
    row = dict(cfg, image=bench_train.MODELS[model][1], arms={})
    for arm, step in steps.items():
        ms = times[arm][0] * 1e3
        cats = _profile(step, PROFILED_STEPS)
        cats["python and dispatch"] = max(ms - sum(cats.values()), 0.0)
        row["arms"][arm] = dict(ms=ms, categories=cats)
    return row


def render(result: dict) -> str:
    """The markdown page: per model, one line per arm, ms per category and the step."""
    lines = ["# Where a training step's time goes", "",
             "Generated by `batchnorm bench step` (src/batchnorm_lab/bench_step.py); do not edit by hand.", "",
             "ms per training step (batch, fp32, CPU). `ceiling`: torch's model with batch norm removed.", ""]  # fmt: skip
    lines += [f"- {k}: {v}" for k, v in result["machine"].items()] + [""]
    for row in result["rows"]:
        lines += [f"## {row['model']}, batch {row['batch']}, {row['image']}x{row['image']}, {row['format']}", ""]
        lines += ["| arm | step | " + " | ".join(CATEGORIES) + " |", "|---|---:|" + "---:|" * len(CATEGORIES)]
        for arm, rec in row["arms"].items():
            cells = " | ".join(f"{rec['categories'][c]:.1f}" for c in CATEGORIES)
            lines.append(f"| {arm} | {rec['ms']:.1f} | {cells} |")
        lines.append("")
    return "\n".join(lines)


def step_command(
    out: Path = typer.Option(RESULTS, help="Folder for step-cpu.json (this project's: --out docs/bench)."),
    markdown: Path = typer.Option(None, help="Where to render the tables (default OUT/bench-step.md)."),
    models: list[str] = typer.Option(["resnet20", "resnet18", "mobilenet_v2"], "--model", help="Models (repeatable)."),
    batch: int = typer.Option(32, help="Batch size."),
    fmt: str = typer.Option("contiguous", "--format", help="contiguous or channels_last."),
    repeats: int = typer.Option(15, help="Timed rounds (each runs every arm once)."),
    compile: bool = typer.Option(True, "--compile/--no-compile", help="Also the torch.compile arms."),
) -> None:
    """Account for a training step by op category, torch's layers against ours, with the ceiling."""
    if fmt not in bench_train.FORMATS:
        raise typer.BadParameter(f"--format must be one of {bench_train.FORMATS}, got {fmt!r}")
    unknown = [m for m in models if m not in bench_train.MODELS]
    if unknown:
        raise typer.BadParameter(f"unknown model {unknown[0]!r}; choose from {sorted(bench_train.MODELS)}")
    arms = ARMS if compile else tuple(a for a in ARMS if "compiled" not in a)
    rows = [account(m, batch, fmt, repeats, arms) for m in models]
    result = dict(machine=machine_info("cpu"), rows=rows)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "step-cpu.json"
    write_atomic(path, json.dumps(result, indent=1).encode())
    markdown = markdown or out / "bench-step.md"
    markdown.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(markdown, render(result).encode())
    typer.echo(render(result))
    typer.echo(f"wrote {path} and {markdown}")
