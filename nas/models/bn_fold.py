"""Fold normalization into convolutions for inference: `fold_norms(model) -> folded copy`.

In eval mode a norm with running statistics (BatchNorm with `track_running_stats`, batch
renorm) is a fixed per-channel affine map, y = x * scale + shift, with

    scale = weight / sqrt(running_var + eps),   shift = bias - running_mean * scale

(weight 1 and bias 0 without `affine`). Where the norm directly follows a conv whose output
goes nowhere else, the map folds exactly into that conv (W * scale per output channel,
b * scale + shift) and the norm disappears:

| block                        | norm                 | becomes                    |
|------------------------------|----------------------|----------------------------|
| plain, post_conv             | norm                 | folded into conv           |
| plain, pre_conv              | norm                 | ChannelAffine              |
| plain, post_act              | norm                 | ChannelAffine              |
| residual, original           | norm1, norm2         | folded into conv1, conv2   |
| residual, preact             | norm2                | folded into conv1          |
| residual, preact             | norm1                | ChannelAffine              |

A norm before a conv cannot fold into it exactly: the conv zero-pads, and a shifted input
would pad with the shift instead. A norm after the activation has no conv right before it.
Both become a `ChannelAffine`, which has no running statistics to update or misuse.

Fully-connected layers (an MLP, a chain's head) fold both ways, as a linear layer pads nothing:
a norm right after a Linear folds into it as into a conv, and a norm whose next layer is a Linear
(pre_linear, a post_act norm before the next layer, a pre-norm residual block's norm) folds into
that Linear's input side, W' = W * scale per input feature, b' = b + W @ shift. Dropout between
them is the identity in eval mode. What is left (a residual MLP's last norm, before its activation)
becomes a ChannelAffine.

Norms without running statistics (GroupNorm for group / layer / instance, BatchNorm with
`track_running_stats=False`) normalize with statistics of the input itself, even in eval
mode: they are data-dependent, cannot be folded, and are left as they are.

Any other network (timm, torchvision, a user's module) is traced with torch.fx, norms kept as
leaves: wherever a norm's input is a conv whose output goes nowhere else, it folds into that conv,
whatever the module nesting (torchvision's BasicBlock keeps conv1 and bn1 as siblings). A fused
norm + activation (timm's BatchNormAct2d) leaves its activation behind. A model torch.fx cannot trace
(Python control flow on tensor values) folds where its norms follow convs in a Sequential.

The folded model exports (`torch.export.export`) with a dynamic batch axis; in torch 2.14 a
named Dim with min=1 works, and the program then runs on any batch size up to max, 1 included:

    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.export.export(folded, (x,), dynamic_shapes={"x": {0: batch}})

It also scripts (`torch.jit.script`), which torch 2.14 still runs but warns is deprecated.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from nas.models.blocks import ResidualBlock
from nas.models.mlp import MLP, ResidualLinearBlock
from nas.models.norm_swap import fused_tail
from nas.models.norms import is_norm, running_stats_layers, uses_running_stats

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
WEIGHTED = (*CONVS, nn.Linear)  # layers a norm right after them folds into


class ChannelAffine(nn.Module):
    """y = x * scale + shift, per channel (axis 1), for (N, C), (N, C, L) and (N, C, H, W)."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor):
        super().__init__()
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("shift", shift.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1, -1] + [1] * (x.dim() - 2)
        return x * self.scale.view(shape) + self.shift.view(shape)

    def extra_repr(self) -> str:
        return f"{self.scale.numel()}"


def count_norms_with_running_stats(model: nn.Module) -> int:
    """How many modules in `model` still carry running statistics (0 after `fold_norms`)."""
    return len(running_stats_layers(model))


