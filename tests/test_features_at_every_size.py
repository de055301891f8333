"""Every public feature at a small size (torch's kernel under `auto`) and at a fast-path size
(the numba kernels): a feature that works at one size and fails at the other is two paths
that disagree. Each is compared with torch's own layer where torch has the feature.
"""

from __future__ import annotations

import contextlib
import copy
import pickle

import pytest
import torch
from torch.func import functional_call, grad, jvp, vmap

import batchnorm as bn
from batchnorm import activations
from batchnorm.backends import numba_cpu
from batchnorm.modes import EAGER

SIZES = {"small": (8, 4, 4, 4), "fast": (64, 16, 16, 16)}
assert 64 * 16 * 16 * 16 >= numba_cpu.CROSSOVER_NUMEL


@pytest.fixture(params=list(SIZES))
def shape(request):
    return SIZES[request.param]


def _pair(shape, **kwargs):
    torch.manual_seed(0)
    theirs = torch.nn.BatchNorm2d(shape[1], **kwargs)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
        theirs.bias.normal_()
    ours = bn.BatchNorm2d(shape[1], **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _close(a, b):
    """Equal to fp32 rounding: sums over a fast-path batch (262k values) round differently in
    the two implementations, so the absolute tolerance follows the tensor's largest value."""
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(1.0, float(b.abs().max())))


def test_func_grad_with_buffers_passed_in(shape):
    ours, theirs = _pair(shape)
    x = torch.randn(shape)
    results = []
    for m in (ours, theirs):
        params, buffers = dict(m.named_parameters()), dict(m.named_buffers())
        g = grad(lambda p, b, x: functional_call(m, (p, b), (x,)).square().mean())(params, buffers, x)
        results.append((g["weight"], g["bias"], m.running_mean.clone(), m.num_batches_tracked.clone()))
    for a, b in zip(*results):
        _close(a, b)


def test_func_jvp_and_vmap_without_running_statistics(shape):
    ours, theirs = _pair(shape, track_running_stats=False)
    x, t = torch.randn(shape), torch.randn(shape)
    _close(jvp(ours, (x,), (t,))[1], jvp(theirs, (x,), (t,))[1])
    stacked = torch.stack([x, 2 * x + 1])
    _close(vmap(ours)(stacked), vmap(theirs)(stacked))


def test_func_vmap_in_evaluation(shape):
    ours, theirs = _pair(shape)
    ours.eval()
    theirs.eval()
    stacked = torch.randn(3, *shape)
    _close(vmap(ours)(stacked), vmap(theirs)(stacked))


def _ensemble(members, x, x_dim=None, **call):
    """torch.func's model ensembling: the members' parameters and buffers stacked, one vmap
    over the members, on the same x (`x_dim` None) or on x split along `x_dim`. Returns the
    outputs, the stacked buffers (updated in training) and the meta module the vmap calls."""
    params, buffers = torch.func.stack_module_state(members)
    base = copy.deepcopy(members[0]).to("meta")
    y = vmap(lambda p, b, x: functional_call(base, (p, b), (x,), call), in_dims=(0, 0, x_dim))(params, buffers, x)
    return y, buffers, base


def test_func_vmap_over_a_model_ensemble_in_training(shape):
    """Each member's output and running statistics as torch's layer gives them, in training,
    and a member whose batch is not finite keeps its statistics while the others update."""
    x = torch.randn(shape)
    stacks = []
    for cls in (bn.BatchNorm2d, torch.nn.BatchNorm2d):
        torch.manual_seed(0)
        members = [cls(shape[1]) for _ in range(3)]
        for m in members:
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
        stacks.append(_ensemble(members, x)[:2])
    (ours, ours_buffers), (theirs, theirs_buffers) = stacks
    _close(ours, theirs)
    for name in ("running_mean", "running_var"):
        _close(ours_buffers[name], theirs_buffers[name])
    assert ours_buffers["num_batches_tracked"].tolist() == [1, 1, 1]

    xs = torch.stack([x, x.clone().fill_(float("inf")), x])
    _, buffers, base = _ensemble([bn.BatchNorm2d(shape[1]) for _ in range(3)], xs, x_dim=0)
    assert buffers["num_batches_tracked"].tolist() == [1, 0, 1]
    assert torch.equal(buffers["running_mean"][1], torch.zeros(shape[1]))
    assert bool(torch.isfinite(buffers["running_var"]).all())
    # the refusal is not counted (its flag lives inside the transform), and nothing of the
    # transform is left behind in the module
    assert base.nonfinite_skips == 0


