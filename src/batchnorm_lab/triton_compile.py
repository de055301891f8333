"""Compile every Triton kernel specialization the backend launches, for a GPU that is not here.

`batchnorm bench gpu-compile --arch 90` and tests/lab/test_triton_compile.py run it on a
machine without a GPU. Three steps:

1. `launches(arch)`: the kernel launches of the whole op (`triton_gpu.forward` and
   `backward`, the path `auto` takes for plain batch norm) for every row of the benchmark
   grid (`bench_grid.grid("cuda")`: MLP, CNN and ResNet-50 rows at batch 256, both memory formats),
   in fp32 and bf16, plain / ReLU / add + ReLU, training, forward + backward, and
   evaluation. The launch code runs for real on `meta` tensors (shapes and dtypes, no
   memory) with the kernels module replaced by a recorder and the SM count of
   the target GPU, so the tile sizes, warps and flags are the ones the dispatcher picks.
   Launches that compile to the same specialization are kept once.
2. `compile_launch`: the recorded arguments are specialized as Triton's launcher does
   (its own binder: an int equal to 1 becomes a constant, ints and pointers are marked
   16-divisible when they are), then `triton.compile(ASTSource(...), target=GPUTarget("cuda",
   arch, 32))`. The binder and `_pack_args` are Triton internals; they have the same
   interface in Triton 3.6 and 3.9 (both checked), and going through them keeps the compiled
   specialization identical to what a launch compiles, where hand-written signatures drift.
3. `resource_usage` reads registers, local memory and stack frame (where ptxas spills) and
   shared memory of the cubin with `cuobjdump --dump-resource-usage` (shipped in the triton
   wheel), and `occupancy` turns them into the theoretical occupancy on the target's SM.

The compile needs Triton's compiler, not its interpreter: with TRITON_INTERPRET set (the
tests set it) `main` reruns itself in a subprocess without it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from typing import Any, Iterator, NamedTuple

import torch

from batchnorm import layout

from . import bench_grid


class SM(NamedTuple):
    """The limits of one streaming multiprocessor that bound occupancy."""

    regs: int  # 32-bit registers per SM
    partitions: int  # sub-partitions (warp schedulers); registers are split between them
    max_warps: int
    max_ctas: int
    smem: int  # bytes of shared memory per SM that CTAs can use
    smem_reserved: int  # bytes the system reserves per CTA
    reg_unit: int  # registers are allocated per warp in multiples of this
    max_regs_per_thread: int
    sms: int  # SMs of the reference GPU (A100, H100 / H200): sizes the grids


SMS = {
    80: SM(65536, 4, 64, 32, 164 * 1024, 1024, 256, 255, 108),
    90: SM(65536, 4, 64, 32, 228 * 1024, 1024, 256, 255, 132),
}
ARCHS = tuple(SMS)
#: Kernels that stream activation-sized tensors: their speed is bytes in flight, so the
#: compile check holds them to MIN_OCCUPANCY. The merge kernels read (P, C) workspaces
#: or (C,) vectors in one small wave; their occupancy does not matter.
STREAMING = (
    "stats_partials_kernel", "apply_kernel", "grad_partials_kernel", "backward_apply_kernel",
    "single_read_forward_kernel", "single_read_backward_kernel",
)  # fmt: skip
MIN_OCCUPANCY = 0.25


class Occupancy(NamedTuple):
    ctas: int  # resident CTAs per SM
    warps: int  # resident warps per SM
    fraction: float  # warps / max warps
    limit: str  # what bounds it: "registers", "warps", "shared memory" or "CTAs"


def occupancy(regs: int, warps: int, smem: int, arch: int) -> Occupancy:
    """Theoretical occupancy of a kernel of `regs` registers per thread, `warps` warps per
    CTA and `smem` bytes of shared memory per CTA on an sm_`arch` SM.

    Registers as the CUDA occupancy calculator allocates them: per warp, regs x 32 rounded
    up to the allocation unit, each sub-partition holding whole warps of its quarter of the
    register file. Shared memory per CTA adds the system's reserved KiB.
    """
    sm = SMS[arch]
    if regs > sm.max_regs_per_thread:
        raise ValueError(f"{regs} registers per thread: sm_{arch} allows {sm.max_regs_per_thread}")
    per_warp = -(-max(regs, 1) * 32 // sm.reg_unit) * sm.reg_unit
    warps_by_regs = (sm.regs // sm.partitions // per_warp) * sm.partitions
    bounds = {"registers": warps_by_regs // warps, "warps": sm.max_warps // warps, "CTAs": sm.max_ctas}
    if smem:
        bounds["shared memory"] = sm.smem // (smem + sm.smem_reserved)
    limit = min(bounds, key=bounds.__getitem__)
    ctas = bounds[limit]
    return Occupancy(ctas, ctas * warps, ctas * warps / sm.max_warps, limit)


# --- 1. what the backend launches -----------------------------------------------------------


@dataclass(frozen=True)
class Arg:
    """A launch argument as the compiler sees it: a pointer's element dtype, or a value."""

    dtype: str | None = None  # "float32", ... for a tensor
    value: Any = None


