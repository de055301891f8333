"""What every experiment shares: the network, the training loop, accuracy, summaries, plots.

One training recipe for all of them, so that the experiments differ only in the one thing
each varies: plain SGD with momentum on cross-entropy, mini-batches drawn without
replacement (a fresh permutation each epoch, the last incomplete batch dropped so that a
batch-norm layer never sees a batch of one), the model's weights seeded by `seed`.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
from typing import Callable, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from .. import data as datasets
from ..models import ACTIVATIONS, INITS, initialize, mlp  # noqa: F401 (the experiments' networks)


class Progress(Protocol):
    """Told the total work once (`total=`), then each unit done (`advance`)."""

    def __call__(self, advance: int = 0, *, total: int | None = None) -> None: ...


def no_progress(advance: int = 0, *, total: int | None = None) -> None:
    """A Progress that shows nothing."""


class Data:
    """A dataset's splits as tensors on one device: x (n, features) float32, y (n,) int64.

    `sample_shape` is one example's shape before flattening ((8, 8) for digits, (40,) for
    MNIST-1D): a convolutional network unflattens x to (n, 1, *sample_shape).
    """

    def __init__(self, ds: datasets.Dataset, device: str | torch.device = "cpu") -> None:
        self.name = ds.name
        self.n_classes = ds.n_classes
        self.n_features = ds.n_features
        self.sample_shape = tuple(ds.sample_shape)
        self.x = torch.as_tensor(ds.x_train, device=device)
        self.y = torch.as_tensor(ds.y_train, device=device)
        self.x_test = torch.as_tensor(ds.x_test, device=device)
        self.y_test = torch.as_tensor(ds.y_test, device=device)

    def holdout(self, fraction: float, seed: int = 0) -> "Data":
        """A copy whose training split is a random (1 - fraction) of this one's and whose test
        split is the rest: a validation set to choose a setting on, the test split untouched."""
        order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(seed)).to(self.x.device)
        n_val = max(1, round(fraction * len(self.x)))
        split = copy.copy(self)
        split.x, split.y = self.x[order[n_val:]], self.y[order[n_val:]]
        split.x_test, split.y_test = self.x[order[:n_val]], self.y[order[:n_val]]
        return split


def load_data(config: dict, *, standardized: bool = True, per_feature: bool = True) -> Data:
    """The dataset of `config["dataset"]`, standardized on its training split unless told not to.

    `per_feature=False` standardizes with one mean and one std over all training inputs
    instead of one per feature: a convolution applies the same weights at every position,
    so every position should keep the same scale.
    """
    ds = datasets.load(config["dataset"])
    if standardized:
        ds = datasets.standardize(ds) if per_feature else datasets.standardize_global(ds)
    return Data(ds, config["device"])


# The sentence every SETUP with a network without batch norm ends with (formatted with the config).
INIT_SETUP = (" Networks without batch norm start from the '{inits[0]}' initialization, those with batch "
              "norm from torch's default (initializations run: {inits}; the first is judged, any other is "
              "rerun and reported beside it).")


def baseline_init(config: dict) -> str:
    """The initialization of the networks without batch norm that the verdict is judged on:
    the first of `config["inits"]` (the others are rerun and reported beside it)."""
    return config.get("inits", ["practitioner"])[0]


def init_for(config: dict, batchnorm: bool) -> str:
    """The init of one arm: the baseline's (`baseline_init`) without batch norm, torch's with it."""
    return "torch" if batchnorm else baseline_init(config)


def batch_indices(n: int, batch_size: int, generator: torch.Generator):
    """Endless mini-batches of indices into n examples: a new permutation each epoch."""
    if not 2 <= batch_size <= n:
        raise ValueError(f"batch size {batch_size} must be between 2 and the {n} training examples")
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """The fraction of examples classified correctly, the model in evaluation mode."""
    model.eval()
    return (model(x).argmax(dim=1) == y).float().mean().item()


class Trainer:
    """One model's training, a step at a time: SGD with momentum on cross-entropy over
    mini-batches of `batch_size` drawn from the training split, the batches fixed by `seed`.

    `step()` makes one update; once a loss is non-finite the model has diverged and every
    later step does nothing. Two trainers with the same data, batch size and seed see the
    same batches in the same order.
    """

    def __init__(self, model: nn.Module, data: Data, *, batch_size: int, lr: float, seed: int,
                 momentum: float = 0.9) -> None:
        self.model, self.data = model, data
        self.batches = batch_indices(len(data.x), batch_size, torch.Generator().manual_seed(seed))
        self.optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
        self.losses: list[float] = []
        self.diverged = False

    def step(self) -> bool:
        """One update on the next mini-batch; False (and no update) once training has diverged."""
        if self.diverged:
            return False
        x, y = self.data.x, self.data.y
        index = next(self.batches).to(x.device)
        self.model.train()
        loss = nn.functional.cross_entropy(self.model(x[index]), y[index])
        if not torch.isfinite(loss):
            self.diverged = True
            return False
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.losses.append(loss.item())
        return True

    def test_accuracy(self) -> float:
        """Test accuracy now; chance (1 / n_classes) after divergence."""
        chance = 1 / self.data.n_classes
        return chance if self.diverged else accuracy(self.model, self.data.x_test, self.data.y_test)

    def final(self) -> dict:
        """`final_test_acc`, `final_train_acc`, `final_loss` (mean of the last 10% of the
        training losses; None after divergence) and `diverged`."""
        chance = 1 / self.data.n_classes
        tail = self.losses[-max(1, len(self.losses) // 10) :]
        return {
            "final_test_acc": self.test_accuracy(),
            "final_train_acc": chance if self.diverged else accuracy(self.model, self.data.x, self.data.y),
            "final_loss": None if self.diverged or not tail else float(np.mean(tail)),
            "diverged": self.diverged,
        }


def train(
    model: nn.Module,
    data: Data,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    momentum: float = 0.9,
    eval_every: int = 0,
    progress: Progress = no_progress,
    on_step: Callable[[int], None] | None = None,
) -> dict:
    """Train with SGD for `steps` mini-batches of `batch_size` from the training split.

    Returns `{"steps": [...], "test_acc": [...]}` (test accuracy every `eval_every` steps,
    from step 0), `final_test_acc`, `final_train_acc`, `final_loss` (mean of the last 10% of
    training losses; None after divergence) and `diverged` (the loss became non-finite;
    training stops there and the rest of the curve is chance, 1 / n_classes). `on_step(n)` is called after the n-th
    update (n = 1..steps), to look at the model mid-training.
    """
    key = None
    if _reused is not None and on_step is None and not _hooked(model):
        key = _fingerprint(model, data, steps, batch_size, lr, seed, momentum, eval_every)
        if key in _reused:
            result, state = _reused[key]
            model.load_state_dict(state)
            model.eval()
            progress(steps)
            return copy.deepcopy(result)
    trainer = Trainer(model, data, batch_size=batch_size, lr=lr, seed=seed, momentum=momentum)
    curve = {"steps": [], "test_acc": []}
    for step in range(steps + 1):
        if eval_every and step % eval_every == 0:
            curve["steps"].append(step)
            curve["test_acc"].append(trainer.test_accuracy())
        if step == steps:
            break
        if trainer.step() and on_step is not None:
            on_step(step + 1)
        progress(1)
    result = {**curve, **trainer.final()}
    if key is not None:
        _reused[key] = (copy.deepcopy(result), {k: v.detach().clone() for k, v in model.state_dict().items()})
    return result


# Trainings to reuse while `reusing_training` is active: fingerprint -> (result, final state).
_reused: dict | None = None


@contextlib.contextmanager
def reusing_training():
    """Within this block, a `train` call that repeats an earlier one (the same architecture,
    initial tensors, data, settings and seed; no `on_step`, no hooks on the model) returns
    the earlier result and loads the state that training ended in, instead of training
    again. Training on given inputs is deterministic, so this is the result it would give:
    an experiment rerun with another initialization of its baseline (`run_into`) retrains
    only the networks that the initialization changes."""
    global _reused
    outer, _reused = _reused, {} if _reused is None else _reused
    try:
        yield
    finally:
        _reused = outer


def _hooked(model: nn.Module) -> bool:
    """Whether something watches the model's calls (a monitor): reusing would skip it."""
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in model.modules())


