"""Load and validate run configs; every error names the file and the key path.

A run config is YAML (`yaml.safe_load` only) read into the dataclasses below. The dataclass
fields are the schema: their names are the allowed keys, their annotations the types, their
defaults the one place each default lives, and `metadata` holds bounds and registry names.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nas.errors import ConfigError, DataError
from nas.options import DATASET_NAMES
from nas.search.pruners import PRUNER_NAMES
from nas.search.samplers import SAMPLER_NAMES
from nas.validation import check_bounds, check_scalar, read_yaml, type_name, unknown_key

DEVICES = ("auto", "cpu", "cuda")
# all minimized; kept_scales: the share of norm scales |gamma| >= 0.01, the channels slimming at that threshold keeps
OBJECTIVES = ("cv_loss", "latency_ms", "params", "macs", "kept_scales")
LIMITED = OBJECTIVES[1:]  # what `constraints` may bound: measured on the candidate, not trained


def _check_constraints(value, file: str, path: str) -> dict:
    """`constraints: {latency_ms: 5, params: 200000}`: upper bounds a feasible trial stays within."""
    from nas.validation import check_bounds, check_scalar, did_you_mean

    if not isinstance(value, dict):
        raise ConfigError(file, path, f"expected a mapping of measure: upper bound, got {type(value).__name__}")
    checked = {}
    for name, limit in value.items():
        if name not in LIMITED:
            hint = did_you_mean(str(name), LIMITED)
            raise ConfigError(file, f"{path}.{name}", f"unknown measure (known: {', '.join(LIMITED)}){hint}")
        checked[name] = check_scalar(limit, float, file, f"{path}.{name}")
        check_bounds(checked[name], {"above": 0}, file, f"{path}.{name}")
    return checked


DURATION = re.compile(r"(?:(\d+(?:\.\d*)?)h)?(?:(\d+(?:\.\d*)?)m)?(?:(\d+(?:\.\d*)?)s)?")


def _check_duration(value, file: str, path: str) -> float | None:
    """A wall time in seconds: a number, or `90s`, `10m`, `1.5h`, `1h30m`."""
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        seconds = value
    else:
        text = str(value).strip().lower().replace(" ", "")
        match = DURATION.fullmatch(text)
        if text and match is None and text.replace(".", "", 1).isdigit():
            seconds = float(text)
        elif not text or match is None or not any(match.groups()):
            raise ConfigError(file, path, f"expected a duration such as 90s, 10m or 1h30m (or seconds), got {value!r}")
        else:
            hours, minutes, secs = (float(part or 0) for part in match.groups())
            seconds = hours * 3600 + minutes * 60 + secs
    if seconds is not None and seconds <= 0:
        raise ConfigError(file, path, f"must be a positive duration, got {value!r}")
    return None if seconds is None else float(seconds)


FOLD_MODES = ("together", "sequential")
AUGMENT_NAMES = ("auto", "none", "crop", "crop_flip")


def _check_transforms(value, file: str, path: str) -> list:
    from nas.data.transforms import check_transforms  # late: keeps `import nas.search.config` free of torch

    return check_transforms(value, file, path)


@dataclass
class DatasetConfig:
    name: str = field(default="digits", metadata={"choices": DATASET_NAMES})
    root: str | None = None  # folder (torchvision, imagefolder) or .npz file; relative to the cwd
    download: bool = False
    augment: str = field(default="auto", metadata={"choices": AUGMENT_NAMES})
    image_size: int | None = field(default=None, metadata={"min": 1})  # images resized to this square size on load
    cache: str = "auto"  # imagefolder: decoded images cached in auto (~/.cache/bnnas), off, or a folder
    device_memory: float | None = field(
        default=None, metadata={"min": 0}
    )  # GB 8-bit images may take on the device (None: half its free memory); beyond: streamed
    # Shifted variants (nas.data.transforms): [{contrast: 0.5}, {noise: 0.1}, ...] applied to both splits.
    transforms: list = field(default_factory=list, metadata={"check": _check_transforms})
    transform_seed: int = 0  # seeds the `noise` transform
    # A small labelled training split: K samples of every class (the test split kept whole), drawn by labels_seed.
    labels_per_class: int | None = field(default=None, metadata={"min": 1})
    labels_seed: int = 0
    # Tabular data (nas.data.tabular): the CSV column of the classes, and the test split: a stated file, or this
    # share of the rows drawn stratified by split_seed (scikit-learn's bundled tables are split the same way).
    target: str | None = None
    test_root: str | None = None
    test_fraction: float = field(default=0.2, metadata={"above": 0.0, "below": 1.0})
    split_seed: int = 0


@dataclass
class WarmStartConfig:
    """An earlier study whose best candidates are queued as this study's first trials (nas.study.warm_start)."""

    study: str | None = None
    storage: str | None = None  # default: this study's storage
    top: int = field(default=5, metadata={"min": 1})


