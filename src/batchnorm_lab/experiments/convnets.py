"""The convolutional networks of the experiments, with and without batch norm.

Every builder takes flat input (n, features), as `common.Data` holds it, unflattens it to
(n, 1, *sample_shape) and returns (n, n_classes) logits. Without batch norm a convolution
has a bias and is followed by a ReLU; with it, the convolution has no bias (beta replaces
it) and is followed by batch norm with the ReLU fused into it.
"""

from __future__ import annotations

from torch import Tensor, nn

from batchnorm.nn import BatchNorm1d, BatchNorm2d
from batchnorm.norm_act import BatchNormAct

from ..models import initialize

# The MNIST-1D authors' CNN (Greydanus 2020, the mnist1d repository's ConvBase): three
# convolutions of (kernel, stride, padding), then a linear classifier on the flattened maps.
MNIST1D_CONVS = ((5, 2, 1), (3, 2, 1), (3, 2, 1))


def cnn1d(sample_shape: tuple[int], n_classes: int, *, channels: int, batchnorm: bool,
          init: str = "torch") -> nn.Sequential:
    """The MNIST-1D authors' 1-D CNN on sequences of length L = sample_shape[0]: three
    Conv1d layers of `channels` (MNIST1D_CONVS), each followed by ReLU or by
    `bn.BatchNormAct(bn.BatchNorm1d, "relu")`, then Linear(channels * L_out, n_classes)
    (L = 40 gives L_out = 5, the authors' 125 inputs at 25 channels)."""
    (length,) = sample_shape
    layers: list[nn.Module] = [nn.Unflatten(1, (1, length))]
    in_channels = 1
    for kernel, stride, padding in MNIST1D_CONVS:
        layers.append(nn.Conv1d(in_channels, channels, kernel, stride, padding, bias=not batchnorm))
        layers.append(BatchNormAct(BatchNorm1d(channels), "relu") if batchnorm else nn.ReLU())
        length = (length + 2 * padding - kernel) // stride + 1
        in_channels = channels
    layers += [nn.Flatten(), nn.Linear(channels * length, n_classes)]
    return initialize(nn.Sequential(*layers), "relu", init)


def plain_cnn(sample_shape: tuple[int, int], n_classes: int, *, channels: int, depth: int, batchnorm: bool,
              init: str = "torch") -> nn.Sequential:
    """`depth` 3x3 Conv2d layers (padding 1, so every map keeps the image's H x W) of
    `channels`, the first from 1 channel, each followed by ReLU or by
    `bn.BatchNormAct(bn.BatchNorm2d, "relu")`; then global average pooling and a linear classifier.
    No shortcut: the depth experiment's plain network."""
    return normed_cnn(sample_shape, n_classes, channels=channels, depth=depth, norm="batch" if batchnorm else "none",
                      init=init)


NORMS = ("none", "batch", "group", "layer")
POSITIONS = ("before", "after")


def normed_cnn(sample_shape: tuple[int, int], n_classes: int, *, channels: int, depth: int, norm: str,
               position: str = "before", groups: int = 4, init: str = "torch", **bn_options) -> nn.Sequential:
    """`plain_cnn` with any normalization (NORMS) after each convolution, before the ReLU or
    after it (POSITIONS).

    - "batch": our `bn.BatchNorm2d` (`bn_options` go to it, e.g. `renorm=`); before the
      ReLU it fuses the ReLU, after it the layer normalizes the ReLU's output;
    - "group": torch's GroupNorm of `groups` groups (Wu & He 2018); "layer": GroupNorm of one
      group, the layer norm of a convolutional layer (over C, H, W per example, as Wu & He
      compare it); both per example, so independent of the batch;
    - "none": ReLU only, the convolution with a bias.

    Before the ReLU the convolution has no bias (the normalization's shift replaces it);
    after it, the ReLU is not shift-invariant, so the convolution keeps its bias."""
    if norm not in NORMS or position not in POSITIONS:
        raise ValueError(f"norm must be one of {NORMS} and position one of {POSITIONS}, got {norm!r}, {position!r}")

    def normalization(fused_relu: bool) -> nn.Module:
        if norm == "batch":
            layer = BatchNorm2d(channels, **bn_options)
            return BatchNormAct(layer, "relu") if fused_relu else layer
        layer = nn.GroupNorm(groups if norm == "group" else 1, channels)
        return nn.Sequential(layer, nn.ReLU()) if fused_relu else layer

    layers: list[nn.Module] = [nn.Unflatten(1, (1, *sample_shape))]
    for i in range(depth):
        before = norm != "none" and position == "before"
        layers.append(nn.Conv2d(1 if i == 0 else channels, channels, 3, padding=1, bias=not before))
        if norm == "none":
            layers.append(nn.ReLU())
        elif before:
            layers.append(normalization(fused_relu=True))
        else:
            layers += [nn.ReLU(), normalization(fused_relu=False)]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, n_classes)]
    return initialize(nn.Sequential(*layers), "relu", init)


class ResidualBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + x) on (N, C, H, W) -> (N, C, H, W): two 3x3
    convolutions and an identity shortcut (He et al. 2016's basic block). Built with torch's
    `nn.BatchNorm2d` (or nn.Identity, and biases, without batch norm); `bn.convert(fuse=True)`
    turns the pattern into ours with the ReLUs and the residual add fused. Every operation is
    out of place."""

    def __init__(self, channels: int, batchnorm: bool) -> None:
        super().__init__()
        norm = (lambda: nn.BatchNorm2d(channels)) if batchnorm else nn.Identity
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=not batchnorm)
        self.bn1 = norm()
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=not batchnorm)
        self.bn2 = norm()
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + x)


def resnet(sample_shape: tuple[int, int], n_classes: int, *, channels: int, blocks: int, batchnorm: bool,
           layer: str = "ours", init: str = "torch") -> nn.Module:
    """A small ResNet on (H, W) images: a 3x3 stem convolution from 1 to `channels` (+ BN +
    ReLU), `blocks` ResidualBlocks at full resolution, global average pooling, a linear
    classifier. With batch norm, `layer="torch"` keeps torch's BatchNorm2d and separate ReLU
    and add; `layer="ours"` is the same network, the same tensors, after
    `bn.convert(model, fuse=True)`: our BatchNorm2d with the ReLU and the residual add fused
    (a torch.fx GraphModule, since the add is rewritten in the traced graph)."""
    if layer not in ("ours", "torch"):
        raise ValueError(f"layer must be 'ours' or 'torch', got {layer!r}")
    stem = [nn.Conv2d(1, channels, 3, padding=1, bias=not batchnorm)]
    stem += [nn.BatchNorm2d(channels), nn.ReLU()] if batchnorm else [nn.ReLU()]
    model = nn.Sequential(
        nn.Unflatten(1, (1, *sample_shape)), *stem,
        *(ResidualBlock(channels, batchnorm) for _ in range(blocks)),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, n_classes))
    initialize(model, "relu", init)
    if batchnorm and layer == "ours":
        from batchnorm.tools import convert

        model, _ = convert(model, fuse=True)
    return model


def batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    """The batch-norm modules (ours or torch's) in `model`, in order."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
