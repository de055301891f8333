"""The entry point's policy: errors, empty batches, the non-finite guard, backend choice."""

import warnings

import pytest
import torch

import batchnorm as bn
from batchnorm import activations, backends, modes
from batchnorm import functional as F
from batchnorm.functional import batch_norm
from batchnorm.stats import NonFiniteGuard


def test_wrong_channel_count():
    with pytest.raises(ValueError, match="expected 4 channels"):
        bn.BatchNorm2d(4)(torch.randn(2, 3, 5, 5))


def test_wrong_ndim_names_the_right_module():
    with pytest.raises(ValueError, match="BatchNorm2d expects 4-D input.*BatchNorm1d"):
        bn.BatchNorm2d(3)(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        batch_norm(torch.randn(5), None, None, training=True)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.uint8])
def test_integer_input_is_a_type_error(dtype):
    with pytest.raises(TypeError, match="floating-point"):
        bn.BatchNorm1d(3)(torch.ones(4, 3, dtype=dtype))


def test_not_a_tensor():
    with pytest.raises(TypeError, match="torch.Tensor"):
        bn.BatchNorm1d(3)([[1.0, 2.0, 3.0]])


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1), (1, 3, 1, 1)])
def test_one_value_per_channel_in_training_says_what_to_do(shape):
    m = {2: bn.BatchNorm1d, 3: bn.BatchNorm1d, 4: bn.BatchNorm2d}[len(shape)](3)
    with pytest.raises(ValueError, match="drop_last=True.*model.eval"):
        m(torch.randn(shape))
    m.eval()
    assert m(torch.randn(shape)).shape == shape  # evaluation uses the running statistics


def test_parameters_on_another_device_or_dtype():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="weight is on meta"):
        batch_norm(x, None, None, torch.ones(3, device="meta"), None, training=True)
    with pytest.raises(TypeError, match="running_mean is torch.float64"):
        batch_norm(x, torch.zeros(3, dtype=torch.float64), torch.ones(3), training=False)
    with pytest.raises(ValueError, match="bias has 4 elements"):
        batch_norm(x, None, None, None, torch.zeros(4), training=True)


def test_bad_residual_and_activation_and_momentum():
    m = bn.BatchNorm1d(3)
    with pytest.raises(ValueError, match="residual has shape"):
        m(torch.randn(4, 3), residual=torch.randn(4, 2))
    with pytest.raises(ValueError, match="activation='swish' is not supported"):
        m(torch.randn(4, 3), activation="swish")
    with pytest.raises(TypeError, match="unexpected keyword argument 'activation'"):
        bn.BatchNorm1d(3, activation="relu")  # a batch-norm module holds no activation: BatchNormAct does
    # any number is a momentum, as for torch (tests/test_torch_conformance.py); not a string
    with pytest.raises(TypeError, match="momentum must be a number"):
        batch_norm(torch.randn(4, 3), torch.zeros(3), torch.ones(3), training=True, momentum="0.1")


@pytest.mark.parametrize("momentum", [0.1, None])
def test_empty_batch_returns_empty_and_updates_nothing(momentum):
    m = bn.BatchNorm2d(3, momentum=momentum)
    m(torch.randn(4, 3, 2, 2))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(0, 3, 2, 2, requires_grad=True)
    y = m(x)
    assert y.shape == (0, 3, 2, 2)
    y.sum().backward()
    assert x.grad.shape == x.shape and m.weight.grad is not None
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_keeps_running_stats_finite(bad):
    m = bn.BatchNorm1d(3)
    m(torch.randn(8, 3))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(8, 3)
    x[3, 1] = bad
    with pytest.warns(RuntimeWarning, match="non-finite"):
        m(x)
    assert m.nonfinite_skips == 1
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, then only counted
        m(x)
    assert m.nonfinite_skips == 2
    m(torch.randn(8, 3))
    assert int(m.num_batches_tracked) == 2 and torch.isfinite(m.running_var).all()


def test_backend_registry_lists_and_forces():
    assert {"aten", "reference"} <= set(backends.available())
    x = torch.randn(6, 3, 4)
    assert backends.resolve("reference", x).backend.name == "reference"
    with pytest.raises(ValueError, match="unknown batch-norm backend 'nope'"):
        backends.resolve("nope", x)


def test_environment_variable_forces_a_backend(monkeypatch):
    x = torch.randn(6, 3, 4)
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    assert backends.resolve(None, x).backend.name == "reference"
    calls = []
    ref = backends.get("reference")
    monkeypatch.setattr(ref, "stats", lambda v, _orig=ref.stats: calls.append(1) or _orig(v))
    bn.BatchNorm1d(3, backend=None)(x)
    assert calls, "BATCHNORM_BACKEND=reference was not used"


