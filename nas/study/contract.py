"""The study is a contract: what every trial in it shares, so that their scores compare.

A continuation may change the budget, timeout, device, sampler and the fault-tolerance
settings freely; a change to the dataset (name, root, transforms, augmentation, image size and
the fingerprint of the loaded data), the evaluation (folds, epochs, fold mode, BN re-estimation,
pruner), the objectives, the seed (it draws the fold splits) or the search space is refused
unless forced, and a forced change is kept in the study's config history. Each trial records
the config version it ran under (`config_version`, 0 for the first), so any trial can be
rebuilt on the data and budget it was scored with.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from pathlib import Path

from nas.output import atomic_write_text

DATASET_KEYS = (
    "name",
    "root",
    "transforms",
    "transform_seed",
    "augment",
    "image_size",
    "labels_per_class",
    "labels_seed",
    "target",
    "test_root",
    "test_fraction",
    "split_seed",
)
SPLIT_KEYS = ("test_fraction", "split_seed")  # draw a tabular dataset's test split; nothing else reads them
EVALUATION_KEYS = ("folds", "epochs", "fold_mode", "recalibrate_bn", "pruner")
# Dataset keys naming this host's files, which a resume takes from storage.
HOST_KEYS = ("root", "test_root", "cache", "download")


def contract(config: dict, data: dict | None) -> dict:
    """The part of a stored run config (plus its data fingerprint) that every trial must share.

    `dataset.augment` enters resolved (`auto` is `crop_flip` on CIFAR): what trains, not how it was spelt."""
    from nas.data.datasets import resolve_augment

    dataset, evaluation = config.get("dataset", {}), config.get("evaluation", {})
    dataset = {**dataset, "augment": resolve_augment(dataset.get("name"), dataset.get("augment"))}
    objectives = config.get("objectives", ["cv_loss"])
    terms = {
        "dataset": {
            key: _root(dataset.get(key)) if key in ("root", "test_root") else dataset.get(key)
            for key in DATASET_KEYS
            if _compared(key, dataset)
        },
        "evaluation": {key: evaluation.get(key) for key in EVALUATION_KEYS},
        "objectives": objectives,
        "study": {"seed": config.get("study", {}).get("seed")},
        "space": config.get("space"),
    }
    constraints = config.get("constraints") or {}
    if constraints:  # what a feasible trial is: compared only where set, so older studies' terms stay the same
        terms["constraints"] = constraints
    if "latency_ms" in objectives or "latency_ms" in constraints:
        terms["evaluation"]["latency_batch_size"] = evaluation.get("latency_batch_size")
        terms["evaluation"]["latency_threads"] = evaluation.get("latency_threads")
    if data is not None:
        terms["data"] = data
    return terms


def _compared(key: str, dataset: dict) -> bool:
    """Keys older studies lack are compared only where they mean something: the label budget's seed with a
    budget, a CSV's target and test file when given, the test split's draw on tabular data."""
    from nas.data.tabular import TABLES

    if key == "labels_seed":
        return dataset.get("labels_per_class") is not None
    if key in ("target", "test_root"):
        return dataset.get(key) is not None
    if key in SPLIT_KEYS:
        return dataset.get("name") in TABLES and not dataset.get("test_root")
    return True


def _root(root: str | None) -> str | None:
    """Roots compare as absolute paths (a stored relative root is read from the current folder, as on resume)."""
    return None if root is None else str(Path(root).expanduser().absolute())


def differences(old: dict, new: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """Every leaf that differs, as (dotted key path, old, new), in the contract's key order.

    A side that lacks a whole section (an older study stored no data fingerprint) is not compared there.
    A fingerprint of the data loaded now (`nas.data.datasets.Fingerprint`) is compared in the version of the one
    stored (no "version" key: version 1), so a study fingerprinted by an older bnnas continues on the same data.
    """
    if isinstance(old, dict) and hasattr(new, "as_version"):
        new = new.as_version(old.get("version", 1))
    found = []
    for key in dict.fromkeys([*old, *new]):
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in old or key not in new:
            if prefix:  # a leaf present on one side only
                found.append((path, old.get(key), new.get(key)))
            continue
        a, b = old[key], new[key]
        if isinstance(a, dict) and isinstance(b, dict):
            found += differences(a, b, path)
        elif a != b:
            found.append((path, a, b))
    return found


def show(value: object, limit: int = 60) -> str:
    """A value as compact JSON, cut to `limit` characters (an error message stays one readable line)."""
    text = json.dumps(value, separators=(",", ":"), default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def history_entry(
    changes: list[tuple[str, object, object]], previous_config: dict, previous_data: dict | None, source: str
) -> dict:
    """One forced change: when, by whom, what changed, and the config and data it replaced."""
    return {
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "by": socket.gethostname(),
        "source": source,
        "changes": [{"key": key, "old": old, "new": new} for key, old, new in changes],
        "previous": {"run_config": previous_config, "data": previous_data},
    }


def config_of_version(
    version: int, current: dict, current_data: dict | None, history: list[dict]
) -> tuple[dict, dict | None]:
    """The run config and data fingerprint of config version `version` (the last is the current one)."""
    if 0 <= version < len(history):
        previous = history[version].get("previous", {})
        return previous.get("run_config", current), previous.get("data")
    return current, current_data


def summary(config: dict) -> str:
    """The one line a study shows in `optuna studies` (the whole config lives in a system attribute)."""
    dataset, evaluation, study = config.get("dataset", {}), config.get("evaluation", {}), config.get("study", {})
    return (
        f"bnnas: {dataset.get('name', '?')}, {evaluation.get('folds', '?')} folds x {evaluation.get('epochs', '?')} "
        f"epochs, {study.get('sampler', '?')}, budget {study.get('trials', '?')}"
    )


def changed_on_this_host(storage_url: str, study_name: str, dataset: dict) -> list[tuple[str, object, object]]:
    """The dataset's root / cache / download that differ from what this host last ran the study with; records the new.

    Kept in a local file ($XDG_STATE_HOME/bnnas, else ~/.local/state/bnnas), not in the study: whoever can rewrite
    the stored run config can rewrite any study attribute too. The file names no URL (a password may be in it).
    """
    path = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "bnnas" / "last_seen.json"
    key = hashlib.sha256(f"{storage_url}\n{study_name}".encode()).hexdigest()
    now = {name: dataset.get(name) for name in HOST_KEYS}
    try:
        seen = json.loads(path.read_text())
    except (OSError, ValueError):
        seen = {}
    seen = seen if isinstance(seen, dict) else {}
    before = seen.get(key)
    if before == now:
        return []
    seen[key] = now
    try:  # best effort: a host that cannot keep the record only loses the notice
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write_text(path, json.dumps(seen))
    except OSError:
        pass
    if not isinstance(before, dict):
        return []
    return [(f"dataset.{name}", before.get(name), now[name]) for name in HOST_KEYS if before.get(name) != now[name]]
