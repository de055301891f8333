"""Keras and Flax layers brought in: same eval outputs as their formula, same training updates."""

import numpy as np
import pytest
import torch

import batchnorm as bn


def _keras_eval(x_nhwc, gamma, beta, mean, var, eps):
    """Keras BatchNormalization inference, by its formula, in numpy (channels last)."""
    return gamma * (x_nhwc - mean) / np.sqrt(var + eps) + beta


def test_keras_weights_give_keras_eval_outputs():
    rng = np.random.default_rng(0)
    c = 5
    gamma, beta = rng.normal(size=c), rng.normal(size=c)
    mean, var = rng.normal(size=c), rng.uniform(0.5, 2, size=c)
    layer = bn.from_keras(c, momentum=0.99, epsilon=1e-3, gamma=gamma, beta=beta, moving_mean=mean, moving_variance=var)
    assert layer.momentum == pytest.approx(0.01) and layer.eps == 1e-3
    layer.eval()
    x = rng.normal(size=(4, 3, 3, c))
    expected = _keras_eval(x, gamma, beta, mean, var, 1e-3)
    y = layer(torch.tensor(x, dtype=torch.float32).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    np.testing.assert_allclose(y.detach().numpy(), expected, rtol=1e-5, atol=1e-5)


def test_flax_variables_give_flax_eval_outputs_and_training_update():
    rng = np.random.default_rng(1)
    c = 3
    params = {"scale": rng.normal(size=c), "bias": rng.normal(size=c)}
    stats = {"mean": rng.normal(size=c), "var": rng.uniform(0.5, 2, size=c)}
    layer = bn.from_flax(c, momentum=0.9, epsilon=1e-5, spatial_dims=1, params=params, batch_stats=stats, dtype=torch.float64)
    layer.eval()
    x = rng.normal(size=(6, c))
    expected = params["scale"] * (x - stats["mean"]) / np.sqrt(stats["var"] + 1e-5) + params["bias"]
    np.testing.assert_allclose(layer(torch.tensor(x)).detach().numpy(), expected, rtol=1e-10)
    # Flax's training update: ra = m ra + (1 - m) batch, with the biased batch variance
    layer.train()
    layer(torch.tensor(x))
    np.testing.assert_allclose(layer.running_mean.numpy(), 0.9 * stats["mean"] + 0.1 * x.mean(0), rtol=1e-10)
    np.testing.assert_allclose(layer.running_var.numpy(), 0.9 * stats["var"] + 0.1 * x.var(0), rtol=1e-10)


def test_keras_center_and_scale_off():
    layer = bn.from_keras(4, center=False, scale=False)
    assert layer.weight is None and layer.bias is None
    beta_only = bn.from_keras(4, scale=False, beta=np.ones(4))
    assert not beta_only.weight.requires_grad and torch.equal(beta_only.bias.detach(), torch.ones(4))


def test_bad_converter_input():
    with pytest.raises(ValueError, match="moving_mean has shape"):
        bn.from_keras(4, moving_mean=np.zeros(3))
    with pytest.raises(ValueError, match="momentum must be in"):
        bn.from_flax(4, momentum=1.5)
    with pytest.raises(ValueError, match="spatial_dims"):
        bn.from_keras(4, spatial_dims=4)
