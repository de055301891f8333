"""`batchnorm train`: data-parallel training with SyncBatchNorm, end to end, on CPU.

A small convolutional network with batch norm learns scikit-learn's bundled 8x8 digits.
Every step draws one global batch of `batch_size` examples (the same on every process,
from a shared seed) and each of the P processes takes its contiguous slice of it (sizes
differ by at most one). Launch it any of three ways:

    batchnorm train --nproc 2 --sync-bn                     # spawns 2 processes (gloo)
    torchrun --nproc_per_node 2 -m batchnorm_lab.train --sync-bn
    python -m batchnorm_lab.train                               # one process

Each process's loss is its sum of cross-entropies times P / batch_size, so that DDP's
average of the gradients is the gradient of the mean loss over the global batch: with
`--sync-bn` the run then follows single-process training on the full batch. Rank 0
reports the test accuracy and the median time per step, and saves `checkpoint.pt`
(`{"model": state_dict, "config": ...}`; the state_dict loads into `build_model()` with
local batch norm, or any model with torch's BatchNorm) and `metrics.json` in `--out`.

`--bench` times a DDP step with SyncBatchNorm against local batch norm instead, with and
without DDP's buffer broadcast, and counts SyncBatchNorm's collectives per step
(`docs/distributed.md` has the numbers).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import typer
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from batchnorm.distributed import SyncBatchNorm, no_buffer_broadcast
from batchnorm.nn import BatchNorm1d, BatchNorm2d
from batchnorm.norm_act import BatchNormAct

GLOO_TIMEOUT = datetime.timedelta(seconds=60)
WARMUP_STEPS = 5  # left out of the step-time median (first-call handshakes, allocator)


@dataclass(frozen=True)
class Config:
    steps: int = 200
    batch_size: int = 128
    lr: float = 0.1
    sync_bn: bool = False
    seed: int = 0
    out: str = "runs/train"


def load_digits() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_train, y_train, x_test, y_test): images (n, 1, 8, 8) standardized per pixel with a
    StandardScaler fitted on the training split; a stratified 75/25 split, seed 0."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    x, y = sklearn_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, stratify=y, random_state=0)
    scaler = StandardScaler().fit(x_tr)

    def images(a):
        return torch.tensor(scaler.transform(a), dtype=torch.float32).view(-1, 1, 8, 8)

    return images(x_tr), torch.tensor(y_tr), images(x_te), torch.tensor(y_te)


def build_model(sync_bn: bool = False, seed: int = 0) -> torch.nn.Module:
    """Conv-BN-ReLU x2, then Linear-BN-ReLU and a linear classifier: (n, 1, 8, 8) -> (n, 10)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1, bias=False), BatchNormAct(BatchNorm2d(16), "relu"),
        torch.nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), BatchNormAct(BatchNorm2d(32), "relu"),
        torch.nn.Flatten(),
        torch.nn.Linear(32 * 4 * 4, 64, bias=False), BatchNormAct(BatchNorm1d(64), "relu"),
        torch.nn.Linear(64, 10),
    )
    return SyncBatchNorm.convert(model) if sync_bn else model


def free_port() -> int:
    """A TCP port free on localhost now (for the rendezvous of spawned processes)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_env() -> tuple[int, int] | None:
    """(rank, world_size) when launched by torchrun (RANK and WORLD_SIZE set), else None."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


@contextlib.contextmanager
def _group(rank: int, world: int, port: int | None):
    """The gloo group for the body of the `with`: on localhost:port when spawned by us, from
    torchrun's environment otherwise. On a normal exit every rank waits for the others
    before the group is torn down: a rank that destroyed its group while rank 0 was still
    saving was aborted (SIGABRT, "terminate called without an active exception"), about one
    run in four. The group is destroyed on every exit.

    Each process gets its share of the cores in torch's thread pool, which the numba
    backend's parallel kernels follow: oversubscribed pools spin against each other and
    made a 2-process step several times slower on 2 cores (docs/performance.md, "Costs
    around the kernels")."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if world > 1:
        init = "env://" if port is None else f"tcp://127.0.0.1:{port}"
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=GLOO_TIMEOUT)
    try:
        yield
        if world > 1:
            dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _wrap(model: torch.nn.Module, world: int, broadcast_buffers: bool) -> torch.nn.Module:
    """DDP over the group (a plain model for one process), with or without its per-forward
    broadcast of rank 0's buffers."""
    if world == 1:
        return model
    return DistributedDataParallel(model, **({} if broadcast_buffers else no_buffer_broadcast()))