def test_forced_backend_that_cannot_take_the_input_falls_back_to_aten(monkeypatch):
    ref = backends.get("reference")
    monkeypatch.setattr(ref, "unsupported", lambda x: "not today")
    choice = backends.resolve("reference", torch.randn(4, 3))
    assert choice.backend.name == "aten" and "not today" in choice.reason


@pytest.mark.parametrize("backend", ["aten", "reference"])
def test_backends_agree_through_the_module(backend):
    torch.manual_seed(0)
    x = torch.randn(6, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    r = torch.randn(6, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    ours = bn.BatchNorm2d(4, backend=backend, dtype=torch.float64)
    ref = bn.BatchNorm2d(4, backend="reference", dtype=torch.float64)
    ya, yb = ours(x, residual=r, activation="tanh"), ref(x, residual=r, activation="tanh")
    torch.testing.assert_close(ya, yb)
    ga = torch.autograd.grad(ya.square().sum(), (x, r, ours.weight))
    gb = torch.autograd.grad(yb.square().sum(), (x, r, ref.weight))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(ours.running_var, ref.running_var)


@pytest.mark.parametrize("backend", ["reference", "aten", "numba"])
def test_double_backward_through_the_kernel_contract_is_exact(backend):
    # ghost batches run the contract's kernels, whose backward is not differentiable: under
    # create_graph=True it runs as torch ops instead, and equals torch's layer chunk by chunk
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    y = batch_norm(x, None, None, training=True, backend=backend, virtual_batch_size=3)
    (g,) = torch.autograd.grad(y.pow(3).sum(), x, create_graph=True)
    (gg,) = torch.autograd.grad(g.square().sum(), x)
    xt = x.detach().clone().requires_grad_()
    yt = torch.cat([torch.nn.functional.batch_norm(part, None, None, training=True) for part in xt.chunk(2)])
    (gt,) = torch.autograd.grad(yt.pow(3).sum(), xt, create_graph=True)
    (ggt,) = torch.autograd.grad(gt.square().sum(), xt)
    torch.testing.assert_close(g, gt)
    torch.testing.assert_close(gg, ggt)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["reference", "numba"])
@pytest.mark.parametrize("training", [True, False])
def test_double_backward_of_the_whole_op_is_exact(backend, training):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, generator=g).add_(0.5).requires_grad_()
    rm, rv = torch.randn(3, dtype=torch.float64, generator=g), torch.rand(3, dtype=torch.float64, generator=g) + 0.5

    def f(x, w):
        return batch_norm(x, None if training else rm, None if training else rv, w, None,
                          training=training, backend=backend, activation="tanh")  # fmt: skip

    assert torch.autograd.gradgradcheck(f, (x, w))


# One behaviour at every size: the small layers run torch's kernel, the large ones numba's.
SIZES = {"small": (4, 8, 4, 4), "large": (64, 8, 32, 32)}


@pytest.mark.parametrize("size", list(SIZES))
def test_a_non_finite_running_value_restarts_from_the_batch_at_every_size(size):
    m = bn.BatchNorm2d(8)
    with torch.no_grad():
        m.running_var[0], m.running_mean[1] = float("inf"), float("nan")
    x = torch.randn(SIZES[size], generator=torch.Generator().manual_seed(0))
    m(x)
    batch_var = x.transpose(0, 1).reshape(8, -1).var(1)
    batch_mean = x.transpose(0, 1).reshape(8, -1).mean(1)
    torch.testing.assert_close(m.running_var[0], batch_var[0])
    torch.testing.assert_close(m.running_mean[1], batch_mean[1])
    torch.testing.assert_close(m.running_var[1:], 0.9 + 0.1 * batch_var[1:])
    assert int(m.num_batches_tracked) == 1 and m.nonfinite_skips == 0


@pytest.mark.parametrize("size", list(SIZES))
def test_a_variance_that_overflows_float32_is_refused_at_every_size(size):
    m = bn.BatchNorm2d(8)
    x = torch.randn(SIZES[size], generator=torch.Generator().manual_seed(1))
    x[::2, 3] = 1e20
    x[1::2, 3] = -1e20  # finite in float64, (1e20)^2 overflows float32
    with pytest.warns(RuntimeWarning, match="non-finite"):
        m(x)
    assert torch.equal(m.running_var, torch.ones(8)) and torch.equal(m.running_mean, torch.zeros(8))
    assert int(m.num_batches_tracked) == 0 and m.nonfinite_skips == 1


