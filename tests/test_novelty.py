"""Every trained trial is a new candidate: no process replays another's draws, a repeated proposal costs
no training, and a finite space that is used up ends the search. Real SQLite, real processes."""

import subprocess
import sys

import optuna
import pytest
from conftest import write_digits_run
from optuna.trial import TrialState

from nas.cli import search_main
from nas.search.space import Space
from nas.study.duplicates import list_candidates
from nas.study.schema import counts_toward_budget

# A float range: two draws coincide only when a sampler replays the same random stream.
CONTINUOUS = {
    "stages": 1,
    "width": 8,
    "block": {"norm": {"type": {"choice": ["batch", "none"]}}},
    "training": {"lr": {"float": [0.01, 0.1], "log": True}},
}
# Four candidates: samplers soon propose one again.
FINITE = {
    "stages": 1,
    "width": {"choice": [8, 16]},
    "block": {"norm": {"type": {"choice": ["batch", "none"]}}},
    "training": {"lr": 0.05},
}


def make_run(folder, space, sampler, trials, name="n"):
    write_digits_run(
        folder,
        space,
        f"sqlite:///{folder}/nas.db",
        {"name": name, "sampler": sampler, "trials": trials},
        {"folds": 2, "epochs": 1},
    )
    return folder / "run.yaml"


def load(folder, name="n"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{folder}/nas.db").get_trials()


def param_sets(trials):
    return {tuple(sorted(t.params.items())) for t in trials}


def assert_every_trial_new(trials, expected_trained):
    trained = [t for t in trials if counts_toward_budget(t)]
    assert len(trained) == expected_trained
    assert len(param_sets(trained)) == len(trained)
    # nothing was even proposed twice: with a float range only a replayed draw repeats
    assert len(param_sets(trials)) == len(trials)
    assert not [t for t in trials if "duplicate_of" in t.user_attrs]


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_a_study_resumed_four_times_never_repeats_a_candidate(tmp_path, sampler):
    config = make_run(tmp_path, CONTINUOUS, sampler, 2)
    for budget in (2, 4, 6, 8):
        assert search_main(["--config", str(config), "--trials", str(budget), "--no-progress"]) == 0
    assert_every_trial_new(load(tmp_path), 8)


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_three_workers_never_repeat_a_candidate(tmp_path, sampler):
    config = make_run(tmp_path, CONTINUOUS, sampler, 9)
    proc = subprocess.run(
        [sys.executable, "-m", "nas.cli", "--config", str(config), "--workers", "3", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    trials = [t for t in load(tmp_path) if t.state != TrialState.FAIL]  # a late worker's surplus trial fails unsampled
    assert_every_trial_new(trials, 9)


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_a_dashboard_style_resume_does_not_replay_the_first_run(tmp_path, sampler):
    config = make_run(tmp_path, CONTINUOUS, sampler, 3)
    assert search_main(["--config", str(config), "--no-progress"]) == 0
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "nas",
            "search",
            "--resume",
            "--study",
            "n",
            "--storage",
            f"sqlite:///{tmp_path}/nas.db",
            "--no-progress",
            "--trials",
            "6",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert_every_trial_new(load(tmp_path), 6)


def test_a_fresh_run_reproduces_exactly(tmp_path):
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        config = make_run(folder, CONTINUOUS, "tpe", 4, name="same")
        assert search_main(["--config", str(config), "--no-progress"]) == 0
    a, b = load(tmp_path / "a", "same"), load(tmp_path / "b", "same")
    assert [t.params for t in a] == [t.params for t in b]
    assert [t.value for t in a] == [t.value for t in b]


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_a_used_up_finite_space_trains_each_candidate_once_and_stops(tmp_path, capsys, sampler):
    config = make_run(tmp_path, FINITE, sampler, 10)
    assert search_main(["--config", str(config), "--no-progress"]) == 0
    said = capsys.readouterr()
    out = said.out  # the table
    assert "search space exhausted: all 4 candidates of the space have been trained" in said.err
    trials = load(tmp_path)
    trained = [t for t in trials if counts_toward_budget(t)]
    assert len(trained) == 4 and len(param_sets(trained)) == 4
    by_number = {t.number: t for t in trials}
    repeats = [t for t in trials if "duplicate_of" in t.user_attrs]
    assert repeats  # the stop comes with a proposal of a trained candidate
    for t in repeats:  # recorded without training, as FAIL: no sampler or pruner counts it
        original = by_number[t.user_attrs["duplicate_of"]]
        assert t.params == original.params and t.state == TrialState.FAIL and t.value is None
        assert t.user_attrs["fail_reason"] == f"repeat of trial {original.number} (not trained)"
        assert "fold_losses" not in t.user_attrs and "duplicate_of" not in original.user_attrs
    # the ranking shows each candidate once, its ± labelled for what it is
    assert "cv loss ± SD over folds" in out
    table = [line.split()[0] for line in out.splitlines() if line[:1].isdigit()]
    assert len(table) == 4 and {int(n) for n in table} == {t.number for t in trained}
    # a rerun with a larger budget trains nothing new and says so
    assert search_main(["--config", str(config), "--trials", "12", "--no-progress"]) == 0
    assert "search space exhausted" in capsys.readouterr().err
    assert len([t for t in load(tmp_path) if counts_toward_budget(t)]) == 4


def test_listing_a_conditional_space_counts_each_candidate_once():
    # 1 stage: batch at 2 positions + none = 3; 2 stages with a decision per stage: 3 x 3 = 9
    space = Space(
        {
            "stages": {"choice": [1, 2]},
            "block": {
                "norm": {
                    "type": {"choice": ["batch", "none"]},
                    "position": {"choice": ["pre_conv", "post_conv"]},
                    "share": "per_stage",
                }
            },
        }
    )
    listed = list_candidates(space, 1000)
    assert len(listed) == 12
    assert len({tuple(sorted(p.items())) for p in listed}) == 12
    assert all("stage1.block.norm.position" not in p for p in listed if p["stage1.block.norm.type"] == "none")


def test_a_space_with_a_float_range_or_too_many_candidates_is_not_listed():
    assert list_candidates(Space({"training": {"lr": {"float": [0.01, 0.1]}}}), 1000) is None
    assert list_candidates(Space({"width": {"int": [1, 100]}}), 50) is None
    assert len(list_candidates(Space({"width": {"int": [1, 100]}}), 100)) == 100
