"""Running a test's work in a group of processes (gloo on localhost), as the tool tests need.

`run(entry, world, outdir)` spawns `world` processes, each calling `entry(rank, world, outdir)`
inside an initialized default process group, and returns what each saved with `save`. The
group has a collective timeout and the run a deadline, after which the processes are
terminated: nothing hangs.
"""

from __future__ import annotations

import datetime
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DEADLINE_S = 120


def _main(rank: int, entry, world: int, port: int, outdir: str) -> None:
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=60)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timeout)
    torch.save(entry(rank, world), Path(outdir) / f"rank{rank}.pt")
    dist.barrier()  # leave together
    dist.destroy_process_group()


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_and_wait(fn, args: tuple, nprocs: int, deadline_s: float = DEADLINE_S) -> None:
    """Spawn `nprocs` processes of `fn(rank, *args)` and wait for them; TimeoutError past
    `deadline_s`, and any process still alive then is terminated: nothing hangs."""
    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + deadline_s
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the processes were still running after {deadline_s} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()


def run(entry, world: int, outdir: Path) -> list:
    """What `entry(rank, world)` returned in each process, by rank (entry: a module-level function)."""
    spawn_and_wait(_main, (entry, world, free_port(), str(outdir)), world)
    return [torch.load(Path(outdir) / f"rank{r}.pt", weights_only=False) for r in range(world)]