@pytest.mark.parametrize("backend", ["aten", "numba"])
def test_running_buffers_of_another_layout_are_both_updated(backend):
    x = torch.randn(64, 64, 8, generator=torch.Generator().manual_seed(2)) + 1
    rm, rv = torch.zeros(64), torch.ones(128)[::2]
    batch_norm(x, rm, rv, training=True, backend=backend)
    expected_var = 0.9 + 0.1 * x.transpose(0, 1).reshape(64, -1).var(1)
    torch.testing.assert_close(rv, expected_var)
    torch.testing.assert_close(rm, 0.1 * x.transpose(0, 1).reshape(64, -1).mean(1))


def test_running_buffers_of_mixed_dtypes_are_refused():
    x = torch.randn(8, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="running_var is torch.float32"):
        batch_norm(x, torch.zeros(4, dtype=torch.float64), torch.ones(4), training=True)


@pytest.mark.parametrize("eps", [0.0, -1e-5, float("nan"), float("inf")])
@pytest.mark.parametrize("size", list(SIZES))
def test_eps_must_be_positive_at_every_size(eps, size):
    with pytest.raises(ValueError, match="eps must be positive"):
        batch_norm(torch.randn(SIZES[size]), None, None, training=True, eps=eps)


@pytest.mark.parametrize("size", list(SIZES))
def test_float64_input_into_a_float32_layer_is_a_type_error_at_every_size(size):
    m = bn.BatchNorm2d(8)
    with pytest.raises(TypeError, match="weight is torch.float32 but the input is torch.float64"):
        m(torch.randn(SIZES[size], dtype=torch.float64))


def test_a_nan_at_a_masked_out_position_does_not_reach_the_statistics():
    g = torch.Generator().manual_seed(3)
    x, mask = torch.randn(4, 3, 6, generator=g), torch.ones(4, 6, dtype=torch.bool)
    x[0, :, 4], mask[0, 4] = float("nan"), False
    m = bn.BatchNorm1d(3)
    y = m(x, mask=mask)
    assert torch.isfinite(y[mask.unsqueeze(1).expand_as(y)]).all()
    assert torch.isfinite(m.running_mean).all() and m.nonfinite_skips == 0
    valid = x.transpose(0, 1)[:, mask]
    torch.testing.assert_close(m.running_mean, 0.1 * valid.mean(1))


@pytest.mark.parametrize("size", list(SIZES))
def test_threads_sharing_a_layer_never_see_a_non_finite_running_value(size):
    """Four threads train one layer, one of them on NaN batches: the running statistics
    stay finite at every moment, since the rule decides before it writes."""
    import threading

    m = bn.BatchNorm2d(8)
    clean = torch.randn(SIZES[size], generator=torch.Generator().manual_seed(4))
    bad = clean.clone()
    bad[0, 2, 0, 0] = float("nan")
    seen_non_finite, stop = [], threading.Event()

    def train(x):
        for _ in range(30):
            with torch.no_grad():
                m(x)

    def watch():
        while not stop.is_set():
            if not (torch.isfinite(m.running_mean).all() and torch.isfinite(m.running_var).all()):
                seen_non_finite.append(True)

    watcher = threading.Thread(target=watch)
    watcher.start()
    workers = [threading.Thread(target=train, args=(x,)) for x in (clean, clean, clean, bad)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    stop.set()
    watcher.join()
    assert not seen_non_finite
    assert m.nonfinite_skips == 30


def test_plan_names_the_path_of_each_kind_of_call():
    x, rm, rv = torch.randn(8, 3), torch.zeros(3), torch.ones(3)
    mask = torch.ones(8, dtype=torch.bool)
    sync = object()  # plan only asks whether there is one

    def plan(x=x, training=True, **extras):  # the call's mode asked as batch_norm asks it
        return F.plan(F.Call(x, rm, rv, None, None, training, 0.1, 1e-5, mode=modes.current(), **extras))

    assert plan() is F.Path.OP
    assert plan(activation="relu", residual=x) is F.Path.OP
    assert plan(unbiased_running_var=False) is F.Path.OP  # the op layer stores either variance
    assert plan(training=False, mask=mask, virtual_batch_size=2, sync=sync) is F.Path.OP  # evaluation
    assert plan(virtual_batch_size=2) is F.Path.KERNELS
    assert plan(renorm=bn.Renorm()) is F.Path.KERNELS
    assert plan(sync=sync) is F.Path.KERNELS
    assert plan(mask=mask) is F.Path.TORCH_OPS
    assert plan(x=x[:0]) is F.Path.EMPTY
    assert plan(x=x[:0], sync=sync) is F.Path.KERNELS  # an empty part still joins the reductions

    @torch.compile(backend="eager", fullgraph=True)
    def traced(x):
        return (x, plan(x=x, virtual_batch_size=2) is F.Path.KERNELS, plan(x=x, renorm=bn.Renorm()) is F.Path.KERNELS,
                plan(x=x, mask=mask) is F.Path.TORCH_OPS, plan(x=x, sync=sync) is F.Path.SYNC_OUTSIDE_GRAPH,
                plan(x=x) is F.Path.OP)  # fmt: skip

    assert traced(x)[1:] == (True, True, True, True, True)

    def transformed(x):  # torch.func: the extras as torch ops, which it can differentiate
        assert plan(x=x, virtual_batch_size=2) is F.Path.TORCH_OPS
        return x.sum()

    torch.func.grad(transformed)(x)


@pytest.mark.skipif("numba" not in backends.available(), reason="numba is not installed")
@pytest.mark.parametrize("activation", ["leaky_relu", "sigmoid", "tanh", "silu", "gelu"])
def test_an_activation_numba_does_not_fuse_is_torch_op_after_its_kernel(activation):
    """numba fuses identity and the piecewise ReLU, ReLU6 and Hardswish only (a smooth
    activation costs a scalar libm call per value there, several times torch's vectorized
    op): the others are torch's op applied to the kernel's output, gradients included."""
    assert activation not in backends.get("numba").fused_activations
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 50, generator=gen, requires_grad=True)
    res = torch.randn(4, 3, 50, generator=gen)
    split = torch.randn(4, 3, 50, generator=gen)

    def run(fused):
        xs = x.detach().clone().requires_grad_()
        if fused:
            y = batch_norm(xs, None, None, training=True, activation=activation, residual=res, backend="numba")
        else:
            y = activations.forward(batch_norm(xs, None, None, training=True, residual=res, backend="numba"), activation)
        y.backward(split)
        return y, xs.grad

    for ours, composed in zip(run(True), run(False)):
        assert torch.equal(ours, composed)


