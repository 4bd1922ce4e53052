"""Model families: where a candidate's network comes from when it is not our generated chain.

An ArchSpec's `model` entry names the family and the constructor's arguments:

    {"family": "timm", "name": "resnet10t", "kwargs": {"drop_rate": 0.1}}
    {"family": "torchvision", "name": "resnet18", "kwargs": {}}
    {"family": "factory", "name": "mypkg.nets:make", "kwargs": {}}

timm models are built with `in_chans` and `num_classes` from the data and `pretrained=False`;
torchvision's through `get_model(name, weights=None, num_classes=...)`; a factory is called with
`num_classes`, `in_channels`, `input_shape` and `norm_layer` (plus the kwargs). Nothing is
downloaded. `check_fits` runs the model's first forward on the meta device (shapes only, no
compute) to refuse an input it cannot take before any trial starts.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable

import torch
from torch import nn

from nas.errors import NasError

FAMILIES = ("timm", "torchvision", "factory")


class ModelError(ValueError):
    """A model family entry that cannot be built: unknown name, a factory that does not import or returns no module."""


def _timm():
    try:
        import timm
    except ImportError:
        raise ModelError('timm models need timm: pip install "bnnas[timm]"') from None
    return timm


def known_names(family: str) -> list[str]:
    """Every name the family can build (empty for factories)."""
    if family == "timm":
        return _timm().list_models()
    if family == "torchvision":
        import torchvision

        return torchvision.models.list_models()
    return []


def load_factory(target: str) -> Callable[..., nn.Module]:
    """The callable `package.module:callable` names; ModelError when it does not import."""
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise ModelError(f'{target!r}: expected "package.module:callable"')
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any failure of the user's import is the same answer
        raise ModelError(f"{target}: cannot import {module_name}: {type(exc).__name__}: {exc}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelError(f"{target}: {module_name} has no callable {attr}")
    return factory


def takes_norm_layer(factory: Callable) -> bool:
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    return "norm_layer" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def head_name(model: nn.Module) -> str:
    """The classifier: the model's last linear layer (our Net's `head`, timm's `fc` / `classifier`, torchvision's
    `fc` / `classifier.3`, a user's last nn.Linear)."""
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise NasError(f"{type(model).__name__} has no linear classifier to fine-tune")
    return linears[-1]


def make_model(
    model: dict, input_shape: tuple[int, ...], num_classes: int, norm_layer: Callable[[int], nn.Module] | None = None
) -> nn.Module:
    """The network a `model` entry describes, for samples of `input_shape` (C, H, W).

    `norm_layer` goes to a factory's constructor (the torchvision convention); timm and torchvision
    models are built with their own norms, which `nas.models.norm_swap` then replaces.
    """
    family, name, kwargs = model["family"], model["name"], dict(model.get("kwargs", {}))
    in_channels = input_shape[0]
    if family == "timm":
        built = _timm().create_model(name, pretrained=False, in_chans=in_channels, num_classes=num_classes, **kwargs)
    elif family == "torchvision":
        import torchvision

        if in_channels != 3:
            raise ModelError(
                f"torchvision {name} takes 3-channel images, the data has {in_channels}: use timm (in_chans) "
                "or a factory"
            )
        built = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    elif family == "factory":
        factory = load_factory(name)
        extra = {"norm_layer": norm_layer} if norm_layer is not None else {}
        built = factory(
            num_classes=num_classes, in_channels=in_channels, input_shape=tuple(input_shape), **extra, **kwargs
        )
    else:
        raise ModelError(f"unknown model family {family!r} (known: {', '.join(FAMILIES)})")
    if not isinstance(built, nn.Module):
        raise ModelError(f"{family} {name} returned {type(built).__name__}, not a torch.nn.Module")
    return built


def template(model: dict, input_shape: tuple[int, ...], num_classes: int, norm_layer=None) -> nn.Module:
    """The model built on the meta device: its structure without allocating or initializing weights."""
    with torch.device("meta"):
        return make_model(model, input_shape, num_classes, norm_layer)


def forward_error(net: nn.Module, input_shape: tuple[int, ...]) -> str | None:
    """Why `net` (on the meta device) cannot take a batch of two samples of `input_shape`; None when it can."""
    try:
        with torch.no_grad():
            net.train()(torch.empty(2, *input_shape, device="meta"))
    except Exception as exc:  # noqa: BLE001 - any failure is the answer
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}".rstrip(": ")
    return None


def minimum_size(net: nn.Module, channels: int, largest: int = 512) -> int | None:
    """The smallest square image side (a power of two up to `largest`) `net` takes; None if none does."""
    size = 8
    while size <= largest:
        if forward_error(net, (channels, size, size)) is None:
            return size
        size *= 2
    return None