def _fingerprint(model: nn.Module, data: Data, *settings) -> str:
    """A digest of the model's structure and initial tensors, the data and the settings."""
    digest = hashlib.sha256(repr((repr(model), getattr(model, "code", ""), data.name, settings)).encode())
    for tensor in (*model.state_dict().values(), data.x, data.y, data.x_test, data.y_test):
        digest.update(str((tensor.dtype, tuple(tensor.shape))).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def seeded_model(seed: int, build: Callable[[], nn.Module], device) -> nn.Module:
    """`build()` with torch's generator seeded, so the initial weights depend only on seed."""
    torch.manual_seed(seed)
    return build().to(device)


def steps_to_target(steps: list[int], acc: list[float], target: float) -> int | None:
    """The first evaluated step whose test accuracy reaches `target`; None if none does."""
    return next((s for s, a in zip(steps, acc) if a >= target), None)


def median_steps(reached: list[float | None]) -> float | None:
    """Median over seeds of steps (or seconds) to a target, with "never" (None) as +infinity;
    None when the median itself is never."""
    ordered = sorted(reached, key=lambda s: float("inf") if s is None else s)
    middle = ordered[(len(ordered) - 1) // 2 : len(ordered) // 2 + 1]
    return None if None in middle else sum(middle) / len(middle)


def fmt_steps(steps: float | None) -> str:
    return "never" if steps is None else f"{steps:.0f}"


def summary(values: list[float]) -> dict:
    """{"mean", "std", "values"} over seeds (std 0 for one seed)."""
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()), "std": float(array.std()), "values": [float(v) for v in values]}


