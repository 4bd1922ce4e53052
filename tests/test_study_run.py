"""The study run (nas.study.run, opening, stopping, objective, tables): the contract a continuation must keep, when a
search stops, the table it prints, and one tiny real `run_search` on digits."""

import sys

import optuna
import pytest
from conftest import write_digits_run
from optuna.trial import TrialState, create_trial

from nas.errors import ConfigError, StudyError, TrialError
from nas.search.config import Override, load_run_config
from nas.search.space import default_spec
from nas.study.opening import check_contract, create_or_load, store_config, stored_config
from nas.study.run import run_search
from nas.study.schema import (
    DUPLICATE_ATTR,
    FAIL_REASON_ATTR,
    FOLD_LOSSES_ATTR,
    OVER_BUDGET,
    RUN_CONFIG_ATTR,
    WORKER_PREFIX,
    read_config_history,
    read_run_config,
    request_stop,
)
from nas.study.stopping import (
    BudgetReached,
    StopAfterFailures,
    StopOnRequest,
    StopOnStagnation,
    finished_trials,
    over_budget,
    stagnation,
)
from nas.study.storage import load_existing_study, quiet_optuna, storage_of
from nas.study.tables import best_value, summary_table, top_trials

SPACE = {"stages": 1, "width": 8, "training": {"lr": {"float": [0.01, 0.1], "log": True}}}


def run_config(folder, overrides=(), trials: int = 2, seed: int = 0):
    path = write_digits_run(
        folder,
        SPACE,
        f"sqlite:///{folder}/nas.db",
        {"name": "s", "sampler": "random", "trials": trials, "seed": seed},
        {"folds": 2, "epochs": 1},
    )
    return load_run_config(path, list(overrides))


def in_memory(directions: int = 1) -> optuna.Study:
    with quiet_optuna():
        return optuna.create_study(directions=["minimize"] * directions)


# --- the contract ---------------------------------------------------------------------------------


@pytest.fixture
def stored_study(tmp_path):
    """A study whose run config is stored as a run that trains stores it; returns (config path, storage)."""
    cfg = run_config(tmp_path)
    storage = storage_of(cfg.study.storage)
    assert check_contract(cfg, storage, None, force=False) == []  # a new study: nothing to compare
    store_config(create_or_load(cfg, storage), cfg, None, [])
    return tmp_path / "run.yaml", storage


def test_a_changed_folds_count_is_refused_naming_the_flag_that_changed_it(stored_study):
    path, storage = stored_study
    with pytest.raises(ConfigError) as raised:
        check_contract(load_run_config(path, [("evaluation.folds", 3, "--folds")]), storage, None, force=False)
    error = raised.value
    assert (error.file, error.key_path) == ("--folds", "evaluation.folds")
    assert error.problem == (
        "study 's' was run with 2; this run has 3. Use another --study, or --force to continue it and record the change"
    )


def test_a_changed_config_file_is_refused_naming_the_file_and_counting_the_other_changes(stored_study):
    path, storage = stored_study
    path.write_text(path.read_text().replace("folds: 2", "folds: 4").replace("epochs: 1", "epochs: 3"))
    with pytest.raises(ConfigError) as raised:
        check_contract(load_run_config(path), storage, None, force=False)
    assert (raised.value.file, raised.value.key_path) == (str(path), "evaluation.folds")
    assert "was run with 2; this run has 4 (and 1 more)." in raised.value.problem


def test_forced_the_changes_are_returned_and_stored_as_the_next_config_version(stored_study):
    path, storage = stored_study
    cfg = load_run_config(path, [("evaluation.folds", 3, "--folds")])
    changes = check_contract(cfg, storage, None, force=True)
    assert changes == [("evaluation.folds", 2, 3)]
    assert store_config(create_or_load(cfg, storage), cfg, None, changes) == 1
    study_id = storage.get_study_id_from_name("s")
    (entry,) = read_config_history(storage, study_id)
    assert entry["changes"] == [{"key": "evaluation.folds", "old": 2, "new": 3}]
    assert entry["previous"]["run_config"]["evaluation"]["folds"] == 2
    assert read_run_config(storage, study_id)["evaluation"]["folds"] == 3


def test_budget_sampler_and_device_may_change_but_the_number_of_objectives_may_not(stored_study):
    path, storage = stored_study
    free = [("study.trials", 9), ("study.sampler", "tpe"), ("device", "cpu"), ("study.timeout", 60)]
    assert check_contract(load_run_config(path, free), storage, None, force=False) == []
    with pytest.raises(ConfigError, match="study 's' has 1 objective\\(s\\), this run asks for 2; use another --study"):
        check_contract(load_run_config(path, [("objectives", ["cv_loss", "params"])]), storage, None, force=True)


