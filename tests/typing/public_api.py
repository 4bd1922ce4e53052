"""How a user's code calls bnnas's public API, checked by mypy (`.ci/run`): the names resolve and their types hold.

Never run; `tests/test_typing.py` shows the check fails on a misuse.
"""

from pathlib import Path

import optuna
import torch

import nas
from nas.build import build
from nas.export import Exported, load_exported
from nas.storage import request_stop


def rebuild_best(storage: str, study_name: str) -> torch.nn.Module:
    study: optuna.Study = nas.load_existing_study(storage, study_name)
    spec: dict = study.best_trial.user_attrs["arch"]
    return build(spec, (1, 8, 8), 10)


def read_export(folder: Path) -> torch.nn.Module:
    exported: Exported = load_exported(folder)
    return exported.model


def stop(storage: str, study_name: str) -> None:
    request_stop(storage, study_name)


def search(config: Path) -> optuna.Study:
    cfg: nas.RunConfig = nas.load_run_config(config)
    return nas.run_search(cfg, progress=False)


version: str = nas.__version__
