"""Importing the third-party model libraries of the `models` extra in the tests.

torchvision's wheels here are CUDA builds whose C extension cannot load with the CPU
torch; its import then fails registering fake kernels for `nms` and `qnms`, ops the
extension would have defined. Defining those two schemas (never called: the tests run no
detection op) and importing again loads its pure-Python models, and timm, which imports
torchvision. Where the extension loads, nothing is defined.

transformers imports the `kernels` package (Hugging Face's hub kernels) when it is
installed; pytest puts tests/ on sys.path, where this project's tests/kernels would be
found instead. transformers' use of it is imported with tests/ off the path, and the
project's package put back after.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

_SCHEMAS = ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
            "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")  # fmt: skip


@functools.cache
def _import_torchvision():
    """torchvision, with the two schemas defined when its own import needs them."""
    try:
        import torchvision
    except RuntimeError as error:
        if "torchvision::nms" not in str(error):
            raise
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        library = torch.library.Library("torchvision", "FRAGMENT")
        for schema in _SCHEMAS:
            library.define(schema)
        _import_torchvision.library = library  # a Library's definitions live as long as it does
        import torchvision
    return torchvision


@functools.cache
def _import_transformers():
    """transformers, its hub-kernels module imported with the installed `kernels` package."""
    tests = Path(__file__).resolve().parents[1]
    ours = {n: sys.modules.pop(n) for n in list(sys.modules) if n == "kernels" or n.startswith("kernels.")}
    path = list(sys.path)
    sys.path[:] = [p for p in path if Path(p or ".").resolve() != tests]
    try:
        import transformers.integrations.hub_kernels  # noqa: F401
    finally:
        sys.path[:] = path
        for name in [n for n in sys.modules if n == "kernels" or n.startswith("kernels.")]:
            del sys.modules[name]
        sys.modules.update(ours)
    return importlib.import_module("transformers")


def need(name: str):
    """Import `name` (torchvision, timm or transformers), or skip the test when it is not
    installed (`pip install -e '.[models]'`)."""
    if importlib.util.find_spec(name) is None or importlib.util.find_spec("torchvision") is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[models]')")
    _import_torchvision()
    return _import_transformers() if name == "transformers" else importlib.import_module(name)
