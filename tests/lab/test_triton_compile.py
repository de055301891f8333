"""The compile check of the triton backend's kernels, without a GPU (batchnorm_lab.triton_compile).

The occupancy arithmetic and the cuobjdump parser are tested on their own; the launches are
recorded from the real launch code on meta tensors; `test_kernels_compile_for_sm80_and_sm90`
compiles one specialization per kernel, view and tile for sm_80 and sm_90 with the installed
Triton (in a subprocess: the test session runs Triton's interpreter) and fails on a compile
error, a spill, or a streaming kernel under 25% theoretical occupancy on sm_90.
`batchnorm bench gpu-compile` compiles every specialization.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from batchnorm.backends import triton_gpu as tg  # noqa: E402
from batchnorm_lab import triton_compile as tc  # noqa: E402

SRC = Path(__file__).resolve().parents[2] / "src"


# --- occupancy --------------------------------------------------------------------------


@pytest.mark.parametrize("regs, warps, smem, arch, ctas, fraction, limit", [
    (255, 4, 0, 90, 2, 8 / 64, "registers"),  # 8192 registers a warp: 2 warps per quarter of the file
    (128, 4, 0, 90, 4, 16 / 64, "registers"),  # the most registers at 25%
    (129, 4, 0, 90, 3, 12 / 64, "registers"),  # 4128 rounds up to 4352 a warp: 3 per quarter
    (128, 16, 0, 90, 1, 16 / 64, "registers"),  # a 512-thread CTA at 128 registers: one per SM
    (64, 16, 0, 90, 2, 32 / 64, "registers"),
    (32, 4, 0, 90, 16, 1.0, "registers"),  # 16 CTAs of 4 warps, every warp slot (a tie: registers named)
    (32, 1, 0, 80, 32, 32 / 64, "CTAs"),  # one-warp CTAs: 32 CTAs per SM at most
    (40, 4, 100 * 1024, 80, 1, 4 / 64, "shared memory"),  # 164 KiB / (100 + 1 reserved) KiB
    (40, 4, 100 * 1024, 90, 2, 8 / 64, "shared memory"),  # 228 KiB on sm_90
    (40, 8, 1024, 90, 6, 48 / 64, "registers"),  # 1280 a warp: 12 per quarter, 48 warps
])  # fmt: skip
def test_occupancy(regs, warps, smem, arch, ctas, fraction, limit):
    occ = tc.occupancy(regs, warps, smem, arch)
    assert (occ.ctas, occ.warps, occ.fraction, occ.limit) == (ctas, ctas * warps, fraction, limit)


def test_occupancy_rejects_impossible_register_counts():
    with pytest.raises(ValueError, match="255"):
        tc.occupancy(256, 4, 0, 90)


def test_parse_resource_usage():
    text = """
Resource usage:
 Common:
  GLOBAL:0
 Function apply_kernel:
  REG:56 STACK:8 SHARED:1024 LOCAL:4 CONSTANT[0]:608 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    usage = tc.parse_resource_usage(text)
    assert usage == tc.Usage(regs=56, local=4, stack=8, shared=1024) and usage.spill_bytes == 12
    with pytest.raises(ValueError):
        tc.parse_resource_usage("nothing here")


# --- what the dispatcher launches --------------------------------------------------------


