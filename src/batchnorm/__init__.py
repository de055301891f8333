"""batchnorm: batch normalization for PyTorch, correct and fast, with the tools around it.

    import batchnorm as bn
    layer = bn.BatchNorm2d(64)                          # drop-in for torch.nn.BatchNorm2d
    fused = bn.BatchNormAct(bn.BatchNorm2d(64), "relu")
    y = fused(x, residual=shortcut)                     # relu(bn(x) + shortcut), one kernel
"""

from . import backends, functional, reference, tools
from .conventions import from_flax, from_keras
from .distributed import SyncBatchNorm
from .nn import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    LazyBatchNorm1d,
    LazyBatchNorm2d,
    LazyBatchNorm3d,
)
from .tools import (
    Changes,
    accumulate,
    adapt,
    check,
    convert,
    fold,
    freeze,
    frozen_stats,
    insert,
    merge_rank_stats,
    monitor,
    recalibrate,
    replace_norm,
    revert,
    stats_restore,
    stats_snapshot,
    unfreeze,
)
from .inplace_abn import InPlaceABN
from .norm_act import BatchNormAct
from .sequence import SequenceBatchNorm
from .variants import Renorm

__version__ = "0.1.0"

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
    "BatchNormAct",
    "InPlaceABN",
    "Changes",
    "Renorm",
    "SequenceBatchNorm",
    "SyncBatchNorm",
    "accumulate",
    "adapt",
    "backends",
    "check",
    "convert",
    "fold",
    "freeze",
    "frozen_stats",
    "insert",
    "merge_rank_stats",
    "monitor",
    "recalibrate",
    "replace_norm",
    "revert",
    "stats_restore",
    "stats_snapshot",
    "tools",
    "unfreeze",
    "from_flax",
    "from_keras",
    "functional",
    "reference",
]
