"""Batch norm's regularization, and how it depends on the mini-batch size.

- The generalization gap (train minus test accuracy) across batch sizes, with and without
  batch norm: the noise of batch statistics acts as a regularizer.
- Ghost batch norm (Hoffer et al. 2017, "Train longer, generalize better"): a large batch
  normalized in small virtual batches (`virtual_batch_size=`) keeps the small-batch noise.
- Tiny batches hurt (Wu & He 2018, "Group normalization"): statistics of 2 examples are too
  noisy, and the running statistics built from them do not match the ones seen in training.
- Batch renormalization (Ioffe 2017, `renorm=bn.Renorm(...)`) corrects the batch statistics
  towards the running ones and recovers part of the loss.
"""

from __future__ import annotations

import numpy as np

from . import common

NAME = "batch-size"
CLAIM = ("Batch norm's effect depends on the batch size: tiny batches hurt, batch renormalization "
         "recovers part of it, ghost batches help large batches, and batch norm narrows the "
         "generalization gap.")
SETUP = (
    "{depth} hidden layers of {width} ReLU units, SGD momentum {momentum}, at each batch size B in "
    "{batch_sizes}, with and without batch norm. Every model sees the same number of examples, "
    "{steps} steps' worth at batch size {reference_batch} (so {steps} x {reference_batch} / B steps), "
    "with the learning rate {lr} x B / {reference_batch} (the linear scaling rule of Goyal et al. "
    "2017). Ghost batch norm (virtual batches of {ghost}) at the largest size; batch renorm (r_max "
    "{r_max}, d_max {d_max}, relaxed from 1 and 0 after {warmup_fraction} of training over the next "
    "{ramp_fraction}) at the smallest." + common.INIT_SETUP
)
FULL = {"seeds": [0, 1, 2], "steps": 600, "reference_batch": 32, "depth": 3, "width": 100, "lr": 0.05,
        "momentum": 0.9, "batch_sizes": [2, 4, 16, 64, 256], "ghost": 16, "r_max": 3.0, "d_max": 5.0,
        "warmup_fraction": 0.1, "ramp_fraction": 0.4, "inits": ["practitioner", "torch"]}
QUICK = {**FULL, "seeds": [0], "steps": 60, "batch_sizes": [2, 16, 128], "inits": ["practitioner"]}
TOLERANCE = 0.01  # "tiny batches hurt" means at least one point of test accuracy lost


def arms(config: dict) -> list[dict]:
    """Every model trained: label, batch size, batch norm or not, options of bn.BatchNorm1d."""
    smallest, largest = min(config["batch_sizes"]), max(config["batch_sizes"])
    plain = [dict(label=f"{kind} @ {b}", arm=kind, batch_size=b, batchnorm=kind == "batch norm", options={})
             for kind in ("batch norm", "no batch norm") for b in config["batch_sizes"]]
    return plain + [
        dict(label=f"ghost batch norm @ {largest}", arm="ghost batch norm", batch_size=largest, batchnorm=True,
             options={"virtual_batch_size": config["ghost"]}),
        dict(label=f"batch renorm @ {smallest}", arm="batch renorm", batch_size=smallest, batchnorm=True,
             options={"renorm": True}),
    ]


def schedule(batch_size: int, config: dict) -> tuple[int, float]:
    """(steps, learning rate) at this batch size: equal examples seen, lr scaled by B / B_ref."""
    ratio = batch_size / config["reference_batch"]
    return max(1, round(config["steps"] / ratio)), config["lr"] * ratio


def bn_options(options: dict, steps: int, config: dict) -> dict:
    """The keyword options of bn.BatchNorm1d for one arm; a fresh Renorm for each model."""
    if not options.get("renorm"):
        return options
    from batchnorm import Renorm  # batch renormalization (Ioffe 2017)

    return {"renorm": Renorm(r_max=config["r_max"], d_max=config["d_max"],
                             warmup_steps=int(config["warmup_fraction"] * steps),
                             ramp_steps=int(config["ramp_fraction"] * steps))}


