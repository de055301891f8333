"""Before or after the activation? The question people ask most about where batch norm goes.

Ioffe & Szegedy (2015, section 3.2) put batch norm before the nonlinearity, on `W u`: its
distribution is "more likely to have a symmetric, non-sparse distribution, that is 'more
Gaussian'" than a ReLU's output. Many practitioners put it after the ReLU and report no
loss. The same plain CNN (`convnets.normed_cnn`) on digits with batch norm before every
ReLU (conv -> BN -> ReLU, the ReLU fused into our layer) and after it (conv + bias -> ReLU ->
BN), the same seeds, batches and learning rate. The claim tested is the paper's placement:
before is at least as accurate and at least as fast in steps. The time per training step
is reported beside it (evaluations included, the same for both; before the ReLU our layer
fuses it, after it the ReLU is a separate op), not judged: the machine is shared.

The CNN variants are built here (`normed_cnn(position=...)`), since `bn.insert` places batch
norm before the activation only.
"""

from __future__ import annotations

import time

from . import common, convnets

NAME = "bn-position"
CLAIM = ("Batch norm before the ReLU, where Ioffe & Szegedy put it, trains a CNN at least as well as "
         "after the ReLU: as accurate, in as few steps.")
SETUP = (
    "A plain CNN of {depth} 3x3 convolutions of {channels} channels on 8 x 8 digits (global average pooling, "
    "a linear classifier) with batch norm before every ReLU and, separately, after it; SGD lr {lr} momentum "
    "{momentum}, mini-batches of {batch_size}, {steps} steps, test accuracy every {eval_every} steps. 'As "
    "accurate': the mean final test accuracy before is at most {tolerance} below after. 'As fast': the median "
    "over seeds of the steps to {target_fraction} x the better arm's final accuracy is at most after's."
)
FULL = {"seeds": [0, 1, 2], "steps": 600, "depth": 8, "channels": 16, "batch_size": 32, "lr": 0.03,
        "momentum": 0.9, "eval_every": 25, "target_fraction": 0.95, "tolerance": 0.01}
QUICK = {**FULL, "seeds": [0], "steps": 200}
ARMS = ("before", "after")


def run(config: dict, progress: common.Progress = common.no_progress) -> dict:
    data = common.load_data(config, per_feature=False)
    progress(total=len(ARMS) * len(config["seeds"]) * config["steps"])
    curves, step_ms = {}, {}
    for position in ARMS:
        curves[position], seconds = [], []
        for seed in config["seeds"]:
            model = common.seeded_model(seed, lambda: convnets.normed_cnn(
                data.sample_shape, data.n_classes, channels=config["channels"], depth=config["depth"], norm="batch",
                position=position), config["device"])
            start = time.perf_counter()
            curves[position].append(common.train(
                model, data, steps=config["steps"], batch_size=config["batch_size"], lr=config["lr"],
                momentum=config["momentum"], seed=seed, eval_every=config["eval_every"], progress=progress))
            seconds.append(time.perf_counter() - start)
        step_ms[position] = common.summary([1e3 * s / config["steps"] for s in seconds])
    final = {arm: common.summary([c["final_test_acc"] for c in runs]) for arm, runs in curves.items()}
    target = config["target_fraction"] * max(f["mean"] for f in final.values())
    median = {arm: common.median_steps([common.steps_to_target(c["steps"], c["test_acc"], target) for c in runs])
              for arm, runs in curves.items()}
    difference = final["before"]["mean"] - final["after"]["mean"]
    as_fast = median["before"] is not None and (median["after"] is None or median["before"] <= median["after"])
    checks = [
        common.record_verdict(
            "as accurate before", f"mean final test accuracy with batch norm before the ReLU is at most "
            f"{common.pct(config['tolerance'])} below after it", difference >= -config["tolerance"],
            why=f"before - after {common.points(difference)}, needs >= {common.points(-config['tolerance'])}",
            final_test_acc={arm: f["mean"] for arm, f in final.items()}),
        common.record_verdict(
            "as fast before", f"median steps to {common.pct(target)} test accuracy with batch norm before the "
            "ReLU at most after's (never counts as never)", as_fast,
            why=f"{common.fmt_steps(median['before'])} steps before vs {common.fmt_steps(median['after'])} after",
            target=target, median_steps=median),
    ]
    result = (f"final {common.pct(final['before']['mean'])} before vs {common.pct(final['after']['mean'])} after the "
              f"ReLU; to {common.pct(target)}: {common.fmt_steps(median['before'])} vs "
              f"{common.fmt_steps(median['after'])} steps; {step_ms['before']['mean']:.1f} vs "
              f"{step_ms['after']['mean']:.1f} ms a step")
    return {"numbers": {"final_test_acc": final, "target": target, "median_steps": median, "step_ms": step_ms,
                        "curves": curves},
            "checks": checks, "held": common.verdict(checks), "result": result,
            "headline": f"{common.pct(final['before']['mean'])} vs {common.pct(final['after']['mean'])}, "
                        f"{common.fmt_steps(median['before'])} vs {common.fmt_steps(median['after'])} steps"}


def plot(result: dict) -> dict:
    numbers = result["numbers"]
    fig, (curve_ax, time_ax) = common.figure(ncols=2, width=5.0)
    for arm, runs in numbers["curves"].items():
        common.plot_band(curve_ax, runs[0]["steps"], [r["test_acc"] for r in runs], f"BN {arm} ReLU")
    curve_ax.axhline(numbers["target"], color="gray", linestyle=":", label=f"target {common.pct(numbers['target'])}")
    curve_ax.set(xlabel="training step", ylabel="test accuracy", ylim=(0, 1), title="Test accuracy (band: seeds)")
    curve_ax.legend(loc="lower right")
    arms = list(numbers["step_ms"])
    time_ax.bar(arms, [numbers["step_ms"][a]["mean"] for a in arms], yerr=[numbers["step_ms"][a]["std"] for a in arms],
                capsize=4)
    time_ax.set(xlabel="batch norm relative to the ReLU", ylabel="ms per training step",
                title="Time per step (shared machine)")
    return {"position": fig}
