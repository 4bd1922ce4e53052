"""The dashboard shows a nas-compare run as one thing: a page that groups its cell studies, ranks them with
nas-compare's own table, draws their intervals and links each cell's study (a real comparison, a real server)."""

import json
import re

import pytest
import yaml
from bottle import html_escape
from conftest import write_digits_run
from dashboard_support import Dashboard, make_study

from nas.cli import compare_main
from nas.compare.report import rows

pytestmark = pytest.mark.system  # starts a dashboard server process

SPACE = {
    "stages": 1,
    "width": 8,
    "block": {"norm": {"type": "batch", "position": "post_conv"}},
    "training": {"lr": {"float": [0.01, 0.1], "log": True}, "batch_size": 32},
}
VARIANTS = {
    "<i>bn</i>": {"block.norm.type": "batch"},
    "none": {"block.norm.type": "none"},
}  # a name the page must escape


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dash-compare")
    storage = make_study(folder, "plain", trials=1)  # a study that is no cell
    (folder / "variants.yaml").write_text(yaml.safe_dump(VARIANTS))
    write_digits_run(folder, SPACE, storage, {"name": "cmp", "sampler": "random"}, {"folds": 2, "epochs": 1})
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        assert (
            compare_main(
                [
                    "--config",
                    "run.yaml",
                    "--factor",
                    "norm=variants.yaml",
                    "--trials-per-cell",
                    "2",
                    "--seeds",
                    "2",
                    "--no-progress",
                    "--out",
                    "out",
                ]
            )
            == 0
        )
    dash = Dashboard(storage, folder / "work")
    dash.storage = storage
    dash.result = json.loads((folder / "out" / "compare.json").read_text())
    yield dash
    dash.close()


def comparison_link(site) -> str:
    status, _, page = site.get("/")
    assert status == 200
    links = re.findall(r'<a href="(/comparisons/\d+)">cmp\[…\]</a>: 2 cells over norm', page)
    assert len(links) == 1, page
    return links[0]


def test_the_list_links_one_page_per_comparison_whose_table_is_nas_compares(site):
    link = comparison_link(site)
    data = site.api("/api" + link)
    header, body = rows(site.result)  # what nas-compare printed and wrote, by the same function
    assert data["header"] == header and data["body"] == body
    assert [c["study"] for c in data["ranked"]] == [
        c["study"] for c in sorted(site.result["cells"], key=lambda c: c["stats"]["loss"]["mean"])
    ]
    assert {c["study"]: c["counts"] for c in data["result"]["cells"]} == {
        c["study"]: c["counts"] for c in site.result["cells"]
    }


def test_the_page_shows_the_table_the_intervals_and_links_each_cells_study(site):
    link = comparison_link(site)
    status, _, page = site.get(link)
    assert status == 200
    studies = {s["name"]: s["id"] for s in site.api("/api/studies")["studies"]}
    for cell in site.result["cells"]:
        assert f'<a href="/studies/{studies[cell["study"]]}">{html_escape(cell["study"])}</a>' in page
        assert (
            f"{cell['stats']['loss']['low']:.4f}, {cell['stats']['loss']['high']:.4f}" in page
        )  # its interval in the table
    assert page.count('<tr data-cell="') == 2 and '<svg class="intervals"' in page and page.count("<circle") == 2
    assert "<i>bn</i>" not in page and html_escape("<i>bn</i>") in page  # a cell's name is text, never markup
    for cell in site.result["cells"]:  # and each cell's page leads back
        assert (
            f'<a href="{link}" data-field="comparison">cmp[…]</a>' in site.get(f"/studies/{studies[cell['study']]}")[2]
        )
    assert 'data-field="comparison"' not in site.get(f"/studies/{studies['plain']}")[2]
    # any cell's id names the same comparison
    other = studies["cmp[none]"] if link.endswith(f"/{studies['cmp[<i>bn</i>]']}") else studies["cmp[<i>bn</i>]"]
    assert site.api(f"/api/comparisons/{other}")["id"] == int(link.rsplit("/", 1)[1])


def test_a_study_that_is_no_cell_and_an_unknown_id_are_404(site):
    plain = next(s["id"] for s in site.api("/api/studies")["studies"] if s["name"] == "plain")
    status, _, body = site.get(f"/comparisons/{plain}")
    assert status == 404 and "is no cell of a nas-compare comparison" in body
    assert site.get("/comparisons/999999")[0] == 404


try:  # a real headless Chromium, set up as tests/test_dashboard_browser.py does (Debian's chromium)
    from test_dashboard_browser import TIMEOUT_MS, browser, chromium, sync_api  # noqa: F401 (fixtures)
except pytest.skip.Exception:
    sync_api = None


@pytest.mark.skipif(sync_api is None, reason="pip install playwright (dev extra)")
def test_in_a_browser_the_list_leads_to_the_comparison_and_on_to_each_cell(site, browser):
    expect = sync_api.expect
    page = browser.new_page(viewport={"width": 1400, "height": 800})
    page.goto(site.base + "/")
    page.get_by_role("link", name="cmp[…]").click()
    expect(page.locator("h1")).to_have_text("Comparison cmp[…]", timeout=TIMEOUT_MS)
    expect(page.locator("tr[data-cell]")).to_have_count(2)
    expect(page.locator("svg.intervals circle")).to_have_count(2)
    page.locator('tr[data-cell="<i>bn</i>"] td.name a').click()  # the label is text: the selector finds it as written
    expect(page.locator("h1")).to_have_text("cmp[<i>bn</i>]", timeout=TIMEOUT_MS)
    assert re.fullmatch(rf"{re.escape(site.base)}/studies/\d+", page.url)


def test_a_cell_whose_stored_reevaluation_has_another_shape_is_named_not_a_server_error(site):
    import optuna

    from nas.study.schema import COMPARE_REEVAL_ATTR

    link = comparison_link(site)
    store = optuna.storages.RDBStorage(site.storage)
    cell = store.get_study_id_from_name(site.result["cells"][0]["study"])
    kept = store.get_study_system_attrs(cell)[COMPARE_REEVAL_ATTR]
    store.set_study_system_attr(
        cell, COMPARE_REEVAL_ATTR, {"trial": kept["trial"], "seeds": {"1": "not scores"}}
    )  # another writer's
    try:
        status, _, page = site.get(link)
        assert status == 409 and html_escape(f"study attr '{COMPARE_REEVAL_ATTR}': expected") in page
        assert site.get("/")[0] == 200 and comparison_link(site) == link  # the list still shows the comparison
    finally:
        store.set_study_system_attr(cell, COMPARE_REEVAL_ATTR, kept)
        store.engine.dispose()