def _batches(n_train: int, cfg: Config):
    """The global batches' indices, identical on every process (shared seed)."""
    g = torch.Generator().manual_seed(cfg.seed + 1)
    while True:
        yield torch.randperm(n_train, generator=g)[: cfg.batch_size]


def _step(model, opt, x: Tensor, y: Tensor, world: int, global_batch: int) -> float:
    """One optimizer step on this process's slice; returns its loss contribution."""
    loss = torch.nn.functional.cross_entropy(model(x), y, reduction="sum") * (world / global_batch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def train(rank: int, world: int, cfg: Config, port: int | None = None) -> dict | None:
    """Train on this process's slices; rank 0 evaluates, saves, and returns the metrics."""
    from rich.progress import Progress

    with _group(rank, world, port):
        x_tr, y_tr, x_te, y_te = load_digits()
        model = build_model(cfg.sync_bn, cfg.seed)
        # SyncBatchNorm keeps the running statistics equal on every process; local batch
        # norm does not, so it keeps DDP's broadcast of rank 0's buffers.
        ddp = _wrap(model, world, broadcast_buffers=not cfg.sync_bn)
        opt = torch.optim.SGD(ddp.parameters(), lr=cfg.lr, momentum=0.9)
        times, losses = [], []
        with Progress(disable=rank != 0, transient=True) as progress:
            task = progress.add_task(f"training on {world} process(es)", total=cfg.steps)
            for step, idx in zip(range(cfg.steps), _batches(len(x_tr), cfg)):
                mine = idx.tensor_split(world)[rank]
                start = time.perf_counter()
                losses.append(_step(ddp, opt, x_tr[mine], y_tr[mine], world, len(idx)))
                times.append(time.perf_counter() - start)
                progress.advance(task)
        if rank != 0:
            return None  # leaving the `with` waits for rank 0 (`_group`)
        model.eval()
        with torch.no_grad():
            accuracy = float((model(x_te).argmax(1) == y_te).float().mean())
        metrics = dict(
            world_size=world, sync_bn=cfg.sync_bn, steps=cfg.steps, batch_size=cfg.batch_size,
            test_accuracy=accuracy, final_loss_rank0=losses[-1],
            step_ms_median=1e3 * statistics.median(times[WARMUP_STEPS:] or times),
        )
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"model": model.state_dict(), "config": asdict(cfg)}, out / "checkpoint.pt")
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        return metrics


def bench(rank: int, world: int, cfg: Config, port: int | None = None) -> dict | None:
    """Median DDP step time with SyncBatchNorm and with local batch norm, each with and
    without DDP's buffer broadcast, plus SyncBatchNorm's all_reduce calls per step."""
    with _group(rank, world, port):
        x_tr, y_tr, _, _ = load_digits()
        rows = []
        for sync_bn in (False, True):
            for broadcast_buffers in (False, True):
                model = build_model(sync_bn, cfg.seed)
                ddp = _wrap(model, world, broadcast_buffers)
                opt = torch.optim.SGD(ddp.parameters(), lr=cfg.lr, momentum=0.9)
                batches = _batches(len(x_tr), cfg)
                times = []
                for step, idx in zip(range(WARMUP_STEPS + cfg.steps), batches):
                    mine = idx.tensor_split(world)[rank]
                    start = time.perf_counter()
                    _step(ddp, opt, x_tr[mine], y_tr[mine], world, len(idx))
                    times.append(time.perf_counter() - start)
                mine = next(batches).tensor_split(world)[rank]
                calls = _count_all_reduce(lambda: _step(ddp, opt, x_tr[mine], y_tr[mine], world, cfg.batch_size))
                rows.append(dict(
                    batch_norm="SyncBatchNorm" if sync_bn else "local", broadcast_buffers=broadcast_buffers,
                    step_ms_median=1e3 * statistics.median(times[WARMUP_STEPS:]),
                    step_ms_best=1e3 * min(times[WARMUP_STEPS:]), bn_all_reduce_per_step=calls,
                ))
        if rank != 0:
            return None  # leaving the `with` waits for rank 0 (`_group`)
        result = dict(world_size=world, batch_size=cfg.batch_size, steps=cfg.steps, rows=rows)
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps(result, indent=2))
        return result


