"""From a raw sample to the model's input: the recipe an export writes into model.json, and its one implementation.

The recipe is plain data so that a user with only torch can follow it (the README shows how),
and `nas-predict` follows the same recipe through `to_model_input` / `image_to_model_input`:
raw sample (its layout, as the dataset's source gives it) -> float32 -> channels first ->
divided by `scale` -> minus the training split's per-channel mean, over its std.
"""

from __future__ import annotations

import numpy as np
import torch

from nas.data.tabular import FEATURES
from nas.errors import NasError

CHANNELS_LAST = "HWC"
IMAGE_FILE_SCALE = 255.0  # 8-bit image files
RESIZE = {"interpolation": "bilinear", "antialias": True}  # torchvision Resize's defaults


def resize_images(images: torch.Tensor, size: list[int]) -> torch.Tensor:
    """Images (..., H, W) to `size` [height, width] as torchvision's Resize does, in their own dtype (uint8 stays
    uint8): the one resize that `dataset.image_size` trains with and `nas-predict` repeats."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    return F.resize(
        images, list(size), interpolation=InterpolationMode(RESIZE["interpolation"]), antialias=RESIZE["antialias"]
    )


def recipe(data) -> dict:
    """model.json's `preprocessing` for a loaded `nas.data.datasets.Dataset` (its raw input, normalization
    and classes)."""
    raw = data.raw
    shape = list(data.input_shape)
    source = [shape[0], *raw.resized_from] if raw.resized_from else shape  # one raw sample, channels first
    images = None
    if raw.image_files is not None:
        images = {
            "color": raw.image_files,
            "size": shape[-2:],
            "resize": raw.resize is not None,
            "converted": raw.converted,
            "scale": IMAGE_FILE_SCALE,
        }
    return {
        "raw_input": raw.description,
        "raw_layout": raw.layout,
        "raw_shape": raw_shape(raw.layout, source),
        "raw_dtype": raw.dtype,
        "scale": raw.scale,
        "resize": shape[-2:] if raw.resized_from else None,
        "resized_as": raw.resized_as,
        "mean": list(data.mean),
        "std": list(data.std),
        "layout": "N" + ("CHW" if len(shape) == 3 else "CL" if len(shape) == 2 else raw.layout),
        "dtype": "float32",
        "input_shape": shape,
        "image_files": images,
        "classes": list(data.classes),
        "columns": list(raw.columns) if raw.columns else None,  # a CSV row's feature columns, in this order
        "target": raw.target,
        "steps": steps(raw, source, shape),
    }


def steps(raw, source: list[int], shape: list[int]) -> str:
    """The recipe in one sentence, for a reader of model.json."""
    layout = f"{raw.layout}{' -> CHW' if raw.layout == CHANNELS_LAST else ''}"
    if not raw.resized_from:
        body = f"x = raw as float32 ({layout}), reshaped to input_shape, / {raw.scale:g}"
    else:
        resize = f"resized to {shape[-2]}x{shape[-1]} (torchvision Resize: bilinear, antialiased)"
        body = (  # uint8 resized before the division, as the loader resized its uint8 arrays
            f"x = raw as uint8 ({layout}), reshaped to {source}, {resize}, as float32 / {raw.scale:g}"
            if raw.resized_as == "uint8"
            else f"x = raw as float32 ({layout}), reshaped to {source}, / {raw.scale:g}, {resize}"
        )
    if raw.layout == FEATURES:
        return f"{body}, then (x - mean[f]) / std[f] per feature"
    return f"{body}, then (x - mean[c]) / std[c] per channel"


def raw_shape(layout: str, input_shape: list[int]) -> list[int]:
    """The shape of one raw sample in `layout`, given the model's input shape (channels first)."""
    if layout == CHANNELS_LAST:
        channels, *spatial = input_shape
        return [*spatial, channels]
    if layout in ("HW", "L") and len(input_shape) > len(layout):
        return input_shape[1:]  # the single channel axis the loader added
    return list(input_shape)


def normalize(x: torch.Tensor, pre: dict) -> torch.Tensor:
    """(x - mean[c]) / std[c] over axis 1: channels, or features of a vector (a (N, L) signal's one mean is one
    channel's)."""
    view = (1, -1) + (1,) * (x.dim() - 2)
    mean = torch.tensor(pre["mean"], dtype=torch.float32).view(view)
    std = torch.tensor(pre["std"], dtype=torch.float32).view(view)
    return (x - mean) / std


def to_model_input(raw, pre: dict, what: str = "input") -> torch.Tensor:
    """Raw samples, one (raw_shape) or a batch (N, *raw_shape), as the model's input batch.

    A shape the recipe does not describe is refused in one line naming `what` (a file).
    """
    x = torch.as_tensor(np.asarray(raw)).to(torch.float32)
    expected = list(pre["raw_shape"])
    if list(x.shape) == expected:
        x = x.unsqueeze(0)
    if list(x.shape[1:]) != expected:
        raise NasError(
            f"{what}: samples of shape {list(x.shape)}; the model takes {pre['raw_layout']} samples of shape "
            f"{expected} ({pre['raw_input']}), one or a batch (N, {', '.join(map(str, expected))})"
        )
    if pre["raw_layout"] == CHANNELS_LAST:
        x = x.movedim(-1, 1)
    resize = pre.get("resize")  # absent from model.json written before dataset.image_size resized arrays
    if not resize:
        return normalize(x.reshape(len(x), *pre["input_shape"]) / pre["scale"], pre)
    x = x.reshape(len(x), pre["input_shape"][0], *x.shape[-2:])
    if pre.get("resized_as") == "uint8":  # as training resized the loader's uint8 arrays, before scaling
        x = resize_images(x.round().clamp(0, 255).to(torch.uint8), resize).to(torch.float32) / pre["scale"]
    else:
        x = resize_images(x / pre["scale"], resize)
    return normalize(x, pre)


def image_to_model_input(image: torch.Tensor, pre: dict, what: str) -> torch.Tensor:
    """A decoded 8-bit image (C, H, W, uint8, colour already as the recipe says) as a batch of one."""
    files = pre["image_files"]
    height, width = files["size"]
    if files["resize"]:
        image = resize_images(image, [height, width])  # as training resized its images
    elif list(image.shape[-2:]) != [height, width]:
        raise NasError(
            f"{what}: a {image.shape[-1]}x{image.shape[-2]} (width x height) image; the model takes {width}x{height} "
            "images (resize it first; the model was not trained on resized images)"
        )
    x = image.to(torch.float32).unsqueeze(0) / files["scale"]
    return normalize(x, pre)
