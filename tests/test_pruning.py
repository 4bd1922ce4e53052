"""Multi-fidelity pruning with k-fold CV in both fold modes: steps are epochs trained, and a pruned
trial is recorded as pruned with the fold data it measured."""

import optuna
import pytest
from optuna.trial import TrialState

from conftest import write_digits_run
from nas.cli import search_main
from nas.dashboard.state import trial_rows
from nas.pruning import make_pruner, max_resource
from nas.report import write_report

# Learning rates from hopeless to good: the early rungs have something to tell apart.
SPACE = {"stages": 1, "width": 8, "block": {"norm": {"type": {"choice": ["batch", "none"]}}},
         "training": {"lr": {"float": [1.0e-5, 0.2], "log": True}, "batch_size": 64}}
EPOCHS, FOLDS = 6, 2


def run(tmp_path, pruner: str, fold_mode: str) -> list[optuna.trial.FrozenTrial]:
    url = f"sqlite:///{tmp_path}/nas.db"
    config = write_digits_run(tmp_path, SPACE, url, {"name": "p", "sampler": "random", "trials": 10},
                              {"folds": FOLDS, "epochs": EPOCHS, "pruner": pruner, "fold_mode": fold_mode})
    assert search_main(["--config", str(config), "--no-progress"]) == 0
    return optuna.load_study(study_name="p", storage=url).get_trials()


@pytest.mark.parametrize("fold_mode", ["together", "sequential"])
@pytest.mark.parametrize("pruner", ["successive_halving", "hyperband"])
def test_a_multi_fidelity_search_prunes_some_trials_and_keeps_their_partial_folds(tmp_path, pruner, fold_mode):
    trials = run(tmp_path, pruner, fold_mode)
    states = [t.state for t in trials]
    assert TrialState.PRUNED in states and TrialState.COMPLETE in states and TrialState.FAIL not in states
    top = max_resource(EPOCHS, FOLDS, fold_mode)
    for t in trials:
        steps = sorted(t.intermediate_values)
        assert steps == list(range(1, len(steps) + 1)) and steps[-1] <= top  # one report per epoch trained, from 1
        if t.state == TrialState.COMPLETE:
            assert steps[-1] == top and len(t.user_attrs["fold_losses"]) == FOLDS
            continue
        step, partial = t.user_attrs["pruned_at_step"], t.user_attrs["partial_fold_losses"]
        assert step == steps[-1] < top and len(partial) == FOLDS
        if fold_mode == "together":  # every fold advanced: the report was their mean
            assert t.intermediate_values[step] == pytest.approx(sum(partial) / FOLDS) and t.user_attrs["fold_losses"] == []
        else:  # folds before the current one finished; later ones had not begun
            current = (step - 1) // EPOCHS
            assert t.user_attrs["fold_losses"] == partial[:current] and partial[current] == t.intermediate_values[step]
            assert all(v is None for v in partial[current + 1:])
    text = write_report(f"sqlite:///{tmp_path}/nas.db", "p", tmp_path / "report").read_text()
    pruned = sum(s == TrialState.PRUNED for s in states)
    assert f"{pruned} pruned" in text and "## Failed trials\n\nNone." in text
    rows = {row["number"]: row for row in trial_rows(trials)}  # the dashboard's trials table
    for t in trials:
        if t.state == TrialState.PRUNED:
            assert rows[t.number]["state"] == "PRUNED" and rows[t.number]["note"].startswith(f"pruned at step {t.user_attrs['pruned_at_step']} ")


@pytest.mark.parametrize("fold_mode, top", [("together", 12), ("sequential", 36)])
def test_hyperband_spans_one_epoch_to_every_epoch_of_every_fold(fold_mode, top):
    pruner = make_pruner("hyperband", 12, 3, fold_mode)
    assert isinstance(pruner, optuna.pruners.HyperbandPruner) and pruner._max_resource == top and pruner._min_resource == 1
