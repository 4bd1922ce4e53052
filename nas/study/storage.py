"""Opening Optuna storage and what bnnas keeps in it: the shared pieces of every command (no torch here).

A study holds, besides Optuna's trials:
  study system attrs  `nas:run_config` (the run config the study was last trained with, space inline),
                      `nas:data` (the fingerprint of the data it was searched on), `nas:config_history`
                      (forced changes), `nas:stop_requested_at`, and one `nas:worker:...` record per live worker;
  study user attr     `bnnas`: one short line, so `optuna studies` stays readable;
  trial user attrs    the score (`nas.study.run.SCORE_ATTRS`), `arch`, `worker`, `duplicate_of`, `fail_reason`,
                      `config_version`.
Studies written before these names kept the run config in the user attr `run_config`; it is still read.
Any process that can write the storage can write any attribute: the readers below check the type of
what they return, and one of another type is a StoredAttrError naming the attribute and what was expected.
A repeated proposal (`duplicate_of`) is a FAIL trial, so that no sampler or pruner counts it (`nas.study.duplicates`);
studies written before kept repeats COMPLETE or PRUNED, which `counts_toward_budget` still tells apart.
"""

from __future__ import annotations

import os
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import optuna
import sqlalchemy
from optuna.trial import TrialState
from sqlalchemy.exc import IntegrityError, ProgrammingError

from nas.study.contract import VERSION_ATTR, config_of_version
from nas.errors import ConfigError, StudyError
from nas.validation import check_scalar, type_name
from nas.study.storage_proxy import PROXY_SCHEMES, grpc_proxy

SQLITE = "sqlite:///"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)  # finished states; see `counts_toward_budget`
STOP_ATTR = "nas:stop_requested_at"  # study system attribute: when a graceful stop was last asked for
RUN_CONFIG_ATTR = "nas:run_config"
DATA_ATTR = "nas:data"
HISTORY_ATTR = "nas:config_history"
SUMMARY_ATTR = "bnnas"  # the study user attr `optuna studies` shows
LEGACY_RUN_CONFIG_ATTR = "run_config"  # user attr of studies written before RUN_CONFIG_ATTR
DUPLICATE_ATTR = "duplicate_of"  # trial user attr: the proposal repeated this tried trial's parameters
FAIL_REASON_ATTR = "fail_reason"
INTERRUPTED = "interrupted"  # the fail reason of a trial stopped by SIGINT / SIGTERM: no fault of its candidate


# trial user attrs bnnas writes and reads back, by the type they hold (`float` also takes an int)
TRIAL_ATTR_KINDS = {"arch": dict, "cv_accuracy": float, "cv_loss_std": float, "params": int, "train_seconds": float,
                    FAIL_REASON_ATTR: str, DUPLICATE_ATTR: int, VERSION_ATTR: int, "pruned_at_step": int}


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


def sqlite_path(url: str) -> Path | None:
    """The file of a local SQLite URL, or None for other URLs and in-memory databases."""
    if not url.startswith(SQLITE):
        return None
    name = url[len(SQLITE):].split("?", 1)[0]
    return None if name in ("", ":memory:") else Path(name).expanduser()


@contextmanager
def quiet_optuna(level: int = optuna.logging.WARNING):
    """Optuna's INFO lines (study created, trial finished) would interleave with our own output."""
    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(level)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(before)


def engine_options(url: str) -> dict:
    """SQLAlchemy options for an RDB storage: SQLite waits up to a minute for a lock instead of failing
    with "database is locked"; a server connection is checked before use."""
    return {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}


RDB_SCHEMES = ("sqlite", "postgresql", "mysql")  # URL prefixes of Optuna's RDB storage


def storage_of(url: str) -> optuna.storages.BaseStorage:
    """Any storage URL Optuna takes, or a grpc:// (grpcs://) proxy."""
    return grpc_proxy(url, "--storage") if url.startswith(PROXY_SCHEMES) else optuna.storages.get_storage(url)


