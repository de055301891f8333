"""Batch norm's benefit is not (only) the reduction of internal covariate shift (Santurkar et
al. 2018, "How does batch normalization help optimization?", section 2.1).

Their test: put noise right after each batch-norm layer that changes the distribution of
every unit's input to the nonlinearity at every step (a random scale and a random shift,
drawn anew each step, plus per-example noise), so the next layer sees a distribution that
moves more than without batch norm; the network still trains better than without batch norm.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import common

NAME = "noise"
CLAIM = ("A batch-norm network with noise that shifts every unit's distribution at every step "
         "still trains better than the same network without batch norm.")
SETUP = (
    "The speed experiment's network (3 hidden layers of 100 sigmoid units, mini-batches of "
    "{batch_size}, SGD lr {lr} momentum {momentum}, {steps} steps), three ways: no batch norm, batch "
    "norm, and batch norm followed by noise y = k*x + m + s*e per unit, with k ~ U{scale}, "
    "m ~ U(-{shift}, {shift}), s ~ U(0, {jitter}) drawn per unit at every step and e ~ N(0, 1) per "
    "example (training only). Criterion: the mean test accuracy over all evaluations (the area "
    "under the accuracy curve, which rewards speed and final accuracy)." + common.INIT_SETUP
)
FULL = {"seeds": [0, 1, 2], "steps": 3000, "batch_size": 60, "lr": 0.1, "momentum": 0.9, "eval_every": 50,
        "scale": [0.5, 1.5], "shift": 1.0, "jitter": 0.5, "inits": ["practitioner", "torch"]}
QUICK = {**FULL, "seeds": [0], "steps": 600, "eval_every": 25, "inits": ["practitioner"]}
ARMS = ("no batch norm", "batch norm", "batch norm + noise")


class MovingNoise(nn.Module):
    """y = k * x + m + s * e on (N, C) input: k, m, s per channel, new at each training call.

    k ~ U(scale[0], scale[1]), m ~ U(-shift, shift), s ~ U(0, jitter), e ~ N(0, 1) per element;
    the identity in evaluation mode.
    """

    def __init__(self, scale: tuple[float, float], shift: float, jitter: float) -> None:
        super().__init__()
        self.scale, self.shift, self.jitter = tuple(scale), shift, jitter

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        channels = x.shape[1]
        uniform = lambda low, high: low + (high - low) * torch.rand(channels, device=x.device)  # noqa: E731
        k = uniform(*self.scale)
        m = uniform(-self.shift, self.shift)
        s = uniform(0.0, self.jitter)
        return k * x + m + s * torch.randn_like(x)


def run(config: dict, progress: common.Progress = common.no_progress) -> dict:
    data = common.load_data(config)
    progress(total=len(ARMS) * len(config["seeds"]) * config["steps"])
    noise = lambda width: MovingNoise(config["scale"], config["shift"], config["jitter"])  # noqa: E731
    builds = {
        "no batch norm": dict(batchnorm=False, init=common.init_for(config, False)),
        "batch norm": dict(batchnorm=True),
        "batch norm + noise": dict(batchnorm=True, after_norm=noise),
    }
    curves = {}
    for arm in ARMS:
        curves[arm] = []
        for seed in config["seeds"]:
            model = common.seeded_model(seed, lambda: common.mlp(
                data.n_features, data.n_classes, width=100, depth=3, activation="sigmoid", **builds[arm]),
                config["device"])
            curves[arm].append(common.train(
                model, data, steps=config["steps"], batch_size=config["batch_size"], lr=config["lr"],
                momentum=config["momentum"], seed=seed, eval_every=config["eval_every"], progress=progress))
    area = {arm: common.summary([sum(c["test_acc"]) / len(c["test_acc"]) for c in runs])
            for arm, runs in curves.items()}
    final = {arm: common.summary([c["final_test_acc"] for c in runs]) for arm, runs in curves.items()}
    held = area["batch norm + noise"]["mean"] > area["no batch norm"]["mean"]
    checks = [common.record_verdict(
        "noisy batch norm beats no batch norm",
        "mean test accuracy over the run (area under the curve, mean over seeds) is higher with "
        "batch norm + noise than without batch norm",
        held, why=f"{common.pct(area['batch norm + noise']['mean'])} noisy BN vs "
                  f"{common.pct(area['no batch norm']['mean'])} no BN",
        mean_accuracy_over_run={a: v["mean"] for a, v in area.items()})]
    result = ("mean accuracy over the run: " +
              ", ".join(f"{arm} {common.pct(area[arm]['mean'])}" for arm in ARMS))
    return {"numbers": {"mean_accuracy_over_run": area, "final_test_acc": final, "curves": curves},
            "checks": checks, "held": held, "result": result,
            "headline": f"{common.pct(area['batch norm + noise']['mean'])} vs {common.pct(area['no batch norm']['mean'])}"}


def plot(result: dict) -> dict:
    fig, (ax,) = common.figure()
    for arm, runs in result["numbers"]["curves"].items():
        common.plot_band(ax, runs[0]["steps"], [r["test_acc"] for r in runs], arm)
    ax.set(xlabel="training step", ylabel="test accuracy", title="Batch norm with moving noise", ylim=(0, 1))
    ax.legend(loc="lower right")
    return {"accuracy": fig}
