"""`batchnorm bench kernels --quick` and `bench train --quick`: run end to end and write
well-formed JSON and markdown.

No timing is asserted (the machine is shared); only the structure of what is written, and
the pure helpers (traffic model, summary) on hand-made numbers.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from batchnorm.backends import numba_cpu
from batchnorm_lab import bench, bench_grid, bench_train, models, timing
from batchnorm_lab.cli import app


@pytest.mark.slow
def test_quick_bench_writes_json_and_markdown(tmp_path):
    notes = tmp_path / "notes.md"
    notes.write_text("## Notes\n\nappended as they are.\n")
    md = tmp_path / "benchmarks.md"
    result = CliRunner().invoke(
        app,
        ["bench", "kernels", "--quick", "--repeats", "1", "--out", str(tmp_path / "json"),
         "--markdown", str(md), "--notes", str(notes)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "json" / "kernels-cpu-quick.json").read_text())
    rows = data["rows"]
    expected = len(bench_grid.grid("cpu", quick=True)) * len(bench_grid.MODES) * len(bench_grid.VARIANTS)
    assert len(rows) == expected
    for row in rows:
        assert row["mode"] in bench_grid.MODES and row["variant"] in bench_grid.VARIANTS
        assert row["backend"] in ("aten", "numba")
        for key in ("torch_ms", "ours_ms", "ratio", "ratio_min", "ours_gbps", "copy_gbps", "copy_fraction"):
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)
        assert math.isclose(row["ratio"], row["torch_ms"] / row["ours_ms"], rel_tol=1e-9)
    assert data["machine"]["cores"] >= 1 and data["crossover"]["points"]
    cl_points = data["crossover_channels_last"]["points"]
    assert len(cl_points) == len(data["crossover"]["points"]) and all(p["ratio"] > 0 for p in cl_points)
    text = md.read_text()
    assert text.startswith("# Kernel benchmarks")
    assert "## Crossover" in text and "## Notes" in text and "(performance.md)" in text
    assert f"CROSSOVER_NUMEL_CHANNELS_LAST` = {numba_cpu.CROSSOVER_NUMEL_CHANNELS_LAST}" in text
    table = [ln for ln in text.splitlines() if ln.startswith("| ") and ln[2].isdigit() and "x" in ln.split("|")[1]]
    assert len(table) == expected
    header = next(ln for ln in text.splitlines() if ln.startswith("| shape"))
    assert all(ln.count("|") == header.count("|") for ln in table)



def test_summary_targets_from_rows():
    def row(shape, variant, ratio, mode="train_fb"):
        return dict(shape=shape, variant=variant, ratio=ratio, mode=mode, copy_fraction=ratio / 10,
                    ratio_min=2 * ratio, copy_fraction_best=ratio / 5, format="contiguous", torch_ms=ratio,
                    copy_gbps=1.0, minimal_bytes=timing.minimal_bytes(math.prod(shape), 4, mode, False))  # fmt: skip

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
        nbytes = timing.minimal_bytes(250_000, 4, "train_fb", bench_grid.VARIANTS[variant][1])
        return dict(shape=[10, 25, 10, 100], format=fmt, mode="train_fb", variant=variant,
                    minimal_bytes=nbytes, copy_gbps=2.0, torch_ms=10.0)  # fmt: skip

    assert math.isclose(bench.copy_rate_ratio(row("contiguous", "plain")), 10.0 / (5 * 0.5))
    assert math.isclose(bench.copy_rate_ratio(row("contiguous", "residual+relu")), 10.0 / (8 * 0.5))
    assert math.isclose(bench.copy_rate_ratio(row("channels_last", "relu")), 10.0 / (8 * 0.5))
    assert math.isclose(bench.copy_rate_ratio(row("channels_last", "residual+relu")), 10.0 / (12 * 0.5))



@pytest.mark.slow
def test_monitor_overhead_reports_both_models():
    result = bench.monitor_overhead(steps=2, rounds=1)
    assert set(result) == {"sigmoid", "batchnorm"}
    for numbers in result.values():
        assert numbers["step_s"] > 0 and numbers["monitored_step_s"] > 0
        assert numbers["overhead"] > -1.0  # a ratio of two positive times, minus one


def test_monitor_overhead_command_reports_both_models():
    result = CliRunner().invoke(app, ["bench", "monitor", "--steps", "3", "--rounds", "1", "--every", "2"])
    assert result.exit_code == 0, result.output
    assert "sigmoid" in result.output and "batchnorm" in result.output and "%" in result.output


# `batchnorm bench train`: whole training steps, four arms. As above, no timing is asserted:
# only that every arm is there, the ratios are the quotients of the times, and a failing arm
# is recorded instead of stopping the run.


@pytest.mark.slow
def test_quick_train_bench_eager_arms(tmp_path):
    md = tmp_path / "bench-train.md"
    result = CliRunner().invoke(
        app, ["bench", "train", "--quick", "--no-compile", "--out", str(tmp_path), "--markdown", str(md)]
    )
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "train-cpu-quick.json").read_text())
    assert data["repeats"] == 2 and data["compile"] is False and data["machine"]["cores"] >= 1
    configs = bench_train.configurations("cpu", quick=True)
    assert [{k: r[k] for k in ("model", "batch", "format", "dtype")} for r in data["rows"]] == configs
    for row in data["rows"]:
        assert set(row["arms"]) == set(bench_train.ARMS)
        for arm in ("torch eager", "ours eager"):
            rec = row["arms"][arm]
            assert rec["status"] == "ok" and rec["error"] is None
            assert 0 < rec["min_ms"] <= rec["ms"] and rec["first_step_s"] > 0
        for arm in ("torch compiled", "ours compiled"):
            assert row["arms"][arm]["status"] == "skipped" and row["arms"][arm]["ms"] is None
        eager = row["arms"]["torch eager"]["ms"] / row["arms"]["ours eager"]["ms"]
        assert math.isclose(row["speedups"]["ours_eager_vs_torch_eager"], eager, rel_tol=1e-12)
        assert row["speedups"]["ours_compiled_vs_torch_compiled"] is None
        assert row["speedups"]["ours_compiled_vs_torch_eager"] is None
        # same initial weights, same first batch: the same loss up to rounding
        losses = [row["arms"][a]["first_loss"] for a in ("torch eager", "ours eager")]
        assert math.isclose(*losses, rel_tol=1e-4)
        assert row["fusion"] == dict(batch_norms=21, fused_activation=19, fused_residual=9)
    text = md.read_text()
    assert text.startswith("# Training-step benchmarks") and "## Errors" not in text
    table = [ln for ln in text.splitlines() if ln.startswith("| resnet20 | 8 |")]
    assert len(table) == 2 * len(configs)  # step times, then warm-up
    assert all("not run" in ln for ln in table)
    assert "| resnet20 | 8 | contiguous | fp32 |" in result.output  # the table is printed too


@pytest.mark.slow
def test_train_bench_records_failing_arms(monkeypatch):
    """A compiled arm failing as it is built, and one failing in the timed rounds: both are
    recorded with their message and left out; the eager arms are timed."""

    class FailsOnCall(torch.nn.Module):
        def __init__(self, inner, after):
            super().__init__()
            self.inner, self.calls, self.after = inner, 0, after

        def forward(self, x):
            self.calls += 1
            if self.calls > self.after:
                raise RuntimeError(f"call {self.calls} failed")
            return self.inner(x)

    def fake_compile(model):
        if isinstance(model, torch.fx.GraphModule):  # ours: convert rewrote the graph
            raise RuntimeError("ours cannot compile\nsecond line")
        # the warm-up steps, the step once the kernels are ready and time_medians' own
        # warm-up pass; the first timed round fails
        return FailsOnCall(model, bench_train.WARMUP_STEPS + 2)

    waits = []  # the arms wait for the kernels their warm-up asked for before they are timed
    monkeypatch.setattr(bench_train.numba_warmup, "wait", lambda: waits.append(len(waits)))
    monkeypatch.setattr(torch, "compile", fake_compile)
    cfg = dict(model="resnet20", batch=4, format="contiguous", dtype="fp32")
    row = bench_train.bench_config(cfg, "cpu", repeats=2)
    assert len(waits) == 3  # every arm that warmed up: all but ours compiled
    arms = row["arms"]
    assert arms["ours compiled"]["status"] == "error" and arms["ours compiled"]["phase"] == "build or warm-up"
    assert arms["ours compiled"]["error"].startswith("RuntimeError: ours cannot compile")
    assert arms["torch compiled"]["status"] == "error" and arms["torch compiled"]["phase"] == "timed rounds"
    assert arms["torch compiled"]["error"] == f"RuntimeError: call {bench_train.WARMUP_STEPS + 3} failed"
    assert arms["torch compiled"]["first_step_s"] > 0 and arms["torch compiled"]["ms"] is None
    for arm in ("torch eager", "ours eager"):
        assert arms[arm]["status"] == "ok" and arms[arm]["ms"] > 0
    assert row["speedups"] == dict(
        ours_eager_vs_torch_eager=arms["torch eager"]["ms"] / arms["ours eager"]["ms"],
        ours_compiled_vs_torch_compiled=None, ours_compiled_vs_torch_eager=None,
    )  # fmt: skip
    result = dict(machine={}, repeats=2, warmup_steps=2, load_before=None, load_after=None, rows=[row])
    text = bench_train.render(result)
    assert "error [1]" in text and "error [2]" in text and "## Errors" in text
    assert "torch compiled (timed rounds): `RuntimeError: call" in text
    assert "ours compiled (build or warm-up): `RuntimeError: ours cannot compile`" in text


def test_train_speedups_are_time_quotients():
    ms = {"torch eager": 10.0, "torch compiled": 6.0, "ours eager": 4.0, "ours compiled": 3.0}
    assert bench_train.speedups(ms) == dict(
        ours_eager_vs_torch_eager=2.5, ours_compiled_vs_torch_compiled=2.0, ours_compiled_vs_torch_eager=10 / 3
    )
    s = bench_train.speedups({**ms, "torch compiled": None})
    assert s["ours_compiled_vs_torch_compiled"] is None and s["ours_compiled_vs_torch_eager"] == 10 / 3


def test_train_grid_and_models():
    cpu, cuda = bench_train.configurations("cpu", False), bench_train.configurations("cuda", False)
    expected = [("resnet20", 64), ("resnet20", 128), ("resnet18", 32), ("mobilenet_v2", 32)]
    assert [(r["model"], r["batch"], r["format"]) for r in cpu] == [
        (m, b, f) for m, b in expected for f in bench_train.FORMATS
    ]
    assert all(r["dtype"] == "fp32" for r in cpu)
    assert cuda[: len(cpu)] == cpu
    assert cuda[len(cpu):] == [dict(model="resnet50", batch=128, format="channels_last", dtype="bf16")]
    r20, r18, mnv2, r50 = models.resnet20(), models.resnet18(), models.mobilenet_v2(), models.resnet50()
    # parameter counts of the reference models (torchvision's: resnet18 11,689,512,
    # mobilenet_v2 3,504,872, resnet50 25,557,032)
    assert sum(p.numel() for p in r20.parameters()) == 272_474
    assert sum(p.numel() for p in r18.parameters()) == 11_689_512
    assert sum(p.numel() for p in mnv2.parameters()) == 3_504_872
    assert sum(p.numel() for p in r50.parameters()) == 25_557_032
    bns = [sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) for net in (r18, mnv2, r50)]
    assert bns == [20, 52, 53]
    assert mnv2(torch.randn(2, 3, 64, 64)).shape == r18(torch.randn(2, 3, 64, 64)).shape == (2, 1000)
    assert r20(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_compile_crossover_renders_each_point_and_the_rule():
    from batchnorm_lab.bench import render_compile_crossover

    result = dict(
        machine={"device": "cpu"}, backend="numba", op_wins_from_numel=65536,
        points=[dict(numel=4096, inductor_ms=0.1, op_ms=0.2, torch_compiled_ms=0.1, ratio=0.5, ratio_vs_torch_compiled=0.5),
                dict(numel=65536, inductor_ms=3.0, op_ms=1.0, torch_compiled_ms=2.5, ratio=3.0, ratio_vs_torch_compiled=2.5)],
    )  # fmt: skip
    text = render_compile_crossover(result)
    assert "| 4096 | 0.100 | 0.200 | 0.100 | 0.50 | 0.50 |" in text
    assert "| 65536 | 3.000 | 1.000 | 2.500 | 3.00 | 2.50 |" in text
    assert "never slower from 65536 elements on" in text


def test_gpu_rule_command_writes_the_rule_from_recorded_runs(tmp_path):
    machine = dict(device="cuda", torch="2.11.0", date="2026-01-01T00:00:00Z", gpu="NVIDIA H200", driver="570.1",
                   cuda="12.8", triton="3.6.0")  # fmt: skip
    row = dict(shape=[256, 512], format="contiguous", dtype="float32", mode="train_fb", variant="plain",
               backend="triton", ratio=1.4)  # fmt: skip
    recorded = dict(machine=machine, repeats=7, quick=False, backend_requested="triton", rows=[row])
    (tmp_path / "kernels-cuda-0.json").write_text(json.dumps(recorded))
    out = tmp_path / "rule.json"
    result = CliRunner().invoke(app, ["bench", "gpu-rule", "--runs", str(tmp_path / "kernels-cuda*.json"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "NVIDIA H200: triton for 1 of 1 shape classes: mc/float32/64K+" in result.output
    assert json.loads(out.read_text())["devices"]["NVIDIA H200"]["triton"] == ["mc/float32/64K+"]
