"""The checks of recorded runs, kept in the repository so that a test can judge them again.

`docs/verdicts.json` holds, for a quick run (`batchnorm demo`) and a full run
(`batchnorm run all`), each experiment's configuration and each check's name, outcome and
numbers in words; tests/lab/experiments/test_agreement.py applies both configurations'
verdict logic (`common.judge`) to them and checks that every quick verdict equals the full
one or is inconclusive at the demo's length. Regenerate it after a change to a
configuration or a check, from the results folders of the two runs:

    python -m batchnorm_lab.experiments.recorded --quick results/demo --full results/full > docs/verdicts.json

A run may be spread over several folders (`--full A --full B`); a later folder's record of
an experiment replaces an earlier one's. Each entry names its `source`: the folder, or for
a run whose records are not at hand, the document its outcome was taken from.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import load_results


def checks_of(folders: list[Path]) -> dict:
    """{experiment: {"source", "config", "seconds", "checks": [{"name", "held", "why"}]}} of
    the records saved in `folders` (later folders win; source: the folder)."""
    found = {}
    for folder in folders:
        for record in load_results(folder):
            found[record["experiment"]] = {
                "source": str(folder), "config": record["config"], "seconds": record["seconds"],
                "checks": [{"name": c["name"], "held": c["held"], "why": c.get("why", "")} for c in record["checks"]]}
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="recorded", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", type=Path, action="append", required=True, help="a results folder of the demo")
    parser.add_argument("--full", type=Path, action="append", required=True, help="a results folder of the full run")
    args = parser.parse_args(argv)
    print(json.dumps({"quick": checks_of(args.quick), "full": checks_of(args.full)}, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