def test_the_guards_warning_names_the_callers_line():
    """The first skipped update warns at the user's line, whichever path and however deep in
    this package and torch's module machinery the guard was reached."""
    x = torch.randn(8, 3)
    x[0, 0] = float("inf")
    calls = {
        "plain": lambda: batch_norm(x, torch.zeros(3), torch.ones(3), training=True, guard=NonFiniteGuard()),
        "ghost": lambda: batch_norm(x, torch.zeros(3), torch.ones(3), training=True, virtual_batch_size=4,
                                    guard=NonFiniteGuard()),  # fmt: skip
        "module": lambda: bn.BatchNorm1d(3)(x),
    }
    for name, call in calls.items():
        with pytest.warns(RuntimeWarning, match="non-finite") as caught:
            call()
        assert caught[0].filename == __file__, (name, caught[0].filename)


@pytest.mark.parametrize("backend", ["reference", "numba", "aten"])
@pytest.mark.parametrize("extra", [{"virtual_batch_size": 2}, {"renorm": bn.Renorm(r_max=2.0, d_max=1.0)}])
def test_the_residual_alone_can_need_a_gradient_on_every_path(backend, extra):
    """Frozen statistics-free input (x without grad, no affine parameters): only the residual
    asks for a gradient, and gets the one it gets when x asks too."""
    g = torch.Generator().manual_seed(11)
    x, r, dy = (torch.randn(4, 3, 5, 5, generator=g) for _ in range(3))
    grads = []
    for x_needs in (True, False):
        layer = bn.BatchNorm2d(3, affine=False, backend=backend, **extra)
        xi, ri = x.clone().requires_grad_(x_needs), r.clone().requires_grad_()
        layer(xi, residual=ri, activation="relu").backward(dy)
        grads.append(ri.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (64, 16, 16, 16)], ids=["small", "numba"])
@pytest.mark.parametrize("kind", ["broadcasts", "other dtype"])
def test_a_residual_the_kernels_cannot_take_is_added_as_torch_adds_it(shape, kind):
    """`residual=` means batch norm + residual, then the activation: one that broadcasts
    (what a converted model's fused `bn(x) + pooled` passes), or of another dtype, is added
    after the kernels with torch's broadcasting and type promotion."""
    torch.manual_seed(0)
    x = torch.randn(shape, requires_grad=True)
    if kind == "broadcasts":
        residual = torch.randn(shape[0], 1, 1, 1, requires_grad=True)
    else:
        residual = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    weight, bias = torch.rand(shape[1], requires_grad=True), torch.randn(shape[1], requires_grad=True)
    inputs = (x, residual, weight, bias)
    ours = batch_norm(x, None, None, weight, bias, training=True, residual=residual, activation="relu")
    theirs = torch.relu(torch.nn.functional.batch_norm(x, None, None, weight, bias, training=True) + residual)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(theirs)
    for a, b in zip(torch.autograd.grad(ours, inputs, dy), torch.autograd.grad(theirs, inputs, dy)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
