"""What the dashboard shows about studies, read from the storage only (never a write).

A study is `running` while a worker is recorded live in it (`nas.study.workers`: from its start,
while it loads data, between trials), a worker beats for one of its RUNNING trials, or a
worker this dashboard started is still alive; `stopping` while running with a stop request
newer than its latest trial start; `finished` when its budget of finished trials is reached;
`idle` otherwise (resumable). An attribute of the wrong type (any writer of the storage can write
one) is named in `stored_problems` and left out; the rest of the study is shown, and Resume is
refused while the stored run config is bad. `unreadable` is left for what fails otherwise (the row
says why; the other studies are shown as usual). The cell studies of a `nas-compare` run are
also shown together, as one comparison, ranked by nas-compare's own functions.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import optuna
import sqlalchemy
from optuna.trial import FrozenTrial, TrialState

from nas.errors import one_line
from nas.search.archspec import (
    MIXED,
    NO_POSITION,
    NORM_ORDER,
    POSITION_ORDER,
    blocks,
    describe_activations,
    describe_layout,
    describe_norms,
    model_family,
    norm_group,
    order_key,
)
from nas.search.config import StudyConfig
from nas.study.schema import (
    ARCH_ATTR,
    DUPLICATE_ATTR,
    FAIL_REASON_ATTR,
    PRUNED_AT_STEP_ATTR,
    VERSION_ATTR,
    StoredAttrError,
    budget_count,
    config_value,
    counts_toward_budget,
    finite,
    is_duplicate,
    is_feasible,
    read_config_history,
    read_run_config,
    read_stop_request,
    trial_attr,
)
from nas.study.storage import rdb_engine
from nas.study.workers import describe_workers, live_workers

HEARTBEAT_DEFAULT = StudyConfig.heartbeat_seconds  # studies stored before the field existed


class Problems(list):
    """The stored attributes a page could not use, one line each (attribute, trial or study, what was expected)."""

    def read(self, reader, *args, default=None):
        """`reader(*args)`, or `default` with the StoredAttrError's line added."""
        try:
            return reader(*args)
        except StoredAttrError as exc:
            self.add(str(exc))
            return default

    def add(self, line: str) -> None:
        if line not in self:
            self.append(line)


def foreign_activation(arch: dict) -> str:
    """`own` for a timm / torchvision / factory model (its activations are its own), else nothing."""
    return describe_activations(arch) if model_family(arch) else ""


def arch_view(t: FrozenTrial, problems: Problems) -> dict:
    """What the tables show of a trial's ArchSpec; {} when it has none, or one the describers cannot read (named)."""
    arch = problems.read(trial_attr, t, ARCH_ATTR, default={})
    if not arch:
        return {}
    try:
        spec_blocks = blocks(arch)
        return {
            "group": norm_group(arch),
            "norms": describe_norms(arch),
            "layout": describe_layout(arch),
            "activation": spec_blocks[0].get("activation", "") if spec_blocks else foreign_activation(arch),
        }
    except Exception as exc:  # noqa: BLE001 - a mapping that is no ArchSpec fails in any of the describers
        why = f"{type(exc).__name__}: {one_line(exc)}"
        problems.add(f"trial {t.number}: user attr 'arch': expected an ArchSpec ({why})")
        return {}


@dataclass
class Liveness:
    """Running trials with a fresh heartbeat, and those whose worker went silent (stale)."""

    fresh: int = 0
    stale: int = 0


def heartbeats(storage: optuna.storages.BaseStorage, study_id: int, grace_seconds: float) -> Liveness:
    """Count the study's RUNNING trials by heartbeat age, compared with the database's own clock.

    Optuna keeps heartbeats in its `trial_heartbeats` table but exposes no reader; this query
    reads it directly (Optuna's schema, unchanged since heartbeats were added in v2.5).
    A RUNNING trial without a heartbeat row (heartbeats off) counts as fresh.
    """
    engine = rdb_engine(storage)
    if engine is None:  # not an RDB storage: no heartbeats to read
        return Liveness()
    query = sqlalchemy.text(
        "SELECT t.trial_id, h.heartbeat, CURRENT_TIMESTAMP AS now FROM trials t "
        "LEFT JOIN trial_heartbeats h ON h.trial_id = t.trial_id "
        "WHERE t.study_id = :study AND t.state = 'RUNNING'"
    ).columns(
        sqlalchemy.column("trial_id"),
        sqlalchemy.column("heartbeat", sqlalchemy.DateTime),
        sqlalchemy.column("now", sqlalchemy.DateTime),
    )
    live = Liveness()
    with engine.connect() as conn:
        for _, beat, now in conn.execute(query, {"study": study_id}):
            if beat is None or (now.replace(tzinfo=None) - beat.replace(tzinfo=None)).total_seconds() <= grace_seconds:
                live.fresh += 1
            else:
                live.stale += 1
    return live


