"""A search in wall time (`--budget`, nas.study.time_budget): planned trials, no trial that cannot end, cuts."""

import time
from datetime import datetime, timedelta

import optuna
import pytest
from conftest import write_digits_run
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from nas.errors import ConfigError
from nas.search.config import Override, load_run_config
from nas.study.run import run_search
from nas.study.schema import CUT_ATTR
from nas.study.storage import quiet_optuna
from nas.study.time_budget import NO_CAP, WIND_DOWN, TimeBudget, trial_cap, typical_trial_seconds

SPACE = {"stages": 1, "width": 8, "training": {"lr": {"float": [0.01, 0.1], "log": True}}}


def config(folder, *overrides, epochs: int = 3):
    path = write_digits_run(
        folder,
        SPACE,
        f"sqlite:///{folder}/nas.db",
        {"name": "s", "sampler": "random", "trials": 2},
        {"folds": 2, "epochs": epochs},
    )
    return load_run_config(path, list(overrides))


@pytest.mark.parametrize(
    ("written", "seconds"),
    [("90s", 90), ("10m", 600), ("1h30m", 5400), ("1.5h", 5400), ("2m30s", 150), (45, 45), ("45", 45)],
)
def test_a_budget_is_read_as_a_duration(tmp_path, written, seconds):
    assert config(tmp_path, Override("study.budget", written, "--budget")).study.budget == seconds


@pytest.mark.parametrize(
    ("written", "words"),
    [("ten", "expected a duration"), ("5x", "expected a duration"), ("0", "positive"), (-3, "positive")],
)
def test_a_budget_that_is_no_duration_is_named(tmp_path, written, words):
    with pytest.raises(ConfigError, match=f"--budget: study.budget: .*{words}"):
        config(tmp_path, Override("study.budget", written, "--budget"))


def test_the_budget_decides_the_trial_count_unless_trials_came_with_it_as_a_flag(tmp_path):
    assert trial_cap(config(tmp_path)) == 2
    assert (
        trial_cap(config(tmp_path, Override("study.budget", "1m", "--budget"))) == NO_CAP
    )  # the file's 2 do not cap it
    assert (
        trial_cap(config(tmp_path, Override("study.budget", "1m", "--budget"), Override("study.trials", 5, "--trials")))
        == 5
    )


def finished(number: int, seconds: float, state=TrialState.COMPLETE, **attrs):
    start = datetime(2026, 1, 1)
    return (
        create_trial(
            state=state,
            value=0.5 if state == TrialState.COMPLETE else None,
            params={"x": 0.5},
            distributions={"x": FloatDistribution(0, 1)},
            user_attrs=attrs,
        ),
        start,
        start + timedelta(seconds=seconds),
    )


def study_of(*durations, cut=()):
    """A study holding finished trials of these durations (those numbered in `cut` cut by a deadline)."""
    with quiet_optuna():
        study = optuna.create_study()
    for i, seconds in enumerate(durations):
        trial, start, end = finished(i, seconds, **({CUT_ATTR: "cut at ..."} if i in cut else {}))
        trial.datetime_start, trial.datetime_complete = start, end
        study.add_trial(trial)
    return study


def one_more(study, budget: TimeBudget, cut: bool = False) -> None:
    """A real optimize loop of one quick trial (cut by the deadline if `cut`), with the budget as its callback."""

    def objective(trial):
        if cut:
            trial.set_user_attr(CUT_ATTR, "cut at ...")
            raise optuna.TrialPruned()
        return 0.5

    with quiet_optuna(optuna.logging.ERROR):
        study.optimize(objective, n_trials=1, callbacks=[budget])


def test_a_typical_trial_is_the_median_of_the_finished_ones_that_were_not_cut():
    assert typical_trial_seconds(study_of(10, 2, 4, 30, cut=(3,)).trials) == 4
    assert typical_trial_seconds(study_of(5, cut=(0,)).trials) is None


