"""Background processes the dashboard starts: `nas-search --resume` workers and `nas-export` jobs.

Every command is an argument list (never a shell string). Workers run in their own session so
they outlive the dashboard (a dashboard restart leaves searches running; Stop still reaches them
through the storage). Logs and exports live under the dashboard's work dir.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

EXPORT_FILES = ("model.ts", "model.pt2", "weights.pt", "model.json")


def nas_command(name: str, *args: str) -> list[str]:
    """`python -m nas NAME ARGS…` with this interpreter, so workers use the dashboard's environment."""
    return [sys.executable, "-m", "nas", name, *args]


def safe_name(text: str) -> str:
    """A file-name fragment for a study name (names are checked against the storage before this)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:80] or "study"


@dataclass
class Job:
    """One started process and its log."""

    kind: str  # "search" or "export"
    study: str
    process: subprocess.Popen
    log: Path
    out: Path | None = None
    started: float = field(default_factory=time.time)

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    @property
    def status(self) -> str:
        code = self.process.poll()
        if code is None:
            return "running"
        if self.kind == "export":
            return "done" if code == 0 and self.out is not None and (self.out / "model.json").exists() else "failed"
        return "exited" if code == 0 else f"exited with code {code}"

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
        return {"kind": self.kind, "id": self.out.name if self.out else None, "status": self.status, "pid": self.process.pid,
                "exit_code": self.process.poll(), "files": self.files(), "started": self.started,
                "started_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))}


class Workers:
    """The processes this dashboard started, by study; thread-safe (requests run in threads)."""

    def __init__(self, storage_url: str, workdir: Path):
        self.storage_url, self.workdir = storage_url, Path(workdir)
        self.lock = threading.Lock()
        self.searches: dict[str, Job] = {}
        self.exports: dict[str, list[Job]] = {}

    def _start(self, command: list[str], log: Path) -> subprocess.Popen:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as sink:
            return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT,
                                    start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})  # a live log

    def search_alive(self, study: str) -> bool:
        return self.live_search_started(study) is not None

    def live_search_started(self, study: str) -> float | None:
        """When the worker this dashboard started on the study began, if it is still alive."""
        with self.lock:
            job = self.searches.get(study)
            return job.started if job is not None and job.alive else None

    def start_search(self, study: str, trials: int | None = None) -> Job:
        """Start `nas-search --resume` on the study (the caller has checked that none runs)."""
        args = ["--resume", "--study", study, "--storage", self.storage_url, "--no-progress"]
        if trials is not None:
            args += ["--trials", str(trials)]
        stamp = time.strftime("%Y%m%d-%H%M%S")
        log = self.workdir / "logs" / f"{safe_name(study)}-{stamp}-{time.monotonic_ns() % 10**6}.log"
        with self.lock:
            job = Job("search", study, self._start(nas_command("search", *args), log), log)
            self.searches[study] = job
        return job

    def search_job(self, study: str) -> Job | None:
        with self.lock:
            return self.searches.get(study)

    def start_export(self, study: str, study_id: int, trial: int | None = None) -> Job:
        """Export a trial (default the best) into a fresh folder under `workdir/exports/`."""
        job_id = f"{study_id}-{'best' if trial is None else f'trial{trial}'}-{time.strftime('%Y%m%d-%H%M%S')}-{time.monotonic_ns() % 10**6}"
        out = self.workdir / "exports" / job_id
        args = ["--study", study, "--storage", self.storage_url, "--out", str(out)]
        if trial is not None:
            args += ["--trial", str(trial)]
        with self.lock:
            job = Job("export", study, self._start(nas_command("export", *args), out.with_suffix(".log")), out.with_suffix(".log"), out)
            self.exports.setdefault(study, []).append(job)
        return job

    def export_jobs(self, study: str) -> list[Job]:
        with self.lock:
            return list(self.exports.get(study, []))

    def export_job(self, study: str, job_id: str) -> Job | None:
        return next((j for j in self.export_jobs(study) if j.out is not None and j.out.name == job_id), None)

    def export_running(self, study: str) -> bool:
        return any(j.alive for j in self.export_jobs(study))

    def stop_all(self, timeout: float = 10.0) -> None:
        """Used by tests and on request: end our children (SIGTERM: their trial is failed as interrupted)."""
        with self.lock:
            jobs = [*self.searches.values(), *(j for js in self.exports.values() for j in js)]
        for job in jobs:
            if job.alive:
                job.process.terminate()
        for job in jobs:
            try:
                job.process.wait(timeout)
            except subprocess.TimeoutExpired:
                job.process.kill()
