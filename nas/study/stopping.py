"""When a search stops: its budget of counted trials, a stop request, failures in a row.

Each is an Optuna study callback (called after every trial), except `over_budget`, which the
objective asks before it trains, so that racing workers end with exactly the budget.
"""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from nas.study.schema import (
    FAIL_REASON_ATTR,
    FINISHED,
    OVER_BUDGET,
    budget_count,
    counts_toward_budget,
    is_duplicate,
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
