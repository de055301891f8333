"""The starting point of batch norm: normalizing a network's inputs helps it train (LeCun et
al. 1998, "Efficient backprop", section 4.3). Batch norm does the same for every layer's
input, so with it the network should care less whether its raw inputs were standardized.
"""

from __future__ import annotations

from . import common

NAME = "input-normalization"
CLAIM = ("Standardized inputs train better than raw ones; with batch norm the raw scale of the "
         "inputs matters less.")
SETUP = (
    "The speed experiment's network (3 hidden layers of 100 sigmoid units, mini-batches of "
    "{batch_size}, SGD lr {lr} momentum {momentum}, {steps} steps) on the raw inputs and on inputs "
    "standardized per feature (StandardScaler fitted on the training split), with and without batch "
    "norm. Measure: the mean test accuracy over all evaluations (every {eval_every} steps), which "
    "rewards both speed and final accuracy."
)
FULL = {"seeds": [0, 1, 2], "steps": 3000, "batch_size": 60, "lr": 0.1, "momentum": 0.9, "eval_every": 50}
QUICK = {**FULL, "seeds": [0, 1], "steps": 500, "eval_every": 25}
ARMS = {  # label: (standardized inputs, batch norm)
    "raw, no batch norm": (False, False),
    "standardized, no batch norm": (True, False),
    "raw, batch norm": (False, True),
    "standardized, batch norm": (True, True),
}


def run(config: dict, progress: common.Progress = common.no_progress) -> dict:
    progress(total=len(ARMS) * len(config["seeds"]) * config["steps"])
    inputs = {standardized: common.load_data(config, standardized=standardized) for standardized in (False, True)}
    curves = {}
    for arm, (standardized, batchnorm) in ARMS.items():
        data = inputs[standardized]
        curves[arm] = []
        for seed in config["seeds"]:
            model = common.seeded_model(seed, lambda: common.mlp(
                data.n_features, data.n_classes, width=100, depth=3, activation="sigmoid", batchnorm=batchnorm),
                config["device"])
            curves[arm].append(common.train(
                model, data, steps=config["steps"], batch_size=config["batch_size"], lr=config["lr"],
                momentum=config["momentum"], seed=seed, eval_every=config["eval_every"], progress=progress))
    area = {arm: common.summary([sum(c["test_acc"]) / len(c["test_acc"]) for c in runs]) for arm, runs in curves.items()}
    final = {arm: common.summary([c["final_test_acc"] for c in runs]) for arm, runs in curves.items()}
    a = {arm: s["mean"] for arm, s in area.items()}
    effect = {"no batch norm": a["standardized, no batch norm"] - a["raw, no batch norm"],
              "batch norm": a["standardized, batch norm"] - a["raw, batch norm"]}
    checks = [
        common.check(
            "standardized inputs train better",
            "without batch norm, the mean test accuracy over the run is higher on standardized inputs",
            effect["no batch norm"] > 0, gain_from_standardizing=effect["no batch norm"]),
        common.check(
            "batch norm makes the input scale matter less",
            "the gain (or loss) from standardizing is smaller in size with batch norm than without",
            abs(effect["batch norm"]) < abs(effect["no batch norm"]), gain_from_standardizing=effect),
    ]
    result = "mean accuracy over the run: " + ", ".join(f"{arm} {common.pct(v)}" for arm, v in a.items())
    return {"numbers": {"mean_accuracy_over_run": area, "final_test_acc": final,
                        "gain_from_standardizing": effect, "curves": curves},
            "checks": checks, "held": all(c["held"] for c in checks), "result": result}


def plot(result: dict) -> dict:
    fig, (ax,) = common.figure()
    for arm, runs in result["numbers"]["curves"].items():
        style = {"linestyle": "-" if arm.startswith("standardized") else "--"}
        common.plot_band(ax, runs[0]["steps"], [r["test_acc"] for r in runs], arm, **style)
    ax.set(xlabel="training step", ylabel="test accuracy", title="Raw vs standardized inputs", ylim=(0, 1))
    ax.legend(loc="lower right", fontsize="small")
    return {"accuracy": fig}
