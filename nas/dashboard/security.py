"""Who may talk to the dashboard and what every answer carries: Host allowlist, access token,
CSRF and Origin checks, and headers that forbid framing.

A WSGI middleware in front of every route, `/optuna/` included:

- Host: only names this server is reached by (loopback names, the bound address, this machine's
  names and interface addresses when bound to all of them, `--allow-host`); a foreign Host is
  refused, which defeats DNS rebinding (a page on evil.example whose name resolves to 127.0.0.1
  still sends `Host: evil.example`).
- Token (required when binding beyond loopback): every request carries `Authorization: Bearer …`
  or the cookie of a session, which opening `?token=…` starts. Browsers send a host's cookies to
  all its ports, so another service on the host may see the cookie: it holds a random session id,
  nothing derived from the token, and is worthless after Logout, after the session's idle time or
  lifetime, or once this server restarts (sessions live in its memory). The cookie is named after
  the port (cookies are not kept apart by port), HttpOnly, SameSite=Lax, and Secure when the page
  was served over https (only a proxy named by --trusted-proxy can say so).
- State changes: only POST / PUT / PATCH / DELETE, and those need an Origin (or Referer) equal to
  the request's own host, plus, on our own routes, the per-server CSRF token the pages embed
  (header `X-CSRF-Token` or form field `csrf`). A cross-site page can send neither.
- Every answer, refusals and optuna-dashboard's included, says `X-Frame-Options: DENY` and CSP
  `frame-ancestors 'none'`: no other site can frame a page and borrow a click (clickjacking).
"""

from __future__ import annotations

import hmac
import io
import ipaddress
import os
import secrets
import socket
import sys
import threading
import time
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import parse_qs, quote, urlencode, urlsplit

import psutil

TOKEN_ENV = "BNNAS_DASHBOARD_TOKEN"  # every bnnas variable starts with BNNAS_ (docs/cli.md#environment-variables)
OLD_TOKEN_ENV = "NAS_DASHBOARD_TOKEN"  # its name before 2026-12: still read, with a note
CSRF_HEADER = "HTTP_X_CSRF_TOKEN"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARDS = ("0.0.0.0", "::", "")
NO_FRAMING = "frame-ancestors 'none'"
DEFAULT_CSP = f"default-src 'self'; img-src 'self' data:; {NO_FRAMING}"
SESSION_IDLE = 3600  # seconds a login may go unused (an open page polls, so only a closed one idles)
SESSION_LIFETIME = 12 * 3600  # seconds a login lasts however much it is used; then open the printed address again
MAX_SESSIONS = 1000  # logins kept at once; beyond it the least recently used is ended
LOGOUT_PATH = "/logout"
ALWAYS = (("X-Frame-Options", "DENY"), ("X-Content-Type-Options", "nosniff"), ("Referrer-Policy", "same-origin"))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_wildcard(host: str) -> bool:
    return host in WILDCARDS


def require_token_beyond_loopback(host: str, token: str | None) -> None:
    """Binding anything but loopback exposes Resume / Stop / Export to the network: only with a token."""
    from nas.errors import NasError

    if not is_loopback(host) and not token:
        raise NasError(
            f"--host: binding {host} makes the dashboard reachable from other machines; "
            f"give a token as well ({TOKEN_ENV}=SECRET in the environment, or --token-file PATH)"
        )


def read_token(flag: str | None, file: str | None, environ=os.environ) -> str | None:
    """The access token from `--token-file`, `--token` or $BNNAS_DASHBOARD_TOKEN (a flag shows in `ps`;
    the others do not). The variable's old name, $NAS_DASHBOARD_TOKEN, is read too, with a note to rename it."""
    from nas.errors import NasError

    if flag is not None and file is not None:
        raise NasError("--token-file: give the token one way, not with --token as well")
    if file is not None:
        try:
            token = Path(file).read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise NasError(f"--token-file: cannot read {file}: {getattr(exc, 'strerror', None) or exc}") from None
        if not token:
            raise NasError(f"--token-file: {file} is empty")
        return token
    variable = TOKEN_ENV
    if flag is None and TOKEN_ENV not in environ and OLD_TOKEN_ENV in environ:
        variable = OLD_TOKEN_ENV
        print(
            f"nas-dashboard: {OLD_TOKEN_ENV} is now {TOKEN_ENV}; rename it (the old name still works)", file=sys.stderr
        )
    token = flag if flag is not None else environ.get(variable)
    if token is not None and not token.strip():
        raise NasError(f"{'--token' if flag is not None else variable}: the token is empty")
    return token.strip() if token else None


