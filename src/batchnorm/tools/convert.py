"""`convert`: torch's batch-norm layers to ours (optionally fusing the activation and the
residual add after them); `revert`: ours back to torch's.

What maps, module by module (every other batch-norm subclass is left alone and recorded):

    torch.nn.BatchNorm1d/2d/3d   <->  batchnorm.BatchNorm1d/2d/3d
    torch.nn.SyncBatchNorm       <->  batchnorm.distributed.SyncBatchNorm (when importable;
                                      torch's cannot become a plain BatchNorm without
                                      knowing the process group, so it is skipped otherwise)
    FrozenBatchNorm2d-style       ->  batchnorm.BatchNorm2d, frozen (`freeze`); revert gives
                                      a frozen torch.nn.BatchNorm2d
    timm's BatchNormAct2d,        ->  BatchNormAct(our layer, its `act`): the activation
    SyncBatchNormAct,                 fused, when its `drop` is an identity and its `act` one
    FrozenBatchNormAct2d              our layers fuse (an identity `act`: our layer alone)

A `BatchNormAct` (norm_act.py) is not a batch-norm layer itself: convert and revert change
its `bn` and leave it around the new layer, so a reverted fused model computes
act(torch's bn(x) + residual).

The new layer takes over the old one's parameter and buffer tensors themselves (an
optimizer holding them keeps working), its eps, momentum, affine, track_running_stats,
training mode, frozen state and forward/backward hooks; device and dtype follow.

`fuse=True`, after converting: a batch norm of ours whose output goes only to a fusable
activation (relu, leaky_relu(0.01), sigmoid, tanh, silu, exact gelu) becomes a
`BatchNormAct` of the two, at the batch norm's path (state_dict keys unchanged); and the
ResNet pattern `act(bn(x) + shortcut)` becomes `BatchNormAct(bn, act)(x, shortcut)`. An
activation module used only there moves into the BatchNormAct, nn.Identity taking its
place (the model keeps its class); an activation
written as a function, a shared activation module, or a residual add can only be fused by
rewriting the traced graph, and the module rewritten becomes a `torch.fx.GraphModule` with
the same submodules and state_dict keys (recorded in `changes`). Only patterns found in
both modes are fused, and only a module whose traced graph is the same in both is
rewritten: a trace records the branch `self.training` takes (torchvision's GoogLeNet's
auxiliary heads), so that model keeps its class and its blocks are rewritten instead.
"""

from __future__ import annotations

from torch import fx, nn
from torch.ao.quantization import fuser_method_mappings
from torch.nn.modules.lazy import LazyModuleMixin

from .. import activations
from .. import nn as ours
from ..extras import BatchNormExtras, changed_extras, plain_forward
from ..norm_act import BatchNormAct
from ._common import Changes, is_frozen_style, prepare, replace, require_batchnorm, rest_of_forward
from ._patterns import activation_name, consumer_of, is_add, module_calls, pairs, sole_user, trace_in_both_modes
from .freeze import frozen_state, pin_eval

_TO_OURS: dict[type, type] = {
    nn.BatchNorm1d: ours.BatchNorm1d,
    nn.BatchNorm2d: ours.BatchNorm2d,
    nn.BatchNorm3d: ours.BatchNorm3d,
}
_TO_TORCH: dict[type, type] = {v: k for k, v in _TO_OURS.items()}


def _our_sync_batchnorm() -> type | None:
    try:
        from ..distributed import SyncBatchNorm
    except ImportError:
        return None
    return SyncBatchNorm


