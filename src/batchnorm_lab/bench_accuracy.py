"""Accuracy benchmark behind `batchnorm bench accuracy`: fp32 results against float64 truth.

What is measured, for every result tensor r (a layer's output y, dx, dweight, dbias; a
model's logits and each parameter's gradient), is

    error(r) = max_i |r_i - t_i| / max_i |t_i|

the largest absolute error of the fp32 result, relative to the largest value of t, the same
result computed in float64 from the same fp32 inputs and weights (so the rounding of the
inputs to fp32 is not counted: only the arithmetic is). fp32's unit roundoff is 6e-8.

- Layers (`layer_row`): batch norm in training mode, forward and backward against a seeded
  upstream gradient, on shapes (N, C, H, W), (N, C, L) and (M, C) with inputs N(0, 1) and
  the hard ones, `offset` + N(0, 1) (a channel whose mean is 100 or 1e4 times its spread).
  Arms: torch's `nn.BatchNorm{1,2}d`, ours (`batchnorm.BatchNorm{1,2}d`) with
  backend="auto" (which sends small inputs to torch's own kernel; the backend it chose is in
  the row) and with backend="numba" (our CPU kernels). Truth: torch's layer in float64.
- Models (`model_row`): one training step's forward and backward (cross-entropy against
  labels `arange(N) % classes`; all parameter gradients) of a model built from its config
  with random weights, in training mode. Truth: the model in float64. Arms
  (`MODEL_ARMS`): the model in fp32 with torch's layers, with ours (`bn.convert` of a
  copy: the same weights; with `auto`, and with numba for every layer), with torch's layers computing in float64 inside the fp32 model,
  and the float64 model with only its batch norms in fp32 (torch's, or ours): the error
  that batch norm alone adds.

  A ReLU (or ReLU6) whose input lies within rounding of 0 (or 6) can decide the other way
  in fp32 than in float64; the gradient through it then changes by the whole upstream
  value: a jump, not a rounding error. Each model is run twice: "free", the activations as
  written, with the number of such flipped decisions counted; and "pinned", every
  activation taking the float64 run's decision (which elements pass), so that only
  rounding is measured.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
import typer
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

import batchnorm as bn
from batchnorm import backends

from . import models as lab_models
from .files import RESULTS, write_atomic
from .timing import machine_info

# -- the measure -----------------------------------------------------------------------


def relative_error(result: Tensor, truth: Tensor) -> float:
    """max |result - truth| / max |truth|, in float64 (the absolute error when truth is all zero)."""
    err = (result.double() - truth.double()).abs().max().item()
    scale = truth.double().abs().max().item()
    return err / scale if scale > 0 else err


# -- layers ----------------------------------------------------------------------------

# (name, shape): a ResNet-50 stem at 96x96 and its last stage (few values per channel),
# a CNN layer, long rows (N, C, L), and 2-D (M, C) with many and few rows.
LAYER_SHAPES = [
    ("ResNet-50 stem, batch 8 at 96x96", (8, 64, 48, 48)),
    ("ResNet-50 last stage", (8, 512, 3, 3)),
    ("CNN layer", (32, 64, 16, 16)),
    ("long rows", (4, 4, 131072)),
    ("(M, C), many rows", (16384, 64)),
    ("(M, C), few rows", (8, 256)),
]
QUICK_LAYER_SHAPES = [("small CNN layer", (4, 8, 16, 16)), ("small (M, C)", (64, 16))]
# The mean of every channel's input, its spread being 1: 0 is the easy case.
OFFSETS = (0.0, 100.0, 1e4)
LAYER_ARMS = ("torch", "ours_auto", "ours_numba")
LAYER_RESULTS = ("y", "dx", "dweight", "dbias")


def layer_inputs(shape: tuple[int, ...], offset: float, seed: int) -> dict[str, Tensor]:
    """fp32 x (`shape`, offset + N(0, 1)), dy (`shape`, N(0, 1)), weight (C,) near 1 and
    bias (C,) near 0, from a generator seeded with `seed`."""
    gen = torch.Generator().manual_seed(seed)
    c = shape[1]
    return dict(
        x=torch.randn(shape, generator=gen) + offset,
        dy=torch.randn(shape, generator=gen),
        weight=1 + 0.1 * torch.randn(c, generator=gen),
        bias=0.1 * torch.randn(c, generator=gen),
    )


def _layer(arm: str, dim: int, c: int) -> nn.Module:
    """The arm's layer ("truth" and "torch": torch's) for a `dim`-dimensional input of `c` channels."""
    if arm in ("truth", "torch"):
        return (nn.BatchNorm2d if dim == 4 else nn.BatchNorm1d)(c)
    ours = bn.BatchNorm2d if dim == 4 else bn.BatchNorm1d
    return ours(c, backend=arm.removeprefix("ours_"))


def layer_results(layer: nn.Module, inputs: dict[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    """y, dx, dweight, dbias of `layer` in training mode on `inputs` cast to `dtype` (the
    layer too), as float64 tensors."""
    layer = layer.to(dtype).train()
    with torch.no_grad():
        layer.weight.copy_(inputs["weight"])
        layer.bias.copy_(inputs["bias"])
    # a fresh leaf: x.to(dtype) is x itself when the dtype already matches, and its .grad
    # would then gather every arm's gradient
    x = inputs["x"].to(dtype).clone().requires_grad_()
    y = layer(x)
    y.backward(inputs["dy"].to(dtype))
    return {k: t.detach().double() for k, t in
            dict(y=y, dx=x.grad, dweight=layer.weight.grad, dbias=layer.bias.grad).items()}  # fmt: skip


def layer_row(name: str, shape: tuple[int, ...], offset: float, seed: int) -> dict:
    """One layer case: per arm the error of each of LAYER_RESULTS, and the backend that
    `auto` chose for it."""
    inputs = layer_inputs(shape, offset, seed)
    truth = layer_results(_layer("truth", len(shape), shape[1]), inputs, torch.float64)
    row = dict(case=name, shape=list(shape), offset=offset, seed=seed, errors={})
    for arm in LAYER_ARMS:
        got = layer_results(_layer(arm, len(shape), shape[1]), inputs, torch.float32)
        row["errors"][arm] = {k: relative_error(got[k], truth[k]) for k in LAYER_RESULTS}
    row["auto_backend"] = backends.resolve("auto", inputs["x"]).backend.name
    return row


# -- models ----------------------------------------------------------------------------


def _transformers():
    """transformers, importable even where torchvision is installed but broken (built for
    another torch: its import raises). transformers imports torchvision when it finds it,
    for image processing only; a None in sys.modules makes it find none."""
    try:
        import torchvision  # noqa: F401
    except Exception:
        for name in [n for n in sys.modules if n.split(".")[0] == "torchvision"]:
            del sys.modules[name]
        sys.modules["torchvision"] = None
    import transformers

    return transformers


class _Logits(nn.Module):
    """A transformers image classifier as a plain module: pixels (N, 3, H, W) -> logits (N, labels)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(pixel_values=x).logits


