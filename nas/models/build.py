"""Turn an ArchSpec into an nn.Module: `build(spec, input_shape, num_classes)`.

The data's rank chooses the dimension once: a sample of shape (C, H, W) gets Conv2d /
BatchNorm2d, a sample of shape (L,) or (C, L) gets Conv1d / BatchNorm1d. An `mlp` spec is
fully-connected layers for vectors (F,), and a chain's `head` its FC layers (`nas.models.mlp`). Blocks (plain or
residual, norm in any position) come from `nas.models.blocks`.
This module knows nothing about Optuna or training.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from nas.models.blocks import ConvBlock, ResidualBlock
from nas.models.families import make_model
from nas.models.mlp import build_mlp, make_head
from nas.models.norm_swap import swap_norms
from nas.models.norms import ACTIVATIONS, NormLayer, norm_layer

POOL = {"maxpool": {1: nn.MaxPool1d, 2: nn.MaxPool2d}, "avgpool": {1: nn.AvgPool1d, 2: nn.AvgPool2d}}
GLOBAL_POOL = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d}


class Net(nn.Module):
    """Stages of conv blocks, global average pooling and a classifier head (a Linear, or FC layers then one)."""

    def __init__(self, features: nn.Sequential, head: nn.Module, dims: int, add_channel: bool):
        super().__init__()
        self.add_channel = add_channel  # (N, L) signals get their channel axis here
        self.features = features
        self.pool = GLOBAL_POOL[dims](1)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.add_channel:
            x = x.unsqueeze(1)
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


def build(spec: dict, input_shape: tuple[int, ...] | list[int], num_classes: int) -> nn.Module:
    """The model an ArchSpec describes, for samples of `input_shape` (no batch axis): our generated chain (a Net),
    or a timm / torchvision / factory model with the spec's norms in place of its own."""
    if "model" in spec:
        return build_foreign(spec, tuple(input_shape), num_classes)
    if "mlp" in spec:
        return build_mlp(spec, tuple(input_shape), num_classes)
    shape = tuple(input_shape)
    if len(shape) not in (1, 2, 3):
        raise ValueError(f"input shape {shape}: expected (L,), (C, L) or (C, H, W)")
    add_channel = len(shape) == 1
    if add_channel:
        shape = (1, *shape)
    dims = len(shape) - 1
    channels, size = shape[0], min(shape[1:])
    layers = []
    for i, stage in enumerate(spec["stages"]):
        method = stage.get("downsample", "none")
        stride = 1
        if method != "none" and size >= 2:  # never shrink a feature map below 1
            size //= 2
            if method == "stride":
                stride = 2
            else:
                layers.append((f"stage{i + 1}_pool", POOL[method][dims](2)))
        for j, block in enumerate(stage["blocks"]):
            layers.append(
                (
                    f"stage{i + 1}_block{j + 1}",
                    make_block(block, channels, stage["width"], stride if j == 0 else 1, dims),
                )
            )
            channels = stage["width"]
    head = make_head(spec.get("head"), channels, num_classes)
    return Net(nn.Sequential(OrderedDict(layers)), head, dims, add_channel)


def build_foreign(spec: dict, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A model family's network (nas.models.families) with the norms its spec chose (nas.models.norm_swap)."""
    if len(input_shape) != 3:
        raise ValueError(f"input shape {input_shape}: a {spec['model']['family']} model takes images (C, H, W)")
    norms = spec.get("norms")
    if norms is not None and norms.get("via") == "norm_layer":
        factory = norm_layer(norms["norm"], 2) or NormLayer(lambda channels: nn.Identity())
        return make_model(spec["model"], input_shape, num_classes, factory)
    model = make_model(spec["model"], input_shape, num_classes)
    return swap_norms(model, norms["layers"]) if norms is not None else model


def make_block(block: dict, in_channels: int, out_channels: int, stride: int, dims: int) -> nn.Module:
    """The block an ArchSpec's block entry describes: its norm and activation turned into factories."""
    common = {
        "stride": stride,
        "dims": dims,
        "norm_layer": norm_layer(block["norm"], dims),
        "act_layer": ACTIVATIONS[block["activation"]],
        "dropout": block.get("dropout", 0.0),
    }
    if block.get("type", "plain") == "residual":
        residual = block["residual"]
        return ResidualBlock(
            in_channels,
            out_channels,
            block["kernel"],
            preact=residual["order"] == "preact",
            zero_init=bool(residual.get("zero_init")),
            **common,
        )
    return ConvBlock(
        in_channels, out_channels, block["kernel"], position=block["norm"].get("position", "post_conv"), **common
    )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
