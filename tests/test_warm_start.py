"""Warm starts: an earlier study's best candidates queued as a new study's first trials (nas.study.warm_start)."""

import pytest
from conftest import write_digits_run
from optuna.trial import TrialState

from nas.cli import search_main
from nas.search.config import Override, load_run_config
from nas.search.space import Space
from nas.study.run import run_search
from nas.study.schema import WARM_START_ATTR, scored_trials
from nas.study.warm_start import map_params

SPACE = {
    "stages": 1,
    "width": 8,
    "training": {"lr": {"float": [0.01, 0.1], "log": True}, "batch_size": {"choice": [32, 64]}},
}


def run(folder, name: str, trials: int, overrides=(), space=SPACE):
    path = write_digits_run(
        folder,
        space,
        f"sqlite:///{folder}/nas.db",
        {"name": name, "sampler": "random", "trials": trials},
        {"folds": 2, "epochs": 1},
    )
    out = []
    study = run_search(load_run_config(path, list(overrides)), progress=False, out=out.append, results=lambda _: None)
    return study, out


def test_the_best_candidates_of_an_earlier_study_are_the_first_trials_of_a_new_one_and_are_queued_once(tmp_path):
    source, _ = run(tmp_path, "source", 4)
    best = scored_trials(source.trials)[:2]
    warm = [Override("study.warm_start.study", "source", "--warm-start"), Override("study.warm_start.top", 2, "--top")]
    study, out = run(tmp_path, "target", 3, warm)
    first = study.trials[:2]
    assert [t.params for t in first] == [t.params for t in best]  # the same candidates, best first
    assert all(t.state == TrialState.COMPLETE for t in first)
    assert [t.user_attrs[WARM_START_ATTR]["trial"] for t in first] == [t.number for t in best]
    assert [t.user_attrs[WARM_START_ATTR]["study"] for t in first] == ["source", "source"]
    # scored under the new study's own contract: its own folds' losses, not copied from the earlier study
    assert all("fold_losses" in t.user_attrs for t in first) and WARM_START_ATTR not in study.trials[2].user_attrs
    said = [line for line in out if line.startswith("Warm start")]
    assert said == [
        f"Warm start from 'source': queued its trial(s) {best[0].number}, {best[1].number} as this study's first trials"
    ]
    # a rerun with a larger budget queues nothing again
    study, out = run(tmp_path, "target", 4, warm)
    assert sum(WARM_START_ATTR in t.user_attrs for t in study.trials) == 2 and len(study.trials) == 4
    assert "Warm start from 'source': its best 2 candidate(s) are already queued in this study" in out


def test_a_candidate_is_mapped_onto_a_different_space_naming_what_did_not_carry_over():
    space = Space(
        {
            "stages": 1,
            "width": {"choice": [16, 32]},
            "training": {"lr": {"float": [0.2, 0.5]}, "batch_size": {"choice": [32, 64]}},
        },
        (1, 8, 8),
        10,
    )
    kept, dropped, fresh = map_params(space, {"training.lr": 0.05, "training.batch_size": 64, "block.kernel": 5})
    assert kept == {"training.batch_size": 64}  # lr 0.05 lies outside [0.2, 0.5]; block.kernel is no key here
    assert dropped == ["training.lr", "block.kernel"] and fresh == ["width"]


def test_a_warm_start_onto_another_space_queues_what_fits_and_says_what_did_not(tmp_path):
    run(tmp_path, "source", 3)
    other = {
        **SPACE,
        "width": {"choice": [8, 16]},
        "training": {"lr": {"float": [0.2, 0.5]}, "batch_size": {"choice": [32, 64]}},
    }
    (tmp_path / "other").mkdir()
    study, out = run(
        tmp_path / "other",
        "target",
        2,
        [
            Override("study.warm_start.study", "source"),
            Override("study.warm_start.storage", f"sqlite:///{tmp_path}/nas.db"),
            Override("study.warm_start.top", 1),
        ],
        space=other,
    )
    said = next(line for line in out if line.startswith("Warm start"))
    assert said.endswith("; not mapped onto this space: training.lr (1 of 1); sampled afresh: width")
    first = study.trials[0]
    assert 0.2 <= first.params["training.lr"] <= 0.5 and first.user_attrs[WARM_START_ATTR]["study"] == "source"


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--warm-start", "nowhere"], "--warm-start: study.warm_start.study: no study named 'nowhere' in sqlite:///"),
        (["--warm-start", "s", "--study", "s"], "--warm-start: study.warm_start.study: names this study itself"),
    ],
)
def test_a_warm_start_that_cannot_be_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, args, words):
    monkeypatch.chdir(tmp_path)
    path = write_digits_run(
        tmp_path, SPACE, f"sqlite:///{tmp_path}/nas.db", {"name": "t", "trials": 1}, {"folds": 2, "epochs": 1}
    )
    assert search_main(["--config", str(path), "--no-progress", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(words) and "Traceback" not in "\n".join(err)
    if args[1] == "nowhere":
        assert "t" not in [
            s.study_name for s in __import__("optuna").get_all_study_summaries(f"sqlite:///{tmp_path}/nas.db")
        ]