def transformers_resnet50() -> nn.Module:
    """transformers' ResNet-50 built from its default config (random weights, 2 labels)."""
    t = _transformers()
    return _Logits(t.ResNetForImageClassification(t.ResNetConfig()))


def transformers_mobilenet_v2() -> nn.Module:
    """transformers' MobileNetV2 built from its default config (random weights, ReLU6, 2 labels)."""
    t = _transformers()
    return _Logits(t.MobileNetV2ForImageClassification(t.MobileNetV2Config()))


#: name -> (constructor, batch, image side)
MODELS: dict[str, tuple[Callable[[], nn.Module], int, int]] = {
    "transformers ResNet-50": (transformers_resnet50, 8, 96),
    "transformers MobileNetV2": (transformers_mobilenet_v2, 8, 96),
    "lab ResNet-20": (lab_models.resnet20, 8, 32),
}
QUICK_MODELS = {"lab ResNet-20": (lab_models.resnet20, 4, 16)}


class _Pinned(nn.Module):
    """A ReLU / ReLU6 whose decisions (which elements are clipped low or high) can be
    recorded in one run and replayed in another (`book["mode"]`: "record", "replay" or
    "count": run as written, counting elements decided otherwise than recorded). Calls are
    matched by their order, so a module called twice (a shared ReLU) records twice."""

    def __init__(self, act: nn.Module, book: dict) -> None:
        super().__init__()
        self.low = 0.0
        self.high = getattr(act, "max_val", float("inf"))  # ReLU6 is a Hardtanh(0, 6)
        self.book = book

    def forward(self, x: Tensor) -> Tensor:
        book = self.book
        if book["mode"] == "record":
            book["decisions"].append((x <= self.low, x >= self.high))
        if book["mode"] == "replay":
            low, high = book["decisions"][book["call"]]
            book["call"] += 1
            return torch.where(low, self.low, torch.where(high, self.high, x))
        if book["mode"] == "count":
            low, high = book["decisions"][book["call"]]
            book["call"] += 1
            book["flips"] += int(((x <= self.low) != low).sum() + ((x >= self.high) != high).sum())
        return x.clamp(self.low, self.high)


