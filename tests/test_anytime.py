"""Best CV loss against wall time: improvements of the trials that trained a candidate, by completion time."""

from datetime import datetime, timedelta

from conftest import write_digits_run
from optuna.distributions import FloatDistribution
from optuna.trial import FrozenTrial, TrialState

from nas.cli import search_main
from nas.study.best_so_far import anytime_line, best_at, improvements

T0 = datetime(2026, 12, 1, 12, 0, 0)


def trial(number: int, value: float | None, done_at: float, state=TrialState.COMPLETE, **attrs) -> FrozenTrial:
    return FrozenTrial(
        number=number,
        state=state,
        value=value,
        datetime_start=T0 + timedelta(seconds=done_at - 5),
        datetime_complete=T0 + timedelta(seconds=done_at),
        params={"x": 0.1},
        distributions={"x": FloatDistribution(0, 1)},
        user_attrs=attrs,
        system_attrs={},
        intermediate_values={},
        trial_id=number,
    )


def test_only_improvements_of_trained_complete_trials_count_in_completion_order():
    trials = [
        trial(0, 0.9, 10),
        trial(2, 0.5, 30),
        trial(1, 0.7, 20),
        trial(3, 0.6, 40),
        trial(4, 0.1, 45, duplicate_of=2),
        trial(5, None, 50, state=TrialState.FAIL),
        trial(6, 0.05, 60, state=TrialState.PRUNED),
        trial(7, 0.4, 70),
    ]
    points = improvements(trials, start=T0)
    assert points == [(10.0, 0.9, 0), (20.0, 0.7, 1), (30.0, 0.5, 2), (70.0, 0.4, 7)]
    assert best_at(points, 5) is None and best_at(points, 35) == 0.5 and best_at(points, 1e9) == 0.4


def test_a_run_starts_from_the_best_of_earlier_trials():
    trials = [trial(0, 0.9, 10), trial(1, 0.3, 20), trial(2, 0.2, 90)]
    points = improvements(trials, start=T0 + timedelta(seconds=60))
    assert points == [(-40.0, 0.3, 1), (30.0, 0.2, 2)]
    assert best_at(points, 0) == 0.3  # the run had that best from its start


def test_after_a_resume_the_line_covers_this_runs_trials_and_says_where_it_started():
    trials = [trial(0, 0.9, 10), trial(1, 0.3, 20), trial(2, 0.4, 80), trial(3, 0.2, 90)]
    run = T0 + timedelta(seconds=60)
    line = anytime_line(improvements(trials, start=run), 40)
    assert line == "Best CV loss over this run (0:40): from 0.3000 (trial 1, before this run) -> 0.2000 (trial 3, 0:30)"
    unimproved = anytime_line(improvements(trials[:3], start=run), 40)
    assert (
        unimproved == "Best CV loss over this run (0:40): from 0.3000 (trial 1, before this run); "
        "no trial of this run improved on it"
    )


def test_the_line_shows_the_first_the_last_and_some_between():
    points = [(float(i * 10), 1.0 - i / 20, i) for i in range(12)]
    line = anytime_line(points, 151)
    assert line.startswith("Best CV loss over this run (2:31): 1.0000 (trial 0, 0:00) -> ")
    assert line.endswith("0.4500 (trial 11, 1:50)") and line.count("->") == 5
    assert anytime_line([], 3) == "Best CV loss over this run (0:03): no completed trial."


def test_a_resumed_search_says_the_best_it_started_from(tmp_path, capsys):
    space = {"stages": 1, "width": 8, "training": {"lr": {"float": [0.01, 0.1], "log": True}}}
    config = write_digits_run(
        tmp_path,
        space,
        f"sqlite:///{tmp_path}/nas.db",
        {"name": "a", "sampler": "random", "trials": 1},
        {"folds": 2, "epochs": 1},
    )
    assert search_main(["--config", str(config), "--no-progress"]) == 0
    first = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("Best CV loss over this run"))
    assert "before this run" not in first and "(trial 0, " in first
    assert search_main(["--config", str(config), "--trials", "2", "--no-progress"]) == 0
    again = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("Best CV loss over this run"))
    assert "): from " in again and "(trial 0, before this run)" in again and "trial 0, 0:00" not in again
