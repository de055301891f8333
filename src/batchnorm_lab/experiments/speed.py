"""Batch norm makes training faster (Ioffe & Szegedy 2015, section 4.1, Figure 1a).

The paper's MNIST network: 3 fully connected hidden layers of 100 sigmoid units, mini-batches
of 60, trained with and without batch norm; test accuracy against training steps.
"""

from __future__ import annotations

from . import common

NAME = "speed"
CLAIM = "Batch norm makes training faster: the same network reaches a given test accuracy in fewer steps."
SETUP = (
    "3 hidden layers of 100 sigmoid units (Ioffe & Szegedy 2015, sec. 4.1), mini-batches of "
    "{batch_size}, SGD lr {lr} momentum {momentum}, {steps} steps, with and without batch norm; "
    "test accuracy every {eval_every} steps. Target accuracy: {target_fraction} x the better "
    "model's final mean test accuracy." + common.INIT_SETUP
)
FULL = {"seeds": [0, 1, 2], "steps": 3000, "batch_size": 60, "lr": 0.1, "momentum": 0.9,
        "eval_every": 50, "target_fraction": 0.95, "inits": ["practitioner", "torch"]}
QUICK = {**FULL, "seeds": [0], "steps": 600, "eval_every": 25, "inits": ["practitioner"]}
ARMS = {"batch norm": True, "no batch norm": False}


def run(config: dict, progress: common.Progress = common.no_progress) -> dict:
    data = common.load_data(config)
    progress(total=len(ARMS) * len(config["seeds"]) * config["steps"])
    curves = {}
    for arm, batchnorm in ARMS.items():
        curves[arm] = []
        for seed in config["seeds"]:
            model = common.seeded_model(seed, lambda: common.mlp(
                data.n_features, data.n_classes, width=100, depth=3, activation="sigmoid",
                batchnorm=batchnorm, init=common.init_for(config, batchnorm)), config["device"])
            curves[arm].append(common.train(
                model, data, steps=config["steps"], batch_size=config["batch_size"], lr=config["lr"],
                momentum=config["momentum"], seed=seed, eval_every=config["eval_every"], progress=progress))
    return compare(curves, config["target_fraction"])


def compare(curves: dict[str, list[dict]], target_fraction: float) -> dict:
    """The verdict on training curves {"batch norm": runs, "no batch norm": runs} (one
    `common.train` result per seed, with test accuracy every few steps): the target is
    `target_fraction` x the better arm's final mean test accuracy; the claim holds when the
    median over seeds of the steps to reach it is smaller with batch norm."""
    final = {arm: common.summary([c["final_test_acc"] for c in runs]) for arm, runs in curves.items()}
    target = target_fraction * max(f["mean"] for f in final.values())
    reached = {arm: [common.steps_to_target(c["steps"], c["test_acc"], target) for c in runs]
               for arm, runs in curves.items()}
    median = {arm: common.median_steps(r) for arm, r in reached.items()}
    faster = median["batch norm"] is not None and (
        median["no batch norm"] is None or median["batch norm"] < median["no batch norm"])
    checks = [common.record_verdict(
        "fewer steps to the target",
        f"median over seeds of the steps to reach {common.pct(target)} test accuracy is smaller "
        "with batch norm (a run that never reaches it counts as never)",
        faster, why=f"{common.fmt_steps(median['batch norm'])} steps with BN vs "
                    f"{common.fmt_steps(median['no batch norm'])} without",
        target=target, steps_to_target=reached, median_steps=median)]
    result = (
        f"to {common.pct(target)}: {common.fmt_steps(median['batch norm'])} steps with BN vs "
        f"{common.fmt_steps(median['no batch norm'])} without; final {common.pct(final['batch norm']['mean'])} vs "
        f"{common.pct(final['no batch norm']['mean'])}"
    )
    return {"numbers": {"final_test_acc": final, "target": target, "steps_to_target": reached,
                        "median_steps_to_target": median, "curves": curves},
            "checks": checks, "held": common.verdict(checks), "result": result,
            "headline": f"{common.fmt_steps(median['batch norm'])} vs {common.fmt_steps(median['no batch norm'])} steps"}


def plot(result: dict, title: str = "Test accuracy during training (Fig. 1a)") -> dict:
    numbers = result["numbers"]
    fig, (ax,) = common.figure()
    for arm, runs in numbers["curves"].items():
        common.plot_band(ax, runs[0]["steps"], [r["test_acc"] for r in runs],
                         f"{arm} (median {common.fmt_steps(numbers['median_steps_to_target'][arm])} steps to target)")
    ax.axhline(numbers["target"], color="gray", linestyle=":", label=f"target {common.pct(numbers['target'])}")
    ax.set(xlabel="training step", ylabel="test accuracy", title=title, ylim=(0, 1))
    ax.legend(loc="lower right")
    return {"accuracy": fig}
