"""Fine-tuning a checkpoint as a search: `model.weights` pins the checkpoint, `finetune` holds the searched strategy.

    model:
      timm: resnet10t
      weights: checkpoints/source.safetensors   # relative to this file; pinned by its sha256 when the space loads
      strict: true                              # keys that do not fit the model refused (false: reported)
      mean: [0.5], std: [0.25], input_size: 32  # what the checkpoint expects (default: timm / torchvision say)
    finetune:
      bn_mode: {choice: [freeze, adabn, bn-only, full, linear-probe]}
      recalibrate: {choice: [false, true]}      # re-estimate running statistics on the training fold first
      unfreeze_stages: {int: [1, 4]}            # freeze / bn-only / full: train the last K stages (left out: all)
      epochs: {int: [3, 10]}                    # left out: evaluation.epochs
    training: {lr: {float: [1.0e-4, 0.1], log: true}, batch_size: {choice: [16, 64]}}

Parameters are named `finetune.KEY`; only what the mode uses is sampled (adabn always re-estimates, so it is not
asked `recalibrate`; the head-only modes are not asked `unfreeze_stages`). The ArchSpec carries the checkpoint as
`model.weights` ({file, sha256, strict}) and the strategy as `finetune`, so every trial, its re-evaluations and
nas-export start from the same bytes. The modes themselves are `nas.training.bn_modes`.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nas.errors import ConfigError, NasError
from nas.validation import Param, type_name

MODES = ("freeze", "adabn", "bn-only", "full", "linear-probe")
HEAD_ONLY = ("adabn", "linear-probe")  # train the head alone, the rest in eval mode
RECALIBRATES = ("adabn",)  # re-estimate the running statistics whatever `recalibrate` says
CHECKPOINT_KEYS = ("weights", "sha256", "strict", "mean", "std", "input_size")

FINETUNE_SCHEMA = {
    "bn_mode": Param(str, "full", {"choices": MODES, "what": "BN mode"}),
    "recalibrate": Param(bool, False),
    "unfreeze_stages": Param(int, None, {"min": 0}),
    "epochs": Param(int, None, {"min": 1}),
}


def weights_of(space: dict) -> str | None:
    """The checkpoint file a space fine-tunes from; None for a search from scratch."""
    model = space.get("model")
    return model.get("weights") if isinstance(model, dict) else None


def resolve_weights(space: dict, file: str | Path) -> dict:
    """A space read from `file` with `model.weights` made absolute (it is written relative to the space file)."""
    weights = weights_of(space)
    if isinstance(weights, str) and weights and not Path(weights).expanduser().is_absolute():
        space["model"]["weights"] = str((Path(file).parent / Path(weights).expanduser()).resolve())
    return space


def validate_checkpoint_keys(model: dict, file: str) -> None:
    """`model.weights` and its companions; a checkpoint's norms are its own, so `model.norm` is refused beside it."""
    if "weights" not in model:
        given = next((key for key in CHECKPOINT_KEYS if key in model), None)
        if given is not None:
            raise ConfigError(file, f"model.{given}", "describes a checkpoint: give model.weights too")
        return
    weights = model["weights"]
    if not isinstance(weights, str) or not weights:
        raise ConfigError(file, "model.weights", f"expected the path of a weights file, got {type_name(weights)}")
    if "norm" in model:
        raise ConfigError(
            file,
            "model.norm",
            "a checkpoint's norm layers are its own (their trained weights would be thrown away): fine-tune with "
            "finetune.bn_mode, or search norms from scratch without model.weights",
        )
    sha = model.get("sha256")
    if sha is not None and not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
        raise ConfigError(file, "model.sha256", "expected the 64 lowercase hex digits of the file's sha256")
    if not isinstance(model.get("strict", True), bool):
        raise ConfigError(file, "model.strict", f"expected true or false, got {model['strict']!r}")
    if ("mean" in model) != ("std" in model):
        raise ConfigError(file, "model.mean" if "std" in model else "model.std", "give mean and std together")
    for key in ("mean", "std"):
        values = model.get(key, [0.0])
        if not (isinstance(values, list) and values and all(isinstance(v, (int, float)) for v in values)):
            raise ConfigError(file, f"model.{key}", f"expected a list of numbers per channel, got {values!r}")
    if "mean" in model and len(model["mean"]) != len(model["std"]):
        raise ConfigError(file, "model.std", f"{len(model['std'])} values for {len(model['mean'])} means")
    if any(v <= 0 for v in model.get("std", [1.0])):
        raise ConfigError(file, "model.std", "every std must be > 0")
    size = model.get("input_size", 1)
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ConfigError(file, "model.input_size", f"expected an image size >= 1, got {size!r}")


def validate_finetune(space: dict, file: str) -> None:
    """A `finetune` section needs a checkpoint to fine-tune."""
    if "finetune" in space and weights_of(space) is None:
        raise ConfigError(
            file,
            "finetune",
            "fine-tunes a checkpoint: set model.weights (and model.timm / torchvision / factory) or leave it out",
        )


