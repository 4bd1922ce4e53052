"""Every name bnnas keeps in an Optuna study, and reading and writing them: the stored schema (no torch here).

study system attrs  `nas:run_config`    the run config the study was last trained with, its search space inline
                    `nas:data`          the fingerprint of the data it was searched on
                    `nas:config_history` the forced changes of its contract, oldest first (`nas.study.contract`)
                    `nas:stop_requested_at` when a graceful stop was last asked for (the dashboard's Stop)
                    `nas:worker:HOST:PID:START` one record per live worker (`nas.study.workers`)
                    `nas:compare:cell`, `nas:compare:reeval` a nas-compare cell's levels and its re-evaluation
study user attr     `bnnas`             one short line, so `optuna studies` stays readable
trial user attrs    `arch` (the ArchSpec), `worker`, `config_version`, `fail_reason`, `duplicate_of`, the score
                    (`SCORE_ATTRS`), the costs a multi-objective search asks for (`COST_ATTRS`), and what a pruned
                    trial measured (`fold_losses`, `partial_fold_losses`, `pruned_at_step`)

Studies written before these names kept the run config in the user attr `run_config`; it is still read.
Any process that can write the storage can write any attribute: the readers here check the type of what
they return, and one of another type is a StoredAttrError naming the attribute and what was expected.
A repeated proposal (`duplicate_of`) is a FAIL trial, so that no sampler or pruner counts it
(`nas.study.duplicates`); studies written before kept repeats COMPLETE or PRUNED, which
`counts_toward_budget` still tells apart.
"""

from __future__ import annotations

import math
import os
import time

import optuna
import sqlalchemy
from optuna.trial import TrialState

from nas.errors import ConfigError, StudyError
from nas.study.contract import config_of_version
from nas.study.storage import rdb_engine, storage_of
from nas.validation import check_scalar, type_name

# study system attributes
RUN_CONFIG_ATTR = "nas:run_config"
DATA_ATTR = "nas:data"
HISTORY_ATTR = "nas:config_history"
STOP_ATTR = "nas:stop_requested_at"
WORKER_PREFIX = "nas:worker:"
COMPARE_CELL_ATTR = "nas:compare:cell"  # {"factors": [name], "levels": {name: level}}
COMPARE_REEVAL_ATTR = "nas:compare:reeval"  # {"trial": n, "seeds": {seed: {cv_loss, cv_accuracy} | {failed}}}
# study user attributes
SUMMARY_ATTR = "bnnas"
LEGACY_RUN_CONFIG_ATTR = "run_config"  # user attr of studies written before RUN_CONFIG_ATTR
# trial user attributes
ARCH_ATTR = "arch"  # the ArchSpec: `nas.build.build(spec, input_shape, num_classes)` rebuilds the trial's model
WORKER_ATTR = "worker"  # the identity of the process that ran the trial
VERSION_ATTR = "config_version"  # the config version the trial ran under (0: the first)
DEVICE_ATTR = "device"  # where the trial trained: `cuda:0 (CUDA_VISIBLE_DEVICES=2)`, `cpu`
FAIL_REASON_ATTR = "fail_reason"
CUT_ATTR = "cut_by_budget"  # a trial the time budget's deadline ended early (pruned): where and why
WARM_START_ATTR = "warm_start_of"  # a queued candidate of an earlier study: {study, trial, cv_loss}
DUPLICATE_ATTR = "duplicate_of"  # the proposal repeated this tried trial's parameters
FOLD_LOSSES_ATTR = "fold_losses"
PARTIAL_FOLD_LOSSES_ATTR = "partial_fold_losses"  # a pruned trial: each fold's latest validation loss
PRUNED_AT_STEP_ATTR = "pruned_at_step"
PARAMS_ATTR = "params"  # trainable parameters of the model as trained (BN unfolded)
# |gamma| of the trained fold models' norms, pooled: count, p10 / p50 / p90, share below 0.01 (what slimming removes)
NORM_SCALES_ATTR = "norm_scales"
SCORE_ATTRS = (
    FOLD_LOSSES_ATTR,
    "fold_accuracies",
    "cv_accuracy",
    "cv_loss_std",
    PARAMS_ATTR,
    "train_seconds",
    "eval_mode_loss",
    "train_mode_loss",
    "recalibrated_loss",
    "fold_mode",
    "fold_mode_fallback",
    NORM_SCALES_ATTR,
)
# objective -> the trial attr its value is kept in: the costs of the candidate as it deploys (BN folded)
COST_ATTRS = {"params": "folded_params", "macs": "macs", "latency_ms": "latency_ms"}
# fail reasons that are no fault of the candidate
INTERRUPTED = "interrupted"  # stopped by SIGINT / SIGTERM
OVER_BUDGET = "budget already reached by other workers"

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)  # finished states; see `counts_toward_budget`