class Launch(NamedTuple):
    kernel: str  # attribute of triton_kernels
    args: tuple[Arg, ...]
    kwargs: tuple[tuple[str, Any], ...]  # constexprs and launch options (num_warps)
    where: str  # the first row that launched it, e.g. "(256, 64, 112, 112) channels_last bf16 relu train_fb"
    view: str  # the canonical view it ran on: "ncl" or "mc"

    def key(self) -> tuple:
        """What the specialization depends on (the compiler's view, not the row)."""
        return (self.kernel, tuple(_spec(a) for a in self.args), self.kwargs)


def _spec(a: Arg):
    if a.dtype is not None:
        return a.dtype
    if isinstance(a.value, bool) or not isinstance(a.value, int):
        return ("v", type(a.value).__name__)  # floats and bools are not specialized on value
    return ("i", a.value == 1, a.value % 16 == 0, -(2**31) <= a.value < 2**31)


class _Recorder:
    """Stands in for the kernels module: records each launch instead of running it."""

    def __init__(self):
        self.launches: list[tuple[str, tuple, dict]] = []

    def __getattr__(self, name):
        recorder = self

        class Launcher:
            def __getitem__(self, grid):
                def run(*args, **kwargs):
                    recorder.launches.append((name, args, kwargs))

                return run

        return Launcher()


def _arg(a) -> Arg:
    if isinstance(a, torch.Tensor):
        return Arg(dtype=str(a.dtype).removeprefix("torch."))
    return Arg(value=a)


MODES = ("train", "train_fb", "eval")
DTYPES = (torch.float32, torch.bfloat16)


def _rows(quick: bool = False) -> Iterator[tuple[tuple[int, ...], str]]:
    yield from bench_grid.grid("cuda", quick)


def launches(arch: int, rows=None) -> list[Launch]:
    """The distinct kernel launches of the whole op over the benchmark grid (see the module
    docstring), sized for the reference GPU of sm_`arch` (`SM.sms`)."""
    from batchnorm.backends import triton_gpu as tg

    rows = list(_rows()) if rows is None else rows
    recorder = _Recorder()
    seen: dict[tuple, Launch] = {}
    with _patched(tg, _kernels=lambda: recorder, _sms=lambda x: SMS[arch].sms):
        for shape, fmt in rows:
            for dtype in DTYPES:
                for variant, (activation, residual) in _variants().items():
                    for mode in MODES:
                        recorder.launches.clear()
                        view = _run_whole_op(tg, shape, fmt, dtype, activation, residual, mode)
                        where = f"{tuple(shape)} {fmt} {str(dtype).removeprefix('torch.')} {variant} {mode}"
                        for name, args, kwargs in recorder.launches:
                            launch = Launch(name, tuple(map(_arg, args)), tuple(sorted(kwargs.items())), where, view)
                            seen.setdefault(launch.key(), launch)
    return list(seen.values())


def _variants() -> dict:
    return bench_grid.VARIANTS


def _run_whole_op(tg, shape, fmt, dtype, activation, has_res, mode) -> str:
    """One benchmark row through the whole-op launches, on meta tensors: a module's fp32
    parameters and running statistics, the residual's gradient asked for.
    Returns the kind of canonical view ("ncl" or "mc")."""
    x = torch.empty(shape, dtype=dtype, device="meta")
    if fmt == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    view = layout.canonical(x)
    v = view.data
    res = torch.empty_like(v) if has_res else None
    c = shape[1]
    w, b, rm, rv = (torch.empty(c, device="meta") for _ in range(4))
    f = tg.forward(v, w, b, rm, rv, 1e-5, activation, res, training=mode != "eval")
    if mode == "train_fb":
        tg.backward(
            torch.empty_like(v), v, *f.vectors, activation, res, training=True,
            weight_dtype=w.dtype, bias_dtype=b.dtype, need_dx=True,
        )  # fmt: skip
    return view.kind


@contextlib.contextmanager
def _patched(module, **attrs):
    old = {k: getattr(module, k) for k in attrs}
    try:
        for k, v in attrs.items():
            setattr(module, k, v)
        yield
    finally:
        for k, v in old.items():
            setattr(module, k, v)