def make_storage(url: str, heartbeat_seconds: float, retries: int) -> optuna.storages.BaseStorage | str:
    """RDB storage (SQLite, PostgreSQL, MySQL) with heartbeats, a busy timeout and crash retries.

    A trial whose process died stops beating; after twice the interval Optuna fails it and
    RetryHeartbeatStaleTrialCallback enqueues its parameters again.
    """
    if url.startswith(PROXY_SCHEMES):
        return grpc_proxy(url)
    if not url.startswith(RDB_SCHEMES):
        return url  # journal files and the like: Optuna resolves them
    engine = engine_options(url)
    for attempt in range(5):
        try:
            with quiet_optuna(), warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats and retries
                return optuna.storages.RDBStorage(
                    url,
                    engine_kwargs=engine,
                    heartbeat_interval=max(1, round(heartbeat_seconds)),
                    grace_period=max(2, round(2 * heartbeat_seconds)),
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=retries),
                )
        except (IntegrityError, ProgrammingError):
            # A fresh PostgreSQL / MySQL database: workers starting together race to create
            # Optuna's tables; the loser sees the winner's committed schema on the next try.
            if attempt == 4:
                raise


def check_writable_sqlite(url: str, what: str = "study.storage") -> None:
    """Refuse a SQLite file (or its folder) that cannot be written before anything is tried on it.

    SQLite itself finds out only at the first write, deep in a transaction, with a misleading
    message; a file without write permission bits is read-only here even for root.
    """
    path = sqlite_path(url)
    if path is None or not path.exists():
        return
    if not path.is_file():
        raise StudyError(f"{what}: {path} is not a file")
    if not (path.stat().st_mode & 0o222) or not os.access(path, os.W_OK):
        raise StudyError(f"{what}: the SQLite file {path} is read-only; make it writable (chmod u+w) or use another --storage")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise StudyError(f"{what}: the folder {path.parent} is not writable (SQLite writes its journal beside {path.name})")


def rdb_engine(storage) -> "sqlalchemy.engine.Engine | None":
    """The SQLAlchemy engine of an RDB storage (also when Optuna wrapped it in its cache), else None."""
    return getattr(storage, "engine", None) or getattr(getattr(storage, "_backend", None), "engine", None)


def delete_study_system_attr(storage, study_id: int, key: str) -> None:
    """Remove a study system attribute; Optuna has no call for it, so RDB storage gets one DELETE.

    Other storages keep the key with the value None, which every reader here skips.
    """
    engine = rdb_engine(storage)
    if engine is None:
        storage.set_study_system_attr(study_id, key, None)
        return
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text("DELETE FROM study_system_attributes WHERE study_id = :study AND key = :key"),
                     {"study": study_id, "key": key})


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
    return config_of_version(version, current, read_data_fingerprint(storage, study_id), read_config_history(storage, study_id))


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
                conn.execute(sqlalchemy.text("DELETE FROM study_user_attributes WHERE study_id = :study AND key = :key"),
                             {"study": study_id, "key": LEGACY_RUN_CONFIG_ATTR})


def one_line(exc: BaseException) -> str:
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return first or type(exc).__name__


def load_existing_study(storage: str, study_name: str) -> optuna.Study:
    """Load a study that must exist; otherwise a StudyError naming the studies that do.

    A missing SQLite file is reported, not created (opening it would make an empty database).
    """
    path = sqlite_path(storage)
    if path is not None and not path.exists():
        raise StudyError(f"--study: no study named '{study_name}' in {storage} (the file {path} does not exist)")
    try:
        with quiet_optuna():
            store = storage_of(storage)
            names = optuna.get_all_study_names(store)
    except StudyError:
        raise
    except Exception as exc:  # noqa: BLE001 - any storage failure is the user's URL or file
        raise StudyError(f"--storage: cannot read study '{study_name}' from {storage}: {one_line(exc)}") from None
    if study_name not in names:
        known = ", ".join(sorted(names)) or "none"
        raise StudyError(f"--study: no study named '{study_name}' in {storage} (studies there: {known})")
    return optuna.load_study(study_name=study_name, storage=store)


def request_stop(storage: optuna.storages.BaseStorage | str, study_name: str) -> None:
    """Ask every worker of a study to stop after its current trial (the dashboard's Stop).

    Kept in the storage, so it reaches workers on any machine and outlives the process that asked;
    a worker started after the request ignores it (see `nas.study.run.StopOnRequest`), so Resume needs
    no clearing step.
    """
    store = storage_of(storage) if isinstance(storage, str) else storage
    store.set_study_system_attr(store.get_study_id_from_name(study_name), STOP_ATTR, time.time())
