"""Background processes the dashboard starts: `nas-search --resume` workers and `nas-export` jobs.

Every command is an argument list (never a shell string), each option with its value in one
argument (`--study=NAME`), so no study name can pass for an option. Workers run in their own
session so they outlive the dashboard (a dashboard restart leaves searches running; Stop still
reaches them through the storage). Logs and exports live under the dashboard's work dir, each
job with a record beside its log (`ID.json`), so a restarted dashboard lists them again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from nas.dashboard.security import OLD_TOKEN_ENV, TOKEN_ENV
from nas.output import atomic_write_text
from nas.study import workers as liveness

EXPORT_FILES = ("model.ts", "model.pt2", "model.onnx", "weights.pt", "model.json")
RECORD_FIELDS = ("id", "kind", "study", "study_id", "pid", "started", "budget", "exit_code", "process")


def nas_command(name: str, *args: str) -> list[str]:
    """`python -m nas NAME ARGS…` with this interpreter, so workers use the dashboard's environment."""
    return [sys.executable, "-m", "nas", name, *args]


def last_line(text: str) -> str:
    """The last non-blank line of a log: where a worker that failed says why."""
    return next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "")


@dataclass
class Job:
    """One started process, its log and (exports) its output folder, recorded in `<log>.json`."""

    id: str
    kind: str  # "search" or "export"
    study: str
    study_id: int
    pid: int
    started: float  # launch time, seconds since the epoch (a stop request from then on is for this worker)
    log: Path
    out: Path | None = None
    budget: int | None = None  # the budget a search was started with (None: the stored one)
    exit_code: int | None = None
    process: dict | None = None  # liveness.Identity of the process: tells a restarted dashboard whether it still runs
    popen: subprocess.Popen | None = field(default=None, repr=False)  # only in the dashboard that started it

    @property
    def record(self) -> Path:
        return self.log.with_suffix(".json")

    def save(self) -> None:
        data = {key: getattr(self, key) for key in RECORD_FIELDS} | {
            "log": self.log.name,
            "out": self.out.name if self.out else None,
        }
        atomic_write_text(self.record, json.dumps(data))  # two threads may record one exit

    @classmethod
    def load(cls, record: Path) -> Job | None:
        """A job recorded by this or an earlier dashboard (None: not a job record)."""
        try:
            data = json.loads(record.read_text())
            return cls(
                str(data["id"]),
                str(data["kind"]),
                str(data["study"]),
                int(data["study_id"]),
                int(data["pid"]),
                float(data["started"]),
                record.parent / str(data["log"]),
                record.parent / str(data["out"]) if data.get("out") else None,
                data.get("budget"),
                data.get("exit_code"),
                data.get("process"),
            )
        except (OSError, ValueError, TypeError, KeyError):
            return None

    def poll(self) -> int | None:
        """The exit code once the process ended (recorded when this dashboard sees it end)."""
        if self.exit_code is None and self.popen is not None:
            code = self.popen.poll()
            if code is not None:
                self.exit_code = code
                self.save()
        return self.exit_code

    @property
    def started_here(self) -> bool:
        """Started by this dashboard process (not an earlier one on the same work dir)."""
        return self.popen is not None

    @property
    def alive(self) -> bool:
        if self.popen is not None:
            return self.poll() is None
        # started by an earlier dashboard: alive while its process (same pid and start time) runs here
        identity = liveness.Identity.from_dict(self.process)
        return self.exit_code is None and identity is not None and liveness.running_here(identity)

    @property
    def status(self) -> str:
        if self.alive:
            return "running"
        code = self.poll()
        if self.kind == "export":
            return (
                "done"
                if self.out is not None and (self.out / "model.json").exists() and code in (0, None)
                else "failed"
            )
        if code is None:
            return "ended (started by an earlier dashboard)"
        return "exited" if code == 0 else f"exited with code {code}"

    @property
    def failed(self) -> bool:
        return not self.alive and self.poll() not in (0, None)

    def files(self) -> list[str]:
        if self.status != "done":
            return []
        return [name for name in EXPORT_FILES if (self.out / name).is_file()]

    def log_tail(self, limit: int = 8000) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return text[-limit:]

    def as_dict(self) -> dict:
        return {
            "kind": self.kind,
            "id": self.id,
            "status": self.status,
            "pid": self.pid,
            "exit_code": self.poll(),
            "failed": self.failed,
            "last_line": last_line(self.log_tail(4000)) if self.failed else "",
            "files": self.files(),
            "started": self.started,
            "budget": self.budget,
            "started_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started)),
        }


