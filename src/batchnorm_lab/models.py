"""The networks the lab trains and times: the experiments' MLP, and ResNets for benchmarks.

- `mlp()`: fully connected, `g(BN(W x))` or `g(W x + b)` per hidden layer, its weights started
  by `initialize` (the fair baselines of the experiments, `INITS`); the experiments train it
  and `batchnorm bench monitor` times it.

The ResNets are written the torchvision way, with torch's own `nn.BatchNorm2d`.

`bn.convert(model, fuse=True)` is meant for models written like these: each block is
conv -> bn -> relu(inplace=True) -> conv -> bn, then `out += identity` and the block's
(shared) relu, with a 1x1 conv + bn on the shortcut where the shape changes. torchvision is
not a dependency, so the two models are written out here.

- `resnet20()`: the CIFAR ResNet-20 (He et al. 2016, section 4.2): a 3x3 stem of 16
  channels, 3 stages of 3 basic blocks at 16 / 32 / 64 channels (stride 2 at the start of
  the second and third stage), global average pooling and a linear layer. Input
  (N, 3, 32, 32), output logits (N, num_classes).
- `resnet50()`: torchvision's ResNet-50 layout (7x7 stride-2 stem, 3x3 max pool, bottleneck
  stages of 3 / 4 / 6 / 3 blocks at widths 64 / 128 / 256 / 512 with 4x expansion, the
  stride on the 3x3 conv). Input (N, 3, 224, 224), output (N, num_classes).

- `resnet18()`: torchvision's ResNet-18 layout (the ResNet-50 stem, basic-block stages of
  2 / 2 / 2 / 2 blocks at widths 64 / 128 / 256 / 512). Input (N, 3, H, W), any H, W >= 32.
- `mobilenet_v2()`: MobileNetV2 (Sandler et al. 2018, Table 2): a 3x3 stride-2 stem of 32
  channels, 17 inverted residual blocks (1x1 expansion by t, 3x3 depthwise, 1x1 linear
  projection; a residual add where stride 1 keeps the width), a 1x1 conv to 1280 channels,
  global average pooling and a linear layer; batch norm after every convolution (52) and
  ReLU6 after all but the projections. The network where batch norm and its activation
  are the largest share of a step: the depthwise convolutions do little arithmetic.

The shortcut downsamples with a 1x1 conv + BN (torchvision's option B) in the ResNets; the
CIFAR paper's ResNet-20 uses zero-padding instead, which has no BN to convert.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from batchnorm.nn import BatchNorm1d
from batchnorm.norm_act import BatchNormAct

ACTIVATIONS = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "tanh": nn.Tanh}

# How a network's Linear and Conv weights start. A network without batch norm depends on
# it: with torch's default, uniform(-b, b) with b = 1/sqrt(fan_in) (variance 1/(3 fan_in)),
# each ReLU layer shrinks the signal and a deep network barely trains at small rates. A
# practitioner uses He (Kaiming) for ReLU, variance 2/fan_in, and Xavier (Glorot) for
# sigmoid and tanh, variance gain^2 * 2/(fan_in + fan_out). A network with batch norm keeps
# torch's default: batch norm undoes the scale of the weights before it.
INITS = {
    "practitioner": "He (Kaiming) normal for ReLU networks, Xavier (Glorot) uniform for sigmoid and tanh, zero biases",
    "torch": "PyTorch's default: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in))",
}


def initialize(model: nn.Module, activation: str, init: str) -> nn.Module:
    """Re-initialize `model`'s hidden Linear/Conv layers by `init` (a key of INITS), in place.

    The last Linear layer (the classifier, no activation after it) keeps torch's default,
    as does every layer when `init` is "torch". Returns the model.
    """
    if init not in INITS:
        raise ValueError(f"unknown initialization {init!r}: use one of {', '.join(INITS)}")
    if init == "torch":
        return model
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    for layer in layers[:-1]:
        if activation == "relu":
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
        else:
            nn.init.xavier_uniform_(layer.weight, gain=nn.init.calculate_gain(activation))
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)
    return model


def mlp(
    n_features: int,
    n_classes: int,
    *,
    width: int,
    depth: int,
    activation: str,
    batchnorm: bool,
    init: str = "torch",
    after_norm: Callable[[int], nn.Module] | None = None,
    **bn_options,
) -> nn.Sequential:
    """`depth` hidden layers of `width` units, then a linear classifier: (n, n_features) ->
    (n, n_classes) logits.

    Without batch norm a hidden layer is `g(W x + b)`; with it, `g(BN(W x))` (the bias is
    dropped: BN's beta replaces it), the activation fused: `bn.BatchNormAct(bn.BatchNorm1d, g)`. When
    `after_norm(width)` is given, it builds a module put between BN and `g` (the noise
    experiment), and `g` is a separate module. `bn_options` go to every BatchNorm1d. The
    weights start by `init` (see `initialize`).
    """
    layers: list[nn.Module] = []
    features = n_features
    for _ in range(depth):
        layers.append(nn.Linear(features, width, bias=not batchnorm))
        if batchnorm and after_norm is None:
            layers.append(BatchNormAct(BatchNorm1d(width, **bn_options), activation))
        elif batchnorm:
            layers += [BatchNorm1d(width, **bn_options), after_norm(width), ACTIVATIONS[activation]()]
        else:
            layers.append(ACTIVATIONS[activation]())
        features = width
    layers.append(nn.Linear(features, n_classes))
    return initialize(nn.Sequential(*layers), activation, init)


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _downsample(cin: int, cout: int, stride: int) -> nn.Module | None:
    """1x1 conv + BN on the shortcut when the block changes the shape, else None (identity)."""
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """Two 3x3 convs: (N, cin, H, W) -> (N, cout, H / stride, W / stride)."""

    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = _downsample(cin, width, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # the shortcut after the main path, as torchvision orders it
        identity = x if self.downsample is None else self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand: (N, cin, H, W) -> (N, 4 width, H / stride, W / stride)."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(cin, cout, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """stem -> stages of `block` -> global average pool -> linear: (N, 3, H, W) -> (N, num_classes).

    stem: "cifar" (3x3 conv, stride 1, no pooling) or "imagenet" (7x7 conv stride 2, 3x3
    max pool stride 2). Stage i (`layer{i + 1}`, as torchvision names them, so ResNet-50's
    state_dict keys are torchvision's) has `blocks[i]` blocks of width `widths[i]`; every
    stage but the first halves H and W in its first block.
    """

    def __init__(self, block: type, blocks: list[int], widths: list[int], stem: str, num_classes: int) -> None:
        super().__init__()
        cin = widths[0]
        if stem == "cifar":
            self.conv1 = _conv3x3(3, cin)
            self.maxpool = nn.Identity()
        elif stem == "imagenet":
            self.conv1 = nn.Conv2d(3, cin, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        else:
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU(inplace=True)
        self.num_stages = len(blocks)
        for i, (n, width) in enumerate(zip(blocks, widths)):
            layers = []
            for j in range(n):
                layers.append(block(cin, width, 2 if i > 0 and j == 0 else 1))
                cin = width * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        x = self.avgpool(x)
        return self.fc(x.flatten(1))


def resnet20(num_classes: int = 10) -> ResNet:
    """CIFAR ResNet-20: (N, 3, 32, 32) -> (N, num_classes); 21 batch norms (2 on shortcuts), 0.27 M parameters."""
    return ResNet(BasicBlock, [3, 3, 3], [16, 32, 64], "cifar", num_classes)


def resnet18(num_classes: int = 1000) -> ResNet:
    """ResNet-18, torchvision's layout: (N, 3, H, W) -> (N, num_classes); 20 batch norms, 11.7 M parameters."""
    return ResNet(BasicBlock, [2, 2, 2, 2], [64, 128, 256, 512], "imagenet", num_classes)


def resnet50(num_classes: int = 1000) -> ResNet:
    """ResNet-50, torchvision's layout: (N, 3, 224, 224) -> (N, num_classes); 53 batch norms, 25.6 M parameters."""
    return ResNet(Bottleneck, [3, 4, 6, 3], [64, 128, 256, 512], "imagenet", num_classes)


def _conv_bn_relu6(cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """conv (no bias: batch norm's beta replaces it) -> BN -> ReLU6, "same" padding."""
    conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: (N, cin, H, W) -> (N, cout, H / stride, W / stride).

    1x1 expansion to `expand` * cin channels (left out when expand is 1), 3x3 depthwise
    convolution with the stride, 1x1 linear projection (batch norm, no activation); x is
    added back when the block keeps the shape.
    """

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers = [] if expand == 1 else [_conv_bn_relu6(cin, hidden)]
        layers += [
            _conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.residual else out


# (expansion t, output channels c, blocks n, stride of the first block s): the paper's Table 2.
_MOBILENET_V2 = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def mobilenet_v2(num_classes: int = 1000) -> nn.Sequential:
    """MobileNetV2 (width 1.0): (N, 3, H, W) -> (N, num_classes); 52 batch norms, 3.5 M parameters."""
    layers: list[nn.Module] = [_conv_bn_relu6(3, 32, 3, 2)]
    cin = 32
    for expand, cout, n, stride in _MOBILENET_V2:
        for i in range(n):
            layers.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
            cin = cout
    layers += [_conv_bn_relu6(cin, 1280), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1280, num_classes)]
    model = nn.Sequential(*layers)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
    return model