def pin_checkpoint(space: dict, file: str) -> dict:
    """The checkpoint exists and is the one the space pins: its sha256 written into `model.sha256` when the space
    does not give one (so the study contract compares the bytes, not the name)."""
    path = weights_of(space)
    if path is None:
        return space
    where = Path(path)
    if not where.is_file():
        raise ConfigError(file, "model.weights", f"file not found: {where}")
    found = hashlib.sha256(where.read_bytes()).hexdigest()
    pinned = space["model"].get("sha256")
    if pinned is not None and pinned != found:
        raise ConfigError(
            file,
            "model.sha256",
            f"{where} has sha256 {found[:12]}..., not the {pinned[:12]}... pinned (the file changed since the study "
            "was made: restore it, or start a new study)",
        )
    space["model"]["sha256"] = found
    return space


def weights_entry(model: dict) -> dict:
    """The ArchSpec's `model.weights`: the file, its pinned sha256, and whether keys must all fit."""
    return {"file": model["weights"], "sha256": model["sha256"], "strict": model.get("strict", True)}


def sample_finetune(ask: Callable[[str], Any]) -> dict:
    """The strategy, define-by-run: `ask(key)` gives parameter `finetune.KEY` as the space distributes it."""
    mode = ask("bn_mode")
    strategy: dict = {"bn_mode": mode}
    strategy["recalibrate"] = True if mode in RECALIBRATES else ask("recalibrate")
    strategy["unfreeze_stages"] = None if mode in HEAD_ONLY else ask("unfreeze_stages")
    strategy["epochs"] = ask("epochs")
    return strategy


def describe_strategy(strategy: dict) -> str:
    """A strategy in a few words: `bn-only, statistics re-estimated, last 2 stages`."""
    parts = [strategy["bn_mode"]]
    if strategy.get("recalibrate") and strategy["bn_mode"] not in RECALIBRATES:
        parts.append("statistics re-estimated first")
    if strategy.get("unfreeze_stages") is not None:
        count = strategy["unfreeze_stages"]
        parts.append(f"last {count} stage{'s' if count != 1 else ''}")
    return ", ".join(parts)


def epochs_of(spec: dict, default: int) -> int:
    """The epochs a candidate trains per fold: its fine-tuning strategy's, else the run config's."""
    return (spec.get("finetune") or {}).get("epochs") or default


def epochs_said(space: dict, default: int) -> str:
    """The epochs per fold in words: `12 epochs`, `3 epochs (finetune.epochs)`, `1-3 epochs (finetune.epochs)`."""
    leaf = (space.get("finetune") or {}).get("epochs")
    if leaf is None:
        return f"{default} epochs"
    if isinstance(leaf, dict):
        values = leaf["choice"] if "choice" in leaf else leaf["int"]
        return f"{min(values)}-{max(values)} epochs (finetune.epochs)"
    return f"{leaf} epochs (finetune.epochs)"


def check_pruner(space: dict, pruner: str, file: str) -> None:
    """A pruner compares trials epoch by epoch: with searched epochs a short trial's last epoch would be judged
    against long trials mid-schedule."""
    epochs = (space.get("finetune") or {}).get("epochs")
    if isinstance(epochs, dict) and pruner != "none":
        raise ConfigError(
            file,
            "evaluation.pruner",
            f"{pruner} compares trials epoch by epoch, but finetune.epochs is searched: give finetune.epochs one "
            "value, or pruner: none",
        )


def expected_of(space: dict):
    """What the space's checkpoint expects of its input (nas.models.checkpoint.Expected): the space's mean / std /
    input_size, else what timm or torchvision say of the architecture; None for a search from scratch."""
    from nas.models.checkpoint import expected_input
    from nas.models.families import FAMILIES

    if weights_of(space) is None:
        return None
    model = space["model"]
    family = next(key for key in FAMILIES if key in model)
    expected = expected_input(
        {"family": family, "name": model[family]}, model.get("mean"), model.get("std"), model.get("input_size")
    )
    return dataclasses.replace(expected, source="model.mean, model.std") if "mean" in model else expected


def show_values(values: list[float]) -> str:
    """Per-channel values as the logs print them: `[0.485, 0.456, 0.406]`."""
    return "[" + ", ".join(f"{v:.3f}" for v in values) + "]"


def checkpoint_input(space: dict, data) -> str | None:
    """The line that says how a fine-tuning search prepares its data (None for a search from scratch): a checkpoint
    whose library says 224x224 makes 8x8 digits 784 times larger, which a user should see before the first trial."""
    expected = expected_of(space)
    if expected is None:
        return None
    return (
        f"Checkpoint input: mean {show_values(data.mean)}, std {show_values(data.std)} ({expected.source}), images "
        f"{'x'.join(map(str, data.input_shape))} (model.input_size; dataset.image_size overrides it)"
    )


def load_search_data(cfg, device):
    """The run config's dataset as its candidates see it: for a fine-tuning search resized and normalized as the
    checkpoint expects (its own input size unless dataset.image_size is given), the checkpoint checked unchanged."""
    from nas.data.datasets import load_dataset

    expected = expected_of(cfg.space)
    if expected is None:
        return load_dataset(cfg.dataset, device)
    pin_checkpoint(cfg.space, cfg.search_space)
    dataset = dataclasses.replace(cfg.dataset, image_size=cfg.dataset.image_size or expected.input_size)
    try:
        return load_dataset(dataset, device, normalization=expected.normalization)
    except NasError as exc:
        if str(exc).startswith("--mean/--std"):
            raise ConfigError(cfg.search_space, "model.mean", str(exc).partition(": ")[2]) from None
        raise