def norm_scale_shift(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of a running-statistics norm's eval-mode map, computed in float64."""
    scale = (norm.running_var.double() + norm.eps).rsqrt()
    shift = -norm.running_mean.double() * scale
    if norm.weight is not None:
        scale, shift = scale * norm.weight.double(), shift * norm.weight.double()
    if norm.bias is not None:
        shift = shift + norm.bias.double()
    return scale, shift


def _foldable(norm: nn.Module) -> bool:
    return uses_running_stats(norm)


def _fold_into_conv(conv: nn.Module, norm: nn.Module) -> None:
    """Make `conv` compute norm(conv(x)); it gains a bias if it had none."""
    scale, shift = norm_scale_shift(norm)
    weight = conv.weight.double() * scale.view(-1, *([1] * (conv.weight.dim() - 1)))
    bias = shift if conv.bias is None else conv.bias.double() * scale + shift
    dtype = conv.weight.dtype
    conv.weight = nn.Parameter(weight.to(dtype))
    conv.bias = nn.Parameter(bias.to(dtype))


def _fold_into_next_linear(norm: nn.Module, linear: nn.Linear) -> None:
    """Make `linear` compute linear(norm(x)); it gains a bias if it had none."""
    scale, shift = norm_scale_shift(norm)
    weight = linear.weight.double()
    bias = weight @ shift + (0.0 if linear.bias is None else linear.bias.double())
    dtype = linear.weight.dtype
    linear.weight = nn.Parameter((weight * scale.view(1, -1)).to(dtype))
    linear.bias = nn.Parameter(bias.to(dtype))


def _chain(module: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, name, layer) for the layers a Sequential runs one after another, nested Sequentials opened."""
    layers = []
    for name, child in module.named_children():
        layers += _chain(child) if isinstance(child, nn.Sequential) else [(module, name, child)]
    return layers


def _fold_before_linears(model: nn.Module) -> None:
    """Fold every running-statistics norm whose next layer (dropout aside) is a Linear into that Linear: along an
    MLP's layers into its classifier, along a chain's head, and in each pre-norm residual block."""
    chains = [
        [(m, "norm", m.norm), (m, "linear1", m.linear1)] for m in model.modules() if isinstance(m, ResidualLinearBlock)
    ]
    if isinstance(model, MLP):
        chains.append([*_chain(model.features), (model, "head", model.head)])
    elif isinstance(model.head, nn.Sequential):
        chains.append(_chain(model.head))
    for steps in chains:
        steps = [step for step in steps if not isinstance(step[2], (nn.Dropout, nn.Identity))]
        for (parent, name, norm), (_, _, linear) in zip(steps, steps[1:]):
            if _foldable(norm) and type(linear) is nn.Linear:
                _fold_into_next_linear(norm, linear)
                setattr(parent, name, nn.Identity())


def _conv_norm_pairs(module: nn.Module) -> list[tuple[str, str]]:
    """(conv, norm) attribute names in `module` where the conv's output goes only into the norm."""
    if isinstance(module, ResidualBlock):
        return [("conv1", "norm2")] if module.preact else [("conv1", "norm1"), ("conv2", "norm2")]
    if isinstance(module, nn.Sequential):  # ConvBlock, and any plain chain of layers
        names = list(module._modules)
        return list(zip(names, names[1:]))
    return []


def _without_norm(norm: nn.Module) -> nn.Module:
    """What is left of a norm once its map folded into the conv: a fused layer's dropout and activation."""
    tail = fused_tail(norm)
    return nn.Sequential(*tail) if tail else nn.Identity()


class _NormsAsLeaves(torch.fx.Tracer):
    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return is_norm(module) or super().is_leaf_module(module, qualified_name)


def _fold_traced(model: nn.Module) -> nn.Module | None:
    """`model` as a torch.fx GraphModule with each norm that follows a conv (its only user) folded into it;
    None when torch.fx cannot trace it or finds nothing to fold."""
    try:
        graph = _NormsAsLeaves().trace(model)
    except Exception:  # noqa: BLE001 - torch.fx raises many kinds for code it cannot trace
        return None
    traced = torch.fx.GraphModule(model, graph)
    calls = [node.target for node in graph.nodes if node.op == "call_module"]
    folded = 0
    for node in list(graph.nodes):
        if node.op != "call_module" or not _foldable(traced.get_submodule(node.target)):
            continue
        source = node.args[0] if node.args else None
        if not (isinstance(source, torch.fx.Node) and source.op == "call_module" and len(source.users) == 1):
            continue
        conv, norm = traced.get_submodule(source.target), traced.get_submodule(node.target)
        if not isinstance(conv, CONVS) or calls.count(source.target) > 1 or calls.count(node.target) > 1:
            continue  # a module called twice would be changed for its other call too
        _fold_into_conv(conv, norm)
        traced.set_submodule(node.target, _without_norm(norm))
        folded += 1
    if not folded:
        return None
    traced.recompile()
    return traced


@torch.no_grad()
def fold_norms(model: nn.Module) -> nn.Module:
    """A copy of `model` in eval mode with every running-statistics norm folded into the conv
    before it or turned into a ChannelAffine; `model` itself is not touched.

    Norms without running statistics are data-dependent and stay (see the module docstring).
    """
    folded = copy.deepcopy(model)
    for module in list(folded.modules()):
        for conv_name, norm_name in _conv_norm_pairs(module):
            conv, norm = getattr(module, conv_name, None), getattr(module, norm_name, None)  # None: dropped
            if isinstance(conv, WEIGHTED) and _foldable(norm):
                _fold_into_conv(conv, norm)
                tail = fused_tail(norm)
                if isinstance(module, nn.Sequential) and not tail:
                    delattr(module, norm_name)
                else:
                    setattr(module, norm_name, _without_norm(norm))
    if _is_ours(folded):
        _fold_before_linears(folded)
    elif running_stats_layers(folded):  # norms left beside, not in, a chain: the graph
        folded = _fold_traced(folded) or folded
    for name, module in list(folded.named_modules()):
        if _foldable(module):
            parent_name, _, child = name.rpartition(".")
            scale, shift = norm_scale_shift(module)
            dtype = module.running_mean.dtype
            affine = ChannelAffine(scale.to(dtype), shift.to(dtype))
            tail = fused_tail(module)
            setattr(folded.get_submodule(parent_name), child, nn.Sequential(affine, *tail) if tail else affine)
    return folded.eval()  # after the swaps: new modules start in training mode


def _is_ours(model: nn.Module) -> bool:
    """Our generated chain (nas.models.build.Net) or MLP, whose blocks `_conv_norm_pairs` knows."""
    from nas.models.build import Net  # late: build imports this module's neighbours

    return isinstance(model, (Net, MLP))
