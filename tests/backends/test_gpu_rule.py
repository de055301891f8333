"""The CUDA dispatch rule (batchnorm.backends.gpu_rule) on synthetic benchmark JSON."""

from __future__ import annotations

import glob
import json

import pytest
import torch

from batchnorm import backends, modes
from batchnorm.backends import gpu_rule

H200, A100 = "NVIDIA H200", "NVIDIA A100-SXM4-80GB"


def row(shape, fmt="contiguous", dtype="float32", ratio=1.2, mode="train_fb", variant="plain", backend="triton"):
    """A row as bench.bench_row writes it (the fields the rule reads)."""
    return dict(shape=list(shape), format=fmt, dtype=dtype, mode=mode, variant=variant, backend=backend, ratio=ratio)


def run(gpu, rows, date="2026-01-01T00:00:00Z", device="cuda", quick=False, backend="triton"):
    """A result as `bench kernels --backend BACKEND` writes it."""
    machine = dict(device=device, torch="2.11.0", date=date)
    if gpu is not None:
        machine.update(gpu=gpu, driver="570.1", cuda="12.8", triton="3.6.0")
    return dict(machine=machine, repeats=7, quick=quick, backend_requested=backend, rows=rows)


def write_runs(tmp_path, runs):
    for i, r in enumerate(runs):
        (tmp_path / f"kernels-cuda-{i}.json").write_text(json.dumps(r))
    return str(tmp_path / "kernels-cuda*.json")


def test_shape_classes():
    assert gpu_rule.shape_class((256, 64, 112, 112), False, "bfloat16") == "ncl/bfloat16/64M+"
    assert gpu_rule.shape_class((256, 64, 112, 112), True, "float32") == "mc/float32/64M+"
    assert gpu_rule.shape_class((64, 100), False, "float32") == "mc/float32/0+"
    assert gpu_rule.shape_class((256, 512), False, "float32") == "mc/float32/64K+"
    assert gpu_rule.shape_class((4096, 1024), False, "float32") == "mc/float32/1M+"
    assert gpu_rule.shape_class((64, 64, 56, 56), False, "float32") == "ncl/float32/8M+"
    assert [gpu_rule.size_bucket(e) for e in gpu_rule.SIZE_EDGES] == ["0+", "64K+", "1M+", "8M+", "64M+"]
    assert gpu_rule.size_bucket((1 << 20) - 1) == "64K+"
    x = torch.empty(2, 3, 4, 5)
    assert gpu_rule.class_of(x) == "ncl/float32/0+"
    assert gpu_rule.class_of(x.to(memory_format=torch.channels_last)) == "mc/float32/0+"
    assert gpu_rule.class_of(torch.empty(6, 3, dtype=torch.bfloat16)) == "mc/bfloat16/0+"
    assert gpu_rule.row_class(row((256, 2048, 7, 7), "channels_last", "bfloat16")) == "mc/bfloat16/8M+"


def test_decide_needs_the_geomean_and_every_row():
    rows = [
        row((256, 512), ratio=1.3), row((256, 512), ratio=0.95, mode="eval"),  # geomean 1.11, worst 0.95: triton
        row((4096, 1024), ratio=1.5), row((4096, 1024), ratio=0.85, mode="eval"),  # one row 15% slower: aten
        row((64, 100), ratio=0.7), row((64, 100), ratio=1.35, mode="eval"),  # geomean 0.97: aten
        row((64, 64, 56, 56), ratio=1.0),  # even counts as at or above eager
    ]
    d = gpu_rule.decide(rows)
    assert {c: v["backend"] for c, v in d.items()} == {
        "mc/float32/64K+": "triton", "mc/float32/1M+": "aten", "mc/float32/0+": "aten", "ncl/float32/8M+": "triton",
    }  # fmt: skip
    assert d["mc/float32/64K+"]["rows"] == 2 and d["mc/float32/64K+"]["min"] == 0.95
    assert d["mc/float32/64K+"]["geomean"] == pytest.approx((1.3 * 0.95) ** 0.5, abs=1e-4)