def test_resume_takes_the_stored_config_and_refuses_a_study_that_has_none(stored_study, tmp_path):
    path, storage = stored_study
    url = f"sqlite:///{tmp_path}/nas.db"
    assert stored_config("s", url) == load_run_config(path).to_dict()
    with quiet_optuna():
        optuna.create_study(storage=url, study_name="plain")
    with pytest.raises(StudyError, match="'plain' has no stored run config \\(not made by nas-search\\)"):
        stored_config("plain", url)


# --- stopping -------------------------------------------------------------------------------------


def test_over_budget_counts_the_live_trials_numbered_before_a_trial_so_every_worker_agrees():
    study = in_memory()
    plan = [
        TrialState.COMPLETE,  # 0 counts
        "repeat",  # 1 a repeat kept COMPLETE by an older nas-search: does not count
        TrialState.RUNNING,  # 2 counts: it may finish
        TrialState.FAIL,  # 3 does not count
        TrialState.PRUNED,  # 4 counts
        TrialState.RUNNING,  # 5 the trial asking
    ]
    for state in plan:
        trial = study.ask()
        if state == "repeat":
            trial.set_user_attr(DUPLICATE_ATTR, 0)
            study.tell(trial, 1.0)
        elif state == TrialState.COMPLETE:
            study.tell(trial, 1.0)
        elif state != TrialState.RUNNING:
            study.tell(trial, state=state)
    assert [over_budget(study, 5, budget) for budget in (2, 3, 4)] == [True, True, False]
    assert [over_budget(study, number, 1) for number in (0, 1, 2)] == [False, True, True]
    assert finished_trials(study) == 2  # 0 and 4: the running trials have not finished


def optimize_plan(plan: list[str], callback, n_trials: int = 20) -> optuna.Study:
    """Run a real optimize loop whose trials end as `plan` says (ok, fail, repeat, pruned, over budget)."""
    study = in_memory()

    def objective(trial):
        what = plan[trial.number] if trial.number < len(plan) else "ok"
        if what == "repeat":
            trial.set_user_attr(DUPLICATE_ATTR, 0)
            raise TrialError("repeat of trial 0 (not trained)")
        if what in ("fail", "over"):
            trial.set_user_attr(FAIL_REASON_ATTR, OVER_BUDGET if what == "over" else "loss is nan")
            raise TrialError("failed")
        if what == "pruned":
            raise optuna.TrialPruned()
        return float(trial.number)

    with quiet_optuna(optuna.logging.ERROR):
        study.optimize(objective, n_trials=n_trials, catch=(TrialError,), callbacks=[callback])
    return study


def test_stop_after_failures_counts_failures_in_a_row_and_a_repeat_neither_fails_nor_breaks_the_streak():
    stop = StopAfterFailures(2)
    study = optimize_plan(["fail", "repeat", "ok", "fail", "repeat", "repeat", "fail", "ok"], stop)
    # counted as failures, the repeats would stop at trial 4; breaking the streak, they would not stop at all
    assert len(study.trials) == 7 and stop.tripped


def test_stop_after_failures_ends_a_worker_put_over_the_budget_without_calling_it_a_failure():
    stop = StopAfterFailures(5)
    study = optimize_plan(["ok", "over"], stop)
    assert len(study.trials) == 2 and not stop.tripped


def test_budget_reached_counts_only_finished_trials_that_trained_a_new_candidate():
    study = optimize_plan(["ok", "repeat", "fail", "pruned", "repeat", "ok", "ok"], BudgetReached(3))
    assert len(study.trials) == 6 and finished_trials(study) == 3


def test_a_stop_request_stops_only_the_workers_started_before_it(tmp_path):
    url = f"sqlite:///{tmp_path}/nas.db"
    with quiet_optuna():
        study = optuna.create_study(storage=url, study_name="s")
    before = StopOnRequest(started=0.0)
    assert not before.asked(study)
    request_stop(url, "s")
    assert before.asked(study) and not StopOnRequest(started=float("inf")).asked(study)