def _rebuild(old: nn.Module, cls: type, **extra) -> nn.Module:
    """A `cls` layer with `old`'s settings, owning `old`'s very tensors, mode, hooks and frozen state."""
    tensors = [t for t in (*old.parameters(recurse=False), *old.buffers(recurse=False)) if t.is_floating_point()]
    like = {"device": tensors[0].device, "dtype": tensors[0].dtype} if tensors else {}
    affine = getattr(old, "affine", True)
    new = cls(
        old.num_features,
        eps=old.eps,
        momentum=getattr(old, "momentum", 0.1),
        affine=affine,
        track_running_stats=getattr(old, "track_running_stats", True),
        **like,
        **({"bias": old.bias is not None} if affine else {}),
        **extra,
    )
    for name, tensor in (*old.named_parameters(recurse=False), *old.named_buffers(recurse=False)):
        setattr(new, name, tensor)
    for name, value in vars(old).items():
        if name.startswith(("_forward", "_backward", "_is_full_backward")):
            setattr(new, name, value)
    new.train(old.training)
    if frozen_state(old) is not None:
        pin_eval(new, frozen_state(old))
    return new


def _from_frozen_style(old: nn.Module) -> nn.Module:
    """A frozen BatchNorm2d of ours equal to a FrozenBatchNorm2d-style module in every mode."""
    new = ours.BatchNorm2d(old.running_mean.numel(), eps=old.eps, device=old.weight.device, dtype=old.weight.dtype)
    new.weight = nn.Parameter(old.weight, requires_grad=False)
    new.bias = nn.Parameter(old.bias, requires_grad=False)
    new.running_mean = old.running_mean
    new.running_var = old.running_var
    # Unfreezing later makes gamma and beta trainable, as in a BatchNorm2d built afresh.
    pin_eval(new, {"weight": True, "bias": True})
    return new


def _to_ours(m: nn.Module) -> tuple[nn.Module | None, str | None]:
    """(our layer, None), or (None, why not; None when there is nothing to do)."""
    if isinstance(m, LazyModuleMixin) and m.has_uninitialized_params():
        return None, "uninitialized lazy layer: run one forward first so num_features is known"
    rest = rest_of_forward(m)
    act, why = _activation_of_rest(m, rest or ())
    if why is not None:
        return None, why

    def with_act(layer: nn.Module) -> nn.Module:
        return layer if act is None else BatchNormAct(layer, act).train(m.training)

    if type(m) in _TO_OURS or (rest and isinstance(m, tuple(_TO_OURS))):
        cls = next(cls for torch_cls, cls in _TO_OURS.items() if isinstance(m, torch_cls))
        return with_act(_rebuild(m, cls)), None
    if type(m) is nn.SyncBatchNorm or (rest and isinstance(m, nn.SyncBatchNorm)):
        sync = _our_sync_batchnorm()
        if sync is None:
            return None, "torch.nn.SyncBatchNorm: batchnorm.distributed is not available"
        return with_act(_rebuild(m, sync, process_group=m.process_group)), None
    if is_frozen_style(m) and rest is not None:
        if not hasattr(m, "eps"):
            return None, f"{type(m).__name__} looks like FrozenBatchNorm2d but has no eps attribute"
        return with_act(_from_frozen_style(m)), None
    if type(m) in _TO_TORCH or type(m) is _our_sync_batchnorm():
        return None, None
    return None, f"{type(m).__name__} is not one of torch's batch-norm classes; its behaviour may differ"


def _activation_of_rest(m: nn.Module, rest: tuple[str, ...]) -> tuple[nn.Module | None, str | None]:
    """(the `act` child among the children `rest` that `m`'s forward applies after
    normalizing, None when it is an identity; None), or (None, why a BatchNormAct cannot
    compute them: a child other than `act` that is not an identity, timm's drop-block)."""
    found = None
    for name in rest:
        child = m.get_submodule(name)
        if isinstance(child, nn.Identity):
            continue
        if name != "act":
            return None, (f"{type(m).__name__} applies {name} = {type(child).__name__} after normalizing, "
                          "which a BatchNormAct does not; left as it is")  # fmt: skip
        found = child
    return found, None


def _to_torch(m: nn.Module) -> tuple[nn.Module | None, str | None]:
    """(torch's layer, None), or (None, why not; None when there is nothing to do)."""
    sync = _our_sync_batchnorm()
    target = _TO_TORCH.get(type(m)) or (nn.SyncBatchNorm if sync is not None and type(m) is sync else None)
    if target is None:
        if type(m) in _TO_OURS or type(m) is nn.SyncBatchNorm or is_frozen_style(m):
            return None, None
        return None, f"{type(m).__name__} is not one of ours; left as it is"
    # torch's layers express none of our extras that change the result: revert keeps a layer using one.
    used = [f"{name}={value!r}" for name, value in changed_extras(m).items()]
    if used:
        return None, f"uses {', '.join(used)}, which torch's {target.__name__} cannot express"
    extra = {"process_group": m.process_group} if target is nn.SyncBatchNorm else {}
    return _rebuild(m, target, **extra), None


