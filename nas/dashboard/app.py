"""The dashboard's routes: pages, HTML fragments the pages poll, a JSON API, and the actions.

Every route that names a study checks the name against the storage first (unknown → 404).
Actions are POST only; the Guard in front (security.py) has already checked Origin and CSRF.
"""

from __future__ import annotations

import io
import json
import threading
import zipfile
from pathlib import Path
from urllib.parse import quote

import bottle
import optuna
from optuna.trial import TrialState

from nas.contract import show
from nas.dashboard import state
from nas.dashboard.charts import history_svg
from nas.dashboard.workers import Workers
from nas.storage import request_stop

HERE = Path(__file__).parent
TEMPLATES = [str(HERE / "templates")]
POLL_MS = 1500  # how often pages refresh their live parts
MAX_TRIALS = 100_000


def _json(status: int, **body) -> bottle.HTTPResponse:
    return bottle.HTTPResponse(json.dumps(body), status=status, headers={"Content-Type": "application/json"})


def create_app(storage: optuna.storages.BaseStorage, workers: Workers, csrf_token: str) -> bottle.Bottle:
    """The Bottle app for one storage (optuna-dashboard is dispatched beside it, see server.py)."""
    app = bottle.Bottle()
    action_lock = threading.Lock()  # check-then-start must not interleave between two clicks

    def names() -> list[str]:
        return sorted(s.study_name for s in storage.get_all_studies())

    def checked(name: str) -> str:
        if name not in names():
            raise bottle.HTTPError(404, f"no study named {name!r} in this storage")
        return name

    def summary(name: str) -> dict:
        return state.summarize(storage, name, workers.live_search_started(name))

    def render(template: str, **values) -> str:
        return bottle.template(template, template_lookup=TEMPLATES, csrf=csrf_token, poll_ms=POLL_MS, q=lambda n: quote(n, safe=""),
                               show=show, **values)

    def detail(name: str) -> dict:
        data = state.detail(storage, name, workers.live_search_started(name))
        job = workers.search_job(name)
        data["worker"] = job.as_dict() | {"log_tail": job.log_tail(2000)} if job else None
        data["exports"] = [j.as_dict() for j in workers.export_jobs(name)]
        return data

    @app.hook("after_request")
    def headers() -> None:
        bottle.response.set_header("X-Content-Type-Options", "nosniff")
        bottle.response.set_header("X-Frame-Options", "DENY")
        bottle.response.set_header("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'")
        bottle.response.set_header("Referrer-Policy", "same-origin")

    @app.get("/static/<filename>")
    def static(filename):
        return bottle.static_file(filename, root=str(HERE / "static"))

    # --- pages and what they poll -------------------------------------------------------------

    @app.get("/")
    def studies_page():
        return render("studies.tpl", studies=[summary(n) for n in names()])

    @app.get("/fragments/studies")
    def studies_fragment():
        return render("studies_table.tpl", studies=[summary(n) for n in names()])

    @app.get("/api/studies")
    def studies_api():
        return {"studies": [summary(n) for n in names()]}

    @app.get("/studies/<name>")
    def study_page(name):
        return render("study.tpl", s=detail(checked(name)), history_svg=history_svg)

    @app.get("/fragments/studies/<name>")
    def study_fragment(name):
        return render("study_live.tpl", s=detail(checked(name)), history_svg=history_svg)

    @app.get("/api/studies/<name>")
    def study_api(name):
        return detail(checked(name))

    @app.get("/studies/<name>/log")
    def worker_log(name):
        job = workers.search_job(checked(name))
        bottle.response.content_type = "text/plain; charset=utf-8"
        return job.log_tail(200_000) if job else "no worker started by this dashboard for this study\n"

    # --- actions -------------------------------------------------------------------------------

    @app.post("/studies/<name>/resume")
    def resume(name):
        name = checked(name)
        trials = _int_field("trials")
        with action_lock:
            s = summary(name)
            if s["live_workers"]:
                return _json(409, error=f"study '{name}' already has a live worker ({s['live_workers_text']}): "
                                        "it runs the budget; Stop it first to resume with another")
            if s["state"] in ("running", "stopping"):
                return _json(409, error=f"study '{name}' is already running ({s['running_trials']} trial(s) with a live heartbeat)")
            if not s["resumable"]:
                return _json(409, error=f"study '{name}' has no stored run config (not made by nas-search): it cannot be resumed")
            budget = trials if trials is not None else s["budget"]
            if budget is not None and budget <= s["finished"]:
                return _json(409, error=f"study '{name}' already has {s['finished']} finished trials: give a budget above that to run more")
            job = workers.start_search(name, trials)
        return _json(202, started=True, pid=job.process.pid, budget=budget, log=f"/studies/{quote(name, safe='')}/log")

    @app.post("/studies/<name>/stop")
    def stop(name):
        name = checked(name)
        s = summary(name)
        if s["state"] not in ("running", "stopping"):
            return _json(409, error=f"study '{name}' is not running")
        request_stop(storage, name)
        return _json(202, stopping=True, message="each worker stops after its current trial")

    @app.post("/studies/<name>/export")
    def export(name):
        name = checked(name)
        trial = _int_field("trial", minimum=0)
        study_id = storage.get_study_id_from_name(name)
        complete = storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.COMPLETE,))
        if trial is None and not complete:
            return _json(409, error=f"study '{name}' has no completed trial to export yet")
        if trial is not None and trial not in {t.number for t in complete}:
            return _json(409, error=f"study '{name}' has no completed trial {trial}")
        if trial is None and len(storage.get_study_directions(study_id)) > 1:
            return _json(409, error="a multi-objective study has no single best trial: give a trial number of its Pareto front")
        with action_lock:
            if workers.export_running(name):
                return _json(409, error=f"an export of '{name}' is already running")
            job = workers.start_export(name, study_id, trial)
        return _json(202, started=True, id=job.out.name)

    def _export_job(name: str, job_id: str):
        job = workers.export_job(checked(name), job_id)
        if job is None:
            raise bottle.HTTPError(404, "no such export")
        return job

    @app.get("/studies/<name>/exports/<job_id>/log")
    def export_log(name, job_id):
        bottle.response.content_type = "text/plain; charset=utf-8"
        return _export_job(name, job_id).log_tail(200_000)

    @app.get("/studies/<name>/exports/<job_id>/<filename>")
    def export_file(name, job_id, filename):
        job = _export_job(name, job_id)
        if filename == "export.zip" and job.files():
            buffer = io.BytesIO()
            with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
                for file in job.files():
                    archive.write(job.out / file, f"{job_id}/{file}")
            bottle.response.content_type = "application/zip"
            bottle.response.set_header("Content-Disposition", f'attachment; filename="{job_id}.zip"')
            return buffer.getvalue()
        if filename not in job.files():  # a fixed list of names: no path reaches the file system
            raise bottle.HTTPError(404, "no such file in this export")
        return bottle.static_file(filename, root=str(job.out), download=filename)

    # --- optuna-dashboard -----------------------------------------------------------------------

    @app.get("/csv/<study_id:int>")
    def optuna_csv(study_id):  # optuna-dashboard's CSV links are absolute: send them under its prefix
        query = bottle.request.query_string
        bottle.redirect(f"/optuna/csv/{study_id}" + (f"?{query}" if query else ""), 302)

    @app.error(404)
    @app.error(400)
    def plain_error(error):
        bottle.response.content_type = "text/plain; charset=utf-8"
        return f"{error.status}: {error.body}\n"

    return app


def _int_field(key: str, minimum: int = 1) -> int | None:
    """An optional integer form / JSON field; a bad value is a 400 naming the field."""
    raw = bottle.request.forms.get(key)
    if raw is None and bottle.request.json:
        raw = bottle.request.json.get(key)
    if raw in (None, ""):
        return None
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise bottle.HTTPError(400, f"{key}: expected an integer, got {raw!r}") from None
    if not minimum <= value <= MAX_TRIALS:
        raise bottle.HTTPError(400, f"{key}: must be between {minimum} and {MAX_TRIALS}, got {value}")
    return value
