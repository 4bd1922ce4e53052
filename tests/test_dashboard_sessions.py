"""Token-mode logins (issue 29.3): the cookie is a random session that Logout, idle time, its lifetime and a restart
end, never a value derived from the token. Each test replays a captured cookie the way another service on the same
host could (browsers send a host's cookies to all its ports) and tries to delete a study with it."""

import hashlib
import hmac
import threading
from urllib.parse import urlencode

import optuna
import pytest
from dashboard_support import Dashboard

from nas.dashboard.security import Sessions
from nas.dashboard.server import app_and_workers, server_settings

pytestmark = pytest.mark.system  # starts dashboard server processes

TOKEN = "tok-S-93be1c"
NAMES = ("victim", "spare", "control")


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    url = f"sqlite:///{tmp_path_factory.mktemp('sessions')}/nas.db"
    for name in NAMES:
        optuna.create_study(storage=url, study_name=name).add_trial(optuna.trial.create_trial(value=0.5))
    return url


@pytest.fixture(scope="module")
def dash(storage, tmp_path_factory):
    """Loopback, token mode, behind a (pretended) TLS proxy on 127.0.0.1, a lifetime given by flag."""
    server = Dashboard(
        storage,
        tmp_path_factory.mktemp("work"),
        "--trusted-proxy",
        "127.0.0.1",
        "--session-lifetime",
        "5000",
        env={"BNNAS_DASHBOARD_TOKEN": TOKEN},
        token=TOKEN,
    )
    yield server
    server.close()


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture(scope="module")
def timed(storage, tmp_path_factory):
    """The same app on a real waitress server in this process, its session store on a clock the test moves."""
    from waitress.server import create_server

    clock = Clock()
    sessions = Sessions(idle=60, lifetime=600, clock=clock)
    app, _ = app_and_workers(storage, "127.0.0.1", TOKEN, tmp_path_factory.mktemp("timed"), sessions=sessions)
    server = create_server(app, host="127.0.0.1", port=0, **server_settings())
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    site = Dashboard.__new__(Dashboard)  # its HTTP client only: the server is the one above
    site.token, site.address, site.port = TOKEN, "127.0.0.1", server.effective_port
    site.netloc = f"127.0.0.1:{site.port}"
    site.base = f"http://{site.netloc}"
    site.clock = clock
    yield site
    server.close()
    server.task_dispatcher.shutdown()


def login(site, **headers) -> tuple[str, str]:
    """Open the printed address; returns the `name=value` cookie and the whole Set-Cookie."""
    status, answer, _ = site.request("GET", f"/?token={TOKEN}", headers=headers)
    assert status == 303, status
    return answer["Set-Cookie"].split(";")[0], answer["Set-Cookie"]


def study_id(storage: str, name: str) -> int | None:
    found = [s for s in optuna.get_all_study_summaries(storage) if s.study_name == name]
    return found[0]._study_id if found else None


def delete(site, storage: str, name: str, cookie: str) -> int:
    """What a thief replaying the cookie sends (curl sets any Origin it likes)."""
    headers = {"Cookie": cookie, "Origin": site.base}
    return site.request("DELETE", f"/optuna/api/studies/{study_id(storage, name)}", headers=headers)[0]


def csrf(site, cookie: str) -> str:
    _, _, page = site.request("GET", "/", headers={"Cookie": cookie})
    return page.split('name="csrf-token" content="')[1].split('"')[0]


def logout(site, cookie: str, token: str | None = None):
    body = urlencode({"csrf": token if token is not None else csrf(site, cookie)})
    return site.request(
        "POST",
        "/logout",
        body,
        {"Cookie": cookie, "Origin": site.base, "Content-Type": "application/x-www-form-urlencoded"},
    )


def test_a_cookie_replayed_after_logout_deletes_nothing(dash, storage):
    """The cookie was a fixed HMAC of the token: replayed by another port's server after logout, it deleted a study."""
    cookie, _ = login(dash)
    assert delete(dash, storage, "control", cookie) == 204 and study_id(storage, "control") is None  # a live cookie can
    status, _, page = dash.request("GET", "/", headers={"Cookie": cookie})
    assert status == 200 and 'action="/logout"' in page  # the pages offer Logout
    assert logout(dash, cookie, token="wrong")[0] == 403  # no cross-site logout either
    assert dash.request("GET", "/api/studies", headers={"Cookie": cookie})[0] == 200
    status, answer, _ = logout(dash, cookie)
    cleared = answer["Set-Cookie"]
    assert status == 200 and "Max-Age=0" in cleared and cleared.startswith(cookie.split("=")[0] + "=;")
    assert delete(dash, storage, "victim", cookie) == 401
    assert dash.request("GET", "/api/studies", headers={"Cookie": cookie})[0] == 401
    assert study_id(storage, "victim") is not None