def _swap_all(model: nn.Module, how, tool: str, inplace: bool) -> tuple[nn.Module, Changes]:
    model = prepare(model, inplace)
    changes = Changes()
    for path, m in require_batchnorm(model, tool):
        new, why = how(m)
        if new is not None:
            model = replace(model, path, new)
            changes.change(path, f"{type(m).__module__}.{type(m).__name__} -> {type(new).__module__}.{type(new).__name__}")
        elif why is not None:
            changes.skip(path, why)
    return model, changes


def convert(
    model: nn.Module, *, fuse: bool = False, inplace: bool = True, example_input=None
) -> tuple[nn.Module, Changes]:
    """torch's batch-norm layers to ours (see the module docstring). Returns (model, changes).

    fuse: also fuse the activation (and the residual add) that follows a layer of ours.
    example_input: with fuse, a tensor (or tuple of forward arguments) to find which
        activation module follows which layer from forwards of it (in both modes, without
        gradients, statistics untouched) when torch.fx cannot trace the model.
    Evaluation outputs are the same before and after, to floating-point rounding.
    """
    model, changes = _swap_all(model, _to_ours, "convert", inplace)
    if fuse:
        model = _fuse_modules(model, changes, example_input)
        model = _fuse_graph(model, changes)
    return model, changes


def revert(model: nn.Module, *, inplace: bool = True) -> tuple[nn.Module, Changes]:
    """Our batch-norm layers back to torch's. Returns (model, changes).

    A `BatchNormAct` stays, around torch's layer: it computes act(bn(x) + residual) with
    the layer it holds. A layer using something torch's cannot express (ghost batches,
    renorm, ...) is kept and recorded in `changes.skipped`.
    """
    return _swap_all(model, _to_torch, "revert", inplace)


def _fusable(model: nn.Module, path: str) -> bool:
    """The module at `path` is a batch-norm layer of ours not yet in a BatchNormAct."""
    m = model.get_submodule(path)
    parent = model.get_submodule(path.rpartition(".")[0])
    return isinstance(m, BatchNormExtras) and plain_forward(m) and not isinstance(parent, BatchNormAct)


def _fuse_modules(model: nn.Module, changes: Changes, example_input) -> nn.Module:
    """BN -> activation module used only there: both become a BatchNormAct at the BN's path,
    nn.Identity takes the activation's."""
    found, why = pairs(model, both_modes=True, example_input=example_input)
    for pair in found:
        act = pair.consumer
        name = activation_name(act)
        if act.path is None or name is None or not _fusable(model, pair.producer):
            continue
        bn = model.get_submodule(pair.producer)
        model = replace(model, act.path, nn.Identity())
        model = replace(model, pair.producer, BatchNormAct(bn, act.op).train(bn.training))
        changes.change(pair.producer, f"fused the activation {name} ({act.path} is now nn.Identity)")
    if why is not None:
        changes.skip("", why + " (no graph fusion)")
    return model


def _fuse_graph(model: nn.Module, changes: Changes, path: str = "", module: nn.Module | None = None) -> nn.Module:
    """act(bn(x)) with a functional or shared activation, and act(bn(x) + shortcut), by
    rewriting the graph of `module` (at `path`; the model by default) when it traces to the
    same graph in both modes, else of each child in turn. Returns the model."""
    module = model if module is None else module
    if isinstance(module, BatchNormAct):
        return model  # fused already
    gm, _ = trace_in_both_modes(module)
    if gm is None:
        for name, child in list(module.named_children()):
            model = _fuse_graph(model, changes, f"{path}.{name}" if path else name, child)
        return model
    if not _rewrite(gm, path, changes):
        return model  # the trace went through every descendant: nothing to fuse anywhere in it
    changes.change(path, f"{type(module).__name__} became a torch.fx.GraphModule (graph rewritten to fuse)")
    return replace(model, path, gm)