def _scored(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """COMPLETE trials with a finite CV loss: the ones the best, the grid and the history use."""
    return [
        t
        for t in trials
        if t.state == TrialState.COMPLETE and counts_toward_budget(t) and t.values and finite(t.values[0])
    ]


def _best(trials: list[FrozenTrial]) -> FrozenTrial | None:
    """The best trial within the study's constraints (None when none is scored and feasible)."""
    scored = [t for t in _scored(trials) if is_feasible(t)]
    return min(scored, key=lambda t: (t.values[0], t.number)) if scored else None


def summarize(storage: optuna.storages.BaseStorage, name: str, own=None) -> dict:
    """One study's row for the list page: state, finished / budget, best CV loss and accuracy, best layout.

    `own`: the worker this dashboard started on the study while it is alive (its `pid`, launch
    time `started` and the `budget` it was given, which it stores only once its data is loaded).
    """
    study_id = storage.get_study_id_from_name(name)
    trials = storage.get_all_trials(study_id, deepcopy=False)
    problems = Problems()
    config = problems.read(read_run_config, storage, study_id) or {}
    stored_budget = problems.read(config_value, config, "study.trials", int)
    beat = problems.read(
        config_value, config, "study.heartbeat_seconds", float, HEARTBEAT_DEFAULT, default=HEARTBEAT_DEFAULT
    )
    objectives = problems.read(config_value, config, "objectives", list, ["cv_loss"], default=["cv_loss"])
    if problems:  # nas-search --resume would refuse this config: say why here
        refused = f"its stored run config is bad ({problems[0]})"
    else:
        refused = None if config else "it has no stored run config (not made by nas-search)"
    budget = own.budget if own is not None and own.budget is not None else stored_budget
    live = heartbeats(storage, study_id, 2 * beat)
    workers = live_workers(storage, study_id, 2 * beat)
    finished = budget_count(trials)
    running = live.fresh > 0 or bool(workers) or own is not None
    stop_at = problems.read(read_stop_request, storage, study_id)
    # a stop asked after the latest trial (and our worker) started is still being carried out
    last_start = max((t.datetime_start.timestamp() for t in trials if t.datetime_start), default=0.0)
    if running:
        state = (
            "stopping" if stop_at is not None and stop_at >= max(last_start, own.started if own else 0.0) else "running"
        )
    else:
        state = "finished" if budget is not None and finished >= budget else "idle"
    best = _best(trials)
    known = len(problems)
    view = arch_view(best, problems) if best else {}
    # nas-export rebuilds the best trial from its arch
    export_refused = f"its best trial's ArchSpec is bad ({problems[known]})" if len(problems) > known else None
    return {
        "id": study_id,
        "name": name,
        "state": state,
        "running_text": running_text(live, describe_workers(workers), own),
        "finished": finished,
        "budget": budget,
        "running_trials": live.fresh,
        "stale_trials": live.stale,
        "live_workers": [
            {"host": w.identity.host, "pid": w.identity.pid, "started": w.identity.started, "beat": w.beat}
            for w in workers
        ],
        "live_workers_text": describe_workers(workers),
        "duplicates": sum(map(is_duplicate, trials)),
        "failed": sum(t.state == TrialState.FAIL for t in trials),
        "best_trial": best.number if best else None,
        "best_cv_loss": best.values[0] if best else None,
        "best_cv_accuracy": problems.read(trial_attr, best, "cv_accuracy") if best else None,
        "best_norms": view.get("norms"),
        "best_layout": view.get("layout"),
        "objectives": objectives,
        "resumable": refused is None,  # made by nas-search, and its stored config is one nas-search reads
        "resume_refused": refused,
        "export_refused": export_refused,
        "stored_problems": problems,
        "error": None,
    }


def running_text(live: Liveness, workers_text: str, own) -> str:
    """Why the study counts as running, in words (empty when it does not)."""
    reasons = []
    if own is not None:
        reasons.append(
            f"the worker started here (pid {own.pid}, launched "
            f"{time.strftime('%H:%M:%S UTC', time.gmtime(own.started))}) is alive"
        )
    if workers_text:
        reasons.append(f"live worker(s): {workers_text}")
    if live.fresh:
        reasons.append(f"{live.fresh} running trial(s) beat")
    return "; ".join(reasons)


def unreadable(storage: optuna.storages.BaseStorage, name: str, exc: Exception) -> dict:
    """The row of a study whose stored data cannot be read: its name and why, nothing else."""
    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError:  # deleted meanwhile
        study_id = None
    return {
        "id": study_id,
        "name": name,
        "state": "unreadable",
        "error": f"cannot read this study: {type(exc).__name__}: {one_line(exc)}",
    }


def readable(read, storage: optuna.storages.BaseStorage, name: str, *args) -> dict:
    """`read(storage, name, *args)`, or the study's unreadable row: one bad study never takes the page down."""
    try:
        return read(storage, name, *args)
    except Exception as exc:  # noqa: BLE001 - any stored value may be malformed (an arch that is no ArchSpec, a config of the wrong type)
        return unreadable(storage, name, exc)


def trial_note(t: FrozenTrial, problems: Problems | None = None) -> str:
    """Why a trial has no (or no own) score: its failure, the trial it repeated, or where it was pruned."""
    problems = Problems() if problems is None else problems
    attr = lambda name, default=None: problems.read(trial_attr, t, name, default=default)  # noqa: E731
    if attr(FAIL_REASON_ATTR):
        return attr(FAIL_REASON_ATTR)
    if attr(DUPLICATE_ATTR) is not None:
        return f"duplicate of trial {attr('duplicate_of')} (not trained)"
    if t.state == TrialState.PRUNED:
        step = attr(PRUNED_AT_STEP_ATTR, t.last_step)
        return f"pruned at step {step} (epochs trained; partial fold losses kept)" if step is not None else "pruned"
    return ""


def trial_rows(trials: list[FrozenTrial], problems: Problems | None = None) -> list[dict]:
    """The trials table: one row per trial with its normalization columns; a bad attribute is left blank (and named)."""
    problems = Problems() if problems is None else problems
    rows = []
    for t in trials:
        attr = lambda name, default=None: problems.read(trial_attr, t, name, default=default)  # noqa: E731,B023
        view = arch_view(t, problems)
        kind, position = view.get("group", ("", ""))
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                "cv_loss": t.values[0] if t.values else None,
                "cv_loss_std": attr("cv_loss_std"),
                "cv_accuracy": attr("cv_accuracy"),
                "norm_type": kind,
                "norm_position": "" if position == NO_POSITION else position,
                "layout": view.get("layout", ""),
                "activation": view.get("activation", ""),
                "params": attr("params"),
                "seconds": attr("train_seconds"),
                "fail_reason": attr(FAIL_REASON_ATTR, ""),
                "duplicate_of": attr(DUPLICATE_ATTR),
                "note": trial_note(t, problems),
                "config_version": attr(VERSION_ATTR, 0),
            }
        )
    return rows


