"""At test time, which statistics normalize? (Wu & Johnson 2021, "Rethinking 'batch' in
batch norm", sections 3 and 4.)

A layer in evaluation mode normalizes with its running statistics, an exponentially
weighted moving average (EWMA) of training batches' statistics, which lags behind the
weights that change under it and, with a small momentum or a short run, still remembers its
initial value (mean 0, variance 1). Precise population statistics (`bn.recalibrate`: the
exact mean and variance over the training set with the final weights) remove both errors.
Normalizing each test batch by its own statistics instead depends on the test batch size,
and is undefined at size 1 for a fully connected layer (one value per channel).
"""

from __future__ import annotations

import torch

from . import common

NAME = "test-time"
CLAIM = ("Which statistics normalize at test time matters: EWMA running statistics can be off, "
         "precise population statistics fix them, and per-batch statistics degrade at small test batches.")
SETUP = (
    "{depth} hidden layers of {width} ReLU units with batch norm, mini-batches of {batch_size}, SGD lr "
    "{lr} momentum {sgd_momentum}, evaluated after {lengths} of {steps} steps with the EWMA statistics "
    "of momenta {momenta}, with precise statistics (bn.recalibrate over the training set), and with "
    "each test batch's own statistics at test batch sizes {test_batch_sizes}. The momentum of the "
    "running statistics does not change training (batch statistics are used there), so one seed "
    "gives the same weights at every momentum."
)
FULL = {"seeds": [0, 1, 2], "steps": 2000, "depth": 3, "width": 100, "batch_size": 32, "lr": 0.05,
        "sgd_momentum": 0.9, "momenta": [0.01, 0.1, 0.5], "lengths": [0.02, 0.1, 1.0],
        "test_batch_sizes": [1, 2, 4, 16, 64, 256]}
QUICK = {**FULL, "seeds": [0], "steps": 400, "test_batch_sizes": [1, 2, 8, 64]}
TOLERANCE = 0.01  # one point of test accuracy


def run(config: dict, progress: common.Progress = common.no_progress) -> dict:
    data = common.load_data(config)
    lengths = sorted({max(1, round(f * config["steps"])) for f in config["lengths"]})
    progress(total=len(config["momenta"]) * len(config["seeds"]) * lengths[-1])
    ewma = {m: {n: [] for n in lengths} for m in config["momenta"]}
    precise = {n: [] for n in lengths}
    per_batch = {b: [] for b in config["test_batch_sizes"]}
    for seed in config["seeds"]:
        for m in config["momenta"]:
            model = common.seeded_model(seed, lambda: common.mlp(
                data.n_features, data.n_classes, width=config["width"], depth=config["depth"],
                activation="relu", batchnorm=True, momentum=m), config["device"])

            def evaluate(step: int, m=m, model=model) -> None:
                if step in lengths:
                    ewma[m][step].append(common.accuracy(model, data.x_test, data.y_test))
                    if m == config["momenta"][0]:  # the weights are the same at every momentum
                        precise[step].append(recalibrated_accuracy(model, data, config["batch_size"]))

            common.train(model, data, steps=lengths[-1], batch_size=config["batch_size"], lr=config["lr"],
                         momentum=config["sgd_momentum"], seed=seed, progress=progress, on_step=evaluate)
            if m == config["momenta"][0]:
                for b in config["test_batch_sizes"]:
                    per_batch[b].append(per_batch_accuracy(model, data, b, seed))
    return _verdict(config, lengths, ewma, precise, per_batch)


def recalibrated_accuracy(model, data: common.Data, batch_size: int) -> float:
    """Test accuracy of a copy of `model` with precise population statistics."""
    from batchnorm.tools import recalibrate

    batches = [data.x[i : i + batch_size] for i in range(0, len(data.x), batch_size)]
    calibrated, _ = recalibrate(model, batches, inplace=False, progress=False)
    return common.accuracy(calibrated, data.x_test, data.y_test)


@torch.no_grad()
def per_batch_accuracy(model, data: common.Data, batch_size: int, seed: int) -> float | None:
    """Test accuracy when each (shuffled) test batch is normalized by its own statistics.

    The running statistics are left untouched (`frozen_stats`). None when a batch of this
    size has one value per channel, where batch statistics are undefined (the last,
    incomplete batch is dropped for the same reason).
    """
    from batchnorm.tools import frozen_stats

    if batch_size < 2:
        return None
    order = torch.randperm(len(data.x_test), generator=torch.Generator().manual_seed(seed))
    correct = total = 0
    with frozen_stats(model):
        model.train()  # batch statistics normalize; frozen_stats keeps the running ones unchanged
        for start in range(0, len(order) - batch_size + 1, batch_size):
            index = order[start : start + batch_size].to(data.x_test.device)
            correct += (model(data.x_test[index]).argmax(dim=1) == data.y_test[index]).sum().item()
            total += batch_size
    model.eval()
    return correct / total


