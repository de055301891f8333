"""Our batch norm against torch's in real training: the same accuracy in less time.

The ResNet of the cnn-learning-rate experiment (`convnets.resnet`), wide and with batches
large enough that every batch-norm layer's input has twice the 2^18 elements from which
`auto` leaves torch's kernel for ours (`numba_cpu.CROSSOVER_NUMEL`). Two arms, the same network
from the same initial tensors: torch's `nn.BatchNorm2d` followed by a separate ReLU and
residual add, and ours after `bn.convert(model, fuse=True)`, with the ReLU and the add
fused into the kernels. Both arms train on the same batches and are timed in alternation,
one step each, the order swapped every step, so a change in the machine's load hits both
alike. Only training steps are timed (forward, backward, SGD update); the evaluations are
not, nor a first untimed step of a copy of each model (`warm_up`) that compiles the kernels. Which backend ran is recorded from `bn.backends.resolve` on each layer's input.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch

from batchnorm import backends

from . import common, convnets

NAME = "cnn-wallclock"
CLAIM = ("Our batch norm trains a CNN to the same accuracy as torch's, along the same curve, in less "
         "wall-clock time.")
SETUP = (
    "A ResNet of {blocks} basic blocks of {channels} channels on 8 x 8 digits, mini-batches of {batch_size} "
    "(every batch-norm input {channels} x 64 x {batch_size} elements), SGD lr {lr} momentum {momentum}, "
    "{steps} steps, test accuracy every {eval_every} steps; torch's BatchNorm2d + ReLU + add against ours "
    "(bn.convert(fuse=True)), same initial tensors and batches, {threads} torch and numba thread(s), the two "
    "arms' steps timed in alternation. Same curve: the first step's losses agree to a relative {loss_rtol} "
    "and the mean final test accuracies to {tolerance}. Less time: the median over seeds of torch's training "
    "time over ours is above 1. Time to {target_fraction} x the better final mean accuracy is reported; the "
    "batch-norm part alone is timed by the kernel benchmark ({layer_repeats} rounds)."
)
# One thread, as the other experiments (`threads`, set with `batchnorm run --threads`): on
# this 2-core machine shared with other jobs, 2 threads made every step several times slower
# for both arms, a measure of the contention and not of the kernels (docs/performance.md,
# "Costs around the kernels"). On idle cores, `--threads 2` is the realistic setting.
# Batches of 256: every layer's input has 2^19 elements, twice the crossover, where `auto`
# switches to our kernels because there they stop being slower (at the crossover itself the
# two are about equal, by construction).
FULL = {"seeds": [0, 1, 2], "steps": 300, "blocks": 2, "channels": 32, "batch_size": 256, "lr": 0.1,
        "momentum": 0.9, "eval_every": 20, "target_fraction": 0.95, "tolerance": 0.01, "loss_rtol": 1e-4,
        "layer_repeats": 30, "threads": 1}
# 20 steps on a shared machine time the load more than the layers: the full run's margin is
# inside the spread between its seeds (docs/results.md, cnn-wallclock).
QUICK = {**FULL, "seeds": [0], "steps": 20, "eval_every": 10, "layer_repeats": 10, "unpowered": ["less time"]}
ARMS = ("ours", "torch")


def run(config: dict, progress: common.Progress = common.no_progress) -> dict:
    data = common.load_data(config, per_feature=False)
    progress(total=len(ARMS) * len(config["seeds"]) * config["steps"])
    runs = {arm: [] for arm in ARMS}
    ran: dict[str, dict] = {}
    for seed in config["seeds"]:
        models = {arm: common.seeded_model(seed, lambda arm=arm: convnets.resnet(
            data.sample_shape, data.n_classes, channels=config["channels"], blocks=config["blocks"],
            batchnorm=True, layer=arm), config["device"]) for arm in ARMS}
        same_start = all(torch.equal(a, b) for a, b in zip(models["ours"].state_dict().values(),
                                                            models["torch"].state_dict().values()))
        stop_watching = watch_backends(models["ours"])
        for arm, result in lockstep(models, data, config, seed, progress).items():
            runs[arm].append({**result, "same_initial_tensors": same_start})
        ran = stop_watching()  # the same layers and shapes at every seed
    return compare(runs, ran, layer_times(config), config)


def watch_backends(model: torch.nn.Module):
    """Hooks on `model`'s batch-norm layers that note, at the first training call, the
    backend `bn.backends.resolve` picks for each layer's input and the input's size.
    Returns a function that removes the hooks and gives {layer name: {"backend", "numel"}}."""
    seen: dict[str, dict] = {}
    handles = []
    layers = convnets.batchnorm_layers(model)
    for name, layer in model.named_modules():
        if any(layer is bn for bn in layers):
            def note(module, args, name=name):
                if module.training and name not in seen:
                    seen[name] = {"backend": backends.resolve(getattr(module, "backend", "auto"), args[0]).backend.name,
                                  "numel": args[0].numel()}
            handles.append(layer.register_forward_pre_hook(note))

    def done() -> dict[str, dict]:
        for handle in handles:
            handle.remove()
        return seen

    return done


def lockstep(models: dict, data: common.Data, config: dict, seed: int, progress: common.Progress) -> dict:
    """Train every model of {arm: model} on the same batches, one step each in turn (the
    order reversed every step), timing each step. Per arm: the test-accuracy curve
    ("steps", "test_acc"), "seconds" (training time up to each evaluation), "step_ms"
    (every step's time), "first_loss" and the final numbers of `common.Trainer.final`."""
    trainers = {arm: common.Trainer(model, data, batch_size=config["batch_size"], lr=config["lr"], seed=seed,
                                    momentum=config["momentum"])
                for arm, model in models.items()}
    out = {arm: {"steps": [], "test_acc": [], "seconds": [], "step_ms": []} for arm in models}
    warm_up(models, data, config["batch_size"])
    order = list(models)
    for step in range(config["steps"] + 1):
        if step % config["eval_every"] == 0 or step == config["steps"]:
            for arm, trainer in trainers.items():
                out[arm]["steps"].append(step)
                out[arm]["test_acc"].append(trainer.test_accuracy())
                out[arm]["seconds"].append(sum(out[arm]["step_ms"]) / 1000)
        if step == config["steps"]:
            break
        for arm in order:
            start = time.perf_counter()
            trainers[arm].step()
            out[arm]["step_ms"].append(1000 * (time.perf_counter() - start))
            progress(1)
        order.reverse()
    for arm, trainer in trainers.items():
        out[arm]["first_loss"] = trainer.losses[0] if trainer.losses else None
        out[arm].update(trainer.final())
    return out


def warm_up(models: dict, data: common.Data, batch_size: int) -> None:
    """One untimed forward + backward of a copy of each model on a batch of the run's size,
    so that no timed step includes compiling a kernel (numba compiles on first use when its
    on-disk cache is cold, seconds); the models themselves are left untouched."""
    x, y = data.x[:batch_size], data.y[:batch_size]
    for model in models.values():
        twin = copy.deepcopy(model).train()
        torch.nn.functional.cross_entropy(twin(x), y).backward()


def compile_kernels(config: dict) -> None:
    """One forward + backward of our arm's network, on a random batch of the run's shape, on
    the run's thread count (the kernels follow it: the serial ones on one thread): numba
    compiles the kernels this experiment runs (seconds each on a cold cache) into its
    on-disk cache. The command line runs it in a process of its own from the start of a plan
    in which other experiments come first (`commands.compile_ahead`), on the core their
    single-threaded training leaves idle; `warm_up` then loads the kernels."""
    if config["device"] != "cpu" or "numba" not in backends.available():
        return
    torch.set_num_threads(config["threads"])
    model = convnets.resnet((8, 8), 10, channels=config["channels"], blocks=config["blocks"], batchnorm=True)
    model(torch.randn(config["batch_size"], 8 * 8)).sum().backward()  # digits come flattened


def layer_times(config: dict) -> dict:
    """Forward + backward milliseconds of the network's batch-norm part alone, ours against
    torch's, on the shape the layers see in training ((batch, channels, 8, 8)), timed by
    the kernel benchmark (`timing.bench_row`, interleaved, medians): per kind of layer ("relu":
    BN + ReLU; "residual+relu": BN + add + ReLU), and "per_step" summed over the network's
    layers (the stem and each block's first: BN + ReLU; each block's second: BN + add + ReLU)."""
    from ..timing import bench_row

    shape = (config["batch_size"], config["channels"], 8, 8)
    count = {"relu": 1 + config["blocks"], "residual+relu": config["blocks"]}
    rows = {variant: bench_row(shape, "contiguous", "train_fb", variant, config["device"], config["layer_repeats"],
                               False) for variant in count}
    per_step = {arm: sum(n * rows[v][f"{arm}_ms"] for v, n in count.items()) for arm in ARMS}
    return {"per_layer_ms": {v: {arm: rows[v][f"{arm}_ms"] for arm in ARMS} for v in count},
            "backend": {v: rows[v]["backend"] for v in count}, "per_step_ms": per_step}


def compare(runs: dict, ran: dict, layers: dict, config: dict) -> dict:
    """The verdict on {arm: [lockstep result per seed]}, the backends that ran and the
    batch-norm part's own times (`layer_times`)."""
    final = {arm: common.summary([r["final_test_acc"] for r in rs]) for arm, rs in runs.items()}
    target = config["target_fraction"] * max(f["mean"] for f in final.values())
    to_target = {arm: [_seconds_to(r, target) for r in rs] for arm, rs in runs.items()}
    median_time = {arm: common.median_steps(t) for arm, t in to_target.items()}
    total = {arm: common.summary([r["seconds"][-1] for r in rs]) for arm, rs in runs.items()}
    step_ms = {arm: float(np.median([ms for r in rs for ms in r["step_ms"]])) for arm, rs in runs.items()}
    loss_gap = max(abs(a["first_loss"] - b["first_loss"]) / abs(b["first_loss"])
                   for a, b in zip(runs["ours"], runs["torch"]))
    acc_gap = abs(final["ours"]["mean"] - final["torch"]["mean"])
    curve_gap = max(max(abs(x - y) for x, y in zip(a["test_acc"], b["test_acc"]))
                    for a, b in zip(runs["ours"], runs["torch"]))
    fast = bool(ran) and all(v["backend"] == "numba" for v in ran.values())
    per_run = [b["seconds"][-1] / a["seconds"][-1] for a, b in zip(runs["ours"], runs["torch"])]
    speedup = float(np.median(per_run))
    checks = [
        common.record_verdict(
            "our kernels ran", "every batch-norm layer of ours resolved to the numba backend (the fast path) "
            "on its training input", fast,
            why=f"{sum(v['backend'] == 'numba' for v in ran.values())} of {len(ran)} layers on numba", backends=ran),
        common.record_verdict(
            "same curve", f"both arms start from the same tensors, the first step's losses agree to a relative "
            f"{config['loss_rtol']:g}, and the mean final test accuracies to {common.pct(config['tolerance'])}",
            loss_gap <= config["loss_rtol"] and acc_gap <= config["tolerance"] and
            all(r["same_initial_tensors"] for r in runs["ours"]),
            why=f"first loss {loss_gap:.1e} apart, final {common.points(acc_gap)}",
            first_loss_relative_gap=loss_gap, final_test_acc={a: f["mean"] for a, f in final.items()},
            largest_gap_on_the_curve=curve_gap),
        # The curves are the same (the check above), so the time to any accuracy differs as the
        # time per step does; judging the whole run's time, not the time to one target, keeps
        # the verdict off the evaluation grid (a curve crossing the target one evaluation
        # later on one arm would otherwise decide it).
        common.record_verdict(
            "less time", "the median over seeds of the ratio torch's training time / ours over the same "
            f"{config['steps']} steps is above 1",
            speedup > 1, why=f"torch / ours {speedup:.3f}, needs > 1", time_ratio_per_seed=per_run, training_seconds={a: t["mean"] for a, t in total.items()},
            seconds_to_target=to_target),
    ]
    fmt = lambda s: "never" if s is None else f"{s:.1f} s"  # noqa: E731
    bn_ms = layers["per_step_ms"]
    result = (f"training time {total['ours']['mean']:.1f} s with ours vs {total['torch']['mean']:.1f} s with torch's "
              f"({speedup:.2f}x; median step {step_ms['ours']:.0f} vs {step_ms['torch']:.0f} ms); to "
              f"{common.pct(target)}: {fmt(median_time['ours'])} vs {fmt(median_time['torch'])}; final "
              f"{common.pct(final['ours']['mean'])} vs {common.pct(final['torch']['mean'])}; the batch-norm part "
              f"alone {bn_ms['ours']:.1f} vs {bn_ms['torch']:.1f} ms a step ({bn_ms['torch'] / bn_ms['ours']:.2f}x); "
              f"backends: {', '.join(sorted({v['backend'] for v in ran.values()})) or 'none'}")
    return {"numbers": {"final_test_acc": final, "target": target, "seconds_to_target": to_target,
                        "median_seconds_to_target": median_time, "training_seconds": total,
                        "time_ratio": speedup, "median_step_ms": step_ms, "batchnorm_part": layers,
                        "backends": ran, "runs": runs},
            "checks": checks, "held": common.verdict(checks), "result": result,
            "headline": f"{speedup:.2f}x time, BN part {bn_ms['torch'] / bn_ms['ours']:.1f}x"}


def _seconds_to(run: dict, target: float) -> float | None:
    """Training seconds at the first evaluation reaching `target`; None if none does."""
    return next((s for s, a in zip(run["seconds"], run["test_acc"]) if a >= target), None)


def plot(result: dict) -> dict:
    numbers = result["numbers"]
    fig, (time_ax, step_ax) = common.figure(ncols=2, width=5.0)
    for arm, runs in numbers["runs"].items():
        label = "ours (numba, fused)" if arm == "ours" else "torch's BatchNorm2d"
        for i, run in enumerate(runs):
            time_ax.plot(run["seconds"], run["test_acc"], color="C0" if arm == "ours" else "C1",
                         label=label if i == 0 else None, alpha=0.8)
        step_ax.plot(runs[0]["steps"], runs[0]["test_acc"], label=label, linestyle="-" if arm == "ours" else "--")
    time_ax.axhline(numbers["target"], color="gray", linestyle=":", label=f"target {common.pct(numbers['target'])}")
    time_ax.set(xlabel="training time (s)", ylabel="test accuracy", title="Accuracy against wall-clock time",
                ylim=(0, 1))
    step_ax.set(xlabel="training step", ylabel="test accuracy", title="The same curve by step (first seed)",
                ylim=(0, 1))
    time_ax.legend(loc="lower right")
    step_ax.legend(loc="lower right")
    return {"time": fig}