def test_the_old_cookie_derived_from_the_token_opens_nothing(dash, storage):
    """A cookie seen by another service on the host opened this port forever; nothing derived from the token may."""
    old = hmac.new(TOKEN.encode(), f"nas-dashboard cookie {dash.port}".encode(), hashlib.sha256).hexdigest()
    cookie = f"nas_dashboard_{dash.port}={old}"
    assert dash.request("GET", "/api/studies", headers={"Cookie": cookie})[0] == 401
    assert delete(dash, storage, "victim", cookie) == 401
    assert study_id(storage, "victim") is not None


def test_each_login_gets_its_own_session(dash):
    """Two logins had one and the same cookie, so no login could be ended alone."""
    (first, set_first), (second, _) = login(dash), login(dash)
    assert first != second
    assert TOKEN not in first + second
    for flag in ("HttpOnly", "SameSite=Lax", "Path=/", "Max-Age=5000"):
        assert flag in set_first
    assert logout(dash, first)[0] == 200
    assert dash.request("GET", "/api/studies", headers={"Cookie": first})[0] == 401
    assert dash.request("GET", "/api/studies", headers={"Cookie": second})[0] == 200


def test_the_cookie_is_secure_behind_the_trusted_proxy_only(dash, timed):
    """Behind TLS the cookie went out without Secure; a forwarded scheme is believed only from --trusted-proxy."""
    assert "; Secure" in login(dash, **{"X-Forwarded-Proto": "https"})[1]
    assert "Secure" not in login(dash)[1]
    assert "Secure" not in login(timed, **{"X-Forwarded-Proto": "https"})[1]  # no proxy trusted: the header is ignored


def test_a_cookie_replayed_after_expiry_deletes_nothing(timed, storage):
    """A login never ended: idle or old, the cookie still deleted the study."""
    idle, _ = login(timed)
    timed.clock.now += 59
    assert timed.request("GET", "/api/studies", headers={"Cookie": idle})[0] == 200
    timed.clock.now += 59  # used a minute ago: still live
    assert timed.request("GET", "/api/studies", headers={"Cookie": idle})[0] == 200
    timed.clock.now += 61
    assert delete(timed, storage, "victim", idle) == 401

    old, _ = login(timed)
    for _ in range(12):  # used every 50 s, so never idle, but 600 s after the login it ends
        timed.clock.now += 50
        status = timed.request("GET", "/api/studies", headers={"Cookie": old})[0]
    assert status == 401
    assert delete(timed, storage, "victim", old) == 401
    assert study_id(storage, "victim") is not None
    fresh, _ = login(timed)  # the token still logs in
    assert timed.request("GET", "/api/studies", headers={"Cookie": fresh})[0] == 200


def test_a_restart_ends_every_session(storage, tmp_path):
    """Sessions live in the server's memory: a cookie of one dashboard process opens no later one on the same port."""
    first = Dashboard(storage, tmp_path / "a", env={"BNNAS_DASHBOARD_TOKEN": TOKEN}, token=TOKEN)
    try:
        cookie, _ = login(first)
        port = first.port
    finally:
        first.close()
    second = Dashboard(storage, tmp_path / "b", "--port", str(port), env={"BNNAS_DASHBOARD_TOKEN": TOKEN}, token=TOKEN)
    try:
        assert delete(second, storage, "spare", cookie) == 401
        assert study_id(storage, "spare") is not None
    finally:
        second.close()


@pytest.mark.parametrize("flag", ["--session-idle", "--session-lifetime"])
def test_a_session_time_below_one_second_is_refused(flag, capsys):
    from nas.cli import dashboard_main

    with pytest.raises(SystemExit) as stopped:
        dashboard_main([flag, "0"])
    assert stopped.value.code == 2 and f"{flag} must be >= 1" in capsys.readouterr().err
