"""The dashboard's routes: pages, HTML fragments the pages poll, a JSON API, and the actions.

Studies are addressed by their id (`/studies/3`): a name may hold any character (`/`, `..`,
`</script>`), and none has to survive a URL path. Every route that names a study checks the
id against the storage first (unknown → 404). Actions are POST only; the Guard in front
(security.py) has already checked Origin and CSRF. They answer JSON to the page's script and
a small HTML page to a browser without JavaScript.
"""

from __future__ import annotations

import functools
import io
import json
import re
import threading
import zipfile
from pathlib import Path

import bottle
import optuna
from optuna.trial import TrialState

from nas.dashboard import state
from nas.dashboard.charts import history_svg, intervals_svg
from nas.dashboard.workers import Workers
from nas.errors import one_line
from nas.study.contract import show
from nas.study.schema import StoredAttrError, request_stop

HERE = Path(__file__).parent
TEMPLATES = [str(HERE / "templates")]
POLL_MS = 1500  # how often pages refresh their live parts
MAX_TRIALS = 100_000
DIGITS = re.compile(r"[0-9]{1,9}")  # int() would also take "2_0", " 20 " and other scripts' digits


class BadInput(Exception):
    """A field of an action that is not what the action takes: a 400 naming the field."""


def create_app(
    storage: optuna.storages.BaseStorage, workers: Workers, csrf_token: str, logout: bool = False
) -> bottle.Bottle:
    """The Bottle app for one storage (optuna-dashboard is dispatched beside it, see server.py).

    `logout`: pages show a Logout button (token mode; the Guard serves the route)."""
    app = bottle.Bottle()
    action_lock = threading.Lock()  # check-then-start must not interleave between two clicks

    def checked(study_id: int) -> str:
        """The study's name; 404 when the storage has no such id."""
        try:
            return storage.get_study_name_from_id(study_id)
        except KeyError:
            raise bottle.HTTPError(404, f"no study with id {study_id} in this storage") from None

    def read(what, name: str, study_id: int) -> dict:
        """`state.summarize` or `state.detail` of a study, with the latest worker started here (its failure, if
        any, is what the user needs to see), both from one look at that worker."""
        job = workers.search_job(name, study_id)
        worker = job.as_dict() if job else None
        own = job if worker and worker["status"] == "running" and job.started_here else None
        return state.readable(what, storage, name, own) | {"worker": worker}

    def summary(name: str, study_id: int) -> dict:
        return read(state.summarize, name, study_id)

    def rows() -> list[dict]:
        return [
            summary(s.study_name, s._study_id) for s in sorted(storage.get_all_studies(), key=lambda s: s.study_name)
        ]

    def detail(study_id: int) -> dict:
        name = checked(study_id)
        data = read(state.detail, name, study_id)
        if data["worker"]:
            data["worker"]["log_tail"] = workers.search_job(name, study_id).log_tail(2000)
        data["earlier_workers"] = [j.as_dict() for j in workers.search_jobs(name, study_id)[:-1]]
        data["exports"] = [j.as_dict() for j in workers.export_jobs(name, study_id)]
        return data

    def render(template: str, **values) -> str:
        return bottle.template(
            template, template_lookup=TEMPLATES, csrf=csrf_token, logout=logout, poll_ms=POLL_MS, show=show, **values
        )

    def answer(status: int, study_id: int | None = None, **body) -> bottle.HTTPResponse:
        """An action's answer: JSON for the page's script and API clients, a page for a plain form post."""
        if _wants_html():
            page = render(
                "result.tpl", status=status, body=body, study_id=study_id, title="done" if status < 400 else "refused"
            )
            return bottle.HTTPResponse(page, status=status, headers={"Content-Type": "text/html; charset=utf-8"})
        return bottle.HTTPResponse(json.dumps(body), status=status, headers={"Content-Type": "application/json"})

    def action(route):
        """A POST route whose bad input becomes a 400 answer naming the field."""

        @functools.wraps(route)
        def wrapped(*args, **kwargs):
            try:
                return route(*args, **kwargs)
            except BadInput as exc:
                return answer(400, kwargs.get("study_id"), error=str(exc))

        return wrapped

    @app.get("/static/<filename>")
    def static(filename):
        return bottle.static_file(filename, root=str(HERE / "static"))

    # --- pages and what they poll -------------------------------------------------------------

    @app.get("/")
    def studies_page():
        return render("studies.tpl", studies=rows(), comparisons=state.comparisons(storage))

    @app.get("/fragments/studies")
    def studies_fragment():
        return render("studies_table.tpl", studies=rows())

    @app.get("/api/studies")
    def studies_api():
        return {"studies": rows()}

    @app.get("/studies")
    def study_by_name():  # /studies?name=NAME: for a person (or script) who knows the name
        name = bottle.request.query.getunicode("name")
        if name is None:
            raise bottle.HTTPError(400, "give ?name=STUDY (or open /studies/ID)")
        try:
            study_id = storage.get_study_id_from_name(name)
        except KeyError:
            raise bottle.HTTPError(404, f"no study named {name!r} in this storage") from None
        return bottle.HTTPResponse(status=303, headers={"Location": f"/studies/{study_id}"})

    @app.get("/studies/<study_id:int>")
    def study_page(study_id):
        data = detail(study_id)
        within = next((c for c in state.comparisons(storage) if study_id in {cell["id"] for cell in c["cells"]}), None)
        return render("study.tpl", s=data, history_svg=history_svg, comparison=within)

    @app.get("/fragments/studies/<study_id:int>")
    def study_fragment(study_id):
        return render("study_live.tpl", s=detail(study_id), history_svg=history_svg)

    @app.get("/api/studies/<study_id:int>")
    def study_api(study_id):
        return detail(study_id)

    def comparison(study_id: int) -> dict:
        """The comparison holding the cell study `study_id` (any of its cells' ids names it); 404 when there is none."""
        name = checked(study_id)
        try:
            found = state.comparison(storage, study_id)
        except StoredAttrError as exc:  # a cell's stored re-evaluation of another shape: name it, not a 500
            raise bottle.HTTPError(
                409, f"the comparison holding study '{name}' cannot be read: {one_line(exc)}"
            ) from None
        if found is None:
            raise bottle.HTTPError(404, f"study '{name}' is no cell of a nas-compare comparison")
        return found

    @app.get("/comparisons/<study_id:int>")
    def comparison_page(study_id):
        return render("comparison.tpl", c=comparison(study_id), intervals_svg=intervals_svg)

    @app.get("/api/comparisons/<study_id:int>")
    def comparison_api(study_id):
        return comparison(study_id)

    def text(body: str) -> str:
        bottle.response.content_type = "text/plain; charset=utf-8"
        return body

    @app.get("/studies/<study_id:int>/log")
    def worker_log(study_id):
        job = workers.search_job(checked(study_id), study_id)
        return text(job.log_tail(200_000) if job else "no worker started by this dashboard for this study\n")

    @app.get("/studies/<study_id:int>/logs/<job_id>")
    def earlier_log(study_id, job_id):
        return text(_job(study_id, "search", job_id).log_tail(200_000))

    # --- actions -------------------------------------------------------------------------------

    @app.post("/studies/<study_id:int>/resume")
    @action
    def resume(study_id):
        name = checked(study_id)
        trials = _int_field("trials")
        with action_lock:
            s = summary(name, study_id)
            if s["state"] == "unreadable":
                return answer(409, study_id, error=f"study '{name}' cannot be resumed: {s['error']}")
            if s["live_workers"]:
                return answer(
                    409,
                    study_id,
                    error=f"study '{name}' already has a live worker ({s['live_workers_text']}): "
                    "it runs the budget; Stop it first to resume with another",
                )
            if s["state"] in ("running", "stopping"):
                return answer(409, study_id, error=f"study '{name}' is already running: {s['running_text']}")
            if not s["resumable"]:
                return answer(409, study_id, error=f"study '{name}' cannot be resumed: {s['resume_refused']}")
            budget = trials if trials is not None else s["budget"]
            if budget is not None and budget <= s["finished"]:
                return answer(
                    409,
                    study_id,
                    error=(
                        f"study '{name}' already has {s['finished']} finished trials: "
                        "give a budget above that to run more"
                    ),
                )
            job = workers.start_search(name, study_id, trials)
        return answer(
            202,
            study_id,
            started=True,
            message=f"started (pid {job.pid}, budget {budget})",
            pid=job.pid,
            budget=budget,
            log=f"/studies/{study_id}/log",
        )

    @app.post("/studies/<study_id:int>/stop")
    @action
    def stop(study_id):
        name = checked(study_id)
        s = summary(name, study_id)
        if s["state"] not in ("running", "stopping", "unreadable"):  # an unreadable study may still have a worker
            return answer(409, study_id, error=f"study '{name}' is not running")
        request_stop(storage, name)
        return answer(202, study_id, stopping=True, message="each worker stops after its current trial")

    @app.post("/studies/<study_id:int>/export")
    @action
    def export(study_id):
        name = checked(study_id)
        trial = _int_field("trial", minimum=0)
        complete = storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.COMPLETE,))
        if trial is None and not complete:
            return answer(409, study_id, error=f"study '{name}' has no completed trial to export yet")
        if trial is not None and trial not in {t.number for t in complete}:
            return answer(409, study_id, error=f"study '{name}' has no completed trial {trial}")
        if trial is None and (refused := summary(name, study_id)["export_refused"]):
            return answer(409, study_id, error=f"study '{name}' cannot export its best trial: {refused}")
        if trial is None and len(storage.get_study_directions(study_id)) > 1:
            return answer(
                409,
                study_id,
                error="a multi-objective study has no single best trial: give a trial number of its Pareto front",
            )
        with action_lock:
            if workers.export_running(name, study_id):
                return answer(409, study_id, error=f"an export of '{name}' is already running")
            job = workers.start_export(name, study_id, trial)
        return answer(
            202,
            study_id,
            started=True,
            id=job.id,
            message=f"export {job.id} started; its files appear on the study page",
        )

    def _job(study_id: int, kind: str, job_id: str):
        job = workers.job(checked(study_id), study_id, kind, job_id)
        if job is None:
            raise bottle.HTTPError(404, f"no such {kind} job")
        return job

    @app.get("/studies/<study_id:int>/exports/<job_id>/log")
    def export_log(study_id, job_id):
        return text(_job(study_id, "export", job_id).log_tail(200_000))

    @app.get("/studies/<study_id:int>/exports/<job_id>/<filename>")
    def export_file(study_id, job_id, filename):
        job = _job(study_id, "export", job_id)
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
        # a relative Location: bottle.redirect would make it absolute from the request's (forwarded) host
        return bottle.HTTPResponse(
            status=302, headers={"Location": f"/optuna/csv/{study_id}" + (f"?{query}" if query else "")}
        )

    @app.get("/artifacts/<rest:re:[0-9]+(/[0-9]+)?/[0-9a-fA-F-]+>")
    def optuna_artifact(rest):  # some of its artifact links (image previews) are absolute too
        return bottle.HTTPResponse(status=302, headers={"Location": f"/optuna/artifacts/{rest}"})

    @app.error(400)
    @app.error(404)
    @app.error(405)
    @app.error(413)
    def plain_error(error):
        bottle.response.content_type = "text/plain; charset=utf-8"
        return f"{error.status}: {error.body}\n"

    return app


def _wants_html() -> bool:
    """A browser's own form post (no JavaScript) asks for HTML first; the page's script and API clients do not."""
    accept = bottle.request.get_header("Accept", "")
    return accept.split(",")[0].strip().startswith("text/html")


def _int_field(key: str, minimum: int = 1) -> int | None:
    """An optional whole-number form or JSON field; anything else is BadInput naming the field."""
    raw = bottle.request.forms.get(key)
    if raw is None and bottle.request.json is not None:
        body = bottle.request.json
        if not isinstance(body, dict):
            raise BadInput(f"expected a JSON object with the fields, got a {type(body).__name__}")
        raw = body.get(key)
    if raw in (None, ""):
        return None
    if isinstance(raw, bool) or not (isinstance(raw, int) or (isinstance(raw, str) and DIGITS.fullmatch(raw))):
        raise BadInput(f"{key}: expected a whole number in plain digits, got {raw!r}")
    value = int(raw)
    if not minimum <= value <= MAX_TRIALS:
        raise BadInput(f"{key}: must be between {minimum} and {MAX_TRIALS}, got {value}")
    return value
