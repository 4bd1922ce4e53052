"""The normalization and activation catalogues: one registry each, YAML names are the keys.

`norm_layer(spec, dims)` turns an ArchSpec's norm entry into the factory blocks take (`make_norm`
builds one layer), so adding a type is one entry in NORMS (its factory and the settings it takes)
plus its test. The catalogue also answers which modules are norms and which keep running statistics.

EvoNorm-B0 / -S0 (Liu et al. 2020) and Filter Response Normalization with its TLU (Singh & Krishnan
2020) come from timm (`pip install "bnnas[timm]"`), as published: each includes its own nonlinearity,
and works on images (2-D feature maps) only.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from nas.models.batch_renorm import BatchRenorm
from nas.validation import Param

# Where the norm sits in a conv block: pre_conv = norm -> conv -> act, post_conv = conv -> norm
# -> act (the usual), post_act = conv -> act -> norm.
POSITIONS = ("pre_conv", "post_conv", "post_act")

# Every setting any norm type takes, with its searchable bounds; a type lists the ones it uses.
NORM_PARAMS = {
    "momentum": Param(float, 0.1, {"above": 0.0, "max": 1.0}),
    "eps": Param(float, 1e-5, {"above": 0.0}),
    "affine": Param(bool, True),
    "track_running_stats": Param(bool, True),
    "r_max": Param(float, 3.0, {"min": 1.0}),
    "d_max": Param(float, 5.0, {"min": 0.0}),
    "warmup": Param(int, 100, {"min": 0}),
    "groups": Param(int, 8, {"min": 1}),
}


@dataclass(frozen=True)
class NormType:
    """A norm: factory(num_features, dims, **settings) -> module, and the settings it takes."""

    factory: Callable[..., nn.Module] | None
    params: tuple[str, ...] = ()
    centers_per_channel: bool = False  # subtracts a per-channel mean: a preceding conv bias is dead
    aliases: tuple[str, ...] = ()  # what users type for it (BatchNorm2d, bn): suggested, never accepted
    images_only: bool = False  # works on 2-D feature maps only (timm's EvoNorm and FRN)

    def absorbs_conv_bias(self, settings: dict) -> bool:
        """True when this norm directly after a conv makes the conv's bias redundant.

        Only a norm that subtracts a per-channel mean removes a per-channel constant: group and
        layer norm subtract a mean over several channels, so GN(x + b) - GN(x) varies with the
        sample (b moves the group's mean and variance), and their affine shift cannot undo it.
        """
        return self.factory is not None and self.centers_per_channel


def _batch(
    num_features: int, dims: int, momentum: float, eps: float, affine: bool, track_running_stats: bool
) -> nn.Module:
    cls = nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d
    return cls(num_features, eps=eps, momentum=momentum, affine=affine, track_running_stats=track_running_stats)


def _group(num_features: int, dims: int, groups: int, eps: float, affine: bool) -> nn.Module:
    """GroupNorm with the largest group count that divides both the asked count and the channels."""
    return nn.GroupNorm(math.gcd(groups, num_features), num_features, eps=eps, affine=affine)


def _instance(num_features: int, dims: int, eps: float, affine: bool) -> nn.Module:
    return _group(num_features, dims, num_features, eps, affine)


def _timm_layers(name: str, dims: int):
    """timm's layer module, for a norm that only timm provides; ValueError when it cannot serve `dims`-D data."""
    if dims != 2:
        raise ValueError(f"norm {name} works on images (2-D feature maps), not {dims}-D data")
    try:
        import timm.layers
    except ImportError:
        raise ValueError(f'norm {name} comes from timm: pip install "bnnas[timm]"') from None
    return timm.layers


def _evonorm_b0(num_features: int, dims: int, momentum: float, eps: float) -> nn.Module:
    return _timm_layers("evonorm_b0", dims).EvoNorm2dB0(num_features, momentum=momentum, eps=eps)


def _evonorm_s0(num_features: int, dims: int, groups: int, eps: float) -> nn.Module:
    return _timm_layers("evonorm_s0", dims).EvoNorm2dS0(num_features, groups=math.gcd(groups, num_features), eps=eps)


def _frn(num_features: int, dims: int, eps: float) -> nn.Module:
    return _timm_layers("frn", dims).FilterResponseNormTlu2d(num_features, eps=eps)


# Aliases are compared ignoring case, separators and a 1d/2d/3d suffix (nas.validation.spelling),
# so "batchnorm" also covers BatchNorm2d, batch_norm and Batch-Norm.
NORMS: dict[str, NormType] = {
    "batch": NormType(
        _batch,
        ("momentum", "eps", "affine", "track_running_stats"),
        centers_per_channel=True,
        aliases=("batchnorm", "bn"),
    ),
    "batch_renorm": NormType(
        BatchRenorm,
        ("momentum", "eps", "affine", "r_max", "d_max", "warmup"),
        centers_per_channel=True,
        aliases=("renorm", "brn"),
    ),
    "group": NormType(_group, ("groups", "eps", "affine"), aliases=("groupnorm", "gn")),
    "layer": NormType(partial(_group, groups=1), ("eps", "affine"), aliases=("layernorm", "ln")),
    # Instance norm is GroupNorm with a group per channel: no running statistics, and a 1-pixel
    # map gives zeros instead of an error.
    "instance": NormType(_instance, ("eps", "affine"), centers_per_channel=True, aliases=("instancenorm", "in")),
    "evonorm_b0": NormType(_evonorm_b0, ("momentum", "eps"), aliases=("evonormb0", "evonorm"), images_only=True),
    "evonorm_s0": NormType(_evonorm_s0, ("groups", "eps"), aliases=("evonorms0",), images_only=True),
    "frn": NormType(
        _frn, ("eps",), aliases=("filterresponsenorm", "frntlu", "filterresponsenormtlu"), images_only=True
    ),
    "none": NormType(None, aliases=("identity", "nonorm")),
}
# Every spelling of a norm that did-you-mean maps to its registry key, the keys themselves included.
NORM_ALIASES = {alias: name for name, norm in NORMS.items() for alias in (name, *norm.aliases)}

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
}


