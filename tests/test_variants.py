"""Ghost batches, batch renormalization and masks: each exactness statement against the
float64 reference, gradcheck, the schedule through a checkpoint, and the bad arguments."""

import io

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import batchnorm as bn
from batchnorm import reference
from batchnorm.variants import chunks

F64 = dict(dtype=torch.float64)


def _grads(m, x, r=None, mask=None, loss_mask=None):
    y = m(x, residual=r, mask=mask) if mask is not None else m(x, residual=r)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), **F64)
    if loss_mask is not None:
        w = w * loss_mask.unsqueeze(1)
    g = torch.autograd.grad((y * w).sum(), [x, *m.parameters()])
    return y, g


@given(n=st.integers(2, 12), c=st.integers(1, 5), l=st.integers(1, 4), backend=st.sampled_from(["aten", "reference"]))
def test_ghost_with_k_equal_to_the_batch_is_plain_batch_norm(n, c, l, backend):
    x = torch.randn(n, c, l, **F64, requires_grad=True)
    plain = bn.BatchNorm1d(c, backend=backend, **F64)
    ghost = bn.BatchNorm1d(c, virtual_batch_size=n, backend=backend, **F64)
    ya, ga = _grads(plain, x)
    yb, gb = _grads(ghost, x)
    torch.testing.assert_close(ya, yb)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(plain.running_var, ghost.running_var)


@given(n=st.integers(4, 17), k=st.integers(2, 6), c=st.integers(1, 4))
def test_ghost_chunks_are_normalized_apart_and_running_stats_see_the_merge(n, k, c):
    x = torch.randn(n, c, 3, **F64) * 3 + 1
    m = bn.BatchNorm1d(c, virtual_batch_size=k, momentum=1.0, **F64)
    y = m(x)
    for start, length in chunks(n, k, 3):
        part = x[start:start + length]
        torch.testing.assert_close(y[start:start + length], reference.batch_norm(part, m.weight, m.bias))
    # momentum 1: the running statistics are exactly those of the whole batch (Chan merge)
    flat = x.transpose(0, 1).reshape(c, -1)
    torch.testing.assert_close(m.running_mean, flat.mean(1))
    torch.testing.assert_close(m.running_var, flat.var(1))
    assert int(m.num_batches_tracked) == 1


def test_ghost_uneven_last_chunk_and_lone_example():
    assert chunks(10, 4, 1) == [(0, 4), (4, 4), (8, 2)]
    assert chunks(9, 4, 1) == [(0, 4), (4, 5)]  # one example alone has no variance: merged
    assert chunks(9, 4, 3) == [(0, 4), (4, 4), (8, 1)]  # but with 3 values it has one


def test_ghost_gradcheck():
    m = bn.BatchNorm2d(2, virtual_batch_size=3, **F64)
    x = torch.randn(7, 2, 2, 2, **F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: m(x, activation="tanh"), (x,))


@given(n=st.integers(2, 10), c=st.integers(1, 4), steps=st.integers(1, 3))
def test_renorm_at_r1_d0_is_plain_batch_norm(n, c, steps):
    plain = bn.BatchNorm1d(c, **F64)
    renorm = bn.BatchNorm1d(c, renorm=bn.Renorm(r_max=1.0, d_max=0.0), **F64)
    for s in range(steps):
        x = torch.randn(n, c, **F64, requires_grad=True) * 2 + s
        ya, ga = _grads(plain, x)
        yb, gb = _grads(renorm, x)
        torch.testing.assert_close(ya, yb)
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b)
    torch.testing.assert_close(plain.running_var, renorm.running_var)


def test_renorm_formula_and_no_gradient_through_r_d():
    torch.manual_seed(0)
    m = bn.BatchNorm1d(3, renorm=bn.Renorm(r_max=2.0, d_max=0.5), **F64)
    with torch.no_grad():
        m.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        m.running_var.copy_(torch.tensor([0.2, 4.0, 1.0]))
        m.weight.copy_(torch.tensor([1.5, 0.5, 2.0]))
    x = torch.randn(16, 3, **F64) * 1.3 + 0.2
    rm, rv = m.running_mean.clone(), m.running_var.clone()
    y = m(x)
    mu, var = x.mean(0), x.var(0, unbiased=False)
    sigma_b, sigma = (var + m.eps).sqrt(), (rv + m.eps).sqrt()
    r = (sigma_b / sigma).clamp(0.5, 2.0)
    d = ((mu - rm) / sigma).clamp(-0.5, 0.5)
    expected = ((x - mu) / sigma_b * r + d) * m.weight + m.bias
    torch.testing.assert_close(y, expected)
    # r and d carry no gradient. Finite differences agree with that only where they are
    # constant in x, i.e. clipped: put the running statistics far away, then gradcheck.
    m.momentum = 0.0
    with torch.no_grad():
        m.running_mean.copy_(torch.tensor([50.0, -50.0, 50.0]))
        m.running_var.copy_(torch.tensor([0.01, 100.0, 0.01]))
    xg = x.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: m(x), (xg,))


def test_renorm_schedule_ramps_and_survives_a_checkpoint():
    sched = bn.Renorm(r_max=3.0, d_max=5.0, warmup_steps=2, ramp_steps=4)
    assert sched.limits(0) == (1.0, 0.0) and sched.limits(1) == (1.0, 0.0)
    assert sched.limits(4) == (2.0, 2.5) and sched.limits(6) == (3.0, 5.0) and sched.limits(100) == (3.0, 5.0)
    m = bn.BatchNorm1d(2, renorm=sched)
    for _ in range(3):
        m(torch.randn(8, 2))
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    restored = bn.BatchNorm1d(2, renorm=sched)
    restored.load_state_dict(torch.load(buf, weights_only=True))
    assert int(restored.num_batches_tracked) == 3  # the schedule's step
    assert restored.state_dict().keys() == torch.nn.BatchNorm1d(2).state_dict().keys()


