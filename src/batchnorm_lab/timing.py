"""How one kernel benchmark row is timed: torch's batch norm against ours, interleaved.

`bench_row` times one (shape, format, mode, variant) of the grid (bench_grid.py); the kernel
benchmark (bench.py), the CNN wall-clock experiment (the batch-norm part's own time) and
the training-step benchmark (`time_medians`, `machine_info`) share it.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable

import torch

from batchnorm import backends
from batchnorm.nn import BatchNorm1d, BatchNorm2d
from batchnorm.norm_act import BatchNormAct

from .bench_grid import VARIANTS


def minimal_bytes(numel: int, itemsize: int, mode: str, residual: bool) -> int:
    """The least traffic the op needs: forward reads x (and residual) and writes y; backward
    reads x and dy (and writes dresidual) and writes dx. Statistics reuse the cached x."""
    fwd = 2 + residual
    bwd = 3 + residual
    return numel * itemsize * (fwd + (bwd if mode == "train_fb" else 0))


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_medians(fns: dict[str, Callable[[], object]], repeats: int, device: str) -> dict[str, tuple[float, float]]:
    """(median, min) seconds of each callable, run interleaved (one of each per round) after a
    warm-up. On a shared machine the minimum is the less noisy of the two."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for k, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[k].append(time.perf_counter() - t0)
    return {k: (statistics.median(v), min(v)) for k, v in times.items()}


def _modules(c: int, dim: int, activation: str | None, device: str, backend: str = "auto"):
    """torch's module and ours (`backend`, "auto" by default) for a (N, C) / (N, C, L) or
    (N, C, H, W) input; both with fp32 parameters (torch's mixed case for half inputs)."""
    torch_cls = torch.nn.BatchNorm1d if dim <= 3 else torch.nn.BatchNorm2d
    ours_cls = BatchNorm1d if dim <= 3 else BatchNorm2d
    return (
        torch_cls(c, device=device),
        BatchNormAct(ours_cls(c, backend=backend, device=device), activation),
    )


def runner(module, mode, x, r, dy, fused: bool, activation):
    """A callable running `module` once in `mode`; `fused`: ours (activation inside)."""
    module.train(mode != "eval")
    leaves = [x] + list(module.parameters()) + ([r] if r is not None else [])

    def forward():
        if fused:
            return module(x, residual=r)
        y = module(x)
        y = y + r if r is not None else y
        return torch.relu(y) if activation == "relu" else y

    if mode != "train_fb":
        def run():
            with torch.no_grad():
                forward()
        return run

    def run_fb():
        torch.autograd.grad(forward(), leaves, dy)

    return run_fb


def bench_row(shape, fmt, mode, variant, device, repeats, with_compile, dtype=torch.float32, backend="auto") -> dict:
    """One row: x (and residual, dy) of `shape` in `dtype` and memory format `fmt`, ours run
    with `backend`."""
    activation, has_res = VARIANTS[variant]
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape, device=device, generator=gen).to(dtype)
    if fmt == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    r = torch.randn(x.shape, device=device, generator=gen).to(dtype, memory_format=_fmt(x)) if has_res else None
    dy = torch.randn(x.shape, device=device, generator=gen).to(dtype, memory_format=_fmt(x))
    if mode == "train_fb":
        x.requires_grad_()
        if r is not None:
            r.requires_grad_()
    ref, ours = _modules(shape[1], len(shape), activation, device, backend)
    fns = {
        "torch": runner(ref, mode, x, r, dy, False, activation),
        "ours": runner(ours, mode, x, r, dy, True, activation),
        # the copy is timed in the same rounds as torch and ours, so it sees the same load
        "copy": _copy_into(x.detach()),
    }
    if with_compile:
        fns["compile"] = runner(torch.compile(ref), mode, x, r, dy, False, activation)
    t = time_medians(fns, repeats, device)
    chosen = backends.resolve(ours.bn.backend, x.detach()).backend.name
    nbytes = minimal_bytes(x.numel(), x.element_size(), mode, has_res)
    (t_torch, min_torch), (t_ours, min_ours) = t["torch"], t["ours"]
    row = dict(
        shape=list(shape), format=fmt, dtype=str(dtype).removeprefix("torch."), mode=mode, variant=variant, backend=chosen,
        torch_ms=t_torch * 1e3, ours_ms=t_ours * 1e3, ratio=t_torch / t_ours,
        torch_min_ms=min_torch * 1e3, ours_min_ms=min_ours * 1e3, ratio_min=min_torch / min_ours,
        minimal_bytes=nbytes, ours_gbps=nbytes / t_ours / 1e9, ours_gbps_min=nbytes / min_ours / 1e9,
    )  # fmt: skip
    copy_bytes = 2 * x.numel() * x.element_size()  # read + write
    row.update(copy_gbps=copy_bytes / t["copy"][0] / 1e9, copy_gbps_best=copy_bytes / t["copy"][1] / 1e9)
    row.update(copy_fraction=row["ours_gbps"] / row["copy_gbps"],
               copy_fraction_best=row["ours_gbps_min"] / row["copy_gbps_best"])  # fmt: skip
    if with_compile:
        row.update(compile_ms=t["compile"][0] * 1e3, ratio_compile=t["compile"][0] / t_ours)
    return row


def _copy_into(x):
    """A callable copying x into a tensor allocated once (and touched) beforehand."""
    out = torch.empty_like(x).copy_(x)
    return lambda: out.copy_(x)


def _fmt(x):
    return torch.channels_last if x.dim() == 4 and not x.is_contiguous() else torch.contiguous_format


def load_average() -> tuple[float, float, float] | None:
    """The host's 1, 5 and 15 minute load averages (None where the OS has none): every
    benchmark reports them beside its timings, as the share of the machine it had."""
    return os.getloadavg() if hasattr(os, "getloadavg") else None


def machine_info(device: str) -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info = dict(
        cpu=cpu, cores=os.cpu_count(), torch=torch.__version__, torch_threads=torch.get_num_threads(),
        python=platform.python_version(), device=device,
        load_average=load_average(),
    )  # fmt: skip
    try:
        import numba

        info.update(numba=numba.__version__, numba_threads=numba.get_num_threads())
    except ImportError:
        pass
    info["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if device == "cuda":
        info.update(gpu_info())
    return info


def gpu_info() -> dict:
    """The GPU and the software that ran on it: name, SMs, driver, CUDA, triton."""
    import subprocess

    p = torch.cuda.get_device_properties(torch.cuda.current_device())
    info = dict(gpu=p.name, sms=p.multi_processor_count, capability=f"{p.major}.{p.minor}", cuda=torch.version.cuda)
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)  # fmt: skip
        info["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        info["driver"] = None
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info