def pin_activations(model: nn.Module, book: dict) -> nn.Module:
    """Every nn.ReLU and nn.ReLU6 of `model` replaced, in place, by a `_Pinned` using `book`."""
    for name, child in model.named_children():
        if type(child) in (nn.ReLU, nn.ReLU6):
            setattr(model, name, _Pinned(child, book))
        else:
            pin_activations(child, book)
    return model


class _InDtype(nn.Module):
    """A batch-norm layer computing in `dtype` inside a model of another dtype: its input is
    cast to `dtype`, its output back. Its parameters are `inner.*`."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner = inner.to(dtype)
        self.dtype = dtype

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x.to(self.dtype)).to(x.dtype)


def batch_norms_in(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Every batch-norm layer of `model` (torch's or ours) computing in `dtype`, in place."""
    for name, child in model.named_children():
        if isinstance(child, _BatchNorm):
            setattr(model, name, _InDtype(child, dtype))
        else:
            batch_norms_in(child, dtype)
    return model


def _ours(model: nn.Module, backend: str = "auto") -> nn.Module:
    """`model` with our layers (`bn.convert`, same weights), each running `backend`."""
    model = bn.convert(model)[0]
    for module in model.modules():
        if isinstance(module, _BatchNorm) and hasattr(module, "backend"):
            module.backend = backend
    return model


def _ours_numba(model: nn.Module) -> nn.Module:
    return _ours(model, "numba")


#: arm -> (label, the model's dtype, what is done to a copy of the base model in that dtype).
#: The keys have no spaces: docs quote them as JSON paths (tests/test_docs.py).
MODEL_ARMS: dict[str, tuple[str, torch.dtype, Callable[[nn.Module], nn.Module]]] = {
    "torch": ("torch fp32", torch.float32, lambda m: m),
    "ours": ("ours fp32 (auto)", torch.float32, _ours),
    "ours_numba": ("ours fp32, numba in every layer", torch.float32, _ours_numba),
    "torch_bn64": ("torch fp32, its BN in float64", torch.float32, lambda m: batch_norms_in(m, torch.float64)),
    "f64_torch_bn32": ("float64, torch's BN in fp32", torch.float64, lambda m: batch_norms_in(m, torch.float32)),
    "f64_ours_bn32": ("float64, our BN in fp32 (auto)", torch.float64,
                      lambda m: batch_norms_in(_ours(m), torch.float32)),
    "f64_numba_bn32": ("float64, our numba BN in fp32", torch.float64,
                       lambda m: batch_norms_in(_ours_numba(m), torch.float32)),
}


def _set_book(model: nn.Module, book: dict) -> None:
    """Point every `_Pinned` of `model` at `book` (deepcopy gave each copy its own)."""
    for module in model.modules():
        if isinstance(module, _Pinned):
            module.book = book


def model_gradients(model: nn.Module, x: Tensor, dtype: torch.dtype) -> tuple[Tensor, dict[str, Tensor]]:
    """One forward and backward of `model` (in `dtype`) in training mode on x (N, 3, H, W)
    cast to `dtype`, with the cross-entropy against labels arange(N) % classes: the logits
    (N, classes) and each parameter's gradient, as float64. A name's `inner.` (an
    `_InDtype` layer) is dropped, so that names match the base model's."""
    model.train()
    logits = model(x.to(dtype))
    labels = torch.arange(len(x)) % logits.shape[1]
    F.cross_entropy(logits, labels).backward()
    grads = {name.replace("inner.", ""): p.grad.detach().double() for name, p in model.named_parameters()}
    return logits.detach().double(), grads


#: A gradient whose float64 values are all below this fraction of the model's largest is
#: zero in exact arithmetic (a bias whose shift the next training-mode batch norm removes,
#: as MobileNetV2's projection BN before a block without a residual): an error relative
#: to its own largest value would measure float64's rounding. Such tensors are counted
#: (`zero_grads`), not measured.
ZERO_GRAD = 1e-9