def scored_run(plan: list, limit: int | None = None) -> tuple[optuna.Study, StopOnStagnation]:
    """A real optimize loop over `plan`: (cv loss, fold losses) per trial, "pruned", or ("infeasible", loss)."""
    stop = StopOnStagnation(limit)

    def objective(trial):
        what = plan[trial.number]
        if what == "pruned":
            raise optuna.TrialPruned()
        if what[0] == "infeasible":
            trial.set_constraint("params", 1.0)  # as nas-search records a candidate over its limit
            return what[1]
        loss, folds = what
        trial.set_user_attr(FOLD_LOSSES_ATTR, folds)
        return loss

    with quiet_optuna(optuna.logging.ERROR):
        study = optuna.create_study()
        study.optimize(objective, n_trials=len(plan), callbacks=[stop] if limit else [])
    return study, stop


def test_stagnation_counts_finished_trials_since_the_last_improvement_beyond_the_fold_noise():
    noisy = (0.50, [0.40, 0.50, 0.60])  # fold noise: std 0.1 / sqrt(3) = 0.058
    plan = [
        noisy,
        (0.46, [0.46] * 3),  # better, but within trial 0's noise: no improvement
        "pruned",  # finished, no score
        ("infeasible", 0.10),  # outside the constraints: no answer
        (0.45, [0.45] * 3),  # 0.05 below trial 0: still within its noise
        (0.43, [0.43] * 3),  # 0.07 below trial 0: beyond it
        (0.4299, [0.4299] * 3),  # trial 5 has no fold noise: any gain counts
        (0.50, [0.50] * 3),
    ]
    study, _ = scored_run(plan)
    found = stagnation(study.trials)
    assert (found.best, found.since) == (6, 1)
    assert str(stagnation(study.trials[:5])) == "no improvement in 4 trials since trial 0"
    assert stagnation(study.trials[2:4]) is None  # nothing scored yet


def test_stop_after_stops_the_search_once_that_many_trials_brought_nothing_beyond_the_noise():
    worse = [(loss, [loss] * 3) for loss in (0.7, 0.8, 0.9)]
    plan = [(0.5, [0.5] * 3), (0.6, [0.6] * 3), "pruned", (0.4, [0.4] * 3), *worse, (0.1, [0.1] * 3)]
    study, stop = scored_run(plan, limit=3)  # 2 trials without a gain (one pruned) do not stop it; 3 do
    assert len(study.trials) == 7 and str(stop.stalled) == "no improvement in 3 trials since trial 3"


def test_a_search_with_stop_after_ends_early_says_why_and_a_rerun_trains_nothing(tmp_path):
    cfg = run_config(tmp_path, [Override("study.stop_after", 1, "--stop-after")], trials=12)
    out, results = [], []
    study = run_search(cfg, progress=False, out=out.append, results=results.append)
    found = stagnation(study.trials)
    assert found.since == 1 and finished_trials(study) < 12  # stopped by the first trial that did not improve
    assert results[0].startswith("Top ") and results[-1] == (
        f"Stopped: no improvement in 1 trial since trial {found.best} (--stop-after 1; {finished_trials(study)}/12 "
        "of the budget used)."
    )
    out = []
    run_search(cfg, progress=False, out=out.append, results=lambda line: None)
    assert out[0] == (
        f"Study 's' has stagnated: no improvement in 1 trial since trial {found.best} (--stop-after 1): nothing to "
        "run. Raise --stop-after or leave it out to search on."
    )
    assert len(load_existing_study(cfg.study.storage, "s").trials) == len(study.trials)


# --- the table ------------------------------------------------------------------------------------


def arch(norm: str) -> dict:
    return default_spec({"stages": 1, "width": 8, "block": {"norm": {"type": norm}, "activation": "gelu"}})


def test_summary_table_lists_the_best_scored_trials_under_a_header_with_their_norm_columns(tmp_path):
    with quiet_optuna():
        study = optuna.create_study(storage=f"sqlite:///{tmp_path}/nas.db", study_name="s")
    assert summary_table(study) == "Study 's': no completed trials yet." and best_value(study) is None
    scored = {"cv_accuracy": 0.8, "params": 1234, "cv_loss_std": 0.0125}
    for trial in [
        create_trial(value=0.5, user_attrs={"arch": arch("batch"), **scored}),
        create_trial(value=0.25, user_attrs={"arch": arch("none"), "cv_accuracy": 0.9, "params": 99}),
        create_trial(state=TrialState.PRUNED, user_attrs={"arch": arch("group")}),
        create_trial(state=TrialState.FAIL, user_attrs={"arch": arch("batch"), DUPLICATE_ATTR: 0}),
        create_trial(value=0.1, user_attrs={"arch": arch("batch"), DUPLICATE_ATTR: 0, **scored}),  # an older repeat
    ]:
        study.add_trial(trial)
    lines = summary_table(study).splitlines()
    assert lines[0] == "Top 2 of 3 finished trials in 's' (lower cv loss is better):"
    split = [[cell for cell in line.split("  ") if cell] for line in lines[1:]]
    assert [cell.strip() for cell in split[0]] == [
        "trial",
        "cv loss ± SD over folds",
        "cv acc",
        "params",
        "norm (type @ position)",
        "activation",
    ]
    assert set(lines[2]) == {"-", " "}
    assert [[c.strip() for c in row] for row in split[2:]] == [
        ["1", "0.2500", "0.9000", "99", "none", "gelu"],
        ["0", "0.5000 ± 0.0125", "0.8000", "1,234", "batch @ post_conv", "gelu"],
    ]
    assert summary_table(study, k=1).splitlines()[0] == "Top 1 of 3 finished trials in 's' (lower cv loss is better):"
    assert [t.number for t in top_trials(study)] == [1, 0] and best_value(study) == 0.25


