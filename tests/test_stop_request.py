"""A stop request stored in the study ends a search gracefully at the next trial boundary."""

import subprocess
import sys
import time

import optuna
import pytest
from conftest import write_digits_run
from dashboard_support import SPACE, wait_for
from optuna.trial import TrialState

from nas.cli import search_main
from nas.study.schema import request_stop


@pytest.mark.slow
def test_a_stop_request_ends_the_search_after_its_running_trial_which_completes(tmp_path):
    url = f"sqlite:///{tmp_path}/nas.db"
    config = write_digits_run(
        tmp_path,
        SPACE,
        url,
        {"name": "s", "sampler": "random", "trials": 50, "heartbeat_seconds": 1},
        {"folds": 2, "epochs": 4},
    )
    search = subprocess.Popen(
        [sys.executable, "-m", "nas", "search", "--config", str(config), "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    def running_trial():
        assert search.poll() is None, search.communicate()
        try:
            return [
                t.number
                for t in optuna.load_study(study_name="s", storage=url).get_trials()
                if t.state == TrialState.RUNNING
            ]
        except KeyError:  # the study does not exist yet
            return None

    number = wait_for(running_trial, what="a running trial")[0]
    request_stop(url, "s")
    out, err = search.communicate(timeout=300)
    assert search.returncode == 0, err
    assert "Stopped on request after the running trial" in err and "nas-search --resume --study s" in err
    stored = optuna.load_study(study_name="s", storage=url).get_trials()
    assert all(t.state == TrialState.COMPLETE for t in stored)  # the running one too: not FAIL, not RUNNING
    assert number in [t.number for t in stored] and len(stored) <= number + 2 < 50


def test_a_stop_request_older_than_the_search_is_ignored(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path}/nas.db"
    write_digits_run(tmp_path, SPACE, url, {"name": "s", "sampler": "random", "trials": 1}, {"folds": 2, "epochs": 1})
    monkeypatch.chdir(tmp_path)
    assert search_main(["--config", "run.yaml", "--no-progress"]) == 0
    request_stop(url, "s")
    assert search_main(["--resume", "--study", "s", "--storage", url, "--trials", "3", "--no-progress"]) == 0
    assert [t.state for t in optuna.load_study(study_name="s", storage=url).get_trials()] == [TrialState.COMPLETE] * 3


def test_a_stop_asked_after_the_launch_time_stops_the_search_before_its_first_trial(tmp_path, monkeypatch, capsys):
    """The dashboard passes its Resume time: a Stop while the worker still starts up must not be missed."""
    url = f"sqlite:///{tmp_path}/nas.db"
    write_digits_run(tmp_path, SPACE, url, {"name": "s", "sampler": "random", "trials": 1}, {"folds": 2, "epochs": 1})
    monkeypatch.chdir(tmp_path)
    assert search_main(["--config", "run.yaml", "--no-progress"]) == 0
    launched = time.time()
    request_stop(url, "s")  # after the launch, before this process has even parsed its arguments
    capsys.readouterr()
    assert (
        search_main(
            ["--resume", "--study=s", f"--storage={url}", "--trials=5", f"--launched-at={launched!r}", "--no-progress"]
        )
        == 0
    )
    assert "Stopped on request before the first trial: 1/5 finished" in capsys.readouterr().err
    assert len(optuna.load_study(study_name="s", storage=url).get_trials()) == 1


@pytest.mark.slow
def test_launched_at_must_be_a_finite_time():
    proc = subprocess.run(
        [sys.executable, "-m", "nas", "search", "--resume", "--study=s", "--launched-at=nan"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "--launched-at must be a finite number" in proc.stderr