@dataclass
class StudyConfig:
    name: str = "bnnas"
    storage: str = "sqlite:///runs/nas.db"
    sampler: str = field(default="tpe", metadata={"choices": SAMPLER_NAMES})
    startup_trials: int | None = field(default=None, metadata={"min": 1})  # TPE's and GP's random draws first (10)
    trials: int = field(default=30, metadata={"min": 1})
    seed: int = 0
    timeout: float | None = field(default=None, metadata={"min": 0})
    max_consecutive_failures: int = field(default=5, metadata={"min": 1})
    heartbeat_seconds: float = field(
        default=30.0, metadata={"min": 1}
    )  # RDB storage: a trial silent for 2x this is stale
    retries: int = field(default=1, metadata={"min": 0})  # times a stale (crashed) trial is rerun with its parameters
    # A wall time the search plans for and ends within (nas.study.time_budget); then `trials` only caps it if a flag
    # set it.
    budget: float | None = field(default=None, metadata={"check": _check_duration})
    # Stop after this many finished trials without an improvement beyond the fold noise (nas.study.stopping).
    stop_after: int | None = field(default=None, metadata={"min": 1})
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)


@dataclass
class EvaluationConfig:
    folds: int = field(default=3, metadata={"min": 2})
    epochs: int = field(default=15, metadata={"min": 1})
    pruner: str = field(default="none", metadata={"choices": PRUNER_NAMES})
    recalibrate_bn: bool = False  # re-estimate BN running statistics on the training fold before validation
    fold_mode: str = field(
        default="together", metadata={"choices": FOLD_MODES}
    )  # train the k folds as one batched computation
    latency_batch_size: int = field(default=64, metadata={"min": 1})  # for the latency_ms objective
    latency_threads: int = field(
        default=1, metadata={"min": 1}
    )  # CPU threads the latency_ms objective is measured with (as nas-bench)


@dataclass
class RunConfig:
    search_space: str  # path, relative to the config file
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    device: str = field(default="auto", metadata={"choices": DEVICES})
    objectives: list[str] = field(
        default_factory=lambda: ["cv_loss"], metadata={"choices": OBJECTIVES, "what": "objective"}
    )
    constraints: dict = field(default_factory=dict, metadata={"check": _check_constraints})  # measure -> bound
    # Filled by the loader, not read from YAML:
    source: str = field(default="", metadata={"internal": True})
    space: dict = field(default_factory=dict, metadata={"internal": True})
    origins: dict = field(
        default_factory=dict, metadata={"internal": True, "stored": False}
    )  # key path -> flag that set it

    def to_dict(self) -> dict:
        """Plain JSON data: stored in the study so `--resume` needs no YAML."""
        data = dataclasses.asdict(self)
        for f in dataclasses.fields(self):
            if f.metadata.get("stored") is False:
                del data[f.name]
        return data

    def where(self, key_path: str) -> str:
        """Who gave `key_path` its value: the flag or `--set` that overrode it, else the config file."""
        return origin_of(key_path, self.origins, self.source)


class Override(typing.NamedTuple):
    """One `--set key.path=value` or shortcut flag; `origin` is what errors name (`--trials`, `--set`)."""

    key: str
    value: Any
    origin: str = "--set"


