import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from batchnorm import reference
from batchnorm.stats import NonFiniteGuard, Stats, merge, merge_stacked, update_running


def _stats_of(x):
    return Stats(*reference.stats(x))


@given(sizes=st.lists(st.integers(0, 9), min_size=1, max_size=5), seed=st.integers(0, 1000))
def test_merge_equals_statistics_of_the_concatenation(sizes, seed):
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randn(n, 3, generator=g, dtype=torch.float64) * 5 + 100 for n in sizes]
    if sum(sizes) == 0:
        return
    zero = Stats(*(torch.zeros(3, dtype=torch.float64) for _ in range(3)))
    folded = zero
    for p in parts:
        folded = merge(folded, _stats_of(p) if len(p) else zero)
    direct = _stats_of(torch.cat(parts))
    stacked = merge_stacked(*(torch.stack(t) for t in zip(*[_stats_of(p) if len(p) else zero for p in parts])))
    for got in (folded, stacked):
        torch.testing.assert_close(got.count, direct.count)
        torch.testing.assert_close(got.mean, direct.mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got.m2, direct.m2, rtol=1e-9, atol=1e-9)


def test_update_running_follows_torch_convention():
    x = torch.randn(10, 4, dtype=torch.float64)
    batch = _stats_of(x)
    rm, rv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    update_running(rm, rv, batch.mean, batch.unbiased_var, 0.1, None)
    torch.testing.assert_close(rm, 0.1 * x.mean(0))
    torch.testing.assert_close(rv, 0.9 + 0.1 * x.var(0, unbiased=True))


def test_cumulative_average_with_momentum_none():
    rm, rv = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    nbt = torch.tensor(0)
    xs = [torch.randn(8, 2, dtype=torch.float64) for _ in range(3)]
    for x in xs:
        update_running(rm, rv, _stats_of(x).mean, _stats_of(x).unbiased_var, None, nbt)
    assert int(nbt) == 3
    torch.testing.assert_close(rm, torch.stack([x.mean(0) for x in xs]).mean(0))
    torch.testing.assert_close(rv, torch.stack([x.var(0) for x in xs]).mean(0))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_batch_leaves_running_stats_untouched(bad):
    x = torch.randn(8, 3, dtype=torch.float64)
    x[2, 1] = bad
    rm, rv, nbt = torch.full((3,), 0.5, dtype=torch.float64), torch.full((3,), 2.0, dtype=torch.float64), torch.tensor(4)
    accepted = update_running(rm, rv, _stats_of(x).mean, _stats_of(x).unbiased_var, 0.1, nbt)
    assert not bool(accepted)
    assert torch.equal(rm, torch.full((3,), 0.5, dtype=torch.float64))
    assert torch.equal(rv, torch.full((3,), 2.0, dtype=torch.float64))
    assert int(nbt) == 4


def test_guard_counts_and_warns_once():
    guard = NonFiniteGuard("layer")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        guard.record(torch.tensor(False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        guard.record(torch.tensor(False))
        guard.record(torch.tensor(True))
    assert guard.count == 2
