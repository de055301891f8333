"""The triton backend's traceable ops (triton_ops.py).

Without a GPU, two things are checked here:

- in eager mode (Triton's CPU interpreter), the ops give bitwise what the eager path gives,
  forward and backward through their registered autograd formula;
- traced as torch.compile traces them (Dynamo's compile session, AOT autograd, fake tensors),
  in a second process where Triton does not interpret and a stand-in driver names an sm_90
  GPU (so that torch's analysis of which arguments each kernel writes compiles the kernels
  for it, as on a real GPU): the forward and backward graphs hold the kernels themselves and
  nothing opaque, the launches eager makes, each written tensor passed to its kernel once,
  and outputs with eager's strides.

With CUDA, the compiled module is also run: compiled equals eager over training steps, under
CUDA graphs too, and opcheck passes (scripts/gpu_check.sh runs this file there).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import subprocess
import sys

import pytest
import torch

import batchnorm as bn
from batchnorm import backends, layout, ops
from batchnorm.backends import triton_gpu

pytest.importorskip("triton")
if triton_gpu.interpreting() or torch.cuda.is_available():
    from batchnorm import triton_ops  # noqa: F401  (registers the ops; ops.py does so on a GPU)

EPS = 1e-5
# (name, shape, channels_last, training, activation, residual, affine): the single-read and
# tiled paths, both canonical views, evaluation, with and without the extras.
TRACED = [
    ("single-read, BN + add + ReLU", (4, 3, 5), False, True, "relu", True, True),
    ("tiled", (4, 8, 4096), False, True, None, False, True),
    ("tiled channels-last, no affine", (16, 8, 32, 32), True, True, None, False, False),
    ("evaluation, tiled, add + ReLU", (4, 8, 4096), False, False, "relu", True, True),
    ("evaluation, single-read, 2-D", (64, 10), False, False, "silu", False, True),
]
LAUNCHES = {  # (forward, backward) kernels, as eager launches them
    "single-read, BN + add + ReLU": (["single_read_forward_kernel"], ["single_read_backward_kernel"]),
    "tiled": (["stats_partials_kernel", "merge_stats_kernel", "apply_kernel"],
              ["grad_partials_kernel", "merge_sums_kernel", "backward_apply_kernel"]),
    "tiled channels-last, no affine": (["stats_partials_kernel", "merge_stats_kernel", "apply_kernel"],
                                       ["grad_partials_kernel", "merge_sums_kernel", "backward_apply_kernel"]),
    "evaluation, tiled, add + ReLU": (["merge_stats_kernel", "apply_kernel"],
                                      ["grad_partials_kernel", "merge_sums_kernel", "backward_apply_kernel"]),
    "evaluation, single-read, 2-D": (["merge_stats_kernel", "apply_kernel"], ["single_read_backward_kernel"]),
}  # fmt: skip


def _inputs(shape, channels_last, activation, residual, affine, dtype=torch.float32, requires_grad=True):
    g = torch.Generator().manual_seed(len(shape) * 7 + shape[1])
    c = shape[1]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = (torch.randn(shape, generator=g, dtype=dtype) * 2 + 1).contiguous(memory_format=fmt)
    res = torch.randn(shape, generator=g, dtype=dtype).contiguous(memory_format=fmt) if residual else None
    w = torch.rand(c, generator=g, dtype=dtype) + 0.5 if affine else None
    b = torch.randn(c, generator=g, dtype=dtype) if affine else None
    rm, rv = torch.randn(c, generator=g, dtype=dtype), torch.rand(c, generator=g, dtype=dtype) + 0.5
    grads = [t.requires_grad_(requires_grad) for t in (x, w, b, res) if t is not None]
    return (x, w, b, res, rm, rv), grads


# Eager, in Triton's interpreter ---------------------------------------------------------------
@pytest.mark.skipif(not (triton_gpu.interpreting() or torch.cuda.is_available()), reason="no GPU and no interpreter")
@pytest.mark.parametrize("training", [True, False])
def test_eager_call_equals_the_eager_path_bitwise(training):
    """The op's body and autograd formula run the same kernels as ops.py's eager Function."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    outs = []
    for path in ("op", "function"):
        (x, w, b, res, rm, rv), leaves = _inputs((6, 4, 9), False, "relu", True, True)
        x, w, b, res, rm, rv = (t.to(device).detach().requires_grad_(t.requires_grad) for t in (x, w, b, res, rm, rv))
        args = (x, w, b, res, rm, rv, EPS, "relu", training)
        if path == "op":
            y, params = torch.ops.batchnorm.triton_batch_norm(*args, "triton")
        else:
            y, params = ops._BatchNormFunction.apply(*args, backends.get("triton"))
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(device)
        grads = torch.autograd.grad(y, (x, w, b, res), dy)
        outs.append([y, params, *grads])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_a_refused_registration_warns_and_keeps_the_opaque_op(monkeypatch):
    monkeypatch.setattr(ops, "_triton_ops_wanted", lambda: True)
    monkeypatch.delattr(bn, "triton_ops", raising=False)
    monkeypatch.setitem(sys.modules, "batchnorm.triton_ops", None)  # import fails
    with pytest.warns(UserWarning, match="traceable ops are not registered"):
        assert ops._register_triton_ops() is False


