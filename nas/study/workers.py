"""Who works on a study and whether they still live: worker records and same-host reclaim of dead trials.

Optuna's heartbeat finds a dead worker only after twice its interval, and sees nothing of a
worker that is still loading data or opening the study. So every `nas-search` process
  - keeps a record in the study (`nas:worker:HOST:PID:START`: host, pid, process start, last beat),
    written as soon as the study exists, beaten every heartbeat interval, removed at exit and
    stale after twice the interval (a kill -9 leaves it behind; readers skip it);
  - writes the same identity on each trial it runs (trial user attr `worker`), so that a process
    on the same host can tell at once that the trial's process is gone and fail (and retry) it.
A process id means something only on its own machine and pid namespace, and only together with
the process's start time (pids are reused): trials of other hosts are left to the heartbeat.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

import optuna
import psutil
from optuna.trial import TrialState

from nas.study.schema import FAIL_REASON_ATTR, WORKER_ATTR, WORKER_PREFIX
from nas.study.storage import delete_study_system_attr


@dataclass(frozen=True)
class Identity:
    """A process, named so that another process can tell whether it still runs."""

    host: str
    pid: int
    started: float  # process start, seconds since the epoch
    pid_space: str  # boot and pid namespace: pids compare only within one
    ticks: int | None = None  # process start in clock ticks since boot (Linux): unmoved by wall-clock steps

    @property
    def key(self) -> str:
        return f"{WORKER_PREFIX}{self.host}:{self.pid}:{self.started:.2f}"

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data) -> Identity | None:
        if not isinstance(data, dict):
            return None
        try:
            ticks = data.get("ticks")
            return cls(
                str(data["host"]),
                int(data["pid"]),
                float(data["started"]),
                str(data.get("pid_space", "")),
                None if ticks is None else int(ticks),
            )
        except (KeyError, TypeError, ValueError):
            return None

    def describe(self) -> str:
        return f"{self.host} pid {self.pid}"


@cache
def _pid_space() -> str:
    """This machine's boot and pid namespace (Linux); empty elsewhere, where only the host name is known."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return ""


def current() -> Identity:
    """This process (asked anew after a fork: the child is another process)."""
    return _identity(os.getpid())


@cache
def _identity(pid: int) -> Identity:
    return process_identity(pid)


def process_identity(pid: int) -> Identity:
    """A process of this machine (not cached: another process's pid may be reused later)."""
    return Identity(socket.gethostname(), pid, psutil.Process(pid).create_time(), _pid_space(), start_ticks(pid))


def start_ticks(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot (/proc/PID/stat field 22); None where unknown.

    psutil's create_time is boot time + these ticks, and the boot time it reads moves when the wall clock is
    stepped (NTP, a VM resumed): a running process then looks started seconds later than it was recorded."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def running_here(other: Identity) -> bool:
    """True only when `other` shares this pid space and its process still runs (same pid, same start)."""
    me = current()
    return (other.host, other.pid_space) == (me.host, me.pid_space) and not known_dead(other)


def known_dead(other: Identity) -> bool:
    """True only when `other` shares this pid space and its process is gone (or the pid was reused)."""
    me = current()
    if (other.host, other.pid_space) != (me.host, me.pid_space):
        return False  # another machine or container: only its heartbeat can tell
    try:
        started = psutil.Process(other.pid).create_time()
        ticks = start_ticks(other.pid) if other.ticks is not None else None
        return ticks != other.ticks if ticks is not None else abs(started - other.started) > 0.5
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:  # exists, but not ours to inspect
        return False


# --- trials ------------------------------------------------------------------------------


def mark_trial(trial: optuna.Trial) -> None:
    """Record which process runs this trial (read by `reclaim_dead_trials` on the same host)."""
    trial.set_user_attr(WORKER_ATTR, current().as_dict())


def reclaim_dead_trials(study: optuna.Study, grace_seconds: float | None = None, retries: int = 1) -> list[int]:
    """Fail, at once, the RUNNING trials whose process is known dead; retry them as the heartbeat would.

    Known dead: on this host, its process is gone. On a storage without Optuna's heartbeat (the
    gRPC proxy) and with `grace_seconds`, also a process on another host whose worker record has
    not beaten for that long, or is gone: the record is the only beat such a storage carries.
    Returns the numbers of the trials failed here. The retry is Optuna's own
    (`RetryHeartbeatStaleTrialCallback`, `study.retries`), so a retried trial looks the same
    whichever way its worker's death was found.
    """
    storage, reclaimed = study._storage, []
    beats = heartbeat_less(storage) and grace_seconds is not None
    records = storage.get_study_system_attrs(study._study_id) if beats else {}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = Identity.from_dict(trial.user_attrs.get(WORKER_ATTR))
        if owner is None:
            continue
        if known_dead(owner):
            reason = f"worker process gone ({owner.describe()}); reclaimed on its host"
        elif beats and not running_here(owner) and silent(records.get(owner.key), grace_seconds):
            reason = (
                f"worker silent for over {grace_seconds:g} s ({owner.describe()}); its worker record stopped beating"
            )
        else:
            continue
        try:
            storage.set_trial_user_attr(trial._trial_id, FAIL_REASON_ATTR, reason)
            if not storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker reclaimed it first
        reclaimed.append(trial.number)
        retry = getattr(storage, "get_heartbeat_stale_trial_callback", lambda: None)()
        if retry is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=retries)
        retry(study, storage.get_trial(trial._trial_id))
    return reclaimed


