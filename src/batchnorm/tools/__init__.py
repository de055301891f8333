"""Operations on whole models: fit batch norm in (`insert`, `convert`/`revert`), serve it
(`fold`), fix it (`freeze`/`unfreeze`, `frozen_stats`, `stats_snapshot`/`stats_restore`),
replace it (`replace_norm`: GroupNorm for small batches), re-estimate its statistics
(`recalibrate`, `adapt`), update them once per optimizer step (`accumulate`) or merge them
across processes (`merge_rank_stats`); and look inside it: `monitor`
(what reaches each nonlinearity during training) and `check` (a batch-norm health check, health.py,
returning a `CheckReport`, not `(model, changes)`).

Each tool takes the model first and returns `(model, changes)`: the model is changed in
place unless `inplace=False` (a deep copy is changed instead), and `changes` (a `Changes`)
lists what was changed and what was skipped, per module path.
"""

from ._common import Changes
from .accumulate import accumulate
from .convert import convert, revert
from .fold import Activation, ChannelAffine, fold
from .freeze import freeze, frozen_stats, stats_restore, stats_snapshot, unfreeze
from .health import CheckReport, Finding, check
from .insert import insert
from .monitor import Monitor, monitor
from .rank_stats import merge_rank_stats
from .recalibrate import adapt, recalibrate
from .replace_norm import replace_norm

__all__ = [
    "Activation",
    "ChannelAffine",
    "Changes",
    "CheckReport",
    "Finding",
    "Monitor",
    "accumulate",
    "adapt",
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
    "unfreeze",
]
