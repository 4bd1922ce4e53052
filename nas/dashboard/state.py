"""What the dashboard shows about studies, read from the storage only (never a write).

A study is `running` while a worker is recorded live in it (`nas.liveness`: from its start,
while it loads data, between trials), a worker beats for one of its RUNNING trials, or a
worker this dashboard started is still alive; `stopping` while running with a stop request
newer than its latest trial start; `finished` when its budget of finished trials is reached;
`idle` otherwise (resumable); `unreadable` when something stored in it cannot be read (the row
says why; the other studies are shown as usual). The cell studies of a `nas-compare` run are
also shown together, as one comparison, ranked by nas-compare's own functions.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import optuna
import sqlalchemy
from optuna.trial import FrozenTrial, TrialState

from nas.archspec import MIXED, NO_POSITION, NORM_ORDER, POSITION_ORDER, blocks, describe_layout, describe_norms, norm_group, order_key
from nas.config import StudyConfig
from nas.liveness import describe_workers, live_workers
from nas.report import finite
from nas.storage import (STOP_ATTR, budget_count, counts_toward_budget, is_duplicate, one_line, rdb_engine, read_config_history,
                         read_run_config)

HEARTBEAT_DEFAULT = StudyConfig.heartbeat_seconds  # studies stored before the field existed


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
    ).columns(sqlalchemy.column("trial_id"), sqlalchemy.column("heartbeat", sqlalchemy.DateTime), sqlalchemy.column("now", sqlalchemy.DateTime))
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
    return [t for t in trials if t.state == TrialState.COMPLETE and counts_toward_budget(t) and t.values and finite(t.values[0])]


def _best(trials: list[FrozenTrial]) -> FrozenTrial | None:
    scored = _scored(trials)
    return min(scored, key=lambda t: (t.values[0], t.number)) if scored else None


def summarize(storage: optuna.storages.BaseStorage, name: str, own=None) -> dict:
    """One study's row for the list page: state, finished / budget, best CV loss and accuracy, best layout.

    `own`: the worker this dashboard started on the study while it is alive (its `pid`, launch
    time `started` and the `budget` it was given, which it stores only once its data is loaded).
    """
    study_id = storage.get_study_id_from_name(name)
    trials = storage.get_all_trials(study_id, deepcopy=False)
    config = read_run_config(storage, study_id) or {}
    budget = own.budget if own is not None and own.budget is not None else config.get("study", {}).get("trials")
    beat = float(config.get("study", {}).get("heartbeat_seconds", HEARTBEAT_DEFAULT))
    live = heartbeats(storage, study_id, 2 * beat)
    workers = live_workers(storage, study_id, 2 * beat)
    finished = budget_count(trials)
    running = live.fresh > 0 or bool(workers) or own is not None
    stop_at = storage.get_study_system_attrs(study_id).get(STOP_ATTR)
    # a stop asked after the latest trial (and our worker) started is still being carried out
    last_start = max((t.datetime_start.timestamp() for t in trials if t.datetime_start), default=0.0)
    if running:
        state = "stopping" if stop_at is not None and stop_at >= max(last_start, own.started if own else 0.0) else "running"
    else:
        state = "finished" if budget is not None and finished >= budget else "idle"
    best = _best(trials)
    arch = best.user_attrs.get("arch", {}) if best else {}
    return {
        "id": study_id,
        "name": name,
        "state": state,
        "running_text": running_text(live, describe_workers(workers), own),
        "finished": finished,
        "budget": budget,
        "running_trials": live.fresh,
        "stale_trials": live.stale,
        "live_workers": [{"host": w.identity.host, "pid": w.identity.pid, "started": w.identity.started, "beat": w.beat} for w in workers],
        "live_workers_text": describe_workers(workers),
        "duplicates": sum(map(is_duplicate, trials)),
        "failed": sum(t.state == TrialState.FAIL for t in trials),
        "best_trial": best.number if best else None,
        "best_cv_loss": best.values[0] if best else None,
        "best_cv_accuracy": best.user_attrs.get("cv_accuracy") if best else None,
        "best_norms": describe_norms(arch) if arch else None,
        "best_layout": describe_layout(arch) if arch else None,
        "objectives": config.get("objectives", ["cv_loss"]),
        "resumable": bool(config),  # made by nas-search: the stored config lets it resume
        "error": None,
    }


def running_text(live: Liveness, workers_text: str, own) -> str:
    """Why the study counts as running, in words (empty when it does not)."""
    reasons = []
    if own is not None:
        reasons.append(f"the worker started here (pid {own.pid}, launched {time.strftime('%H:%M:%S UTC', time.gmtime(own.started))}) is alive")
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
    return {"id": study_id, "name": name, "state": "unreadable", "error": f"cannot read this study: {type(exc).__name__}: {one_line(exc)}"}


def readable(read, storage: optuna.storages.BaseStorage, name: str, *args) -> dict:
    """`read(storage, name, *args)`, or the study's unreadable row: one bad study never takes the page down."""
    try:
        return read(storage, name, *args)
    except Exception as exc:  # noqa: BLE001 - any stored value may be malformed (an arch that is no ArchSpec, a config of the wrong type)
        return unreadable(storage, name, exc)


