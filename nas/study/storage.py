"""Opening Optuna storage: one route for every command (no torch here).

What the `optuna` CLI and optuna-dashboard take: an RDB URL (SQLite, PostgreSQL, MySQL), a journal file
(a path, not a URL: Optuna's JournalStorage, for file systems where SQLite's locking is unsafe, such as NFS),
or a grpc:// (grpcs://) proxy; each opened through Optuna's public storage classes.
`storage_of` opens one to read; `open_for_search` opens one that a search writes, with heartbeats,
crash retries and a busy timeout, after checking that a SQLite file can be written. What bnnas keeps
in a storage, and reading and writing it, is `nas.study.schema`.
"""

from __future__ import annotations

import logging
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import optuna
import sqlalchemy
from sqlalchemy.exc import IntegrityError, ProgrammingError, SQLAlchemyError

from nas.errors import StudyError, one_line
from nas.output import LOG
from nas.study.storage_proxy import PROXY_SCHEMES, grpc_proxy

SQLITE = "sqlite:///"


def sqlite_path(url: str) -> Path | None:
    """The file of a local SQLite URL, or None for other URLs and in-memory databases."""
    if not url.startswith(SQLITE):
        return None
    name = url[len(SQLITE) :].split("?", 1)[0]
    return None if name in ("", ":memory:") else Path(name).expanduser()


def journal_path(url: str) -> Path | None:
    """The file of a journal storage: a path rather than a URL, as `optuna --storage` and optuna-dashboard take it."""
    return None if "://" in url or not url.strip() else Path(url).expanduser()


def storage_file(url: str) -> Path | None:
    """The local file a storage lives in (SQLite, by URL or bare path, or journal), or None for a server."""
    return sqlite_path(url) or journal_path(url)


def _is_sqlite_file(path: Path) -> bool:
    """An existing SQLite database given as a bare path: optuna-dashboard opens it as one, and so does bnnas."""
    try:
        with path.open("rb") as file:
            return file.read(16) == b"SQLite format 3\0"
    except OSError:
        return False


def _journal(path: Path) -> optuna.storages.JournalStorage:
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


@contextmanager
def quiet_optuna(level: int = optuna.logging.WARNING):
    """Optuna's INFO lines (study created, trial finished) would interleave with ours; -v lets them through."""
    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.INFO if LOG.isEnabledFor(logging.DEBUG) else level)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(before)


def engine_options(url: str) -> dict:
    """SQLAlchemy options for an RDB storage: SQLite waits up to a minute for a lock instead of failing
    with "database is locked"; a server connection is checked before use."""
    return {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}


RDB_SCHEMES = ("sqlite", "postgresql", "mysql")  # URL prefixes of Optuna's RDB storage
URL_FORMS = "sqlite:///FILE, postgresql://..., mysql+pymysql://..., a journal file path, or grpc://HOST:PORT"
RDB_DRIVERS = {"mysql": "mysqlclient (or name another driver: mysql+pymysql://)", "postgresql": "psycopg2-binary"}


def rdb_url(url: str) -> str:
    """The RDB URL a storage string means: itself, or sqlite:/// for a bare path to an existing SQLite file."""
    path = journal_path(url)
    return f"{SQLITE}{path}" if path is not None and _is_sqlite_file(path) else url


def storage_of(url: str, what: str = "--storage") -> optuna.storages.BaseStorage:
    """The storage a URL names, through Optuna's public classes; a string no storage takes is a one-line StudyError."""
    if url.startswith(PROXY_SCHEMES):
        return grpc_proxy(url, what)
    url = rdb_url(url)
    path = journal_path(url)
    if path is not None:
        return _journal(path)
    if not url.startswith(RDB_SCHEMES):
        raise StudyError(f"{what}: cannot open {url}: not a storage bnnas knows ({URL_FORMS})")
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_options(url))
    except ImportError as exc:
        raise StudyError(f"{what}: cannot open {url}: {missing_driver(url, exc)}") from None


def missing_driver(url: str, exc: ImportError) -> str:
    """SQLAlchemy's missing database driver, named with the package that provides it."""
    scheme = url.split(":", 1)[0]
    dialect, _, driver = scheme.partition("+")
    package = driver or RDB_DRIVERS.get(dialect)  # a named driver is, for the common ones, its package's name
    if package is None:
        return f"its database driver is not installed ({one_line(exc)})"
    return f"its database driver is not installed: pip install {package}"