def _verdict(config, lengths, ewma, precise, per_batch) -> dict:
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    table = [{"momentum": m, "steps": n, "ewma": common.summary(ewma[m][n]), "precise": common.summary(precise[n])}
             for m in config["momenta"] for n in lengths]
    deficit = [row["precise"]["mean"] - row["ewma"]["mean"] for row in table]
    batch_acc = {b: (common.summary(v) if None not in v else None) for b, v in per_batch.items()}
    final_precise = mean(precise[lengths[-1]])
    small = min(b for b, s in batch_acc.items() if s is not None)
    checks = [
        common.record_verdict(
            "precise statistics never worse", f"at every momentum and training length, precise statistics "
            f"are at most {common.pct(TOLERANCE)} below the EWMA ones",
            min(deficit) >= -TOLERANCE, why=f"worst {common.points(min(deficit))}, needs >= "
                                            f"{common.points(-TOLERANCE)}", worst=min(deficit)),
        common.record_verdict(
            "EWMA statistics can be off", f"in some setting the EWMA statistics are at least "
            f"{common.pct(TOLERANCE)} below precise statistics",
            max(deficit) >= TOLERANCE, why=f"largest {common.points(max(deficit))}, needs >= "
                                           f"{common.points(TOLERANCE)}", largest_loss=max(deficit)),
        common.record_verdict(
            "small test batches hurt", f"per-batch statistics at test batch size {small} are at least "
            f"{common.pct(TOLERANCE)} below precise statistics (after all {lengths[-1]} steps)",
            batch_acc[small]["mean"] <= final_precise - TOLERANCE,
            why=f"{common.pct(batch_acc[small]['mean'])} vs precise {common.pct(final_precise)}",
            per_batch=batch_acc[small]["mean"], precise=final_precise),
    ]
    worst = table[deficit.index(max(deficit))]
    result = (f"EWMA worst at momentum {worst['momentum']} after {worst['steps']} steps: "
              f"{common.pct(worst['ewma']['mean'])} vs precise {common.pct(worst['precise']['mean'])}; "
              f"per-batch at size {small}: {common.pct(batch_acc[small]['mean'])} vs precise "
              f"{common.pct(final_precise)}")
    return {"numbers": {"table": table, "per_batch": {str(b): s for b, s in batch_acc.items()},
                        "final_precise": final_precise},
            "checks": checks, "held": common.verdict(checks), "result": result,
            "headline": f"EWMA {common.pct(worst['ewma']['mean'])} vs precise {common.pct(worst['precise']['mean'])}"}


def plot(result: dict) -> dict:
    numbers = result["numbers"]
    fig, (ewma_ax, batch_ax) = common.figure(ncols=2, width=5.0)
    momenta = sorted({row["momentum"] for row in numbers["table"]})
    for m in momenta:
        rows = [r for r in numbers["table"] if r["momentum"] == m]
        ewma_ax.plot([r["steps"] for r in rows], [r["ewma"]["mean"] for r in rows], "-o", label=f"EWMA, momentum {m}")
    rows = [r for r in numbers["table"] if r["momentum"] == momenta[0]]
    ewma_ax.plot([r["steps"] for r in rows], [r["precise"]["mean"] for r in rows], "k--", label="precise (recalibrate)")
    common.log_axis(ewma_ax, [r["steps"] for r in rows])
    ewma_ax.set(xlabel="training steps", ylabel="test accuracy", title="Running vs precise statistics")
    ewma_ax.legend(loc="lower right", fontsize="small")
    sizes = [int(b) for b, s in numbers["per_batch"].items() if s is not None]
    batch_ax.plot(sizes, [numbers["per_batch"][str(b)]["mean"] for b in sizes], "-o", label="per-batch statistics")
    batch_ax.axhline(numbers["final_precise"], color="k", linestyle="--", label="precise (recalibrate)")
    common.log_axis(batch_ax, sizes)
    batch_ax.set(xlabel="test batch size", ylabel="test accuracy", title="Per-batch statistics (size 1: undefined)")
    batch_ax.legend(loc="lower right", fontsize="small")
    return {"statistics": fig}
