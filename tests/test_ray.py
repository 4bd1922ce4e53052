"""`nas-search --ray`: the --workers loop started as Ray tasks (a real local Ray, and Ray's two-node test
cluster on this machine with a real PostgreSQL), the refusals, a worker that fails naming its node, and
a worker killed mid-trial."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from conftest import write_digits_run
from optuna.trial import TrialState

from nas.cli import search_main
from nas.cluster.ray_workers import gpus_per_worker, run_worker, wait_for_workers, worker_task
from nas.errors import StudyError, Terminated
from nas.study.schema import counts_toward_budget, read_stop_request
from nas.training.signals import SIGNALS

pytestmark = pytest.mark.system  # starts Ray test clusters and a PostgreSQL server

ray = pytest.importorskip("ray")
SPACE = {"stages": 1, "width": 8, "training": {"lr": {"float": [0.01, 0.1], "log": True}}}


def test_ray_workers_share_one_study_and_finish_exactly_its_budget(tmp_path, monkeypatch, capsys):
    config = write_digits_run(
        tmp_path,
        SPACE,
        f"sqlite:///{tmp_path}/nas.db",
        {"name": "r", "sampler": "random", "trials": 4},
        {"folds": 2, "epochs": 2},
    )
    monkeypatch.chdir(tmp_path)

    assert search_main(["--config", str(config), "--ray", "--ray-workers", "2", "--cpus-per-trial", "1"]) == 0

    out = capsys.readouterr().out
    assert "Ray: 2 worker(s) on 1 node(s), 1 CPU and 0 GPU each" in out and "Top 4 of 4 finished trials in 'r'" in out
    trials = optuna.load_study(study_name="r", storage=f"sqlite:///{tmp_path}/nas.db").get_trials()
    assert sum(t.state == TrialState.COMPLETE and counts_toward_budget(t) for t in trials) == 4
    assert not [t for t in trials if t.state == TrialState.RUNNING]


def test_without_an_address_the_workers_get_a_ray_of_their_own_beside_another_cluster(cluster, tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config = write_digits_run(
        tmp_path, SPACE, f"sqlite:///{tmp_path}/nas.db", {"name": "own", "trials": 1}, {"folds": 2, "epochs": 1}
    )
    driver = subprocess.run(
        [sys.executable, "-m", "nas.cli", "--config", str(config), "--ray", "--no-progress"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=1800,  # a hang guard
    )
    assert driver.returncode == 0, driver.stderr
    assert "on 1 node(s)" in driver.stdout  # ray.init() would have joined the two-node test cluster


def test_sqlite_with_workers_on_other_nodes_is_refused_before_any_starts(cluster, tmp_path, capsys):
    config = write_digits_run(
        tmp_path,
        SPACE,
        f"sqlite:///{tmp_path}/nas.db",
        {"name": "r", "sampler": "random", "trials": 2},
        {"folds": 2, "epochs": 1},
    )
    assert search_main(["--config", str(config), "--ray", cluster.address, "--ray-workers", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("--ray: the Ray cluster has 2 nodes and the storage is SQLite") and err.count("\n") == 1
    assert not (tmp_path / "nas.db").exists()


def test_a_gpu_reservation_the_cluster_cannot_meet_is_refused_before_any_worker_starts(tmp_path, capsys):
    config = write_digits_run(
        tmp_path,
        SPACE,
        f"sqlite:///{tmp_path}/nas.db",
        {"name": "g", "sampler": "random", "trials": 2},
        {"folds": 2, "epochs": 1},
    )
    assert search_main(["--config", str(config), "--ray", "--ray-workers", "2", "--gpus-per-trial", "0.5"]) == 2
    err = capsys.readouterr().err  # after whatever Ray's own start-up printed (once: its dashboard aborted, -6)
    assert err.endswith(
        "\n--gpus-per-trial 0.5: the Ray cluster has no GPUs; leave it out (or 0) to train on CPUs\n"
    ) or (err == "--gpus-per-trial 0.5: the Ray cluster has no GPUs; leave it out (or 0) to train on CPUs\n")
    assert not (tmp_path / "nas.db").exists()


@pytest.mark.parametrize(
    "requested, device, cluster_gpus, reserved",
    [
        (None, "auto", 2, 1.0),
        (None, "cuda", 1, 1.0),
        (None, "cpu", 2, 0.0),
        (None, "auto", 0, 0.0),
        (0.25, "auto", 1, 0.25),
        (0.0, "auto", 1, 0.0),
        (0.0, "cpu", 0, 0.0),
    ],
)
def test_each_worker_reserves_one_gpu_by_default_where_the_cluster_has_them(requested, device, cluster_gpus, reserved):
    assert gpus_per_worker(requested, device, cluster_gpus) == reserved


def test_no_gpu_for_a_worker_that_must_train_on_cuda_is_refused():
    with pytest.raises(StudyError, match="Ray hides the GPUs from a worker that reserves none"):
        gpus_per_worker(0.0, "cuda", 4)


def test_without_ray_installed_the_flag_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)
    config = write_digits_run(
        tmp_path, SPACE, f"sqlite:///{tmp_path}/nas.db", {"name": "r", "trials": 1}, {"folds": 2, "epochs": 1}
    )
    assert search_main(["--config", str(config), "--ray"]) == 2
    assert capsys.readouterr().err == "--ray: Ray is not installed; install it with pip install 'bnnas[ray]'\n"


def test_a_worker_that_cannot_start_or_fails_is_reported_with_its_node_and_last_line(tmp_path):
    import socket

    missing = run_worker([str(tmp_path / "no-python"), "-m", "nas.cli"], str(tmp_path))
    assert (missing.node, missing.exit_code) == (socket.gethostname(), 127) and "cannot start" in missing.last_line
    failed = run_worker(
        [sys.executable, "-c", "import sys; print('a', file=sys.stderr); sys.exit('storage unreachable')"],
        str(tmp_path),
    )
    assert (failed.exit_code, failed.last_line) == (1, "storage unreachable")


# --------------------------------------------------------------------------- the driver on a signal


def signal_dropped_in_a_weakref_callback(signum: int) -> None:
    """Deliver `signum` where Python drops an exception its handler raises: inside a weakref callback
    (SQLAlchemy registers some; a driver polling the storage runs them), as a loaded machine makes likely."""
    import weakref

    class Collected:
        pass

    def callback(ref):
        signal.raise_signal(signum)

    doomed = Collected()
    ref = weakref.ref(doomed, callback)
    del doomed
    assert ref() is None


class ClusterOnASignal:
    """Ray's wait / get / cancel for worker tasks that run until stopped: the first wait receives `signals`,
    one per wait; a task ends once the study's stop request is stored, or once cancelled."""

    def __init__(self, storage, study_name: str, signals: list[int]):
        self.storage, self.study_name, self.signals = storage, study_name, list(signals)
        self.started, self.cancelled, self.waits = 0, [], 0

    def remote(self, command, cwd):
        self.started += 1
        return f"task {self.started}"

    def wait(self, pending, num_returns=1, timeout=None):
        self.waits += 1
        assert self.waits < 20, "the driver goes on waiting for workers it was told to stop"
        if self.signals:
            signal_dropped_in_a_weakref_callback(self.signals.pop(0))
        stopped = read_stop_request(self.storage, self.storage.get_study_id_from_name(self.study_name)) is not None
        ended = [ref for ref in pending if stopped or ref in self.cancelled]
        return ended, [ref for ref in pending if ref not in ended]

    def get(self, pending):
        return ["ended" for _ in pending]

    def cancel(self, ref):
        self.cancelled.append(ref)


