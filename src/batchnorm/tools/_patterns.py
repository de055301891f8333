"""Which module feeds which: the `(producer, consumer)` pairs the tools rewrite.

A pair is a module called exactly once whose output goes to exactly one consumer (an
activation, a batch norm, ...), found by tracing the model with `torch.fx`; when tracing
fails (data-dependent control flow, say), by walking every `nn.Sequential` in order, where
child i feeds child i + 1. Batch-norm layers (ours included) are kept as leaves of the
trace, so their own forward is never traced.

A trace runs the forward in one mode and records the branch `self.training` takes there.
A tool whose result must hold in both modes (convert's fusion) asks for pairs found in
both (`both_modes=True`): a model whose graph differs between them falls back to the
`nn.Sequential` order, which does not depend on the mode.

Where fx cannot trace (transformers' models, data-dependent control flow) and the tool
was given an example input, the pairs come from one forward of it instead
(`observed_pairs`): module hooks see which module's output tensor is the first argument
of which module call, and a torch-function mode sees every torch operation reading that
tensor, so a pair is kept only when every read happens inside the consumer's call.

Linear and Conv/ConvTranspose layers (`LAYERS`) are leaves of the trace too, subclasses
included (torchvision's Conv3DSimple), when their forward is the base class's: one that
overrides it (a weight-standardized conv) computes something else, so no tool may treat
it as the plain layer.

Activations are recognized as modules (`nn.ReLU()`), functions (`F.relu(x)`,
`torch.relu(x)`) or tensor methods (`x.relu()`); `activation_name` says which of the
activations our layers can fuse it is, if any.
"""

from __future__ import annotations

import contextlib
import math
import operator
from collections import Counter, defaultdict
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree

from .. import activations
from ..norm_act import BatchNormAct
from ._common import batchnorm_layers, is_batchnorm, leaves_no_trace, run_example, wrapped_module
from .freeze import frozen_stats

LAYERS = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
)  # fmt: skip


def is_plain_layer(m: nn.Module) -> bool:
    """A Linear / Conv / ConvTranspose, or a subclass computing the same (the base forward)."""
    return any(isinstance(m, base) and type(m).forward is base.forward for base in LAYERS)


class Consumer(NamedTuple):
    """What takes a producer's output as its first argument, and nothing else does."""

    op: Any  # an nn.Module, a function, or a tensor method's name
    args: tuple  # its other positional arguments
    kwargs: dict
    path: str | None  # the module's path when op is a module
    node: fx.Node | None  # its fx node (None on the Sequential fallback)


class Pair(NamedTuple):
    producer: str  # path of a module called exactly once
    consumer: Consumer
    after: Consumer | None  # the sole consumer of the consumer's output, when there is one


