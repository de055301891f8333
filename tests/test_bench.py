"""`batchnorm bench kernels --quick`: runs end to end and writes well-formed JSON and markdown.

No timing is asserted (the machine is shared); only the structure of what is written, and
the pure helpers (traffic model, summary) on hand-made numbers.
"""

from __future__ import annotations

import json
import math

from typer.testing import CliRunner

from batchnorm import bench
from batchnorm.cli import app


def test_quick_bench_writes_json_and_markdown(tmp_path):
    notes = tmp_path / "notes.md"
    notes.write_text("## Design notes\n\nprediction, then measurement.\n")
    md = tmp_path / "benchmarks.md"
    result = CliRunner().invoke(
        app,
        ["bench", "kernels", "--quick", "--repeats", "1", "--out", str(tmp_path / "json"),
         "--markdown", str(md), "--notes", str(notes)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "json" / "kernels-cpu-quick.json").read_text())
    rows = data["rows"]
    expected = len(bench.grid("cpu", quick=True)) * len(bench.MODES) * len(bench.VARIANTS)
    assert len(rows) == expected
    for row in rows:
        assert row["mode"] in bench.MODES and row["variant"] in bench.VARIANTS
        assert row["backend"] in ("aten", "numba")
        for key in ("torch_ms", "ours_ms", "ratio", "ratio_min", "ours_gbps", "copy_gbps", "copy_fraction"):
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)
        assert math.isclose(row["ratio"], row["torch_ms"] / row["ours_ms"], rel_tol=1e-9)
    assert data["machine"]["cores"] >= 1 and data["crossover"]["points"]
    text = md.read_text()
    assert text.startswith("# Kernel benchmarks")
    assert "## Crossover" in text and "## Design notes" in text
    table = [ln for ln in text.splitlines() if ln.startswith("| ") and ln[2].isdigit() and "x" in ln.split("|")[1]]
    assert len(table) == expected
    header = next(ln for ln in text.splitlines() if ln.startswith("| shape"))
    assert all(ln.count("|") == header.count("|") for ln in table)


def test_minimal_traffic_model():
    # forward: read x, write y; backward: read x, dy, write dx; a residual adds a read
    # forward and a dresidual write backward.
    assert bench.minimal_bytes(10, 4, "eval", False) == 80
    assert bench.minimal_bytes(10, 4, "train", True) == 120
    assert bench.minimal_bytes(10, 4, "train_fb", False) == 200
    assert bench.minimal_bytes(10, 4, "train_fb", True) == 280


def test_summary_targets_from_rows():
    def row(shape, variant, ratio, mode="train_fb"):
        return dict(shape=shape, variant=variant, ratio=ratio, mode=mode, copy_fraction=ratio / 10,
                    ratio_min=2 * ratio, copy_fraction_best=ratio / 5, format="contiguous", torch_ms=ratio,
                    copy_gbps=1.0, minimal_bytes=bench.minimal_bytes(math.prod(shape), 4, mode, False))  # fmt: skip

    rows = [row([2, 3, 4, 4], "relu", 4.0), row([2, 3, 4, 4], "plain", 1.0), row([8, 3], "relu", 2.0),
            row([2, 3, 4, 4], "plain", 0.5, mode="eval")]  # fmt: skip
    s = bench.summarize(rows)
    assert math.isclose(s["geomean_cnn_fb"], 2.0)
    assert math.isclose(s["geomean_relu_fb"], math.sqrt(8.0))
    assert s["min_ratio"] == 0.5 and s["min_ratio_fb"] == 1.0
    assert math.isclose(s["largest_copy_fraction"], 0.1)
    assert math.isclose(s["geomean_cnn_fb_best"], 4.0) and s["min_ratio_fb_best"] == 2.0
    assert math.isclose(s["largest_copy_fraction_best"], 0.2)
    pass_ms = 96 * 4 / 1e9 * 1e3  # a (2, 3, 4, 4) fp32 tensor at 1 GB/s
    assert math.isclose(s["copy_rate_cnn_fb"], 2.0 / (5 * pass_ms))  # torch_ms = ratio: 4 and 1
    assert math.isclose(s["copy_rate_cnn_relu_fb"], 4.0 / (5 * pass_ms)) and s["geomean_cnn_relu_fb"] == 4.0


def test_copy_rate_ratio_counts_the_kernels_passes():
    # 1 MB tensor, copy at 2 GB/s (read + write): a pass takes 0.5 ms; torch takes 10 ms
    def row(fmt, variant):
        nbytes = bench.minimal_bytes(250_000, 4, "train_fb", bench.VARIANTS[variant][1])
        return dict(shape=[10, 25, 10, 100], format=fmt, mode="train_fb", variant=variant,
                    minimal_bytes=nbytes, copy_gbps=2.0, torch_ms=10.0)  # fmt: skip

    assert math.isclose(bench.copy_rate_ratio(row("contiguous", "plain")), 10.0 / (5 * 0.5))
    assert math.isclose(bench.copy_rate_ratio(row("contiguous", "residual+relu")), 10.0 / (8 * 0.5))
    assert math.isclose(bench.copy_rate_ratio(row("channels_last", "relu")), 10.0 / (8 * 0.5))
    assert math.isclose(bench.copy_rate_ratio(row("channels_last", "residual+relu")), 10.0 / (12 * 0.5))


def test_grid_depends_on_device():
    cpu, cuda = bench.grid("cpu", False), bench.grid("cuda", False)
    assert len(cpu) == len(bench.MLP_SHAPES) + 2 * len(bench.CNN_SHAPES)
    assert set(cpu) < set(cuda) and any(s in bench.RESNET50_SHAPES for s, _ in cuda)


def test_monitor_overhead_command_reports_both_models():
    result = CliRunner().invoke(app, ["bench", "monitor", "--steps", "3", "--rounds", "1", "--every", "2"])
    assert result.exit_code == 0, result.output
    assert "sigmoid" in result.output and "batchnorm" in result.output and "%" in result.output
