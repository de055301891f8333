"""Which CUDA inputs `auto` hands to the triton backend: a rule read from measurements.

The rule is a table per GPU (its name, as torch.cuda.get_device_name reports it) of shape
classes that go to triton; every other CUDA input goes to `aten` (cuDNN), and so does every
input on a GPU the table does not name. `batchnorm bench gpu-rule` regenerates the table
(gpu_rule.json, beside this module) from the GPU benchmarks recorded under docs/bench/
(`batchnorm bench kernels --device cuda --backend triton` writes them): a new run updates
the rule by rerunning that command, never by editing constants.

A shape class is (layout, dtype, size), `shape_class`:

- layout: "ncl" for a contiguous (N, C, *S) input (the kernels' (N, C, L) view), "mc" for a
  2-D (N, C) input or channels-last memory (the (M, C) view): the two views run different
  tilings and different cuDNN kernels;
- dtype: "float32", "bfloat16", "float16";
- size: the input's element count in SIZE_EDGES buckets (launch-bound, small, medium,
  large, ResNet-50 at batch 256), named by their lower edge, e.g. "1M+".

A class goes to triton when the benchmark rows of that class (every mode and variant,
`decide`) have a geometric mean of torch eager / triton of at least MIN_GEOMEAN and no row
below MIN_ROW. Only runs made with `--backend triton` count (`build`), the newest per GPU;
a row where triton refused the input (it fell back to aten) measures nothing about triton
and is left out.
"""

from __future__ import annotations

import functools
import glob
import json
import math
import os
from pathlib import Path

import torch
from torch import Tensor

from .. import layout

#: Size buckets: element counts at which a new class starts (the last is open-ended).
SIZE_EDGES = (0, 1 << 16, 1 << 20, 1 << 23, 1 << 26)
MIN_GEOMEAN = 1.0  # at or above torch eager over the class's rows
MIN_ROW = 0.9  # and no single row more than 10% slower (a loss the mean would hide)
RULE_PATH = Path(__file__).with_name("gpu_rule.json")
BENCH_GLOB = "docs/bench/kernels-cuda*.json"


def size_bucket(numel: int) -> str:
    """The bucket's name: its lower edge, "0+", "64K+", "1M+", "8M+", "64M+"."""
    edge = max(e for e in SIZE_EDGES if e <= numel)
    return "0+" if edge == 0 else _human(edge) + "+"


def _human(n: int) -> str:
    for unit, div in (("M", 1 << 20), ("K", 1 << 10)):
        if n % div == 0:
            return f"{n // div}{unit}"
    return str(n)


def shape_class(shape, channels_last: bool, dtype: str) -> str:
    """ "layout/dtype/size" of an input of `shape` ((N, C) or (N, C, *S)); `channels_last`:
    its memory is (N, *S, C)."""
    kind = "mc" if len(shape) == 2 or channels_last else "ncl"
    return f"{kind}/{dtype}/{size_bucket(math.prod(shape))}"


def class_of(x: Tensor) -> str:
    """The shape class of an input tensor (N, C) or (N, C, *S)."""
    return shape_class(tuple(x.shape), layout.kind_of(x) == "mc" and x.dim() > 2, str(x.dtype).removeprefix("torch."))


def row_class(row: dict) -> str:
    """The shape class of a benchmark row (bench.bench_row's dict)."""
    return shape_class(tuple(row["shape"]), row["format"] == "channels_last", row.get("dtype", "float32"))


def decide(rows: list[dict]) -> dict:
    """Per shape class of `rows` (one GPU's triton rows): the decision and its numbers,
    {class: {"backend": "triton" | "aten", "geomean": g, "min": m, "rows": n}}."""
    groups: dict[str, list[float]] = {}
    for row in rows:
        groups.setdefault(row_class(row), []).append(row["ratio"])
    out = {}
    for cls, ratios in sorted(groups.items()):
        geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
        wins = geo >= MIN_GEOMEAN and min(ratios) >= MIN_ROW
        out[cls] = dict(backend="triton" if wins else "aten", geomean=round(geo, 4), min=round(min(ratios), 4), rows=len(ratios))
    return out


