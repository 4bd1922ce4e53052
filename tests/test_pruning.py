"""Pruning with k-fold CV in both fold modes: what a step is, that no trial is judged when its CV is
complete, that failed trials are out of the rungs, and what a pruned trial keeps."""

import statistics

import optuna
import pytest
import torch
from conftest import write_digits_run
from optuna.trial import TrialState

from nas.cli import search_main
from nas.dashboard.state import trial_rows
from nas.search.pruners import max_resource
from nas.study.pruning import Reporter, make_pruner
from nas.study.report import write_report
from nas.training.train import EpochReport

# Learning rates from hopeless to good: the early rungs have something to tell apart.
SPACE = {
    "stages": 1,
    "width": 8,
    "block": {"norm": {"type": {"choice": ["batch", "none"]}}},
    "training": {"lr": {"float": [1.0e-5, 0.2], "log": True}, "batch_size": 64},
}
EPOCHS, FOLDS = 6, 2


def run(tmp_path, pruner: str, fold_mode: str, trials: int = 10, **evaluation) -> list[optuna.trial.FrozenTrial]:
    url = f"sqlite:///{tmp_path}/nas.db"
    evaluation = {"folds": FOLDS, "epochs": EPOCHS, "pruner": pruner, "fold_mode": fold_mode, **evaluation}
    config = write_digits_run(tmp_path, SPACE, url, {"name": "p", "sampler": "random", "trials": trials}, evaluation)
    assert search_main(["--config", str(config), "--no-progress"]) == 0
    return optuna.load_study(study_name="p", storage=url).get_trials()


@pytest.mark.slow
@pytest.mark.parametrize("fold_mode", ["together", "sequential"])
@pytest.mark.parametrize("pruner", ["successive_halving", "hyperband"])
def test_a_multi_fidelity_search_prunes_some_trials_and_keeps_their_partial_folds(tmp_path, pruner, fold_mode):
    # Sequential runs recalibrate BN: what the pruner is told must be what is scored.
    trials = run(tmp_path, pruner, fold_mode, recalibrate_bn=fold_mode == "sequential")
    states = [t.state for t in trials]
    assert TrialState.PRUNED in states and TrialState.COMPLETE in states and TrialState.FAIL not in states
    top = max_resource(EPOCHS, FOLDS, fold_mode)
    for t in trials:
        steps = sorted(t.intermediate_values)
        assert steps == list(range(1, len(steps) + 1)) and steps[-1] <= top  # one per epoch (fold) trained, from 1
        if t.state == TrialState.COMPLETE:
            assert steps[-1] == top and len(t.user_attrs["fold_losses"]) == FOLDS
            assert t.intermediate_values[top] == pytest.approx(t.value)  # the last report is the score
        if fold_mode == "sequential":  # a rung is a number of completed folds, its value the mean of their scores
            scores = t.user_attrs["fold_losses"]
            means = [statistics.fmean(scores[:s]) for s in steps]
            assert [t.intermediate_values[s] for s in steps] == pytest.approx(means)
            if t.state == TrialState.COMPLETE and t.params["block.norm.type"] == "batch":
                assert t.value == pytest.approx(t.user_attrs["recalibrated_loss"]) != t.user_attrs["eval_mode_loss"]
        if t.state == TrialState.COMPLETE:
            continue
        step, partial = t.user_attrs["pruned_at_step"], t.user_attrs["partial_fold_losses"]
        assert step == steps[-1] < top and len(partial) == FOLDS
        if fold_mode == "together":  # every fold advanced: the report was their mean
            assert t.intermediate_values[step] == pytest.approx(sum(partial) / FOLDS)
            assert t.user_attrs["fold_losses"] == []
        else:  # the first `step` folds finished; later ones had not begun
            assert len(t.user_attrs["fold_losses"]) == step and t.user_attrs["fold_losses"] == partial[:step]
            assert all(v is None for v in partial[step:])
    text = write_report(f"sqlite:///{tmp_path}/nas.db", "p", tmp_path / "report").read_text()
    pruned = sum(s == TrialState.PRUNED for s in states)
    assert f"{pruned} pruned" in text and "## Failed trials\n\nNone." in text
    rows = {row["number"]: row for row in trial_rows(trials)}  # the dashboard's trials table
    for t in trials:
        if t.state == TrialState.PRUNED:
            note = f"pruned at step {t.user_attrs['pruned_at_step']} "
            assert rows[t.number]["state"] == "PRUNED" and rows[t.number]["note"].startswith(note)


