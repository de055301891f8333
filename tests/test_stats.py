import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from batchnorm import reference
from batchnorm.stats import NonFiniteGuard, Stats, merge, merge_all, merge_stacked, update_running


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
    sets = [_stats_of(p) if len(p) else zero for p in parts]
    stacked = merge_stacked(*(torch.stack(t) for t in zip(*sets)))
    for got in (folded, stacked, merge_all(sets)):
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


# fp32/fp64 buffers are guarded through numpy views, bf16 ones through torch ops.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_batch_leaves_running_stats_untouched(bad, dtype):
    x = torch.randn(8, 3, dtype=torch.float64)
    x[2, 1] = bad
    old_mean, old_var = torch.tensor([0.5, -1.25, 3.0], dtype=dtype), torch.tensor([2.0, 0.75, 9.5], dtype=dtype)
    rm, rv, nbt = old_mean.clone(), old_var.clone(), torch.tensor(4)
    accepted = update_running(rm, rv, _stats_of(x).mean, _stats_of(x).unbiased_var, 0.1, nbt)
    assert accepted.dtype == torch.bool and accepted.dim() == 0 and not bool(accepted)
    assert torch.equal(rm, old_mean) and torch.equal(rv, old_var)
    assert int(nbt) == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_finite_batch_is_kept_and_counted(dtype):
    x = torch.randn(8, 3, dtype=torch.float64)
    rm, rv, nbt = torch.zeros(3, dtype=dtype), torch.ones(3, dtype=dtype), torch.tensor(4)
    accepted = update_running(rm, rv, _stats_of(x).mean, _stats_of(x).unbiased_var, 0.1, nbt)
    assert bool(accepted) and int(nbt) == 5
    torch.testing.assert_close(rm, (0.1 * x.mean(0)).to(dtype))
    torch.testing.assert_close(rv, (0.9 + 0.1 * x.var(0)).to(dtype))


def test_guard_counts_and_warns_once():
    guard = NonFiniteGuard("layer")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        guard.record(False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        guard.record(False)
        guard.record(True)
    assert guard.count == 2
    # a tensor (an accelerator's or a compiled graph's answer) waits until the count is read
    guard.record(torch.tensor(False))
    guard.record(torch.tensor(True))
    assert guard.count == 3


def test_non_finite_running_value_restarts_from_the_batch():
    # a corrupt checkpoint: the channel's average restarts at the batch, the others blend
    rm = torch.tensor([0.5, float("nan"), 1.0])
    rv = torch.tensor([float("inf"), 1.0, 2.0])
    nbt = torch.tensor(7)
    mean, var = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 5.0, 6.0])
    assert bool(update_running(rm, rv, mean, var, 0.1, nbt))
    torch.testing.assert_close(rm, torch.tensor([0.55, 2.0, 1.2]))
    torch.testing.assert_close(rv, torch.tensor([4.0, 1.4, 2.4]))
    assert int(nbt) == 8


def test_variance_that_overflows_the_buffer_dtype_is_refused():
    # finite in float64, infinite once rounded into the fp32 buffer
    rm, rv, nbt = torch.zeros(2), torch.ones(2), torch.tensor(0)
    mean = torch.tensor([0.0, 0.0], dtype=torch.float64)
    var = torch.tensor([1.0, 1e40], dtype=torch.float64)
    assert not bool(update_running(rm, rv, mean, var, 0.1, nbt))
    assert torch.equal(rm, torch.zeros(2)) and torch.equal(rv, torch.ones(2)) and int(nbt) == 0


_EDGE = [0.0, -1.5, 3e38, -3e38, 1e-30, float("nan"), float("inf"), float("-inf")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("momentum", [0.1, 1.0, None])
def test_numba_rule_equals_the_tensor_rule(dtype, momentum):
    from batchnorm.backends.numba_kernels import fold_running

    g = torch.Generator().manual_seed(3)
    for trial in range(200):
        pick = lambda: torch.tensor([_EDGE[i] for i in torch.randint(len(_EDGE), (3,), generator=g)], dtype=dtype)
        if trial % 2:  # half the trials all finite, so that both outcomes are exercised
            pick = lambda: torch.randn(3, generator=g, dtype=dtype) * 10
        rm, rv, mean, var = pick(), pick().abs(), pick(), pick().abs()
        nbt = torch.tensor(trial % 5)
        t_rm, t_rv, t_nbt = rm.clone(), rv.clone(), nbt.clone()
        kept = bool(update_running(t_rm, t_rv, mean, var, momentum, t_nbt))
        n_rm, n_rv = rm.clone(), rv.clone()
        factor = momentum if momentum is not None else 1.0 / (int(nbt) + 1)
        assert bool(fold_running(mean.numpy(), var.numpy(), factor, n_rm.numpy(), n_rv.numpy())) == kept
        assert int(t_nbt) == int(nbt) + kept
        torch.testing.assert_close(n_rm, t_rm, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(n_rv, t_rv, rtol=0, atol=0, equal_nan=True)