def _run_info(result: dict, path: str) -> dict:
    m = result.get("machine", {})
    return dict(
        source=os.path.basename(path), gpu=m.get("gpu"), driver=m.get("driver"), cuda=m.get("cuda"),
        torch=m.get("torch"), triton=m.get("triton"), date=m.get("date"), repeats=result.get("repeats"),
    )  # fmt: skip


def build(paths: list[str]) -> dict:
    """The rule from recorded benchmark JSONs: per GPU, the newest run (by machine.date) of
    those made with --backend triton. Other files (CPU runs, --quick runs, `auto` runs) are
    skipped, and listed under "skipped" with the reason."""
    runs: dict[str, tuple[dict, list[dict]]] = {}
    skipped = {}
    for path in sorted(paths):
        with open(path) as f:
            result = json.load(f)
        info = _run_info(result, path)
        if info["gpu"] is None or result.get("machine", {}).get("device") != "cuda":
            skipped[info["source"]] = "not a CUDA run (machine.gpu missing)"
            continue
        if result.get("quick"):
            skipped[info["source"]] = "a --quick run (tiny rows only)"
            continue
        # Only runs that forced triton on every row: an `auto` run times triton only where the
        # rule of its day sent it, and as the newest run would shrink the rule to those classes.
        if result.get("backend_requested") != "triton":
            skipped[info["source"]] = "not a triton run (bench kernels --backend triton)"
            continue
        rows = [r for r in result["rows"] if r.get("backend") == "triton"]  # not the rows triton refused
        if not rows:
            skipped[info["source"]] = "no row ran on triton"
            continue
        old = runs.get(info["gpu"])
        if old is None or (info["date"] or "") >= (old[0]["date"] or ""):
            runs[info["gpu"]] = (info, rows)
    devices = {}
    for gpu, (info, rows) in sorted(runs.items()):
        classes = decide(rows)
        devices[gpu] = dict(run=info, triton=sorted(c for c, d in classes.items() if d["backend"] == "triton"), classes=classes)
    return dict(
        about="generated by `batchnorm bench gpu-rule` from " + BENCH_GLOB + "; do not edit by hand",
        size_edges=list(SIZE_EDGES), min_geomean=MIN_GEOMEAN, min_row=MIN_ROW, devices=devices, skipped=skipped,
    )  # fmt: skip


def write(rule: dict, path: Path = RULE_PATH) -> None:
    path.write_text(json.dumps(rule, indent=1, sort_keys=True) + "\n")


def regenerate(pattern: str = BENCH_GLOB, out: Path = RULE_PATH) -> dict:
    """Rebuild the rule file from every recorded run matching `pattern`."""
    rule = build(glob.glob(pattern))
    write(rule, out)
    return rule


@functools.cache
def _load(path: str) -> dict[str, frozenset[str]]:
    """{GPU name: classes that go to triton} of the rule file; {} when there is none."""
    try:
        with open(path) as f:
            rule = json.load(f)
    except FileNotFoundError:
        return {}
    if rule.get("size_edges", list(SIZE_EDGES)) != list(SIZE_EDGES):
        return {}  # made with other buckets: its class names mean something else
    return {gpu: frozenset(d["triton"]) for gpu, d in rule.get("devices", {}).items()}


@functools.cache
def _gpu_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def lookup(gpu: str, cls: str, path: Path | None = None) -> bool:
    """Whether the rule file sends shape class `cls` on the GPU called `gpu` to triton."""
    classes = _load(str(RULE_PATH if path is None else path)).get(gpu)
    return classes is not None and cls in classes


def prefers_triton(x: Tensor, path: Path | None = None) -> bool:
    """Whether the recorded measurements put x's shape class on triton on x's GPU."""
    if not x.is_cuda:
        return False
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    return lookup(_gpu_name(index), class_of(x), path)
