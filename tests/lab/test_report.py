"""The report renders from saved results: one self-contained HTML page and a Markdown summary."""

import base64
import json

import pytest

from batchnorm_lab import experiments, report

# The smallest valid PNG: a 1x1 transparent pixel.
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII="
)


def _save(folder, name="speed", held=True, plots=("speed-accuracy.png",), claim=None):
    record = {
        "experiment": name,
        "claim": claim or experiments.get(name).CLAIM,
        "setup": "a setup <b>with markup</b>",
        "config": experiments.config_for(name, quick=True),
        "numbers": {"x": 1.0},
        "checks": [{"name": "fewer steps", "criterion": "median steps smaller", "held": held,
                    "numbers": {"median": 123.456789, "never": None}}],
        "held": held,
        "result": "50 steps vs never | ok",
        "started": "2026-01-01T00:00:00+00:00",
        "seconds": 1.5,
        "environment": experiments.environment("cpu"),
        "plots": list(plots),
    }
    (folder / f"{name}.json").write_text(json.dumps(record))
    return record


def test_report_renders_self_contained(tmp_path):
    _save(tmp_path, "speed", held=True)
    _save(tmp_path, "noise", held=False, plots=("noise-accuracy.png",), claim="noise < none & more")
    (tmp_path / "speed-accuracy.png").write_bytes(PNG)  # noise's plot is missing on purpose
    html_path, md_path = report.render(tmp_path, experiments.load_results(tmp_path), title="unit test")
    html = html_path.read_text()
    assert html.startswith("<!doctype html>") and 'name="viewport"' in html and "@media" in html
    assert f"data:image/png;base64,{base64.b64encode(PNG).decode()}" in html
    assert "plot noise-accuracy.png is missing" in html
    assert "&lt;b&gt;with markup&lt;/b&gt;" in html and "noise &lt; none &amp; more" in html  # escaped
    assert html.count('class="badge held">held') == 2 and html.count("did not hold") == 2  # table + section
    assert html.index('id="speed"') < html.index('id="noise"')  # registry order
    assert "123.5" in html and "123.456789" not in html  # numbers rounded for reading
    md = md_path.read_text()
    assert "| [speed](#speed) |" in md and "50 steps vs never \\| ok" in md
    assert "**did not hold**" in md and "![speed: speed-accuracy.png](speed-accuracy.png)" in md
    assert "1 claim held" in md


def test_report_errors(tmp_path):
    with pytest.raises(ValueError, match="no results folder"):
        report.render(tmp_path / "absent", [])
    with pytest.raises(ValueError, match="holds no experiment results"):
        report.render(tmp_path, [])


def test_compact_rounds_nested():
    assert report.compact({"a": [0.123456, None], "b": {"c": 2}}) == '{"a": [0.1235, null], "b": {"c": 2}}'