# Traced, as on an sm_90 GPU -------------------------------------------------------------------
def _kernel_name(kernel_idx: int) -> str:
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    k = kernel_side_table.get_kernel(kernel_idx)
    while not inspect.isfunction(k):  # an Autotuner or JITFunction around the Python function
        k = k.fn
    return k.__name__


def _graph_report(gm) -> dict:
    """The kernels a graph launches, its other ops, and the written tensors passed twice."""
    kernels, ops_, written_twice = [], [], []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is torch.ops.higher_order.triton_kernel_wrapper_functional:
            name = _kernel_name(node.kwargs["kernel_idx"])
            kernels.append(name)
            passed = node.kwargs["kwargs"]
            for arg in node.kwargs["tensors_to_clone"]:
                others = [k for k, v in passed.items() if k != arg and v is passed[arg]]
                if others:
                    written_twice.append(f"{name}: {arg} also as {others}")
        else:
            ops_.append(str(node.target))
    return {"kernels": kernels, "ops": ops_, "written_twice": written_twice}


@contextlib.contextmanager
def _compile_session():
    """What torch.compile holds while it compiles: torch.compiler.is_compiling() is true."""
    before = torch.compiler._is_compiling_flag
    torch.compiler._is_compiling_flag = True
    try:
        yield
    finally:
        torch.compiler._is_compiling_flag = before


def _trace(case, mode: "FakeTensorMode", symbolic_batch: bool) -> dict:
    """One TRACED case traced as torch.compile does, on fake tensors of `mode`; with
    `symbolic_batch`, x's and the residual's batch size is a symbol, as with dynamic=True."""
    from torch._dynamo.source import ConstantSource
    from torch._functorch.aot_autograd import aot_function
    from torch.fx.experimental.symbolic_shapes import DimDynamic, StatelessSymbolicContext

    name, shape, channels_last, training, activation, residual, affine = case

    def fake(t, source):
        if t is None:
            return None
        if not symbolic_batch:
            return mode.from_tensor(t)
        batch = DimDynamic.DYNAMIC if t.dim() == len(shape) else DimDynamic.STATIC  # x, residual
        dims = [batch] + [DimDynamic.STATIC] * (t.dim() - 1)
        context = StatelessSymbolicContext(dynamic_sizes=dims)
        return mode.from_tensor(t, source=ConstantSource(source), symbolic_context=context)

    real, _ = _inputs(shape, channels_last, activation, residual, affine)
    args = [fake(t, source) for t, source in zip(real, ("x", "w", "b", "res", "rm", "rv"))]
    graphs = []

    def keep(gm, _inputs):
        graphs.append(gm)
        return gm

    def call(x, w, b, res, rm, rv):
        return torch.ops.batchnorm.triton_batch_norm(x, w, b, res, rm, rv, EPS, activation, training, "triton")

    with mode, _compile_session():
        leaves = [t for t in args if t is not None and t.requires_grad]
        y, params = aot_function(call, fw_compiler=keep, bw_compiler=keep, dynamic=symbolic_batch)(*args)
        grads = torch.autograd.grad(y, leaves, torch.ones_like(y))
    if symbolic_batch:
        return {"guards": [str(g.expr) for g in mode.shape_env.guards]}
    return {
        "forward": _graph_report(graphs[0]),
        "backward": _graph_report(graphs[1]),
        "y_stride": list(y.stride()),
        "expected_y_stride": list(layout.empty_output(args[0]).stride()),
        "grad_strides": [list(g.stride()) for g in grads],
        "expected_grad_strides": [list(t.stride()) for t in leaves],
    }


def _trace_report() -> dict:
    """Each TRACED case traced with static sizes, and with a symbolic batch size."""
    import triton
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    from triton.backends.compiler import GPUTarget

    class Sm90:
        """Stands in for the CUDA driver: torch asks it which GPU to compile its analysis for."""

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    triton.runtime.driver.set_active(Sm90())
    from batchnorm import triton_ops  # noqa: F401  (registers the ops)

    report = {}
    for case in TRACED:
        report[case[0]] = _trace(case, FakeTensorMode(), symbolic_batch=False)
        report[case[0]].update(_trace(case, FakeTensorMode(shape_env=ShapeEnv()), symbolic_batch=True))
    return report


@pytest.fixture(scope="module")
def traced():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    src = os.path.join(os.path.dirname(bn.__file__), os.pardir)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.abspath(src), env.get("PYTHONPATH")) if p)
    run = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("case", [c[0] for c in TRACED])