def test_launches_follow_the_launch_code():
    """The recorded launches are the ones triton_gpu picks for a 132-SM GPU: the tiled
    kernels with tiling_for's tiles, the single-read kernels with single_read_block's."""
    rows = [((256, 64, 112, 112), "contiguous"), ((256, 64, 112, 112), "channels_last"), ((64, 100), "contiguous")]
    found = tc.launches(90, rows)
    kernels = {launch.kernel for launch in found}
    assert kernels == set(tc.STREAMING) | {"merge_stats_kernel", "merge_sums_kernel"}
    keys = [launch.key() for launch in found]
    assert len(keys) == len(set(keys))  # each specialization once
    programs = tg.PROGRAMS_PER_SM * 132
    ncl = tg.tiling_for(tg.Geometry(256, 64, 12544, 64 * 12544, 12544, 1), programs)
    mc = tg.tiling_for(tg.geometry(torch.empty(256 * 12544, 64, device="meta")), programs)
    mlp = tg.tiling_for(tg.geometry(torch.empty(64, 100, device="meta")), programs)  # evaluation: tiled
    tiles = {(launch.view, dict(launch.kwargs)["BLOCK_C"], dict(launch.kwargs)["BLOCK_L"])
             for launch in found if launch.kernel == "apply_kernel"}  # fmt: skip
    assert tiles == {(view, t.block_c, t.block_l) for view, t in (("ncl", ncl), ("mc", mc), ("mc", mlp))}
    single = [launch for launch in found if launch.kernel == "single_read_forward_kernel"]
    assert single and all(launch.view == "mc" and "(64, 100)" in launch.where for launch in single)
    dtypes = {launch.args[0].dtype for launch in found if launch.kernel == "apply_kernel"}
    assert dtypes == {"float32", "bfloat16"}


def test_representative_keeps_each_kernel_view_and_tile():
    found = tc.launches(90)
    chosen = tc.representative(found)

    def tile(launch):
        return tuple((k, v) for k, v in launch.kwargs if k.startswith("BLOCK") or k == "num_warps")

    assert {(x.kernel, x.view, tile(x)) for x in chosen} == {(x.kernel, x.view, tile(x)) for x in found}
    assert len(chosen) < len(found) / 4
    for launch in chosen:
        kw = dict(launch.kwargs)
        if "HAS_RES" in kw:  # the heaviest variant of its tile: add + ReLU
            assert kw["HAS_RES"] and kw["ACT"] == 1


# --- the compile itself ------------------------------------------------------------------


# Another Triton to check the kernels with, e.g. the GPU machine's: a folder holding it
# (pip install --target DIR triton==3.6.0 --no-deps), put first on the path of the compile.
OTHER_TRITON = os.environ.get("BATCHNORM_OTHER_TRITON")
TRITONS = [None] + ([OTHER_TRITON] if OTHER_TRITON else [])


def _compile_env(tmp_path, triton_dir) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (triton_dir, str(SRC), env.get("PYTHONPATH")) if p)
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # a cold cache: the test compiles
    return env


@pytest.mark.slow
@pytest.mark.parametrize("triton_dir", TRITONS, ids=lambda d: "installed" if d is None else "other")
def test_kernels_compile_for_sm80_and_sm90(tmp_path, triton_dir):
    """One specialization per kernel, view and tile (`representative`), for sm_80 and sm_90:
    all compile, none spills, the streaming kernels reach MIN_OCCUPANCY on sm_90. With
    BATCHNORM_OTHER_TRITON set, also with that Triton."""
    out = tmp_path / "compile.json"
    cmd = [sys.executable, "-m", "batchnorm_lab.triton_compile", "--quick", "--strict", "--jobs", "2",
           "--json", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=_compile_env(tmp_path, triton_dir), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    payload = json.loads(out.read_text())
    if triton_dir is not None:
        import triton

        assert payload["triton"] != triton.__version__  # the other one did compile
    results = payload["results"]
    assert {r["arch"] for r in results} == {80, 90}
    assert {r["kernel"] + "_kernel" for r in results} >= set(tc.STREAMING)
    for r in results:
        assert r["error"] is None, r
        assert r["spills"] == 0, r
        assert 0 < r["regs"] <= 255 and r["ctas"] >= 1, r
        if r["arch"] == 90 and r["kernel"] + "_kernel" in tc.STREAMING:
            assert r["occupancy"] >= tc.MIN_OCCUPANCY, r


def test_gpu_compile_command(monkeypatch):
    """`batchnorm bench gpu-compile` hands its options to triton_compile.main and exits with its status."""
    from typer.testing import CliRunner

    from batchnorm_lab.cli import app

    seen = []
    monkeypatch.setattr(tc, "main", lambda argv: seen.append(argv) or 1)
    result = CliRunner().invoke(app, ["bench", "gpu-compile", "--arch", "90", "--quick", "--jobs", "3"])
    assert result.exit_code == 1
    assert seen == [["--arch=90", "--quick", "--jobs=3"]]
