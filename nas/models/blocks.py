"""Conv blocks with the norm in every position: plain blocks and residual blocks.

Plain: conv, norm and activation in the order `norm.position` names (pre_conv / post_conv /
post_act). Residual (two convs and a shortcut): the original post-activation ordering of
He et al. 2015 (conv-norm-act-conv-norm, add, act) or the pre-activation ordering of
He et al. 2016 (norm-act-conv-norm-act-conv, add). Norm and activation come from the registries.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from nas.models.norms import ACTIVATIONS, conv_bias_needed, make_norm

CONV = {1: nn.Conv1d, 2: nn.Conv2d}


def _conv(dims: int, in_channels: int, out_channels: int, kernel: int, stride: int, bias: bool) -> nn.Module:
    return CONV[dims](in_channels, out_channels, kernel, stride=stride, padding=(kernel - 1) // 2, bias=bias)


def _dropout(block: dict) -> list:
    return [("drop", nn.Dropout(block["dropout"]))] if block.get("dropout", 0.0) > 0 else []


class ConvBlock(nn.Sequential):
    """conv, norm and activation in the order `norm.position` names, then optional dropout."""

    ORDERS = {"pre_conv": ("norm", "conv", "act"), "post_conv": ("conv", "norm", "act"), "post_act": ("conv", "act", "norm")}
    # TorchScript shares one compiled type between Sequentials whose children match as a set,
    # whatever their order: the position as a constant keeps pre_conv and post_act blocks apart.
    __constants__ = ["position"]

    def __init__(self, block: dict, in_channels: int, out_channels: int, stride: int, dims: int):
        norm_spec = block["norm"]
        position = norm_spec.get("position", "post_conv")
        norm = make_norm(norm_spec, in_channels if position == "pre_conv" else out_channels, dims)
        bias = norm is None or position != "post_conv" or conv_bias_needed(norm_spec)
        parts = {
            "conv": _conv(dims, in_channels, out_channels, block["kernel"], stride, bias),
            "norm": norm,
            "act": ACTIVATIONS[block["activation"]](),
        }
        layers = [(name, parts[name]) for name in self.ORDERS[position] if parts[name] is not None]
        super().__init__(OrderedDict(layers + _dropout(block)))
        self.position = position


class ResidualBlock(nn.Module):
    """A basic residual block; a 1x1 conv shortcut where the shape changes.

    With `residual.zero_init` the scale of the branch's last norm starts at zero, so the block
    starts as the identity (Goyal et al. 2017).
    """

    __constants__ = ["preact"]  # TorchScript then compiles only the branch this block takes

    def __init__(self, block: dict, in_channels: int, out_channels: int, stride: int, dims: int):
        super().__init__()
        norm_spec, kernel = block["norm"], block["kernel"]
        self.preact = block["residual"]["order"] == "preact"
        act = ACTIVATIONS[block["activation"]]
        identity = lambda module: module if module is not None else nn.Identity()  # noqa: E731
        if self.preact:
            norm1 = make_norm(norm_spec, in_channels, dims)
            self.norm1, self.act1 = identity(norm1), act()
            self.conv1 = _conv(dims, in_channels, out_channels, kernel, stride, norm1 is None or conv_bias_needed(norm_spec))
            self.norm2, self.act2 = identity(make_norm(norm_spec, out_channels, dims)), act()
            self.conv2 = _conv(dims, out_channels, out_channels, kernel, 1, True)
        else:
            norm = make_norm(norm_spec, out_channels, dims)
            bias = norm is None or conv_bias_needed(norm_spec)
            self.conv1, self.norm1, self.act1 = _conv(dims, in_channels, out_channels, kernel, stride, bias), identity(norm), act()
            self.conv2, self.norm2 = _conv(dims, out_channels, out_channels, kernel, 1, bias), identity(make_norm(norm_spec, out_channels, dims))
            self.act_out = act()
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = _conv(dims, in_channels, out_channels, 1, stride, True)
        self.drop = nn.Sequential(OrderedDict(_dropout(block)))
        if block["residual"].get("zero_init") and getattr(self.norm2, "weight", None) is not None:
            nn.init.zeros_(self.norm2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.preact:
            out = self.conv2(self.act2(self.norm2(self.conv1(self.act1(self.norm1(x))))))
            return self.drop(out + self.shortcut(x))
        out = self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x)))))
        return self.drop(self.act_out(out + self.shortcut(x)))


BLOCKS = {"plain": ConvBlock, "residual": ResidualBlock}