def heartbeat_less(storage) -> bool:
    """Whether Optuna's heartbeat cannot find this storage's dead trials (the gRPC proxy has none)."""
    return getattr(storage, "get_heartbeat_interval", lambda: None)() is None


def silent(record, grace_seconds: float) -> bool:
    """A worker record that is gone, or whose last beat is older than `grace_seconds`."""
    beat = record.get("beat") if isinstance(record, dict) else None
    return not isinstance(beat, (int, float)) or time.time() - beat > grace_seconds


# --- worker records ------------------------------------------------------------------------


@dataclass(frozen=True)
class LiveWorker:
    identity: Identity
    beat: float  # last beat, seconds since the epoch (the worker's clock)


def live_workers(storage, study_id: int, grace_seconds: float, now: float | None = None) -> list[LiveWorker]:
    """The study's worker records that beat within `grace_seconds` and whose process is not known dead."""
    now = time.time() if now is None else now
    found = []
    for key, value in storage.get_study_system_attrs(study_id).items():
        if not key.startswith(WORKER_PREFIX) or not isinstance(value, dict):
            continue
        identity, beat = Identity.from_dict(value), value.get("beat")
        if identity is None or not isinstance(beat, (int, float)) or now - beat > grace_seconds or known_dead(identity):
            continue
        found.append(LiveWorker(identity, float(beat)))
    return sorted(found, key=lambda w: w.identity.started)


def describe_workers(workers: list[LiveWorker], now: float | None = None) -> str:
    """`vm pid 4242 (started 12:00:01 UTC, last beat 3 s ago)`, joined by `; `."""
    now = time.time() if now is None else now
    return "; ".join(
        f"{w.identity.describe()} (started {time.strftime('%H:%M:%S UTC', time.gmtime(w.identity.started))}, "
        f"last beat {max(0, round(now - w.beat))} s ago)"
        for w in workers
    )


class WorkerRecord:
    """This process's record in a study while it works on it: written, beaten, removed at exit.

    `attach(storage, study_id)` writes it (again attaching is a no-op); a daemon thread rewrites
    the beat every `interval` seconds; `close()` stops the thread and deletes the record.
    """

    def __init__(self, interval: float):
        self.interval, self.identity = interval, current()
        self.storage, self.study_id = None, None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def attached(self) -> bool:
        return self.storage is not None

    def attach(self, storage, study_id: int) -> None:
        if self.attached:
            return
        self.storage, self.study_id = storage, study_id
        self._beat()
        self._thread = threading.Thread(target=self._run, name="nas-worker-record", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        self.storage.set_study_system_attr(
            self.study_id, self.identity.key, {**self.identity.as_dict(), "beat": time.time()}
        )

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._beat()
            except Exception:  # noqa: BLE001 - a missed beat (a locked database) is retried at the next one
                pass

    def close(self) -> None:
        if not self.attached:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            delete_study_system_attr(self.storage, self.study_id, self.identity.key)
        except Exception:  # noqa: BLE001 - never mask why we exit; a left record goes stale by itself
            pass
        self.storage = None

    def __enter__(self) -> WorkerRecord:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