def _errors(got: tuple[Tensor, dict], truth: tuple[Tensor, dict]) -> dict:
    """The logits' error, and over the parameter gradients (those not zero, ZERO_GRAD):
    the largest error and its tensor, and the median error."""
    largest = max(g.abs().max().item() for g in truth[1].values())
    measured = {name: g for name, g in truth[1].items() if g.abs().max().item() > ZERO_GRAD * largest}
    per_tensor = {name: relative_error(got[1][name], g) for name, g in measured.items()}
    worst = max(per_tensor, key=per_tensor.get)
    return dict(logits=relative_error(got[0], truth[0]), grad_max=per_tensor[worst], grad_worst=worst,
                grad_median=statistics.median(per_tensor.values()),
                zero_grads=len(truth[1]) - len(measured))  # fmt: skip


def _without_dropout(model: nn.Module) -> nn.Module:
    """`model` with every dropout's probability 0, in place: in training mode the float64
    and the fp32 runs would draw different masks (MobileNetV2's classifier drops 80%)."""
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0
    return model


def model_row(name: str, seed: int, quick: bool = False) -> dict:
    """One model at one seed: per arm, free (activations as written; `flips` counted) and
    pinned (the float64 run's activation decisions), the errors of `_errors`."""
    build, batch, side = (QUICK_MODELS if quick else MODELS)[name]
    torch.manual_seed(seed)
    book = dict(mode="record", decisions=[], call=0, flips=0)
    base = pin_activations(_without_dropout(build()), book)
    x = torch.randn(batch, 3, side, side)
    truth_model = copy.deepcopy(base).double()
    _set_book(truth_model, book)
    truth = model_gradients(truth_model, x, torch.float64)
    row = dict(model=name, batch=batch, image=side, seed=seed, arms={},
               batch_norms=sum(isinstance(m, _BatchNorm) for m in base.modules()))  # fmt: skip
    for arm, (_, dtype, make) in MODEL_ARMS.items():
        row["arms"][arm] = {}
        for mode, key in (("count", "free"), ("replay", "pinned")):
            model = make(copy.deepcopy(base).to(dtype))
            _set_book(model, book)
            book.update(mode=mode, call=0, flips=0)
            row["arms"][arm][key] = _errors(model_gradients(model, x, dtype), truth)
            if mode == "count":
                row["arms"][arm][key]["flips"] = book["flips"]
    return row


# -- the run, the page, the command ----------------------------------------------------

SEEDS = (0, 1, 2)


@contextmanager
def _compiling_at_first_use():
    """numba compiling at the call that needs a kernel (BATCHNORM_COMPILE=blocking): in the
    default background mode `auto` runs torch's kernel until ours is compiled, and which of
    the two ran a layer would depend on a race."""
    before = os.environ.get("BATCHNORM_COMPILE")
    os.environ["BATCHNORM_COMPILE"] = "blocking"
    try:
        yield
    finally:
        if before is None:
            del os.environ["BATCHNORM_COMPILE"]
        else:
            os.environ["BATCHNORM_COMPILE"] = before


def run(quick: bool = False, seeds: tuple[int, ...] = SEEDS, with_models: bool = True) -> dict:
    """Every layer case (seed 0) and every model at each of `seeds`: the dict the JSON and
    `render` take. Quick: two small layer shapes and a small ResNet-20, seed 0."""
    shapes = QUICK_LAYER_SHAPES if quick else LAYER_SHAPES
    seeds = seeds[:1] if quick else seeds
    names = list(QUICK_MODELS if quick else MODELS) if with_models else []
    with _compiling_at_first_use():
        layers = [layer_row(name, shape, offset, 0) for name, shape in shapes for offset in OFFSETS]
        rows = [model_row(name, seed, quick) for name in names for seed in seeds]
    return dict(machine=machine_info("cpu"), quick=quick, seeds=list(seeds), layers=layers, models=rows)


def _e(value: float) -> str:
    return f"{value:.1e}"


def layers_table(result: dict) -> list[str]:
    """Markdown lines: per layer case and arm, the error of y, dx, dweight, dbias."""
    lines = ["| case | shape | input | arm | y | dx | dweight | dbias |", "|---|---|---|---|---:|---:|---:|---:|"]
    for r in result["layers"]:
        for arm in LAYER_ARMS:
            label = f"ours auto ({r['auto_backend']})" if arm == "ours_auto" else arm.replace("_", " ")
            cells = [r["case"], "x".join(map(str, r["shape"])), _input(r["offset"]), label]
            cells += [_e(r["errors"][arm][k]) for k in LAYER_RESULTS]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _input(offset: float) -> str:
    return "N(0,1)" if offset == 0 else f"{offset:g} + N(0,1)"


