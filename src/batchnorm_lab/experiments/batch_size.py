"""Batch norm's regularization, and how it depends on the mini-batch size.

- The generalization gap (train minus test accuracy) across batch sizes, with and without
  batch norm: the noise of batch statistics acts as a regularizer.
- Ghost batch norm (Hoffer et al. 2017, "Train longer, generalize better"): a large batch
  normalized in small virtual batches (`virtual_batch_size=`) keeps the small-batch noise.
- Tiny batches hurt (Wu & He 2018, "Group normalization"): statistics of 2 examples are too
  noisy, and the running statistics built from them do not match the ones seen in training.
- Batch renormalization (Ioffe 2017, `renorm=bn.Renorm(...)`) corrects the batch statistics
  towards the running ones and recovers part of the loss.
- Bigger mini-batch, smaller regularization effect: batch norm's effect on the gap (the gap
  without it minus the gap with it) shrinks as the batch grows, since larger batches give
  less noisy statistics. Tested on the MLP and on a plain CNN (`convnets.plain_cnn`), as the
  sign of the least-squares slope of that effect against log2 of the batch size.
"""

from __future__ import annotations

import numpy as np

from . import common, convnets

NAME = "batch-size"
CLAIM = ("Batch norm's effect depends on the batch size: tiny batches hurt, batch renormalization "
         "recovers part of it, ghost batches help large batches, batch norm narrows the "
         "generalization gap, and the bigger the mini-batch, the smaller that regularization effect.")
SETUP = (
    "{depth} hidden layers of {width} ReLU units, SGD momentum {momentum}, at each batch size B in "
    "{batch_sizes}, with and without batch norm. Every model sees the same number of examples, "
    "{steps} steps' worth at batch size {reference_batch} (so {steps} x {reference_batch} / B steps), "
    "with the learning rate {lr} x B / {reference_batch} (the linear scaling rule of Goyal et al. "
    "2017). Ghost batch norm (virtual batches of {ghost}) at the largest size; batch renorm (r_max "
    "{r_max}, d_max {d_max}, relaxed from 1 and 0 after {warmup_fraction} of training over the next "
    "{ramp_fraction}) at the smallest. The regularization effect (gap without batch norm minus gap "
    "with it) against the batch size on this MLP and on a plain CNN of {cnn_depth} 3x3 convolutions of "
    "{cnn_channels} channels (global average pooling) at batch sizes {cnn_batch_sizes}, the same schedule "
    "from {cnn_steps} steps at batch size {reference_batch} and learning rate {cnn_lr}." + common.INIT_SETUP
)
FULL = {"seeds": [0, 1, 2], "steps": 600, "reference_batch": 32, "depth": 3, "width": 100, "lr": 0.05,
        "momentum": 0.9, "batch_sizes": [2, 4, 16, 64, 256], "ghost": 16, "r_max": 3.0, "d_max": 5.0,
        "warmup_fraction": 0.1, "ramp_fraction": 0.4, "cnn_depth": 4, "cnn_channels": 16,
        "cnn_batch_sizes": [4, 16, 64, 256], "cnn_steps": 600, "cnn_lr": 0.05, "inits": ["practitioner", "torch"]}
# One seed of a few dozen steps tells tiny batches and renorm apart (tens of points), not the
# ghost-batch, gap and slope effects, which are a point or less in the full run.
QUICK = {**FULL, "seeds": [0], "steps": 60, "batch_sizes": [2, 16, 128], "cnn_batch_sizes": [8, 64], "cnn_steps": 60,
         "inits": ["practitioner"],
         "unpowered": ["ghost batches help large batches", "batch norm narrows the generalization gap",
                       "regularization shrinks (MLP)", "regularization shrinks (CNN)"]}
TOLERANCE = 0.01  # "tiny batches hurt" means at least one point of test accuracy lost
# A generalization gap says something only about a network that fits its training set: one
# that diverged, or ended at chance without diverging (the CNN without batch norm at batch 256
# and lr 0.4 in the full run: 10.0% train, 10.1% test), has a gap of about 0 that would read
# as "no overfitting". An arm trained when no run diverged and its mean final training
# accuracy is at least TRAINED.
TRAINED = 0.5


def trained(row: dict) -> bool:
    """Whether an arm's summary (`_row`) trained (see TRAINED)."""
    return row["diverged"] == 0 and row["train_acc"]["mean"] >= TRAINED


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


