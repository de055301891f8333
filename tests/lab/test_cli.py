"""The `batchnorm` command line: `batchnorm check` (loading a model, its weights and data for
the health check, and exit code 2 for anything that cannot be loaded). The other commands
are tested with the code they drive (test_bench.py, test_train.py, experiments/)."""

from __future__ import annotations

import copy
import gzip
import io
import json
import pickle
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import batchnorm as bn
from batchnorm_lab.cli import app, data_batches

FACTORY = "cli_factory_mlp"


@pytest.fixture(scope="module")
def factory(tmp_path_factory):
    """A module `cli_factory_mlp` with `build()`, a small MLP, importable as the command's target."""
    folder = tmp_path_factory.mktemp("factory")
    (folder / f"{FACTORY}.py").write_text(textwrap.dedent('''
        import torch
        from torch import nn
        import batchnorm as bn


        def build():
            torch.manual_seed(0)
            return nn.Sequential(nn.Linear(64, 16, bias=False), bn.BatchNormAct(bn.BatchNorm1d(16), "relu"), nn.Linear(16, 10))
    '''))
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(folder))
        yield __import__(FACTORY)


def test_check_exit_codes_and_json(factory, tmp_path):
    healthy = factory.build()
    bn.recalibrate(healthy, data_batches("digits", 60, 4), progress=False)  # the statistics of the data checked
    torch.save(healthy.state_dict(), tmp_path / "healthy.pt")
    result = CliRunner().invoke(app, ["check", f"{FACTORY}:build", "--weights", str(tmp_path / "healthy.pt"), "--data", "digits"])
    assert result.exit_code == 0, result.output

    stale = copy.deepcopy(healthy)
    with torch.no_grad():
        stale[0].weight.mul_(3.0)
    torch.save({"state_dict": stale.state_dict()}, tmp_path / "stale.pt")
    args = ["check", f"{FACTORY}:build", "--weights", str(tmp_path / "stale.pt"), "--batches", "2"]
    result = CliRunner().invoke(app, [*args, "--json", str(tmp_path / "report.json")])
    assert result.exit_code == 1, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["batches"] == 2 and ("1.bn", "stale_statistics") in {(f["layer"], f["kind"]) for f in report["findings"]}


def test_check_a_model_that_fails_on_the_data_exits_2_with_one_line(factory, tmp_path):
    """A conv model given the digits' (N, 64) rows cannot be checked: exit 2 (not 1, which a CI
    gate reads as findings) and one line naming the data's shape, not a traceback."""
    (tmp_path / "cli_factory_conv.py").write_text(
        "import torch.nn as nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))\n"
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(tmp_path))
        result = CliRunner().invoke(app, ["check", "cli_factory_conv:build", "--batches", "1"])
    assert result.exit_code == 2, result.output
    assert "the model fails on --data digits (batches of shape (60, 64)): RuntimeError" in result.output
    assert "Traceback" not in result.output


class Payload:
    """A custom class: unpickling it would run arbitrary code from the file."""


def test_check_refuses_a_checkpoint_needing_arbitrary_unpickling(factory, tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"weight": Payload()}, handle, protocol=2)
    torch.save({"0.weight": Payload()}, tmp_path / "evil_torch.pt")
    for file in (path, tmp_path / "evil_torch.pt"):
        result = CliRunner().invoke(app, ["check", f"{FACTORY}:build", "--weights", str(file)])
        assert result.exit_code == 2
        assert "refusing to load" in result.output and "arbitrary unpickling" in result.output


def test_check_bad_factory():
    result = CliRunner().invoke(app, ["check", "no_such_module_anywhere:build"])
    assert result.exit_code == 2 and "no_such_module_anywhere" in result.output
    result = CliRunner().invoke(app, ["check", "nocolon"])
    assert result.exit_code == 2 and "package.module:factory" in result.output


# -- exit code 2 for every file that cannot be loaded -------------------------------------


def _assert_cannot_load(result, names: str) -> None:
    """Exit 2, and one line on stderr, starting with 'error:', that names the file."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert len(lines) == 1 and lines[0].startswith("error: ") and names in lines[0], result.stderr


def _checkpoint_bytes(legacy: bool = False) -> bytes:
    buffer = io.BytesIO()
    torch.save({"0.weight": torch.ones(32, 64)}, buffer, _use_new_zipfile_serialization=not legacy)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "content",
    [None, b"", _checkpoint_bytes()[:300], _checkpoint_bytes(legacy=True)[:100], _checkpoint_bytes(legacy=True)[:200]],
    ids=["missing", "empty", "truncated", "truncated-legacy", "truncated-legacy-pickle"],
)
def test_check_unreadable_checkpoint_exits_2(factory, tmp_path, content):
    path = tmp_path / "model.pt"
    if content is not None:
        path.write_bytes(content)
    result = CliRunner().invoke(app, ["check", f"{FACTORY}:build", "--weights", str(path)])
    _assert_cannot_load(result, "model.pt")


def test_check_checkpoint_that_is_a_directory_exits_2(factory, tmp_path):
    result = CliRunner().invoke(app, ["check", f"{FACTORY}:build", "--weights", str(tmp_path)])
    _assert_cannot_load(result, tmp_path.name)


def _write_npz(path, damage: str) -> None:
    x, y = np.zeros((40, 64)), np.zeros(40, dtype=np.int64)
    if damage == "huge-header":
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (6 * 2**40, 1)})
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("x.npy", header.getvalue())
            z.writestr("y.npy", _npy(y))
        return
    np.savez_compressed(path, x=x, y=y)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2] if damage == "truncated" else raw[:80] + bytes(b ^ 0xFF for b in raw[80:200]) + raw[200:])


def _npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@pytest.mark.parametrize("damage", ["truncated", "corrupt", "huge-header"])
def test_check_unreadable_npz_data_exits_2(factory, tmp_path, damage):
    path = tmp_path / f"{damage}.npz"
    _write_npz(path, damage)
    result = CliRunner().invoke(app, ["check", f"{FACTORY}:build", "--data", f"npz:{path}"])
    _assert_cannot_load(result, f"{damage}.npz")


def test_check_bad_gzip_idx_data_exits_2(factory, tmp_path):
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte"):
        (tmp_path / name).write_bytes(b"\0\0\x08\x01" + (0).to_bytes(4, "big"))
    good = gzip.compress(b"\0\0\x08\x01" + (100).to_bytes(4, "big") + bytes(100))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(good[: len(good) // 2])
    result = CliRunner().invoke(app, ["check", f"{FACTORY}:build", "--data", f"idx:{tmp_path}"])
    _assert_cannot_load(result, "t10k-labels-idx1-ubyte.gz")


@pytest.mark.slow
def test_the_command_line_starts_without_torchs_compiler():
    """Every command, `--help` included, imports the command-line module first: torch's
    compiler (Dynamo and Inductor, seconds to import) loads only in the commands that compile."""
    code = "import sys, batchnorm_lab.cli; print(' '.join(n for n in ('torch._dynamo', 'torch._inductor') if n in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "", f"the command line loaded {done.stdout.strip()}"