def _rewrite(gm: fx.GraphModule, path: str, changes: Changes) -> bool:
    """Fuse every act(bn(x)) and act(bn(x) + shortcut) in the graph of `gm`, the module at
    `path`; whether any was."""
    calls = module_calls(gm.graph)
    rewritten = False
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or calls[node.target] != 1 or len(node.args) != 1 or node.kwargs:
            continue
        if not _fusable(gm, node.target):
            continue
        shortcut, tail = _residual(node)
        act = consumer_of(tail, gm)  # a shared activation module is fine: only this call goes
        name = activation_name(act) if act is not None else None
        if name is None or act.node.args[0] is not tail:  # an identity between: fused in place, if at all
            continue
        with gm.graph.inserting_before(act.node):
            args = (node.args[0],) if shortcut is None else (node.args[0], shortcut)
            fused = gm.graph.call_module(node.target, args)
        act.node.replace_all_uses_with(fused)
        for dead in dict.fromkeys((act.node, tail, node)):  # tail is node without an add
            gm.graph.erase_node(dead)
        bn = gm.get_submodule(node.target)
        gm.set_submodule(node.target, BatchNormAct(bn, activations.module_for(name)).train(bn.training))
        rewritten = True
        what = f"fused the activation {name}" + ("" if shortcut is None else f" and the residual add of {shortcut.name}")
        changes.change(f"{path}.{node.target}" if path else node.target, what)
    if rewritten:
        gm.graph.lint()
        gm.recompile()
    return rewritten


def _residual(node: fx.Node) -> tuple[fx.Node | None, fx.Node]:
    """(shortcut, add node) when bn's output goes only to `bn + shortcut`, else (None, node).

    In-place forms (`out += shortcut`, `out.add_(shortcut)`) qualify only with bn's output
    as the tensor modified, which nothing else reads.
    """
    add = sole_user(node)
    if add is None or not is_add(add):
        return None, node
    a, b = add.args
    inplace = add.target in ("add_",) or getattr(add.target, "__name__", "") == "iadd"
    if a is node and isinstance(b, fx.Node) and b is not node and b.op != "get_attr":
        return b, add
    if b is node and not inplace and isinstance(a, fx.Node) and a.op != "get_attr":
        return a, add
    return None, node


def _torch_ao_fusers() -> dict[tuple[type, ...], object]:
    """torch.ao.quantization's fusers (conv + bn (+ relu), linear + bn, bn + relu, ...) for
    module lists holding our BatchNorm1d/2d/3d where it has torch's: `fuse_modules` looks
    fusers up by exact module type, and its fused modules check them too. Each hands
    torch's fuser torch's layer made from ours (the same tensors, so quantization-aware
    training trains them); a layer using an extra torch's cannot express (ghost batches,
    ...) raises instead of being fused as if it did not. A BatchNormAct is no batch-norm
    layer to them: naming one in a module list raises, as any module they do not know."""

    def as_torchs(fuser):
        def fuse(is_qat, *modules):
            plain = []
            for m in modules:
                torchs, why = _to_torch(m) if type(m) in _TO_TORCH else (m, None)
                if torchs is None:
                    raise NotImplementedError(f"torch.ao cannot fuse this {type(m).__name__}: it {why}")
                plain.append(torchs)
            return fuser(is_qat, *plain)

        return fuse

    return {
        tuple(_TO_OURS.get(t, t) for t in types): as_torchs(fuser)
        for types, fuser in fuser_method_mappings._DEFAULT_OP_LIST_TO_FUSER_METHOD.items()
        if any(t in _TO_OURS for t in types)
    }


# torch.ao.quantization.fuse_modules(model, [["conv", "bn", "relu"]]) then fuses ours too.
fuser_method_mappings._DEFAULT_OP_LIST_TO_FUSER_METHOD.update(_torch_ao_fusers())