# trial user attrs bnnas writes and reads back, by the type they hold (`float` also takes an int)
TRIAL_ATTR_KINDS = {
    ARCH_ATTR: dict,
    "cv_accuracy": float,
    "cv_loss_std": float,
    PARAMS_ATTR: int,
    "train_seconds": float,
    FAIL_REASON_ATTR: str,
    DUPLICATE_ATTR: int,
    VERSION_ATTR: int,
    PRUNED_AT_STEP_ATTR: int,
    "folded_params": int,
    "macs": int,
    "latency_ms": float,
    NORM_SCALES_ATTR: dict,
    DEVICE_ATTR: str,
}


class StoredAttrError(StudyError):
    """An attribute in the storage of a type bnnas never writes (another writer's, or damaged)."""


def _bad(where: str, expected: str, value) -> StoredAttrError:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:60] + "…"
    return StoredAttrError(f"{where}: expected {expected}, holds {type_name(value)} {shown}")


def _of_kind(value, kind: type, where: str):
    """`value` if it is of `kind` (a scalar checked as the config loader does, or dict / list), else StoredAttrError."""
    if kind in (dict, list):
        if not isinstance(value, kind):
            raise _bad(where, type_name(kind()), value)
        return value
    try:
        return check_scalar(value, kind, "", "")
    except ConfigError:  # worded for a file and key path: reworded for a stored value
        raise _bad(where, type_name(kind()), value) from None


def trial_attr(trial: optuna.trial.FrozenTrial, name: str, default=None):
    """A trial user attr of the type bnnas stores it as (`TRIAL_ATTR_KINDS`); absent or None: `default`."""
    value = trial.user_attrs.get(name)
    if value is None:
        return default
    return _of_kind(value, TRIAL_ATTR_KINDS[name], f"trial {trial.number}: user attr '{name}'")


def is_duplicate(trial: optuna.trial.FrozenTrial) -> bool:
    return DUPLICATE_ATTR in trial.user_attrs


def is_failure(trial: optuna.trial.FrozenTrial) -> bool:
    """A FAIL trial that tried to train its candidate (a repeat is FAIL only to keep it from samplers and pruners)."""
    return trial.state == TrialState.FAIL and not is_duplicate(trial)


def counts_toward_budget(trial: optuna.trial.FrozenTrial) -> bool:
    """A finished (complete or pruned) trial that trained a new candidate: what `--trials N` counts."""
    return trial.state in FINISHED and not is_duplicate(trial)


def budget_count(trials) -> int:
    return sum(map(counts_toward_budget, trials))


