"""A throwaway PostgreSQL server for the tests (installed with apt-get when missing and running as root)."""

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest


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


def postgres_server():
    """A throwaway PostgreSQL server on 127.0.0.1; yields `new_database()`, which makes an empty database and
    returns its SQLAlchemy URL. One server serves the whole session (starting one costs seconds)."""
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
        options = (
            f"-c listen_addresses=127.0.0.1 -p {port} -k {sock} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        run("pg_ctl", "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60", "start", timeout=90)
        started = True
        names = iter(range(1, 10_000))

        def new_database() -> str:
            name = f"bnnas{next(names)}"
            run("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", name)
            return f"postgresql+psycopg2://postgres@127.0.0.1:{port}/{name}"

        yield new_database
    except subprocess.CalledProcessError as exc:
        server_log = log.read_text() if log.exists() else ""
        pytest.fail(f"{exc.cmd} failed ({exc.returncode}):\n{exc.stdout}\n{exc.stderr}\n{server_log}")
    finally:
        if started:
            run("pg_ctl", "-D", str(data), "-m", "fast", "-w", "-t", "60", "stop", timeout=90)
        shutil.rmtree(base, ignore_errors=True)