def interface_addresses() -> list[str]:
    """This machine's IP addresses, every interface (link-local ones without their `%zone`)."""
    found = []
    for addresses in psutil.net_if_addrs().values():
        found += [a.address.split("%")[0] for a in addresses if a.family in (socket.AF_INET, socket.AF_INET6)]
    return found


def allowed_hosts(bind: str, extra: list[str] = ()) -> set[str]:
    """Host names (without port) that requests may name: loopback, the bound address, this machine, `extra`."""
    names = {*LOOPBACK_NAMES, bind, *extra}
    if not is_loopback(bind):  # reachable from elsewhere: by this machine's names and addresses
        names |= {socket.gethostname(), socket.getfqdn()}
        try:
            names |= {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)}
        except OSError:
            pass
    if is_wildcard(bind):  # bound to every interface: each address reaches it (an IP literal cannot be rebound)
        names |= set(interface_addresses())
    names.discard("")
    return {n.lower() for n in names}


def split_host(header: str) -> str:
    """`Host` header → host name without port; IPv6 brackets removed."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else ""
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def cookie_name(environ) -> str:
    """One cookie per dashboard port: browsers send a host's cookies to all its ports, so a fixed name would collide."""
    return f"nas_dashboard_{environ.get('SERVER_PORT', '')}"


class Sessions:
    """The logins of token mode: a random id per login, valid until Logout, `idle` seconds without use or
    `lifetime` seconds after the login, whichever comes first. In memory: a restart logs everyone out.

    `clock` is injectable so that tests can move time on instead of waiting.
    """

    def __init__(self, idle: float = SESSION_IDLE, lifetime: float = SESSION_LIFETIME, clock=time.monotonic):
        self.idle, self.lifetime, self.clock = idle, lifetime, clock
        self._started: dict[str, tuple[float, float]] = {}  # id -> (login time, last use); insertion order = use order
        self._lock = threading.Lock()

    def start(self) -> str:
        sid = secrets.token_urlsafe(32)
        now = self.clock()
        with self._lock:
            for old in [s for s, times in self._started.items() if not self._alive(times, now)]:
                del self._started[old]
            while len(self._started) >= MAX_SESSIONS:
                del self._started[next(iter(self._started))]
            self._started[sid] = (now, now)
        return sid

    def check(self, sid: str) -> bool:
        """Whether `sid` is a live session; a live one counts as used now."""
        now = self.clock()
        with self._lock:
            times = self._started.pop(sid, None)
            if times is None or not self._alive(times, now):
                return False
            self._started[sid] = (times[0], now)
            return True

    def end(self, sid: str) -> None:
        with self._lock:
            self._started.pop(sid, None)

    def _alive(self, times: tuple[float, float], now: float) -> bool:
        login, used = times
        return now - login < self.lifetime and now - used < self.idle


def same_site_location(path: str, query: str) -> str:
    """A Location on this site for a decoded path: percent-encoded (no CR/LF, no backslash) and never `//host`."""
    return "/" + quote(path.lstrip("/\\"), safe="/:@!$&'()*+,;=-._~") + (f"?{query}" if query else "")


def _with_headers(start_response):
    """start_response that adds the headers every answer carries; an existing CSP gains `frame-ancestors 'none'`."""

    def start(status, headers, exc_info=None):
        names = {name.lower() for name, _ in headers}
        headers = [
            (
                name,
                f"{value.rstrip('; ')}; {NO_FRAMING}"
                if name.lower() == "content-security-policy" and "frame-ancestors" not in value
                else value,
            )
            for name, value in headers
        ]
        if "content-security-policy" not in names:
            headers.append(("Content-Security-Policy", DEFAULT_CSP))
        headers += [(name, value) for name, value in ALWAYS if name.lower() not in names]
        return start_response(status, headers, exc_info) if exc_info else start_response(status, headers)

    return start


def _respond(start_response, status: str, text: str, headers: list | None = None) -> list[bytes]:
    body = (text + "\n").encode()
    start_response(
        status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))), *(headers or [])]
    )
    return [body]


