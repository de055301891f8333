"""recalibrate (precise BN) against population statistics computed directly; adapt (AdaBN)."""

import datetime
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import batchnorm as bn
from batchnorm.tools import adapt, recalibrate, stats_restore


def _net(seed: int = 0) -> nn.Sequential:
    """Linear -> BN -> ReLU -> Dropout -> Linear -> BN, float64, in training mode."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 5), bn.BatchNorm1d(5), nn.ReLU(), nn.Dropout(0.5), nn.Linear(5, 4), nn.BatchNorm1d(4)
    ).double()


def _split(x: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return list(torch.split(x, sizes))


def _expected(net: nn.Sequential, batches: list[torch.Tensor]):
    """Population (mean, unbiased var) of each BN's input, straight from torch.var_mean.

    Layer 1: over the concatenated inputs. Layer 2: its inputs as produced with layer 1
    normalizing each batch by that batch's statistics (training mode), dropout off.
    """
    first = [net[0](b) for b in batches]
    second = []
    for z in first:
        h = F.batch_norm(z, None, None, net[1].weight, net[1].bias, training=True, eps=net[1].eps)
        second.append(net[4](torch.relu(h)))
    out = []
    for zs in (first, second):
        var, mean = torch.var_mean(torch.cat(zs), dim=0, unbiased=True)
        out.append((mean, var))
    return out


@settings(max_examples=8, deadline=None)
@given(sizes=st.lists(st.integers(2, 17), min_size=1, max_size=6), pairs=st.booleans(), seed=st.integers(0, 99))
def test_recalibrate_gives_population_statistics(sizes, pairs, seed):
    net = _net(seed)
    x = torch.randn(sum(sizes), 6, dtype=torch.float64) * 3 + 1
    batches = _split(x, sizes)
    expected = _expected(net, batches)
    params = {k: v.clone() for k, v in net.named_parameters()}
    old = {k: v.clone() for k, v in net.state_dict().items()}
    net[3].eval()  # modes to restore: a mix
    data = [(b, torch.zeros(len(b))) for b in batches] if pairs else batches
    out, changes = recalibrate(net, data, progress=False)
    assert out is net
    for layer, (mean, var) in zip((net[1], net[5]), expected):
        torch.testing.assert_close(layer.running_mean, mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.running_var, var, rtol=1e-10, atol=1e-12)
        assert int(layer.num_batches_tracked) == len(sizes)
    assert all(torch.equal(v, params[k]) for k, v in net.named_parameters())
    assert [m.training for m in net] == [True, True, True, False, True, True]
    assert changes.previous.keys() == {"1", "5"}
    assert torch.equal(changes.previous["1"]["running_mean"], old["1.running_mean"])


def test_recalibrate_conv_and_num_batches():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).double()
    x = torch.randn(20, 3, 6, 6, dtype=torch.float64)
    batches = _split(x, [7, 7, 6])
    recalibrate(net, iter(batches), num_batches=2, progress=False)
    var, mean = torch.var_mean(net[0](torch.cat(batches[:2])), dim=(0, 2, 3), unbiased=True)
    torch.testing.assert_close(net[1].running_mean, mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(net[1].running_var, var, rtol=1e-10, atol=1e-12)
    assert int(net[1].num_batches_tracked) == 2


def test_bad_input_is_refused_and_leaves_statistics_alone():
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    good = torch.randn(4, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="yielded nothing"):
        recalibrate(net, [], progress=False)
    with pytest.raises(ValueError, match=r"batch 1: the model failed on input of shape \(4, 7\)"):
        recalibrate(net, [good, torch.randn(4, 7, dtype=torch.float64)], progress=False)
    with pytest.raises(TypeError, match="batch 0: expected a tensor"):
        recalibrate(net, [{"x": good}], progress=False)
    with pytest.raises(ValueError, match="num_batches"):
        recalibrate(net, [good], num_batches=0, progress=False)
    with pytest.raises(ValueError, match="no batch-norm layer"):
        recalibrate(nn.Linear(6, 2), [good], progress=False)
    with pytest.raises(ValueError, match="batch 0: .*1 value per channel in training mode"):
        recalibrate(net, [good[:1]], progress=False)
    after = net.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert all(m.training for m in net)


def test_frozen_layers_are_skipped():
    net = _net()
    bn.tools.freeze(net[5:])
    before = net[5].running_mean.clone()
    _, changes = recalibrate(net, [torch.randn(8, 6, dtype=torch.float64)], progress=False)
    assert [p for p, _ in changes.changed] == ["1"] and changes.skipped[0][0] == "5"
    assert torch.equal(net[5].running_mean, before)


def _digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, random_state=0)
    scaler = StandardScaler().fit(x_train)
    as_t = lambda a: torch.tensor(scaler.transform(a), dtype=torch.float32)  # noqa: E731
    return as_t(x_train), torch.tensor(y_train), as_t(x_test), torch.tensor(y_test)


def _accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def test_adapt_recovers_accuracy_under_an_affine_shift():
    x_train, y_train, x_test, y_test = _digits()
    torch.manual_seed(0)
    model = nn.Sequential(bn.BatchNorm1d(64), nn.Linear(64, 64), bn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(300):
        idx = torch.randint(0, len(x_train), (64,))
        loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    clean = _accuracy(model, x_test, y_test)
    g = torch.Generator().manual_seed(1)
    shifted = x_test * 2.5 + 3 * torch.rand(64, generator=g)  # target domain: scaled and offset
    before = _accuracy(model, shifted, y_test)
    _, changes = adapt(model, torch.split(shifted, 50), progress=False)
    after = _accuracy(model, shifted, y_test)
    assert clean > 0.9 and before < clean - 0.3
    assert after > clean - 0.05, (clean, before, after)
    assert not model.training
    stats_restore(model, changes.previous)
    assert _accuracy(model, x_test, y_test) == clean


def _ranks_entry(rank: int, port: int, sizes: list[int], out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=30)
    )
    net = _net()
    torch.manual_seed(7)
    batches = _split(torch.randn(sum(sizes), 6, dtype=torch.float64), sizes)
    mine = batches[: len(batches) // 2] if rank == 0 else batches[len(batches) // 2 :]
    recalibrate(net, mine, progress=False)
    torch.save(net.state_dict(), f"{out}/rank{rank}.pt")
    dist.barrier()  # leave together (train._group says why)
    dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_ranks_merge_to_the_statistics_of_all_the_data(tmp_path):
    sizes = [5, 9, 3, 8, 4]  # rank 0 gets two batches, rank 1 three
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_ranks_entry, args=(port, sizes, str(tmp_path)), nprocs=2, start_method="spawn")
    net = _net()
    torch.manual_seed(7)
    batches = _split(torch.randn(sum(sizes), 6, dtype=torch.float64), sizes)
    recalibrate(net, batches, progress=False)
    for rank in range(2):
        state = torch.load(tmp_path / f"rank{rank}.pt")
        for key, value in net.state_dict().items():
            torch.testing.assert_close(state[key], value, rtol=1e-12, atol=1e-12)


def test_masked_positions_and_biased_variance_layers():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = bn.BatchNorm1d(3, unbiased_running_var=False).double()

        def forward(self, x):
            return self.bn(x, mask=x[:, 0] > 0)  # (N, L) valid positions

    net = Net()
    batches = [torch.randn(n, 3, 7, dtype=torch.float64) for n in (4, 6)]
    recalibrate(net, batches, progress=False)
    valid = torch.cat([b.permute(0, 2, 1)[b[:, 0] > 0] for b in batches])  # (M, C)
    var, mean = torch.var_mean(valid, dim=0, unbiased=False)
    torch.testing.assert_close(net.bn.running_mean, mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(net.bn.running_var, var, rtol=1e-10, atol=1e-12)


def test_a_batch_with_nan_is_left_out_reported_and_warned():
    net = _net()
    batches = [torch.randn(8, 6, dtype=torch.float64) * 3 + 1 for _ in range(3)]
    expected = _expected(net, [batches[0], batches[2]])
    bad = batches[1].clone()
    bad[2, 3] = float("nan")
    with pytest.warns(RuntimeWarning, match=r"non-finite.*1: batch 1; 5: batch 1"):
        _, changes = recalibrate(net, [batches[0], bad, batches[2]], progress=False)
    for layer, (mean, var) in zip((net[1], net[5]), expected):
        torch.testing.assert_close(layer.running_mean, mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.running_var, var, rtol=1e-10, atol=1e-12)
        assert int(layer.num_batches_tracked) == 2
    over = "population statistics over 16 values per channel; 1 of 3 batches left out (non-finite values)"
    assert changes.changed == [("1", over), ("5", over)] and not changes.skipped
    assert net[1].nonfinite_skips == 0  # the passes are not training: the layer's count is kept


def test_batches_are_left_out_per_layer():
    class TwoBranches(nn.Module):
        def __init__(self):
            super().__init__()
            self.plain, self.logged = nn.BatchNorm1d(2), nn.BatchNorm1d(2)

        def forward(self, x):
            return self.plain(x) + self.logged(x.log())  # NaN where x < 0

    net = TwoBranches().double()
    positive, mixed = torch.rand(5, 2, dtype=torch.float64) + 0.5, torch.randn(5, 2, dtype=torch.float64)
    mixed[0] = -1.0
    with pytest.warns(RuntimeWarning, match=r"logged: batch 1"):
        _, changes = recalibrate(net, [positive, mixed], progress=False)
    var, mean = torch.var_mean(torch.cat([positive, mixed]), dim=0)
    torch.testing.assert_close(net.plain.running_var, var)
    torch.testing.assert_close(net.logged.running_mean, positive.log().mean(0))
    assert int(net.plain.num_batches_tracked) == 2 and int(net.logged.num_batches_tracked) == 1


def test_a_layer_whose_every_batch_is_non_finite_is_left_untouched():
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    nan, inf = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    nan[0, 0], inf[1, 1] = float("nan"), float("inf")
    with pytest.warns(RuntimeWarning, match=r"non-finite.*1: batch 0, 1"):
        _, changes = adapt(net, [nan, inf], progress=False)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    untouched = "every batch it saw had non-finite values (NaN or inf) in its input (2 of 2 left out); statistics unchanged"
    assert not changes.changed and changes.skipped == [("1", untouched), ("5", untouched)]