def origin_of(key_path: str, origins: dict, file: str) -> str:
    """The override that set `key_path` or a mapping above it (or below it: `--set dataset={...}`), else `file`."""
    for key, origin in origins.items():
        if (
            key_path == key
            or key_path.startswith(f"{key}.")
            or key_path.startswith(f"{key}[")
            or key.startswith(f"{key_path}.")
        ):
            return origin
    return file


@contextmanager
def blamed(cfg: RunConfig):
    """Prefix a DataError that starts with a key path (`dataset.root: ...`) with who set that key."""
    try:
        yield
    except DataError as exc:
        text = str(exc)
        key = text.split(":", 1)[0]
        if KEY_PATH.fullmatch(key):
            raise DataError(f"{cfg.where(key)}: {text}") from None
        raise


KEY_PATH = re.compile(r"[a-z_]+(\.[a-z_0-9]+|\[\d+\])*")


# Shortcut flags of `nas-search` and the key each one overrides.
SHORTCUTS = {
    "trials": "study.trials",
    "epochs": "evaluation.epochs",
    "folds": "evaluation.folds",
    "sampler": "study.sampler",
    "seed": "study.seed",
    "storage": "study.storage",
    "study": "study.name",
    "timeout": "study.timeout",
    "device": "device",
    "budget": "study.budget",
    "stop-after": "study.stop_after",
    "warm-start": "study.warm_start.study",
    "warm-storage": "study.warm_start.storage",
    "top": "study.warm_start.top",
}
WARM_START_KEYS = ("study.warm_start.study", "study.warm_start.storage", "study.warm_start.top")