@pytest.mark.parametrize(
    "signals, raised, cancelled",
    [
        ([signal.SIGINT], KeyboardInterrupt, False),  # stop after the running trials
        ([signal.SIGINT, signal.SIGINT], KeyboardInterrupt, True),  # Ctrl-C again: interrupt them now
        ([signal.SIGTERM], Terminated, True),
    ],
    ids=["ctrl-c", "ctrl-c-twice", "sigterm"],
)
def test_a_signal_whose_raise_python_dropped_still_stops_the_workers(tmp_path, signals, raised, cancelled):
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'study.db'}")
    optuna.create_study(storage=storage, study_name="s")
    cluster = ClusterOnASignal(storage, "s", signals)
    logged = []
    with SIGNALS.installed(), pytest.raises(raised):
        wait_for_workers(cluster, cluster, ["nas-search"], 2, storage, "s", logged.append)
    assert cluster.started == 1  # the signal came before the first worker had the study: no second started
    assert (read_stop_request(storage, storage.get_study_id_from_name("s")) is not None) == (
        signals[0] == signal.SIGINT
    )
    assert (cluster.cancelled == ["task 1"]) == cancelled
    assert SIGNALS.pending is None


# --------------------------------------------------------------------------- faults: two Ray nodes, one PostgreSQL


