"""extras.py: the extras are defined once for every module of ours; each constructor takes
torch's arguments first, in torch's order, then the extras as keywords."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch

import batchnorm as bn
from batchnorm.distributed import SyncBatchNorm
from batchnorm.extras import EXTRA_DEFAULTS, changed_extras, nonfinite_skips_kept

PAIRS = [
    (bn.BatchNorm1d, torch.nn.BatchNorm1d),
    (bn.BatchNorm2d, torch.nn.BatchNorm2d),
    (bn.BatchNorm3d, torch.nn.BatchNorm3d),
    (bn.LazyBatchNorm2d, torch.nn.LazyBatchNorm2d),
    (SyncBatchNorm, torch.nn.SyncBatchNorm),
]


@pytest.mark.parametrize("ours, theirs", PAIRS, ids=lambda c: c.__name__)
def test_torchs_arguments_first_then_the_extras(ours, theirs):
    names = list(inspect.signature(ours).parameters)
    torchs = list(inspect.signature(theirs).parameters)
    assert names == torchs + list(ours.accepted_extras())
    if "num_features" in torchs:  # the same positional arguments build the same layer
        args = (3, 1e-3, 0.2, False, False) + ((None,) if theirs is torch.nn.SyncBatchNorm else ()) + ("cpu", torch.float64)
        mine, reference = ours(*args), theirs(*args)
        for name in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
            assert getattr(mine, name) == getattr(reference, name)
        assert mine.running_mean is None and mine.weight is None


def test_every_class_but_sync_takes_every_extra():
    assert bn.BatchNorm2d.accepted_extras() == tuple(EXTRA_DEFAULTS)
    assert SyncBatchNorm.accepted_extras() == tuple(n for n in EXTRA_DEFAULTS if n != "virtual_batch_size")


def test_sync_batchnorm_refuses_ghost_batches_saying_why():
    with pytest.raises(TypeError, match="does not take virtual_batch_size: ghost batches, like masks"):
        SyncBatchNorm(4, virtual_batch_size=2)


def test_unknown_keyword_is_a_type_error_naming_the_class():
    with pytest.raises(TypeError, match=r"BatchNorm2d\(\) got an unexpected keyword argument 'activaton'"):
        bn.BatchNorm2d(4, activaton="relu")


def test_changed_extras_leave_out_defaults_and_backend():
    layer = bn.BatchNorm1d(4, virtual_batch_size=2, backend="reference", unbiased_running_var=False)
    assert changed_extras(layer) == {"virtual_batch_size": 2, "unbiased_running_var": False}
    assert changed_extras(torch.nn.BatchNorm1d(4)) == {}


def test_nonfinite_skips_kept_inside():
    layer = bn.BatchNorm1d(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with nonfinite_skips_kept([layer, torch.nn.ReLU()]):
            layer(torch.full((4, 2), float("nan")))
            assert layer.nonfinite_skips == 1
    assert layer.nonfinite_skips == 0
    with pytest.warns(RuntimeWarning, match="non-finite"):  # still warns once: the state was restored
        layer(torch.full((4, 2), float("nan")))


class _Residual(torch.nn.Module):
    """Our layers called as torch.fx meets them: plain, with a fused activation, with a
    residual and with a mask."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 1)
        self.bn1 = bn.BatchNorm2d(4)
        self.bn2 = bn.BatchNorm2d(4, virtual_batch_size=2)
        self.bn3 = bn.BatchNorm2d(4)

    def forward(self, x, mask):
        y = self.bn1(self.conv(x), activation="relu")
        return self.bn3(self.bn2(y, y), mask=mask)


def test_torch_fx_traces_our_layers_as_calls_of_them_that_follow_the_mode():
    torch.manual_seed(0)
    model = _Residual()
    gm = torch.fx.symbolic_trace(model)
    calls = [(n.target, n.args[1:], n.kwargs) for n in gm.graph.nodes if n.op == "call_module" and n.target != "conv"]
    assert [c[0] for c in calls] == ["bn1", "bn2", "bn3"]
    assert not calls[0][1] and calls[0][2] == {"activation": "relu"}
    assert len(calls[1][1]) == 1 and not calls[1][2] and list(calls[2][2]) == ["mask"]
    x, mask = torch.randn(4, 3, 5, 5), torch.rand(4, 5, 5) > 0.3
    for training in (True, False, True):  # the graph's layers follow .train() / .eval()
        model.train(training), gm.train(training)
        torch.testing.assert_close(gm(x, mask), model(x, mask), rtol=0, atol=0)
    for name, buffer in model.named_buffers():
        torch.testing.assert_close(gm.get_buffer(name), buffer, rtol=0, atol=0)


def test_torch_fx_on_a_layer_alone_says_to_trace_a_model():
    with pytest.raises(TypeError, match="trace a model that holds it"):
        torch.fx.symbolic_trace(bn.BatchNorm2d(3))
