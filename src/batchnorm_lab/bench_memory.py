"""The activation memory of one ResNet-18 training step, torch's BatchNorm2d + LeakyReLU
against in-place activated batch norm (batchnorm.inplace_abn.InPlaceABN).

    python -m batchnorm_lab.bench_memory [--batch 32] [--size 64] [--out results/memory-cpu.json]

Two numbers per network, both measured on CPU with no GPU needed:

- saved: the bytes of the tensors autograd keeps for backward after the forward, caught with
  `torch.autograd.graph.saved_tensors_hooks`; each storage is counted once (by its data
  pointer: a convolution and the norm before it keep the same tensor), the parameters and
  buffers left out. This is the activation memory the paper's saving is about.
- peak: the most bytes the CPU allocator held during forward + backward beyond what was
  held when the step began (the weights, their gradients already allocated by a first step,
  and the input), from torch.profiler(profile_memory=True): the running sum of its allocation
  events. It adds to the saved bytes the transients: a layer's input and output alive at
  once, and the backward's own buffers.

The networks are torchvision's ResNet-18 layout (7x7 stride-2 stem, 3x3 max pool, basic blocks
2 / 2 / 2 / 2 at widths 64 / 128 / 256 / 512) with leaky ReLU (slope 0.01), in two orders:

- "preact": pre-activation blocks (He et al. 2016, "Identity mappings"), the order the
  in-place ABN paper trains: every convolution is preceded by BN + activation, so every
  norm can fuse its activation. Where the shortcut is the identity, the block's first norm
  reads the input the shortcut adds back later: that one runs with inplace=False (its input
  must survive), the others with inplace=True.
- "postact": torchvision's order (conv, BN, act, conv, BN, add, act): the second BN is
  followed by the residual add, not an activation, so it fuses the identity, and the add and
  the activation after it stay separate ops.

Norms: "torch" is nn.BatchNorm2d followed by nn.LeakyReLU(inplace=True), the usual way (the
activation overwrites the norm's output, so the pair keeps two tensors: the norm's input and
the activation's output); "iabn" is InPlaceABN as described; "iabn-outofplace" is InPlaceABN
with inplace=False everywhere (the same saved bytes: only the transient differs).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import typer
from torch import Tensor, nn

from batchnorm.inplace_abn import InPlaceABN

from .files import RESULTS, write_atomic

NORMS = ("torch", "iabn", "iabn-outofplace")
ARCHS = ("preact", "postact")
SLOPE = 0.01


def norm_act(norm: str, channels: int, activation: bool, input_needed_later: bool = False) -> nn.Module:
    """BN (+ leaky ReLU when `activation`) over `channels`, as `norm` builds it. With
    `input_needed_later` (the block's input, which the shortcut adds back) InPlaceABN must not
    overwrite its input."""
    if norm == "torch":
        bn = nn.BatchNorm2d(channels)
        return nn.Sequential(bn, nn.LeakyReLU(SLOPE, inplace=True)) if activation else bn
    inplace = norm == "iabn" and not input_needed_later
    return InPlaceABN(channels, activation="leaky_relu" if activation else None, negative_slope=SLOPE, inplace=inplace)


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class PreActBlock(nn.Module):
    """x + conv(act(BN(conv(act(BN(x)))))): (N, cin, H, W) -> (N, cout, H / stride, W / stride);
    the shortcut is a strided 1x1 conv of act(BN(x)) when the shape changes."""

    def __init__(self, norm: str, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        identity = stride == 1 and cin == cout
        self.norm1 = norm_act(norm, cin, True, input_needed_later=identity)
        self.conv1 = _conv3x3(cin, cout, stride)
        self.norm2 = norm_act(norm, cout, True)
        self.conv2 = _conv3x3(cout, cout)
        self.shortcut = None if identity else nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        a = self.norm1(x)
        shortcut = x if self.shortcut is None else self.shortcut(a)
        return self.conv2(self.norm2(self.conv1(a))) + shortcut


class PostActBlock(nn.Module):
    """act(BN(conv(act(BN(conv(x))))) + shortcut(x)): torchvision's BasicBlock with leaky ReLU."""

    def __init__(self, norm: str, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.norm1 = norm_act(norm, cout, True)
        self.conv2 = _conv3x3(cout, cout)
        self.norm2 = norm_act(norm, cout, False)
        self.downsample = None
        if stride != 1 or cin != cout:
            conv = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
            self.downsample = nn.Sequential(conv, norm_act(norm, cout, False))
        # InPlaceABN keeps its output for backward, so the residual cannot be added into it
        self.add_in_place = norm == "torch"
        self.act = nn.LeakyReLU(SLOPE, inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.norm2(self.conv2(self.norm1(self.conv1(x))))
        identity = x if self.downsample is None else self.downsample(x)
        if self.add_in_place:
            out += identity
        else:
            out = out + identity
        return self.act(out)


def resnet18(arch: str, norm: str, num_classes: int = 1000) -> nn.Sequential:
    """ResNet-18 (torchvision's layout) in `arch` order with `norm`: (N, 3, H, W) -> (N, num_classes)."""
    if arch not in ARCHS or norm not in NORMS:
        raise ValueError(f"arch must be one of {ARCHS} and norm one of {NORMS}, got {arch!r}, {norm!r}")
    block = PreActBlock if arch == "preact" else PostActBlock
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False), norm_act(norm, 64, True)]
    layers.append(nn.MaxPool2d(3, stride=2, padding=1))
    cin = 64
    for i, width in enumerate((64, 128, 256, 512)):
        for j in range(2):
            layers.append(block(norm, cin, width, 2 if i > 0 and j == 0 else 1))
            cin = width
    if arch == "preact":  # the last block's output has not been normalized yet
        layers.append(norm_act(norm, cin, True))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


def saved_activation_bytes(model: nn.Module, x: Tensor) -> int:
    """Bytes of the tensors autograd keeps after `model(x)`, each storage once, the model's own
    parameters and buffers left out."""
    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    del out
    return sum(storages.values())


def peak_step_bytes(model: nn.Module, x: Tensor, target: Tensor) -> int:
    """The most bytes the CPU allocator held during forward + backward (cross-entropy loss)
    beyond what it held at the step's start: the largest running sum of torch.profiler's
    allocation events (+ allocated, - freed), in time order. The gradients must exist already
    (a step before this one), so that the number is the activations' and not the weights'."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    model.zero_grad(set_to_none=False)  # keeps the gradients allocated
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        nn.functional.cross_entropy(model(x), target).backward()
    tree = prof.profiler.kineto_results.experimental_event_tree()
    events = (node for node in _walk(tree) if node.tag == _EventType.Allocation)
    # the events' own running total (total_allocated) starts wherever earlier profiled runs
    # left it, so the sizes are summed here instead
    held = peak = 0
    for node in sorted(events, key=lambda n: n.start_time_ns):
        held += node.extra_fields.alloc_size
        peak = max(peak, held)
    return peak


def _walk(nodes):
    for node in nodes:
        yield node
        yield from _walk(node.children)


def measure(arch: str, batch: int, size: int, seed: int = 0) -> dict:
    """Saved and peak bytes of one training step for each norm, the same weights and input."""
    torch.manual_seed(seed)
    x = torch.randn(batch, 3, size, size)
    target = torch.randint(0, 1000, (batch,))
    rows = {}
    for norm in NORMS:
        torch.manual_seed(seed)  # every norm's network starts from the same weights
        model = resnet18(arch, norm).train()
        saved = saved_activation_bytes(model, x.clone())
        nn.functional.cross_entropy(model(x.clone()), target).backward()  # warm-up: first-call allocations
        peak = peak_step_bytes(model, x.clone(), target)
        rows[norm] = {"saved_bytes": saved, "peak_bytes": peak, "saved_mb": _mib(saved), "peak_mb": _mib(peak)}
    base = rows["torch"]
    for norm in NORMS[1:]:
        for what in ("saved", "peak"):
            rows[norm][f"{what}_reduction"] = round(1 - rows[norm][f"{what}_bytes"] / base[f"{what}_bytes"], 3)
    return rows


def _mib(n: int) -> float:
    return round(n / 2**20, 1)


def run(batch: int = 32, size: int = 64) -> dict:
    """Both architectures; MB are MiB (2^20 bytes)."""
    return {
        "batch": batch,
        "size": size,
        "torch": torch.__version__,
        "how": "saved: saved_tensors_hooks, each storage once, parameters excluded; "
        "peak: running sum of torch.profiler's allocation events over forward + backward, above the "
        "weights, their gradients and the input",
        "archs": {arch: measure(arch, batch, size) for arch in ARCHS},
    }


def render(result: dict) -> str:
    """A plain-text table of `run`'s result."""
    lines = [f"ResNet-18, batch {result['batch']}, {result['size']}x{result['size']}, one training step on CPU (MiB)"]
    lines.append(f"{'arch':8} {'norm':16} {'saved':>8} {'peak':>8} {'saved -':>8} {'peak -':>8}")
    for arch, rows in result["archs"].items():
        for norm, row in rows.items():
            cut = (
                f"{row['saved_reduction']:8.1%} {row['peak_reduction']:8.1%}" if "saved_reduction" in row else ""
            )
            lines.append(f"{arch:8} {norm:16} {row['saved_mb']:8.1f} {row['peak_mb']:8.1f} {cut}")
    return "\n".join(lines)


def memory_command(
    out: Path = typer.Option(RESULTS, help="Folder for memory-cpu.json (this project's: --out docs/bench)."),
    batch: int = typer.Option(32, help="Batch size of the training step."),
    size: int = typer.Option(64, help="Image height and width."),
) -> None:
    """Activation memory of one ResNet-18 training step: torch's BatchNorm2d + LeakyReLU against InPlaceABN."""
    torch.set_num_threads(min(2, torch.get_num_threads()))  # a shared machine: the bytes do not depend on it
    result = run(batch, size)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "memory-cpu.json"
    write_atomic(path, (json.dumps(result, indent=1) + "\n").encode())
    typer.echo(render(result))
    typer.echo(f"wrote {path}")