@pytest.mark.parametrize("extra", ["ghost batches", "renorm", "mask", "cumulative average"])
def test_func_vmap_over_a_model_ensemble_with_the_extras(shape, extra):
    """The same ensemble with our extras (which torch's layer has not): each member as the
    member alone, eager."""
    kwargs = {"ghost batches": dict(virtual_batch_size=shape[0] // 2), "renorm": dict(renorm=bn.Renorm()),
              "mask": {}, "cumulative average": dict(momentum=None)}[extra]  # fmt: skip
    torch.manual_seed(0)
    x = torch.randn(shape)
    call = {"mask": torch.rand(shape[0], *shape[2:]) > 0.3} if extra == "mask" else {}
    members = [bn.BatchNorm2d(shape[1], **kwargs) for _ in range(2)]
    alone = [copy.deepcopy(m) for m in members]
    y, buffers, _ = _ensemble(members, x, **call)
    for i, m in enumerate(alone):
        _close(y[i], m(x, **call))
        for name, t in m.named_buffers():
            _close(buffers[name][i], t)


@pytest.mark.parametrize("training", [True, False])
def test_forward_mode_ad_gives_torchs_tangents(shape, training):
    """torch.autograd.forward_ad's dual tensors: the output and its tangent as torch's layer
    gives them, and the running statistics updated once."""
    import torch.autograd.forward_ad as forward_ad

    x, tangent = torch.randn(shape), torch.randn(shape)
    results = []
    for m in _pair(shape):
        m.train(training)
        with forward_ad.dual_level():
            y = forward_ad.unpack_dual(m(forward_ad.make_dual(x, tangent)))
        results.append((y.primal, y.tangent, m.running_mean, m.running_var, m.num_batches_tracked))
    for a, b in zip(*results):
        _close(a, b)


@pytest.mark.parametrize("activation", ["relu", "relu6"])
def test_transforms_through_a_fused_activation_give_torchs_results(shape, activation):
    """torch's kernel behind our layer applies ReLU and ReLU6 in place on its output (and the
    residual sum): grad, jvp, vmap, forward-mode AD and double backward through the fused
    layer give what torch's layer and activation give."""
    import torch.autograd.forward_ad as forward_ad

    torch.manual_seed(1)
    x, r, t = torch.randn(shape), torch.randn(shape), torch.randn(shape)
    ours, theirs = _pair(shape, track_running_stats=False)
    act = activations.module_for(activation)
    fused = bn.BatchNormAct(ours, activation)

    def torch_layer(x, r):
        return act(theirs(x) + r)

    def our_layer(x, r):
        return fused(x, r)

    results = []
    for f in (our_layer, torch_layer):
        g = grad(lambda x: f(x, r).square().sum())(x)
        tangent = jvp(lambda x: f(x, r), (x,), (t,))[1]
        batched = vmap(f)(torch.stack([x, 2 * x]), torch.stack([r, r]))
        with forward_ad.dual_level():
            dual = forward_ad.unpack_dual(f(forward_ad.make_dual(x, t), r)).tangent
        leaf = x.clone().requires_grad_()
        (dx,) = torch.autograd.grad(f(leaf, r).square().sum(), leaf, create_graph=True)
        (ddx,) = torch.autograd.grad(dx.sum(), leaf)
        results.append((g, tangent, batched, dual, dx.detach(), ddx))
    for a, b in zip(*results):
        _close(a, b)


def test_fake_tensor_mode_runs_like_torchs_layer(shape):
    """Under FakeTensorMode (memory estimators, shape propagation) a tensor's memory cannot be
    read: the layer runs the ops a graph holds (their fake implementations), forward and
    backward, and gives torch's shapes and memory format, in training and evaluation."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    for memory_format in (torch.contiguous_format, torch.channels_last):
        results = []
        ours, theirs = _pair(shape)
        for m in (ours, theirs):
            with FakeTensorMode(allow_non_fake_inputs=True) as mode:
                x = mode.from_tensor(torch.randn(shape).contiguous(memory_format=memory_format)).requires_grad_()
                y = m.train()(x)
                y.sum().backward()
                y_eval = m.eval()(x)
            assert isinstance(y, FakeTensor) and isinstance(x.grad, FakeTensor)
            results.append([(t.shape, t.dtype, t.stride()) for t in (y, x.grad, y_eval)])
        assert results[0] == results[1]
        assert ours.nonfinite_skips == 0  # nothing fake was kept by the layer


def test_a_run_on_the_meta_device_gives_torchs_shapes_and_leaves_nothing_behind(shape):
    """A model built on the meta device and run there for its shapes (before its weights
    exist), then made real: the layer runs like torch's on meta, forward and backward, in
    both modes, and counts nothing it cannot know (a skipped update needs values); after
    `to_empty` it trains and counts as any layer."""
    results = []
    for m in _pair(shape):
        m = m.to("meta")
        x = torch.randn(shape, device="meta", requires_grad=True)
        y = m.train()(x)
        y.sum().backward()
        y_eval = m.eval()(x)
        results.append([(t.shape, t.device, t.stride()) for t in (y, x.grad, y_eval, m.running_mean)])
    assert results[0] == results[1]
    ours = _pair(shape)[0].to("meta")
    ours(torch.randn(shape, device="meta"))
    ours.to_empty(device="cpu").reset_parameters()
    assert ours.nonfinite_skips == 0
    bad = torch.randn(shape)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        ours.train()(bad)
    assert ours.nonfinite_skips == 1


def test_a_dispatch_mode_sees_every_op_and_changes_no_result(shape):
    """Under a Python dispatch mode (a logging or counting mode) every op reaches the mode, ours
    as one op where the numba kernels run, and the results are those without the mode."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    results = []
    for watched in (False, True):
        ours, _ = _pair(shape)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).requires_grad_()
        seen = Seen()
        with seen if watched else contextlib.nullcontext():
            y = ours(x)
            y.square().sum().backward()
        results.append((y, x.grad, ours.running_mean, ours.running_var, ours.num_batches_tracked))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    kernel = "batchnorm.batch_norm" if numba_cpu.NumbaBackend().preferred(x, EAGER) else "aten.native_batch_norm"
    assert {kernel, kernel + "_backward"} <= seen.ops


