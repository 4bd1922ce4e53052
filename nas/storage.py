"""Opening Optuna storage and what bnnas keeps in it: the shared pieces of every command (no torch here).

A study holds, besides Optuna's trials:
  study system attrs  `nas:run_config` (the run config the study was last trained with, space inline),
                      `nas:data` (the fingerprint of the data it was searched on), `nas:config_history`
                      (forced changes), `nas:stop_requested_at`, and one `nas:worker:...` record per live worker;
  study user attr     `bnnas`: one short line, so `optuna studies` stays readable;
  trial user attrs    the score (`nas.study.SCORE_ATTRS`), `arch`, `worker`, `duplicate_of`, `fail_reason`,
                      `config_version`.
Studies written before these names kept the run config in the user attr `run_config`; it is still read.
A repeated proposal (`duplicate_of`) is a FAIL trial, so that no sampler or pruner counts it (`nas.novelty`);
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

from nas.contract import VERSION_ATTR, config_of_version
from nas.errors import StudyError
from nas.storage_proxy import PROXY_SCHEMES, grpc_proxy

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
    config = storage.get_study_system_attrs(study_id).get(RUN_CONFIG_ATTR)
    if config is None:
        config = storage.get_study_user_attrs(study_id).get(LEGACY_RUN_CONFIG_ATTR)
    return config if isinstance(config, dict) else None


def read_config_history(storage, study_id: int) -> list[dict]:
    history = storage.get_study_system_attrs(study_id).get(HISTORY_ATTR)
    return history if isinstance(history, list) else []


def read_data_fingerprint(storage, study_id: int) -> dict | None:
    return storage.get_study_system_attrs(study_id).get(DATA_ATTR)


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
    a worker started after the request ignores it (see `nas.study.StopOnRequest`), so Resume needs
    no clearing step.
    """
    store = storage_of(storage) if isinstance(storage, str) else storage
    store.set_study_system_attr(store.get_study_id_from_name(study_name), STOP_ATTR, time.time())