def ray_search(tmp_path, url: str, study: str, trials: int, address: str, epochs: int) -> subprocess.Popen:
    """A driver running a digits search on PostgreSQL with two Ray workers (a 1 s heartbeat)."""
    config = write_digits_run(
        tmp_path,
        SPACE,
        url,
        {"name": study, "sampler": "random", "trials": trials, "heartbeat_seconds": 1},
        {"folds": 2, "epochs": epochs},
    )
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nas.cli",
            "--config",
            str(config),
            "--ray",
            address,
            "--ray-workers",
            "2",
            "--no-progress",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def running_trial(url: str, study: str, driver, where=lambda pid: True, timeout: float = 900):
    """Poll the storage until a trial of `study` trains (worker recorded, params drawn, `where` its pid);
    its FrozenTrial. The timeout only guards against a hang: beside a CPU hog a worker on the second node took
    over 4 minutes to start its first trial."""
    storage = optuna.storages.RDBStorage(
        url
    )  # one connection pool: a pool per poll would exhaust the server's connections
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and driver.poll() is None:
            try:
                trials = optuna.load_study(study_name=study, storage=storage).get_trials(states=(TrialState.RUNNING,))
            except KeyError:  # the first worker has not made the study yet
                trials = []
            recorded = [
                t
                for t in trials
                if isinstance(t.user_attrs.get("worker"), dict) and t.params and where(t.user_attrs["worker"]["pid"])
            ]
            if recorded:
                return recorded[0]
            time.sleep(0.2)
        seen = [
            (t.number, t.state.name, (t.user_attrs.get("worker") or {}).get("pid"))
            for t in optuna.load_study(study_name=study, storage=storage).get_trials()
        ]
    except KeyError:
        seen = "no study"
    finally:
        storage.engine.dispose()
    raise AssertionError(f"no running trial in {timeout:g} s (driver exit code {driver.poll()}); trials {seen}")


def finished(driver, timeout: float = 1800) -> tuple[str, str]:  # a hang guard, sized for a loaded machine
    try:
        return driver.communicate(timeout=timeout)
    finally:
        if driver.poll() is None:
            driver.kill()


def assert_budget_finished_with_the_trial_retried(url: str, study: str, trials: int, victim) -> None:
    ended = optuna.load_study(study_name=study, storage=url).get_trials()
    assert sum(t.state == TrialState.COMPLETE and counts_toward_budget(t) for t in ended) == trials
    assert not [t for t in ended if t.state == TrialState.RUNNING]
    assert (
        next(t for t in ended if t.number == victim.number).state == TrialState.FAIL
    )  # reclaimed: by its host, or by its heartbeat
    retries = [t for t in ended if t.system_attrs.get("failed_trial") == victim.number]
    assert [(t.state, t.params) for t in retries] == [(TrialState.COMPLETE, victim.params)], [
        (t.number, t.state.name, t.params, t.user_attrs.get("fail_reason"), t.system_attrs) for t in ended
    ]


def test_a_worker_killed_mid_trial_is_restarted_and_its_trial_retried(pg_server, cluster, tmp_path):
    driver = ray_search(tmp_path, pg_server, "kill", 2, cluster.address, epochs=60)
    try:
        victim = running_trial(pg_server, "kill", driver)
        os.kill(victim.user_attrs["worker"]["pid"], signal.SIGKILL)
    finally:
        out, err = finished(driver)
    assert driver.returncode == 0, err
    assert_budget_finished_with_the_trial_retried(pg_server, "kill", 2, victim)


def test_a_node_killed_mid_trial_takes_its_worker_and_the_trial_is_retried_on_the_other(pg_server, cluster, tmp_path):
    import psutil

    node = cluster.worker_nodes.copy().pop()
    raylet = node.all_processes["raylet"][0].process.pid

    def on_the_node(pid: int) -> bool:
        return raylet in [p.pid for p in psutil.Process(pid).parents()]

    driver = ray_search(tmp_path, pg_server, "node", 4, cluster.address, epochs=150)  # time for both workers to start
    try:
        victim = running_trial(pg_server, "node", driver, on_the_node)
        cluster.remove_node(node, allow_graceful=False)  # its raylet and Ray workers killed, as when a machine dies
    finally:
        out, err = finished(driver)
    assert driver.returncode == 0, err
    assert not psutil.pid_exists(victim.user_attrs["worker"]["pid"])  # not left running, orphaned, with its trial
    assert_budget_finished_with_the_trial_retried(pg_server, "node", 4, victim)


