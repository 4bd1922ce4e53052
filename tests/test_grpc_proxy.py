"""Optuna's gRPC storage proxy (`nas-storage-proxy`, `--storage grpc://HOST:PORT`): workers, reports and Ray
workers on a study they reach only through the proxy, a proxy that is not there, and the reclaim of a dead
worker's trial on another host by its silent worker record (the proxy carries no Optuna heartbeat)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import optuna
import pytest
from conftest import write_digits_run
from optuna.trial import TrialState

from nas.cli import search_main
from nas.study.schema import WORKER_ATTR, counts_toward_budget
from nas.study.storage import make_storage, storage_of
from nas.study.storage import open_to_read as dashboard_storage
from nas.study.workers import Identity, reclaim_dead_trials

pytestmark = pytest.mark.system  # starts gRPC proxy servers, a Ray cluster and a PostgreSQL server

pytest.importorskip("grpc")
SPACE = {"stages": 1, "width": 8, "training": {"lr": {"float": [0.01, 0.1], "log": True}}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_proxy(
    storage: str, *args: str, env: dict | None = None, scheme: str = "grpc"
) -> tuple[subprocess.Popen, str]:
    """A `nas-storage-proxy` subprocess on 127.0.0.1 (extra flags `args`, environment `env`) once it listens."""
    port = free_port()
    proxy = subprocess.Popen(
        [sys.executable, "-m", "nas", "storage-proxy", "--storage", storage, "--port", str(port), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    line = proxy.stdout.readline()  # printed once it listens
    url = f"{scheme}://127.0.0.1:{port}"
    assert line.startswith("nas-storage-proxy: serving ") and line.rstrip().endswith(url), proxy.stderr.read()
    return proxy, url


@pytest.fixture
def proxy(tmp_path):
    """A proxy in front of a SQLite file; yields (grpc URL, the file's URL)."""
    sqlite = f"sqlite:///{tmp_path}/behind.db"
    process, url = start_proxy(sqlite)
    yield url, sqlite
    process.terminate()
    process.wait(timeout=30)


def test_workers_that_reach_the_study_only_through_the_proxy_finish_exactly_its_budget(proxy, tmp_path):
    url, sqlite = proxy
    config = write_digits_run(
        tmp_path, SPACE, url, {"name": "g", "sampler": "random", "trials": 3}, {"folds": 2, "epochs": 1}
    )
    done = subprocess.run(
        [sys.executable, "-m", "nas.cli", "--config", str(config), "--workers", "2", "--no-progress"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    behind = optuna.load_study(study_name="g", storage=sqlite).get_trials()  # written by the proxy alone
    assert sum(t.state == TrialState.COMPLETE and counts_toward_budget(t) for t in behind) == 3
    report = subprocess.run(
        [sys.executable, "-m", "nas", "report", "--storage", url, "--study", "g", "--out", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert report.returncode == 0 and (tmp_path / "r" / "report.md").is_file(), report.stderr
    assert [s.study_name for s in dashboard_storage(url).get_all_studies()] == [
        "g"
    ]  # what nas-dashboard --storage URL reads


def test_a_proxy_that_does_not_answer_is_refused_in_one_line(tmp_path, capsys):
    url = f"grpc://127.0.0.1:{free_port()}"
    config = write_digits_run(tmp_path, SPACE, url, {"name": "g", "trials": 1}, {"folds": 2, "epochs": 1})
    assert search_main(["--config", str(config), "--no-progress"]) == 2
    assert (
        capsys.readouterr().err
        == f"study.storage: no storage proxy answers at {url} (start one with nas-storage-proxy)\n"
    )


def running_trial_of(study: optuna.Study, host: str) -> optuna.trial.FrozenTrial:
    """A trial RUNNING with params, marked as run by a process on `host` (as another node's worker marks it)."""
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    owner = Identity(host, 4242, 1_700_000_000.0, "elsewhere")
    trial.set_user_attr(WORKER_ATTR, owner.as_dict())
    return study._storage.get_trial(trial._trial_id), owner


def test_a_trial_whose_worker_on_another_host_fell_silent_is_reclaimed_and_retried_through_the_proxy(proxy):
    study = optuna.create_study(study_name="r", storage=storage_of(proxy[0]))
    silent, silent_owner = running_trial_of(study, "node-b")
    alive, alive_owner = running_trial_of(study, "node-c")
    study._storage.set_study_system_attr(
        study._study_id, silent_owner.key, {**silent_owner.as_dict(), "beat": time.time() - 100}
    )
    study._storage.set_study_system_attr(
        study._study_id, alive_owner.key, {**alive_owner.as_dict(), "beat": time.time()}
    )

    assert reclaim_dead_trials(study, grace_seconds=60, retries=1) == [silent.number]
    trials = {t.number: t for t in study.get_trials()}
    assert trials[silent.number].state == TrialState.FAIL
    assert trials[silent.number].user_attrs["fail_reason"].startswith("worker silent for over 60 s (node-b pid 4242)")
    assert trials[alive.number].state == TrialState.RUNNING
    retry = [t for t in trials.values() if t.system_attrs.get("failed_trial") == silent.number]
    assert [(t.state, t.params) for t in retry] == [(TrialState.WAITING, silent.params)]


def test_with_optunas_heartbeat_a_silent_record_on_another_host_is_left_to_the_heartbeat(tmp_path):
    study = optuna.create_study(
        study_name="r", storage=make_storage(f"sqlite:///{tmp_path}/h.db", heartbeat_seconds=30, retries=1)
    )
    trial, owner = running_trial_of(study, "node-b")  # no record at all: silent
    assert reclaim_dead_trials(study, grace_seconds=60, retries=1) == []
    assert study._storage.get_trial(trial._trial_id).state == TrialState.RUNNING


def test_ray_workers_on_two_nodes_share_a_postgresql_study_through_the_proxy(pg_server, cluster, tmp_path):
    process, url = start_proxy(pg_server)
    try:
        config = write_digits_run(
            tmp_path, SPACE, url, {"name": "rg", "sampler": "random", "trials": 4}, {"folds": 2, "epochs": 2}
        )
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "nas.cli",
                "--config",
                str(config),
                "--ray",
                cluster.address,
                "--ray-workers",
                "2",
                "--no-progress",
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert done.returncode == 0, done.stderr  # every worker, on either node, reached the study through the proxy
    trials = optuna.load_study(study_name="rg", storage=pg_server).get_trials()
    assert sum(t.state == TrialState.COMPLETE and counts_toward_budget(t) for t in trials) == 4
    assert not [t for t in trials if t.state == TrialState.RUNNING]


def test_without_grpcio_a_grpc_storage_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "grpc", None)  # import grpc raises ImportError, as where it is not installed
    config = write_digits_run(
        tmp_path, SPACE, "grpc://127.0.0.1:13000", {"name": "g", "trials": 1}, {"folds": 2, "epochs": 1}
    )
    assert search_main(["--config", str(config), "--no-progress"]) == 2
    assert (
        capsys.readouterr().err
        == "study.storage: grpc://127.0.0.1:13000 needs grpcio; install it with pip install 'bnnas[grpc]'\n"
    )