def models_table(result: dict) -> list[str]:
    """Markdown lines: per model, seed and arm, free and pinned: the logits' error, the
    largest gradient error (and its tensor), the median one, and the flipped decisions."""
    head = ["model", "seed", "arm", "zero grads", "flips", "free: logits", "free: grad max", "free: grad median",
            "pinned: logits", "pinned: grad max", "pinned: grad median", "pinned: worst tensor"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|---|---:|---|" + "---:|" * 8 + "---|"]
    for r in result["models"]:
        for arm, e in r["arms"].items():
            free, pinned = e["free"], e["pinned"]
            cells = [r["model"], str(r["seed"]), MODEL_ARMS[arm][0], str(pinned["zero_grads"]), str(free["flips"])]
            cells += [_e(free[k]) for k in ("logits", "grad_max", "grad_median")]
            cells += [_e(pinned[k]) for k in ("logits", "grad_max", "grad_median")]
            cells.append(f"`{pinned['grad_worst']}`")
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def render(result: dict) -> str:
    """The markdown page (docs/bench-accuracy.md) from a result dict."""
    models_text = ", ".join(f"{name} (batch {b} at {s}x{s})" for name, (_, b, s) in
                            (QUICK_MODELS if result["quick"] else MODELS).items())  # fmt: skip
    lines = [
        "# Accuracy: fp32 against float64",
        "",
        "Generated by `batchnorm bench accuracy` (src/batchnorm_lab/bench_accuracy.py); do not edit by hand.",
        "Error of a result = max |fp32 - float64| / max |float64| over the tensor, the float64 result computed "
        "from the same fp32 inputs and weights (only the arithmetic is measured). fp32's unit roundoff is 6e-8.",
        "",
        "## Machine",
        "",
        # a tuple (the load average) as a list: the page reads the same from the JSON
        *(f"- {k}: {list(v) if isinstance(v, tuple) else v}" for k, v in result["machine"].items()),
        "",
        "## Single layers",
        "",
        "Training mode, forward and backward against a seeded N(0,1) upstream gradient (seed 0); weight "
        "1 + 0.1 N(0,1), bias 0.1 N(0,1). Truth: torch's layer in float64. `ours auto`: the backend `auto` "
        "chose (below its size crossover it runs torch's kernel); `ours numba`: our CPU kernels.",
        "",
        *layers_table(result),
    ]
    if result["models"]:
        lines += [
            "",
            "## Whole models: one training step's gradients",
            "",
            f"Models: {models_text}; random weights from the config (seeded), training mode, cross-entropy "
            "against labels arange(N) % classes, all parameter gradients. Truth: the model in float64. "
            "Dropout is off (p = 0: the runs would draw different masks). "
            "Grad max: the largest error over the parameter gradients (the worst tensor named for the pinned "
            f"run); grad median: the median over them. Gradients zero in exact arithmetic (float64 values all "
            f"under {ZERO_GRAD:g} of the model's largest) are left out: zero grads counts them. Free: the activations as written; flips: the ReLU / "
            "ReLU6 decisions (element passed or clipped) taken otherwise than in float64. Pinned: every "
            "activation takes the float64 run's decision, so only rounding is measured.",
            "",
            *models_table(result),
        ]
    return "\n".join(lines) + "\n"


def accuracy_command(
    out: Path = typer.Option(RESULTS, help="Folder for the JSON results (accuracy.json; this project's: --out docs/bench)."),
    markdown: Path = typer.Option(None, help="Where to render the tables (default OUT/bench-accuracy.md)."),
    quick: bool = typer.Option(False, help="Two small layer shapes and a small ResNet-20, one seed (for tests)."),
    models: bool = typer.Option(True, "--models/--no-models", help="Also measure whole models."),
) -> None:
    """fp32 batch norm against float64: torch's and ours, per layer and on whole models; write JSON and markdown."""
    result = run(quick=quick, with_models=models)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"accuracy{'-quick' if quick else ''}.json"
    write_atomic(path, json.dumps(result, indent=1).encode())
    markdown = markdown or out / "bench-accuracy.md"
    markdown.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(markdown, render(result).encode())
    typer.echo("\n".join(layers_table(result) + (models_table(result) if result["models"] else [])))
    typer.echo(f"wrote {path} and {markdown}")
