"""`nas-search --ray`: the --workers loop started as Ray tasks (a real local Ray, and Ray's two-node test
cluster on this machine with a real PostgreSQL), the refusals, a worker that fails naming its node, and
a worker killed mid-trial."""

from __future__ import annotations

import sys

import optuna
import pytest
from optuna.trial import TrialState

from conftest import write_digits_run
from nas.cli import search_main
from nas.ray_launch import run_worker
from nas.storage import counts_toward_budget
from tests.test_postgres import pg_server  # noqa: F401  (the throwaway PostgreSQL server fixture)

ray = pytest.importorskip("ray")
SPACE = {"stages": 1, "width": 8, "training": {"lr": {"float": [0.01, 0.1], "log": True}}}


def test_ray_workers_share_one_study_and_finish_exactly_its_budget(tmp_path, monkeypatch, capsys):
    config = write_digits_run(tmp_path, SPACE, f"sqlite:///{tmp_path}/nas.db", {"name": "r", "sampler": "random", "trials": 4}, {"folds": 2, "epochs": 2})
    monkeypatch.chdir(tmp_path)

    assert search_main(["--config", str(config), "--ray", "--ray-workers", "2", "--cpus-per-trial", "1"]) == 0

    out = capsys.readouterr().out
    assert "Ray: 2 worker(s) on 1 node(s), 1 CPU and 0 GPU each" in out and "Top 4 of 4 finished trials in 'r'" in out
    trials = optuna.load_study(study_name="r", storage=f"sqlite:///{tmp_path}/nas.db").get_trials()
    assert sum(t.state == TrialState.COMPLETE and counts_toward_budget(t) for t in trials) == 4
    assert not [t for t in trials if t.state == TrialState.RUNNING]


def test_sqlite_with_workers_on_other_nodes_is_refused_before_any_starts(tmp_path, capsys):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        config = write_digits_run(tmp_path, SPACE, f"sqlite:///{tmp_path}/nas.db", {"name": "r", "sampler": "random", "trials": 2},
                                  {"folds": 2, "epochs": 1})
        assert search_main(["--config", str(config), "--ray", cluster.address, "--ray-workers", "2"]) == 2
    finally:
        cluster.shutdown()
    err = capsys.readouterr().err
    assert err.startswith("--ray: the Ray cluster has 2 nodes and the storage is SQLite") and err.count("\n") == 1
    assert not (tmp_path / "nas.db").exists()


def test_without_ray_installed_the_flag_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)
    config = write_digits_run(tmp_path, SPACE, f"sqlite:///{tmp_path}/nas.db", {"name": "r", "trials": 1}, {"folds": 2, "epochs": 1})
    assert search_main(["--config", str(config), "--ray"]) == 2
    assert capsys.readouterr().err == "--ray: Ray is not installed; install it with pip install 'bnnas[ray]'\n"


def test_a_worker_that_cannot_start_or_fails_is_reported_with_its_node_and_last_line(tmp_path):
    import socket

    missing = run_worker([str(tmp_path / "no-python"), "-m", "nas.cli"], str(tmp_path))
    assert (missing.node, missing.exit_code) == (socket.gethostname(), 127) and "cannot start" in missing.last_line
    failed = run_worker([sys.executable, "-c", "import sys; print('a', file=sys.stderr); sys.exit('storage unreachable')"], str(tmp_path))
    assert (failed.exit_code, failed.last_line) == (1, "storage unreachable")


# --------------------------------------------------------------------------- faults: two Ray nodes, one PostgreSQL


@pytest.fixture
def two_nodes():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    yield cluster.address
    cluster.shutdown()


def ray_search(tmp_path, url: str, study: str, trials: int, address: str, epochs: int) -> list[str]:
    """The driver command of a digits search on PostgreSQL with two Ray workers (a 1 s heartbeat)."""
    config = write_digits_run(tmp_path, SPACE, url, {"name": study, "sampler": "random", "trials": trials, "heartbeat_seconds": 1},
                              {"folds": 2, "epochs": epochs})
    return [sys.executable, "-m", "nas.cli", "--config", str(config), "--ray", address, "--ray-workers", "2", "--no-progress"]


def running_trial(url: str, study: str, driver, deadline: float):
    """Poll the storage until a trial of `study` runs with its worker recorded; its FrozenTrial."""
    import time

    while time.monotonic() < deadline and driver.poll() is None:
        try:
            trials = optuna.load_study(study_name=study, storage=url).get_trials(states=(TrialState.RUNNING,))
        except KeyError:  # the first worker has not made the study yet
            trials = []
        recorded = [t for t in trials if isinstance(t.user_attrs.get("worker"), dict)]
        if recorded:
            return recorded[0]
        time.sleep(0.2)
    raise AssertionError(f"no running trial (driver exit code {driver.poll()})")


def test_a_worker_killed_mid_trial_is_restarted_and_its_trial_retried(pg_server, two_nodes, tmp_path):
    import os
    import signal
    import subprocess
    import time

    driver = subprocess.Popen(ray_search(tmp_path, pg_server, "kill", 4, two_nodes, epochs=60), cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        victim = running_trial(pg_server, "kill", driver, time.monotonic() + 240)
        os.kill(victim.user_attrs["worker"]["pid"], signal.SIGKILL)
        out, err = driver.communicate(timeout=600)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, err
    trials = optuna.load_study(study_name="kill", storage=pg_server).get_trials()
    assert sum(t.state == TrialState.COMPLETE and counts_toward_budget(t) for t in trials) == 4
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    killed = next(t for t in trials if t.number == victim.number)
    assert killed.state == TrialState.FAIL and "worker process gone" in killed.user_attrs.get("fail_reason", "")
    assert [t for t in trials if t.number > victim.number and t.params == victim.params and t.state == TrialState.COMPLETE]