def test_an_interrupted_driver_lets_workers_finish_their_trials_and_the_same_command_resumes(
    pg_server, cluster, tmp_path
):
    driver = ray_search(tmp_path, pg_server, "stop", 4, cluster.address, epochs=30)
    try:
        running_trial(pg_server, "stop", driver)
        driver.send_signal(signal.SIGINT)  # Ctrl-C: the stop request; each worker ends at its trial boundary
    finally:
        out, err = finished(driver)
    assert driver.returncode == 130, err
    stopped = optuna.load_study(study_name="stop", storage=pg_server).get_trials()
    assert [t.state for t in stopped] == [TrialState.COMPLETE] * len(stopped) and 1 <= len(
        stopped
    ) < 4  # finished, not cut off

    again = ray_search(tmp_path, pg_server, "stop", 4, cluster.address, epochs=30)
    out, err = finished(again)
    assert again.returncode == 0, err
    resumed = optuna.load_study(study_name="stop", storage=pg_server).get_trials()
    assert sum(t.state == TrialState.COMPLETE and counts_toward_budget(t) for t in resumed) == 4
    assert {t.user_attrs.get("fail_reason") for t in resumed if t.state != TrialState.COMPLETE} <= {
        "budget already reached by other workers"
    }
    assert [t.number for t in resumed[: len(stopped)]] == [
        t.number for t in stopped
    ]  # the finished ones kept, not redone


def test_workers_on_every_node_get_the_storage_proxys_credentials_from_the_driver(tmp_path, monkeypatch):
    """The node's Ray was started before the token was set, as on a cluster's other nodes: only what the
    driver forwards reaches the workers."""
    from nas.cluster.ray_workers import start_ray

    start_ray(ray, "local", num_cpus=1, log_to_driver=True)  # not another test's cluster; again if it starts late
    monkeypatch.setenv("BNNAS_PROXY_TOKEN", "token-set-after-the-nodes-started")
    monkeypatch.setenv("UNRELATED_SECRET", "not forwarded")
    try:
        task = worker_task(ray, 1, 0)
        show = (
            "import os, sys; "
            "sys.exit(os.environ.get('BNNAS_PROXY_TOKEN', '-') + ' ' + os.environ.get('UNRELATED_SECRET', '-'))"
        )
        results = ray.get([task.remote([sys.executable, "-c", show], str(tmp_path)) for _ in range(2)])
    finally:
        ray.shutdown()
    assert [r.last_line for r in results] == ["token-set-after-the-nodes-started -"] * 2


class SlowStartingRay:
    """Ray's init and shutdown as a machine too loaded for Ray's fixed startup waits shows them: the first
    `timeouts` starts time out with Ray's own message, then one starts."""

    def __init__(self, timeouts: int, message: str = "The current node timed out during startup. This could happen"):
        self.timeouts, self.message, self.starts, self.shutdowns = timeouts, message, 0, 0

    def init(self, **kwargs):
        self.starts += 1
        if self.starts <= self.timeouts:
            raise Exception(self.message)

    def shutdown(self):
        self.shutdowns += 1


def test_a_local_ray_that_times_out_starting_is_started_again_and_says_so():
    from nas.cluster.ray_workers import STARTS, start_ray

    said = []
    slow = SlowStartingRay(timeouts=STARTS - 1)
    start_ray(slow, "local", said.append)
    assert slow.starts == STARTS and slow.shutdowns == STARTS - 1 and len(said) == STARTS - 1
    assert said[0] == f"Ray: the local Ray did not start in time (try 1 of {STARTS}); starting it again"
    with pytest.raises(Exception, match="timed out during startup"):
        start_ray(SlowStartingRay(timeouts=STARTS), "local", said.append)  # it gives up after STARTS tries
    for ray_at, error in (("ray://head:10001", "timed out during startup"), ("local", "No module named 'x'")):
        other = SlowStartingRay(timeouts=1, message=error)
        with pytest.raises(Exception, match=error):
            start_ray(other, ray_at, said.append)  # another's cluster, or another failure: not retried
        assert other.starts == 1
