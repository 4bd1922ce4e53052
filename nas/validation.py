"""The validation vocabulary every loader shares: Param, scalar and bound checks, did-you-mean, type names.

It sits below every room that reads YAML (config, space, norms, transforms, data), so they
can all use it without importing one another; it imports nothing of `nas` but the errors.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nas.errors import ConfigError


@dataclass(frozen=True)
class Param:
    """One search-space leaf: its type, default and bounds (the keys `check_bounds` reads)."""

    kind: type
    default: Any
    bounds: dict = field(default_factory=dict)
    searchable: bool = True


def did_you_mean(word: str, known, aliases: dict | None = None) -> str:
    """The known name `word` stands for: an alias first (other spellings users type), else the closest name."""
    folded = {spelling(alias): name for alias, name in (aliases or {}).items()}
    close = difflib.get_close_matches(str(word), [str(k) for k in known], n=1)
    guess = folded.get(spelling(word)) or (close[0] if close else None)
    return f"; did you mean '{guess}'?" if guess else ""


def spelling(word) -> str:
    """A name with case, separators and a 1d/2d/3d suffix ignored: BatchNorm2d, batch_norm and batchnorm are one."""
    return re.sub(r"[123]d$", "", re.sub(r"[\s_\-]", "", str(word).lower()))


def unknown_key(file: str, path: str, key: str, known) -> ConfigError:
    where = f"{path}.{key}" if path else str(key)
    return ConfigError(file, where, f"unknown key (known: {', '.join(map(str, known))}){did_you_mean(key, known)}")


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; a missing file or malformed YAML is a ConfigError naming the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(path, "", "file not found") from None
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or "cannot parse"
        raise ConfigError(path, "", f"malformed YAML: {where}{problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(path, "", f"expected a mapping of keys, got {type_name(data)}")
    return data


def type_name(value: Any) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a mapping",
        type(None): "nothing",
    }.get(type(value), type(value).__name__)


def check_scalar(value: Any, kind: type, file: str, path: str) -> Any:
    """Check one scalar against int / float / str / bool; ints are accepted as floats."""
    ok = (
        (kind is bool and isinstance(value, bool))
        or (kind is int and isinstance(value, int) and not isinstance(value, bool))
        or (kind is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (kind is str and isinstance(value, str))
    )
    if not ok:
        raise ConfigError(file, path, f"expected {type_name(kind())}, got {type_name(value)} {value!r}")
    if kind is float and not math.isfinite(value):
        raise ConfigError(file, path, f"expected a finite number, got {value}")
    return float(value) if kind is float else value


def check_bounds(value: Any, meta: dict, file: str, path: str) -> None:
    choices = meta.get("choices")
    if choices is not None:
        known = choices() if callable(choices) else choices
        if value not in known:
            what = meta.get("what", "value")
            raise ConfigError(
                file,
                path,
                f"unknown {what} '{value}' (known: "
                f"{', '.join(known)}){did_you_mean(value, known, meta.get('aliases'))}",
            )
    if "min" in meta and value < meta["min"]:
        raise ConfigError(file, path, f"must be >= {meta['min']}, got {value}")
    if "above" in meta and value <= meta["above"]:
        raise ConfigError(file, path, f"must be > {meta['above']}, got {value}")
    if "below" in meta and value >= meta["below"]:
        raise ConfigError(file, path, f"must be < {meta['below']}, got {value}")
    if "max" in meta and value > meta["max"]:
        raise ConfigError(file, path, f"must be <= {meta['max']}, got {value}")
    if meta.get("odd") and value % 2 == 0:
        raise ConfigError(file, path, f"must be odd (so 'same' padding keeps the size), got {value}")