class _Wrapped(torch.Tensor):
    """A tensor subclass that runs its ops itself, as DTensor does: unwrap, run, wrap again;
    it records the ops it saw."""

    seen: set = set()

    @staticmethod
    def __new__(cls, elem):
        return torch.Tensor._make_wrapper_subclass(
            cls, elem.shape, strides=elem.stride(), dtype=elem.dtype, device=elem.device, requires_grad=elem.requires_grad
        )

    def __init__(self, elem):
        self.elem = elem

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        cls.seen.add(str(func.overloadpacket))
        unwrap = lambda t: t.elem if isinstance(t, _Wrapped) else t  # noqa: E731
        out = func(*torch.utils._pytree.tree_map(unwrap, args), **torch.utils._pytree.tree_map(unwrap, kwargs or {}))
        return torch.utils._pytree.tree_map(lambda t: _Wrapped(t) if type(t) is torch.Tensor else t, out)


def test_a_tensor_subclass_with_its_own_dispatch_runs_the_layer(shape):
    """An input that dispatches its ops itself (DTensor, a logging tensor) cannot be read from
    Python: it sees every op, ours as one where the numba kernels run, and the results are
    those of the plain tensor."""
    results = []
    _Wrapped.seen.clear()
    for wrapped in (False, True):
        ours, _ = _pair(shape)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        x = (_Wrapped(x) if wrapped else x).requires_grad_()
        y = ours(x)
        y.square().sum().backward()
        unwrap = (lambda t: t.elem) if wrapped else (lambda t: t)
        results.append((unwrap(y), unwrap(x.grad), ours.running_mean, ours.running_var, ours.num_batches_tracked))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    kernel = "batchnorm.batch_norm" if numba_cpu.NumbaBackend().preferred(results[0][0], EAGER) else "aten.native_batch_norm"
    assert {kernel, kernel + "_backward"} <= _Wrapped.seen