class Guard:
    """Wraps the dashboard's WSGI app; see the module docstring for the rules."""

    def __init__(
        self,
        app,
        hosts: set[str],
        token: str | None,
        csrf_token: str | None = None,
        unchecked_csrf_prefix: str = "/optuna/",
        sessions: Sessions | None = None,
    ):
        self.app, self.hosts, self.token = app, hosts, token
        self.sessions = sessions or Sessions()
        self.csrf_token = csrf_token or secrets.token_urlsafe(32)
        self.unchecked_csrf_prefix = unchecked_csrf_prefix  # optuna-dashboard's own JS cannot send our token

    def __call__(self, environ, start_response):
        start_response = _with_headers(start_response)
        host = environ.get("HTTP_HOST", "")
        if split_host(host) not in self.hosts:
            return _respond(
                start_response,
                "403 Forbidden",
                f"Host {host!r} is not allowed (start nas-dashboard with --allow-host NAME to add it)",
            )
        if self.token is not None:
            query = parse_qs(environ.get("QUERY_STRING", ""))
            given = query.get("token", [None])[0]
            if given is not None and hmac.compare_digest(given.encode(), self.token.encode()):
                # once: set the cookie and drop the token from the address bar and history
                rest = urlencode([(k, v) for k, vs in query.items() if k != "token" for v in vs], doseq=True)
                location = same_site_location(environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "/"), rest)
                cookie = self._cookie(environ, self.sessions.start(), f"Max-Age={round(self.sessions.lifetime)}")
                return _respond(
                    start_response, "303 See Other", "token accepted", [("Location", location), ("Set-Cookie", cookie)]
                )
            if not self._has_token(environ):
                return _respond(
                    start_response,
                    "401 Unauthorized",
                    "this dashboard needs its token: open the address nas-dashboard printed (…?token=…)",
                )
        method = environ.get("REQUEST_METHOD", "GET").upper()
        if method not in SAFE_METHODS:
            problem = self._cross_site(environ, host)
            if problem:
                return _respond(start_response, "403 Forbidden", problem)
        if self.token is not None and environ.get("PATH_INFO") == LOGOUT_PATH and method == "POST":
            sid = self._session_id(environ)
            if sid is not None:
                self.sessions.end(sid)
            return _respond(
                start_response,
                "200 OK",
                "logged out: open the address nas-dashboard printed (…?token=…) to log in again",
                [("Set-Cookie", self._cookie(environ, "", "Max-Age=0"))],
            )
        return self.app(environ, start_response)

    @staticmethod
    def _cookie(environ, value: str, lifetime: str) -> str:
        """Set-Cookie for the session: Lax, not Strict, because the printed link may be opened from another site (a
        chat, a mail) and Strict would withhold the cookie from that first page; SameSite ignores ports anyway, so
        writes rely on the Origin (which names the port) and the CSRF token, not on SameSite. Secure over https."""
        secure = "; Secure" if environ.get("wsgi.url_scheme") == "https" else ""
        return f"{cookie_name(environ)}={value}; {lifetime}; Path=/; HttpOnly; SameSite=Lax{secure}"

    def _session_id(self, environ) -> str | None:
        cookie = SimpleCookie()
        try:
            cookie.load(environ.get("HTTP_COOKIE", ""))
        except Exception:  # noqa: BLE001 - a malformed cookie header is just no session
            return None
        name = cookie_name(environ)
        return cookie[name].value if name in cookie else None

    def _has_token(self, environ) -> bool:
        auth = environ.get("HTTP_AUTHORIZATION", "")
        if auth.lower().startswith("bearer ") and hmac.compare_digest(auth[7:].strip().encode(), self.token.encode()):
            return True
        sid = self._session_id(environ)
        return sid is not None and self.sessions.check(sid)

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
    """A field of an urlencoded POST body, leaving the body readable for the app.

    The whole body is read: the server refuses bodies over its limit before they reach us,
    and a body cut short here would reach the app as a different request.
    """
    if not environ.get("CONTENT_TYPE", "").startswith("application/x-www-form-urlencoded"):
        return None
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        return None
    body = environ["wsgi.input"].read(length)
    environ["wsgi.input"] = io.BytesIO(body)
    return parse_qs(body.decode("latin-1")).get(name, [None])[0]