def record_verdict(name: str, criterion: str, held: bool, *, why: str, **numbers) -> dict:
    """The record of one verdict on a claim: what was compared (`criterion`, in words),
    whether it held, on which numbers, and `why`: the numbers compared in a few words, so
    that a check that did not hold says by how much (the demo prints it on one line, after
    the experiment's and the check's names). An experiment's records go under its "checks" key."""
    return {"name": name, "criterion": criterion, "held": bool(held), "why": why, "numbers": numbers}


def verdict(checks: list[dict]) -> bool:
    """Whether a claim held: every one of its verdict records did."""
    return all(c["held"] for c in checks)


# A claim's verdict, and each check's. A configuration can be too short or have too few seeds
# to tell an effect from the noise (the demo's quick ones, for some checks); it names those
# checks in advance, under "unpowered", and they are "inconclusive at this length" whatever
# their numbers say, instead of a "held" or "did not hold" that the full run may contradict.
HELD, NOT_HELD, INCONCLUSIVE = "held", "did not hold", "inconclusive at this length"


def judge(checks: list[dict], config: dict) -> str:
    """The claim's verdict from its checks under `config`, and each check's `status` (set on
    it): a check named in `config["unpowered"]` is INCONCLUSIVE, the others HELD or
    NOT_HELD. The claim did not hold when a powered check did not; else it is inconclusive
    when a check is; else it held."""
    unpowered = set(config.get("unpowered", ()))
    unknown = unpowered - {c["name"] for c in checks}
    if unknown:
        raise ValueError(f"config names unpowered checks the experiment does not have: {sorted(unknown)}")
    for check in checks:
        check["status"] = INCONCLUSIVE if check["name"] in unpowered else HELD if check["held"] else NOT_HELD
    statuses = {c["status"] for c in checks}
    return NOT_HELD if NOT_HELD in statuses else INCONCLUSIVE if INCONCLUSIVE in statuses else HELD


def points(difference: float) -> str:
    """A difference of two accuracies in percentage points, signed: "+1.2 pts", "-0.4 pts"."""
    return f"{100 * difference:+.1f} pts"


def fmt_rate(rate: float | None) -> str:
    """A learning rate, or "none" when no rate of the sweep qualified."""
    return "none" if rate is None else f"{rate:g}"


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


# ---- plots -------------------------------------------------------------------------------


def figure(ncols: int = 1, width: float = 6.0, height: float = 3.8):
    """A matplotlib figure (Agg backend, nothing shown) with `ncols` side-by-side axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False, layout="constrained")
    return fig, list(axes[0])


def plot_band(ax, steps: list[int], runs: list[list[float]], label: str, **style) -> None:
    """Mean over seeds as a line, min..max over seeds as a shaded band."""
    array = np.asarray(runs, dtype=np.float64)
    (line,) = ax.plot(steps, array.mean(axis=0), label=label, **style)
    if len(array) > 1:
        ax.fill_between(steps, array.min(axis=0), array.max(axis=0), color=line.get_color(), alpha=0.2)


def log_axis(ax, values) -> None:
    """A log-scale x axis labelled exactly at `values`, without minor tick labels."""
    ticks = sorted(set(values))
    ax.set_xscale("log")
    ax.set_xticks(ticks, labels=[f"{v:g}" for v in ticks])
    ax.minorticks_off()
