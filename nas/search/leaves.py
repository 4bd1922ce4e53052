"""Search-space leaves: a constant or a distribution (`{choice: [...]}`, `{int: [lo, hi]}`, `{float: [lo, hi]}`
with optional `log` and `step`), checked against its Param and asked of an Optuna trial; one norm decision.

Shared by the generated chain's space (nas.search.space) and a foreign model's entry (nas.search.model_space).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from nas.errors import ConfigError
from nas.models.norms import NORM_ALIASES, NORMS
from nas.validation import Param, check_bounds, check_scalar, did_you_mean, type_name

DISTRIBUTION_KEYS = ("choice", "int", "float", "log", "step")
NORM_TYPE = Param(str, "batch", {"choices": tuple(NORMS), "what": "norm", "aliases": NORM_ALIASES})


def validate_leaf(leaf: Any, param: Param, file: str, path: str) -> None:
    if not isinstance(leaf, dict):
        _check_value(leaf, param, file, path)
        return
    if not param.searchable:
        raise ConfigError(file, path, f"is a setting, not searchable: give one value, not {leaf}")
    for key in leaf:
        if key not in DISTRIBUTION_KEYS:
            raise ConfigError(
                file,
                f"{path}.{key}",
                "unknown distribution key (known: "
                f"{', '.join(DISTRIBUTION_KEYS)}){did_you_mean(key, DISTRIBUTION_KEYS)}",
            )
    kinds = [k for k in ("choice", "int", "float") if k in leaf]
    if len(kinds) != 1:
        raise ConfigError(file, path, "a distribution needs exactly one of choice, int, float")
    kind = kinds[0]
    if kind == "choice":
        _validate_choice(leaf, param, file, path)
        return
    if param.kind is not (int if kind == "int" else float):
        raise ConfigError(
            file,
            f"{path}.{kind}",
            f"expected {'choice' if param.kind in (str, bool) else param.kind.__name__} for this key, "
            f"not a {kind} range",
        )
    bounds = leaf[kind]
    if not isinstance(bounds, list) or len(bounds) != 2:
        raise ConfigError(file, f"{path}.{kind}", f"expected [low, high], got {bounds!r}")
    low, high = (check_scalar(v, param.kind, file, f"{path}.{kind}[{i}]") for i, v in enumerate(bounds))
    if low > high:
        raise ConfigError(file, f"{path}.{kind}", f"low {low} > high {high}")
    for i, v in enumerate((low, high)):
        check_bounds(v, param.bounds, file, f"{path}.{kind}[{i}]")
    if param.bounds.get("odd") and leaf.get("step", 1) % 2:
        raise ConfigError(file, f"{path}.step", "values must be odd: use an even step (e.g. step: 2)")
    log = leaf.get("log", False)
    check_scalar(log, bool, file, f"{path}.log")
    if log and low <= 0:
        raise ConfigError(file, f"{path}.log", f"log scale needs low > 0, got {low}")
    if "step" in leaf:
        step = check_scalar(leaf["step"], param.kind, file, f"{path}.step")
        if step <= 0:
            raise ConfigError(file, f"{path}.step", f"must be > 0, got {step}")
        if log and not (param.kind is int and step == 1):
            raise ConfigError(file, f"{path}.step", "step cannot be combined with log")


def _validate_choice(leaf: dict, param: Param, file: str, path: str) -> None:
    extra = [k for k in leaf if k != "choice"]
    if extra:
        raise ConfigError(file, f"{path}.{extra[0]}", "only int and float ranges take log or step")
    choices = leaf["choice"]
    if not isinstance(choices, list):
        raise ConfigError(file, f"{path}.choice", f"expected a list, got {type_name(choices)}")
    if not choices:
        raise ConfigError(file, f"{path}.choice", "empty: give at least one value")
    for i, value in enumerate(choices):
        _check_value(value, param, file, f"{path}.choice[{i}]")
    if len(set(map(repr, choices))) != len(choices):
        raise ConfigError(file, f"{path}.choice", "values repeat")


def _check_value(value: Any, param: Param, file: str, path: str) -> None:
    check_bounds(check_scalar(value, param.kind, file, path), param.bounds, file, path)


def suggest_leaf(trial, name: str, leaf: Any) -> Any:
    """A constant leaf as it is; a distribution leaf asked of the trial as parameter `name`."""
    if not isinstance(leaf, dict):
        return leaf
    if "choice" in leaf:
        return trial.suggest_categorical(name, leaf["choice"])
    kind = "int" if "int" in leaf else "float"
    low, high = leaf[kind]
    log = leaf.get("log", False)
    if kind == "int":
        return trial.suggest_int(name, low, high, step=leaf.get("step", 1), log=log)
    return trial.suggest_float(name, float(low), float(high), step=leaf.get("step"), log=log)


def sample_norm(prefix: str, ask: Callable[[str, str], Any], with_position: bool) -> dict:
    """One norm decision named `prefix.type`, `prefix.momentum`, ...: its type, then only that type's settings
    (and a position where the block is ours); `ask(name, key)` asks for parameter `name` distributed as the
    space's leaf for norm setting `key`."""
    norm_type = ask(f"{prefix}.type", "type")
    norm = {"type": norm_type}
    if norm_type != "none" and with_position:
        norm["position"] = ask(f"{prefix}.position", "position")
    for key in NORMS[norm_type].params:
        norm[key] = ask(f"{prefix}.{key}", key)
    return norm
