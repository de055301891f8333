"""The `numba` backend: fused CPU kernels for fp32 and fp64, in as few passes over memory as possible.

The kernels are in numba_kernels.py (their equations, layouts and order of work); this
module is the Python side: numpy views of the tensors, the per-channel parameters, scratch
and output memory, and the backend class that the op layer (ops.py) and the policy paths
(functional.py) call.

`NumbaBackend.forward` and `.backward` are the whole op (base.py): one forward kernel call,
one backward kernel call. Large outputs come from `OUTPUTS` (output_pool.py), which
reuses their memory from step to step instead of faulting in fresh pages.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from .. import layout
from ..modes import Mode
from . import numba_kernels as kernels
from . import numba_warmup
from .base import CENTER, INVSTD, N_PARAMS, SCALE, SHIFT, VAR, XHAT_SHIFT, Backend
from .output_pool import OutputPool

_HUGE_BYTES = 1 << 25  # outputs from this size use numpy's allocator (`_allocate`)
_SMALL_BYTES = 1 << 16  # outputs below this size also use numpy's (`_allocate`)
_TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}
#: The dtypes the kernels take, by the name numba_warmup's requests and numpy use.
DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64"}

#: `auto` takes numba from this many elements: the smallest size of the (N, 64, L) fp32
#: BN + ReLU forward + backward sweep (docs/benchmarks.md) from which numba is never slower
#: than torch's kernel. Below it the fixed cost of our call is more than the kernel saves
#: (docs/performance.md, "Which backend runs: the dispatch rules", has the sweep's ratios).
CROSSOVER_NUMEL = 1 << 18
#: The same for channels-last input with spatial dimensions ((N, C, *S) viewed as (M, C)),
#: where torch's own kernel is faster than on contiguous input and ours, with rows of C
#: values, slower, so numba pays off only from a larger size (same section for the ratios).
#: 2-D (N, C) input is not affected: CROSSOVER_NUMEL.
CROSSOVER_NUMEL_CHANNELS_LAST = 1 << 21
#: The same for contiguous input whose rows (the spatial values of one example's channel)
#: hold fewer than SHORT_ROW values, 2 to 7 (2x2 maps at the end of a CNN): torch's kernel
#: vectorizes along a row and is several times slower per value on such rows, so numba
#: pays off from a smaller size (same section).
CROSSOVER_NUMEL_SHORT_ROWS = 1 << 17
SHORT_ROW = 8


class ChannelParams(NamedTuple):
    """The kernels' per-channel parameters, each (C,) in x's dtype (numba_kernels.py defines
    them): the forward fills them in training and reads them otherwise, the backward reads
    them. The fields are the first rows of the whole op's (N_PARAMS, C) params, in base.py's
    order, so `ChannelParams(*params[: XHAT_SHIFT + 1])` views them."""

    center: np.ndarray
    scale: np.ndarray
    shift: np.ndarray
    invstd: np.ndarray
    xhat_shift: np.ndarray

    @classmethod
    def plain(cls, mean: np.ndarray, scale: np.ndarray, shift: np.ndarray, invstd: np.ndarray) -> "ChannelParams":
        """The kernel contract's parameters (base.py): center = mean, xhat_shift = 0."""
        return cls(mean, scale, shift, invstd, np.zeros_like(mean))

    @classmethod
    def empty(cls, channels: int, dtype: np.dtype) -> "ChannelParams":
        """Uninitialized, for a forward that computes them."""
        return cls(*(np.empty(channels, dtype) for _ in cls._fields))


def _np(t: Tensor) -> np.ndarray:
    """A contiguous numpy view (a copy only when `t` is not contiguous)."""
    return t.detach().contiguous().numpy()


