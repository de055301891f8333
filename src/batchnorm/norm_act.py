"""`BatchNormAct`: a batch-norm layer and the activation after it, as one module.

    layer = bn.BatchNormAct(bn.BatchNorm2d(64), "relu")    # or nn.ReLU(), nn.SiLU(), ...
    y = layer(x)                                           # relu(bn(x))
    y = layer(x, residual=shortcut)                        # relu(bn(x) + shortcut)

Why a module of its own, and not an activation stored in the batch-norm layer: helpers
written for torch's layers (torch's `fuse_conv_bn_eval` and `convert_sync_batchnorm`,
timm's `freeze_batch_norm_2d` and `convert_sync_batchnorm`, torch.ao's fusion) treat
anything that is an `nn.BatchNorm2d` as batch norm alone and rebuild it from its
attributes; an activation kept in it would be dropped without a word. Here the batch norm
is the child `bn`, the activation the child `act`: a helper that replaces `bn` leaves
`act` in place, and this module still computes act(bn(x) + residual).

When `bn` is one of our layers and `act` one of the activations they fuse (see
`activations.name_of_module`), one call of `bn` computes all of it in one kernel
(`bn(x, residual, activation=name)`); otherwise (a helper replaced `bn`, or `act` is one our
kernels do not compute) bn, the add and act run one after another, with the same result.
Under torch.fx the graph holds `bn`, the add and `act` as separate nodes, so fx-based tools
(quantization, conv + bn folding, feature extraction) see the batch norm they know.

State-dict keys are those of `bn` alone (`layer.weight`, not `layer.bn.weight`): a
checkpoint of the model before its activations were fused loads, and the other way round.
"""

from __future__ import annotations

from torch import Tensor, fx, nn

from . import activations
from .extras import BatchNormExtras, refuse_scripting
from .sequence import SequenceBatchNorm


class BatchNormAct(nn.Module):
    """y = act(bn(x) + residual); x: (N, C, *) as `bn` takes it, residual: x's shape or None.

    bn: a batch-norm module (ours, torch's, or anything taking x alone).
    act: an activation module, a name from `activations.NAMES` ("relu", ...), or None (identity).
    """

    def __init__(self, bn: nn.Module, act: nn.Module | str | None = None) -> None:
        super().__init__()
        self.bn = bn
        self.act = act if isinstance(act, nn.Module) else activations.module_for(act)
        self.register_state_dict_post_hook(_flatten_keys)
        self.register_load_state_dict_pre_hook(_nest_keys)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        name = activations.name_of_module(self.act)
        if name != activations.NOT_FUSABLE and fuses(self.bn) and not isinstance(x, fx.Proxy):
            return self.bn(x, residual, activation=name)
        y = self.bn(x)
        return self.act(y if residual is None else y + residual)

    def __prepare_scriptable__(self):
        """torch.jit.script's question before compiling (extras.refuse_scripting)."""
        refuse_scripting(
            self, "It fuses the activation and the residual add into the layer in Python, which TorchScript "
            "cannot compile; use torch.compile or torch.export, which run it"
        )  # fmt: skip


def fuses(bn: nn.Module) -> bool:
    """Whether `bn`'s call computes act(bn(x) + residual) given `activation=`: one of our
    layers, or a SequenceBatchNorm holding one (and not a class overriding their forward)."""
    forward = type(bn).forward
    return forward is BatchNormExtras.forward or (forward is SequenceBatchNorm.forward and fuses(bn.norm))


def _flatten_keys(module: BatchNormAct, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """`prefix + "bn." + key` -> `prefix + key`, in place, keeping the order; the layer's
    version moves along (torch's batch norm reads it when loading old checkpoints)."""
    nested = prefix + "bn."
    local_metadata.update(getattr(state_dict, "_metadata", {}).get(nested[:-1], {}))
    for key in [k for k in state_dict if k.startswith(nested)]:
        state_dict[prefix + key[len(nested):]] = state_dict.pop(key)


def _nest_keys(module: BatchNormAct, state_dict: dict, prefix: str, *args) -> None:
    """The keys `_flatten_keys` wrote (and those of a plain batch-norm layer) back under `bn.`."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        child = key[len(prefix):].split(".", 1)[0]
        if child not in module._modules:
            state_dict[prefix + "bn." + key[len(prefix):]] = state_dict.pop(key)