@given(n=st.integers(2, 8), c=st.integers(1, 4), l=st.integers(1, 5))
def test_mask_all_true_is_plain_batch_norm(n, c, l):
    x = torch.randn(n, c, l, **F64, requires_grad=True)
    plain, masked = bn.BatchNorm1d(c, **F64), bn.BatchNorm1d(c, **F64)
    ya, ga = _grads(plain, x)
    yb, gb = _grads(masked, x, mask=torch.ones(n, l, dtype=torch.bool))
    torch.testing.assert_close(ya, yb)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(plain.running_var, masked.running_var)


@given(seed=st.integers(0, 10_000), c=st.integers(1, 3))
def test_mask_equals_batch_norm_on_the_valid_subset(seed, c):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, c, 6, generator=g, **F64) * 2 + 1
    mask = torch.rand(4, 6, generator=g) > 0.4
    mask[0, :2] = True  # at least two valid positions
    x.requires_grad_()
    m = bn.BatchNorm1d(c, momentum=1.0, **F64)
    y = m(x, mask=mask, activation="gelu")
    valid = x.permute(0, 2, 1)[mask]  # (V, C): the valid positions
    sub = bn.BatchNorm1d(c, momentum=1.0, **F64)
    y_sub = sub(valid, activation="gelu")
    torch.testing.assert_close(y.permute(0, 2, 1)[mask], y_sub)
    torch.testing.assert_close(m.running_mean, sub.running_mean)
    torch.testing.assert_close(m.running_var, sub.running_var)
    # gradients of a loss on the valid outputs equal those of batch norm on the subset
    w = torch.randn(y_sub.shape, generator=g, **F64)
    gx = torch.autograd.grad((y.permute(0, 2, 1)[mask] * w).sum(), x)[0]
    gsub = torch.autograd.grad((y_sub * w).sum(), valid)[0]
    torch.testing.assert_close(gx.permute(0, 2, 1)[mask], gsub)
    assert torch.all(gx.permute(0, 2, 1)[~mask] == 0)


def test_masked_positions_get_defined_outputs_and_do_not_feed_the_statistics():
    x = torch.randn(3, 2, 5, **F64, requires_grad=True)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[:, 3:] = False
    m = bn.BatchNorm1d(2, **F64)
    y = m(x, mask=mask)
    assert torch.isfinite(y).all()
    # a loss on a masked output reaches only that input, through the scale
    g = torch.autograd.grad(y[1, 0, 4], x)[0]
    assert torch.count_nonzero(g) == 1 and g[1, 0, 4] != 0


def test_mask_gradcheck():
    """On the valid outputs (the masked ones reach the statistics by design with no gradient,
    which finite differences cannot see)."""
    m = bn.BatchNorm1d(2, **F64)
    mask = torch.tensor([[True, True, False], [True, False, True]])
    x = torch.randn(2, 2, 3, **F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: m(x, mask=mask, activation="silu").permute(0, 2, 1)[mask], (x,))


def test_bad_variant_arguments():
    with pytest.raises(ValueError, match="virtual_batch_size must be"):
        bn.BatchNorm1d(3, virtual_batch_size=1)
    with pytest.raises(ValueError, match="r_max >= 1"):
        bn.Renorm(r_max=0.5)
    with pytest.raises(ValueError, match="d_max >= 0"):
        bn.Renorm(d_max=-1.0)
    with pytest.raises(ValueError, match="track_running_stats=True"):
        bn.BatchNorm1d(3, renorm=bn.Renorm(), track_running_stats=False)
    m = bn.BatchNorm1d(3)
    with pytest.raises(ValueError, match="mask has shape"):
        m(torch.randn(4, 3, 5), mask=torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="torch.bool"):
        m(torch.randn(4, 3, 5), mask=torch.ones(4, 5))
    with pytest.raises(ValueError, match="every position .* is masked out"):
        m(torch.randn(4, 3, 5), mask=torch.zeros(4, 5, dtype=torch.bool))
    m.eval()  # evaluation normalizes with the running statistics: a mask of nothing is fine
    assert m(torch.randn(4, 3, 5), mask=torch.zeros(4, 5, dtype=torch.bool)).shape == (4, 3, 5)


@pytest.mark.parametrize("backend", [b for b in ("numba",) if b in bn.backends.available()])
def test_fast_backend_runs_ghost_and_renorm_through_its_kernels(backend, monkeypatch):
    """Ghost chunks and renorm use the backend's contract kernels (only scale, shift and the
    reduction change); masks have no kernel and run in torch ops whatever the backend."""
    calls = []
    be = bn.backends.get(backend)
    monkeypatch.setattr(be, "stats", lambda v, _f=be.stats: calls.append("stats") or _f(v))
    x = torch.randn(12, 3, 5, **F64, requires_grad=True)
    for options in (dict(virtual_batch_size=4), dict(renorm=bn.Renorm(r_max=2.0, d_max=1.0))):
        fast = bn.BatchNorm1d(3, backend=backend, **options, **F64)
        slow = bn.BatchNorm1d(3, backend="reference", **options, **F64)
        with torch.no_grad():
            for m in (fast, slow):
                m.running_var.fill_(2.0)
        ya, ga = _grads(fast, x)
        yb, gb = _grads(slow, x)
        torch.testing.assert_close(ya, yb)
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b)
    assert calls, f"{backend}'s kernels were not used"
    calls.clear()
    mask = torch.rand(12, 5) > 0.3
    y = bn.BatchNorm1d(3, backend=backend, **F64)(x, mask=mask)
    assert torch.isfinite(y).all() and not calls
