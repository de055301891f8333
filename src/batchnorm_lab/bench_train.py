"""Training-step benchmarks behind `batchnorm bench train`: whole ResNets, ours against torch.

A training step is: forward of a batch (N, 3, H, W) to logits (N, classes), cross-entropy
against integer labels (N,), backward, and one SGD step (momentum 0.9). What is measured
is the wall time of that step (the device synchronized before and after it), with the
step's own host work (autograd, the optimizer's Python) included.

Each configuration (model x batch x memory format x dtype) runs four arms, built from the
same initial weights and fed the same sequence of batches:

- `torch eager`: the model as written, with `torch.nn.BatchNorm2d`;
- `torch compiled`: `torch.compile(model)`;
- `ours eager`: `bn.convert(model, fuse=True)`: our layers, ReLU and residual add fused;
- `ours compiled`: `torch.compile` of the converted model.

Each arm is first warmed up alone (`WARMUP_STEPS` steps; the first one, compilation
included, is reported as `first_step_s`; then, once the numba kernels that its first steps
asked for are compiled or loaded in the background, one more step: the rounds time the
steady state, `bench first-use` the first steps), then the arms are timed in interleaved rounds
(one step of each per round, `bench.time_medians`) so all see the same machine load. An arm
that raises, while being built, warmed up or timed, is recorded with its error message and
left out of the rounds; the others go on.

Reported per configuration: the median (and best) step time of each arm and the speed-ups
`time_torch / time_ours`: ours eager against torch eager, ours compiled against torch
compiled, and ours compiled against torch eager.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import time
from pathlib import Path
from typing import Callable

import torch
import typer
from torch import fx, nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from . import models
from batchnorm.backends import numba_warmup
from batchnorm.norm_act import BatchNormAct
from batchnorm.tools import convert

from .files import RESULTS
from .timing import load_average, machine_info, time_medians

ARMS = ("torch eager", "torch compiled", "ours eager", "ours compiled")
#: (speed-up name, torch's arm, our arm): speed-up = torch's median / ours.
SPEEDUPS = (
    ("ours_eager_vs_torch_eager", "torch eager", "ours eager"),
    ("ours_compiled_vs_torch_compiled", "torch compiled", "ours compiled"),
    ("ours_compiled_vs_torch_eager", "torch eager", "ours compiled"),
)
#: model name -> (constructor, input height = width, classes)
MODELS = {
    "resnet20": (models.resnet20, 32, 10),
    "resnet18": (models.resnet18, 64, 1000),
    "mobilenet_v2": (models.mobilenet_v2, 64, 1000),
    "resnet50": (models.resnet50, 224, 1000),
}
FORMATS = ("contiguous", "channels_last")
#: Steps each arm runs alone before the rounds. Two, so that a recompilation triggered by
#: the first step's side effects (buffers updated, a guard failing) is also out of the timing.
WARMUP_STEPS = 2
#: Distinct batches cycled through: enough that no arm times one batch over and over.
N_BATCHES = 4
ERROR_CHARS = 500  # of an error message kept in the JSON; dynamo's run to pages


def configurations(device: str, quick: bool) -> list[dict]:
    """The grid, fp32 in both memory formats: CIFAR ResNet-20 at batch 64 and 128, ResNet-18
    and MobileNetV2 (where batch norm and its activation weigh most) at batch 32 on 64x64
    images; on CUDA also ResNet-50 at batch 128, channels_last, bf16 autocast. Quick:
    ResNet-20 at batch 8."""
    if quick:
        return [dict(model="resnet20", batch=8, format=f, dtype="fp32") for f in FORMATS]
    sizes = (("resnet20", 64), ("resnet20", 128), ("resnet18", 32), ("mobilenet_v2", 32))
    grid = [dict(model=m, batch=b, format=f, dtype="fp32") for m, b in sizes for f in FORMATS]
    if device == "cuda":
        grid.append(dict(model="resnet50", batch=128, format="channels_last", dtype="bf16"))
    return grid


def speedups(ms: dict[str, float | None]) -> dict[str, float | None]:
    """time_torch / time_ours for each pair of `SPEEDUPS`; None where either arm has no time."""
    return {name: ms[a] / ms[b] if ms.get(a) and ms.get(b) else None for name, a, b in SPEEDUPS}


def _error(e: BaseException) -> str:
    """`Type: message`, cut to ERROR_CHARS characters (dynamo's messages run to pages)."""
    text = f"{type(e).__name__}: {str(e).strip()}"
    return text if len(text) <= ERROR_CHARS else text[: ERROR_CHARS - 3] + "..."


def _dynamo_counts() -> dict[str, int]:
    """Graph breaks and graphs compiled so far in this process (dynamo's global counters)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # a torch without dynamo: nothing is compiled
        return dict(graph_breaks=0, graphs=0)
    return dict(graph_breaks=sum(counters["graph_break"].values()), graphs=counters["stats"]["unique_graphs"])


def _fusion(model: nn.Module) -> dict[str, int]:
    """How many batch norms the converted model has, with an activation fused, and with a
    residual input (a call with two arguments in the rewritten graph)."""
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    residual = 0
    if isinstance(model, fx.GraphModule):
        residual = sum(
            1 for n in model.graph.nodes
            if n.op == "call_module" and len(n.args) == 2 and isinstance(model.get_submodule(n.target), BatchNormAct)
        )  # fmt: skip
    fused = sum(isinstance(m, BatchNormAct) for m in model.modules())
    return dict(batch_norms=len(bns), fused_activation=fused, fused_residual=residual)


def _batches(cfg: dict, device: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """N_BATCHES (x (N, 3, H, W) in the configuration's memory format, labels (N,)), seeded."""
    _, size, classes = MODELS[cfg["model"]]
    gen = torch.Generator(device="cpu").manual_seed(1)
    fmt = torch.channels_last if cfg["format"] == "channels_last" else torch.contiguous_format
    out = []
    for _ in range(N_BATCHES):
        x = torch.randn(cfg["batch"], 3, size, size, generator=gen)
        y = torch.randint(classes, (cfg["batch"],), generator=gen)
        out.append((x.to(device).contiguous(memory_format=fmt), y.to(device)))
    return out


def _arm_model(arm: str, base: nn.Module) -> tuple[nn.Module, dict | None]:
    """The arm's model, a deep copy of `base` (so every arm starts from the same weights),
    and for our arms what the conversion fused."""
    model = copy.deepcopy(base)
    fusion = None
    if arm.startswith("ours"):
        model, _ = convert(model, fuse=True)
        fusion = _fusion(model)
    if arm.endswith("compiled"):
        model = torch.compile(model)
    return model, fusion


class _Step:
    """One training step of `model` on the next of `batches` (cycled); returns the loss."""

    def __init__(self, model: nn.Module, batches: list, device: str, autocast: torch.dtype | None) -> None:
        self.model, self.batches, self.device, self.autocast = model, batches, device, autocast
        self.opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        self.restart()

    def restart(self) -> None:
        """Back to the first batch, so arms re-timed after another failed see the same sequence."""
        self.next = itertools.cycle(self.batches).__next__

    def __call__(self) -> torch.Tensor:
        x, y = self.next()
        cast = contextlib.nullcontext() if self.autocast is None else torch.autocast(self.device, dtype=self.autocast)
        with cast:
            loss = F.cross_entropy(self.model(x), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss


def _recording(arm: str, step: Callable, errors: dict[str, str]) -> Callable:
    """`step`, noting under `arm` the error it raises (re-raised: `time_medians` stops)."""

    def run():
        try:
            return step()
        except Exception as e:
            errors[arm] = _error(e)
            raise

    return run


def bench_config(
    cfg: dict, device: str, repeats: int, arms=ARMS, on_arm: Callable[[str], None] = lambda arm: None
) -> dict:
    """One configuration's row: per arm its status ("ok", "error" or "skipped"), median and
    best step ms, first-step seconds (compilation included), first loss, and for compiled
    arms dynamo's graph breaks and graphs over the warm-up; the speed-ups; what the
    conversion fused. `arms`: the arms to run (the others are recorded as skipped)."""
    build, _, _ = MODELS[cfg["model"]]
    # Each configuration compiles from scratch, as in a fresh process: otherwise dynamo,
    # having seen another batch size for the same code, compiles with dynamic shapes.
    torch.compiler.reset()
    torch.manual_seed(0)
    base = build().to(device)
    if cfg["format"] == "channels_last":
        base = base.to(memory_format=torch.channels_last)
    batches = _batches(cfg, device)
    autocast = torch.bfloat16 if cfg["dtype"] == "bf16" else None
    row = dict(cfg, image=MODELS[cfg["model"]][1], arms={}, fusion=None)
    errors: dict[str, str] = {}
    steps: dict[str, _Step] = {}
    for arm in ARMS:
        rec = dict(status="skipped", ms=None, min_ms=None, first_step_s=None, first_loss=None, error=None)
        row["arms"][arm] = rec
        if arm not in arms:
            continue
        before = _dynamo_counts()
        try:
            model, fusion = _arm_model(arm, base)
            row["fusion"] = fusion or row["fusion"]
            step = _Step(model, batches, device, autocast)
            for i in range(WARMUP_STEPS):
                t0 = _now(device)
                loss = step()
                if i == 0:
                    rec.update(first_step_s=_now(device) - t0, first_loss=loss.item())
            # Until its kernels are ready a call runs torch's (numba_warmup.py); the helper
            # process compiling or loading them only gets the cores the timed rounds leave.
            numba_warmup.wait()
            step()
            steps[arm] = step
            rec["status"] = "ok"
        except Exception as e:
            rec.update(status="error", error=_error(e), phase="build or warm-up")
        if arm.endswith("compiled"):
            after = _dynamo_counts()
            rec.update({k: after[k] - before[k] for k in after})
        on_arm(arm)
    before = _dynamo_counts()
    times = _time_rounds(steps, errors, repeats, device)
    row["graphs_while_timing"] = _dynamo_counts()["graphs"] - before["graphs"]
    for arm, message in errors.items():
        row["arms"][arm].update(status="error", error=message, phase="timed rounds")
    for arm, (median, best) in times.items():
        row["arms"][arm].update(ms=median * 1e3, min_ms=best * 1e3)
    row["speedups"] = speedups({arm: rec["ms"] for arm, rec in row["arms"].items()})
    return row


def _now(device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def _time_rounds(steps: dict[str, _Step], errors: dict[str, str], repeats: int, device: str) -> dict:
    """`time_medians` over the arms; an arm that raises is dropped and the rest timed again."""
    live = dict(steps)
    while live:
        for step in live.values():
            step.restart()
        try:
            return time_medians({a: _recording(a, s, errors) for a, s in live.items()}, repeats, device)
        except Exception:
            failed = [a for a in live if a in errors]
            if not failed:  # not an arm's step: a bug here
                raise
            for arm in failed:
                del live[arm]
    return {}


def run(device: str, quick: bool, repeats: int, compile: bool = True, progress: bool = True) -> dict:
    """All configurations; the result dict that `render` and the JSON take."""
    from rich.progress import Progress

    arms = ARMS if compile else tuple(a for a in ARMS if not a.endswith("compiled"))
    grid = configurations(device, quick)
    load_before = load_average()
    rows = []
    # cudnn picks its fastest convolutions, as a training script would: the same for every arm
    with torch.backends.cudnn.flags(enabled=True, benchmark=True), Progress(disable=not progress) as bar:
        task = bar.add_task("bench train", total=len(grid) * (len(arms) + 1))
        for cfg in grid:
            name = f"{cfg['model']} b{cfg['batch']} {cfg['format']}"

            def on_arm(arm, name=name):
                bar.update(task, advance=1, description=f"{name}: warmed up {arm}")

            bar.update(task, description=f"{name}: warm-up")
            rows.append(bench_config(cfg, device, repeats, arms, on_arm))
            bar.update(task, advance=1, description=f"{name}: timed")
    return dict(
        machine=machine_info(device), repeats=repeats, quick=quick, compile=compile, warmup_steps=WARMUP_STEPS,
        rows=rows, load_before=load_before, load_after=load_average(),
    )  # fmt: skip


def _errors(result: dict) -> dict[tuple[int, str], int]:
    """(row index, arm) -> footnote number, for every arm that raised, in table order."""
    failed = [(i, a) for i, r in enumerate(result["rows"]) for a in ARMS if r["arms"][a]["status"] == "error"]
    return {key: n + 1 for n, key in enumerate(failed)}


def _cell(result: dict, i: int, arm: str, value: Callable[[dict], str]) -> str:
    rec = result["rows"][i]["arms"][arm]
    if rec["status"] == "skipped":
        return "not run"
    if rec["status"] == "error":
        return f"error [{_errors(result)[i, arm]}]"
    return value(rec)


def times_table(result: dict) -> list[str]:
    """Markdown lines: per configuration the arms' median step ms and the three speed-ups."""
    ms = lambda rec: "-" if rec["ms"] is None else f"{rec['ms']:.1f}"  # noqa: E731
    x = lambda v: "-" if v is None else f"{v:.2f}x"  # noqa: E731
    head = ["model", "batch", "format", "dtype", *(f"{a} ms" for a in ARMS),
            "ours / torch eager", "ours / torch compiled", "ours compiled / torch eager"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 4 + "---:|" * (len(head) - 4)]
    for i, r in enumerate(result["rows"]):
        cells = [r["model"], str(r["batch"]), r["format"], r["dtype"]]
        cells += [_cell(result, i, a, ms) for a in ARMS]
        cells += [x(r["speedups"][name]) for name, _, _ in SPEEDUPS]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render(result: dict) -> str:
    """The markdown page (docs/bench-train.md) from a result dict."""
    first = lambda rec: "-" if rec["first_step_s"] is None else f"{rec['first_step_s']:.2f}"  # noqa: E731
    whead = ["model", "batch", "format", *(f"{a} s" for a in ARMS), "graph breaks (torch / ours compiled)",
             "graphs (torch / ours compiled)"]  # fmt: skip
    lines = [
        "# Training-step benchmarks",
        "",
        "Generated by `batchnorm bench train` (src/batchnorm_lab/bench_train.py); do not edit by hand.",
        "One training step = forward, cross-entropy, backward, SGD (momentum 0.9) step, timed as a whole "
        "(device synchronized around it). Four arms from the same initial weights on the same batches: torch's "
        "`nn.BatchNorm2d` eager and under `torch.compile`, and `bn.convert(model, fuse=True)` (our layers, ReLU "
        "and residual add fused) eager and under `torch.compile`. Each arm is warmed up alone "
        f"({result['warmup_steps']} steps, compilation included), then the arms are timed in interleaved "
        f"rounds; medians of {result['repeats']} rounds. Speed-ups are torch's time / ours (> 1: ours is faster).",
        "",
        "## Machine",
        "",
        *(f"- {k}: {v}" for k, v in result["machine"].items()),
        f"- load average before / after: {result['load_before']} / {result['load_after']}",
        "",
        "## Step times (median ms) and speed-ups",
        "",
        *times_table(result),
        "",
        "## Warm-up: the first step (s), compilation included",
        "",
        "Graph breaks and graphs compiled: dynamo's counts over each compiled arm's warm-up (one graph and no "
        "break: the whole model compiled as one). Graphs compiled during the timed rounds (recompilations) are "
        "in the JSON as `graphs_while_timing`.",
        "",
        "| " + " | ".join(whead) + " |",
        "|" + "---|" * 3 + "---:|" * (len(whead) - 3),
    ]
    for i, r in enumerate(result["rows"]):
        cells = [r["model"], str(r["batch"]), r["format"], *(_cell(result, i, a, first) for a in ARMS)]
        for key in ("graph_breaks", "graphs"):
            cells.append(" / ".join(str(r["arms"][a].get(key, "-")) for a in ("torch compiled", "ours compiled")))
        lines.append("| " + " | ".join(cells) + " |")
    fusions = {r["model"]: r["fusion"] for r in result["rows"] if r["fusion"]}
    if fusions:
        lines += ["", "## What `bn.convert(model, fuse=True)` fused", ""]
        lines += [f"- {k}: {f['batch_norms']} batch norms, {f['fused_activation']} with the ReLU fused, "
                  f"{f['fused_residual']} with the residual add fused" for k, f in fusions.items()]  # fmt: skip
    if _errors(result):
        lines += ["", "## Errors", "", "An arm that raised was left out of the timed rounds. Each message's first line:"]
        lines += [""]
        lines += error_list(result)
    return "\n".join(lines) + "\n"


def error_list(result: dict) -> list[str]:
    """Markdown lines, one per arm that raised: its footnote number, where it raised, the message's first line."""
    lines = []
    for (i, arm), n in _errors(result).items():
        rec = result["rows"][i]["arms"][arm]
        lines.append(f"{n}. {_label(result['rows'][i])}, {arm} ({rec['phase']}): `{rec['error'].splitlines()[0]}`")
    return lines


def _label(row: dict) -> str:
    return f"{row['model']} batch {row['batch']} {row['format']} {row['dtype']}"


def train_bench_command(
    device: str = typer.Option("cpu", help="cpu or cuda (cuda adds a ResNet-50 row, bf16 autocast)."),
    repeats: int = typer.Option(None, min=1, help="Timed rounds per configuration (default 7; 2 with --quick)."),
    quick: bool = typer.Option(False, help="ResNet-20 at batch 8 only, 2 rounds (for tests)."),
    compile: bool = typer.Option(True, "--compile/--no-compile", help="Run the two torch.compile arms."),
    out: Path = typer.Option(RESULTS, help="Folder for the JSON results (train-<device>.json; this project's: "
                             "--out docs/bench)."),  # fmt: skip
    markdown: Path = typer.Option(None, help="Where to render the tables (default OUT/bench-train.md; "
                                  "OUT/bench-train-cuda.md with --device cuda)."),  # fmt: skip
) -> None:
    """Time whole ResNet training steps: torch vs ours, eager and compiled; write JSON and markdown."""
    if device not in ("cpu", "cuda"):
        raise typer.BadParameter(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise typer.BadParameter("--device cuda: torch sees no CUDA device here; use --device cpu")
    repeats = repeats or (2 if quick else 7)
    result = run(device, quick, repeats, compile)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"train-{device}{'-quick' if quick else ''}.json"
    path.write_text(json.dumps(result, indent=1))
    markdown = markdown or out / f"bench-train{'-cuda' if device == 'cuda' else ''}.md"
    markdown.parent.mkdir(parents=True, exist_ok=True)
    markdown.write_text(render(result))
    typer.echo("\n".join(times_table(result) + error_list(result)))
    typer.echo(f"wrote {path} and {markdown}")
