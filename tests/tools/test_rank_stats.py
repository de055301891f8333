"""merge_rank_stats: 3 processes (gloo on localhost) with uneven shards of different data.

One group of processes runs every case; the parent checks the results against the merge
computed here in float64 from each process's statistics before.
"""

from __future__ import annotations

import pytest
import torch

import batchnorm as bn
from batchnorm.tools import merge_rank_stats

from . import processes
from .models import ResNet

WORLD = 3
SHARDS = (3, 5, 8)  # batches of 8 per process: uneven shards


def _model() -> torch.nn.Module:
    """A ResNet whose running statistics average every batch (momentum None), so that after
    a shard they describe that shard."""
    torch.manual_seed(0)
    model = ResNet()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    return model


def _local_epoch(model: torch.nn.Module, rank: int) -> int:
    """Train-mode forwards over this process's shard, whose data is shifted by the rank (the
    shards differ, as a non-shuffled split would): returns the examples seen."""
    g = torch.Generator().manual_seed(rank)
    with torch.no_grad():
        for _ in range(SHARDS[rank]):
            model(torch.randn(8, 3, 8, 8, generator=g) + rank)
    return 8 * SHARDS[rank]


def _stats(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def _entry(rank: int, world: int) -> dict:
    model = _model()
    seen = _local_epoch(model, rank)
    before = _stats(model)
    merged, changes = merge_rank_stats(model, count=seen, inplace=False)
    restored, _ = bn.stats_restore(merged, changes.previous, inplace=False)
    equal, _ = merge_rank_stats(model, inplace=False)
    broadcast, _ = merge_rank_stats(model, source=0, inplace=False)
    try:
        merge_rank_stats(model, count=0, inplace=False)
        nothing = None
    except ValueError as error:  # on every process alike: the decision reads the gathered counts
        nothing = str(error)
    if rank == 2:  # a diverged process: its statistics of the stem are not finite
        model.stem[1].running_var[0] = float("nan")
    guarded, guarded_changes = merge_rank_stats(bn.convert(model)[0], count=seen)
    return {
        "before": before,
        "merged": _stats(merged),
        "restored": _stats(restored),
        "equal": _stats(equal),
        "broadcast": _stats(broadcast),
        "guarded": _stats(guarded),
        "changes": changes.changed,
        "nothing": nothing,
        "guarded_changes": guarded_changes.changed,
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    return processes.run(_entry, WORLD, tmp_path_factory.mktemp("rank_stats"))


def _expected(before: list[dict], layer: str, weights: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and variance of the union, from each process's (mean, variance), in float64."""
    w = torch.tensor(weights, dtype=torch.float64)[:, None]
    mean = torch.stack([b[f"{layer}.running_mean"].double() for b in before])
    var = torch.stack([b[f"{layer}.running_var"].double() for b in before])
    mu = (w * mean).sum(0) / w.sum()
    return mu, ((w * var).sum(0) + (w * (mean - mu) ** 2).sum(0)) / w.sum()


LAYERS = ("stem.1", "layer1.bn1", "layer1.bn2", "layer2.bn1", "layer2.bn2", "layer2.down.1")


@pytest.mark.slow
def test_every_process_gets_the_count_weighted_merge(results):
    before = [r["before"] for r in results]
    # The problem: local batch norm leaves every process with statistics of its own shard.
    assert not torch.allclose(before[0]["stem.1.running_mean"], before[2]["stem.1.running_mean"], atol=0.1)
    for way, weights in (("merged", [8.0 * n for n in SHARDS]), ("equal", [1.0] * WORLD)):
        for layer in LAYERS:
            mean, var = _expected(before, layer, weights)
            for r in results:  # bitwise the same on every process
                assert torch.equal(r[way][f"{layer}.running_mean"], results[0][way][f"{layer}.running_mean"])
                assert torch.equal(r[way][f"{layer}.running_var"], results[0][way][f"{layer}.running_var"])
                assert int(r[way][f"{layer}.num_batches_tracked"]) == max(SHARDS)
            torch.testing.assert_close(results[0][way][f"{layer}.running_mean"], mean.float())
            torch.testing.assert_close(results[0][way][f"{layer}.running_var"], var.float())
    # Averaging the variances (timm's distribute_bn) misses the spread of the shards' means.
    averaged = torch.stack([b["stem.1.running_var"] for b in before]).mean(0)
    assert (results[0]["equal"]["stem.1.running_var"] / averaged - 1).abs().max() > 0.2
    assert results[0]["changes"][0] == ("stem.1", "merged over 3 processes (weights 24, 40, 64)")


@pytest.mark.slow
def test_counts_of_zero_everywhere_are_refused_on_every_process(results):
    for r in results:
        assert r["nothing"] == "merge_rank_stats: every process passed count=0 ([0.0, 0.0, 0.0]); nothing to merge"


@pytest.mark.slow
def test_the_statistics_before_are_kept_for_stats_restore(results):
    for r in results:
        assert all(torch.equal(v, r["before"][k]) for k, v in r["restored"].items())


@pytest.mark.slow
def test_broadcast_gives_process_zeros_statistics(results):
    for r in results:
        for key, value in results[0]["before"].items():
            assert torch.equal(r["broadcast"][key], value)


@pytest.mark.slow
def test_a_process_with_non_finite_statistics_is_left_out(results):
    before = [r["before"] for r in results]
    mean, var = _expected(before[:2], "stem.1", [8.0 * n for n in SHARDS[:2]])
    for r in results:
        torch.testing.assert_close(r["guarded"]["stem.1.running_mean"], mean.float())
        torch.testing.assert_close(r["guarded"]["stem.1.running_var"], var.float())
        assert dict(r["guarded_changes"])["stem.1"].endswith("; 1 left out (non-finite)")
    mean, var = _expected(before, "layer1.bn1", [8.0 * n for n in SHARDS])
    torch.testing.assert_close(results[0]["guarded"]["layer1.bn1.running_var"], var.float())


def test_without_a_process_group_nothing_changes():
    model = _model()
    _local_epoch(model, 1)
    before = _stats(model)
    _, changes = merge_rank_stats(model, count=40)
    assert all(torch.equal(v, before[k]) for k, v in _stats(model).items())
    assert changes.skipped == [("", "no process group of two processes or more")]
    with pytest.raises(ValueError, match="count must be"):
        merge_rank_stats(model, count=-1)
