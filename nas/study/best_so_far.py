"""Best CV loss against wall time: what a search found by each moment (no torch here).

A search is judged by what it finds per unit of compute, so `nas-search` ends with how its best
CV loss improved over the run, `nas-report` plots best-so-far against wall time, and
`scripts/bench_search.py` compares strategies by it. Only trials that trained their own
candidate count (duplicates and failures never improve anything); time is a trial's completion.
After a resume, the best of the earlier trials is where the run starts, shown as such (at its
own, negative, time): the line covers this run's trials, not the study's.
"""

from __future__ import annotations

from datetime import datetime

from optuna.trial import FrozenTrial, TrialState

from nas.study.schema import counts_toward_budget, is_feasible


def improvements(trials: list[FrozenTrial], start: datetime | None = None) -> list[tuple[float, float, int]]:
    """(seconds since `start`, best CV loss so far, trial number) at each improvement, in time order.

    `start` defaults to the earliest trial start. Of the trials that completed before it, only the
    best is kept: the best the run started from, at its negative seconds (`before_run`).
    """
    done = sorted(
        (
            t
            for t in trials
            if t.state == TrialState.COMPLETE
            and counts_toward_budget(t)
            and t.values
            and t.datetime_complete
            and is_feasible(t)  # a trial outside the study's constraints is no answer to it
        ),
        key=lambda t: t.datetime_complete,
    )
    if not done:
        return []
    start = start or min(t.datetime_start for t in trials if t.datetime_start)
    points, best = [], float("inf")
    for t in done:
        if t.values[0] < best:
            best = t.values[0]
            seconds = (t.datetime_complete - start).total_seconds()
            if points and before_run(points[-1]) and seconds < 0:
                points.pop()  # several earlier trials: only the best of them is where the run starts
            points.append((seconds, best, t.number))
    return points


def before_run(point: tuple[float, float, int]) -> bool:
    """A point of `improvements` that an earlier run found (it completed before `start`)."""
    return point[0] < 0


def best_at(points: list[tuple[float, float, int]], seconds: float) -> float | None:
    """The best CV loss found by `seconds` (None before the first completed trial)."""
    found = [value for at, value, _ in points if at <= seconds]
    return found[-1] if found else None


def clock(seconds: float) -> str:
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes}:{rest:02d}"


def anytime_line(points: list[tuple[float, float, int]], total: float, shown: int = 6) -> str:
    """`Best CV loss over this run (2:31): 0.4120 (trial 0, 0:08) -> ... -> 0.0941 (trial 11, 1:52)`; after a
    resume it starts `from 0.1234 (trial 3, before this run) -> ...`."""
    head = f"Best CV loss over this run ({clock(total)}): "
    if not points:
        return head + "no completed trial."
    if len(points) > shown:  # the first, the last, and evenly spaced ones between
        keep = sorted({round(i * (len(points) - 1) / (shown - 1)) for i in range(shown)})
        points = [points[i] for i in keep]
    steps = " -> ".join(
        f"{value:.4f} (trial {number}, {'before this run' if before_run((at, value, number)) else clock(at)})"
        for at, value, number in points
    )
    if before_run(points[0]):
        steps = "from " + steps + ("; no trial of this run improved on it" if len(points) == 1 else "")
    return head + steps