def trial_note(t: FrozenTrial) -> str:
    """Why a trial has no (or no own) score: its failure, the trial it repeated, or where it was pruned."""
    if t.user_attrs.get("fail_reason"):
        return str(t.user_attrs["fail_reason"])
    if t.user_attrs.get("duplicate_of") is not None:
        return f"duplicate of trial {t.user_attrs['duplicate_of']} (not trained)"
    if t.state == TrialState.PRUNED:
        step = t.user_attrs.get("pruned_at_step", t.last_step)
        return f"pruned at step {step} (epochs trained; partial fold losses kept)" if step is not None else "pruned"
    return ""


def trial_rows(trials: list[FrozenTrial]) -> list[dict]:
    """The trials table: one row per trial with its normalization columns."""
    rows = []
    for t in trials:
        arch = t.user_attrs.get("arch", {})
        kind, position = norm_group(arch) if arch else ("", "")
        spec_blocks = blocks(arch)
        rows.append({
            "number": t.number,
            "state": t.state.name,
            "cv_loss": t.values[0] if t.values else None,
            "cv_loss_std": t.user_attrs.get("cv_loss_std"),
            "cv_accuracy": t.user_attrs.get("cv_accuracy"),
            "norm_type": kind,
            "norm_position": "" if position == NO_POSITION else position,
            "layout": describe_layout(arch) if arch else "",
            "activation": spec_blocks[0].get("activation", "") if spec_blocks else "",
            "params": t.user_attrs.get("params"),
            "seconds": t.user_attrs.get("train_seconds"),
            "fail_reason": t.user_attrs.get("fail_reason", ""),
            "duplicate_of": t.user_attrs.get("duplicate_of"),
            "note": trial_note(t),
            "config_version": t.user_attrs.get("config_version", 0),
        })
    return rows


def norm_grid(trials: list[FrozenTrial]) -> dict:
    """CV loss of COMPLETE trials grouped by norm type (rows) x position (columns): mean, best, count."""
    groups: dict[tuple[str, str], list[float]] = {}
    for t in _scored(trials):
        groups.setdefault(norm_group(t.user_attrs.get("arch", {})), []).append(t.values[0])
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
    return {
        **summarize(storage, name, own),
        "config_history": [{k: entry.get(k) for k in ("at", "by", "source", "changes")} for entry in read_config_history(storage, study_id)],
        "trials": trial_rows(trials),
        "norm_grid": norm_grid(trials),
        "history": history(trials),
        "read_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def comparisons(storage: optuna.storages.BaseStorage) -> list[dict]:
    """Each comparison in the storage: its id (its first cell study's), base name, factors and cells (id, name)."""
    from nas.compare import stored_comparisons

    return [{"id": c["cells"][0][0], "name": c["base"], "factors": c["factors"], "cells": [{"id": i, "name": n} for i, n, _ in c["cells"]]}
            for c in stored_comparisons(storage)]


def comparison(storage: optuna.storages.BaseStorage, study_id: int) -> dict | None:
    """The comparison that holds the cell study `study_id`, as nas-compare's result and its table; None if it is no cell."""
    from nas.compare import stored_comparisons, stored_result
    from nas.compare_report import ranked, rows

    found = next((c for c in stored_comparisons(storage) if study_id in {i for i, _, _ in c["cells"]}), None)
    if found is None:
        return None
    running = {i for i, name, _ in found["cells"] if summarize(storage, name)["state"] in ("running", "stopping")}
    result = stored_result(storage, found, running)
    header, body = rows(result)
    return {"id": found["cells"][0][0], "result": result, "header": header, "body": body, "ranked": ranked(result), "running": sorted(running)}
