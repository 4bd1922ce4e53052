"""End to end in a real headless Chromium: list → Resume → finished count rises → Stop → screenshot."""

import shutil
import subprocess

import pytest
from optuna.trial import TrialState

from dashboard_support import Dashboard, make_study, trials

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
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])  # root in a container
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
                 return c !== null && Number(c.dataset.value) > n; }""", arg=before, timeout=TIMEOUT_MS)
    expect(state).to_have_text("running")

    row.locator('button[data-action="stop"]').click(timeout=TIMEOUT_MS)
    expect(page.locator("#flash")).to_contain_text("stop:")
    expect(state).to_have_text("idle", timeout=TIMEOUT_MS)
    page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000

    stored = trials(dash.storage, "digits-bn")
    assert before < len(stored) < 40 and all(t.state == TrialState.COMPLETE for t in stored)

    # the study page and optuna-dashboard's own views under /optuna/ render from the same storage
    page.click('a[href="/studies/digits-bn"]')
    expect(page.locator("svg.history")).to_be_visible()
    page.screenshot(path=str(tmp_path / "study.png"), full_page=True)
    page.goto(dash.base + "/optuna/dashboard")
    expect(page.get_by_text("digits-bn").first).to_be_visible(timeout=60_000)
    page.goto(dash.base + "/optuna/dashboard/studies/1")  # its API calls (trials, importances) under the prefix
    expect(page.get_by_text("Hyperparameter Importance").first).to_be_visible(timeout=60_000)
    page.screenshot(path=str(tmp_path / "optuna.png"))
