"""Our layer against torch's own, on the cases PyTorch tests its batch norm with.

The cases come with the torch wheel: `module_db`'s entries for nn.BatchNorm1d/2d/3d (the
constructor arguments and inputs PyTorch's module tests use) and the sample inputs of the
`nn.functional.batch_norm` OpInfo (momentum -1.2 and -1.0, eps 0.5 and 0.6, one channel,
the empty 1-D batch). Each runs at its own small size, where `auto` takes torch's kernel,
and at a fast-path size (the same arguments with a batch large enough that `auto` takes
the numba kernels), in fp32 and fp64, training and evaluation: outputs, every gradient and
the running buffers must be torch's. Then the rules around them: half-precision modules,
torch's error types, and per-channel tensors of odd shapes.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import batchnorm as bn
from batchnorm.backends import numba_cpu

common_modules = pytest.importorskip("torch.testing._internal.common_modules")
common_methods = pytest.importorskip("torch.testing._internal.common_methods_invocations")

OURS = {torch.nn.BatchNorm1d: bn.BatchNorm1d, torch.nn.BatchNorm2d: bn.BatchNorm2d, torch.nn.BatchNorm3d: bn.BatchNorm3d}
MODULES = [m for m in common_modules.module_db if m.module_cls in OURS]
FUNCTIONAL = [o for o in common_methods.op_db if o.name == "nn.functional.batch_norm" and o.variant_test_name == ""]
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: dict(rtol=1e-9, atol=1e-11)}
FAST = numba_cpu.CROSSOVER_NUMEL  # from this many elements `auto` runs numba on contiguous input


def _enlarged(x: torch.Tensor) -> torch.Tensor:
    """A random input like x (same channels and spatial size) with a batch of at least FAST
    elements; x itself when it has no batch to enlarge."""
    if x.dim() < 2 or x.numel() == 0:
        return x
    per_example = x[0].numel()
    n = max(x.shape[0], math.ceil(FAST / per_example))
    big = torch.randn((n, *x.shape[1:]), dtype=x.dtype) * 3 + 1
    return big.requires_grad_(x.requires_grad)


def _same(ours, theirs, dtype, what, truth=None):
    """ours equals torch's result `theirs`: to fp64 rounding in fp64; in lower precision
    either within TOL or, where both round differently over a large batch, no further from
    the float64 `truth` than twice torch's own error (plus a relative 1e-6 of its scale)."""
    if theirs is None:
        assert ours is None, what
        return
    if truth is None or dtype == torch.float64 or ours.numel() == 0:
        torch.testing.assert_close(ours, theirs, **TOL.get(dtype, {}), msg=lambda m: f"{what}: {m}")
        return
    truth = truth.double()
    ours_error = float((ours.double() - truth).abs().max())
    torch_error = float((theirs.double() - truth).abs().max())
    floor = 1e-6 * float(truth.abs().max()) + 1e-30
    assert ours_error <= 2 * torch_error + floor, f"{what}: ours {ours_error:.3g} off float64, torch {torch_error:.3g}"


def _module_cases():
    for info in MODULES:
        for dtype in (torch.float32, torch.float64):
            for training in (True, False):
                inputs = info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True, training=training)
                for k, module_input in enumerate(inputs):
                    for size in ("small", "fast"):
                        yield pytest.param(info.module_cls, module_input, dtype, training, size,
                                           id=f"{info.name}-{k}-{dtype}-{'train' if training else 'eval'}-{size}")  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("cls, module_input, dtype, training, size", list(_module_cases()))
def test_module_db_cases_give_torchs_results(cls, module_input, dtype, training, size):
    args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
    torch.manual_seed(0)
    theirs = cls(*args, **kwargs).to(dtype)
    with torch.no_grad():  # parameters and running statistics that are not the trivial ones
        for t in list(theirs.parameters()) + [b for b in theirs.buffers() if b.is_floating_point()]:
            t.copy_(torch.rand_like(t) + 0.5)
    ours = OURS[cls](*args, **kwargs).to(dtype)
    ours.load_state_dict(theirs.state_dict())
    theirs.train(training)
    ours.train(training)
    truth = copy.deepcopy(theirs).double()  # torch's layer in float64: what both round
    x = module_input.forward_input.args[0]
    x = x if size == "small" else _enlarged(x)
    xs = [x.detach().clone().requires_grad_() for _ in range(2)] + [x.detach().double().requires_grad_()]
    for step in range(2):  # a second step reads what the first wrote into the buffers
        y_ours, y_theirs, y_truth = ours(xs[0]), theirs(xs[1]), truth(xs[2])
        _same(y_ours, y_theirs, dtype, f"output, step {step}", y_truth)
        if y_theirs.numel():
            dy = torch.randn_like(y_truth)
            y_ours.backward(dy.to(dtype))
            y_theirs.backward(dy.to(dtype))
            y_truth.backward(dy)
            _same(xs[0].grad, xs[1].grad, dtype, "input gradient", xs[2].grad)
    for (name, a), (_, b), (_, t) in zip(ours.named_parameters(), theirs.named_parameters(), truth.named_parameters()):
        _same(a.grad, b.grad, dtype, f"{name} gradient", t.grad)
    for (name, a), (_, b), (_, t) in zip(ours.named_buffers(), theirs.named_buffers(), truth.named_buffers()):
        assert a.dtype == b.dtype, name
        if a.is_floating_point():
            _same(a, b, dtype, name, t)
        elif x.numel() == 0:  # a documented deviation (docs/guide.md): torch counts an empty batch
            assert a.item() == 0, name
        else:
            assert torch.equal(a, b), name