def _from_dict(cls, data: Any, file: str, path: str):
    if not isinstance(data, dict):
        raise ConfigError(file, path, f"expected a mapping, got {type_name(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            raise unknown_key(file, path, key, fields)
    values = {}
    for name, f in fields.items():
        key_path = f"{path}.{name}" if path else name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(file, key_path, "missing (required)")
            continue
        hint, value = hints[name], data[name]
        if "check" in f.metadata:  # a field with a structure of its own validates itself
            values[name] = f.metadata["check"](value, file, key_path)
            continue
        if dataclasses.is_dataclass(hint):
            values[name] = _from_dict(hint, value, file, key_path)
            continue
        if typing.get_origin(hint) is list:
            values[name] = _list_of(typing.get_args(hint)[0], value, f.metadata, file, key_path)
            continue
        kinds = [k for k in _union_members(hint) if k is not type(None)]
        if value is None and type(None) in _union_members(hint):
            values[name] = None
            continue
        values[name] = check_scalar(value, kinds[0], file, key_path)
        check_bounds(values[name], {"what": name.replace("_", " "), **f.metadata}, file, key_path)
    return cls(**values)


def _list_of(kind: type, value: Any, meta: dict, file: str, path: str) -> list:
    """A non-empty list of distinct scalars; a single scalar is taken as a list of one."""
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ConfigError(file, path, "empty: give at least one value")
    for i, item in enumerate(items):
        check_scalar(item, kind, file, f"{path}[{i}]")
        check_bounds(item, meta, file, f"{path}[{i}]")
    if len(set(items)) != len(items):
        raise ConfigError(file, path, "values repeat")
    return list(items)


def _union_members(hint) -> tuple:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return typing.get_args(hint)
    return (hint,)


def set_key(data: dict, key_path: str, value: Any) -> None:
    """Set `a.b.c` in nested dicts, creating the mappings on the way."""
    *parents, last = key_path.split(".")
    node = data
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[last] = value


def parse_override(text: str) -> Override:
    """`key.path=value` with the value read as YAML (so `5` is an int, `true` a bool)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError("--set", text, "expected key.path=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return Override(key.strip(), value, "--set")


def load_run_config(
    path: str | Path | None, overrides: list[tuple] = (), stored: dict | None = None, *, needs_space: bool = True
) -> RunConfig:
    """Read, override and validate a run config, then load and validate its search space.

    `needs_space` False (nas-finetune, which reads only the dataset, epochs and device): a config without
    `search_space` is taken, its `space` empty.

    `stored` is the dict a study keeps (`RunConfig.to_dict()`): resuming starts from it
    instead of a YAML file, and its embedded space is used as it was (unless `search_space`
    is overridden). An error in a value that a flag gave names the flag, not the file.
    A relative `dataset.root` is made absolute (it is relative to the working directory), so
    the stored config means the same data whichever folder the study is resumed from.
    """
    overrides = [Override(*o) for o in overrides]
    origins = {o.key: o.origin for o in overrides}
    if stored is None and overrides:
        _check_as_written(path, overrides, needs_space)
    with blaming_flags(origins):
        cfg = _load(path, overrides, stored, needs_space)
    cfg.origins = origins
    if cfg.dataset.root is not None:
        cfg.dataset.root = str(Path(cfg.dataset.root).expanduser().absolute())
    return cfg


@contextmanager
def blaming_flags(origins: dict):
    """A ConfigError about a key that a flag set (`origins`: key -> flag) names the flag instead of the file."""
    try:
        yield
    except ConfigError as exc:
        where = origin_of(exc.key_path, origins, exc.file) if exc.key_path else exc.file
        if where == exc.file:
            raise
        raise ConfigError(where, exc.key_path, exc.problem) from None


def _check_as_written(path: str | Path, overrides: list[Override], needs_space: bool) -> None:
    """Validate the file's own values, so that a flag does not hide a mistake the next run without it meets.

    Only the keys the file lacks are taken from the flags (a required key may come from --set)."""
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        return  # _load names the file's shape
    applied = {}  # key -> flag, for the keys a flag gave: an error there names the flag
    for key, value, origin in overrides:
        if not _has_key(raw, key):
            set_key(raw, key, value)
            applied[key] = origin
    if not needs_space:
        raw.setdefault("search_space", "")
    with blaming_flags(applied):
        _from_dict(RunConfig, raw, str(path), "")


def _has_key(data: dict, key_path: str) -> bool:
    node = data
    for part in key_path.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _load(path: str | Path | None, overrides: list[Override], stored: dict | None, needs_space: bool) -> RunConfig:
    from nas.search.space import load_space, validate_space  # late: space pulls in torch (norms)

    if stored is not None:
        raw = copy.deepcopy(stored)
        file = raw.pop("source", "") or "stored config"
        space_dict = raw.pop("space")
        if any(o.key == "search_space" for o in overrides):
            space_dict = None  # a new space file asked for: read it (the study contract then compares the two)
    else:
        file = str(path)
        raw = read_yaml(path)
        space_dict = None
    for key, value, _ in overrides:
        set_key(raw, key, value)
    spaceless = not needs_space and isinstance(raw, dict) and "search_space" not in raw
    if spaceless:
        raw["search_space"] = ""
    cfg = _from_dict(RunConfig, raw, file, "")
    cfg.source = file
    if len(cfg.objectives) > 1 and cfg.study.stop_after is not None:
        raise ConfigError(
            file, "study.stop_after", "a stop on stagnation follows one objective's best; give one objective"
        )
    if len(cfg.objectives) > 1 and cfg.evaluation.pruner != "none":
        raise ConfigError(
            file, "evaluation.pruner", "Optuna prunes single-objective studies only; use none with several objectives"
        )
    from nas.search.finetune_space import check_pruner
    from nas.search.pruners import pruner_problem

    ev = cfg.evaluation
    problem = pruner_problem(ev.pruner, ev.folds, ev.fold_mode, ev.recalibrate_bn)
    if problem is not None:
        raise ConfigError(file, "evaluation.pruner", problem)
    if spaceless:
        pass  # `space` stays empty
    elif space_dict is None:
        space_path = Path(cfg.search_space).expanduser()
        if not space_path.is_absolute():
            space_path = Path(file).parent / space_path
        if not space_path.is_file():
            raise ConfigError(file, "search_space", f"file not found: {space_path}")
        cfg.search_space = str(space_path.resolve())
        cfg.space = load_space(space_path)
    else:
        cfg.space = validate_space(space_dict, cfg.search_space)
    check_pruner(cfg.space, cfg.evaluation.pruner, file)
    return cfg