def finite(value) -> bool:
    """A real number (not a bool), neither NaN nor infinite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_scored(trial: optuna.trial.FrozenTrial) -> bool:
    """A COMPLETE trial that trained its own candidate and has finite objective values: what every ranking,
    best value, grid and anytime curve uses (a repeat carries another's score; a NaN ranks nowhere)."""
    return (
        trial.state == TrialState.COMPLETE
        and counts_toward_budget(trial)
        and bool(trial.values)
        and all(map(finite, trial.values))
    )


def where_it_trains(device) -> str:
    """The device a trial trains on, with the GPUs this process sees when a launcher narrowed them."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return str(device) + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else "")


def is_feasible(trial: optuna.trial.FrozenTrial) -> bool:
    """Within every limit of the study's `constraints` (Optuna's rule: each stored constraint value <= 0)."""
    return all(value <= 0 for value in trial.constraints.values())


def outside(trial: optuna.trial.FrozenTrial) -> str:
    """How far a trial is outside its limits (`latency_ms +2.1 over`), or `ok` within them."""
    over = [f"{name} {value:+.4g} over" for name, value in sorted(trial.constraints.items()) if value > 0]
    return ", ".join(over) or "ok"


def scored_trials(trials) -> list[optuna.trial.FrozenTrial]:
    """The scored trials of `trials`, best first by the first objective (minimized), ties by trial number; those
    outside the study's `constraints` after every feasible one."""
    return sorted(filter(is_scored, trials), key=lambda t: (not is_feasible(t), t.values[0], t.number))


def write_config_history(storage, study_id: int, history: list[dict]) -> None:
    storage.set_study_system_attr(study_id, HISTORY_ATTR, history)


def write_compare_cell(storage, study_id: int, factors: list[str], levels: dict) -> None:
    storage.set_study_system_attr(study_id, COMPARE_CELL_ATTR, {"factors": factors, "levels": levels})


def write_reevaluation(storage, study_id: int, trial: int, seeds: dict) -> None:
    storage.set_study_system_attr(study_id, COMPARE_REEVAL_ATTR, {"trial": trial, "seeds": seeds})


def read_run_config(storage, study_id: int) -> dict | None:
    """The run config a study was last trained with (None: not made by nas-search)."""
    where = f"study attr '{RUN_CONFIG_ATTR}'"
    config = storage.get_study_system_attrs(study_id).get(RUN_CONFIG_ATTR)
    if config is None:
        where = f"study user attr '{LEGACY_RUN_CONFIG_ATTR}'"
        config = storage.get_study_user_attrs(study_id).get(LEGACY_RUN_CONFIG_ATTR)
    return None if config is None else _of_kind(config, dict, where)


def config_value(config: dict, key_path: str, kind: type, default=None):
    """One value of a stored run config (`study.trials`), read without loading the whole config (which needs torch):
    of `kind` (`list`: a list of strings), `default` when absent, else StoredAttrError naming the key."""
    where = f"study attr '{RUN_CONFIG_ATTR}' key {key_path}"
    node = config
    for part in key_path.split("."):
        if not isinstance(node, dict):
            raise _bad(where, "a mapping on the way", node)
        if node.get(part) is None:
            return default
        node = node[part]
    if kind is list:
        if not isinstance(node, list) or not all(isinstance(item, str) for item in node):
            raise _bad(where, "a list of names", node)
        return node
    return _of_kind(node, kind, where)


def read_config_history(storage, study_id: int) -> list[dict]:
    """The forced changes of the study's contract, oldest first (`nas.study.contract.history_entry`)."""
    history = storage.get_study_system_attrs(study_id).get(HISTORY_ATTR)
    if history is None:
        return []
    where = f"study attr '{HISTORY_ATTR}'"
    for i, entry in enumerate(_of_kind(history, list, where)):
        changes = _of_kind(entry, dict, f"{where}[{i}]").get("changes", [])
        for j, change in enumerate(_of_kind(changes, list, f"{where}[{i}].changes")):
            if not isinstance(change, dict) or not {"key", "old", "new"} <= change.keys():
                raise _bad(f"{where}[{i}].changes[{j}]", "a mapping of key, old and new", change)
    return history


def read_data_fingerprint(storage, study_id: int) -> dict | None:
    found = storage.get_study_system_attrs(study_id).get(DATA_ATTR)
    return None if found is None else _of_kind(found, dict, f"study attr '{DATA_ATTR}'")


