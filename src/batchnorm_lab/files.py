"""Files the lab writes whole: a reader never sees one half-written."""

from __future__ import annotations

import os
from pathlib import Path


# Where the bench commands write when not told (--out): a folder of the current directory,
# so a run from a user's project never writes into its docs/ or into the installed package.
RESULTS = Path("results")


def write_atomic(path: Path, content: bytes) -> None:
    """Write `content` to a temporary file beside `path`, then rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(content)
    os.replace(tmp, path)