class Workers:
    """The processes this dashboard (and earlier ones on its work dir) started; thread-safe (requests run
    in threads)."""

    def __init__(self, storage_url: str, workdir: Path):
        self.storage_url, self.workdir = storage_url, Path(workdir)
        self.lock = threading.Lock()
        self.jobs: list[Job] = [
            job
            for folder in ("logs", "exports")
            for record in sorted((self.workdir / folder).glob("*.json"))
            if (job := Job.load(record)) is not None
        ]
        self.jobs.sort(key=lambda j: j.started)

    def _start(self, job: Job, command: list[str]) -> Job:
        job.log.parent.mkdir(parents=True, exist_ok=True)
        env = {
            key: value for key, value in os.environ.items() if key not in (TOKEN_ENV, OLD_TOKEN_ENV)
        }  # workers need no dashboard secret
        with open(job.log, "ab") as sink:
            job.popen = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**env, "PYTHONUNBUFFERED": "1"},
            )  # a live log
        job.pid = job.popen.pid
        try:
            job.process = liveness.process_identity(job.pid).as_dict()
        except psutil.Error:  # it ended already: its exit code tells
            job.process = None
        job.save()
        with self.lock:
            self.jobs.append(job)
        return job

    def _of(self, study: str, study_id: int, kind: str) -> list[Job]:
        with self.lock:
            return [j for j in self.jobs if (j.study, j.study_id, j.kind) == (study, study_id, kind)]

    def search_job(self, study: str, study_id: int) -> Job | None:
        """The latest search started here on the study."""
        jobs = self._of(study, study_id, "search")
        return jobs[-1] if jobs else None

    def search_jobs(self, study: str, study_id: int) -> list[Job]:
        return self._of(study, study_id, "search")

    def running_searches(self) -> list[str]:
        with self.lock:
            jobs = list(self.jobs)
        return [j.study for j in jobs if j.kind == "search" and j.started_here and j.alive]

    def start_search(self, study: str, study_id: int, trials: int | None = None) -> Job:
        """Start `nas-search --resume` on the study (the caller has checked that none runs)."""
        launched = time.time()
        job_id = f"{study_id}-search-{time.strftime('%Y%m%d-%H%M%S')}-{time.monotonic_ns() % 10**6}"
        args = [
            "--resume",
            f"--study={study}",
            f"--storage={self.storage_url}",
            "--no-progress",
            f"--launched-at={launched!r}",
        ]
        if trials is not None:
            args.append(f"--trials={trials}")
        job = Job(
            job_id, "search", study, study_id, 0, launched, self.workdir / "logs" / f"{job_id}.log", budget=trials
        )
        return self._start(job, nas_command("search", *args))

    def start_export(self, study: str, study_id: int, trial: int | None = None) -> Job:
        """Export a trial (default the best) into a fresh folder under `workdir/exports/`."""
        job_id = (
            f"{study_id}-{'best' if trial is None else f'trial{trial}'}-"
            f"{time.strftime('%Y%m%d-%H%M%S')}-{time.monotonic_ns() % 10**6}"
        )
        out = self.workdir / "exports" / job_id
        args = [f"--study={study}", f"--storage={self.storage_url}", f"--out={out}"]
        if trial is not None:
            args.append(f"--trial={trial}")
        job = Job(job_id, "export", study, study_id, 0, time.time(), out.with_suffix(".log"), out)
        return self._start(job, nas_command("export", *args))

    def export_jobs(self, study: str, study_id: int) -> list[Job]:
        return self._of(study, study_id, "export")

    def job(self, study: str, study_id: int, kind: str, job_id: str) -> Job | None:
        return next((j for j in self._of(study, study_id, kind) if j.id == job_id), None)

    def export_running(self, study: str, study_id: int) -> bool:
        return any(j.alive for j in self.export_jobs(study, study_id))