def read_stop_request(storage, study_id: int) -> float | None:
    """When a graceful stop was last asked for (`request_stop`), as a Unix time; None: never."""
    found = storage.get_study_system_attrs(study_id).get(STOP_ATTR)
    return None if found is None else _of_kind(found, float, f"study attr '{STOP_ATTR}'")


def config_of_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> tuple[dict | None, dict | None]:
    """The run config and data fingerprint `trial` was scored under (a forced change may have come since)."""
    storage, study_id = study._storage, study._study_id
    current = read_run_config(storage, study_id)
    version = trial.user_attrs.get(VERSION_ATTR, 0)
    return config_of_version(
        version, current, read_data_fingerprint(storage, study_id), read_config_history(storage, study_id)
    )


def write_run_config(storage, study_id: int, config: dict, fingerprint: dict | None, summary: str) -> None:
    """Store the run config (and data fingerprint) as system attrs, and the one-line summary as the user attr."""
    storage.set_study_system_attr(study_id, RUN_CONFIG_ATTR, config)
    if fingerprint is not None:
        storage.set_study_system_attr(study_id, DATA_ATTR, fingerprint)
    storage.set_study_user_attr(study_id, SUMMARY_ATTR, summary)
    if LEGACY_RUN_CONFIG_ATTR in storage.get_study_user_attrs(study_id):
        engine = rdb_engine(storage)
        if engine is not None:  # an older study: its ~2,000-character user attr moves to the system attr
            with engine.begin() as conn:
                conn.execute(
                    sqlalchemy.text("DELETE FROM study_user_attributes WHERE study_id = :study AND key = :key"),
                    {"study": study_id, "key": LEGACY_RUN_CONFIG_ATTR},
                )


def request_stop(storage: optuna.storages.BaseStorage | str, study_name: str) -> None:
    """Ask every worker of a study to stop after its current trial (the dashboard's Stop).

    Kept in the storage, so it reaches workers on any machine and outlives the process that asked;
    a worker started after the request ignores it (see `nas.study.stopping.StopOnRequest`), so Resume needs
    no clearing step.
    """
    store = storage_of(storage) if isinstance(storage, str) else storage
    store.set_study_system_attr(store.get_study_id_from_name(study_name), STOP_ATTR, time.time())


def read_cell(attrs: dict, study_name: str) -> dict | None:
    """A study's COMPARE_CELL_ATTR as nas-compare writes it ({factors: [name], levels: {name: label}}); None: no cell.

    Any writer of the storage can write another shape: that is a StoredAttrError naming the study."""
    cell = attrs.get(COMPARE_CELL_ATTR)
    if cell is None:
        return None
    factors, levels = (cell.get("factors"), cell.get("levels")) if isinstance(cell, dict) else (None, None)
    if not (
        isinstance(factors, list)
        and all(isinstance(f, str) for f in factors)
        and isinstance(levels, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in levels.items())
    ):
        raise _bad(
            f"study '{study_name}': study attr '{COMPARE_CELL_ATTR}'", "{factors: [name], levels: {name: level}}", cell
        )
    return cell


def read_reevaluation(attrs: dict, study_name: str) -> dict:
    """A cell's COMPARE_REEVAL_ATTR ({trial: n, seeds: {seed: {cv_loss, cv_accuracy} | {failed}}}), checked;
    {} when absent."""
    stored = attrs.get(COMPARE_REEVAL_ATTR, {})
    seeds = stored.get("seeds") if isinstance(stored, dict) else None
    good = (
        isinstance(seeds, dict)
        and isinstance(stored.get("trial"), int)
        and all(
            isinstance(r, dict)
            and (
                isinstance(r.get("failed"), str)
                or (isinstance(r.get("cv_loss"), (int, float)) and isinstance(r.get("cv_accuracy"), (int, float)))
            )
            for r in seeds.values()
        )
    )
    if stored and not good:
        raise _bad(
            f"study '{study_name}': study attr '{COMPARE_REEVAL_ATTR}'", "{trial: N, seeds: {seed: scores}}", stored
        )
    return stored
