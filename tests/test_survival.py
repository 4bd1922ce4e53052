"""Searches survive kill -9 and signals with real processes (bad storage is refused in test_storage.py)."""

import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from conftest import NORM_AND_LR_SPACE, write_digits_run
from optuna.trial import TrialState

from nas.cli import search_main
from nas.study import workers as liveness

SPACE = NORM_AND_LR_SPACE


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    # several seconds per trial (60 epochs): time to catch one running and signal it
    write_digits_run(
        tmp_path,
        SPACE,
        f"sqlite:///{tmp_path}/nas.db",
        {"name": "s", "sampler": "random", "trials": 3, "heartbeat_seconds": 1},
        {"folds": 2, "epochs": 60},
    )
    monkeypatch.chdir(tmp_path)
    return tmp_path


def storage_url(run_dir) -> str:
    return f"sqlite:///{run_dir}/nas.db"


def load(run_dir) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name="s", storage=storage_url(run_dir)).get_trials()


def start_search(run_dir) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "nas.cli", "--config", "run.yaml"],
        cwd=run_dir,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(condition, proc: subprocess.Popen, timeout: float = 120.0):
    """Poll the study until `condition()` holds (the process must still be alive)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            result = condition()
        except (KeyError, ValueError):  # the study does not exist yet
            result = None
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError("condition not reached")


SPACE_PARAMS = {"block.norm.type", "training.lr"}


def running_after_one_complete(run_dir):
    """The second trial once it trains: all its parameters are sampled and the study's last trial is still ahead.

    Waiting for the parameters matters: a trial caught between its creation and its sampling has none yet.
    """
    trials = load(run_dir)
    states = [t.state for t in trials]
    if states == [TrialState.COMPLETE, TrialState.RUNNING] and set(trials[-1].params) == SPACE_PARAMS:
        return trials[-1]
    return None


@pytest.mark.slow
def test_kill_9_mid_trial_then_rerun_at_once_reclaims_the_trial_and_reaches_the_budget(run_dir):
    # a 30 s heartbeat: the rerun cannot be waiting for the dead trial's heartbeat to go stale
    write_digits_run(
        run_dir,
        SPACE,
        storage_url(run_dir),
        {"name": "s", "sampler": "random", "trials": 3, "heartbeat_seconds": 30},
        {"folds": 2, "epochs": 60},
    )
    proc = start_search(run_dir)
    seen = wait_for(lambda: running_after_one_complete(run_dir), proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    left_running = [
        t for t in load(run_dir) if t.state == TrialState.RUNNING
    ]  # the trial seen, or the next if it just ended
    assert len(left_running) == 1 and left_running[0].number >= seen.number
    killed = left_running[0]
    assert killed.user_attrs["worker"]["pid"] == proc.pid
    complete_before = {t.number: (t.params, t.value) for t in load(run_dir) if t.state == TrialState.COMPLETE}

    rerun = subprocess.run(
        [sys.executable, "-m", "nas.cli", "--config", "run.yaml"],
        cwd=run_dir,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rerun.returncode == 0, rerun.stderr
    assert f"Reclaimed trial(s) {killed.number}" in rerun.stderr
    trials = load(run_dir)
    by_number = {t.number: t for t in trials}
    assert by_number[killed.number].state == TrialState.FAIL and killed.params
    assert "worker process gone" in by_number[killed.number].user_attrs["fail_reason"]
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retried) == 1 and retried[0].params == killed.params and retried[0].state == TrialState.COMPLETE
    assert all((by_number[n].params, by_number[n].value) == before for n, before in complete_before.items())
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 3
    assert not [t for t in trials if t.state == TrialState.RUNNING]


def test_a_running_trial_of_another_host_is_left_to_its_heartbeat(run_dir):
    storage = optuna.storages.RDBStorage(storage_url(run_dir))
    study = optuna.create_study(storage=storage, study_name="elsewhere")
    trial = study.ask()
    here = liveness.current()
    trial.set_user_attr("worker", {**here.as_dict(), "host": "another-machine"})
    assert liveness.reclaim_dead_trials(study) == []
    assert study.get_trials()[0].state == TrialState.RUNNING
    # the same process id on this host, but started at another time: the pid was reused, the worker is gone
    reused = {**here.as_dict(), "started": here.started - 3600, "ticks": here.ticks - 360_000}
    trial.set_user_attr("worker", reused)
    assert liveness.reclaim_dead_trials(study) == [0]
    assert study.get_trials()[0].state == TrialState.FAIL


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_fails_the_running_trial_as_interrupted_and_a_rerun_resumes(run_dir, signum, code):
    proc = start_search(run_dir)
    running = wait_for(lambda: running_after_one_complete(run_dir), proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code
    assert "Traceback" not in err and "rerun the same command to resume" in err
    trials = load(run_dir)
    stopped = [t for t in trials if t.state == TrialState.FAIL]
    # the signal lands in the trial seen running, or in the next one if that one just finished
    assert (
        len(stopped) == 1
        and stopped[0].number >= running.number
        and stopped[0].user_attrs["fail_reason"] == "interrupted"
    )
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert search_main(["--config", "run.yaml", "--no-progress"]) == 0
    assert sum(t.state == TrialState.COMPLETE for t in load(run_dir)) == 3


@pytest.mark.parametrize("stage", ["loading data", "opening the study"])
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_before_the_first_trial_stops_the_search_even_when_inherited_as_ignored(
    run_dir, monkeypatch, stage, signum, code
):
    # a background job of a non-interactive shell starts with SIGINT ignored; Python then installs no handler of its own
    import nas.data.datasets
    import nas.study.run

    module, name = (nas.data.datasets, "load_dataset") if stage == "loading data" else (nas.study.run, "create_or_load")
    real = getattr(module, name)

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signum)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, signalled)
    previous = signal.signal(signum, signal.SIG_IGN)
    try:
        assert search_main(["--config", "run.yaml", "--no-progress"]) == code
    finally:
        signal.signal(signum, previous)
    assert signal.getsignal(signum) == previous  # handed back
    if stage == "loading data":
        assert not (run_dir / "nas.db").exists()  # a new SQLite file waits for the data
    else:
        assert load(run_dir) == []


def test_a_signal_whose_raise_python_drops_still_interrupts_the_trial(run_dir, monkeypatch):
    # a signal landing in a weakref callback (SQLAlchemy registers some): Python prints "Exception ignored"
    # and drops the raise
    import weakref

    import nas.training.folds_together
    import nas.training.train

    class Collected:
        pass

    def signal_inside_a_weakref_callback(ref):
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):  # the handler runs here, inside the callback
            pass

    sent = []
    for module in (nas.training.train, nas.training.folds_together):  # whichever fold mode trains
        real = module.loaded

        def loaded(*args, real=real):
            for batch in real(*args):
                if not sent:
                    obj = Collected()
                    sent.append(weakref.ref(obj, signal_inside_a_weakref_callback))
                    del obj
                yield batch

        monkeypatch.setattr(module, "loaded", loaded)
    dropped = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: dropped.append(u.exc_type))
    assert search_main(["--config", "run.yaml", "--no-progress"]) == 130
    assert dropped == [KeyboardInterrupt]  # the raise was dropped where it landed
    (trial,) = load(run_dir)
    assert trial.state == TrialState.FAIL and trial.user_attrs["fail_reason"] == "interrupted"
