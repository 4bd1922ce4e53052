"""Any study name works in the dashboard (issue 15.4), and one study with a bad attribute leaves the others readable
(15.5); itself it is shown, the attribute named (29.6)."""

import optuna
import pytest
from bottle import html_escape
from dashboard_support import Dashboard, make_study, trials, wait_for

from nas.study.schema import FINISHED
from nas.study.storage import quiet_optuna

pytestmark = pytest.mark.system  # starts a dashboard server process

ODD = ["a/b", "x</script><script>alert(1)</script>", "..", "-dash"]
LONG = "n" * 3000


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    folder = tmp_path_factory.mktemp("names")
    for name in ODD:
        storage = make_study(folder, name, trials=1)
    with quiet_optuna():
        optuna.create_study(storage=storage, study_name=LONG).add_trial(optuna.trial.create_trial(value=0.5))
        bad = optuna.create_study(storage=storage, study_name="bad")  # a trial whose arch is no ArchSpec
        bad.add_trial(optuna.trial.create_trial(value=0.1, user_attrs={"arch": {"stages": "oops"}}))
    dash = Dashboard(storage, folder / "work")
    dash.storage = storage
    yield dash
    dash.close()


@pytest.mark.parametrize("name", [*ODD, LONG])
def test_every_page_of_a_study_opens_from_its_link_whatever_its_name(site, name):
    """Names with '/' (and so any '</script>') got 404 on every route; '..' linked to '/'."""
    links = site.links(name)
    status, _, page = site.get(links["page"])
    assert status == 200 and f">{html_escape(name)}</h1>" in page
    assert "<script>alert" not in page
    assert site.api(links["api"])["name"] == name
    status, _, fragment = site.get(links["fragment"])
    assert status == 200 and f'data-study="{html_escape(name)}"' in fragment
    assert site.get(links["page"] + "/log")[0] == 200


def test_resume_and_export_of_a_name_beginning_with_a_dash_really_run(site):
    """`--study -dash` as two arguments: the worker exited 2 while the dashboard said "started"."""
    status, body = site.act("-dash", "resume", {"trials": 2})
    assert status == 202, body
    done = wait_for(lambda: (s := site.study("-dash"))["worker"]["status"] != "running" and s, what="the worker to end")
    assert done["worker"]["exit_code"] == 0, site.get(body["log"])[2]
    assert sum(t.state in FINISHED for t in trials(site.storage, "-dash")) == 2
    status, body = site.act("-dash", "export")
    assert status == 202, body

    def export():
        job = {e["id"]: e for e in site.study("-dash")["exports"]}[body["id"]]
        return job["status"] != "running" and job

    assert wait_for(export, timeout=240, what="the export")["status"] == "done"


def test_a_study_with_a_bad_arch_is_one_row_that_says_why(site):
    """A trial with arch = {"stages": "oops"} made / and /api/studies answer 500 (later: the study 'unreadable')."""
    rows = {s["name"]: s for s in site.api("/api/studies")["studies"]}
    problem = "trial 0: user attr 'arch': expected an ArchSpec"
    bad = rows["bad"]
    assert bad["state"] == "idle" and bad["finished"] == 1 and problem in bad["stored_problems"][0]
    assert {rows[name]["state"] for name in ODD} <= {"finished", "idle"} and rows["a/b"]["finished"] == 1
    for path in ("/", "/fragments/studies"):
        status, _, page = site.get(path)
        assert status == 200 and html_escape(problem) in page
        assert html_escape("a/b") in page and "1 / 1" in page  # the others as usual
    links = site.links("bad")
    status, _, page = site.get(links["page"])
    assert status == 200 and html_escape(problem) in page and '<tr class="trial-complete">' in page
    assert site.api(links["api"])["best_cv_loss"] == 0.1
    status, body = site.post(links["page"] + "/export")  # what needs the arch is refused with the reason
    assert status == 409 and problem in body["error"]