def _vec(t: Tensor | None, channels: int, dtype: torch.dtype, fill: float) -> np.ndarray:
    """A per-channel (C,) tensor (a parameter, or a running statistic the kernels read) as a
    numpy array of `dtype`, the tensor's own memory when it can be; `fill` when t is None."""
    if t is None:
        return np.full(channels, fill, dtype=np.float64 if dtype == torch.float64 else np.float32)
    if t.dtype == dtype and t.is_contiguous():
        return t.detach().numpy()
    return t.detach().to(dtype).contiguous().numpy()


def _allocate(count: int, dtype: np.dtype) -> np.ndarray:
    """A new 1-D array. numpy asks the OS for huge pages on large arrays (madvise); below
    glibc's largest mmap threshold (32 MiB) that memory is often reused heap, slow to
    first-touch, so those come from torch's allocator; above, numpy's fresh huge-page
    mappings fault far less. Small arrays come from numpy too: the heap's free lists serve
    them, and np.empty is cheaper to call than torch.empty(...).numpy() (docs/performance.md,
    "The `numba` backend (CPU)", Outputs, has the timings)."""
    nbytes = count * dtype.itemsize
    if _SMALL_BYTES <= nbytes < _HUGE_BYTES:
        return torch.empty(count, dtype=_TORCH_DTYPES[dtype]).numpy()
    return np.empty(count, dtype)


#: Our large outputs are reused from step to step (output_pool.py says why).
OUTPUTS = OutputPool(_allocate)


