"""The layer under torch.compile and torch.export: no graph breaks, compiled equals eager over
several training steps for every extra, the custom operators pass opcheck, and an exported
evaluation program runs in a process where batchnorm cannot be imported.

Compiling is the slow part: most cases compile with the "aot_eager" backend (Dynamo's trace
and AOT autograd, what decides graph breaks and gradients), a few with Inductor.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import batchnorm as bn
from batchnorm import backends, ops
from batchnorm.backends import numba_cpu

EXTRAS = {
    "plain": {},
    "relu": {"activation": "relu"},
    "ghost": {"virtual_batch_size": 3},
    "biased": {"unbiased_running_var": False},
    "cumulative": {"momentum": None},
}
BACKENDS = ["aten", "numba", "reference"]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: every layer shares nn.py's forward, whose compiled
    versions would otherwise pile up across tests into Dynamo's recompile limit."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _build(cls, num_features: int, backend: str, extra: dict) -> torch.nn.Module:
    """cls(num_features, backend=backend, **extra), the "activation" of `extra` fused after it
    in a BatchNormAct (the layer a model holds for batch norm and its activation)."""
    extra = dict(extra)
    activation = extra.pop("activation", None)
    layer = cls(num_features, backend=backend, **extra)
    return layer if activation is None else bn.BatchNormAct(layer, activation)


def _norm(module: torch.nn.Module) -> torch.nn.Module:
    """The batch-norm layer of `module` (a BatchNormAct's `bn`, or the layer itself)."""
    return getattr(module, "bn", module)


def _pair(extra: dict, backend: str, channels_last: bool):
    """Two equal BatchNorm2d(4) layers (random affine parameters) and their inputs."""
    g = torch.Generator().manual_seed(0)
    eager = _build(bn.BatchNorm2d, 4, backend, extra)
    with torch.no_grad():
        _norm(eager).weight.copy_(torch.rand(4, generator=g) + 0.5)
        _norm(eager).bias.copy_(torch.randn(4, generator=g))
    compiled = _build(bn.BatchNorm2d, 4, backend, extra)
    compiled.load_state_dict(eager.state_dict())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    xs = [(torch.randn(6, 4, 5, 5, generator=g, dtype=torch.float64) * 2 + 1).float().contiguous(memory_format=fmt)
          for _ in range(3)]  # fmt: skip
    return eager, compiled, xs


def _step(module, x, residual=None, mask=None, activation=None):
    """One training step's forward and backward: (y, dx, dweight, dbias)."""
    x = x.clone().requires_grad_()
    kwargs = {k: v for k, v in (("residual", residual), ("mask", mask), ("activation", activation)) if v is not None}
    y = module(x, **kwargs)
    dy = torch.linspace(-1, 1, y.numel()).view_as(y)
    dx, dw, db = torch.autograd.grad(y, (x, _norm(module).weight, _norm(module).bias), dy)
    return y.detach(), dx, dw, db


def _assert_same_state(a, b):
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(_norm(a), name), getattr(_norm(b), name), rtol=2e-6, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("extra", list(EXTRAS))
def test_compiled_equals_eager_over_training_steps(extra, backend):
    eager, compiled, xs = _pair(EXTRAS[extra], backend, channels_last=extra == "relu")
    fn = torch.compile(compiled, backend="aot_eager", fullgraph=True)
    for x in xs:
        for got, want in zip(_step(fn, x), _step(eager, x)):
            torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
        _assert_same_state(compiled, eager)
    eager.eval(), compiled.eval()
    torch.testing.assert_close(fn(xs[0]), eager(xs[0]), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("backend", ["aten", "numba"])
@pytest.mark.slow
def test_renorm_compiles_without_breaks_and_equals_eager(backend):
    """Batch renormalization in one graph: its correction reads the running statistics that
    the same forward updates, and the gradients must still be eager's, step after step
    (warm-up, ramp, full limits)."""
    extra = {"renorm": bn.Renorm(r_max=1.5, d_max=0.5, warmup_steps=1, ramp_steps=2)}
    eager, compiled, xs = _pair(extra, backend, channels_last=False)
    fn = torch.compile(compiled, backend="aot_eager", fullgraph=True)
    for x in xs + xs:
        for got, want in zip(_step(fn, x), _step(eager, x)):
            torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
        _assert_same_state(compiled, eager)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [{"virtual_batch_size": 16}, {"renorm": bn.Renorm()}], ids=["ghost", "renorm"])
def test_ghost_batches_and_renorm_trace_our_op(extra):
    """Traced, ghost batches and renorm hand their statistics to the same custom op as plain
    batch norm (its `given` form), as they do in eager mode: the graph holds our op, once
    per ghost chunk, and not torch's batch norm."""
    layer = bn.BatchNorm2d(16, backend="numba", **extra)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(layer, backend=capture, fullgraph=True)(torch.randn(64, 16, 8, 8))
    (graph,) = graphs
    ops_called = [str(n.target) for n in graph.graph.nodes if n.op == "call_function"]
    assert ops_called.count("batchnorm.batch_norm") == (4 if "virtual_batch_size" in extra else 1), ops_called
    assert not any("batch_norm" in t and "batchnorm" not in t for t in ops_called), ops_called


@pytest.mark.slow
def test_residual_and_mask_compile_without_breaks():
    g = torch.Generator().manual_seed(1)
    x, r = torch.randn(6, 4, 5, 5, generator=g), torch.randn(6, 4, 5, 5, generator=g)
    mask = torch.rand(6, 5, 5, generator=g) > 0.3
    for kwargs in ({"residual": r}, {"mask": mask, "activation": "relu"}):
        # a BatchNormAct takes no mask: with one, the activation is named at the layer's call
        extra = {} if "mask" in kwargs else {"activation": "relu"}
        eager, compiled, _ = _pair(extra, "aten", channels_last=False)
        fn = torch.compile(compiled, backend="aot_eager", fullgraph=True)
        for got, want in zip(_step(fn, x, **kwargs), _step(eager, x, **kwargs)):
            torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
        _assert_same_state(compiled, eager)


# (layer, input shape, dtype, memory format, backend, extras): every module class, every
# float dtype (numba takes fp32/fp64; the half types run aten), both formats, fused extras.
LAYERS = [
    ("BatchNorm1d", (8, 5), torch.float32, None, "numba", {"activation": "relu"}),
    ("BatchNorm1d", (8, 5, 7), torch.float64, None, "numba", {"unbiased_running_var": False}),
    ("BatchNorm2d", (4, 5, 6, 6), torch.bfloat16, None, "auto", {"activation": "relu"}),
    ("BatchNorm2d", (4, 5, 6, 6), torch.float16, torch.channels_last, "aten", {}),
    ("BatchNorm2d", (4, 5, 6, 6), torch.float64, torch.channels_last, "numba", {"activation": "relu"}),
    ("BatchNorm3d", (2, 5, 3, 4, 4), torch.float32, None, "numba", {"momentum": None}),
    ("BatchNorm3d", (2, 5, 3, 4, 4), torch.float32, torch.channels_last_3d, "numba", {"activation": "silu"}),
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("name, shape, dtype, fmt, backend, extra", LAYERS, ids=lambda v: str(v))
def test_every_layer_dtype_and_format_compiles_without_breaks_and_equals_eager(name, shape, dtype, fmt, backend, extra):
    """Two training steps (output, input and parameter gradients, running statistics) and an
    evaluation step; a half-precision input keeps fp32 parameters, as torch's autocast does."""
    g = torch.Generator().manual_seed(len(shape))
    eager = _build(getattr(bn, name), shape[1], backend, extra)
    with torch.no_grad():
        _norm(eager).weight.copy_(torch.rand(shape[1], generator=g) + 0.5)
        _norm(eager).bias.copy_(torch.randn(shape[1], generator=g))
    if dtype == torch.float64:
        eager.double()
    compiled = _build(getattr(bn, name), shape[1], backend, extra).to(_norm(eager).weight.dtype)
    compiled.load_state_dict(eager.state_dict())
    fn = torch.compile(compiled, backend="aot_eager", fullgraph=True)
    tol = 2e-5 if dtype in (torch.float32, torch.float64) else 1e-2
    for _ in range(2):
        x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1).to(dtype)
        x = x if fmt is None else x.contiguous(memory_format=fmt)
        for got, want in zip(_step(fn, x), _step(eager, x)):
            torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        _assert_same_state(compiled, eager)
    eager.eval(), compiled.eval()
    torch.testing.assert_close(fn(x), eager(x), rtol=tol, atol=tol)
    assert torch._dynamo.explain(compiled)(x).graph_break_count == 0


def test_a_compiled_channels_last_layer_takes_our_op_from_the_contiguous_crossover():
    """Eager channels-last input below CROSSOVER_NUMEL_CHANNELS_LAST runs torch's kernel; a
    compiled graph would run Inductor's code instead, slower than our op: it takes the op."""
    x = torch.randn(numba_cpu.CROSSOVER_NUMEL // (64 * 16 * 16), 64, 16, 16).contiguous(memory_format=torch.channels_last)
    assert numba_cpu.CROSSOVER_NUMEL <= x.numel() < numba_cpu.CROSSOVER_NUMEL_CHANNELS_LAST
    assert bn.backends.resolve("auto", x).backend.name == "aten"
    graphs = []

    def capture(gm, _inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(bn.BatchNormAct(bn.BatchNorm2d(64), "relu"), backend=capture, fullgraph=True)(x)
    assert "batchnorm.batch_norm" in str(graphs[0].graph)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["auto", "numba"])
@pytest.mark.parametrize("numel", [numba_cpu.CROSSOVER_NUMEL, 1 << 23], ids=["crossover", "huge"])
def test_a_compiled_evaluation_graph_holds_torchs_batch_norm(backend, numel):
    """In evaluation a compiled graph holds torch's batch norm, at every size and whatever the
    backend, so that Inductor can fuse its affine pass with the ops around it (freezing folds
    it into the convolution); training takes our op. Same outputs as eager."""
    x = torch.randn(numel // (64 * 16 * 16), 64, 16, 16)
    layer = bn.BatchNormAct(bn.BatchNorm2d(64, backend=backend), "relu")
    layer.bn.running_mean.normal_()
    layer.bn.running_var.uniform_(0.5, 2.0)
    graphs = []

    def capture(gm, _inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    for training in (False, True):
        layer.train(training)
        torch._dynamo.reset()
        got = torch.compile(layer, backend=capture, fullgraph=True)(x)
        if not training:
            torch.testing.assert_close(got, layer(x), rtol=1e-6, atol=1e-6)
    evaluation, training = graphs
    assert "torch.batch_norm" in evaluation and "batchnorm.batch_norm" not in evaluation
    assert "batchnorm.batch_norm" in training


@pytest.mark.slow
def test_no_graph_breaks_in_a_converted_cnn():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10),
    )  # fmt: skip
    model, _ = bn.convert(model, fuse=True)
    small = torch.randn(4, 3, 8, 8)
    large = torch.randn(64, 3, 32, 32)  # 2^19 values per layer: the numba path
    assert bn.backends.resolve("auto", torch.empty(64, 8, 32, 32)).backend.name == "numba"
    for x in (small, large):
        for training in (True, False):
            model.train(training)
            explained = torch._dynamo.explain(model)(x)
            assert explained.graph_break_count == 0, explained.break_reasons
            torch._dynamo.reset()


@pytest.mark.slow
def test_tracing_our_code_warns_about_nothing():
    """Dynamo warns about code it traces that it does not trust (a functools.cache wrapper,
    say): a user compiling a model with our layers must see none of that from this package,
    at either size and in both modes."""
    import warnings

    layer = bn.BatchNorm2d(8)
    for shape in ((4, 8, 4, 4), (64, 8, 32, 32)):
        x = torch.randn(shape, requires_grad=True)
        for training in (True, False):
            layer.train(training)
            torch._dynamo.reset()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.compile(layer, backend="aot_eager", fullgraph=True)(x).sum().backward()
            ours = [str(w.message) for w in caught if "batchnorm" in str(w.message) or "batchnorm" in w.filename]
            assert not ours, ours
    torch._dynamo.reset()


@pytest.mark.slow
def test_inductor_numba_op_matches_eager_and_does_not_recompile_for_a_new_batch_size():
    eager, compiled, _ = _pair({"activation": "relu"}, "numba", channels_last=False)
    torch._dynamo.utils.counters.clear()
    fn = torch.compile(compiled, dynamic=True, fullgraph=True)
    g = torch.Generator().manual_seed(2)
    for n in (6, 9, 12):
        x = torch.randn(n, 4, 5, 5, generator=g)
        for got, want in zip(_step(fn, x), _step(eager, x)):
            torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    _assert_same_state(compiled, eager)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2


@pytest.mark.slow
def test_inductor_passes_convolutions_channels_last_outputs_and_gets_eagers_results():
    """Inductor lays convolution outputs out channels-last on the CPU; our ops take them as
    they are (flexible layout), next to a residual in the other format, and the compiled
    block still gives eager's outputs and gradients."""
    torch.manual_seed(6)
    conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
    layers = [bn.BatchNormAct(bn.BatchNorm2d(8, backend="numba"), "relu") for _ in range(2)]
    layers[1].load_state_dict(layers[0].state_dict())

    def block(layer, x, r):
        return layer(conv(x), residual=r).sum(dim=(2, 3))

    x, r = torch.randn(4, 3, 6, 6, requires_grad=True), torch.randn(4, 8, 6, 6, requires_grad=True)
    fn = torch.compile(block, fullgraph=True)
    got, want = fn(layers[0], x, r), block(layers[1], x, r)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    dy = torch.randn_like(got)
    inputs = (x, r, conv.weight, layers[0].bn.weight)
    grads_got = torch.autograd.grad(got, inputs, dy)
    grads_want = torch.autograd.grad(want, (x, r, conv.weight, layers[1].bn.weight), dy)
    for a, b in zip(grads_got, grads_want):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)
    _assert_same_state(layers[0], layers[1])


def test_training_steps_reuse_one_graph():
    """The guard's pending count keeps its type from call to call: a second step must not
    recompile the model."""
    eager, compiled, xs = _pair({"activation": "relu"}, "numba", channels_last=False)
    torch._dynamo.utils.counters.clear()
    fn = torch.compile(compiled, backend="aot_eager", fullgraph=True)
    for x in xs:
        _step(fn, x)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert compiled.bn.nonfinite_skips == 0 and int(compiled.bn.num_batches_tracked) == len(xs)


def test_non_finite_batch_is_refused_and_counted_in_a_compiled_graph():
    eager, compiled, xs = _pair({}, "numba", channels_last=False)
    fn = torch.compile(compiled, backend="aot_eager", fullgraph=True)
    bad = xs[0].clone()
    bad[0, 1, 0, 0] = float("nan")
    before = compiled.running_mean.clone(), compiled.running_var.clone()
    fn(bad)
    assert torch.equal(compiled.running_mean, before[0]) and torch.equal(compiled.running_var, before[1])
    assert int(compiled.num_batches_tracked) == 0
    with pytest.warns(RuntimeWarning, match="non-finite"):
        assert compiled.nonfinite_skips == 1
    fn(xs[1])
    assert int(compiled.num_batches_tracked) == 1 and compiled.nonfinite_skips == 1


# triton runs in its CPU interpreter here (slow): the fused case only
@pytest.mark.parametrize("backend, extras", [
    ("numba", (None, False)), ("numba", ("relu", True)), ("reference", (None, False)),
    ("reference", ("relu", True)), ("triton", ("relu", True)),
])  # fmt: skip
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.slow
def test_opcheck(backend, training, extras):
    be = bn.backends.get(backend)
    if be.unavailable() or be.unsupported(torch.empty(5, 3, 7)):  # triton: on CPU only in its interpreter
        pytest.skip(f"{backend} cannot run here: {be.unavailable() or be.unsupported(torch.empty(5, 3, 7))}")
    activation, with_residual = extras
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, 7, generator=g, requires_grad=True)
    w = (torch.rand(3, generator=g) + 0.5).requires_grad_()
    b = torch.randn(3, generator=g).requires_grad_()
    r = torch.randn(5, 3, 7, generator=g).requires_grad_() if with_residual else None
    rm, rv = torch.randn(3, generator=g), torch.rand(3, generator=g) + 0.5
    args = (x, w, b, r, None if training else rm, None if training else rv, 1e-5, activation, training, backend)
    torch.library.opcheck(torch.ops.batchnorm.batch_norm, args)
    y, params = torch.ops.batchnorm.batch_norm(*args)
    dy = torch.randn_like(y)
    needs = [True, True, True, with_residual]
    torch.library.opcheck(
        torch.ops.batchnorm.batch_norm_backward,
        (dy, x.detach(), w.detach(), b.detach(), None if r is None else r.detach(), params.detach(),
         training, activation, backend, needs),
    )  # fmt: skip