def _functional_cases():
    for info in FUNCTIONAL:
        for dtype in (torch.float32, torch.float64):
            for k, sample in enumerate(info.sample_inputs("cpu", dtype, requires_grad=True)):
                for size in ("small", "fast"):
                    yield pytest.param(sample, dtype, size, id=f"{k}-{dtype}-{size}")


@pytest.mark.parametrize("sample, dtype, size", list(_functional_cases()))
def test_functional_opinfo_samples_give_torchs_results(sample, dtype, size):
    x = sample.input if size == "small" else _enlarged(sample.input)
    running_mean, running_var, weight, bias = sample.args
    calls = []
    for fn, precision in ((bn.functional.batch_norm, dtype), (torch.nn.functional.batch_norm, dtype),
                          (torch.nn.functional.batch_norm, torch.float64)):  # fmt: skip
        def arg(t, grad):
            return None if t is None else t.detach().to(precision).requires_grad_(grad)

        xi, w, b, rm, rv = arg(x, True), arg(weight, True), arg(bias, True), arg(running_mean, False), arg(running_var, False)
        y = fn(xi, rm, rv, w, b, **sample.kwargs)
        if y.numel():
            y.backward(torch.ones_like(y) + torch.arange(y.numel(), dtype=precision).view_as(y) % 3)
        calls.append((y, xi.grad, None if w is None else w.grad, None if b is None else b.grad, rm, rv))
    for what, ours, theirs, truth in zip(("output", "dx", "dweight", "dbias", "running_mean", "running_var"), *calls):
        _same(ours, theirs, dtype, what, truth)


