"""Opening Optuna storage: the shared pieces of `nas-search` and `nas-report` (no torch here)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

import optuna
from optuna.trial import TrialState
from sqlalchemy.exc import IntegrityError, ProgrammingError

from nas.errors import StudyError

SQLITE = "sqlite:///"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)  # what counts against a study's budget
STOP_ATTR = "nas:stop_requested_at"  # study system attribute: when a graceful stop was last asked for


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


def make_storage(url: str, heartbeat_seconds: float, retries: int) -> optuna.storages.BaseStorage | str:
    """RDB storage (SQLite, PostgreSQL, MySQL) with heartbeats, a busy timeout and crash retries.

    A trial whose process died stops beating; after twice the interval Optuna fails it and
    RetryHeartbeatStaleTrialCallback enqueues its parameters again. SQLite waits up to a minute for a
    lock instead of failing with "database is locked" when several workers write.
    """
    if not url.startswith(("sqlite", "postgresql", "mysql")):
        return url  # journal files and the like: Optuna resolves them
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    for attempt in range(5):
        try:
            with quiet_optuna():
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
            store = optuna.storages.get_storage(storage)
            names = optuna.get_all_study_names(store)
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
    store = optuna.storages.get_storage(storage)
    store.set_study_system_attr(store.get_study_id_from_name(study_name), STOP_ATTR, time.time())
