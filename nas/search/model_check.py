"""Before any trial: a foreign model's first candidate builds and takes the data's shape (an MLP: vectors).

On the meta device (shapes only, no weights allocated, no compute), so even a large network is checked in
moments; every refusal is one ConfigError naming the search space file and `model.FAMILY` (or `model.norm`).
"""

from __future__ import annotations

import torch

from nas.data.tabular import FEATURES
from nas.errors import ConfigError
from nas.models.build import build
from nas.models.families import ModelError, forward_error, minimum_size, template
from nas.search.leaves import suggest_leaf
from nas.search.mlp_space import MLP
from nas.search.model_space import (
    GENERATED,
    MAX_PER_LAYER_PARAMS,
    VIA_REPLACEMENT,
    ForeignModel,
    family_of,
    searched_keys,
)
from nas.search.space import Space
from nas.search.stand_in_trials import FirstChoiceTrial


def check_model(
    space: dict, file: str, input_shape: tuple[int, ...], num_classes: int, layout: str | None = None
) -> None:
    """Before any trial: the first candidate of a foreign model builds and takes the data's shape (on the meta
    device: shapes only); a ConfigError naming `model.FAMILY` otherwise."""
    family = family_of(space)
    if family == GENERATED and layout == FEATURES:
        raise ConfigError(
            file,
            "model",
            "the data are a table's feature vectors, and the generated chain would convolve over their column "
            "order, which means nothing: use model: mlp (search_spaces/mlp.yaml)",
        )
    if family == MLP and len(input_shape) != 1:
        raise ConfigError(
            file,
            "model",
            f"mlp takes vectors (F,); the data's samples have shape {'x'.join(map(str, input_shape))}: use a table "
            "(csv, breast_cancer, wine, digits_vectors) or an npz of (N, F) arrays",
        )
    foreign = ForeignModel.of(space, tuple(input_shape), num_classes)
    if foreign is None:
        return
    where, name = f"model.{foreign.family}", foreign.model[foreign.family]
    shape = "x".join(map(str, input_shape))
    if len(input_shape) != 3:
        raise ConfigError(file, where, f"{name} takes images (C, H, W); the data's samples have shape {shape}")
    if foreign.norm is not None and foreign.via == VIA_REPLACEMENT:
        try:
            first = lambda name, key_path: suggest_leaf(FirstChoiceTrial(), name, foreign.leaf(key_path))  # noqa: E731
            sites = foreign.sites(foreign.sample(first, dict, with_norms=False)["model"])
        except Exception as exc:  # noqa: BLE001 - the user's constructor may raise anything
            raise ConfigError(file, where, f"{name} failed to build: {type(exc).__name__}: {exc}") from None
        if not sites:
            raise ConfigError(
                file,
                "model.norm",
                f"{name} has no norm on feature maps to replace (BatchNorm, GroupNorm, "
                "InstanceNorm, LayerNorm2d, EvoNorm, FRN); a LayerNorm over tokens is not one",
            )
    try:
        spec = Space(space, input_shape, num_classes).sample(FirstChoiceTrial())
        with torch.device("meta"):
            net = build(spec, input_shape, num_classes)
    except ModelError as exc:
        raise ConfigError(file, where, str(exc)) from None
    except ValueError as exc:
        raise ConfigError(file, where, f"{name} cannot be built for {shape} inputs: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - the user's constructor may raise anything
        raise ConfigError(file, where, f"{name} failed to build: {type(exc).__name__}: {exc}") from None
    layers = spec.get("norms", {}).get("layers", [])
    if foreign.share == "per_layer" and len(layers) * searched_keys(foreign.norm) > MAX_PER_LAYER_PARAMS:
        raise ConfigError(
            file,
            "model.norm.share",
            f"per_layer on {name} searches {len(layers)} norms x "
            f"{searched_keys(foreign.norm)} parameters, more than {MAX_PER_LAYER_PARAMS}: use per_stage or fewer "
            "searched settings",
        )
    if "weights" in foreign.model:
        check_checkpoint(spec, space, file, input_shape, num_classes)
    error = forward_error(net, tuple(input_shape))
    if error is not None:
        size = minimum_size(template(spec["model"], input_shape, num_classes), input_shape[0])
        fits = f"; it takes images from {size}x{size}: set dataset.image_size: {size}" if size else ""
        raise ConfigError(file, where, f"{name} cannot take {shape} inputs ({error}){fits}")


def check_checkpoint(spec: dict, space: dict, file: str, input_shape: tuple[int, ...], num_classes: int) -> None:
    """The checkpoint loads into the first candidate (on the CPU, as every fold will load it), and the stages the
    strategy may unfreeze exist."""
    from nas.errors import NasError
    from nas.models.checkpoint import load_pinned
    from nas.models.norm_swap import stage_order, stages_of

    net = build(spec, input_shape, num_classes)
    try:
        load_pinned(net, spec["model"]["weights"])  # read once per process: the folds reuse it
    except NasError as exc:
        raise ConfigError(file, "model.weights", str(exc).removeprefix("model.weights: ")) from None
    leaf = space.get("finetune", {}).get("unfreeze_stages")
    most = max(leaf["choice"]) if isinstance(leaf, dict) and "choice" in leaf else leaf
    most = leaf["int"][1] if isinstance(leaf, dict) and "int" in leaf else most
    stages = stage_order(stages_of(net))
    if most is not None and most > len(stages):
        raise ConfigError(
            file,
            "finetune.unfreeze_stages",
            f"up to {most}; {type(net).__name__} has {len(stages)} stages ({', '.join(stages)})",
        )
