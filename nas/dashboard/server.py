"""Open the storage, put the apps together behind the Guard, and serve them with waitress.

waitress (pure Python, well kept) instead of a server of our own: one asynchronous loop holds
the connections, so an idle or slow client costs a socket, not a thread; a bounded pool of
threads runs the app; idle connections and half-sent requests are closed after a timeout;
request bodies are capped before they are read; IPv4 and IPv6.
"""

from __future__ import annotations

import resource
import sys
import threading
from pathlib import Path

from nas.dashboard.app import create_app
from nas.dashboard.optuna_mount import OptunaMount, mount_problem
from nas.dashboard.security import (
    Guard,
    Sessions,
    allowed_hosts,
    interface_addresses,
    is_wildcard,
    require_token_beyond_loopback,
)
from nas.dashboard.workers import Workers
from nas.errors import NasError
from nas.study.artifacts import existing_store
from nas.study.storage import open_to_read

OPTUNA_PREFIX = "/optuna"
THREADS = 8  # requests served at once; more wait in the queue, their connections held by the loop
MAX_BODY = 1 << 20  # our forms are a few bytes; optuna-dashboard's notes may be longer. Larger: 413, unread
MAX_HEADERS = 64 << 10
IDLE_TIMEOUT = 30  # seconds a connection may sit without sending or receiving a byte
MAX_CONNECTIONS = 4000  # beyond this many open connections new ones wait in the listen backlog
RESERVED_FILES = 200  # file descriptors kept for the storage, logs and worker processes


def connection_limit() -> int:
    """Open connections allowed: as many as the file-descriptor limit leaves room for (raised to its hard cap).

    Running out of descriptors is what froze the old server; waitress stops accepting at this
    limit instead, and serves again once connections close.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = MAX_CONNECTIONS + RESERVED_FILES
    if soft != resource.RLIM_INFINITY and soft < wanted:
        soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return max(1, min(MAX_CONNECTIONS, soft - RESERVED_FILES))


def server_settings(idle_timeout: int = IDLE_TIMEOUT, trusted_proxy: str | None = None) -> dict:
    """waitress's adjustments for the dashboard.

    `trusted_proxy`: the address of the TLS-terminating reverse proxy in front; from it alone an
    `X-Forwarded-Proto: https` is believed (the session cookie is then Secure). Nobody else's is.
    """
    proxy = {"trusted_proxy": trusted_proxy, "trusted_proxy_headers": {"x-forwarded-proto"}} if trusted_proxy else {}
    return {
        "threads": THREADS,
        "connection_limit": connection_limit(),
        "backlog": 1024,
        "channel_timeout": idle_timeout,
        "cleanup_interval": max(1, idle_timeout // 4),  # how often idle connections are looked for
        "max_request_body_size": MAX_BODY,
        "max_request_header_size": MAX_HEADERS,
        "asyncore_use_poll": True,  # select() fails beyond 1024 descriptors
        "ident": "nas-dashboard",
        "clear_untrusted_proxy_headers": True,  # X-Forwarded-* from anyone but the trusted proxy never reach the app
        **proxy,
    }


def app_and_workers(
    storage_url: str,
    host: str,
    token: str | None,
    workdir: Path,
    extra_hosts: list[str] = (),
    sessions: Sessions | None = None,
):
    """The WSGI app and the worker registry, for a server or a test."""
    require_token_beyond_loopback(host, token)
    storage = open_to_read(storage_url)
    workers = Workers(storage_url, workdir)
    guard = Guard(None, allowed_hosts(host, list(extra_hosts)), token, sessions=sessions)
    ours = create_app(storage, workers, guard.csrf_token, logout=token is not None)
    mounted = OptunaMount(storage, OPTUNA_PREFIX, existing_store(storage_url))

    def dispatch(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == OPTUNA_PREFIX or path.startswith(OPTUNA_PREFIX + "/"):
            return mounted(environ, start_response)
        return ours(environ, start_response)

    guard.app = dispatch
    return guard, workers


def printed_address(host: str, port: int, token: str | None) -> str:
    """The address to open: a wildcard bind is shown as one of this machine's addresses, which the Guard allows."""
    if is_wildcard(host):
        outward = [a for a in interface_addresses() if not a.startswith(("127.", "::1", "fe80:"))]
        host = next((a for a in outward if ":" not in a), outward[0] if outward else "127.0.0.1")
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/" + (f"?token={token}" if token else "")


def serve(
    storage_url: str,
    host: str,
    port: int,
    token: str | None,
    workdir: Path,
    extra_hosts: list[str] = (),
    idle_timeout: int = IDLE_TIMEOUT,
    ready: threading.Event | None = None,
    sessions: Sessions | None = None,
    trusted_proxy: str | None = None,
) -> None:
    """Serve until Ctrl-C; workers it started keep running (Stop them from a new dashboard)."""
    from waitress.server import create_server

    app, workers = app_and_workers(storage_url, host, token, Path(workdir), extra_hosts, sessions)
    try:
        server = create_server(app, host=host, port=port, **server_settings(idle_timeout, trusted_proxy))
    except OSError as exc:
        raise NasError(f"--port: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    problem = mount_problem(OPTUNA_PREFIX)
    if problem is not None:  # said once, at start; the Optuna tab then answers 503 with the same line
        print(f"nas-dashboard: {problem}; its pages under {OPTUNA_PREFIX}/ are off", file=sys.stderr)
    print(
        f"nas-dashboard on {printed_address(host, server.effective_port, token)} "
        f"(listening on {host} port {server.effective_port}; storage {storage_url}; Ctrl-C to quit)",
        flush=True,
    )
    if ready is not None:
        ready.set()
    try:
        server.run()  # until Ctrl-C, the usual way to quit a server (waitress returns: exit 0)
    finally:
        server.close()
    running = workers.running_searches()
    print("dashboard stopped" + (f"; searches still running: {', '.join(running)}" if running else ""), file=sys.stderr)
