"""Workers on separate machines share one PostgreSQL study: a real server on 127.0.0.1, three nas-search processes."""

import os
import subprocess
import sys

import optuna
import pytest
import yaml
from optuna.trial import TrialState

pytestmark = pytest.mark.system  # starts a PostgreSQL server

SPACE = {
    "stages": 1,
    "width": 8,
    "block": {"norm": {"type": {"choice": ["batch", "none"]}}},
    "training": {"lr": {"float": [0.01, 0.1], "log": True}},
}
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
OVER_BUDGET = "budget already reached by other workers"
STUDY = "pg"


@pytest.fixture(scope="module")
def three_workers(pg_server, tmp_path_factory):
    """Three independent `nas-search` processes (as on three machines) on one PostgreSQL study of 6 trials."""
    run_dir = tmp_path_factory.mktemp("pg_workers")
    (run_dir / "space.yaml").write_text(yaml.safe_dump(SPACE))
    config = {
        "dataset": {"name": "digits"},
        "search_space": "space.yaml",
        "study": {"name": STUDY, "storage": pg_server, "sampler": "tpe", "trials": 6, "seed": 0},
        "evaluation": {"folds": 2, "epochs": 2},
        "device": "cpu",
    }
    (run_dir / "run.yaml").write_text(yaml.safe_dump(config))
    # A fresh database: the three workers also race to create Optuna's tables (nas.study.storage retries that).
    cmd = [sys.executable, "-m", "nas.cli", "--config", "run.yaml", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # three workers share this machine's cores
    procs = [
        subprocess.Popen(cmd, cwd=run_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=300)
            results.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return pg_server, results


def test_three_workers_on_postgres_end_with_exactly_the_budget(three_workers):
    url, results = three_workers
    for code, _out, err in results:
        assert code == 0, err
    done = optuna.load_study(study_name=STUDY, storage=url).get_trials()
    assert len([t for t in done if t.state in FINISHED]) == 6
    assert len({t.number for t in done}) == len(done)
    assert not [t for t in done if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert all(t.user_attrs.get("fail_reason") == OVER_BUDGET for t in done if t.state == TrialState.FAIL)
    assert {t.user_attrs.get("arch") is not None for t in done if t.state == TrialState.COMPLETE} == {True}


def test_resume_from_postgres_runs_one_more_trial(three_workers, tmp_path):
    url, _ = three_workers
    # an empty folder: no YAML, the stored run config comes back from PostgreSQL
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "nas.cli",
            "--resume",
            "--study",
            STUDY,
            "--storage",
            url,
            "--trials",
            "7",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "6/7 finished, running 1 more" in proc.stderr
    done = optuna.load_study(study_name=STUDY, storage=url).get_trials()
    assert len([t for t in done if t.state in FINISHED]) == 7
    assert not [t for t in done if t.state in (TrialState.RUNNING, TrialState.WAITING)]
