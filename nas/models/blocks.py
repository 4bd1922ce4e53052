"""Conv blocks with the norm in every position: plain blocks and residual blocks.

Plain: conv, norm and activation in the order `position` names (pre_conv / post_conv /
post_act). Residual (two convs and a shortcut): the original post-activation ordering of
He et al. 2015 (conv-norm-act-conv-norm, add, act) or the pre-activation ordering of
He et al. 2016 (norm-act-conv-norm-act-conv, add).

As in torchvision's `ConvNormActivation` and timm's layers, the norm and the activation are
injected factories (`norm_layer(num_features)`, `act_layer()`), None meaning absent; the blocks
know nothing of ArchSpecs (`nas.models.build` turns one into factories). Defaults are derived:
a conv keeps its bias unless the norm right after it centres every channel
(`NormLayer.absorbs_conv_bias`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

CONV = {1: nn.Conv1d, 2: nn.Conv2d}
NormFactory = Callable[[int], nn.Module]
ActFactory = Callable[[], nn.Module]


def _conv(dims: int, in_channels: int, out_channels: int, kernel: int, stride: int, bias: bool) -> nn.Module:
    return CONV[dims](in_channels, out_channels, kernel, stride=stride, padding=(kernel - 1) // 2, bias=bias)


def _bias_before(norm_layer: NormFactory | None) -> bool:
    """Whether a conv whose output goes straight into `norm_layer` needs its own bias."""
    return norm_layer is None or not getattr(norm_layer, "absorbs_conv_bias", False)


def dropout_layers(p: float) -> list:
    return [("drop", nn.Dropout(p))] if p > 0 else []


def ordered_layers(
    order: tuple[str, ...],
    main: str,
    make_main: Callable[[bool], nn.Module],
    sizes: tuple[int, int],
    norm_layer: NormFactory | None,
    act_layer: ActFactory,
    dropout: float,
) -> OrderedDict:
    """A block's layers: `main` (a conv or a linear layer, `make_main(bias)`), norm and activation in `order`, then
    dropout. The norm is sized for where it sits (`sizes`: the main layer's in and out features), and the main
    layer keeps its bias unless the norm right after it makes the bias redundant."""
    norm_first = order[0] == "norm"
    norm = None if norm_layer is None else norm_layer(sizes[0] if norm_first else sizes[1])
    norm_right_after = order.index("norm") == order.index(main) + 1
    parts = {main: make_main(not norm_right_after or _bias_before(norm_layer)), "norm": norm, "act": act_layer()}
    return OrderedDict([(name, parts[name]) for name in order if parts[name] is not None] + dropout_layers(dropout))


class ConvBlock(nn.Sequential):
    """conv, norm and activation in the order `position` names, then optional dropout."""

    ORDERS = {
        "pre_conv": ("norm", "conv", "act"),
        "post_conv": ("conv", "norm", "act"),
        "post_act": ("conv", "act", "norm"),
    }
    # TorchScript shares one compiled type between Sequentials whose children match as a set,
    # whatever their order: the position as a constant keeps pre_conv and post_act blocks apart.
    __constants__ = ["position"]

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int = 3,
        *,
        stride: int = 1,
        dims: int = 2,
        norm_layer: NormFactory | None = None,
        act_layer: ActFactory = nn.ReLU,
        position: str = "post_conv",
        dropout: float = 0.0,
    ):
        conv = lambda bias: _conv(dims, in_channels, out_channels, kernel, stride, bias)  # noqa: E731
        order, sizes = self.ORDERS[position], (in_channels, out_channels)
        super().__init__(ordered_layers(order, "conv", conv, sizes, norm_layer, act_layer, dropout))
        self.position = position


class ResidualBlock(nn.Module):
    """A basic residual block; a 1x1 conv shortcut where the shape changes.

    With `zero_init` the scale of the branch's last norm starts at zero, so the block starts as
    the identity (Goyal et al. 2017).
    """

    __constants__ = ["preact"]  # TorchScript then compiles only the branch this block takes

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int = 3,
        *,
        stride: int = 1,
        dims: int = 2,
        norm_layer: NormFactory | None = None,
        act_layer: ActFactory = nn.ReLU,
        preact: bool = False,
        zero_init: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.preact = preact

        def norm(channels: int) -> nn.Module:
            return nn.Identity() if norm_layer is None else norm_layer(channels)

        bias = _bias_before(norm_layer)
        if preact:
            self.norm1, self.act1 = norm(in_channels), act_layer()
            self.conv1 = _conv(dims, in_channels, out_channels, kernel, stride, bias)
            self.norm2, self.act2 = norm(out_channels), act_layer()
            self.conv2 = _conv(dims, out_channels, out_channels, kernel, 1, True)
        else:
            self.conv1, self.norm1, self.act1 = (
                _conv(dims, in_channels, out_channels, kernel, stride, bias),
                norm(out_channels),
                act_layer(),
            )
            self.conv2, self.norm2 = _conv(dims, out_channels, out_channels, kernel, 1, bias), norm(out_channels)
            self.act_out = act_layer()
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = _conv(dims, in_channels, out_channels, 1, stride, True)
        self.drop = nn.Sequential(OrderedDict(dropout_layers(dropout)))
        if zero_init and getattr(self.norm2, "weight", None) is not None:
            nn.init.zeros_(self.norm2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.preact:
            out = self.conv2(self.act2(self.norm2(self.conv1(self.act1(self.norm1(x))))))
            return self.drop(out + self.shortcut(x))
        out = self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x)))))
        return self.drop(self.act_out(out + self.shortcut(x)))