def test_build_takes_the_newest_triton_run_per_gpu_and_says_what_it_skipped(tmp_path):
    pattern = write_runs(tmp_path, [
        run(H200, [row((256, 512), ratio=0.5)], date="2026-01-01T00:00:00Z"),  # older: replaced
        run(H200, [row((256, 512), ratio=1.4), row((64, 100), ratio=0.6)], date="2026-02-01T00:00:00Z"),
        run(A100, [row((256, 512), ratio=1.4, backend="aten")]),  # triton refused every row
        run(None, [row((256, 512))], device="cpu"),
        run(H200, [row((256, 512))], date="2026-03-01T00:00:00Z", quick=True),
        # a newer auto run timed triton only where the rule sent it: it must not shrink the rule
        run(H200, [row((64, 64, 56, 56))], date="2026-04-01T00:00:00Z", backend="auto"),
    ])  # fmt: skip
    rule = gpu_rule.build(glob.glob(pattern))
    assert list(rule["devices"]) == [H200]
    h200 = rule["devices"][H200]
    assert h200["triton"] == ["mc/float32/64K+"]
    assert h200["classes"]["mc/float32/0+"]["backend"] == "aten"
    assert h200["run"]["date"] == "2026-02-01T00:00:00Z"
    assert {h200["run"][k] for k in ("gpu", "driver", "torch", "triton")} == {H200, "570.1", "2.11.0", "3.6.0"}
    assert set(rule["skipped"]) == {f"kernels-cuda-{i}.json" for i in (2, 3, 4, 5)}
    assert "triton" in rule["skipped"]["kernels-cuda-2.json"] and "triton" in rule["skipped"]["kernels-cuda-5.json"]


def test_lookup_reads_the_rule_file(tmp_path):
    path = tmp_path / "rule.json"
    gpu_rule.write(gpu_rule.build([]), path)
    assert not gpu_rule.lookup(H200, "mc/float32/64K+", path)  # no recorded run: aten everywhere
    pattern = write_runs(tmp_path, [run(H200, [row((256, 512), ratio=1.4), row((64, 100), ratio=0.6)])])
    gpu_rule.regenerate(pattern, path)
    gpu_rule._load.cache_clear()
    assert gpu_rule.lookup(H200, "mc/float32/64K+", path)
    assert not gpu_rule.lookup(H200, "mc/float32/0+", path)  # measured slower
    assert not gpu_rule.lookup(H200, "ncl/float32/64M+", path)  # not measured
    assert not gpu_rule.lookup(A100, "mc/float32/64K+", path)  # another GPU: no recorded run
    assert not gpu_rule.lookup(H200, "mc/float32/64K+", tmp_path / "missing.json")


def test_rule_made_with_other_buckets_is_ignored(tmp_path):
    path = tmp_path / "rule.json"
    rule = gpu_rule.build(glob.glob(write_runs(tmp_path, [run(H200, [row((256, 512))])])))
    rule["size_edges"] = [0, 1 << 10]
    gpu_rule.write(rule, path)
    assert not gpu_rule.lookup(H200, "mc/float32/64K+", path)


def test_shipped_rule_is_current():
    """The rule file in the package is what `bench gpu-rule` makes from docs/bench: nobody
    edited it by hand, and no recorded run was left out."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    runs = sorted(str(p) for p in (root / "docs" / "bench").glob("kernels-cuda*.json"))
    shipped = json.loads(gpu_rule.RULE_PATH.read_text())
    assert shipped == json.loads(json.dumps(gpu_rule.build(runs), sort_keys=True))


def test_auto_keeps_cpu_and_unrecorded_inputs_off_triton():
    x = torch.randn(4, 3, 5, 5)
    assert backends.get("triton").preferred(x, modes.EAGER) is False
    assert gpu_rule.prefers_triton(x) is False