def test_a_multi_objective_study_prints_its_pareto_front_under_its_objectives(tmp_path):
    with quiet_optuna():
        study = optuna.create_study(
            storage=f"sqlite:///{tmp_path}/nas.db", study_name="mo", directions=["minimize"] * 2
        )
    study._storage.set_study_system_attr(study._study_id, RUN_CONFIG_ATTR, {"objectives": ["cv_loss", "params"]})
    for values in ([0.3, 1000], [0.2, 2000], [0.4, 3000]):  # the last is dominated by both others
        study.add_trial(create_trial(values=values, user_attrs={"arch": arch("batch"), "cv_accuracy": 0.5}))
    lines = summary_table(study).splitlines()
    assert lines[0].startswith("Pareto front of 'mo' (2 of 3 finished trials; all objectives minimized;")
    assert lines[1].split() == ["trial", "cv_loss", "params", "cv", "acc", "norm", "(type", "@", "position)"]
    assert [line.split()[:3] for line in lines[3:]] == [["1", "0.2000", "2,000"], ["0", "0.3000", "1,000"]]
    assert best_value(study) is None  # no single best of several objectives


# --- one tiny real search -------------------------------------------------------------------------


@pytest.mark.slow
def test_a_tiny_run_search_finishes_its_budget_stores_its_config_and_reproduces_from_its_seed(tmp_path):
    runs = {}
    for name, seed in (("first", 0), ("same_seed", 0), ("other_seed", 1)):
        (tmp_path / name).mkdir()
        cfg = run_config(tmp_path / name, seed=seed)
        out = []
        study = run_search(cfg, progress=False, out=out.append, results=out.append)
        runs[name] = study.get_trials()
        if name == "first":
            first_cfg, first_out, first_study = cfg, out, study
    trials = runs["first"]
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2 and finished_trials(first_study) == 2
    for t in trials:
        assert {"arch", "fold_losses", "cv_accuracy", "params", "config_version"} <= t.user_attrs.keys()
        assert len(t.user_attrs["fold_losses"]) == 2 and t.value == pytest.approx(sum(t.user_attrs["fold_losses"]) / 2)
    storage, study_id = first_study._storage, first_study._study_id
    assert read_run_config(storage, study_id) == first_cfg.to_dict()  # a resume needs no YAML
    assert not [k for k in storage.get_study_system_attrs(study_id) if k.startswith(WORKER_PREFIX)]  # record removed
    assert "0/2 finished, running 2 more on cpu (digits: " in first_out[0]
    assert "Top 2 of 2 finished trials in 's' (lower cv loss is better):" in first_out[-2]  # then the best-so-far line
    # a fresh study searched by one process draws from the study seed itself: the same seed, the same candidates
    assert [t.params for t in runs["same_seed"]] == [t.params for t in trials]
    assert [t.params for t in runs["other_seed"]] != [t.params for t in trials]
    # the budget is the study's total: the same run again trains nothing
    out = []
    run_search(first_cfg, progress=False, out=out.append)
    assert out[0].startswith("Study 's' already has 2 finished trials (budget 2): nothing to run.")
    assert len(first_study.get_trials()) == 2


@pytest.mark.parametrize("sampler", ["gp", "nsga2", "tpe"])
def test_a_multi_objective_search_runs_with_each_sampler_and_names_its_objectives(tmp_path, sampler):
    cfg = run_config(tmp_path, [("study.sampler", sampler), ("objectives", ["cv_loss", "params"])], trials=3)

    study = run_search(cfg, progress=False, out=lambda _: None, results=lambda _: None)

    assert [len(t.values) for t in study.get_trials() if t.state == TrialState.COMPLETE] == [2, 2, 2]
    stored = optuna.load_study(study_name="s", storage=cfg.study.storage)
    assert stored.metric_names == ["cv_loss", "params"]  # optuna-dashboard labels the axes with them


