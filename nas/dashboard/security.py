"""Who may talk to the dashboard: Host allowlist, access token, CSRF and Origin checks.

A WSGI middleware in front of every route, `/optuna/` included:

- Host: only names this server is reached by (loopback names, the bound address, `--allow-host`);
  a foreign Host is refused, which defeats DNS rebinding (a page on evil.example whose name
  resolves to 127.0.0.1 still sends `Host: evil.example`).
- Token (required when binding beyond loopback): every request carries it as a cookie set once
  from `?token=…`, or as `Authorization: Bearer …`.
- State changes: only POST / PUT / PATCH / DELETE, and those need an Origin (or Referer) equal to
  the request's own host, plus, on our own routes, the per-server CSRF token the pages embed
  (header `X-CSRF-Token` or form field `csrf`). A cross-site page can send neither.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
import socket
from http.cookies import SimpleCookie
from urllib.parse import parse_qs, urlencode, urlsplit

TOKEN_COOKIE = "nas_dashboard_token"
CSRF_HEADER = "HTTP_X_CSRF_TOKEN"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_token_beyond_loopback(host: str, token: str | None) -> None:
    """Binding anything but loopback exposes Resume / Stop / Export to the network: only with a token."""
    from nas.errors import NasError

    if not is_loopback(host) and not token:
        raise NasError(f"--host: binding {host} makes the dashboard reachable from other machines; give --token SECRET as well")


def allowed_hosts(bind: str, extra: list[str] = ()) -> set[str]:
    """Host names (without port) that requests may name: loopback, the bound address, this machine, `extra`."""
    names = {*LOOPBACK_NAMES, bind, *extra}
    if not is_loopback(bind):  # reachable from elsewhere: by this machine's names and addresses
        names |= {socket.gethostname(), socket.getfqdn()}
        try:
            names |= {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)}
        except OSError:
            pass
    names.discard("0.0.0.0")
    names.discard("::")
    return {n.lower() for n in names if n}


def split_host(header: str) -> str:
    """`Host` header → host name without port; IPv6 brackets removed."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else ""
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _respond(start_response, status: str, text: str, headers: list | None = None) -> list[bytes]:
    body = (text + "\n").encode()
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))), *(headers or [])])
    return [body]


class Guard:
    """Wraps the dashboard's WSGI app; see the module docstring for the rules."""

    def __init__(self, app, hosts: set[str], token: str | None, csrf_token: str | None = None, unchecked_csrf_prefix: str = "/optuna/"):
        self.app, self.hosts, self.token = app, hosts, token
        self.csrf_token = csrf_token or secrets.token_urlsafe(32)
        self.unchecked_csrf_prefix = unchecked_csrf_prefix  # optuna-dashboard's own JS cannot send our token

    def __call__(self, environ, start_response):
        host = environ.get("HTTP_HOST", "")
        if split_host(host) not in self.hosts:
            return _respond(start_response, "403 Forbidden", f"Host {host!r} is not allowed (start nas-dashboard with --allow-host NAME to add it)")
        if self.token is not None:
            query = parse_qs(environ.get("QUERY_STRING", ""))
            given = query.get("token", [None])[0]
            if given is not None and hmac.compare_digest(given.encode(), self.token.encode()):
                # once: set the cookie and drop the token from the address bar and history
                rest = urlencode([(k, v) for k, vs in query.items() if k != "token" for v in vs], doseq=True)
                path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "/") + (f"?{rest}" if rest else "")
                cookie = f"{TOKEN_COOKIE}={self.token}; Path=/; HttpOnly; SameSite=Strict"
                return _respond(start_response, "303 See Other", "token accepted", [("Location", path), ("Set-Cookie", cookie)])
            if not self._has_token(environ):
                return _respond(start_response, "401 Unauthorized", "this dashboard needs its token: open the address nas-dashboard printed (…?token=…)")
        method = environ.get("REQUEST_METHOD", "GET").upper()
        if method not in SAFE_METHODS:
            problem = self._cross_site(environ, host)
            if problem:
                return _respond(start_response, "403 Forbidden", problem)
        return self.app(environ, start_response)

    def _has_token(self, environ) -> bool:
        auth = environ.get("HTTP_AUTHORIZATION", "")
        candidates = [auth[7:].strip()] if auth.lower().startswith("bearer ") else []
        cookie = SimpleCookie()
        try:
            cookie.load(environ.get("HTTP_COOKIE", ""))
        except Exception:  # noqa: BLE001 - a malformed cookie header is just no token
            pass
        if TOKEN_COOKIE in cookie:
            candidates.append(cookie[TOKEN_COOKIE].value)
        return any(hmac.compare_digest(c.encode(), self.token.encode()) for c in candidates)

    def _cross_site(self, environ, host: str) -> str | None:
        """Why a state-changing request is refused, or None."""
        source = environ.get("HTTP_ORIGIN") or environ.get("HTTP_REFERER")
        if not source or source == "null":
            return "refused: a state-changing request needs an Origin header from this dashboard's own page"
        if urlsplit(source).netloc.lower() != host.lower():
            return f"refused: cross-site request from {urlsplit(source).netloc or source!r}"
        if environ.get("PATH_INFO", "").startswith(self.unchecked_csrf_prefix):
            return None
        given = environ.get(CSRF_HEADER) or _form_field(environ, "csrf")
        if not given or not hmac.compare_digest(given.encode(), self.csrf_token.encode()):
            return "refused: missing or wrong CSRF token (reload the page)"
        return None


def _form_field(environ, name: str) -> str | None:
    """A field of an urlencoded POST body, leaving the body readable for the app."""
    import io

    if not environ.get("CONTENT_TYPE", "").startswith("application/x-www-form-urlencoded"):
        return None
    try:
        length = min(int(environ.get("CONTENT_LENGTH") or 0), 1 << 16)
    except ValueError:
        return None
    body = environ["wsgi.input"].read(length)
    environ["wsgi.input"] = io.BytesIO(body)
    environ["CONTENT_LENGTH"] = str(len(body))
    return parse_qs(body.decode("latin-1")).get(name, [None])[0]
