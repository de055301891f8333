"""recalibrate on weight-averaged copies (SWA, EMA, mean teacher): torch.optim.swa_utils.AveragedModel.

The averaged copy's batch-norm statistics are those of the model it was copied from (or an
average of running statistics), not of its averaged weights. torch's answer,
`swa_utils.update_bn`, averages per-batch variances; `bn.recalibrate` computes the exact
population statistics and leaves non-finite batches out.
"""

import copy
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn

import batchnorm as bn

from .models import ResNet


def _train(model: nn.Module, steps: int, seed: int, averaged: list[AveragedModel] = ()) -> None:
    """SGD on random images towards random labels, updating each averaged copy after every step."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        x, y = torch.randn(16, 3, 8, 8, generator=g) * 2 + 1, torch.randint(0, 4, (16,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        for copy_ in averaged:
            copy_.update_parameters(model)


def _unshuffled_batches() -> list[torch.Tensor]:
    """A loader without shuffling over data sorted by a class whose mean differs: batch means
    spread, so the mean of per-batch variances falls short of the population variance."""
    g = torch.Generator().manual_seed(1)
    return [torch.randn(n, 3, 8, 8, generator=g) + shift for n, shift in ((16, -2.0), (16, 0.0), (16, 2.0), (5, 4.0))]


def _stem_input(model: nn.Module, batches: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, unbiased variance) per channel of the first batch norm's input over all batches."""
    with torch.no_grad():
        z = torch.cat([model.stem[0](x) for x in batches]).double()
    var, mean = torch.var_mean(z, dim=(0, 2, 3), correction=1)
    return mean.float(), var.float()


def test_swa_copy_recalibrated_gets_the_exact_population_statistics():
    torch.manual_seed(0)
    model = ResNet()
    _train(model, 5, seed=0)
    swa = AveragedModel(model)
    _train(model, 10, seed=1, averaged=[swa])
    batches = _unshuffled_batches()
    mean, var = _stem_input(swa.module, batches)
    stale = swa.module.stem[1].running_var.clone()
    assert (stale - var).abs().max() > 0.5  # the problem: the statistics of the copied model

    theirs = copy.deepcopy(swa)
    update_bn(batches, theirs)
    bn.recalibrate(swa, batches, progress=False)  # the one line

    ours = swa.module.stem[1]
    torch.testing.assert_close(ours.running_mean, mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.running_var, var, rtol=1e-5, atol=1e-5)
    assert int(ours.num_batches_tracked) == len(batches)
    # update_bn: an unweighted average of per-batch variances (the spread of the batch means
    # left out, the small last batch weighted as a full one): off by up to 73 % here.
    off = (theirs.module.stem[1].running_var / var - 1).abs()
    assert off.max() > 0.5


def test_a_non_finite_batch_poisons_update_bn_and_is_left_out_by_recalibrate():
    torch.manual_seed(0)
    model = ResNet()
    swa = AveragedModel(model)
    _train(model, 3, seed=2, averaged=[swa])
    batches = _unshuffled_batches()
    bad = batches[1].clone()
    bad[0, 0, 0, 0] = float("nan")
    with_nan = [batches[0], bad, batches[2], batches[3]]

    theirs = copy.deepcopy(swa)
    update_bn(with_nan, theirs)
    assert theirs.module.stem[1].running_var.isnan().all()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, changes = bn.recalibrate(swa, with_nan, progress=False)
    assert any("left out" in str(w.message) for w in caught)
    mean, var = _stem_input(swa.module, [batches[0], batches[2], batches[3]])
    torch.testing.assert_close(swa.module.stem[1].running_var, var, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(swa.module.stem[1].running_mean, mean, rtol=1e-5, atol=1e-5)
    assert dict(changes.changed)["module.stem.1"].endswith("1 of 4 batches left out (non-finite values)")


def test_ema_copy_is_stale_until_recalibrated():
    torch.manual_seed(0)
    model = bn.convert(ResNet())[0]
    _train(model, 5, seed=3)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    _train(model, 20, seed=4, averaged=[ema])
    batches = _unshuffled_batches()
    before = bn.check(ema.eval(), batches)
    bn.recalibrate(ema, batches, progress=False)
    after = bn.check(ema, batches)
    assert "stale_statistics" in {f.kind for f in before.findings}
    assert "stale_statistics" not in {f.kind for f in after.findings}
