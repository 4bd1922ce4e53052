"""optuna-dashboard served under a path prefix (`/optuna/`), which it does not support itself.

Its server routes are relative (so WSGI SCRIPT_NAME / PATH_INFO dispatch is enough for them),
but its page and bundle hard-code root paths: `/static/bundle.js`, API calls on an empty base
URL, router paths under `/dashboard`. We serve those two files with exactly those literals rewritten
to the prefix (its CSV links, `/csv/N`, are redirected by the dashboard app); if a future
optuna-dashboard changes them, the mount says so (503 with the reason) instead of showing a broken page.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import importlib.util
import threading
from pathlib import Path

PINNED = "optuna-dashboard>=0.21,<0.22"  # the releases this rewrite is tested with (0.21.0), as pyproject pins them

# literal in the bundle → its replacement, given the prefix (e.g. "/optuna")
BUNDLE_REWRITES = (
    ("}(void 0),", lambda p: f'}}("{p}"),'),  # the API client's base URL: `new class{…}(undefined)`
    ('url_prefix:"/dashboard"', lambda p: f'url_prefix:"{p}/dashboard"'),
)


class PrefixProblem(Exception):
    """optuna-dashboard's assets changed so that the prefix rewrite no longer applies."""


def rewrite_bundle(text: str, prefix: str) -> str:
    for old, new in BUNDLE_REWRITES:
        if old == "}(void 0),":
            # only the occurrence right after the API client class, found by its base-URL setter
            anchor = text.find(".baseURL=(e=>")
            at = text.find(old, anchor) if anchor >= 0 else -1
            if at < 0:
                raise PrefixProblem("optuna-dashboard's API client base URL was not found in its bundle")
            text = text[:at] + new(prefix) + text[at + len(old) :]
            continue
        if text.count(old) != 1:
            raise PrefixProblem(f"optuna-dashboard's bundle no longer contains {old[:40]!r} exactly once")
        text = text.replace(old, new(prefix))
    return text


def assets_folder() -> Path:
    """optuna-dashboard's installed files, found without importing it (that takes seconds)."""
    spec = importlib.util.find_spec("optuna_dashboard")
    if spec is None or spec.origin is None:
        raise PrefixProblem("optuna-dashboard is not installed")
    return Path(spec.origin).parent


def prefixed_assets(assets: Path, prefix: str) -> tuple[bytes, bytes]:
    """optuna-dashboard's index.html and bundle.js with their root paths moved under `prefix`; PrefixProblem
    when they are not the files the rewrite knows."""
    try:
        index = (assets / "index.html").read_text()
        bundle = (assets / "public" / "bundle.js").read_text()
    except OSError as exc:
        raise PrefixProblem(f"cannot read its assets: {exc.strerror or exc}") from None
    if index.count('src="/static/bundle.js"') != 1:
        raise PrefixProblem("optuna-dashboard's index.html no longer loads /static/bundle.js")
    index = index.replace('src="/static/bundle.js"', f'src="{prefix}/static/bundle.js"')
    return index.encode(), rewrite_bundle(bundle, prefix).encode()


def mount_problem(prefix: str, assets: Path | None = None) -> str | None:
    """Why optuna-dashboard cannot be served under `prefix` (one line naming its version and the tested one), or
    None: nas-dashboard says so once at start, and its own pages work without it."""
    try:
        prefixed_assets(assets or assets_folder(), prefix)
    except PrefixProblem as exc:
        return problem_line(prefix, exc)
    return None


def problem_line(prefix: str, exc: PrefixProblem) -> str:
    try:
        version = importlib.metadata.version("optuna-dashboard")
    except importlib.metadata.PackageNotFoundError:
        version = "(not installed)"
    return f'optuna-dashboard {version} cannot be mounted under {prefix}/: {exc} (pip install "{PINNED}")'


class OptunaMount:
    """WSGI app serving optuna-dashboard for `storage` under `prefix`.

    Loaded on the first request: importing optuna-dashboard takes seconds (it pulls in Optuna's
    importance evaluators), which the dashboard's own pages need not wait for.
    """

    def __init__(self, storage, prefix: str = "/optuna", artifact_store=None):
        self.storage, self.prefix, self.artifact_store = storage, prefix.rstrip("/"), artifact_store
        self.app = None
        self.lock = threading.Lock()

    def _load(self) -> None:
        import optuna_dashboard

        self.app = optuna_dashboard.wsgi(self.storage, artifact_store=self.artifact_store)  # lists kept exports
        try:  # read and rewritten once: ~6 MB of JavaScript
            self.index, self.bundle = prefixed_assets(Path(optuna_dashboard.__file__).parent, self.prefix)
        except PrefixProblem as exc:
            self.problem = problem_line(self.prefix, exc)
            return
        self.problem = None
        self.bundle_gz = gzip.compress(self.bundle, 6)  # what a remote browser waits for

    def __call__(self, environ, start_response):
        with self.lock:
            if self.app is None:
                self._load()
        path = environ.get("PATH_INFO", "")
        rest = path[len(self.prefix) :] if path.startswith(self.prefix) else path
        if self.problem:
            return _reply(start_response, "503 Service Unavailable", "text/plain; charset=utf-8", self.problem.encode())
        if rest in ("", "/"):
            return _reply(start_response, "302 Found", "text/plain", b"", [("Location", f"{self.prefix}/dashboard")])
        if rest == "/static/bundle.js":
            if "gzip" in environ.get("HTTP_ACCEPT_ENCODING", ""):
                return _reply(
                    start_response,
                    "200 OK",
                    "application/javascript",
                    self.bundle_gz,
                    [("Cache-Control", "no-cache"), ("Content-Encoding", "gzip"), ("Vary", "Accept-Encoding")],
                )
            return _reply(
                start_response,
                "200 OK",
                "application/javascript",
                self.bundle,
                [("Cache-Control", "no-cache"), ("Vary", "Accept-Encoding")],
            )
        if rest == "/dashboard" or rest.startswith("/dashboard/"):
            # the same Content-Security-Policy optuna-dashboard sends with its page
            csp = (
                "default-src 'self';img-src 'self' data: blob:;frame-src 'self';object-src 'none';connect-src 'self';"
                "style-src 'self' data: 'unsafe-inline';script-src 'self' 'unsafe-eval'"
            )
            return _reply(
                start_response, "200 OK", "text/html; charset=utf-8", self.index, [("Content-Security-Policy", csp)]
            )
        inner = dict(environ, SCRIPT_NAME=environ.get("SCRIPT_NAME", "") + self.prefix, PATH_INFO=rest)
        return self.app(inner, start_response)


def _reply(start_response, status: str, content_type: str, body: bytes, headers: list | None = None) -> list[bytes]:
    start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body))), *(headers or [])])
    return [body]