def _mc_scratch(xv: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Zeroed scratch for the (M, C) kernels: per-block partial sums s1, s2 (blocks, C) in x's
    dtype and their float64 (2, C) merge (allocated here, not in the kernels, so that
    compiling them needs no numpy allocation function)."""
    rows, channels = xv.shape
    s1, s2 = np.zeros((2, kernels.mc_blocks.py_func(rows, channels)[1], channels), xv.dtype)
    return s1, s2, np.zeros((2, channels))


def _forward(xv, rv, *, activation, training, write, gamma, beta, eps, channel: ChannelParams, threads=None):
    """Run the forward kernel of xv's view. `training`: compute the batch's statistics into
    `channel`, else normalize with it; `write`: produce y; `threads`: how many threads run
    it (numba_kernels.threads of xv's size by default). Returns (y or None, m2)."""
    m2 = np.empty(xv.shape[1], xv.dtype)
    y = OUTPUTS.empty(xv.shape, xv.dtype) if write else xv  # never written when not `write`
    has_res = rv is not None
    threads = kernels.threads(xv.size) if threads is None else threads
    run, lo, hi = kernels.kernel("ncl_forward" if xv.ndim == 3 else "mc_forward", threads, has_res, activation, xv.dtype)
    args = (xv, xv if rv is None else rv, has_res, lo, hi, training, write, gamma, beta, eps, *channel, m2, y)
    if xv.ndim == 3:
        # (C, 2, L) float64 lane scratch for the statistics of rows shorter than LANES (the
        # kernel zeroes what it uses), (C, 2, 0) for longer rows
        _, channels, length = xv.shape
        lanes = np.empty((channels, 2, length if length < kernels.LANES else 0), np.float64)
        run(*args, lanes, np.empty((2, channels)))
    else:
        run(*args, *_mc_scratch(xv))
    return (y if write else None), m2


def _backward(
    dyv, xv, rv, *, activation, channel: ChannelParams, reduce, write, local_means, mean_d, mean_dxh, threads=None
):  # fmt: skip
    """Run the backward kernel: `reduce` the sums (sum_d, sum_dxh), and with `local_means`
    write their means into mean_d and mean_dxh; `write` dx (and dres with a residual) from
    mean_d and mean_dxh; `threads` as for `_forward`. Returns (sum_d, sum_dxh, dx or None,
    dres or None) as numpy."""
    channels = xv.shape[1]
    sum_d, sum_dxh = np.zeros((2, channels), xv.dtype)
    dx = OUTPUTS.empty(xv.shape, xv.dtype) if write else xv  # never written when not `write`
    dres = OUTPUTS.empty(xv.shape, xv.dtype) if write and rv is not None else dx
    has_res = rv is not None
    threads = kernels.threads(xv.size) if threads is None else threads
    run, lo, hi = kernels.kernel("ncl_backward" if xv.ndim == 3 else "mc_backward", threads, has_res, activation, xv.dtype)
    args = (dyv, xv, xv if rv is None else rv, has_res, lo, hi, *channel,
            reduce, write, local_means, sum_d, sum_dxh, mean_d, mean_dxh, dx, dres)  # fmt: skip
    if xv.ndim == 3:
        run(*args, np.empty((2, channels)))
    else:
        run(*args, *_mc_scratch(xv))
    return sum_d, sum_dxh, (dx if write else None), (dres if write and rv is not None else None)


class Case(NamedTuple):
    """What selects one compiled variant of the kernels (numba_kernels.py), in plain values
    (numba_warmup's request for it): the dtype ("float32" or "float64"), the canonical view's
    rank (3: (N, C, L), 2: (M, C)), threads or not, residual or not, and the activation's
    kind (numba_kernels.KINDS)."""

    dtype: str
    ndim: int
    threads: bool
    has_res: bool
    kind: str


def compile_case(dtype: str, ndim: int, threads: bool, has_res: bool, kind: str) -> None:
    """Compile (or load from numba's cache) a `Case`'s forward and backward kernels by running
    them on a tiny input of its dtype and rank (numba compiles for argument types, not
    sizes). What numba_warmup runs, in its helper process and here, and the test suite's
    precompile."""
    xv = np.ones((2, 3, 4) if ndim == 3 else (4, 3), np.dtype(dtype))
    rv = xv.copy() if has_res else None
    ones, count = np.ones(3, xv.dtype), kernels.threads(kernels.PARALLEL_NUMEL, 2) if threads else 1
    channel = ChannelParams.empty(3, xv.dtype)
    activation = kernels.ACTIVATION_OF_KIND[kind]
    _forward(xv, rv, activation=activation, training=True, write=True, gamma=ones, beta=ones, eps=1e-5,
             channel=channel, threads=count)  # fmt: skip
    _backward(xv, xv, rv, activation=activation, channel=channel, reduce=True, write=True, local_means=True,
              mean_d=ones.copy(), mean_dxh=ones.copy(), threads=count)  # fmt: skip


class NumbaBackend(Backend):
    """Fused numba kernels on CPU for contiguous fp32/fp64 views; aten takes everything else."""

    name = "numba"
    # The piecewise activations (ReLU, ReLU6, Hardswish) are compares, selects and multiplies
    # in vector code: fused, they save the activation's own passes over memory
    # (docs/performance.md, "The `numba` backend (CPU)", the ReLU6 and Hardswish table). The
    # smooth ones would cost a scalar libm call per value here (numba has no vector math
    # library on this build): our identity kernel then torch's vectorized op is faster (same
    # section, Smooth activations are not fused), so the kernels have no case for them.
    fused_activations = tuple(kernels.FUSED)
    auto_devices = ("cpu",)

    def unavailable(self) -> str | None:
        return kernels.MISSING

    def unsupported(self, x: Tensor) -> str | None:
        if x.device.type != "cpu":
            return f"numba runs on the CPU only, the input is on {x.device}"
        if x.dtype not in DTYPE_NAMES:
            return f"numba kernels take float32 and float64, the input is {x.dtype}"
        if x.numel() == 0:
            return "the input is empty"
        # kind_of checks the memory order of 3-D and wider input; (N, C) must be contiguous too
        kind = layout.kind_of(x)
        if kind is None or (x.dim() == 2 and not x.is_contiguous()):
            return "the input is neither contiguous nor channels-last (a strided view)"
        return None

    def preferred(self, x: Tensor, mode: Mode) -> bool:
        # While a graph is traced the alternative is Inductor's code, not torch's kernel, and
        # Inductor's is slower than our op on channels-last input as on contiguous input
        # (docs/performance.md, "Which backend runs: the dispatch rules"): there the
        # contiguous crossover holds for every layout.
        crossover = CROSSOVER_NUMEL
        if x.dim() > 2 and not mode.compiling:
            if not x.is_contiguous():
                crossover = CROSSOVER_NUMEL_CHANNELS_LAST
            elif 1 < math.prod(x.shape[2:]) < SHORT_ROW:
                crossover = CROSSOVER_NUMEL_SHORT_ROWS
        return x.numel() >= crossover

    def ready(self, x: Tensor, activation: str | None, has_residual: bool, threads: bool | None = None) -> bool:
        """Whether this call's kernels are compiled (numba_warmup.py: until then `auto` runs
        torch's kernel and they compile in the background); `threads`: whether the case is
        the threaded one (None: the one x's size runs)."""
        if threads is None:
            threads = kernels.threads(x.numel()) > 1
        kind = kernels.FUSED[activation if activation in self.fused_activations else None][0]
        case = Case(DTYPE_NAMES[x.dtype], 3 if layout.kind_of(x) == "ncl" else 2, threads, has_residual, kind)
        return numba_warmup.ready(numba_warmup.Request(__name__, "compile_case", case))

    def prepare(self, x: Tensor, activation: str | None, has_residual: bool) -> None:
        """In the background mode: both thread counts when x's size is symbolic (choosing
        one would guard on it)."""
        if numba_warmup.blocking():
            return  # the op compiles its kernels at its first run
        size = x.numel()
        for threads in (kernels.threads(size) > 1,) if isinstance(size, int) else (False, True):
            self.ready(x, activation, has_residual, threads)

    def takes_plain_evaluation(self, x: Tensor) -> bool:
        """Plain evaluation is one affine pass with nothing to fuse: below _HUGE_BYTES torch's
        own pass is as fast and costs less to call; above, every fresh output is a new mapping
        that torch's pass faults in page by page, and ours, from the output pool, does not."""
        return x.numel() * x.element_size() >= _HUGE_BYTES

    # The whole op (base.py) -------------------------------------------------------------
    def forward(self, x, weight, bias, residual, running_mean, running_var, eps, activation, training):
        """One forward kernel call (base.py): statistics, normalization, activation and
        residual."""
        xv = _np(x)
        rv = None if residual is None else _np(residual)
        acc = x.dtype  # float32 and float64 accumulate in their own dtype (channel_params.acc_dtype)
        channels = xv.shape[1]
        gamma, beta = _vec(weight, channels, acc, 1.0), _vec(bias, channels, acc, 0.0)
        params = np.empty((N_PARAMS, channels), xv.dtype)
        if not training:  # center = running mean, xhat_shift = 0
            params[CENTER] = _vec(running_mean, channels, acc, 0.0)
            params[VAR] = _vec(running_var, channels, acc, 0.0)
            params[INVSTD] = 1.0 / np.sqrt(params[VAR] + eps)
            params[SCALE], params[SHIFT], params[XHAT_SHIFT] = gamma * params[INVSTD], beta, 0.0
        y, m2 = _forward(
            xv, rv, activation=activation, training=training, write=True, gamma=gamma, beta=beta, eps=eps,
            channel=ChannelParams(*params[: XHAT_SHIFT + 1]),
        )  # fmt: skip
        if training:
            params[VAR] = m2 / (xv.size // channels)  # over the values per channel
        return torch.from_numpy(y), torch.from_numpy(params)

    def backward(
        self, dy, x, residual, params, training, activation, needs, weight_dtype, bias_dtype, sums_to_means=None
    ):  # fmt: skip
        """One backward kernel call (base.py): the reductions and dx, dresidual together; two
        with `sums_to_means` (the sums leave the kernel to be made means over every
        process's batch, then dx is written from those)."""
        need_x, need_w, need_b, need_r = needs
        xv, dyv, p = _np(x), _np(dy), _np(params)
        rv = None if residual is None else _np(residual)
        channel = ChannelParams(*p[: XHAT_SHIFT + 1])
        # the kernel writes (mean_d, mean_dxh) from the batch statistics; evaluation's are 0
        mean_d, mean_dxh = np.zeros((2, xv.shape[1]), xv.dtype)
        write = need_x or need_r
        reduce = need_w or need_b or (training and write)
        in_one_call = sums_to_means is None or not (training and write)
        sum_d, sum_dxh, dxv, dresv = _backward(
            dyv, xv, rv, activation=activation, channel=channel, reduce=reduce, write=write and in_one_call,
            local_means=training and in_one_call, mean_d=mean_d, mean_dxh=mean_dxh,
        )  # fmt: skip
        if not in_one_call:
            means = sums_to_means(torch.from_numpy(np.stack([sum_d, sum_dxh])))
            mean_d, mean_dxh = means.to(_TORCH_DTYPES[xv.dtype]).numpy()
            _, _, dxv, dresv = _backward(
                dyv, xv, rv, activation=activation, channel=channel, reduce=False, write=True, local_means=False,
                mean_d=np.ascontiguousarray(mean_d), mean_dxh=np.ascontiguousarray(mean_dxh),
            )  # fmt: skip
        return (
            torch.from_numpy(dxv) if need_x else None,
            torch.from_numpy(sum_dxh).to(weight_dtype) if need_w else None,
            torch.from_numpy(sum_d).to(bias_dtype) if need_b else None,
            torch.from_numpy(dresv) if need_r else None,
        )

    # The kernel contract (base.py) ----------------------------------------------------
    def stats(self, x):
        xv = _np(x)
        ones, zeros = np.ones(xv.shape[1], xv.dtype), np.zeros(xv.shape[1], xv.dtype)
        channel = ChannelParams.empty(xv.shape[1], xv.dtype)
        _, m2 = _forward(
            xv, None, activation=None, training=True, write=False, gamma=ones, beta=zeros, eps=0.0, channel=channel
        )  # fmt: skip
        mean = torch.from_numpy(channel.center)
        return torch.full_like(mean, layout.values_per_channel(x)), mean, torch.from_numpy(m2)

    def apply(self, x, mean, scale, shift, activation=None, residual=None):
        xv = _np(x)
        zeros = np.zeros(xv.shape[1], xv.dtype)
        channel = ChannelParams.plain(_np(mean), _np(scale), _np(shift), invstd=zeros)  # invstd: not read
        y, _ = _forward(
            xv, None if residual is None else _np(residual), activation=activation, training=False, write=True,
            gamma=zeros, beta=zeros, eps=0.0, channel=channel,
        )  # fmt: skip
        return torch.from_numpy(y)

    def backward_reduce(self, dy, x, mean, invstd, scale, shift, activation=None, residual=None):
        channel = ChannelParams.plain(_np(mean), _np(scale), _np(shift), _np(invstd))
        unused = np.zeros_like(channel.center)  # mean_d, mean_dxh: neither read nor written
        sum_d, sum_dxh, _, _ = _backward(
            _np(dy), _np(x), None if residual is None else _np(residual), activation=activation, channel=channel,
            reduce=True, write=False, local_means=False, mean_d=unused, mean_dxh=unused,
        )  # fmt: skip
        return torch.from_numpy(sum_d), torch.from_numpy(sum_dxh)

    def backward_apply(
        self, dy, x, mean, invstd, scale, shift, mean_d, mean_d_xhat, activation=None, residual=None
    ):
        channel = ChannelParams.plain(_np(mean), _np(scale), _np(shift), _np(invstd))
        _, _, dx, dres = _backward(
            _np(dy), _np(x), None if residual is None else _np(residual), activation=activation, channel=channel,
            reduce=False, write=True, local_means=False, mean_d=_np(mean_d), mean_dxh=_np(mean_d_xhat),
        )  # fmt: skip
        return torch.from_numpy(dx), None if dres is None else torch.from_numpy(dres)