def test_wilcoxon_on_sequential_folds_prunes_hopeless_trials_before_their_last_fold(tmp_path):
    folds = 5  # the fewest that can prune at p 0.1: after 4 folds the smallest p is 1/16
    trials = run(tmp_path, "wilcoxon", "sequential", trials=6, folds=folds, epochs=1)
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned and TrialState.FAIL not in {t.state for t in trials}
    for t in pruned:  # judged on 4 paired fold scores, with the fifth fold never trained
        assert t.user_attrs["pruned_at_step"] == folds - 2 and sorted(t.intermediate_values) == list(range(folds - 1))
        assert [t.intermediate_values[f] for f in range(folds - 1)] == t.user_attrs["fold_losses"]
        best = min((u for u in trials if u.state == TrialState.COMPLETE and u.number < t.number), key=lambda u: u.value)
        assert all(t.intermediate_values[f] > best.intermediate_values[f] for f in range(folds - 1))


def test_a_together_trial_that_falls_back_to_sequential_reports_on_the_studys_scale(tmp_path, monkeypatch):
    import nas.training.folds_together

    def out_of_memory(device):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(nas.training.folds_together, "autocast", out_of_memory)
    trials = run(tmp_path, "median", "together", trials=2)
    for t in trials:
        assert t.state == TrialState.COMPLETE and t.user_attrs["fold_mode"] == "sequential"
        assert t.intermediate_values == pytest.approx({EPOCHS: t.value})  # its CV mean at the study's last step


def drive(study: optuna.Study, pruner: str, means: list[float], fail: bool = False) -> optuna.trial.FrozenTrial:
    """One trial whose folds train together and whose fold mean after each epoch is `means[epoch]`."""

    def objective(trial):
        reporter = Reporter(trial, pruner, len(means), 2)
        for epoch, mean in enumerate(means):
            reporter.epoch(EpochReport(epoch, mean, 0.0, None, [mean, mean]))
        if fail:
            raise RuntimeError("interrupted")
        return means[-1]

    study.optimize(objective, n_trials=1, catch=(RuntimeError,))
    return study.trials[-1]


def test_no_trial_is_judged_once_its_cross_validation_is_complete(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/p.db", pruner=make_pruner("median", 2, 2, "together"))
    for _ in range(5):
        drive(study, "median", [1.0, 0.5])
    late = drive(study, "median", [0.9, 0.95])  # ahead after epoch 1, behind after the last: trained in full
    assert late.state == TrialState.COMPLETE and late.value == 0.95
    early = drive(study, "median", [1.2, 0.4])  # behind after epoch 1: pruned where it saves an epoch
    assert early.state == TrialState.PRUNED and early.user_attrs["pruned_at_step"] == 1


def test_a_failed_trial_does_not_compete_in_the_successive_halving_rungs(tmp_path):
    pruner = make_pruner("successive_halving", 9, 2, "together")
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/p.db", pruner=pruner)
    # A very good rung 0, then interrupted:
    assert drive(study, "successive_halving", [0.01] * 9, fail=True).state == TrialState.FAIL
    retried = drive(study, "successive_halving", [0.5] * 9)
    assert retried.state == TrialState.COMPLETE  # alone in rung 0 (and 3): promoted
    assert drive(study, "successive_halving", [0.01] * 9).state == TrialState.COMPLETE
    assert drive(study, "successive_halving", [0.5] * 9).state == TrialState.PRUNED  # a completed rival still counts


def test_hyperband_without_failed_trials_prunes_exactly_as_optunas(tmp_path):
    def states(pruner) -> list[tuple]:
        study = optuna.create_study(study_name="hb", pruner=pruner)  # brackets are drawn from name and trial number

        def objective(trial):
            for step in range(1, 10):
                trial.report((trial.number * 7919 % 13) / step, step)  # a fixed, trial-dependent curve
                if trial.should_prune():
                    raise optuna.TrialPruned()
            return 0.0

        study.optimize(objective, n_trials=40)
        return [(t.state, t.last_step) for t in study.trials]

    ours = states(make_pruner("hyperband", 9, 3, "together"))
    assert ours == states(optuna.pruners.HyperbandPruner(min_resource=1, max_resource=9, reduction_factor=3))
    assert {step for state, step in ours if state == TrialState.PRUNED} >= {1, 3}  # brackets judging at rungs 1 and 3


@pytest.mark.parametrize("fold_mode, top", [("together", 12), ("sequential", 3)])
def test_hyperband_spans_one_step_to_the_last_epoch_or_fold(fold_mode, top):
    pruner = make_pruner("hyperband", 12, 3, fold_mode).inner
    assert isinstance(pruner, optuna.pruners.HyperbandPruner)
    assert pruner._max_resource == top and pruner._min_resource == 1
