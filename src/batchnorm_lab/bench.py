"""Kernel benchmarks behind `batchnorm bench kernels`: our `auto` against torch, in one process.

For each row of a grid (shape x memory format x mode x variant) the benchmark times, with
the same inputs and interleaved so both see the same machine load:

- torch eager: `torch.nn.BatchNorm{1,2}d` followed by `torch.relu` (and `+ residual`),
- ours: `batchnorm.BatchNormAct(batchnorm.BatchNorm{1,2}d(backend="auto"), activation)(x, residual)`,
- on CUDA also `torch.compile` of the same torch module,

and reports medians of repeated runs, the ratio torch / ours, and the bandwidth ours
achieves at the *minimal* traffic of the op (bytes it must read and write at least,
`minimal_bytes`) against a copy of the same tensor into a preallocated one, timed in the
same rounds: the memory system's rate without the OS's cost of fresh pages (which
`x.clone()` pays, and torch eager's outputs pay on large tensors).

Modes: `eval` (forward with running statistics), `train` (forward with batch statistics,
no autograd) and `train_fb` (forward + backward, gradients of x, weight, bias, residual).

Results go to JSON (`--out`, default `results/`), and a markdown page beside them
(`--markdown`; this project's docs/benchmarks.md, with `--out docs/bench`) is rendered from
them together with the crossover sweep (where `auto` starts to prefer numba over aten).
How the kernels move memory, and what the numbers mean, is in `docs/performance.md`.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

import torch
import typer

from batchnorm import backends
from batchnorm.nn import BatchNorm1d, BatchNorm2d
from batchnorm.norm_act import BatchNormAct
from batchnorm.tools.monitor import EVERY as MONITOR_EVERY
from batchnorm.tools.monitor import monitor

from .bench_grid import MODES, VARIANTS, grid
from .files import RESULTS
from .timing import bench_row, load_average, machine_info, minimal_bytes, runner, time_medians

bench_app = typer.Typer(help="Benchmarks against torch: kernels, whole training steps.", no_args_is_help=True)

# Elements of the crossover sweeps ((N, 64, L <= 64) and channels-last (N, 64, 8, 8), fp32):
# every factor of 2 around the crossovers (2^18 contiguous, 2^21 channels-last), 4 elsewhere.
CROSSOVER_SIZES = [2**k for k in (12, 14, 16, 17, 18, 19, 20, 21, 22, 24)]


def kernel_passes(fmt: str, variant: str) -> int:
    """Passes over an activation-sized tensor (reads + writes) that our numba kernels make in
    forward + backward on a CNN row. Channels-first, a channel's slice stays in L2 between the
    kernels' two sweeps (true of every CNN shape of the grid: 800 KB at most): forward reads x
    and writes y, backward reads x and dy and writes dx (5), + a residual read forward and a
    residual read and dresidual write backward (ReLU's slope needs u) (8). Channels-last no
    value can be finished before the last row is read: statistics then normalize (3), grad
    sums then apply (5), 8; with the residual 4 + 8 = 12."""
    residual = VARIANTS[variant][1]
    if fmt == "contiguous":
        return 8 if residual else 5
    return 12 if residual else 8


def copy_rate_ratio(row: dict) -> float:
    """The ratio to torch ours would reach on a CNN forward + backward row if every pass its
    kernels make ran at the rate of the copy timed in the same run, and nothing else cost
    time: torch_ms / (passes x tensor bytes / copy rate). A yardstick, not a ceiling: a pass
    that only reads can go faster than a copy."""
    tensor_bytes = row["minimal_bytes"] / minimal_bytes(1, 1, row["mode"], VARIANTS[row["variant"]][1])
    passes_ms = kernel_passes(row["format"], row["variant"]) * tensor_bytes / (row["copy_gbps"] * 1e9) * 1e3
    return row["torch_ms"] / passes_ms


def crossover(device: str, repeats: int, sizes=CROSSOVER_SIZES, channels_last: bool = False) -> dict:
    """numba vs aten, fp32 forward+backward with ReLU on (N, 64, L) (channels_last: (N, 64, 8,
    8) in channels-last memory): the ratio per size and the smallest size from which numba
    is never slower."""
    points = []
    for numel in sizes:
        x, dy = _sweep_input(numel, device, channels_last)
        fns = {}
        for name in ("aten", "numba"):
            m = BatchNormAct((BatchNorm2d if channels_last else BatchNorm1d)(64, backend=name, device=device), "relu")
            fns[name] = runner(m, "train_fb", x, None, dy, True, "relu")
        t = {k: v[1] for k, v in time_medians(fns, repeats, device).items()}  # best of: less noisy
        points.append(dict(numel=x.numel(), aten_ms=t["aten"] * 1e3, numba_ms=t["numba"] * 1e3,
                           ratio=t["aten"] / t["numba"]))  # fmt: skip
    return dict(points=points, crossover_numel=_never_slower_from(points))


def _sweep_input(numel: int, device: str, channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, dy) of a size sweep with about `numel` elements, x a leaf: fp32 (N, 64, L <= 64),
    or (N, 64, 8, 8) channels-last."""
    if channels_last:
        shape, fmt = (max(1, numel // (64 * 64)), 64, 8, 8), torch.channels_last
    else:
        shape, fmt = (max(1, numel // (64 * 64)), 64, min(64, max(1, numel // 64))), torch.contiguous_format
    x, dy = (torch.randn(shape, device=device).contiguous(memory_format=fmt) for _ in range(2))
    return x.requires_grad_(), dy


def _crossover_table(points: list[dict]) -> list[str]:
    return [
        "| elements | aten ms | numba ms | aten / numba |",
        "|---:|---:|---:|---:|",
        *(f"| {p['numel']} | {p['aten_ms']:.3f} | {p['numba_ms']:.3f} | {p['ratio']:.2f} |" for p in points),
    ]


def _channels_last_crossover(result: dict) -> list[str]:
    """The channels-last sweep's paragraph and table (absent from runs that predate it)."""
    cross = result.get("crossover_channels_last")
    if not cross or not cross["points"]:
        return []
    return [
        f"Channels-last input, (N, 64, 8, 8) in channels-last memory, same measure: **{cross['crossover_numel']}**. "
        "`auto` uses `batchnorm.backends.numba_cpu.CROSSOVER_NUMEL_CHANNELS_LAST` = "
        f"{result['crossover_setting_channels_last']} there.",
        "",
        *_crossover_table(cross["points"]),
        "",
    ]


def _never_slower_from(points: list[dict]) -> int | None:
    """The smallest size of a sweep from which every point's ratio is at least 1."""
    wins = [p["ratio"] >= 1.0 for p in points]
    first = next((i for i in range(len(points)) if all(wins[i:])), None)
    return None if first is None else points[first]["numel"]


def compile_crossover(device: str, repeats: int, sizes=CROSSOVER_SIZES) -> dict:
    """Under torch.compile, our kernel as one opaque op against Inductor's code from the
    decomposition: fp32 (N, 64, L) BN + ReLU forward + backward of our layer compiled with the
    fast backend (numba on CPU, triton on CUDA: the custom op) and with `aten` (Inductor
    generates the batch norm), and torch's own layer with a ReLU module compiled together, per size. The rule that
    compiled models follow (they take the backend `auto` picks) holds where the op is not
    slower from the crossover on."""
    fast = "numba" if device == "cpu" else "triton"
    points = []
    for numel in sizes:
        x, dy = _sweep_input(numel, device)
        fns = {}
        for name in ("inductor", "op", "torch"):
            torch._dynamo.reset()
            if name == "torch":  # the ReLU inside the compiled region, as in a compiled model
                m = torch.nn.Sequential(torch.nn.BatchNorm1d(64, device=device), torch.nn.ReLU())
                fns[name] = runner(torch.compile(m), "train_fb", x, None, dy, False, None)
            else:
                m = BatchNormAct(BatchNorm1d(64, backend="aten" if name == "inductor" else fast, device=device), "relu")
                fns[name] = runner(torch.compile(m), "train_fb", x, None, dy, True, "relu")
            fns[name]()  # compile now, outside the timed rounds
        t = {k: v[1] for k, v in time_medians(fns, repeats, device).items()}  # best of: less noisy
        points.append(dict(numel=x.numel(), inductor_ms=t["inductor"] * 1e3, op_ms=t["op"] * 1e3,
                           torch_compiled_ms=t["torch"] * 1e3, ratio=t["inductor"] / t["op"],
                           ratio_vs_torch_compiled=t["torch"] / t["op"]))  # fmt: skip
    return dict(machine=machine_info(device), backend=fast, points=points, op_wins_from_numel=_never_slower_from(points))


def render_compile_crossover(result: dict) -> str:
    """docs/bench-compile.md from `compile_crossover`'s result."""
    from batchnorm.backends import numba_cpu

    lines = [
        "# Under torch.compile: our kernel as an op, or Inductor's code",
        "",
        "Generated by `batchnorm bench compile` (src/batchnorm_lab/bench.py); do not edit by hand. fp32",
        "(N, 64, L) BN + ReLU forward + backward, best of the interleaved runs: our layer compiled with",
        f"`{result['backend']}` (the custom op `batchnorm::batch_norm`, opaque to Inductor), with `aten`",
        "(Inductor generates code from torch's batch norm), and torch's `BatchNorm1d` + `ReLU` compiled together.",
        "",
        *(f"- {k}: {v}" for k, v in result["machine"].items()),
        "",
        "| elements | Inductor ms | our op ms | torch compiled ms | Inductor / op | torch compiled / op |",
        "|---:|---:|---:|---:|---:|---:|",
        *(f"| {p['numel']} | {p['inductor_ms']:.3f} | {p['op_ms']:.3f} | {p['torch_compiled_ms']:.3f} "
          f"| {p['ratio']:.2f} | {p['ratio_vs_torch_compiled']:.2f} |" for p in result["points"]),
        "",
        f"The op is never slower from {result['op_wins_from_numel']} elements on. A compiled model takes",
        "the backend `auto` picks for each layer's shape, as eager mode does: the op from",
        f"{numba_cpu.CROSSOVER_NUMEL} elements on the CPU (the eager crossover), Inductor's code below.",
    ]
    return "\n".join(lines) + "\n"


def summarize(rows: list[dict]) -> dict:
    """What the targets are stated on: geomean over CNN fwd+bwd rows, BN+ReLU rows, worst row,
    largest rows (fp32 rows only: the targets are stated for fp32)."""
    rows = [r for r in rows if r.get("dtype", "float32") == "float32"]
    fb = [r for r in rows if r["mode"] == "train_fb"]
    cnn = [r for r in fb if len(r["shape"]) == 4]
    relu = [r for r in fb if r["variant"] == "relu"]
    largest = max((math.prod(r["shape"]) for r in fb), default=0)
    big = [r for r in fb if math.prod(r["shape"]) == largest]
    geo = lambda rs: math.exp(statistics.fmean(math.log(r["ratio"]) for r in rs)) if rs else None  # noqa: E731
    geo_min = lambda rs: math.exp(statistics.fmean(math.log(r["ratio_min"]) for r in rs)) if rs else None  # noqa: E731
    at_copy_rate = lambda rs: math.exp(statistics.fmean(math.log(copy_rate_ratio(r)) for r in rs)) if rs else None  # noqa: E731
    cnn_relu = [r for r in cnn if r["variant"] == "relu"]
    return dict(
        copy_rate_cnn_fb=at_copy_rate(cnn), geomean_cnn_relu_fb=geo(cnn_relu),
        copy_rate_cnn_relu_fb=at_copy_rate(cnn_relu),
        geomean_cnn_fb=geo(cnn), geomean_relu_fb=geo(relu),
        geomean_cnn_fb_best=geo_min(cnn), geomean_relu_fb_best=geo_min(relu),
        min_ratio_fb_best=min((r["ratio_min"] for r in fb), default=None),
        largest_copy_fraction_best=min((r["copy_fraction_best"] for r in big), default=None),
        min_ratio=min((r["ratio"] for r in rows), default=None),
        min_ratio_fb=min((r["ratio"] for r in fb), default=None),
        largest_copy_fraction=min((r["copy_fraction"] for r in big), default=None),
    )  # fmt: skip


def render(result: dict, notes: str = "") -> str:
    """docs/benchmarks.md from a result dict."""
    m, s, cross = result["machine"], result["summary"], result["crossover"]
    fmt = lambda v, spec=".2f": "-" if v is None else format(v, spec)  # noqa: E731
    compiled = any("compile_ms" in r for r in result["rows"])
    head = "| shape | format | mode | variant | backend | torch ms | ours ms | ratio | ratio (best) |"
    head += " compile ms | ratio vs compile |" if compiled else ""
    head += " ours GB/s | copy GB/s | % of copy |"
    lines = [
        "# Kernel benchmarks",
        "",
        "Generated by `batchnorm bench kernels` (src/batchnorm_lab/bench.py); do not edit by hand.",
        f"Ratio = torch eager time / ours (`{result.get('backend_requested', 'auto')}`), medians of {result['repeats']} interleaved runs in one "
        "process; GB/s at the op's minimal traffic (forward: read x, write y; backward: read x and dy, "
        "write dx; + residual), against a copy of the same tensor into a preallocated one, timed in the same run.",
        "",
        "How the backends move memory, the dispatch rules and what was tried: [performance.md](performance.md). "
        "Whole training steps (ResNets with torch's batch norm and ours, eager and under `torch.compile`, from "
        f"`batchnorm bench train`): [bench-train{'-cuda' if m.get('device') == 'cuda' else ''}.md]"
        f"(bench-train{'-cuda' if m.get('device') == 'cuda' else ''}.md). Our kernel as an op under "
        "`torch.compile` against Inductor's code, per size: `batchnorm bench compile` (writes bench-compile.md).",
        "",
        "## Machine",
        "",
        *(f"- {k}: {v}" for k, v in m.items()),
        f"- load average before / after: {result['load_before']} / {result['load_after']}",
        "",
        "## Targets (fp32, forward + backward training)",
        "",
        "Medians, and in parentheses the same from the best of the runs (less sensitive to a shared CPU):",
        "",
        f"- geometric-mean speed-up over the CNN rows: **{fmt(s['geomean_cnn_fb'])}x** "
        f"({fmt(s['geomean_cnn_fb_best'])}x) (target >= 2.5)",
        f"- BN + ReLU rows: **{fmt(s['geomean_relu_fb'])}x** ({fmt(s['geomean_relu_fb_best'])}x) (target >= 3)",
        f"- slowest row, all modes: **{fmt(s['min_ratio'])}x**; forward+backward rows: "
        f"**{fmt(s['min_ratio_fb'])}x** ({fmt(s['min_ratio_fb_best'])}x) (target >= 1.0)",
        f"- largest rows, fraction of copy bandwidth: **{fmt(s['largest_copy_fraction'], '.0%')}** "
        f"({fmt(s['largest_copy_fraction_best'], '.0%')}) (target >= 60%)",
        "",
        "A yardstick: if every pass our kernels make over a tensor (`bench.kernel_passes`: "
        "5 / 5 / 8 channels-first for plain / ReLU / residual + ReLU, 8 / 8 / 12 channels-last) ran at the "
        "copy's rate measured in the same run, and a call cost nothing else, the CNN rows' geometric mean "
        f"would be **{fmt(s.get('copy_rate_cnn_fb'))}x** (CNN BN + ReLU rows {fmt(s.get('copy_rate_cnn_relu_fb'))}x, "
        f"measured {fmt(s.get('geomean_cnn_relu_fb'))}x).",
        "",
        "## Crossover: where `auto` switches from aten to numba",
        "",
        f"Measured (best of the runs) smallest size (elements) from which numba is never slower than aten (fp32, "
        f"(N, 64, L), BN + ReLU forward + backward): **{cross['crossover_numel']}**. "
        "`auto` uses `batchnorm.backends.numba_cpu.CROSSOVER_NUMEL` = "
        f"{result['crossover_setting']}.",
        "",
        *_crossover_table(cross["points"]),
        "",
        *_channels_last_crossover(result),
        "## Rows",
        "",
        head,
        "|" + "---|" * (head.count("|") - 1),
    ]
    for r in result["rows"]:
        cells = [
            "x".join(map(str, r["shape"])) + ("" if r.get("dtype", "float32") == "float32" else f" {r['dtype']}"),
            r["format"], r["mode"], r["variant"], r["backend"],
            f"{r['torch_ms']:.3f}", f"{r['ours_ms']:.3f}", f"{r['ratio']:.2f}", f"{r['ratio_min']:.2f}",
        ]  # fmt: skip
        if compiled:
            cells += [fmt(r.get("compile_ms"), ".3f"), fmt(r.get("ratio_compile"))]
        cells += [f"{r['ours_gbps']:.1f}", f"{r['copy_gbps']:.1f}", f"{r['copy_fraction']:.0%}"]
        lines.append("| " + " | ".join(cells) + " |")
    if notes:
        lines += ["", notes.strip()]
    return "\n".join(lines) + "\n"


def run(
    device: str, quick: bool, repeats: int, progress: bool = True, dtypes=(torch.float32,), backend: str = "auto",
    with_compile: bool | None = None,
) -> dict:
    """Time the grid (per dtype) and the crossover sweep; the result dict that `render` and
    the JSON take. `with_compile` (default: on CUDA) adds torch.compile's times."""
    from rich.progress import Progress

    from batchnorm.backends import numba_cpu

    pairs = grid(device, quick)
    load_before = load_average()
    rows = []
    with_compile = device == "cuda" if with_compile is None else with_compile
    total = len(pairs) * len(MODES) * len(VARIANTS) * len(dtypes)
    with Progress(disable=not progress) as bar:
        task = bar.add_task("bench kernels", total=total)
        for dtype in dtypes:
            for shape, fmt in pairs:
                for mode in MODES:
                    for variant in VARIANTS:
                        rows.append(bench_row(shape, fmt, mode, variant, device, repeats, with_compile, dtype, backend))
                        bar.advance(task)
    sizes = CROSSOVER_SIZES[:3] if quick else CROSSOVER_SIZES
    none = dict(points=[], crossover_numel=None)
    cross = crossover(device, repeats, sizes) if device == "cpu" else none
    cross_cl = crossover(device, repeats, sizes, channels_last=True) if device == "cpu" else none
    return dict(
        machine=machine_info(device), repeats=repeats, quick=quick, backend_requested=backend, rows=rows,
        summary=summarize(rows), crossover=cross, crossover_setting=numba_cpu.CROSSOVER_NUMEL,
        crossover_channels_last=cross_cl, crossover_setting_channels_last=numba_cpu.CROSSOVER_NUMEL_CHANNELS_LAST,
        load_before=load_before, load_after=load_average(),
    )  # fmt: skip


def monitor_overhead(
    steps: int = 200, rounds: int = 5, batch_size: int = 60, every: int = MONITOR_EVERY
) -> dict[str, dict[str, float]]:
    """The activation monitor's cost (`bn.monitor` with its default layers and units,
    recording every `every`-th step), as a fraction of a training step (SGD, cross-entropy)
    of the experiments' MLP (64 inputs, 3 hidden layers of 100 sigmoid units, 10 outputs),
    without and with batch norm.

    Blocks of `steps` steps alternate without and with the monitor, `rounds` times; the
    overhead is the median over rounds of (monitored block / the plain block just before)
    - 1, so that drifts in the machine's load cancel in each pair. Returns
    {"sigmoid" | "batchnorm": {"step_s", "monitored_step_s" (medians), "overhead"}}.
    """
    from .models import mlp

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 64, generator=generator)
    y = torch.randint(0, 10, (batch_size,), generator=generator)
    results = {}
    for name in ("sigmoid", "batchnorm"):
        torch.manual_seed(0)
        model = mlp(64, 10, width=100, depth=3, activation="sigmoid", batchnorm=name == "batchnorm")
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)

        def block(watch: bool) -> float:
            start = time.perf_counter()
            mon = monitor(model, every=every).start() if watch else None
            for _ in range(steps):
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()
            if mon is not None:
                mon.stop()  # computing the statistics is part of the cost
            return (time.perf_counter() - start) / steps

        block(True)  # warm up
        plain, watched = [], []
        for _ in range(rounds):
            plain.append(block(False))
            watched.append(block(True))
        results[name] = {
            "step_s": statistics.median(plain),
            "monitored_step_s": statistics.median(watched),
            "overhead": statistics.median(w / p for w, p in zip(watched, plain)) - 1.0,
        }
    return results


@bench_app.command("kernels")
def kernels(
    quick: bool = typer.Option(False, help="A few tiny rows (for tests), not the full grid."),
    device: str = typer.Option("cpu", help="cpu or cuda (cuda adds torch.compile and ResNet-50 rows)."),
    out: Path = typer.Option(RESULTS, help="Folder for the JSON results (this project's: --out docs/bench)."),
    markdown: Path = typer.Option(None, help="Where to render the table (default OUT/benchmarks.md)."),
    notes: Path | None = typer.Option(None, help="A markdown file appended to the rendered page."),
    repeats: int = typer.Option(7, min=1, help="Timed runs per row (the median is reported)."),
    backend: str = typer.Option("auto", help="The backend ours runs with: auto, or a name (triton: what `bench gpu-rule` reads)."),
    dtype: list[str] = typer.Option(["float32"], help="Input dtype(s), repeatable: float32, bfloat16, float16."),
    with_compile: bool | None = typer.Option(None, "--compile/--no-compile", help="Time torch.compile too (default: on CUDA)."),
) -> None:
    """Time our batch norm (`auto`) against torch over the grid of shapes; write JSON and markdown.

    The JSON goes to OUT/kernels-DEVICE[-BACKEND][-quick].json (BACKEND when not auto)."""
    if device not in ("cpu", "cuda"):
        raise typer.BadParameter(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise typer.BadParameter("--device cuda: torch sees no CUDA device here; use --device cpu")
    if backend != "auto":
        backends.get(backend)  # unknown names fail here, not after the first row
    dtypes = []
    for name in dtype:
        if name not in ("float32", "bfloat16", "float16"):
            raise typer.BadParameter(f"--dtype must be float32, bfloat16 or float16, got {name!r}")
        dtypes.append(getattr(torch, name))
    result = run(device, quick, repeats, dtypes=tuple(dtypes), backend=backend, with_compile=with_compile)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"kernels-{device}{'' if backend == 'auto' else '-' + backend}{'-quick' if quick else ''}.json"
    path.write_text(json.dumps(result, indent=1))
    markdown = markdown or out / "benchmarks.md"
    markdown.parent.mkdir(parents=True, exist_ok=True)
    markdown.write_text(render(result, notes.read_text() if notes is not None and notes.exists() else ""))
    typer.echo(f"wrote {path} and {markdown}")


@bench_app.command("compile")
def compile_command(
    device: str = typer.Option("cpu", help="cpu or cuda."),
    out: Path = typer.Option(RESULTS, help="Folder for the JSON results (this project's: --out docs/bench)."),
    markdown: Path = typer.Option(None, help="Where to render the table (default OUT/bench-compile.md)."),
    repeats: int = typer.Option(7, min=1, help="Timed runs per size."),
    quick: bool = typer.Option(False, help="Three small sizes (for tests)."),
) -> None:
    """Under torch.compile: our kernel as an opaque op against Inductor's generated code, per size."""
    if device == "cuda" and not torch.cuda.is_available():
        raise typer.BadParameter("--device cuda: torch sees no CUDA device here; use --device cpu")
    result = compile_crossover(device, repeats, CROSSOVER_SIZES[:3] if quick else CROSSOVER_SIZES)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"compile-{device}{'-quick' if quick else ''}.json"
    path.write_text(json.dumps(result, indent=1))
    markdown = markdown or out / "bench-compile.md"
    markdown.parent.mkdir(parents=True, exist_ok=True)
    markdown.write_text(render_compile_crossover(result))
    typer.echo(f"wrote {path} and {markdown}")


@bench_app.command("monitor")
def monitor_command(
    every: int = typer.Option(10, min=1, help="Record every this many training steps."),
    steps: int = typer.Option(200, min=1, help="Training steps per timed block."),
    rounds: int = typer.Option(5, min=1, help="Alternating blocks with and without the monitor."),
) -> None:
    """The activation monitor's cost, as a fraction of a training step of the experiments' MLP."""
    from rich.console import Console
    from rich.table import Table


    table = Table("model", "step (ms)", "with monitor (ms)", "overhead",
                  title=f"bn.monitor overhead, every={every} (64 -> 3 x 100 sigmoid -> 10, batch 60)")  # fmt: skip
    for name, r in monitor_overhead(steps=steps, rounds=rounds, every=every).items():
        table.add_row(name, f"{r['step_s'] * 1e3:.3f}", f"{r['monitored_step_s'] * 1e3:.3f}", f"{r['overhead']:.1%}")
    Console().print(table)


@bench_app.command("gpu-compile")
def gpu_compile_command(
    arch: list[int] = typer.Option([80, 90], help="Compute capability to compile for, repeatable: 80, 90."),
    quick: bool = typer.Option(False, help="One specialization per kernel, view and tile (what the CI test compiles)."),
    json_out: Path | None = typer.Option(None, "--json", help="Write every result here."),
    strict: bool = typer.Option(False, help="Also fail on a streaming kernel under 25% occupancy on sm_90."),
    jobs: int = typer.Option(1, min=1, help="Compile in this many processes."),
) -> None:
    """Compile every Triton kernel specialization the backend launches for the benchmark's
    rows, for sm_80 / sm_90, without a GPU; print registers, spills, shared memory and
    theoretical occupancy per kernel. Exits 1 on a compile error or a spill."""
    from . import triton_compile

    argv = [f"--arch={a}" for a in arch] + (["--quick"] if quick else []) + (["--strict"] if strict else [])
    argv += [f"--jobs={jobs}"] + ([f"--json={json_out}"] if json_out is not None else [])
    raise typer.Exit(triton_compile.main(argv))


@bench_app.command("gpu-rule")
def gpu_rule_command(
    runs: str = typer.Option(f"{RESULTS}/kernels-cuda*.json", help="Glob of recorded GPU benchmark runs."),
    out: Path = typer.Option(RESULTS / "gpu_rule.json", help="The rule file; the one `auto` reads is "
                             "src/batchnorm/backends/gpu_rule.json, which this project regenerates with --out."),  # fmt: skip
) -> None:
    """Regenerate the CUDA dispatch rule (which shape classes `auto` sends to triton on each
    recorded GPU) from `bench kernels --device cuda --backend triton` runs."""
    from batchnorm.backends import gpu_rule

    out.parent.mkdir(parents=True, exist_ok=True)
    rule = gpu_rule.regenerate(runs, out)
    for gpu, d in rule["devices"].items():
        typer.echo(f"{gpu}: triton for {len(d['triton'])} of {len(d['classes'])} shape classes: {', '.join(d['triton']) or 'none'}")
    for name, why in rule["skipped"].items():
        typer.echo(f"skipped {name}: {why}")
    if not rule["devices"]:
        typer.echo("no recorded GPU run: auto sends every CUDA input to aten")
    typer.echo(f"wrote {out}")