@pytest.mark.parametrize("training", [True, False])
def test_jit_trace_records_torchs_ops_and_saves(shape, training):
    """torch.jit.trace records torch's ops only: a traced fused layer holds aten::batch_norm,
    saves and loads as TorchScript, gives the module's outputs on another input and, in
    training, updates its running statistics as the module does."""
    import io
    import warnings

    torch.manual_seed(0)
    ours = bn.BatchNormAct(bn.BatchNorm2d(shape[1]), "relu").train(training)
    with torch.no_grad():
        ours.bn.running_mean.normal_()
        ours.bn.running_var.uniform_(0.5, 2.0)
    traced_copy = copy.deepcopy(ours)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(traced_copy, torch.randn(shape), check_trace=False)
    assert "aten::batch_norm" in {node.kind() for node in traced.bn.graph.nodes()}
    saved = io.BytesIO()
    torch.jit.save(traced, saved)
    saved.seek(0)
    loaded = torch.jit.load(saved)
    loaded.bn.load_state_dict(ours.bn.state_dict())  # the trace's own call moved the copy's statistics
    x = torch.randn(shape) * 2 + 1
    _close(loaded(x), ours(x))
    _close(loaded.bn.running_mean, ours.bn.running_mean)
    _close(loaded.bn.running_var, ours.bn.running_var)


def test_export_with_a_dynamic_batch_runs_without_batchnorm(shape):
    ours, theirs = _pair(shape)
    ours.eval()
    theirs.eval()
    batch = torch.export.Dim("batch", min=2, max=4096)
    program = torch.export.export(ours, (torch.randn(shape),), dynamic_shapes={"input": {0: batch}})
    assert "batchnorm" not in program.graph_module.code
    for n in (3, shape[0] * 2):
        x = torch.randn(n, *shape[1:])
        _close(program.module()(x), theirs(x))


def test_export_without_running_statistics_holds_standard_ops_only(shape):
    ours, theirs = _pair(shape, track_running_stats=False)
    program = torch.export.export(ours.eval(), (torch.randn(shape),))
    assert "batchnorm" not in program.graph_module.code
    x = torch.randn(shape)
    _close(program.module()(x), theirs.eval()(x))


@pytest.mark.slow
def test_compile_without_graph_breaks(shape):
    ours, theirs = _pair(shape)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    x = torch.randn(shape, requires_grad=True)
    xt = x.detach().clone().requires_grad_()
    probe = torch.randn(shape)  # not y itself: d(sum y^2)/dx cancels to rounding noise
    y, yt = compiled(x), theirs(xt)
    _close(y, yt)
    (y * probe).sum().backward()
    (yt * probe).sum().backward()
    _close(x.grad, xt.grad)
    _close(ours.running_var, theirs.running_var)


def _penalty(layer, x):
    """A gradient penalty: |d(sum y^3)/dx|^2 differentiated again, w.r.t. x and the weight."""
    y = layer(x).pow(3).sum()
    (gx,) = torch.autograd.grad(y, x, create_graph=True)
    return torch.autograd.grad(gx.square().sum(), (x, layer.weight), allow_unused=True)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["plain", "ghost", "renorm"])