def schedule(batch_size: int, config: dict, steps: int | None = None, lr: float | None = None) -> tuple[int, float]:
    """(steps, learning rate) at this batch size: equal examples seen, lr scaled by B / B_ref,
    from `steps` and `lr` at the reference batch size (the MLP's by default)."""
    ratio = batch_size / config["reference_batch"]
    steps, lr = config["steps"] if steps is None else steps, config["lr"] if lr is None else lr
    return max(1, round(steps / ratio)), lr * ratio


KINDS = ("batch norm", "no batch norm")


def _row(batch_size: int, steps: int, lr: float, runs: list[dict]) -> dict:
    """One arm at one batch size, summarized over seeds."""
    return {"batch_size": batch_size, "steps": steps, "lr": lr,
            "train_acc": common.summary([r["final_train_acc"] for r in runs]),
            "test_acc": common.summary([r["final_test_acc"] for r in runs]),
            "gap": common.summary([r["final_train_acc"] - r["final_test_acc"] for r in runs]),
            "diverged": sum(r["diverged"] for r in runs)}


def _cnn_rows(config: dict, progress: common.Progress) -> list[dict]:
    """The plain CNN with and without batch norm at each of `cnn_batch_sizes`."""
    data = common.load_data(config, per_feature=False)
    rows = []
    for kind in KINDS:
        batchnorm = kind == "batch norm"
        for b in config["cnn_batch_sizes"]:
            steps, lr = schedule(b, config, config["cnn_steps"], config["cnn_lr"])
            runs = []
            for seed in config["seeds"]:
                model = common.seeded_model(seed, lambda: convnets.plain_cnn(
                    data.sample_shape, data.n_classes, channels=config["cnn_channels"], depth=config["cnn_depth"],
                    batchnorm=batchnorm, init=common.init_for(config, batchnorm)), config["device"])
                runs.append(common.train(model, data, steps=steps, batch_size=b, lr=lr, momentum=config["momentum"],
                                         seed=seed, progress=progress))
            rows.append({"arm": kind, **_row(b, steps, lr, runs)})
    return rows


def regularization(rows: list[dict]) -> dict:
    """Batch norm's regularization effect at each batch size where both arms trained
    (`trained`): {"batch_sizes",
    "effect" (mean gap without batch norm - mean gap with it), "slope" (least squares of the
    effect against log2 of the batch size; None with fewer than two sizes)}. `rows` are
    summaries (`_row`) with an "arm" of KINDS."""
    by = {(r["arm"], r["batch_size"]): r for r in rows}
    sizes = sorted(b for (arm, b) in by if arm == KINDS[0] and (KINDS[1], b) in by
                   and trained(by[KINDS[0], b]) and trained(by[KINDS[1], b]))
    effect = [by[KINDS[1], b]["gap"]["mean"] - by[KINDS[0], b]["gap"]["mean"] for b in sizes]
    slope = float(np.polyfit(np.log2(sizes), effect, 1)[0]) if len(sizes) >= 2 else None
    return {"batch_sizes": sizes, "effect": effect, "slope": slope}


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
    cnn_steps = sum(schedule(b, config, config["cnn_steps"])[0] for b in config["cnn_batch_sizes"])
    progress(total=len(config["seeds"]) * (sum(schedule(arm["batch_size"], config)[0] for arm in plan)
                                           + len(KINDS) * cnn_steps))
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
        table.append({"label": arm["label"], "arm": arm["arm"], **_row(arm["batch_size"], steps, lr, runs)})
    cnn_table = _cnn_rows(config, progress)
    checks = _checks(table, cnn_table, config)
    test = {row["label"]: row["test_acc"]["mean"] for row in table}
    result = "; ".join(f"{c['name']}: {c['why']}" for c in checks)
    return {"numbers": {"table": table, "cnn_table": cnn_table, "test_acc": test}, "checks": checks,
            "held": common.verdict(checks), "result": result,
            "headline": f"{sum(c['held'] for c in checks)} of {len(checks)} checks"}


