"""When a search stops: its budget of counted trials, a stop request, failures in a row, stagnation.

Each is an Optuna study callback (called after every trial), except `over_budget`, which the
objective asks before it trains, so that racing workers end with exactly the budget.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from nas.study.schema import (
    FAIL_REASON_ATTR,
    FINISHED,
    FOLD_LOSSES_ATTR,
    OVER_BUDGET,
    budget_count,
    counts_toward_budget,
    is_duplicate,
    is_feasible,
    read_stop_request,
)


def finished_trials(study: optuna.Study) -> int:
    """Trials that count toward the budget (finished, and not a duplicate of another)."""
    return budget_count(study.get_trials(deepcopy=False, states=FINISHED))


def over_budget(study: optuna.Study, number: int, budget: int) -> bool:
    """With several workers, trial `number` runs only if fewer than `budget` live trials precede it.

    Trial numbers are unique and ordered, so every worker reaches the same verdict: the study
    ends with exactly its budget of finished trials however many workers race for the last ones.
    """
    live = study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING, TrialState.WAITING))
    return sum(t.number < number and (t.state not in FINISHED or counts_toward_budget(t)) for t in live) >= budget


class BudgetReached:
    """Stop once the study holds its budget of counted trials (Optuna's MaxTrialsCallback would count duplicates)."""

    def __init__(self, budget: int):
        self.budget = budget

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if finished_trials(study) >= self.budget:
            study.stop()


class StopOnRequest:
    """Stop at a trial boundary when `request_stop` was called after this worker started.

    `started` is when the run began (before its data loads), so a Stop that comes while the
    worker loads data or opens the study is not missed.
    """

    def __init__(self, started: float):
        self.started, self.stopped = started, False

    def asked(self, study: optuna.Study) -> bool:
        asked = read_stop_request(study._storage, study._study_id)
        return asked is not None and asked >= self.started

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if self.asked(study):
            self.stopped = True
            study.stop()


class StopAfterFailures:
    """Stop the search after N trials in a row failed: something is wrong beyond one candidate.

    A repeat (FAIL only to keep it from the sampler) trained nothing: it neither fails nor breaks the streak.
    """

    def __init__(self, limit: int):
        self.limit, self.streak, self.tripped = limit, 0, False

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.user_attrs.get(FAIL_REASON_ATTR) == OVER_BUDGET:
            study.stop()  # the other workers finish the budget
            return
        if is_duplicate(trial):
            return
        self.streak = self.streak + 1 if trial.state == TrialState.FAIL else 0
        if self.streak >= self.limit:
            self.tripped = True
            study.stop()


def fold_noise(trial: optuna.trial.FrozenTrial) -> float:
    """The standard error of a trial's CV loss over its folds (std of the fold losses / sqrt(k)); 0 without them."""
    losses = trial.user_attrs.get(FOLD_LOSSES_ATTR) or []
    return statistics.stdev(losses) / math.sqrt(len(losses)) if len(losses) > 1 else 0.0


@dataclass(frozen=True)
class Stagnation:
    """`since` finished trials have not improved on trial `best` beyond its fold noise."""

    best: int
    since: int

    def __str__(self) -> str:
        return f"no improvement in {self.since} trial{'s' * (self.since != 1)} since trial {self.best}"


def stagnation(trials: list[optuna.trial.FrozenTrial]) -> Stagnation | None:
    """How long the study's best CV loss has not really improved (None: no trial scored yet).

    Counted finished trials in the order they finished; an improvement is a feasible score below the last real
    improvement's by more than that trial's fold noise, so a lucky split does not restart the count and a slow
    creep below it does, once it adds up beyond the noise.
    """
    done = sorted((t for t in trials if counts_toward_budget(t)), key=lambda t: (t.datetime_complete, t.number))
    best, since = None, 0
    for trial in done:
        scored = trial.state == TrialState.COMPLETE and trial.values and is_feasible(trial)
        if scored and (best is None or trial.values[0] < best.values[0] - fold_noise(best)):
            best, since = trial, 0
        else:
            since += 1
    return None if best is None else Stagnation(best.number, since)


class StopOnStagnation:
    """Stop once `limit` finished trials in a row brought no improvement beyond the fold noise (`stagnation`)."""

    def __init__(self, limit: int | None):
        self.limit, self.stalled = limit, None

    def check(self, study: optuna.Study) -> Stagnation | None:
        if self.limit is None:
            return None
        found = stagnation(study.get_trials(deepcopy=False, states=FINISHED))
        return found if found is not None and found.since >= self.limit else None

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.stalled = self.check(study)
        if self.stalled is not None:
            study.stop()
