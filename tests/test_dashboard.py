"""nas-dashboard over real HTTP: a real server process, real digits studies in a real SQLite file."""

import io
import json
import subprocess
import sys
import time
import zipfile

import pytest
from optuna.trial import TrialState

from dashboard_support import Dashboard, make_study, trials, wait_for
from nas.archspec import describe_norms
from nas.storage import FINISHED


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dash")
    storage = make_study(folder, "seen", trials=2)
    make_study(folder, "worked", trials=1, epochs=2)  # resumed, then resumed again and stopped
    dash = Dashboard(storage, folder / "work")
    dash.storage = storage
    yield dash
    dash.close()


def finished(storage, name):
    return sum(t.state in FINISHED for t in trials(storage, name))


def test_list_shows_state_budget_best_loss_accuracy_and_layout_of_every_study(site):
    rows = {s["name"]: s for s in site.api("/api/studies")["studies"]}
    assert {"seen", "worked"} <= set(rows)
    seen = rows["seen"]
    stored = [t for t in trials(site.storage, "seen") if t.state == TrialState.COMPLETE]
    best = min(stored, key=lambda t: t.value)
    assert (seen["state"], seen["finished"], seen["budget"]) == ("finished", len(stored), 2)
    assert seen["best_cv_loss"] == pytest.approx(best.value)
    assert seen["best_cv_accuracy"] == pytest.approx(best.user_attrs["cv_accuracy"])
    assert seen["best_norms"] == describe_norms(best.user_attrs["arch"])
    status, _, page = site.get("/")
    assert status == 200 and 'href="/studies/seen"' in page and f"{seen['finished']} / 2" in page
    assert describe_norms(best.user_attrs["arch"]) in page
    status, _, fragment = site.get("/fragments/studies")
    assert status == 200 and "<table" in fragment and "<html" not in fragment


def test_study_page_shows_trials_with_norm_columns_loss_by_norm_and_history(site):
    data = site.api("/api/studies/seen")
    stored = trials(site.storage, "seen")
    assert [r["number"] for r in data["trials"]] == [t.number for t in stored]
    for row, trial in zip(data["trials"], stored):
        arch = trial.user_attrs["arch"]["stages"][0]["blocks"][0]
        assert row["norm_type"] == arch["norm"]["type"] and row["cv_loss"] == pytest.approx(trial.value)
    grid = data["norm_grid"]
    assert sum(c["count"] for c in grid["cells"].values()) == len(stored)
    assert [p["number"] for p in data["history"]] == [t.number for t in stored]
    assert data["history"][-1]["best"] == pytest.approx(min(t.value for t in stored))
    status, _, page = site.get("/studies/seen")
    assert status == 200 and "<svg" in page and "norm type" in page and "CV loss by norm type" in page
    for t in stored:
        assert t.user_attrs["arch"]["stages"][0]["blocks"][0]["norm"]["type"] in page
    status, _, fragment = site.get("/fragments/studies/seen")
    assert status == 200 and "Optimization history" in fragment and "<html" not in fragment
    assert site.get("/static/dashboard.js")[0] == 200


@pytest.mark.parametrize("method,path", [
    ("GET", "/studies/nope"), ("GET", "/api/studies/nope"), ("GET", "/fragments/studies/nope"), ("GET", "/studies/nope/log"),
    ("GET", "/studies/nope/exports/x/model.json"),
    ("POST", "/studies/nope/resume"), ("POST", "/studies/nope/stop"), ("POST", "/studies/nope/export"),
])
def test_a_study_name_not_in_the_storage_is_404(site, method, path):
    status = site.post(path)[0] if method == "POST" else site.get(path)[0]
    assert status == 404


def test_resume_runs_trials_to_the_new_budget_and_is_refused_while_running(site):
    status, body = site.post("/studies/worked/resume", {"trials": 3})
    assert status == 202, body
    status, body = site.post("/studies/worked/resume", {"trials": 5})
    assert status == 409 and "already" in body["error"]  # running, or has a live worker
    done = wait_for(lambda: (s := site.api("/api/studies/worked"))["state"] == "finished" and s, what="the resumed study to finish")
    assert done["finished"] == 3 == finished(site.storage, "worked")
    assert done["worker"]["status"] == "exited" and done["worker"]["exit_code"] == 0
    assert "Top 3 of 3 finished trials" in site.get("/studies/worked/log")[2]
    status, body = site.post("/studies/worked/resume")  # budget reached: nothing to run
    assert status == 409 and "give a budget above" in body["error"]
    assert site.post("/studies/worked/resume", {"trials": "many"})[0] == 400


