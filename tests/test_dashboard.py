"""nas-dashboard over real HTTP: a real server process, real digits studies in a real SQLite file."""

import io
import json
import re
import subprocess
import sys
import time
import zipfile
from urllib.parse import urlsplit

import optuna
import psutil
import pytest
from bottle import html_escape
from dashboard_support import Dashboard, make_study, trials, wait_for
from optuna.trial import TrialState

from nas.search.archspec import describe_norms
from nas.study.schema import FINISHED, RUN_CONFIG_ATTR

pytestmark = pytest.mark.system  # starts dashboard server processes


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dash")
    storage = make_study(folder, "seen", trials=2)
    make_study(folder, "worked", trials=1, epochs=2)  # resumed, then resumed again and stopped
    make_study(folder, "quick", trials=1)  # stopped right after Resume
    make_study(folder, "broken", trials=1)  # its stored config made invalid: its worker dies at once
    make_study(folder, "spare", trials=1)  # idle with budget left: what an oversized form would resume
    store = optuna.storages.get_storage(storage)
    spare = store.get_study_id_from_name("spare")
    config = store.get_study_system_attrs(spare)[RUN_CONFIG_ATTR]
    store.set_study_system_attr(spare, RUN_CONFIG_ATTR, config | {"study": config["study"] | {"trials": 5}})
    broken = store.get_study_id_from_name("broken")
    config = store.get_study_system_attrs(broken)[RUN_CONFIG_ATTR]
    store.set_study_system_attr(broken, RUN_CONFIG_ATTR, config | {"evaluation": config["evaluation"] | {"folds": 1}})
    chart = optuna.create_study(storage=storage, study_name="chart")  # a history with improvements and setbacks
    for value in (3.0, 2.0, 2.5, 1.0, 1.5):
        chart.add_trial(optuna.trial.create_trial(value=value))
    dash = Dashboard(storage, folder / "work")
    dash.storage, dash.workdir = storage, folder / "work"
    yield dash
    dash.close()


def finished(storage, name):
    return sum(t.state in FINISHED for t in trials(storage, name))


def worker_ended(site, name):
    """The study's row once the worker started here has ended."""
    return wait_for(
        lambda: (s := site.study(name))["worker"]["status"] != "running" and s, what=f"the worker of {name} to end"
    )


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
    assert status == 200 and f'href="/studies/{seen["id"]}"' in page and f"{seen['finished']} / 2" in page
    assert describe_norms(best.user_attrs["arch"]) in page
    status, _, fragment = site.get("/fragments/studies")
    assert status == 200 and "<table" in fragment and "<html" not in fragment


def test_study_page_shows_trials_with_norm_columns_loss_by_norm_and_history(site):
    links = site.links("seen")
    data = site.api(links["api"])
    stored = trials(site.storage, "seen")
    assert [r["number"] for r in data["trials"]] == [t.number for t in stored]
    for row, trial in zip(data["trials"], stored):
        arch = trial.user_attrs["arch"]["stages"][0]["blocks"][0]
        assert row["norm_type"] == arch["norm"]["type"] and row["cv_loss"] == pytest.approx(trial.value)
    grid = data["norm_grid"]
    assert sum(c["count"] for c in grid["cells"].values()) == len(stored)
    assert [p["number"] for p in data["history"]] == [t.number for t in stored]
    assert data["history"][-1]["best"] == pytest.approx(min(t.value for t in stored))
    status, _, page = site.get(links["page"])
    assert status == 200 and "<svg" in page and "norm type" in page and "CV loss by norm type" in page
    for t in stored:
        assert t.user_attrs["arch"]["stages"][0]["blocks"][0]["norm"]["type"] in page
    status, _, fragment = site.get(links["fragment"])
    assert status == 200 and "Optimization history" in fragment and "<html" not in fragment
    assert site.get("/static/dashboard.js")[0] == 200


def test_a_study_is_found_by_its_name_too(site):
    status, headers, _ = site.get("/studies?name=seen")
    assert status == 303 and headers["Location"] == site.links("seen")["page"]
    assert site.get("/studies?name=nope")[0] == 404 and site.get("/studies")[0] == 400


