"""Live workers are known from their start: a record in the study, shown by nas-report and the dashboard,
which refuses a Resume while one is live; the record goes at exit and is ignored once stale or dead."""

import signal
import subprocess
import sys
import time

import optuna
import pytest
from conftest import write_digits_run
from dashboard_support import Dashboard

from nas.cli import search_main
from nas.study import workers as liveness
from nas.study.report import write_report

SPACE = {
    "stages": 1,
    "width": 8,
    "block": {"norm": {"type": {"choice": ["batch", "none"]}}},
    "training": {"lr": {"float": [0.01, 0.1], "log": True}},
}


def worker_keys(storage, study_id) -> list[str]:
    return [k for k in storage.get_study_system_attrs(study_id) if k.startswith(liveness.WORKER_PREFIX)]


@pytest.fixture
def storage(tmp_path):
    store = optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/nas.db")
    optuna.create_study(storage=store, study_name="w")
    return store


def test_a_record_is_listed_while_attached_and_gone_after_close(storage):
    study_id = storage.get_study_id_from_name("w")
    with liveness.WorkerRecord(interval=30) as record:
        assert liveness.live_workers(storage, study_id, 60) == []
        record.attach(storage, study_id)
        (live,) = liveness.live_workers(storage, study_id, 60)
        assert live.identity == liveness.current()
    assert liveness.live_workers(storage, study_id, 60) == [] and worker_keys(storage, study_id) == []


def test_a_stale_or_dead_record_is_not_live(storage):
    study_id = storage.get_study_id_from_name("w")
    here = liveness.current()
    elsewhere = liveness.Identity("another-machine", 1234, 1.0e9, "boot/pid")
    storage.set_study_system_attr(study_id, elsewhere.key, {**elsewhere.as_dict(), "beat": time.time() - 100})
    assert liveness.live_workers(storage, study_id, 60) == []  # silent for longer than the grace
    assert [w.identity for w in liveness.live_workers(storage, study_id, 200)] == [
        elsewhere
    ]  # another host: only its beat tells
    reused = liveness.Identity(
        here.host, here.pid, here.started - 3600, here.pid_space
    )  # this pid, another process's start
    storage.set_study_system_attr(study_id, reused.key, {**reused.as_dict(), "beat": time.time()})
    assert [w.identity for w in liveness.live_workers(storage, study_id, 200)] == [elsewhere]


@pytest.mark.slow
@pytest.mark.system  # starts a dashboard server process
def test_a_starting_search_is_a_live_worker_for_report_and_dashboard_before_its_first_trial(tmp_path):
    url = f"sqlite:///{tmp_path}/nas.db"
    config = write_digits_run(
        tmp_path, SPACE, url, {"name": "w", "sampler": "random", "trials": 1}, {"folds": 2, "epochs": 1}
    )
    assert search_main(["--config", str(config), "--no-progress"]) == 0
    # 2,000 epochs: the new run cannot finish its trials before the SIGINT below, however slow the checks are
    (tmp_path / "run.yaml").write_text((tmp_path / "run.yaml").read_text().replace("epochs: 1", "epochs: 2000"))
    dashboard = Dashboard(url, tmp_path / "work")
    search = subprocess.Popen(
        [sys.executable, "-m", "nas.cli", "--config", str(config), "--trials", "3", "--force", "--no-progress"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        store = optuna.storages.RDBStorage(url)
        study_id = store.get_study_id_from_name("w")
        deadline = time.monotonic() + 120
        while True:  # the record is written before any trial of the new run
            assert time.monotonic() < deadline and search.poll() is None
            trials_now = len(store.get_all_trials(study_id))
            live = liveness.live_workers(store, study_id, 60)
            if live:
                break
            assert trials_now == 1, "a trial of the new run started before its worker was recorded"
            time.sleep(0.05)
        assert [w.identity.pid for w in live] == [search.pid]
        status, body = dashboard.act("w", "resume", {"trials": 5})
        assert status == 409 and "live worker" in body["error"] and f"pid {search.pid}" in body["error"]
        assert dashboard.study("w")["state"] == "running"
        report = write_report(url, "w", tmp_path / "report").read_text()
        assert f"- workers: 1 live: {live[0].identity.host} pid {search.pid}" in report
        search.send_signal(signal.SIGINT)
        # 130, or death by SIGINT (-2) when the signal lands while an extension module imports: CPython then
        # re-raises SIGINT at exit after our message; shells show 130 for both
        assert search.wait(120) in (130, -signal.SIGINT), search.stderr.read()
        assert "rerun the same command to resume" in search.stderr.read()
        assert liveness.live_workers(store, study_id, 60) == [] and worker_keys(store, study_id) == []
    finally:
        if search.poll() is None:
            search.kill()
        dashboard.close()


def test_a_stepped_wall_clock_does_not_make_a_running_process_look_dead(monkeypatch):
    """psutil's create_time moves with the wall clock (boot time is read anew); a search that saw its own trial's
    process as gone after an NTP step failed the trial it was running, then crashed telling it."""
    here = liveness.current()
    stepped = liveness.psutil.Process.create_time
    monkeypatch.setattr(liveness.psutil.Process, "create_time", lambda self: stepped(self) + 5.0)
    assert here.ticks is not None and not liveness.known_dead(here)
    reused = liveness.Identity(here.host, here.pid, here.started, here.pid_space, here.ticks - 100)
    assert liveness.known_dead(reused)  # this pid, another process's start
    assert liveness.Identity.from_dict(here.as_dict()) == here


def test_a_record_older_than_start_ticks_is_still_judged_by_its_start_time():
    here = liveness.current()
    older = {key: value for key, value in here.as_dict().items() if key != "ticks"}
    assert liveness.Identity.from_dict(older).ticks is None and not liveness.known_dead(
        liveness.Identity.from_dict(older)
    )
    assert liveness.known_dead(liveness.Identity.from_dict({**older, "started": here.started - 3600}))
    assert liveness.Identity.from_dict(None) is None and liveness.Identity.from_dict("vm:1") is None
