"""Opening a study for a search: created or loaded with its sampler and pruner, its contract checked, its config stored.

The study's contract (`nas.study.contract`): a continuation that would score trials differently is
refused unless forced, and a forced change is appended to the study's config history. Nothing is
written to an existing study while it is opened: the run config is stored only when a run trains.
"""

from __future__ import annotations

import warnings

import optuna
from sqlalchemy.exc import SQLAlchemyError

from nas.errors import ConfigError, StudyError, one_line
from nas.search.config import RunConfig
from nas.search.samplers import make_sampler
from nas.study.contract import contract, differences, history_entry, show, summary
from nas.study.pruning import make_pruner
from nas.study.schema import (
    read_config_history,
    read_data_fingerprint,
    read_run_config,
    write_config_history,
    write_run_config,
)
from nas.study.storage import load_existing_study, quiet_optuna


def existing_study_id(storage, name: str) -> int | None:
    try:
        return storage.get_study_id_from_name(name)
    except KeyError:
        return None


def check_contract(cfg: RunConfig, storage, fingerprint: dict | None, force: bool) -> list:
    """The differences between the stored contract and this run's (empty for a new study); refused unless `force`."""
    study_id = existing_study_id(storage, cfg.study.name)
    if study_id is None:
        return []
    directions = storage.get_study_directions(study_id)
    if len(directions) != len(cfg.objectives):
        raise ConfigError(
            cfg.where("objectives"),
            "objectives",
            f"study '{cfg.study.name}' has {len(directions)} objective(s), "
            f"this run asks for {len(cfg.objectives)}; use another --study",
        )
    stored = read_run_config(storage, study_id)
    if stored is None:
        return []
    old = contract(stored, read_data_fingerprint(storage, study_id))
    changes = differences(old, contract(cfg.to_dict(), fingerprint if "data" in old else None))
    if changes and not force:
        key, before, after = changes[0]
        more = f" (and {len(changes) - 1} more)" if len(changes) > 1 else ""
        raise ConfigError(
            cfg.where(_config_key(key)),
            key,
            f"study '{cfg.study.name}' was run with {show(before)}; this run has "
            f"{show(after)}{more}. Use another --study, or --force to continue it and record the change",
        )
    return changes


def _config_key(contract_key: str) -> str:
    """The config key a contract key comes from (the data fingerprint belongs to `dataset`)."""
    if contract_key.startswith("data."):
        return "dataset"
    if contract_key.startswith("space."):
        return "search_space"
    return contract_key


def create_or_load(cfg: RunConfig, storage) -> optuna.Study:
    """The study, created if new (several workers may race to create it), as a handle for bookkeeping:
    reclaiming, counting, storing the config. Searching it takes `load_for_search`'s study, made with its sampler."""
    try:
        with quiet_optuna():
            study = optuna.create_study(
                storage=storage,
                study_name=cfg.study.name,
                load_if_exists=True,
                directions=["minimize"] * len(cfg.objectives),
            )
    except (ImportError, ValueError, SQLAlchemyError) as exc:
        raise StudyError(f"study.storage: cannot open {cfg.study.storage}: {one_line(exc)}") from None
    if study.metric_names != list(cfg.objectives):  # optuna-dashboard and Optuna's plots label the objectives
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(cfg.objectives))
    return study


def load_for_search(cfg: RunConfig, storage, seed: int) -> optuna.Study:
    """The study as this process searches it: its sampler seeded with `seed`, the pruner the config names."""
    with quiet_optuna():
        return optuna.load_study(
            study_name=cfg.study.name,
            storage=storage,
            sampler=make_sampler(cfg.study.sampler, seed, cfg.study.startup_trials),
            pruner=make_pruner(
                cfg.evaluation.pruner, cfg.evaluation.epochs, cfg.evaluation.folds, cfg.evaluation.fold_mode
            ),
        )


def store_config(study: optuna.Study, cfg: RunConfig, fingerprint: dict | None, changes: list) -> int:
    """Store the run config a run trains with (a forced change appended to the history); returns its version."""
    storage, study_id = study._storage, study._study_id
    history = read_config_history(storage, study_id)
    if changes:
        previous = read_run_config(storage, study_id)
        history.append(history_entry(changes, previous, read_data_fingerprint(storage, study_id), cfg.source))
        write_config_history(storage, study_id, history)
    config = cfg.to_dict()
    write_run_config(storage, study_id, config, fingerprint, summary(config))
    return len(history)


def stored_config(study_name: str, storage: str) -> dict:
    """The run config a study was last run with, for `--resume`."""
    study = load_existing_study(storage, study_name)
    config = read_run_config(study._storage, study._study_id)
    if config is None:
        raise StudyError(
            f"--study: '{study_name}' has no stored run config (not made by nas-search); run with --config"
        )
    return config
