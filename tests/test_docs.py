"""Every number the prose quotes from a benchmark comes from one source: the JSON a bench
command wrote to docs/bench/. The generated pages are that JSON rendered; the prose (README
and docs/*.md) quotes a number with a marker naming where it comes from,

    1.97x<!-- quote kernels-cpu summary.geomean_cnn_fb -->
    0.90<!-- quote train-cpu rows.*.speedups.ours_eager_vs_torch_eager min -->-1.04x<!-- ... max -->

and this test checks each quoted number against the JSON at the precision it is printed
with, so a rerun of a benchmark that moves a number fails here until the prose says it
(the marker is an HTML comment: rendered Markdown shows the number alone).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "docs" / "bench"
# Rendered from their JSON by the bench commands, never by hand: checked against it below.
# (results.md is written by hand from the experiments' runs, so its quotes are checked too.)
GENERATED = {"benchmarks.md", "bench-train.md", "bench-compile.md", "bench-accuracy.md", "bench-step.md"}
PROSE = [ROOT / "README.md", *(p for p in sorted((ROOT / "docs").glob("*.md")) if p.name not in GENERATED)]

QUOTE = re.compile(
    r"(?P<number>\d+(?:\.\d+)?)(?P<unit>x|%)?<!-- quote (?P<file>[\w-]+) (?P<path>\S+)(?: (?P<agg>min|max))? -->"
)


def _values(document, path: str) -> list:
    """The values at a dotted path: `*` takes every item of a list (or value of a dict),
    an integer one item of a list."""
    found = [document]
    for part in path.split("."):
        step = []
        for value in found:
            if part == "*":
                step.extend(value.values() if isinstance(value, dict) else value)
            elif isinstance(value, list):
                step.append(value[int(part)])
            else:
                step.append(value[part])
        found = step
    return found


def quoted_value(file: str, path: str, agg: str | None) -> float:
    """The number a marker names: one value, min/max over a `*`, or a ratio `a/b` of two."""
    document = json.loads((BENCH / f"{file}.json").read_text())
    parts = []
    for one in path.split("/"):
        values = _values(document, one)
        if agg is None:
            assert len(values) == 1, f"{file} {path}: {len(values)} values; say min or max"
            parts.append(values[0])
        else:
            parts.append(min(values) if agg == "min" else max(values))
    return parts[0] if len(parts) == 1 else parts[0] / parts[1]


def _quotes():
    for page in PROSE:
        for match in QUOTE.finditer(page.read_text()):
            yield pytest.param(page, match, id=f"{page.name}:{match['file']}:{match['path']}:{match['agg'] or ''}")


def test_the_prose_quotes_numbers_from_the_benchmarks():
    """The pages that state speed-ups quote them (a page that stops quoting would hold
    hand-copied numbers again)."""
    quoting = {page.name for page, match in (q.values for q in _quotes())}
    assert {"README.md", "performance.md"} <= quoting


@pytest.mark.parametrize("page,match", list(_quotes()))
def test_each_quoted_number_is_the_generated_one(page, match):
    value = quoted_value(match["file"], match["path"], match["agg"])
    if match["unit"] == "%":
        value *= 100
    printed = match["number"]
    decimals = len(printed.partition(".")[2])
    assert f"{value:.{decimals}f}" == printed, (
        f"{page.name} says {printed}{match['unit'] or ''} for {match['file']} {match['path']} "
        f"{match['agg'] or ''}; docs/bench/{match['file']}.json has {value:.{decimals}f}"
    )


def _machine_lists(text: str) -> str:
    """The machine's load averages are tuples in the run that writes a page and lists once
    read back from its JSON; the same numbers either way."""
    return re.sub(r"\(([\d., ]+)\)", r"[\1]", text)


@pytest.mark.parametrize(
    "page,source,render",
    [
        ("benchmarks.md", "kernels-cpu", "batchnorm_lab.bench:render"),
        ("bench-train.md", "train-cpu", "batchnorm_lab.bench_train:render"),
        ("bench-compile.md", "compile-cpu", "batchnorm_lab.bench:render_compile_crossover"),
        ("bench-accuracy.md", "accuracy", "batchnorm_lab.bench_accuracy:render"),
        ("bench-step.md", "step-cpu", "batchnorm_lab.bench_step:render"),
    ],
)
def test_each_generated_page_is_its_json_rendered(page, source, render):
    """A generated page says what its JSON says: the prose quotes the JSON, readers read
    the page, and both must be the same run."""
    import importlib

    pytest.importorskip("typer")  # the lab's modules need the experiments extra
    module, name = render.split(":")
    result = json.loads((BENCH / f"{source}.json").read_text())
    expected = getattr(importlib.import_module(module), name)(result)
    assert _machine_lists((ROOT / "docs" / page).read_text()) == _machine_lists(expected)