def norm_grid(trials: list[FrozenTrial], problems: Problems | None = None) -> dict:
    """CV loss of COMPLETE trials grouped by norm type (rows) x position (columns): mean, best, count."""
    problems = Problems() if problems is None else problems
    groups: dict[tuple[str, str], list[float]] = {}
    for t in _scored(trials):
        groups.setdefault(arch_view(t, problems).get("group", norm_group({})), []).append(t.values[0])
    types = sorted({k for k, _ in groups}, key=order_key(NORM_ORDER))
    positions = sorted({p for _, p in groups}, key=order_key((*POSITION_ORDER, MIXED, NO_POSITION)))
    cells = {f"{k}|{p}": {"mean": statistics.fmean(v), "best": min(v), "count": len(v)} for (k, p), v in groups.items()}
    return {"types": types, "positions": positions, "cells": cells}


def history(trials: list[FrozenTrial]) -> list[dict]:
    """Optimization history: each COMPLETE trial's CV loss and the best so far, in trial order."""
    points, best = [], math.inf
    for t in sorted(_scored(trials), key=lambda t: t.number):
        best = min(best, t.values[0])
        points.append({"number": t.number, "value": t.values[0], "best": best})
    return points


def detail(storage: optuna.storages.BaseStorage, name: str, own=None) -> dict:
    """Everything the study page shows."""
    study_id = storage.get_study_id_from_name(name)
    trials = storage.get_all_trials(study_id, deepcopy=False)
    row = summarize(storage, name, own)
    problems = row["stored_problems"]
    changes = problems.read(read_config_history, storage, study_id, default=[])
    return {
        **row,
        "config_history": [{k: entry.get(k) for k in ("at", "by", "source", "changes")} for entry in changes],
        "trials": trial_rows(trials, problems),
        "norm_grid": norm_grid(trials, problems),
        "history": history(trials),
        "read_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def comparisons(storage: optuna.storages.BaseStorage) -> list[dict]:
    """Each comparison in the storage: its id (its first cell study's), base name, factors and cells (id, name).

    A study whose cell attribute has another shape gives an entry with an `error` naming it; the rest are listed."""
    from nas.compare.run import stored_comparisons

    problems: list = []
    found = [
        {
            "id": c["cells"][0][0],
            "name": c["base"],
            "factors": c["factors"],
            "cells": [{"id": i, "name": n} for i, n, _ in c["cells"]],
        }
        for c in stored_comparisons(storage, problems)
    ]
    return found + [{"id": None, "name": "", "factors": [], "cells": [], "error": one_line(exc)} for exc in problems]


def comparison(storage: optuna.storages.BaseStorage, study_id: int) -> dict | None:
    """The comparison that holds the cell study `study_id`, as nas-compare's result and its table; None if
    it is no cell."""
    from nas.compare.report import ranked, rows
    from nas.compare.run import stored_comparisons, stored_result

    found = next((c for c in stored_comparisons(storage) if study_id in {i for i, _, _ in c["cells"]}), None)
    if found is None:
        return None
    running = {i for i, name, _ in found["cells"] if summarize(storage, name)["state"] in ("running", "stopping")}
    result = stored_result(storage, found, running)
    header, body = rows(result)
    return {
        "id": found["cells"][0][0],
        "result": result,
        "header": header,
        "body": body,
        "ranked": ranked(result),
        "running": sorted(running),
    }