# Half precision ------------------------------------------------------------------------
HALF_TOL = {torch.float16: dict(rtol=4e-3, atol=4e-3), torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4, 8, 3, 3), (64, 64, 8, 8)], ids=["small", "fast"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_a_half_module_gives_torchs_results(dtype, shape, memory_format):
    torch.manual_seed(0)
    theirs = torch.nn.BatchNorm2d(shape[1]).to(dtype)
    ours = bn.BatchNorm2d(shape[1]).to(dtype)
    truth = torch.nn.BatchNorm2d(shape[1]).double()
    x = (torch.randn(shape) * 2 + 1).to(dtype).to(memory_format=memory_format)
    for training in (True, True, False):
        for layer in (ours, theirs, truth):
            layer.train(training)
        xo, xt, x64 = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_(), x.double().requires_grad_()
        yo, yt, y64 = ours(xo), theirs(xt), truth(x64)
        assert yo.dtype == dtype and ours.running_mean.dtype == dtype
        torch.testing.assert_close(yo, yt, **HALF_TOL[dtype])
        dy = torch.randn_like(yt)
        yo.backward(dy)
        yt.backward(dy)
        y64.backward(dy.double())
        _same(xo.grad, xt.grad, dtype, "input gradient", x64.grad)
    for name in ("running_mean", "running_var"):
        _same(getattr(ours, name), getattr(theirs, name), dtype, name, getattr(truth, name))
    # a sum over the whole batch rounded to half: compared with float64, as torch's is
    _same(ours.weight.grad, theirs.weight.grad, dtype, "weight gradient", truth.weight.grad)
    _same(ours.bias.grad, theirs.bias.grad, dtype, "bias gradient", truth.bias.grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_statistics_accumulate_in_float32(dtype):
    """2^16 values of about 100 per channel: their sum (6.6e6) and sum of squares overflow
    float16 (largest 65504), so statistics summed in the input's dtype would be inf."""
    x = (100 + torch.randn(1, 2, 256, 256)).to(dtype)
    layer = bn.BatchNorm2d(2).to(dtype)
    y = layer(x)
    assert torch.isfinite(y).all()
    assert y.float().mean().abs() < 0.05 and (y.float().std() - 1).abs() < 0.05
    torch.testing.assert_close(layer.running_mean.float(), torch.full((2,), 10.0), rtol=1e-2, atol=0.05)


# torch's rules for arguments and errors -----------------------------------------------------
@pytest.mark.parametrize("momentum", [-1.2, 1.5, 0.0, 1.0])
@pytest.mark.parametrize("training", [True, False])
def test_any_momentum_torch_takes_is_taken(momentum, training):
    torch.manual_seed(0)
    theirs, ours = torch.nn.BatchNorm1d(3, momentum=momentum), bn.BatchNorm1d(3, momentum=momentum)
    theirs.train(training)
    ours.train(training)
    x = torch.randn(8, 3)
    torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)


BAD_PER_CHANNEL = {
    "running_mean size": dict(running_mean=torch.zeros(4), running_var=torch.ones(3)),
    "weight size": dict(running_mean=None, running_var=None, weight=torch.ones(5)),
    "bias size": dict(running_mean=None, running_var=None, bias=torch.ones(2)),
    "running_var dtype": dict(running_mean=torch.zeros(3), running_var=torch.ones(3, dtype=torch.float64)),
    "running_mean (C, 1)": dict(running_mean=torch.zeros(3, 1), running_var=torch.ones(3)),
}


@pytest.mark.parametrize("case", list(BAD_PER_CHANNEL))
def test_errors_torch_raises_as_runtime_error_are_runtime_errors(case):
    kwargs = BAD_PER_CHANNEL[case]
    x = torch.randn(4, 3)
    with pytest.raises(RuntimeError):  # torch's own, for the same call
        torch.nn.functional.batch_norm(x, training=True, **kwargs)
    with pytest.raises(RuntimeError) as as_torchs:
        bn.functional.batch_norm(x, training=True, **kwargs)
    assert isinstance(as_torchs.value, (ValueError, TypeError)), "still our documented type"


def test_integer_input_is_a_type_error_and_a_runtime_error():
    with pytest.raises(TypeError, match="floating-point") as error:
        bn.BatchNorm1d(3)(torch.ones(4, 3, dtype=torch.long))
    assert isinstance(error.value, RuntimeError)


def test_a_weight_shaped_c_by_1_is_read_as_c_like_torch():
    x = torch.randn(6, 3)
    w, b = torch.rand(3, 1) + 0.5, torch.randn(3, 1)
    ours = bn.functional.batch_norm(x, None, None, w, b, training=True)
    torch.testing.assert_close(ours, torch.nn.functional.batch_norm(x, None, None, w, b, training=True))


@pytest.mark.parametrize("training", [True, False])
def test_the_empty_one_dimensional_batch_is_empty_like_torchs(training):
    x = torch.randn(0, requires_grad=True)
    rm, rv = torch.zeros(0), torch.ones(0)
    y = bn.functional.batch_norm(x, rm, rv, training=training)
    assert y.shape == (0,) and y.shape == torch.nn.functional.batch_norm(x, rm, rv, training=training).shape


def _batch_norm_ops(fn, *args):
    """The aten batch-norm ops (with overload) a call dispatches to, in order."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "batch_norm" in func.name():
                self.ops.append(func.name())
            return func(*args, **(kwargs or {}))

    with Record() as record:
        fn(*args)
    return record.ops


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("track_running_stats", [True, False])
def test_the_aten_backend_runs_the_op_torchs_module_runs(training, track_running_stats):
    """torch's module calls torch.batch_norm, which on CUDA picks cuDNN; the aten backend must
    go the same way (native_batch_norm would skip cuDNN). The op each dispatches to is
    recorded on the CPU, where the same composite decides."""
    theirs = torch.nn.BatchNorm2d(4, track_running_stats=track_running_stats).train(training)
    ours = bn.BatchNorm2d(4, track_running_stats=track_running_stats, backend="aten").train(training)
    x = torch.randn(2, 4, 3, 3)
    assert _batch_norm_ops(ours, x) == _batch_norm_ops(theirs, x)  # the same kernel
    # and through the composite that chooses it: torch's functional calls torch.batch_norm
    from torch.overrides import TorchFunctionMode

    class Record(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.calls.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    with Record() as record:
        ours(x)
    assert "batch_norm" in record.calls and "native_batch_norm" not in record.calls, record.calls