def test_double_backward_gives_second_order_gradients(shape, kind):
    """Ghost batches are torch's layer on each chunk; batch renormalization at r = 1, d = 0
    (fresh running statistics equal to the batch's are not needed: limits 1 and 0 clamp
    r, d to those) is plain batch norm."""
    torch.manual_seed(0)
    x = torch.randn(shape) * 2 + 1
    extras = {"plain": {}, "ghost": {"virtual_batch_size": shape[0] // 2},
              "renorm": {"renorm": bn.Renorm(r_max=1.0, d_max=0.0)}}[kind]  # fmt: skip
    ours = bn.BatchNorm2d(shape[1], **extras)
    theirs = torch.nn.BatchNorm2d(shape[1])
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
    ours.load_state_dict(theirs.state_dict())

    def torch_layer(z):
        if kind != "ghost":
            return theirs(z)
        return torch.cat([theirs(part) for part in z.chunk(2)])

    torch_layer.weight = theirs.weight
    got = _penalty(ours, x.clone().requires_grad_())
    want = _penalty(torch_layer, x.clone().requires_grad_())
    for a, b in zip(got, want):
        assert a is not None, "a second-order gradient was silently lost"
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_double_backward_through_sync_batch_norm_raises():
    from batchnorm import functional as F

    class LocalSync:  # one process: the reductions are the identity
        def reduce_stats(self, local):
            return local

        def reduce_grads(self, sums):
            return sums

    x = torch.randn(8, 4, requires_grad=True)
    y = F.batch_norm(x, None, None, training=True, sync=LocalSync(), backend="reference").pow(3).sum()
    with pytest.raises(RuntimeError, match="SyncBatchNorm"):
        torch.autograd.grad(y, x, create_graph=True)
    assert torch.autograd.grad(y, x)[0].shape == x.shape  # first order still works


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels-last"])
def test_sync_reductions_reach_both_passes(shape, channels_last):
    """SyncBatchNorm's two reductions (statistics in forward, gradient sums between the
    backward's two passes) at both sizes, through a synchronizer that mirrors a second process
    holding the same batch: outputs and gradients equal torch's layer on the two batches
    concatenated."""
    from batchnorm import functional as F
    from batchnorm.stats import Stats

    class Mirrored:
        def reduce_stats(self, local):
            return Stats(2 * local.count, local.mean, 2 * local.m2)

        def reduce_grads(self, sums):
            return 2 * sums

    ours, theirs = _pair(shape)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(shape).contiguous(memory_format=fmt)
    dy = torch.randn(shape)
    xa = x.clone().requires_grad_()
    y = F.batch_norm(xa, ours.running_mean, ours.running_var, ours.weight, ours.bias, training=True,
                     activation="relu", sync=Mirrored())  # fmt: skip
    y.backward(dy)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    want = theirs(torch.cat([a, b])).relu()
    want.backward(torch.cat([dy, dy]))
    _close(y, want[: shape[0]])
    _close(xa.grad, a.grad)
    _close(ours.weight.grad, theirs.weight.grad / 2)  # the parameters' gradients stay this process's
    _close(ours.bias.grad, theirs.bias.grad / 2)
    _close(ours.running_mean, theirs.running_mean)
    _close(ours.running_var, theirs.running_var)


def test_in_place_ops_hooks_and_pickling(shape):
    ours, theirs = _pair(shape)
    seen = []
    hook = ours.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    x = torch.randn(shape)
    residual, dy = torch.randn(shape), torch.randn(shape)
    outputs = []
    for layer in (ours, theirs):
        xg = x.clone().requires_grad_()
        y = layer(xg)
        y += residual  # in place on the layer's output, as torchvision's blocks do
        y.relu_()
        y.backward(dy)
        outputs.append((y, xg.grad, layer.weight.grad))
    for got, want in zip(*outputs):
        _close(got, want)
    assert seen == [torch.Size(shape)]
    hook.remove()  # a lambda cannot be pickled
    restored = pickle.loads(pickle.dumps(ours))
    copied = copy.deepcopy(ours)
    ours.eval()
    for other in (restored, copied):
        other.eval()
        _close(other(x.detach()), ours(x.detach()))


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_activation_checkpointing_counts_the_batch_once(shape, reentrant):
    """torch.utils.checkpoint recomputes the forward in backward; torch's layer then folds the
    batch in twice (a known torch bug); ours once: the same running statistics, gradients and
    count as without checkpointing."""
    from torch.utils.checkpoint import checkpoint

    plain, _ = _pair(shape)
    checkpointed, theirs = _pair(shape)
    x = torch.randn(shape)
    xs = [x.clone().requires_grad_() for _ in range(3)]
    plain(xs[0]).square().sum().backward()
    checkpoint(checkpointed, xs[1], use_reentrant=reentrant).square().sum().backward()
    checkpoint(theirs, xs[2], use_reentrant=reentrant).square().sum().backward()
    assert theirs.num_batches_tracked.item() == 2  # torch's: the recomputation counted too
    assert checkpointed.num_batches_tracked.item() == plain.num_batches_tracked.item() == 1
    torch.testing.assert_close(checkpointed.running_mean, plain.running_mean)
    torch.testing.assert_close(checkpointed.running_var, plain.running_var)
    torch.testing.assert_close(xs[1].grad, xs[0].grad)
