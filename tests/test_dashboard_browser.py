"""End to end in a real headless Chromium: list → Resume → finished count rises → Stop → screenshot; and what
another site, a long name and a browser without JavaScript do (issue 15)."""

import http.server
import shutil
import subprocess
import threading

import optuna
import pytest
from dashboard_support import Dashboard, make_study, trials, wait_for
from optuna.trial import TrialState

from nas.study.storage import quiet_optuna

pytestmark = pytest.mark.system  # starts Chromium and dashboard servers

sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (dev extra)")
TIMEOUT_MS = 180_000


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium (Playwright's own browser download needs hosts we may not reach); installed when missing."""
    path = shutil.which("chromium")
    if path is None:
        for command in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]):
            if subprocess.run(command, capture_output=True, timeout=900).returncode != 0:
                pytest.skip(f"chromium is missing and {' '.join(command)} failed")
        path = shutil.which("chromium")
    if path is None:
        pytest.skip("chromium is missing and could not be installed")
    return path


@pytest.fixture
def browser(chromium):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium, headless=True, args=["--no-sandbox"]
        )  # root in a container
        yield browser
        browser.close()


@pytest.fixture
def dash(tmp_path):
    storage = make_study(tmp_path, "digits-bn", trials=1, epochs=2)
    dash = Dashboard(storage, tmp_path / "work")
    dash.storage = storage
    yield dash
    dash.close()


def test_resume_then_stop_from_the_browser(dash, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1400, "height": 700})
    expect = sync_api.expect
    page.goto(dash.base + "/")
    row = page.locator('tr[data-study="digits-bn"]')
    state = row.locator('[data-field="state"]')
    expect(state).to_have_text("finished")
    before = int(row.locator('[data-field="finished"]').get_attribute("data-value"))

    row.locator('input[name="trials"]').fill("40")
    row.locator('button[data-action="resume"]').click()
    expect(page.locator("#flash")).to_contain_text("resume: started")
    page.wait_for_function(
        """n => { const c = document.querySelector('tr[data-study="digits-bn"] [data-field="finished"]');
                 return c !== null && Number(c.dataset.value) > n; }""",
        arg=before,
        timeout=TIMEOUT_MS,
    )
    expect(state).to_have_text("running")

    row.locator('button[data-action="stop"]').click(timeout=TIMEOUT_MS)
    expect(page.locator("#flash")).to_contain_text("stop:")
    expect(state).to_have_text("idle", timeout=TIMEOUT_MS)
    page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000

    stored = trials(dash.storage, "digits-bn")
    assert before < len(stored) < 40 and all(t.state == TrialState.COMPLETE for t in stored)

    # the study page and optuna-dashboard's own views under /optuna/ render from the same storage
    page.click(f'a[href="{dash.links("digits-bn")["page"]}"]')
    expect(page.locator("svg.history")).to_be_visible()
    page.screenshot(path=str(tmp_path / "study.png"), full_page=True)
    page.goto(dash.base + "/optuna/dashboard")
    expect(page.get_by_text("digits-bn").first).to_be_visible(timeout=60_000)
    page.goto(dash.base + "/optuna/dashboard/studies/1")  # its API calls (trials, importances) under the prefix
    expect(page.get_by_text("Hyperparameter Importance").first).to_be_visible(timeout=60_000)
    page.screenshot(path=str(tmp_path / "optuna.png"))


# --- issue 15: what another site, a long name and a browser without JavaScript do -------------------------

LONG = "n" * 3000


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    folder = tmp_path_factory.mktemp("browser")
    storage = make_study(folder, "seen", trials=1)
    with quiet_optuna():
        optuna.create_study(storage=storage, study_name=LONG).add_trial(optuna.trial.create_trial(value=0.5))
    dash = Dashboard(storage, folder / "work")
    dash.storage = storage
    yield dash
    dash.close()


@pytest.fixture(scope="module")
def other_site():
    """Another site on this machine (http://localhost:PORT, not 127.0.0.1): serves the page put in `pages`."""
    pages = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = pages.get(self.path, "").encode()
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://localhost:{server.server_port}", pages
    server.shutdown()


def test_another_site_cannot_frame_any_page_of_the_dashboard(site, browser, other_site, tmp_path):
    """A page on another site must not frame /optuna/dashboard, where a click on Delete would delete a study."""
    origin, pages = other_site
    study = site.links("seen")["page"]
    framed = ["/", study, "/optuna/dashboard", "/optuna/dashboard/studies/1"]
    pages["/prize"] = "<h1>Click to win</h1>" + "".join(
        f'<iframe src="{site.base}{path}" width="900" height="500"></iframe>' for path in framed
    )
    page = browser.new_page()
    page.goto(origin + "/prize", wait_until="load")  # load waits for the frames
    frames = [f for f in page.frames if f != page.main_frame]
    assert len(frames) == len(framed)
    for frame in frames:  # each refused by the browser: an error page instead of the dashboard
        frame.wait_for_load_state("load")
        assert frame.url.startswith("chrome-error://"), frame.url
    page.screenshot(path=str(tmp_path / "framed.png"))
    assert "seen" in {s["name"] for s in site.api("/api/studies")["studies"]}


def test_a_3000_character_name_wraps_instead_of_widening_the_page(site, browser):
    """Issue 15.4: the list was 24,000 px wide."""
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    for path in ("/", site.links(LONG)["page"]):
        page.goto(site.base + path)
        sync_api.expect(page.locator("h1")).to_be_visible()
        assert page.evaluate("document.documentElement.scrollWidth") <= 1280, path


def test_without_javascript_a_button_answers_with_a_page_that_leads_back(site, chromium):
    """Issue 15.7: without JavaScript the buttons landed on raw JSON."""
    before = site.study("seen")["finished"]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        page = browser.new_context(java_script_enabled=False).new_page()
        page.goto(site.base + "/")
        row = page.locator('tr[data-study="seen"]')
        row.locator('input[name="trials"]').fill(str(before + 1))
        row.locator('button[data-action="resume"]').click()
        sync_api.expect(page.locator("h1")).to_have_text("Done")
        sync_api.expect(page.locator('[data-field="result"]')).to_contain_text("started (pid")
        page.get_by_role("link", name="Back to the study").click()
        sync_api.expect(page.locator("h1")).to_have_text("seen")
        browser.close()
    ended = wait_for(lambda: (s := site.study("seen"))["worker"]["status"] != "running" and s, what="the worker to end")
    assert ended["worker"]["exit_code"] == 0 and ended["finished"] == before + 1


def test_the_token_link_opened_from_another_site_lets_the_browser_in(site, browser, other_site, tmp_path):
    """Issue 15.6: the cookie was SameSite=Strict, so after a link from another site the browser withheld it: 401."""
    dash = Dashboard(
        site.storage, tmp_path / "work", env={"BNNAS_DASHBOARD_TOKEN": "t0k-from-env"}, token="t0k-from-env"
    )
    try:
        origin, pages = other_site
        pages["/chat"] = f'<a id="go" href="{dash.base}/?token=t0k-from-env">the dashboard</a>'
        page = browser.new_page()
        page.goto(origin + "/chat")
        page.click("#go")
        sync_api.expect(page.locator("h1")).to_have_text("Studies")
        assert page.url == dash.base + "/"
    finally:
        dash.close()
