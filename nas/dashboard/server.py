"""Open the storage, put the apps together behind the Guard, and serve them on threads.

A threaded server so a slow page (a large study) never blocks polling or a Stop.
"""

from __future__ import annotations

import socketserver
import sys
import threading
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import optuna
from sqlalchemy.exc import SQLAlchemyError

from nas.dashboard.app import create_app
from nas.dashboard.optuna_mount import OptunaMount
from nas.dashboard.security import Guard, allowed_hosts, require_token_beyond_loopback
from nas.dashboard.workers import Workers
from nas.errors import NasError, StudyError
from nas.storage import one_line, quiet_optuna, sqlite_path

OPTUNA_PREFIX = "/optuna"


class ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a hanging browser connection never keeps the process alive
    allow_reuse_address = True


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - wsgiref's signature
        pass  # polling would flood the terminal; errors still reach stderr


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """The storage the dashboard reads: a missing SQLite file is refused, not created."""
    path = sqlite_path(url)
    if path is not None and not path.is_file():
        raise StudyError(f"--storage: {path} does not exist (start a search with nas-search first)")
    try:
        with quiet_optuna():
            if url.startswith(("sqlite", "postgresql", "mysql")):
                # SQLite: wait for a search's write lock instead of failing a page (or the search)
                engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
                storage = optuna.storages.RDBStorage(url, engine_kwargs=engine, skip_table_creation=True)
            else:
                storage = optuna.storages.get_storage(url)
            storage.get_all_studies()
    except (ImportError, ValueError, SQLAlchemyError, RuntimeError) as exc:
        raise StudyError(f"--storage: cannot read {url}: {one_line(exc)}") from None
    return storage


def build(storage_url: str, host: str, token: str | None, workdir: Path, extra_hosts: list[str] = ()):
    """The WSGI app and the worker registry, for a server or a test."""
    require_token_beyond_loopback(host, token)
    storage = open_storage(storage_url)
    workers = Workers(storage_url, workdir)
    guard = Guard(None, allowed_hosts(host, list(extra_hosts)), token)
    ours = create_app(storage, workers, guard.csrf_token)
    mounted = OptunaMount(storage, OPTUNA_PREFIX)

    def dispatch(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == OPTUNA_PREFIX or path.startswith(OPTUNA_PREFIX + "/"):
            return mounted(environ, start_response)
        return ours(environ, start_response)

    guard.app = dispatch
    return guard, workers


def serve(storage_url: str, host: str, port: int, token: str | None, workdir: Path, extra_hosts: list[str] = (),
          ready: threading.Event | None = None) -> None:
    """Serve until Ctrl-C; workers it started keep running (Stop them from a new dashboard)."""
    app, workers = build(storage_url, host, token, Path(workdir), extra_hosts)
    try:
        server = make_server(host, port, app, server_class=ThreadingServer, handler_class=QuietHandler)
    except OSError as exc:
        raise NasError(f"--port: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{server.server_port}/" + (f"?token={token}" if token else "")
    print(f"nas-dashboard on {url} (storage {storage_url}; Ctrl-C to quit)", flush=True)
    if ready is not None:
        ready.set()
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:  # the usual way to quit a server: exit 0
        running = [name for name in list(workers.searches) if workers.search_alive(name)]
        print("dashboard stopped" + (f"; searches still running: {', '.join(running)}" if running else ""), file=sys.stderr)
    finally:
        server.server_close()
