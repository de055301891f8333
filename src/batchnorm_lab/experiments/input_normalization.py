"""The starting point of batch norm: normalizing a network's inputs helps it train (LeCun et
al. 1998, "Efficient backprop", section 4.3). Batch norm does the same for every layer's
input, so with it the network should care less whether its raw inputs were standardized.

LeCun et al.'s argument is about conditioning: standardized inputs let gradient descent
take equally good steps in every direction, at the best learning rate for those inputs.
At one fixed rate the comparison mixes that with the step size (raw digits pixels, RMS
7.7, make the first layer's gradient about 8x larger than standardized ones do), so each
input scaling is trained at its own best rate: a sweep per arm, the rate chosen on a
validation split held out of the training split, the comparison on the test split.
"""

from __future__ import annotations

from . import common

NAME = "input-normalization"
CLAIM = ("Standardized inputs train better than raw ones, each at its own best learning rate; with batch "
         "norm the raw scale of the inputs matters less.")
SETUP = (
    "The speed experiment's network (3 hidden layers of 100 sigmoid units, mini-batches of "
    "{batch_size}, SGD momentum {momentum}, {steps} steps) on the raw inputs and on inputs standardized "
    "per feature (StandardScaler fitted on the training split), with and without batch norm. Each of the "
    "four arms is trained at every learning rate in {lrs} on the training split less a random fraction "
    "{validation} of it (the validation split, fixed seed); its best rate is the one with the highest mean "
    "validation accuracy over the run (mean over seeds). Measure: the mean test accuracy over all evaluations (every {eval_every} "
    "steps, which rewards both speed and final accuracy) at each arm's best rate." + common.INIT_SETUP
)
FULL = {"seeds": [0, 1, 2], "steps": 3000, "batch_size": 60, "momentum": 0.9, "eval_every": 50,
        "lrs": [0.003, 0.01, 0.03, 0.1, 0.3, 1.0], "validation": 0.2, "inits": ["practitioner", "torch"]}
QUICK = {**FULL, "seeds": [0], "steps": 400, "eval_every": 50, "lrs": [0.01, 0.1, 1.0], "inits": ["practitioner"]}
ARMS = {  # label: (standardized inputs, batch norm)
    "raw, no batch norm": (False, False),
    "standardized, no batch norm": (True, False),
    "raw, batch norm": (False, True),
    "standardized, batch norm": (True, True),
}


def run(config: dict, progress: common.Progress = common.no_progress) -> dict:
    progress(total=len(ARMS) * len(config["lrs"]) * len(config["seeds"]) * config["steps"])
    inputs = {standardized: common.load_data(config, standardized=standardized) for standardized in (False, True)}
    sweep = {}
    for arm, (standardized, batchnorm) in ARMS.items():
        data = inputs[standardized]
        train_split = data.holdout(config["validation"])
        sweep[arm] = []
        for lr in config["lrs"]:
            runs = [_run(data, train_split, batchnorm, lr, seed, config, progress) for seed in config["seeds"]]
            sweep[arm].append({
                "lr": lr,
                "validation": common.summary([r["validation_mean"] for r in runs]),
                "test": common.summary([r["test_mean"] for r in runs]),
                "final_test_acc": common.summary([r["final_test_acc"] for r in runs]),
                "diverged": sum(r["diverged"] for r in runs),
                "curves": [{"steps": r["steps"], "test_acc": r["test_acc"]} for r in runs],
            })
    best = {arm: max(points, key=lambda p: p["validation"]["mean"]) for arm, points in sweep.items()}
    area = {arm: p["test"]["mean"] for arm, p in best.items()}
    effect = {"no batch norm": area["standardized, no batch norm"] - area["raw, no batch norm"],
              "batch norm": area["standardized, batch norm"] - area["raw, batch norm"]}
    best_lr = {arm: p["lr"] for arm, p in best.items()}
    at_edge = [arm for arm, lr in best_lr.items() if lr in (min(config["lrs"]), max(config["lrs"]))]
    checks = [
        common.record_verdict(
            "standardized inputs train better",
            "without batch norm, at each input scaling's best learning rate, the mean test accuracy over "
            "the run is higher on standardized inputs",
            effect["no batch norm"] > 0, why=f"{common.points(effect['no batch norm'])}, needs > 0",
            gain_from_standardizing=effect["no batch norm"], best_lr=best_lr),
        common.record_verdict(
            "scale matters less with BN",
            "at each arm's best learning rate, the gain (or loss) from standardizing is smaller in size "
            "with batch norm than without",
            abs(effect["batch norm"]) < abs(effect["no batch norm"]),
            why=f"{common.points(effect['batch norm'])} with BN vs {common.points(effect['no batch norm'])}",
            gain_from_standardizing=effect),
    ]
    result = ("at each arm's best rate, mean test accuracy over the run: " +
              ", ".join(f"{arm} {common.pct(area[arm])} (lr {best_lr[arm]:g})" for arm in ARMS))
    if at_edge:
        result += f"; best rate at the edge of the sweep for: {', '.join(at_edge)}"
    return {"numbers": {"mean_test_accuracy_at_best_lr": area, "best_lr": best_lr, "best_lr_at_edge": at_edge,
                        "gain_from_standardizing": effect, "sweep": sweep},
            "checks": checks, "held": common.verdict(checks), "result": result,
            "headline": f"std - raw: {100 * effect['no batch norm']:+.1f} vs {100 * effect['batch norm']:+.1f} BN"}