def test_stop_lets_the_running_trial_complete_and_leaves_the_study_resumable(site):
    assert site.post("/studies/worked/stop")[0] == 409  # nothing runs now
    assert site.post("/studies/worked/resume", {"trials": 50})[0] == 202
    running = wait_for(lambda: [t.number for t in trials(site.storage, "worked") if t.state == TrialState.RUNNING], what="a running trial")
    status, body = site.post("/studies/worked/stop")
    assert status == 202, body
    after = wait_for(lambda: (s := site.api("/api/studies/worked"))["state"] == "idle" and s, what="the worker to stop")
    assert after["worker"]["exit_code"] == 0
    stored = trials(site.storage, "worked")
    assert all(t.state == TrialState.COMPLETE for t in stored)  # none FAIL (interrupted), none left RUNNING
    assert running[0] in [t.number for t in stored] and len(stored) <= running[0] + 2  # stopped at the next boundary
    assert finished(site.storage, "worked") < 50
    assert "Stopped on request" in site.get("/studies/worked/log")[2]


def test_export_best_runs_the_export_and_offers_its_files(site):
    status, body = site.post("/studies/seen/export")
    assert status == 202, body
    job = body["id"]
    assert site.post("/studies/seen/export")[0] == 409  # one export of a study at a time

    def done():
        exports = {e["id"]: e for e in site.api("/api/studies/seen")["exports"]}
        return exports[job]["status"] != "running" and exports[job]

    export = wait_for(done, timeout=240, what="the export")
    assert export["status"] == "done", site.get(f"/studies/seen/exports/{job}/log")[2]
    assert set(export["files"]) == {"model.ts", "model.pt2", "weights.pt", "model.json"}
    status, headers, text = site.get(f"/studies/seen/exports/{job}/model.json")
    best = min((t for t in trials(site.storage, "seen") if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    assert status == 200 and "attachment" in headers["Content-Disposition"] and json.loads(text)["trial"] == best.number
    conn_status, _, _ = site.get(f"/studies/seen/exports/{job}/export.zip")
    assert conn_status == 200
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", site.port)
    conn.request("GET", f"/studies/seen/exports/{job}/export.zip", headers={"Host": f"127.0.0.1:{site.port}"})
    names = zipfile.ZipFile(io.BytesIO(conn.getresponse().read())).namelist()
    assert sorted(names) == sorted(f"{job}/{f}" for f in export["files"])
    for sneaky in ("..%2F..%2Fnas.db", "..", "%2Fetc%2Fpasswd", "job.log"):
        assert site.get(f"/studies/seen/exports/{job}/{sneaky}")[0] == 404


def test_a_foreign_host_header_is_refused(site):
    status, _, body = site.request("GET", "/api/studies", headers={"Host": f"attacker.example:{site.port}"})
    assert status == 403 and "not allowed" in body
    assert site.request("GET", "/optuna/api/studies", headers={"Host": "attacker.example"})[0] == 403


def test_state_changes_need_post_from_the_same_origin_with_the_csrf_token(site):
    assert site.get("/studies/seen/resume")[0] == 405
    assert site.post("/studies/seen/stop", Origin=None)[0] == 403
    assert site.post("/studies/seen/stop", Origin="http://attacker.example")[0] == 403
    assert site.post("/studies/seen/stop", **{"X-CSRF-Token": None})[0] == 403
    assert site.post("/studies/seen/stop", **{"X-CSRF-Token": "forged"})[0] == 403
    assert site.post("/studies/seen/stop", {"csrf": site.csrf}, **{"X-CSRF-Token": None})[0] == 409  # form field works
    assert site.request("DELETE", "/optuna/api/studies/1", headers={"Origin": "http://attacker.example"})[0] == 403
    assert len(trials(site.storage, "seen")) == 2


def test_optuna_dashboard_is_mounted_under_its_prefix(site):
    status, headers, _ = site.get("/optuna/")
    assert status == 302 and headers["Location"].endswith("/optuna/dashboard")
    status, _, page = site.get("/optuna/dashboard/studies/1")
    assert status == 200 and 'src="/optuna/static/bundle.js"' in page
    status, _, bundle = site.get("/optuna/static/bundle.js")
    assert status == 200 and '}("/optuna"),' in bundle and 'url_prefix:"/optuna/dashboard"' in bundle
    status, headers, _ = site.request("GET", "/optuna/static/bundle.js", headers={"Accept-Encoding": "gzip"})
    assert status == 200 and headers["Content-Encoding"] == "gzip"
    names = {s["study_name"] for s in site.api("/optuna/api/studies")["study_summaries"]}
    assert {"seen", "worked"} <= names
    status, headers, _ = site.get("/csv/1")
    assert status == 302 and headers["Location"].endswith("/optuna/csv/1")
    status, _, csv = site.get("/optuna/csv/1")
    assert status == 200 and csv.startswith("Number,State")


def test_the_dashboard_polling_beside_a_running_search_does_not_fail_it(site, tmp_path):
    from conftest import write_digits_run
    from dashboard_support import SPACE

    config = write_digits_run(tmp_path, SPACE, site.storage, {"name": "beside", "sampler": "random", "trials": 3, "heartbeat_seconds": 1},
                              {"folds": 2, "epochs": 1})
    search = subprocess.Popen([sys.executable, "-m", "nas", "search", "--config", str(config), "--no-progress"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    statuses, refused = [], None
    while search.poll() is None:
        statuses += [site.get(path)[0] for path in ("/fragments/studies", "/fragments/studies/beside", "/optuna/api/studies")]
        status, _, body = site.get("/api/studies/beside")
        if refused is None and status == 200 and json.loads(body)["running_trials"]:
            refused = site.post("/studies/beside/resume", {"trials": 9})  # a worker we did not start: seen by its heartbeat
        time.sleep(0.5)  # a browser's polling pace, not synchronisation: the loop ends when the search does
    out, err = search.communicate()
    assert search.returncode == 0, err
    assert "locked" not in err and "Traceback" not in err
    assert set(statuses) <= {200, 404}  # 404: the study did not exist yet
    assert statuses.count(200) >= 3
    assert [t.state for t in trials(site.storage, "beside")] == [TrialState.COMPLETE] * 3
    assert refused is not None and refused[0] == 409


@pytest.fixture(scope="module")
def token_site(site, tmp_path_factory):
    class TokenDashboard(Dashboard):
        def auth(self):
            return {"Authorization": "Bearer s3cret"}

    dash = TokenDashboard(site.storage, tmp_path_factory.mktemp("tok"), "--host", "0.0.0.0", "--token", "s3cret")
    yield dash
    dash.close()


def test_beyond_loopback_every_request_needs_the_token(token_site):
    assert "?token=s3cret" in token_site.url
    for path in ("/", "/api/studies", "/studies/seen", "/optuna/api/studies", "/static/dashboard.js"):
        assert token_site.get(path)[0] == 401
        assert token_site.get(path, Authorization="Bearer wrong")[0] == 401
        assert token_site.get(path, Authorization="Bearer s3cret")[0] == 200
    status, headers, _ = token_site.get("/studies/seen?token=s3cret")
    assert status == 303 and headers["Location"] == "/studies/seen"
    cookie = headers["Set-Cookie"].split(";")[0]
    assert "HttpOnly" in headers["Set-Cookie"] and "SameSite=Strict" in headers["Set-Cookie"]
    assert token_site.get("/studies/seen", Cookie=cookie)[0] == 200
    assert token_site.post("/studies/seen/stop", Authorization=None, Cookie="nas_dashboard_token=nope")[0] == 401


@pytest.mark.parametrize("args,problem", [
    (["--host", "0.0.0.0"], "--host"),
    (["--storage", "sqlite:///{tmp}/missing.db"], "does not exist"),
    (["--storage", "nosuchdb://x"], "--storage"),
])
def test_bad_command_lines_exit_2_with_one_line(tmp_path, args, problem):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--storage" not in args:
        args += ["--storage", f"sqlite:///{tmp_path}/missing.db"]
    proc = subprocess.run([sys.executable, "-m", "nas", "dashboard", "--port", "0", *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and problem in proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