def test_a_trial_starts_only_while_half_a_typical_one_fits_and_never_after_a_cut():
    said = []
    left_for = lambda seconds: TimeBudget(100, time.time() - 100 + WIND_DOWN + seconds, said.append)  # noqa: E731
    study = study_of(10, 12, 12, 14, 16)  # with one or two quick trials: typical 12 s
    budget = left_for(7)
    one_more(study, budget)
    assert budget.ended is None and said == [
        "Time budget 1:40: a trial takes about 0:12 here, so about 0 more fit in the 0:07 left"
    ]
    budget = left_for(5)
    one_more(study, budget)
    assert budget.ended == "0:05 left, less than half a typical trial (0:12): no new trial started"
    budget = left_for(50)
    one_more(study, budget, cut=True)  # a cut trial: its deadline is less than an epoch away
    assert budget.ended == "the deadline came"


def test_the_guard_cuts_a_trial_whose_next_epoch_cannot_end_in_time_but_never_after_its_last():
    cuts = []
    gone = TimeBudget(10, time.time() - 20, lambda line: None)  # the deadline has passed
    gone.guard(cuts.append, epochs=3, folds=2, together=True).epoch(0, None, 0.1)
    assert cuts == ["cut at the time budget's deadline after epoch 1 of 3"]
    sequential = gone.guard(cuts.append, epochs=2, folds=2, together=False)
    sequential.done = 2  # fold 1 trained
    sequential.epoch(0, 1, 0.1)
    assert cuts[-1] == "cut at the time budget's deadline after epoch 1 of 2 of fold 2"
    gone.guard(cuts.append, epochs=1, folds=2, together=True).epoch(0, None, 0.1)  # the last: nothing to save
    far = TimeBudget(3600, time.time(), lambda line: None).guard(cuts.append, epochs=3, folds=2, together=True)
    far.epoch(0, None, 0.1)
    far.step()
    assert len(cuts) == 2


def test_a_first_epoch_that_runs_past_the_deadline_is_cut_at_the_next_step():
    cuts = []
    deadline = TimeBudget(10, time.time() - 20, lambda line: None).guard(cuts.append, epochs=3, folds=2, together=False)
    deadline.step()
    assert cuts == ["cut at the time budget's deadline during epoch 1 of 3 of fold 1"]


def test_a_search_at_its_deadline_cuts_the_running_trial_starts_no_other_and_says_so(tmp_path, monkeypatch):
    guard = TimeBudget.guard

    def deadline_at_once(self, *args):  # the deadline comes as the first trial starts training
        self.deadline = time.time()
        return guard(self, *args)

    monkeypatch.setattr(TimeBudget, "guard", deadline_at_once)
    cfg = config(tmp_path, Override("study.budget", 30, "--budget"))
    out, results = [], []
    study = run_search(cfg, progress=False, out=out.append, results=results.append)
    assert len(study.trials) == 1 and study.trials[0].state == TrialState.PRUNED
    assert study.trials[0].user_attrs[CUT_ATTR] == "cut at the time budget's deadline during epoch 1 of 3"
    assert "0 finished, searching for 0:30 (as many trials as fit) on cpu" in out[0]
    assert results[-1].startswith("Time budget 0:30: ended at 0:") and results[-1].endswith(
        "; the deadline came; trial 0 cut at the time budget's deadline during epoch 1 of 3."
    )


def test_a_budget_spent_before_the_first_trial_says_so(tmp_path):
    cfg = config(tmp_path, Override("study.budget", 30, "--budget"))
    results = []
    study = run_search(cfg, progress=False, out=lambda line: None, results=results.append, started=time.time() - 60)
    assert study.trials == []
    assert results[-1].startswith("Time budget 0:30: ended at 1:0") and results[-1].endswith(
        "; the deadline came before the first trial could start."
    )


def test_trials_given_with_a_budget_cap_it(tmp_path):
    cfg = config(
        tmp_path, Override("study.budget", "10m", "--budget"), Override("study.trials", 2, "--trials"), epochs=1
    )
    results = []
    study = run_search(cfg, progress=False, out=lambda line: None, results=results.append)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    assert (
        results[-1].startswith("Time budget 10:00: ended at 0:")
        and results[-1].endswith(".")
        and ";" not in results[-1]
    )
