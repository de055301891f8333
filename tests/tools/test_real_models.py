"""The model tools on the third-party models people use (timm, torchvision, transformers:
the `models` extra; skipped without it), built from their constructors or configs with
random weights, in float64: what is compared is then the tools, not fp32 rounding, which
SGD steps grow in torch's layers and ours alike.

Per model: `convert` (with and without `fuse`) trains like torch's layers over 3 SGD steps
and evaluates equal after them; `fold` of the trained evaluation model gives its outputs;
torch.fx traces the converted model wherever it traces torch's; the fused model exports
to a program without a batch-norm op of ours, which gives its outputs.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import pytest
import torch
from torch import nn
from torch.utils import _pytree

import batchnorm as bn
from batchnorm import activations
from batchnorm.extras import BatchNormExtras
from batchnorm.tools import convert, fold
from batchnorm.tools._common import batchnorm_layers

from .thirdparty import need

IMAGE = (2, 3, 64, 64)


def _timm(name: str, **kwargs):
    return lambda: need("timm").create_model(name, num_classes=10, **kwargs)


def _torchvision(name: str, **kwargs):
    return lambda: getattr(need("torchvision").models, name)(num_classes=10, **kwargs)


def _transformers(config: str, model: str, **kwargs):
    def build():
        transformers = need("transformers")
        return getattr(transformers, model)(getattr(transformers, config)(**kwargs))

    return build


SMALL = {"depths": [1, 1, 1, 1], "hidden_sizes": [16, 32, 64, 128], "embedding_size": 16}
MODELS = {
    "timm resnet18": (_timm("resnet18"), IMAGE),
    "timm efficientnet_b0": (_timm("efficientnet_b0"), IMAGE),
    "timm mobilenetv3_small_100": (_timm("mobilenetv3_small_100"), IMAGE),
    "timm dla34": (_timm("dla34"), IMAGE),
    "torchvision resnet18": (_torchvision("resnet18"), IMAGE),
    "torchvision mobilenet_v2": (_torchvision("mobilenet_v2"), IMAGE),
    "torchvision efficientnet_b0": (_torchvision("efficientnet_b0"), IMAGE),
    "torchvision shufflenet_v2_x0_5": (_torchvision("shufflenet_v2_x0_5"), IMAGE),
    "torchvision googlenet": (_torchvision("googlenet", aux_logits=True, init_weights=True), IMAGE),
    "torchvision r3d_18": (lambda: need("torchvision").models.video.r3d_18(num_classes=10), (2, 3, 2, 16, 16)),
    "transformers ResNet": (_transformers("ResNetConfig", "ResNetModel", **SMALL), IMAGE),
    "transformers MobileNetV2": (
        _transformers("MobileNetV2Config", "MobileNetV2Model", depth_multiplier=0.35, image_size=64), IMAGE,
    ),
    "transformers RegNet": (_transformers("RegNetConfig", "RegNetModel", **SMALL, groups_width=8), IMAGE),
    "transformers LeViT": (
        _transformers("LevitConfig", "LevitModel", image_size=64, hidden_sizes=[32, 48, 64],
                      num_attention_heads=[1, 2, 2], depths=[1, 1, 1], key_dim=[8, 8, 8]),
        IMAGE,
    ),
    "transformers MobileViT": (
        _transformers("MobileViTConfig", "MobileViTModel", image_size=64, hidden_sizes=[16, 24, 32],
                      neck_hidden_sizes=[8, 8, 16, 16, 24, 24, 32]),
        IMAGE,
    ),
}  # fmt: skip
TOL = {"rtol": 1e-9, "atol": 1e-9}
# (layers converted, activations fused, layers folded) per model. Fused: MobileNetV2's ReLU6
# (35 of its 52), MobileNetV3's and LeViT's embedding's Hardswish (timm's BatchNormAct2d
# with one included) as well as ReLU, SiLU and the others of activations.NAMES;
# unfolded: googlenet's auxiliary heads in evaluation (nothing feeds them, now affines),
# LeViT's batch norms over a flattened Linear output (read by the flatten, not the norm).
EXPECTED = {
    "timm resnet18": (20, 17, 20),
    "timm efficientnet_b0": (49, 33, 49),
    "timm mobilenetv3_small_100": (34, 23, 34),
    "timm dla34": (37, 33, 37),
    "torchvision resnet18": (20, 17, 20),
    "torchvision mobilenet_v2": (52, 35, 52),
    "torchvision efficientnet_b0": (49, 33, 49),
    "torchvision shufflenet_v2_x0_5": (56, 37, 56),
    "torchvision googlenet": (59, 59, 57),
    "torchvision r3d_18": (20, 17, 20),
    "transformers ResNet": (16, 12, 16),
    "transformers MobileNetV2": (52, 35, 52),
    "transformers RegNet": (17, 13, 17),
    "transformers LeViT": (26, 3, 4),
    "transformers MobileViT": (32, 25, 32),
}


def _outputs(out) -> list[torch.Tensor]:
    """Every tensor of a model's output (a tensor, a namedtuple, a transformers ModelOutput)."""
    return [t for t in _pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _train(model: nn.Module, x: torch.Tensor, steps: int = 3) -> None:
    """`steps` SGD steps on a fixed random projection of every output (a loss whose
    gradient does not grow with the outputs), the same dropout each run."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for step in range(steps):
        torch.manual_seed(step)
        outputs = _outputs(model(x))
        fixed = [torch.Generator().manual_seed(i) for i in range(len(outputs))]
        loss = sum((t * torch.randn(t.shape, dtype=t.dtype, generator=g)).mean() for t, g in zip(outputs, fixed))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@torch.no_grad()
def _eval(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    return _outputs(model.eval()(x))


def _largest_difference(got: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    """max |got - expected| over every output, relative to the largest |expected|."""
    assert len(got) == len(expected)
    scale = max(t.abs().max().item() for t in expected) or 1.0
    return max((g - e).abs().max().item() for g, e in zip(got, expected)) / scale


class Row(NamedTuple):
    """One line of the closing table."""

    model: str
    layers: int
    converted: int
    fused: int
    folded: int
    train_eval_difference: float  # ours (both fuse modes) against torch's after 3 steps, relative
    fold_difference: float  # relative
    fx: str
    export: str

    def __str__(self) -> str:
        cells = (self.model, f"{self.converted}/{self.layers}", self.fused, self.folded,
                 f"{self.train_eval_difference:.1e}", f"{self.fold_difference:.1e}", self.fx, self.export)  # fmt: skip
        return "| " + " | ".join(map(str, cells)) + " |"


def _fx(theirs: nn.Module, converted: tuple[nn.Module, ...], x: torch.Tensor) -> str:
    """Whether torch.fx traces the converted models wherever it traces torch's (each traced
    graph giving its model's evaluation outputs)."""
    try:
        torch.fx.symbolic_trace(theirs)
    except Exception:
        return "n/a (torch's layers do not trace either)"
    for ours in converted:
        traced = torch.fx.symbolic_trace(ours)
        torch.testing.assert_close(_eval(traced, x), _eval(ours, x), rtol=0, atol=0)
    return "traces"


def _export(ours: nn.Module, x: torch.Tensor) -> str:
    """The fused model's evaluation program: no op of ours, the model's outputs."""
    program = torch.export.export(ours.eval(), (x,))
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not [op for op in ops if "batchnorm::" in op], ops
    with torch.no_grad():  # an exported module has no train/eval switch: it is the evaluation program
        got = _outputs(program.module()(x))
    torch.testing.assert_close(got, _eval(ours, x), **TOL)
    return "runs without batchnorm"


def _check(name: str) -> Row:
    build, shape = MODELS[name]
    torch.manual_seed(0)
    theirs = build().double()
    x = torch.randn(shape, dtype=torch.float64)
    plain, converting = convert(copy.deepcopy(theirs))
    fused, _ = convert(copy.deepcopy(theirs), fuse=True, example_input=x)
    layers = len(batchnorm_layers(theirs))
    converted = sum(isinstance(m, BatchNormExtras) for _, m in batchnorm_layers(plain))
    assert converted + len(converting.skipped) == layers, converting  # every layer left has its reason
    # layers of ours computing their activation in one kernel (timm's norm + activation layers have theirs anyway)
    fused_count = sum(
        isinstance(m, bn.BatchNormAct) and activations.name_of_module(m.act) not in (None, activations.NOT_FUSABLE)
        for m in fused.modules()
    )
    for model in (theirs, plain, fused):
        _train(model, x)
    trained = dict(theirs.named_parameters())
    difference = 0.0
    for ours in (plain, fused):
        state = ours.state_dict()  # a BatchNormAct's keys are its layer's: torch's names
        for param_name, p in trained.items():
            torch.testing.assert_close(state[param_name], p, **TOL, msg=lambda m: f"{param_name}: {m}")
        expected, got = _eval(theirs, x), _eval(ours, x)
        torch.testing.assert_close(got, expected, **TOL)
        difference = max(difference, _largest_difference(got, expected))
    folded_model, folding = fold(copy.deepcopy(theirs).eval(), example_input=x)
    folded = sum("folded into" in what for _, what in folding.changed)
    fold_difference = _largest_difference(_eval(folded_model, x), _eval(theirs, x))
    torch.testing.assert_close(_eval(folded_model, x), _eval(theirs, x), **TOL)
    return Row(name, layers, converted, fused_count, folded, difference, fold_difference,
               _fx(theirs, (plain, fused), x), _export(fused, x))  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_the_tools_on_a_real_model(name):
    row = _check(name)
    print(row)  # the closing table's line (pytest -s)
    assert (row.converted, row.fused, row.folded) == EXPECTED[name], row