def _run(data: common.Data, train_split: common.Data, batchnorm: bool, lr: float, seed: int, config: dict,
         progress: common.Progress) -> dict:
    """One model trained on `train_split`: its mean accuracy over the run on the validation
    split (`validation_mean`) and on the test split (`test_mean`, with the curve)."""
    model = common.seeded_model(seed, lambda: common.mlp(
        data.n_features, data.n_classes, width=100, depth=3, activation="sigmoid", batchnorm=batchnorm,
        init=common.init_for(config, batchnorm)), config["device"])
    curve = {"steps": [0], "test_acc": [common.accuracy(model, data.x_test, data.y_test)]}

    def evaluate(step: int) -> None:
        if step % config["eval_every"] == 0:
            curve["steps"].append(step)
            curve["test_acc"].append(common.accuracy(model, data.x_test, data.y_test))

    trained = common.train(model, train_split, steps=config["steps"], batch_size=config["batch_size"], lr=lr,
                           momentum=config["momentum"], seed=seed, eval_every=config["eval_every"],
                           progress=progress, on_step=evaluate)
    if trained["diverged"]:  # the steps after divergence are at chance, as train() counts them
        chance = 1 / data.n_classes
        curve["test_acc"] += [chance] * (len(trained["steps"]) - len(curve["steps"]))
        curve["steps"] = trained["steps"]
    return {**curve, "test_mean": sum(curve["test_acc"]) / len(curve["test_acc"]),
            "validation_mean": sum(trained["test_acc"]) / len(trained["test_acc"]),
            "final_test_acc": curve["test_acc"][-1], "diverged": trained["diverged"]}


def plot(result: dict) -> dict:
    numbers = result["numbers"]
    fig, (sweep_ax, curve_ax) = common.figure(ncols=2, width=5.2)
    for arm, points in numbers["sweep"].items():
        style = {"linestyle": "-" if arm.startswith("standardized") else "--", "marker": "o"}
        sweep_ax.plot([p["lr"] for p in points], [p["validation"]["mean"] for p in points], label=arm, **style)
        best = next(p for p in points if p["lr"] == numbers["best_lr"][arm])
        runs = best["curves"]
        common.plot_band(curve_ax, runs[0]["steps"], [r["test_acc"] for r in runs], f"{arm} (lr {best['lr']:g})",
                         linestyle=style["linestyle"])
    common.log_axis(sweep_ax, [p["lr"] for points in numbers["sweep"].values() for p in points])
    sweep_ax.set(xlabel="learning rate", ylabel="validation: mean accuracy over the run",
                 title="Learning-rate sweep per arm", ylim=(0, 1))
    curve_ax.set(xlabel="training step", ylabel="test accuracy", title="Each arm at its best rate", ylim=(0, 1))
    sweep_ax.legend(loc="lower center", fontsize="small")
    curve_ax.legend(loc="lower right", fontsize="small")
    return {"accuracy": fig}
