"""bench_memory: what a training step keeps for backward, torch's norm + activation against InPlaceABN."""

import json

import pytest
from typer.testing import CliRunner

from batchnorm_lab import bench_memory
from batchnorm_lab.cli import app


@pytest.mark.slow
def test_inplace_abn_keeps_less_and_the_command_writes_it(tmp_path):
    result = CliRunner().invoke(app, ["bench", "memory", "--out", str(tmp_path), "--batch", "2", "--size", "16"])
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "memory-cpu.json").read_text())
    for rows in written["archs"].values():
        torch_saved = rows["torch"]["saved_bytes"]
        assert 0 < rows["iabn"]["saved_bytes"] < torch_saved  # the norm's input is not kept
        assert rows["iabn"]["saved_reduction"] == round(1 - rows["iabn"]["saved_bytes"] / torch_saved, 3)
    assert "memory-cpu.json" in result.output and bench_memory.render(written).splitlines()[0] in result.output