def test_opcheck_renorm_correction():
    g = torch.Generator().manual_seed(5)
    mean, running_mean = torch.randn(4, generator=g), torch.randn(4, generator=g)
    var, running_var = torch.rand(4, generator=g) + 0.1, torch.rand(4, generator=g) + 0.1
    args = (mean, var, running_mean, running_var, 1e-5, torch.tensor(1.5), torch.tensor(0.5))
    torch.library.opcheck(torch.ops.batchnorm.renorm_correction, args)
    r, d = torch.ops.batchnorm.renorm_correction(*args)
    want = bn.variants.renorm_correction(bn.stats.Stats(torch.ones(4), mean, var), running_mean, running_var, 1e-5, 1.5, 0.5)
    assert torch.equal(r, want[0]) and torch.equal(d, want[1])


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_the_running_update_op_is_the_rule(dtype, momentum):
    """batchnorm::update_running_stats (what a compiled CPU graph calls) updates the buffers
    in place exactly as stats.update_running's tensor ops (a non-finite running value takes
    the batch's), refuses a non-finite batch without a write, and answers with a 0-d bool."""
    g = torch.Generator().manual_seed(6)
    running = [torch.randn(5, generator=g, dtype=dtype), torch.rand(5, generator=g, dtype=dtype) + 0.5, torch.tensor(3)]
    running[0][0] = float("nan")
    mean, var = torch.randn(5, generator=g, dtype=dtype), torch.rand(5, generator=g, dtype=dtype)
    op = torch.ops.batchnorm.update_running_stats.default
    torch.library.opcheck(op, ([t.clone() for t in running] + [mean, var, momentum]))
    want = [t.clone() for t in running]
    assert bool(bn.stats.update_running(want[0], want[1], mean, var, momentum, want[2]))
    got = [t.clone() for t in running]
    kept = op(*got, mean, var, momentum)
    assert kept.dtype == torch.bool and kept.dim() == 0 and bool(kept)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    bad = mean.clone()
    bad[1] = float("inf")
    assert not bool(op(*got, bad, var, momentum))
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_a_compiled_cpu_training_graph_folds_the_running_statistics_with_one_op():
    """On CPU a compiled graph updates the running statistics with one call of
    batchnorm::update_running_stats per layer, not the rule's tensor ops (code Inductor would
    generate and compile for every layer), and ends with eager's buffers, bit for bit."""
    x = torch.randn(4, 8, 6, 6)
    eager, compiled = bn.BatchNorm2d(8, momentum=None), bn.BatchNorm2d(8, momentum=None)
    graphs = []

    def capture(gm, _inputs):
        graphs.append(gm)
        return gm.forward

    step = torch.compile(compiled, backend=capture, fullgraph=True)
    for scale in (1.0, 3.0):
        step(x * scale)
        eager(x * scale)
    targets = [str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert targets.count("batchnorm.update_running_stats") == 1 and "<built-in method isfinite" not in str(targets)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(compiled, name), getattr(eager, name)), name


