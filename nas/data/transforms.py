"""Shifted variants of any dataset: deterministic input transforms named in the run config.

`dataset.transforms` is a list of one-key mappings applied in order to the raw training and
test inputs (before the per-channel normalization), e.g.

    transforms: [{contrast: 0.5}, {brightness: 0.2}, {noise: 0.1}, {invert: true}, {rotate: 15}]

They make a covariate shift (same labels, different inputs) for transfer experiments. Every
transform is a fixed function of the input except `noise`, which draws from a generator seeded
by `dataset.transform_seed` and the split, so a shifted dataset is the same on every load.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from nas.errors import ConfigError, DataError
from nas.validation import check_bounds, check_scalar, did_you_mean, type_name


def _contrast(x: np.ndarray, factor: float, rng, lo_hi) -> np.ndarray:
    """Scale each sample's deviations from its own mean (torchvision's adjust_contrast, unclipped)."""
    mean = x.reshape(len(x), -1).mean(1).reshape(-1, *([1] * (x.ndim - 1)))
    return mean + factor * (x - mean)


def _brightness(x: np.ndarray, offset: float, rng, lo_hi) -> np.ndarray:
    """Add `offset` (in the data's own units: digits and torchvision images are in [0, 1])."""
    return x + offset


def _noise(x: np.ndarray, std: float, rng, lo_hi) -> np.ndarray:
    return x + rng.normal(0.0, std, size=x.shape).astype(x.dtype)


def _invert(x: np.ndarray, on: bool, rng, lo_hi) -> np.ndarray:
    """Mirror the values within the training split's range: 1 - x for data in [0, 1]."""
    lo, hi = lo_hi
    return lo + hi - x if on else x


def _rotate(x: np.ndarray, degrees: float, rng, lo_hi) -> np.ndarray:
    """Rotate every image by the same angle (counter-clockwise), bilinear, zero fill."""
    import torch
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2.functional import rotate

    if x.ndim != 4:
        raise ValueError(f"rotate needs images (N,C,H,W); these samples have shape {x.shape[1:]}")
    return rotate(torch.from_numpy(np.ascontiguousarray(x)), degrees, interpolation=InterpolationMode.BILINEAR).numpy()


@dataclass(frozen=True)
class Transform:
    fn: Callable[..., np.ndarray]
    kind: type
    bounds: dict


# name -> (function, value type, bounds); the YAML names are the keys.
TRANSFORMS: dict[str, Transform] = {
    "contrast": Transform(_contrast, float, {"above": 0.0}),
    "brightness": Transform(_brightness, float, {}),
    "noise": Transform(_noise, float, {"min": 0.0}),
    "invert": Transform(_invert, bool, {}),
    "rotate": Transform(_rotate, float, {"min": -360.0, "max": 360.0}),
}


def check_transforms(value: Any, file: str, path: str) -> list[dict]:
    """Validate `dataset.transforms`: a list of one-key mappings `{name: value}` with known names."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(
            file, path, f"expected a list like [{{contrast: 0.5}}, {{noise: 0.1}}], got {type_name(value)}"
        )
    out = []
    for i, item in enumerate(value):
        where = f"{path}[{i}]"
        if not isinstance(item, dict) or len(item) != 1:
            raise ConfigError(
                file,
                where,
                f"expected one mapping {{name: value}} with a name of {', '.join(TRANSFORMS)}, got {item!r}",
            )
        ((name, setting),) = item.items()
        if name not in TRANSFORMS:
            raise ConfigError(
                file,
                f"{where}.{name}",
                f"unknown transform (known: {', '.join(TRANSFORMS)}){did_you_mean(name, TRANSFORMS)}",
            )
        spec = TRANSFORMS[name]
        setting = check_scalar(setting, spec.kind, file, f"{where}.{name}")
        check_bounds(setting, spec.bounds, file, f"{where}.{name}")
        out.append({name: setting})
    return out


def apply_transforms(
    x_train: np.ndarray, x_test: np.ndarray, transforms: list[dict], seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Both splits through the transforms in order; `invert` mirrors within the training split's current range."""
    if not transforms:
        return x_train, x_test
    rngs = [
        np.random.default_rng([seed, split]) for split in (0, 1)
    ]  # train and test draw different, reproducible noise
    splits = [x_train.astype(np.float32), x_test.astype(np.float32)]
    for i, item in enumerate(transforms):
        ((name, setting),) = item.items()
        lo_hi = (float(splits[0].min()), float(splits[0].max()))
        try:
            splits = [
                TRANSFORMS[name].fn(x, setting, rng, lo_hi).astype(np.float32, copy=False)
                for x, rng in zip(splits, rngs)
            ]
        except ValueError as exc:
            raise DataError(f"dataset.transforms[{i}].{name}: {exc}") from None
    return splits[0], splits[1]
