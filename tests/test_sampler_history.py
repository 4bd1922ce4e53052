"""What the sampler and the pruner see of repeated proposals: start-up lasts its configured number of
trained candidates; a repeat of an older config version is trained; a candidate that fails on every try
counts as tried, so a finite space still ends as exhausted. Real nas-search runs on digits, real SQLite."""

from collections import Counter

import optuna
import pytest
from conftest import write_digits_run
from optuna.trial import TrialState

from nas.cli import search_main
from nas.search.samplers import make_sampler
from nas.study.schema import VERSION_ATTR, counts_toward_budget, is_duplicate, is_failure

# 12 candidates, as in the issue: random start-up draws repeat one before 10 are trained
TWELVE = {
    "stages": 1,
    "width": {"choice": [8, 16]},
    "block": {"norm": {"type": {"choice": ["batch", "none"]}}, "activation": {"choice": ["relu", "gelu", "silu"]}},
    "training": {"lr": 0.05},
}
FOUR = {
    "stages": 1,
    "width": {"choice": [8, 16]},
    "block": {"norm": {"type": {"choice": ["batch", "none"]}}},
    "training": {"lr": 0.05},
}
# lr 1000 diverges at once (loss nan): two of the four candidates fail on every try
FAILING = {
    "stages": 1,
    "width": {"choice": [8, 16]},
    "block": {"norm": {"type": "none"}},
    "training": {"lr": {"choice": [0.05, 1000.0]}},
}


def run(folder, space, trials, sampler="tpe", *extra, **evaluation):
    study = {"name": "s", "sampler": sampler, "trials": trials}
    evaluation = {"folds": 2, "epochs": 1, **evaluation}
    config = write_digits_run(folder, space, f"sqlite:///{folder}/nas.db", study, evaluation)
    return search_main(["--config", str(config), "--no-progress", *extra])


def load(folder, **kwargs):
    return optuna.load_study(study_name="s", storage=f"sqlite:///{folder}/nas.db", **kwargs)


def trained_before(trials, number):
    return sum(counts_toward_budget(t) for t in trials if t.number < number)


@pytest.mark.slow
def test_tpe_models_only_after_its_start_up_count_of_trained_candidates(tmp_path):
    assert run(tmp_path, TWELVE, 12) == 0
    trials = load(tmp_path).get_trials()
    startup = make_sampler("tpe", 0)._n_startup_trials
    # TPE (constant liar) stores the parameters its model proposed on the trial; start-up draws store none
    modelled = [t for t in trials if any(key.startswith("tpe:relative_params") for key in t.system_attrs)]
    assert modelled, "no proposal came from TPE's model"
    first = modelled[0]
    assert any(is_duplicate(t) for t in trials if t.number < first.number)  # the start-up phase had repeats
    assert trained_before(trials, first.number) >= startup
    # and the sampler's history (COMPLETE and PRUNED trials) holds each trained candidate once, no repeat
    seen = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert seen == [t for t in trials if counts_toward_budget(t)]
    assert len({tuple(sorted(t.params.items())) for t in seen}) == len(seen) == 12


def test_the_median_pruners_start_up_counts_trained_candidates_only(tmp_path):
    assert run(tmp_path, FOUR, 10, "random", pruner="median", epochs=2) == 0
    trials = load(tmp_path).get_trials()
    trained = [t for t in trials if counts_toward_budget(t)]
    assert len(trained) == 4 and any(map(is_duplicate, trials))
    step = max(set.intersection(*(set(t.intermediate_values) for t in trained)))
    worst = 10 * max(t.intermediate_values[step] for t in trained)

    def pruned_with_start_up(n: int) -> bool:
        probe = load(tmp_path, pruner=optuna.pruners.MedianPruner(n_startup_trials=n, n_warmup_steps=0)).ask()
        probe.report(worst, step)
        return probe.should_prune()

    assert pruned_with_start_up(len(trained))  # start-up over: the probe is far worse than the median
    assert not pruned_with_start_up(len(trained) + 1)  # the repeats are not one more trained candidate


@pytest.mark.slow
def test_a_repeat_of_an_older_config_version_is_trained(tmp_path, capsys):
    assert run(tmp_path, FOUR, 10) == 0
    assert "all 4 candidates of the space have been trained" in capsys.readouterr().err
    assert run(tmp_path, FOUR, 20, "tpe", "--epochs", "2", "--force") == 0
    out = capsys.readouterr().err
    assert "recorded as config version 1" in out
    assert "all 4 candidates of the space have been trained under config version 1" in out
    trials = load(tmp_path).get_trials()
    by_version = {
        v: [t for t in trials if counts_toward_budget(t) and t.user_attrs.get(VERSION_ATTR, 0) == v] for v in (0, 1)
    }
    params = {v: sorted(tuple(sorted(t.params.items())) for t in by_version[v]) for v in (0, 1)}
    assert len(params[1]) == 4 and params[1] == params[0]  # each candidate trained again, under the new contract
    assert all(len(t.user_attrs["fold_losses"]) == 2 for t in by_version[1])
    by_number = {t.number: t for t in trials}
    for t in trials:
        if is_duplicate(t) and t.user_attrs.get(VERSION_ATTR, 0) == 1:
            assert by_number[t.user_attrs["duplicate_of"]].user_attrs.get(VERSION_ATTR, 0) == 1


def test_a_candidate_that_fails_every_try_counts_as_tried_and_the_space_is_exhausted(tmp_path, capsys):
    # old behaviour: the failing candidates stay untried forever (queued after every repeat) until
    # "stopped after 5 failed trials in a row"; the timeout only bounds that
    assert run(tmp_path, FAILING, 10, "tpe", "--timeout", "120", "--set", "study.retries=1") == 0
    out = capsys.readouterr().err
    assert (
        "Stopped: search space exhausted: all 4 candidates of the space have been tried: 2 trained, "
        "2 failed on each of their 2 tries (1 + study.retries)"
    ) in out
    trials = load(tmp_path).get_trials()
    failures = [t for t in trials if is_failure(t)]
    assert all("loss is nan" in t.user_attrs["fail_reason"] and t.params["training.lr"] == 1000.0 for t in failures)
    tries = Counter(tuple(sorted(t.params.items())) for t in failures)
    assert sorted(tries.values()) == [2, 2]  # each failing candidate: its first try and one retry, never more
    repeats = [t for t in trials if is_duplicate(t)]
    assert repeats
    assert all(t.state == TrialState.FAIL and t.user_attrs["fail_reason"].startswith("repeat of") for t in repeats)
    assert sum(map(counts_toward_budget, trials)) == 2


@pytest.mark.parametrize(("sampler", "startup"), [("tpe", 3), ("gp", 4), ("tpe", None)])
def test_study_startup_trials_sets_how_many_random_draws_tpe_and_gp_make_first(tmp_path, sampler, startup):
    from nas.search.config import Override, load_run_config
    from nas.search.samplers import STARTUP_TRIALS
    from nas.study.opening import create_or_load, load_for_search
    from nas.study.storage import storage_of

    path = write_digits_run(tmp_path, FOUR, f"sqlite:///{tmp_path}/nas.db", {"name": "s", "sampler": sampler}, {})
    overrides = [] if startup is None else [Override("study.startup_trials", startup, "--set")]
    cfg = load_run_config(path, overrides)
    storage = storage_of(cfg.study.storage)
    create_or_load(cfg, storage)
    assert load_for_search(cfg, storage, 0).sampler._n_startup_trials == (startup or STARTUP_TRIALS)