def representative(found: list[Launch]) -> list[Launch]:
    """One launch per kernel, view ("ncl", "mc") and tile (the BLOCK_* sizes and warps): the
    one with the most work per element (residual and activation), then fp32 input (its
    values take twice the registers of bf16's before conversion). Registers follow the tile
    and the work per element; the launches left out differ in dtype, flags, or an integer's
    divisibility by 16."""
    best: dict[tuple, Launch] = {}

    def weight(launch: Launch):
        kw = dict(launch.kwargs)
        return (bool(kw.get("HAS_RES")), kw.get("ACT", 0), launch.args[0].dtype == "float32", launch.where)

    for launch in found:
        tile = tuple((k, v) for k, v in launch.kwargs if k.startswith("BLOCK") or k == "num_warps")
        key = (launch.kernel, launch.view, tile)
        if key not in best or weight(launch) > weight(best[key]):
            best[key] = launch
    return [best[k] for k in sorted(best)]


# --- 2. compiling a launch ------------------------------------------------------------------


@functools.cache
def _backend(arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    target = GPUTarget("cuda", arch, 32)
    return target, make_backend(target)


def compile_launch(launch: Launch, arch: int):
    """The compiled kernel (triton.compiler.CompiledKernel) of `launch` for sm_`arch`."""
    import triton
    from triton.compiler import ASTSource
    from triton.runtime.jit import MockTensor, create_function_from_signature

    from batchnorm.backends import triton_kernels

    fn = getattr(triton_kernels, launch.kernel)
    target, backend = _backend(arch)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    # MockTensor: a dtype at address 0, i.e. 16-byte aligned, as torch's CUDA allocations
    # (512-byte aligned) are; the backend launches on whole allocations.
    args = [MockTensor(getattr(torch, a.dtype)) if a.dtype is not None else a.value for a in launch.args]
    kwargs = dict(launch.kwargs)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


# --- 3. what it uses ------------------------------------------------------------------------


class Usage(NamedTuple):
    regs: int
    local: int  # bytes of local memory per thread outside the stack frame
    stack: int  # bytes of stack frame per thread: where ptxas spills registers
    shared: int  # static shared memory, bytes per CTA

    @property
    def spill_bytes(self) -> int:
        """Local memory per thread, stack frame included: our kernels call no function and
        hold no local array, so all of it is spilled registers (ptxas -v says "N bytes
        stack frame, N bytes spill stores"; the driver's LOCAL_SIZE_BYTES, which Triton's
        n_spills divides by 4, counts the same bytes)."""
        return self.local + self.stack


@functools.cache
def cuobjdump() -> str:
    """The cuobjdump inside the triton wheel (or on PATH)."""
    import shutil

    import triton

    here = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    found = here if os.path.exists(here) else shutil.which("cuobjdump")
    if found is None:
        raise FileNotFoundError("cuobjdump: not in the triton wheel (triton/backends/nvidia/bin) nor on PATH")
    return found


def resource_usage(cubin: bytes) -> Usage:
    """Registers, local, stack and shared memory of the one kernel in `cubin`."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
    return parse_resource_usage(text)


def parse_resource_usage(text: str) -> Usage:
    """cuobjdump --dump-resource-usage's line "REG:40 STACK:0 SHARED:0 LOCAL:0 ..." as Usage."""
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", text)
    if m is None:
        raise ValueError(f"no resource usage in cuobjdump's output:\n{text}")
    regs, stack, shared, local = map(int, m.groups())
    return Usage(regs, local, stack, shared)


@dataclass
class Result:
    """One compiled specialization."""

    kernel: str
    arch: int
    constexprs: dict
    where: str
    regs: int = 0
    spills: int = 0  # 4-byte words of local memory and stack (Triton's n_spills: local bytes / 4)
    shared: int = 0  # bytes per CTA: static, plus what Triton allocates dynamically
    warps: int = 4
    ctas: int = 0
    occupancy: float = 0.0
    limit: str = ""
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.spills == 0


def check(launch: Launch, arch: int) -> Result:
    """Compile `launch` for sm_`arch` and measure it; a compile error is recorded, not raised."""
    kw = dict(launch.kwargs)
    shown = {k: v for k, v in kw.items() if k not in ("LEAKY",)}
    result = Result(launch.kernel.removesuffix("_kernel"), arch, shown, launch.where, warps=kw.get("num_warps", 4))
    try:
        compiled = compile_launch(launch, arch)
        usage = resource_usage(compiled.asm["cubin"])
    except Exception as e:  # noqa: BLE001 (a compile error of any kind is the finding)
        result.error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        return result
    result.warps = compiled.metadata.num_warps
    result.regs, result.spills = usage.regs, -(-usage.spill_bytes // 4)
    result.shared = max(usage.shared, compiled.metadata.shared)
    occ = occupancy(result.regs, result.warps, result.shared, arch)
    result.ctas, result.occupancy, result.limit = occ.ctas, occ.fraction, occ.limit
    return result


def below_target(results: list[Result]) -> list[Result]:
    """Streaming kernels under MIN_OCCUPANCY on sm_90 (the GPU the project measures on)."""
    return [
        r for r in results
        if r.error is None and r.arch == 90 and f"{r.kernel}_kernel" in STREAMING and r.occupancy < MIN_OCCUPANCY
    ]  # fmt: skip


def run(archs=ARCHS, quick: bool = False, jobs: int = 1) -> list[Result]:
    """Compile every launch (or with `quick`, `representative`'s one per kernel) per arch, in
    `jobs` processes (each compile is one single-threaded ptxas run)."""
    tasks = []
    for arch in archs:
        found = launches(arch)
        tasks += [(launch, arch) for launch in (representative(found) if quick else found)]
    if jobs <= 1:
        return [check(*t) for t in tasks]
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(_check, tasks))


def _check(task):
    return check(*task)


def table(results: list[Result]) -> str:
    """Markdown: per kernel and arch, the specializations and their worst case, then the
    lowest-occupancy specialization of each kernel."""
    lines = [
        "| arch | kernel | specializations | registers (max) | spills | shared B | warps | occupancy (min) | limited by | worst at |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    groups: dict[tuple, list[Result]] = {}
    for r in results:
        groups.setdefault((r.arch, r.kernel), []).append(r)
    for (arch, kernel), rs in sorted(groups.items()):
        ok = [r for r in rs if r.error is None]
        errors = len(rs) - len(ok)
        if not ok:
            lines.append(f"| sm_{arch} | {kernel} | {len(rs)} | compile error | | | | | | {rs[0].error} |")
            continue
        worst = min(ok, key=lambda r: (r.occupancy, -r.regs))
        warps = sorted({r.warps for r in ok})
        tiles = {k: v for k, v in worst.constexprs.items() if k.startswith("BLOCK") or k == "num_warps"}
        lines.append(
            f"| sm_{arch} | {kernel} | {len(rs)}{f' ({errors} failed)' if errors else ''} | {max(r.regs for r in ok)} "
            f"| {max(r.spills for r in ok)} | {max(r.shared for r in ok)} | {'/'.join(map(str, warps))} "
            f"| {worst.occupancy:.0%} | {worst.limit} | {tiles} {worst.where} |"
        )
    return "\n".join(lines)


def summary(results: list[Result]) -> str:
    import triton

    errors = [r for r in results if r.error is not None]
    spills = [r for r in results if r.error is None and r.spills]
    low = below_target(results)
    heavy = [r for r in results if r.error is None and r.regs >= 192]
    return (
        f"triton {triton.__version__}: {len(results)} specializations compiled, {len(errors)} compile errors, "
        f"{len(spills)} with spills, {len(heavy)} at >= 192 registers, "
        f"{len(low)} streaming kernels under {MIN_OCCUPANCY:.0%} occupancy on sm_90"
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m batchnorm_lab.triton_compile [--arch 90 ...] [--quick] [--json PATH]`:
    exit 1 on a compile error or a spill (and, with --strict, on a streaming kernel under
    MIN_OCCUPANCY on sm_90)."""
    import argparse

    parser = argparse.ArgumentParser(prog="triton_compile", description=main.__doc__)
    parser.add_argument("--arch", type=int, action="append", choices=ARCHS)
    parser.add_argument("--quick", action="store_true", help="one specialization per kernel")
    parser.add_argument("--json", help="write every result here")
    parser.add_argument("--strict", action="store_true", help="fail on low occupancy too")
    parser.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    args = parser.parse_args(argv)
    archs = tuple(args.arch or ARCHS)
    if _interpreting():
        return _rerun_compiled(sys.argv[1:] if argv is None else argv)
    results = run(archs, args.quick, args.jobs)
    print(table(results))
    print(summary(results))
    for r in results:
        if r.error is not None:
            print(f"compile error: {r.kernel} sm_{r.arch} {r.constexprs} at {r.where}: {r.error}")
    if args.json:
        import triton

        payload = dict(triton=triton.__version__, torch=torch.__version__, results=[asdict(r) for r in results])
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1)
    failed = any(not r.ok for r in results) or (args.strict and bool(below_target(results)))
    return 1 if failed else 0


def _interpreting() -> bool:
    from batchnorm.backends.triton_gpu import interpreting

    return interpreting()


def _rerun_compiled(argv: list[str]) -> int:
    """Run this module in a fresh interpreter without TRITON_INTERPRET (Triton decided at
    import whether kernels are interpreted)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    src = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-m", "batchnorm_lab.triton_compile", *argv], env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