def test_eager_and_custom_op_paths_give_the_same_bits():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(8, 3, 6, 6, generator=g).requires_grad_()
    w = (torch.rand(3, generator=g) + 0.5).requires_grad_()
    dy = torch.randn(8, 3, 6, 6, generator=g)
    y1, p1 = ops._BatchNormFunction.apply(x, w, None, None, None, None, 1e-5, "relu", True, backends.get("numba"))
    y2, p2 = torch.ops.batchnorm.batch_norm(x, w, None, None, None, None, 1e-5, "relu", True, "numba")
    assert torch.equal(y1, y2) and torch.equal(p1, p2)
    g1 = torch.autograd.grad(y1, (x, w), dy)
    g2 = torch.autograd.grad(y2, (x, w), dy)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


_BLOCK_BATCHNORM = """
import sys
class Blocker:
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "batchnorm" or fullname.startswith("batchnorm."):
            raise ImportError("batchnorm is blocked in this process")
sys.meta_path.insert(0, Blocker())
sys.path = [p for p in sys.path if "batchnorm" not in p and not p.endswith("/src")]
"""


@pytest.mark.slow
@pytest.mark.parametrize("size", ["small", "large"])
def test_exported_evaluation_program_runs_without_batchnorm(tmp_path, size):
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), bn.BatchNormAct(bn.BatchNorm2d(8), "relu"),
        torch.nn.Conv2d(8, 8, 3, padding=1, bias=False), bn.BatchNorm2d(8),
    ).eval()  # fmt: skip
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, bn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
    n = 2 if size == "small" else 130  # 130 x 8 x 32 x 32 > the numba crossover
    x = torch.randn(n, 3, 32, 32)
    program = torch.export.export(model, (x,))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not any("batchnorm::" in t for t in targets), targets
    path = tmp_path / "model.pt2"
    torch.export.save(program, path)
    torch.save({"x": x, "y": model(x)}, tmp_path / "io.pt")
    script = _BLOCK_BATCHNORM + textwrap.dedent(f"""
        import torch
        try:
            import batchnorm
        except ImportError:
            pass
        else:
            raise SystemExit("batchnorm was importable")
        program = torch.export.load({str(path)!r})
        io = torch.load({str(tmp_path / "io.pt")!r})
        torch.testing.assert_close(program.module()(io["x"]), io["y"], rtol=1e-5, atol=1e-5)
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


def test_training_export_holds_our_op_on_the_fast_path():
    layer = bn.BatchNorm2d(8, backend="numba")
    x = torch.randn(4, 8, 6, 6)
    program = torch.export.export(layer, (x,))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert "batchnorm.batch_norm.default" in targets, targets
    assert numba_cpu.NumbaBackend().unavailable() is None
