"""Batch norm keeps the inputs of deeper layers' nonlinearities stable during training
(Ioffe & Szegedy 2015, Figure 1 b, c).

The speed experiment's network is trained with and without batch norm while
`bn.tools.monitor` records, every few steps, the 15th, 50th and 85th percentiles over the
mini-batch of a few units' inputs to the last hidden layer's sigmoid. Without batch norm
the paper saw these move in both centre and spread; with it, they stay put.

Instability, per unit: the standard deviation over time of the median plus that of the
15-85 width, both divided by the mean width (the distribution's own scale), so it measures
how much the distribution moves relative to how wide it is; then the mean over units and
seeds.
"""

from __future__ import annotations

import numpy as np

from . import common

NAME = "distributions"
CLAIM = ("With batch norm, the distribution of a deep unit's input to its nonlinearity stays "
         "stable during training; without it, it drifts.")
SETUP = (
    "3 hidden layers of 100 sigmoid units, mini-batches of {batch_size}, SGD lr {lr} momentum "
    "{momentum}, {steps} steps, with and without batch norm; bn.tools.monitor records the "
    "15/50/85th percentiles of {units} units' input to the last hidden sigmoid every {every} steps. "
    "Criterion: instability (std over time of the median and of the 15-85 width, divided by the mean "
    "width) is lower with batch norm." + common.INIT_SETUP
)
FULL = {"seeds": [0, 1, 2], "steps": 3000, "batch_size": 60, "lr": 0.1, "momentum": 0.9, "every": 20, "units": 3,
        "inits": ["practitioner", "torch"]}
QUICK = {**FULL, "seeds": [0], "steps": 500, "every": 5, "inits": ["practitioner"]}
ARMS = {"batch norm": True, "no batch norm": False}
# In common.mlp(depth=3): the batch norm in the last BatchNormAct(BatchNorm1d, sigmoid) (its
# pre-activation), or the last nn.Sigmoid (its input).
LAST_HIDDEN = {True: "5.bn", False: "5"}


def run(config: dict, progress: common.Progress = common.no_progress) -> dict:
    from batchnorm.tools.monitor import monitor

    data = common.load_data(config)
    progress(total=len(ARMS) * len(config["seeds"]) * config["steps"])
    traces, instability = {}, {}
    for arm, batchnorm in ARMS.items():
        traces[arm], values = [], []
        for seed in config["seeds"]:
            model = common.seeded_model(seed, lambda: common.mlp(
                data.n_features, data.n_classes, width=100, depth=3, activation="sigmoid", batchnorm=batchnorm,
                init=common.init_for(config, batchnorm)), config["device"])
            layer = LAST_HIDDEN[batchnorm]
            with monitor(model, layers=[layer], every=config["every"], units=config["units"]) as watch:
                trained = common.train(model, data, steps=config["steps"], batch_size=config["batch_size"],
                                   lr=config["lr"], momentum=config["momentum"], seed=seed, progress=progress)
            history = watch.arrays()[layer]
            percentiles = history["percentiles"]  # (records, units, 3)
            values.append(instability_of(percentiles))
            traces[arm].append({"steps": history["step"].tolist(), "percentiles": percentiles.tolist(),
                                "final_test_acc": trained["final_test_acc"]})
        instability[arm] = common.summary(values)
    held = instability["batch norm"]["mean"] < instability["no batch norm"]["mean"]
    checks = [common.record_verdict(
        "stabler with batch norm", "mean instability over units and seeds is lower with batch norm", held,
        why=f"{instability['batch norm']['mean']:.3f} with BN vs {instability['no batch norm']['mean']:.3f} without",
        instability={arm: s["mean"] for arm, s in instability.items()})]
    result = (f"instability {instability['batch norm']['mean']:.3f} with BN vs "
              f"{instability['no batch norm']['mean']:.3f} without")
    return {"numbers": {"instability": instability, "traces": traces}, "checks": checks, "held": held,
            "result": result, "headline": f"instability {instability['batch norm']['mean']:.2f} vs "
                                          f"{instability['no batch norm']['mean']:.2f}"}


def instability_of(percentiles: np.ndarray) -> float:
    """(records, units, 3) percentiles 15/50/85 -> mean over units of
    (std_t median + std_t width) / mean_t width, width = p85 - p15."""
    median = percentiles[:, :, 1]
    width = percentiles[:, :, 2] - percentiles[:, :, 0]
    scale = np.maximum(width.mean(axis=0), 1e-12)
    return float(np.mean((median.std(axis=0) + width.std(axis=0)) / scale))


def plot(result: dict) -> dict:
    """Figure 1 (b, c) of the paper for the first seed: one band per unit, median as a line."""
    traces = result["numbers"]["traces"]
    fig, axes = common.figure(ncols=2, width=5.0)
    for ax, arm in zip(axes, ("no batch norm", "batch norm")):
        first = traces[arm][0]
        pct = np.asarray(first["percentiles"])
        for unit in range(pct.shape[1]):
            (line,) = ax.plot(first["steps"], pct[:, unit, 1], lw=1.2, label=f"unit {unit + 1}")
            ax.fill_between(first["steps"], pct[:, unit, 0], pct[:, unit, 2], color=line.get_color(), alpha=0.25)
        ax.set(xlabel="training step", ylabel="sigmoid input: 15th / 50th / 85th percentile",
               title=f"{arm} (instability {result['numbers']['instability'][arm]['mean']:.3f})")
        ax.legend(loc="upper right", fontsize="small")
    return {"percentiles": fig}