# --- constraints ----------------------------------------------------------------------------------

WIDE_OR_NARROW = {
    "stages": 1,
    "width": {"choice": [4, 48]},
    "block": {"activation": {"choice": ["relu", "gelu", "silu", "elu"]}},
    "training": {"lr": 0.05},
}


def test_constraints_mark_each_trial_rank_feasible_first_and_export_the_best_within_them(tmp_path, capsys):
    from nas.deploy.export import pick_trial

    limit = 500  # one stage of width 4 has about 100 parameters, of width 48 about 1,000
    path = write_digits_run(
        tmp_path,
        WIDE_OR_NARROW,
        f"sqlite:///{tmp_path}/nas.db",
        {"name": "c", "sampler": "random", "trials": 6, "seed": 1},
        {"folds": 2, "epochs": 1},
    )
    cfg = load_run_config(path, [("constraints", {"params": limit})])

    study = run_search(cfg, progress=False, out=lambda _: None, results=lambda _: None)

    done = [t for t in study.get_trials() if t.state == TrialState.COMPLETE]
    widths = {t.user_attrs["arch"]["stages"][0]["width"] for t in done}
    assert widths == {4, 48}, "the seed should draw both widths"
    for t in done:
        assert t.constraints == {"params": t.user_attrs["folded_params"] - limit}
    feasible = [t for t in done if t.constraints["params"] <= 0]
    best = min(feasible, key=lambda t: (t.value, t.number))
    assert [t.number for t in top_trials(study, len(done))][: len(feasible)] == sorted(
        (t.number for t in feasible), key=lambda n: (study.trials[n].value, n)
    )
    assert best_value(study) == best.value and pick_trial(study, None).number == best.number
    rows = summary_table(study, len(done)).splitlines()
    assert rows[1].split()[-1] == "limits"
    said = [row.split()[-1] for row in rows[3:]]  # feasible rows first, then how far over the others are
    assert said == ["ok"] * len(feasible) + ["over"] * (len(done) - len(feasible)) and "params +" in rows[-1]

    with pytest.raises(ConfigError, match="constraints.params: study .c. was run with 500"):  # other limits: refused
        check_contract(load_run_config(path, [("constraints", {"params": 10 * limit})]), study._storage, None, False)


@pytest.mark.parametrize(
    ("constraints", "words"),
    [({"cv_loss": 1}, "constraints.cv_loss: unknown measure"), ({"params": 0}, "must be > 0"), ([1], "mapping")],
)
def test_a_constraint_that_cannot_mean_anything_is_one_line(tmp_path, constraints, words):
    path = write_digits_run(tmp_path, SPACE, "sqlite:///x.db", {"name": "c"}, {"folds": 2, "epochs": 1})
    with pytest.raises(ConfigError, match=words):
        load_run_config(path, [("constraints", constraints)])


@pytest.mark.parametrize(
    ("pruner", "fold_mode", "validations"),
    [("none", "together", 2), ("none", "sequential", 2), ("median", "together", 6)],
)
def test_a_progress_bar_shows_the_training_loss_and_validates_only_where_a_pruner_reads_every_epoch(
    tmp_path, monkeypatch, capsys, pruner, fold_mode, validations
):
    import nas.training.folds_together
    import nas.training.train

    calls = []
    for module in (nas.training.train, nas.training.folds_together):  # fit's and the folds-together validation
        real = module.evaluate
        monkeypatch.setattr(
            module,
            "evaluate",
            lambda *a, real=real, **k: calls.append(sys._getframe(1).f_code.co_name) or real(*a, **k),
        )
    cfg = run_config(
        tmp_path,
        [
            Override("evaluation.epochs", 3),
            Override("evaluation.pruner", pruner),
            Override("evaluation.fold_mode", fold_mode),
        ],
        trials=1,
    )
    study = run_search(cfg, progress=True, out=lambda line: None, results=lambda line: None)
    assert study.trials[0].state == TrialState.COMPLETE
    calls = [caller for caller in calls if caller in ("fit", "train_together", "<listcomp>")]  # not diagnostics'
    assert len(calls) == validations  # 2 folds: the last epoch's validation each, or all 3 epochs' for the pruner
    shown = capsys.readouterr().err
    assert ("train_loss=" in shown) == (validations == 2) and ("val_loss=" in shown) == (validations == 6)
