"""Parallel workers on one local study; stopping after repeated failures; a changed space is refused."""

import os
import subprocess
import sys

import optuna
import pytest
import torch
import yaml
from conftest import write_digits_run
from optuna.trial import TrialState

from nas.cli import search_main

SPACE = {
    "stages": 1,
    "width": 8,
    "block": {"norm": {"type": {"choice": ["batch", "none"]}}},
    "training": {"lr": {"float": [0.01, 0.1], "log": True}},
}


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    write_digits_run(
        tmp_path,
        SPACE,
        f"sqlite:///{tmp_path}/nas.db",
        {"name": "w", "sampler": "tpe", "trials": 6},
        {"folds": 2, "epochs": 2},
    )
    monkeypatch.chdir(tmp_path)
    return tmp_path


def trials(run_dir, name="w"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{run_dir}/nas.db").get_trials()


@pytest.mark.slow
def test_three_local_workers_end_with_exactly_the_budget_each_on_its_own_gpu_of_the_list(run_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "nas.cli", "--config", "run.yaml", "--workers", "3"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=run_dir,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "5,7"},  # a fake list: on the CPU each worker still trains there
    )
    assert proc.returncode == 0, proc.stderr
    assert "database is locked" not in proc.stderr
    done = trials(run_dir)
    finished = [t for t in done if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 6
    assert len({t.number for t in done}) == len(done)
    assert not [t for t in done if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert all(
        t.user_attrs.get("fail_reason") == "budget already reached by other workers"
        for t in done
        if t.state == TrialState.FAIL
    )
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    seen = {t.user_attrs["device"] for t in finished}  # the launcher keeps the list; workers 1, 2 get 7, then 5
    assert seen <= {f"{device} (CUDA_VISIBLE_DEVICES={gpus})" for gpus in ("5,7", "7", "5")}, seen
    assert "Top 5 of 6 finished trials" in proc.stdout


@pytest.mark.parametrize(
    ("listed", "count", "gpus"),
    [(None, 0, []), (None, 3, ["0", "1", "2"]), ("2,3", 8, ["2", "3"]), ("", 8, []), ("-1", 8, [])],
)
def test_the_gpus_workers_are_spread_over_are_those_cuda_would_show_them(monkeypatch, listed, count, gpus):
    from nas.study import run

    if listed is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", listed)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)

    assert run.visible_gpus() == gpus


def test_workers_take_the_gpus_round_robin_and_share_a_single_one():
    from nas.study.run import gpu_env

    assert [gpu_env(["0", "1", "2", "3"], worker)["CUDA_VISIBLE_DEVICES"] for worker in range(1, 8)] == [
        "1",
        "2",
        "3",
        "0",
        "1",
        "2",
        "3",
    ]  # with this process on 0: eight workers, two on each GPU
    assert gpu_env(["0"], 1) is None and gpu_env([], 1) is None


def test_search_stops_after_consecutive_failures_with_the_reason(run_dir, capsys):
    # lr 1e3 diverges at once: every trial fails with a non-finite loss
    (run_dir / "space.yaml").write_text(
        yaml.safe_dump({**SPACE, "block": {"norm": {"type": "none"}}, "training": {"lr": 1000.0}})
    )
    assert search_main(["--config", "run.yaml", "--set", "study.max_consecutive_failures=2", "--study", "bad"]) == 2
    err = capsys.readouterr().err
    assert "stopped after 2 failed trials in a row" in err and "loss is nan" in err
    failed = trials(run_dir, "bad")
    assert [t.state for t in failed] == [TrialState.FAIL] * 2
    assert all("loss is nan" in t.user_attrs["fail_reason"] for t in failed)


def test_resuming_with_another_search_space_needs_force(run_dir, capsys):
    assert search_main(["--config", "run.yaml", "--trials", "1"]) == 0
    (run_dir / "space.yaml").write_text(yaml.safe_dump({**SPACE, "width": 16}))
    capsys.readouterr()
    assert search_main(["--config", "run.yaml", "--trials", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--force" in err
    assert len(trials(run_dir)) == 1
    assert search_main(["--config", "run.yaml", "--trials", "2", "--force"]) == 0
    assert trials(run_dir)[1].user_attrs["arch"]["stages"][0]["width"] == 16


def test_out_of_memory_fails_the_trial_with_its_reason_and_the_search_goes_on(run_dir, monkeypatch):
    import nas.training.cross_validation

    real_fit, calls = nas.training.cross_validation.fit, []

    def fit_that_runs_out_of_memory_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(nas.training.cross_validation, "fit", fit_that_runs_out_of_memory_once)
    # sequential: one by one is where an out-of-memory fails the trial (together falls back to it)
    assert (
        search_main(
            ["--config", "run.yaml", "--trials", "2", "--study", "oom", "--set", "evaluation.fold_mode=sequential"]
        )
        == 0
    )
    states = [(t.state, t.user_attrs.get("fail_reason", "")) for t in trials(run_dir, "oom")]
    assert states[0][0] == TrialState.FAIL and states[0][1].startswith("CUDA out of memory")
    assert [s for s, _ in states[1:]] == [TrialState.COMPLETE] * 2


def test_a_spec_that_cannot_be_built_fails_its_trial_and_the_search_goes_on(run_dir, monkeypatch):
    import nas.training.cross_validation

    real_build, calls = nas.training.cross_validation.build, []

    def build_that_rejects_the_first_spec(spec, shape, classes):
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("kernel larger than the input")
        return real_build(spec, shape, classes)

    monkeypatch.setattr(nas.training.cross_validation, "build", build_that_rejects_the_first_spec)
    assert search_main(["--config", "run.yaml", "--trials", "1", "--study", "unbuildable"]) == 0
    first, second = trials(run_dir, "unbuildable")
    assert (
        first.state == TrialState.FAIL
        and "cannot build the model for input (1, 8, 8)" in first.user_attrs["fail_reason"]
    )
    assert second.state == TrialState.COMPLETE


def test_a_worker_runs_the_same_command_without_the_flags_that_launch_workers_launched_when_its_launcher_was():
    from nas.cli import _worker_command

    argv = [
        "--config",
        "c.yaml",
        "--ray",
        "auto",
        "--ray-workers",
        "2",
        "--gpus-per-trial=0.5",
        "--workers",
        "3",
        "--launched-at",
        "5",
        "--progress",
        "--cpus-per-trial",
        "2",
        "--trials",
        "4",
        "--ray",
        "--set",
        "study.seed=1",
    ]
    assert _worker_command(argv, 1796184833.25) == [
        sys.executable,
        "-m",
        "nas.cli",
        "--config",
        "c.yaml",
        "--trials",
        "4",
        "--set",
        "study.seed=1",
        "--no-progress",
        "--launched-at",
        "1796184833.25",
    ]
