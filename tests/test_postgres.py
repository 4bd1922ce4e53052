"""Workers on separate machines share one PostgreSQL study: a real server on 127.0.0.1, three nas-search processes."""

import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

SPACE = {
    "stages": 1,
    "width": 8,
    "block": {"norm": {"type": {"choice": ["batch", "none"]}}},
    "training": {"lr": {"float": [0.01, 0.1], "log": True}},
}
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
OVER_BUDGET = "budget already reached by other workers"
STUDY = "pg"


def _pg_bin() -> Path | None:
    """Debian's PostgreSQL binaries (the newest major version installed), or None."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    return Path(found[-1]).parent if found else None


def _install_postgres() -> str | None:
    """Install the server with apt as root; the reason it is unavailable otherwise."""
    if os.geteuid() != 0:
        return "PostgreSQL binaries not found under /usr/lib/postgresql and not root to apt-get install them"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "postgresql"]):
            subprocess.run(cmd, check=True, timeout=600, env=env, capture_output=True, text=True)
    except (OSError, subprocess.SubprocessError) as exc:
        tail = (getattr(exc, "stderr", None) or "").strip().splitlines()[-1:]
        return f"apt-get install postgresql failed: {exc} {' '.join(tail)}".strip()
    return None


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pg_server():
    """A throwaway PostgreSQL server on 127.0.0.1 with an empty database `bnnas`; yields its SQLAlchemy URL."""
    pytest.importorskip("psycopg2", reason="SQLAlchemy's PostgreSQL driver: pip install psycopg2-binary")
    if _pg_bin() is None:
        reason = _install_postgres()
        if reason is not None or _pg_bin() is None:
            pytest.skip(reason or "apt-get installed postgresql but no /usr/lib/postgresql/*/bin/initdb")
    pg_bin = _pg_bin()
    as_root = os.geteuid() == 0
    if as_root and not _has_user("postgres"):
        pytest.skip("running as root, and no `postgres` system user to run the server as (PostgreSQL refuses root)")
    # PostgreSQL refuses to run as root: run it as the `postgres` user the package created, in a folder it owns
    # (under /tmp directly: pytest's own tmp folders are private to root).
    prefix = ["runuser", "-u", "postgres", "--"] if as_root else []
    base = Path(tempfile.mkdtemp(prefix="bnnas-pg-"))
    data, sock, log = base / "data", base / "sock", base / "server.log"
    sock.mkdir()
    if as_root:
        shutil.chown(base, "postgres", "postgres")
        shutil.chown(sock, "postgres", "postgres")
    port = _free_port()

    def run(*cmd: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*prefix, str(pg_bin / cmd[0]), *cmd[1:]], check=True, timeout=timeout, capture_output=True, text=True
        )

    started = False
    try:
        run("initdb", "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {sock} -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        run("pg_ctl", "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60", "start", timeout=90)
        started = True
        run("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "bnnas")
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/bnnas"
    except subprocess.CalledProcessError as exc:
        server_log = log.read_text() if log.exists() else ""
        pytest.fail(f"{exc.cmd} failed ({exc.returncode}):\n{exc.stdout}\n{exc.stderr}\n{server_log}")
    finally:
        if started:
            run("pg_ctl", "-D", str(data), "-m", "fast", "-w", "-t", "60", "stop", timeout=90)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def three_workers(pg_server, tmp_path_factory):
    """Three independent `nas-search` processes (as on three machines) on one PostgreSQL study of 6 trials."""
    run_dir = tmp_path_factory.mktemp("pg_workers")
    (run_dir / "space.yaml").write_text(yaml.safe_dump(SPACE))
    config = {
        "dataset": {"name": "digits"},
        "search_space": "space.yaml",
        "study": {"name": STUDY, "storage": pg_server, "sampler": "tpe", "trials": 6, "seed": 0},
        "evaluation": {"folds": 2, "epochs": 2},
        "device": "cpu",
    }
    (run_dir / "run.yaml").write_text(yaml.safe_dump(config))
    # A fresh database: the three workers also race to create Optuna's tables (nas.study.storage retries that).
    cmd = [sys.executable, "-m", "nas.cli", "--config", "run.yaml", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # three workers share this machine's cores
    procs = [
        subprocess.Popen(cmd, cwd=run_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=300)
            results.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return pg_server, results


def test_three_workers_on_postgres_end_with_exactly_the_budget(three_workers):
    url, results = three_workers
    for code, out, err in results:
        assert code == 0, err
    done = optuna.load_study(study_name=STUDY, storage=url).get_trials()
    assert len([t for t in done if t.state in FINISHED]) == 6
    assert len({t.number for t in done}) == len(done)
    assert not [t for t in done if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert all(t.user_attrs.get("fail_reason") == OVER_BUDGET for t in done if t.state == TrialState.FAIL)
    assert {t.user_attrs.get("arch") is not None for t in done if t.state == TrialState.COMPLETE} == {True}


def test_resume_from_postgres_runs_one_more_trial(three_workers, tmp_path):
    url, _ = three_workers
    # an empty folder: no YAML, the stored run config comes back from PostgreSQL
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "nas.cli",
            "--resume",
            "--study",
            STUDY,
            "--storage",
            url,
            "--trials",
            "7",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "6/7 finished, running 1 more" in proc.stdout
    done = optuna.load_study(study_name=STUDY, storage=url).get_trials()
    assert len([t for t in done if t.state in FINISHED]) == 7
    assert not [t for t in done if t.state in (TrialState.RUNNING, TrialState.WAITING)]