class _Tracer(fx.Tracer):
    """torch's default tracer, with every batch-norm layer kept as a leaf, and every
    BatchNormAct: a graph rewritten by a tool keeps it whole (fused), and its `bn` is found
    as `<its path>.bn`."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return is_batchnorm(m) or is_plain_layer(m) or isinstance(m, BatchNormAct) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> tuple[fx.GraphModule | None, str | None]:
    """(graph module, None), or (None, why tracing failed)."""
    try:
        graph = _Tracer().trace(model)
    except Exception as error:  # fx raises many kinds; the caller falls back and records why
        return None, f"torch.fx could not trace the model ({type(error).__name__}: {error})"
    return fx.GraphModule(model, graph), None


def trace_in_both_modes(model: nn.Module) -> tuple[fx.GraphModule | None, str | None]:
    """(graph module, None) when tracing the model in training and in evaluation mode
    records the same graph (the one returned, with every module's mode as before), else
    (None, why)."""
    modes = {m: m.training for m in model.modules()}
    codes = []
    try:
        for training in (not model.training, model.training):  # the model's own mode last
            model.train(training)
            gm, why = trace(model)
            if gm is None:
                return None, why
            codes.append(gm.code)
    finally:
        for m, training in modes.items():
            m.training = training
    if codes[0] != codes[1]:
        return None, "torch.fx records a different graph in training and in evaluation mode (a self.training branch)"
    gm.training = model.training
    return gm, None


def module_calls(graph: fx.Graph) -> Counter:
    """How many times each module path is called in the graph."""
    return Counter(n.target for n in graph.nodes if n.op == "call_module")


def sole_user(node: fx.Node) -> fx.Node | None:
    """The one node that uses `node`, if exactly one does."""
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def consumer_of(node: fx.Node, gm: fx.GraphModule, calls: Counter | None = None) -> Consumer | None:
    """The sole consumer of `node` taking it as first argument, looking through nn.Identity
    modules (timm's blocks call an identity drop-block between batch norm and activation);
    with `calls`, a module consumer must also be called only there."""
    user = sole_user(node)
    while user is not None and user.op == "call_module" and isinstance(gm.get_submodule(user.target), nn.Identity):
        node, user = user, sole_user(user)
    if user is None or not user.args or user.args[0] is not node:
        return None
    if user.op == "call_module":
        if calls is not None and calls[user.target] != 1:
            return None
        return _module_consumer(gm.get_submodule(user.target), user.target, user.args[1:], dict(user.kwargs), user)
    if user.op in ("call_function", "call_method"):
        return Consumer(user.target, user.args[1:], dict(user.kwargs), None, user)
    return None


def _module_consumer(module: nn.Module, path: str, args: tuple, kwargs: dict, node: fx.Node | None) -> Consumer:
    """The consumer a call of `module` at `path` is; for a BatchNormAct, the batch norm it
    holds, which is what takes the tensor first (the tools look for batch norms)."""
    if isinstance(module, BatchNormAct):
        return Consumer(module.bn, args, kwargs, f"{path}.bn", node)
    return Consumer(module, args, kwargs, path, node)


def pairs(model: nn.Module, *, both_modes: bool = False, example_input=None) -> tuple[list[Pair], str | None]:
    """Every (producer, consumer) pair of the model, and a note when tracing failed.

    both_modes: only pairs that hold in training and in evaluation mode.
    example_input: what to run the model on when fx cannot trace it (`observed_pairs`);
        without it, the order of nn.Sequential containers is used.
    """
    wrapper = wrapped_module(model)
    if wrapper is not None:  # fx cannot trace torch.compile's or DataParallel's wrapper: what it runs
        name, inner = wrapper
        found, why = pairs(inner, both_modes=both_modes, example_input=example_input)
        return [_prefixed(pair, f"{name}.") for pair in found], why
    gm, why = trace_in_both_modes(model) if both_modes else trace(model)
    if gm is None and example_input is not None:
        modes = (not model.training, model.training) if both_modes else (model.training,)
        runs = [observed_pairs(model, example_input, training) for training in modes]
        both = set.intersection(*({(p.producer, p.consumer.path) for p in run} for run in runs))
        return [p for p in runs[-1] if (p.producer, p.consumer.path) in both], (
            why + "; found the pairs in a forward of example_input"
        )
    if gm is None:
        return _sequential_pairs(model), why + "; used the order of nn.Sequential containers"
    calls = module_calls(gm.graph)
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or calls[node.target] != 1:
            continue
        consumer = consumer_of(node, gm, calls)
        if consumer is not None:
            after = consumer_of(consumer.node, gm, calls)
            found.append(Pair(node.target, consumer, after))
    return found, None


def _prefixed(pair: Pair, prefix: str) -> Pair:
    """`pair` with its module paths under `prefix` (found in a submodule, used from its parent)."""

    def under(consumer: Consumer | None) -> Consumer | None:
        if consumer is None or consumer.path is None:
            return consumer
        return consumer._replace(path=prefix + consumer.path)

    return Pair(prefix + pair.producer, under(pair.consumer), under(pair.after))


class _Reads(TorchFunctionMode):
    """Records, per tracked tensor (by id; the caller keeps them alive, so no id is reused),
    the modules being called (paths, outermost first) at each torch operation that reads
    it. Only the operations the forward calls itself are seen: those inside one run with
    the mode off."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.tracked: set[int] = set()
        self.reads: dict[int, list[tuple[str, ...]]] = defaultdict(list)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.read((args, kwargs or {}), tuple(self.stack))
        return func(*args, **(kwargs or {}))

    def read(self, values, stack: tuple[str, ...]) -> None:
        """Record a read of every tracked tensor in `values` (any nesting) with `stack`."""
        for leaf in _pytree.tree_leaves(values):
            if isinstance(leaf, Tensor) and id(leaf) in self.tracked:
                self.reads[id(leaf)].append(stack)


@torch.no_grad()
def observed_pairs(model: nn.Module, example_input, training: bool) -> list[Pair]:
    """The pairs one forward of `example_input` in the given mode shows, running statistics
    and modes left as they were: a module called once whose output tensor is the first
    argument of a module called once (the innermost, when containers pass it down) that
    is the only reader of the tensor: every torch operation reading it runs inside that
    call, and it is neither part of the model's output nor handed on inside a module's
    tuple or dict output."""
    reads = _Reads()
    calls: Counter = Counter()
    outputs: dict[str, Tensor] = {}
    takers: dict[int, list[tuple[str, tuple[str, ...]]]] = defaultdict(list)
    seen: list[Tensor] = []  # every tensor keyed by id here, kept alive so that no id is reused

    def before(path):
        def hook(module, args):
            calls[path] += 1
            if args and isinstance(args[0], Tensor):
                takers[id(args[0])].append((path, tuple(reads.stack)))
                seen.append(args[0])
            reads.stack.append(path)

        return hook

    def after(path):
        def hook(module, args, output):
            reads.stack.pop()
            if not isinstance(output, Tensor):
                reads.read(output, ())  # handed on inside a container: to whom, hooks cannot tell
            elif path not in outputs:
                outputs[path] = output
                reads.tracked.add(id(output))
                seen.append(output)

        return hook

    # An nn.Identity hands on the very tensor it takes: it is no consumer, only a step.
    named = [(path, m) for path, m in model.named_modules() if path and not isinstance(m, nn.Identity)]
    handles = [m.register_forward_pre_hook(before(path)) for path, m in named]
    handles += [m.register_forward_hook(after(path), always_call=True) for path, m in named]
    layers = batchnorm_layers(model)
    try:
        with leaves_no_trace(model, layers), frozen_stats(model) if layers else contextlib.nullcontext(), reads:
            model.train(training)
            reads.read(run_example(model, example_input, "finding which layer feeds which"), ())  # returned
    finally:
        for handle in handles:
            handle.remove()

    def consumer_of_output(path: str) -> Consumer | None:
        tensor = outputs.get(path)
        if calls[path] != 1 or tensor is None or not takers.get(id(tensor)):
            return None
        taker, stack = max(takers[id(tensor)], key=lambda t: len(t[1]))  # the innermost call
        outer = [p for p, _ in takers[id(tensor)] if p != taker]
        if calls[taker] != 1 or taker == path or any(p not in stack for p in outer):
            return None
        if any(taker not in s for s in reads.reads[id(tensor)]):
            return None  # read outside the consumer's call too
        return Consumer(model.get_submodule(taker), (), {}, taker, None)

    found = []
    for path in outputs:
        consumer = consumer_of_output(path)
        if consumer is not None:
            found.append(Pair(path, consumer, consumer_of_output(consumer.path)))
    return found


def _sequential_pairs(model: nn.Module) -> list[Pair]:
    """Child i feeds child i + 1 in every nn.Sequential (a module appearing twice is left out)."""
    seen = Counter(id(m) for m in model.modules(remove_duplicate=False))
    found = []
    for path, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        children = [(f"{path}.{name}" if path else name, m) for name, m in seq.named_children()]
        children = [(p, m) for p, m in children if not isinstance(m, nn.Identity)]
        for i in range(len(children) - 1):
            (first, m1), (second, m2) = children[i], children[i + 1]
            if seen[id(m1)] != 1 or seen[id(m2)] != 1:
                continue
            after = None
            if i + 2 < len(children) and seen[id(children[i + 2][1])] == 1:
                after = _module_consumer(children[i + 2][1], children[i + 2][0], (), {}, None)
            found.append(Pair(first, _module_consumer(m2, second, (), {}, None), after))
    return found


# Fusable activations, by form (modules: `activations.name_of_module`).
_FUNCTIONS = {
    F.relu: "relu",
    F.relu_: "relu",
    torch.relu: "relu",
    torch.relu_: "relu",
    F.leaky_relu: "leaky_relu",
    torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid",
    torch.tanh: "tanh",
    F.tanh: "tanh",
    F.silu: "silu",
    F.gelu: "gelu",
    F.relu6: "relu6",
    F.hardswish: "hardswish",
}
_METHODS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid", "tanh": "tanh", "tanh_": "tanh"}

# Other activations: not fusable (LeakyReLU and GELU with other arguments than ours), but
# still "an activation" for `insert`.
_OTHER_MODULES = (
    nn.LeakyReLU, nn.GELU, nn.ELU, nn.CELU, nn.SELU, nn.GLU, nn.Hardtanh, nn.PReLU, nn.RReLU, nn.Softplus,
    nn.Softsign, nn.Mish, nn.Hardsigmoid, nn.LogSigmoid, nn.Tanhshrink,
)  # fmt: skip
_OTHER_FUNCTIONS = (
    F.elu, F.celu, F.selu, F.glu, F.hardtanh, F.prelu, F.rrelu, F.softplus,
    F.softsign, F.mish, F.hardsigmoid, F.logsigmoid, F.tanhshrink,
)  # fmt: skip


def activation_name(c: Consumer) -> str | None:
    """The name our layers fuse `c` under ("relu", ...), or None when it is not fusable."""
    if isinstance(c.op, nn.Module):
        name = activations.name_of_module(c.op)
        return name if name != activations.NOT_FUSABLE and not c.args and not c.kwargs else None
    if isinstance(c.op, str):
        return _METHODS.get(c.op) if not c.args and not c.kwargs else None
    name = _FUNCTIONS.get(c.op) if callable(c.op) else None
    extra = dict(c.kwargs)
    extra.pop("inplace", None)  # in place or not, the value is the same
    if name == "leaky_relu":
        slope = c.args[0] if c.args else extra.pop("negative_slope", activations.LEAKY_SLOPE)
        return name if math.isclose(slope, activations.LEAKY_SLOPE) and len(c.args) <= 2 and not extra else None
    if name == "gelu":
        return name if extra.pop("approximate", "none") == "none" and not c.args and not extra else None
    if name in ("relu", "relu6", "hardswish") and c.args in ((False,), (True,)) and not extra:
        return name  # F.relu(x, inplace) written positionally (F.relu6, F.hardswish alike)
    return name if not c.args and not extra else None


def is_activation(c: Consumer) -> bool:
    """Any activation: fusable, or one of the other common ones."""
    if isinstance(c.op, nn.Module):
        return activations.name_of_module(c.op) not in (None, activations.NOT_FUSABLE) or isinstance(c.op, _OTHER_MODULES)
    if isinstance(c.op, str):
        return c.op in _METHODS
    return c.op in _FUNCTIONS or any(c.op is f for f in _OTHER_FUNCTIONS)


def is_add(node: fx.Node) -> bool:
    """A plain two-tensor addition: a + b, a += b, torch.add(a, b), a.add(b), a.add_(b)."""
    plain = node.op == "call_function" and node.target in (operator.add, operator.iadd, torch.add)
    method = node.op == "call_method" and node.target in ("add", "add_")
    return (plain or method) and len(node.args) == 2 and not node.kwargs
