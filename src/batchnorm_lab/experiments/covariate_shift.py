"""Test inputs from another distribution: keep the training statistics, or adapt them?
(Li et al. 2016, "Revisiting batch normalization for practical domain adaptation", AdaBN.)

A network is trained on the source inputs and tested on shifted copies of the test inputs:
lower contrast, higher brightness, added noise. With source statistics the first layer's
pre-activations move away from what batch norm learned to expect; `bn.adapt` re-estimates
every layer's statistics on the (unlabeled) shifted inputs. For a fully connected first
layer a contrast or brightness change is an affine change of each unit's pre-activation,
which adapted statistics undo exactly; noise is only partly undone.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import data as datasets
from . import common

NAME = "covariate-shift"
CLAIM = ("Under a shift of the input distribution, batch-norm statistics re-estimated on the "
         "shifted inputs (AdaBN) classify better than the training (source) statistics.")
SETUP = (
    "{depth} hidden layers of {width} ReLU units, with and without batch norm, mini-batches of "
    "{batch_size}, SGD lr {lr} momentum {momentum}, {steps} steps on the source inputs (standardized "
    "with the source scaler). Shifts of the raw test inputs, in units of the training inputs' "
    "overall std s around their overall mean: contrast x -> mean + {contrast}(x - mean), brightness "
    "x -> x + {brightness} s, noise x -> x + N(0, ({noise} s)^2). Adapted statistics: bn.adapt on the "
    "shifted test inputs in batches of {batch_size}, then the source statistics are restored."
    + common.INIT_SETUP
)
FULL = {"seeds": [0, 1, 2], "steps": 1500, "depth": 3, "width": 100, "batch_size": 60, "lr": 0.05,
        "momentum": 0.9, "contrast": 0.5, "brightness": 0.5, "noise": 0.25, "inits": ["practitioner"]}
QUICK = {**FULL, "seeds": [0], "steps": 400}
SHIFTS = ("contrast", "brightness", "noise")


def shifted(x: np.ndarray, kind: str, amount: float, mean: float, std: float, seed: int) -> np.ndarray:
    """Raw inputs x (n, features) under one shift; see SETUP for the formulas."""
    if kind == "contrast":
        return mean + amount * (x - mean)
    if kind == "brightness":
        return x + amount * std
    if kind == "noise":
        return x + np.random.default_rng(seed).normal(0.0, amount * std, size=x.shape)
    raise ValueError(f"unknown shift {kind!r}: use one of {SHIFTS}")


def run(config: dict, progress: common.Progress = common.no_progress) -> dict:
    from batchnorm.tools import adapt, stats_restore

    raw = datasets.load(config["dataset"])
    scaler = datasets.fit_scaler(raw.x_train)
    data = common.Data(datasets.standardize(raw), config["device"])
    mean, std = float(raw.x_train.mean()), float(raw.x_train.std())
    tests = {kind: torch.as_tensor(datasets.transform(scaler, shifted(raw.x_test, kind, config[kind], mean, std, 0)),
                                   device=config["device"]) for kind in SHIFTS}
    progress(total=2 * len(config["seeds"]) * config["steps"])
    acc = {arm: {kind: [] for kind in ("clean", *SHIFTS)} for arm in ("no batch norm", "source", "adapted")}
    for seed in config["seeds"]:
        for batchnorm in (False, True):
            model = common.seeded_model(seed, lambda: common.mlp(
                data.n_features, data.n_classes, width=config["width"], depth=config["depth"],
                activation="relu", batchnorm=batchnorm, init=common.init_for(config, batchnorm)), config["device"])
            common.train(model, data, steps=config["steps"], batch_size=config["batch_size"], lr=config["lr"],
                         momentum=config["momentum"], seed=seed, progress=progress)
            arm = "source" if batchnorm else "no batch norm"
            acc[arm]["clean"].append(common.accuracy(model, data.x_test, data.y_test))
            for kind, x in tests.items():
                acc[arm][kind].append(common.accuracy(model, x, data.y_test))
                if batchnorm:
                    batches = [x[i : i + config["batch_size"]] for i in range(0, len(x), config["batch_size"])]
                    _, changes = adapt(model, batches, progress=False)
                    acc["adapted"][kind].append(common.accuracy(model, x, data.y_test))
                    stats_restore(model, changes.previous)  # back to the source statistics
    acc["adapted"]["clean"] = acc["source"]["clean"]  # nothing to adapt to
    table = {arm: {kind: common.summary(v) for kind, v in by_kind.items()} for arm, by_kind in acc.items()}
    gain = {kind: table["adapted"][kind]["mean"] - table["source"][kind]["mean"] for kind in SHIFTS}
    mean_gain = sum(gain.values()) / len(gain)
    checks = [common.record_verdict(
        "adapted statistics beat source statistics",
        "averaged over the three shifts, test accuracy with adapted statistics (bn.adapt) is higher than "
        "with the source statistics",
        mean_gain > 0, why=f"mean {common.points(mean_gain)}", gain_per_shift=gain,
        mean_gain=mean_gain)]
    result = "; ".join(f"{kind}: source {common.pct(table['source'][kind]['mean'])} -> adapted "
                       f"{common.pct(table['adapted'][kind]['mean'])}" for kind in SHIFTS)
    return {"numbers": {"test_acc": table, "gain": gain}, "checks": checks, "held": mean_gain > 0, "result": result,
            "headline": f"+{100 * mean_gain:.1f} points" if mean_gain >= 0 else f"{100 * mean_gain:.1f} points"}


def plot(result: dict) -> dict:
    table = result["numbers"]["test_acc"]
    kinds = ("clean", *SHIFTS)
    fig, (ax,) = common.figure()
    width = 0.27
    for i, arm in enumerate(("no batch norm", "source", "adapted")):
        label = {"source": "batch norm, source statistics", "adapted": "batch norm, adapted (AdaBN)"}.get(arm, arm)
        positions = [k + (i - 1) * width for k in range(len(kinds))]
        ax.bar(positions, [table[arm][kind]["mean"] for kind in kinds], width,
               yerr=[table[arm][kind]["std"] for kind in kinds], label=label)
    ax.set_xticks(range(len(kinds)), labels=kinds)
    ax.set(ylabel="test accuracy (mean over seeds)", title="Shifted test inputs", ylim=(0, 1))
    ax.legend(loc="lower left", fontsize="small")
    return {"accuracy": fig}
