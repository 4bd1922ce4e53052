"""k models of one architecture as one model whose channels are the k models' channels side by side.

Fold f's channels are block f of every feature map, so each layer keeps the folds apart:
a conv becomes a grouped conv (k times the groups), a per-channel norm (BatchNorm, batch
renorm) gets k times the channels and so keeps k sets of running statistics, GroupNorm gets
k times the groups (its groups are runs of channels, so none spans two folds), and
activations, pools and dropout act per element or per channel. A linear layer becomes k
linear maps applied batched: the classifier's give (k, B, classes) logits, a hidden layer's
(an MLP's, a head's) go back to channel blocks for the next layer. One forward of the stacked
model is the k forwards in the ops of one, so small models, whose cost is mostly per-op
overhead, train several times for the cost of about one; every parameter is still its fold's
own, so gradients and any elementwise optimizer (SGD, AdamW) stay per fold.

We tried `torch.func.vmap` over `functional_call` first: it gives the same numbers, but its
batching rules add a reshape or copy around most layers, and on the 2-core CPU it was no
faster than training the folds one by one; this layout is the one vmap lowers convs to anyway.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from nas.models.batch_renorm import BatchRenorm
from nas.models.blocks import ConvBlock, ResidualBlock
from nas.models.build import GLOBAL_POOL, POOL, Net
from nas.models.families import head_name
from nas.models.mlp import MLP, LinearBlock, ResidualLinearBlock
from nas.models.norms import ACTIVATIONS


class NotStackable(Exception):
    """The models cannot be stacked (the message says which layer); train them one by one."""


# Layers without state that act per element or per channel: shared by all folds as they are.
PER_CHANNEL = (
    nn.Identity,
    nn.Dropout,
    *ACTIVATIONS.values(),
    *GLOBAL_POOL.values(),
    *(cls for by_dims in POOL.values() for cls in by_dims.values()),
)
# Forwards that only chain their children (and add a shortcut, which adds channel blocks to channel blocks).
CONTAINERS = (Net, MLP, nn.Sequential, ConvBlock, ResidualBlock, LinearBlock, ResidualLinearBlock)


class StackedLinear(nn.Module):
    """k linear maps at once on (B, k*F) features, fold-major: to (k, B, out) logits (the classifier), or back to
    (B, k*out) features, fold-major, for the next layer (`hidden`)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, hidden: bool = False):
        super().__init__()
        self.hidden = hidden
        self.weight = nn.Parameter(weight)  # (k, out, F)
        self.bias = None if bias is None else nn.Parameter(bias)  # (k, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, out, features = self.weight.shape
        x = x.view(len(x), k, features).transpose(0, 1)
        weight = self.weight.transpose(1, 2)
        y = torch.bmm(x, weight) if self.bias is None else torch.baddbmm(self.bias.unsqueeze(1), x, weight)
        return y.transpose(0, 1).reshape(-1, k * out) if self.hidden else y


@dataclass
class Link:
    """A tensor of the stacked model and the k fold tensors it holds: concatenated on axis 0,
    stacked on a new axis 0, or one shared value (a step counter, equal in every fold)."""

    layer: nn.Module  # the stacked layer; its tensor looked up by name, as `.to()` may replace buffers
    name: str
    folds: list[torch.Tensor]
    how: str  # cat | stack | shared

    @property
    def stacked(self) -> torch.Tensor:
        return getattr(self.layer, self.name)

    def fold(self, f: int) -> torch.Tensor:
        if self.how == "cat":
            return self.stacked.chunk(len(self.folds))[f]
        return self.stacked[f] if self.how == "stack" else self.stacked


@dataclass
class Stacked:
    model: nn.Module  # input (B, k*C, ...): fold f's batch in channel block f; output (k, B, classes)
    links: list[Link]
    add_channel: bool  # the folds' models add the channel axis of (N, L) signals themselves

    def fold_input(self, xb: torch.Tensor) -> torch.Tensor:
        """(k, B, *sample) fold batches -> the stacked model's (B, k*C, ...) input."""
        if self.add_channel:
            xb = xb.unsqueeze(2)
        k, b, c, *spatial = xb.shape
        return xb.transpose(0, 1).reshape(b, k * c, *spatial)

    def parameters_by_decay(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(decay, no_decay) as `make_optimizer` splits a fold's model: by the fold tensor's rank."""
        params = [link for link in self.links if isinstance(link.stacked, nn.Parameter) and link.stacked.requires_grad]
        return [p.stacked for p in params if p.folds[0].ndim > 1], [p.stacked for p in params if p.folds[0].ndim <= 1]

    @torch.no_grad()
    def write_back(self) -> None:
        """Copy each fold's part of the stacked state into that fold's model."""
        for link in self.links:
            for f, tensor in enumerate(link.folds):
                tensor.copy_(link.fold(f))


def stack(models: list[Net]) -> Stacked:
    """One model computing the k `models` (same architecture) side by side; their state copied in."""
    first = models[0]
    if not isinstance(first, (Net, MLP)):
        raise NotStackable(f"{type(first).__name__} is neither a nas.models.build.Net nor a nas.models.mlp.MLP")
    stacked, links, classifier = copy.deepcopy(first), [], head_name(first)
    for name, module in list(stacked.named_modules()):
        folds = [m.get_submodule(name) for m in models]
        if isinstance(module, CONTAINERS + PER_CHANNEL):
            continue
        replacement, how = _stack_layer(folds, head=name == classifier)
        parent, _, attr = name.rpartition(".")
        setattr(stacked.get_submodule(parent), attr, replacement)
        for tensor_name, tensor in (*replacement.named_parameters(), *replacement.named_buffers()):
            fold_tensors = [getattr(m, tensor_name) for m in folds]
            links.append(Link(replacement, tensor_name, fold_tensors, "shared" if tensor.ndim == 0 else how))
    stacked.add_channel = False
    return Stacked(stacked, links, first.add_channel)


def _stack_layer(folds: list[nn.Module], head: bool) -> tuple[nn.Module, str]:
    """The stacked form of one layer with state, and how its tensors hold the folds' (cat / stack)."""
    m, k = folds[0], len(folds)
    factory = {"device": next(iter([*m.parameters(), *m.buffers()]), torch.empty(0)).device}
    if isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.padding_mode == "zeros":
        new = type(m)(
            k * m.in_channels,
            k * m.out_channels,
            m.kernel_size,
            m.stride,
            m.padding,
            m.dilation,
            k * m.groups,
            m.bias is not None,
            **factory,
        )
    elif type(m) in (nn.BatchNorm1d, nn.BatchNorm2d):
        new = type(m)(k * m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats, **factory)
    elif isinstance(m, BatchRenorm):
        new = BatchRenorm(
            k * m.num_features, m.dims, m.momentum, m.eps, m.affine, m.r_max, m.d_max, m.warmup, m.delay
        ).to(factory["device"])
    elif isinstance(m, nn.GroupNorm):
        new = nn.GroupNorm(k * m.num_groups, k * m.num_channels, m.eps, m.affine, **factory)
    elif type(m) is nn.Linear:
        with torch.no_grad():
            bias = None if m.bias is None else torch.stack([f.bias for f in folds])
            return StackedLinear(torch.stack([f.weight for f in folds]), bias, hidden=not head), "stack"
    else:
        raise NotStackable(f"no stacked form for {type(m).__name__} layers")
    with torch.no_grad():
        for name, tensor in (*new.named_parameters(), *new.named_buffers()):
            parts = [getattr(f, name) for f in folds]
            tensor.copy_(parts[0] if tensor.ndim == 0 else torch.cat(parts))
    return new, "cat"
