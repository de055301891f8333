"""Batch norm lets a deep plain CNN train (Ioffe & Szegedy 2015, section 1; He et al. 2016
train their 20- to 56-layer plain networks with it).

Plain convolutional networks (no shortcuts, `convnets.plain_cnn`) of increasing depth on
scikit-learn's 8 x 8 digits, with and without batch norm. The question is whether the
network trains at all, so the measure is the final *training* accuracy, and each network
gets its best learning rate from a small sweep (the best by that same measure: a
network's best effort at fitting its training set). Test accuracy at that rate is
reported beside it. Without batch norm the weights start from He initialization, which is
what lets plain ReLU networks of a few dozen layers train at all (He et al. 2015); torch's
default initialization is rerun and reported beside it in the full configuration.
"""

from __future__ import annotations

from . import common, convnets

NAME = "cnn-depth"
CLAIM = ("A deep plain CNN without batch norm trains poorly or not at all where the same network with "
         "batch norm trains.")
SETUP = (
    "Plain CNNs of {depths} 3x3 convolutions of {channels} channels on 8 x 8 digits (global average pooling, "
    "a linear classifier), with and without BatchNorm2d + ReLU after each convolution, SGD momentum "
    "{momentum}, mini-batches of {batch_size}, {steps} steps at each learning rate in {lrs}; each network "
    "at the rate with its highest mean final training accuracy over seeds. At the deepest, batch norm "
    "'trains' when that accuracy is at least {trains_bar}, and the network without it trains poorly when "
    "its accuracy is at least {gap} below." + common.INIT_SETUP
)
FULL = {"seeds": [0, 1, 2], "steps": 400, "depths": [4, 10, 20], "channels": 16, "batch_size": 32,
        "momentum": 0.9, "lrs": [0.01, 0.03, 0.1], "trains_bar": 0.9, "gap": 0.1,
        "inits": ["practitioner", "torch"]}
# The quick run shows the gap, not the bar: 150 steps leave even the network with batch norm
# short of 90% training accuracy at depth 12 (78% in the demo), and at the full length one
# seed of three stays short at depth 20 (86%), so one seed cannot judge the bar.
QUICK = {**FULL, "seeds": [0], "steps": 150, "depths": [12], "lrs": [0.03], "inits": ["practitioner"],
         "unpowered": ["trains with batch norm"]}
ARMS = {"batch norm": True, "no batch norm": False}


def run(config: dict, progress: common.Progress = common.no_progress) -> dict:
    data = common.load_data(config, per_feature=False)
    progress(total=len(ARMS) * len(config["depths"]) * len(config["lrs"]) * len(config["seeds"]) * config["steps"])
    table = {arm: [] for arm in ARMS}
    for arm, batchnorm in ARMS.items():
        for depth in config["depths"]:
            sweep = []
            for lr in config["lrs"]:
                runs = []
                for seed in config["seeds"]:
                    model = common.seeded_model(seed, lambda: convnets.plain_cnn(
                        data.sample_shape, data.n_classes, channels=config["channels"], depth=depth,
                        batchnorm=batchnorm, init=common.init_for(config, batchnorm)), config["device"])
                    runs.append(common.train(model, data, steps=config["steps"], batch_size=config["batch_size"],
                                             lr=lr, momentum=config["momentum"], seed=seed, progress=progress))
                sweep.append({"lr": lr, "train_acc": common.summary([r["final_train_acc"] for r in runs]),
                              "test_acc": common.summary([r["final_test_acc"] for r in runs]),
                              "diverged": sum(r["diverged"] for r in runs)})
            best = max(sweep, key=lambda p: p["train_acc"]["mean"])
            table[arm].append({"depth": depth, "best_lr": best["lr"], "train_acc": best["train_acc"],
                               "test_acc": best["test_acc"], "sweep": sweep})
    deepest = {arm: rows[-1] for arm, rows in table.items()}
    bn_acc, plain_acc = (deepest[arm]["train_acc"]["mean"] for arm in ARMS)
    depth = max(config["depths"])
    checks = [
        common.record_verdict(
            "trains with batch norm",
            f"at depth {depth}, the network with batch norm reaches a mean final training accuracy of at least "
            f"{common.pct(config['trains_bar'])} (at its best rate)",
            bn_acc >= config["trains_bar"], why=f"train {common.pct(bn_acc)}, needs >= {common.pct(config['trains_bar'])}",
            train_acc=bn_acc, best_lr=deepest["batch norm"]["best_lr"]),
        common.record_verdict(
            "trains poorly without",
            f"at depth {depth}, the network without batch norm ends at least {common.pct(config['gap'])} below it "
            "in mean final training accuracy (each at its best rate)",
            plain_acc <= bn_acc - config["gap"],
            why=f"{common.points(plain_acc - bn_acc)} without BN, needs <= {common.points(-config['gap'])}",
            train_acc={"batch norm": bn_acc, "no batch norm": plain_acc},
            best_lr={arm: row["best_lr"] for arm, row in deepest.items()}),
    ]
    result = "; ".join(
        f"depth {row['depth']}: train {common.pct(row['train_acc']['mean'])} with BN vs "
        f"{common.pct(other['train_acc']['mean'])} without (test {common.pct(row['test_acc']['mean'])} vs "
        f"{common.pct(other['test_acc']['mean'])})"
        for row, other in zip(table["batch norm"], table["no batch norm"]))
    return {"numbers": {"table": table, "deepest": depth}, "checks": checks, "held": common.verdict(checks),
            "result": result,
            "headline": f"depth {depth}: train {common.pct(bn_acc)} vs {common.pct(plain_acc)}"}


def plot(result: dict) -> dict:
    table = result["numbers"]["table"]
    fig, (train_ax, test_ax) = common.figure(ncols=2, width=5.0)
    for arm, rows in table.items():
        depths = [r["depth"] for r in rows]
        for ax, key in ((train_ax, "train_acc"), (test_ax, "test_acc")):
            ax.errorbar(depths, [r[key]["mean"] for r in rows], yerr=[r[key]["std"] for r in rows], marker="o",
                        capsize=3, label=arm)
    for ax, what in ((train_ax, "training"), (test_ax, "test")):
        ax.set(xlabel="convolutional layers", ylabel=f"final {what} accuracy (best rate)", ylim=(0, 1.02),
               title=f"Plain CNN on digits: {what} accuracy")
        ax.set_xticks(sorted({r["depth"] for rows in table.values() for r in rows}))
        ax.legend(loc="lower left")
    return {"depth": fig}
