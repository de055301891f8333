"""What the kernel benchmarks measure: the grid of shapes, modes and variants.

`batchnorm bench kernels` times every row of it (bench.py), and the GPU cross-compiler
compiles every kernel the rows launch (triton_compile.py): both read it here.
"""

from __future__ import annotations

MLP_SHAPES = [(64, 100), (256, 512), (4096, 1024)]
CNN_SHAPES = [(64, 64, 56, 56), (32, 256, 14, 14), (128, 512, 7, 7), (8, 32, 112, 112)]
#: ResNet-50 at batch 256: the input of each distinct batch-norm shape.
RESNET50_SHAPES = [(256, 64, 112, 112), (256, 256, 56, 56), (256, 512, 28, 28), (256, 1024, 14, 14), (256, 2048, 7, 7)]
QUICK_SHAPES = [(64, 100), (4, 8, 6, 6)]
MODES = ("eval", "train", "train_fb")
VARIANTS = {"plain": (None, False), "relu": ("relu", False), "residual+relu": ("relu", True)}


def grid(device: str, quick: bool) -> list[tuple[tuple[int, ...], str]]:
    """(shape, memory format) pairs: MLP rows are 2-D, CNN rows both formats; CUDA adds ResNet-50."""
    if quick:
        return [(s, "contiguous") for s in QUICK_SHAPES] + [(QUICK_SHAPES[1], "channels_last")]
    cnn = CNN_SHAPES + (RESNET50_SHAPES if device == "cuda" else [])
    return [(s, "contiguous") for s in MLP_SHAPES] + [
        (s, fmt) for s in cnn for fmt in ("contiguous", "channels_last")
    ]
