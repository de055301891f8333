"""Batch norm lets a residual CNN train at larger learning rates (Bjorck et al. 2018; the
learning-rate experiment, on a convolutional network).

A small ResNet on scikit-learn's 8 x 8 digits (`convnets.resnet`: a stem convolution, basic
blocks, global average pooling), built with torch's BatchNorm2d and converted by
`bn.convert(model, fuse=True)` into ours with the ReLU and the residual add fused. Without
batch norm, the same network with biases and He initialization. Inputs are standardized by
one mean and one std over the training pixels (a convolution shares its weights across
positions, so every pixel keeps its scale).
"""

from __future__ import annotations

from . import common, convnets, learning_rate

NAME = "cnn-learning-rate"
CLAIM = "Batch norm lets a residual CNN train at larger learning rates than without it."
SETUP = (
    "A ResNet of {blocks} basic blocks of {channels} channels on 8 x 8 digits (3x3 stem, global average "
    "pooling; with batch norm: bn.convert(fuse=True), ReLU and residual add fused), SGD momentum "
    "{momentum}, mini-batches of {batch_size}, {steps} steps at each learning rate in {lrs}, with and "
    "without batch norm. A rate 'trains' when no seed diverges and the mean final test accuracy is at "
    "least {good_fraction} x the best mean accuracy of the whole sweep." + common.INIT_SETUP
)
FULL = {"seeds": [0, 1, 2], "steps": 600, "blocks": 2, "channels": 16, "batch_size": 32, "momentum": 0.9,
        "lrs": [0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0], "good_fraction": 0.9, "inits": ["practitioner", "torch"]}
QUICK = {**FULL, "seeds": [0], "steps": 120, "lrs": [0.01, 0.1, 1.0], "inits": ["practitioner"]}


def run(config: dict, progress: common.Progress = common.no_progress) -> dict:
    data = common.load_data(config, per_feature=False)

    def build(batchnorm: bool):
        return convnets.resnet(data.sample_shape, data.n_classes, channels=config["channels"],
                               blocks=config["blocks"], batchnorm=batchnorm, init=common.init_for(config, batchnorm))

    return learning_rate.compare(learning_rate.sweep(build, data, config, progress), config["good_fraction"])


def plot(result: dict) -> dict:
    return learning_rate.plot(result, title="ResNet on digits: learning-rate sweep (x: a seed diverged)")