def test_compiled_graphs_hold_the_kernels_themselves(traced, case):
    report = traced[case]
    forward, backward = LAUNCHES[case]
    assert report["forward"]["kernels"] == forward
    assert report["backward"]["kernels"] == backward
    for graph in ("forward", "backward"):
        ops_ = report[graph]["ops"]
        assert not [op for op in ops_ if "batchnorm" in op or "batch_norm" in op], ops_
        assert report[graph]["written_twice"] == []


@pytest.mark.slow
@pytest.mark.parametrize("case", [c[0] for c in TRACED])
def test_a_new_batch_size_in_the_same_range_reuses_the_graph(traced, case):
    """With a symbolic batch size, the host-side sizing (tiles, grids, the single-read choice)
    records range guards only: no guard pins the batch size to one value."""
    guards = traced[case]["guards"]
    assert not [g for g in guards if g.startswith(("Eq(", "Ne(")) or "==" in g], guards


@pytest.mark.slow
@pytest.mark.parametrize("case", [c[0] for c in TRACED])
def test_traced_outputs_have_eagers_strides(traced, case):
    report = traced[case]
    assert report["y_stride"] == report["expected_y_stride"]
    assert report["grad_strides"] == report["expected_grad_strides"]


# On a GPU ---------------------------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_ops_are_registered_and_used_by_compiled_graphs_on_a_gpu():
    assert ops.TRITON_OPS


@cuda
@pytest.mark.parametrize("training", [True, False])
def test_opcheck_on_a_gpu(training):
    (x, w, b, res, rm, rv), _ = _inputs((8, 16, 33), False, "relu", True, True, requires_grad=True)
    args = [t.cuda().detach().requires_grad_(t.requires_grad) for t in (x, w, b, res, rm, rv)]
    torch.library.opcheck(torch.ops.batchnorm.triton_batch_norm, (*args, EPS, "relu", training, "triton"))


def _cuda_steps(mode: str | None, channels_last: bool, steps: int = 3):
    """(eager, compiled) per step: y, dx, dweight, dbias, running_mean, running_var, count."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    xs = [(torch.randn(16, 32, 12, 12, generator=g) * 2 + 1).cuda().contiguous(memory_format=fmt) for _ in range(steps)]
    rs = [torch.randn(16, 32, 12, 12, generator=g).cuda().contiguous(memory_format=fmt) for _ in range(steps)]
    eager = bn.BatchNormAct(bn.BatchNorm2d(32, backend="triton"), "relu").cuda()
    compiled_module = bn.BatchNormAct(bn.BatchNorm2d(32, backend="triton"), "relu").cuda()
    compiled_module.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_module, fullgraph=True, mode=mode)
    results = []
    for module, call in ((eager, eager), (compiled_module, compiled)):
        per_step = []
        for x, r in zip(xs, rs):
            torch.compiler.cudagraph_mark_step_begin()  # a new training step (CUDA graphs' trees)
            x = x.clone().requires_grad_()
            y = call(x, residual=r)
            y.backward(torch.ones_like(y))
            # clones: under CUDA graphs a replay overwrites the previous outputs in place
            norm = module.bn
            per_step.append([y.detach().clone(), x.grad.clone(), norm.weight.grad.clone(), norm.bias.grad.clone(),
                             norm.running_mean.clone(), norm.running_var.clone(),
                             norm.num_batches_tracked.clone()])  # fmt: skip
            module.zero_grad()
        results.append(per_step)
    return results


@cuda
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_compiled_equals_eager_on_a_gpu(mode, channels_last):
    """Inductor (and CUDA graphs with reduce-overhead) over three training steps."""
    eager, compiled = _cuda_steps(mode, channels_last)
    for e_step, c_step in zip(eager, compiled):
        for e, c in zip(e_step, c_step):
            torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)


@cuda
def test_dynamic_batch_sizes_in_one_range_share_a_graph_on_a_gpu():
    """dynamic=True: batch sizes whose N L rounds up to the same power of two (the single-read
    block) run one graph, and give eager's results."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager = bn.BatchNormAct(bn.BatchNorm2d(32, backend="triton"), "relu").cuda()
    compiled_module = bn.BatchNormAct(bn.BatchNorm2d(32, backend="triton"), "relu").cuda()
    compiled = torch.compile(compiled_module, dynamic=True, fullgraph=True)
    g = torch.Generator().manual_seed(5)
    for n in (16, 20, 24):  # N L = 2304, 2880, 3456: all round up to 4096
        x = torch.randn(n, 32, 12, 12, generator=g).cuda()
        for module in (eager, compiled):
            y = module(x.clone().requires_grad_())
            y.sum().backward()
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)
    for got, want in zip(compiled_module.state_dict().values(), eager.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2


if __name__ == "__main__":  # the traced half of the tests, in a process of its own
    print(json.dumps(_trace_report()))