def run(config: dict, progress: common.Progress = common.no_progress) -> dict:
    data = common.load_data(config)
    plan = arms(config)
    progress(total=len(config["seeds"]) * sum(schedule(arm["batch_size"], config)[0] for arm in plan))
    table = []
    for arm in plan:
        steps, lr = schedule(arm["batch_size"], config)
        runs = []
        for seed in config["seeds"]:
            model = common.seeded_model(seed, lambda: common.mlp(
                data.n_features, data.n_classes, width=config["width"], depth=config["depth"], activation="relu",
                batchnorm=arm["batchnorm"], init=common.init_for(config, arm["batchnorm"]),
                **bn_options(arm["options"], steps, config)), config["device"])
            runs.append(common.train(model, data, steps=steps, batch_size=arm["batch_size"], lr=lr,
                                     momentum=config["momentum"], seed=seed, progress=progress))
        table.append({
            "label": arm["label"], "arm": arm["arm"], "batch_size": arm["batch_size"], "steps": steps, "lr": lr,
            "train_acc": common.summary([r["final_train_acc"] for r in runs]),
            "test_acc": common.summary([r["final_test_acc"] for r in runs]),
            "gap": common.summary([r["final_train_acc"] - r["final_test_acc"] for r in runs]),
            "diverged": sum(r["diverged"] for r in runs),
        })
    checks = _checks(table, config)
    test = {row["label"]: row["test_acc"]["mean"] for row in table}
    result = "; ".join(f"{c['name']}: {'yes' if c['held'] else 'no'}" for c in checks)
    return {"numbers": {"table": table, "test_acc": test}, "checks": checks,
            "held": common.verdict(checks), "result": result,
            "headline": f"{sum(c['held'] for c in checks)} of {len(checks)} checks"}


def _checks(table: list[dict], config: dict) -> list[dict]:
    row = {r["label"]: r for r in table}
    test = lambda label: row[label]["test_acc"]["mean"]  # noqa: E731
    sizes = sorted(config["batch_sizes"])
    smallest, largest = sizes[0], sizes[-1]
    best_bn = max(test(f"batch norm @ {b}") for b in sizes[1:])
    # A run that diverged sits at chance on train and test alike: its "gap" of about 0 says
    # nothing about generalization, so the gap is compared where both arms trained.
    kinds = ("batch norm", "no batch norm")
    trained = [b for b in sizes[1:] if all(row[f"{k} @ {b}"]["diverged"] == 0 for k in kinds)]
    gaps = {k: float(np.mean([row[f"{k} @ {b}"]["gap"]["mean"] for b in trained])) if trained else float("nan")
            for k in kinds}
    return [
        common.record_verdict(
            "tiny batches hurt",
            f"batch norm at batch size {smallest} is at least {common.pct(TOLERANCE)} below its best "
            "test accuracy at the larger sizes",
            test(f"batch norm @ {smallest}") <= best_bn - TOLERANCE,
            tiny=test(f"batch norm @ {smallest}"), best_larger=best_bn),
        common.record_verdict(
            "batch renorm recovers part",
            f"batch renorm at batch size {smallest} has a higher test accuracy than batch norm there",
            test(f"batch renorm @ {smallest}") > test(f"batch norm @ {smallest}"),
            renorm=test(f"batch renorm @ {smallest}"), batchnorm=test(f"batch norm @ {smallest}")),
        common.record_verdict(
            "ghost batches help large batches",
            f"ghost batch norm (virtual batches of {config['ghost']}) at batch size {largest} has a higher "
            "test accuracy than plain batch norm there",
            test(f"ghost batch norm @ {largest}") > test(f"batch norm @ {largest}"),
            ghost=test(f"ghost batch norm @ {largest}"), batchnorm=test(f"batch norm @ {largest}")),
        common.record_verdict(
            "batch norm narrows the generalization gap",
            f"the mean generalization gap (train - test accuracy) over the batch sizes in {sizes[1:]} where "
            "no run of either arm diverged is smaller with batch norm",
            bool(trained) and gaps["batch norm"] < gaps["no batch norm"], mean_gap=gaps, batch_sizes=trained),
    ]


def plot(result: dict) -> dict:
    table = result["numbers"]["table"]
    fig, (acc_ax, gap_ax) = common.figure(ncols=2, width=5.0)
    for kind, style in (("batch norm", "-o"), ("no batch norm", "-s")):
        rows = [r for r in table if r["arm"] == kind]
        sizes = [r["batch_size"] for r in rows]
        acc_ax.plot(sizes, [r["test_acc"]["mean"] for r in rows], style, label=kind)
        gap_ax.plot(sizes, [r["gap"]["mean"] for r in rows], style, label=kind)
    for kind, marker in (("ghost batch norm", "^"), ("batch renorm", "D")):
        for r in (r for r in table if r["arm"] == kind):
            acc_ax.plot(r["batch_size"], r["test_acc"]["mean"], marker, markersize=9, label=r["label"])
            gap_ax.plot(r["batch_size"], r["gap"]["mean"], marker, markersize=9, label=r["label"])
    acc_ax.set(xlabel="batch size", ylabel="final test accuracy", title="Test accuracy")
    gap_ax.set(xlabel="batch size", ylabel="train - test accuracy", title="Generalization gap")
    for ax in (acc_ax, gap_ax):
        common.log_axis(ax, [r["batch_size"] for r in table])
    acc_ax.legend(loc="lower center", fontsize="small")
    return {"accuracy": fig}
