"""Shared test helpers: a digits run folder with a tiny search space and budget."""

from pathlib import Path

import yaml


def write_digits_run(folder: Path, space: dict, storage: str, study: dict, evaluation: dict) -> Path:
    """Write `space.yaml` and `run.yaml` (digits on the CPU) into `folder`; returns the config path."""
    (folder / "space.yaml").write_text(yaml.safe_dump(space))
    config = {
        "dataset": {"name": "digits"},
        "search_space": "space.yaml",
        "study": {"storage": storage, "seed": 0, **study},
        "evaluation": evaluation,
        "device": "cpu",
    }
    (folder / "run.yaml").write_text(yaml.safe_dump(config))
    return folder / "run.yaml"
