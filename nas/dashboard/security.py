"""Who may talk to the dashboard and what every answer carries: Host allowlist, access token,
CSRF and Origin checks, and headers that forbid framing.

A WSGI middleware in front of every route, `/optuna/` included:

- Host: only names this server is reached by (loopback names, the bound address, this machine's
  names and interface addresses when bound to all of them, `--allow-host`); a foreign Host is
  refused, which defeats DNS rebinding (a page on evil.example whose name resolves to 127.0.0.1
  still sends `Host: evil.example`).
- Token (required when binding beyond loopback): every request carries it as a cookie set once
  from `?token=…`, or as `Authorization: Bearer …`. The cookie is named after the port (cookies
  are not kept apart by port) and holds an HMAC of the token, never the token itself.
- State changes: only POST / PUT / PATCH / DELETE, and those need an Origin (or Referer) equal to
  the request's own host, plus, on our own routes, the per-server CSRF token the pages embed
  (header `X-CSRF-Token` or form field `csrf`). A cross-site page can send neither.
- Every answer, refusals and optuna-dashboard's included, says `X-Frame-Options: DENY` and CSP
  `frame-ancestors 'none'`: no other site can frame a page and borrow a click (clickjacking).
"""

from __future__ import annotations

import hashlib
import hmac
import io
import ipaddress
import os
import secrets
import socket
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import parse_qs, quote, urlencode, urlsplit

import psutil

TOKEN_ENV = "NAS_DASHBOARD_TOKEN"
CSRF_HEADER = "HTTP_X_CSRF_TOKEN"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARDS = ("0.0.0.0", "::", "")
NO_FRAMING = "frame-ancestors 'none'"
DEFAULT_CSP = f"default-src 'self'; img-src 'self' data:; {NO_FRAMING}"
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
        raise NasError(f"--host: binding {host} makes the dashboard reachable from other machines; "
                       f"give a token as well ({TOKEN_ENV}=SECRET in the environment, or --token-file PATH)")


def read_token(flag: str | None, file: str | None, environ=os.environ) -> str | None:
    """The access token from `--token-file`, `--token` or $NAS_DASHBOARD_TOKEN (a flag shows in `ps`; the others do not)."""
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
    token = flag if flag is not None else environ.get(TOKEN_ENV)
    if token is not None and not token.strip():
        raise NasError(f"{'--token' if flag is not None else TOKEN_ENV}: the token is empty")
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
        return header[1:header.find("]")] if "]" in header else ""
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def cookie_name(environ) -> str:
    """One cookie per dashboard port: browsers send a host's cookies to all its ports, so a fixed name would collide."""
    return f"nas_dashboard_{environ.get('SERVER_PORT', '')}"


def cookie_value(token: str, environ) -> str:
    """An HMAC of the token, so that other services of the host that see the cookie never learn the token."""
    return hmac.new(token.encode(), f"nas-dashboard cookie {environ.get('SERVER_PORT', '')}".encode(), hashlib.sha256).hexdigest()


def same_site_location(path: str, query: str) -> str:
    """A Location on this site for a decoded path: percent-encoded (no CR/LF, no backslash) and never `//host`."""
    return "/" + quote(path.lstrip("/\\"), safe="/:@!$&'()*+,;=-._~") + (f"?{query}" if query else "")


def _with_headers(start_response):
    """start_response that adds the headers every answer carries; an existing CSP gains `frame-ancestors 'none'`."""

    def start(status, headers, exc_info=None):
        names = {name.lower() for name, _ in headers}
        headers = [(name, f"{value.rstrip('; ')}; {NO_FRAMING}" if name.lower() == "content-security-policy" and "frame-ancestors" not in value
                    else value) for name, value in headers]
        if "content-security-policy" not in names:
            headers.append(("Content-Security-Policy", DEFAULT_CSP))
        headers += [(name, value) for name, value in ALWAYS if name.lower() not in names]
        return start_response(status, headers, exc_info) if exc_info else start_response(status, headers)

    return start


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
        start_response = _with_headers(start_response)
        host = environ.get("HTTP_HOST", "")
        if split_host(host) not in self.hosts:
            return _respond(start_response, "403 Forbidden", f"Host {host!r} is not allowed (start nas-dashboard with --allow-host NAME to add it)")
        if self.token is not None:
            query = parse_qs(environ.get("QUERY_STRING", ""))
            given = query.get("token", [None])[0]
            if given is not None and hmac.compare_digest(given.encode(), self.token.encode()):
                # once: set the cookie and drop the token from the address bar and history
                rest = urlencode([(k, v) for k, vs in query.items() if k != "token" for v in vs], doseq=True)
                location = same_site_location(environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "/"), rest)
                # Lax, not Strict: the link may be opened from another site (a chat, a mail); writes still need Origin + CSRF
                cookie = f"{cookie_name(environ)}={cookie_value(self.token, environ)}; Path=/; HttpOnly; SameSite=Lax"
                return _respond(start_response, "303 See Other", "token accepted", [("Location", location), ("Set-Cookie", cookie)])
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
        if auth.lower().startswith("bearer ") and hmac.compare_digest(auth[7:].strip().encode(), self.token.encode()):
            return True
        cookie = SimpleCookie()
        try:
            cookie.load(environ.get("HTTP_COOKIE", ""))
        except Exception:  # noqa: BLE001 - a malformed cookie header is just no token
            return False
        name = cookie_name(environ)
        return name in cookie and hmac.compare_digest(cookie[name].value.encode(), cookie_value(self.token, environ).encode())

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