@pytest.mark.parametrize(
    "method,path",
    [
        ("GET", "/studies/999"),
        ("GET", "/api/studies/999"),
        ("GET", "/fragments/studies/999"),
        ("GET", "/studies/999/log"),
        ("GET", "/studies/999/exports/x/model.json"),
        ("GET", "/studies/999/logs/x"),
        ("GET", "/studies/-1"),
        ("POST", "/studies/999/resume"),
        ("POST", "/studies/999/stop"),
        ("POST", "/studies/999/export"),
    ],
)
def test_a_study_id_not_in_the_storage_is_404(site, method, path):
    status = site.post(path)[0] if method == "POST" else site.get(path)[0]
    assert status == 404


def test_resume_runs_trials_to_the_new_budget_and_is_refused_while_running(site):
    status, body = site.act("worked", "resume", {"trials": 3})
    assert status == 202, body
    status, again = site.act("worked", "resume", {"trials": 5})
    # issue 15.8: the refusal names the worker, not "0 trial(s) with a live heartbeat" while it starts
    assert status == 409 and "already" in again["error"] and f"pid {body['pid']}" in again["error"]
    assert "0 trial(s)" not in again["error"]
    done = wait_for(
        lambda: (s := site.study("worked"))["state"] == "finished" and s, what="the resumed study to finish"
    )
    assert done["finished"] == 3 == finished(site.storage, "worked")
    assert done["worker"]["status"] == "exited" and done["worker"]["exit_code"] == 0
    assert "Top 3 of 3 finished trials" in site.get(body["log"])[2]
    status, body = site.act("worked", "resume")  # budget reached: nothing to run
    assert status == 409 and "give a budget above" in body["error"]
    assert site.act("worked", "resume", {"trials": "many"})[0] == 400


def test_stop_lets_the_running_trial_complete_and_leaves_the_study_resumable(site):
    assert site.act("worked", "stop")[0] == 409  # nothing runs now
    assert site.act("worked", "resume", {"trials": 50})[0] == 202
    running = wait_for(
        lambda: [t.number for t in trials(site.storage, "worked") if t.state == TrialState.RUNNING],
        what="a running trial",
    )
    status, body = site.act("worked", "stop")
    assert status == 202, body
    after = wait_for(lambda: (s := site.study("worked"))["state"] == "idle" and s, what="the worker to stop")
    assert after["worker"]["exit_code"] == 0
    stored = trials(site.storage, "worked")
    assert all(t.state == TrialState.COMPLETE for t in stored)  # none FAIL (interrupted), none left RUNNING
    assert running[0] in [t.number for t in stored] and len(stored) <= running[0] + 2  # stopped at the next boundary
    assert finished(site.storage, "worked") < 50
    assert "Stopped on request" in site.get(site.links("worked")["page"] + "/log")[2]


def test_stop_right_after_resume_stops_the_worker_before_its_budget(site):
    """Issue 15.3: the worker's stop clock starts at the dashboard's launch, not after its imports and data load."""
    before = finished(site.storage, "quick")
    status, body = site.act("quick", "resume", {"trials": before + 20})
    assert status == 202, body
    status, stopping = site.act("quick", "stop")
    assert status == 202, stopping
    assert site.study("quick")["state"] == "stopping"
    ended = worker_ended(site, "quick")
    assert ended["worker"]["exit_code"] == 0 and ended["state"] == "idle", ended
    assert finished(site.storage, "quick") == before  # asked before its first trial: it ran none
    assert "Stopped on request before the first trial" in site.get(body["log"])[2]


def test_the_list_shows_the_budget_a_starting_worker_was_given(site):
    """The new budget shows from the click on, not only once the worker has loaded its data and stored it."""
    before = site.study("quick")
    status, body = site.act("quick", "resume", {"trials": before["finished"] + 30})
    assert status == 202, body
    row = {s["name"]: s for s in site.api("/api/studies")["studies"]}["quick"]
    assert row["budget"] == before["finished"] + 30 != before["budget"] and row["state"] == "running"
    assert f'data-budget="{before["finished"] + 30}"' in site.get("/fragments/studies")[2]
    assert site.act("quick", "stop")[0] == 202
    worker_ended(site, "quick")


