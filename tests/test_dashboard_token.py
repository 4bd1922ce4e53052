"""Token mode (issue 15.6): the printed address works, the token stays off command lines and out of
other services' cookies, and the redirect that takes it off the address stays on this site."""

import http.client
import http.cookiejar
import urllib.request
from urllib.parse import urljoin, urlsplit

import optuna
import psutil
import pytest
from dashboard_support import Dashboard

from nas.dashboard.security import interface_addresses

pytestmark = pytest.mark.system  # starts dashboard server processes

TOKEN_A, TOKEN_B = "tok-A-4f9c2e", "tok-B-77d01a"


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    url = f"sqlite:///{tmp_path_factory.mktemp('token')}/nas.db"
    optuna.create_study(storage=url, study_name="s").add_trial(optuna.trial.create_trial(value=0.5))
    return url


@pytest.fixture(scope="module")
def outward(storage, tmp_path_factory):
    """Bound to every interface, the token in the environment."""
    dash = Dashboard(
        storage,
        tmp_path_factory.mktemp("a"),
        "--host",
        "0.0.0.0",
        env={"BNNAS_DASHBOARD_TOKEN": TOKEN_A},
        token=TOKEN_A,
    )
    yield dash
    dash.close()


@pytest.fixture(scope="module")
def from_file(storage, tmp_path_factory):
    """On loopback, another port, another token, read from a file."""
    folder = tmp_path_factory.mktemp("b")
    (folder / "token").write_text(TOKEN_B + "\n")
    dash = Dashboard(storage, folder / "work", "--token-file", str(folder / "token"), token=TOKEN_B)
    yield dash
    dash.close()


def raw_get(host: str, port: int, path: str, host_header: str, **headers):
    """One GET with every answer header kept (Set-Cookie may repeat)."""
    conn = http.client.HTTPConnection(host, port, timeout=60)
    try:
        conn.request("GET", path, headers={"Host": host_header, **headers})
        reply = conn.getresponse()
        return reply.status, reply.getheaders(), reply.read().decode(errors="replace")
    finally:
        conn.close()


def test_the_printed_address_opens_the_dashboard(outward):
    """It printed http://0.0.0.0:PORT/?token=…, which answered 403."""
    address = urlsplit(outward.url)
    assert address.query == f"token={TOKEN_A}"
    status, headers, _ = raw_get(address.hostname, address.port, f"/?{address.query}", address.netloc)
    assert status == 303, (outward.url, status)
    cookie = dict(headers)["Set-Cookie"].split(";")[0]
    status, _, page = raw_get(address.hostname, address.port, dict(headers)["Location"], address.netloc, Cookie=cookie)
    assert status == 200 and "<h1>Studies</h1>" in page
    for ip in [
        *interface_addresses(),
        "0.0.0.0",
    ]:  # every address of the machine names it; none is refused as a foreign Host
        netloc = f"[{ip}]:{outward.port}" if ":" in ip else f"{ip}:{outward.port}"
        assert raw_get("127.0.0.1", outward.port, "/api/studies", netloc)[0] == 401, ip


def test_the_token_is_on_no_command_line(outward, from_file):
    """`ps` showed --token SECRET to every user of the machine."""
    for dash in (outward, from_file):
        assert dash.get("/api/studies", **dash.auth())[0] == 200
        assert dash.get("/api/studies", Authorization="Bearer wrong")[0] == 401
        process = psutil.Process(dash.process.pid)
        assert dash.token not in " ".join(process.cmdline())


def test_each_dashboard_keeps_its_own_cookie_which_holds_no_token(outward, from_file):
    """One cookie name for every port: a second dashboard's cookie replaced the first's, which held the raw token."""
    jar = http.cookiejar.CookieJar()  # keeps cookies by host and path, not port, like a browser
    browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    for dash in (outward, from_file):
        with browser.open(f"http://127.0.0.1:{dash.port}/?token={dash.token}", timeout=60) as reply:
            assert reply.status == 200 and reply.url == f"http://127.0.0.1:{dash.port}/"
    assert {c.name for c in jar} == {f"nas_dashboard_{outward.port}", f"nas_dashboard_{from_file.port}"}
    assert not {c.value for c in jar} & {TOKEN_A, TOKEN_B}
    for dash in (outward, from_file):  # each still lets its browser in
        with browser.open(f"http://127.0.0.1:{dash.port}/api/studies", timeout=60) as reply:
            assert reply.status == 200
    mine = next(c for c in jar if c.name == f"nas_dashboard_{outward.port}")
    status = raw_get(
        "127.0.0.1",
        from_file.port,
        "/api/studies",
        f"127.0.0.1:{from_file.port}",
        Cookie=f"nas_dashboard_{from_file.port}={mine.value}",
    )[0]
    assert status == 401  # one dashboard's cookie opens no other
    status, headers, _ = raw_get("127.0.0.1", outward.port, f"/?token={TOKEN_A}", f"127.0.0.1:{outward.port}")
    cookie = dict(headers)["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/" in cookie


@pytest.mark.parametrize(
    "path", ["/%0d%0aSet-Cookie:%20evil=1", "/%5Cevil.example", "/%5C%5Cevil.example/x", "/studies%0d%0aX-Evil:%201"]
)
def test_the_redirect_that_drops_the_token_stays_on_this_site(outward, path):
    """The Location was built from the decoded path: CR LF injected a header, a backslash led off-site."""
    netloc = f"127.0.0.1:{outward.port}"
    status, headers, _ = raw_get("127.0.0.1", outward.port, f"{path}?token={TOKEN_A}", netloc)
    assert status == 303
    assert [name for name, _ in headers if name.lower() == "set-cookie"] == ["Set-Cookie"]
    assert not [name for name, _ in headers if name.lower() == "x-evil"]
    location = dict(headers)["Location"]
    assert "\r" not in location and "\n" not in location and "\\" not in location
    assert urlsplit(urljoin(f"http://{netloc}/", location)).netloc == netloc


def test_the_token_variable_has_the_bnnas_prefix_and_its_old_name_still_works_with_a_note(capsys):
    from nas.dashboard.security import read_token

    assert read_token(None, None, {"BNNAS_DASHBOARD_TOKEN": "new"}) == "new"
    assert capsys.readouterr().err == ""
    assert read_token(None, None, {"NAS_DASHBOARD_TOKEN": "old"}) == "old"
    assert "NAS_DASHBOARD_TOKEN is now BNNAS_DASHBOARD_TOKEN" in capsys.readouterr().err
    assert read_token(None, None, {"BNNAS_DASHBOARD_TOKEN": "new", "NAS_DASHBOARD_TOKEN": "old"}) == "new"