def _count_all_reduce(fn) -> int:
    """How many times fn calls torch.distributed.all_reduce from Python (DDP's own gradient
    reduction runs in C++ and is not counted)."""
    real, calls = dist.all_reduce, []

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    dist.all_reduce = counting
    try:
        fn()
    finally:
        dist.all_reduce = real
    return len(calls)


def _spawned(rank: int, world: int, port: int, cfg: Config, job) -> None:
    _report(job(rank, world, cfg, port))


def _report(result: dict | None) -> None:
    """Rank 0 prints the metrics (or the benchmark table)."""
    if result is None:
        return
    from rich.console import Console
    from rich.table import Table

    if "rows" in result:
        table = Table(
            "batch norm", "buffer broadcast", "ms / step (median)", "ms / step (best)", "BN all_reduce / step",
            title=f"DDP step, {result['world_size']} processes, global batch {result['batch_size']}",
        )
        for r in result["rows"]:
            table.add_row(
                r["batch_norm"], str(r["broadcast_buffers"]), f"{r['step_ms_median']:.2f}",
                f"{r['step_ms_best']:.2f}", str(r["bn_all_reduce_per_step"]),
            )
    else:
        table = Table("metric", "value", title="batchnorm train")
        for k, v in result.items():
            table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    Console().print(table)


def train_command(
    nproc: int = typer.Option(1, help="Processes to spawn (gloo on localhost). Leave at 1 under torchrun."),
    sync_bn: bool = typer.Option(False, "--sync-bn", help="Convert the batch norms to batchnorm.SyncBatchNorm."),
    steps: int = typer.Option(200, help="Optimizer steps (timed steps with --bench)."),
    batch_size: int = typer.Option(128, help="Global batch size, split over the processes."),
    lr: float = typer.Option(0.1, help="SGD learning rate (momentum 0.9)."),
    seed: int = typer.Option(0, help="Seed of the initialization and the batch order."),
    out: Path = typer.Option(Path("runs/train"), help="Where rank 0 writes checkpoint.pt and metrics.json."),
    bench_mode: bool = typer.Option(False, "--bench", help="Time a DDP step with SyncBatchNorm vs local batch norm."),
) -> None:
    """Train a small CNN with batch norm on the bundled digits, on one or more processes."""
    launched = torchrun_env()
    world = launched[1] if launched else nproc
    if nproc < 1:
        raise typer.BadParameter(f"--nproc must be at least 1, got {nproc}")
    if launched and nproc != 1:
        raise typer.BadParameter("already launched by torchrun (RANK and WORLD_SIZE are set); drop --nproc")
    if steps < 1:
        raise typer.BadParameter(f"--steps must be at least 1, got {steps}")
    if batch_size < 2 * world:
        raise typer.BadParameter(
            f"--batch-size {batch_size} is too small for {world} processes: batch norm needs two "
            f"examples per process (use at least {2 * world})"
        )
    cfg = Config(steps=steps, batch_size=batch_size, lr=lr, sync_bn=sync_bn, seed=seed, out=str(out))
    job = bench if bench_mode else train
    if launched:
        _report(job(launched[0], launched[1], cfg))
    elif nproc == 1:
        _report(job(0, 1, cfg))
    else:
        mp.start_processes(
            _spawned, args=(nproc, free_port(), cfg, job),
            nprocs=nproc, start_method="spawn",
        )


if __name__ == "__main__":
    typer.run(train_command)
