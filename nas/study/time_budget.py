"""A search in wall time: `study.budget` is a deadline the search plans for and ends within.

The deadline is the run's launch (when nas-search was called) plus the budget, less two seconds for the run to
wind down; the workers a run starts (`--workers`, Ray) get its launch time, so they share one
deadline. A trial starts only while the time left holds half a typical trial of the study (the
median time of its finished trials; the first always starts): with a pruner many trials end
early, and one that does not is cut at the deadline. A running trial whose next epoch cannot
end by the deadline is cut there: pruned, with `cut_by_budget` saying where, so the run ends
within its budget, at most half a typical trial short of it. Unless `--trials` is given with it,
the trial count is what fits.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import optuna

from nas.search.config import RunConfig
from nas.study.best_so_far import clock
from nas.study.schema import CUT_ATTR, FINISHED, counts_toward_budget

NO_CAP = 10**9  # trials: a time budget decides their count
WIND_DOWN = 2.0  # seconds a run takes after its last trial (summary, storage closed, interpreter exit: 1.5 s here)


def trial_cap(cfg: RunConfig) -> int:
    """The finished trials a run may reach: the time budget decides unless `--trials` came with it."""
    if cfg.study.budget is None or cfg.where("study.trials") == "--trials":
        return cfg.study.trials
    return NO_CAP


def typical_trial_seconds(trials: list[optuna.trial.FrozenTrial]) -> float | None:
    """The median wall time of the finished trials that trained a candidate and were not cut (None: none yet)."""
    seconds = [
        (t.datetime_complete - t.datetime_start).total_seconds()
        for t in trials
        if counts_toward_budget(t) and CUT_ATTR not in t.user_attrs and t.datetime_start and t.datetime_complete
    ]
    return statistics.median(seconds) if seconds else None


class TimeBudget:
    """The deadline of one run: an Optuna callback that starts no trial which cannot end in time, and a guard
    that cuts a running trial at the deadline."""

    def __init__(self, seconds: float, launched: float, say: Callable[[str], None]):
        self.seconds, self.launched, self.say = seconds, launched, say
        self.deadline = launched + seconds - WIND_DOWN  # for training: the run ends within the budget
        self.ended: str | None = None  # why no further trial started
        self.planned = False

    def left(self) -> float:
        return self.deadline - time.time()

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        left, typical = self.left(), typical_trial_seconds(study.get_trials(deepcopy=False, states=FINISHED))
        if typical is not None and not self.planned:
            self.planned = True
            self.say(
                f"Time budget {clock(self.seconds)}: a trial takes about {clock(typical)} here, so about "
                f"{max(0, int(left // typical))} more fit in the {clock(max(left, 0))} left"
            )
        if left <= 0 or CUT_ATTR in trial.user_attrs:  # a cut trial: the deadline is less than an epoch away
            self.ended = "the deadline came"
        elif typical is not None and left < typical / 2:
            self.ended = f"{clock(left)} left, less than half a typical trial ({clock(typical)}): no new trial started"
        if self.ended is not None:
            study.stop()

    def guard(self, cut: Callable[[str], None], epochs: int, folds: int, together: bool) -> Deadline:
        """The hooks that cut one trial at the deadline (`cut(why)` raises)."""
        return Deadline(self.deadline, cut, epochs, folds, together)

    def summary(self, study: optuna.Study, since) -> str:
        """`Time budget 1:30: ended at 1:27; ...`: how the run used its budget, and what the deadline cut."""
        cut = [
            f"trial {t.number} {t.user_attrs[CUT_ATTR]}"
            for t in study.get_trials(deepcopy=False)
            if CUT_ATTR in t.user_attrs and t.datetime_start and t.datetime_start >= since
        ]
        said = f"Time budget {clock(self.seconds)}: ended at {clock(time.time() - self.launched)}"
        reasons = [*([self.ended] if self.ended else []), *cut]
        return said + ("; " + "; ".join(reasons) if reasons else "") + "."


class Deadline:
    """One trial's deadline: after each epoch, cut if the next one cannot end in time (at the pace of this trial's
    epochs so far); after each optimizer step, cut once the deadline has passed (a first epoch has no pace yet)."""

    def __init__(self, deadline: float, cut: Callable[[str], None], epochs: int, folds: int, together: bool):
        self.deadline, self.cut, self.epochs, self.folds, self.together = deadline, cut, epochs, folds, together
        self.start, self.done = time.time(), 0  # epochs trained (of every fold together, or of one fold)

    def where(self, epoch_done: int) -> str:
        """`epoch 3 of 12`, or `epoch 3 of 12 of fold 2` with the folds one by one."""
        if self.together:
            return f"epoch {epoch_done} of {self.epochs}"
        fold, epoch = divmod(epoch_done - 1, self.epochs)
        return f"epoch {epoch + 1} of {self.epochs} of fold {fold + 1}"

    def epoch(self, epoch: int, fold: int | None, train_loss: float) -> None:
        self.done += 1
        steps = self.epochs if fold is None else self.epochs * self.folds  # a together trial may fall back
        now = time.time()
        if self.done < steps and now + (now - self.start) / self.done > self.deadline:
            self.cut(f"cut at the time budget's deadline after {self.where(self.done)}")

    def step(self) -> None:
        if time.time() > self.deadline:
            self.cut(f"cut at the time budget's deadline during {self.where(self.done + 1)}")
