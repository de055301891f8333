"""Batch norm tolerates much larger learning rates (Bjorck et al. 2018, "Understanding batch
normalization"): a sweep over SGD learning rates for a deeper ReLU network, with and without
batch norm; per rate, the final test accuracy or divergence (a non-finite loss).
"""

from __future__ import annotations

from . import common

NAME = "learning-rate"
CLAIM = "Batch norm lets a deep network train at much larger learning rates than without it."
SETUP = (
    "{depth} hidden layers of {width} ReLU units, plain SGD (momentum {momentum}), mini-batches of "
    "{batch_size}, {steps} steps at each learning rate in {lrs}, with and without batch norm. A rate "
    "'trains' when no seed diverges and the mean final test accuracy is at least {good_fraction} x "
    "the best mean accuracy of the whole sweep." + common.INIT_SETUP
)
FULL = {"seeds": [0, 1, 2], "steps": 1500, "depth": 6, "width": 100, "batch_size": 60, "momentum": 0.0,
        "lrs": [0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0], "good_fraction": 0.9,
        "inits": ["practitioner", "torch"]}
QUICK = {**FULL, "seeds": [0], "steps": 300, "lrs": [0.01, 0.1, 1.0, 10.0], "inits": ["practitioner"]}
ARMS = {"batch norm": True, "no batch norm": False}


def run(config: dict, progress: common.Progress = common.no_progress) -> dict:
    data = common.load_data(config)

    def build(batchnorm: bool):
        return common.mlp(data.n_features, data.n_classes, width=config["width"], depth=config["depth"],
                          activation="relu", batchnorm=batchnorm, init=common.init_for(config, batchnorm))

    return compare(sweep(build, data, config, progress), config["good_fraction"])


def sweep(build, data: common.Data, config: dict, progress: common.Progress) -> dict:
    """Train `build(batchnorm)` with and without batch norm at every rate of `config["lrs"]`,
    every seed, `config["steps"]` steps: {arm: [{"lr", "test_acc" (summary over seeds),
    "diverged" (how many seeds)}, ...]}."""
    progress(total=len(ARMS) * len(config["lrs"]) * len(config["seeds"]) * config["steps"])
    points = {}
    for arm, batchnorm in ARMS.items():
        points[arm] = []
        for lr in config["lrs"]:
            runs = []
            for seed in config["seeds"]:
                model = common.seeded_model(seed, lambda: build(batchnorm), config["device"])
                runs.append(common.train(model, data, steps=config["steps"], batch_size=config["batch_size"],
                                         lr=lr, momentum=config["momentum"], seed=seed, progress=progress))
            points[arm].append({
                "lr": lr,
                "test_acc": common.summary([r["final_test_acc"] for r in runs]),
                "diverged": sum(r["diverged"] for r in runs),
            })
    return points


def compare(points: dict, good_fraction: float) -> dict:
    """The verdict on a sweep (see `sweep`): a rate trains when no seed diverged and the mean
    final test accuracy is at least `good_fraction` x the sweep's best; the claim holds when
    the largest rate that trains is larger with batch norm."""
    best = max(point["test_acc"]["mean"] for arm_points in points.values() for point in arm_points)
    bar = good_fraction * best
    largest = {arm: max((p["lr"] for p in arm_points if not p["diverged"] and p["test_acc"]["mean"] >= bar),
                        default=None) for arm, arm_points in points.items()}
    held = largest["batch norm"] is not None and (
        largest["no batch norm"] is None or largest["batch norm"] > largest["no batch norm"])
    checks = [common.record_verdict(
        "larger rates train",
        f"the largest learning rate that trains (no divergence, mean accuracy >= {common.pct(bar)}) "
        "is larger with batch norm",
        held, why=f"lr {common.fmt_rate(largest['batch norm'])} with BN vs "
                  f"{common.fmt_rate(largest['no batch norm'])} without",
        bar=bar, largest_rate_that_trains=largest)]
    result = (f"largest rate that trains: {common.fmt_rate(largest['batch norm'])} with BN vs "
              f"{common.fmt_rate(largest['no batch norm'])} without")
    return {"numbers": {"sweep": points, "bar": bar, "largest_rate_that_trains": largest},
            "checks": checks, "held": held, "result": result,
            "headline": f"lr {common.fmt_rate(largest['batch norm'])} vs {common.fmt_rate(largest['no batch norm'])}"}


def plot(result: dict, title: str = "Learning-rate sweep (x: a seed diverged)") -> dict:
    numbers = result["numbers"]
    fig, (ax,) = common.figure()
    for arm, points in numbers["sweep"].items():
        lrs = [p["lr"] for p in points]
        means = [p["test_acc"]["mean"] for p in points]
        (line,) = ax.plot(lrs, means, marker="o", label=arm)
        diverged = [(p["lr"], p["test_acc"]["mean"]) for p in points if p["diverged"]]
        if diverged:
            ax.scatter(*zip(*diverged), marker="x", s=90, color=line.get_color(), zorder=3)
    ax.axhline(numbers["bar"], color="gray", linestyle=":", label=f"'trains' bar {common.pct(numbers['bar'])}")
    common.log_axis(ax, [p["lr"] for points in numbers["sweep"].values() for p in points])
    ax.set(xlabel="learning rate", ylabel="final test accuracy (mean over seeds)",
           title=title, ylim=(0, 1))
    ax.legend(loc="best")
    return {"sweep": fig}