def test_a_worker_that_dies_at_once_shows_its_failure_and_log_line_on_its_row(site):
    """Issue 15.8: not a quiet return to idle after "resume: started"."""
    status, body = site.act("broken", "resume", {"trials": 5})
    assert status == 202, body
    ended = worker_ended(site, "broken")
    line = site.get(body["log"])[2].strip().splitlines()[-1]
    assert "folds" in line and ended["worker"]["exit_code"] == 2
    for path in ("/", "/fragments/studies", site.links("broken")["page"]):
        page = site.get(path)[2]
        assert "exited with code 2" in page and html_escape(line) in page
    row = {s["name"]: s for s in site.api("/api/studies")["studies"]}["broken"]
    assert row["worker"]["failed"] and row["worker"]["last_line"] == line


def test_export_best_runs_the_export_and_offers_its_files(site):
    status, body = site.act("seen", "export")
    assert status == 202, body
    job = body["id"]
    assert site.act("seen", "export")[0] == 409  # one export of a study at a time
    page = site.links("seen")["page"]

    def done():
        exports = {e["id"]: e for e in site.study("seen")["exports"]}
        return exports[job]["status"] != "running" and exports[job]

    export = wait_for(done, timeout=240, what="the export")
    assert export["status"] == "done", site.get(f"{page}/exports/{job}/log")[2]
    assert set(export["files"]) == {"model.ts", "model.pt2", "model.onnx", "weights.pt", "model.json"}
    status, headers, text = site.get(f"{page}/exports/{job}/model.json")
    best = min((t for t in trials(site.storage, "seen") if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    assert status == 200 and "attachment" in headers["Content-Disposition"] and json.loads(text)["trial"] == best.number
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", site.port)
    conn.request("GET", f"{page}/exports/{job}/export.zip", headers={"Host": f"127.0.0.1:{site.port}"})
    reply = conn.getresponse()
    assert reply.status == 200
    names = zipfile.ZipFile(io.BytesIO(reply.read())).namelist()
    assert sorted(names) == sorted(f"{job}/{f}" for f in export["files"])
    for sneaky in ("..%2F..%2Fnas.db", "..", "%2Fetc%2Fpasswd", "job.log", f"{job}.json"):
        assert site.get(f"{page}/exports/{job}/{sneaky}")[0] == 404


def test_exports_and_logs_are_listed_again_after_a_restart(site, tmp_path):
    """Issue 15.8: the files stay in --workdir, so a new dashboard on it lists them."""
    exports = [e for e in site.study("seen")["exports"] if e["status"] == "done"]
    worked = site.study("worked")
    assert exports and worked["worker"], "runs after the export and resume tests"
    again = Dashboard(site.storage, site.workdir)
    try:
        seen = again.study("seen")
        assert [(e["id"], e["status"], e["files"]) for e in seen["exports"]] == [
            (e["id"], e["status"], e["files"]) for e in exports
        ]
        page = again.links("seen")["page"]
        assert again.get(f"{page}/exports/{exports[0]['id']}/model.json")[0] == 200
        assert f"{page}/exports/{exports[0]['id']}/model.ts" in again.get(page)[2]
        log = again.study("worked")
        assert (
            log["worker"]["id"] == worked["worker"]["id"] and log["worker"]["status"] == "exited"
        )  # its exit code was recorded
        assert "Stopped on request" in again.get(again.links("worked")["page"] + "/log")[2]
        earlier = log["earlier_workers"]
        assert earlier and again.get(f"{again.links('worked')['page']}/logs/{earlier[0]['id']}")[0] == 200
    finally:
        again.close()


def test_the_history_is_a_step_line_of_the_best_so_far_with_ticked_axes(site):
    """Issue 15.8: best-so-far holds until the next improvement; both axes have readable ticks."""
    page = site.get(site.links("chart")["page"])[2]
    svg = page[page.index("<svg") : page.index("</svg>")]
    points = [
        tuple(map(float, p.split(",")))
        for p in re.search(r'<polyline points="([^"]+)" class="best"', svg).group(1).split()
    ]
    assert all(
        a[0] == b[0] or a[1] == b[1] for a, b in zip(points, points[1:])
    )  # only horizontal runs and vertical drops
    assert len({y for _, y in points}) == 3  # 3.0, then 2.0, then 1.0
    y_ticks = [float(t) for t in re.findall(r'text-anchor="end" class="tick">([^<]+)<', svg)]
    x_ticks = [int(t) for t in re.findall(r'text-anchor="middle" class="tick">([^<]+)<', svg)]
    assert len(y_ticks) >= 3 and min(y_ticks) <= 1.0 and max(y_ticks) >= 3.0
    assert x_ticks[0] == 0 and x_ticks[-1] == 4
    assert "trial number" in svg and "CV loss" in svg


def test_a_budget_takes_plain_digits_only(site):
    """Issue 15.7: int() would take '2_0' (and ' 20', '٢٠') as 20."""
    for bad in ("2_0", " 20", "٢٠", "20.0", "1e3", "+20"):
        status, body = site.act("seen", "resume", {"trials": bad})
        assert status == 400 and "trials" in body["error"], (bad, status, body)
    headers = {
        "Origin": site.base,
        "X-CSRF-Token": site.csrf,
        "Content-Type": "application/json",
        "Accept": "application/json",
    }
    for bad in ('{"trials": true}', '{"trials": 2.5}', '{"trials": "2_0"}'):
        status, _, text = site.request("POST", site.links("seen")["actions"]["resume"], bad, headers)
        assert status == 400 and "trials" in text, (bad, status, text)


def test_a_json_body_that_is_no_object_is_a_400(site):
    """Issue 15.7: a JSON list gave 500."""
    headers = {
        "Origin": site.base,
        "X-CSRF-Token": site.csrf,
        "Content-Type": "application/json",
        "Accept": "application/json",
    }
    for body in ("[1, 2]", '"x"', "3", "{not json"):
        status, _, text = site.request("POST", site.links("seen")["actions"]["export"], body, headers)
        assert status == 400, (body, status, text)
    status, _, text = site.request("POST", site.links("seen")["actions"]["resume"], '{"trials": 2}', headers)
    assert status == 409 and "give a budget above" in text  # an object is read


def test_a_forwarded_host_does_not_steer_a_redirect(site):
    """Issue 15.7: bottle.redirect built an absolute Location from X-Forwarded-Host."""
    status, headers, _ = site.get("/csv/1", **{"X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "https"})
    assert (
        status == 302
        and "evil" not in headers["Location"]
        and urlsplit(headers["Location"]).netloc in ("", f"127.0.0.1:{site.port}")
    )


def test_a_form_over_the_body_limit_is_refused_not_cut_short(site):
    """Issue 15.7: a 50 MB form was cut at 64 KiB and became a Resume with the stored budget."""
    assert site.study("spare")["state"] == "idle"
    resume = site.links("spare")["actions"]["resume"]
    form = {"Origin": site.base, "Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"}
    status, sent = site.upload(resume, form, 50 << 20, f"csrf={site.csrf}&pad=".encode(), b"&trials=1")
    assert status == 413 and sent < 50 << 20  # answered before the body was read
    status, _, text = site.request("POST", resume, f"csrf={site.csrf}&pad={'x' * (200 << 10)}&trials=1", form)
    assert status == 413, text  # over what the app reads of a form, under the server's cap: refused as well
    after = site.study("spare")
    assert after["state"] == "idle" and after["worker"] is None  # no worker started


def test_a_huge_multipart_body_is_refused_unread(site):
    """Issue 15.7: a 200 MB multipart body with a valid CSRF token cost the server 300 MB."""
    server = psutil.Process(site.process.pid)
    before = server.memory_info().rss
    headers = {"Origin": site.base, "X-CSRF-Token": site.csrf, "Content-Type": "multipart/form-data; boundary=b"}
    field = b'--b\r\nContent-Disposition: form-data; name="pad"\r\n\r\n'
    status, sent = site.upload(site.links("seen")["actions"]["export"], headers, 200 << 20, field, b"\r\n--b--\r\n")
    assert status == 413 and sent < 200 << 20
    assert server.memory_info().rss - before < 50 << 20
    assert not [e for e in site.study("seen")["exports"] if e["status"] == "running"]  # no export started


def test_a_foreign_host_header_is_refused(site):
    status, _, body = site.request("GET", "/api/studies", headers={"Host": f"attacker.example:{site.port}"})
    assert status == 403 and "not allowed" in body
    assert site.request("GET", "/optuna/api/studies", headers={"Host": "attacker.example"})[0] == 403


def test_state_changes_need_post_from_the_same_origin_with_the_csrf_token(site):
    actions = site.links("seen")["actions"]
    assert site.get(actions["resume"])[0] == 405
    assert site.post(actions["stop"], Origin=None)[0] == 403
    assert site.post(actions["stop"], Origin="http://attacker.example")[0] == 403
    assert site.post(actions["stop"], **{"X-CSRF-Token": None})[0] == 403
    assert site.post(actions["stop"], **{"X-CSRF-Token": "forged"})[0] == 403
    assert site.post(actions["stop"], {"csrf": site.csrf}, **{"X-CSRF-Token": None})[0] == 409  # form field works
    assert site.request("DELETE", "/optuna/api/studies/1", headers={"Origin": "http://attacker.example"})[0] == 403
    assert len(trials(site.storage, "seen")) == 2


def test_every_answer_forbids_framing(site):
    """Issue 15.2: a page on another site framed /optuna/dashboard and got a click on Delete through."""
    page = site.links("seen")["page"]
    answers = [
        site.get(path)
        for path in (
            "/",
            page,
            "/api/studies",
            "/fragments/studies",
            "/static/dashboard.css",
            "/studies/999",
            "/optuna/",
            "/optuna/dashboard",
            "/optuna/dashboard/studies/1",
            "/optuna/api/studies",
            "/optuna/static/bundle.js",
            "/csv/1",
            "/nope",
        )
    ]
    form = {"Origin": site.base, "X-CSRF-Token": site.csrf, "Content-Type": "application/x-www-form-urlencoded"}
    answers += [
        site.request("GET", "/", headers={"Host": "attacker.example"}),
        site.request("POST", page + "/stop", "", form | {"Origin": "http://attacker.example"}),
        site.request("POST", page + "/stop", "", form | {"Accept": "text/html"}),
        site.request("POST", page + "/stop", "", form | {"Accept": "application/json"}),
    ]
    for status, headers, *_ in answers:
        assert headers.get("X-Frame-Options") == "DENY", (status, headers)
        assert "frame-ancestors 'none'" in headers.get("Content-Security-Policy", ""), (status, headers)


def test_without_javascript_an_action_answers_with_a_page_not_json(site):
    """Issue 15.7: a plain form post (what a browser without JavaScript sends) landed on raw JSON."""
    page = site.links("seen")["page"]
    status, headers, text = site.request(
        "POST",
        page + "/stop",
        f"csrf={site.csrf}",
        {
            "Origin": site.base,
            "Content-Type": "application/x-www-form-urlencoded",
            "Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
        },
    )
    assert status == 409 and headers["Content-Type"].startswith("text/html")
    assert "is not running" in text and f'href="{page}"' in text and not text.lstrip().startswith("{")


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

    config = write_digits_run(
        tmp_path,
        SPACE,
        site.storage,
        {"name": "beside", "sampler": "random", "trials": 3, "heartbeat_seconds": 1},
        {"folds": 2, "epochs": 1},
    )
    search = subprocess.Popen(
        [sys.executable, "-m", "nas", "search", "--config", str(config), "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    statuses, refused = [], None
    while search.poll() is None:
        statuses += [site.get(path)[0] for path in ("/fragments/studies", "/optuna/api/studies")]
        row = {s["name"]: s for s in site.api("/api/studies")["studies"]}.get("beside")
        if row is not None:
            statuses += [site.get(f"/fragments/studies/{row['id']}")[0], site.get(f"/api/studies/{row['id']}")[0]]
            if refused is None and row["running_trials"]:
                refused = site.post(
                    f"/studies/{row['id']}/resume", {"trials": 9}
                )  # a worker we did not start: seen by its heartbeat
        time.sleep(0.5)  # a browser's polling pace, not synchronisation: the loop ends when the search does
    out, err = search.communicate()
    assert search.returncode == 0, err
    assert "locked" not in err and "Traceback" not in err
    assert set(statuses) == {200}
    assert statuses.count(200) >= 3
    assert [t.state for t in trials(site.storage, "beside")] == [TrialState.COMPLETE] * 3
    assert refused is not None and refused[0] == 409


@pytest.mark.parametrize(
    "args,problem",
    [
        (["--host", "0.0.0.0"], "--host"),
        (["--storage", "sqlite:///{tmp}/missing.db"], "does not exist"),
        (["--storage", "nosuchdb://x"], "--storage"),
        (["--token-file", "{tmp}/missing"], "--token-file"),
    ],
)
def test_bad_command_lines_exit_2_with_one_line(tmp_path, args, problem):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--storage" not in args:
        args += ["--storage", f"sqlite:///{tmp_path}/missing.db"]
    proc = subprocess.run(
        [sys.executable, "-m", "nas", "dashboard", "--port", "0", *args], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and problem in proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
