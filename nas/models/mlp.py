"""Fully-connected layers with the norm in every position: MLP networks for vector data and MLP classifier heads.

Plain layer (`LinearBlock`): linear, norm and activation in the order `position` names
(pre_linear = norm -> linear -> act, post_linear = linear -> norm -> act, the usual, post_act =
linear -> act -> norm), then dropout. Residual layer (`ResidualLinearBlock`), the pre-norm block of
Gorishniy et al. 2021 ("Revisiting deep learning models for tabular data"):
x + drop(linear(drop(act(linear(norm(x)))))). A residual MLP starts with a linear stem to the width and
ends with norm -> act before its classifier, as theirs does.

As in `nas.models.blocks`, the norm and activation are injected factories (None: no norm) and a
linear keeps its bias unless the norm right after it centres every feature. The norms are the
catalogue's (`nas.models.norms`) for 0-D feature maps: BatchNorm1d, batch renorm, GroupNorm(1) as layer norm.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from nas.models.blocks import ActFactory, NormFactory, dropout_layers, ordered_layers
from nas.models.norms import ACTIVATIONS, norm_layer

FC_POSITIONS = ("pre_linear", "post_linear", "post_act")
FC_DIMS = 0  # a fully-connected layer's features have no spatial axes: norms get dims=0


class LinearBlock(nn.Sequential):
    """linear, norm and activation in the order `position` names, then optional dropout."""

    ORDERS = {
        "pre_linear": ("norm", "linear", "act"),
        "post_linear": ("linear", "norm", "act"),
        "post_act": ("linear", "act", "norm"),
    }
    __constants__ = ["position"]  # TorchScript: blocks with the same children in another order stay apart

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        norm_layer: NormFactory | None = None,
        act_layer: ActFactory = nn.ReLU,
        position: str = "post_linear",
        dropout: float = 0.0,
    ):
        linear = lambda bias: nn.Linear(in_features, out_features, bias=bias)  # noqa: E731
        order, sizes = self.ORDERS[position], (in_features, out_features)
        super().__init__(ordered_layers(order, "linear", linear, sizes, norm_layer, act_layer, dropout))
        self.position = position


class ResidualLinearBlock(nn.Module):
    """x + drop(linear2(drop(act(linear1(norm(x)))))): the pre-norm residual block of a tabular ResNet."""

    def __init__(
        self,
        width: int,
        *,
        norm_layer: NormFactory | None = None,
        act_layer: ActFactory = nn.ReLU,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.norm = nn.Identity() if norm_layer is None else norm_layer(width)
        self.linear1, self.act = nn.Linear(width, width), act_layer()
        self.drop1 = nn.Sequential(OrderedDict(dropout_layers(dropout)))
        self.linear2 = nn.Linear(width, width)
        self.drop2 = nn.Sequential(OrderedDict(dropout_layers(dropout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop2(self.linear2(self.drop1(self.act(self.linear1(self.norm(x))))))


class MLP(nn.Module):
    """Fully-connected layers and a linear classifier, for samples that are vectors (N, F)."""

    add_channel = False  # as nas.models.build.Net's: vectors need no channel axis

    def __init__(self, features: nn.Sequential, head: nn.Linear):
        super().__init__()
        self.features = features
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_mlp(spec: dict, input_shape: tuple[int, ...], num_classes: int) -> MLP:
    """The MLP an ArchSpec's `mlp` entry describes, for vectors of `input_shape` (F,)."""
    if len(input_shape) != 1:
        raise ValueError(f"input shape {tuple(input_shape)}: an MLP takes vectors (F,); flatten the samples first")
    entries = spec["mlp"]["layers"]
    layers, features = [], input_shape[0]
    if entries[0].get("type") == "residual":  # a residual MLP's layers are all residual, of one width
        width = entries[0]["width"]
        layers.append(("stem", nn.Linear(features, width)))
        for i, layer in enumerate(entries):
            factories = layer_factories(layer)
            layers.append((f"layer{i + 1}", ResidualLinearBlock(width, dropout=layer.get("dropout", 0.0), **factories)))
        last = layer_factories(entries[-1])
        norm = last["norm_layer"]
        layers += [("norm", norm(width) if norm else nn.Identity()), ("act", last["act_layer"]())]
        features = width
    else:
        layers, features = fc_layers(entries, features, "layer")
    return MLP(nn.Sequential(OrderedDict(layers)), nn.Linear(features, num_classes))


def layer_factories(layer: dict) -> dict:
    """The norm and activation factories of an ArchSpec's fully-connected layer entry."""
    return {"norm_layer": norm_layer(layer["norm"], FC_DIMS), "act_layer": ACTIVATIONS[layer["activation"]]}


def fc_layers(entries: list[dict], in_features: int, prefix: str) -> tuple[list[tuple[str, nn.Module]], int]:
    """Named plain LinearBlocks for a list of layer entries, and the features the last one gives."""
    layers = []
    for i, layer in enumerate(entries):
        block = LinearBlock(
            in_features,
            layer["width"],
            position=layer["norm"].get("position", "post_linear"),
            dropout=layer.get("dropout", 0.0),
            **layer_factories(layer),
        )
        layers.append((f"{prefix}{i + 1}", block))
        in_features = layer["width"]
    return layers, in_features


def make_head(head: dict | None, in_features: int, num_classes: int) -> nn.Module:
    """A classifier head: one Linear (no head entry, or no layers), or fully-connected layers then the Linear."""
    entries = (head or {}).get("layers", [])
    if not entries:
        return nn.Linear(in_features, num_classes)
    layers, features = fc_layers(entries, in_features, "fc")
    return nn.Sequential(OrderedDict([*layers, ("classifier", nn.Linear(features, num_classes))]))