def make_storage(url: str, heartbeat_seconds: float, retries: int) -> optuna.storages.BaseStorage:
    """RDB storage (SQLite, PostgreSQL, MySQL) with heartbeats, a busy timeout and crash retries.

    A trial whose process died stops beating; after twice the interval Optuna fails it and
    RetryHeartbeatStaleTrialCallback enqueues its parameters again.
    """
    if url.startswith(PROXY_SCHEMES):
        return grpc_proxy(url)
    path = journal_path(url)
    if path is not None:  # no heartbeat in a journal: a dead worker's trial is reclaimed by a worker on its host
        return _journal(path)
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


def open_for_search(url: str, heartbeat_seconds: float, retries: int, what: str = "study.storage"):
    """The storage a search writes, refused in one line when it cannot be opened or written.

    The folder of a local SQLite file is created when the folder above it exists, so the default
    `sqlite:///runs/nas.db` just works; a path deeper into nothing is more likely a typo than a plan.
    """
    url = rdb_url(url)
    if not url.startswith(RDB_SCHEMES + PROXY_SCHEMES) and journal_path(url) is None:
        raise StudyError(f"{what}: cannot open {url}: not a storage URL nas-search writes ({URL_FORMS})")
    check_writable_file(url, what)
    path = storage_file(url)
    if path is not None:
        missing = next((p for p in reversed(path.parent.parents) if not p.exists()), None)
        if missing is not None:
            raise StudyError(
                f"{what}: the folder {missing} does not exist; create it, or check the path of {url} for a typo"
            )
        try:
            path.parent.mkdir(exist_ok=True)
        except OSError as exc:
            raise StudyError(f"{what}: cannot create {path.parent}: {exc.strerror or exc}") from None
    for attempt in range(2):
        try:
            with quiet_optuna():
                return make_storage(url, heartbeat_seconds, retries)
        except ImportError as exc:
            raise StudyError(f"{what}: cannot open {url}: {missing_driver(url, exc)}") from None
        except (ValueError, SQLAlchemyError, OSError) as exc:
            if attempt == 0 and "already exists" in str(exc):
                continue  # another worker made the tables of a fresh storage between our check and create: use them
            raise StudyError(f"{what}: cannot open {url}: {one_line(exc)}") from None


def open_to_read(url: str) -> optuna.storages.BaseStorage:
    """A storage to read and steer (the dashboard's): a missing SQLite file is refused, not created.

    An RDB storage is wrapped in Optuna's cache of finished trials (what `optuna.load_study`
    uses), so a page reads only the trials that are new or still running; it creates no tables,
    and SQLite waits for a search's write lock instead of failing a page (or the search).
    """
    url = rdb_url(url)
    path = storage_file(url)
    if path is not None and not path.is_file():
        raise StudyError(f"--storage: {path} does not exist (start a search with nas-search first)")
    try:
        with quiet_optuna():
            if url.startswith(RDB_SCHEMES):
                rdb = optuna.storages.RDBStorage(url, engine_kwargs=engine_options(url), skip_table_creation=True)
                storage = optuna.storages.get_storage(rdb)
            else:
                storage = storage_of(url)
            storage.get_all_studies()
    except (ImportError, ValueError, SQLAlchemyError, RuntimeError, optuna.exceptions.StorageInternalError) as exc:
        raise StudyError(f"--storage: cannot read {url}: {one_line(exc)}") from None
    return storage


def check_writable_file(url: str, what: str = "study.storage") -> None:
    """Refuse a SQLite or journal file (or its folder) that cannot be written before anything is tried on it.

    SQLite itself finds out only at the first write, deep in a transaction, with a misleading
    message; a file without write permission bits is read-only here even for root.
    """
    path = storage_file(url)
    if path is None or not path.exists():
        return
    kind = "SQLite" if sqlite_path(url) else "journal"
    if not path.is_file():
        raise StudyError(f"{what}: {path} is not a file")
    if not (path.stat().st_mode & 0o222) or not os.access(path, os.W_OK):
        raise StudyError(
            f"{what}: the {kind} file {path} is read-only; make it writable (chmod u+w) or use another --storage"
        )
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise StudyError(
            f"{what}: the folder {path.parent} is not writable ({kind} writes its lock or journal beside {path.name})"
        )


def rdb_engine(storage) -> sqlalchemy.engine.Engine | None:
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
        conn.execute(
            sqlalchemy.text("DELETE FROM study_system_attributes WHERE study_id = :study AND key = :key"),
            {"study": study_id, "key": key},
        )


def load_existing_study(storage: str, study_name: str) -> optuna.Study:
    """Load a study that must exist; otherwise a StudyError naming the studies that do.

    A missing SQLite file is reported, not created (opening it would make an empty database).
    """
    path = storage_file(storage)
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