def _checks(table: list[dict], cnn_table: list[dict], config: dict) -> list[dict]:
    row = {r["label"]: r for r in table}
    test = lambda label: row[label]["test_acc"]["mean"]  # noqa: E731
    sizes = sorted(config["batch_sizes"])
    smallest, largest = sizes[0], sizes[-1]
    best_bn = max(test(f"batch norm @ {b}") for b in sizes[1:])
    # The gap is compared where both arms trained (see TRAINED).
    kinds = KINDS
    both = [b for b in sizes[1:] if all(trained(row[f"{k} @ {b}"]) for k in kinds)]
    gaps = {k: float(np.mean([row[f"{k} @ {b}"]["gap"]["mean"] for b in both])) if both else None
            for k in kinds}
    tiny, renorm, ghost = (test(f"batch norm @ {smallest}"), test(f"batch renorm @ {smallest}"),
                           test(f"ghost batch norm @ {largest}"))
    # The MLP's regularization effect over the same sizes as the gap check: from the second
    # smallest on, where both arms trained.
    mlp_effect = regularization([r for r in table if r["arm"] in kinds and r["batch_size"] in sizes[1:]])
    cnn_effect = regularization(cnn_table)
    return [
        common.record_verdict(
            "tiny batches hurt",
            f"batch norm at batch size {smallest} is at least {common.pct(TOLERANCE)} below its best "
            "test accuracy at the larger sizes",
            tiny <= best_bn - TOLERANCE, why=f"{common.pct(tiny)} vs best {common.pct(best_bn)}, needs "
                                            f"{common.points(-TOLERANCE)} or less",
            tiny=tiny, best_larger=best_bn),
        common.record_verdict(
            "batch renorm recovers part",
            f"batch renorm at batch size {smallest} has a higher test accuracy than batch norm there",
            renorm > tiny, why=f"{common.pct(renorm)} with renorm vs {common.pct(tiny)}", renorm=renorm, batchnorm=tiny),
        common.record_verdict(
            "ghost batches help large batches",
            f"ghost batch norm (virtual batches of {config['ghost']}) at batch size {largest} has a higher "
            "test accuracy than plain batch norm there",
            ghost > test(f"batch norm @ {largest}"),
            why=f"{common.pct(ghost)} ghost vs {common.pct(test(f'batch norm @ {largest}'))}",
            ghost=ghost, batchnorm=test(f"batch norm @ {largest}")),
        common.record_verdict(
            "batch norm narrows the generalization gap",
            f"the mean generalization gap (train - test accuracy) over the batch sizes in {sizes[1:]} where "
            f"both arms trained (no run diverged, mean final training accuracy >= {common.pct(TRAINED)}) is "
            "smaller with batch norm",
            bool(both) and gaps["batch norm"] < gaps["no batch norm"],
            why=(f"{common.pct(gaps['batch norm'])} with BN vs {common.pct(gaps['no batch norm'])}" if both
                 else "no size both trained"),
            mean_gap=gaps, batch_sizes=both),
        *(_slope_check(f"regularization shrinks ({net})", net, effect)
          for net, effect in (("MLP", mlp_effect), ("CNN", cnn_effect))),
    ]


def _slope_check(name: str, network: str, effect: dict) -> dict:
    slope = effect["slope"]
    return common.record_verdict(
        name, f"on the {network}, batch norm's regularization effect (the gap without it minus the gap with it) "
        "falls as the batch grows: the least-squares slope of the effect against log2 of the batch size, over "
        f"the sizes where both arms trained (no run diverged, mean final training accuracy >= "
        f"{common.pct(TRAINED)}), is negative",
        slope is not None and slope < 0,
        why=f"slope {common.points(slope)}/doubling, needs < 0" if slope is not None else "fewer than 2 sizes",
        **effect)


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
    return {"accuracy": fig, "regularization": _regularization_plot(result)}


def _regularization_plot(result: dict):
    """Batch norm's regularization effect against the batch size, MLP and CNN: the claim is
    that both lines fall."""
    numbers = result["numbers"]
    mlp_rows = [r for r in numbers["table"] if r["arm"] in KINDS]
    smallest = min(r["batch_size"] for r in mlp_rows)
    fig, (ax,) = common.figure()
    for net, rows in (("MLP", [r for r in mlp_rows if r["batch_size"] > smallest]), ("CNN", numbers["cnn_table"])):
        effect = regularization(rows)
        ax.plot(effect["batch_sizes"], [100 * e for e in effect["effect"]], "-o", label=net)
    ax.axhline(0, color="gray", linestyle=":")
    ax.set(xlabel="batch size", ylabel="gap without BN - gap with BN (points)",
           title="Batch norm's regularization effect")
    common.log_axis(ax, [r["batch_size"] for r in mlp_rows + numbers["cnn_table"]])
    ax.legend(loc="best")
    return fig
