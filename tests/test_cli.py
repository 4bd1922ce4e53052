"""`nas-search` end to end on digits: the study, its budget, resume, and bad input on the command line."""

import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import write_digits_run

from nas.cli import search_main
from nas.study.schema import read_run_config

TINY_SPACE = {
    "stages": 1,
    "width": 8,
    "block": {
        "norm": {"type": {"choice": ["batch", "none"]}, "position": {"choice": ["pre_conv", "post_conv", "post_act"]}}
    },
    "training": {"batch_size": 64, "lr": {"float": [0.01, 0.1], "log": True}},
}


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    """A config for digits with a tiny space and budget, and the cwd set to its folder."""
    write_digits_run(
        tmp_path,
        TINY_SPACE,
        f"sqlite:///{tmp_path}/runs/nas.db",
        {"name": "tiny", "sampler": "tpe", "trials": 2},
        {"folds": 2, "epochs": 1},
    )
    monkeypatch.chdir(tmp_path)
    return tmp_path


def trials(run_dir: Path, name: str = "tiny") -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{run_dir}/runs/nas.db").get_trials()


@pytest.mark.slow
def test_digits_search_in_a_real_process_stores_scored_trials_and_prints_the_table(run_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "nas.cli", "--config", "run.yaml"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    done = trials(run_dir)
    assert [t.state for t in done] == [optuna.trial.TrialState.COMPLETE] * 2
    for t in done:
        attrs = t.user_attrs
        assert len(attrs["fold_losses"]) == 2 and len(attrs["fold_accuracies"]) == 2
        assert t.value == pytest.approx(sum(attrs["fold_losses"]) / 2)
        assert 0.0 <= attrs["cv_accuracy"] <= 1.0 and attrs["params"] > 0 and attrs["train_seconds"] > 0
        assert attrs["arch"]["stages"][0]["blocks"][0]["norm"]["type"] == t.params["block.norm.type"]
        assert ("block.norm.position" in t.params) == (t.params["block.norm.type"] != "none")
    assert "Top 2 of 2 finished trials" in proc.stdout
    best = min(done, key=lambda t: t.value)
    assert f"{best.value:.4f} (trial {best.number}, " in next(
        line for line in proc.stdout.splitlines() if line.startswith("Best CV loss over this run")
    )
    table_rows = [line.split()[0] for line in proc.stdout.splitlines() if line[:1].isdigit()]
    assert table_rows[0] == str(best.number)
    assert "\r" not in proc.stderr  # no progress bar when stderr is not a terminal
    first, second = done
    assert f"trial 0 complete (1/2): cv loss {first.value:.4f}, best {first.value:.4f}" in proc.stderr.splitlines()
    assert f"trial 1 complete (2/2): cv loss {second.value:.4f}, best {best.value:.4f}" in proc.stderr.splitlines()


def test_rerun_runs_only_the_remainder_and_a_finished_study_runs_nothing(run_dir, capsys):
    assert search_main(["--config", "run.yaml", "--trials", "2"]) == 0
    first = [(t.number, t.value) for t in trials(run_dir)]
    assert search_main(["--config", "run.yaml", "--trials", "4"]) == 0
    after = trials(run_dir)
    assert len(after) == 4 and [(t.number, t.value) for t in after[:2]] == first
    capsys.readouterr()
    assert search_main(["--config", "run.yaml", "--trials", "4"]) == 0
    assert len(trials(run_dir)) == 4
    assert "nothing to run" in capsys.readouterr().err


def test_resume_needs_no_yaml_and_keeps_the_stored_space(run_dir):
    assert search_main(["--config", "run.yaml", "--trials", "1"]) == 0
    (run_dir / "space.yaml").unlink()
    (run_dir / "run.yaml").unlink()
    storage = f"sqlite:///{run_dir}/runs/nas.db"
    assert search_main(["--resume", "--study", "tiny", "--storage", storage, "--trials", "2"]) == 0
    done = trials(run_dir)
    assert len(done) == 2 and all(t.state == optuna.trial.TrialState.COMPLETE for t in done)
    assert done[1].user_attrs["arch"]["stages"][0]["width"] == 8
    study = optuna.load_study(study_name="tiny", storage=storage)
    stored = read_run_config(study._storage, study._study_id)
    assert stored["study"]["trials"] == 2 and stored["space"] == TINY_SPACE
    json.dumps(stored)


def test_resume_of_an_unknown_study_is_one_clear_line(run_dir, capsys):
    assert search_main(["--config", "run.yaml", "--trials", "1"]) == 0
    capsys.readouterr()
    code = search_main(["--resume", "--study", "nope", "--storage", f"sqlite:///{run_dir}/runs/nas.db"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "no study named 'nope'" in err and "tiny" in err


@pytest.mark.slow
def test_bad_config_exits_2_with_one_line_and_writes_nothing(run_dir):
    text = (run_dir / "run.yaml").read_text().replace("folds: 2", "fold: 2")
    (run_dir / "bad.yaml").write_text(text)
    proc = subprocess.run(
        [sys.executable, "-m", "nas.cli", "--config", "bad.yaml"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(
        "bad.yaml: evaluation.fold: unknown key (known: folds, epochs"
    )
    assert proc.stderr.strip().endswith("did you mean 'folds'?")
    assert "Traceback" not in proc.stderr
    assert not (run_dir / "runs").exists()


@pytest.mark.parametrize(
    "args, words",
    [
        (["--trials", "0"], "--trials: study.trials: must be >= 1"),
        (["--sampler", "cmaes"], "--sampler: study.sampler: unknown sampler 'cmaes'"),
        (["--set", "dataset.name=cifar"], "--set: dataset.name: unknown name 'cifar'"),
        (["--set", "evaluation.epochs=many"], "--set: evaluation.epochs: expected an integer"),
        (["--set", "dataset={name: npz, root: nowhere.npz}"], "--set: dataset.root: file not found: "),
        (["--budget", "ten"], "--budget: study.budget: expected a duration such as 90s, 10m or 1h30m"),
        (["--budget", "0s"], "--budget: study.budget: must be a positive duration, got '0s'"),
        (["--stop-after", "0"], "--stop-after: study.stop_after: must be >= 1"),
        (["--top", "0"], "--top: study.warm_start.top: must be >= 1"),
        (["--timeout", "-1"], "--timeout: study.timeout: must be >= 0"),  # a key run.yaml lacks: the flag is named
        (
            ["--stop-after", "5", "--set", "objectives=[cv_loss, params]"],
            "--stop-after: study.stop_after: a stop on stagnation follows one objective's best",
        ),
    ],
)
def test_bad_overrides_exit_2_naming_the_flag_and_the_key(run_dir, capsys, args, words):
    assert search_main(["--config", "run.yaml", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(words) and err.count("\n") == 1


def test_a_dataset_error_names_the_config_file(run_dir, capsys):
    config = yaml.safe_load((run_dir / "run.yaml").read_text())
    (run_dir / "npz.yaml").write_text(yaml.safe_dump({**config, "dataset": {"name": "npz", "root": "nowhere.npz"}}))
    assert search_main(["--config", "npz.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"npz.yaml: dataset.root: file not found: {run_dir / 'nowhere.npz'}") and err.count("\n") == 1
    assert not (run_dir / "runs").exists()


@pytest.mark.slow
def test_pruners_from_the_config_prune_or_complete_every_trial(run_dir):
    sequential = ["--folds", "5", "--set", "evaluation.fold_mode=sequential"]  # wilcoxon can prune only there
    for pruner, extra in (("median", []), ("wilcoxon", sequential)):
        assert (
            search_main(
                [
                    "--config",
                    "run.yaml",
                    "--study",
                    pruner,
                    "--set",
                    f"evaluation.pruner={pruner}",
                    "--trials",
                    "3",
                    "--epochs",
                    "2",
                    *extra,
                ]
            )
            == 0
        )
        states = {t.state for t in trials(run_dir, pruner)}
        assert (
            states <= {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}
            and len(trials(run_dir, pruner)) == 3
        )


@pytest.mark.slow
def test_usage_errors_and_version():
    with pytest.raises(SystemExit) as info:
        search_main(["--resume"])
    assert info.value.code == 2
    proc = subprocess.run([sys.executable, "-m", "nas.cli", "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("nas-search ")


def test_bn_diagnostics_and_recalibration_are_stored_per_trial(run_dir):
    assert (
        search_main(
            [
                "--config",
                "run.yaml",
                "--trials",
                "2",
                "--set",
                "evaluation.recalibrate_bn=true",
                "--set",
                "search_space=" + str(run_dir / "space.yaml"),
            ]
        )
        == 0
    )
    for t in trials(run_dir):
        attrs = t.user_attrs
        assert {"eval_mode_loss", "train_mode_loss", "recalibrated_loss"} <= set(attrs)
        assert t.value == pytest.approx(attrs["recalibrated_loss"])
        if t.params["block.norm.type"] == "none":  # nothing to recalibrate, no batch statistics
            assert attrs["train_mode_loss"] == pytest.approx(attrs["eval_mode_loss"])
            assert attrs["recalibrated_loss"] == pytest.approx(attrs["eval_mode_loss"])
