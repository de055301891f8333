"""What every experiment shares: the network, the training loop, accuracy, summaries, plots.

One training recipe for all of them, so that the experiments differ only in the one thing
each varies: plain SGD with momentum on cross-entropy, mini-batches drawn without
replacement (a fresh permutation each epoch, the last incomplete batch dropped so that a
batch-norm layer never sees a batch of one), the model's weights seeded by `seed`.
"""

from __future__ import annotations

from typing import Callable, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from .. import data as datasets
from ..nn import BatchNorm1d


class Progress(Protocol):
    """Told the total work once (`total=`), then each unit done (`advance`)."""

    def __call__(self, advance: int = 0, *, total: int | None = None) -> None: ...


def no_progress(advance: int = 0, *, total: int | None = None) -> None:
    """A Progress that shows nothing."""


class Data:
    """A dataset's splits as tensors on one device: x (n, features) float32, y (n,) int64."""

    def __init__(self, ds: datasets.Dataset, device: str | torch.device = "cpu") -> None:
        self.name = ds.name
        self.n_classes = ds.n_classes
        self.n_features = ds.n_features
        self.x = torch.as_tensor(ds.x_train, device=device)
        self.y = torch.as_tensor(ds.y_train, device=device)
        self.x_test = torch.as_tensor(ds.x_test, device=device)
        self.y_test = torch.as_tensor(ds.y_test, device=device)


def load_data(config: dict, *, standardized: bool = True) -> Data:
    """The dataset of `config["dataset"]`, standardized on its training split unless told not to."""
    ds = datasets.load(config["dataset"])
    return Data(datasets.standardize(ds) if standardized else ds, config["device"])


ACTIVATIONS = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "tanh": nn.Tanh}


def mlp(
    n_features: int,
    n_classes: int,
    *,
    width: int,
    depth: int,
    activation: str,
    batchnorm: bool,
    after_norm: Callable[[int], nn.Module] | None = None,
    **bn_options,
) -> nn.Sequential:
    """`depth` hidden layers of `width` units, then a linear classifier.

    Without batch norm a hidden layer is `g(W x + b)`; with it, `g(BN(W x))` (the bias is
    dropped: BN's beta replaces it), the activation fused into `bn.BatchNorm1d`. When
    `after_norm(width)` is given, it builds a module put between BN and `g` (the noise
    experiment), and `g` is a separate module. `bn_options` go to every BatchNorm1d.
    """
    layers: list[nn.Module] = []
    features = n_features
    for _ in range(depth):
        layers.append(nn.Linear(features, width, bias=not batchnorm))
        if batchnorm and after_norm is None:
            layers.append(BatchNorm1d(width, activation=activation, **bn_options))
        elif batchnorm:
            layers += [BatchNorm1d(width, **bn_options), after_norm(width), ACTIVATIONS[activation]()]
        else:
            layers.append(ACTIVATIONS[activation]())
        features = width
    layers.append(nn.Linear(features, n_classes))
    return nn.Sequential(*layers)


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
    x = data.x
    generator = torch.Generator().manual_seed(seed)
    batches = batch_indices(len(x), batch_size, generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    curve = {"steps": [], "test_acc": []}
    losses: list[float] = []
    diverged = False
    for step in range(steps + 1):
        if eval_every and step % eval_every == 0:
            curve["steps"].append(step)
            curve["test_acc"].append(1 / data.n_classes if diverged else accuracy(model, data.x_test, data.y_test))
        if step == steps or diverged:
            progress(1 if step < steps else 0)
            continue
        index = next(batches).to(x.device)
        model.train()
        loss = nn.functional.cross_entropy(model(x[index]), data.y[index])
        if not torch.isfinite(loss):
            diverged = True
        else:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if on_step is not None:
                on_step(step + 1)
        progress(1)
    tail = losses[-max(1, len(losses) // 10) :]
    return {
        **curve,
        "final_test_acc": 1 / data.n_classes if diverged else accuracy(model, data.x_test, data.y_test),
        "final_train_acc": 1 / data.n_classes if diverged else accuracy(model, x, data.y),
        "final_loss": None if diverged else float(np.mean(tail)),
        "diverged": diverged,
    }


def seeded_model(seed: int, build: Callable[[], nn.Module], device) -> nn.Module:
    """`build()` with torch's generator seeded, so the initial weights depend only on seed."""
    torch.manual_seed(seed)
    return build().to(device)


def steps_to_target(steps: list[int], acc: list[float], target: float) -> int | None:
    """The first evaluated step whose test accuracy reaches `target`; None if none does."""
    return next((s for s, a in zip(steps, acc) if a >= target), None)


def summary(values: list[float]) -> dict:
    """{"mean", "std", "values"} over seeds (std 0 for one seed)."""
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()), "std": float(array.std()), "values": [float(v) for v in values]}


def check(name: str, criterion: str, held: bool, **numbers) -> dict:
    """One verdict: what was compared (`criterion`, in words), whether it held, on which numbers."""
    return {"name": name, "criterion": criterion, "held": bool(held), "numbers": numbers}


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