# The classes `make_norm` builds (`_BatchNorm` covers BatchNorm1d / 2d; group, layer and instance are GroupNorm),
# and the ones whose eval-mode output is (x - running_mean) / sqrt(running_var + eps) * weight + bias.
NORM_CLASSES = (nn.modules.batchnorm._NormBase, BatchRenorm, nn.GroupNorm)
RUNNING_STATS_CLASSES = (nn.modules.batchnorm._NormBase, BatchRenorm)
# timm's norms on (N, C, H, W) maps (EvoNorm, FRN, LayerNorm2d; its BatchNormAct2d is a BatchNorm2d): looked up
# only where timm is already imported, so asking never imports it.
TIMM_NORM_CLASSES = ("EvoNorm2dB0", "EvoNorm2dS0", "FilterResponseNormTlu2d", "FilterResponseNormAct2d", "LayerNorm2d")


def _timm_norm_classes() -> tuple[type, ...]:
    layers = sys.modules.get("timm.layers")
    return tuple(getattr(layers, name) for name in TIMM_NORM_CLASSES if hasattr(layers, name)) if layers else ()


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, NORM_CLASSES + _timm_norm_classes())


def uses_running_stats(module: nn.Module) -> bool:
    """A norm that normalizes with stored statistics in eval mode (BatchNorm tracking them, batch renorm)."""
    return isinstance(module, RUNNING_STATS_CLASSES) and isinstance(getattr(module, "running_mean", None), torch.Tensor)


def batch_dependent_in_eval(module: nn.Module) -> bool:
    """A BatchNorm that keeps no running statistics: in eval mode it normalizes with each batch's own."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and not module.track_running_stats


def norm_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if is_norm(m)]


def running_stats_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if uses_running_stats(m)]


@dataclass(frozen=True)
class NormLayer:
    """A norm layer factory, `norm_layer(num_features) -> nn.Module` as torchvision and timm blocks take one,
    that also says whether a conv right before it needs its bias."""

    make: Callable[[int], nn.Module]
    absorbs_conv_bias: bool = False

    def __call__(self, num_features: int) -> nn.Module:
        return self.make(num_features)


def norm_layer(spec: dict, dims: int) -> NormLayer | None:
    """The factory of the norm an ArchSpec's `norm` entry asks for, for `dims`-D data; None for `none`."""
    norm = NORMS[spec["type"]]
    if norm.factory is None:
        return None
    settings = {key: spec[key] for key in norm.params}
    return NormLayer(partial(norm.factory, dims=dims, **settings), norm.absorbs_conv_bias(settings))


def make_norm(spec: dict, num_features: int, dims: int) -> nn.Module | None:
    """The norm layer an ArchSpec's `norm` entry asks for, or None for `none`."""
    factory = norm_layer(spec, dims)
    return None if factory is None else factory(num_features)
